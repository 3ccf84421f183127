"""REGGuidance, REGGuider and REGGuidanceSchedule inside real ComfyUI with tiny random-weight models."""

from __future__ import annotations

import functools
import logging

import pytest
import torch
from prompts import NEGATIVE, POSITIVE, custom_advanced, ksampler, sd3_inputs, sd15_inputs

REG = {"strength": 1.0, "estimator": "vjp", "start_percent": 0.0, "end_percent": 1.0, "refresh_every": 1}
SCHEDULE = {"schedule": "constant", "end_cfg": 1.0, "sigma_low": 0.28, "sigma_high": 2.9, "exponent": 1.0}


def run_ksampler(harness, tiny, *, family="sd15", patches=(), batch_size=1, **sampler):
    """KSampler latent of a workflow whose model goes through ``patches`` ((node, inputs), …) in order."""
    g = harness.graph()
    inp = (sd15_inputs if family == "sd15" else sd3_inputs)(g, tiny, batch_size=batch_size)
    model = inp.model
    for class_type, inputs in patches:
        model = g.node(class_type, model=model, **inputs).out(0)
    node = ksampler(g, inp, model=model, **sampler)
    return harness.run(g).latent(node)


def reg_patch(**overrides):
    return ("REGGuidance", {**REG, **overrides})


# --- an independent one-step reference, computed from ComfyUI's own sampling function without REG's code ---


@functools.cache
def load_family(tiny, family):
    import comfy.sd
    import folder_paths

    import nodes

    if family == "sd15":
        model, clip, _ = nodes.CheckpointLoaderSimple().load_checkpoint(tiny.sd15_checkpoint)[:3]
        channels = 4
    else:
        model = nodes.UNETLoader().load_unet(tiny.sd3_unet, "default")[0]
        clip = comfy.sd.load_clip(
            ckpt_paths=[folder_paths.get_full_path_or_raise("text_encoders", tiny.clip_l)],
            clip_type=comfy.sd.CLIPType.SD3,
        )
        channels = 16

    def encode(text):
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))

    return model, encode(POSITIVE), encode(NEGATIVE), channels


# Flow models start at σ = 1 where a(σ) = 1 − σ = 0 makes M vanish: start them lower so the Jacobian matters.
# With one step KSampler keeps the last two σs of int(1/denoise) steps; "simple" puts that step at σ ≈ 0.75.
ONE_STEP = {"sd15": {"denoise": 1.0, "scheduler": "normal"}, "sd3": {"denoise": 0.5, "scheduler": "simple"}}


def reference_one_step(tiny, family, cfg, seed=42, batch_size=1, chain=False, sampling_patch=None, fd=False):
    """``D_c + a(σ)·∇_xΣD_c ⊙ (D_cfg − D_c)`` for one Euler step to σ = 0 (whose result is the denoised itself).

    With ``chain`` the full chain rule instead: ``D_c + a(σ)·J_{D_c}ᵀ(D_cfg − D_c)``. With ``fd`` the gradient-free
    estimator: ``∇_xΣD_c`` replaced by the forward difference ``(D_c(x + h) − D_c(x)) / h``, ``h = 1e-3`` times the
    state's scale (√(1+σ²), or √((1−σ)²+σ²) for flow). ``sampling_patch`` is a ComfyUI model-sampling node
    ``(class_type, inputs)`` applied first (e.g. v-prediction).
    """
    import nodes

    model, positive, negative, channels = load_family(tiny, family)
    if sampling_patch is not None:
        class_type, inputs = sampling_patch
        model = nodes.NODE_CLASS_MAPPINGS[class_type]().patch(model, **inputs)[0]
    latent = torch.zeros(batch_size, channels, 4, 4)
    setup = ONE_STEP[family]
    return reference_step(model, positive, negative, latent, setup, cfg, seed=seed, chain=chain, fd=fd)


