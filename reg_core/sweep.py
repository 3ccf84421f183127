"""The guidance sweep's pure logic: parsing ``cfg_values``, planning the runs, reading the scores.

The node (``nodes/sweep.py``) samples one image batch per (method, cfg) pair and scores it with the CLIP score
(:mod:`reg_core.metrics.clip_score`); this module decides which runs to make, what their x value means
(:data:`X_AXIS`) and tabulates the results. Its pictures are :mod:`reg_core.plots.sweep`. No ComfyUI import.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

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
EXAMPLE = '"2, 4, 6, 8"'


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


def score_series(runs: Sequence[SweepRun], scores: Sequence[float]) -> list[tuple[str, list[float], list[float]]]:
    """``(label, cfgs, scores)`` per method, in run order, for :func:`reg_core.plots.line_plot`."""
    if len(runs) != len(scores):
        raise ValueError(f"{len(runs)} runs but {len(scores)} scores")
    series: dict[str, tuple[str, list[float], list[float]]] = {}
    for run, score in zip(runs, scores, strict=True):
        _, xs, ys = series.setdefault(run.method, (run.label, [], []))
        xs.append(run.cfg)
        ys.append(float(score))
    return list(series.values())


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
