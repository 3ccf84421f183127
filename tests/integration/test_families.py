"""One exact REG step on a tiny random model of every family ComfyUI samples with real guidance, per ComfyUI version.

For each family of tiny_families.FAMILIES and each of the estimators ``vjp``, ``vjp-low-memory`` and
``gradient-free``, one sampling step through ComfyUI's own sampler (``comfy.sample.sample``, the KSampler path) with
the pack's ``REGGuidance`` node on the model is compared with :func:`reference_run`: ``D_c + M ⊙ (D_cfg − D_c)``
computed from ComfyUI's guider and model with ``torch.autograd`` (or the forward difference for ``gradient-free``),
without any of the pack's code. The run must not fall back: the pack's log says it rectified every evaluation with
the estimator asked for, and it warns about nothing.

The reference differentiates only the sampler's state ``x``: reference latents (Flux 2, Qwen-Image-Edit), Llama
features, pooled outputs and audio lengths are conditioning and stay constant, as in the pack. LTX-2's video and
audio latents are one NestedTensor, which ComfyUI packs into one flat latent inside ``CFGGuider.sample``: M is taken
on that flat latent, as the sampler sees it. Wan 2.2's two experts run through two KSamplerAdvanced, and the
reference follows the same split. With a denoise mask (Wan 2.2 5B's start image) the sampler's denoiser is ComfyUI's
masked one (``KSamplerX0Inpaint``), and the reference differentiates through it.

Where a ComfyUI model calls a kernel without a backward and without a plain-torch branch (Cosmos Predict 2's
``rms_rope_split_half`` in 0.33), the reference uses comfy_kitchen's own eager implementation of that kernel
(:func:`eager_kitchen_kernels`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from test_modern_models import Tiny, differentiable_reference, max_error
from test_reg_nodes import _patched
from tiny_families import (
    CHECKPOINT_LOADER,
    CLASS,
    FAMILIES,
    LOADER,
    conditioning,
    load,
    loader_reads_back,
    missing,
    state_dict,
)

CFG = 4.0
SEED = 42
ESTIMATORS = ["vjp", "vjp-low-memory", "gradient-free"]
# As in test_modern_models: the pack and the reference run the same ops in different batch layouts (~1e-6 of max|D|),
# a wrong M is O(1) of it; the forward difference has float32 rounding of D over h = 1e-3 · (state scale).
EXACT = 1e-4
FORWARD_DIFFERENCE = 2e-3
SUMMARY = re.compile(r"REG: rectified (\d+)/(\d+) evaluations with (.+?), mean M")


@contextlib.contextmanager
def eager_kitchen_kernels() -> Iterator[None]:
    """comfy_kitchen's own plain-torch (eager backend) implementation of the fused kernels that ComfyUI 0.33 calls
    without a plain-torch branch of its own, for the reference's differentiation (Cosmos Predict 2's
    ``rms_rope_split_half``: a torch custom op with no autograd formula); nothing to do without comfy_kitchen."""
    try:
        import comfy.quant_ops
        from comfy_kitchen.backends.eager import rope
    except ImportError:
        yield
        return
    kitchen, name = comfy.quant_ops.ck, "rms_rope_split_half"
    original = getattr(kitchen, name)
    setattr(kitchen, name, getattr(rope, name))
    try:
        yield
    finally:
        setattr(kitchen, name, original)


@functools.cache
def tiny_family(name: str) -> Tiny:
    spec = FAMILIES[name]
    model, how = load(name)
    return Tiny(name, model, conditioning(name, 1), conditioning(name, 2), spec.empty_latent(), spec.one_step, how)


@pytest.fixture(params=list(FAMILIES))
def family(request, reg_pack) -> Tiny:
    reason = missing(request.param)
    if reason is not None:
        pytest.skip(reason)
    return tiny_family(request.param)


def one_step_sigmas(model, setup: dict) -> torch.Tensor:
    """The two σs of KSampler's one step with ``setup``'s scheduler and denoise (the last step of the schedule)."""
    import comfy.samplers

    sampling = model.get_model_object("model_sampling")
    return comfy.samplers.calculate_sigmas(sampling, setup["scheduler"], int(1 / setup["denoise"]))[-2:]


def reference_run(
    model, positive, negative, latent, sigmas, noise, *, fd: bool = False, denoise_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, list]:
    """Euler steps over ``sigmas`` through ComfyUI's CFGGuider, each with REG's prediction computed independently.

    Per step: ``D_cfg`` from the guider as the sampler calls it, ``D_c`` alone (cfg 1, so ComfyUI skips the negative)
    at a leaf ``x``, ``M = a(σ)·∇_xΣD_c`` by autograd (``fd``: the forward difference with ``h = 1e-3`` times the
    state's scale), ``D = D_c + M ⊙ (D_cfg − D_c)``, then ComfyUI's Euler update. Returns the latent and each step's M.
    """
    import comfy.k_diffusion.sampling
    import comfy.model_sampling
    import comfy.samplers

    sampling = model.get_model_object("model_sampling")
    flow = isinstance(sampling, comfy.model_sampling.CONST)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(CFG)
    maps = []

    def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.reshape(-1, *([1] * (like.ndim - 1)))

    def reg_euler(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        for i in range(len(sigmas) - 1):
            s = sigmas[i] * x.new_ones(x.shape[0])
            with torch.enable_grad():
                d_cfg = model_k(x, s, **extra_args).detach()
                guider.cfg = 1.0
                try:
                    leaf = x.detach().clone().requires_grad_(True)
                    d_c = model_k(leaf, s, **extra_args)
                    if fd:
                        scale = torch.sqrt((1 - s) ** 2 + s**2) if flow else torch.sqrt(1 + s**2)
                        h = 1e-3 * per_sample(scale, x)
                        m = (model_k(x + h, s, **extra_args).detach() - d_c.detach()) / h
                    else:
                        (m,) = torch.autograd.grad(d_c.sum(), leaf)
                finally:
                    guider.cfg = CFG
            m = (per_sample(1 - s, x) if flow else 1.0) * m
            maps.append(m)
            d_c = d_c.detach()
            denoised = d_c + m * (d_cfg - d_c)
            d = comfy.k_diffusion.sampling.to_d(x, sigmas[i], denoised)
            x = x + d * (sigmas[i + 1] - sigmas[i])
        return x

    with differentiable_reference(), eager_kitchen_kernels():
        out = guider.sample(
            noise, latent, comfy.samplers.KSAMPLER(reg_euler), sigmas, denoise_mask=denoise_mask, seed=SEED
        )
    return out, maps


def flat(latent) -> torch.Tensor:
    """A latent as one tensor: a NestedTensor's parts (LTX-2's video and audio) flattened and joined, as
    ``comfy.utils.pack_latents`` packs them for the sampler."""
    if getattr(latent, "is_nested", False):
        return torch.cat([t.reshape(t.shape[0], -1) for t in latent.unbind()], dim=1)
    return latent


@functools.cache
def reference(tiny: Tiny, *, fd: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-step reference of ``tiny`` (computed once per model): the latent and M."""
    import comfy.sample

    noise = comfy.sample.prepare_noise(tiny.latent, SEED)
    sigmas = one_step_sigmas(tiny.model, tiny.setup)
    out, maps = reference_run(tiny.model, tiny.positive, tiny.negative, tiny.latent, sigmas, noise, fd=fd)
    return flat(out), maps[0]


