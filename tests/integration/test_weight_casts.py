"""Exact REG holds no weight copies: weights ComfyUI casts or dequantises per layer are cast again in the backward.

The models load with bf16 weights, which ComfyUI computes in float32 on a CPU by casting each weight when its layer
runs (``manual_cast``); the quantised Flux checkpoints dequantise theirs. Plain autograd would keep every such copy for
the backward (a second model in the compute dtype). Each test checks that REG's step still equals the reference
(which keeps the copies, as plain autograd does), and that no tensor the graph saves has a weight's shape — with a
positive control: the same spy sees them when the recasting is switched off.
"""

from __future__ import annotations

import functools
import logging

import pytest
import torch
from test_compatibility import Case, ReferenceREG, load_family, reg_lines, sample, with_reg

ESTIMATORS = ["vjp", "vjp-low-memory"]


@functools.cache
def bf16_model(tiny, family: str):
    """The tiny ``family`` model with bf16 weights (float32 compute on a CPU: every layer casts its weights)."""
    import comfy.sd
    import folder_paths

    if family == "sd15":
        path = folder_paths.get_full_path_or_raise("checkpoints", tiny.sd15_checkpoint)
        model = comfy.sd.load_checkpoint_guess_config(
            path, model_options={"dtype": torch.bfloat16}, output_vae=False, output_clip=False
        )[0]
    else:
        path = folder_paths.get_full_path_or_raise("diffusion_models", tiny.sd3_unet)
        model = comfy.sd.load_diffusion_model(path, model_options={"dtype": torch.bfloat16})
    assert model.model.manual_cast_dtype == torch.float32 and model.model.get_dtype() == torch.bfloat16
    return model


def weight_shapes(model) -> set[tuple[int, ...]]:
    """Every shape a weight of the network (or its transpose) has."""
    shapes = {tuple(p.shape) for p in model.model.diffusion_model.parameters() if p.ndim >= 2}
    return shapes | {s[::-1] for s in shapes if len(s) == 2}


def saved_shapes(reg_pack, monkeypatch) -> list[tuple[int, ...]]:
    """A spy on the shapes of what the traced pass's graph saves (apart from the model's own parameters)."""
    guard = reg_pack.submodule("nodes.traced_pass").SavedTensorGuard
    seen: list[tuple[int, ...]] = []
    count = guard._count

    def spy(self, tensor):
        seen.append(tuple(tensor.shape))
        return count(self, tensor)

    monkeypatch.setattr(guard, "_count", spy)
    return seen


@pytest.mark.parametrize("family", ["sd15", "sd3"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_cast_weights_are_not_kept_and_m_is_unchanged(tiny, reg_pack, caplog, monkeypatch, family, estimator):
    model = bf16_model(tiny, family)
    _, positive, negative, _ = load_family(tiny, family)
    case = Case(family=family)
    seen = saved_shapes(reg_pack, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="reg_guidance"):
        got = sample(case, with_reg(model.clone(), estimator=estimator), positive, negative)
    assert reg_lines(caplog) == []
    assert seen and not set(seen) & weight_shapes(model)
    want = sample(case, model.clone(), positive, negative, ReferenceREG())
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())

    recasts = reg_pack.submodule("nodes.traced_pass").WeightRecasts
    monkeypatch.setattr(recasts, "view_of", lambda self, saved: None)  # positive control: plain autograd's graph
    seen.clear()
    sample(case, with_reg(model.clone(), estimator=estimator), positive, negative)
    assert set(seen) & weight_shapes(model)


@pytest.mark.parametrize("fmt", ["scaled_fp8", "float8_e4m3fn", "int8_tensorwise"])
def test_dequantised_weights_are_not_kept(reg_pack, monkeypatch, caplog, fmt):
    """The tiny Flux's quantised block linears dequantise per forward on a CPU: the graph keeps none of those copies."""
    try:
        import comfy.quant_ops  # noqa: F401
    except ImportError:
        pytest.skip("ComfyUI 0.3.64 has no QuantizedTensor weights")
    from test_modern_models import EXACT, QUANT_TOLERANCE, max_error, reference, reg_sample, tiny_quantized

    quantized, dequantized = tiny_quantized(fmt)
    seen = saved_shapes(reg_pack, monkeypatch)
    got, _ = reg_sample(quantized, "vjp", caplog)
    quantized_shapes = {
        tuple(m.weight.shape)
        for m in quantized.model.model.diffusion_model.modules()
        if type(getattr(m, "weight", None)).__name__ == "QuantizedTensor"
    }
    shapes = quantized_shapes | {s[::-1] for s in quantized_shapes}
    assert quantized_shapes and seen and not set(seen) & shapes
    assert max_error(got, reference(dequantized)[0]) <= QUANT_TOLERANCE.get(fmt, (EXACT,))[0]

    traced_pass = reg_pack.submodule("nodes.traced_pass")
    monkeypatch.setattr(traced_pass, "_quantized", lambda tensor: False)  # positive control: saved like activations
    seen.clear()
    reg_sample(quantized, "vjp", caplog)
    assert set(seen) & shapes


@pytest.fixture
def low_vram(monkeypatch):
    """ComfyUI's low-VRAM load, on a CPU: no layer fits, so every layer with a cast path keeps its weight where it is
    and casts it when it runs, LoRA patches applied then (``weight_function``), as on a GPU too small for the model.
    Every model is unloaded before and after, so that no other test sees a model loaded this way."""
    import comfy.model_management
    import comfy.model_patcher

    load = comfy.model_patcher.ModelPatcher.load

    def nothing_fits(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        return load(self, device_to, lowvram_model_memory=1, force_patch_weights=force_patch_weights, full_load=False)

    comfy.model_management.unload_all_models()
    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "load", nothing_fits)
    yield
    comfy.model_management.unload_all_models()


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_lora_patched_per_layer_is_cast_again_not_kept(
    tiny, reg_pack, caplog, monkeypatch, tiny_lora, low_vram, estimator
):
    """A LoRA on a model loaded low-VRAM: ComfyUI patches the weights each time their layer runs; the backward
    patches them again instead of keeping the patched copies, and M is unchanged."""
    from test_compatibility import apply

    model, positive, negative, _ = load_family(tiny, "sd15")
    lora = apply("LoraLoaderModelOnly", model=model.clone(), lora_name=tiny_lora, strength_model=1.0)[0]
    case = Case()
    seen = saved_shapes(reg_pack, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="reg_guidance"):
        got = sample(case, with_reg(lora.clone(), estimator=estimator), positive, negative)
    patched = [m for m in lora.model.diffusion_model.modules() if getattr(m, "weight_function", None)]
    assert patched  # the premise: the LoRA's layers were patched when they ran
    lora_shapes = {tuple(m.weight.shape) for m in patched}
    assert reg_lines(caplog) == []
    assert seen and not set(seen) & lora_shapes
    want = sample(case, lora.clone(), positive, negative, ReferenceREG())
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
    unpatched = sample(case, with_reg(model.clone(), estimator=estimator), positive, negative)
    assert float((got - unpatched).abs().max()) > 1e-3 * float(want.abs().max())  # the LoRA counts in REG's step

    recasts = reg_pack.submodule("nodes.traced_pass").WeightRecasts
    monkeypatch.setattr(recasts, "view_of", lambda self, saved: None)  # positive control: the patched copies kept
    seen.clear()
    sample(case, with_reg(lora.clone(), estimator=estimator), positive, negative)
    assert set(seen) & lora_shapes
