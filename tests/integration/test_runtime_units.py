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
    passes = reg_pack.submodule("nodes.passes")
    assert passes.fd_relative_step(_Model(torch.float32)) == 1e-3
    assert passes.fd_relative_step(_Model(torch.float16)) == pytest.approx(0.03125)
    assert passes.fd_relative_step(_Model(torch.bfloat16)) == pytest.approx(0.0884, abs=1e-3)
    assert passes.fd_relative_step(_Model(torch.float8_e4m3fn, torch.bfloat16)) == pytest.approx(0.0884, abs=1e-3)
    assert passes.fd_relative_step(_Model(torch.float8_e4m3fn)) == pytest.approx(0.0884, abs=1e-3)


def test_sigma_progress_on_flow_models_uses_the_models_own_sigma(reg_pack):
    schedules = reg_pack.submodule("reg_core.schedules")
    schedule_patch = reg_pack.submodule("nodes.schedule_patch")
    settings = schedule_patch.ScheduleSettings(
        schedule=schedules.Schedule.LINEAR, progress=schedules.Progress.SIGMA, end_cfg=1.0
    )
    patch = schedule_patch.SchedulePatch(settings)
    sigmas = [1.0, 0.9, 0.7, 0.5, 0.3, 0.1, 0.0]
    flow = reg_pack.submodule("reg_core.rectify").FLOW
    cfgs = [patch.cfg_at(5.0, s, sigmas, flow) for s in sigmas[:-1]]
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


def guider_run(harness, tiny, *, cfg, base, steps=1, **overrides):
    """The latent of SamplerCustomAdvanced with a REGGuider (neutral APG settings unless overridden)."""
    g = harness.graph()
    inp = sd15_inputs(g, tiny)
    inputs = {
        "cfg": cfg,
        "base": base,
        "eta": 1.0,
        "norm_threshold": 0.0,
        "momentum": 0.0,
        "pag_scale": 3.0,
        **REG,
        **SCHEDULE,
        "progress": "steps",
        **overrides,
    }
    guider = g.node("REGGuider", model=inp.model, positive=inp.positive, negative=inp.negative, **inputs)
    sampler = custom_advanced(g, inp, guider=guider.out(0), steps=steps)
    return harness.run(g).latent(sampler)


def test_apg_at_scale_zero_is_the_conditional_prediction(harness, tiny):
    """APG's cfg is cond-anchored: scale 0 is D_c alone, which CFG gives at cfg 1 (no NaN from dividing by 0)."""
    apg = guider_run(harness, tiny, cfg=0.0, base="apg", eta=0.5, norm_threshold=2.0)
    cond_only = guider_run(harness, tiny, cfg=1.0, base="cfg")
    assert torch.isfinite(apg).all()
    assert torch.allclose(apg, cond_only, atol=1e-5)


@pytest.mark.parametrize(("schedule", "apg_end", "cfg_end"), [("cosine", 1.0, 1.0), ("linear", 1.0, 2.0)])
def test_scheduled_apg_follows_the_same_weights_as_scheduled_cfg(harness, tiny, schedule, apg_end, cfg_end):
    """Neutral APG at scale s is CFG at s + 1 (w = s), so a schedule must give both the same weights w(σ, p).

    The cosine ramp starts from no guidance; the linear one ends at APG scale 1 exactly, where ComfyUI would skip
    the negative pass at cfg 1.
    """
    sched = {"schedule": schedule, "progress": "steps"}
    apg = guider_run(harness, tiny, cfg=3.0, base="apg", steps=4, **sched, end_cfg=apg_end)
    cfg = guider_run(harness, tiny, cfg=4.0, base="cfg", steps=4, **sched, end_cfg=cfg_end)
    assert torch.allclose(apg, cfg, atol=1e-4), float((apg - cfg).abs().max())
    unscheduled = guider_run(harness, tiny, cfg=4.0, base="cfg", steps=4)  # the equality above holds unscheduled too
    assert not torch.allclose(cfg, unscheduled, atol=1e-3)


def test_schedule_warns_once_per_run_under_a_guider_without_one_cfg(harness, tiny, caplog):
    """DualCFGGuider has two scales: the schedule says it is ignored once in each run, also when ComfyUI's cache
    serves the same scheduled model (the same patch) to the second run."""
    import logging

    def graph(seed):
        g = harness.graph()
        inp = sd15_inputs(g, tiny)
        schedule = {**SCHEDULE, "schedule": "cosine", "progress": "steps"}
        scheduled = g.node("REGGuidanceSchedule", model=inp.model, **schedule)
        guider = g.node(
            "DualCFGGuider",
            model=scheduled.out(0),
            cond1=inp.positive,
            cond2=inp.negative,
            negative=inp.negative,
            cfg_conds=3.0,
            cfg_cond2_negative=2.0,
            style="regular",
        )
        return g, scheduled, custom_advanced(g, inp, guider=guider.out(0), steps=3, seed=seed)

    with caplog.at_level(logging.WARNING, logger="reg_guidance"):
        first, scheduled, _ = graph(1)
        harness.run(first, cached=True)
        second, _, sampler = graph(2)
        result = harness.run(second, cached=True)
    assert scheduled.id in result.cached and sampler.id in result.executed  # one patch, two runs
    warnings = [r for r in caplog.records if "has no single cfg scale" in r.getMessage()]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]


