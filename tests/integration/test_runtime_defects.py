"""REG never silently off, never silently wrong: guidance that calls the model in unusual ways, networks cut from
the graph, failures in the middle of a step, and the memory-bounded exact estimator.

Each test failed on the runtime before the estimator objects and the traced pass (see the README's "When REG falls
back" section); the one-step references come from ComfyUI's own sampler pieces, never from the pack's code.
"""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from test_reg_nodes import ONE_STEP, REG, SCHEDULE, _patched, _sample, load_family, reference_step


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "reg_guidance" and r.levelno >= logging.WARNING]


def _guider(model, positive, negative, family, cfg):
    """A CFGGuider, an empty latent and the last two σs of KSampler's one-step schedule (ending at σ = 0)."""
    import comfy.samplers

    latent = torch.zeros(1, 4 if family == "sd15" else 16, 4, 4)
    setup = ONE_STEP[family]
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, setup["scheduler"], int(1 / setup["denoise"]))[-2:]
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider, latent, sigmas


def _one_step(model, positive, negative, family, cfg, sampler=None):
    """One KSampler-equivalent euler step to σ = 0 (its result is the denoised prediction), or ``sampler``'s."""
    import comfy.sample
    import comfy.samplers

    guider, latent, sigmas = _guider(model, positive, negative, family, cfg)
    noise = comfy.sample.prepare_noise(latent, 42)
    with torch.inference_mode():
        return guider.sample(noise, latent, sampler or comfy.samplers.sampler_object("euler"), sigmas, seed=42)


