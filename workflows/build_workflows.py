"""Build the pack's example workflows: API twins for CI and UI templates for ComfyUI's template browser.

Every workflow is written once, in API format (what ``POST /prompt`` accepts), by a function below. This script
completes it with the defaults of every widget the frontend would send, writes it to
``workflows/api/<name>.api.json``, and converts it deterministically to the UI format the frontend saves
(``workflows/<name>.json``: ``nodes[]`` with positional ``widgets_values``, ``links[]``, groups, a Markdown note,
``version`` 0.4). The conversion reads the live node definitions from ComfyUI (the data ``GET /object_info``
returns), so widget order, ``control_after_generate`` values and socket indices follow the frontend of the ComfyUI it
runs in.

Run it with ComfyUI's interpreter from anywhere::

    ~/ComfyUI/.venv/bin/python workflows/build_workflows.py            # (re)write every workflow
    ~/ComfyUI/.venv/bin/python workflows/build_workflows.py --check    # exit 1 if a file is missing or stale

ComfyUI is found through ``--comfyui``, ``COMFYUI_PATH``, the ``ComfyUI/custom_nodes/<pack>`` layout, or
``~/ComfyUI``. Nothing of ComfyUI is copied or rebuilt: it is imported, its built-in nodes and this pack are loaded.

The template browser lists ``custom_nodes/<pack>/workflows/*.json`` (not sub-folders), so the API twins live in
``workflows/api/`` and are never offered as templates.

To add a workflow: write a function returning a :class:`Workflow` whose :class:`Graph` gives every node a title and,
unless it is shared by every branch, a ``lane`` (one horizontal band, framed by a group, per compared branch);
decorate it with ``@workflow("name")`` and run this script. ``tests/integration/test_workflows.py`` then checks that
the UI file converts back to the API twin, validates the twin and runs it with the tiny test models; a new model file
needs a tiny stand-in in that test's ``tinyfy()``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("build_workflows")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
API_DIR = HERE / "api"
API_SUFFIX = ".api.json"

# --------------------------------------------------------------------------------------------------------------------
# Model files the workflows expect (common official names) and where ComfyUI looks for them.
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFile:
    name: str
    directory: str  # ComfyUI models/ sub-folder
    url: str  # where to download it (shown by the frontend's missing-models dialog for single files)
    note: str = ""

    @property
    def is_folder(self) -> bool:
        return self.name.endswith("/")


SD15 = ModelFile(
    "v1-5-pruned-emaonly-fp16.safetensors",
    "checkpoints",
    "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/v1-5-pruned-emaonly-fp16.safetensors",
    "the SD1.5 checkpoint of ComfyUI's default workflow",
)
SD35_MEDIUM = ModelFile(
    "sd3.5_medium.safetensors",
    "checkpoints",
    "https://huggingface.co/stabilityai/stable-diffusion-3.5-medium/resolve/main/sd3.5_medium.safetensors",
    "Stability AI's SD3.5 Medium: MMDiT + VAE, no text encoders; gated, accept the licence on Hugging Face first",
)
CLIP_L = ModelFile(
    "clip_l.safetensors",
    "text_encoders",
    "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors",
)
CLIP_G = ModelFile(
    "clip_g.safetensors",
    "text_encoders",
    "https://huggingface.co/stabilityai/stable-diffusion-3.5-medium/resolve/main/text_encoders/clip_g.safetensors",
)
T5XXL = ModelFile(
    "t5xxl_fp16.safetensors",
    "text_encoders",
    "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors",
    "t5xxl_fp8_e4m3fn.safetensors works too and needs half the memory",
)

CLIP_SCORE_VIT_B16 = ModelFile(
    "clip-vit-base-patch16/",
    "clip_score",
    "https://huggingface.co/openai/clip-vit-base-patch16",
    "a folder with config.json, model.safetensors, preprocessor_config.json, vocab.json, merges.txt, "
    "tokenizer_config.json and special_tokens_map.json from openai/clip-vit-base-patch16, the REG paper's CLIP model",
)

POSITIVE = "a photograph of an astronaut riding a horse on the moon, earth in the sky, detailed, sharp focus"
NEGATIVE = "blurry, low quality, deformed, watermark, text"
SEED = 123456789
SD15_STEPS, SD15_CFG = 25, 7.5
SD3_STEPS, SD3_CFG = 40, 4.5  # Stability AI's recommended SD3.5 Medium settings

# --------------------------------------------------------------------------------------------------------------------
# API graphs with titles and lanes
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Node:
    id: str
    class_type: str
    title: str
    inputs: dict[str, Any]
    lane: str | None  # None: shared by every branch (drawn on the left)
    models: tuple[ModelFile, ...] = ()

    def out(self, slot: int = 0) -> list[Any]:
        return [self.id, slot]


class Graph:
    """An API-format prompt under construction; ids are "1", "2", … in creation order."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}

    def node(
        self,
        class_type: str,
        title: str,
        *,
        lane: str | None = None,
        models: Iterable[ModelFile] = (),
        **inputs: Any,
    ) -> Node:
        node = Node(str(len(self.nodes) + 1), class_type, title, inputs, lane, tuple(models))
        self.nodes[node.id] = node
        return node

    def api(self) -> dict[str, Any]:
        return {
            nid: {"inputs": dict(n.inputs), "class_type": n.class_type, "_meta": {"title": n.title}}
            for nid, n in self.nodes.items()
        }


@dataclass
class Workflow:
    name: str
    graph: Graph
    lanes: list[tuple[str, str]]  # (lane id, group title), top to bottom
    note: str  # Markdown shown in a note node (UI only)
    extra_notes: list[str] = field(default_factory=list)


