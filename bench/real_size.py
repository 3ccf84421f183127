"""REG at real model sizes: full-size random-weight networks built at run time through ComfyUI's own classes and loader.

Imported by ``bench_reg.py --real-size`` (and ``--gpu``) under ComfyUI's interpreter; nothing is written to disk.

Models (``--models``; each built from ComfyUI's own supported-model class, then loaded by
``comfy.sd.load_diffusion_model_state_dict``, which detects the architecture from the keys and must pick the
expected class):

=========  ==============================================================  =====================
key        network                                                          ComfyUI class
=========  ==============================================================  =====================
sd15       SD1.5 UNet, 860M parameters (ε)                                  SD15
sdxl       SDXL base UNet, 2.6B parameters (ε, adm ``y``)                    SDXL
sd35m      SD3.5-Medium-size MMDiT-X: depth 24, hidden 1536, 2.2B (flow)    SD35 / SD3
flux       Flux-size DiT at full width (hidden 3072, 24 heads), no guidance  FluxSchnell
           embedding (true CFG); depth ``--flux-depth`` (full: 19 double +
           38 single blocks = 11.9B; on a CPU box a reduced depth, labelled)
=========  ==============================================================  =====================

With ``--tiny`` every family is replaced by a tiny network of the same class (the dry run of the GPU check).

Weights. The loader needs a state dict; holding a second full copy of a 2.6B model would double the build's memory.
Where ComfyUI copies the state dict into its own parameters (the plain ModelPatcher: CPU, or DynamicVRAM off) the
state dict holds zero-stride views of one scalar (no memory) and the loaded parameters are filled in place afterwards;
where it adopts the tensors (``assign``, ComfyUI's DynamicVRAM patcher) real tensors are generated first. Either way
every tensor gets the same values: a generator seeded from the tensor's name; 1-D ``*.weight`` (norm scales) 1, other
1-D tensors N(0, 0.02²), tensors with ≥ 2 dims N(0, 1/fan_in) (as tests/integration/tiny_models.py), rounded to the
store dtype of real checkpoints (fp16 for the UNets and SD3.5, bf16 for Flux). The text conditioning is random
(context and pooled vectors of the family's real widths); the models are loaded outside inference mode.

Compute dtype. ComfyUI picks it: on a GPU 16-bit for these models; on the CPU float32 (bf16 weights are cast per
layer: ``manual_cast``). :func:`compute_dtype` switches a loaded model to another compute dtype on the same weights
the way ComfyUI's manual cast does it (``manual_cast_dtype`` + per-layer ``comfy_cast_weights``), for the precision
rows: M (the vjp column sums ∇_x Σ D_c and the gradient-free forward difference, both as the runtime computes them)
in bf16/fp16 against float32, :func:`bench.benchlib.map_agreement` (cosine and relative L2).

Exactness (:func:`exactness`). One KSampler step (to σ = 0, so the result is the denoised itself) with REG through the
``REGGuidance`` node against an independent reference through ComfyUI's sampling function: the conditional pass
differentiated by plain autograd with ``comfy.model_management.in_training`` on (plain-torch code paths where a
custom kernel has no backward) and every saved tensor cloned (``saved_tensors_hooks``), so in-place updates and reused
weight buffers cannot reach the reference; ``D_c + a(σ)·∇_xΣD_c ⊙ (D_cfg − D_c)`` with a = 1 (ε) or 1 − σ (flow).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from bench.benchlib import map_agreement, release_memory

log = logging.getLogger("bench_reg.real_size")

CFG_SCALE = 4.0
SEED = 2025

SD15 = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
SD15_TINY = {
    **SD15,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 1],
    "transformer_depth": [0, 1],
    "transformer_depth_output": [0, 0, 1, 1],
}
SDXL = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "in_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
# The smallest network ComfyUI loads with SDXL's model class: Segmind Vega's depths at one width (detection matches
# SDXL's per-block depths exactly, so a smaller SDXL would not load as SDXL).
SDXL_TINY = {
    **SDXL,
    "transformer_depth": [0, 0, 1, 1, 2, 2],
    "transformer_depth_output": [1, 0, 0, 0, 0, 0, 0, 0, 0],
    "channel_mult": [1, 1, 1],
    "transformer_depth_middle": -1,
}


def mmdit_config(depth: int, x_self_attn: int, pos_embed_max_size: int) -> dict:
    """An SD3-family MMDiT as ComfyUI's detection reads it back (hidden = 64·depth, heads = depth)."""
    hidden = 64 * depth
    return {
        "in_channels": 16,
        "patch_size": 2,
        "out_channels": 16,
        "depth": depth,
        "input_size": None,
        "adm_in_channels": 2048,
        "context_embedder_config": {
            "target": "torch.nn.Linear",
            "params": {"in_features": 4096, "out_features": hidden},
        },
        "num_patches": pos_embed_max_size**2,
        "pos_embed_max_size": pos_embed_max_size,
        "qk_norm": "rms",
        "pos_embed_scaling_factor": None,
        "x_block_self_attn_layers": list(range(x_self_attn)),
    }


