"""REG factor M, estimators and the rectified output (reg_core.rectify), in float64."""

from __future__ import annotations

import math

import pytest
import torch
import toys

from reg_core import rectify, toy
from reg_core.rectify import Estimator

pytestmark = pytest.mark.usefixtures("float64")


def random_net(d: int, seed: int) -> torch.nn.Module:
    """A small random MLP R^d → R^d (not symmetric Jacobian, not batch-coupled)."""
    gen = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(d, 32), torch.nn.Tanh(), torch.nn.Linear(32, d))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return net


def test_m_equals_official_eps_formula_after_conversion_to_ve() -> None:
    """Paper/official code: M = 1 − √(1−ᾱ)·∇_{x_t} Σ ε_c in DDPM space equals ∇_x Σ D_c in ComfyUI's VE space."""
    d, sigma = 12, 1.7
    eps_net = random_net(d, 0)
    alpha_bar = 1 / (1 + sigma**2)
    x_ve = torch.randn(3, d, generator=torch.Generator().manual_seed(1))

    x_t = (x_ve / math.sqrt(1 + sigma**2)).requires_grad_(True)
    (g,) = torch.autograd.grad(eps_net(x_t).sum(), x_t)
    m_paper = 1 - math.sqrt(1 - alpha_bar) * g

    def denoise_ve(x: torch.Tensor) -> torch.Tensor:
        return x - sigma * eps_net(x / math.sqrt(1 + sigma**2))

    _, m = rectify.reg_factor_vjp(denoise_ve, x_ve, sigma)
    assert torch.allclose(m, m_paper, atol=1e-12, rtol=0)
    assert (m - 1).abs().max() > 1e-2  # a non-trivial M


def test_m_is_the_same_tensor_from_eps_x0_v_and_flow_parametrisations() -> None:
    """With x_t = a x0 + b ε, M = 1 − b∇Σε̂ = a∇Σx̂0 = a(a − b∇Σv̂) (a²+b²=1),
    and the same tensor through ComfyUI's VE and CONST routes."""
    d = 12
    net = random_net(d, 3)
    a, b = 0.6, 0.8  # VP coefficients, a² + b² = 1
    x_t = torch.randn(4, d, generator=torch.Generator().manual_seed(4))

    def eps(x: torch.Tensor) -> torch.Tensor:
        return net(x)

    def x0(x: torch.Tensor) -> torch.Tensor:
        return (x - b * eps(x)) / a

    def v(x: torch.Tensor) -> torch.Tensor:
        return a * eps(x) - b * x0(x)

    def colsum(f, x):
        leaf = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(leaf).sum(), leaf)
        return g

    m_eps = 1 - b * colsum(eps, x_t)
    m_x0 = a * colsum(x0, x_t)
    m_v = a * (a - b * colsum(v, x_t))

    sigma_ve = b / a  # VE: x = x_t / a, D = x̂0
    _, m_ve = rectify.reg_factor_vjp(lambda x: x0(a * x), x_t / a, sigma_ve)

    sigma_flow = sigma_ve / (1 + sigma_ve)  # CONST: x = (1−σ) x_VE
    x_flow = (1 - sigma_flow) * x_t / a
    _, m_flow = rectify.reg_factor_vjp(lambda x: x0(a * x / (1 - sigma_flow)), x_flow, sigma_flow, space=rectify.FLOW)

    for other in (m_x0, m_v, m_ve, m_flow):
        assert torch.allclose(other, m_eps, atol=1e-12, rtol=0)


def test_flow_guard_naive_velocity_formula_is_off_by_one_minus_sigma() -> None:
    """Copying the ε formula onto a velocity (1 − σ∇Σv) over-guides by 1/(1−σ)."""
    d, sigma = 6, 0.7
    net = random_net(d, 5)
    x = torch.randn(2, d, generator=torch.Generator().manual_seed(6))

    def velocity(z: torch.Tensor) -> torch.Tensor:
        return net(z)

    leaf = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(velocity(leaf).sum(), leaf)
    naive = 1 - sigma * g
    _, m = rectify.reg_factor_vjp(lambda z: z - sigma * velocity(z), x, sigma, space=rectify.FLOW)
    assert torch.allclose(m, (1 - sigma) * naive, atol=1e-12, rtol=0)


def test_affine_denoiser_gives_column_sums_and_chain_rule_exactly() -> None:
    """D(x) = Ax + c ⇒ M = Aᵀ𝟙 and the chain variant adds Aᵀδ."""
    gen = torch.Generator().manual_seed(7)
    a_mat, c = torch.randn(5, 5, generator=gen), torch.randn(5, generator=gen)
    x = torch.randn(2, 5, generator=gen)
    _, m = rectify.reg_factor_vjp(lambda z: z @ a_mat.T + c, x, 0.3)
    assert torch.allclose(m, a_mat.sum(0).expand(2, 5), atol=1e-13)

    delta = torch.randn(2, 5, generator=gen)
    d_c, leaf = rectify.denoise_with_graph(lambda z: z @ a_mat.T + c, x)
    assert torch.allclose(rectify.chain_product(d_c, leaf, delta), delta @ a_mat, atol=1e-13)