WORKFLOWS: dict[str, Callable[[], Workflow]] = {}


def workflow(name: str) -> Callable[[Callable[[], Workflow]], Callable[[], Workflow]]:
    def register(build: Callable[[], Workflow]) -> Callable[[], Workflow]:
        if name in WORKFLOWS:
            raise ValueError(f"workflow {name!r} defined twice")
        WORKFLOWS[name] = build
        return build

    return register


@dataclass(frozen=True)
class Base:
    """The loader part every branch shares: model, CLIP, VAE, the two prompts, the latent and the seed."""

    model: list[Any]
    clip: list[Any]
    vae: list[Any]
    positive: list[Any]
    negative: list[Any]
    latent: list[Any]
    seed: list[Any]


def _prompts_and_seed(g: Graph, clip: list[Any]) -> tuple[Node, Node, Node]:
    pos = g.node("CLIPTextEncode", "Positive prompt", text=POSITIVE, clip=clip)
    neg = g.node("CLIPTextEncode", "Negative prompt", text=NEGATIVE, clip=clip)
    seed = g.node("PrimitiveInt", "Seed (every sampler)", value=SEED)
    return pos, neg, seed


def sd15_base(g: Graph) -> Base:
    ckpt = g.node("CheckpointLoaderSimple", "Load Checkpoint (SD1.5)", models=[SD15], ckpt_name=SD15.name)
    latent = g.node("EmptyLatentImage", "Empty Latent 512×512", width=512, height=512, batch_size=1)
    pos, neg, seed = _prompts_and_seed(g, ckpt.out(1))
    return Base(ckpt.out(0), ckpt.out(1), ckpt.out(2), pos.out(), neg.out(), latent.out(), seed.out())


def sd3_base(g: Graph) -> Base:
    ckpt = g.node(
        "CheckpointLoaderSimple", "Load Checkpoint (SD3.5 Medium)", models=[SD35_MEDIUM], ckpt_name=SD35_MEDIUM.name
    )
    clip = g.node(
        "TripleCLIPLoader",
        "Load text encoders (CLIP-L, CLIP-G, T5-XXL)",
        models=[CLIP_L, CLIP_G, T5XXL],
        clip_name1=CLIP_L.name,
        clip_name2=CLIP_G.name,
        clip_name3=T5XXL.name,
    )
    latent = g.node("EmptySD3LatentImage", "Empty SD3 Latent 1024×1024", width=1024, height=1024, batch_size=1)
    pos, neg, seed = _prompts_and_seed(g, clip.out(0))
    return Base(ckpt.out(0), clip.out(0), ckpt.out(2), pos.out(), neg.out(), latent.out(), seed.out())


def ksampler_branch(
    g: Graph,
    base: Base,
    model: list[Any],
    *,
    lane: str,
    label: str,
    prefix: str,
    steps: int = SD15_STEPS,
    cfg: float = SD15_CFG,
    sampler_name: str = "euler",
    scheduler: str = "normal",
) -> Node:
    """KSampler → VAE Decode → Save Image in one lane; returns the KSampler."""
    sampler = g.node(
        "KSampler",
        f"KSampler ({label})",
        lane=lane,
        model=model,
        seed=base.seed,
        steps=steps,
        cfg=cfg,
        sampler_name=sampler_name,
        scheduler=scheduler,
        positive=base.positive,
        negative=base.negative,
        latent_image=base.latent,
        denoise=1.0,
    )
    decode_and_save(g, base, sampler.out(0), lane=lane, label=label, prefix=prefix)
    return sampler


def decode_and_save(g: Graph, base: Base, samples: list[Any], *, lane: str, label: str, prefix: str) -> Node:
    image = g.node("VAEDecode", f"VAE Decode ({label})", lane=lane, samples=samples, vae=base.vae)
    return g.node("SaveImage", f"Save Image ({label})", lane=lane, images=image.out(0), filename_prefix=f"REG/{prefix}")


def reg_guidance(g: Graph, model: list[Any], *, lane: str, title: str = "REG Guidance", strength: float = 1.0) -> Node:
    return g.node(
        "REGGuidance",
        title,
        lane=lane,
        model=model,
        strength=strength,
        estimator="vjp",
        start_percent=0.0,
        end_percent=1.0,
        refresh_every=1,
    )


SAME_SETTINGS = (
    "Every sampler uses the same seed (the **Seed** node feeds all of them), prompt, steps, cfg, sampler and "
    "scheduler; change those in every sampler together."
)
REG_COST = (
    "REG's `vjp` estimator costs about one extra backward pass of the positive branch per step (roughly twice the "
    "compute of a CFG step, plus one forward's activation memory). If memory is tight, set `estimator` to "
    "`gradient-free` (one extra forward, no gradients) or `refresh_every` to 2–4."
)
WHAT_TO_LOOK_AT = (
    "REG multiplies the guidance, element by element, by M = ∇ₓ Σ D_cond: near 0 at high noise (guidance mostly off), "
    "near 1 at low noise (the guidance you chose), spatially varying in between. Compare colour saturation and "
    "contrast, fine detail and how closely each image follows the prompt. `strength` blends between your guidance "
    "(0: exactly the baseline image) and REG (1)."
)


def needs(*models: ModelFile) -> str:
    lines = ["**Model files:**"]
    for m in models:
        extra = f" ({m.note})" if m.note else ""
        lines.append(f"- `models/{m.directory}/{m.name}`{extra}")
    return "\n".join(lines)


