"""Minimal raster plotting with Pillow: line plots, scatter plots, vector fields, heatmaps and text panels.

Used by the toy demo and by the pack's in-graph plots, so that neither needs matplotlib. Pure Pillow + numpy; no
ComfyUI import. Every function draws into a ``PIL.Image`` and returns it (or a panel bound to one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Color = tuple[int, int, int]

PALETTE: list[Color] = [
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (255, 127, 14),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (23, 190, 207),
]
GREY: Color = (120, 120, 120)
BLACK: Color = (20, 20, 20)
WHITE: Color = (255, 255, 255)


def font(size: int = 13) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at ``size`` pixels (falls back to the bitmap font without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick positions covering ``[lo, hi]`` (1-2-5 steps)."""
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), default=10 * mag)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.01:
        return f"{value:.1e}"
    return f"{value:.3g}"


@dataclass
class Panel:
    """A plotting area ``box = (left, top, right, bottom)`` of ``image`` with data limits ``xlim``, ``ylim``."""

    image: Image.Image
    box: tuple[int, int, int, int]
    xlim: tuple[float, float]
    ylim: tuple[float, float]

    @property
    def draw(self) -> ImageDraw.ImageDraw:
        return ImageDraw.Draw(self.image)

    def px(self, x: float, y: float) -> tuple[float, float]:
        """Data coordinates to pixel coordinates."""
        left, top, right, bottom = self.box
        fx = (x - self.xlim[0]) / (self.xlim[1] - self.xlim[0])
        fy = (y - self.ylim[0]) / (self.ylim[1] - self.ylim[0])
        return left + fx * (right - left), bottom - fy * (bottom - top)

    def frame(self, title: str = "", xlabel: str = "", ylabel: str = "", ticks: bool = True) -> Panel:
        """Draw the border, ticks, tick labels, axis labels and title."""
        draw, f = self.draw, font(12)
        left, top, right, bottom = self.box
        draw.rectangle(self.box, outline=BLACK)
        if ticks:
            for t in nice_ticks(*self.xlim):
                x, _ = self.px(t, self.ylim[0])
                draw.line([(x, bottom), (x, bottom + 4)], fill=BLACK)
                draw.text((x, bottom + 6), _label(t), fill=BLACK, font=f, anchor="mt")
            for t in nice_ticks(*self.ylim):
                _, y = self.px(self.xlim[0], t)
                draw.line([(left - 4, y), (left, y)], fill=BLACK)
                draw.text((left - 6, y), _label(t), fill=BLACK, font=f, anchor="rm")
        if title:
            draw.text(((left + right) / 2, top - 6), title, fill=BLACK, font=font(14), anchor="mb")
        if xlabel:
            draw.text(((left + right) / 2, bottom + 22), xlabel, fill=BLACK, font=f, anchor="mt")
        if ylabel:
            label = Image.new("RGBA", (bottom - top, 16), (255, 255, 255, 0))
            ImageDraw.Draw(label).text(((bottom - top) / 2, 8), ylabel, fill=BLACK, font=f, anchor="mm")
            rotated = label.rotate(90, expand=True)
            self.image.paste(rotated, (left - 58, top), rotated)
        return self

    def clip(self, points: np.ndarray) -> np.ndarray:
        """Keep the rows of ``points [N, 2]`` that fall inside the data limits."""
        x, y = points[:, 0], points[:, 1]
        inside = (x >= self.xlim[0]) & (x <= self.xlim[1]) & (y >= self.ylim[0]) & (y <= self.ylim[1])
        return points[inside]

    def scatter(self, points: np.ndarray, color: Color, radius: float = 1.5) -> Panel:
        """Dots at ``points [N, 2]`` (outside points are dropped)."""
        draw = self.draw
        for x, y in self.clip(np.asarray(points, dtype=float)):
            cx, cy = self.px(x, y)
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=color)
        return self

    def arrows(
        self, origins: np.ndarray, vectors: np.ndarray, color: Color, scale: float = 1.0, cap: float = math.inf
    ) -> Panel:
        """Arrows from ``origins [N, 2]`` along ``scale·vectors [N, 2]`` (data units), at most ``cap`` long."""
        draw = self.draw
        for (x, y), (u, v) in zip(np.asarray(origins, float), np.asarray(vectors, float), strict=True):
            length = math.hypot(u, v) * scale
            if length > cap:
                u, v = u * cap / length, v * cap / length
            x0, y0 = self.px(x, y)
            x1, y1 = self.px(x + scale * u, y + scale * v)
            draw.line([(x0, y0), (x1, y1)], fill=color, width=1)
            length = math.hypot(x1 - x0, y1 - y0)
            if length > 3:
                ang = math.atan2(y1 - y0, x1 - x0)
                head = min(5.0, 0.4 * length)
                for side in (-0.45, 0.45):
                    draw.line(
                        [(x1, y1), (x1 - head * math.cos(ang + side), y1 - head * math.sin(ang + side))],
                        fill=color,
                        width=1,
                    )
        return self

    def line(
        self, xs: Sequence[float], ys: Sequence[float], color: Color, width: int = 2, marker: bool = False
    ) -> Panel:
        """A polyline through finite ``(x, y)`` pairs, optionally with dot markers."""
        pts = [self.px(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(x) and math.isfinite(y)]
        draw = self.draw
        if len(pts) > 1:
            draw.line(pts, fill=color, width=width, joint="curve")
        if marker:
            for cx, cy in pts:
                draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=color)
        return self

    def shade_x(self, x0: float, x1: float, color: Color = (235, 235, 235)) -> Panel:
        """Shade the vertical band ``x0 ≤ x ≤ x1`` (clipped to the panel)."""
        lo, hi = sorted((max(x0, self.xlim[0]), min(x1, self.xlim[1])))
        if hi > lo:
            a, _ = self.px(lo, self.ylim[0])
            b, _ = self.px(hi, self.ylim[0])
            self.draw.rectangle([a, self.box[1] + 1, b, self.box[3] - 1], fill=color)
        return self

    def legend(self, entries: Sequence[tuple[str, Color]]) -> Panel:
        """A legend box in the top-left corner of the panel."""
        draw, f = self.draw, font(12)
        x, y = self.box[0] + 8, self.box[1] + 8
        width = max((draw.textlength(name, font=f) for name, _ in entries), default=0) + 30
        draw.rectangle([x - 4, y - 4, x + width, y + 16 * len(entries)], fill=WHITE, outline=GREY)
        for i, (name, color) in enumerate(entries):
            draw.line([(x, y + 16 * i + 6), (x + 18, y + 16 * i + 6)], fill=color, width=3)
            draw.text((x + 24, y + 16 * i), name, fill=BLACK, font=f)
        return self


