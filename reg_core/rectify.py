"""The REG correction in ComfyUI's denoised space.

Rectified Gradient Guidance (Gao et al., ICML 2025, arXiv 2501.18865) multiplies the guidance difference element-wise
by ``M = 1 − σ_t ∇_{x_t} Σ ε_c`` (paper, ε-form, DDPM space). Written for a denoiser ``D(x, σ)`` in the sampler's own
space (ComfyUI's ``input``; README, "The maths") the same factor is

    M = a(σ) · ∇_x Σ_i D_c,i(x, σ)          a = 1 (VE-space: EPS, V, EDM, X0),   a = 1 − σ (CONST / flow)

and the rectified prediction is

    D_REG = D_c + M ⊙ (D_guided − D_c).

Everything here is per sample: for batch-independent networks the gradient of the sum over the whole batch is the
stack of per-sample gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

Denoiser = Callable[[Tensor], Tensor]
"""A conditional denoiser at a fixed noise level: maps the sampler state ``x`` to ``D_c(x)`` (same shape)."""


class Estimator(str, Enum):
    """How the Jacobian of the conditional denoiser enters REG.

    - ``VJP``: ``M = a·Jᵀ𝟙`` by one vector-Jacobian product (the paper's method; one backward through the
      conditional branch, about two forward passes of compute, plus the activation memory of one forward).
    - ``GRADIENT_FREE``: ``M ≈ a·J𝟙`` by a forward finite difference along the all-ones direction (one extra forward,
      no graph, no weight gradients, works under ``torch.inference_mode``). Exact for the ideal denoiser, whose
      Jacobian ``Cov[x0|x]/σ²`` is symmetric (so ``J𝟙 = Jᵀ𝟙``); only approximate for a learned network.
    - ``VJP_LOW_MEMORY``: the same ``M`` as ``VJP`` to float rounding, with the differentiated pass recomputed block
      by block during the backward (activation checkpointing): the saved activations are bounded by the block
      inputs plus one block, at the price of one more conditional forward.
    - ``CHAIN``: the full chain rule ``D_c + a·Jᵀ(D_guided − D_c)`` instead of the element-wise column-sum
      approximation (same cost as ``VJP`` but the graph is held until the guided prediction is known). An ablation
      the paper does not evaluate.
    """

    VJP = "vjp"
    VJP_LOW_MEMORY = "vjp-low-memory"
    GRADIENT_FREE = "gradient-free"
    CHAIN = "chain"


def per_sample(values: Tensor | float, like: Tensor) -> Tensor:
    """Broadcast a scalar or a per-sample vector of shape ``[B]`` to ``[B, 1, …, 1]`` matching ``like``."""
    values = torch.as_tensor(values, dtype=like.dtype, device=like.device)
    if values.ndim == 0:
        return values
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


@dataclass(frozen=True)
class Space:
    """Where the sampler's state ``x`` lives, which fixes ``a(σ)``, the noise level in EDM terms and the state's scale.

    VE (``flow=False``: EPS, V, EDM, X0, Cosmos): ``x = x0 + σε``. Flow (``flow=True``: ComfyUI's CONST):
    ``x = (1−σ)x0 + sσε`` with the model's ``noise_scale`` ``s`` (1 for nearly every model); its VE state is
    ``x/(1−σ) = x0 + sσ/(1−σ)·ε``, so ``∇_{x_VE} = (1−σ)∇_x`` (README, "The maths").
    """

    flow: bool = False
    noise_scale: float = 1.0

    def factor(self, sigma: Tensor | float, like: Tensor) -> Tensor:
        """The space factor ``a(σ)``: ``1`` in VE space, ``1 − σ`` in flow space (per sample, broadcastable)."""
        if not self.flow:
            return torch.ones((), dtype=like.dtype, device=like.device)
        return 1 - per_sample(sigma, like)

    def ve_sigma(self, sigma: float) -> float:
        """The noise level in the EDM/VE convention: ``σ`` in VE space, ``sσ/(1−σ)`` in flow space."""
        if not self.flow:
            return sigma
        return math.inf if sigma >= 1 else self.noise_scale * sigma / (1 - sigma)

    def state_scale(self, sigma: Tensor | float, like: Tensor) -> Tensor:
        """The per-element scale of the state for unit-variance data: ``√(1+σ²)``, or ``√((1−σ)²+s²σ²)`` for flow."""
        s = per_sample(sigma, like)
        if self.flow:
            return torch.sqrt((1 - s) ** 2 + (self.noise_scale * s) ** 2)
        return torch.sqrt(1 + s**2)


VE = Space()
FLOW = Space(flow=True)


def column_sums(d_c: Tensor, x: Tensor, weight: Tensor | None = None) -> Tensor:
    """``Jᵀ𝟙 = ∇_x Σ_i D_c,i(x)``: one vector-Jacobian product with the all-ones vector (README, "The maths").

    With ``weight`` (a denoise mask ``w`` shaped like ``d_c``) the weighted sums ``Jᵀw = ∇_x Σ_i w_i·D_c,i``.
    ``d_c`` must have been computed from ``x`` (which requires grad) with autograd enabled.
    """
    ones = torch.ones_like(d_c) if weight is None else weight.to(d_c)
    (grad,) = torch.autograd.grad(d_c, x, grad_outputs=ones)
    return grad


def chain_product(d_c: Tensor, x: Tensor, delta: Tensor) -> Tensor:
    """``Jᵀδ``: the exact chain-rule vector-Jacobian product of the conditional denoiser with the guidance delta.

    This is the term that the paper approximates by ``(Jᵀ𝟙) ⊙ δ``: the column sums times ``δ`` instead of the chain
    rule.
    """
    (grad,) = torch.autograd.grad(d_c, x, grad_outputs=delta.to(d_c.dtype))
    return grad


def denoise_with_graph(denoise: Denoiser, x: Tensor) -> tuple[Tensor, Tensor]:
    """Evaluate ``D_c`` at a detached, grad-requiring copy of ``x``; return ``(d_c, x_leaf)`` with the graph kept."""
    leaf = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        d_c = denoise(leaf)
    return d_c, leaf


def reg_factor_vjp(denoise: Denoiser, x: Tensor, sigma: Tensor | float, *, space: Space = VE) -> tuple[Tensor, Tensor]:
    """``(D_c, M)`` with ``M = a(σ)·∇_x Σ D_c(x)`` computed exactly by one VJP (README, "The maths").

    Returns detached tensors; the graph is freed before returning.
    """
    with torch.enable_grad():
        d_c, leaf = denoise_with_graph(denoise, x)
        m = column_sums(d_c, leaf)
    return d_c.detach(), m * space.factor(sigma, x)


def fd_step(sigma: Tensor | float, like: Tensor, *, space: Space, relative: float = 1e-3) -> Tensor:
    """Per-sample finite-difference step ``h`` for the gradient-free estimator: ``relative`` times the state's scale
    (:meth:`Space.state_scale`), the scale on which the denoiser varies."""
    return relative * space.state_scale(sigma, like)


def reg_factor_fd(
    denoise: Denoiser,
    x: Tensor,
    sigma: Tensor | float,
    *,
    space: Space = VE,
    d_c: Tensor | None = None,
    relative_step: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    """``(D_c, M)`` with ``M ≈ a(σ)·J𝟙`` from one forward difference ``(D_c(x + h𝟙) − D_c(x)) / h``.

    Gradient-free (README, "The maths"): no autograd graph, so it works inside
    ``torch.inference_mode`` and with weights that cannot be differentiated. It equals the VJP estimator ``a·Jᵀ𝟙``
    whenever the Jacobian is symmetric, which holds for the exact denoiser (second-order Tweedie:
    ``J = Cov[x0|x]/σ²``), up to the O(h) difference error.
    Pass ``d_c`` when ``D_c(x)`` is already known, to spend a single extra forward.
    """
    if d_c is None:
        d_c = denoise(x)
    h = fd_step(sigma, x, space=space, relative=relative_step)
    return d_c, fd_factor(d_c, denoise(x + h), h, space.factor(sigma, x))


def fd_factor(d_c: Tensor, d_shifted: Tensor, h: Tensor, factor: Tensor) -> Tensor:
    """Gradient-free ``M ≈ a(σ)·(D_c(x + h𝟙) − D_c(x)) / h`` from the two predictions (see :func:`reg_factor_fd`)."""
    return (d_shifted - d_c) / h * factor


def is_fresh_evaluation(evaluation: int, refresh_every: int) -> bool:
    """Whether guided evaluation ``evaluation`` (0-based, counted over a sampling run) estimates a new ``M``.

    With ``refresh_every = k`` the factor is re-estimated on evaluations 0, k, 2k, … and reused in between (the
    pack's cost shortcut; the paper recomputes it at every step, ``k = 1``).
    """
    if refresh_every < 1:
        raise ValueError(f"refresh_every must be at least 1, got {refresh_every}")
    return evaluation % refresh_every == 0


def blend_factor(m: Tensor, strength: float) -> Tensor:
    """Strength blend ``M_λ = 1 + λ(M − 1)`` (README, "The maths"): λ = 0 is plain guidance, 1 is REG, > 1
    extrapolates."""
    if strength == 1:
        return m
    return 1 + strength * (m - 1)


def rectify(d_c: Tensor, d_guided: Tensor, m: Tensor, strength: float = 1.0) -> Tensor:
    """REG in denoised space: ``D_c + M_λ ⊙ (D_guided − D_c)`` (README, "The maths", with the strength blend).

    ``strength == 0`` returns ``d_guided`` itself, bit for bit.
    """
    if strength == 0:
        return d_guided
    return d_c + blend_factor(m, strength) * (d_guided - d_c)


def rectify_chain(d_c: Tensor, d_guided: Tensor, jt_delta: Tensor, factor: Tensor, strength: float = 1.0) -> Tensor:
    """Chain-rule variant: ``(1−λ)·D_guided + λ·(D_c + a·Jᵀ(D_guided − D_c))`` (the full chain rule; an ablation).

    ``jt_delta`` is :func:`chain_product` of ``D_guided − D_c``; ``factor`` is :meth:`Space.factor`.
    """
    if strength == 0:
        return d_guided
    rectified = d_c + factor * jt_delta
    return d_guided + strength * (rectified - d_guided)
