"""The model passes REG runs in a step, each reaching the model as ComfyUI would run it without REG.

``_calc_cond_batch`` labels every chunk of a batch by the index of its cond list in the call (``cond_or_uncond``:
0 for CFG's positive, 1 for its negative) and patches keyed on that label (IP-Adapter, PuLID, SAG, NAG) pick their
per-chunk values by it. REG splits a step into a positive pass (differentiated, or at a shifted input for the
gradient-free probe) and a pass over the other branches, so each of them passes ComfyUI the full cond list with
``None`` for the branches it skips: every chunk keeps its label and ``transformer_options``, as ``_calc_cond_batch``
allows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..reg_core import rectify
from ..reg_core.rectify import Space
from .traced_pass import plain_kernels

CalcExecutor = Callable[..., list[torch.Tensor]]
FD_RELATIVE_STEP = 1e-3


def compute_dtype(model: Any) -> torch.dtype:
    """The dtype the network computes in: its manual-cast dtype, else its weights' (fp8 weights compute in 16 bits)."""
    dtype = getattr(model, "manual_cast_dtype", None) or model.get_dtype()
    if not dtype.is_floating_point or dtype.itemsize < 2:
        return torch.bfloat16
    return dtype


def fd_relative_step(model: Any) -> float:
    """Finite-difference step for the model's compute dtype: ``max(1e-3, √eps)``.

    ComfyUI casts the network input to that dtype, so a step below its rounding (bf16 eps 7.8e-3) would vanish or be
    quantised into noise; √eps balances rounding against the difference error (float32 keeps 1e-3).
    """
    return max(FD_RELATIVE_STEP, math.sqrt(torch.finfo(compute_dtype(model)).eps))


@dataclass(frozen=True)
class CondPass:
    """One ``calc_cond_batch`` call as the sampler made it, and where the positive branch sits in it.

    ``exact_kernels``: the step runs its exact estimator, so every untraced pass of the step uses the same
    attention kernels and plain code paths as the differentiated one (``D_c`` and ``D_u`` from one numeric path).
    """

    executor: CalcExecutor
    model: Any
    conds: list[Any]
    positive: int
    x: torch.Tensor
    timestep: torch.Tensor
    model_options: dict
    space: Space
    cobatch: bool = False
    exact_kernels: bool = False
    mask: torch.Tensor | None = None  # the sampler's denoise mask at this evaluation (see :meth:`weight`)

    @property
    def factor(self) -> torch.Tensor:
        """``a(σ)`` of the step (reg_core.rectify.Space)."""
        return self.space.factor(self.timestep, self.x)

    def weight(self) -> torch.Tensor | None:
        """The step's denoise mask ``w`` shaped like ``x``; None without one.

        With a mask (SetLatentNoiseMask and inpainting, the start frames of Wan 2.2 / LTX-Video / Cosmos
        image-to-video) ComfyUI's sampler denoises with ``D_eff(x) = w ⊙ D(w ⊙ x + (1 − w) ⊙ c) + (1 − w) ⊙ latent``
        (``KSamplerX0Inpaint``): the model sees ``w ⊙ x``, and only ``w ⊙`` its prediction is kept. REG's M for that
        denoiser, with the blend applied to REG's result afterwards, is ``a·w ⊙ Jᵀw`` (gradient-free:
        ``a·w ⊙ (D(x + h·w) − D(x))/h``): predictions the sampler replaces by the known latent do not count.
        """
        if self.mask is None:
            return None
        return self.mask.to(self.x).expand_as(self.x)

    def fd_step(self) -> torch.Tensor:
        """The per-sample finite-difference step ``h`` for this model and σ (reg_core.rectify.fd_step)."""
        return rectify.fd_step(self.timestep, self.x, space=self.space, relative=fd_relative_step(self.model))

    def _call(self, conds: list[Any], x: torch.Tensor, options: dict | None = None) -> list[torch.Tensor]:
        options = self.model_options if options is None else options
        if not self.exact_kernels:
            return self.executor(self.model, conds, x, self.timestep, options)
        with plain_kernels(options) as plain:
            return self.executor(self.model, conds, x, self.timestep, plain)

    def traced(self, options: dict) -> CondPass:
        """This call for the differentiated pass: a σ tensor of its own (autograd cannot save ComfyUI's inference
        tensor) and ``options`` (call inside :class:`nodes.traced_pass.TracedPass`)."""
        return replace(self, timestep=self.timestep.clone(), model_options=options)

    def main(self) -> list[torch.Tensor]:
        """The call exactly as the sampler made it (every branch, one batch when it fits)."""
        return self._call(self.conds, self.x)

    def positive_only(self, x: torch.Tensor | None = None, options: dict | None = None) -> torch.Tensor:
        """``D_c`` at ``x`` (default: the step's input): the positive branch alone, keeping its label."""
        conds = [c if i == self.positive else None for i, c in enumerate(self.conds)]
        return self._call(conds, self.x if x is None else x, options)[self.positive]

    def d_c(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """``D_c`` of this step from the main call's ``outputs``: with a patch that guides inside the batch (NAG) the
        batch's positive is already guided, so the positive branch then runs on its own."""
        return self.positive_only() if self.cobatch else outputs[self.positive]

    def weighted(self, m: torch.Tensor) -> torch.Tensor:
        """``w ⊙ m`` with the step's denoise mask ``w`` (:meth:`weight`); ``m`` without one."""
        weight = self.weight()
        return m if weight is None else weight * m

    def others(self) -> list[torch.Tensor]:
        """Every branch but the positive one, each with its own label (zeros at the positive's place)."""
        return self._call([None if i == self.positive else c for i, c in enumerate(self.conds)], self.x)

    def with_positive(self, d_c: torch.Tensor, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """``outputs`` with ``d_c`` at the positive branch's place."""
        return [d_c if i == self.positive else out for i, out in enumerate(outputs)]

    def branches(self, d_c: torch.Tensor) -> list[torch.Tensor]:
        """The call's outputs around a known ``D_c``: every branch the sampler asked for.

        Normally the other branches run alone and ``d_c`` takes the positive's place. When a patch needs the positive
        and negative chunks in one batch (NAG), the sampler's own batch runs untouched, so the guidance sees what it
        would see without REG, while ``d_c`` stays the positive prediction without that guidance.
        """
        if self.cobatch:
            return self.main()
        return self.with_positive(d_c, self.others())

    def exact(self) -> CondPass:
        """The same call, with the kernels of the differentiated pass for every pass of the step."""
        return replace(self, exact_kernels=True)
