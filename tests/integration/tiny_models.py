"""Tiny random-weight models for the integration tests, built with ComfyUI's own model classes.

Nothing can be downloaded, so every model the tests load is generated here once per cache directory (``tests/.models/``,
gitignored) and reused by later sessions (how they are built and registered: tests/integration/README.md):

* ``checkpoints/tiny_sd15.safetensors``: tiny SD1.5 EPS UNet (36.7M params) + random TAESD as the VAE + full-size
  random CLIP-L, loadable by ``CheckpointLoaderSimple`` and detected as ``SD15``.
* ``diffusion_models/tiny_sd3_mmdit.safetensors``: depth-2 MMDiT (hidden 128, 2 heads), detected as ``SD3``
  (CONST flow).
* ``text_encoders/tiny_rand_clip_l.safetensors``: the same random CLIP-L, for ``CLIPLoader(type="sd3")``.
* ``vae_approx/taesd3_{encoder,decoder}.safetensors``: random 16-channel TAESD, listed as ``taesd3`` by ``VAELoader``.

Weights are deterministic: every tensor comes from a generator seeded per component, in sorted key order.
Initialisation: every 1-D ``*.weight`` (norm scales) is 1 (``comfy.ops`` skips ``reset_parameters``, and a zero
GroupNorm scale makes the UNet output constant), other 1-D tensors (biases) are N(0, 0.02²), and tensors with ≥ 2 dims
are N(0, 1/fan_in) so activations keep their scale through the random network. Tensors are stored in fp16 like real
checkpoints; ComfyUI casts them to its inference dtype when loading.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import locate
import torch

log = logging.getLogger(__name__)

# Bump when the recipe changes: caches built by an older recipe are rebuilt.
RECIPE_VERSION = 1

SD15_CHECKPOINT = "tiny_sd15.safetensors"
SD3_MMDIT = "tiny_sd3_mmdit.safetensors"
CLIP_L = "tiny_rand_clip_l.safetensors"
TAESD3 = "taesd3"  # the VAELoader name; files are taesd3_{encoder,decoder}.safetensors

SD15_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 1],
    "transformer_depth": [0, 1],
    "transformer_depth_output": [0, 0, 1, 1],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "adm_in_channels": None,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}

# What comfy.model_detection.detect_unet_config reads back from the MMDiT keys (hidden = 64 * depth).
SD3_UNET_CONFIG = {
    "in_channels": 16,
    "patch_size": 2,
    "out_channels": 16,
    "depth": 2,
    "input_size": None,
    "adm_in_channels": 2048,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
    "num_patches": 1024,  # pos_embed covers latents up to 64x64
    "pos_embed_max_size": 32,
    "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [],
}

SEEDS = {"sd15_unet": 1501, "clip_l": 7680, "taesd": 4004, "taesd3": 1616, "sd3_mmdit": 3003}
STORE_DTYPE = torch.float16


def _shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    return {name: tensor.shape for name, tensor in module.state_dict().items()}


def _meta(build: Callable[[], torch.nn.Module]) -> dict[str, torch.Size]:
    """Key -> shape of a module constructed on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return _shapes(build())