@workflow("sd15_cfg_vs_reg")
def sd15_cfg_vs_reg() -> Workflow:
    g = Graph()
    base = sd15_base(g)
    ksampler_branch(g, base, base.model, lane="cfg", label=f"CFG {SD15_CFG}", prefix="sd15_cfg")
    reg = reg_guidance(g, base.model, lane="reg")
    ksampler_branch(g, base, reg.out(0), lane="reg", label=f"CFG {SD15_CFG} + REG", prefix="sd15_reg")
    note = "\n\n".join(
        [
            "# SD1.5: CFG vs CFG + REG",
            needs(SD15),
            f"Top: plain classifier-free guidance (cfg {SD15_CFG}). Bottom: the same KSampler on the model patched by "
            "**REG Guidance** (strength 1, the paper's REG). " + SAME_SETTINGS,
            WHAT_TO_LOOK_AT,
            REG_COST,
            "Images are saved to `output/REG/`.",
        ]
    )
    return Workflow("sd15_cfg_vs_reg", g, [("cfg", "CFG (baseline)"), ("reg", "CFG + REG")], note)


@workflow("apg_plus_reg")
def apg_plus_reg() -> Workflow:
    g = Graph()
    base = sd15_base(g)
    apg = g.node("APG", "Adaptive Projected Guidance", model=base.model, eta=0.0, norm_threshold=5.0, momentum=0.0)
    ksampler_branch(g, base, apg.out(0), lane="apg", label="APG", prefix="apg")
    reg = reg_guidance(g, apg.out(0), lane="reg")
    ksampler_branch(g, base, reg.out(0), lane="reg", label="APG + REG", prefix="apg_reg")
    note = "\n\n".join(
        [
            "# SD1.5: APG vs APG + REG",
            needs(SD15),
            "ComfyUI's **Adaptive Projected Guidance** node patches the model once; the top KSampler uses it as is, "
            "the bottom one after **REG Guidance**, which rectifies whatever guidance the model's chain produces "
            "(the node order does not matter). APG here: `eta` 0 drops the part of the guidance parallel to the "
            "conditional prediction, `norm_threshold` 5 clips its norm, no momentum. " + SAME_SETTINGS,
            "REG uses the true conditional prediction even though APG rewrites it, and multiplies APG's final "
            "guidance by M. Compare detail and saturation between the two; set REG's `strength` to 0 to get the "
            "top image back exactly.",
            REG_COST,
        ]
    )
    return Workflow("apg_plus_reg", g, [("apg", "APG (baseline)"), ("reg", "APG + REG")], note)


@workflow("pag_plus_reg")
def pag_plus_reg() -> Workflow:
    g = Graph()
    base = sd15_base(g)
    cfg = 5.0
    pag = g.node("PerturbedAttentionGuidance", "Perturbed-Attention Guidance", model=base.model, scale=3.0)
    ksampler_branch(g, base, pag.out(0), lane="pag", label="PAG", prefix="pag", cfg=cfg)
    reg = reg_guidance(g, pag.out(0), lane="reg")
    ksampler_branch(g, base, reg.out(0), lane="reg", label="PAG + REG", prefix="pag_reg", cfg=cfg)
    note = "\n\n".join(
        [
            "# SD1.5: PAG vs PAG + REG",
            needs(SD15),
            "ComfyUI's **PerturbedAttentionGuidance** (scale 3, on top of cfg 5) patches the model; the bottom "
            "KSampler adds **REG Guidance**, which multiplies the combined CFG + PAG guidance element-wise by M. "
            "PAG's extra perturbed pass is never differentiated, so REG adds the same cost as with CFG alone. "
            + SAME_SETTINGS,
            "Compare structure, detail and saturation between the two; `strength` 0 reproduces the top image exactly.",
            REG_COST,
        ]
    )
    return Workflow("pag_plus_reg", g, [("pag", "PAG (baseline)"), ("reg", "PAG + REG")], note)


@workflow("sd3_reg")
def sd3_reg() -> Workflow:
    g = Graph()
    base = sd3_base(g)
    common = {"steps": SD3_STEPS, "cfg": SD3_CFG, "sampler_name": "euler", "scheduler": "sgm_uniform"}
    ksampler_branch(g, base, base.model, lane="cfg", label=f"CFG {SD3_CFG}", prefix="sd3_cfg", **common)
    reg = reg_guidance(g, base.model, lane="reg")
    ksampler_branch(g, base, reg.out(0), lane="reg", label=f"CFG {SD3_CFG} + REG", prefix="sd3_reg", **common)
    note = "\n\n".join(
        [
            "# SD3.5 Medium (flow model): CFG vs CFG + REG",
            needs(SD35_MEDIUM, CLIP_L, CLIP_G, T5XXL),
            f"SD3 is a rectified-flow model; REG's factor there is M = (1 − σ) · ∇ₓ Σ D_cond, handled automatically. "
            f"Top: CFG {SD3_CFG} and {SD3_STEPS} steps (the settings of Stability AI's SD3.5 Medium example), "
            "euler / sgm_uniform. "
            "Bottom: the same with **REG Guidance**. " + SAME_SETTINGS,
            WHAT_TO_LOOK_AT,
            REG_COST,
        ]
    )
    return Workflow("sd3_reg", g, [("cfg", "CFG (baseline)"), ("reg", "CFG + REG")], note)