def _reference_around_positive(model, positive, negative, family, cfg):
    """``D_c + ∇_xΣD_c ⊙ (D_final − D_c)`` with ``D_c`` from ``calc_cond_batch`` on the positive conds alone, so it
    holds whatever guidance hooks the model carries (PAG at cfg 1 has no negative pass to take D_c from)."""
    import comfy.model_sampling
    import comfy.samplers

    def one_step(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        guider = model_k.inner_model
        s = sigmas[0] * x.new_ones(x.shape[0])
        d_final = model_k(x, s, **extra_args)
        flow = isinstance(guider.model_patcher.get_model_object("model_sampling"), comfy.model_sampling.CONST)
        with torch.inference_mode(False), torch.enable_grad():
            leaf = x.detach().clone().requires_grad_(True)
            d_c = comfy.samplers.calc_cond_batch(guider.inner_model, [guider.conds["positive"]], leaf, s.clone(), {})[0]
            (m,) = torch.autograd.grad(d_c.sum(), leaf)
        a = (1 - s).reshape(-1, 1, 1, 1) if flow else 1.0
        return (d_c + a * m * (d_final - d_c)).detach()

    return _one_step(model, positive, negative, family, cfg, sampler=comfy.samplers.KSAMPLER(one_step))


def _close(got, want, rel=1e-4):
    scale = float(want.abs().max())
    return float((got - want).abs().max()) <= rel * scale


def test_skip_layer_guidance_simple_is_rectified(tiny, reg_pack, caplog):
    """SLG's simple node calls the model as [positive, None] then [None, negative]: REG must act on the first."""
    import nodes

    model, positive, negative, _ = load_family(tiny, "sd3")
    slg = nodes.NODE_CLASS_MAPPINGS["SkipLayerGuidanceDiTSimple"]
    kwargs = {"double_layers": "1", "single_layers": "", "start_percent": 0.0, "end_percent": 1.0}
    guided = slg.execute(model, **kwargs)
    guided = guided.result[0] if hasattr(guided, "result") else guided[0]
    with caplog.at_level(logging.WARNING, logger="reg_guidance"):
        got = _one_step(_patched(guided), positive, negative, "sd3", 4.0)
    want, _ = reference_step(guided, positive, negative, torch.zeros(1, 16, 4, 4), ONE_STEP["sd3"], 4.0)
    plain = _one_step(guided, positive, negative, "sd3", 4.0)
    assert _close(got, want)
    assert not _close(got, plain, rel=1e-3)
    assert _warnings(caplog) == []


def test_pag_at_cfg_one_is_rectified(tiny, reg_pack):
    """At cfg 1 ComfyUI skips the negative pass, but PAG's post-cfg hook still guides: REG rectifies that."""
    import nodes

    model, positive, negative, _ = load_family(tiny, "sd15")
    pag = nodes.NODE_CLASS_MAPPINGS["PerturbedAttentionGuidance"]
    guided = pag.execute(model, scale=3.0)
    guided = guided.result[0] if hasattr(guided, "result") else guided[0]
    got = _one_step(_patched(guided), positive, negative, "sd15", 1.0)
    want = _reference_around_positive(guided, positive, negative, "sd15", 1.0)
    plain = _one_step(guided, positive, negative, "sd15", 1.0)
    assert _close(got, want)
    assert not _close(got, plain, rel=1e-3)


def test_cfg_one_without_guidance_says_so_once(tiny, reg_pack, caplog):
    model, positive, negative, _ = load_family(tiny, "sd15")
    with caplog.at_level(logging.INFO, logger="reg_guidance"):
        got = _sample(_patched(model), positive, negative, steps=3, cfg=1.0)
    assert torch.equal(got, _sample(model, positive, negative, steps=3, cfg=1.0))
    assert len([m for m in _warnings(caplog) if "no guidance to rectify" in m]) == 1


@contextlib.contextmanager
def _detached_last_layer(model):
    """The network's last layer returns a detached output, as a quantised or cached layer would."""
    network = model.model.diffusion_model
    last = getattr(network, "out", None) or network.final_layer
    handle = last.register_forward_hook(lambda module, args, out: out.detach())
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_a_network_cut_from_the_graph_falls_back_with_one_warning(tiny, reg_pack, caplog, family):
    """``D = x − σ·F`` keeps a gradient through x when F is detached: M would be 1 (plain CFG) without the audit.
    SD3's MMDiT never calls ComfyUI's DIFFUSION_MODEL wrapper, so the check must not depend on it."""
    model, positive, negative, _ = load_family(tiny, family)
    with _detached_last_layer(model):
        with caplog.at_level(logging.WARNING):
            got = _one_step(_patched(model), positive, negative, family, 4.0)
        gradient_free = _one_step(_patched(model, estimator="gradient-free"), positive, negative, family, 4.0)
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "drop the gradient" in warnings[0] and "gradient-free" in warnings[0], warnings
    assert torch.equal(got, gradient_free)


@contextlib.contextmanager
def _shape_bug(model):
    """The network raises a plain bug (no autograd failure REG could name) in every differentiated call."""

    def shape_bug(module, args):
        if torch.is_grad_enabled():
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")

    handle = model.model.diffusion_model.register_forward_pre_hook(shape_bug)
    try:
        yield
    finally:
        handle.remove()


def test_a_real_error_in_the_traced_pass_surfaces_with_the_node_named(tiny, reg_pack):
    model, positive, negative, _ = load_family(tiny, "sd15")
    with _shape_bug(model), pytest.raises(RuntimeError, match=r"^REGGuidance \(vjp\).*mat1 and mat2"):
        _one_step(_patched(model), positive, negative, "sd15", 4.0)


def test_a_real_error_under_reg_guider_names_reg_guider(tiny, reg_pack):
    import comfy.sample
    import comfy.samplers

    import nodes

    model, positive, negative, _ = load_family(tiny, "sd15")
    inputs = {"cfg": 4.0, "base": "cfg", "eta": 1.0, "norm_threshold": 0.0, "momentum": 0.0, "pag_scale": 3.0}
    guider = (
        nodes.NODE_CLASS_MAPPINGS["REGGuider"]
        .execute(model=model, positive=positive, negative=negative, **inputs, **REG, **SCHEDULE, progress="steps")
        .result[0]
    )
    _, latent, sigmas = _guider(model, positive, negative, "sd15", 4.0)
    noise = comfy.sample.prepare_noise(latent, 42)
    with _shape_bug(model), pytest.raises(RuntimeError, match=r"^REGGuider \(vjp\).*mat1 and mat2"):
        with torch.inference_mode():
            guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=42)