def randomise(shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    """Deterministic random tensors for ``shapes`` (see the module docstring for the init rule)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        if len(shape) == 1 and name.endswith(".weight"):
            tensor = torch.ones(shape)
        elif len(shape) <= 1:
            tensor = torch.randn(shape, generator=gen) * 0.02
        else:
            fan_in = math.prod(shape[1:])
            tensor = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        out[name] = tensor.to(STORE_DTYPE)
    return out


def _sd15_unet() -> dict[str, torch.Tensor]:
    import comfy.supported_models

    def build():
        config = comfy.supported_models.SD15(dict(SD15_UNET_CONFIG))
        config.set_inference_dtype(torch.float32, None)
        return config.get_model({}).diffusion_model

    return randomise(_meta(build), SEEDS["sd15_unet"])


def sd3_config(depth: int) -> dict:
    """``SD3_UNET_CONFIG`` for an MMDiT of ``depth`` joint blocks (ComfyUI derives hidden = 64·depth, heads = depth)."""
    hidden = 64 * depth
    embedder = {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": hidden}}
    return {**SD3_UNET_CONFIG, "depth": depth, "context_embedder_config": embedder}


def sd3_mmdit(depth: int = SD3_UNET_CONFIG["depth"]) -> dict[str, torch.Tensor]:
    """Random SD3 MMDiT weights (diffusion-model keys, no prefix) of ``depth`` joint blocks."""
    import comfy.supported_models

    def build():
        config = comfy.supported_models.SD3(sd3_config(depth))
        config.set_inference_dtype(torch.float32, None)
        return config.get_model({}).diffusion_model

    return randomise(_meta(build), SEEDS["sd3_mmdit"])


def _clip_l() -> dict[str, torch.Tensor]:
    """Full-size CLIP-L text model (keys ``text_model.*`` + ``text_projection.weight``); its size is fixed."""
    import comfy.clip_model
    import comfy.ops

    config_path = Path(comfy.clip_model.__file__).with_name("sd1_clip_config.json")
    config = json.loads(config_path.read_text())

    def build():
        return comfy.clip_model.CLIPTextModel(config, torch.float32, None, comfy.ops.disable_weight_init)

    return randomise(_meta(build), SEEDS["clip_l"])


def _taesd(latent_channels: int, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Random TAESD encoder and decoder state dicts (without the ``taesd_encoder.`` / ``taesd_decoder.`` prefixes)."""
    import comfy.taesd.taesd as taesd

    encoder = randomise(_meta(lambda: taesd.Encoder(latent_channels)), seed)
    decoder = randomise(_meta(lambda: taesd.Decoder(latent_channels)), seed + 1)
    return encoder, decoder


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def _check_detection(state: dict[str, torch.Tensor], prefix: str, expected: str) -> None:
    """Fail the build if ComfyUI would not detect ``state`` as ``expected`` (guards against recipe drift)."""
    import comfy.model_detection

    config = comfy.model_detection.model_config_from_unet(state, prefix)
    found = type(config).__name__ if config is not None else None
    if found != expected:
        raise RuntimeError(f"tiny model detected as {found}, expected {expected}")


def _save(path: Path, state: dict[str, torch.Tensor]) -> None:
    import safetensors.torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)


def expected_files() -> list[str]:
    return [
        f"checkpoints/{SD15_CHECKPOINT}",
        f"diffusion_models/{SD3_MMDIT}",
        f"text_encoders/{CLIP_L}",
        f"vae_approx/{TAESD3}_encoder.safetensors",
        f"vae_approx/{TAESD3}_decoder.safetensors",
    ]


def _write_all(root: Path) -> None:
    clip = _clip_l()
    unet = _sd15_unet()
    taesd_enc, taesd_dec = _taesd(4, SEEDS["taesd"])
    checkpoint = {
        **_prefixed("model.diffusion_model.", unet),
        **_prefixed("first_stage_model.taesd_encoder.", taesd_enc),
        **_prefixed("first_stage_model.taesd_decoder.", taesd_dec),
        "first_stage_model.vae_scale": torch.tensor(0.18215),
        **_prefixed("cond_stage_model.transformer.", {k: v for k, v in clip.items() if k.startswith("text_model.")}),
    }
    _check_detection(checkpoint, "model.diffusion_model.", "SD15")
    _save(root / "checkpoints" / SD15_CHECKPOINT, checkpoint)
    del checkpoint, unet

    mmdit = sd3_mmdit()
    _check_detection(mmdit, "", "SD3")
    _save(root / "diffusion_models" / SD3_MMDIT, mmdit)
    _save(root / "text_encoders" / CLIP_L, clip)

    enc3, dec3 = _taesd(16, SEEDS["taesd3"])
    _save(root / "vae_approx" / f"{TAESD3}_encoder.safetensors", enc3)
    _save(root / "vae_approx" / f"{TAESD3}_decoder.safetensors", dec3)


