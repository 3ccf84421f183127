"""REG next to the nodes artists combine it with: every combination is exact, or REG says once why it cannot act.

Each case builds a model (and guider) the way ComfyUI runs that node without REG, samples it with REG, and compares
with an independent reference: REG written out plainly as a PREDICT_NOISE wrapper on the same model, which lets
ComfyUI's own sampling function produce the guided prediction (one batch, ComfyUI's own chunk labels), takes ``D_c``
and its Jacobian from ComfyUI's ``calc_cond_batch`` on the positive conditioning alone (at the index the guider puts
it), and applies post-cfg functions that are not guidance to the result. A case where REG cannot act must produce
the workflow's own result, bit for bit, with exactly one line from REG naming why. The README's compatibility table
is this file.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import tiny_models
import torch
from comfy_harness import PACK_NAME
from test_reg_nodes import REG, load_family


def apply(name: str, **inputs: Any) -> tuple:
    """Run a ComfyUI node's function directly (V3 ``execute`` or V1 ``FUNCTION``) and return its outputs."""
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS[name]
    if hasattr(cls, "define_schema"):
        out = cls.execute(**inputs)
        return tuple(out.result if hasattr(out, "result") else out)
    return tuple(getattr(cls(), cls.FUNCTION)(**inputs))


def with_reg(model: Any, **settings: Any) -> Any:
    return apply("REGGuidance", model=model, **{**REG, **settings})[0]


def make_plain(model: Any) -> None:
    """The reference's own escape from inference mode: ordinary copies of the model's inference-mode weights (made
    at every step, after ComfyUI loaded the model and patched its weights, e.g. with a LoRA, in inference mode)."""
    with torch.inference_mode(False), torch.no_grad():
        for module in model.model.modules():
            for table, wrap in ((module._parameters, True), (module._buffers, False)):
                for name, tensor in list(table.items()):
                    if tensor is not None and tensor.is_inference():
                        copy = tensor.clone()
                        table[name] = torch.nn.Parameter(copy, requires_grad=False) if wrap else copy


@dataclass
class ReferenceREG:
    """REG written out plainly as a PREDICT_NOISE wrapper (module docstring), for one of the estimators.

    ``positive``/``width``: where the guider puts the positive conditioning in its ``calc_cond_batch`` call and how
    long that call is; ``after``: the nodes whose post-cfg functions are not guidance (by their functions' qualified
    names). ``vjp`` (and ``vjp-low-memory``): ``D_c + a·Jᵀ𝟙 ⊙ Δ``; ``gradient-free``: ``Jᵀ𝟙`` replaced by the forward
    difference with the float32 step ``h = 1e-3·√(1+σ²)`` (VE); ``chain``: ``D_c + a·JᵀΔ``, with
    ``Δ = D_guided − D_c``; flow models' step is ``1e-3·√((1−σ)² + s²σ²)`` with their noise scale ``s``.
    """

    positive: int = 0
    width: int = 2
    after: tuple[str, ...] = ()
    estimator: str = "vjp"
    evaluations: int = 0

    def _is_after(self, fn: Any) -> bool:
        return getattr(fn, "__qualname__", "").split(".")[0] in self.after

    def _d_c(self, guider: Any, x: torch.Tensor, sigma: torch.Tensor, options: dict) -> torch.Tensor:
        import comfy.samplers

        conds = [None] * self.width
        conds[self.positive] = guider.conds["positive"]
        return comfy.samplers.calc_cond_batch(guider.inner_model, conds, x, sigma, options)[self.positive]

    def __call__(self, executor, x, sigma, model_options, seed):
        import comfy.model_sampling

        guider = executor.class_obj
        post = model_options.get("sampler_post_cfg_function", [])
        guiding = {**model_options, "sampler_post_cfg_function": [f for f in post if not self._is_after(f)]}
        d_guided = executor(x, sigma, guiding, seed)
        flow = isinstance(guider.model_patcher.get_model_object("model_sampling"), comfy.model_sampling.CONST)
        a = (1 - sigma).reshape(-1, *[1] * (x.ndim - 1)) if flow else 1.0
        with torch.inference_mode(False), torch.enable_grad():
            make_plain(guider.model_patcher)
            leaf = x.detach().clone().requires_grad_(True)
            d_c = self._d_c(guider, leaf, sigma.clone(), model_options)
            weights = (d_guided - d_c).detach().clone() if self.estimator == "chain" else torch.ones_like(d_c)
            (product,) = torch.autograd.grad(d_c, leaf, weights)
        d_c = d_c.detach()
        if self.estimator == "chain":
            result = d_c + a * product
        else:
            if self.estimator == "gradient-free":
                noise = getattr(guider.model_patcher.get_model_object("model_sampling"), "noise_scale", 1.0)
                scale = torch.sqrt((1 - sigma) ** 2 + (noise * sigma) ** 2) if flow else torch.sqrt(1 + sigma**2)
                h = 1e-3 * scale.reshape(-1, *[1] * (x.ndim - 1))
                product = (self._d_c(guider, x + h, sigma, model_options) - d_c) / h
            result = d_c + a * product * (d_guided - d_c)
        for fn in (f for f in post if self._is_after(f)):
            args = {"denoised": result, "input": x, "sigma": sigma, "cond_denoised": d_c, "model": guider.inner_model}
            result = fn({**args, "model_options": model_options, "cond_scale": getattr(guider, "cfg", 1.0)})
        self.evaluations += 1
        return result


