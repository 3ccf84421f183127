"""REGGuidanceSweep: the paper's guidance/quality trade-off on the artist's own prompt, in one node.

For every selected method (plain CFG, CFG + REG, APG + REG, PAG + REG) and every cfg value, the node samples the
latent with the same seed and noise exactly as KSampler does (``comfy.sample.sample`` on a patched ``model.clone()``),
decodes it with the VAE and scores the images with the CLIP score (:mod:`reg_core.metrics.clip_score`). The patches
are the pack's own: REG through :class:`REGPatch` installed like the REGGuidance node does, APG through
:class:`APGPreCfg` with a fresh :class:`reg_core.guidance.APG` per run, PAG through :func:`pag_post_cfg`. Parsing
and planning are in :mod:`reg_core.sweep`, the plot and the grid in :mod:`reg_core.plots.sweep`.
"""

from __future__ import annotations

import json
import logging
import time

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
from .common import LOGGER_NAME, wrapper_adder
from .diagnostics import to_image
from .guidance import apg_pag_inputs, reg_inputs
from .guidance_hooks import APGPreCfg, pag_post_cfg
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


def patched_model(base, method: str, settings: REGSettings, apg: dict, pag_scale: float):
    """``base.clone()`` patched for ``method`` the way REGGuidance (and ComfyUI's APG/PAG nodes) would patch it."""
    m = base.clone()
    if method == "apg_reg":
        m.set_model_sampler_pre_cfg_function(APGPreCfg(APG(**apg)))  # fresh momentum state for every run
        m.model_options["disable_cfg1_optimization"] = True  # APG at scale 1 still needs the negative pass
    elif method == "pag_reg":
        m.set_model_sampler_post_cfg_function(pag_post_cfg(pag_scale))
    if method != "cfg":
        REGPatch(settings).install(wrapper_adder(m))
    return m


