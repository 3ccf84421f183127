"""REGGuidanceSweep: the paper's guidance/quality trade-off on the artist's own prompt, in one node.

For every selected method (plain CFG, CFG + REG, APG + REG, PAG + REG) and every cfg value, the node samples the
latent with the same seed and noise exactly as KSampler does (``comfy.sample.sample`` on a patched ``model.clone()``),
decodes it with the VAE and scores the images with the CLIP score (:mod:`reg_core.metrics.clip_score`). The patches
are the pack's own: REG through :class:`REGPatch` installed like the REGGuidance node does, APG through
:class:`APGPreCfg` with a fresh :class:`reg_core.guidance.APG` per run, PAG through :func:`pag_post_cfg`. Parsing
and planning are in :mod:`reg_core.sweep`, the plot and the grid in :mod:`reg_core.plots.sweep`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy_api.latest import io

from ..reg_core import diagnostics, sweep
from ..reg_core.guidance import APG
from ..reg_core.metrics import clip_score
from ..reg_core.plots import sweep as sweep_plots
from .clip_score import CATEGORY, CLIP_SCORE_MODEL, ManagedScorer, score
from .common import ADVANCED, LOGGER_NAME, wrapper_adder
from .diagnostics import to_image
from .guidance import apg_pag_inputs, reg_inputs
from .guidance_hooks import check_pag_model, install_apg, pag_post_cfg
from .reg_runtime import REGPatch, REGSettings, remove_reg

log = logging.getLogger(LOGGER_NAME)

#: The method toggles, in reg_core.sweep.METHODS order: input name → method key.
METHOD_INPUTS = {
    "include_cfg": "cfg",
    "include_reg": "reg",
    "include_apg_reg": "apg_reg",
    "include_pag_reg": "pag_reg",
}


def _strip_reg(model):
    """A clone of ``model`` without REG wrappers, so that the ``cfg`` method really is unrectified."""
    base = model.clone()
    if remove_reg(base):
        log.info("REGGuidanceSweep: the model is already patched by REGGuidance; the sweep uses its own REG settings.")
    return base


class REGGuidanceSweep(io.ComfyNode):
    """Sample, decode and CLIP-score every method × cfg value with one seed; plot the trade-off and show the grid."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="REGGuidanceSweep",
            display_name="REG Guidance Sweep (CLIP score vs cfg)",
            category=CATEGORY,
            description=(
                "The REG paper's trade-off on your own prompt: for each method (CFG, CFG + REG, APG + REG, PAG + REG) "
                "and each cfg value, samples with the same seed and noise as KSampler, decodes, and scores the images "
                "with the CLIP score (torchmetrics, ×100). Outputs the score-vs-cfg plot, a labelled image grid "
                "(rows = methods, columns = cfg) and a JSON report. Costs one full sampling run per grid cell."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with; its own patches apply to every method."),
                io.Conditioning.Input("positive", tooltip="The positive (conditional) prompt, as for KSampler."),
                io.Conditioning.Input("negative", tooltip="The negative (unconditional) prompt, as for KSampler."),
                io.Latent.Input(
                    "latent_image",
                    tooltip="The latent to denoise (every image of the batch is sampled, decoded and scored; of a "
                    "video latent, every decoded frame). Nested latents (LTX-2 audio + video) are refused.",
                ),
                io.Vae.Input("vae", tooltip="Decodes every run's latent for scoring and for the grid."),
                CLIP_SCORE_MODEL.Input("clip_score_model", tooltip="The model from REG CLIP Score Model Loader."),
                io.String.Input(
                    "score_prompt",
                    multiline=True,
                    default="",
                    dynamic_prompts=False,
                    tooltip=(
                        "The caption CLIP scores the images against (usually your positive prompt without weights "
                        "or styling tags): one line for the whole batch, or one line per image (per video: its "
                        "frames share its line). Used verbatim."
                    ),
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="The noise seed, shared by every run so that only the guidance differs.",
                ),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampling steps of every run."),
                io.Combo.Input(
                    "sampler_name", options=comfy.samplers.KSampler.SAMPLERS, tooltip="The sampler, as in KSampler."
                ),
                io.Combo.Input(
                    "scheduler", options=comfy.samplers.KSampler.SCHEDULERS, tooltip="The scheduler, as in KSampler."
                ),
                io.String.Input(
                    "cfg_values",
                    default="2, 4, 6, 8",
                    tooltip=(
                        "The cfg scales to compare (the grid's columns), separated by commas, e.g. '2, 4, 6, 8'. "
                        "KSampler's cfg: guidance weight w = cfg − 1 on the positive prediction, for every method "
                        "(APG + REG runs at APG scale w). Sorted, duplicates dropped; each in [0, 100]. Methods × "
                        "values is capped at "
                        f"{sweep.MAX_RUNS} runs."
                    ),
                ),
                io.Boolean.Input("include_cfg", default=True, tooltip="Plain classifier-free guidance (the baseline)."),
                io.Boolean.Input("include_reg", default=True, tooltip="CFG rectified by REG (the paper)."),
                io.Boolean.Input(
                    "include_apg_reg",
                    default=False,
                    tooltip=(
                        "APG rectified by REG, on the same axis as CFG: at cfg s it runs APG's cond-anchored scale "
                        "s − 1 (ComfyUI's APG node at cfg s − 1), the same guidance weight, so eta 1, norm_threshold "
                        "0, momentum 0 equals CFG at s."
                    ),
                ),
                io.Boolean.Input(
                    "include_pag_reg",
                    default=False,
                    tooltip="CFG plus Perturbed-Attention Guidance, rectified by REG (UNet models only).",
                ),
                *reg_inputs(),
                *apg_pag_inputs("APG + REG only", "PAG + REG only"),
                io.Combo.Input(
                    "truncation",
                    options=list(clip_score.TRUNCATION_MODES),
                    default="torchmetrics",
                    **ADVANCED,
                    tooltip=(
                        "score_prompt over 77 tokens: 'torchmetrics' slices it like torchmetrics and the paper (EOS "
                        "dropped); 'clip' keeps EOS. Shorter prompts score the same in both modes."
                    ),
                ),
            ],
            outputs=[
                io.Image.Output(
                    display_name="plot", tooltip=f"{clip_score.METRIC_NAME} against cfg, one curve per method."
                ),
                io.Image.Output(
                    display_name="grid",
                    tooltip="Every decoded image: rows = methods, columns = cfg values, each cell captioned with "
                    "its CLIP score.",
                ),
                io.String.Output(
                    display_name="json",
                    tooltip="Per method and cfg: the score, the per-image scores and the settings (JSON).",
                ),
            ],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, cfg_values: str) -> bool | str:
        if not isinstance(cfg_values, str):  # linked: checked when the node runs
            return True
        try:
            sweep.parse_cfg_values(cfg_values)
        except sweep.SweepConfigError as err:
            return str(err)
        return True

    @classmethod
    def execute(
        cls,
        model,
        positive,
        negative,
        latent_image,
        vae,
        clip_score_model: ManagedScorer,
        score_prompt: str,
        seed: int,
        steps: int,
        sampler_name: str,
        scheduler: str,
        cfg_values: str,
        truncation: str,
        **choices,
    ) -> io.NodeOutput:
        plan = SweepPlan.of(cfg_values, truncation, latent_image, choices)  # every input checked before the first run
        if choices["include_pag_reg"]:
            check_pag_model(model, "REGGuidanceSweep: include_pag_reg", "Switch include_pag_reg off for this model.")
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        prompts = clip_score.split_prompts(score_prompt, int(latent.shape[0]), input_name="score_prompt")
        sampling = Sampling(positive, negative, latent, latent_image, seed, steps, sampler_name, scheduler)
        pbar = comfy.utils.ProgressBar(len(plan.runs) * steps)
        base = _strip_reg(model)
        started = time.perf_counter()
        pixels, results, report_runs = [], [], []
        for index, run in enumerate(plan.runs):
            images, seconds = sampling.run(plan.model(base, run.method), run.sampler_cfg, index * steps, pbar, vae)
            if images.shape[0] != len(prompts):
                prompts = _per_frame(prompts, int(images.shape[0]))
            result = score(clip_score_model, images, prompts, truncation)
            pixels.append(clip_score.images_to_uint8(images)[0].numpy())
            results.append(result)
            report_runs.append(plan.run_report(run, result, seconds))
            log.info("REGGuidanceSweep: %s at cfg %s: %.4f (%.1f s)", run.label, run.cfg, result.mean, seconds)
        comfy.model_management.throw_exception_if_processing_interrupted()
        means = [r.mean for r in results]
        plot, grid = _pictures(plan, sampling, means, pixels, clip_score_model.model_id, len(prompts))
        report = {
            "metric": clip_score.METRIC_NAME,
            "x_axis": sweep.X_AXIS,
            "model": clip_score_model.model_id,
            "score_prompt": prompts,
            "truncation": truncation,
            "n": len(prompts),
            "settings": {**sampling.settings(), **plan.settings()},
            "runs": report_runs,
            "seconds": round(time.perf_counter() - started, 3),
        }
        summary = sweep.summary_table(plan.runs, means, clip_score.METRIC_NAME)
        # the plot and the grid are outputs for preview/save nodes (the template has them); the node itself shows only
        # the summary, so each picture appears once
        return io.NodeOutput(plot, grid, json.dumps(report, ensure_ascii=False), ui={"text": (summary,)})


