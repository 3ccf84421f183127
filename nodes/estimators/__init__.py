"""The estimators of REG's factor M, one module each, behind one protocol.

An estimator runs the step's main ``calc_cond_batch`` call (:class:`nodes.passes.CondPass`) and returns what the
sampler asked for (the prediction of every branch) together with an :class:`Estimate`, which turns the step's final
guided prediction into REG's, ``D_c + M ⊙ (D_guided − D_c)`` (README, "The maths"):

- ``vjp`` and ``vjp-low-memory``: :mod:`.vjp` (exact: one vector-Jacobian product through the positive branch);
- ``gradient-free``: :mod:`.gradient_free` (a forward difference, no graph);
- ``chain``: :mod:`.chain` (the full chain rule, an ablation).

The exact estimators share the differentiated pass and its audit (:mod:`.traced`). An estimator raises
:class:`nodes.traced_pass.NoGraphError` (or an autograd error the runtime can name) when it cannot give its M; the
runtime then falls back to the gradient-free estimator, with one warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ...reg_core import rectify
from ...reg_core.rectify import Estimator
from ..passes import CondPass


class Estimate(Protocol):
    """What an estimator leaves for the end of the step."""

    d_c: torch.Tensor

    def rectify(self, d_guided: torch.Tensor, strength: float) -> torch.Tensor:
        """REG's prediction from the final guided one."""

    def factor_map(self) -> torch.Tensor | None:
        """M for diagnostics (None when the estimator never forms it)."""


@dataclass
class FactorEstimate:
    """``D_c`` and the element-wise factor ``M`` (vjp, vjp-low-memory, gradient-free, reused)."""

    d_c: torch.Tensor
    m: torch.Tensor

    def rectify(self, d_guided: torch.Tensor, strength: float) -> torch.Tensor:
        return rectify.rectify(self.d_c, d_guided, self.m, strength)

    def factor_map(self) -> torch.Tensor | None:
        return self.m


class MEstimator(Protocol):
    """One estimator of M for one sampling run."""

    kind: Estimator

    @property
    def label(self) -> str:
        """What the run record and the run's log line show as the estimator."""

    def evaluate(self, cond_pass: CondPass) -> tuple[list[torch.Tensor], Estimate]:
        """Run the step's main call: every branch's prediction, and the step's estimate."""


def make_estimator(kind: Estimator) -> MEstimator:
    """A fresh estimator object for one sampling run."""
    from .chain import Chain
    from .gradient_free import GradientFree
    from .vjp import ExactVJP

    if kind is Estimator.VJP:
        return ExactVJP()
    if kind is Estimator.VJP_LOW_MEMORY:
        return ExactVJP(low_memory=True)
    if kind is Estimator.CHAIN:
        return Chain()
    return GradientFree()