def test_batch_elements_are_independent() -> None:
    """The VJP of the batch sum is the stack of per-sample VJPs (no cross-talk)."""
    net = random_net(8, 8)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(9))
    sigma = torch.tensor([0.2, 0.5, 0.9])
    _, m = rectify.reg_factor_vjp(lambda z: z - net(z), x, sigma, space=rectify.FLOW)
    for i in range(3):
        _, mi = rectify.reg_factor_vjp(lambda z: z - net(z), x[i : i + 1], sigma[i : i + 1], space=rectify.FLOW)
        assert torch.allclose(m[i : i + 1], mi, atol=1e-14)


def test_strength_zero_is_plain_guidance_bit_for_bit_and_one_is_reg() -> None:
    gen = torch.Generator().manual_seed(10)
    d_c, d_g, m = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
    assert rectify.rectify(d_c, d_g, m, 0.0) is d_g
    assert torch.equal(rectify.rectify(d_c, d_g, m, 1.0), d_c + m * (d_g - d_c))
    # λ blends linearly between plain guidance and REG, and M ≡ 1 leaves guidance unchanged.
    half = rectify.rectify(d_c, d_g, m, 0.5)
    assert torch.allclose(half, 0.5 * d_g + 0.5 * (d_c + m * (d_g - d_c)), atol=1e-14)
    assert torch.allclose(rectify.rectify(d_c, d_g, torch.ones_like(m), 1.0), d_g, atol=1e-14)
    assert rectify.rectify_chain(d_c, d_g, m, torch.tensor(1.0), 0.0) is d_g


@pytest.mark.parametrize("strength", [0.5, 1.0, 2.0])
def test_chain_strength_blends_plain_guidance_with_the_chain_rule(strength: float) -> None:
    """chain at λ: ``(1−λ)·D_g + λ·(D_c + a·Jᵀδ)``, written out by hand for a per-batch factor ``a``."""
    gen = torch.Generator().manual_seed(12)
    d_c, d_g, jt_delta = (torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    factor = torch.tensor([0.3, 0.7], dtype=torch.float64).view(2, 1, 1, 1)
    want = (1 - strength) * d_g + strength * (d_c + factor * jt_delta)
    got = rectify.rectify_chain(d_c, d_g, jt_delta, factor, strength)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert not torch.allclose(got, d_g, atol=1e-3)


@pytest.mark.parametrize("flow", [False, True])
def test_gaussian_data_closed_form_m_goes_to_zero_at_high_noise(flow: bool) -> None:
    """Gaussian data N(μ, s²I): M = SNR·s²/(1+SNR·s²) (ideal denoiser); → 0 as noise grows, → 1 as it vanishes."""
    s2 = 0.3**2
    mixture = toy.GaussianMixture(torch.ones(1), torch.tensor([[0.4, -0.2, 0.1]]), s2 * torch.eye(3)[None])
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(11))
    sigmas = [0.01, 0.1, 0.5, 0.9, 0.99] if flow else [0.01, 0.1, 1.0, 10.0, 1000.0]
    ms = []
    for sigma in sigmas:
        if flow:
            denoise = toys.flow_denoiser(mixture)
            snr = (1 - sigma) ** 2 / sigma**2
        else:
            denoise = mixture.denoise
            snr = 1 / sigma**2
        _, m = rectify.reg_factor_vjp(lambda z, s=sigma, f=denoise: f(z, s), x, sigma, space=rectify.Space(flow=flow))
        expected = snr * s2 / (1 + snr * s2)
        assert torch.allclose(m, torch.full_like(m, expected), atol=1e-12)
        ms.append(expected)
    assert ms[0] > 0.99 and ms[-1] < 1e-4


@pytest.mark.parametrize("noise_scale", [1.0, 0.6, 2.5])
def test_flow_noise_scale_gives_m_the_ve_closed_form_at_its_edm_sigma(noise_scale: float) -> None:
    """A flow model with ``noise_scale`` s (x = (1−σ)x0 + sσε): for Gaussian data N(0, v) the ideal denoiser is linear,
    D = (1−σ)v/((1−σ)²v + s²σ²)·x, so M = (1−σ)∂D/∂x = v/(v + σ_VE²) with σ_VE = sσ/(1−σ), the VE closed form at
    the space's EDM σ; the finite-difference step follows the state's scale √((1−σ)²v' + s²σ²) (v' = 1)."""
    v = 0.3
    space = rectify.Space(flow=True, noise_scale=noise_scale)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(5))
    for sigma in (0.1, 0.5, 0.8):
        gain = (1 - sigma) * v / ((1 - sigma) ** 2 * v + (noise_scale * sigma) ** 2)
        _, m = rectify.reg_factor_vjp(lambda z, g=gain: g * z, x, sigma, space=space)
        ve = space.ve_sigma(sigma)
        assert ve == pytest.approx(noise_scale * sigma / (1 - sigma))
        assert torch.allclose(m, torch.full_like(m, v / (v + ve**2)), atol=1e-12)
        scale = float(space.state_scale(sigma, x))
        assert scale == pytest.approx(math.sqrt((1 - sigma) ** 2 + (noise_scale * sigma) ** 2))
    assert rectify.VE.ve_sigma(2.0) == 2.0 and space.ve_sigma(1.0) == math.inf


