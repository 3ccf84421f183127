"""How REG runs inside ComfyUI's sampler: keyed wrappers, per-run state and the inference-mode escape.

REG needs the *true* conditional prediction ``D_c`` with its Jacobian, and the *final* guided prediction of whatever
chain the model carries (CFG, APG, PAG, SAG, SLG, CFGZeroStar, RescaleCFG, …). Two keyed wrappers do that without
taking any single-slot hook, so the result does not depend on node order:

- ``PREDICT_NOISE`` (outermost per step): opens a step capture, lets the whole guidance chain run, then returns
  ``D_c + M_λ ⊙ (D_final − D_c)`` (reg_core.rectify);
- ``CALC_COND_BATCH``: the first call of a step is the main cond/uncond pass (extra passes of PAG/SAG/SLG come later
  in the post-cfg hooks); it evaluates the conditional branch with a graph (or with a finite-difference probe) and
  records ``D_c`` and ``M``. Extra passes are never differentiated.

An ``OUTER_SAMPLE`` wrapper creates fresh per-run state (window in σ, estimator fallback, APG momentum) and drops it
when the run ends, including on interrupt.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import comfy.model_management
import comfy.model_sampling
import torch
from comfy.patcher_extension import WrappersMP

from ..reg_core import diagnostics, rectify
from ..reg_core.diagnostics import RunRecord, StepRecord
from ..reg_core.rectify import Estimator
from .common import LOGGER_NAME, AddWrapper, REGConfigError

log = logging.getLogger(LOGGER_NAME)

WRAPPER_KEY = "reg_guidance"
WRAPPER_KINDS = (
    WrappersMP.OUTER_SAMPLE,
    WrappersMP.PREDICT_NOISE,
    WrappersMP.CALC_COND_BATCH,
    WrappersMP.DIFFUSION_MODEL,
    WrappersMP.APPLY_MODEL,
)
CACHE_WRAPPER_KEYS = ("easycache", "lazycache")
FD_RELATIVE_STEP = 1e-3


@dataclass(frozen=True)
class REGSettings:
    """The user's REG settings (node inputs)."""

    strength: float = 1.0
    estimator: Estimator = Estimator.VJP
    start_percent: float = 0.0
    end_percent: float = 1.0
    refresh_every: int = 1

    def validate(self) -> None:
        if self.refresh_every < 1:
            raise REGConfigError(f"refresh_every must be at least 1, got {self.refresh_every}.")
        if self.refresh_every > 1 and self.estimator is Estimator.CHAIN:
            raise REGConfigError(
                "refresh_every > 1 reuses M between evaluations, but the chain estimator has no reusable M "
                "(it multiplies the Jacobian by each step's own guidance). Use refresh_every = 1 or another estimator."
            )
        if not 0.0 <= self.start_percent <= 1.0 or not 0.0 <= self.end_percent <= 1.0:
            raise REGConfigError(
                f"start_percent ({self.start_percent}) and end_percent ({self.end_percent}) must lie in [0, 1]."
            )
        if self.start_percent > self.end_percent:
            raise REGConfigError(
                f"start_percent ({self.start_percent}) is after end_percent ({self.end_percent}): REG would never act. "
                "Set start_percent ≤ end_percent."
            )


@dataclass
class StepCapture:
    """What the main conditional pass of one step leaves for the rectification."""

    claimed: bool = False
    d_c: torch.Tensor | None = None
    m: torch.Tensor | None = None
    graph: tuple[torch.Tensor, torch.Tensor] | None = None  # (D_c with graph, leaf x) for the chain estimator
    factor: torch.Tensor | None = None
    probe: FDProbe | None = None  # set while the main pass carries the gradient-free probe as an extra cond


@dataclass
class FDProbe:
    """The finite-difference probe riding in the main pass: the cond-list index it occupies and its step ``h``."""

    index: int
    h: torch.Tensor
    applied: bool = False


