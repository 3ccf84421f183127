"""What the exact estimators share: the differentiated positive pass, and the audit that checks its Jacobian.

The audit holds for any network, whatever its layers and kernels: for a direction ``v``, ``⟨Jᵀ𝟙, v⟩ = 𝟙ᵀJv``, and
``Jv`` is a central difference of two ordinary forwards. Once per run, the column sums of the differentiated pass
are checked against it with a random ±1 direction; a graph that lost part of the network (a kernel without a backward
that owns no weights, a detached cache, a custom op) shows as a mismatch beyond the compute dtype's tolerance.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import comfy.model_management
import torch

from ..common import LOGGER_NAME
from ..passes import CondPass, compute_dtype
from ..traced_pass import InPlaceUpdateError, NoGraphError, TracedPass, differentiable_modules, make_differentiable

log = logging.getLogger(LOGGER_NAME)

# Largest accepted |⟨Jᵀ𝟙, v⟩ − 𝟙ᵀJv| / ‖Jᵀ𝟙‖ by the compute dtype's size: the difference's rounding stays far below
# these (about 1e-5 in float32, 2e-2 in 16 bits); a lost path of the network is typically of the order of 1.
AUDIT_TOLERANCE = {2: 0.2, 4: 0.02, 8: 0.02}
AUDIT_SEED = 0x5EC
# Quantised-weight layouts whose layers also quantise their inputs (w8a8, w4a4, w4a8, fp4, mxfp8): such a network is
# piecewise constant in its input, so no difference can check its Jacobian; its gradient is the dequantised weights'.
INPUT_QUANTIZING_LAYOUTS = ("INT8", "W4A4", "W4A8", "NVFP4", "MXFP8")


class JacobianMismatchError(NoGraphError):
    """The differentiated pass does not reproduce the network's Jacobian."""


def traced_options(model_options: dict) -> dict:
    """``model_options`` for the differentiated pass.

    One device (ComfyUI 0.33's multi-GPU work units run chunks in pool threads, where autograd's thread-local state
    does not hold), and :func:`_copy_after_skip` appended to the UNet patches.
    """
    transformer_options = dict(model_options.get("transformer_options", {}))
    patches = dict(transformer_options.get("patches", {}))
    patches["input_block_patch_after_skip"] = [*patches.get("input_block_patch_after_skip", []), _copy_after_skip]
    transformer_options["patches"] = patches
    options = {k: v for k, v in model_options.items() if k != "multigpu_clones"}
    return {**options, "transformer_options": transformer_options}


def _copy_after_skip(h: torch.Tensor, transformer_options: dict) -> torch.Tensor:
    """UNet ``input_block_patch_after_skip``: the blocks after a skip connection get their own copy of ``h``.

    ``openaimodel.apply_control`` adds ControlNet residuals to the skip tensors in place (``h += ctrl`` on
    ``hs.pop()``) after the following blocks saved them for backward.
    """
    return h.clone()


@dataclass
class Traced:
    """The differentiated forward shared by the exact estimators (weights made differentiable once per run).

    ``copy``: whether the saved-tensor guard keeps private copies (see :class:`nodes.traced_pass.SavedTensorGuard`);
    it starts off (chain: on from the start) and is switched on for the rest of the run the first time the network
    overwrites a saved tensor.
    """

    copy: bool = False
    prepared: bool = False

    def open(self, cond_pass: CondPass, *, checkpoint: bool, budget: float | None = None) -> TracedPass:
        modules = differentiable_modules(cond_pass.model, cond_pass.conds)
        if not self.prepared:
            make_differentiable(modules, comfy.model_management.get_torch_device())
            self.prepared = True
        weights = [t for module in modules for t in (*module.parameters(), *module.buffers())]
        return TracedPass(
            cond_pass.model.diffusion_model, weights, checkpoint=checkpoint, copy=self.copy, budget=budget
        )

    def retrying_in_place(self, attempt: Callable[[], Any]) -> Any:
        """``attempt()``, repeated once with private copies if the network overwrote a tensor it had saved.

        The repeat runs after the ``except`` block, so the failed attempt's traceback (and with it the graph of its
        pass) is released before the second pass builds its own.
        """
        try:
            return attempt()
        except InPlaceUpdateError:
            if self.copy:
                raise
            self.copy = True
        log.info("REG: the network overwrites tensors it saved for the backward; the traced pass keeps copies.")
        return attempt()

    @staticmethod
    def forward(cond_pass: CondPass, traced: TracedPass) -> tuple[torch.Tensor, torch.Tensor]:
        """``(D_c with graph, leaf x)`` for the positive branch; call inside ``traced``."""
        leaf = cond_pass.x.detach().clone().requires_grad_(True)
        d_c = cond_pass.traced(traced.options(traced_options(cond_pass.model_options))).positive_only(leaf)
        if not d_c.requires_grad:
            raise NoGraphError("the conditional prediction carries no gradient")
        traced.check()
        return d_c, leaf


def input_quantizing_layouts(network: torch.nn.Module) -> list[str]:
    """The quantised layouts among the network's weights that quantise their layer's input (sorted names)."""
    layouts = {str(getattr(p, "_layout_cls", "")) for p in network.parameters()} - {""}
    return sorted(name for name in layouts if any(tag in name.upper() for tag in INPUT_QUANTIZING_LAYOUTS))


def audit(cond_pass: CondPass, column_sums: torch.Tensor) -> None:
    """Check ``Jᵀ𝟙`` of the differentiated pass against ``𝟙ᵀJv`` (module docstring); raise on a mismatch.

    A network whose layers quantise their inputs has no Jacobian to check (it is piecewise constant): the audit says
    so, once, instead.
    """
    quantizing = input_quantizing_layouts(cond_pass.model.diffusion_model)
    if quantizing:
        log.warning(
            "REG: the network's %s layers quantise their inputs, so it has no exact Jacobian; M is the Jacobian of its "
            "dequantised weights (straight-through), which REG cannot check here.",
            ", ".join(quantizing),
        )
        return
    generator = torch.Generator().manual_seed(AUDIT_SEED)
    v = (torch.randint(0, 2, cond_pass.x.shape, generator=generator) * 2 - 1).to(cond_pass.x)
    h = cond_pass.fd_step()
    plus = cond_pass.positive_only(cond_pass.x + h * v)
    minus = cond_pass.positive_only(cond_pass.x - h * v)
    difference = (plus - minus) / (2 * h)
    weight = cond_pass.weight()  # the audit checks ⟨Jᵀw, v⟩ = wᵀJv
    directional = (difference if weight is None else weight * difference).flatten(1).double().sum(1)
    projected = (column_sums * v).flatten(1).double().sum(1)
    scale = column_sums.flatten(1).double().norm(dim=1).clamp_min(1e-30)
    mismatch = float(((projected - directional).abs() / scale).max())
    tolerance = AUDIT_TOLERANCE.get(compute_dtype(cond_pass.model).itemsize, 0.2)
    if not mismatch <= tolerance:
        raise JacobianMismatchError(
            f"the differentiated pass misses part of the network (⟨M, v⟩ is {mismatch:.0%} off the network's own "
            "directional difference): a layer or kernel without a backward cut it"
        )