def _manifest_ok(root: Path) -> bool:
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("recipe") != RECIPE_VERSION or manifest.get("torch") != torch.__version__:
        return False
    sizes = manifest.get("files", {})
    return all((root / rel).is_file() and (root / rel).stat().st_size == sizes.get(rel) for rel in expected_files())


def ensure_models(root: Path) -> float:
    """Build the tiny models under ``root`` unless a complete cache of this recipe exists.

    Returns the build time in seconds (0.0 when the cache was reused).
    """
    with locate.locked(root):
        if _manifest_ok(root):
            return 0.0
        start = time.perf_counter()
        log.info("building tiny test models in %s", root)
        _write_all(root)
        files = {rel: (root / rel).stat().st_size for rel in expected_files()}
        manifest = {"recipe": RECIPE_VERSION, "torch": torch.__version__, "files": files}
        (root / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        elapsed = time.perf_counter() - start
        log.info("built tiny test models in %.1f s", elapsed)
        return elapsed


@dataclass(frozen=True)
class TinyModels:
    """Names of the tiny models as the loader nodes list them, and where they live."""

    root: Path
    build_seconds: float  # 0.0 when an existing cache was reused
    sd15_checkpoint: str = SD15_CHECKPOINT  # CheckpointLoaderSimple: SD15 (EPS) + TAESD + CLIP-L
    sd3_unet: str = SD3_MMDIT  # UNETLoader: SD3 MMDiT (CONST flow)
    clip_l: str = CLIP_L  # CLIPLoader(type="sd3")
    sd3_vae: str = TAESD3  # VAELoader


def ensure_mmdit(root: Path, depth: int) -> str:
    """Build (once) an SD3 MMDiT of ``depth`` blocks next to the test models; returns its ``UNETLoader`` name.

    For the benchmark, whose step times should be dominated by the network rather than by Python: depth 6 is
    hidden 384, 6 heads, 33M parameters. The integration tests use the depth-2 model of :func:`ensure_models`.
    """
    name = f"sd3_mmdit_depth{depth}.safetensors"
    path = root / "diffusion_models" / name
    with locate.locked(root):
        if not path.is_file():
            state = sd3_mmdit(depth)
            _check_detection(state, "", "SD3")
            _save(path, state)
    return name


def prepare(root: Path) -> TinyModels:
    """Build the models if needed and register them with ComfyUI."""
    seconds = ensure_models(root)
    register(root)
    return TinyModels(root=root, build_seconds=seconds)


def register(root: Path) -> None:
    """Make the models visible to ComfyUI's loader nodes (first in each folder's search list)."""
    import folder_paths

    for kind in ("checkpoints", "diffusion_models", "text_encoders", "vae_approx"):
        folder_paths.add_model_folder_path(kind, str(root / kind), is_default=True)


# --- tiny modern model families (Flux, Wan 2.x, Qwen-Image, SDXL), built in memory per test session ---
#
# These are small enough to build at test time (well under a second each) and are never written to disk. Each one is
# loaded through ComfyUI's own loader, ``comfy.sd.load_diffusion_model_state_dict``, whenever that loader's detection
# reads the tiny sizes back from the keys; where detection hard-codes the full-size widths the loader would build a
# full-size network and the load fails, so the model is built from ComfyUI's supported-model class with the tiny config
# instead (``load_with_config``: the loader's own steps after detection). Which path each family takes per version:
#
# | family | ComfyUI class | 0.33.0 | 0.3.64 |
# |---|---|---|---|
# | flux | FluxSchnell (no guidance embedding: true CFG) | loader (width read from keys) | config (width 3072 fixed) |
# | wan | WAN21_T2V (the Wan 2.1 / 2.2-A14B network) | loader | loader |
# | qwen | QwenImage | config (inner width 3072 fixed) | config |
# | sdxl | Segmind_Vega (an SDXL UNet: model_base.SDXL, ε, adm ``y``) | loader | loader |
#
# SDXL detection matches the per-block transformer depths exactly; the full [0, 0, 2, 2, 10, 10] of SDXL base has 70
# transformer blocks at width 320 (hundreds of millions of parameters), so the tiny one uses the depths of SDXL's
# distilled relative Segmind Vega, [0, 0, 1, 1, 2, 2], which ComfyUI loads as the same SDXL model class.

MODERN_SEEDS = {"flux": 7101, "wan": 7202, "qwen": 7303, "sdxl": 7404}

# The widths every tiny double/single-stream DiT shares (Flux, Chroma, HunyuanVideo): one block of each kind, one head
# of width 128 over RoPE axes 16 + 56 + 56 (Flux detection in 0.33 sets heads = hidden / sum(axes_dim) = 1).
TINY_DIT = {
    "context_in_dim": 64,
    "hidden_size": 128,
    "mlp_ratio": 4.0,
    "num_heads": 1,
    "depth": 1,
    "depth_single_blocks": 1,
    "axes_dim": [16, 56, 56],
}

FLUX_CONFIG = {
    "image_model": "flux",
    "in_channels": 16,
    "out_channels": 16,
    "vec_in_dim": 768,
    **TINY_DIT,
    "theta": 10000,
    "patch_size": 2,
    "qkv_bias": True,
    "guidance_embed": False,
}

WAN_CONFIG = {
    "image_model": "wan2.1",
    "model_type": "t2v",
    "dim": 128,  # detection sets heads = dim / 128 = 1
    "out_dim": 16,
    "num_heads": 1,
    "ffn_dim": 256,
    "num_layers": 1,
    "patch_size": (1, 2, 2),
    "freq_dim": 256,
    "window_size": (-1, -1),
    "qk_norm": True,
    "cross_attn_norm": True,
    "eps": 1e-6,
    "in_dim": 16,
}

QWEN_CONFIG = {
    "image_model": "qwen_image",
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 1,
    "attention_head_dim": 128,  # = sum of the rope axes (16, 56, 56)
    "num_attention_heads": 1,
    "joint_attention_dim": 64,
}

SDXL_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 1, 1, 2, 2],
    "transformer_depth_output": [0, 0, 0, 0, 0, 0, 0, 0, 0],
    "channel_mult": [1, 1, 1],
    "transformer_depth_middle": -2,  # no middle block
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}