@pytest.mark.parametrize(("schedule", "apg_end", "cfg_end"), [("cosine", 1.0, 1.0), ("linear", 1.0, 2.0)])
def test_comfyuis_apg_node_is_scheduled_as_apg(harness, tiny, schedule, apg_end, cfg_end):
    """ComfyUI's own APG node has the same cond-anchored scale as REG Guider's APG: under REGGuidanceSchedule, neutral
    APG at s follows the weights of CFG at s + 1, including the steps where the scheduled scale is exactly 1 (where
    ComfyUI would otherwise drop the negative pass and APG would work against a zero prediction)."""
    from test_reg_nodes import run_ksampler

    sched = ("REGGuidanceSchedule", {**SCHEDULE, "schedule": schedule, "progress": "steps"})
    neutral_apg = ("APG", {"eta": 1.0, "norm_threshold": 0.0, "momentum": 0.0})
    apg = run_ksampler(harness, tiny, patches=[neutral_apg, (sched[0], {**sched[1], "end_cfg": apg_end})], steps=4,
                       cfg=3.0)  # fmt: skip
    cfg = run_ksampler(harness, tiny, patches=[(sched[0], {**sched[1], "end_cfg": cfg_end})], steps=4, cfg=4.0)
    assert torch.allclose(apg, cfg, atol=1e-4), float((apg - cfg).abs().max())
    unscheduled = run_ksampler(harness, tiny, steps=4, cfg=4.0)  # the equality above holds unscheduled too
    assert not torch.allclose(cfg, unscheduled, atol=1e-3)


def test_reg_guider_pag_on_a_dit_is_a_clear_error(harness, tiny):
    from comfy_harness import PromptExecutionError
    from prompts import sd3_inputs

    g = harness.graph()
    inp = sd3_inputs(g, tiny)
    inputs = {"cfg": 4.0, "base": "pag", "eta": 1.0, "norm_threshold": 0.0, "momentum": 0.0, "pag_scale": 3.0}
    guider = g.node("REGGuider", model=inp.model, positive=inp.positive, negative=inp.negative, **inputs, **REG,
                    **{**SCHEDULE, "progress": "steps"})  # fmt: skip
    custom_advanced(g, inp, guider=guider.out(0), steps=1)
    with pytest.raises(PromptExecutionError, match="middle block, which this model \\(SD3\\) does not have"):
        harness.run(g)


def test_the_differentiated_pass_runs_on_one_device(reg_pack):
    """ComfyUI 0.33's multi-GPU work units run chunks in pool threads, where autograd's thread-local state does not
    hold: the traced pass's options leave them out (the other passes keep them)."""
    traced = reg_pack.submodule("nodes.estimators.traced")
    options = {"multigpu_clones": {"cuda:1": object()}, "transformer_options": {"patches": {}}, "other": 1}
    got = traced.traced_options(options)
    assert "multigpu_clones" not in got and got["other"] == 1 and "multigpu_clones" in options
    assert got["transformer_options"]["patches"]["input_block_patch_after_skip"][-1] is traced._copy_after_skip


def test_one_line_per_run_says_what_reg_did(tiny, reg_pack, caplog):
    """Like EasyCache's summary: one line when a run ends — how many evaluations REG rectified with which estimator,
    the mean M, what it rectified, and why it did not act elsewhere."""
    import logging
    import re

    from test_reg_nodes import _patched, _sample, load_family

    model, positive, negative, _ = load_family(tiny, "sd15")
    with caplog.at_level(logging.INFO, logger="reg_guidance"):
        _sample(_patched(model, start_percent=0.3), positive, negative, steps=4, cfg=5.0)
    lines = [r.getMessage() for r in caplog.records if r.name == "reg_guidance" and "rectified" in r.getMessage()]
    assert len(lines) == 1, lines
    want = r"REG: rectified 3/4 evaluations with vjp, mean M -?\d+\.\d\d \(cfg 5\); not at 1: outside the window"
    assert re.fullmatch(want, lines[0]), lines[0]


@pytest.mark.parametrize(
    ("sampler", "cfg", "schedule", "expected"),
    [("euler_cfg_pp", 1.0, "constant", 0), ("euler", 4.0, "interval", 0), ("euler", 4.0, "constant", 2)],
    ids=["cfg++ at cfg 1", "interval outside its window", "guided (positive control)"],
)
def test_no_backward_is_thrown_away(harness, tiny, reg_pack, monkeypatch, sampler, cfg, schedule, expected):
    """The decision waits until the step's cfg is known: a cfg++ sampler keeps the negative pass at cfg 1 (its post-cfg
    function is bookkeeping, not guidance), and REG Guider's interval sets cfg 1 outside its window."""
    rectify = reg_pack.submodule("reg_core.rectify")
    backwards = []
    column_sums = rectify.column_sums
    monkeypatch.setattr(rectify, "column_sums", lambda *a: backwards.append(1) or column_sums(*a))
    g = harness.graph()
    inp = sd15_inputs(g, tiny)
    interval = {"sigma_low": 100.0, "sigma_high": 200.0}  # no step of the tiny SD1.5 lies there
    inputs = {"cfg": cfg, "base": "cfg", "eta": 1.0, "norm_threshold": 0.0, "momentum": 0.0, "pag_scale": 3.0}
    guider = g.node("REGGuider", model=inp.model, positive=inp.positive, negative=inp.negative, **inputs, **REG,
                    **{**SCHEDULE, **interval, "schedule": schedule, "progress": "steps"})  # fmt: skip
    custom_advanced(g, inp, guider=guider.out(0), steps=2, sampler_name=sampler)
    harness.run(g)
    assert len(backwards) == expected
