"""REG's estimators of M inside ComfyUI: one small object each, one interface.

Every estimator takes the step's main conditional pass (:class:`CondPass`: ComfyUI's ``calc_cond_batch`` call that
holds the positive branch), runs it, and returns the batch outputs together with an :class:`Estimate` — the object
that later turns the final guided prediction into REG's (``D_c + M ⊙ (D_guided − D_c)``, paper eq. 12, computed by
:mod:`reg_core.rectify`). Estimators raise only what :func:`nodes.traced_pass.known_autograd_failure` names or
``torch.OutOfMemoryError`` when they cannot give their M; the runtime then falls back, with one warning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import comfy.model_management
import torch

from ..reg_core import rectify
from ..reg_core.rectify import Estimator
from .common import LOGGER_NAME
from .traced_pass import InPlaceUpdateError, NoGraphError, TracedPass, differentiable_modules, make_differentiable

log = logging.getLogger(LOGGER_NAME)

FD_RELATIVE_STEP = 1e-3
CalcExecutor = Callable[..., list[torch.Tensor]]


@dataclass(frozen=True)
class CondPass:
    """One ``calc_cond_batch`` call: the wrapped executor and its arguments, and where the positive branch sits."""

    executor: CalcExecutor
    model: Any
    conds: list[Any]
    positive: int
    x: torch.Tensor
    timestep: torch.Tensor
    model_options: dict
    factor: torch.Tensor  # a(σ) of reg_core.rectify.flow_factor
    flow: bool

    def run(self, conds: list[Any] | None = None, x: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The ordinary (untraced) pass over ``conds`` (default: all) at ``x`` (default: the step's input)."""
        conds = self.conds if conds is None else conds
        return self.executor(self.model, conds, self.x if x is None else x, self.timestep, self.model_options)

    def others(self) -> list[Any]:
        """Every cond list except the positive one, in order."""
        return [*self.conds[: self.positive], *self.conds[self.positive + 1 :]]

    def with_positive(self, d_c: torch.Tensor, others: list[torch.Tensor]) -> list[torch.Tensor]:
        """The batch outputs in the caller's order, ``d_c`` back at the positive branch's place."""
        return [*others[: self.positive], d_c, *others[self.positive :]]


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


@dataclass
class ChainEstimate:
    """``D_c`` with its graph held until the guided prediction is known (the chain-rule ablation)."""

    d_c: torch.Tensor
    graph: tuple[torch.Tensor, torch.Tensor] | None  # (D_c with graph, leaf x)
    factor: torch.Tensor

    def rectify(self, d_guided: torch.Tensor, strength: float) -> torch.Tensor:
        d_graph, leaf = self.graph
        self.graph = None
        with torch.inference_mode(False), torch.enable_grad():
            jt_delta = rectify.chain_product(d_graph, leaf, (d_guided - self.d_c).clone())
        return rectify.rectify_chain(self.d_c, d_guided, jt_delta, self.factor, strength)

    def factor_map(self) -> torch.Tensor | None:
        return None


class MEstimator(Protocol):
    """One estimator of M: runs the main pass, returns its outputs and the step's :class:`Estimate`."""

    kind: Estimator

    @property
    def label(self) -> str:
        """What the run record shows as the estimator."""
        return self.kind.value

    def evaluate(self, cond_pass: CondPass) -> tuple[list[torch.Tensor], Estimate]: ...


def _traced_options(model_options: dict) -> dict:
    """``model_options`` for the differentiated pass: :func:`_copy_after_skip` appended to the UNet patches."""
    transformer_options = dict(model_options.get("transformer_options", {}))
    patches = dict(transformer_options.get("patches", {}))
    patches["input_block_patch_after_skip"] = [*patches.get("input_block_patch_after_skip", []), _copy_after_skip]
    transformer_options["patches"] = patches
    return {**model_options, "transformer_options": transformer_options}


def _copy_after_skip(h: torch.Tensor, transformer_options: dict) -> torch.Tensor:
    """UNet ``input_block_patch_after_skip``: the blocks after a skip connection get their own copy of ``h``.

    ``openaimodel.apply_control`` adds ControlNet residuals to the skip tensors in place (``h += ctrl`` on
    ``hs.pop()``) after the following blocks saved them for backward.
    """
    return h.clone()


