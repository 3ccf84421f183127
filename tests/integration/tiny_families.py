"""Tiny random-weight models of the model families ComfyUI samples with real guidance (CFG or a guider).

The families of tiny_models.MODERN_FAMILIES (Flux, Wan 2.1, Qwen-Image, SDXL) are joined here by the rest of what
ComfyUI 0.33 samples with CFG: Chroma, Flux 2, Qwen-Image-Edit, Lumina 2, Z-Image, HiDream, HunyuanVideo 1.5,
HunyuanImage 2.1, Kandinsky 5, LTX-Video, LTX-2 (audio + video), Wan 2.2 (the 5B, and the two A14B experts:
:func:`wan22_experts`), Cosmos Predict 2 and Stable Audio. Each is built in memory (well under a second, 0.5–3M
parameters) with ComfyUI's own classes and tiny_models' weight recipe (``randomise``), and loaded by ComfyUI's loader
when its detection reads the tiny config back from the keys (and, for LTX-2, from the config its files carry in their
metadata); otherwise detection hard-codes full-size widths, and the model is built from the family's supported-model
class with the tiny config, then loaded with ``load_model_weights`` as the loader would. :func:`load` returns which
path it took; test_families.py checks that the loader was used exactly when detection allows it:

| family | ComfyUI class | 0.33.0 | 0.3.64 |
|---|---|---|---|
| chroma | Chroma | class (approximator sizes fixed) | class |
| flux2 (+ reference latent) | Flux2 (Klein base: no guidance embedding) | loader | — |
| qwen_edit (+ reference latent) | QwenImage | class (inner width fixed) | class |
| lumina2 | Lumina2 | class (heads fixed) | class |
| zimage | ZImage (selected by width 3840 only) | class | — |
| hidream | HiDream | class (all sizes fixed) | class |
| hunyuan_video15 | HunyuanVideo15 | loader | — |
| hunyuan_image21 | HunyuanImage21 | loader | loader |
| kandinsky5 | Kandinsky5 (Lite video) | loader | — |
| ltxv | LTXV | loader | loader |
| ltx2 (nested video + audio latent) | LTXAV | loader (config from the file's metadata) | — |
| wan22_5b | WAN22_T2V | loader | loader |
| cosmos_predict2 | CosmosT2IPredict2 | loader | class (block count fixed by width) |
| stable_audio | StableAudio (Open 1.0) | class (24 heads fixed) | class |
| Wan 2.2 A14B experts | WAN21_T2V, twice | loader | loader |

Conditioning is what the family's ComfyUI nodes put into a CONDITIONING: ``cross_attn`` plus the keys its
``model_base.extra_conds`` reads (pooled outputs, Llama features, reference latents, attention masks, audio lengths),
random, in the shapes the tiny network expects. A family the running ComfyUI lacks is reported by :func:`missing`
in one sentence naming the version.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tiny_models import TINY_DIT, _meta, checked_load, comfyui_version, randomise

Conditioning = Callable[[torch.Generator, tuple[int, ...]], tuple[torch.Tensor, dict]]


def _text(tokens: int, width: int) -> Conditioning:
    """Text conditioning: ``cross_attn`` of ``tokens`` × ``width``, and ``pooled_output`` None (ComfyUI's
    ``CLIP.encode_from_tokens_scheduled`` always sets the key; encoders without a pooled output leave it None)."""

    def make(gen: torch.Generator, latent: tuple[int, ...]) -> tuple[torch.Tensor, dict]:
        return torch.randn(1, tokens, width, generator=gen), {"pooled_output": None}

    return make


def _with(base: Conditioning, extra: Callable[[torch.Generator, tuple[int, ...]], dict]) -> Conditioning:
    """``base`` plus the keys ``extra`` makes (drawn after the text features, from the same generator)."""

    def make(gen: torch.Generator, latent: tuple[int, ...]) -> tuple[torch.Tensor, dict]:
        cross_attn, out = base(gen, latent)
        return cross_attn, {**out, **extra(gen, latent)}

    return make


def _pooled(width: int) -> Callable[[torch.Generator, tuple[int, ...]], dict]:
    """A pooled text embedding (``pooled_output``), as CLIP-style text encoders add it."""
    return lambda gen, latent: {"pooled_output": torch.randn(1, width, generator=gen)}


def _attention_mask(tokens: int) -> Callable[[torch.Generator, tuple[int, ...]], dict]:
    """The text encoder's ``attention_mask`` (all tokens valid), as LLM and T5 encoders return it (LTX-Video's forward
    and 0.3.64's Lumina 2 require it)."""
    return lambda gen, latent: {"attention_mask": torch.ones(1, tokens, dtype=torch.long)}


