"""Guidance combiners on denoised predictions: the guided ``D_guided`` that REG rectifies.

Scale conventions: ComfyUI's ``cfg`` is uncond-anchored, ``D_u + s·(D_c − D_u)``; the paper's REG weight is
cond-anchored, ``D_c + w·(D_c − D_u)``; they are the same prediction for ``w = s − 1``, since
``D_u + s·(D_c − D_u) = D_c + (s − 1)·(D_c − D_u)``. ComfyUI's APG scale (and :class:`APG`'s) is cond-anchored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


def cfg(d_c: Tensor, d_u: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022) exactly as ComfyUI's ``cfg_function``: ``D_u + s·(D_c − D_u)``."""
    return d_u + (d_c - d_u) * scale


def reference_guidance(d: Tensor, d_c: Tensor, d_ref: Tensor, scale: float) -> Tensor:
    """Guidance away from a degraded reference prediction: ``D + s·(D_c − D_ref)``.

    The form shared by PAG (Ahn et al. 2024), SAG, SLG and autoguidance (Karras et al. 2024) as ComfyUI's
    post-cfg hooks apply it on top of the current prediction ``D``.
    """
    return d + (d_c - d_ref) * scale


def _sample_dims(t: Tensor) -> list[int]:
    return list(range(1, t.ndim))


def project(v: Tensor, onto: Tensor) -> tuple[Tensor, Tensor]:
    """Split ``v`` into the parts parallel and orthogonal to ``onto``, per sample (APG, Sadat et al. 2024)."""
    dims = _sample_dims(v)
    unit = torch.nn.functional.normalize(onto, dim=dims)
    parallel = (v * unit).sum(dim=dims, keepdim=True) * unit
    return parallel, v - parallel


@dataclass
class APGState:
    """Per-run state of APG's momentum (running average of the guidance difference)."""

    running: Tensor | None = None
    prev_sigma: float | None = None

    def reset(self) -> None:
        """Forget the momentum; call at the start of every sampling run."""
        self.running = None
        self.prev_sigma = None


@dataclass
class APG:
    """Adaptive Projected Guidance (Sadat et al., ICLR 2025, arXiv 2410.02416) with ComfyUI's semantics.

    With ``G = D_c − D_u``: momentum ``a ← m·a + G`` (``a = G`` on the first step; reset when σ rises, as ComfyUI
    does), norm clipping ``G ← G·min(1, τ/‖G‖)``, projection on ``D_c``: ``G_apg = G⊥ + η·G∥``. ComfyUI then yields
    ``D_c + s·G_apg`` at cfg ``s`` (its APG scale is cond-anchored), so ``η = 1, τ = 0, m = 0`` is CFG at ``s + 1``.

    Norms and projections are per sample over all non-batch dimensions; for 4-D image latents that is exactly
    ComfyUI's last-three-dimensions norm, for 5-D video latents it also spans channels.
    """

    eta: float = 1.0
    norm_threshold: float = 5.0
    momentum: float = 0.0
    state: APGState = field(default_factory=APGState)

    def guidance(self, d_c: Tensor, d_u: Tensor, sigma: float) -> Tensor:
        """``G_apg`` for this step, updating the momentum state."""
        if self.state.prev_sigma is not None and sigma > self.state.prev_sigma:
            self.state.reset()
        self.state.prev_sigma = sigma
        g = d_c - d_u
        if self.momentum != 0:
            self.state.running = g if self.state.running is None else self.momentum * self.state.running + g
            g = self.state.running
        if self.norm_threshold > 0:
            norm = g.norm(p=2, dim=_sample_dims(g), keepdim=True)
            g = g * torch.minimum(torch.ones_like(norm), self.norm_threshold / norm)
        parallel, orthogonal = project(g, d_c)
        return orthogonal + self.eta * parallel

    def pre_cfg(self, d_c: Tensor, d_u: Tensor, scale: float, sigma: float) -> tuple[Tensor, Tensor]:
        """The ``(cond, uncond)`` pair a pre-cfg hook returns, so that :func:`cfg` at ``s`` gives ``D_c + s·G_apg``.

        As ComfyUI's APG node: the uncond stays ``D_u`` and the cond becomes ``D_u + G_apg + (D_c − D_u)/s``. At
        ``s = 0`` that division is undefined; APG at scale 0 is the conditional prediction, so both become ``D_c``.
        """
        g = self.guidance(d_c, d_u, sigma)
        if scale == 0:
            return d_c, d_c
        return d_u + g + (d_c - d_u) / scale, d_u
