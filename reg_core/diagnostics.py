"""Per-step diagnostics of REG's factor M: what REG did to the guidance, step by step.

For one sampling step with guidance delta ``Δ = D_guided − D_c`` and applied correction ``C = D_REG − D_c``
(``= M_λ ⊙ Δ`` for the column-sum estimators, reg_core.rectify), the statistics per sample are: the mean and the
5/50/95th percentiles of M over all elements, the fractions of elements with ``M < 0`` (guidance reversed) and
``M > 1`` (guidance amplified), both beyond a margin of ``FRACTION_MARGIN`` so that rounding noise around 0 and 1
does not count, and the norm ratio ``‖C‖/‖Δ‖`` (how much of the guidance REG kept: < 1 removed, > 1 added; NaN when
there is no guidance, ``Δ = 0``). Percentiles use at most ``QUANTILE_SAMPLES`` evenly strided elements (exact for
smaller maps), so the cost per step stays bounded. Everything stays on the tensors' device (no host synchronisation)
until read.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor

STAT_NAMES = ("mean", "p05", "p50", "p95", "frac_neg", "frac_gt1", "norm_ratio")
MAP_SIDE = 48
FRACTION_MARGIN = 1e-3
QUANTILE_SAMPLES = 16384


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
    ratio = correction.float().flatten(1).norm(dim=1) / dnorm
    ratio = torch.where(dnorm > 0, ratio, torch.full_like(ratio, float("nan")))
    stats = {"norm_ratio": ratio}
    if m is None:
        nan = torch.full_like(ratio, float("nan"))
        stats.update({name: nan for name in STAT_NAMES if name != "norm_ratio"})
        return stats
    flat = m.float().expand_as(delta).flatten(1)
    strided = flat[:, :: max(1, flat.shape[1] // QUANTILE_SAMPLES)]  # bounds the sort; exact for small maps
    q = torch.quantile(strided, torch.tensor([0.05, 0.5, 0.95], dtype=flat.dtype, device=flat.device), dim=1)
    stats.update(
        {
            "mean": flat.mean(1),
            "p05": q[0],
            "p50": q[1],
            "p95": q[2],
            "frac_neg": (m < -FRACTION_MARGIN).float().expand_as(delta).mean(dim=dims),
            "frac_gt1": (m > 1 + FRACTION_MARGIN).float().expand_as(delta).mean(dim=dims),
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
    """What REG did over one sampling run: the REG window (in the sampler's σ), every evaluation's record, why REG
    did not act where it did not (reason → count)."""

    sigma_low: float
    sigma_high: float
    flow: bool
    estimator: str
    steps: list[StepRecord] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    def mean_m(self) -> float | None:
        """The mean of M over every evaluation where REG acted with an M (None when there is none)."""
        values = [v for s in self.steps if s.active and "mean" in s.stats for v in s.stats["mean"].tolist() if v == v]
        return sum(values) / len(values) if values else None

    def to_dict(self) -> dict:
        """Plain-Python form (lists of per-sample floats), for JSON output."""
        return {
            "sigma_low": self.sigma_low,
            "sigma_high": self.sigma_high,
            "flow": self.flow,
            "estimator": self.estimator,
            "not_acting": dict(self.skipped),
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


class UnsupportedLatentError(ValueError):
    """A latent these diagnostics cannot read; the message names the input."""


def check_latent(samples: object, input_name: str) -> None:
    """Accept image ``[B, C, H, W]`` and video ``[B, C, T, H, W]`` latents; refuse nested ones by name.

    A nested latent (``is_nested``: ComfyUI's ``NestedTensor`` of LTX-2's audio + video, or a torch nested tensor)
    holds several latents of different shapes, which have no single M map.
    """
    if getattr(samples, "is_nested", False):
        raise UnsupportedLatentError(
            f"{input_name}: nested latents (several latents in one, e.g. LTX-2 audio + video) are not supported; "
            "connect an image or video latent."
        )
    ndim = getattr(samples, "ndim", None)
    if ndim not in (4, 5):
        shape = tuple(getattr(samples, "shape", ()))
        raise UnsupportedLatentError(
            f"{input_name}: expected an image latent [B, C, H, W] or a video latent [B, C, T, H, W], got shape {shape}."
        )


def latent_key(samples: Tensor, dtype: torch.dtype = torch.float32) -> str:
    """A key that identifies a sampler's output latent by its values once stored in ``dtype`` (the dtype the
    sampler's node hands the latent on in) and its shape; device and memory layout do not matter."""
    data = samples.detach().to("cpu", dtype).to(torch.float32).contiguous()
    digest = hashlib.blake2b(data.numpy().tobytes(), digest_size=16)
    digest.update(str(tuple(data.shape)).encode())
    return digest.hexdigest()


def inactive_note(record: RunRecord) -> str:
    """Why there is nothing to show when REG acted at no evaluation of the run."""
    reasons = "; ".join(f"{reason} ({count})" for reason, count in record.skipped.most_common())
    return f"REG did not act in this run ({len(record.steps)} model evaluations): {reasons or 'no evaluation'}."


def active_steps(record: RunRecord) -> list[int]:
    """Indices of the evaluations where REG acted."""
    return [i for i, step in enumerate(record.steps) if step.active]


def pick_steps(record: RunRecord, count: int = 6) -> list[int]:
    """Up to ``count`` evaluations with an M map, evenly spread over the active ones (first and last included)."""
    with_maps = [i for i in active_steps(record) if record.steps[i].m_map is not None]
    if len(with_maps) <= count:
        return with_maps
    return [with_maps[round(j * (len(with_maps) - 1) / (count - 1))] for j in range(count)]