def _reference_latent(gen: torch.Generator, latent: tuple[int, ...]) -> dict:
    """``reference_latents`` as ComfyUI's ReferenceLatent / TextEncodeQwenImageEdit nodes set them: one encoded image of
    the latent's own size (drawn from a fixed seed, so the positive and negative share it as they do in a workflow)."""
    fixed = torch.Generator().manual_seed(4242)
    return {"reference_latents": [torch.randn(latent, generator=fixed)]}


@dataclass(frozen=True)
class Family:
    """How one tiny family is built, conditioned and stepped."""

    name: str
    model_class: str  # the comfy.supported_models class the model must load as
    config: Callable[[], dict]  # the tiny unet_config for the running ComfyUI
    latent: tuple[int, ...] | tuple[tuple[int, ...], ...]  # the empty latent, batch 1; several shapes: nested (LTX-2)
    conditioning: Conditioning
    one_step: dict  # KSampler ``scheduler`` / ``denoise`` of the one step (flow: σ < 1, where a(σ) = 1 − σ ≠ 0)
    seed: int
    metadata: bool = False  # the family's files carry their config in the safetensors metadata (LTX-2)
    checkpoint: str | None = None  # a checkpoint's diffusion-model prefix: loaded by CheckpointLoaderSimple's function
    extra_state: Callable[[], dict[str, torch.Tensor]] | None = None  # checkpoint keys outside the diffusion model

    @property
    def nested(self) -> bool:
        return isinstance(self.latent[0], tuple)

    def empty_latent(self) -> torch.Tensor:
        """The zero latent; for several shapes ComfyUI's NestedTensor (LTXVConcatAVLatent's output)."""
        if not self.nested:
            return torch.zeros(self.latent)
        import comfy.nested_tensor

        return comfy.nested_tensor.NestedTensor([torch.zeros(shape) for shape in self.latent])


def _fields(cls: type) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(cls)}


def _fit(config: dict, params: type) -> dict:
    """``config`` without the keys the running ComfyUI's ``params`` dataclass does not have (older versions)."""
    names = _fields(params) | {"image_model", "audio_model"}
    return {k: v for k, v in config.items() if k in names}


def _chroma() -> dict:
    import comfy.ldm.chroma.model

    config = {
        "image_model": "chroma",
        "in_channels": 64,
        "out_channels": 64,
        **TINY_DIT,
        "theta": 10000,
        "patch_size": 2,
        "qkv_bias": True,
        "in_dim": 64,
        "out_dim": 128,  # the approximator's modulation vectors have the width of the blocks
        "hidden_dim": 64,
        "n_layers": 1,
        "txt_ids_dims": [],
        "vec_in_dim": None,
    }
    return _fit(config, comfy.ldm.chroma.model.ChromaParams)


def _flux2() -> dict:
    return {  # what detection reads back from the keys of a Flux 2 (Klein base: no guidance embedding, true CFG)
        "image_model": "flux2",
        "axes_dim": [32, 32, 32, 32],
        "num_heads": 1,
        "mlp_ratio": 3.0,
        "theta": 2000,
        "out_channels": 128,
        "global_modulation": True,
        "mlp_silu_act": True,
        "qkv_bias": False,
        "ops_bias": False,
        "default_ref_method": "index",
        "ref_index_scale": 10.0,
        "txt_ids_dims": [3],
        "in_channels": 128,
        "hidden_size": 128,
        "context_in_dim": 64,
        "patch_size": 1,
        "vec_in_dim": None,
        "depth": 1,
        "depth_single_blocks": 1,
        "guidance_embed": False,
        "yak_mlp": False,
        "txt_norm": False,
    }


def _qwen() -> dict:
    from tiny_models import QWEN_CONFIG

    return dict(QWEN_CONFIG)