@dataclass
class Traced:
    """The differentiated forward shared by the exact estimators (weights made differentiable once per run).

    ``copy``: whether the saved-tensor guard keeps private copies (see :class:`nodes.traced_pass.SavedTensorGuard`);
    it starts off and is switched on for the rest of the run the first time the network overwrites a saved tensor.
    """

    checkpoint: bool
    copy: bool = False
    prepared: bool = False

    def open(self, cond_pass: CondPass) -> TracedPass:
        modules = differentiable_modules(cond_pass.model, cond_pass.conds)
        if not self.prepared:
            make_differentiable(modules, comfy.model_management.get_torch_device())
            self.prepared = True
        weights = [t for module in modules for t in (*module.parameters(), *module.buffers())]
        return TracedPass(cond_pass.model.diffusion_model, weights, checkpoint=self.checkpoint, copy=self.copy)

    def retrying_in_place(self, attempt: Callable[[], Any]) -> Any:
        """``attempt()``, repeated once with private copies if the network overwrote a tensor it had saved.

        The repeat runs after the ``except`` block, so the failed attempt's traceback (and with it the graph of its
        pass) is released before the second pass builds its own.
        """
        try:
            return attempt()
        except InPlaceUpdateError:
            if self.copy:
                raise
            self.copy = True
        log.info("REG: the network overwrites tensors it saved for the backward; the traced pass keeps copies.")
        return attempt()

    @staticmethod
    def forward(cond_pass: CondPass, traced: TracedPass) -> tuple[torch.Tensor, torch.Tensor]:
        """``(D_c with graph, leaf x)`` for the positive branch; call inside ``traced``."""
        leaf = cond_pass.x.detach().clone().requires_grad_(True)
        options = _traced_options(cond_pass.model_options)
        d_c = cond_pass.executor(
            cond_pass.model, [cond_pass.conds[cond_pass.positive]], leaf, cond_pass.timestep.clone(), options
        )[0]
        if not d_c.requires_grad:
            raise NoGraphError("the conditional prediction carries no gradient")
        traced.check()
        return d_c, leaf


@dataclass
class ExactVJP(MEstimator):
    """``M = a(σ)·Jᵀ𝟙`` by one vector-Jacobian product (paper eq. 12), optionally with per-block recomputation.

    ``graph_bytes`` is what the plain graph of the last evaluation saved (measured by the saved-tensor guard), which
    is what :class:`AutoVJP` compares with the free memory.
    """

    checkpoint: bool = False
    traced: Traced = field(init=False)
    graph_bytes: int = 0

    def __post_init__(self) -> None:
        self.traced = Traced(checkpoint=self.checkpoint)

    @property
    def kind(self) -> Estimator:
        return Estimator.VJP_LOW_MEMORY if self.checkpoint else Estimator.VJP

    def _factor(self, cond_pass: CondPass) -> tuple[torch.Tensor, torch.Tensor]:
        with self.traced.open(cond_pass) as traced:
            d_c, leaf = Traced.forward(cond_pass, traced)
            m = rectify.column_sums(d_c, leaf) * cond_pass.factor
            self.graph_bytes = traced.guard.saved_bytes
        return d_c.detach(), m

    def evaluate(self, cond_pass: CondPass) -> tuple[list[torch.Tensor], Estimate]:
        d_c, m = self.traced.retrying_in_place(lambda: self._factor(cond_pass))
        outputs = cond_pass.with_positive(d_c, cond_pass.run(cond_pass.others()))
        return outputs, FactorEstimate(d_c, m)


@dataclass
class AutoVJP(MEstimator):
    """The ``vjp`` choice: plain VJP when its graph fits in free memory, the memory-bounded one when it does not.

    The first evaluation of a run uses per-block recomputation, which measures the plain graph's size (the bytes the
    recomputed blocks save); later evaluations use the plain graph while ``graph_bytes · 1.25`` fits in the compute
    device's free memory. Both give the same M to float rounding; the switch is logged once per run.
    """

    plain: ExactVJP = field(default_factory=ExactVJP)
    bounded: ExactVJP = field(default_factory=lambda: ExactVJP(checkpoint=True))
    measured: int | None = None
    switched: bool = False
    kind: Estimator = Estimator.VJP

    def evaluate(self, cond_pass: CondPass) -> tuple[list[torch.Tensor], Estimate]:
        if self.measured is None:
            result = self.bounded.evaluate(cond_pass)
            self.measured = self.bounded.graph_bytes
            self.plain.traced.copy = self.bounded.traced.copy  # what the first pass learnt about the network
            return result
        free = comfy.model_management.get_free_memory(cond_pass.x.device)
        if self.measured * 1.25 < free:
            return self.plain.evaluate(cond_pass)
        if not self.switched:
            log.warning(
                "REG: the exact vjp graph needs about %.2f GB but %.2f GB are free; using the memory-bounded exact "
                "estimator (vjp-low-memory, same M, one more forward per step) for this run.",
                self.measured / 1e9,
                free / 1e9,
            )
            self.switched = True
        return self.bounded.evaluate(cond_pass)

    @property
    def label(self) -> str:
        """What the run record shows: ``vjp``, or that the memory-bounded graph replaced the plain one."""
        if self.switched:
            return f"{Estimator.VJP.value} (as {Estimator.VJP_LOW_MEMORY.value}: the plain graph did not fit)"
        return Estimator.VJP.value