def run_settings(run: sweep.SweepRun, reg: dict, apg: dict, pag_scale: float) -> dict:
    """The settings of one run, and the plain-node workflow that reproduces it."""
    out: dict = {
        "method": run.method,
        "label": run.label,
        "cfg": run.cfg,
        "guidance_weight": run.weight,
        "sampler_cfg": run.sampler_cfg,
    }
    chain = []
    if run.method == "apg_reg":
        out["apg"] = apg
        chain.append(f"APG(eta={apg['eta']:g}, norm_threshold={apg['norm_threshold']:g}, momentum={apg['momentum']:g})")
    if run.method == "pag_reg":
        out["pag_scale"] = pag_scale
        chain.append(f"PerturbedAttentionGuidance(scale={pag_scale:g})")
    if run.method != "cfg":
        out["reg"] = reg
        chain.append("REGGuidance(" + ", ".join(f"{k}={v}" for k, v in reg.items()) + ")")
    chain.append(f"KSampler(cfg={sweep.format_cfg(run.sampler_cfg)})")
    out["equivalent"] = " → ".join(chain)
    return out


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
                        "or styling tags): one line for the whole batch, or one line per image. Used verbatim."
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
        include_cfg: bool,
        include_reg: bool,
        include_apg_reg: bool,
        include_pag_reg: bool,
        strength: float,
        estimator: str,
        start_percent: float,
        end_percent: float,
        refresh_every: int,
        eta: float,
        norm_threshold: float,
        momentum: float,
        pag_scale: float,
        truncation: str,
    ) -> io.NodeOutput:
        # Every input is checked before the first (expensive) run.
        cfgs = sweep.parse_cfg_values(cfg_values)
        flags = {
            "include_cfg": include_cfg,
            "include_reg": include_reg,
            "include_apg_reg": include_apg_reg,
            "include_pag_reg": include_pag_reg,
        }
        runs = sweep.plan_runs([METHOD_INPUTS[name] for name, on in flags.items() if on], cfgs)
        settings = REGSettings(strength, estimator, start_percent, end_percent, refresh_every)
        if truncation not in clip_score.TRUNCATION_MODES:
            raise clip_score.InvalidInputError(f"truncation must be one of {clip_score.TRUNCATION_MODES}.")
        try:
            diagnostics.check_latent(latent_image["samples"], "latent_image")
        except diagnostics.UnsupportedLatentError as err:
            raise sweep.SweepConfigError(f"REGGuidanceSweep: {err}") from None
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        prompts = clip_score.split_prompts(score_prompt, int(latent.shape[0]), input_name="score_prompt")
        reg = {
            "strength": strength,
            "estimator": estimator,
            "start_percent": start_percent,
            "end_percent": end_percent,
            "refresh_every": refresh_every,
        }
        apg = {"eta": eta, "norm_threshold": norm_threshold, "momentum": momentum}

        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        noise_mask = latent_image.get("noise_mask")
        base = _strip_reg(model)
        total = len(runs) * steps
        pbar = comfy.utils.ProgressBar(total)
        previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
        pixels, results, report_runs = [], [], []
        started = time.perf_counter()
        for index, run in enumerate(runs):
            comfy.model_management.throw_exception_if_processing_interrupted()
            offset = index * steps

            def callback(step, x0, x, total_steps, offset=offset):
                preview = previewer.decode_latent_to_preview_image("JPEG", x0) if previewer is not None else None
                pbar.update_absolute(offset + step + 1, total, preview)

            run_start = time.perf_counter()
            samples = comfy.sample.sample(
                patched_model(base, run.method, settings, apg, pag_scale),
                noise.clone(),
                steps,
                run.sampler_cfg,
                sampler_name,
                scheduler,
                positive,
                negative,
                latent.clone(),
                noise_mask=noise_mask,
                callback=callback,
                disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
                seed=seed,
            )
            images = vae.decode(samples)
            if images.ndim == 5:  # video VAEs: frames become images, as in VAEDecode
                images = images.reshape(-1, *images.shape[-3:])
            if images.shape[0] != len(prompts):
                prompts = clip_score.split_prompts(score_prompt, int(images.shape[0]), input_name="score_prompt")
            result = score(clip_score_model, images, prompts, truncation)
            pixels.append(clip_score.images_to_uint8(images)[0].numpy())
            results.append(result)
            seconds = time.perf_counter() - run_start
            report_runs.append(
                {
                    **run_settings(run, reg, apg, pag_scale),
                    "score": result.mean,
                    "scores": result.scores,
                    "notes": result.notes,
                    "seconds": round(seconds, 3),
                }
            )
            log.info("REGGuidanceSweep: %s at cfg %s: %.4f (%.1f s)", run.label, run.cfg, result.mean, seconds)
            pbar.update_absolute(offset + steps, total)
        comfy.model_management.throw_exception_if_processing_interrupted()

        means = [r.mean for r in results]
        n = len(prompts)
        plot = sweep_plots.score_plot(
            runs, means, metric=clip_score.METRIC_NAME, subtitle=f"{clip_score_model.model_id}, n = {n}"
        )
        rows = sorted({r.row for r in runs})
        grid, _ = sweep_plots.compose_grid(
            [[pixels[i] for i, r in enumerate(runs) if r.row == row] for row in rows],
            row_labels=[next(r.label for r in runs if r.row == row) for row in rows],
            col_labels=[f"cfg {sweep.format_cfg(c)}" for c in cfgs],
            captions=[[f"{means[i]:.2f}" for i, r in enumerate(runs) if r.row == row] for row in rows],
            title=f"{clip_score.METRIC_NAME} · seed {seed} · {steps} steps {sampler_name}/{scheduler}",
        )
        report = {
            "metric": clip_score.METRIC_NAME,
            "x_axis": sweep.X_AXIS,
            "model": clip_score_model.model_id,
            "score_prompt": prompts,
            "truncation": truncation,
            "n": n,
            "settings": {
                "seed": seed,
                "steps": steps,
                "sampler_name": sampler_name,
                "scheduler": scheduler,
                "cfg_values": cfgs,
                "methods": [m for m in sweep.METHODS if any(r.method == m for r in runs)],
                "reg": reg,
                "apg": apg,
                "pag_scale": pag_scale,
                "latent_shape": list(latent.shape),
            },
            "runs": report_runs,
            "seconds": round(time.perf_counter() - started, 3),
        }
        summary = sweep.summary_table(runs, means, clip_score.METRIC_NAME)
        plot_tensor = to_image(plot)
        grid_tensor = torch.from_numpy(grid).float().div(255.0).unsqueeze(0)
        # the plot and the grid are outputs for preview/save nodes (the template has them); the node itself shows only
        # the summary, so each picture appears once
        return io.NodeOutput(plot_tensor, grid_tensor, json.dumps(report, ensure_ascii=False), ui={"text": (summary,)})


NODES = [REGGuidanceSweep]