def _accepted(config: dict, constructor: Callable) -> dict:
    """``config`` without the keys an older ``constructor`` (one without ``**kwargs``) does not take."""
    import inspect

    parameters = inspect.signature(constructor).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return config
    return {k: v for k, v in config.items() if k in parameters}


def _lumina2() -> dict:
    import comfy.ldm.lumina.model

    return _accepted(_lumina2_config(), comfy.ldm.lumina.model.NextDiT)


def _lumina2_config() -> dict:
    return {
        "image_model": "lumina2",
        "patch_size": 2,
        "in_channels": 16,
        "dim": 128,
        "cap_feat_dim": 64,
        "n_layers": 1,
        "n_refiner_layers": 1,
        "qk_norm": True,
        "n_heads": 1,
        "n_kv_heads": 1,
        "multiple_of": 16,
        "axes_dims": [32, 48, 48],
        "axes_lens": [300, 512, 512],
        "rope_theta": 10000.0,
        "ffn_dim_multiplier": 4.0,
    }


def _zimage() -> dict:
    return {
        **_lumina2_config(),
        "dim": 256,  # Z-Image's modulation takes min(dim, 256) timestep features: the width must reach 256
        "n_heads": 2,
        "n_kv_heads": 2,
        "axes_lens": [1536, 512, 512],
        "rope_theta": 256.0,
        "ffn_dim_multiplier": 8.0 / 3.0,
        "z_image_modulation": True,
        "time_scale": 1000.0,
        "pad_tokens_multiple": 32,
    }


def _hidream() -> dict:
    return {
        "image_model": "hidream",
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 64,
        "num_attention_heads": 1,
        "caption_channels": [32, 32],  # [T5, Llama 3]
        "text_emb_dim": 32,
        "num_routed_experts": 2,
        "num_activated_experts": 1,
        "axes_dims_rope": [32, 16, 16],
        "max_resolution": [32, 32],
        "llama_layers": [0, 1],  # one Llama layer's features per block
    }


def _hidream_conditioning(gen: torch.Generator, latent: tuple[int, ...]) -> dict:
    """What HiDream's text encoders add (``QuadrupleCLIPLoader``): Llama 3 features per layer and the pooled CLIP."""
    return {
        "conditioning_llama3": torch.randn(1, 2, 8, 32, generator=gen),
        "pooled_output": torch.randn(1, 32, generator=gen),
    }


def _hunyuan_video(**overrides) -> dict:
    import comfy.ldm.hunyuan_video.model

    config = {
        "image_model": "hunyuan_video",
        "in_channels": 16,
        "patch_size": [1, 2, 2],
        "out_channels": 16,
        "vec_in_dim": None,
        "meanflow": False,
        **TINY_DIT,
        "theta": 256,
        "qkv_bias": True,
        "byt5": False,
        "guidance_embed": False,
        "use_cond_type_embedding": False,
        "vision_in_dim": None,
        "meanflow_sum": False,
        **overrides,
    }
    return _fit(config, comfy.ldm.hunyuan_video.model.HunyuanVideoParams)


def _hunyuan_video15() -> dict:
    # 32 latent channels + the image-to-video concat (32 image channels, 1 mask) that ComfyUI fills with zeros for t2v
    return _hunyuan_video(
        in_channels=65, out_channels=32, patch_size=[1, 1, 1], use_cond_type_embedding=True, vision_in_dim=1152,
        meanflow_sum=True,
    )  # fmt: skip


def _hunyuan_image21() -> dict:
    return _hunyuan_video(in_channels=64, out_channels=64, patch_size=[1, 1], axes_dim=[64, 64])


def _kandinsky5() -> dict:
    return {  # Kandinsky 5 Lite video; the text widths (Qwen2.5-VL 3584, CLIP 768) are the defaults detection keeps
        "image_model": "kandinsky5",
        "model_dim": 128,
        "time_dim": 64,
        "ff_dim": 256,
        "visual_embed_dim": 132,  # (16 latent + 16 image + 1 mask channels) x the 1x2x2 patch
        "num_text_blocks": 1,
        "num_visual_blocks": 1,
    }