def sample(tiny: Tiny, model=None, *, nested: bool = False) -> torch.Tensor:
    """One KSampler step (``comfy.sample.sample``, inside inference mode as ComfyUI's executor runs it), flattened
    unless ``nested``."""
    import comfy.sample

    noise = comfy.sample.prepare_noise(tiny.latent, SEED)
    with torch.inference_mode():
        out = comfy.sample.sample(
            tiny.model if model is None else model, noise, 1, CFG, "euler", tiny.setup["scheduler"], tiny.positive,
            tiny.negative, tiny.latent, denoise=tiny.setup["denoise"], seed=SEED,
        )  # fmt: skip
    return out if nested else flat(out)


@dataclass
class Log:
    """What the pack said during a run: its warnings and its one summary line."""

    warnings: list[str]
    summaries: list[str]

    def rectified_all_with(self, estimator: str) -> bool:
        """Every evaluation was rectified, and with ``estimator`` itself (no fallback, no silent switch)."""
        found = [SUMMARY.search(line) for line in self.summaries]
        return bool(found) and all(m is not None and m[1] == m[2] and m[3] == estimator for m in found)


def with_log(caplog, run) -> tuple[object, Log]:
    """``run()`` while recording the pack's log."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="reg_guidance"):
        result = run()
    records = [r for r in caplog.records if r.name == "reg_guidance"]
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    summaries = [r.getMessage() for r in records if r.getMessage().startswith("REG: rectified")]
    return result, Log(warnings, summaries)


def reg_sample(tiny: Tiny, estimator: str, caplog) -> tuple[torch.Tensor, Log]:
    start = time.perf_counter()
    got, said = with_log(caplog, lambda: sample(tiny, _patched(tiny.model, estimator=estimator)))
    logging.getLogger(__name__).info("%s %s one step: %.2f s", tiny.family, estimator, time.perf_counter() - start)
    return got, said


def test_tiny_family_is_the_intended_network(family):
    """The family loads as its ComfyUI class; through the loader exactly when detection reads the tiny config back."""
    reads_back, detected = loader_reads_back(family.family, state_dict(family.family))
    loader = LOADER if FAMILIES[family.family].checkpoint is None else CHECKPOINT_LOADER
    assert family.how == (loader if reads_back else CLASS), detected
    assert type(family.model.model.model_config).__name__ == FAMILIES[family.family].model_class
    if FAMILIES[family.family].nested:  # LTX-2: the sampler hands back the video and audio latents, not the flat pack
        parts = sample(family, nested=True).unbind()
        assert [tuple(t.shape) for t in parts] == [tuple(s) for s in FAMILIES[family.family].latent]


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_one_step_equals_the_independent_reference(family, estimator, caplog):
    got, said = reg_sample(family, estimator, caplog)
    assert said.warnings == [], said.warnings
    assert said.rectified_all_with(estimator), said.summaries
    fd = estimator == "gradient-free"
    want, m = reference(family, fd=fd)
    assert max_error(got, want) <= (FORWARD_DIFFERENCE if fd else EXACT)
    assert max_error(sample(family), want) > 1e-3  # REG really changed the step
    assert float((m - 1).abs().mean()) > 1e-2 and float(m.abs().mean()) > 1e-2  # M is neither one nor zero


# --- Wan 2.2 A14B: the high-noise expert, then the low-noise one, through two KSamplerAdvanced ---

WAN22_STEPS = 4  # "simple" with Wan's shift 8; the high expert takes step 1 → 2, the low one 2 → 3 (σ → 0)
WAN22_SPLIT = ((1, 2, "enable", "enable"), (2, 3, "disable", "disable"))  # start, end, add_noise, leftover noise


def wan22_inputs() -> tuple[list, list, torch.Tensor]:
    from tiny_models import modern_conditioning

    return modern_conditioning("wan", 1), modern_conditioning("wan", 2), torch.zeros(1, 16, 2, 8, 8)


def wan22_chain(models: tuple[object, object]) -> list[torch.Tensor]:
    """The two KSamplerAdvanced nodes as a Wan 2.2 workflow wires them; returns each one's output latent."""
    import nodes

    positive, negative, latent = wan22_inputs()
    samples, outputs = {"samples": latent}, []
    for model, (start, end, add_noise, leftover) in zip(models, WAN22_SPLIT, strict=True):
        with torch.inference_mode():
            samples = nodes.KSamplerAdvanced().sample(
                model, add_noise, SEED, WAN22_STEPS, CFG, "euler", "simple", positive, negative, samples, start, end,
                leftover,
            )[0]  # fmt: skip
        outputs.append(samples["samples"].clone())
    return outputs


