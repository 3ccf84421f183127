"""In-graph CLIP score nodes: torchmetrics' ``clip_score`` (100·cos, mean clamped at 0) on a ComfyUI IMAGE batch.

The maths and the loading live in :mod:`reg_core.metrics.clip_score`; these nodes only list
``models/clip_score/``, hand the loaded scorer to ComfyUI's model management and format the result. ComfyUI's own
CLIP loaders are not used: they cannot load ViT-B/16 (the paper's model), often lack ``text_projection`` and parse
prompt weights, so they cannot reproduce the paper's number.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import comfy.model_management
import comfy.model_patcher
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..reg_core.metrics import clip_score
from .common import LOGGER_NAME

log = logging.getLogger(LOGGER_NAME)

FOLDER_NAME = "clip_score"
CATEGORY = "sampling/guidance/REG/eval"
CLIP_SCORE_MODEL = io.Custom("REG_CLIP_SCORE_MODEL")
#: ComfyUI's bundled OpenAI CLIP BPE, used when a model folder (or a single file) has no tokenizer files.
TOKENIZER_FALLBACK = Path(comfy.model_management.__file__).resolve().parent / "sd1_tokenizer"


@dataclass(frozen=True)
class ManagedScorer:
    """A loaded CLIP scorer under ComfyUI's model management: its weights wait on the offload device and are moved
    to the load device by :func:`comfy.model_management.load_models_gpu` for scoring, like ComfyUI's CLIP vision
    models, so "free memory" (``unload_all_models``) and ComfyUI's memory estimates see them."""

    scorer: clip_score.CLIPScoreModel
    patcher: comfy.model_patcher.ModelPatcher

    @property
    def model_id(self) -> str:
        return self.scorer.model_id


class ScorerWeights(torch.nn.Module):
    """The CLIPModel as one submodule, for the ModelPatcher (which sets ``.device`` on the module it manages, a
    read-only property of transformers models)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.clip = model


def load_managed(path: Path, dtype: str) -> ManagedScorer:
    """Load through :func:`reg_core.metrics.clip_score.load_clip_score_model` onto the text encoders' offload device."""
    offload = comfy.model_management.text_encoder_offload_device()
    scorer = clip_score.load_clip_score_model(
        path, tokenizer_fallback=TOKENIZER_FALLBACK, dtype=clip_score.DTYPES[dtype], device=offload
    )
    patcher = comfy.model_patcher.ModelPatcher(
        ScorerWeights(scorer.model), load_device=comfy.model_management.text_encoder_device(), offload_device=offload
    )
    return ManagedScorer(scorer, patcher)


def score(
    managed: ManagedScorer, images: torch.Tensor, prompts: list[str], truncation: str
) -> clip_score.CLIPScoreResult:
    """:func:`reg_core.metrics.clip_score.compute_clip_score` with the weights loaded by ComfyUI's model management."""
    comfy.model_management.load_models_gpu([managed.patcher])
    return clip_score.compute_clip_score(managed.scorer, images, prompts, truncation=truncation)


def register_model_folder() -> None:
    """Register ``models/clip_score/`` with ``folder_paths``, merged into any entry from ``extra_model_paths.yaml``.

    A dedicated folder, not ``models/clip``: that is a legacy alias of ``text_encoders`` and CLIPLoader would list
    (and fail on) full CLIPModel files placed there.
    """
    default = os.path.join(folder_paths.models_dir, FOLDER_NAME)
    paths, extensions = folder_paths.folder_names_and_paths.get(FOLDER_NAME, ([], set()))
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[FOLDER_NAME] = (paths, set(extensions) | {".safetensors"})


register_model_folder()


def model_entries() -> list[str]:
    """Choices for the loader: sub-folders holding ``config.json`` and single ``.safetensors`` files.

    Weight files inside a listed model folder are not offered separately.
    """
    folders: set[str] = set()
    for root in folder_paths.get_folder_paths(FOLDER_NAME):
        if not os.path.isdir(root):
            continue
        for directory, _, files in os.walk(root, followlinks=True):
            if clip_score.CONFIG_FILE in files and directory != root:
                folders.add(os.path.relpath(directory, root))
    files = {name for name in folder_paths.get_filename_list(FOLDER_NAME) if os.path.dirname(name) not in folders}
    return sorted(folders | files)


def resolve_entry(name: str) -> Path:
    """Absolute path of a loader choice, searching every registered ``clip_score`` folder."""
    roots = folder_paths.get_folder_paths(FOLDER_NAME)
    for root in roots:
        candidate = Path(root) / name
        if candidate.is_dir() or candidate.is_file():
            return candidate
    raise clip_score.MissingModelFilesError(
        f"model_name {name!r} was not found in {roots}. Put a transformers CLIPModel folder (config.json, "
        "model.safetensors, preprocessor_config.json, tokenizer files; e.g. openai/clip-vit-base-patch16) or a single "
        "CLIPModel .safetensors into models/clip_score/ and refresh the node list."
    )