def _per_frame(prompts: list[str], images: int) -> list[str]:
    """Each latent's line for every frame a video VAE decoded it to (frames come latent by latent, as VAEDecode's)."""
    frames, left = divmod(images, len(prompts))
    if left or not frames:
        raise sweep.SweepConfigError(
            f"REGGuidanceSweep: vae decoded {len(prompts)} latents to {images} images, not a whole number of frames "
            "each: connect the VAE that belongs to the model."
        )
    return [line for line in prompts for _ in range(frames)]


def _decode(vae, samples: torch.Tensor) -> torch.Tensor:
    """``vae.decode``, with a VAE made for other latents named as the input to change (torch's channel mismatch)."""
    try:
        return vae.decode(samples)
    except RuntimeError as err:
        if "channels, but got" not in str(err):
            raise
        raise sweep.SweepConfigError(
            f"REGGuidanceSweep: vae cannot decode this model's latents ({str(err).splitlines()[0]}): connect the VAE "
            "that belongs to the model."
        ) from err


@dataclass
class SweepPlan:
    """The runs of a sweep and the settings of its methods, checked when built."""

    runs: list[sweep.SweepRun]
    settings_reg: REGSettings
    apg: dict
    pag_scale: float

    @classmethod
    def of(cls, cfg_values: str, truncation: str, latent_image: dict, choices: dict) -> SweepPlan:
        cfgs = sweep.parse_cfg_values(cfg_values)
        methods = [method for name, method in METHOD_INPUTS.items() if choices[name]]
        reg = REGSettings(**{f.name: choices[f.name] for f in dataclasses.fields(REGSettings)})
        if truncation not in clip_score.TRUNCATION_MODES:
            raise clip_score.InvalidInputError(f"truncation must be one of {clip_score.TRUNCATION_MODES}.")
        try:
            diagnostics.check_latent(latent_image["samples"], "latent_image")
        except diagnostics.UnsupportedLatentError as err:
            raise sweep.SweepConfigError(f"REGGuidanceSweep: {err}") from None
        apg = {k: choices[k] for k in ("eta", "norm_threshold", "momentum")}
        return cls(sweep.plan_runs(methods, cfgs), reg, apg, choices["pag_scale"])

    @property
    def reg(self) -> dict:
        """The REG settings as the node's inputs name them."""
        return {**dataclasses.asdict(self.settings_reg), "estimator": self.settings_reg.estimator.value}

    def model(self, base, method: str):
        """``base.clone()`` patched for ``method`` the way REGGuidance (and ComfyUI's APG/PAG nodes) would patch it."""
        m = base.clone()
        if method == "apg_reg":
            install_apg(m.model_options, APG(**self.apg))  # fresh momentum state for every run
        elif method == "pag_reg":
            m.set_model_sampler_post_cfg_function(pag_post_cfg(self.pag_scale))
        if method != "cfg":
            REGPatch(self.settings_reg, node="REGGuidanceSweep").install(wrapper_adder(m))
        return m

    def run_report(self, run: sweep.SweepRun, result: clip_score.CLIPScoreResult, seconds: float) -> dict:
        """One run's scores, settings and the plain-node workflow that reproduces it."""
        out: dict = {
            "method": run.method,
            "label": run.label,
            "cfg": run.cfg,
            "guidance_weight": run.weight,
            "sampler_cfg": run.sampler_cfg,
        }
        chain = []
        if run.method == "apg_reg":
            out["apg"] = self.apg
            apg = self.apg
            chain.append(f"APG(eta={apg['eta']:g}, norm_threshold={apg['norm_threshold']:g}, "
                         f"momentum={apg['momentum']:g})")  # fmt: skip
        if run.method == "pag_reg":
            out["pag_scale"] = self.pag_scale
            chain.append(f"PerturbedAttentionGuidance(scale={self.pag_scale:g})")
        if run.method != "cfg":
            out["reg"] = self.reg
            chain.append("REGGuidance(" + ", ".join(f"{k}={v}" for k, v in self.reg.items()) + ")")
        chain.append(f"KSampler(cfg={sweep.format_cfg(run.sampler_cfg)})")
        out["equivalent"] = " → ".join(chain)
        scores = {"score": result.mean, "scores": result.scores, "notes": result.notes}
        return {**out, **scores, "seconds": round(seconds, 3)}

    def settings(self) -> dict:
        return {
            "cfg_values": sorted({r.cfg for r in self.runs}),
            "methods": [m for m in sweep.METHODS if any(r.method == m for r in self.runs)],
            "reg": self.reg,
            "apg": self.apg,
            "pag_scale": self.pag_scale,
        }


