"""How REG runs inside ComfyUI's sampler: keyed wrappers, the per-run holder and the one decision per step.

REG needs the *true* conditional prediction ``D_c`` with its Jacobian, and the guided prediction of whatever chain
the model carries (CFG, APG, PAG, SAG, SLG, CFGZeroStar, RescaleCFG, …). Keyed wrappers do that without taking any
single-slot hook, so the result does not depend on node order:

- ``OUTER_SAMPLE``: creates the run's :class:`REGRun` in a copy of the guider's model options, where the other
  wrappers find it; at the run's end (also on interrupt) it logs one line of what REG did and keeps the run's record
  for REGDiagnostics, keyed by the run's output latent;
- ``PREDICT_NOISE`` (per model evaluation): lets the whole guidance chain run, then returns
  ``D_c + M_λ ⊙ (D_guided − D_c)`` from the step's estimate; post-cfg functions that are not guidance
  (nodes/composition.py) are held back while the chain runs and applied to REG's result;
- ``CALC_COND_BATCH``: the first call of a step that holds the positive branch (with context windows: the first
  call) is the main pass. There, when this step's cfg, conds and hooks are known, :meth:`REGRun.decide` decides
  whether REG acts, and the run's estimator runs the call (nodes/estimators/). Later calls (PAG/SAG/SLG extra
  passes) are never differentiated; when the step is exact they use the differentiated pass's kernels.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import comfy.model_management
import comfy.model_patcher
import comfy.samplers
import torch
from comfy.patcher_extension import WrappersMP

from ..reg_core import diagnostics, rectify
from ..reg_core.diagnostics import RunRecord, StepRecord
from ..reg_core.rectify import Estimator, Space
from .common import LOGGER_NAME, AddWrapper, REGConfigError, model_space
from .composition import Composition, acts_after_reg, cache_nodes, describe
from .estimators import Estimate, FactorEstimate, MEstimator, make_estimator
from .estimators.gradient_free import GradientFree
from .passes import CondPass
from .traced_pass import known_autograd_failure, plain_kernels

log = logging.getLogger(LOGGER_NAME)

WRAPPER_KEY = "reg_guidance"
WRAPPER_KINDS = (WrappersMP.OUTER_SAMPLE, WrappersMP.PREDICT_NOISE, WrappersMP.CALC_COND_BATCH)
RUN_KEY = "reg_guidance_run"
KEPT_RECORDS = 8  # runs per patch REGDiagnostics can find by their output latent
OUTSIDE_WINDOW = "outside the window"


@dataclass(frozen=True)
class REGSettings:
    """The user's REG settings (node inputs), validated once when built."""

    strength: float = 1.0
    estimator: Estimator = Estimator.VJP
    start_percent: float = 0.0
    end_percent: float = 1.0
    refresh_every: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "estimator", Estimator(self.estimator))
        self.validate()

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
class AfterREG:
    """A post-cfg function that is not guidance: held back while REG's step runs, applied to REG's result."""

    func: Any
    step: StepState

    def __call__(self, args: dict) -> torch.Tensor:
        if not self.step.acting:
            return self.func(args)
        self.step.deferred.append((self.func, args))
        return args["denoised"]


@dataclass
class StepState:
    """One model evaluation in progress."""

    claimed: bool = False  # the main pass was seen
    acting: bool = False  # REG acts at this evaluation
    exact: bool = False  # the step's passes use the differentiated pass's kernels
    skipped: str | None = None  # why REG does not act
    cond_pass: CondPass | None = None
    estimate: Estimate | None = None
    deferred: list[tuple[Any, dict]] = field(default_factory=list)
    mask: torch.Tensor | None = None  # the sampler's denoise mask at this evaluation (None without one)