def wan22_reference(experts: tuple[object, object], *, fd: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The same split with :func:`reference_run`: the high expert's REG step from the noised latent, then the low
    expert's from its output without new noise (KSamplerAdvanced's σ slices, the last one forced to 0)."""
    import comfy.sample
    import comfy.samplers

    positive, negative, latent = wan22_inputs()
    outputs, maps = [], []
    for model, (start, end, add_noise, leftover) in zip(experts, WAN22_SPLIT, strict=True):
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", WAN22_STEPS)
        sigmas = sigmas[: end + 1].clone()
        if leftover == "disable":
            sigmas[-1] = 0
        noise = comfy.sample.prepare_noise(latent, SEED) if add_noise == "enable" else torch.zeros_like(latent)
        latent, step_maps = reference_run(model, positive, negative, latent, sigmas[start:], noise, fd=fd)
        outputs.append(latent)
        maps += step_maps
    return outputs, maps


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_wan22_two_experts_through_two_ksampler_advanced(reg_pack, estimator, caplog):
    """REG Guidance on each expert's model, as a user wires it: each KSamplerAdvanced step equals the reference."""
    from tiny_families import wan22_experts

    experts = wan22_experts()
    patched = tuple(_patched(model, estimator=estimator) for model in experts)
    got, said = with_log(caplog, lambda: wan22_chain(patched))
    assert said.warnings == [], said.warnings
    assert len(said.summaries) == 2 and said.rectified_all_with(estimator), said.summaries
    want, maps = wan22_reference(experts, fd=estimator == "gradient-free")
    tolerance = FORWARD_DIFFERENCE if estimator == "gradient-free" else EXACT
    for segment, (g, w) in enumerate(zip(got, want, strict=True)):
        assert max_error(g, w) <= tolerance, segment
    plain = wan22_chain(experts)
    assert all(max_error(p, w) > 1e-3 for p, w in zip(plain, want, strict=True))  # REG changed both segments
    assert all(float((m - 1).abs().mean()) > 1e-2 and float(m.abs().mean()) > 1e-2 for m in maps)