def flux_config(hidden: int, depth: int, single: int, context: int) -> dict:
    """A Flux DiT (schnell layout: no guidance embedding, so true CFG applies); heads = hidden / 128."""
    return {
        "image_model": "flux",
        "in_channels": 16,
        "out_channels": 16,
        "vec_in_dim": 768,
        "context_in_dim": context,
        "hidden_size": hidden,
        "mlp_ratio": 4.0,
        "num_heads": hidden // 128,
        "depth": depth,
        "depth_single_blocks": single,
        "axes_dim": [16, 56, 56],
        "theta": 10000,
        "patch_size": 2,
        "qkv_bias": True,
        "guidance_embed": False,
    }


FLUX_FULL_DEPTH = (19, 38)


@dataclass(frozen=True)
class Arch:
    """One family: how its network is configured, stored and conditioned."""

    key: str
    label: str
    config: Callable[[bool, tuple[int, int]], dict]  # (tiny, flux depth) -> the unet config
    classes: tuple[str, ...]  # comfy.supported_models classes the loader may pick
    channels: int
    context: tuple[int, int]  # (tokens, width) of the text conditioning
    pooled: int | None
    store_dtype: torch.dtype
    one_step: dict = field(default_factory=dict)  # KSampler scheduler / denoise of the exactness step


ARCHS = {
    "sd15": Arch(
        "sd15", "SD1.5 UNet", lambda tiny, _d: dict(SD15_TINY if tiny else SD15), ("SD15",), 4, (77, 768), None,
        torch.float16, {"scheduler": "normal", "denoise": 1.0},
    ),
    "sdxl": Arch(
        "sdxl", "SDXL UNet", lambda tiny, _d: dict(SDXL_TINY if tiny else SDXL), ("SDXL", "Segmind_Vega"), 4,
        (77, 2048), 1280, torch.float16, {"scheduler": "normal", "denoise": 1.0},
    ),
    "sd35m": Arch(
        "sd35m", "SD3.5-Medium-size MMDiT",
        lambda tiny, _d: mmdit_config(2, 1, 32) if tiny else mmdit_config(24, 13, 384),
        ("SD35", "SD3"), 16, (154, 4096), 2048, torch.float16, {"scheduler": "simple", "denoise": 0.5},
    ),
    "flux": Arch(
        "flux", "Flux-size DiT",
        lambda tiny, depth: flux_config(128, 1, 1, 64) if tiny else flux_config(3072, *depth, 4096),
        ("FluxSchnell", "Flux"), 16, (256, 4096), 768, torch.bfloat16, {"scheduler": "simple", "denoise": 0.5},
    ),
}  # fmt: skip
TINY_CONTEXT = {"flux": (8, 64)}


def family_label(key: str, params: int, tiny: bool, flux_depth: tuple[int, int]) -> str:
    """A label that says what the network is, e.g. ``Flux-size DiT (full width, 2+4 of 19+38 blocks, 1.33B)``."""
    arch = ARCHS[key]
    size = f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.1f}M"
    if tiny:
        return f"tiny {arch.label}-class network ({size})"
    if key == "flux" and tuple(flux_depth) != FLUX_FULL_DEPTH:
        full = "+".join(map(str, FLUX_FULL_DEPTH))
        return f"{arch.label} (full width, {flux_depth[0]}+{flux_depth[1]} of {full} blocks, {size})"
    return f"{arch.label} ({size})"