@dataclass(frozen=True)
class ModernFamily:
    """How one tiny modern family is built, conditioned and stepped."""

    name: str
    config: dict
    model_class: str  # the comfy.supported_models class the config must select
    loader_detects: Callable[[], bool]  # whether ComfyUI's loader reads this config back from the keys
    context: tuple[int, int]  # (tokens, width) of the text conditioning
    pooled: int | None  # width of ``pooled_output`` (Flux ``y``, SDXL adm), None when unused
    latent: tuple[int, ...]  # the empty latent, batch 1
    one_step: dict  # KSampler ``scheduler`` / ``denoise`` for one step that leaves σ = 1 (flow: a(σ) = 0 there)


def comfyui_version() -> tuple[int, ...]:
    import comfyui_version

    return tuple(int(p) for p in comfyui_version.__version__.split(".")[:3])


def _since(version: tuple[int, ...]) -> Callable[[], bool]:
    return lambda: comfyui_version() >= version


MODERN_FAMILIES = {
    "flux": ModernFamily(
        "flux", FLUX_CONFIG, "FluxSchnell", _since((0, 4)), (8, 64), 768, (1, 16, 8, 8),
        {"scheduler": "simple", "denoise": 0.5},
    ),
    "wan": ModernFamily(
        "wan", WAN_CONFIG, "WAN21_T2V", lambda: True, (8, 4096), None, (1, 16, 2, 8, 8),
        {"scheduler": "simple", "denoise": 0.25},  # shift 8: σ ≈ 0.73, a(σ) ≈ 0.27
    ),
    "qwen": ModernFamily(
        "qwen", QWEN_CONFIG, "QwenImage", lambda: False, (8, 64), None, (1, 16, 1, 8, 8),
        {"scheduler": "simple", "denoise": 0.5},
    ),
    "sdxl": ModernFamily(
        "sdxl", SDXL_CONFIG, "Segmind_Vega", lambda: True, (8, 2048), 1280, (1, 4, 4, 4),
        {"scheduler": "normal", "denoise": 1.0},
    ),
}  # fmt: skip