@dataclass
class REGRun:
    """Per-sampling-run state, created by the OUTER_SAMPLE wrapper and dropped when the run ends."""

    settings: REGSettings
    flow: bool
    sigma_high: float
    sigma_low: float
    estimator: Estimator
    prepared: bool = False
    tracing: bool = False
    context_warned: bool = False
    step: StepCapture | None = None
    evaluations: int = 0
    last_m: torch.Tensor | None = None
    record: RunRecord | None = None
    batch_probe: bool = True  # False once a pass did not reach APPLY_MODEL with the probe (custom model code)
    guider: Any = None

    def positive_index(self, conds: list[Any]) -> int:
        """Where the guider's positive conditioning sits in a ``calc_cond_batch`` call (index 0 unless found).

        CFGGuider passes ``[positive, negative]``, but e.g. DualCFGGuider passes ``[negative, middle, positive]``:
        the branch to differentiate is found by identity with the guider's processed ``conds["positive"]``.
        """
        conds_by_name = getattr(self.guider, "conds", None)
        positive = conds_by_name.get("positive") if isinstance(conds_by_name, dict) else None
        if positive is not None:
            for i, cond in enumerate(conds):
                if cond is positive:
                    return i
        return 0

    def in_window(self, sigma: torch.Tensor) -> bool:
        """Whether REG acts at this σ (``start/end_percent`` mapped through the model's ``percent_to_sigma``)."""
        s = float(sigma.max())
        return self.sigma_low <= s <= self.sigma_high

    def fall_back(self, reason: str) -> None:
        """Switch to the gradient-free estimator for the rest of the run, warning once."""
        if self.estimator is not Estimator.GRADIENT_FREE:
            log.warning(
                "REG: exact gradients are unavailable (%s); using the gradient-free estimator for this run.", reason
            )
        self.estimator = Estimator.GRADIENT_FREE
        if self.record is not None:
            self.record.estimator = f"{Estimator.GRADIENT_FREE.value} (fallback: {reason})"


def _differentiable_modules(model: torch.nn.Module, conds: list[Any]) -> list[torch.nn.Module]:
    """The diffusion model plus the ControlNet/T2I-adapter models attached to the conditioning."""
    modules = [model]
    seen: set[int] = set()
    for cond_list in conds:
        for cond in cond_list or []:
            control = cond.get("control") if isinstance(cond, dict) else None
            while control is not None and id(control) not in seen:
                seen.add(id(control))
                modules.extend(patcher.model for patcher in control.get_models())
                control = getattr(control, "previous_controlnet", None)
    return modules


def make_differentiable(modules: Iterable[torch.nn.Module]) -> int:
    """Replace inference-mode parameters and buffers by ordinary copies so autograd can record through them.

    ComfyUI loads and patches weights inside ``torch.inference_mode``; such tensors cannot be saved for backward
    (comfyui-integration.md §6). Values are unchanged and ``requires_grad`` stays False. Returns how many tensors
    were replaced (0 once a run has already done it and the weights were not reloaded).
    """
    replaced = 0
    with torch.inference_mode(False), torch.no_grad():
        for root in modules:
            for module in root.modules():
                for name, param in list(module._parameters.items()):
                    if param is not None and param.is_inference():
                        module._parameters[name] = torch.nn.Parameter(param.clone(), requires_grad=False)
                        replaced += 1
                for name, buf in list(module._buffers.items()):
                    if buf is not None and buf.is_inference():
                        module._buffers[name] = buf.clone()
                        replaced += 1
    return replaced


def fd_relative_step(model: Any) -> float:
    """Finite-difference step for the model's compute dtype: ``max(1e-3, √eps)``.

    ComfyUI casts the network input to that dtype, so a step below its rounding (bf16 eps 7.8e-3) would vanish or be
    quantised into noise; √eps balances rounding against the O(h) difference error (float32 keeps 1e-3).
    """
    dtype = getattr(model, "manual_cast_dtype", None) or model.get_dtype()
    if not dtype.is_floating_point or dtype.itemsize < 2:
        dtype = torch.bfloat16  # fp8 weights compute in a 16-bit dtype
    return max(FD_RELATIVE_STEP, math.sqrt(torch.finfo(dtype).eps))


