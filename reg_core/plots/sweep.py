"""The sweep's pictures: the score-vs-cfg plot and the labelled image grid (rows = methods, columns = cfg values).

Pure numpy + Pillow on :mod:`reg_core.plots`; what to run and how to read the results is :mod:`reg_core.sweep`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .. import plots
from ..sweep import X_AXIS, SweepRun, score_series

#: Longest side of the grid image; larger grids are drawn with proportionally smaller images.
MAX_GRID_SIDE = 8192

#: ASCII stand-ins for characters Pillow's bundled font has no glyph for.
FALLBACKS = {"×": "x", "−": "-", "→": "->", "≤": "<=", "≥": ">=", "λ": "lambda", "σ": "sigma"}


def drawable(text: str, size: int = 12) -> str:
    """``text`` with every character the bundled font cannot draw replaced (``×`` → ``x``, unknown ones → ``?``)."""
    font = plots.font(size)
    if not hasattr(font, "getmask"):
        return text
    missing = bytes(font.getmask("\uffff"))
    out = []
    for char in text:
        if char.isspace() or char.isascii() or bytes(font.getmask(char)) != missing:
            out.append(char)
        else:
            out.append(FALLBACKS.get(char, "?"))
    return "".join(out)


def score_plot(
    runs: Sequence[SweepRun],
    scores: Sequence[float],
    *,
    metric: str,
    subtitle: str = "",
    size: tuple[int, int] = (720, 440),
) -> Image.Image:
    """The trade-off plot: ``metric`` against cfg, one curve per method, all at the same weights (:data:`X_AXIS`)."""
    title = drawable(f"{metric} vs cfg" + (f" · {subtitle}" if subtitle else ""))
    series = [(drawable(label), xs, ys) for label, xs, ys in score_series(runs, scores)]
    return plots.line_plot(series, title=title, xlabel=drawable(X_AXIS), ylabel=drawable(metric), size=size)


def tile_shape(count: int) -> tuple[int, int]:
    """``(rows, cols)`` of the near-square block that holds the ``count`` images of one cell (cols ≥ rows)."""
    if count < 1:
        raise ValueError(f"need at least one image per cell, got {count}")
    cols = math.ceil(math.sqrt(count))
    return math.ceil(count / cols), cols


@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of the grid: image ``(row, col, index)`` occupies :meth:`image_box`."""

    width: int
    height: int
    image_height: int
    image_width: int
    tile_rows: int
    tile_cols: int
    column_lefts: tuple[int, ...]  # left edge of each column's image block
    row_tops: tuple[int, ...]  # top edge of each row's image block
    tile_gap: int

    def image_box(self, row: int, col: int, index: int) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)`` (right/bottom exclusive) of image ``index`` of cell ``(row, col)``."""
        r, c = divmod(index, self.tile_cols)
        if r >= self.tile_rows:
            raise IndexError(f"cell holds {self.tile_rows * self.tile_cols} images, index {index} is out of range")
        left = self.column_lefts[col] + c * (self.image_width + self.tile_gap)
        top = self.row_tops[row] + r * (self.image_height + self.tile_gap)
        return left, top, left + self.image_width, top + self.image_height


GAP = 8  # between cells and around the grid
TILE_GAP = 2  # between the images of one cell
LABEL_FONT, CAPTION_FONT, TITLE_FONT = 14, 12, 14


def _text_size(text: str, size: int) -> tuple[int, int]:
    left, top, right, bottom = plots.font(size).getbbox(text or " ")
    return math.ceil(right - min(left, 0)), math.ceil(bottom - min(top, 0))


def grid_layout(
    rows: int,
    cols: int,
    batch: int,
    image_size: tuple[int, int],
    *,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    captions: Sequence[Sequence[str]],
    title: str = "",
    max_side: int = MAX_GRID_SIDE,
) -> GridLayout:
    """Where everything goes: a title line, column headers, row labels on the left, one caption under each cell.

    Each cell is a :func:`tile_shape` block of the batch's images; a column is as wide as its block or its widest
    text. If the grid would exceed ``max_side`` pixels on a side, the images are scaled down (text keeps its size).
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"grid needs at least one row and one column, got {rows}×{cols}")
    if len(row_labels) != rows or len(col_labels) != cols or len(captions) != rows:
        raise ValueError("row_labels, col_labels and captions must match the grid's rows and columns")
    tile_rows, tile_cols = tile_shape(batch)
    height, width = image_size
    label_width = max(_text_size(label, LABEL_FONT)[0] for label in row_labels) + 2 * GAP
    text_widths = [
        max(
            _text_size(col_labels[c], LABEL_FONT)[0],
            *(_text_size(captions[r][c], CAPTION_FONT)[0] for r in range(rows)),
        )
        for c in range(cols)
    ]
    title_h = _text_size(title, TITLE_FONT)[1] + GAP if title else 0
    header_h = _text_size("Ag", LABEL_FONT)[1] + GAP
    caption_h = _text_size("Ag", CAPTION_FONT)[1] + 4
    title_w = _text_size(title, TITLE_FONT)[0] + 2 * GAP if title else 0

    def build(h: int, w: int) -> GridLayout:
        block_w = tile_cols * w + (tile_cols - 1) * TILE_GAP
        block_h = tile_rows * h + (tile_rows - 1) * TILE_GAP
        lefts, x = [], GAP + label_width
        for c in range(cols):
            column = max(block_w, text_widths[c] + 4)
            lefts.append(x + (column - block_w) // 2)
            x += column + GAP
        tops, y = [], GAP + title_h + header_h
        for _ in range(rows):
            tops.append(y)
            y += block_h + caption_h + GAP
        return GridLayout(
            width=max(x, title_w),
            height=y,
            image_height=h,
            image_width=w,
            tile_rows=tile_rows,
            tile_cols=tile_cols,
            column_lefts=tuple(lefts),
            row_tops=tuple(tops),
            tile_gap=TILE_GAP,
        )

    layout = build(height, width)
    scale = 1.0
    while max(layout.width, layout.height) > max_side and min(layout.image_height, layout.image_width) > 1:
        scale *= 0.98 * max_side / max(layout.width, layout.height)
        layout = build(max(1, int(height * scale)), max(1, int(width * scale)))
    return layout


def compose_grid(
    cells: Sequence[Sequence[np.ndarray]],
    *,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    captions: Sequence[Sequence[str]],
    title: str = "",
    max_side: int = MAX_GRID_SIDE,
) -> tuple[np.ndarray, GridLayout]:
    """Draw the labelled grid of ``cells[row][col]`` (uint8 ``(B, H, W, 3)``, all the same shape).

    Returns the uint8 ``(height, width, 3)`` image and its :class:`GridLayout`. Images are pasted unchanged unless
    the grid has to be scaled down to ``max_side`` (then with Lanczos resampling). Characters the bundled font lacks
    are replaced (:func:`drawable`).
    """
    rows, cols = len(cells), len(cells[0]) if cells else 0
    shapes = {tuple(cell.shape) for row in cells for cell in row}
    if rows == 0 or cols == 0 or any(len(row) != cols for row in cells):
        raise ValueError("cells must be a non-empty rows × cols table")
    if len(shapes) != 1:
        raise ValueError(f"every cell must hold images of one shape, got {sorted(shapes)}")
    batch, height, width, channels = next(iter(shapes))
    if channels != 3 or next(iter(cells[0])).dtype != np.uint8:
        raise ValueError("cells must be uint8 RGB image batches (B, H, W, 3)")
    row_labels = [drawable(text) for text in row_labels]
    col_labels = [drawable(text) for text in col_labels]
    captions = [[drawable(text) for text in row] for row in captions]
    title = drawable(title)
    layout = grid_layout(
        rows,
        cols,
        batch,
        (height, width),
        row_labels=row_labels,
        col_labels=col_labels,
        captions=captions,
        title=title,
        max_side=max_side,
    )
    canvas = Image.new("RGB", (layout.width, layout.height), plots.WHITE)
    draw = ImageDraw.Draw(canvas)
    resize = (layout.image_width, layout.image_height) != (width, height)
    block_h = layout.tile_rows * layout.image_height + (layout.tile_rows - 1) * TILE_GAP
    block_w = layout.tile_cols * layout.image_width + (layout.tile_cols - 1) * TILE_GAP
    label_font, caption_font = plots.font(LABEL_FONT), plots.font(CAPTION_FONT)
    if title:
        draw.text((GAP, GAP), title, fill=plots.BLACK, font=plots.font(TITLE_FONT), anchor="lt")
    header_y = layout.row_tops[0] - GAP // 2
    for c, label in enumerate(col_labels):
        draw.text(
            (layout.column_lefts[c] + block_w / 2, header_y), label, fill=plots.BLACK, font=label_font, anchor="mb"
        )
    for r in range(rows):
        top = layout.row_tops[r]
        draw.text((GAP, top + block_h / 2), row_labels[r], fill=plots.BLACK, font=label_font, anchor="lm")
        for c in range(cols):
            for index, array in enumerate(cells[r][c]):
                image = Image.fromarray(np.ascontiguousarray(array))
                if resize:
                    image = image.resize((layout.image_width, layout.image_height), Image.Resampling.LANCZOS)
                left, image_top, _, _ = layout.image_box(r, c, index)
                canvas.paste(image, (left, image_top))
            draw.text(
                (layout.column_lefts[c] + block_w / 2, top + block_h + 2),
                captions[r][c],
                fill=plots.BLACK,
                font=caption_font,
                anchor="mt",
            )
    return np.asarray(canvas, dtype=np.uint8).copy(), layout