@workflow("reg_guider_custom_advanced")
def reg_guider_custom_advanced() -> Workflow:
    g = Graph()
    base = sd15_base(g)
    noise = g.node("RandomNoise", "Random Noise", noise_seed=base.seed)
    sampler = g.node("KSamplerSelect", "KSampler Select", sampler_name="euler")
    sigmas = g.node(
        "BasicScheduler", "Basic Scheduler", model=base.model, scheduler="normal", steps=SD15_STEPS, denoise=1.0
    )
    guider_settings = {
        "cfg": 6.5,
        "base": "apg",
        "eta": 0.0,
        "norm_threshold": 5.0,
        "momentum": 0.0,
        "pag_scale": 3.0,
        "estimator": "vjp",
        "start_percent": 0.0,
        "end_percent": 1.0,
        "refresh_every": 1,
        "schedule": "cosine",
        "end_cfg": 1.0,
        "sigma_low": 0.28,
        "sigma_high": 2.9,
        "exponent": 1.0,
        "progress": "steps",
    }
    for lane, strength, label, prefix in (
        ("off", 0.0, "REG off", "guider_reg_off"),
        ("on", 1.0, "REG on", "guider_reg_on"),
    ):
        guider = g.node(
            "REGGuider",
            f"REG Guider: APG + cosine ({label})",
            lane=lane,
            model=base.model,
            positive=base.positive,
            negative=base.negative,
            strength=strength,
            **guider_settings,
        )
        out = g.node(
            "SamplerCustomAdvanced",
            f"SamplerCustomAdvanced ({label})",
            lane=lane,
            noise=noise.out(0),
            guider=guider.out(0),
            sampler=sampler.out(0),
            sigmas=sigmas.out(0),
            latent_image=base.latent,
        )
        decode_and_save(g, base, out.out(0), lane=lane, label=label, prefix=prefix)
    note = "\n\n".join(
        [
            "# SamplerCustomAdvanced with the REG Guider",
            needs(SD15),
            "**REG Guider** is one GUIDER node with the base guidance, a schedule and REG. Here: base `apg` "
            "(APG's cond-anchored scale: cfg 6.5 with eta 1, no clipping and no momentum would equal plain cfg 7.5; "
            "eta 0 drops the component parallel to the conditional prediction) and the `cosine` schedule, which "
            "raises the guidance weight from 0 at the first step to the full cfg at the last.",
            "Top: the guider with `strength` 0, which is exactly APG + schedule without REG. Bottom: `strength` 1. "
            "Both share the noise, sampler and sigmas nodes, so REG is the only difference.",
            "Do not also patch the model with REG Guidance when you use the REG Guider (the node refuses). "
            "The schedule inputs (`end_cfg`, `sigma_low`/`sigma_high`, `exponent`, `progress`) apply to their "
            "schedules only; `pag_scale` only to base `pag`.",
            REG_COST,
        ]
    )
    return Workflow(
        "reg_guider_custom_advanced",
        g,
        [("off", "REG Guider, strength 0 (baseline)"), ("on", "REG Guider, REG on")],
        note,
    )


@workflow("reg_schedule")
def reg_schedule() -> Workflow:
    g = Graph()
    base = sd15_base(g)
    ksampler_branch(g, base, base.model, lane="cfg", label="constant CFG", prefix="schedule_constant")
    sched = g.node(
        "REGGuidanceSchedule",
        "REG Guidance Schedule (interval)",
        model=base.model,
        schedule="interval",
        end_cfg=1.0,
        sigma_low=0.28,
        sigma_high=2.9,
        exponent=1.0,
        progress="steps",
    )
    ksampler_branch(g, base, sched.out(0), lane="interval", label="interval", prefix="schedule_interval")
    reg = reg_guidance(g, sched.out(0), lane="reg")
    ksampler_branch(g, base, reg.out(0), lane="reg", label="interval + REG", prefix="schedule_interval_reg")
    note = "\n\n".join(
        [
            "# Guidance schedules with KSampler: interval guidance, then REG on top",
            needs(SD15),
            f"Top: constant cfg {SD15_CFG}. Middle: **REG Guidance Schedule** `interval`: full cfg only while "
            "0.28 ≤ σ ≤ 2.90 (the REG paper's EDM2 window), the conditional prediction alone outside it, where the "
            "negative pass is skipped. Bottom: the same schedule followed by **REG Guidance**; the two patches "
            "compose in either order. " + SAME_SETTINGS,
            "Other schedules: `linear` (cfg at the first step → `end_cfg` at the last) and `cosine` (from no "
            "guidance to the full cfg). For SD1.5 the σ window sits in the middle of sampling; widen it with "
            "`sigma_high` to guide earlier steps.",
            REG_COST,
        ]
    )
    lanes = [("cfg", "Constant CFG (baseline)"), ("interval", "Interval schedule"), ("reg", "Interval schedule + REG")]
    return Workflow("reg_schedule", g, lanes, note)


@workflow("reg_diagnostics")
def reg_diagnostics() -> Workflow:
    g = Graph()
    base = sd15_base(g)
    reg = reg_guidance(g, base.model, lane="reg")
    sampler = ksampler_branch(g, base, reg.out(0), lane="reg", label=f"CFG {SD15_CFG} + REG", prefix="diagnostics")
    diag = g.node(
        "REGDiagnostics",
        "REG Diagnostics",
        lane="diag",
        latent=sampler.out(0),
        steps="auto",
        sample=0,
        model=reg.out(0),
    )
    g.node("PreviewImage", "M statistics per model evaluation", lane="diag", images=diag.out(0))
    g.node("PreviewImage", "M heatmaps", lane="diag", images=diag.out(1))
    note = "\n\n".join(
        [
            "# REG Diagnostics next to the image",
            needs(SD15),
            "**REG Diagnostics** reads what REG did during the last run of the sampler: connect the sampler's "
            "LATENT (so it runs after sampling) and the MODEL output of REG Guidance that the sampler used (or a "
            "REG Guider to `guider`).",
            "Statistics: M's mean and percentiles per model evaluation, the share of M < 0 and M > 1 and how "
            "much guidance REG kept, with REG's window shaded. Heatmaps: M at up to 6 evaluations (`steps`: "
            "`auto` or indices like `0, 5, -1`); white = guidance unchanged, blue = reduced, red = amplified. "
            "For an ideal denoiser M is near 0 (blue) at high noise and near 1 (white) at low noise. The node's "
            "JSON output has every number (connect it to a Preview Any node to read it).",
            REG_COST,
        ]
    )
    return Workflow("reg_diagnostics", g, [("reg", "CFG + REG"), ("diag", "REG Diagnostics")], note)


