"""REG nodes: a MODEL patch for any sampler, a GUIDER for SamplerCustomAdvanced, and the paper's schedules."""

from __future__ import annotations

import logging

import comfy.model_patcher
import comfy.samplers
from comfy.patcher_extension import WrappersMP
from comfy_api.latest import io

from ..reg_core.guidance import APG
from ..reg_core.rectify import Estimator
from ..reg_core.schedules import Progress, Schedule
from .common import ADVANCED, LOGGER_NAME, REGConfigError, wrapper_adder
from .guidance_hooks import check_pag_model, install_apg, pag_post_cfg
from .reg_runtime import WRAPPER_KEY, REGPatch, REGSettings, remove_reg
from .schedule_patch import SCHEDULE_KEY, SchedulePatch, ScheduleSettings, remove_schedule

log = logging.getLogger(LOGGER_NAME)
DIT_PAG_FIX = (
    "Use base 'cfg' with ComfyUI's SkipLayerGuidanceDiT on the model for a DiT's perturbed-attention guidance."
)

CATEGORY = "sampling/guidance/REG"


def reg_inputs() -> list[io.Input]:
    """The REG inputs shared by the MODEL patch and the GUIDER."""
    return [
        io.Float.Input(
            "strength",
            default=1.0,
            min=0.0,
            max=2.0,
            step=0.05,
            tooltip="How much of REG's correction to apply: 0 = the guidance unchanged (exactly), 1 = the paper's REG, "
            ">1 extrapolates. Mixes M as 1 + strength·(M − 1).",
        ),
        io.Combo.Input(
            "estimator",
            options=[e.value for e in Estimator],
            default=Estimator.VJP.value,
            tooltip="vjp: the paper's exact M (one extra backward through the positive prediction per step); switches "
            "itself to vjp-low-memory, with a console note, when its graph would not fit in free memory. "
            "vjp-low-memory: the same M with the graph bounded to about one block (one more forward per step), for "
            "large images on small cards. gradient-free: a finite difference (one extra forward, no gradients; exact "
            "only for an ideal denoiser). chain: the full chain rule, an ablation the paper does not evaluate.",
        ),
        io.Float.Input(
            "start_percent",
            default=0.0,
            min=0.0,
            max=1.0,
            step=0.01,
            tooltip="Where REG starts acting, as a fraction of the model's timestep range (like ComfyUI's "
            "SkipLayerGuidance; not a fraction of the steps). Outside the window the guidance is left unchanged.",
            **ADVANCED,
        ),
        io.Float.Input(
            "end_percent",
            default=1.0,
            min=0.0,
            max=1.0,
            step=0.01,
            tooltip="Where REG stops acting, as a fraction of the model's timestep range. 1.0 = until the end.",
            **ADVANCED,
        ),
        io.Int.Input(
            "refresh_every",
            default=1,
            min=1,
            max=100,
            tooltip="Estimate M on every k-th model evaluation inside the window and reuse the last M in between "
            "(cheaper, approximate; 1 = the paper). Not available with the chain estimator.",
            **ADVANCED,
        ),
    ]


def apg_pag_inputs(apg_label: str, pag_label: str) -> list[io.Input]:
    """APG's parameters (ComfyUI's APG node ranges) and the PAG scale; tooltips start with the given labels."""
    return [
        io.Float.Input(
            "eta",
            default=1.0,
            min=-10.0,
            max=10.0,
            step=0.01,
            tooltip=f"{apg_label}: scale of the guidance component parallel to the positive prediction "
            "(1 = as cfg, 0 = drop it).",
            **ADVANCED,
        ),
        io.Float.Input(
            "norm_threshold",
            default=5.0,
            min=0.0,
            max=50.0,
            step=0.1,
            tooltip=f"{apg_label}: clip the guidance norm (per image) to this value; 0 disables clipping.",
            **ADVANCED,
        ),
        io.Float.Input(
            "momentum",
            default=0.0,
            min=-5.0,
            max=1.0,
            step=0.01,
            tooltip=f"{apg_label}: running average of the guidance over steps (reset every run); 0 disables it.",
            **ADVANCED,
        ),
        io.Float.Input(
            "pag_scale",
            default=3.0,
            min=0.0,
            max=100.0,
            step=0.01,
            tooltip=f"{pag_label}: Perturbed-Attention Guidance scale, added on top of cfg. The extra pass is never "
            "differentiated.",
            **ADVANCED,
        ),
    ]