def _ltxv() -> dict:
    import inspect

    import comfy.ldm.lightricks.model

    config = {  # 32 heads of 4 (detection reads the head width as the cross-attention width / 32)
        "image_model": "ltxv",
        "num_layers": 1,
        "attention_head_dim": 4,
        "cross_attention_dim": 128,
    }
    base = getattr(comfy.ldm.lightricks.model, "LTXBaseModel", None)  # newer versions: keyframe embeddings, detected
    if base is not None and "use_keyframes_abs_pos_embedding" in inspect.signature(base).parameters:
        config["use_keyframes_abs_pos_embedding"] = False
    return config


def _ltx2() -> dict:
    return {
        "image_model": "ltxav",
        "num_layers": 1,
        "attention_head_dim": 32,
        "num_attention_heads": 4,
        "cross_attention_dim": 128,
        "audio_attention_head_dim": 32,
        "audio_num_attention_heads": 2,
        "audio_cross_attention_dim": 64,
        "caption_channels": 64,
        "connector_attention_head_dim": 32,
        "connector_num_attention_heads": 2,
        "connector_num_layers": 1,
        "use_keyframes_abs_pos_embedding": False,
    }


def _wan22_5b() -> dict:
    from tiny_models import WAN_CONFIG

    return {**WAN_CONFIG, "in_dim": 48, "out_dim": 48}


def _cosmos_predict2() -> dict:
    return {  # what detection reads back for a text-to-image Predict 2 of width 256 (16 heads of 16)
        "image_model": "cosmos_predict2",
        "max_img_h": 240,
        "max_img_w": 240,
        "max_frames": 128,
        "in_channels": 16,
        "out_channels": 16,
        "patch_spatial": 2,
        "patch_temporal": 1,
        "model_channels": 256,
        "concat_padding_mask": True,
        "crossattn_emb_channels": 1024,
        "pos_emb_cls": "rope3d",
        "pos_emb_learnable": True,
        "pos_emb_interpolation": "crop",
        "min_fps": 1,
        "max_fps": 30,
        "use_adaln_lora": True,
        "adaln_lora_dim": 256,
        "num_blocks": 1,
        "extra_per_block_abs_pos_emb": False,
        "rope_h_extrapolation_ratio": 4.0,
        "rope_w_extrapolation_ratio": 4.0,
        "rope_t_extrapolation_ratio": 1.0,
        "extra_h_extrapolation_ratio": 1.0,
        "extra_w_extrapolation_ratio": 1.0,
        "extra_t_extrapolation_ratio": 1.0,
        "rope_enable_fps_modulation": False,
    }


def _stable_audio() -> dict:
    import inspect

    import comfy.ldm.audio.dit

    config = {  # Stable Audio Open 1.0 of width 64, one head (its rotary embedding needs heads of at least 64)
        "audio_model": "dit1.0",
        "global_cond_dim": 1536,  # seconds_start and seconds_total embeddings, 768 each
        "project_cond_tokens": True,  # T5 tokens projected to the width (as Stable Audio Open Small does)
        "embed_dim": 64,
        "num_heads": 1,
        "io_channels": 64,
        "input_concat_dim": 0,
        "timestep_features_type": "learned",
        "depth": 1,
    }
    accepted = inspect.signature(comfy.ldm.audio.dit.AudioDiffusionTransformer).parameters
    return {k: v for k, v in config.items() if k in accepted}


def _stable_audio_conditioners() -> dict[str, torch.Tensor]:
    """The checkpoint's seconds_start / seconds_total embedders (``conditioner.conditioners.*``), random."""
    import comfy.ldm.audio.embedders

    shapes = _meta(lambda: comfy.ldm.audio.embedders.NumberConditioner(768, min_val=0, max_val=512))
    return {
        f"conditioner.conditioners.{name}.{key}": value
        for i, name in enumerate(("seconds_start", "seconds_total"))
        for key, value in randomise(shapes, 8190 + i).items()
    }


