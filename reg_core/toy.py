"""Exact analytic toy models for REG: class-conditional Gaussian mixtures with closed-form denoisers.

With data ``x0 ~ Σ_k π_k N(μ_k, Σ_k)`` and ComfyUI's VE state ``x = x0 + σε``, everything REG needs is exact:

- the denoiser is the posterior mean ``D(x, σ) = Σ_k r_k(x)·(μ_k + Σ_k(Σ_k + σ²I)⁻¹(x − μ_k))`` with responsibilities
  ``r_k ∝ π_k N(x; μ_k, Σ_k + σ²I)``; its Jacobian ``Cov[x0|x]/σ²`` is symmetric (second-order Tweedie);
- the posterior ``p(x0|x)`` is again a Gaussian mixture, so the paper's optimal guidance
  ``σ²∇_x log E_σ(x)``, ``E_σ(x) = E_{p(x0|x,y)}[R_0(x0)]``, ``R_0 = (p(x0|y)/p(x0))^w`` (Gao et al. 2025; README,
  "The exact toy"), is a
  per-component Gaussian integral, done here by Gauss–Hermite quadrature;
- the tilted target ``p̄(x0) ∝ p(x0|y)·R_0(x0)`` is what the optimally guided probability-flow ODE samples.

Flow (CONST) space ``x = (1−σ)x0 + σε`` is the same model seen through ``x_VE = x/(1−σ)``, ``σ_VE = σ/(1−σ)``.
All functions are pure torch and differentiable; use float64.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .rectify import Estimator, rectify, reg_factor_fd, reg_factor_vjp

GuidedDenoiser = Callable[[Tensor, float], Tensor]
"""A guided denoiser in VE space: ``(x [N, d], σ) → D [N, d]``."""


@dataclass(frozen=True)
class GaussianMixture:
    """A Gaussian mixture ``Σ_k π_k N(μ_k, Σ_k)`` in ``d`` dimensions.

    Shapes: weights ``[K]``, means ``[K, d]``, covs ``[K, d, d]``.
    """

    weights: Tensor
    means: Tensor
    covs: Tensor

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def _components(self, sigma: float) -> tuple[Tensor, Tensor]:
        """Noised covariances ``Σ_k + σ²I`` and their Cholesky factors."""
        eye = torch.eye(self.dim, dtype=self.means.dtype, device=self.means.device)
        noised = self.covs + sigma**2 * eye
        return noised, torch.linalg.cholesky(noised)

    def _component_log_probs(self, x: Tensor, sigma: float) -> Tensor:
        """``log π_k + log N(x; μ_k, Σ_k + σ²I)`` for every point and component: ``[N, K]``."""
        _noised, chol = self._components(sigma)
        precision = torch.cholesky_inverse(chol)
        diff = x[:, None, :] - self.means[None, :, :]
        maha = torch.einsum("nki,kij,nkj->nk", diff, precision, diff)
        logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        return torch.log(self.weights)[None] - 0.5 * (maha + logdet[None] + self.dim * math.log(2 * math.pi))

    def log_prob(self, x: Tensor, sigma: float = 0.0) -> Tensor:
        """``log p_σ(x)`` of the VE-noised mixture (``σ = 0``: the data density): ``[N]``."""
        return torch.logsumexp(self._component_log_probs(x, sigma), dim=-1)

    def posterior(self, x: Tensor, sigma: float) -> tuple[Tensor, Tensor, Tensor]:
        """The Gaussian-mixture posterior ``p(x0|x)``.

        Returns responsibilities ``[N, K]``, means ``[N, K, d]`` and covariances ``[K, d, d]``. Component k has mean
        ``μ_k + Σ_k(Σ_k+σ²I)⁻¹(x−μ_k)`` and covariance ``Σ_k − Σ_k(Σ_k+σ²I)⁻¹Σ_k`` (Gaussian conditioning).
        """
        _, chol = self._components(sigma)
        gain = torch.cholesky_solve(self.covs, chol).transpose(-1, -2)  # Σ_k (Σ_k+σ²I)⁻¹ (symmetric matrices)
        resp = torch.softmax(self._component_log_probs(x, sigma), dim=-1)
        diff = x[:, None, :] - self.means[None]
        means = self.means[None] + torch.einsum("kij,nkj->nki", gain, diff)
        covs = self.covs - gain @ self.covs
        return resp, means, covs

    def denoise(self, x: Tensor, sigma: float) -> Tensor:
        """The exact denoiser (posterior mean) ``D(x, σ) = E[x0 | x0 + σε = x]``: ``[N, d]``."""
        resp, means, _ = self.posterior(x, sigma)
        return (resp[..., None] * means).sum(1)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` independent draws ``[n, d]``."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        chol = torch.linalg.cholesky(self.covs)
        z = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)
        return self.means[comp] + torch.einsum("nij,nj->ni", chol[comp], z)


def mixture_of(parts: list[GaussianMixture], weights: Tensor) -> GaussianMixture:
    """The mixture ``Σ_c w_c·part_c`` as one flat Gaussian mixture."""
    return GaussianMixture(
        weights=torch.cat([w * p.weights for w, p in zip(weights, parts, strict=True)]),
        means=torch.cat([p.means for p in parts]),
        covs=torch.cat([p.covs for p in parts]),
    )


@dataclass(frozen=True)
class ConditionalToy:
    """Class-conditional data: ``cond = p(x0|y)`` for the guided class, ``uncond = p(x0) = Σ_c π_c p(x0|c)``."""

    cond: GaussianMixture
    uncond: GaussianMixture

    def log_reward(self, x0: Tensor, w: float) -> Tensor:
        """``log R_0 = w·(log p(x0|y) − log p(x0))``: the CFG-implied terminal reward (Gao et al. 2025)."""
        return w * (self.cond.log_prob(x0) - self.uncond.log_prob(x0))

    def tilted_log_density(self, x0: Tensor, w: float) -> Tensor:
        """Unnormalised ``log p̄(x0) = log p(x0|y) + log R_0(x0)``: the target that guidance should sample."""
        return self.cond.log_prob(x0) + self.log_reward(x0, w)


def make_toy_2d(dtype: torch.dtype = torch.float64) -> ConditionalToy:
    """The built-in 2-D toy: three classes of two Gaussians each, class 0 is the condition, classes overlap.

    Overlap matters: with separated classes ``R_0`` is constant on the condition's support and the optimal
    guidance vanishes (CONTRIBUTING.md, "The exact toy").
    """

    def cov(a: float, b: float, rho: float) -> list[list[float]]:
        return [[a * a, rho * a * b], [rho * a * b, b * b]]

    classes = [
        ([(-0.5, 0.0), (0.3, 0.6)], [cov(0.30, 0.22, 0.3), cov(0.25, 0.30, -0.4)]),
        ([(0.0, 0.2), (0.6, -0.4)], [cov(0.28, 0.25, 0.0), cov(0.30, 0.22, 0.5)]),
        ([(1.0, 1.0), (-0.8, 0.9)], [cov(0.30, 0.30, 0.2), cov(0.25, 0.32, -0.2)]),
    ]
    parts = [
        GaussianMixture(
            weights=torch.tensor([0.5, 0.5], dtype=dtype),
            means=torch.tensor(means, dtype=dtype),
            covs=torch.tensor(covs, dtype=dtype),
        )
        for means, covs in classes
    ]
    return ConditionalToy(cond=parts[0], uncond=mixture_of(parts, torch.full((3,), 1 / 3, dtype=dtype)))


def gauss_hermite(order: int, dim: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Tensor-product Gauss–Hermite rule ``E_{z~N(0,I_d)}[f(z)] ≈ Σ_j ω_j f(z_j)``.

    Returns nodes ``[J, d]`` and weights ``[J]`` with ``J = order^d``.
    """
    nodes, weights = np.polynomial.hermite.hermgauss(order)
    nodes = torch.tensor(nodes * math.sqrt(2.0), dtype=dtype)
    weights = torch.tensor(weights / math.sqrt(math.pi), dtype=dtype)
    grids = torch.meshgrid(*([nodes] * dim), indexing="ij")
    wgrids = torch.meshgrid(*([weights] * dim), indexing="ij")
    points = torch.stack([g.reshape(-1) for g in grids], dim=-1)
    prod = torch.stack([g.reshape(-1) for g in wgrids], dim=-1).prod(-1)
    return points, prod


