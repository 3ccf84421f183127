"""The REG paper's guidance-weight schedules (zhengqigao/REG, DiT/EDM2/diffusers scripts).

Conventions, fixed here once:

- Weights are **cond-anchored**: ``w`` in ``D_c + w·(D_c − D_u)``. ComfyUI's cfg ``s`` is ``1 + w``, so a schedule
  that returns ``w(σ)`` is applied as cfg ``1 + w(σ)``; ``w = 0`` means the conditional prediction alone.
- Progress ``p ∈ [0, 1]`` runs from the first sampling step (high noise) to the last. Two definitions:
  ``steps`` — the step fraction ``i / (N − 1)`` over the sampler's σ list; ``sigma`` — EDM2's
  ``1 − σ/σ_max``.
- The paper's linear schedule is written here as what its authors evidently meant, ``w_start → w_end`` over progress
  (the DiT script's end points are mislabelled); the cosine schedule is MDT's
  ``½·w·(1 − cos(π·p^k))``, rising from 0 to ``w``; the interval schedule is Kynkäänniemi et al. (2024): full weight
  inside a σ window and the conditional prediction alone outside.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum


class Schedule(str, Enum):
    """Names of the schedules, as the nodes expose them."""

    CONSTANT = "constant"
    INTERVAL = "interval"
    LINEAR = "linear"
    COSINE = "cosine"


class Progress(str, Enum):
    """How sampling progress ``p`` is measured."""

    STEPS = "steps"
    SIGMA = "sigma"


def step_progress(sigma: float, sample_sigmas: Sequence[float]) -> float:
    """``i / (N − 1)`` for the step whose σ is closest to ``sigma`` among the ``N`` non-zero sampler σs.

    The trailing ``0`` of a ComfyUI σ list is not a step. A single-step run has progress 0.
    """
    steps = [float(s) for s in sample_sigmas if float(s) > 0]
    if len(steps) <= 1:
        return 0.0
    index = min(range(len(steps)), key=lambda i: abs(steps[i] - sigma))
    return index / (len(steps) - 1)


def sigma_progress(sigma: float, sigma_max: float) -> float:
    """EDM2's progress ``1 − σ/σ_max``, clipped to ``[0, 1]``."""
    if sigma_max <= 0:
        raise ValueError(f"sigma_max must be positive, got {sigma_max}")
    return min(1.0, max(0.0, 1.0 - sigma / sigma_max))


def interval_weight(w: float, sigma: float, sigma_low: float, sigma_high: float) -> float:
    """Guidance interval (Kynkäänniemi et al. 2024): ``w`` for ``σ_low ≤ σ ≤ σ_high``, else 0 (conditional only)."""
    return w if sigma_low <= sigma <= sigma_high else 0.0


def linear_weight(w_start: float, w_end: float, progress: float) -> float:
    """Linear ramp ``w_start + (w_end − w_start)·p`` over sampling progress ``p``."""
    return w_start + (w_end - w_start) * progress


def cosine_weight(w: float, progress: float, exponent: float) -> float:
    """MDT's cosine ramp ``½·w·(1 − cos(π·p^k))``: 0 at the first step, ``w`` at the last (``k`` = exponent)."""
    return 0.5 * w * (1.0 - math.cos(math.pi * progress**exponent))


def scheduled_weight(
    schedule: Schedule,
    w: float,
    *,
    sigma: float,
    progress: float,
    w_end: float = 0.0,
    sigma_low: float = 0.28,
    sigma_high: float = 2.90,
    exponent: float = 1.0,
) -> float:
    """The cond-anchored weight ``w(σ, p)`` of ``schedule`` with base weight ``w``.

    Defaults: the interval is EDM2's σ ∈ [0.28, 2.90] from the REG scripts; ``w_end`` is the linear end weight.
    """
    if schedule is Schedule.CONSTANT:
        return w
    if schedule is Schedule.INTERVAL:
        return interval_weight(w, sigma, sigma_low, sigma_high)
    if schedule is Schedule.LINEAR:
        return linear_weight(w, w_end, progress)
    return cosine_weight(w, progress, exponent)