def test_chain_backward_out_of_memory_falls_back_within_the_step(tiny, reg_pack, caplog, monkeypatch):
    model, positive, negative, _ = load_family(tiny, "sd15")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(reg_pack.submodule("reg_core.rectify"), "chain_product", out_of_memory)
    with caplog.at_level(logging.WARNING):
        got = _sample(_patched(model, estimator="chain"), positive, negative, steps=3)
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "not enough memory" in warnings[0], warnings
    gradient_free = _sample(_patched(model, estimator="gradient-free"), positive, negative, steps=3)
    # D_c of the first step comes from the traced pass instead of the batch: rounding, amplified by 1/h in M
    # (measured: 2.4e-3 of the scale, while REG moves the result by 0.29 of it)
    assert _close(got, gradient_free, rel=1e-2)
    assert not _close(got, _sample(model, positive, negative, steps=3), rel=0.1)


def test_plain_vjp_out_of_memory_continues_exact_as_vjp_low_memory(tiny, reg_pack, caplog, monkeypatch):
    """The free-memory budget is an estimate: when the plain graph's backward still runs out of memory, the run goes
    on with per-block recomputation (the same M), not with the gradient-free approximation."""
    model, positive, negative, _ = load_family(tiny, "sd15")
    rectify = reg_pack.submodule("reg_core.rectify")
    column_sums, calls = rectify.column_sums, []

    def out_of_memory_once(*args, **kwargs):
        calls.append(True)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return column_sums(*args, **kwargs)

    monkeypatch.setattr(rectify, "column_sums", out_of_memory_once)
    with caplog.at_level(logging.WARNING):
        got = _sample(_patched(model), positive, negative, steps=3)
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "ran out of memory" in warnings[0] and "vjp-low-memory" in warnings[0], warnings
    monkeypatch.undo()
    assert _close(got, _sample(_patched(model, estimator="vjp-low-memory"), positive, negative, steps=3), rel=1e-5)


def test_out_of_memory_in_the_gradient_free_estimator_surfaces_as_such(tiny, reg_pack, caplog, monkeypatch):
    """Gradient-free is the fallback: running out of memory there is ComfyUI's out-of-memory error, not a fallback to
    itself."""
    model, positive, negative, _ = load_family(tiny, "sd15")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(reg_pack.submodule("reg_core.rectify"), "fd_factor", out_of_memory)
    with caplog.at_level(logging.WARNING), pytest.raises(torch.OutOfMemoryError):
        _sample(_patched(model, estimator="gradient-free"), positive, negative, steps=3)
    assert not any("gradient-free" in w for w in _warnings(caplog))


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_vjp_low_memory_equals_vjp(tiny, reg_pack, caplog, family):
    model, positive, negative, _ = load_family(tiny, family)
    with caplog.at_level(logging.WARNING):
        low = _one_step(_patched(model, estimator="vjp-low-memory"), positive, negative, family, 4.0)
    plain = _one_step(_patched(model, estimator="vjp"), positive, negative, family, 4.0)
    want, _ = reference_step(
        model, positive, negative, torch.zeros(1, 4 if family == "sd15" else 16, 4, 4), ONE_STEP[family], 4.0
    )
    assert _warnings(caplog) == []
    assert _close(low, plain, rel=1e-5) and _close(low, want)


def test_vjp_switches_to_the_memory_bounded_graph_when_memory_is_short(tiny, reg_pack, caplog, monkeypatch):
    import comfy.model_management

    model, positive, negative, _ = load_family(tiny, "sd15")
    plain = _sample(_patched(model), positive, negative, steps=3)
    real = comfy.model_management.get_free_memory

    def short(dev=None, torch_free_too=False):  # attention's own query (torch_free_too) keeps the real figures
        return real(dev, True) if torch_free_too else 1024

    monkeypatch.setattr(comfy.model_management, "get_free_memory", short)
    patched = _patched(model)
    with caplog.at_level(logging.WARNING):
        got = _sample(patched, positive, negative, steps=3)
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "vjp-low-memory" in warnings[0], warnings
    patch = patched.get_wrappers("outer_sample", "reg_guidance")[0].__self__
    assert "vjp-low-memory" in patch.record_for(got).estimator
    assert _close(got, plain, rel=1e-5)