def log_expected_reward(toy: ConditionalToy, x: Tensor, sigma: float, w: float, order: int = 16) -> Tensor:
    """``log E_σ(x) = log E_{p(x0|x,y)}[R_0(x0)]`` (Gao et al. 2025: the Doob h-transform's expected terminal reward).

    Exact up to quadrature: each posterior component ``N(m_k(x), C_k)`` is integrated with ``order``-point
    Gauss–Hermite per dimension; differentiable in ``x``.
    """
    resp, means, covs = toy.cond.posterior(x, sigma)
    z, omega = gauss_hermite(order, toy.cond.dim, x.dtype)
    chol = torch.linalg.cholesky(covs + 1e-12 * torch.eye(toy.cond.dim, dtype=x.dtype))
    x0 = means[:, :, None, :] + torch.einsum("kij,qj->kqi", chol, z)[None]  # [N, K, Q, d]
    n, k, q, d = x0.shape
    log_r = toy.log_reward(x0.reshape(-1, d), w).reshape(n, k, q)
    inner = torch.logsumexp(log_r + torch.log(omega)[None, None], dim=-1)
    return torch.logsumexp(inner + torch.log(resp), dim=-1)


def optimal_denoiser(toy: ConditionalToy, x: Tensor, sigma: float, w: float, order: int = 16) -> Tensor:
    """The optimally guided denoiser ``D_c + σ²∇_x log E_σ(x)``.

    It is the posterior mean under the tilted joint (Gao et al. 2025; CONTRIBUTING.md, "The exact toy").
    """
    leaf = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(log_expected_reward(toy, leaf, sigma, w, order).sum(), leaf)
    return toy.cond.denoise(x, sigma) + sigma**2 * grad


