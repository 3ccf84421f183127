"""REGDiagnostics and the per-step records of REGGuidance / REGGuider, in real ComfyUI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from prompts import custom_advanced, ksampler, sd15_inputs
from test_reg_nodes import REG, SCHEDULE, _patched, _sample, load_family, reference_one_step, run_ksampler


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
    """With strength λ the applied factor is 1 + λ(M − 1): the ratio is ‖(1 + λ(M−1))⊙Δ‖/‖Δ‖, computed here from
    an independent M and Δ = D_cfg − D_c (one Euler step to σ = 0 returns the denoised prediction itself)."""
    _, m = reference_one_step(tiny, "sd15", 4.0)
    d_cfg = run_ksampler(harness, tiny, steps=1, cfg=4.0)
    d_c = run_ksampler(harness, tiny, steps=1, cfg=1.0)
    delta = (d_cfg - d_c).double()
    for strength in (0.5, 1.0):
        _, _, record = diagnosed_run(harness, tiny, reg={"strength": strength})
        factor = 1 + strength * (m.detach().double() - 1)
        want = float((factor * delta).norm() / delta.norm())
        assert record["steps"][0]["norm_ratio"][0] == pytest.approx(want, rel=1e-4), strength
        assert abs(want - 1) > 1e-2  # REG really changed the size of the guidance


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
    record = patch.record_for(result.latent(sampler))
    assert len(record.steps) == 3
    for step in record.steps:
        assert tuple(step.m_map.shape) == (1, 4, 24, 32)  # pooled by 2 so that the long side is ≤ 48

    model, positive, negative, _ = load_family(tiny, "sd15")
    direct = _patched(model)
    patch = direct.get_wrappers("outer_sample", "reg_guidance")[0].__self__
    first = patch.record_for(_sample(direct, positive, negative, steps=3, seed=1))
    second = patch.record_for(_sample(direct, positive, negative, steps=3, seed=2))
    assert second is not first and len(first.steps) == len(second.steps) == 3  # one record per run, not accumulated
    for seed in range(3, 12):
        _sample(direct, positive, negative, steps=1, seed=seed)
    kept = reg_pack.submodule("nodes.reg_runtime").KEPT_RECORDS
    assert len(patch.records) == kept and first not in patch.records.values()  # the oldest runs are dropped


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


def test_a_run_where_reg_did_not_act_gives_a_picture_and_a_note(harness, tiny):
    """At cfg 1 there is no negative prediction, so REG acts nowhere: the prompt still succeeds and says so."""
    result, diag, record = diagnosed_run(harness, tiny, steps=2, cfg=1.0)
    assert [s["active"] for s in record["steps"]] == [False, False]
    note = "REG did not act in this run (2 model evaluations): cfg is 1 and no guidance hook is set"
    assert record["maps_shown"] == [] and record["note"].startswith(note)
    stats, maps = result.image(diag, 0), result.image(diag, 1)
    assert torch.equal(stats, maps) and stats.shape[0] == 1 and stats.shape[-1] == 3
    dark = (stats[0] < 0.5).all(-1)
    assert 0.002 < float(dark.float().mean()) < 0.2  # text on a white picture, not a blank image


def _wan_run(reg_pack, estimator="gradient-free"):
    """A REGGuidance-patched tiny Wan 2.1 sampled for 2 steps on a 2-frame 5-D latent; returns (patched, samples)."""
    import comfy.sample
    import tiny_models

    model, _ = tiny_models.load_modern("wan")
    positive, negative = (tiny_models.modern_conditioning("wan", seed) for seed in (1, 2))
    node = reg_pack.submodule("nodes.guidance").REGGuidance
    patched = node.execute(model, 1.0, estimator, 0.0, 1.0, 1).result[0]
    latent = torch.zeros(tiny_models.MODERN_FAMILIES["wan"].latent)
    noise = comfy.sample.prepare_noise(latent, 3)
    samples = comfy.sample.sample(patched, noise, 2, 4.0, "euler", "simple", positive, negative, latent, seed=3)
    return patched, samples


def test_video_latents_are_diagnosed_with_maps_averaged_over_frames(reg_pack):
    patched, samples = _wan_run(reg_pack)
    assert samples.ndim == 5 and samples.shape[2] == 2
    node = reg_pack.submodule("nodes.diagnostics").REGDiagnostics
    stats, maps, text = node.execute({"samples": samples}, "auto", 0, model=patched).result
    record = json.loads(text)
    assert [s["active"] for s in record["steps"]] == [True, True] and record["maps_shown"] == [0, 1]
    assert all(math.isfinite(s["mean"][0]) and s["p05"][0] <= s["p50"][0] <= s["p95"][0] for s in record["steps"])
    patch = patched.get_wrappers("outer_sample", "reg_guidance")[0].__self__
    assert tuple(patch.record_for(samples).steps[0].m_map.shape) == (1, 16, 8, 8)  # [B, C, H, W]: frames averaged
    assert stats.shape[0] == maps.shape[0] == 1 and maps.shape[2] > 2 * 192  # two square heatmaps side by side


def test_nested_latents_are_refused_naming_the_input(reg_pack):
    diagnostics = reg_pack.submodule("nodes.diagnostics")
    common = reg_pack.submodule("nodes.common")
    nested = [torch.nested.nested_tensor([torch.zeros(16, 2, 8, 8), torch.zeros(16, 3, 8, 8)])]
    try:
        import comfy.nested_tensor  # ComfyUI ≥ 0.4: LTX-2's audio + video latents

        nested.append(comfy.nested_tensor.NestedTensor([torch.zeros(1, 16, 2, 8, 8), torch.zeros(1, 8, 5)]))
    except ImportError:
        pass
    for samples in nested:
        with pytest.raises(common.REGConfigError, match=r"REGDiagnostics: latent: nested latents .* not supported"):
            diagnostics.REGDiagnostics.execute({"samples": samples}, "auto", 0)


def test_after_a_strength_zero_run_diagnostics_say_why(harness, tiny):
    """Template 5 compares strength 0 with 1: the strength-0 run has a record saying REG was off, not an error."""
    _, _, record = diagnosed_run(harness, tiny, steps=2, reg={"strength": 0.0})
    assert [s["active"] for s in record["steps"]] == [False, False]
    assert record["not_acting"] == {"strength is 0": 2} and "strength is 0 (2)" in record["note"]


def test_each_sampler_sharing_a_patched_model_gets_its_own_run(harness, tiny):
    """Two KSamplers use one REGGuidance output: each REGDiagnostics shows the run that produced its latent, and a
    latent that no run of this model produced is refused by name."""
    from comfy_harness import PromptExecutionError

    g = harness.graph()
    inp = sd15_inputs(g, tiny)
    patched = g.node("REGGuidance", model=inp.model, **REG)
    first = ksampler(g, inp, model=patched.out(0), steps=2, cfg=4.0, seed=1)
    second = ksampler(g, inp, model=patched.out(0), steps=3, cfg=4.0, seed=2)
    diags = [
        g.node("REGDiagnostics", latent=s.out(0), model=patched.out(0), steps="auto", sample=0) for s in (first, second)
    ]
    result = harness.run(g)
    counts = [len(json.loads(result.value(d, 2))["steps"]) for d in diags]
    assert counts == [2, 3]

    g = harness.graph()
    inp = sd15_inputs(g, tiny)
    patched = g.node("REGGuidance", model=inp.model, **REG)
    ksampler(g, inp, model=patched.out(0), steps=1, cfg=4.0)
    g.node("REGDiagnostics", latent=inp.latent, model=patched.out(0), steps="auto", sample=0)
    with pytest.raises(PromptExecutionError, match="does not come from a sampling run with this REG model"):
        harness.run(g)
