"""REG with a ControlNet inside real ComfyUI: ControlNetLoader + ControlNetApplyAdvanced + REGGuidance + KSampler.

The ControlNet is the tiny random-weight SD1.5 ControlNet of ``tiny_controlnet.py``; the hint is a solid-colour
``EmptyImage``. REG's exact estimators differentiate the conditional branch, which with a ControlNet means UNet *and*
ControlNet: the runtime de-inferences the ControlNet's weights (``_differentiable_modules`` finds it through
``control.get_models()``) and autograd must run through the UNet's control residuals.

ComfyUI's UNet adds the ControlNet's skip residuals in place (``openaimodel.apply_control``: ``h += ctrl`` on
``hs.pop()``), to skip tensors that later input blocks and the middle block already saved for backward. Without care
the backward pass fails with "modified by an inplace operation" and REG would fall back to the gradient-free estimator.
The runtime's traced pass (and the independent reference below) add an identity ``input_block_patch_after_skip`` that
clones ``h``, so the in-place add hits a tensor nothing saved; the exact test below guards that.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import tiny_controlnet
import torch
from prompts import ksampler, sd15_inputs
from test_reg_nodes import REG, _patched, _sample, load_family, reference_step

HINT_COLOUR = 0x3366CC
HINT_SIZE = 32  # pixels: the 32x32 test image's 4x4 latent times ComfyUI's compression ratio 8
CFG = 4.0
ONE_STEP = {"steps": 1, "cfg": CFG, "denoise": 1.0, "scheduler": "normal"}


@pytest.fixture(scope="module")
def controlnet(tiny):
    """The tiny SD1.5 ControlNet, built next to the other tiny models and registered under ``controlnet``."""
    return tiny_controlnet.prepare(tiny.root)


def reg_warnings(records) -> list[str]:
    return [r.getMessage() for r in records if r.name == "reg_guidance" and r.levelno >= logging.WARNING]


def run_workflow(harness, tiny, controlnet, *, with_controlnet=True, reg=None, **sampler):
    """The KSampler latent of tiny SD1.5 (+ ControlNet on both conds) (+ REGGuidance with ``reg`` overrides)."""
    g = harness.graph()
    inp = sd15_inputs(g, tiny)
    if with_controlnet:
        loader = g.node("ControlNetLoader", control_net_name=controlnet.sd15)
        hint = g.node("EmptyImage", width=HINT_SIZE, height=HINT_SIZE, batch_size=1, color=HINT_COLOUR)
        applied = g.node(
            "ControlNetApplyAdvanced",
            positive=inp.positive,
            negative=inp.negative,
            control_net=loader.out(0),
            image=hint.out(0),
            strength=1.0,
            start_percent=0.0,
            end_percent=1.0,
        )
        inp = dataclasses.replace(inp, positive=applied.out(0), negative=applied.out(1))
    model = inp.model
    if reg is not None:
        model = g.node("REGGuidance", model=model, **{**REG, **reg}).out(0)
    node = ksampler(g, inp, model=model, **sampler)
    return harness.run(g).latent(node)


# --- the independent reference: ComfyUI's own sampling with a hand-written one-step REG, no REG code involved ---


def _copy_after_skip(h, transformer_options):
    """Identity for the values; gives the blocks after a skip their own tensor, so ``apply_control``'s in-place add
    on the skip (``hs.pop()``) does not modify a tensor saved for backward."""
    return h.clone()


def controlled_conds(tiny, controlnet, *, inference: bool):
    """Tiny SD1.5's positive/negative with a freshly loaded ControlNet applied as ControlNetApplyAdvanced does.

    With ``inference`` the ControlNet is loaded and applied inside ``torch.inference_mode`` as ComfyUI's executor
    does, so its weights are inference tensors.
    """
    import comfy.controlnet

    import nodes

    model, positive, negative, _ = load_family(tiny, "sd15")
    with torch.inference_mode(inference):
        cnet = comfy.controlnet.load_controlnet(str(controlnet.path))
        hint = nodes.EmptyImage().generate(HINT_SIZE, HINT_SIZE, 1, HINT_COLOUR)[0]
        pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, cnet, hint, 1.0, 0.0, 1.0)
    return model, cnet, pos, neg


def reference_one_step(tiny, controlnet, *, detach_control=False, seed=42):
    """``D_c + ∇_xΣD_c ⊙ (D_cfg − D_c)`` for one Euler step to σ = 0, with the ControlNet on both conds.

    ``M = ∇_xΣD_c`` is taken with autograd through UNet *and* ControlNet. With ``detach_control`` the ControlNet's
    residuals are detached (a forward hook), i.e. the Jacobian through the ControlNet is dropped: the reference for
    what REG would compute if it did not differentiate the control branch. Returns ``(latent, M)``.
    """
    base, cnet, positive, negative = controlled_conds(tiny, controlnet, inference=False)
    model = base.clone()
    model.set_model_input_block_patch_after_skip(_copy_after_skip)
    latent = torch.zeros(1, 4, 4, 4)

    def detached(module, args, output):
        return {key: [t.detach() if t is not None else None for t in value] for key, value in output.items()}

    hook = cnet.control_model.register_forward_hook(detached) if detach_control else None
    try:
        return reference_step(model, positive, negative, latent, ONE_STEP, CFG, seed=seed)
    finally:
        if hook is not None:
            hook.remove()


# --- tests ---


def test_tiny_controlnet_is_loaded_and_detected_by_comfyui(controlnet, caplog):
    import comfy.cldm.cldm
    import comfy.controlnet

    import nodes

    with caplog.at_level(logging.DEBUG), torch.inference_mode():
        (cnet,) = nodes.ControlNetLoader().load_controlnet(controlnet.sd15)
    assert type(cnet) is comfy.controlnet.ControlNet
    net = cnet.control_model
    assert isinstance(net, comfy.cldm.cldm.ControlNet)
    assert net.model_channels == 320 and list(net.channel_mult) == [1, 1] and list(net.num_res_blocks) == [1, 1]
    assert net.input_hint_block[0].in_channels == 3
    assert len(net.zero_convs) == len(net.input_blocks) == 4
    assert not [r for r in caplog.records if "controlnet keys" in r.getMessage()]  # nothing missing or unexpected
    zero_convs = [conv[0].weight for conv in net.zero_convs] + [net.middle_block_out[0].weight]
    assert all(float(w.detach().abs().mean()) > 1e-3 for w in zero_convs)  # not the zero init of a fresh ControlNet


def test_controlnet_really_changes_the_result(harness, tiny, controlnet):
    for reg in (None, {}):
        with_cn = run_workflow(harness, tiny, controlnet, reg=reg)
        without = run_workflow(harness, tiny, controlnet, with_controlnet=False, reg=reg)
        assert torch.isfinite(with_cn).all()
        assert float((with_cn - without).abs().max()) > 0.05 * float(without.abs().max()), reg


def test_strength_zero_with_controlnet_is_exactly_the_workflow_without_reg(harness, tiny, controlnet):
    plain = run_workflow(harness, tiny, controlnet)
    assert torch.equal(run_workflow(harness, tiny, controlnet, reg={"strength": 0.0}), plain)
    guided = run_workflow(harness, tiny, controlnet, reg={})
    assert float((guided - plain).abs().max()) > 1e-3 * float(plain.abs().max())  # REG at strength 1 does act


def test_reference_differentiates_through_the_controlnet(tiny, controlnet):
    """The reference's M really contains the ControlNet's Jacobian (a sanity check of the reference itself)."""
    full, m = reference_one_step(tiny, controlnet)
    cut, m_cut = reference_one_step(tiny, controlnet, detach_control=True)
    assert float((m - 1).abs().mean()) > 1e-2 and float(m.abs().mean()) > 1e-2  # M is neither one nor zero
    assert float((m - m_cut).abs().mean()) > 1e-2 * float(m.abs().mean())
    assert float((full - cut).abs().max()) > 1e-3 * float(full.abs().max())


def test_one_step_with_controlnet_is_exact_reg_without_fallback(harness, tiny, controlnet, caplog):
    with caplog.at_level(logging.WARNING, logger="reg_guidance"):
        got = run_workflow(harness, tiny, controlnet, reg={}, **ONE_STEP)
    assert not [w for w in reg_warnings(caplog.records) if "gradient-free" in w]
    want, _ = reference_one_step(tiny, controlnet)
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


def test_reg_de_inferences_the_controlnet_and_any_fallback_is_exactly_gradient_free(tiny, controlnet, reg_pack, caplog):
    """The runtime reaches the ControlNet's inference-mode weights; whatever else fails, the run degrades cleanly.

    The ControlNet is loaded inside ``torch.inference_mode`` as the executor does, so all its weights start as
    inference tensors. After a REG run none is left, and no fallback reason mentions inference tensors. If the run
    fell back (the known in-place failure), its result is exactly the gradient-free estimator's.
    """
    model, cnet, positive, negative = controlled_conds(tiny, controlnet, inference=True)
    params = list(cnet.control_model.parameters())
    assert params and all(p.is_inference() for p in params)
    with caplog.at_level(logging.WARNING, logger="reg_guidance"):
        vjp = _sample(_patched(model), positive, negative, steps=1, cfg=CFG)
    warnings = reg_warnings(caplog.records)
    assert not any(p.is_inference() for p in cnet.control_model.parameters())
    assert not [w for w in warnings if "nference tensor" in w]
    assert len(warnings) <= 1
    if warnings:
        assert "gradient-free" in warnings[0]
        gradient_free = _sample(_patched(model, estimator="gradient-free"), positive, negative, steps=1, cfg=CFG)
        assert torch.equal(vjp, gradient_free)


def test_without_de_inferencing_the_controlnet_reg_falls_back(tiny, controlnet, reg_pack, monkeypatch, caplog):
    """Positive control: if the runtime skipped the ControlNet, autograd would hit its inference-tensor weights (and
    the warning is visible to caplog, so the no-warning assertions above are meaningful)."""
    traced = reg_pack.submodule("nodes.estimators.traced")
    monkeypatch.setattr(traced, "differentiable_modules", lambda model, conds: [model])
    model, cnet, positive, negative = controlled_conds(tiny, controlnet, inference=True)
    with caplog.at_level(logging.WARNING, logger="reg_guidance"):
        _sample(_patched(model), positive, negative, steps=1, cfg=CFG)
    warnings = reg_warnings(caplog.records)
    assert len(warnings) == 1 and "nference tensor" in warnings[0] and "gradient-free" in warnings[0]
    assert all(p.is_inference() for p in cnet.control_model.parameters())