@dataclass
class REGRun:
    """Per-sampling-run state, created by the OUTER_SAMPLE wrapper (one per run, never shared between runs)."""

    settings: REGSettings
    node: str  # the node that installed REG, named by errors
    space: Space | None
    sigma_high: float
    sigma_low: float
    estimator: MEstimator
    guider: Any
    record: RunRecord
    off: str | None = None  # why REG cannot act in this run at all
    step: StepState | None = None
    evaluations: int = 0
    last_m: torch.Tensor | None = None
    guidance: str = ""  # what REG rectified, for the run's line
    fallback: str | None = None
    said: set[str] = field(default_factory=set)
    denoise_mask: torch.Tensor | None = None  # recorded by :func:`_mask_recorder` just before the evaluation

    def say_once(self, key: str, message: str, *args: Any, level: int = logging.WARNING) -> None:
        """Log ``message`` the first time ``key`` comes up in this run."""
        if key not in self.said:
            self.said.add(key)
            log.log(level, message, *args)

    def positive_index(self, conds: list[Any]) -> int | None:
        """Where the guider's positive conditioning sits in a ``calc_cond_batch`` call; None when it is absent.

        CFGGuider passes ``[positive, negative]``, DualCFGGuider ``[negative, middle, positive]``, SLG's simple node
        ``[positive, None]`` then ``[None, negative]``: the branch is found by identity with the guider's processed
        ``conds["positive"]`` (index 0 for guiders without one).
        """
        conds_by_name = getattr(self.guider, "conds", None)
        positive = conds_by_name.get("positive") if isinstance(conds_by_name, dict) else None
        if positive is None:
            return 0 if conds and conds[0] is not None else None
        return next((i for i, cond in enumerate(conds) if cond is positive), None)

    def decide(
        self, conds: list[Any], positive: int | None, sigma: torch.Tensor, model_options: dict, composition: Composition
    ) -> str | None:
        """Whether REG acts at this evaluation: None when it does, else why not (the only place that decides).

        Called at the step's main pass, when every wrapper has set the step's cfg (schedules, CFGOverride) and the
        sampler has chosen its branches (ComfyUI drops the negative at cfg 1).
        """
        if self.off is not None:
            return self.off
        if self.settings.strength == 0:
            return "strength is 0"
        if model_options.get("context_handler") is not None:
            return "context windows split each step into windows, which REG does not rectify"
        if not self.sigma_low <= float(sigma.max()) <= self.sigma_high:
            return OUTSIDE_WINDOW
        negative = any(c is not None for i, c in enumerate(conds) if i != positive)
        cfg = getattr(self.guider, "cfg", None)
        if type(self.guider).predict_noise is comfy.samplers.CFGGuider.predict_noise:
            scaled = negative and (cfg != 1 or bool(composition.with_negative))
        else:  # a guider of its own (DualCFG, PerpNeg, DualModel: its negative may run on another model)
            cfg = None
            scaled = negative or getattr(self.guider, "cfg", 1) != 1
        if not scaled and not composition.always:
            return "cfg is 1 and no guidance hook is set: there is no guidance to rectify"
        if not self.guidance:
            self.guidance = describe(cfg, composition)
        return None

    def fall_back(self, reason: str) -> None:
        """Switch to the gradient-free estimator for the rest of the run, warning once."""
        if self.estimator.kind is not Estimator.GRADIENT_FREE:
            log.warning(
                "REG: exact gradients are unavailable (%s); using the gradient-free estimator for this run.", reason
            )
            self.fallback = reason
            self.record.estimator = f"{Estimator.GRADIENT_FREE.value} (fallback: {reason})"
        self.estimator = GradientFree()

    def summary(self) -> str:
        """The run's one log line: what REG rectified, with which estimator, and why it did not act elsewhere."""
        acted = sum(step.active for step in self.record.steps)
        text = f"REG: rectified {acted}/{len(self.record.steps)} evaluations"
        if acted:
            mean = self.record.mean_m()
            mean_text = f", mean M {mean:.2f}" if mean is not None else ""
            text += f" with {self.record.estimator}{mean_text} ({self.guidance})"
        if self.record.skipped:
            text += "; not at " + ", ".join(f"{n}: {why}" for why, n in self.record.skipped.most_common())
        return text


def run_of(model_options: dict | None) -> REGRun | None:
    """The current run's holder, kept in ``model_options["transformer_options"]`` for the run."""
    return (model_options or {}).get("transformer_options", {}).get(RUN_KEY)


def remove_reg(patcher: Any) -> bool:
    """Remove every REG wrapper from a ModelPatcher; return whether it had any."""
    had = bool(patcher.get_wrappers(WrappersMP.PREDICT_NOISE, WRAPPER_KEY))
    for kind in WRAPPER_KINDS:
        patcher.remove_wrappers_with_key(kind, WRAPPER_KEY)
    return had


