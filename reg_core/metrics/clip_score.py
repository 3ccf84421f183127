"""CLIP score exactly as torchmetrics computes it, with local weights and no torchmetrics at run time.

The metric is ``torchmetrics.functional.multimodal.clip_score`` (torchmetrics 1.9.0), which is what REG (Gao et al.,
ICML 2025) reports with ``openai/clip-vit-base-patch16``:

* image features ``model.get_image_features(pixel_values)`` (projected CLS token) from the PIL ``CLIPImageProcessor``
  applied to **uint8** images: RGB, bicubic resize of the shortest edge, centre crop, ×1/255, OpenAI mean/std;
* text features ``model.get_text_features(input_ids, attention_mask)`` (projected EOS token); the tokenizer is called
  without truncation and ids longer than ``max_position_embeddings`` (77) are **sliced**, which drops EOS (see
  :func:`tokenize_prompts` for the consequence);
* per sample ``score_i = 100 · <e_img_i / |e_img_i|, e_txt_i / |e_txt_i|>`` (may be negative);
* the reported score is ``max(mean_i score_i, 0)``: the **mean** is clamped, not each sample.

It is *not* Hessel et al.'s CLIPScore (``2.5 · max(cos, 0)`` per sample). torchmetrics itself is not called because
1.9.0 fails on transformers 5.x (``get_*_features`` return a ``ModelOutput`` there).

Nothing here imports ComfyUI, and transformers is imported only inside the functions that need it, so ``import
reg_core`` works without transformers.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from transformers import CLIPConfig, CLIPModel

log = logging.getLogger(__name__)

TruncationMode = Literal["torchmetrics", "clip"]
#: ``torchmetrics``: slice the ids to 77 tokens, dropping EOS (what the paper's numbers used);
#: ``clip``: truncate inside the tokenizer so EOS stays at the last position (OpenAI ``clip.tokenize(truncate=True)``).
TRUNCATION_MODES: tuple[TruncationMode, ...] = ("torchmetrics", "clip")

#: Name under which results should be labelled, to keep them apart from Hessel et al.'s CLIPScore.
METRIC_NAME = "CLIP score (torchmetrics, ×100)"

#: Images and prompts scored per forward pass; any batch size is split into chunks of this size.
DEFAULT_CHUNK_SIZE = 16

#: Weight dtypes offered to users (fp32 reproduces the paper's setting).
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PREPROCESSOR_FILE = "preprocessor_config.json"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_BPE_FILES = ("vocab.json", "merges.txt")

#: Keys a single ``.safetensors`` file must hold (transformers ``CLIPModel`` layout) for :func:`infer_clip_config`.
REQUIRED_SINGLE_FILE_KEYS = (
    "text_model.embeddings.token_embedding.weight",
    "text_model.embeddings.position_embedding.weight",
    "text_model.encoder.layers.0.mlp.fc1.weight",
    "text_model.final_layer_norm.weight",
    "text_projection.weight",
    "vision_model.embeddings.class_embedding",
    "vision_model.embeddings.patch_embedding.weight",
    "vision_model.embeddings.position_embedding.weight",
    "vision_model.encoder.layers.0.mlp.fc1.weight",
    "visual_projection.weight",
)

_EXPECTED_FOLDER = (
    "a transformers CLIPModel folder (e.g. openai/clip-vit-base-patch16) with config.json, model.safetensors, "
    "preprocessor_config.json and tokenizer files (tokenizer.json, or vocab.json + merges.txt)"
)


class MissingModelFilesError(FileNotFoundError):
    """A model path, or a file the model or tokenizer needs, does not exist."""


class InvalidModelError(ValueError):
    """The files exist but do not describe a full transformers ``CLIPModel`` usable for the score."""


class InvalidInputError(ValueError):
    """Images or prompts cannot be scored; the message names the input and the fix."""


@dataclass(frozen=True)
class CLIPScoreModel:
    """A loaded scorer: transformers ``CLIPModel`` in eval mode, its tokenizer and its PIL image processor."""

    model: CLIPModel
    tokenizer: Any
    image_processor: Any
    model_id: str
    path: Path
    tokenizer_path: Path

    @property
    def device(self) -> torch.device:
        """Device holding the weights."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights."""
        return next(self.model.parameters()).dtype

    @property
    def max_text_tokens(self) -> int:
        """Text context length (``max_position_embeddings``, 77 for OpenAI CLIP): torchmetrics slices ids to it."""
        return int(self.model.config.text_config.max_position_embeddings)


