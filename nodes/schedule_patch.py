"""The guidance-weight schedule as a PREDICT_NOISE wrapper (reg_core.schedules conventions)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import comfy.model_sampling
from comfy.patcher_extension import WrappersMP

from ..reg_core import schedules
from ..reg_core.schedules import Progress, Schedule
from .common import LOGGER_NAME, AddWrapper, REGConfigError

log = logging.getLogger(LOGGER_NAME)

SCHEDULE_KEY = "reg_schedule"


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


def ve_sigma(sigma: float, flow: bool) -> float:
    """σ in the EDM/VE convention: flow models' σ maps to ``σ/(1−σ)`` (reg-math §9)."""
    if not flow:
        return sigma
    return math.inf if sigma >= 1 else sigma / (1 - sigma)


class SchedulePatch:
    """A PREDICT_NOISE wrapper that sets the guider's cfg to ``1 + w(σ, p)`` for each step, then restores it."""

    def __init__(self, settings: ScheduleSettings) -> None:
        settings.validate()
        self.settings = settings
        self._warned = False

    def install(self, add_wrapper: AddWrapper) -> None:
        add_wrapper(WrappersMP.PREDICT_NOISE, SCHEDULE_KEY, self.predict_noise)

    def cfg_at(self, base_cfg: float, sigma: float, sample_sigmas: list[float], flow: bool) -> float:
        """The scheduled cfg for this step (weights are cond-anchored: ``w = cfg − 1``)."""
        s = self.settings
        sig = ve_sigma(sigma, flow)
        if s.progress is Progress.STEPS:
            progress = schedules.step_progress(sigma, sample_sigmas)
        else:
            progress = schedules.sigma_progress(sigma, max(sample_sigmas))  # the model's own σ (flow starts at 1)
        w = schedules.scheduled_weight(
            s.schedule,
            base_cfg - 1.0,
            sigma=sig,
            progress=progress,
            w_end=s.end_cfg - 1.0,
            sigma_low=s.sigma_low,
            sigma_high=s.sigma_high,
            exponent=s.exponent,
        )
        return 1.0 + w

    def predict_noise(self, executor, x, timestep, model_options, seed):
        guider = executor.class_obj
        base = getattr(guider, "cfg", None)
        # DualCFGGuider inherits CFGGuider's ``cfg`` but guides with its own ``cfg1``/``cfg2``
        if not isinstance(base, (int, float)) or hasattr(guider, "cfg1"):
            if not self._warned:
                log.warning("REG schedule: %s has no single cfg scale; the schedule is ignored.", type(guider).__name__)
                self._warned = True
            return executor(x, timestep, model_options, seed)
        sample_sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        steps = [float(v) for v in sample_sigmas] if sample_sigmas is not None else [float(timestep.max())]
        flow = isinstance(guider.model_patcher.get_model_object("model_sampling"), comfy.model_sampling.CONST)
        guider.cfg = self.cfg_at(float(base), float(timestep.max()), steps, flow)
        try:
            return executor(x, timestep, model_options, seed)
        finally:
            guider.cfg = base