class NoGraphError(RuntimeError):
    """The conditional pass produced no autograd graph (e.g. quantised weights or a cache served the output)."""


CalcExecutor = Callable[..., list[torch.Tensor]]


def remove_reg(patcher: Any) -> bool:
    """Remove every REG wrapper from a ModelPatcher; return whether it had any."""
    had = bool(patcher.get_wrappers(WrappersMP.PREDICT_NOISE, WRAPPER_KEY))
    for kind in WRAPPER_KINDS:
        patcher.remove_wrappers_with_key(kind, WRAPPER_KEY)
    return had


def _copy_after_skip(h: torch.Tensor, transformer_options: dict) -> torch.Tensor:
    """UNet ``input_block_patch_after_skip``: the blocks after a skip connection get their own copy of ``h``.

    ``openaimodel.apply_control`` adds ControlNet residuals to the skip tensors in place (``h += ctrl`` on
    ``hs.pop()``) after the following blocks saved them for backward, which breaks the backward pass.
    """
    return h.clone()


def _traced_options(model_options: dict) -> dict:
    """``model_options`` for the differentiated pass: ``_copy_after_skip`` appended to the UNet patches."""
    transformer_options = dict(model_options.get("transformer_options", {}))
    patches = dict(transformer_options.get("patches", {}))
    patches["input_block_patch_after_skip"] = [*patches.get("input_block_patch_after_skip", []), _copy_after_skip]
    transformer_options["patches"] = patches
    return {**model_options, "transformer_options": transformer_options}