def limits(values: Sequence[float], pad: float = 0.05) -> tuple[float, float]:
    """Data limits around the finite ``values`` with a relative margin (a unit range for constant data)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return (0.0, 1.0)
    lo, hi = min(finite), max(finite)
    if hi - lo < 1e-12:
        return (lo - 0.5, hi + 0.5)
    margin = (hi - lo) * pad
    return (lo - margin, hi + margin)


def line_plot(
    series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    size: tuple[int, int] = (720, 440),
    shade: tuple[float, float] | None = None,
    xlog: bool = False,
) -> Image.Image:
    """A complete line plot: one coloured polyline with markers per ``(name, xs, ys)``, a legend and axes.

    ``shade`` greys an x-range (e.g. a guidance window); ``xlog`` plots ``log10(x)``.
    """

    def tx(values: Sequence[float]) -> list[float]:
        return [math.log10(v) if xlog and v > 0 else (v if not xlog else math.nan) for v in values]

    image = Image.new("RGB", size, WHITE)
    xs_all = [v for _, xs, _ in series for v in tx(xs)]
    ys_all = [v for _, _, ys in series for v in ys]
    panel = Panel(image, (80, 40, size[0] - 20, size[1] - 60), limits(xs_all), limits(ys_all, 0.08))
    if shade is not None:
        panel.shade_x(*tx(shade))
    for i, (_, xs, ys) in enumerate(series):
        panel.line(tx(xs), ys, PALETTE[i % len(PALETTE)], marker=len(xs) <= 40)
    panel.frame(title, f"log10 {xlabel}" if xlog else xlabel, ylabel)
    panel.legend([(name, PALETTE[i % len(PALETTE)]) for i, (name, _, _) in enumerate(series)])
    return image


def colormap(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``values`` to RGB uint8 with a diverging blue–white–red map centred on the midpoint of ``[lo, hi]``."""
    t = np.clip((values - lo) / max(hi - lo, 1e-12), 0, 1)
    blue, white, red = np.array([49, 54, 149]), np.array([247, 247, 247]), np.array([165, 0, 38])
    lower = blue + (white - blue) * (t[..., None] * 2)
    upper = white + (red - white) * ((t[..., None] - 0.5) * 2)
    return np.where(t[..., None] < 0.5, lower, upper).astype(np.uint8)


def heatmap(values: np.ndarray, lo: float, hi: float, size: tuple[int, int]) -> Image.Image:
    """A 2-D array as a colour image of ``size`` (nearest-neighbour upscaling, so pixels stay visible)."""
    return Image.fromarray(colormap(np.asarray(values, float), lo, hi)).resize(size, Image.NEAREST)


def colorbar(lo: float, hi: float, height: int, width: int = 16) -> Image.Image:
    """A vertical colour bar for :func:`colormap` with its end and middle values written beside it."""
    image = Image.new("RGB", (width + 60, height + 20), WHITE)
    ramp = np.linspace(hi, lo, height)[:, None].repeat(width, 1)
    image.paste(Image.fromarray(colormap(ramp, lo, hi)), (0, 10))
    draw, f = ImageDraw.Draw(image), font(12)
    for frac in (0.0, 0.5, 1.0):
        value = hi - frac * (hi - lo)
        draw.text((width + 4, 10 + frac * (height - 1)), _label(value), fill=BLACK, font=f, anchor="lm")
    return image


def message(lines: Sequence[str], *, width: int = 720, size: int = 14) -> Image.Image:
    """A white picture holding ``lines`` of text (the first one larger), for a plot that has nothing to show."""
    heading, body = font(size + 4), font(size)
    line_height = size + 8
    image = Image.new("RGB", (width, 40 + (size + 12) + line_height * max(len(lines) - 1, 0)), WHITE)
    draw = ImageDraw.Draw(image)
    y = 20
    for i, text in enumerate(lines):
        draw.text((20, y), text, fill=BLACK, font=heading if i == 0 else body)
        y += (size + 12) if i == 0 else line_height
    return image
