"""One exact REG step on tiny random Flux (true CFG), Wan 2.x (video), Qwen-Image and SDXL, per ComfyUI version.

Each test samples one Euler step to σ = 0 through ComfyUI's own sampler (``comfy.sample.sample``, the KSampler path)
with ``REGGuidance`` on the model, and compares it with ``reference_step`` of test_reg_nodes.py: ``D_c + M ⊙ (D_cfg −
D_c)`` computed from ComfyUI's guider and model with ``torch.autograd``, without any of the pack's code.

The reference is differentiated the way ComfyUI's own training node runs these networks
(:func:`differentiable_reference`): ``comfy.model_management.in_training`` selects plain-torch rotary embeddings instead
of comfy_kitchen kernels that have no backward (0.33), and a saved-tensors hook gives every tensor saved for backward a
private copy, so the in-place residual updates of Flux's blocks (``img += …``) do not invalidate the graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import re
import time
from dataclasses import dataclass

import pytest
import torch
from test_reg_nodes import _patched, reference_step
from tiny_models import MODERN_FAMILIES, comfyui_version, family_config, load_modern, modern_conditioning

FAMILIES = list(MODERN_FAMILIES)
CFG = 4.0
SEED = 42
# float32 through a random network: the pack and the reference evaluate the same ops on the same inputs, but in
# different batch layouts (cond and uncond batched vs alone), which changes the reduction order in matmuls and
# attention. Observed differences are ~1e-6 of max|D|; a wrong M (a partial or zero Jacobian) is O(1) of it.
EXACT = 1e-4
# Forward difference with h = 1e-3 · (state scale): float32 rounding of D (~6e-8·|D|) divided by h, times |Δ| ≈ |D|.
FORWARD_DIFFERENCE = 2e-3


@dataclass(frozen=True, eq=False)  # hashed by identity: one cached reference per loaded model
class Tiny:
    family: str
    model: object  # ModelPatcher
    positive: list
    negative: list
    latent: torch.Tensor
    setup: dict
    how: str  # the load path (see tiny_models.MODERN_FAMILIES)


@functools.cache
def tiny_modern(family: str) -> Tiny:
    spec = MODERN_FAMILIES[family]
    model, how = load_modern(family)
    positive = modern_conditioning(family, seed=1)
    negative = modern_conditioning(family, seed=2)
    return Tiny(family, model, positive, negative, torch.zeros(spec.latent), spec.one_step, how)


@pytest.fixture(params=FAMILIES)
def modern(request, reg_pack) -> Tiny:
    return tiny_modern(request.param)


@contextlib.contextmanager
def differentiable_reference():
    """Run ComfyUI's networks so that autograd can differentiate them (see the module docstring); restores on exit."""
    import comfy.model_management

    had = hasattr(comfy.model_management, "in_training")  # 0.3.64 has no such switch (and no kernels that need it)
    saved = getattr(comfy.model_management, "in_training", False)
    comfy.model_management.in_training = True
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
            yield
    finally:
        if had:
            comfy.model_management.in_training = saved
        else:
            del comfy.model_management.in_training


