"""Pure helpers of the guidance sweep node: parsing ``cfg_values``, planning the runs, the plot, the labelled grid.

The node (``nodes/sweep.py``) samples one image batch per (method, cfg) pair and scores it with the CLIP score; this
module holds everything that needs no model: which runs to make, how to draw the score-vs-cfg curves (with
:func:`reg_core.render.line_plot`) and how to lay the decoded images out as a labelled grid (rows = methods, columns =
cfg values). Pure numpy + Pillow; no ComfyUI import.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from . import render

#: Methods in display order: key → label. ``cfg`` is the plain guidance, the others are rectified by REG.
METHODS: dict[str, str] = {
    "cfg": "CFG",
    "reg": "CFG + REG",
    "apg_reg": "APG + REG",
    "pag_reg": "PAG + REG",
}
#: Methods whose sampler scale is APG's cond-anchored weight ``s`` (``D_c + s·G_apg``) instead of CFG's uncond-anchored
#: ``D_u + s·(D_c − D_u)``. They run at ``cfg − 1``, so every curve at one x has the same guidance weight
#: ``w = cfg − 1`` on ``D_c`` (and neutral APG, eta 1, no clipping or momentum, equals CFG at that x).
COND_ANCHORED = frozenset({"apg_reg"})
#: What the plot's and the report's x value means, for every curve.
X_AXIS = "cfg: guidance weight w = cfg - 1 on the positive prediction for every curve (APG + REG runs at APG scale w)"
#: Upper bound on methods × cfg values: every run is a full sampling run plus a decode and a CLIP pass.
MAX_RUNS = 64
#: KSampler's cfg range.
CFG_MIN, CFG_MAX = 0.0, 100.0
#: Longest side of the grid image; larger grids are drawn with proportionally smaller images.
MAX_GRID_SIDE = 8192
EXAMPLE = '"2, 4, 6, 8"'


#: ASCII stand-ins for characters Pillow's bundled font has no glyph for.
FALLBACKS = {"×": "x", "−": "-", "→": "->", "≤": "<=", "≥": ">=", "λ": "lambda", "σ": "sigma"}


def drawable(text: str, size: int = 12) -> str:
    """``text`` with every character the bundled font cannot draw replaced (``×`` → ``x``, unknown ones → ``?``)."""
    font = render.font(size)
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


class SweepConfigError(ValueError):
    """A sweep input cannot be used; the message names the input and the fix."""


def parse_cfg_values(text: str, *, name: str = "cfg_values", max_count: int = MAX_RUNS) -> list[float]:
    """cfg scales from a string such as ``"2, 4, 6, 8"`` → sorted, duplicate-free floats.

    Values may be separated by commas, semicolons or whitespace. Each must be a finite number in KSampler's range
    ``[0, 100]``; at most ``max_count`` distinct values. Raises :class:`SweepConfigError` naming ``name``.
    """
    if not isinstance(text, str):
        raise SweepConfigError(f"{name} must be text such as {EXAMPLE}, got {type(text).__name__}.")
    tokens = [token for token in re.split(r"[,;\s]+", text.strip()) if token]
    if not tokens:
        raise SweepConfigError(
            f"{name} is empty: enter the cfg scales to compare, separated by commas, e.g. {EXAMPLE}."
        )
    values: set[float] = set()
    for token in tokens:
        try:
            value = float(token)
        except ValueError:
            raise SweepConfigError(
                f"{name}: {token!r} is not a number. Enter cfg scales separated by commas, e.g. {EXAMPLE}."
            ) from None
        if not math.isfinite(value):
            raise SweepConfigError(f"{name}: {token!r} is not a finite number. Enter cfg scales such as {EXAMPLE}.")
        if not CFG_MIN <= value <= CFG_MAX:
            raise SweepConfigError(
                f"{name}: {token} is outside KSampler's cfg range [{CFG_MIN:g}, {CFG_MAX:g}]; use values in that range."
            )
        values.add(value)
    if len(values) > max_count:
        raise SweepConfigError(
            f"{name} has {len(values)} distinct values; at most {max_count} runs are allowed. Use fewer cfg values."
        )
    return sorted(values)


@dataclass(frozen=True)
class SweepRun:
    """One sampling run of the sweep: ``method`` at ``cfg``, drawn at grid cell ``(row, col)``."""

    method: str
    cfg: float
    row: int
    col: int

    @property
    def label(self) -> str:
        """Display name of the method."""
        return METHODS[self.method]

    @property
    def weight(self) -> float:
        """The cond-anchored guidance weight ``w = cfg − 1`` of this run (reg_core.guidance conventions)."""
        return self.cfg - 1.0

    @property
    def sampler_cfg(self) -> float:
        """The cfg the sampler gets: ``cfg`` for CFG-based methods, APG's own scale ``w`` for :data:`COND_ANCHORED`."""
        return self.weight if self.method in COND_ANCHORED else self.cfg