@dataclass(frozen=True)
class Case:
    """One combination: how to patch the model and build the guider, how to sample, and what REG must do."""

    patch: Callable[[Any], Any] = lambda model: model
    guider: str = "cfg"
    cfg: float = 4.0
    sampler: str = "euler"
    steps: int = 1
    size: int = 8
    family: str = "sd15"
    estimator: str = "vjp"
    after: tuple[str, ...] = ()
    off: str | None = None  # what REG says when it cannot act
    since: tuple[int, ...] = (0, 3, 64)
    options: dict = field(default_factory=dict)
    reg_first: bool = False  # REGGuidance before the node in the model chain (its wrappers outermost)


def build_guider(kind: str, model: Any, positive: Any, negative: Any, cfg: float) -> tuple[Any, int, int]:
    """(guider, index of the positive in its calc_cond_batch call, length of that call)."""
    import comfy.samplers

    if kind == "cfg":
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return guider, 0, 2
    if kind == "dual_cfg":
        (guider,) = apply("DualCFGGuider", model=model, cond1=positive, cond2=negative, negative=negative,
                          cfg_conds=cfg, cfg_cond2_negative=2.0, style="regular")  # fmt: skip
        return guider, 2, 3
    if kind == "perp_neg":
        (guider,) = apply("PerpNegGuider", model=model, positive=positive, negative=negative,
                          empty_conditioning=negative, cfg=cfg, neg_scale=1.0)  # fmt: skip
        return guider, 0, 3
    (guider,) = apply("DualModelGuider", model=model, model_negative=model.clone(), positive=positive, cfg=cfg,
                      negative=negative)  # fmt: skip
    return guider, 0, 1


def sample(case: Case, model: Any, positive: Any, negative: Any, reference: ReferenceREG | None = None):
    """The case's sampling run: the last ``steps`` steps of its schedule, ending at σ = 0, from a fixed noise."""
    import comfy.patcher_extension
    import comfy.sample
    import comfy.samplers

    if reference is not None:
        model = model.clone()
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "reference_reg", reference)
    guider, _, _ = build_guider(case.guider, model, positive, negative, case.cfg)
    latent = torch.zeros(1, 4 if case.family == "sd15" else 16, case.size, case.size)
    sampling = model.get_model_object("model_sampling")
    if case.family == "sd15":
        sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", case.steps)
    else:  # flow models start at σ = 1, where a(σ) = 1 − σ = 0: take the second half of the schedule
        sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", 2 * case.steps)[-(case.steps + 1) :]
    noise = comfy.sample.prepare_noise(latent, 7)
    with torch.inference_mode():
        return guider.sample(noise, latent, comfy.samplers.sampler_object(case.sampler), sigmas, seed=7)


def reg_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "reg_guidance" and r.levelno >= logging.WARNING]


