"""REGDiagnostics' pictures of a :class:`reg_core.diagnostics.RunRecord`: statistics over the run, M heatmaps, and
the picture shown when REG did not act. Pure Pillow on :mod:`reg_core.plots`.
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

from .. import plots
from ..diagnostics import RunRecord, active_steps


def render_inactive(record: RunRecord) -> Image.Image:
    """The picture shown instead of the plots when REG acted at no evaluation: what happened and what to change."""
    sigmas = [float(step.sigma.max()) for step in record.steps]
    span = f"sigma {sigmas[0]:.3g} to {sigmas[-1]:.3g}" if sigmas else "no evaluations"
    reasons = [f"{count} x {reason}" for reason, count in record.skipped.most_common(4)]
    return plots.message(
        [
            "REG did not act in this run",
            f"{len(record.steps)} model evaluations, {span}; REG window sigma {record.sigma_low:.3g} to "
            f"{record.sigma_high:.3g}.",
            *(reasons or ["no model evaluation"]),
        ]
    )


def render_statistics(record: RunRecord, sample: int = 0) -> Image.Image:
    """Two stacked plots against the evaluation index: M's mean and percentiles; the fractions and the norm ratio.

    The evaluations where REG acted are shaded. (Plot text is ASCII: Pillow's bundled font has no Greek.)
    """
    index = list(range(len(record.steps)))

    def series(name: str) -> list[float]:
        out = []
        for step in record.steps:
            values = step.stats.get(name)
            out.append(float(values[sample]) if values is not None else math.nan)
        return out

    active = active_steps(record)
    shade = (active[0] - 0.5, active[-1] + 0.5) if active else None
    sigmas = [float(step.sigma.flatten()[min(sample, step.sigma.numel() - 1)]) for step in record.steps]
    span = f"sigma {sigmas[0]:.3g} to {sigmas[-1]:.3g}" if sigmas else "no steps"
    top = plots.line_plot(
        [(name, index, series(name)) for name in ("mean", "p05", "p50", "p95")],
        title=f"REG factor M per evaluation (sample {sample}, {span}; shaded: REG active)",
        xlabel="model evaluation",
        ylabel="M",
        shade=shade,
    )
    bottom = plots.line_plot(
        [(name, index, series(name)) for name in ("frac_neg", "frac_gt1", "norm_ratio")],
        title="fraction of M < 0, fraction of M > 1, and kept guidance |M * delta| / |delta|",
        xlabel="model evaluation",
        ylabel="fraction / ratio",
        shade=shade,
    )
    image = Image.new("RGB", (top.width, top.height + bottom.height), plots.WHITE)
    image.paste(top, (0, 0))
    image.paste(bottom, (0, top.height))
    return image


def render_maps(record: RunRecord, steps: list[int], sample: int = 0, cell: int = 192) -> Image.Image:
    """M (mean over channels) at ``steps`` side by side, at the latent's aspect ratio, on one colour scale.

    The scale is centred on 1 (white = guidance unchanged); blue = guidance reduced, red = amplified.
    """
    maps = [record.steps[i].m_map[sample].mean(0).cpu().numpy() for i in steps]
    if not maps:
        raise ValueError("no recorded M maps to show")
    radius = max(float(max(abs(m.min() - 1), abs(m.max() - 1))) for m in maps) or 1.0
    lo, hi = 1 - radius, 1 + radius
    h, w = maps[0].shape
    width, height = (cell, max(1, round(cell * h / w))) if w >= h else (max(1, round(cell * w / h)), cell)
    pad, label = 10, 34
    image = Image.new("RGB", (len(maps) * (width + pad) + pad + 90, height + label + 2 * pad), plots.WHITE)
    draw = ImageDraw.Draw(image)
    for k, (i, m) in enumerate(zip(steps, maps, strict=True)):
        x = pad + k * (width + pad)
        image.paste(plots.heatmap(m, lo, hi, (width, height)), (x, label))
        sigma = float(record.steps[i].sigma.flatten()[min(sample, record.steps[i].sigma.numel() - 1)])
        draw.text((x, 4), f"eval {i}", fill=plots.BLACK, font=plots.font(12))
        draw.text((x, 18), f"sigma = {sigma:.3g}", fill=plots.BLACK, font=plots.font(12))
    image.paste(plots.colorbar(lo, hi, height), (pad + len(maps) * (width + pad), label - 10))
    return image