def random_tensor(name: str, shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The deterministic float32 value of one weight (see the module docstring for the rule)."""
    if len(shape) == 1 and name.endswith(".weight"):
        return torch.ones(shape, device=device)
    gen = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    value = torch.randn(shape, generator=gen, device=device)
    if len(shape) <= 1:
        return value.mul_(0.02)
    return value.mul_(1.0 / math.sqrt(math.prod(shape[1:])))


def _supported_config(unet_config: dict):
    import comfy.model_detection

    config = comfy.model_detection.model_config_from_unet_config(dict(unet_config), None)
    if config is None:
        raise RuntimeError(f"no ComfyUI model class matches {unet_config}")
    return config


def _shapes(unet_config: dict) -> dict[str, torch.Size]:
    """Key -> shape of the diffusion model ComfyUI builds for ``unet_config``, constructed on the meta device."""
    config = _supported_config(unet_config)
    config.set_inference_dtype(torch.float32, None)
    with torch.device("meta"):
        module = config.get_model({}).diffusion_model
    return {k: v.shape for k, v in module.state_dict().items()}


def _adopts_tensors() -> bool:
    """Whether ComfyUI's loader will adopt the state dict's tensors (``assign``) rather than copy them."""
    import comfy.model_management
    import comfy.model_patcher

    dynamic = comfy.model_patcher.CoreModelPatcher is not comfy.model_patcher.ModelPatcher
    return dynamic and not comfy.model_management.is_device_cpu(comfy.model_management.get_torch_device())


def _fill_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@dataclass
class Built:
    """A loaded real-size model with its random conditioning."""

    key: str
    label: str
    patcher: Any
    positive: list
    negative: list
    channels: int
    params: int
    weight_dtype: torch.dtype
    compute: torch.dtype
    build_seconds: float

    def family(self) -> Any:
        """As the ComfyUI benchmark's :class:`bench.comfy_bench.Family`."""
        from bench.comfy_bench import Family

        return Family(self.key, self.label, self.patcher, self.positive, self.negative, self.channels, self.params)


def build(
    key: str, *, tiny: bool = False, dtype: torch.dtype | None = None, flux_depth: tuple[int, int] = FLUX_FULL_DEPTH
) -> Built:
    """Build family ``key`` through ``comfy.sd.load_diffusion_model_state_dict`` (see the module docstring).

    ``dtype`` is the loader's ``model_options["dtype"]`` (the weight dtype; None: ComfyUI's choice for the device).
    """
    import comfy.sd

    arch = ARCHS[key]
    start = time.perf_counter()
    config = arch.config(tiny, tuple(flux_depth))
    if key == "flux":
        import comfy.ldm.flux.model

        if "txt_ids_dims" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:
            config["txt_ids_dims"] = []
    shapes = _shapes(config)
    adopt = _adopts_tensors()
    fill = _fill_device()
    log.info("%s: building %d tensors (%s)", key, len(shapes), "adopted by the loader" if adopt else "filled in place")
    if adopt:
        state = {n: random_tensor(n, tuple(s), SEED, fill).to(arch.store_dtype).cpu() for n, s in shapes.items()}
    else:
        zero = torch.zeros((), dtype=arch.store_dtype)
        state = {n: zero.expand(s) for n, s in shapes.items()}
    options = {} if dtype is None else {"dtype": dtype}
    patcher = comfy.sd.load_diffusion_model_state_dict(state, model_options=options)
    del state
    if patcher is None:
        raise RuntimeError(f"ComfyUI's loader did not detect the {key} network")
    found = type(patcher.model.model_config).__name__
    if found not in arch.classes:
        raise RuntimeError(f"{key} loaded as {found}, expected one of {arch.classes}")
    module = patcher.model.diffusion_model
    if not adopt:
        with torch.no_grad():
            for name, tensor in module.state_dict(keep_vars=True).items():
                if name in shapes:
                    value = random_tensor(name, tuple(tensor.shape), SEED, fill).to(arch.store_dtype)
                    tensor.copy_(value)
    params = sum(p.numel() for p in module.parameters())
    base = patcher.model
    compute = base.get_dtype_inference() if hasattr(base, "get_dtype_inference") else base.get_dtype()
    positive, negative = conditioning(key, tiny, SEED), conditioning(key, tiny, SEED + 1)
    release_memory()
    seconds = time.perf_counter() - start
    label = family_label(key, params, tiny, flux_depth)
    log.info("%s: %s loaded as %s, weights %s, compute %s, in %.0f s", key, label, found, base.get_dtype(), compute,
             seconds)  # fmt: skip
    return Built(key, label, patcher, positive, negative, arch.channels, params, base.get_dtype(), compute, seconds)


def conditioning(key: str, tiny: bool, seed: int) -> list:
    """ComfyUI conditioning without text encoders: random context (and pooled output) of the family's widths."""
    arch = ARCHS[key]
    tokens, width = TINY_CONTEXT.get(key, arch.context) if tiny else arch.context
    gen = torch.Generator().manual_seed(seed)
    extra = {} if arch.pooled is None else {"pooled_output": torch.randn(1, arch.pooled, generator=gen)}
    return [[torch.randn(1, tokens, width, generator=gen), extra]]


@contextlib.contextmanager
def compute_dtype(base: Any, dtype: torch.dtype) -> Iterator[None]:
    """Run ``base`` (a ComfyUI BaseModel) in ``dtype`` on its own weights as ComfyUI's manual cast does; then restore.

    ``manual_cast_dtype`` (what ``apply_model`` casts the inputs to) becomes ``dtype`` unless it is the weight dtype,
    and every ComfyUI op casts its weight to the input's dtype per call (``comfy_cast_weights``).
    """
    modules = [m for m in base.diffusion_model.modules() if hasattr(m, "comfy_cast_weights")]
    own = [("comfy_cast_weights" in vars(m), m.comfy_cast_weights) for m in modules]
    old = base.manual_cast_dtype
    base.manual_cast_dtype = None if dtype == base.get_dtype() else dtype
    for m in modules:
        m.comfy_cast_weights = True
    try:
        yield
    finally:
        base.manual_cast_dtype = old
        for m, (had, value) in zip(modules, own, strict=True):
            if had:
                m.comfy_cast_weights = value
            else:
                del m.comfy_cast_weights


@contextlib.contextmanager
def independent_autograd() -> Iterator[None]:
    """Plain autograd through any ComfyUI model: ``in_training`` on (ComfyUI's switch to plain-torch code where a
    custom kernel, e.g. comfy_kitchen's rotary embedding, has no backward) and every saved tensor cloned, so in-place
    updates after the save (Flux's residual ``+=``) and reused weight buffers cannot reach the gradient."""
    import comfy.model_management

    previous = getattr(comfy.model_management, "in_training", False)
    comfy.model_management.in_training = True
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t), torch.enable_grad():
            yield
    finally:
        comfy.model_management.in_training = previous