class REGPatch:
    """The wrappers one REG node installs. Holds only the settings and the records of its last runs (REGDiagnostics
    finds a run by its output latent); everything a run changes lives in that run's :class:`REGRun`."""

    def __init__(self, settings: REGSettings, node: str = "REGGuidance") -> None:
        self.settings = settings
        self.node = node
        self.records: OrderedDict[str, RunRecord] = OrderedDict()

    def install(self, add_wrapper: AddWrapper) -> None:
        """Register the keyed wrappers with ``add_wrapper(type, key, fn)`` (see :func:`nodes.common.wrapper_adder`)."""
        for kind, fn in zip(WRAPPER_KINDS, (self.outer_sample, self.predict_noise, self.calc_cond_batch), strict=True):
            add_wrapper(kind, WRAPPER_KEY, fn)

    def record_for(self, samples: torch.Tensor) -> RunRecord | None:
        """The record of the run whose output is ``samples`` (None when no kept run produced it)."""
        return self.records.get(_latent_key(samples))

    def start_run(self, guider: Any) -> REGRun:
        """Fresh state for a sampling run of ``guider``."""
        sampling = guider.model_patcher.get_model_object("model_sampling")
        space = model_space(sampling)
        sigma_high = float(sampling.percent_to_sigma(self.settings.start_percent))
        sigma_low = float(sampling.percent_to_sigma(self.settings.end_percent))
        flow = space is not None and space.flow
        run = REGRun(
            settings=self.settings,
            node=self.node,
            space=space,
            sigma_high=sigma_high,
            sigma_low=sigma_low,
            estimator=make_estimator(self.settings.estimator),
            guider=guider,
            record=RunRecord(sigma_low, sigma_high, flow, self.settings.estimator.value),
        )
        caches = cache_nodes(guider.model_options)
        if caches:
            run.off = f"{', '.join(caches)} serves cached predictions, which have no Jacobian"
        elif space is None:
            run.off = "the model adds no noise (an image-to-image flow), so there is no noise level for M"
        if run.off is not None:
            log.warning("REG: %s; REG leaves the guidance unchanged in this run.", run.off)
        return run

    def outer_sample(self, executor, *args, **kwargs):
        guider = executor.class_obj
        original = guider.model_options
        run = self.start_run(guider)
        guider.model_options = comfy.model_patcher.create_model_options_clone(original)
        guider.model_options.setdefault("transformer_options", {})[RUN_KEY] = run
        guider.model_options["denoise_mask_function"] = _mask_recorder(run, original.get("denoise_mask_function"))
        try:
            output = executor(*args, **kwargs)
            self.records[_latent_key(output)] = run.record
            while len(self.records) > KEPT_RECORDS:
                self.records.popitem(last=False)
            return output
        finally:
            guider.model_options = original
            log.info("%s", run.summary())

    def predict_noise(self, executor, x, timestep, model_options, seed):
        run = run_of(model_options)
        if run is None:
            return executor(x, timestep, model_options, seed)
        run.step = step = StepState()
        step.mask, run.denoise_mask = run.denoise_mask, None
        try:
            d_guided = executor(x, timestep, _hold_back(model_options, step), seed)
            return self._finish(run, step, d_guided, timestep.detach().clone())
        finally:
            run.step = None

    def _finish(self, run: REGRun, step: StepState, d_guided: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """REG's prediction for the step, then the post-cfg functions that act after it."""
        if not step.acting:
            reason = step.skipped or "the positive branch was never evaluated (a custom guider or cond-batch function)"
            if step.skipped is None:
                run.say_once("no-pass", "REG: %s; REG is skipped at such steps.", reason)
            run.record.skipped[reason] += 1
            run.record.steps.append(StepRecord(sigma=sigma, active=False))
            return d_guided
        result = self._rectify(run, step, d_guided, sigma)
        for func, args in step.deferred:
            result = func({**args, "denoised": result})
        return result

    def _rectify(self, run: REGRun, step: StepState, d_guided: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        estimate, reason = step.estimate, None
        try:
            result = estimate.rectify(d_guided, self.settings.strength)  # chain's backward runs here
        except (RuntimeError, NotImplementedError) as err:
            reason = _fallback_reason(run, err, "the backward pass")
        if reason is not None:  # after the except block: the failed graph, held by its traceback, is gone
            comfy.model_management.soft_empty_cache()
            estimate, result = self._fall_back_now(run, step, d_guided, reason)
        delta = d_guided - estimate.d_c
        m = estimate.factor_map()
        run.record.steps.append(
            StepRecord(
                sigma=sigma,
                active=True,
                stats=diagnostics.step_statistics(m, delta, result - estimate.d_c),
                m_map=None if m is None else diagnostics.downsample_map(m.expand_as(delta)),
            )
        )
        return result

    def _fall_back_now(self, run: REGRun, step: StepState, d_guided: torch.Tensor, reason: str):
        """Fall back in the middle of a step: the gradient-free estimate of the step's main call."""
        run.fall_back(reason)
        _, estimate = run.estimator.evaluate(step.cond_pass)
        return estimate, estimate.rectify(d_guided, self.settings.strength)

    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        run = run_of(model_options)
        step = run.step if run is not None else None
        if step is None:
            return executor(model, conds, x_in, timestep, model_options)
        if step.claimed:
            if not step.exact:
                return executor(model, conds, x_in, timestep, model_options)
            with plain_kernels(model_options) as options:  # an extra guidance pass: the step's kernels
                return executor(model, conds, x_in, timestep, options)
        pos = run.positive_index(conds)
        windows = model_options.get("context_handler") is not None  # each window's call holds copies of the conds
        if (pos is None or conds[pos] is None) and not windows:
            return executor(model, conds, x_in, timestep, model_options)
        step.claimed = True
        composition = Composition.of(model_options)
        step.skipped = run.decide(conds, pos, timestep, model_options, composition)
        if step.skipped is not None:
            if step.skipped != OUTSIDE_WINDOW and run.off is None:
                run.say_once(step.skipped, "REG: %s.", step.skipped)
            return executor(model, conds, x_in, timestep, model_options)
        step.acting = True
        step.cond_pass = CondPass(
            executor=executor,
            model=model,
            conds=conds,
            positive=pos,
            x=x_in,
            timestep=timestep,
            model_options=model_options,
            space=run.space,
            cobatch=composition.cobatch,
            mask=_step_mask(run, step.mask, x_in),
        )
        return self._evaluate(run, step)

    def _evaluate(self, run: REGRun, step: StepState) -> list[torch.Tensor]:
        """The main call through the run's estimator, or with the last M when ``refresh_every`` reuses it."""
        cond_pass = step.cond_pass
        evaluation = run.evaluations
        run.evaluations += 1
        k = self.settings.refresh_every
        reuse = run.last_m is not None and run.last_m.shape == cond_pass.x.shape
        if reuse and not rectify.is_fresh_evaluation(evaluation, k):
            outputs = cond_pass.main()
            step.estimate = FactorEstimate(cond_pass.d_c(outputs), run.last_m)
            return outputs
        outputs, step.estimate = self._estimate(run, cond_pass)
        step.exact = run.estimator.kind is not Estimator.GRADIENT_FREE
        if k > 1:
            run.last_m = step.estimate.factor_map()
        return outputs

    def _estimate(self, run: REGRun, cond_pass: CondPass) -> tuple[list[torch.Tensor], Estimate]:
        """The run's estimator on the main call, falling back to gradient-free for the failures it can name."""
        try:
            outputs, estimate = run.estimator.evaluate(cond_pass)
        except (RuntimeError, NotImplementedError) as err:
            reason = _fallback_reason(run, err, "the conditional pass")
        else:
            if run.fallback is None:
                run.record.estimator = run.estimator.label
            return outputs, estimate
        comfy.model_management.soft_empty_cache()  # after the except block: the failed graph is gone
        run.fall_back(reason)
        return run.estimator.evaluate(cond_pass)


def _step_mask(run: REGRun, mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """The step's denoise mask for M (one for the batch or one per sample); any other batch is left out, said once."""
    if mask is None or mask.shape[0] in (1, x.shape[0]):
        return mask
    run.say_once(
        "mask-batch",
        "REG: the denoise mask holds %d masks for a batch of %d; M is computed without the mask.",
        mask.shape[0],
        x.shape[0],
    )
    return None


def _latent_key(samples: torch.Tensor) -> str:
    """The key of a sampler's output as the sampler nodes hand it on: in ComfyUI's intermediate dtype (float16 with
    ``--fp16-intermediates``; ComfyUI 0.3.64 keeps float32)."""
    intermediate = getattr(comfy.model_management, "intermediate_dtype", None)
    return diagnostics.latent_key(samples, torch.float32 if intermediate is None else intermediate())


def _fallback_reason(run: REGRun, err: RuntimeError | NotImplementedError, what: str) -> str:
    """Why the run may fall back to gradient-free after ``err`` in ``what``; any other failure is raised (out of
    memory as it is, so ComfyUI reports it as such; a failure of the gradient-free estimator itself too)."""
    gradient_free = run.estimator.kind is Estimator.GRADIENT_FREE
    if isinstance(err, torch.OutOfMemoryError):
        if gradient_free:
            raise err
        return "not enough memory for the backward pass"
    reason = None if gradient_free else known_autograd_failure(err)
    if reason is None:
        raise RuntimeError(f"{run.node} ({run.estimator.kind.value}): {what} failed: {err}") from err
    return reason


def _mask_recorder(run: REGRun, previous: Any) -> Any:
    """A ``denoise_mask_function`` that records the mask the sampler uses at each evaluation (after any such function
    already on the model, e.g. Differential Diffusion's) for REG's M (:meth:`nodes.passes.CondPass.weight`)."""

    def record(sigma: torch.Tensor, denoise_mask: torch.Tensor, extra_options: dict) -> torch.Tensor:
        mask = denoise_mask if previous is None else previous(sigma, denoise_mask, extra_options=extra_options)
        run.denoise_mask = mask
        return mask

    return record


def _hold_back(model_options: dict, step: StepState) -> dict:
    """``model_options`` whose post-cfg functions that are not guidance wait for REG's result (:class:`AfterREG`)."""
    post = model_options.get("sampler_post_cfg_function", [])
    if not any(acts_after_reg(fn) for fn in post):
        return model_options
    held = [AfterREG(fn, step) if acts_after_reg(fn) else fn for fn in post]
    return {**model_options, "sampler_post_cfg_function": held}