class REGCLIPScoreLoader(io.ComfyNode):
    """Load a transformers CLIPModel from ``models/clip_score/`` for :class:`REGCLIPScore` (local files only)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="REGCLIPScoreLoader",
            display_name="REG CLIP Score Model Loader",
            category=CATEGORY,
            description=(
                "Loads a full transformers CLIPModel for the CLIP score (torchmetrics' metric). The REG paper used "
                "openai/clip-vit-base-patch16: download config.json, model.safetensors, preprocessor_config.json and "
                "the tokenizer files into models/clip_score/clip-vit-base-patch16/. Never downloads anything."
            ),
            inputs=[
                io.Combo.Input(
                    "model_name",
                    options=model_entries(),
                    tooltip=(
                        "A CLIPModel folder (with config.json) or a single CLIPModel .safetensors file from "
                        "models/clip_score/. Text-encoder-only files such as clip_l.safetensors do not work."
                    ),
                ),
                io.Combo.Input(
                    "dtype",
                    options=list(clip_score.DTYPES),
                    default="fp32",
                    tooltip="Weight precision. fp32 reproduces torchmetrics (and the paper); fp16/bf16 save memory.",
                ),
            ],
            outputs=[CLIP_SCORE_MODEL.Output(display_name="clip_score_model")],
        )

    @classmethod
    def execute(cls, model_name: str, dtype: str) -> io.NodeOutput:
        return io.NodeOutput(load_managed(resolve_entry(model_name), dtype))


def format_summary(result: clip_score.CLIPScoreResult, model_id: str, truncation: str, label: str) -> str:
    """Text shown on the node: the clamped mean, the run's settings, the per-image scores and any notes."""
    lines = [
        f"{clip_score.METRIC_NAME}: {result.mean:.4f}",
        f"n = {result.n}, model {model_id}, truncation {truncation}",
        "per image: " + ", ".join(f"{score:.4f}" for score in result.scores),
    ]
    if label:
        lines.append(f"label: {label}")
    lines.extend(f"note: {note}" for note in result.notes)
    return "\n".join(lines)


class REGCLIPScore(io.ComfyNode):
    """Score an IMAGE batch against its prompts with torchmetrics' ``clip_score`` formula."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="REGCLIPScore",
            display_name="REG CLIP Score",
            category=CATEGORY,
            description=(
                "CLIP score exactly as torchmetrics computes it (the REG paper's metric): 100 x cosine between the "
                "projected image and text embeddings, per image; the mean is clamped at 0. Not Hessel et al.'s "
                "CLIPScore (2.5 x cosine). The result text is in the run's output; to read it on the canvas, connect "
                "'json' to a Preview Any node."
            ),
            inputs=[
                io.Image.Input(
                    "image",
                    tooltip=(
                        "The batch to score. Converted to 8-bit like a saved PNG (rounded); alpha is dropped, "
                        "greyscale repeated, values outside [0, 1] clamped with a warning."
                    ),
                ),
                io.String.Input(
                    "text",
                    multiline=True,
                    default="",
                    dynamic_prompts=False,
                    tooltip=(
                        "The caption(s) the images should match: one line for the whole batch, or one line per image "
                        "in batch order. Used verbatim (no prompt-weight syntax)."
                    ),
                ),
                CLIP_SCORE_MODEL.Input("clip_score_model", tooltip="The model from REG CLIP Score Model Loader."),
                io.Combo.Input(
                    "truncation",
                    options=list(clip_score.TRUNCATION_MODES),
                    default="torchmetrics",
                    tooltip=(
                        "Prompts over 77 tokens: 'torchmetrics' slices them like torchmetrics (EOS is dropped, so "
                        "all such prompts get the same text embedding); 'clip' truncates but keeps EOS, as OpenAI "
                        "CLIP and ComfyUI do. Shorter prompts score the same in both modes."
                    ),
                ),
                io.String.Input(
                    "label",
                    default="",
                    optional=True,
                    tooltip="Free text stored with the result (e.g. the guidance settings), to tie scores to runs.",
                ),
            ],
            outputs=[
                io.Float.Output(display_name="clip_score", tooltip="Mean CLIP score of the batch, clamped at 0."),
                io.String.Output(
                    display_name="json",
                    tooltip="JSON with per-image scores, the mean, n, the model, the label and the truncation mode.",
                ),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(
        cls,
        image: torch.Tensor,
        text: str,
        clip_score_model: ManagedScorer,
        truncation: str,
        label: str = "",
    ) -> io.NodeOutput:
        prompts = clip_score.split_prompts(text, int(image.shape[0]) if image.ndim == 4 else 1, input_name="text")
        result = score(clip_score_model, image, prompts, truncation)
        report = {
            "metric": clip_score.METRIC_NAME,
            "mean": result.mean,
            "scores": result.scores,
            "n": result.n,
            "model": clip_score_model.model_id,
            "label": label,
            "truncation": truncation,
            "notes": result.notes,
        }
        summary = format_summary(result, clip_score_model.model_id, truncation, label)
        log.info("%s", summary)
        return io.NodeOutput(result.mean, json.dumps(report, ensure_ascii=False), ui=ui.PreviewText(summary))


NODES = [REGCLIPScoreLoader, REGCLIPScore]