def reg_denoiser(
    toy: ConditionalToy, x: Tensor, sigma: float, w: float, estimator: Estimator = Estimator.VJP
) -> Tensor:
    """REG on the toy: ``D_c + M ⊙ w(D_c − D_u)`` (VE space, ``a = 1``), M from :mod:`reg_core.rectify`.

    ``estimator`` is ``VJP`` (the exact ``∇_x Σ D_c``) or ``GRADIENT_FREE`` (its forward difference).
    """

    def cond(z: Tensor) -> Tensor:
        return toy.cond.denoise(z, sigma)

    if estimator is Estimator.VJP:
        d_c, m = reg_factor_vjp(cond, x, sigma)
    elif estimator is Estimator.GRADIENT_FREE:
        d_c, m = reg_factor_fd(cond, x, sigma)
    else:
        raise ValueError(f"the toy's REG takes the vjp or gradient-free estimator, got {estimator.value}")
    return rectify(d_c, d_c + w * (d_c - toy.uncond.denoise(x, sigma)), m)


def cfg_denoiser(toy: ConditionalToy, x: Tensor, sigma: float, w: float) -> Tensor:
    """CFG on the toy in the paper's cond-anchored form ``D_c + w(D_c − D_u)``."""
    d_c = toy.cond.denoise(x, sigma)
    return d_c + w * (d_c - toy.uncond.denoise(x, sigma))


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """Karras et al. (2022) noise levels, ``n`` steps from ``σ_max`` to ``σ_min``, then 0."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [float(s) for s in (hi + ramp * (lo - hi)) ** rho] + [0.0]


def sample_ode(denoise: GuidedDenoiser, x: Tensor, sigmas: list[float]) -> Tensor:
    """Deterministic Heun sampler of the probability-flow ODE ``dx/dσ = (x − D(x, σ))/σ``.

    Karras et al. (2022), Algorithm 1.
    """
    for s, s_next in itertools.pairwise(sigmas):
        d = (x - denoise(x, s)) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d_next = (x_next - denoise(x_next, s_next)) / s_next
            x_next = x + (s_next - s) * 0.5 * (d + d_next)
        x = x_next
    return x


def sample_tilted(toy: ConditionalToy, w: float, n: int, generator: torch.Generator, grid: int = 400) -> Tensor:
    """``n`` draws from the tilted target ``p̄ ∝ p(x0|y)·R_0`` of a 1-D or 2-D toy, by inverse sampling on a fine grid.

    Each draw picks a grid cell with probability ∝ density and is placed uniformly inside it.
    """
    d = toy.cond.dim
    std = torch.sqrt(torch.diagonal(toy.cond.covs, dim1=-2, dim2=-1)).max()
    lo = (toy.cond.means.min(0).values - 6 * std).tolist()
    hi = (toy.cond.means.max(0).values + 6 * std).tolist()
    axes = [torch.linspace(lo[i], hi[i], grid + 1, dtype=toy.cond.means.dtype) for i in range(d)]
    centres = [(a[1:] + a[:-1]) / 2 for a in axes]
    mesh = torch.stack([g.reshape(-1) for g in torch.meshgrid(*centres, indexing="ij")], dim=-1)
    log_p = toy.tilted_log_density(mesh, w)
    cells = torch.multinomial(torch.softmax(log_p, 0), n, replacement=True, generator=generator)
    width = torch.tensor([(hi[i] - lo[i]) / grid for i in range(d)], dtype=mesh.dtype)
    jitter = (torch.rand(n, d, generator=generator, dtype=mesh.dtype) - 0.5) * width
    return mesh[cells] + jitter


def sliced_wasserstein(a: Tensor, b: Tensor, generator: torch.Generator, projections: int = 256) -> float:
    """Sliced 2-Wasserstein distance (Rabin et al. 2011) between two equally sized point sets ``[N, d]``."""
    if a.shape != b.shape:
        raise ValueError(f"point sets must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    dirs = torch.randn(projections, a.shape[1], generator=generator, dtype=a.dtype)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    pa, _ = torch.sort(a @ dirs.T, dim=0)
    pb, _ = torch.sort(b @ dirs.T, dim=0)
    return float(((pa - pb) ** 2).mean().sqrt())


def make_image_toy(side: int = 16, length_scale: float = 2.5, dtype: torch.dtype = torch.float64) -> ConditionalToy:
    """A toy of ``side × side`` one-channel "images": two classes of smooth Gaussian fields (d = side²).

    Class 0 (the condition) has a bright disc as its mean, class 1 a bright bar; both share a squared-exponential
    covariance (std 0.5, ``length_scale`` pixels) plus a little white noise. The denoiser is linear per class, so
    M = ∇_x Σ D_c is exact, and for the single-Gaussian condition it is ``(Σ + σ²I)⁻¹Σ𝟙``: a spatial map that goes
    from 0 (high noise) to 1 (low noise), lower at the borders where pixels have fewer correlated neighbours.
    """
    coords = torch.arange(side, dtype=dtype)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    points = torch.stack([yy.reshape(-1), xx.reshape(-1)], dim=-1)
    dist2 = ((points[:, None, :] - points[None, :, :]) ** 2).sum(-1)
    cov = 0.25 * torch.exp(-dist2 / (2 * length_scale**2)) + 0.01 * torch.eye(side * side, dtype=dtype)
    centre = (side - 1) / 2
    disc = (((yy - centre) ** 2 + (xx - centre) ** 2) < (side / 4) ** 2).to(dtype).reshape(-1) - 0.5
    bar = ((xx - centre).abs() < side / 8).to(dtype).reshape(-1) - 0.5

    def single(mean: Tensor) -> GaussianMixture:
        return GaussianMixture(torch.ones(1, dtype=dtype), mean[None], cov[None])

    cond, other = single(disc), single(bar)
    return ConditionalToy(cond=cond, uncond=mixture_of([cond, other], torch.tensor([0.5, 0.5], dtype=dtype)))