@dataclass
class Precision:
    """M in a low-precision compute dtype against float32 on the same weights and input."""

    label: str
    size: int
    dtype: str
    vjp: tuple[float, float]  # (cosine, relative L2) of ∇_x Σ D_c
    gradient_free: tuple[float, float]  # the same for the runtime's forward difference


def precision_rows(bench: Any, fam: Any, size: int, dtypes: list[torch.dtype]) -> list[Precision]:
    """For each of ``dtypes``: M by vjp and by the runtime's forward difference, against the float32 values."""

    def measure(guider, x, sigma, model_options):
        import comfy.model_sampling

        base = guider.inner_model
        pos = guider.conds["positive"]
        s = sigma * x.new_ones(x.shape[0])
        flow = isinstance(base.model_sampling, comfy.model_sampling.CONST)

        def maps() -> tuple[torch.Tensor, torch.Tensor]:
            import comfy.samplers

            from bench.comfy_bench import _graph_forward

            with torch.inference_mode(False), independent_autograd():
                outs, leaf = _graph_forward(base, [pos], x, s, model_options)
                (grad,) = torch.autograd.grad(outs[0].float().sum(), leaf)
            del outs, leaf
            h = bench.fd_step(base, s, x, flow)
            with torch.no_grad():
                d0 = comfy.samplers.calc_cond_batch(base, [pos], x, s, model_options)[0].float()
                d1 = comfy.samplers.calc_cond_batch(base, [pos], x + h, s, model_options)[0].float()
            return grad.float().cpu(), ((d1 - d0) / h).cpu()

        with compute_dtype(base, torch.float32):
            ref = maps()
        rows = []
        for dt in dtypes:
            with compute_dtype(base, dt):
                got = maps()
            rows.append(Precision(fam.label, size, str(dt).removeprefix("torch."), map_agreement(got[0], ref[0]),
                                  map_agreement(got[1], ref[1])))  # fmt: skip
        return rows

    return bench.in_sampling_context(fam, size, measure)