def schedule_inputs(*, advanced: bool) -> list[io.Input]:
    """Inputs of the paper's guidance-weight schedules (reg_core.schedules); REG Guider shows their parameters under
    "advanced", the schedule node shows them all."""
    more = ADVANCED if advanced else {}
    return [
        io.Combo.Input(
            "schedule",
            options=[s.value for s in Schedule],
            default=Schedule.CONSTANT.value,
            tooltip="Guidance weight over sampling (w = cfg − 1). constant: the cfg as set. interval: cfg only for "
            "sigma_low ≤ σ ≤ sigma_high, the positive prediction alone outside (saves the negative pass). linear: "
            "from cfg at the first step to end_cfg at the last. cosine: ½·w·(1 − cos(π·p^exponent)), rising from "
            "no guidance to the full cfg.",
        ),
        io.Float.Input(
            "end_cfg",
            default=1.0,
            min=0.0,
            max=100.0,
            step=0.1,
            tooltip="linear schedule only: the cfg reached at the last step.",
            **more,
        ),
        io.Float.Input(
            "sigma_low",
            default=0.28,
            min=0.0,
            max=1000.0,
            step=0.01,
            tooltip="interval schedule only: lower end of the guidance window, in EDM/VE σ (flow models' σ is "
            "converted to σ/(1−σ)). The default [0.28, 2.90] is the REG paper's EDM2 setting.",
            **more,
        ),
        io.Float.Input(
            "sigma_high",
            default=2.90,
            min=0.0,
            max=1000.0,
            step=0.01,
            tooltip="interval schedule only: upper end of the guidance window, in EDM/VE σ.",
            **more,
        ),
        io.Float.Input(
            "exponent",
            default=1.0,
            min=0.01,
            max=10.0,
            step=0.05,
            tooltip="cosine schedule only: the exponent k in p^k (larger = guidance arrives later).",
            **more,
        ),
        io.Combo.Input(
            "progress",
            options=[p.value for p in Progress],
            default=Progress.STEPS.value,
            tooltip="How sampling progress p is measured for linear/cosine: steps = step index / (steps − 1); "
            "sigma = 1 − σ/σ_first (the paper's EDM2 definition).",
            **more,
        ),
    ]


def _check_window(start_percent, end_percent) -> bool | str:
    """``validate_inputs`` of the REG nodes: a window that can never hold a step is refused when the prompt is queued.

    ComfyUI repeats the message once per input named here, so only the two window inputs are. Linked (not yet known)
    values pass here; :meth:`REGSettings.validate` checks every setting again when the node runs.
    """
    if not all(isinstance(v, (int, float)) for v in (start_percent, end_percent)):
        return True
    try:
        REGSettings(start_percent=start_percent, end_percent=end_percent)
    except REGConfigError as err:
        return str(err)
    return True


def _schedule(schedule: str, end_cfg: float, sigma_low: float, sigma_high: float, exponent: float, progress: str):
    return ScheduleSettings(
        schedule=Schedule(schedule),
        progress=Progress(progress),
        end_cfg=end_cfg,
        sigma_low=sigma_low,
        sigma_high=sigma_high,
        exponent=exponent,
    )


class REGGuidance(io.ComfyNode):
    """MODEL patch: rectify whatever guidance the model's chain produces (KSampler and every CFG-based guider)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="REGGuidance",
            display_name="REG Guidance (rectify any guidance)",
            category=CATEGORY,
            description="Rectified Gradient Guidance (Gao et al., ICML 2025): multiplies the final guidance "
            "(CFG, APG, PAG, SAG, SLG, CFGZeroStar, RescaleCFG, … in any node order) element-wise by "
            "M = ∇x Σ D_cond. Works with KSampler and SamplerCustomAdvanced. Costs one backward of the positive "
            "branch per step (vjp) or one extra forward (gradient-free).",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (any SD1.x/SDXL/SD3/Flux/… model)."),
                *reg_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="The model with REG applied on top of its guidance.")],
        )

    @classmethod
    def validate_inputs(cls, start_percent, end_percent) -> bool | str:
        return _check_window(start_percent, end_percent)

    @classmethod
    def execute(cls, model, strength, estimator, start_percent, end_percent, refresh_every) -> io.NodeOutput:
        patch = REGPatch(REGSettings(strength, estimator, start_percent, end_percent, refresh_every))
        m = model.clone()
        if remove_reg(m):
            log.info("REGGuidance: replacing the REG settings already on this model.")
        patch.install(wrapper_adder(m))
        return io.NodeOutput(m)


class REGGuidanceSchedule(io.ComfyNode):
    """MODEL patch: the paper's guidance-weight schedules applied to the sampler's cfg."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="REGGuidanceSchedule",
            display_name="REG Guidance Schedule",
            category=CATEGORY,
            description="Schedules the cfg scale over sampling with the REG paper's schedules (constant, interval, "
            "linear, cosine). Composes with REGGuidance in either order; at cfg 1 the negative pass is skipped.",
            inputs=[
                io.Model.Input("model", tooltip="The model whose cfg scale to schedule."),
                *schedule_inputs(advanced=False),
            ],
            outputs=[io.Model.Output(tooltip="The model with the cfg schedule.")],
        )

    @classmethod
    def execute(cls, model, schedule, end_cfg, sigma_low, sigma_high, exponent, progress) -> io.NodeOutput:
        patch = SchedulePatch(_schedule(schedule, end_cfg, sigma_low, sigma_high, exponent, progress))
        m = model.clone()
        if remove_schedule(m):
            log.info("REGGuidanceSchedule: replacing the schedule already on this model.")
        patch.install(wrapper_adder(m))
        return io.NodeOutput(m)