@workflow("reg_guidance_sweep")
def reg_guidance_sweep() -> Workflow:
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", "Load Checkpoint (SD1.5)", models=[SD15], ckpt_name=SD15.name)
    latent = g.node("EmptyLatentImage", "Empty Latent 512×512", width=512, height=512, batch_size=1)
    prompt = g.node("PrimitiveStringMultiline", "Prompt (encoded and scored)", value=POSITIVE)
    scorer = g.node(
        "REGCLIPScoreLoader",
        "REG CLIP Score Model Loader",
        models=[CLIP_SCORE_VIT_B16],
        model_name=CLIP_SCORE_VIT_B16.name.rstrip("/"),
        dtype="fp32",
    )
    pos = g.node("CLIPTextEncode", "Positive prompt", text=prompt.out(0), clip=ckpt.out(1))
    neg = g.node("CLIPTextEncode", "Negative prompt", text=NEGATIVE, clip=ckpt.out(1))
    sweep = g.node(
        "REGGuidanceSweep",
        "REG Guidance Sweep (CLIP score vs cfg)",
        lane="sweep",
        model=ckpt.out(0),
        positive=pos.out(0),
        negative=neg.out(0),
        latent_image=latent.out(0),
        vae=ckpt.out(2),
        clip_score_model=scorer.out(0),
        score_prompt=prompt.out(0),
        seed=SEED,
        steps=20,
        sampler_name="euler",
        scheduler="normal",
        cfg_values="2, 4, 6, 8",
        include_cfg=True,
        include_reg=True,
        include_apg_reg=False,
        include_pag_reg=False,
        strength=1.0,
        estimator="vjp",
        start_percent=0.0,
        end_percent=1.0,
        refresh_every=1,
        eta=1.0,
        norm_threshold=5.0,
        momentum=0.0,
        pag_scale=3.0,
        truncation="torchmetrics",
    )
    g.node("PreviewImage", "CLIP score vs cfg", lane="sweep", images=sweep.out(0))
    g.node("PreviewImage", "Grid: methods × cfg", lane="sweep", images=sweep.out(1))
    g.node("PreviewAny", "Report (JSON)", lane="sweep", source=sweep.out(2))
    note = "\n\n".join(
        [
            "# REG Guidance Sweep: CLIP score against cfg on your prompt",
            needs(SD15, CLIP_SCORE_VIT_B16),
            "The sweep samples the prompt once per method and cfg value with one seed (here CFG and CFG + REG at cfg "
            "2, 4, 6 and 8: 8 full sampling runs of 20 steps), decodes every image and scores it with the CLIP score "
            "(torchmetrics' formula: 100 × cosine of the image and caption embeddings). Outputs: the score-vs-cfg "
            "plot (one curve per method), the grid (rows = methods, columns = cfg, each cell captioned with its "
            "score) and a JSON report, shown by the Preview Any node.",
            "The **Prompt** node feeds both the positive text encode and the sweep's `score_prompt`, so each image "
            "is scored against the caption it was made from. If your prompt uses weights or style tags, disconnect "
            "`score_prompt` and type a plain caption there.",
            "Tick `include_apg_reg` / `include_pag_reg` for APG + REG and PAG + REG rows (their settings are on the "
            "node). The CLIP score of one image is noisy: compare curves over a batch (Empty Latent `batch_size`) or "
            "several seeds before drawing conclusions.",
            REG_COST,
        ]
    )
    return Workflow("reg_guidance_sweep", g, [("sweep", "REG Guidance Sweep")], note)


# --------------------------------------------------------------------------------------------------------------------
# Node definitions, as GET /object_info returns them
# --------------------------------------------------------------------------------------------------------------------

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
UNSUPPORTED_WIDGET_OPTIONS = ("image_upload", "video_upload", "animated_image_upload", "remote", "image_folder")


def node_info(class_type: str) -> dict[str, Any]:
    """What ComfyUI's server reports for a node (server.py ``node_info``), as plain JSON data."""
    from comfy_api.internal import _ComfyNodeInternal

    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS[class_type]
    if issubclass(cls, _ComfyNodeInternal):
        info = cls.GET_NODE_INFO_V1()
    else:
        types = cls.INPUT_TYPES()
        info = {
            "input": types,
            "input_order": {key: list(value) for key, value in types.items()},
            "output": cls.RETURN_TYPES,
            "output_is_list": getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES)),
            "output_name": getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES),
            "name": class_type,
            "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(class_type, class_type),
        }
    return json.loads(json.dumps(info, default=str))  # what the HTTP endpoint would serialise


@dataclass(frozen=True)
class InputSpec:
    name: str
    type: str  # "COMBO" for lists of options, as the frontend normalises it
    options: dict[str, Any]
    optional: bool

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.options.get("forceInput", False)

    @property
    def control_values(self) -> int:
        """How many extra widgets_values the frontend stores after this widget (control_after_generate)."""
        if not self.is_widget:
            return 0
        control = self.options.get("control_after_generate")
        if self.type == "INT":
            if control is None:
                control = self.name in ("seed", "noise_seed")  # the frontend's legacy convention
            return 1 if control else 0
        if control:
            raise NotImplementedError(f"{self.name}: control_after_generate on a {self.type} widget")
        return 0

    def default(self) -> Any:
        if "default" in self.options:
            return self.options["default"]
        if self.type == "COMBO":
            raise ValueError(f"{self.name}: combo without a default; the workflow must set it")
        return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[self.type]