@dataclass
class Exactness:
    """One REG step against the independent reference (:func:`exactness`)."""

    label: str
    size: int
    estimator: str
    compute: str
    output_rel: float  # ‖got − want‖ / ‖want‖
    effect_rel: float  # ‖(got − cfg) − (want − cfg)‖ / ‖want − cfg‖: the error of REG's correction itself
    tolerance: float
    seconds: float

    @property
    def ok(self) -> bool:
        return self.effect_rel <= self.tolerance


# REG's correction from the runtime against the reference. float32: rounding only. 16-bit: both are computed in the
# low precision by different code (the reference with in_training's plain-torch paths and cloned saved tensors), and M
# from bf16 differs from float32 by a few per cent; a weight buffer reused before the backward, or a layer dropped from
# the graph, changes M by O(1).
EXACT_TOLERANCE = {torch.float32: 1e-4, torch.float16: 0.1, torch.bfloat16: 0.1}


def _one_step_sigmas(patcher: Any, setup: dict) -> torch.Tensor:
    import comfy.samplers

    sampling = patcher.get_model_object("model_sampling")
    return comfy.samplers.calculate_sigmas(sampling, setup["scheduler"], int(1 / setup["denoise"]))[-2:]


def _sample_one_step(model: Any, fam: Any, latent: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    import comfy.sample
    import comfy.samplers

    noise = comfy.sample.prepare_noise(latent, SEED)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(fam.positive, fam.negative)
    guider.set_cfg(CFG_SCALE)
    sampler = comfy.samplers.ksampler("euler")
    return guider.sample(noise, latent, sampler, sigmas, seed=SEED, disable_pbar=True).float().cpu()


def reference_one_step(fam: Any, latent: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The independent one-step REG reference (module docstring), through ComfyUI's guider and sampling."""
    import comfy.model_sampling
    import comfy.sample
    import comfy.samplers

    flow = isinstance(fam.model.get_model_object("model_sampling"), comfy.model_sampling.CONST)
    guider = comfy.samplers.CFGGuider(fam.model)
    guider.set_conds(fam.positive, fam.negative)
    guider.set_cfg(CFG_SCALE)

    def one_step(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        s = sigmas[0] * x.new_ones(x.shape[0])
        with torch.no_grad():
            d_cfg = model_k(x, s, **extra_args)
        guider.cfg = 1.0  # ComfyUI then skips the negative pass: D_c alone
        try:
            with independent_autograd():
                leaf = x.detach().clone().requires_grad_(True)
                d_c = model_k(leaf, s, **extra_args)
                (grad,) = torch.autograd.grad(d_c.float().sum(), leaf)
        finally:
            guider.cfg = CFG_SCALE
        a = (1 - s).reshape(-1, 1, 1, 1) if flow else 1.0
        d_c = d_c.detach()
        return d_c + (a * grad).to(d_c.dtype) * (d_cfg - d_c)

    noise = comfy.sample.prepare_noise(latent, SEED)
    sampler = comfy.samplers.KSAMPLER(one_step)
    return guider.sample(noise, latent, sampler, sigmas, seed=SEED, disable_pbar=True).float().cpu()


def exactness(bench: Any, fam: Any, arch_key: str, size: int, estimators: list[str]) -> list[Exactness]:
    """One REG step per estimator (through the REGGuidance node) against :func:`reference_one_step`."""
    from bench.benchlib import Config

    base = fam.model.model
    compute = base.get_dtype_inference() if hasattr(base, "get_dtype_inference") else base.get_dtype()
    latent = torch.zeros(1, fam.channels, size, size)
    sigmas = _one_step_sigmas(fam.model, ARCHS[arch_key].one_step)
    cfg_out = _sample_one_step(fam.model, fam, latent, sigmas)
    want = reference_one_step(fam, latent, sigmas)
    rows = []
    for estimator in estimators:
        start = time.perf_counter()
        got = _sample_one_step(bench.configured(fam, Config(f"REG {estimator}", estimator)), fam, latent, sigmas)
        seconds = time.perf_counter() - start
        effect = float(((got - cfg_out) - (want - cfg_out)).norm() / (want - cfg_out).norm().clamp_min(1e-30))
        rows.append(
            Exactness(
                fam.label, size, estimator, str(compute).removeprefix("torch."),
                float((got - want).norm() / want.norm().clamp_min(1e-30)), effect,
                EXACT_TOLERANCE.get(compute, 0.1), seconds,
            )
        )  # fmt: skip
        log.info("exactness %s %s: REG effect rel. error %.2e (tolerance %.0e)", fam.label, estimator, effect,
                 rows[-1].tolerance)  # fmt: skip
    return rows


REAL_CONFIGS = ("CFG", "REG vjp", "REG vjp-low-memory", "REG gradient-free", "REG vjp k=2")
DEFAULT_SIZES = {"sd15": [64, 96], "sdxl": [128], "sd35m": [128], "flux": [128]}
EXACT_ESTIMATORS = ("vjp", "vjp-low-memory")
EXACT_MODELS = ("sdxl", "flux")


@dataclass
class Plan:
    """What one real-size run measures (bench_reg.py fills it from the command line)."""

    models: list[str]
    sizes: dict[str, list[int]]
    configs: list[str]
    steps: int
    repeats: int
    tiny: bool = False
    dtype: torch.dtype | None = None
    flux_depth: tuple[int, int] = FLUX_FULL_DEPTH
    precision_size: int | None = None  # None: each model's smallest size; 0: skip
    precision_dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)
    profiled: int = 1
    graph: bool = False
    exact: bool = False  # also the exactness check (on EXACT_MODELS)
    exact_fp32: bool = False  # exactness also with float32 compute on the same weights (manual cast)


def run(bench: Any, plan: Plan, write: Callable[[str], None]) -> dict:
    """Build each model in turn (one in memory at a time), measure it, free it; returns the raw results."""
    from bench import report
    from bench.benchlib import CONFIGS, CudaPeakMemory

    configs = [c for c in CONFIGS if c.name in plan.configs]
    out: dict[str, list] = {"measurements": [], "precision": [], "exactness": [], "models": []}
    for key in plan.models:
        built = build(key, tiny=plan.tiny, dtype=plan.dtype, flux_depth=plan.flux_depth)
        fam = built.family()
        desc = (f"{built.label}: weights {str(built.weight_dtype).removeprefix('torch.')}, compute "
                f"{str(built.compute).removeprefix('torch.')}, built in {built.build_seconds:.0f} s")  # fmt: skip
        out["models"].append(desc)
        write(desc + "\n")
        if plan.exact and key in EXACT_MODELS:
            size = max(plan.sizes[key])
            rows = exactness(bench, fam, key, size, list(EXACT_ESTIMATORS))
            if plan.exact_fp32 and built.compute != torch.float32:
                with compute_dtype(fam.model.model, torch.float32):
                    rows += exactness(bench, fam, key, size, list(EXACT_ESTIMATORS))
            out["exactness"] += rows
            write(report.exactness_table(rows))
        for size in plan.sizes[key]:
            log.info("%s %dx%d: timing %s", key, size, size, ", ".join(c.name for c in configs))
            memory = CudaPeakMemory(torch.device("cuda")) if bench.cuda else None
            m = bench.measure(
                fam, size, configs, steps=plan.steps, repeats=plan.repeats, warmup_steps=1 if bench.cuda else 0,
                profiled=0 if bench.cuda else plan.profiled, graph=plan.graph, memory=memory,
            )  # fmt: skip
            out["measurements"].append(m)
            write(report.measurement_table(m))
        psize = min(plan.sizes[key]) if plan.precision_size is None else plan.precision_size
        if psize:
            log.info("%s %dx%d: M in %s vs float32", key, psize, psize, [str(d) for d in plan.precision_dtypes])
            rows = precision_rows(bench, fam, psize, list(plan.precision_dtypes))
            out["precision"] += rows
            write(report.precision_table(rows))
        del fam, built
        bench.families.clear()
        _unload()
    return out


def _unload() -> None:
    import comfy.model_management

    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()
    release_memory()