def _stable_audio_conditioning(gen: torch.Generator, latent: tuple[int, ...]) -> dict:
    """What ConditioningStableAudio sets on the positive and the negative."""
    return {"seconds_start": 0.0, "seconds_total": 1.0}


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("chroma", "Chroma", _chroma, (1, 16, 8, 8), _text(8, 64), {"scheduler": "simple", "denoise": 0.5}, 8101),
        Family(
            "flux2", "Flux2", _flux2, (1, 128, 4, 4), _with(_text(8, 64), _reference_latent),
            {"scheduler": "simple", "denoise": 0.5}, 8102,
        ),
        Family(
            "qwen_edit", "QwenImage", _qwen, (1, 16, 1, 8, 8), _with(_text(8, 64), _reference_latent),
            {"scheduler": "simple", "denoise": 0.5}, 8103,
        ),
        Family(
            "lumina2", "Lumina2", _lumina2, (1, 16, 8, 8), _with(_text(8, 64), _attention_mask(8)),
            {"scheduler": "simple", "denoise": 0.5}, 8104,
        ),
        Family(
            "zimage", "ZImage", _zimage, (1, 16, 8, 8), _with(_text(8, 64), _attention_mask(8)),
            {"scheduler": "simple", "denoise": 0.5}, 8105,
        ),
        Family(
            "hidream", "HiDream", _hidream, (1, 16, 8, 8), _with(_text(8, 32), _hidream_conditioning),
            {"scheduler": "simple", "denoise": 0.5}, 8106,
        ),
        Family(
            "hunyuan_video15", "HunyuanVideo15", _hunyuan_video15, (1, 32, 2, 4, 4), _text(8, 64),
            {"scheduler": "simple", "denoise": 0.5}, 8107,
        ),
        Family(
            "hunyuan_image21", "HunyuanImage21", _hunyuan_image21, (1, 64, 4, 4), _text(8, 64),
            {"scheduler": "simple", "denoise": 0.5}, 8108,
        ),
        Family(
            "kandinsky5", "Kandinsky5", _kandinsky5, (1, 16, 2, 4, 4),
            _with(_text(8, 3584), _pooled(768)),
            {"scheduler": "simple", "denoise": 0.5}, 8109,
        ),
        Family(
            "ltxv", "LTXV", _ltxv, (1, 128, 2, 4, 4), _with(_text(8, 4096), _attention_mask(8)),
            {"scheduler": "simple", "denoise": 0.5}, 8110,
        ),
        Family(
            "ltx2", "LTXAV", _ltx2, ((1, 128, 2, 4, 4), (1, 8, 4, 16)),
            _with(_text(8, 64), lambda gen, latent: {"unprocessed_ltxav_embeds": True}),  # the Gemma encoder's extra
            {"scheduler": "simple", "denoise": 0.5}, 8113, metadata=True,
        ),
        Family(
            "wan22_5b", "WAN22_T2V", _wan22_5b, (1, 48, 2, 8, 8), _text(8, 4096),
            {"scheduler": "simple", "denoise": 0.25}, 8111,
        ),
        Family(
            "cosmos_predict2", "CosmosT2IPredict2", _cosmos_predict2, (1, 16, 1, 8, 8), _text(8, 1024),
            {"scheduler": "sgm_uniform", "denoise": 0.5}, 8112,
        ),
        Family(
            "stable_audio", "StableAudio", _stable_audio, (1, 64, 16), _with(_text(8, 768), _stable_audio_conditioning),
            {"scheduler": "sgm_uniform", "denoise": 0.5}, 8114, checkpoint="model.model.",
            extra_state=_stable_audio_conditioners,
        ),
    ]
}  # fmt: skip


def missing(family: str) -> str | None:
    """Why the running ComfyUI cannot build ``family`` (one sentence naming the version), or None."""
    import comfy.supported_models

    spec = FAMILIES[family]
    if hasattr(comfy.supported_models, spec.model_class):
        return None
    version = ".".join(map(str, comfyui_version()))
    return f"ComfyUI {version} has no {spec.model_class} model class ({family} was added in a later version)"


def _supported(spec: Family, config: dict):
    """An instance of the family's supported-model class for ``config`` (the class itself, not what matches first)."""
    import comfy.supported_models

    return getattr(comfy.supported_models, spec.model_class)(dict(config))


def state_dict(family: str) -> dict[str, torch.Tensor]:
    """Random weights (diffusion-model keys, no prefix, fp16) of the tiny ``family`` network."""
    spec = FAMILIES[family]

    def build():
        config = _supported(spec, spec.config())
        config.set_inference_dtype(torch.float32, None)
        return config.get_model({} if spec.extra_state is None else spec.extra_state()).diffusion_model

    return randomise(_meta(build), spec.seed)


