"""Per-step diagnostics of REG's factor M: what REG did to the guidance, step by step.

For one sampling step with guidance delta ``Δ = D_guided − D_c`` and applied correction ``C = D_REG − D_c``
(``= M_λ ⊙ Δ`` for the column-sum estimators, reg_core.rectify), the statistics per sample are: the mean and the
5/50/95th percentiles of M over all elements, the fractions of elements with ``M < 0`` (guidance reversed) and
``M > 1`` (guidance amplified), and the norm ratio ``‖C‖/‖Δ‖`` (how much of the guidance REG kept: < 1 removed,
> 1 added). Everything stays on the tensors' device (no host synchronisation) until read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

STAT_NAMES = ("mean", "p05", "p50", "p95", "frac_neg", "frac_gt1", "norm_ratio")
MAP_SIDE = 48


def downsample_map(m: Tensor, max_side: int = MAP_SIDE) -> Tensor:
    """Average-pool a latent-shaped ``[B, C, …, H, W]`` map to ``[B, C, h, w]`` with ``max(h, w) ≤ max_side``.

    Extra dimensions between channels and the spatial ones (video frames) are averaged.
    """
    if m.ndim > 4:
        m = m.flatten(2, -3).mean(2)
    h, w = m.shape[-2:]
    factor = max(1, -(-max(h, w) // max_side))
    if factor == 1:
        return m.float().clone()
    return torch.nn.functional.avg_pool2d(m.float(), factor, ceil_mode=True)


def step_statistics(m: Tensor | None, delta: Tensor, correction: Tensor) -> dict[str, Tensor]:
    """Per-sample statistics ``[B]`` of one step (module docstring); M's entries are NaN when ``m`` is None."""
    dims = list(range(1, delta.ndim))
    dnorm = delta.float().flatten(1).norm(dim=1)
    ratio = correction.float().flatten(1).norm(dim=1) / dnorm.clamp_min(torch.finfo(torch.float32).tiny)
    stats = {"norm_ratio": ratio}
    if m is None:
        nan = torch.full_like(ratio, float("nan"))
        stats.update({name: nan for name in STAT_NAMES if name != "norm_ratio"})
        return stats
    flat = m.float().expand_as(delta).flatten(1)
    q = torch.quantile(flat, torch.tensor([0.05, 0.5, 0.95], device=flat.device), dim=1)
    stats.update(
        {
            "mean": flat.mean(1),
            "p05": q[0],
            "p50": q[1],
            "p95": q[2],
            "frac_neg": (m < 0).float().expand_as(delta).mean(dim=dims),
            "frac_gt1": (m > 1).float().expand_as(delta).mean(dim=dims),
        }
    )
    return stats


@dataclass
class StepRecord:
    """One model evaluation of a sampling run."""

    sigma: Tensor
    active: bool
    stats: dict[str, Tensor] = field(default_factory=dict)
    m_map: Tensor | None = None


@dataclass
class RunRecord:
    """What REG did over one sampling run: the REG window (in the sampler's σ) and every evaluation's record."""

    sigma_low: float
    sigma_high: float
    flow: bool
    estimator: str
    steps: list[StepRecord] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain-Python form (lists of per-sample floats), for JSON output."""
        return {
            "sigma_low": self.sigma_low,
            "sigma_high": self.sigma_high,
            "flow": self.flow,
            "estimator": self.estimator,
            "steps": [
                {
                    "index": i,
                    "sigma": [float(s) for s in step.sigma.flatten()],
                    "active": step.active,
                    **{name: [float(v) for v in step.stats[name]] for name in STAT_NAMES if name in step.stats},
                }
                for i, step in enumerate(self.steps)
            ],
        }