@dataclass
class Sampling:
    """What every run of a sweep shares: conditioning, latent, noise, sampler and steps."""

    positive: list
    negative: list
    latent: torch.Tensor
    latent_image: dict
    seed: int
    steps: int
    sampler_name: str
    scheduler: str

    def run(self, model, cfg: float, offset: int, pbar, vae) -> tuple[torch.Tensor, float]:
        """Sample and decode one run KSampler's way (progress from ``offset`` on, previews); returns images, seconds."""
        comfy.model_management.throw_exception_if_processing_interrupted()
        previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)

        def callback(step, x0, x, total_steps):
            preview = previewer.decode_latent_to_preview_image("JPEG", x0) if previewer is not None else None
            pbar.update_absolute(offset + step + 1, pbar.total, preview)

        started = time.perf_counter()
        noise = comfy.sample.prepare_noise(self.latent, self.seed, self.latent_image.get("batch_index"))
        samples = comfy.sample.sample(
            model, noise, self.steps, cfg, self.sampler_name, self.scheduler,
            self.positive, self.negative, self.latent.clone(), noise_mask=self.latent_image.get("noise_mask"),
            callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=self.seed,
        )  # fmt: skip
        images = _decode(vae, samples)
        if images.ndim == 5:  # video VAEs: frames become images, as in VAEDecode
            images = images.reshape(-1, *images.shape[-3:])
        pbar.update_absolute(offset + self.steps, pbar.total)
        return images, time.perf_counter() - started

    def settings(self) -> dict:
        return {
            "seed": self.seed,
            "steps": self.steps,
            "sampler_name": self.sampler_name,
            "scheduler": self.scheduler,
            "latent_shape": list(self.latent.shape),
        }


def _pictures(plan: SweepPlan, sampling: Sampling, means: list[float], pixels: list, model_id: str, n: int):
    """The score-vs-cfg plot and the labelled grid, as ComfyUI IMAGE tensors."""
    runs = plan.runs
    plot = sweep_plots.score_plot(runs, means, metric=clip_score.METRIC_NAME, subtitle=f"{model_id}, n = {n}")
    rows = sorted({r.row for r in runs})
    grid, _ = sweep_plots.compose_grid(
        [[pixels[i] for i, r in enumerate(runs) if r.row == row] for row in rows],
        row_labels=[next(r.label for r in runs if r.row == row) for row in rows],
        col_labels=[f"cfg {sweep.format_cfg(c)}" for c in plan.settings()["cfg_values"]],
        captions=[[f"{means[i]:.2f}" for i, r in enumerate(runs) if r.row == row] for row in rows],
        title=f"{clip_score.METRIC_NAME} · seed {sampling.seed} · {sampling.steps} steps "
        f"{sampling.sampler_name}/{sampling.scheduler}",
    )
    return to_image(plot), torch.from_numpy(grid).float().div(255.0).unsqueeze(0)


NODES = [REGGuidanceSweep]
