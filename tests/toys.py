"""Toys only the tests use: the authors' 1-D data and the change of variables to ComfyUI's flow space."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from reg_core.toy import ConditionalToy, GaussianMixture, mixture_of


def make_toy_1d(dtype: torch.dtype = torch.float64) -> ConditionalToy:
    """A 1-D toy with the shape of zhengqigao/REG's ``1d-toy`` data.

    cond ``½N(0.5, 0.25²) + ½N(1.5, 0.25²)``; the unconditional mixture adds an equally likely second class
    ``½N(−2, 0.5²) + ½N(0, 0.5²)``.
    """
    cond = GaussianMixture(
        weights=torch.tensor([0.5, 0.5], dtype=dtype),
        means=torch.tensor([[0.5], [1.5]], dtype=dtype),
        covs=torch.tensor([[[0.0625]], [[0.0625]]], dtype=dtype),
    )
    other = GaussianMixture(
        weights=torch.tensor([0.5, 0.5], dtype=dtype),
        means=torch.tensor([[-2.0], [0.0]], dtype=dtype),
        covs=torch.tensor([[[0.25]], [[0.25]]], dtype=dtype),
    )
    return ConditionalToy(cond=cond, uncond=mixture_of([cond, other], torch.tensor([0.5, 0.5], dtype=dtype)))


def to_flow(x_ve: Tensor, sigma_ve: float) -> tuple[Tensor, float]:
    """Map a VE state to ComfyUI's CONST (flow) space: ``σ = σ_VE/(1+σ_VE)``, ``x = (1−σ)·x_VE``."""
    sigma = sigma_ve / (1 + sigma_ve)
    return (1 - sigma) * x_ve, sigma


def flow_denoiser(mixture: GaussianMixture) -> Callable[[Tensor, float], Tensor]:
    """The exact denoiser of ``mixture`` in flow space ``x = (1−σ)x0 + σε``: ``D(x/(1−σ), σ/(1−σ))``."""

    def denoise(x: Tensor, sigma: float) -> Tensor:
        return mixture.denoise(x / (1 - sigma), sigma / (1 - sigma))

    return denoise