# --- Wan 2.2 5B text-image-to-video: a start image fixes the first latent frame (a denoise mask) ---


class EncodedStartImage:
    """A stand-in for the Wan 2.2 VAE (none exists at tiny size): ``encode`` returns one fixed random latent frame."""

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return torch.randn(1, 48, 1, 8, 8, generator=torch.Generator().manual_seed(2222))


def wan22_5b_start_image_latent() -> dict:
    """Wan22ImageToVideoLatent's output for a start image: the first latent frame set, and ``noise_mask`` 0 there."""
    from comfy_extras.nodes_wan import Wan22ImageToVideoLatent

    image = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(2223))
    return Wan22ImageToVideoLatent.execute(EncodedStartImage(), 128, 128, 9, 1, start_image=image).result[0]


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_wan22_5b_start_image_is_exact_for_the_masked_denoiser(reg_pack, estimator, caplog):
    """With a denoise mask ComfyUI samples ``D_eff(x) = w ⊙ D(w ⊙ x + (1 − w) ⊙ c) + (1 − w) ⊙ latent``
    (KSamplerX0Inpaint): the model's predictions where ``w = 0`` are replaced by the start frame. REG's M is that of
    ``D_eff``, so the reference differentiates through ComfyUI's own masking; a one-step KSampler run equals it."""
    import comfy.sample

    import nodes

    tiny = tiny_family("wan22_5b")
    latent = wan22_5b_start_image_latent()
    assert float(latent["noise_mask"].mean()) < 1  # the start frame is kept

    def one_step(model) -> torch.Tensor:
        with torch.inference_mode():
            return nodes.KSampler().sample(
                model, SEED, 1, CFG, "euler", tiny.setup["scheduler"], tiny.positive, tiny.negative, latent,
                denoise=tiny.setup["denoise"],
            )[0]["samples"]  # fmt: skip

    got, said = with_log(caplog, lambda: one_step(_patched(tiny.model, estimator=estimator)))
    assert said.warnings == [], said.warnings
    assert said.rectified_all_with(estimator), said.summaries
    fd = estimator == "gradient-free"
    samples = latent["samples"]
    want, maps = reference_run(
        tiny.model, tiny.positive, tiny.negative, samples, one_step_sigmas(tiny.model, tiny.setup),
        comfy.sample.prepare_noise(samples, SEED), fd=fd, denoise_mask=latent["noise_mask"],
    )  # fmt: skip
    assert max_error(got, want) <= (FORWARD_DIFFERENCE if fd else EXACT)
    assert max_error(one_step(tiny.model), want) > 1e-3  # REG really changed the step
    m = maps[0][latent["noise_mask"].expand_as(maps[0]) > 0]  # M where the sampler denoises
    assert float((m - 1).abs().mean()) > 1e-2 and float(m.abs().mean()) > 1e-2