def reference_step(model, positive, negative, latent, setup, cfg, *, seed=42, chain=False, fd=False):
    """The reference of :func:`reference_one_step` for a given model, conds and latent; returns ``(latent, M)``.

    ``setup`` holds KSampler's ``scheduler`` and ``denoise``; the step runs from the last σ of that schedule to 0.
    """
    import comfy.model_sampling
    import comfy.sample
    import comfy.samplers

    sampling = model.get_model_object("model_sampling")
    flow = isinstance(sampling, comfy.model_sampling.CONST)
    sigmas = comfy.samplers.calculate_sigmas(sampling, setup["scheduler"], int(1 / setup["denoise"]))[-2:]
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    seen = {}

    def one_step(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        s = sigmas[0] * x.new_ones(x.shape[0])
        with torch.enable_grad():
            d_cfg = model_k(x, s, **extra_args)
            guider.cfg = 1.0  # ComfyUI then skips the negative pass: D_c alone
            leaf = x.detach().clone().requires_grad_(True)
            d_c = model_k(leaf, s, **extra_args)
            guider.cfg = cfg
            if chain:
                (jt_delta,) = torch.autograd.grad(d_c, leaf, grad_outputs=(d_cfg - d_c).detach())
        a = (1 - s).reshape(-1, 1, 1, 1) if flow else 1.0
        if fd:
            scale = torch.sqrt((1 - s) ** 2 + s**2) if flow else torch.sqrt(1 + s**2)
            h = 1e-3 * scale.reshape(-1, 1, 1, 1)
            guider.cfg = 1.0
            d_shifted = model_k(x + h, s, **extra_args)
            guider.cfg = cfg
            seen["m"] = (a * (d_shifted - d_c) / h).detach()
            return (d_c + seen["m"] * (d_cfg - d_c)).detach()
        if chain:
            return (d_c + a * jt_delta).detach()
        (m,) = torch.autograd.grad(d_c.sum(), leaf)
        seen["m"] = a * m
        return (d_c + a * m * (d_cfg - d_c)).detach()

    noise = comfy.sample.prepare_noise(latent, seed)
    out = guider.sample(noise, latent, comfy.samplers.KSAMPLER(one_step), sigmas, seed=seed)
    return out, seen.get("m")


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_one_step_equals_independent_reg_formula(harness, tiny, family):
    cfg = 4.0
    setup = ONE_STEP[family]
    got = run_ksampler(harness, tiny, family=family, patches=[reg_patch()], steps=1, cfg=cfg, **setup)
    plain = run_ksampler(harness, tiny, family=family, steps=1, cfg=cfg, **setup)
    want, m = reference_one_step(tiny, family, cfg)
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-4 * scale
    assert float((got - plain).abs().max()) > 1e-3 * scale  # REG really changed the result
    assert float((m - 1).abs().mean()) > 1e-2 and float(m.abs().mean()) > 1e-2  # M is neither one nor zero


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_chain_estimator_one_step_equals_full_chain_rule(harness, tiny, family):
    chain = [reg_patch(estimator="chain")]
    got = run_ksampler(harness, tiny, family=family, patches=chain, steps=1, cfg=4.0, **ONE_STEP[family])
    want, _ = reference_one_step(tiny, family, 4.0, chain=True)
    vjp, _ = reference_one_step(tiny, family, 4.0)
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-4 * scale
    assert float((want - vjp).abs().max()) > 1e-3 * scale  # the ablation really differs from the paper's REG


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_gradient_free_one_step_equals_forward_difference(harness, tiny, family):
    """The sampler's own batch runs as it is (positive and negative, labels 0 and 1) and the probe runs alone with the
    positive's label: together they give exactly the forward-difference formula."""
    import comfy.patcher_extension
    import comfy.sample

    setup = ONE_STEP[family]
    gradient_free = [reg_patch(estimator="gradient-free")]
    got = run_ksampler(harness, tiny, family=family, patches=gradient_free, steps=1, cfg=4.0, **setup)

    model, positive, negative, channels = load_family(tiny, family)
    calls = []

    def count(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        calls.append((x.shape[0], sorted(transformer_options["cond_or_uncond"])))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    counted = model.clone()
    counted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_count", count)
    latent = torch.zeros(1, channels, 4, 4)
    with torch.inference_mode():
        comfy.sample.sample(
            _patched(counted, estimator="gradient-free"), comfy.sample.prepare_noise(latent, 0), 2, 4.0, "euler",
            "normal", positive, negative, latent, seed=0,
        )  # fmt: skip
    assert calls == [(2, [0, 1]), (1, [0])] * 2
    want, m = reference_one_step(tiny, family, 4.0, fd=True)
    vjp, _ = reference_one_step(tiny, family, 4.0)
    scale = float(want.abs().max())
    # float32 rounding of D (≈ 6e-8·|D|) divided by h = 1e-3·scale of the state: ~1e-4 of M, times |Δ| ≈ |D|
    assert float((got - want).abs().max()) <= 2e-3 * scale
    assert float((want - vjp).abs().max()) > 1e-3 * scale  # a random network's Jacobian is not symmetric
    assert float((m - 1).abs().mean()) > 1e-2 and float(m.abs().mean()) > 1e-2


def test_refresh_every_reuses_m_between_evaluations(harness, tiny):
    import json

    def record(refresh):
        g = harness.graph()
        inp = sd15_inputs(g, tiny)
        patched = g.node("REGGuidance", model=inp.model, **{**REG, "refresh_every": refresh})
        sampler = ksampler(g, inp, model=patched.out(0), steps=3)
        diag = g.node("REGDiagnostics", latent=sampler.out(0), model=patched.out(0), steps="auto", sample=0)
        result = harness.run(g)
        return result.latent(sampler), json.loads(result.value(diag, 2))["steps"]

    fresh_latent, fresh = record(1)
    lagged_latent, lagged = record(2)
    assert lagged[0]["mean"] == fresh[0]["mean"]  # evaluation 0 estimates M in both runs
    assert lagged[1]["mean"] == lagged[0]["mean"] and lagged[1]["p95"] == lagged[0]["p95"]  # reused
    assert lagged[2]["mean"] != lagged[1]["mean"]  # refreshed on evaluation 2
    assert fresh[1]["mean"] != fresh[0]["mean"]
    assert not torch.equal(lagged_latent, fresh_latent)


def test_chain_with_refresh_is_a_clear_error(harness, tiny):
    from comfy_harness import PromptExecutionError

    with pytest.raises(PromptExecutionError, match="refresh_every"):
        run_ksampler(harness, tiny, patches=[reg_patch(estimator="chain", refresh_every=2)], steps=1)


@pytest.mark.parametrize(
    "sampling",
    [
        ("ModelSamplingDiscrete", {"sampling": "v_prediction", "zsnr": False}),
        ("ModelSamplingDiscrete", {"sampling": "x0", "zsnr": False}),
        ("ModelSamplingContinuousEDM", {"sampling": "edm", "sigma_max": 80.0, "sigma_min": 0.002}),
        ("ModelSamplingContinuousEDM", {"sampling": "v_prediction", "sigma_max": 120.0, "sigma_min": 0.002}),
    ],
    ids=["V_PREDICTION", "X0", "EDM", "V_PREDICTION_continuous"],
)
def test_one_step_other_model_types(harness, tiny, sampling):
    """ε, v, x0 and EDM outputs are all converted to D by ComfyUI, and the state is VE: a(σ) = 1 for each."""
    got = run_ksampler(harness, tiny, patches=[sampling, reg_patch()], steps=1, cfg=4.0)
    want, m = reference_one_step(tiny, "sd15", 4.0, sampling_patch=sampling)
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-4 * scale
    assert float((m - 1).abs().mean()) > 1e-3


def test_one_step_batch_of_two_is_per_sample(harness, tiny):
    got = run_ksampler(harness, tiny, patches=[reg_patch()], steps=1, cfg=4.0, batch_size=2)
    want, _ = reference_one_step(tiny, "sd15", 4.0, batch_size=2)
    assert got.shape[0] == 2 and not torch.allclose(got[0], got[1])
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_strength_zero_is_exactly_the_unpatched_workflow(harness, tiny, family):
    plain = run_ksampler(harness, tiny, family=family, steps=2)
    zero = run_ksampler(harness, tiny, family=family, patches=[reg_patch(strength=0.0)], steps=2)
    one = run_ksampler(harness, tiny, family=family, patches=[reg_patch()], steps=2)
    assert torch.equal(zero, plain)
    assert not torch.allclose(one, plain)
    assert torch.isfinite(one).all()


def test_cfg_one_is_a_no_op(harness, tiny):
    plain = run_ksampler(harness, tiny, steps=2, cfg=1.0)
    assert torch.equal(run_ksampler(harness, tiny, patches=[reg_patch()], steps=2, cfg=1.0), plain)


def test_same_seed_gives_identical_output(harness, tiny):
    a = run_ksampler(harness, tiny, patches=[reg_patch()], steps=2, seed=7)
    b = run_ksampler(harness, tiny, patches=[reg_patch()], steps=2, seed=7)  # the harness re-executes every node
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "other",
    [
        ("APG", {"eta": 0.5, "norm_threshold": 2.0, "momentum": 0.3}),
        ("PerturbedAttentionGuidance", {"scale": 2.0}),
        ("RescaleCFG", {"multiplier": 0.7}),
        ("CFGZeroStar", {}),
    ],
    ids=["APG", "PAG", "RescaleCFG", "CFGZeroStar"],
)
def test_order_independent_composition_with_core_guidance_nodes(harness, tiny, other):
    before = run_ksampler(harness, tiny, patches=[other, reg_patch()], steps=2)
    after = run_ksampler(harness, tiny, patches=[reg_patch(), other], steps=2)
    without = run_ksampler(harness, tiny, patches=[other], steps=2)
    assert torch.allclose(before, after, atol=1e-6)
    assert not torch.allclose(before, without, atol=1e-4)


def test_reg_uses_true_cond_when_apg_rewrites_it(harness, tiny):
    """One step with APG upstream: REG must rectify D_APG − D_c with the true D_c, not APG's rewritten cond."""
    apg = ("APG", {"eta": 1.0, "norm_threshold": 0.0, "momentum": 0.0})
    cfg = 3.0
    got = run_ksampler(harness, tiny, patches=[apg, reg_patch()], steps=1, cfg=cfg)
    # With these settings ComfyUI's APG at cfg s is CFG at s + 1, so REG on top equals REG on plain CFG at s + 1.
    want, _ = reference_one_step(tiny, "sd15", cfg + 1)
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


def test_ksampler_and_sampler_custom_advanced_agree(harness, tiny):
    g = harness.graph()
    inp = sd15_inputs(g, tiny)
    patched = g.node("REGGuidance", model=inp.model, **REG).out(0)
    node = custom_advanced(g, inp, model=patched, steps=2)
    advanced = harness.run(g).latent(node)
    assert torch.allclose(advanced, run_ksampler(harness, tiny, patches=[reg_patch()], steps=2), atol=1e-6)


def guider_latent(harness, tiny, *, cfg=5.0, base="cfg", family="sd15", **overrides):
    g = harness.graph()
    inp = (sd15_inputs if family == "sd15" else sd3_inputs)(g, tiny)
    inputs = {
        "cfg": cfg,
        "base": base,
        "eta": 1.0,
        "norm_threshold": 5.0,
        "momentum": 0.0,
        "pag_scale": 3.0,
        **REG,
        **SCHEDULE,
        "progress": "steps",
    }
    inputs.update(overrides)
    guider = g.node("REGGuider", model=inp.model, positive=inp.positive, negative=inp.negative, **inputs).out(0)
    node = custom_advanced(g, inp, guider=guider, steps=2)
    return harness.run(g).latent(node)


def test_reg_guider_cfg_matches_the_model_patch(harness, tiny):
    assert torch.allclose(guider_latent(harness, tiny), run_ksampler(harness, tiny, patches=[reg_patch()]), atol=1e-6)
    flow = run_ksampler(harness, tiny, family="sd3", patches=[reg_patch()])
    assert torch.allclose(guider_latent(harness, tiny, family="sd3"), flow, atol=1e-6)


def test_reg_guider_apg_neutral_equals_cfg_plus_one(harness, tiny):
    apg = guider_latent(harness, tiny, cfg=3.0, base="apg", norm_threshold=0.0)
    cfg = guider_latent(harness, tiny, cfg=4.0)
    assert torch.allclose(apg, cfg, atol=1e-4)


def test_reg_guider_pag_matches_core_pag_node_under_reg(harness, tiny):
    ours = guider_latent(harness, tiny, base="pag", pag_scale=2.0)
    core = run_ksampler(harness, tiny, patches=[("PerturbedAttentionGuidance", {"scale": 2.0}), reg_patch()])
    assert torch.allclose(ours, core, atol=1e-5)
    assert not torch.allclose(ours, guider_latent(harness, tiny), atol=1e-4)


def test_schedule_interval_outside_all_steps_is_conditional_only(harness, tiny):
    cond_only = run_ksampler(harness, tiny, steps=2, cfg=1.0)
    sched = (
        "REGGuidanceSchedule",
        {**SCHEDULE, "schedule": "interval", "sigma_low": 500.0, "sigma_high": 1000.0, "progress": "steps"},
    )
    assert torch.equal(run_ksampler(harness, tiny, patches=[sched, reg_patch()], steps=2), cond_only)


def test_schedule_linear_to_the_same_cfg_equals_constant(harness, tiny):
    sched = ("REGGuidanceSchedule", {**SCHEDULE, "schedule": "linear", "end_cfg": 5.0, "progress": "steps"})
    constant = run_ksampler(harness, tiny, patches=[reg_patch()], steps=2, cfg=5.0)
    assert torch.allclose(
        run_ksampler(harness, tiny, patches=[sched, reg_patch()], steps=2, cfg=5.0), constant, atol=1e-6
    )
    ramp = ("REGGuidanceSchedule", {**SCHEDULE, "schedule": "linear", "end_cfg": 1.0, "progress": "steps"})
    assert not torch.allclose(run_ksampler(harness, tiny, patches=[ramp, reg_patch()], steps=2, cfg=5.0), constant)


@pytest.mark.parametrize("node", ["REGGuidance", "REGGuidanceSchedule"])
def test_a_second_node_of_a_kind_replaces_the_first_and_says_so(harness, tiny, caplog, node):
    """Chained twice, the second node's settings are the ones that act (never both), with one line in the console."""
    if node == "REGGuidance":
        first, second = reg_patch(strength=0.5), reg_patch(strength=1.5)
    else:
        ramp = {**SCHEDULE, "schedule": "linear", "progress": "steps"}
        first, second = (node, {**ramp, "end_cfg": 1.0}), (node, {**ramp, "end_cfg": 8.0})
    with caplog.at_level(logging.INFO, logger="reg_guidance"):
        twice = run_ksampler(harness, tiny, patches=[first, second], steps=2, cfg=4.0)
    lines = [r.getMessage() for r in caplog.records if "replacing the" in r.getMessage()]
    assert lines == [f"{node}: replacing the {'REG settings' if node == 'REGGuidance' else 'schedule'} already on "
                     "this model."]  # fmt: skip
    assert torch.equal(twice, run_ksampler(harness, tiny, patches=[second], steps=2, cfg=4.0))
    assert not torch.allclose(twice, run_ksampler(harness, tiny, patches=[first], steps=2, cfg=4.0))


def test_window_outside_all_steps_leaves_guidance_unchanged(harness, tiny):
    plain = run_ksampler(harness, tiny, steps=2)
    # A zero-width window at the very start (percent 0 maps to σ = 1e9) contains no sampling step.
    empty = reg_patch(start_percent=0.0, end_percent=0.0)
    assert torch.equal(run_ksampler(harness, tiny, patches=[empty], steps=2), plain)


def test_bad_window_is_refused_when_the_prompt_is_queued(harness, tiny):
    from comfy_harness import PromptValidationError

    with pytest.raises(PromptValidationError, match="start_percent") as err:
        run_ksampler(harness, tiny, patches=[reg_patch(start_percent=0.8, end_percent=0.2)], steps=1)
    # ComfyUI repeats a node's message once per input its validate_inputs names: the two window inputs, no more
    assert str(err.value).count("is after end_percent") == 2


# --- direct sampler calls: fallback, interrupt, repeated runs (the same code path the executor uses) ---


def _sample(model, positive, negative, *, seed=3, steps=2, cfg=5.0, callback=None):
    import comfy.sample

    latent = torch.zeros(1, 4, 4, 4)
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        return comfy.sample.sample(
            model, noise, steps, cfg, "euler", "normal", positive, negative, latent, seed=seed, callback=callback
        )


def _patched(model, **settings):
    import nodes

    return nodes.NODE_CLASS_MAPPINGS["REGGuidance"].execute(model, **{**REG, **settings}).result[0]


def _dual_cfg_one_step(model, positive, middle, negative, channels, sampler):
    """One step to σ = 0 with ComfyUI's DualCFGGuider (conds passed to the model as [negative, middle, positive])."""
    import comfy.sample
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Guider_DualCFG

    guider = Guider_DualCFG(model)
    guider.set_conds(positive, middle, negative)
    guider.set_cfg(3.0, 2.0)
    latent = torch.zeros(1, channels, 4, 4)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 1)[-2:]
    with torch.inference_mode():
        return guider.sample(comfy.sample.prepare_noise(latent, 42), latent, sampler, sigmas, seed=42)