def _normal(value):
    return [_normal(v) for v in value] if isinstance(value, (list, tuple)) else value


def file_metadata(family: str) -> dict | None:
    """The safetensors metadata of the family's file when its files carry their config (None when they do not, or when
    the running ComfyUI's loader takes no metadata)."""
    import inspect
    import json

    import comfy.sd

    spec = FAMILIES[family]
    if not spec.metadata or "metadata" not in inspect.signature(comfy.sd.load_diffusion_model_state_dict).parameters:
        return None
    transformer = {k: v for k, v in spec.config().items() if k not in ("image_model", "audio_model")}
    return {"config": json.dumps({"transformer": transformer})}


def loader_reads_back(family: str, state: dict[str, torch.Tensor]) -> tuple[bool, dict | None]:
    """Whether ComfyUI's loader detects exactly the tiny config (and the family's class) from ``state``'s keys (and
    the file's metadata, for families whose files carry it)."""
    import comfy.model_detection

    spec = FAMILIES[family]
    detected = comfy.model_detection.detect_unet_config(state, "", metadata=file_metadata(family))
    if detected is None:
        return False, None
    wanted = {k: _normal(v) for k, v in spec.config().items()}
    same = {k: _normal(v) for k, v in detected.items()} == wanted
    found = comfy.model_detection.model_config_from_unet_config(dict(detected), state)
    return same and type(found).__name__ == spec.model_class, detected


LOADER = "comfy.sd.load_diffusion_model_state_dict"
CHECKPOINT_LOADER = "comfy.sd.load_state_dict_guess_config"
CLASS = "supported-model class with the tiny config (detection does not read the tiny sizes back)"


@functools.cache
def load(family: str) -> tuple[object, str]:
    """The tiny ``family`` as a ModelPatcher, and how it was loaded (:data:`LOADER`, :data:`CHECKPOINT_LOADER` or
    :data:`CLASS`); fails unless it loaded as the family's class with its weights unchanged."""
    import comfy.sd

    spec = FAMILIES[family]
    state = state_dict(family)
    extra_state = {} if spec.extra_state is None else spec.extra_state()
    if loader_reads_back(family, state)[0]:
        metadata = file_metadata(family)
        extra = {} if metadata is None else {"metadata": metadata}
        if spec.checkpoint is None:
            patcher, how = comfy.sd.load_diffusion_model_state_dict(dict(state), **extra), LOADER
        else:
            checkpoint = {**{spec.checkpoint + k: v for k, v in state.items()}, **extra_state}
            patcher = comfy.sd.load_state_dict_guess_config(checkpoint, output_vae=False, output_clip=False)[0]
            how = CHECKPOINT_LOADER
    else:
        config = _supported(spec, spec.config())
        import comfy.model_management
        import comfy.model_patcher

        config.set_inference_dtype(torch.float32, None)
        model = config.get_model({**state, **extra_state}, "")
        model.load_model_weights(dict(state), "")
        patcher = comfy.model_patcher.ModelPatcher(
            model,
            load_device=comfy.model_management.get_torch_device(),
            offload_device=comfy.model_management.unet_offload_device(),
        )
        how = CLASS
    return checked_load(patcher, how, family, spec.model_class, state)


def conditioning(family: str, seed: int) -> list:
    """A CONDITIONING for ``family``: ``[[cross_attn, extras]]`` with random tensors of the tiny shapes."""
    spec = FAMILIES[family]
    cross_attn, extra = spec.conditioning(torch.Generator().manual_seed(seed), spec.latent)
    return [[cross_attn, extra]]


# --- Wan 2.2 A14B: two experts of the Wan 2.1 architecture, high-noise then low-noise, each its own file ---

WAN22_EXPERT_SEEDS = {"high_noise": 8201, "low_noise": 8202}


@functools.cache
def wan22_experts() -> tuple[object, object]:
    """The high- and low-noise experts of a tiny Wan 2.2 A14B (``WAN21_T2V``, different random weights), each through
    ComfyUI's loader as UNETLoader loads the two files."""
    from tiny_models import load_modern, modern_state_dict

    shapes = {k: v.shape for k, v in modern_state_dict("wan").items()}
    high, low = (load_modern("wan", randomise(shapes, seed))[0] for seed in WAN22_EXPERT_SEEDS.values())
    return high, low
