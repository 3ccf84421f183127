"""REGDiagnostics and the per-step records of REGGuidance / REGGuider, in real ComfyUI."""

from __future__ import annotations

import json

import pytest
import torch
from prompts import custom_advanced, ksampler, sd15_inputs
from test_reg_nodes import REG, SCHEDULE, _patched, _sample, load_family, reference_one_step


def diagnosed_run(harness, tiny, *, steps=1, cfg=4.0, batch_size=1, width=32, diag_steps="auto", reg=None):
    g = harness.graph()
    inp = sd15_inputs(g, tiny, batch_size=batch_size, width=width, height=width)
    patched = g.node("REGGuidance", model=inp.model, **{**REG, **(reg or {})})
    sampler = ksampler(g, inp, model=patched.out(0), steps=steps, cfg=cfg)
    diag = g.node("REGDiagnostics", latent=sampler.out(0), model=patched.out(0), steps=diag_steps, sample=0)
    result = harness.run(g)
    return result, diag, json.loads(result.value(diag, 2))


def m_stats(m):
    flat = m.flatten(1).double()
    q = torch.quantile(flat, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64), dim=1)
    return {
        "mean": flat.mean(1),
        "p05": q[0],
        "p50": q[1],
        "p95": q[2],
        "frac_neg": (flat < -1e-3).double().mean(1),
        "frac_gt1": (flat > 1 + 1e-3).double().mean(1),
    }


@pytest.mark.parametrize("batch_size", [1, 2])
def test_recorded_statistics_match_independent_m(harness, tiny, batch_size):
    result, diag, record = diagnosed_run(harness, tiny, batch_size=batch_size)
    _, m = reference_one_step(tiny, "sd15", 4.0, batch_size=batch_size)
    want = m_stats(m.detach())
    (step,) = record["steps"]
    assert step["active"] and len(step["sigma"]) == batch_size
    for name, values in want.items():
        assert torch.allclose(torch.tensor(step[name], dtype=torch.float64), values, atol=2e-4), name
    if batch_size == 2:
        assert step["mean"][0] != step["mean"][1]  # per sample, not pooled
    stats, maps = result.image(diag, 0), result.image(diag, 1)
    assert stats.shape[0] == 1 and stats.shape[-1] == 3 and stats.shape[1] > 400
    assert maps.shape[0] == 1 and maps.shape[-1] == 3
    assert float(stats.min()) >= 0 and float(stats.max()) <= 1


def test_norm_ratio_is_kept_guidance(harness, tiny, reg_pack):
    """With strength 0.5 the applied factor is 1 + 0.5(M − 1): the ratio is ‖(1 + 0.5(M−1))⊙Δ‖/‖Δ‖, not 1."""
    _, _, half = diagnosed_run(harness, tiny, reg={"strength": 0.5})
    _, _, full = diagnosed_run(harness, tiny)
    r_half, r_full = half["steps"][0]["norm_ratio"][0], full["steps"][0]["norm_ratio"][0]
    assert half["steps"][0]["mean"] == pytest.approx(full["steps"][0]["mean"], rel=1e-5)  # M itself is unchanged
    assert r_half != pytest.approx(r_full, rel=1e-3)
    assert 0 < r_half and 0 < r_full


def test_window_marks_inactive_steps_and_maps_exist_only_when_active(harness, tiny):
    _, _, record = diagnosed_run(harness, tiny, steps=4, reg={"start_percent": 0.5})
    active = [s["active"] for s in record["steps"]]
    assert active[0] is False and active[-1] is True  # high noise first: outside the second half of the range
    assert all(("mean" in s) == s["active"] for s in record["steps"])
    assert record["maps_shown"] and all(active[i] for i in record["maps_shown"])


def test_records_are_bounded_and_replaced_every_run(harness, tiny, reg_pack):
    g = harness.graph()
    inp = sd15_inputs(g, tiny, width=512, height=384)  # a 48×64 latent
    patched = g.node("REGGuidance", model=inp.model, **REG)
    sampler = ksampler(g, inp, model=patched.out(0), steps=3)
    result = harness.run(g, outputs=[sampler, patched])
    patch = result.value(patched, 0).get_wrappers("outer_sample", "reg_guidance")[0].__self__
    assert len(patch.last_record.steps) == 3
    for step in patch.last_record.steps:
        assert tuple(step.m_map.shape) == (1, 4, 24, 32)  # pooled by 2 so that the long side is ≤ 48

    model, positive, negative, _ = load_family(tiny, "sd15")
    direct = _patched(model)
    patch = direct.get_wrappers("outer_sample", "reg_guidance")[0].__self__
    _sample(direct, positive, negative, steps=3)
    first = patch.last_record
    _sample(direct, positive, negative, steps=3)
    assert patch.last_record is not first and len(patch.last_record.steps) == 3  # replaced, not accumulated


def test_guider_records_too(harness, tiny):
    g = harness.graph()
    inp = sd15_inputs(g, tiny)
    inputs = {
        "cfg": 4.0,
        "base": "cfg",
        "eta": 1.0,
        "norm_threshold": 5.0,
        "momentum": 0.0,
        "pag_scale": 3.0,
        **REG,
        **SCHEDULE,
        "progress": "steps",
    }
    guider = g.node("REGGuider", model=inp.model, positive=inp.positive, negative=inp.negative, **inputs)
    sampler = custom_advanced(g, inp, guider=guider.out(0), steps=2)
    diag = g.node("REGDiagnostics", latent=sampler.out(0), guider=guider.out(0), steps="0, -1", sample=0)
    record = json.loads(harness.run(g).value(diag, 2))
    assert len(record["steps"]) == 2 and all(s["active"] for s in record["steps"])
    assert record["maps_shown"] == [0, 1]


def test_clear_errors(harness, tiny):
    from comfy_harness import PromptExecutionError

    g = harness.graph()
    inp = sd15_inputs(g, tiny)
    sampler = ksampler(g, inp, steps=1)
    g.node("REGDiagnostics", latent=sampler.out(0), model=inp.model, steps="auto", sample=0)
    with pytest.raises(PromptExecutionError, match="not patched by REGGuidance"):
        harness.run(g)
    with pytest.raises(PromptExecutionError, match="steps: 'x' is not an integer"):
        diagnosed_run(harness, tiny, diag_steps="0, x")
    with pytest.raises(PromptExecutionError, match="did not act"):
        diagnosed_run(harness, tiny, cfg=1.0)