def test_dual_cfg_guider_rectifies_around_the_positive_branch(tiny, reg_pack):
    """DualCFGGuider puts the positive conditioning last: REG must differentiate that branch, not the first one."""
    import comfy.samplers

    model, positive, negative, channels = load_family(tiny, "sd15")
    middle = negative  # as a "middle" prompt the guider flags it negative; distinct conds are not needed here

    def one_step(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        guider = model_k.inner_model
        s = sigmas[0] * x.new_ones(x.shape[0])
        d_final = model_k(x, s, **extra_args)
        with torch.inference_mode(False), torch.enable_grad():
            leaf = x.detach().clone().requires_grad_(True)
            inner = guider.inner_model
            d_c = comfy.samplers.calc_cond_batch(inner, [guider.conds["positive"]], leaf, s.clone(), {})[0]
            (m,) = torch.autograd.grad(d_c.sum(), leaf)
        return (d_c + m * (d_final - d_c)).detach()

    want = _dual_cfg_one_step(model, positive, middle, negative, channels, comfy.samplers.KSAMPLER(one_step))
    euler = comfy.samplers.sampler_object("euler")
    got = _dual_cfg_one_step(_patched(model), positive, middle, negative, channels, euler)
    plain = _dual_cfg_one_step(model, positive, middle, negative, channels, euler)
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-4 * scale
    assert float((got - plain).abs().max()) > 1e-3 * scale


def test_schedule_warns_that_dual_cfg_guider_has_no_single_cfg(tiny, reg_pack, caplog):
    import comfy.samplers

    import nodes

    model, positive, negative, channels = load_family(tiny, "sd15")
    scheduled = nodes.NODE_CLASS_MAPPINGS["REGGuidanceSchedule"].execute(model, **SCHEDULE, progress="steps").result[0]
    euler = comfy.samplers.sampler_object("euler")
    with caplog.at_level(logging.WARNING, logger="reg_guidance"):
        got = _dual_cfg_one_step(scheduled, positive, negative, negative, channels, euler)
    assert any("Guider_DualCFG has no single cfg" in r.getMessage() for r in caplog.records)
    assert torch.equal(got, _dual_cfg_one_step(model, positive, negative, negative, channels, euler))


def test_fallback_to_gradient_free_when_autograd_is_impossible(tiny, reg_pack, caplog):
    from comfy.patcher_extension import WrappersMP

    model, positive, negative, _ = load_family(tiny, "sd15")

    def no_grad_forward(executor, *args, **kwargs):
        with torch.no_grad():
            return executor(*args, **kwargs)

    broken = _patched(model)
    broken.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "test_no_grad", no_grad_forward)
    with caplog.at_level(logging.WARNING, logger="reg_guidance"):
        fallback = _sample(broken, positive, negative, steps=3)
    warnings = [r for r in caplog.records if r.name == "reg_guidance" and "gradient-free" in r.getMessage()]
    assert len(warnings) == 1
    gradient_free = _sample(_patched(model, estimator="gradient-free"), positive, negative, steps=3)
    assert torch.equal(fallback, gradient_free)
    assert not torch.equal(gradient_free, _sample(model, positive, negative, steps=3))