@dataclass(frozen=True)
class CLIPScoreResult:
    """Outcome of :func:`compute_clip_score`.

    ``scores`` are the per-sample ``100·cos`` values (unclamped, as torchmetrics computes them); ``mean`` is
    ``max(mean(scores), 0)``, the value torchmetrics' ``clip_score`` returns; ``notes`` lists anything the caller should
    see (clamped pixel values, sliced prompts).
    """

    scores: list[float]
    mean: float
    notes: list[str]

    @property
    def n(self) -> int:
        """Number of image–prompt pairs scored."""
        return len(self.scores)


# ----------------------------------------------------------------------------------------------------------- loading


def _transformers() -> Any:
    """Import transformers lazily, with an install hint instead of a bare ImportError."""
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The CLIP score needs the 'transformers' package (ComfyUI already requires it; for standalone use "
            "install the pack with its 'clip' extra: pip install 'rectified-gradient-guidance[clip]')."
        ) from exc
    return transformers


def _has_tokenizer_files(folder: Path) -> bool:
    """True when ``folder`` holds a CLIP BPE tokenizer: ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``."""
    return (folder / TOKENIZER_JSON).is_file() or all((folder / name).is_file() for name in TOKENIZER_BPE_FILES)


def _layer_count(keys: Sequence[str], prefix: str) -> int:
    """Number of transformer blocks under ``prefix`` (``…encoder.layers.<i>.``)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in keys if (m := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def infer_clip_config(state_dict: Mapping[str, torch.Tensor]) -> CLIPConfig:
    """Infer a transformers ``CLIPConfig`` from the tensor shapes of a state dict in ``CLIPModel`` key layout.

    Layer counts come from the ``encoder.layers.<i>`` indices; widths from ``final_layer_norm`` (text) and
    ``class_embedding`` (vision); MLP widths from ``layers.0.mlp.fc1``; the patch size from ``patch_embedding``;
    the image size is ``patch · √(positions − 1)``; the projection width from ``visual_projection``; heads are
    ``width / 64`` and the activation ``quick_gelu``, as in every OpenAI CLIP. The text special-token ids are the
    legacy OpenAI values (bos 0, eos 2, pad 1) that ``openai/clip-vit-*`` configs carry, so pooling (argmax of the ids)
    and therefore scores equal those of the matching HF folder.

    Raises :class:`InvalidModelError` naming the missing keys when the layout is not a full ``CLIPModel``.
    """
    missing = [key for key in REQUIRED_SINGLE_FILE_KEYS if key not in state_dict]
    if missing:
        has_text = any(key.startswith("text_model.") for key in state_dict)
        has_vision = any(key.startswith("vision_model.") for key in state_dict)
        hint = ""
        if has_text and not has_vision:
            hint = (
                " It looks like a text encoder only (e.g. a Stable Diffusion clip_l file), which cannot score images."
            )
        elif not has_text and not has_vision:
            hint = " No 'text_model.' or 'vision_model.' keys were found: this is not a transformers CLIPModel file."
        raise InvalidModelError(
            f"Not a full transformers CLIPModel state dict: missing {', '.join(missing)}.{hint} The CLIP score needs "
            "both towers and both projections, e.g. model.safetensors of openai/clip-vit-base-patch16."
        )
    keys = list(state_dict)
    shape = {key: tuple(state_dict[key].shape) for key in REQUIRED_SINGLE_FILE_KEYS}
    text_width = shape["text_model.final_layer_norm.weight"][0]
    vision_width = shape["vision_model.embeddings.class_embedding"][0]
    patch = shape["vision_model.embeddings.patch_embedding.weight"][-1]
    positions = shape["vision_model.embeddings.position_embedding.weight"][0]
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise InvalidModelError(
            f"vision position embeddings: {positions} positions is not 1 + a square number of patches."
        )
    for name, width in (("text", text_width), ("vision", vision_width)):
        if width % 64:
            raise InvalidModelError(f"{name} width {width} is not a multiple of 64 (the head size of OpenAI CLIP).")
    transformers = _transformers()
    return transformers.CLIPConfig(
        text_config={
            "vocab_size": shape["text_model.embeddings.token_embedding.weight"][0],
            "hidden_size": text_width,
            "intermediate_size": shape["text_model.encoder.layers.0.mlp.fc1.weight"][0],
            "num_hidden_layers": _layer_count(keys, "text_model.encoder.layers."),
            "num_attention_heads": text_width // 64,
            "max_position_embeddings": shape["text_model.embeddings.position_embedding.weight"][0],
            "hidden_act": "quick_gelu",
            "bos_token_id": 0,
            "eos_token_id": 2,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": vision_width,
            "intermediate_size": shape["vision_model.encoder.layers.0.mlp.fc1.weight"][0],
            "num_hidden_layers": _layer_count(keys, "vision_model.encoder.layers."),
            "num_attention_heads": vision_width // 64,
            "num_channels": shape["vision_model.embeddings.patch_embedding.weight"][1],
            "image_size": patch * grid,
            "patch_size": patch,
            "hidden_act": "quick_gelu",
        },
        projection_dim=shape["visual_projection.weight"][0],
    )


def _check_loading(missing: Sequence[str], unexpected: Sequence[str], where: Path) -> None:
    """Raise :class:`InvalidModelError` if weights were missing (ignoring the ``position_ids`` buffers)."""
    missing = sorted(k for k in missing if not k.endswith("position_ids"))
    unexpected = sorted(k for k in unexpected if not k.endswith("position_ids"))
    if missing or unexpected:
        raise InvalidModelError(
            f"{where}: weights do not match a transformers CLIPModel (missing: {missing[:8] or 'none'}; "
            f"unexpected: {unexpected[:8] or 'none'}). The CLIP score needs the full model with text_projection and "
            "visual_projection, e.g. openai/clip-vit-base-patch16."
        )


def _check_folder(folder: Path) -> None:
    """Raise unless ``folder`` holds ``config.json`` of a full CLIPModel and ``model.safetensors`` (or its index)."""
    missing = []
    if not (folder / CONFIG_FILE).is_file():
        missing.append(CONFIG_FILE)
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        raise MissingModelFilesError(f"{folder}: missing {', '.join(missing)}. Expected {_EXPECTED_FOLDER}.")
    with open(folder / CONFIG_FILE, encoding="utf-8") as fh:
        model_type = json.load(fh).get("model_type")
    if model_type != "clip":
        raise InvalidModelError(
            f"{folder / CONFIG_FILE}: model_type is {model_type!r}, expected 'clip' (a full CLIPModel, not a text or "
            "vision tower alone)."
        )


def _load_folder_model(folder: Path) -> CLIPModel:
    """``CLIPModel.from_pretrained(folder, local_files_only=True)``: never downloads; missing weights are an error."""
    model, info = _transformers().CLIPModel.from_pretrained(
        str(folder), local_files_only=True, use_safetensors=True, output_loading_info=True
    )
    _check_loading(info["missing_keys"], [], folder)
    return model


def _load_single_file_model(file: Path) -> CLIPModel:
    """Build a ``CLIPModel`` from one ``.safetensors`` in HF key layout, config from :func:`infer_clip_config`."""
    from safetensors.torch import load_file

    state_dict = load_file(str(file))
    model = _transformers().CLIPModel(infer_clip_config(state_dict))
    result = model.load_state_dict(state_dict, strict=False)
    _check_loading(result.missing_keys, result.unexpected_keys, file)
    return model


def _image_processor_class() -> Any:
    """The PIL CLIP image processor: ``CLIPImageProcessorPil`` on transformers 5.x, ``CLIPImageProcessor`` on 4.x.

    transformers 5.x made ``CLIPImageProcessor`` the torchvision backend, which differs by up to one grey level.
    """
    transformers = _transformers()
    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def _load_image_processor(folder: Path | None, image_size: int) -> Any:
    """The folder's ``preprocessor_config.json`` when present, else CLIP defaults with ``size = image_size``."""
    cls = _image_processor_class()
    if folder is not None and (folder / PREPROCESSOR_FILE).is_file():
        processor = cls.from_pretrained(str(folder), local_files_only=True)
    else:
        processor = cls(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    crop_hw = (processor.crop_size["height"], processor.crop_size["width"])
    if crop_hw != (image_size, image_size):
        raise InvalidModelError(
            f"{folder}/{PREPROCESSOR_FILE}: crop size {crop_hw} does not match the model's image_size {image_size}."
        )
    return processor


def _load_tokenizer(path: Path) -> Any:
    """``CLIPTokenizerFast.from_pretrained`` (the class torchmetrics' ``CLIPProcessor`` picks), local files only."""
    transformers = _transformers()
    cls = getattr(transformers, "CLIPTokenizerFast", None) or transformers.CLIPTokenizer
    return cls.from_pretrained(str(path), local_files_only=True)


def load_clip_score_model(
    path: str | Path,
    *,
    tokenizer_fallback: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    model_id: str | None = None,
) -> CLIPScoreModel:
    """Load the model torchmetrics' ``clip_score`` would use, from local files only (never downloads).

    ``path`` is either
      * a folder with ``config.json`` + ``model.safetensors`` (a transformers ``CLIPModel`` such as
        ``openai/clip-vit-base-patch16``), loaded with ``CLIPModel.from_pretrained(local_files_only=True)``; its
        ``preprocessor_config.json`` and tokenizer files are used when present; or
      * a single ``.safetensors`` file in ``CLIPModel`` key layout, whose config is inferred from the tensor shapes by
        :func:`infer_clip_config`.

    Tokenizer: the model folder's tokenizer files (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``); otherwise
    ``tokenizer_fallback``, a folder holding the same OpenAI CLIP BPE (ComfyUI passes its ``comfy/sd1_tokenizer``).
    Image processing: the folder's ``preprocessor_config.json``, else the CLIP defaults for the model's image size.

    Weights are cast to ``dtype`` (fp32 by default, as torchmetrics loads them) and moved to ``device``.
    Raises :class:`MissingModelFilesError` for absent files and :class:`InvalidModelError` for incomplete models.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        _check_folder(path)
        own_files: Path | None = path
    elif path.is_file() and path.suffix == ".safetensors":
        own_files = None
    elif path.is_file():
        raise InvalidModelError(
            f"{path}: only .safetensors files or model folders are supported. Expected {_EXPECTED_FOLDER}."
        )
    else:
        raise MissingModelFilesError(
            f"{path} does not exist. Expected {_EXPECTED_FOLDER}, or a single .safetensors file in CLIPModel layout."
        )
    if own_files is not None and _has_tokenizer_files(own_files):
        tokenizer_path = own_files
    elif tokenizer_fallback is not None and _has_tokenizer_files(Path(tokenizer_fallback)):
        tokenizer_path = Path(tokenizer_fallback)
        log.info("CLIP score: %s has no tokenizer files; using the fallback tokenizer in %s", path, tokenizer_path)
    else:
        raise MissingModelFilesError(
            f"No tokenizer for {path}: expected {TOKENIZER_JSON}, or {' + '.join(TOKENIZER_BPE_FILES)}, in the model "
            f"folder or in the fallback tokenizer folder ({tokenizer_fallback or 'none given'})."
        )

    model = _load_folder_model(path) if own_files is not None else _load_single_file_model(path)
    tokenizer = _load_tokenizer(tokenizer_path)
    vocab_size = int(model.config.text_config.vocab_size)
    if len(tokenizer) > vocab_size:
        raise InvalidModelError(
            f"The tokenizer in {tokenizer_path} has {len(tokenizer)} tokens but the model's vocabulary has "
            f"{vocab_size}; use the tokenizer that belongs to the model."
        )
    image_processor = _load_image_processor(own_files, int(model.config.vision_config.image_size))
    model = model.to(device=device, dtype=dtype).eval()
    log.info("CLIP score model %s loaded (%s, %s)", path, dtype, device)
    return CLIPScoreModel(
        model=model,
        tokenizer=tokenizer,
        image_processor=image_processor,
        model_id=model_id or (path.stem if path.is_file() else path.name),
        path=path,
        tokenizer_path=tokenizer_path,
    )


# ------------------------------------------------------------------------------------------------------------ inputs


def split_prompts(prompt: str, batch_size: int, input_name: str = "prompt") -> list[str]:
    """One prompt per image from a multiline string: one line broadcast to all images, or one line per image.

    torchmetrics requires as many texts as images; this is the node's way to provide them. Leading/trailing blank
    lines are ignored; a blank line between prompts is an error (it would shift the pairing). Error messages name
    the node input ``input_name``.
    """
    lines = [line.strip() for line in prompt.strip().splitlines()]
    if not lines:
        raise InvalidInputError(f"{input_name} is empty: enter the caption the images were generated from.")
    if "" in lines:
        raise InvalidInputError(
            f"{input_name} line {lines.index('') + 1} is blank: remove blank lines between prompts "
            "(one prompt per line)."
        )
    if len(lines) == 1:
        return lines * batch_size
    if len(lines) != batch_size:
        raise InvalidInputError(
            f"{input_name} has {len(lines)} lines but the image batch has {batch_size} images: give one prompt for all "
            f"images, or exactly {batch_size} lines (one prompt per image, in batch order)."
        )
    return lines


def images_to_uint8(images: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """ComfyUI IMAGE ``(B, H, W, C)`` → uint8 RGB ``(B, H, W, 3)`` on the CPU, plus notes for the user.

    torchmetrics' processor expects uint8 (a float image is silently divided by 255 twice), and the paper's images
    were PNGs quantised with round, so floats become ``round(clamp(x, 0, 1) · 255)``; values outside [0, 1] are clamped
    with a logged warning. uint8 input is used as is. Alpha (C = 4, or 2 for grey + alpha) is dropped and greyscale
    (C = 1) repeated to RGB, as PIL's ``convert("RGB")`` does.
    """
    if not isinstance(images, torch.Tensor):
        raise InvalidInputError(f"image must be a ComfyUI IMAGE tensor, got {type(images).__name__}.")
    if images.ndim != 4 or images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise InvalidInputError(
            "image must be a non-empty IMAGE batch of shape (batch, height, width, channels); "
            f"got {tuple(images.shape)}."
        )
    channels = images.shape[-1]
    if channels not in (1, 2, 3, 4):
        raise InvalidInputError(
            f"image has {channels} channels; expected 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA), channels last."
        )
    if channels in (2, 4):
        images = images[..., : channels - 1]
    notes: list[str] = []
    if images.dtype == torch.uint8:
        pixels = images.detach().cpu()
    elif images.is_floating_point():
        # Converted a chunk at a time, so a large batch never needs a second full-size float copy.
        pixels = torch.empty(images.shape, dtype=torch.uint8)
        low, high = math.inf, -math.inf
        for start in range(0, images.shape[0], DEFAULT_CHUNK_SIZE):
            values = images[start : start + DEFAULT_CHUNK_SIZE].detach().cpu().float()
            if not torch.isfinite(values).all():
                raise InvalidInputError("image contains NaN or infinite values; fix the node that produced it.")
            low, high = min(low, float(values.min())), max(high, float(values.max()))
            pixels[start : start + DEFAULT_CHUNK_SIZE] = (values.clamp(0.0, 1.0) * 255.0).round()
        if low < 0.0 or high > 1.0:
            note = f"image values span [{low:.4g}, {high:.4g}]; clamped to [0, 1] before the uint8 conversion"
            log.warning("CLIP score: %s", note)
            notes.append(note)
    else:
        raise InvalidInputError(f"image has dtype {images.dtype}; expected float in [0, 1] or uint8.")
    if pixels.shape[-1] == 1:
        pixels = pixels.expand(-1, -1, -1, 3)
    return pixels.contiguous(), notes


def preprocess_images(scorer: CLIPScoreModel, pixels: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` → ``pixel_values`` ``(B, 3, S, S)`` with the PIL CLIP image processor.

    Same steps as torchmetrics' ``processor(images=…)``: RGB, PIL bicubic resize of the shortest edge (long side
    truncated to int), centre crop, ×1/255, mean/std normalisation.
    """
    pil_images = [Image.fromarray(np.ascontiguousarray(image.numpy())) for image in pixels]
    batch = scorer.image_processor(images=pil_images, return_tensors="pt", input_data_format="channels_last")
    return batch["pixel_values"]


def _check_truncation(truncation: str) -> None:
    """Reject unknown truncation modes before any work is done."""
    if truncation not in TRUNCATION_MODES:
        raise InvalidInputError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}.")