@dataclass
class Chain(MEstimator):
    """The full chain rule ``D_c + a·Jᵀ(D_guided − D_c)`` (an ablation): the graph is kept until the step's end."""

    traced: Traced = field(default_factory=lambda: Traced(checkpoint=False, copy=True))  # no retry: backward later
    kind: Estimator = Estimator.CHAIN

    def evaluate(self, cond_pass: CondPass) -> tuple[list[torch.Tensor], Estimate]:
        with self.traced.open(cond_pass) as traced:
            d_c, leaf = Traced.forward(cond_pass, traced)
        detached = d_c.detach()
        outputs = cond_pass.with_positive(detached, cond_pass.run(cond_pass.others()))
        return outputs, ChainEstimate(detached, (d_c, leaf), cond_pass.factor)


@dataclass
class FDProbe:
    """The finite-difference probe riding in the main pass: the cond-list index it occupies and its step ``h``."""

    index: int
    h: torch.Tensor
    applied: bool = False


def fd_relative_step(model: Any) -> float:
    """Finite-difference step for the model's compute dtype: ``max(1e-3, √eps)``.

    ComfyUI casts the network input to that dtype, so a step below its rounding (bf16 eps 7.8e-3) would vanish or be
    quantised into noise; √eps balances rounding against the O(h) difference error (float32 keeps 1e-3).
    """
    dtype = getattr(model, "manual_cast_dtype", None) or model.get_dtype()
    if not dtype.is_floating_point or dtype.itemsize < 2:
        dtype = torch.bfloat16  # fp8 weights compute in a 16-bit dtype
    return max(FD_RELATIVE_STEP, math.sqrt(torch.finfo(dtype).eps))


@dataclass
class GradientFree(MEstimator):
    """``M ≈ a(σ)·(D_c(x + h𝟙) − D_c(x))/h`` (reg_core.rectify.reg_factor_fd): no graph, one extra forward.

    The probe is a copy of the positive cond list appended to the batch; ComfyUI batches it with the others and the
    runtime's APPLY_MODEL wrapper shifts its chunk by ``h`` (:meth:`shift`). ControlNet residuals are computed from
    the batch's input before the network runs, so with a ControlNet — or once a pass did not reach ``apply_model``
    with the probe (custom model code) — the probe gets its own pass at ``x + h``.
    """

    kind: Estimator = Estimator.GRADIENT_FREE
    batch_probe: bool = True
    probe: FDProbe | None = None

    def evaluate(self, cond_pass: CondPass) -> tuple[list[torch.Tensor], Estimate]:
        pos = cond_pass.positive
        h = self.step(cond_pass)
        if self.batch_probe and not any(c.get("control") is not None for c in cond_pass.conds[pos]):
            self.probe = FDProbe(index=len(cond_pass.conds), h=h)
            try:
                *outputs, shifted = cond_pass.run([*cond_pass.conds, cond_pass.conds[pos]])
                applied = self.probe.applied
            finally:
                self.probe = None
            if not applied:
                log.info("REG: the batched probe did not reach apply_model; probing in a separate pass")
                self.batch_probe = False
                shifted = cond_pass.run([cond_pass.conds[pos]], cond_pass.x + h)[0]
        else:
            outputs = cond_pass.run()
            shifted = cond_pass.run([cond_pass.conds[pos]], cond_pass.x + h)[0]
        d_c = outputs[pos]
        return outputs, FactorEstimate(d_c, rectify.fd_factor(d_c, shifted, h, cond_pass.factor))

    def separate(self, cond_pass: CondPass, d_c: torch.Tensor) -> FactorEstimate:
        """M from one extra pass at ``x + h`` when ``D_c`` is already known (a fallback in the middle of a step)."""
        h = self.step(cond_pass)
        shifted = cond_pass.run([cond_pass.conds[cond_pass.positive]], cond_pass.x + h)[0]
        return FactorEstimate(d_c, rectify.fd_factor(d_c, shifted, h, cond_pass.factor))

    @staticmethod
    def step(cond_pass: CondPass) -> torch.Tensor:
        relative = fd_relative_step(cond_pass.model)
        return rectify.fd_step(cond_pass.timestep, cond_pass.x, flow=cond_pass.flow, relative=relative)

    def shift(self, x: torch.Tensor, chunks: list[int]) -> torch.Tensor:
        """``x`` with the probe's chunk of the batch moved by ``h`` (unchanged when the probe is not in it)."""
        probe = self.probe
        if probe is None or probe.index not in chunks:
            return x
        parts = x.chunk(len(chunks))
        probe.applied = True
        return torch.cat([p + probe.h if i == probe.index else p for p, i in zip(parts, chunks, strict=True)])


def make_estimator(kind: Estimator) -> MEstimator:
    """A fresh estimator object for one sampling run."""
    if kind is Estimator.VJP:
        return AutoVJP()
    if kind is Estimator.VJP_LOW_MEMORY:
        return ExactVJP(checkpoint=True)
    if kind is Estimator.CHAIN:
        return Chain()
    return GradientFree()