def check(tiny: Any, case: Case, caplog) -> None:
    """Sample the case without REG, with REG and with the reference, and assert what the case promises."""
    if tiny_models.comfyui_version() < case.since:
        pytest.skip(f"no such node in ComfyUI {'.'.join(map(str, tiny_models.comfyui_version()))}")
    model, positive, negative, _ = load_family(tiny, case.family)

    def patched():  # a fresh patch per run: nodes like SAG and APG keep state in their closures
        return case.patch(model.clone())

    settings = {"estimator": case.estimator, **case.options}
    with_both = case.patch(with_reg(model.clone(), **settings)) if case.reg_first else with_reg(patched(), **settings)
    with caplog.at_level(logging.INFO, logger="reg_guidance"):
        got = sample(case, with_both, positive, negative)
    lines = reg_lines(caplog)
    plain = sample(case, patched(), positive, negative)
    if case.off is not None:
        assert len(lines) == 1 and case.off in lines[0], lines
        assert torch.equal(got, plain)
        return
    _, index, width = build_guider(case.guider, model, positive, negative, case.cfg)
    reference = ReferenceREG(positive=index, width=width, after=case.after, estimator=case.estimator)
    want = sample(case, patched(), positive, negative, reference)
    scale = float(want.abs().max())
    tolerance = 2e-3 if case.estimator == "gradient-free" else 1e-4  # the difference's rounding, divided by h
    assert lines == [], lines
    assert reference.evaluations >= case.steps
    assert float((got - want).abs().max()) <= tolerance * scale, float((got - want).abs().max()) / scale
    assert float((got - plain).abs().max()) > 10 * tolerance * scale  # REG really acted


# --- the patches ---


def node(name: str, **inputs: Any) -> Callable[[Any], Any]:
    """A model patch that runs ComfyUI's node ``name`` on the model."""
    return lambda model: apply(name, model=model, **inputs)[0]


def label_keyed(model: Any) -> Any:
    """An attn2 patch that picks a value per chunk by its label from a (positive, negative) pair, as IP-Adapter,
    PuLID and InstantID-style patches do (a chunk labelled anything but 0 or 1 is an IndexError, as there)."""

    def patch(n, context, value, extra_options):
        labels = extra_options["cond_or_uncond"]
        per_chunk = context.shape[0] // len(labels)
        gain = torch.cat([torch.full((per_chunk, 1, 1), (1.5, 0.5)[i], dtype=context.dtype) for i in labels])
        return n, context * gain.to(context.device), value

    model.set_model_attn2_patch(patch)
    return model


def attention_blocks(model: Any) -> list[tuple[str, int]]:
    """The UNet blocks (as ComfyUI names them in ``transformer_options["block"]``) that hold attention."""
    from comfy.ldm.modules.attention import SpatialTransformer

    unet = model.model.diffusion_model
    found = []
    for name, blocks in (("input", unet.input_blocks), ("middle", [unet.middle_block]), ("output", unet.output_blocks)):
        found += [(name, i) for i, block in enumerate(blocks) if any(isinstance(m, SpatialTransformer) for m in block)]
    return found


def block_keyed(model: Any) -> Any:
    """attn2 replace patches on two blocks, each scaling the attention's values by its own factor."""
    from comfy.ldm.modules import attention

    def scaled(factor: float):
        def replace(q, k, v, extra_options):
            return attention.optimized_attention(q, k, v * factor, extra_options["n_heads"])

        return replace

    for (name, number), factor in zip(attention_blocks(model)[:2], (1.8, 0.4), strict=True):
        model.set_model_attn2_replace(scaled(factor), name, number)
    return model


def context_windows(model: Any) -> Any:
    """ComfyUI's manual context windows over the latent's width (4 of 8 columns, overlapping by 2)."""
    import inspect

    import nodes

    node_class = nodes.NODE_CLASS_MAPPINGS["ContextWindowsManual"]
    options = node_class.GET_SCHEMA().inputs
    schedule = next(i for i in options if i.id == "context_schedule").options[0]
    inputs = {"context_length": 4, "context_overlap": 2, "context_schedule": schedule, "context_stride": 1,
              "closed_loop": False, "fuse_method": "pyramid", "dim": 3, "freenoise": False}  # fmt: skip
    accepted = inspect.signature(node_class.execute).parameters
    return apply("ContextWindowsManual", model=model, **{k: v for k, v in inputs.items() if k in accepted})[0]