def prompt_token_counts(scorer: CLIPScoreModel, prompts: Sequence[str]) -> list[int]:
    """Untruncated token counts (with BOS and EOS) of each prompt."""
    return [len(ids) for ids in scorer.tokenizer(list(prompts))["input_ids"]]


def tokenize_prompts(
    scorer: CLIPScoreModel, prompts: Sequence[str], truncation: TruncationMode = "torchmetrics"
) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` for ``get_text_features``, padded to the longest prompt.

    ``torchmetrics``: tokenise without truncation and slice to ``max_position_embeddings`` (77), as torchmetrics does.
    A prompt over 77 tokens then has no EOS, and transformers pools at position 0 (BOS): under the legacy
    ``eos_token_id = 2`` of OpenAI configs it takes argmax of the ids, which is BOS (49406) once EOS (49407) is gone;
    under ``eos_token_id = 49407`` it finds no EOS and falls back to index 0. The text tower is causal, so **every
    sliced prompt gets the same text embedding**, whatever it says; the short prompts of the paper are unaffected.
    ``clip``: truncate inside the tokenizer, which keeps EOS at the last position (OpenAI
    ``clip.tokenize(truncate=True)``, ComfyUI) so the caption's first 75 tokens are scored.
    """
    _check_truncation(truncation)
    limit = scorer.max_text_tokens
    if truncation == "clip":
        batch = scorer.tokenizer(list(prompts), padding=True, truncation=True, max_length=limit, return_tensors="pt")
    else:
        batch = scorer.tokenizer(list(prompts), padding=True, return_tensors="pt")
    return {key: batch[key][..., :limit] for key in ("input_ids", "attention_mask")}


def _embedding(output: Any) -> torch.Tensor:
    """Projected features from ``get_*_features``: a tensor on transformers 4.x, ``.pooler_output`` on 5.x."""
    return output if torch.is_tensor(output) else output.pooler_output


# ----------------------------------------------------------------------------------------------------------- scoring


def clip_scores(
    scorer: CLIPScoreModel,
    images: torch.Tensor,
    prompts: Sequence[str],
    *,
    truncation: TruncationMode = "torchmetrics",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Per-sample torchmetrics CLIP scores ``100 · cos(E_img_i, E_txt_i)`` as a float32 CPU tensor ``(B,)``.

    ``images`` is a ComfyUI IMAGE ``(B, H, W, C)`` (float in [0, 1] or uint8) and ``prompts`` has one text per image.
    The batch is scored ``chunk_size`` pairs at a time; each pair's score does not depend on the chunking (causal text
    attention makes padding irrelevant). Scores are not clamped.
    """
    pixels, _ = images_to_uint8(images)
    return _scores_from_uint8(scorer, pixels, prompts, truncation, chunk_size)


def _scores_from_uint8(
    scorer: CLIPScoreModel, pixels: torch.Tensor, prompts: Sequence[str], truncation: TruncationMode, chunk_size: int
) -> torch.Tensor:
    """:func:`clip_scores` after the uint8 conversion (shared by :func:`compute_clip_score`)."""
    if len(prompts) != pixels.shape[0]:
        raise InvalidInputError(f"got {len(prompts)} prompts for {pixels.shape[0]} images; they must be paired 1:1.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InvalidInputError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    _check_truncation(truncation)
    device, dtype = scorer.device, scorer.dtype
    scores = []
    with torch.inference_mode():
        for start in range(0, len(prompts), chunk_size):
            stop = start + chunk_size
            pixel_values = preprocess_images(scorer, pixels[start:stop]).to(device=device, dtype=dtype)
            tokens = tokenize_prompts(scorer, prompts[start:stop], truncation)
            image_features = _embedding(scorer.model.get_image_features(pixel_values=pixel_values)).float()
            text_features = _embedding(
                scorer.model.get_text_features(
                    input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
                )
            ).float()
            image_features = image_features / image_features.norm(p=2, dim=-1, keepdim=True)
            text_features = text_features / text_features.norm(p=2, dim=-1, keepdim=True)
            scores.append((100 * (image_features * text_features).sum(dim=-1)).cpu())
    return torch.cat(scores)


def clamped_mean(scores: torch.Tensor | Sequence[float]) -> float:
    """torchmetrics' reduction: ``max(mean(scores), 0)`` — the mean is clamped, individual scores are not."""
    values = torch.as_tensor(scores, dtype=torch.float64)
    if values.numel() == 0:
        raise InvalidInputError("no scores to average.")
    return max(float(values.mean()), 0.0)


def compute_clip_score(
    scorer: CLIPScoreModel,
    images: torch.Tensor,
    prompts: Sequence[str],
    *,
    truncation: TruncationMode = "torchmetrics",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> CLIPScoreResult:
    """torchmetrics ``clip_score(images, prompts)`` for a ComfyUI IMAGE batch: per-sample scores and clamped mean.

    See :func:`clip_scores` for the inputs. The notes report clamped pixel values and prompts longer than the text
    context (and what the truncation mode did with them).
    """
    _check_truncation(truncation)
    pixels, notes = images_to_uint8(images)
    prompts = list(prompts)
    limit = scorer.max_text_tokens
    for index, count in enumerate(prompt_token_counts(scorer, prompts)):
        if count > limit:
            action = (
                "sliced as torchmetrics does (EOS dropped: the text embedding is that of BOS and ignores the caption)"
                if truncation == "torchmetrics"
                else "truncated to its first tokens (EOS kept)"
            )
            note = f"prompt {index + 1} has {count} tokens, over the {limit}-token limit; {action}"
            log.warning("CLIP score: %s", note)
            notes.append(note)
    scores = _scores_from_uint8(scorer, pixels, prompts, truncation, chunk_size)
    return CLIPScoreResult(scores=scores.tolist(), mean=clamped_mean(scores), notes=notes)