@functools.cache
def reference(tiny: Tiny, *, chain: bool = False, fd: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``reference_step`` on the tiny model (``chain`` or ``fd`` for the other estimators), computed once per model."""
    with differentiable_reference():
        return reference_step(
            tiny.model, tiny.positive, tiny.negative, tiny.latent, tiny.setup, CFG, seed=SEED, chain=chain, fd=fd
        )


def sample(tiny: Tiny, model=None) -> torch.Tensor:
    """One KSampler step (``comfy.sample.sample``, inside inference mode as ComfyUI's executor runs it)."""
    import comfy.sample

    noise = comfy.sample.prepare_noise(tiny.latent, SEED)
    with torch.inference_mode():
        return comfy.sample.sample(
            tiny.model if model is None else model, noise, 1, CFG, "euler", tiny.setup["scheduler"], tiny.positive,
            tiny.negative, tiny.latent, denoise=tiny.setup["denoise"], seed=SEED,
        )  # fmt: skip


def reg_sample(tiny: Tiny, estimator: str, caplog) -> tuple[torch.Tensor, list[str]]:
    """One REG step with ``estimator``; returns the latent and the pack's warnings during the run."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="reg_guidance"):
        start = time.perf_counter()
        got = sample(tiny, _patched(tiny.model, estimator=estimator))
        seconds = time.perf_counter() - start
    logging.getLogger(__name__).info("%s %s one step: %.2f s", tiny.family, estimator, seconds)
    return got, [r.getMessage() for r in caplog.records if r.name == "reg_guidance" and r.levelno >= logging.WARNING]


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got − want| relative to max |want|."""
    return float((got - want).abs().max()) / float(want.abs().max())


def test_tiny_models_are_the_intended_networks(modern):
    """The loader (where used) detected the tiny sizes; latents have the family's layout (Wan: ≥ 2 latent frames)."""
    detected = modern.model.model.model_config.unet_config
    wanted = family_config(modern.family)
    if modern.how == "comfy.sd.load_diffusion_model_state_dict":
        assert {k: detected.get(k) for k in wanted} == wanted
    assert modern.latent.ndim == (5 if modern.family in ("wan", "qwen") else 4)
    if modern.family == "wan":
        assert modern.latent.shape[2] >= 2


def test_vjp_one_step_is_exact_and_does_not_fall_back(modern, caplog):
    got, warnings = reg_sample(modern, "vjp", caplog)
    assert warnings == [], warnings  # e.g. a fallback to gradient-free names its reason here
    want, m = reference(modern)
    assert max_error(got, want) <= EXACT
    assert max_error(sample(modern), want) > 1e-3  # REG really changed the step
    assert float((m - 1).abs().mean()) > 1e-2 and float(m.abs().mean()) > 1e-2  # M is neither one nor zero


def test_vjp_low_memory_equals_vjp(modern, caplog):
    """Recomputing the differentiated pass block by block changes nothing but float rounding."""
    vjp, _ = reg_sample(modern, "vjp", caplog)
    low, warnings = reg_sample(modern, "vjp-low-memory", caplog)
    assert warnings == [], warnings
    assert max_error(low, vjp) <= 1e-5
    want, _ = reference(modern)
    assert max_error(low, want) <= EXACT


def test_chain_one_step_equals_full_chain_rule(modern, caplog):
    got, warnings = reg_sample(modern, "chain", caplog)
    assert warnings == [], warnings
    want, _ = reference(modern, chain=True)
    vjp, _ = reference(modern)
    assert max_error(got, want) <= EXACT
    assert max_error(vjp, want) > 1e-3  # the ablation really differs from the paper's REG


def test_gradient_free_one_step_equals_forward_difference(modern, caplog):
    got, warnings = reg_sample(modern, "gradient-free", caplog)
    assert warnings == [], warnings
    assert torch.isfinite(got).all()
    want, m = reference(modern, fd=True)
    vjp, _ = reference(modern)
    assert max_error(got, want) <= FORWARD_DIFFERENCE
    assert max_error(vjp, want) > 1e-3  # a random network's Jacobian is not symmetric: FD ≠ VJP
    assert float((m - 1).abs().mean()) > 1e-2 and float(m.abs().mean()) > 1e-2


# --- quantized weights (0.33: QuantizedTensor layers from scaled-fp8 and comfy_quant checkpoints) ---
#
# What ComfyUI 0.33 does with these layers on a CPU (comfy.ops.mixed_precision_ops): fp8 compute is unsupported, so
# the fp8 formats are "emulated": each forward dequantizes the weight to float32 and the layer input keeps its
# gradient; REG is exact on the dequantized network. int8_tensorwise runs ComfyUI's int8 path on the CPU as well: the
# forward quantizes activations, so the network itself deviates from its dequantized weights (~2.4% of max|D| for a
# CFG step here), while the gradient flows through the dequantized weight. REG then matches the dequantized reference
# to the quantization error of the forward, both in D and in REG's correction D_REG − D_CFG (~4% here, where a layer
# missing from the Jacobian changes the correction by O(1)).

QUANT_FORMATS = ["scaled_fp8", "float8_e4m3fn", "int8_tensorwise"]
QUANT_TOLERANCE = {  # (of D, of the correction D_REG − D_CFG), relative to the dequantized reference's max
    "scaled_fp8": (EXACT, EXACT),
    "float8_e4m3fn": (EXACT, EXACT),
    "int8_tensorwise": (5e-2, 1e-1),
}
EXPECTED_ON_CPU = {"scaled_fp8": "exact", "float8_e4m3fn": "exact", "int8_tensorwise": "straight-through"}
FALLBACK = re.compile(r"REG: exact gradients are unavailable \((.+)\); using the gradient-free estimator")
STRAIGHT_THROUGH = re.compile(r"REG: the network's TensorWiseINT8Layout layers quantise their inputs.*straight-through")


@functools.cache
def tiny_quantized(fmt: str) -> tuple[Tiny, Tiny]:
    """The tiny Flux with quantized block linears, and the same Flux with those weights dequantized to float32."""
    from tiny_models import load_quantized

    flux = tiny_modern("flux")
    quantized, dequantized = load_quantized("flux", fmt)
    return dataclasses.replace(flux, model=quantized), dataclasses.replace(flux, model=dequantized)


@pytest.fixture(params=QUANT_FORMATS)
def quantized(request, reg_pack) -> tuple[str, Tiny, Tiny]:
    try:
        import comfy.quant_ops  # noqa: F401
    except ImportError:
        version = ".".join(map(str, comfyui_version()))
        pytest.skip(f"ComfyUI {version} has no QuantizedTensor weights (comfy.quant_ops is newer)")
    return (request.param, *tiny_quantized(request.param))


def test_quantized_weights_are_exact_or_fall_back_with_one_named_warning(quantized, caplog):
    import comfy.model_management

    fmt, tiny, dequantized = quantized
    got, warnings = reg_sample(tiny, "vjp", caplog)
    if warnings and not STRAIGHT_THROUGH.match(warnings[0]):
        assert len(warnings) == 1 and FALLBACK.match(warnings[0]), warnings
        gradient_free, _ = reg_sample(tiny, "gradient-free", caplog)
        assert torch.equal(got, gradient_free)
        outcome = "fallback"
    else:
        want, _ = reference(dequantized)
        of_d, of_correction = QUANT_TOLERANCE[fmt]
        assert max_error(got, want) <= of_d
        assert max_error(got - sample(tiny), want - sample(dequantized)) <= of_correction
        assert len(warnings) <= 1
        outcome = "straight-through" if warnings else "exact"
    if comfy.model_management.get_torch_device().type == "cpu":
        assert outcome == EXPECTED_ON_CPU[fmt], warnings