class REGCFGGuider(comfy.samplers.CFGGuider):
    """A CFGGuider whose own ``model_options`` carry REG, an optional schedule, and APG or PAG.

    It still runs through ComfyUI's sampling function, so the model's own pre/post-cfg hooks keep working.
    """

    def __init__(self, model_patcher, reg: REGPatch, schedule: SchedulePatch | None, apg: APG | None, pag_scale: float):
        super().__init__(model_patcher)
        if model_patcher.get_wrappers(WrappersMP.PREDICT_NOISE, WRAPPER_KEY):
            raise REGConfigError(
                "REGGuider got a model already patched by REGGuidance, so REG would be applied twice. "
                "Connect the model without REGGuidance, or use REGGuidance with a plain CFGGuider."
            )
        if schedule is not None and model_patcher.get_wrappers(WrappersMP.PREDICT_NOISE, SCHEDULE_KEY):
            raise REGConfigError(
                "REGGuider has a schedule and its model already went through REGGuidanceSchedule, so the cfg would "
                "be scheduled twice. Set the guider's schedule to constant, or remove REGGuidanceSchedule."
            )
        self.model_options = comfy.model_patcher.create_model_options_clone(model_patcher.model_options)
        self.reg = reg
        self.apg = apg
        add = wrapper_adder(self.model_options)
        reg.install(add)
        if schedule is not None:
            schedule.install(add)
        if apg is not None:
            install_apg(self.model_options, apg)
        if pag_scale != 0:
            check_pag_model(model_patcher, "REGGuider: base 'pag'", DIT_PAG_FIX)
            comfy.model_patcher.set_model_options_post_cfg_function(self.model_options, pag_post_cfg(pag_scale))

    def sample(self, *args, **kwargs):
        if self.apg is not None:
            self.apg.state.reset()
        return super().sample(*args, **kwargs)


class REGGuider(io.ComfyNode):
    """GUIDER for SamplerCustomAdvanced: CFG, APG or PAG as the base guidance, rectified by REG."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="REGGuider",
            display_name="REG Guider (CFG / APG / PAG + REG)",
            category=CATEGORY,
            description="A guider for SamplerCustomAdvanced: base guidance (cfg, APG or PAG) with an optional "
            "schedule, rectified by REG. Other patches on the model (pre/post-cfg hooks) keep working.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with."),
                io.Conditioning.Input("positive", tooltip="The positive (conditional) prompt."),
                io.Conditioning.Input("negative", tooltip="The negative (unconditional) prompt."),
                io.Float.Input(
                    "cfg",
                    default=5.0,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip="Guidance scale. cfg and pag: ComfyUI's usual uncond-anchored scale (REG's w = cfg − 1). "
                    "apg: ComfyUI APG's cond-anchored scale (result D_c + cfg·G_apg), so cfg s with eta 1, "
                    "norm_threshold 0, momentum 0 equals plain cfg s + 1.",
                ),
                io.Combo.Input(
                    "base",
                    options=["cfg", "apg", "pag"],
                    default="cfg",
                    tooltip="The guidance REG rectifies: cfg; apg (Adaptive Projected Guidance, parameters below); "
                    "pag (cfg plus Perturbed-Attention Guidance on the UNet middle block; UNet models only).",
                ),
                *apg_pag_inputs("apg only", "pag only"),
                *reg_inputs(),
                *schedule_inputs(advanced=True),
            ],
            outputs=[io.Guider.Output(tooltip="Connect to SamplerCustomAdvanced.")],
        )

    @classmethod
    def validate_inputs(cls, start_percent, end_percent) -> bool | str:
        return _check_window(start_percent, end_percent)

    @classmethod
    def execute(
        cls,
        model,
        positive,
        negative,
        cfg,
        base,
        eta,
        norm_threshold,
        momentum,
        pag_scale,
        strength,
        estimator,
        start_percent,
        end_percent,
        refresh_every,
        schedule,
        end_cfg,
        sigma_low,
        sigma_high,
        exponent,
        progress,
    ) -> io.NodeOutput:
        reg = REGPatch(REGSettings(strength, estimator, start_percent, end_percent, refresh_every), node="REGGuider")
        sched = _schedule(schedule, end_cfg, sigma_low, sigma_high, exponent, progress)
        schedule_patch = SchedulePatch(sched) if sched.schedule is not Schedule.CONSTANT else None
        apg = APG(eta=eta, norm_threshold=norm_threshold, momentum=momentum) if base == "apg" else None
        guider = REGCFGGuider(model, reg, schedule_patch, apg, pag_scale if base == "pag" else 0.0)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)


NODES = [REGGuidance, REGGuider, REGGuidanceSchedule]
