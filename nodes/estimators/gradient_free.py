"""The gradient-free estimator: ``M ≈ a(σ)·(D_c(x + h𝟙) − D_c(x))/h``, no graph, one extra forward per step.

The sampler's own call runs as it is (every branch, as without REG); the probe is the positive branch alone at
``x + h`` with its own label (nodes/passes.py), so label-keyed patches and ControlNets see what they would see at
that input. ``h`` follows the model's compute dtype and σ (:meth:`nodes.passes.CondPass.fd_step`). Exact for an
ideal denoiser, whose Jacobian is symmetric (``J𝟙 = Jᵀ𝟙``); approximate for a learned network
(README, "The maths").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...reg_core import rectify
from ...reg_core.rectify import Estimator
from ..passes import CondPass
from . import FactorEstimate


@dataclass
class GradientFree:
    """The ``gradient-free`` choice, and every exact estimator's fallback."""

    kind: Estimator = Estimator.GRADIENT_FREE
    label: str = Estimator.GRADIENT_FREE.value

    def evaluate(self, cond_pass: CondPass) -> tuple[list[torch.Tensor], FactorEstimate]:
        outputs = cond_pass.main()
        d_c = cond_pass.d_c(outputs)
        h = cond_pass.fd_step()
        weight = cond_pass.weight()  # with a denoise mask the sampler's x + h𝟙 reaches the model as x + h·w
        shifted = cond_pass.positive_only(cond_pass.x + (h if weight is None else h * weight))
        return outputs, FactorEstimate(d_c, cond_pass.weighted(rectify.fd_factor(d_c, shifted, h, cond_pass.factor)))