def ordered_inputs(info: dict[str, Any]) -> list[InputSpec]:
    """Inputs in the frontend's order: ``input_order`` required, then optional (``getOrderedInputSpecs``)."""
    specs: list[InputSpec] = []
    for section in ("required", "optional"):
        entries = info.get("input", {}).get(section, {})
        order = info.get("input_order", {}).get(section, list(entries))
        for name in order:
            spec = entries[name]
            kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            if isinstance(kind, list):
                kind, options = "COMBO", {**options, "options": kind}
            bad = [key for key in UNSUPPORTED_WIDGET_OPTIONS if options.get(key)]
            if bad:
                raise NotImplementedError(f"{info.get('name')}.{name}: widget option {bad} is not supported")
            specs.append(InputSpec(name, kind, options, section == "optional"))
    return specs


# --------------------------------------------------------------------------------------------------------------------
# API completion and UI conversion
# --------------------------------------------------------------------------------------------------------------------


def complete_api(wf: Workflow, infos: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The API prompt with every widget input the frontend would send (defaults for the ones not set)."""
    api = wf.graph.api()
    for nid, node in api.items():
        specs = {s.name: s for s in ordered_inputs(infos[node["class_type"]])}
        unknown = set(node["inputs"]) - set(specs)
        if unknown:
            raise ValueError(f"{wf.name} node {nid} ({node['class_type']}): unknown inputs {sorted(unknown)}")
        for spec in specs.values():
            if spec.name in node["inputs"]:
                continue
            if spec.is_widget:
                node["inputs"][spec.name] = spec.default()
            elif not spec.optional:
                raise ValueError(f"{wf.name} node {nid} ({node['class_type']}): required input {spec.name} missing")
        order = [s.name for s in specs.values()]
        node["inputs"] = {name: node["inputs"][name] for name in order if name in node["inputs"]}
    return api


def is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


# Layout (LiteGraph units): node size excludes the 30 px title bar drawn above ``pos``.
TITLE_H = 30
SLOT_H = 20
WIDGET_H = 24
COLUMN_GAP = 70
ROW_GAP = 50
LANE_GAP = 110
GROUP_PAD = 20
GROUP_TITLE_H = 40
NOTE_WIDTH = 560
TITLE_CHAR_W = 8

SIZE_OVERRIDES = {
    "CLIPTextEncode": (420, 180),
    "SaveImage": (420, 470),
    "PreviewImage": (460, 330),
    "PrimitiveStringMultiline": (420, 180),
    "PreviewAny": (420, 260),
    "MarkdownNote": (NOTE_WIDTH, 0),
}
WIDE_NODES = {
    "REGGuider": 360,
    "REGGuidanceSchedule": 360,
    "REGDiagnostics": 340,
    "REGGuidance": 330,
    "REGGuidanceSweep": 380,
    "REGCLIPScoreLoader": 340,
}
MULTILINE_H = 110  # a multiline text box


def node_size(class_type: str, info: dict[str, Any], title: str) -> list[int]:
    specs = ordered_inputs(info)
    sockets = sum(1 for s in specs if not s.is_widget)
    widgets = sum(1 + s.control_values for s in specs if s.is_widget and not s.options.get("multiline"))
    boxes = sum(1 for s in specs if s.is_widget and s.options.get("multiline"))
    rows = max(sockets, len(info.get("output", [])), 1)
    height = rows * SLOT_H + widgets * WIDGET_H + boxes * MULTILINE_H + 14
    width, min_height = SIZE_OVERRIDES.get(class_type, (WIDE_NODES.get(class_type, 315), 0))
    width = max(width, TITLE_CHAR_W * len(title) + 50)  # the whole title stays readable
    return [width, max(height, min_height, 46)]


def note_height(text: str, width: int) -> int:
    chars_per_line = max(20, (width - 30) // 7)
    lines = 0
    for paragraph in text.split("\n"):
        lines += max(1, -(-len(paragraph) // chars_per_line))
    return 40 + lines * 19


def layout(wf: Workflow, api: dict[str, Any], sizes: dict[str, list[int]]) -> tuple[dict[str, list[int]], list[dict]]:
    """Columns by graph depth (shared nodes left, branch lanes right-aligned), one band per lane; no overlaps."""
    nodes = wf.graph.nodes
    preds = {nid: [v[0] for v in n["inputs"].values() if is_link(v)] for nid, n in api.items()}
    succs: dict[str, list[str]] = {nid: [] for nid in api}
    for nid, ps in preds.items():
        for p in ps:
            succs[p].append(nid)
    topo = _topological(api, preds)
    lane_ids = [lane for lane, _ in wf.lanes]
    for nid, n in nodes.items():
        if n.lane is not None and n.lane not in lane_ids:
            raise ValueError(f"{wf.name}: node {nid} has unknown lane {n.lane!r}")
        if n.lane is None and any(nodes[p].lane is not None for p in preds[nid]):
            raise ValueError(f"{wf.name}: shared node {nid} ({n.title}) depends on a lane node")

    column: dict[str, int] = {}
    for nid in topo:  # shared nodes: as soon as possible
        if nodes[nid].lane is None:
            column[nid] = max((column[p] + 1 for p in preds[nid]), default=0)
    first_lane_column = max(column.values(), default=-1) + 1
    for nid in topo:  # lane nodes: as soon as possible, right of the shared ones …
        if nodes[nid].lane is not None:
            column[nid] = max([first_lane_column, *(column[p] + 1 for p in preds[nid])])
    last = max(column.values())
    for nid in reversed(topo):  # … then as late as possible, so that every lane ends in the last column
        if nodes[nid].lane is not None:
            column[nid] = min((column[s] - 1 for s in succs[nid]), default=last)

    widths = [0] * (last + 1)
    for nid, col in column.items():
        widths[col] = max(widths[col], sizes[nid][0])
    xs = [0]
    for w in widths[:-1]:
        xs.append(xs[-1] + w + COLUMN_GAP)

    pos: dict[str, list[int]] = {}
    # Shared nodes: stacked per column below the note, which spans the shared columns.
    shared_top = note_bottom = 0
    if wf.note:
        shared_width = xs[first_lane_column - 1] + widths[first_lane_column - 1] if first_lane_column else 0
        note_width = max(NOTE_WIDTH, shared_width)
        sizes["note"] = [note_width, note_height(wf.note, note_width)]
        pos["note"] = [0, TITLE_H]
        note_bottom = TITLE_H + sizes["note"][1]
        shared_top = note_bottom + ROW_GAP
    y_next = [shared_top] * (last + 1)
    for nid in sorted(api, key=int):
        if nodes[nid].lane is None:
            col = column[nid]
            pos[nid] = [xs[col], y_next[col] + TITLE_H]
            y_next[col] += TITLE_H + sizes[nid][1] + ROW_GAP

    groups = []
    top = 0
    for index, (lane, title) in enumerate(wf.lanes):
        members = [nid for nid in sorted(api, key=int) if nodes[nid].lane == lane]
        if not members:
            raise ValueError(f"{wf.name}: lane {lane!r} is empty")
        y_col: dict[int, int] = {}
        for nid in members:
            col = column[nid]
            y = y_col.get(col, top + GROUP_TITLE_H)
            pos[nid] = [xs[col], y + TITLE_H]
            y_col[col] = y + TITLE_H + sizes[nid][1] + ROW_GAP
        bottom = max(y_col.values()) - ROW_GAP
        x0 = min(pos[nid][0] for nid in members) - GROUP_PAD
        x1 = max(pos[nid][0] + sizes[nid][0] for nid in members) + GROUP_PAD
        groups.append(
            {
                "id": index + 1,
                "title": title,
                "bounding": [x0, top, x1 - x0, bottom + GROUP_PAD - top],
                "color": GROUP_COLORS[index % len(GROUP_COLORS)],
                "font_size": 24,
                "flags": {},
            }
        )
        top = bottom + GROUP_PAD + LANE_GAP
    return pos, groups


GROUP_COLORS = ["#3f789e", "#8a8", "#a1309b", "#b58b2a"]


def _topological(api: dict[str, Any], preds: dict[str, list[str]]) -> list[str]:
    order: list[str] = []
    done: set[str] = set()

    def visit(nid: str, path: tuple[str, ...] = ()) -> None:
        if nid in done:
            return
        if nid in path:
            raise ValueError(f"cycle through node {nid}")
        for p in preds[nid]:
            visit(p, (*path, nid))
        done.add(nid)
        order.append(nid)

    for nid in sorted(api, key=int):
        visit(nid)
    return order


def to_ui(wf: Workflow, api: dict[str, Any], infos: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The UI (frontend-saved) form of ``api``: same ids, widgets in the frontend's order, links, groups, note."""
    sizes = {nid: node_size(n["class_type"], infos[n["class_type"]], n["_meta"]["title"]) for nid, n in api.items()}
    pos, groups = layout(wf, api, sizes)
    preds = {nid: [v[0] for v in n["inputs"].values() if is_link(v)] for nid, n in api.items()}
    order = {nid: i for i, nid in enumerate(_topological(api, preds))}

    ui_nodes: dict[str, dict[str, Any]] = {}
    links: list[list[Any]] = []
    slots: dict[str, dict[str, int]] = {}
    for nid, node in api.items():
        info = infos[node["class_type"]]
        specs = ordered_inputs(info)
        inputs = []
        for spec in [s for s in specs if not s.is_widget] + [s for s in specs if s.is_widget]:
            entry: dict[str, Any] = {"localized_name": spec.name, "name": spec.name, "type": spec.type}
            if spec.optional:
                entry["shape"] = 7  # RenderShape.HollowCircle
            if spec.is_widget:
                entry["widget"] = {"name": spec.name}
            entry["link"] = None
            inputs.append(entry)
        slots[nid] = {entry["name"]: i for i, entry in enumerate(inputs)}
        values: list[Any] = []
        for spec in specs:
            if spec.is_widget:
                value = node["inputs"][spec.name]
                if is_link(value):  # a linked widget keeps a value of its own; the link wins in the prompt
                    source = api[value[0]]["inputs"].get("value")
                    value = source if isinstance(source, (int, float, str, bool)) else spec.default()
                values.append(value)
                values.extend(["fixed"] * spec.control_values)
        outputs = []
        names = info.get("output_name") or info["output"]
        is_list = info.get("output_is_list") or [False] * len(info["output"])
        for i, kind in enumerate(info["output"]):
            entry = {"localized_name": names[i], "name": names[i], "type": kind, "links": []}
            if is_list[i]:
                entry["shape"] = 6  # RenderShape.GRID
            outputs.append(entry)
        wf_node = wf.graph.nodes[nid]
        properties: dict[str, Any] = {"Node name for S&R": node["class_type"]}
        files = [m for m in wf_node.models if not m.is_folder]
        if files:
            properties["models"] = [{"name": m.name, "url": m.url, "directory": m.directory} for m in files]
        ui_nodes[nid] = {
            "id": int(nid),
            "type": node["class_type"],
            "pos": pos[nid],
            "size": sizes[nid],
            "flags": {},
            "order": order[nid],
            "mode": 0,
            "inputs": inputs,
            "outputs": outputs,
            "title": node["_meta"]["title"],
            "properties": properties,
            "widgets_values": values,
        }

    link_id = 0
    for nid in sorted(api, key=int):
        for name, value in api[nid]["inputs"].items():
            if not is_link(value):
                continue
            link_id += 1
            src, slot = value
            target = ui_nodes[nid]["inputs"][slots[nid][name]]
            target["link"] = link_id
            ui_nodes[src]["outputs"][slot]["links"].append(link_id)
            links.append([link_id, int(src), slot, int(nid), slots[nid][name], target["type"]])
    for node in ui_nodes.values():
        for i, out in enumerate(node["outputs"]):
            if out["links"]:
                out["slot_index"] = i

    nodes_out = [ui_nodes[nid] for nid in sorted(api, key=int)]
    last_id = max(int(nid) for nid in api)
    if wf.note:
        last_id += 1
        nodes_out.append(
            {
                "id": last_id,
                "type": "MarkdownNote",
                "pos": pos["note"],
                "size": sizes["note"],
                "flags": {},
                "order": len(api),
                "mode": 0,
                "inputs": [],
                "outputs": [],
                "title": "Read me",
                "properties": {},
                "widgets_values": [wf.note],
                "color": "#432",
                "bgcolor": "#653",
            }
        )
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-reg-guidance/workflows/{wf.name}")),
        "revision": 0,
        "last_node_id": last_id,
        "last_link_id": link_id,
        "nodes": nodes_out,
        "links": links,
        "groups": groups,
        "config": {},
        "extra": {
            "ds": {"scale": 0.75, "offset": [40, 40]},
            "reg_guidance": {
                "generated_by": "workflows/build_workflows.py",
                "api_twin": f"api/{wf.name}{API_SUFFIX}",
            },
        },
        "version": 0.4,
    }


