"""Small behaviours of the REG runtime that need ComfyUI's modules but no sampling."""

from __future__ import annotations

import pytest
import torch
from prompts import custom_advanced, sd15_inputs
from test_reg_nodes import REG, SCHEDULE


class _Model:
    """Just the two attributes fd_relative_step reads from a ComfyUI BaseModel."""

    def __init__(self, weights: torch.dtype, manual_cast: torch.dtype | None = None) -> None:
        self.manual_cast_dtype = manual_cast
        self._weights = weights

    def get_dtype(self) -> torch.dtype:
        return self._weights


def test_finite_difference_step_follows_the_compute_dtype(reg_pack):
    runtime = reg_pack.submodule("nodes.reg_runtime")
    assert runtime.fd_relative_step(_Model(torch.float32)) == 1e-3
    assert runtime.fd_relative_step(_Model(torch.float16)) == pytest.approx(0.03125)
    assert runtime.fd_relative_step(_Model(torch.bfloat16)) == pytest.approx(0.0884, abs=1e-3)
    assert runtime.fd_relative_step(_Model(torch.float8_e4m3fn, torch.bfloat16)) == pytest.approx(0.0884, abs=1e-3)
    assert runtime.fd_relative_step(_Model(torch.float8_e4m3fn)) == pytest.approx(0.0884, abs=1e-3)


def test_sigma_progress_on_flow_models_uses_the_models_own_sigma(reg_pack):
    schedules = reg_pack.submodule("reg_core.schedules")
    schedule_patch = reg_pack.submodule("nodes.schedule_patch")
    settings = schedule_patch.ScheduleSettings(
        schedule=schedules.Schedule.LINEAR, progress=schedules.Progress.SIGMA, end_cfg=1.0
    )
    patch = schedule_patch.SchedulePatch(settings)
    sigmas = [1.0, 0.9, 0.7, 0.5, 0.3, 0.1, 0.0]
    cfgs = [patch.cfg_at(5.0, s, sigmas, flow=True) for s in sigmas[:-1]]
    assert cfgs[0] == 5.0
    assert cfgs == sorted(cfgs, reverse=True) and len(set(cfgs)) == len(cfgs)  # a ramp, not a jump after step 1
    assert cfgs[-1] == pytest.approx(5.0 - 4.0 * 0.9)


def test_guider_schedule_on_a_scheduled_model_is_a_clear_error(harness, tiny):
    from comfy_harness import PromptExecutionError

    g = harness.graph()
    inp = sd15_inputs(g, tiny)
    scheduled = g.node(
        "REGGuidanceSchedule", model=inp.model, **{**SCHEDULE, "schedule": "cosine", "progress": "steps"}
    )
    guider = g.node(
        "REGGuider",
        model=scheduled.out(0),
        positive=inp.positive,
        negative=inp.negative,
        cfg=5.0,
        base="cfg",
        eta=1.0,
        norm_threshold=5.0,
        momentum=0.0,
        pag_scale=3.0,
        **REG,
        **{**SCHEDULE, "schedule": "linear", "progress": "steps"},
    )
    custom_advanced(g, inp, guider=guider.out(0), steps=1)
    with pytest.raises(PromptExecutionError, match="scheduled twice"):
        harness.run(g)