def test_gradient_free_matches_vjp_on_the_exact_gmm_denoiser() -> None:
    """The exact denoiser's Jacobian is symmetric, so J𝟙 = Jᵀ𝟙: the finite difference matches the VJP to O(h).

    Stated tolerance at the default relative step 1e-3 (float64, 2-D toy, |M| ≤ 1): mean |M_fd − M_vjp| ≤ 1e-3 and
    max ≤ 5e-3 (measured: mean 7e-5–6e-4, max 3e-6–3.3e-3 over σ ∈ [0.05, 3]).
    """
    t = toy.make_toy_2d()
    gen = torch.Generator().manual_seed(12)
    for sigma in (0.05, 0.3, 0.7, 3.0):
        x = t.cond.sample(400, gen) + sigma * torch.randn(400, 2, generator=gen)
        _, m_vjp = rectify.reg_factor_vjp(lambda z, s=sigma: t.cond.denoise(z, s), x, sigma)
        _, m_fd = rectify.reg_factor_fd(lambda z, s=sigma: t.cond.denoise(z, s), x, sigma)
        err = (m_fd - m_vjp).abs()
        assert err.mean() < 1e-3 and err.max() < 5e-3


def test_gradient_free_differs_from_vjp_on_a_non_symmetric_network() -> None:
    """On a random network J ≠ Jᵀ: the finite difference still equals the forward JVP J𝟙 (so it is computed right),
    but it differs from the paper's Jᵀ𝟙 by a large amount (relative error ≈ 1 here; 0.37–1.0 on the README's trained
    digits network)."""
    net = random_net(12, 13)
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(14))

    def denoise(z: torch.Tensor) -> torch.Tensor:
        return z - net(z)

    _, m_vjp = rectify.reg_factor_vjp(denoise, x, 0.5)
    _, m_fd = rectify.reg_factor_fd(denoise, x, 0.5, relative_step=1e-6)
    _, jvp = torch.func.jvp(denoise, (x,), (torch.ones_like(x),))
    assert torch.allclose(m_fd, jvp, atol=1e-5)
    relative = float((m_fd - m_vjp).norm() / (m_vjp - 1).norm().detach())
    assert relative > 0.3


def test_three_estimators_differ_in_general_and_coincide_in_one_dimension() -> None:
    """(Jᵀ𝟙)⊙δ, Jᵀδ and J𝟙⊙δ differ on a random MLP; in 1-D J is a scalar and all agree."""
    for d, should_agree in ((6, False), (1, True)):
        net = random_net(d, 15)
        x = torch.randn(4, d, generator=torch.Generator().manual_seed(16))
        delta = torch.randn(4, d, generator=torch.Generator().manual_seed(17))

        def denoise(z: torch.Tensor, net: torch.nn.Module = net) -> torch.Tensor:
            return z - net(z)

        _, m_vjp = rectify.reg_factor_vjp(denoise, x, 0.5)
        _, m_fd = rectify.reg_factor_fd(denoise, x, 0.5, relative_step=1e-7)
        d_c, leaf = rectify.denoise_with_graph(denoise, x)
        chain = rectify.chain_product(d_c, leaf, delta)
        outputs = [m_vjp * delta, m_fd * delta, chain]
        agree = all(torch.allclose(o, outputs[0], atol=1e-5) for o in outputs[1:])
        assert agree is should_agree


def test_estimator_names_are_the_node_options() -> None:
    assert [e.value for e in Estimator] == ["vjp", "vjp-low-memory", "gradient-free", "chain"]


def test_weighted_column_sums_are_the_masked_samplers_jacobian() -> None:
    """With a denoise mask w the sampler's denoiser is D_eff(x) = w ⊙ D(w ⊙ x + (1 − w) ⊙ c) + (1 − w) ⊙ c0, whose
    column sums are w ⊙ Jᵀw: exactly ``w * column_sums(D, x', w)`` at the masked input x'."""
    d = 7
    net = random_net(d, 3)
    gen = torch.Generator().manual_seed(4)
    x, c = torch.randn(2, d, generator=gen), torch.randn(2, d, generator=gen)
    w = torch.rand(2, d, generator=gen)

    def effective(z: torch.Tensor) -> torch.Tensor:
        return w * net(w * z + (1 - w) * c) + (1 - w) * c

    _, want = rectify.reg_factor_vjp(effective, x, 0.5)
    leaf = (w * x + (1 - w) * c).requires_grad_(True)
    got = w * rectify.column_sums(net(leaf), leaf, w)
    assert torch.allclose(got, want, atol=1e-12)
    assert not torch.allclose(got, rectify.column_sums(net(leaf), leaf))  # the unweighted sums differ