def _cond_with_graph(
    executor: CalcExecutor, model: Any, cond: Any, x: torch.Tensor, timestep: torch.Tensor, model_options: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate the conditional branch outside inference mode with autograd on; return ``(D_c, leaf)``."""
    leaf = x.detach().clone().requires_grad_(True)
    d_c = executor(model, [cond], leaf, timestep.clone(), _traced_options(model_options))[0]
    if not d_c.requires_grad:
        raise NoGraphError("the conditional prediction carries no gradient")
    return d_c, leaf


class REGPatch:
    """The wrappers one REG node installs; holds the current run's state between the wrapper calls."""

    def __init__(self, settings: REGSettings) -> None:
        settings.validate()
        self.settings = settings
        self.run: REGRun | None = None
        self.last_record: RunRecord | None = None

    def install(self, add_wrapper: AddWrapper) -> None:
        """Register the keyed wrappers with ``add_wrapper(type, key, fn)`` (see :func:`wrapper_adder`)."""
        for kind, fn in zip(
            WRAPPER_KINDS,
            (self.outer_sample, self.predict_noise, self.calc_cond_batch, self.diffusion_model, self.apply_model),
            strict=True,
        ):
            add_wrapper(kind, WRAPPER_KEY, fn)

    def start_run(self, guider: Any) -> REGRun:
        """Fresh state for a sampling run of ``guider``."""
        patcher = guider.model_patcher
        sampling = patcher.get_model_object("model_sampling")
        flow = isinstance(sampling, comfy.model_sampling.CONST)
        estimator = self.settings.estimator
        run = REGRun(
            settings=self.settings,
            flow=flow,
            sigma_high=float(sampling.percent_to_sigma(self.settings.start_percent)),
            sigma_low=float(sampling.percent_to_sigma(self.settings.end_percent)),
            estimator=estimator,
            guider=guider,
        )
        run.record = RunRecord(run.sigma_low, run.sigma_high, flow, estimator.value)
        self.last_record = run.record
        wrappers = guider.model_options.get("transformer_options", {}).get("wrappers", {})
        caches = sorted({key for per_type in wrappers.values() for key in per_type if key in CACHE_WRAPPER_KEYS})
        if caches and estimator is not Estimator.GRADIENT_FREE:
            run.fall_back(f"{', '.join(caches)} serves cached predictions without a graph")
        return run

    def outer_sample(self, executor, *args, **kwargs):
        outer = self.run  # a sampling run nested inside another keeps the outer run's state intact
        self.run = self.start_run(executor.class_obj)
        try:
            return executor(*args, **kwargs)
        finally:
            self.run = outer

    def predict_noise(self, executor, x, timestep, model_options, seed):
        run = self.run
        if run is None or self.settings.strength == 0:
            return executor(x, timestep, model_options, seed)
        if model_options.get("context_handler") is not None:
            if not run.context_warned:
                log.warning("REG: context windows split each step into windows; REG is skipped for this run.")
                run.context_warned = True
            return executor(x, timestep, model_options, seed)
        if not run.in_window(timestep):
            run.record.steps.append(StepRecord(sigma=timestep.detach().clone(), active=False))
            return executor(x, timestep, model_options, seed)
        run.step = StepCapture()
        try:
            d_final = executor(x, timestep, model_options, seed)
            return self._rectify(run, run.step, d_final, timestep)
        finally:
            run.step = None

    def _rectify(self, run: REGRun, cap: StepCapture, d_final: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        strength = self.settings.strength
        if cap.graph is not None:
            d_graph, leaf = cap.graph
            cap.graph = None
            with torch.inference_mode(False), torch.enable_grad():
                delta = (d_final - cap.d_c).clone()
                jt_delta = rectify.chain_product(d_graph, leaf, delta)
            result = rectify.rectify_chain(cap.d_c, d_final, jt_delta, cap.factor, strength)
        elif cap.d_c is None or cap.m is None:
            run.record.steps.append(StepRecord(sigma=sigma.detach().clone(), active=False))
            return d_final
        else:
            result = rectify.rectify(cap.d_c, d_final, cap.m, strength)
        delta = d_final - cap.d_c
        run.record.steps.append(
            StepRecord(
                sigma=sigma.detach().clone(),
                active=True,
                stats=diagnostics.step_statistics(cap.m, delta, result - cap.d_c),
                m_map=None if cap.m is None else diagnostics.downsample_map(cap.m.expand_as(delta)),
            )
        )
        return result

    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        run = self.run
        cap = run.step if run is not None else None
        if cap is None or cap.claimed:
            return executor(model, conds, x_in, timestep, model_options)
        cap.claimed = True
        pos = run.positive_index(conds)
        if conds[pos] is None or all(c is None for i, c in enumerate(conds) if i != pos):
            return executor(model, conds, x_in, timestep, model_options)  # cfg = 1: no guidance to rectify
        cap.factor = rectify.flow_factor(timestep, x_in, run.flow)
        run.evaluations += 1
        k = self.settings.refresh_every
        if k > 1 and (run.evaluations - 1) % k != 0 and run.last_m is not None and run.last_m.shape == x_in.shape:
            out = executor(model, conds, x_in, timestep, model_options)
            cap.d_c, cap.m = out[pos], run.last_m
            return out
        out = self._fresh(run, cap, executor, model, conds, pos, x_in, timestep, model_options)
        if k > 1:
            run.last_m = cap.m
        return out

    def _fresh(self, run, cap, executor, model, conds, pos, x_in, timestep, model_options):
        """The main pass with a newly estimated M (exact, or gradient-free after a fallback); ``pos``: positive."""
        if run.estimator is not Estimator.GRADIENT_FREE:
            try:
                self._exact(run, cap, executor, model, conds, pos, x_in, timestep, model_options)
            except torch.OutOfMemoryError:
                cap.graph, cap.m, cap.d_c = None, None, None
                comfy.model_management.soft_empty_cache()
                run.fall_back("not enough memory for the backward pass")
            except (RuntimeError, NotImplementedError) as err:
                cap.graph, cap.m, cap.d_c = None, None, None  # nothing half-made survives the fallback
                run.fall_back(str(err).splitlines()[0] if str(err) else type(err).__name__)
            else:
                others = executor(model, [*conds[:pos], *conds[pos + 1 :]], x_in, timestep, model_options)
                return [*others[:pos], cap.d_c, *others[pos:]]
        return self._gradient_free(run, cap, executor, model, conds, pos, x_in, timestep, model_options)

    def diffusion_model(self, executor, *args, **kwargs):
        """Check that the network output of the differentiated pass really depends on its input.

        ``D = x − σ·out`` keeps a gradient through ``x`` even when the network itself is cut from the graph
        (quantised or frozen weights, a cache, a kernel without backward); M would silently be 1. Raise instead,
        so the run falls back to the gradient-free estimator.
        """
        out = executor(*args, **kwargs)
        run = self.run
        if run is not None and run.tracing and isinstance(out, torch.Tensor) and not out.requires_grad:
            raise NoGraphError("the network output carries no gradient")
        return out

    def _exact(self, run, cap, executor, model, conds, pos, x_in, timestep, model_options) -> None:
        """Record ``D_c`` and ``M`` (or the chain graph) from the conditional pass with autograd."""
        if not run.prepared:
            make_differentiable(_differentiable_modules(model, conds))
            run.prepared = True
        with torch.inference_mode(False), torch.enable_grad():
            run.tracing = True
            try:
                d_c, leaf = _cond_with_graph(executor, model, conds[pos], x_in, timestep, model_options)
            finally:
                run.tracing = False
            if run.estimator is Estimator.CHAIN:
                cap.graph = (d_c, leaf)
            else:
                cap.m = rectify.column_sums(d_c, leaf) * cap.factor
            cap.d_c = d_c.detach()

    def _gradient_free(self, run, cap, executor, model, conds, pos, x_in, timestep, model_options):
        """``D_c``, the other branches and ``D_c(x + h)`` in one batched pass when possible, in two otherwise.

        The probe is a copy of the conditional list appended to ``conds``: ComfyUI batches it with the others and
        :meth:`apply_model` shifts its chunk by ``h``. ControlNet residuals are computed from the batch's input
        before the network runs, so with a ControlNet (or when the shift never reached ``apply_model``) the probe
        gets its own pass at ``x + h``.
        """
        h = rectify.fd_step(timestep, x_in, flow=run.flow, relative=fd_relative_step(model))
        if run.batch_probe and not any(c.get("control") is not None for c in conds[pos]):
            cap.probe = FDProbe(index=len(conds), h=h)
            try:
                *out, shifted = executor(model, [*conds, conds[pos]], x_in, timestep, model_options)
                applied = cap.probe.applied
            finally:
                cap.probe = None
            if not applied:
                log.info("REG: the batched probe did not reach apply_model; probing in a separate pass")
                run.batch_probe = False
                shifted = executor(model, [conds[pos]], x_in + h, timestep, model_options)[0]
        else:
            out = executor(model, conds, x_in, timestep, model_options)
            shifted = executor(model, [conds[pos]], x_in + h, timestep, model_options)[0]
        cap.d_c = out[pos]
        cap.m = (shifted - out[pos]) / h * cap.factor
        return out

    def apply_model(self, executor, x, t, *args, **kwargs):
        """Shift the probe's chunks of the batch by ``h`` (see :meth:`_gradient_free`); otherwise pass through.

        ``apply_model`` computes ``D`` from the ``x`` it receives, so shifting here gives exactly ``D_c(x + h)``.
        """
        run = self.run
        probe = run.step.probe if run is not None and run.step is not None else None
        options = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
        chunks = options.get("cond_or_uncond", [])
        if probe is None or probe.index not in chunks:
            return executor(x, t, *args, **kwargs)
        parts = x.chunk(len(chunks))
        x = torch.cat([p + probe.h if i == probe.index else p for p, i in zip(parts, chunks, strict=True)])
        probe.applied = True
        return executor(x, t, *args, **kwargs)
