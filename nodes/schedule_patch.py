"""The guidance-weight schedule as keyed sampler wrappers (reg_core.schedules conventions)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy.model_patcher
from comfy.patcher_extension import WrappersMP

from ..reg_core import rectify, schedules
from ..reg_core.rectify import Space
from ..reg_core.schedules import Progress, Schedule
from .common import LOGGER_NAME, AddWrapper, REGConfigError, model_space
from .composition import Composition, without_cond_anchored

log = logging.getLogger(LOGGER_NAME)

SCHEDULE_KEY = "reg_schedule"
RUN_KEY = "reg_schedule_run"


@dataclass(frozen=True)
class ScheduleSettings:
    """A guidance-weight schedule applied to the sampler's cfg (reg_core.schedules conventions)."""

    schedule: Schedule = Schedule.CONSTANT
    progress: Progress = Progress.STEPS
    end_cfg: float = 1.0
    sigma_low: float = 0.28
    sigma_high: float = 2.90
    exponent: float = 1.0

    def validate(self) -> None:
        if self.sigma_low > self.sigma_high:
            raise REGConfigError(f"sigma_low ({self.sigma_low}) is above sigma_high ({self.sigma_high}); swap them.")
        if self.exponent <= 0:
            raise REGConfigError(f"exponent must be positive, got {self.exponent}.")


@dataclass
class ScheduleRun:
    """Per-sampling-run state of a :class:`SchedulePatch`, made by its OUTER_SAMPLE wrapper and kept in the run's
    ``model_options["transformer_options"]`` (a nested run gets its own)."""

    warned: bool = False


class SchedulePatch:
    """Wrappers that set the guider's cfg to the scheduled value for each step, then restore it.

    CFG's cfg is uncond-anchored, so the weight is ``w = cfg − 1`` and the step's cfg ``1 + w(σ, p)``; under APG
    (ComfyUI's node or this pack's) the cfg is APG's cond-anchored scale, the weight itself, and the step's cfg is
    ``w(σ, p)``. The interval window is in EDM σ (:meth:`reg_core.rectify.Space.ve_sigma`).
    """

    def __init__(self, settings: ScheduleSettings) -> None:
        settings.validate()
        self.settings = settings

    def install(self, add_wrapper: AddWrapper) -> None:
        add_wrapper(WrappersMP.OUTER_SAMPLE, SCHEDULE_KEY, self.outer_sample)
        add_wrapper(WrappersMP.PREDICT_NOISE, SCHEDULE_KEY, self.predict_noise)

    def cfg_at(
        self, base_cfg: float, sigma: float, sample_sigmas: list[float], space: Space, *, cond_anchored: bool = False
    ) -> float:
        """The scheduled cfg for this step; ``cond_anchored``: the cfg is APG's scale (``w = cfg``, not ``cfg − 1``)."""
        s = self.settings
        offset = 0.0 if cond_anchored else 1.0
        sig = space.ve_sigma(sigma)
        if s.progress is Progress.STEPS:
            progress = schedules.step_progress(sigma, sample_sigmas)
        else:
            progress = schedules.sigma_progress(sigma, max(sample_sigmas))  # the model's own σ (flow starts at 1)
        w = schedules.scheduled_weight(
            s.schedule,
            base_cfg - offset,
            sigma=sig,
            progress=progress,
            w_end=s.end_cfg - offset,
            sigma_low=s.sigma_low,
            sigma_high=s.sigma_high,
            exponent=s.exponent,
        )
        return offset + w

    def outer_sample(self, executor, *args, **kwargs):
        guider = executor.class_obj
        original = guider.model_options
        guider.model_options = comfy.model_patcher.create_model_options_clone(original)
        guider.model_options.setdefault("transformer_options", {})[RUN_KEY] = ScheduleRun()
        try:
            return executor(*args, **kwargs)
        finally:
            guider.model_options = original

    def predict_noise(self, executor, x, timestep, model_options, seed):
        guider = executor.class_obj
        base = getattr(guider, "cfg", None)
        # DualCFGGuider inherits CFGGuider's ``cfg`` but guides with its own ``cfg1``/``cfg2``
        if not isinstance(base, (int, float)) or hasattr(guider, "cfg1"):
            run = model_options.get("transformer_options", {}).get(RUN_KEY) or ScheduleRun()
            if not run.warned:
                log.warning("REG schedule: %s has no single cfg scale; the schedule is ignored.", type(guider).__name__)
                run.warned = True
            return executor(x, timestep, model_options, seed)
        sample_sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        steps = [float(v) for v in sample_sigmas] if sample_sigmas is not None else [float(timestep.max())]
        space = model_space(guider.model_patcher.get_model_object("model_sampling")) or rectify.VE
        apg = Composition.of(model_options).cond_anchored
        try:
            guider.cfg = self.cfg_at(float(base), float(timestep.max()), steps, space, cond_anchored=apg)
            if apg and guider.cfg == 0:  # no guidance: the positive prediction alone (APG would divide by its scale)
                model_options, guider.cfg = without_cond_anchored(model_options), 1.0
            elif apg:  # APG at scale 1 still needs the negative pass ComfyUI skips at cfg 1
                model_options = {**model_options, "disable_cfg1_optimization": True}
            return executor(x, timestep, model_options, seed)
        finally:
            guider.cfg = base


def remove_schedule(patcher) -> bool:
    """Remove every schedule wrapper from a ModelPatcher; return whether it had one."""
    had = bool(patcher.get_wrappers(WrappersMP.PREDICT_NOISE, SCHEDULE_KEY))
    for kind in (WrappersMP.OUTER_SAMPLE, WrappersMP.PREDICT_NOISE):
        patcher.remove_wrappers_with_key(kind, SCHEDULE_KEY)
    return had