# --------------------------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------------------------


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def build_all(info: Callable[[str], dict[str, Any]] = node_info) -> dict[Path, str]:
    """Every output file (absolute path → text); ComfyUI and the pack must already be loaded."""
    files: dict[Path, str] = {}
    for name, build in WORKFLOWS.items():
        wf = build()
        if wf.name != name:
            raise ValueError(f"workflow function for {name!r} returned {wf.name!r}")
        infos = {n.class_type: info(n.class_type) for n in wf.graph.nodes.values()}
        api = complete_api(wf, infos)
        files[API_DIR / f"{name}{API_SUFFIX}"] = dumps(api)
        files[HERE / f"{name}.json"] = dumps(to_ui(wf, api, infos))
    return files


def find_comfyui(explicit: str | None) -> Path:
    candidates = [Path(explicit)] if explicit else []
    if not explicit and os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]))
    candidates += [REPO.parent.parent, Path.home() / "ComfyUI"]
    for path in candidates:
        path = path.expanduser().resolve()
        if (path / "comfy" / "samplers.py").is_file() and (path / "nodes.py").is_file():
            return path
    raise SystemExit(f"ComfyUI not found (tried {', '.join(map(str, candidates))}); pass --comfyui PATH")


def load_comfyui(comfyui: Path, verbose: bool = False) -> None:
    """Import ComfyUI on the CPU, load its built-in nodes and this pack (as ComfyUI's custom-node loader does).

    ComfyUI's warnings (built-in extras with missing optional dependencies, e.g. torchaudio) are hidden unless
    ``verbose``; if the pack fails to load, its log is shown.
    """
    sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() not in (REPO, HERE)]  # our nodes/ ≠ theirs
    sys.path.insert(0, str(comfyui))
    root = logging.getLogger()
    level = root.level
    if not verbose:
        root.setLevel(logging.ERROR)
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
        import utils.extra_config  # noqa: F401  (before nodes: nodes.py puts comfy/ first on sys.path)

        try:
            import server  # noqa: F401
        except ImportError as exc:  # only some image nodes need it
            log.error("ComfyUI's server module does not import: %s", exc)
        import nodes

        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        root.setLevel(level)
        if not asyncio.run(nodes.load_custom_node(str(REPO))):
            raise SystemExit(f"ComfyUI could not load the pack from {REPO} (see the log above)")
    finally:
        root.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", help="ComfyUI checkout (default: COMFYUI_PATH, ../.., ~/ComfyUI)")
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if any file is missing or stale")
    parser.add_argument("--verbose", action="store_true", help="show ComfyUI's warnings while it loads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    load_comfyui(find_comfyui(args.comfyui), verbose=args.verbose)
    files = build_all()
    stale = [path for path, text in files.items() if not path.is_file() or path.read_text(encoding="utf-8") != text]
    known = set(files)
    extra = sorted(p for p in [*HERE.glob("*.json"), *API_DIR.glob("*.json")] if p not in known)
    if args.check:
        for path in stale:
            sys.stdout.write(f"stale: {path.relative_to(REPO)}\n")
        for path in extra:
            sys.stdout.write(f"not generated: {path.relative_to(REPO)}\n")
        return 1 if stale or extra else 0
    API_DIR.mkdir(exist_ok=True)
    for path, text in files.items():
        if path in stale:
            path.write_text(text, encoding="utf-8")
    for path in extra:
        sys.stdout.write(f"warning: {path.relative_to(REPO)} is not generated by this script\n")
    sys.stdout.write(f"{len(files) // 2} workflows, {len(stale)} file(s) written\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