def easycache(model: Any) -> Any:
    return apply("EasyCache", model=model, reuse_threshold=0.2, start_percent=0.15, end_percent=0.95, verbose=False)[0]


CFG1_OFF = "cfg is 1 and no guidance hook is set"
WHOLE_RUN = {"start_percent": 0.0, "end_percent": 1.0}
SLG = {"double_layers": "1", "single_layers": "", **WHOLE_RUN}
DEEP_SHRINK = {"block_number": 1, "downscale_factor": 2.0, **WHOLE_RUN, "downscale_after_skip": True,
               "downscale_method": "bicubic", "upscale_method": "bicubic"}  # fmt: skip
CASES = {
    "label-keyed attention patch, vjp": Case(label_keyed),
    "label-keyed attention patch, gradient-free": Case(label_keyed, estimator="gradient-free"),
    "label-keyed attention patch, vjp-low-memory": Case(label_keyed, estimator="vjp-low-memory"),
    "block-keyed replace patch, vjp": Case(block_keyed),
    "block-keyed replace patch, vjp-low-memory": Case(block_keyed, estimator="vjp-low-memory"),
    "block-keyed replace patch, gradient-free": Case(block_keyed, estimator="gradient-free"),
    "block-keyed replace patch, chain": Case(block_keyed, estimator="chain"),
    "SelfAttentionGuidance, 32x32": Case(node("SelfAttentionGuidance", scale=0.5, blur_sigma=2.0), size=32),
    "NAGuidance at cfg 1": Case(node("NAGuidance", nag_scale=5.0, nag_alpha=0.5, nag_tau=1.5), cfg=1.0, since=(0, 33)),
    "PerturbedAttentionGuidance": Case(node("PerturbedAttentionGuidance", scale=3.0)),
    "PerturbedAttentionGuidance at cfg 1": Case(node("PerturbedAttentionGuidance", scale=3.0), cfg=1.0),
    "SkipLayerGuidanceDiT": Case(node("SkipLayerGuidanceDiT", **SLG, scale=3.0, rescaling_scale=0.0), family="sd3"),
    "SkipLayerGuidanceDiTSimple": Case(node("SkipLayerGuidanceDiTSimple", **SLG), family="sd3"),
    "APG": Case(node("APG", eta=1.0, norm_threshold=5.0, momentum=0.5), steps=2),
    "CFGZeroStar": Case(node("CFGZeroStar")),
    "CFGNorm": Case(node("CFGNorm", strength=1.0)),
    "RescaleCFG": Case(node("RescaleCFG", multiplier=0.7)),
    "Mahiro": Case(node("Mahiro")),
    "EpsilonScaling (after REG)": Case(node("Epsilon Scaling", scaling_factor=1.005), after=("EpsilonScaling",)),
    "EpsilonScaling at cfg 1": Case(node("Epsilon Scaling", scaling_factor=1.005), cfg=1.0, off=CFG1_OFF),
    "CFGOverride at base cfg 1": Case(node("CFGOverride", cfg=4.0, **WHOLE_RUN), cfg=1.0, since=(0, 33)),
    "CFGOverride at base cfg 1, after REG": Case(
        node("CFGOverride", cfg=4.0, **WHOLE_RUN), cfg=1.0, since=(0, 33), reg_first=True
    ),
    "CFGOverride to cfg 1": Case(node("CFGOverride", cfg=1.0, **WHOLE_RUN), off=CFG1_OFF, since=(0, 33)),
    "DualCFGGuider": Case(guider="dual_cfg"),
    "PerpNegGuider": Case(guider="perp_neg"),
    "DualModelGuider": Case(guider="dual_model", since=(0, 33)),
    "FreeU_V2": Case(node("FreeU_V2", b1=1.3, b2=1.4, s1=0.9, s2=0.2)),
    "PatchModelAddDownscale (Kohya Deep Shrink)": Case(node("PatchModelAddDownscale", **DEEP_SHRINK), size=16),
    "TCFG": Case(node("TCFG")),
    "FreSca": Case(node("FreSca", scale_low=1.0, scale_high=1.25, freq_cutoff=2)),
    "TemporalScoreRescaling (after REG)": Case(
        node("TemporalScoreRescaling", tsr_k=0.95, tsr_sigma=1.0), after=("TemporalScoreRescaling",), since=(0, 33)
    ),
    "context windows": Case(lambda model: context_windows(model), steps=2, off="context windows"),
    "EasyCache": Case(easycache, steps=4, off="EasyCache serves cached predictions"),
    "euler_cfg_pp sampler": Case(sampler="euler_cfg_pp", cfg=1.5),
    "heun (two evaluations per step)": Case(sampler="heun", steps=2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_combination(tiny, reg_pack, caplog, name):
    check(tiny, CASES[name], caplog)


def test_deep_shrink_changes_the_tiny_unets_step(tiny, reg_pack):
    """The premise of the Deep Shrink case: on the tiny UNet the patch changes the step."""
    model, positive, negative, _ = load_family(tiny, "sd15")
    case = CASES["PatchModelAddDownscale (Kohya Deep Shrink)"]
    patched = sample(case, case.patch(model.clone()), positive, negative)
    plain = sample(case, model.clone(), positive, negative)
    assert float((patched - plain).abs().max()) > 1e-2 * float(plain.abs().max())


@contextlib.contextmanager
def attention_without_backward(monkeypatch, *, honours_override: bool) -> Iterator[None]:
    """A weightless attention kernel without a backward, installed as ``--use-sage-attention`` installs sage: a fresh
    tensor without a graph. ``honours_override``: registered through ComfyUI's ``wrap_attn`` like the real kernels."""
    from comfy.ldm.modules import attention

    sdpa = getattr(attention.attention_pytorch, "__wrapped__", attention.attention_pytorch)

    def kernel(q, k, v, heads, *args, **kwargs):
        with torch.no_grad():
            return sdpa(q, k, v, heads, *args, **kwargs)

    installed = attention.wrap_attn(kernel) if honours_override else kernel
    monkeypatch.setattr(attention, "optimized_attention", installed)
    monkeypatch.setattr(attention, "optimized_attention_masked", installed)
    yield


def test_an_attention_kernel_without_backward_gives_the_exact_m(tiny, reg_pack, caplog, monkeypatch):
    """The differentiated pass routes attention through a kernel with a backward (and so does the step's negative):
    REG under the kernel equals the reference computed with ComfyUI's own CPU kernel."""
    case = Case()
    model, positive, negative, _ = load_family(tiny, "sd15")
    want = sample(case, model.clone(), positive, negative, ReferenceREG())
    with attention_without_backward(monkeypatch, honours_override=True):
        with caplog.at_level(logging.WARNING, logger="reg_guidance"):
            got = sample(case, with_reg(model.clone()), positive, negative)
    assert reg_lines(caplog) == []
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


def test_a_kernel_that_cannot_be_rerouted_is_caught_by_the_jacobian_audit(tiny, reg_pack, caplog, monkeypatch):
    """No override reaches a kernel called without ComfyUI's wrapper: the audit ⟨Jᵀ𝟙, v⟩ = 𝟙ᵀJv sees the cut,
    and REG falls back to the gradient-free estimator with one warning naming why."""
    case = Case()
    model, positive, negative, _ = load_family(tiny, "sd15")
    with attention_without_backward(monkeypatch, honours_override=False):
        with caplog.at_level(logging.WARNING, logger="reg_guidance"):
            got = sample(case, with_reg(model.clone()), positive, negative)
        lines = reg_lines(caplog)
        gradient_free = sample(case, with_reg(model.clone(), estimator="gradient-free"), positive, negative)
    assert len(lines) == 1 and "misses part of the network" in lines[0] and "gradient-free" in lines[0], lines
    assert torch.equal(got, gradient_free)


def test_a_lora_loaded_through_lora_loader(tiny, reg_pack, caplog, tiny_lora):
    """LoRA weights are patched into the model inside ComfyUI's inference mode; REG's pass must still see them."""
    import nodes

    _, clip, _ = nodes.CheckpointLoaderSimple().load_checkpoint(tiny.sd15_checkpoint)[:3]

    def lora(model):
        return apply("LoraLoader", model=model, clip=clip, lora_name=tiny_lora, strength_model=1.0,
                     strength_clip=1.0)[0]  # fmt: skip

    model, positive, negative, _ = load_family(tiny, "sd15")
    case = Case(lora)
    with_lora = sample(case, lora(model.clone()), positive, negative)
    assert not torch.equal(with_lora, sample(case, model, positive, negative))
    check(tiny, case, caplog)


def check_conditionings(model: Any, plain_conds: tuple, conds: tuple, caplog) -> None:
    """REG's step with the (positive, negative) ``conds`` equals the reference, and ``conds`` change the step compared
    with ``plain_conds`` by 10× the tolerance (the premise)."""
    case = Case()
    with caplog.at_level(logging.INFO, logger="reg_guidance"):
        got = sample(case, with_reg(model.clone()), *conds)
    plain = sample(case, model.clone(), *conds)
    want = sample(case, model.clone(), *conds, ReferenceREG())
    scale = float(want.abs().max())
    assert float((plain - sample(case, model.clone(), *plain_conds)).abs().max()) > 1e-3 * scale
    assert reg_lines(caplog) == []
    assert float((got - want).abs().max()) <= 1e-4 * scale, float((got - want).abs().max()) / scale
    assert float((got - plain).abs().max()) > 1e-3 * scale  # REG really acted


@pytest.mark.parametrize("hooked", ["positive", "negative", "both"])
def test_lora_hooks_on_the_conditioning(tiny, reg_pack, caplog, tiny_lora, hooked):
    """ComfyUI's hooks (Create Hook LoRA + Cond Set Props) patch the weights for the conds that carry them, in each
    ``calc_cond_batch`` call: REG's differentiated pass must see the positive's weights, its negative pass the
    negative's (``both``: a different strength each)."""
    model, positive, negative, _ = load_family(tiny, "sd15")

    def hook(cond, strength):
        hooks = apply("CreateHookLora", lora_name=tiny_lora, strength_model=strength, strength_clip=1.0)[0]
        return apply("ConditioningSetProperties", cond_NEW=cond, strength=1.0, set_cond_area="default", hooks=hooks)[0]

    pos = hook(positive, 1.0) if hooked != "negative" else positive
    neg = hook(negative, -1.5 if hooked == "both" else 1.0) if hooked != "positive" else negative
    check_conditionings(model, (positive, negative), (pos, neg), caplog)


@pytest.mark.parametrize("region", ["area", "mask"])
def test_regional_prompts_combined_into_the_positive(tiny, reg_pack, caplog, region):
    """A positive made of several conditionings, one limited to a region (Conditioning Set Area or Set Mask, then
    Conditioning Combine): ComfyUI predicts each and blends them by area and strength; M is that blend's."""
    model, positive, negative, _ = load_family(tiny, "sd15")
    if region == "area":
        left = apply("ConditioningSetArea", conditioning=negative, width=32, height=64, x=0, y=0, strength=1.5)[0]
    else:
        mask = torch.zeros(1, 64, 64)
        mask[:, 16:48, 8:40] = 1.0
        left = apply("ConditioningSetMask", conditioning=negative, mask=mask, strength=1.5, set_cond_area="default")[0]
    combined = apply("ConditioningCombine", conditioning_1=positive, conditioning_2=left)[0]
    check_conditionings(model, (positive, negative), (combined, negative), caplog)


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_differential_diffusion_masks_m_as_it_masks_the_step(tiny, reg_pack, caplog, strength):
    """Differential Diffusion replaces the sampler's denoise mask at every evaluation (a soft mask thresholded by the
    step's progress, blended with it below strength 1): REG's M is that of the denoiser the sampler really uses, so a
    KSampler run equals the reference differentiated through ComfyUI's own masking step by step."""
    import comfy.sample
    import comfy.samplers
    from comfy_extras.nodes_differential_diffusion import DifferentialDiffusion
    from test_families import CFG, SEED, reference_run
    from test_modern_models import max_error

    import nodes

    model, positive, negative, _ = load_family(tiny, "sd15")
    differential = DifferentialDiffusion.execute(model, strength).result[0]
    samples = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    mask = torch.linspace(0, 1, 8).expand(1, 1, 8, 8).clone()  # keep the left, repaint the right
    latent, steps = {"samples": samples, "noise_mask": mask}, 3

    def run(m):
        with torch.inference_mode():
            return nodes.KSampler().sample(m, SEED, steps, CFG, "euler", "normal", positive, negative, latent)[0]

    with caplog.at_level(logging.INFO, logger="reg_guidance"):
        got = run(with_reg(differential))["samples"]
    assert reg_lines(caplog) == []
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
    noise = comfy.sample.prepare_noise(samples, SEED)
    want, _ = reference_run(differential, positive, negative, samples, sigmas, noise, denoise_mask=mask)
    assert max_error(got, want) <= 1e-4
    plain = run(differential)["samples"]
    assert max_error(plain, want) > 1e-3  # REG really acted
    assert max_error(run(model.clone())["samples"], plain) > 1e-3  # and Differential's masks are not the sampler's


def test_a_compiled_model_is_exact_and_reg_stays_out_of_the_compiler(tiny, reg_pack, caplog):
    """TorchCompileModel's wrapper (ComfyUI's ``set_torch_compile_wrapper``; backend aot_eager: the same tracing and
    AOTAutograd as inductor, without its C++ build): REG's step equals the reference, and torch.compile never compiles
    REG's bookkeeping (the saved-tensor hooks), which it would otherwise recompile for every tensor they see."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    model, positive, negative, _ = load_family(tiny, "sd15")
    compiled = model.clone()
    set_torch_compile_wrapper(compiled, backend="aot_eager")
    case = Case()
    torch_log = logging.getLogger("torch")  # torch may stop its loggers propagating to the root logger
    torch_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO):
            got = sample(case, with_reg(compiled.clone()), positive, negative)
        plain = sample(case, compiled.clone(), positive, negative)
    finally:
        torch_log.removeHandler(caplog.handler)
        torch._dynamo.reset()
    assert reg_lines(caplog) == []
    assert not [r.getMessage() for r in caplog.records if f"/{PACK_NAME}/" in r.getMessage()]  # a frame of REG's
    want = sample(case, model.clone(), positive, negative, ReferenceREG())
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-4 * scale, float((got - want).abs().max()) / scale
    assert float((got - plain).abs().max()) > 1e-3 * scale


def flow_sampling(model: Any, kind: type, noise_scale: float = 1.0) -> Any:
    """The model with a flow model-sampling object of ``kind`` (as ComfyUI's ModelSampling nodes patch it)."""
    import comfy.model_sampling

    class Sampling(comfy.model_sampling.ModelSamplingDiscreteFlow, kind):
        pass

    sampling = Sampling(model.model.model_config)
    sampling.set_parameters(shift=3.0)
    sampling.set_noise_scale(noise_scale)
    patched = model.clone()
    patched.add_object_patch("model_sampling", sampling)
    return patched


@pytest.mark.parametrize("estimator", ["vjp", "gradient-free"])
def test_a_flow_model_with_a_noise_scale(tiny, reg_pack, caplog, estimator):
    """HiDream-O1 adds noise at 8× the usual scale (``x = (1−σ)x0 + sσε``): a(σ) stays 1 − σ and the difference step
    follows the state's scale √((1−σ)² + s²σ²)."""
    import comfy.model_sampling

    if tiny_models.comfyui_version() < (0, 33):
        pytest.skip("ComfyUI 0.3.64's flow sampling has no noise scale")
    scaled = functools.partial(flow_sampling, kind=comfy.model_sampling.CONST, noise_scale=8.0)
    check(tiny, Case(scaled, family="sd3", estimator=estimator), caplog)


def test_a_model_that_adds_no_noise_is_left_alone(tiny, reg_pack, caplog):
    """An image-to-image flow (Wan FlowRVS, ``IMG_TO_IMG_FLOW``) adds no noise: there is no noise level for M."""
    import comfy.model_sampling

    if not hasattr(comfy.model_sampling, "IMG_TO_IMG_FLOW"):
        pytest.skip("ComfyUI 0.3.64 has no image-to-image flow models")
    no_noise = functools.partial(flow_sampling, kind=comfy.model_sampling.IMG_TO_IMG_FLOW)
    check(tiny, Case(no_noise, family="sd3", off="the model adds no noise"), caplog)
