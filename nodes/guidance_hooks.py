"""APG and PAG as ComfyUI pre-/post-cfg hooks, so REG can rectify them (they are ordinary guidance to REG)."""

from __future__ import annotations

from collections.abc import Callable

import comfy.model_patcher
import comfy.samplers
import torch

from ..reg_core import guidance
from ..reg_core.guidance import APG
from .common import REGConfigError


class APGPreCfg:
    """A pre-cfg hook running reg_core's APG with ComfyUI's semantics; a no-op when the uncond pass was skipped.

    The sampler's cfg is APG's cond-anchored scale ``s`` (result ``D_c + s·G_apg``), not CFG's: the schedule finds
    it in ``nodes.composition.COND_ANCHORED`` and schedules it as such.
    """

    def __init__(self, apg: APG) -> None:
        self.apg = apg

    def __call__(self, args: dict) -> list:
        out = args["conds_out"]
        if len(out) < 2 or args["conds"][1] is None:
            return out
        sigma = float(args["sigma"][0])
        return [*self.apg.pre_cfg(out[0], out[1], args["cond_scale"], sigma), *out[2:]]


def install_apg(model_options: dict, apg: APG) -> None:
    """APG on ``model_options`` being built (a fresh clone's), with ComfyUI's cfg-1 shortcut off: APG at scale 1
    still needs the negative pass."""
    comfy.model_patcher.set_model_options_pre_cfg_function(model_options, APGPreCfg(apg))
    model_options["disable_cfg1_optimization"] = True


def check_pag_model(model_patcher, what: str, fix: str) -> None:
    """Refuse PAG (``what``, e.g. the input that asks for it) on a model without a UNet middle block, naming ``fix``."""
    if not hasattr(model_patcher.model.diffusion_model, "middle_block"):
        raise REGConfigError(
            f"{what}: PAG perturbs the self-attention of a UNet's middle block, which this model "
            f"({type(model_patcher.model.model_config).__name__}) does not have. {fix}"
        )


def _identity_attention(q, k, v, extra_options, mask=None):
    return v


def pag_post_cfg(scale: float) -> Callable[[dict], torch.Tensor]:
    """PAG (Ahn et al. 2024) as ComfyUI's node does it: the UNet middle block's self-attention returns V, and the
    result moves by ``scale·(D_c − D_pag)``. The extra pass is never differentiated (REG ignores later passes)."""

    def hook(args: dict) -> torch.Tensor:
        model_options = comfy.model_patcher.set_model_options_patch_replace(
            args["model_options"].copy(), _identity_attention, "attn1", "middle", 0
        )
        (d_pag,) = comfy.samplers.calc_cond_batch(
            args["model"], [args["cond"]], args["input"], args["sigma"], model_options
        )
        return guidance.reference_guidance(args["denoised"], args["cond_denoised"], d_pag, scale)

    return hook