def family_config(family: str) -> dict:
    """The tiny ``family`` config for the running ComfyUI (0.33's Flux also requires ``txt_ids_dims``)."""
    config = dict(MODERN_FAMILIES[family].config)
    if family == "flux":
        import dataclasses

        import comfy.ldm.flux.model

        if "txt_ids_dims" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:
            config["txt_ids_dims"] = []
    return config


def _supported_config(unet_config: dict, state: dict[str, torch.Tensor] | None = None):
    """The ``comfy.supported_models`` instance ComfyUI picks for ``unet_config`` (what detection would pick)."""
    import comfy.model_detection

    config = comfy.model_detection.model_config_from_unet_config(dict(unet_config), state)
    if config is None:
        raise RuntimeError(f"no ComfyUI model class matches {unet_config}")
    return config


def modern_state_dict(family: str) -> dict[str, torch.Tensor]:
    """Random weights (diffusion-model keys, no prefix, fp16) of the tiny ``family`` network."""

    def build():
        config = _supported_config(family_config(family))
        config.set_inference_dtype(torch.float32, None)
        return config.get_model({}).diffusion_model

    return randomise(_meta(build), MODERN_SEEDS[family])


def load_with_config(state: dict[str, torch.Tensor], unet_config: dict):
    """A ModelPatcher for ``state`` built from ``unet_config``: the steps of ``load_diffusion_model_state_dict`` after
    detection (class from the config, float32 inference, weights loaded, quantisation metadata honoured)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.utils

    config = _supported_config(unet_config, state)
    detect_quant = getattr(comfy.utils, "detect_layer_quantization", None)
    quant = detect_quant(state, "") if detect_quant is not None else None
    if quant:
        config.quant_config = quant
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model(state, "")
    model.load_model_weights(dict(state), "")
    return comfy.model_patcher.ModelPatcher(
        model,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


def load_modern(family: str, state: dict[str, torch.Tensor] | None = None) -> tuple[object, str]:
    """Load the tiny ``family`` model; returns ``(ModelPatcher, how)`` with ``how`` naming the load path taken."""
    import comfy.sd

    spec = MODERN_FAMILIES[family]
    state = modern_state_dict(family) if state is None else state
    if spec.loader_detects():
        patcher = comfy.sd.load_diffusion_model_state_dict(dict(state))  # loading consumes the dict
        how = "comfy.sd.load_diffusion_model_state_dict"
    else:
        patcher = load_with_config(state, family_config(family))
        how = "supported-model class with the tiny config (detection reads full-size widths)"
    return checked_load(patcher, how, family, spec.model_class, state)


def checked_load(patcher, how: str, family: str, model_class: str, state: dict[str, torch.Tensor]) -> tuple:
    """``(patcher, how)`` once the tiny ``family`` loaded as ``model_class`` with exactly the weights of ``state``."""
    found = type(patcher.model.model_config).__name__
    if found != model_class:
        raise RuntimeError(f"tiny {family} loaded as {found}, expected {model_class}")
    loaded = patcher.model.diffusion_model.state_dict()
    if set(loaded) != set(state) or not all(torch.equal(loaded[k].to(v.dtype), v) for k, v in state.items()):
        raise RuntimeError(f"tiny {family} did not load its weights unchanged ({how})")
    return patcher, how


def modern_conditioning(family: str, seed: int) -> list:
    """ComfyUI conditioning for ``family`` without text encoders: random context (and pooled output)."""
    spec = MODERN_FAMILIES[family]
    gen = torch.Generator().manual_seed(seed)
    extra = {} if spec.pooled is None else {"pooled_output": torch.randn(1, spec.pooled, generator=gen)}
    return [[torch.randn(1, *spec.context, generator=gen), extra]]


# --- quantized checkpoints (ComfyUI 0.33: QuantizedTensor weights through comfy.ops.mixed_precision_ops) ---
#
# The tiny Flux's block linears quantized by comfy_kitchen's own quantizer (``QuantizedTensor.from_float``), stored as
# the loader expects them:
# * ``scaled_fp8``: the older format, a ``scaled_fp8`` marker key and per-layer fp8 ``.weight`` + ``.scale_weight``
#   (``comfy.utils.convert_old_quants`` turns it into float8_e4m3fn ``comfy_quant`` layers);
# * ``float8_e4m3fn`` / ``int8_tensorwise``: per-layer ``.weight`` + ``.weight_scale`` + ``.comfy_quant`` (JSON
#   ``{"format": …}`` as uint8), detected by ``comfy.utils.detect_layer_quantization``.

QUANT_LAYOUTS = {
    "scaled_fp8": "TensorCoreFP8E4M3Layout",
    "float8_e4m3fn": "TensorCoreFP8E4M3Layout",
    "int8_tensorwise": "TensorWiseINT8Layout",
}


def quantized_state_dict(
    state: dict[str, torch.Tensor], fmt: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """``(checkpoint, dequantized, layers)``: ``state`` with its block linears quantized as ``fmt``, the same state
    with those weights replaced by their dequantized float32 values, and the quantized layer names."""
    from comfy.quant_ops import QuantizedTensor, get_layout_class

    layout = QUANT_LAYOUTS[fmt]
    layers = sorted(k[: -len(".weight")] for k, v in state.items() if k.endswith(".weight") and v.ndim == 2)
    layers = [name for name in layers if "blocks." in name]
    checkpoint, dequantized = dict(state), dict(state)
    for name in layers:
        quantized = QuantizedTensor.from_float(state[name + ".weight"].float(), layout)
        qdata, scale = get_layout_class(layout).get_plain_tensors(quantized)[:2]
        dequantized[name + ".weight"] = quantized.dequantize().float()
        checkpoint[name + ".weight"] = qdata
        if fmt == "scaled_fp8":
            checkpoint[name + ".scale_weight"] = scale.float().reshape(())
        else:
            checkpoint[name + ".weight_scale"] = scale.float().reshape(())
            conf = json.dumps({"format": fmt}).encode()
            checkpoint[name + ".comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
    if fmt == "scaled_fp8":
        checkpoint["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return checkpoint, dequantized, layers


def load_quantized(family: str, fmt: str) -> tuple[object, object]:
    """``(quantized, dequantized)`` ModelPatchers of the tiny ``family``: its block linears quantized as ``fmt``, and
    the same network with those weights replaced by their dequantized float32 values.

    The quantized one is loaded inside ``torch.inference_mode``, as ComfyUI's executor loads it (UNETLoader): on 0.33 a
    quantized model loaded outside inference mode cannot be sampled inside it (``comfy.ops._quantized_apply`` wraps
    the moved QuantizedTensor in a Parameter: "Cannot set version_counter for inference tensor"). Fails if a quantized
    layer loaded as a plain tensor.
    """
    import comfy.sd
    from comfy.quant_ops import QuantizedTensor

    checkpoint, dequantized, layers = quantized_state_dict(modern_state_dict(family), fmt)
    with torch.inference_mode():
        if MODERN_FAMILIES[family].loader_detects():
            patcher = comfy.sd.load_diffusion_model_state_dict(dict(checkpoint))
        else:
            patcher = load_with_config(dict(checkpoint), family_config(family))
    modules = dict(patcher.model.diffusion_model.named_modules())
    plain = [name for name in layers if not isinstance(modules[name].weight, QuantizedTensor)]
    if plain:
        raise RuntimeError(f"tiny {family} {fmt}: layers loaded without QuantizedTensor weights: {plain}")
    return patcher, load_modern(family, dequantized)[0]