def plan_runs(methods: Sequence[str], cfg_values: Sequence[float], *, max_runs: int = MAX_RUNS) -> list[SweepRun]:
    """Every (method, cfg) pair, method by method in :data:`METHODS` order, cfg ascending within a method.

    Raises :class:`SweepConfigError` when no method is selected, a method is unknown or the run count exceeds
    ``max_runs``.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SweepConfigError(f"unknown method(s) {unknown}; choose from {list(METHODS)}.")
    chosen = [m for m in METHODS if m in methods]
    if not chosen:
        raise SweepConfigError(
            f"no method selected: switch on at least one of the method toggles ({', '.join(METHODS)})."
        )
    if not cfg_values:
        raise SweepConfigError(f"cfg_values is empty: enter the cfg scales to compare, e.g. {EXAMPLE}.")
    count = len(chosen) * len(cfg_values)
    if count > max_runs:
        raise SweepConfigError(
            f"{len(chosen)} methods × {len(cfg_values)} cfg values = {count} sampling runs, over the limit of "
            f"{max_runs}: remove cfg values or methods, or split the sweep over several nodes."
        )
    cfgs = sorted(cfg_values)
    return [SweepRun(m, c, row, col) for row, m in enumerate(chosen) for col, c in enumerate(cfgs)]


def format_cfg(value: float) -> str:
    """A cfg value as typed (``4``, ``4.5``, ``7.25``)."""
    return f"{value:g}"


# ----------------------------------------------------------------------------------------------------------- the plot


def score_series(runs: Sequence[SweepRun], scores: Sequence[float]) -> list[tuple[str, list[float], list[float]]]:
    """``(label, cfgs, scores)`` per method, in run order, for :func:`reg_core.render.line_plot`."""
    if len(runs) != len(scores):
        raise ValueError(f"{len(runs)} runs but {len(scores)} scores")
    series: dict[str, tuple[str, list[float], list[float]]] = {}
    for run, score in zip(runs, scores, strict=True):
        _, xs, ys = series.setdefault(run.method, (run.label, [], []))
        xs.append(run.cfg)
        ys.append(float(score))
    return list(series.values())


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
    return render.line_plot(series, title=title, xlabel=drawable(X_AXIS), ylabel=drawable(metric), size=size)


# ----------------------------------------------------------------------------------------------------------- the grid


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
    left, top, right, bottom = render.font(size).getbbox(text or " ")
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
    canvas = Image.new("RGB", (layout.width, layout.height), render.WHITE)
    draw = ImageDraw.Draw(canvas)
    resize = (layout.image_width, layout.image_height) != (width, height)
    block_h = layout.tile_rows * layout.image_height + (layout.tile_rows - 1) * TILE_GAP
    block_w = layout.tile_cols * layout.image_width + (layout.tile_cols - 1) * TILE_GAP
    label_font, caption_font = render.font(LABEL_FONT), render.font(CAPTION_FONT)
    if title:
        draw.text((GAP, GAP), title, fill=render.BLACK, font=render.font(TITLE_FONT), anchor="lt")
    header_y = layout.row_tops[0] - GAP // 2
    for c, label in enumerate(col_labels):
        draw.text(
            (layout.column_lefts[c] + block_w / 2, header_y), label, fill=render.BLACK, font=label_font, anchor="mb"
        )
    for r in range(rows):
        top = layout.row_tops[r]
        draw.text((GAP, top + block_h / 2), row_labels[r], fill=render.BLACK, font=label_font, anchor="lm")
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
                fill=render.BLACK,
                font=caption_font,
                anchor="mt",
            )
    return np.asarray(canvas, dtype=np.uint8).copy(), layout


def summary_table(runs: Sequence[SweepRun], scores: Sequence[float], metric: str) -> str:
    """A plain-text table: one line per method with its score at each cfg, and the best cfg per method."""
    series = score_series(runs, scores)
    cfgs = sorted({run.cfg for run in runs})
    name_width = max(len(label) for label, _, _ in series)
    header = f"{'cfg':<{name_width}}  " + "  ".join(f"{format_cfg(c):>8}" for c in cfgs) + "   best cfg"
    lines = [metric, header]
    for label, xs, ys in series:
        by_cfg = dict(zip(xs, ys, strict=True))
        cells = "  ".join(f"{by_cfg[c]:8.4f}" if c in by_cfg else f"{'':>8}" for c in cfgs)
        best = xs[int(np.argmax(ys))]
        lines.append(f"{label:<{name_width}}  {cells}   {format_cfg(best)}")
    return "\n".join(lines)
