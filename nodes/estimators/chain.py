"""The ``chain`` estimator (an ablation the paper does not evaluate): the full chain rule instead of M.

``D_REG = D_c + a(σ)·Jᵀ(D_guided − D_c)``: the graph of the positive pass is held until the step's guided prediction
is known, then one backward with that difference gives ``Jᵀ(D_guided − D_c)`` itself, where the paper multiplies the
difference element-wise by the column sums ``Jᵀ𝟙``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...reg_core import rectify
from ...reg_core.rectify import Estimator
from ..passes import CondPass
from .traced import Traced, audit


@dataclass
class ChainEstimate:
    """``D_c`` with its graph held until the guided prediction is known."""

    d_c: torch.Tensor
    graph: tuple[torch.Tensor, torch.Tensor] | None  # (D_c with graph, leaf x)
    factor: torch.Tensor
    weight: torch.Tensor | None = None  # the denoise mask w: Jᵀ(w² ⊙ δ) (nodes.passes.CondPass.weight)

    def rectify(self, d_guided: torch.Tensor, strength: float) -> torch.Tensor:
        d_graph, leaf = self.graph
        self.graph = None
        with torch.inference_mode(False), torch.enable_grad():
            delta = (d_guided - self.d_c).clone()
            jt_delta = rectify.chain_product(d_graph, leaf, delta if self.weight is None else self.weight**2 * delta)
        return rectify.rectify_chain(self.d_c, d_guided, jt_delta, self.factor, strength)

    def factor_map(self) -> torch.Tensor | None:
        return None


@dataclass
class Chain:
    """The ``chain`` choice for one run. The saved tensors are private copies from the start: the backward comes at
    the step's end, too late to repeat the pass if the network overwrote one."""

    traced: Traced = field(default_factory=lambda: Traced(copy=True))
    audited: bool = False
    kind: Estimator = Estimator.CHAIN
    label: str = Estimator.CHAIN.value

    def evaluate(self, cond_pass: CondPass) -> tuple[list[torch.Tensor], ChainEstimate]:
        cond_pass = cond_pass.exact()
        with self.traced.open(cond_pass, checkpoint=False) as traced:
            d_c, leaf = Traced.forward(cond_pass, traced)
            weight = cond_pass.weight()
            ones = torch.ones_like(d_c) if weight is None else weight.to(d_c)
            sums = None if self.audited else torch.autograd.grad(d_c, leaf, ones, retain_graph=True)[0]
        if sums is not None:
            self.audited = True
            audit(cond_pass, sums)
        detached = d_c.detach()
        return cond_pass.branches(detached), ChainEstimate(detached, (d_c, leaf), cond_pass.factor, weight)