def test_interrupt_mid_run_leaves_no_state_and_next_run_is_clean(tiny, reg_pack):
    import comfy.model_management

    model, positive, negative, _ = load_family(tiny, "sd15")
    patched = _patched(model)

    def interrupt(step, *args):
        if step == 1:
            comfy.model_management.interrupt_current_processing(True)
            comfy.model_management.throw_exception_if_processing_interrupted()

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        _sample(patched, positive, negative, steps=3, callback=interrupt)
    runtime = reg_pack.submodule("nodes.reg_runtime")
    assert runtime.RUN_KEY not in patched.model_options.get("transformer_options", {})
    assert torch.equal(
        _sample(patched, positive, negative, steps=3), _sample(_patched(model), positive, negative, steps=3)
    )


def test_repeated_runs_do_not_grow_memory(tiny, reg_pack):
    import gc

    import psutil

    model, positive, negative, _ = load_family(tiny, "sd15")
    patched = _patched(model)
    rss = []
    for seed in range(8):
        _sample(patched, positive, negative, seed=seed, steps=2)
        gc.collect()
        rss.append(psutil.Process().memory_info().rss)
    # after two warm-up runs, the least-squares slope of RSS per run: fails when each run leaves over 2 MiB behind
    runs = torch.arange(len(rss) - 2, dtype=torch.float64)
    values = torch.tensor(rss[2:], dtype=torch.float64)
    slope = float(((runs - runs.mean()) * (values - values.mean())).sum() / ((runs - runs.mean()) ** 2).sum())
    assert slope < 2 * 2**20, [r // 2**20 for r in rss]


@pytest.mark.parametrize("cache", ["EasyCache", "LazyCache"])
@pytest.mark.parametrize("estimator", ["vjp", "gradient-free"])
def test_cache_nodes_leave_the_guidance_unchanged_with_one_warning(harness, tiny, cache, estimator, caplog):
    """A cache serves predictions without a Jacobian, and the probe would read (and overwrite) its entries: REG does
    not act in such a run, says so once, and the result is the cached workflow's own, bit for bit."""
    cached = (cache, {"reuse_threshold": 0.2, "start_percent": 0.15, "end_percent": 0.95, "verbose": False})
    with caplog.at_level(logging.WARNING, logger="reg_guidance"):
        got = run_ksampler(harness, tiny, patches=[cached, reg_patch(estimator=estimator)], steps=4)
    warnings = [r.getMessage() for r in caplog.records if r.name == "reg_guidance"]
    assert len(warnings) == 1 and cache in warnings[0] and "unchanged" in warnings[0], warnings
    assert torch.equal(got, run_ksampler(harness, tiny, patches=[cached], steps=4))
