"""The exact estimators ``vjp`` and ``vjp-low-memory``: ``M = a(σ)·Jᵀ𝟙`` by one vector-Jacobian product.

The positive branch runs once with a graph (nodes/estimators/traced.py), its column sums come from one backward,
and the other branches run without one. ``vjp`` records the plain graph while it fits in the compute device's free
memory: a graph that outgrows that budget stops the pass early, and the run continues with per-block recomputation
(the ``vjp-low-memory`` graph: block inputs plus one block, one more forward per step, the same M to float rounding),
said once in the log. ``vjp-low-memory`` always recomputes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import comfy.model_management
import torch

from ...reg_core import rectify
from ...reg_core.rectify import Estimator
from ..common import LOGGER_NAME
from ..passes import CondPass
from ..traced_pass import GraphTooLargeError
from . import FactorEstimate
from .traced import Traced, audit

log = logging.getLogger(LOGGER_NAME)

FREE_MEMORY_SHARE = 0.8  # of the device's free memory a plain graph may take (the rest: the pass's own work)


@dataclass
class ExactVJP:
    """``vjp`` (``low_memory=False``) or ``vjp-low-memory`` for one run."""

    low_memory: bool = False
    traced: Traced = field(default_factory=Traced)
    bounded: bool = False  # vjp whose plain graph did not fit: per-block recomputation for the rest of the run
    audited: bool = False

    @property
    def kind(self) -> Estimator:
        return Estimator.VJP_LOW_MEMORY if self.low_memory else Estimator.VJP

    @property
    def label(self) -> str:
        if self.bounded:
            return f"{Estimator.VJP.value} (as {Estimator.VJP_LOW_MEMORY.value}: the plain graph did not fit)"
        return self.kind.value

    def evaluate(self, cond_pass: CondPass) -> tuple[list[torch.Tensor], FactorEstimate]:
        cond_pass = cond_pass.exact()
        d_c, sums = self._column_sums(cond_pass)
        if not self.audited:
            self.audited = True
            audit(cond_pass, sums)
        return cond_pass.branches(d_c), FactorEstimate(d_c, cond_pass.weighted(sums * cond_pass.factor))

    def _column_sums(self, cond_pass: CondPass) -> tuple[torch.Tensor, torch.Tensor]:
        if self.low_memory or self.bounded:
            return self.traced.retrying_in_place(lambda: self._pass(cond_pass, checkpoint=True))
        free = comfy.model_management.get_free_memory(cond_pass.x.device)
        try:
            return self.traced.retrying_in_place(
                lambda: self._pass(cond_pass, checkpoint=False, budget=free * FREE_MEMORY_SHARE)
            )
        except GraphTooLargeError as err:
            reason = str(err)
        except torch.OutOfMemoryError:  # the budget is an estimate: the device can still run out
            reason = "the device ran out of memory during it"
        comfy.model_management.soft_empty_cache()  # after the except block, the failed pass's graph is freed
        log.warning(
            "REG: the exact vjp graph would not fit in free memory (%s); using the memory-bounded exact estimator "
            "(vjp-low-memory: same M, one more forward per step) for this run.",
            reason,
        )
        self.bounded = True
        return self.traced.retrying_in_place(lambda: self._pass(cond_pass, checkpoint=True))

    def _pass(self, cond_pass: CondPass, *, checkpoint: bool, budget: float | None = None):
        with self.traced.open(cond_pass, checkpoint=checkpoint, budget=budget) as traced:
            d_c, leaf = Traced.forward(cond_pass, traced)
            sums = rectify.column_sums(d_c, leaf, cond_pass.weight())
        return d_c.detach(), sums
