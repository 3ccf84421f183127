"""How REG runs inside ComfyUI's sampler: keyed wrappers and the per-run holder.

REG needs the *true* conditional prediction ``D_c`` with its Jacobian, and the *final* guided prediction of whatever
chain the model carries (CFG, APG, PAG, SAG, SLG, CFGZeroStar, RescaleCFG, …). Keyed wrappers do that without taking
any single-slot hook, so the result does not depend on node order:

- ``OUTER_SAMPLE``: creates the run's :class:`REGRun` (window in σ, the estimator object, the run record, what was
  already logged) in a copy of the guider's model options, where every other wrapper finds it, and drops it when the
  run ends, including on interrupt;
- ``PREDICT_NOISE`` (outermost per step): lets the whole guidance chain run, then returns
  ``D_c + M_λ ⊙ (D_final − D_c)`` (paper eq. 12, via the step's :class:`nodes.estimators.Estimate`);
- ``CALC_COND_BATCH``: the first call of a step that holds the positive branch is the main pass; the run's estimator
  evaluates it (nodes/estimators.py). Later passes (PAG/SAG/SLG extras, the unconditional pass of SLG) are never
  differentiated;
- ``APPLY_MODEL``: shifts the gradient-free probe's chunk of the batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import torch
from comfy.patcher_extension import WrappersMP

from ..reg_core import diagnostics, rectify
from ..reg_core.diagnostics import RunRecord, StepRecord
from ..reg_core.rectify import Estimator
from .common import LOGGER_NAME, AddWrapper, REGConfigError
from .estimators import CondPass, Estimate, FactorEstimate, GradientFree, MEstimator, make_estimator
from .traced_pass import known_autograd_failure

log = logging.getLogger(LOGGER_NAME)

WRAPPER_KEY = "reg_guidance"
WRAPPER_KINDS = (WrappersMP.OUTER_SAMPLE, WrappersMP.PREDICT_NOISE, WrappersMP.CALC_COND_BATCH, WrappersMP.APPLY_MODEL)
RUN_KEY = "reg_guidance_run"
CACHE_WRAPPER_KEYS = ("easycache", "lazycache")
GUIDANCE_HOOKS = (
    "sampler_cfg_function",
    "sampler_pre_cfg_function",
    "sampler_post_cfg_function",
    "sampler_calc_cond_batch_function",
)


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
class StepState:
    """The step in progress: whether its main pass was claimed, its pass and its estimate."""

    claimed: bool = False
    cond_pass: CondPass | None = None
    estimate: Estimate | None = None


@dataclass
class REGRun:
    """Per-sampling-run state, created by the OUTER_SAMPLE wrapper (one per run, never shared between runs)."""

    settings: REGSettings
    flow: bool
    sigma_high: float
    sigma_low: float
    estimator: MEstimator
    guider: Any
    record: RunRecord
    step: StepState | None = None
    evaluations: int = 0
    last_m: torch.Tensor | None = None
    said: set[str] = field(default_factory=set)

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
        for i, cond in enumerate(conds):
            if cond is positive:
                return i
        return None

    def in_window(self, sigma: torch.Tensor) -> bool:
        """Whether REG acts at this σ (``start/end_percent`` mapped through the model's ``percent_to_sigma``)."""
        s = float(sigma.max())
        return self.sigma_low <= s <= self.sigma_high

    def fall_back(self, reason: str) -> None:
        """Switch to the gradient-free estimator for the rest of the run, warning once."""
        if self.estimator.kind is not Estimator.GRADIENT_FREE:
            log.warning(
                "REG: exact gradients are unavailable (%s); using the gradient-free estimator for this run.", reason
            )
            self.record.estimator = f"{Estimator.GRADIENT_FREE.value} (fallback: {reason})"
        self.estimator = GradientFree()

    def may_guide(self, model_options: dict) -> bool:
        """Whether anything can make this step's prediction differ from ``D_c`` (cfg ≠ 1 or a guidance hook)."""
        cfg = getattr(self.guider, "cfg", None)
        if not isinstance(cfg, (int, float)) or hasattr(self.guider, "cfg1") or cfg != 1:
            return True
        return any(model_options.get(hook) for hook in GUIDANCE_HOOKS)


def run_of(options: dict | None) -> REGRun | None:
    """The current run's holder, from ``model_options`` or ``transformer_options``."""
    if not options:
        return None
    run = options.get(RUN_KEY)
    if run is None:
        run = options.get("transformer_options", {}).get(RUN_KEY)
    return run


def remove_reg(patcher: Any) -> bool:
    """Remove every REG wrapper from a ModelPatcher; return whether it had any."""
    had = bool(patcher.get_wrappers(WrappersMP.PREDICT_NOISE, WRAPPER_KEY))
    for kind in WRAPPER_KINDS:
        patcher.remove_wrappers_with_key(kind, WRAPPER_KEY)
    return had


class REGPatch:
    """The wrappers one REG node installs. Holds only the settings and the last run's record (for REGDiagnostics);
    everything a run changes lives in that run's :class:`REGRun`."""

    def __init__(self, settings: REGSettings) -> None:
        settings.validate()
        self.settings = settings
        self.last_record: RunRecord | None = None

    def install(self, add_wrapper: AddWrapper) -> None:
        """Register the keyed wrappers with ``add_wrapper(type, key, fn)`` (see :func:`nodes.common.wrapper_adder`)."""
        for kind, fn in zip(
            WRAPPER_KINDS, (self.outer_sample, self.predict_noise, self.calc_cond_batch, self.apply_model), strict=True
        ):
            add_wrapper(kind, WRAPPER_KEY, fn)

    def start_run(self, guider: Any) -> REGRun:
        """Fresh state for a sampling run of ``guider``."""
        sampling = guider.model_patcher.get_model_object("model_sampling")
        flow = isinstance(sampling, comfy.model_sampling.CONST)
        sigma_high = float(sampling.percent_to_sigma(self.settings.start_percent))
        sigma_low = float(sampling.percent_to_sigma(self.settings.end_percent))
        run = REGRun(
            settings=self.settings,
            flow=flow,
            sigma_high=sigma_high,
            sigma_low=sigma_low,
            estimator=make_estimator(self.settings.estimator),
            guider=guider,
            record=RunRecord(sigma_low, sigma_high, flow, self.settings.estimator.value),
        )
        self.last_record = run.record
        wrappers = guider.model_options.get("transformer_options", {}).get("wrappers", {})
        caches = sorted({key for per_type in wrappers.values() for key in per_type if key in CACHE_WRAPPER_KEYS})
        if caches and self.settings.estimator is not Estimator.GRADIENT_FREE:
            run.fall_back(f"{', '.join(caches)} serves cached predictions without a graph")
        return run

    def outer_sample(self, executor, *args, **kwargs):
        guider = executor.class_obj
        original = guider.model_options
        guider.model_options = comfy.model_patcher.create_model_options_clone(original)
        guider.model_options.setdefault("transformer_options", {})[RUN_KEY] = self.start_run(guider)
        try:
            return executor(*args, **kwargs)
        finally:
            guider.model_options = original

    def predict_noise(self, executor, x, timestep, model_options, seed):
        run = run_of(model_options)
        if run is None or self.settings.strength == 0:
            return executor(x, timestep, model_options, seed)
        if model_options.get("context_handler") is not None:
            run.say_once("context", "REG: context windows split each step into windows; REG is skipped for this run.")
            return executor(x, timestep, model_options, seed)
        if not run.in_window(timestep):
            run.record.steps.append(StepRecord(sigma=timestep.detach().clone(), active=False))
            return executor(x, timestep, model_options, seed)
        if not run.may_guide(model_options):
            run.say_once("cfg1", "REG: cfg is 1 and no guidance hook is set: there is no guidance to rectify.")
            run.record.steps.append(StepRecord(sigma=timestep.detach().clone(), active=False))
            return executor(x, timestep, model_options, seed)
        run.step = StepState()
        try:
            d_final = executor(x, timestep, model_options, seed)
            return self._rectify(run, run.step, d_final, timestep)
        finally:
            run.step = None

    def _rectify(self, run: REGRun, step: StepState, d_final: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        estimate = step.estimate
        sigma = sigma.detach().clone()
        if estimate is None:
            run.say_once(
                "no-pass",
                "REG: the positive branch was never evaluated in a step (a custom guider or cond-batch function); "
                "REG is skipped at such steps.",
            )
            run.record.steps.append(StepRecord(sigma=sigma, active=False))
            return d_final
        if torch.equal(d_final, estimate.d_c):
            run.record.steps.append(StepRecord(sigma=sigma, active=False))
            return d_final
        try:
            result = estimate.rectify(d_final, self.settings.strength)
        except torch.OutOfMemoryError:
            comfy.model_management.soft_empty_cache()
            result = self._fall_back_now(run, step, d_final, "not enough memory for the backward pass")
        except (RuntimeError, NotImplementedError) as err:
            reason = known_autograd_failure(err)
            if reason is None:
                kind = run.estimator.kind.value
                raise RuntimeError(f"REGGuidance ({kind}): the backward pass failed: {err}") from err
            result = self._fall_back_now(run, step, d_final, reason)
        delta = d_final - estimate.d_c
        m = step.estimate.factor_map()
        run.record.steps.append(
            StepRecord(
                sigma=sigma,
                active=True,
                stats=diagnostics.step_statistics(m, delta, result - estimate.d_c),
                m_map=None if m is None else diagnostics.downsample_map(m.expand_as(delta)),
            )
        )
        return result

    def _fall_back_now(self, run: REGRun, step: StepState, d_final: torch.Tensor, reason: str) -> torch.Tensor:
        """Fall back in the middle of a step: M from one extra probe pass, since ``D_c`` is already known."""
        run.fall_back(reason)
        step.estimate = run.estimator.separate(step.cond_pass, step.estimate.d_c)
        return step.estimate.rectify(d_final, self.settings.strength)

    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        run = run_of(model_options)
        step = run.step if run is not None else None
        if step is None or step.claimed:
            return executor(model, conds, x_in, timestep, model_options)
        pos = run.positive_index(conds)
        if pos is None or conds[pos] is None:
            return executor(model, conds, x_in, timestep, model_options)
        step.claimed = True
        step.cond_pass = CondPass(
            executor=executor,
            model=model,
            conds=conds,
            positive=pos,
            x=x_in,
            timestep=timestep,
            model_options=model_options,
            factor=rectify.flow_factor(timestep, x_in, run.flow),
            flow=run.flow,
        )
        evaluation = run.evaluations
        run.evaluations += 1
        k = self.settings.refresh_every
        reuse = run.last_m is not None and run.last_m.shape == x_in.shape
        if reuse and not rectify.is_fresh_evaluation(evaluation, k):
            out = executor(model, conds, x_in, timestep, model_options)
            step.estimate = FactorEstimate(out[pos], run.last_m)
            return out
        out, step.estimate = self._evaluate(run, step.cond_pass)
        if k > 1:
            run.last_m = step.estimate.factor_map()
        return out

    def _evaluate(self, run: REGRun, cond_pass: CondPass) -> tuple[list[torch.Tensor], Estimate]:
        """The run's estimator on the main pass, falling back to gradient-free for the failures it can name."""
        try:
            result = run.estimator.evaluate(cond_pass)
            if run.estimator.kind is not Estimator.GRADIENT_FREE:  # a fallback keeps its own record text
                run.record.estimator = run.estimator.label
            return result
        except torch.OutOfMemoryError:
            comfy.model_management.soft_empty_cache()
            reason = "not enough memory for the backward pass"
        except (RuntimeError, NotImplementedError) as err:
            reason = known_autograd_failure(err)
            if reason is None or run.estimator.kind is Estimator.GRADIENT_FREE:
                raise RuntimeError(
                    f"REGGuidance ({run.estimator.kind.value}): the conditional pass failed: {err}"
                ) from err
        run.fall_back(reason)
        return run.estimator.evaluate(cond_pass)

    def apply_model(self, executor, x, t, *args, **kwargs):
        """Shift the gradient-free probe's chunk of the batch (see :class:`nodes.estimators.GradientFree`).

        ``apply_model`` computes ``D`` from the ``x`` it receives, so shifting here gives exactly ``D_c(x + h)``.
        """
        options = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
        run = run_of(options)
        if run is not None and isinstance(run.estimator, GradientFree):
            x = run.estimator.shift(x, options.get("cond_or_uncond", []))
        return executor(x, t, *args, **kwargs)
