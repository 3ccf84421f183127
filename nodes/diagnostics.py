"""REGDiagnostics: pictures and numbers of what REG did during the sampling run that produced a latent."""

from __future__ import annotations

import json
import logging

import numpy as np
import torch
from comfy.patcher_extension import WrappersMP
from comfy_api.latest import io
from PIL import Image

from ..reg_core import diagnostics
from ..reg_core.plots import diagnostics as diagnostic_plots
from .common import LOGGER_NAME, REGConfigError
from .reg_runtime import WRAPPER_KEY, REGPatch

log = logging.getLogger(LOGGER_NAME)

CATEGORY = "sampling/guidance/REG"


def to_image(picture: Image.Image) -> torch.Tensor:
    """A PIL image as a ComfyUI IMAGE batch of one: ``[1, H, W, 3]`` floats in [0, 1]."""
    return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0)[None]


def find_patch(model, guider) -> REGPatch:
    """The REG patch behind a REGGuidance-patched MODEL or a REGGuider GUIDER, with a clear error otherwise."""
    if guider is not None:
        patch = getattr(guider, "reg", None)
        if not isinstance(patch, REGPatch):
            raise REGConfigError(f"the guider ({type(guider).__name__}) is not a REGGuider; connect a REGGuider.")
        return patch
    if model is None:
        raise REGConfigError("connect the MODEL patched by REGGuidance (or a REGGuider to the guider input).")
    wrappers = model.get_wrappers(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
    if not wrappers:
        raise REGConfigError(
            "this MODEL is not patched by REGGuidance; connect the REGGuidance output that the sampler uses."
        )
    return wrappers[0].__self__


def parse_steps(text: str, record: diagnostics.RunRecord) -> list[int]:
    """``auto`` or comma-separated evaluation indices (negative counts from the end) → indices with an M map."""
    if text.strip().lower() in ("", "auto"):
        return diagnostics.pick_steps(record)
    n = len(record.steps)
    chosen = []
    for part in text.split(","):
        try:
            i = int(part.strip())
        except ValueError:
            raise REGConfigError(
                f"steps: '{part.strip()}' is not an integer; write e.g. 'auto' or '0, 5, -1'."
            ) from None
        i = i + n if i < 0 else i
        if not 0 <= i < n or record.steps[i].m_map is None:
            active = [k for k, s in enumerate(record.steps) if s.m_map is not None]
            raise REGConfigError(f"steps: evaluation {part.strip()} has no M map; evaluations with one: {active}.")
        chosen.append(i)
    return chosen


class REGDiagnostics(io.ComfyNode):
    """Show M over the last sampling run: statistics against the evaluation index and heatmaps at chosen steps."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="REGDiagnostics",
            display_name="REG Diagnostics",
            category=CATEGORY,
            description="What REG did in the last sampling run of a REGGuidance-patched model or a REGGuider: "
            "M's mean and percentiles, the share of M < 0 and M > 1 and how much guidance REG kept, per model "
            "evaluation (REG window shaded), and M heatmaps (white = guidance unchanged, blue = reduced, "
            "red = amplified).",
            inputs=[
                io.Latent.Input(
                    "latent",
                    tooltip="The sampler's output: connecting it makes this node run after sampling. Image "
                    "[B, C, H, W] or video [B, C, T, H, W] latents; nested ones (LTX-2 audio + video) are refused.",
                ),
                io.Model.Input(
                    "model", optional=True, tooltip="The MODEL output of REGGuidance that the sampler used."
                ),
                io.Guider.Input("guider", optional=True, tooltip="Or: the REGGuider that the sampler used."),
                io.String.Input(
                    "steps",
                    default="auto",
                    tooltip="Which model evaluations to show as heatmaps: 'auto' (up to 6, evenly spread) or "
                    "indices like '0, 5, -1'.",
                ),
                io.Int.Input(
                    "sample", default=0, min=0, max=4095, tooltip="Which image of the batch to show (0 = first)."
                ),
            ],
            outputs=[
                io.Image.Output(
                    "statistics",
                    display_name="statistics",
                    tooltip="M statistics against the evaluation index (video: over every element of every frame). "
                    "If REG did not act in the run, a picture saying so and why.",
                ),
                io.Image.Output(
                    "maps",
                    display_name="maps",
                    tooltip="M heatmaps at the chosen evaluations, with a colour bar; video latents show M averaged "
                    "over frames. If REG did not act, the same picture as statistics.",
                ),
                io.String.Output(
                    "json",
                    display_name="json",
                    tooltip="All recorded numbers, per evaluation and per image; 'note' says why when REG did not act.",
                ),
            ],
        )

    @classmethod
    def execute(cls, latent, steps, sample, model=None, guider=None) -> io.NodeOutput:
        try:
            diagnostics.check_latent(latent["samples"], "latent")
        except diagnostics.UnsupportedLatentError as err:
            raise REGConfigError(f"REGDiagnostics: {err}") from None
        patch = find_patch(model, guider)
        record = patch.record_for(latent["samples"])
        if record is None:
            raise REGConfigError(
                "this latent does not come from a sampling run with this REG model/guider: connect the LATENT output "
                "of the sampler that used it (not a copy, crop or batch of it)."
            )
        batch = int(record.steps[0].sigma.numel()) if record.steps else int(latent["samples"].shape[0])
        if sample >= batch:
            raise REGConfigError(f"sample {sample} is out of range: the run had a batch of {batch}.")
        if not any(step.active for step in record.steps):
            note = diagnostics.inactive_note(record)
            log.info("REGDiagnostics: %s", note)
            picture = to_image(diagnostic_plots.render_inactive(record))
            text = json.dumps({**record.to_dict(), "maps_shown": [], "note": note}, indent=1)
            return io.NodeOutput(picture, picture, text)
        stats = diagnostic_plots.render_statistics(record, sample)
        shown = parse_steps(steps, record)
        maps = diagnostic_plots.render_maps(record, shown, sample) if shown else Image.new("RGB", (64, 64), "white")
        text = json.dumps({**record.to_dict(), "maps_shown": shown}, indent=1)
        return io.NodeOutput(to_image(stats), to_image(maps), text)


NODES = [REGDiagnostics]
