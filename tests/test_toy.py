"""The exact Gaussian-mixture toys: denoisers, optimal guidance, samplers, distances and the demo."""

from __future__ import annotations

import math

import pytest
import torch
import toys

from reg_core import demo, toy

pytestmark = pytest.mark.usefixtures("float64")


def test_denoiser_is_tweedie_posterior_mean() -> None:
    """D(x, σ) = x + σ²∇ log p_σ(x) (Tweedie) for the closed-form mixture denoiser."""
    t = toy.make_toy_2d()
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    for sigma in (0.1, 0.8, 3.0):
        leaf = x.clone().requires_grad_(True)
        (score,) = torch.autograd.grad(t.uncond.log_prob(leaf, sigma).sum(), leaf)
        assert torch.allclose(t.uncond.denoise(x, sigma), x + sigma**2 * score, atol=1e-12)


def test_denoiser_jacobian_is_symmetric() -> None:
    t = toy.make_toy_2d()
    x = torch.tensor([[0.1, 0.3]])
    jac = torch.autograd.functional.jacobian(lambda z: t.cond.denoise(z, 0.6), x)[0, :, 0, :]
    assert torch.allclose(jac, jac.T, atol=1e-12)


def test_flow_denoiser_matches_ve_denoiser_through_the_change_of_variables() -> None:
    t = toy.make_toy_2d()
    x_ve = torch.randn(10, 2, generator=torch.Generator().manual_seed(1))
    x_flow, sigma_flow = toys.to_flow(x_ve, 1.5)
    assert sigma_flow == pytest.approx(0.6)
    assert torch.allclose(toys.flow_denoiser(t.cond)(x_flow, sigma_flow), t.cond.denoise(x_ve, 1.5), atol=1e-12)


def test_gauss_hermite_integrates_polynomials_exactly() -> None:
    z, omega = toy.gauss_hermite(6, 2)
    assert float(omega.sum()) == pytest.approx(1.0, abs=1e-13)
    assert float((omega * z[:, 0] ** 2).sum()) == pytest.approx(1.0, abs=1e-12)
    assert float((omega * z[:, 0] ** 2 * z[:, 1] ** 4).sum()) == pytest.approx(3.0, abs=1e-11)


def test_expected_reward_matches_dense_grid_integration_in_1d() -> None:
    """log E_σ(x) = log ∫ p(x0|y) N(x; x0, σ²) R_0 dx0 − log p_σ(x|y), integrated on a dense grid."""
    t = toys.make_toy_1d()
    grid = torch.linspace(-4, 4, 40001)[:, None]
    dx = float(grid[1, 0] - grid[0, 0])
    x = torch.tensor([[0.2], [1.0], [1.7]])
    for sigma, w in ((0.3, 1.0), (1.2, 3.0)):
        log_num = t.cond.log_prob(grid) + t.log_reward(grid, w)
        kernel = -0.5 * ((x - grid.T) / sigma) ** 2 - math.log(sigma * math.sqrt(2 * math.pi))
        log_e_grid = torch.logsumexp(log_num[None, :] + kernel, dim=1) + math.log(dx) - t.cond.log_prob(x, sigma)
        log_e = toy.log_expected_reward(t, x, sigma, w, order=24)
        assert torch.allclose(log_e, log_e_grid, atol=2e-4)


def test_optimal_guidance_vanishes_without_reward() -> None:
    t = toy.make_toy_2d()
    x = torch.randn(20, 2, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(toy.optimal_denoiser(t, x, 0.7, 0.0), t.cond.denoise(x, 0.7), atol=1e-12)


def test_reg_is_closer_to_the_optimum_than_cfg_at_every_noise_level() -> None:
    """The toy result (CONTRIBUTING.md, exact toy): REG's guidance term is closer to σ²∇log E than CFG's, at every σ."""
    t = toy.make_toy_2d()
    rows = demo.guidance_errors(t, 3.0, 300, torch.Generator().manual_seed(3))
    for row in rows:
        assert row["reg"] < row["cfg"], row
    assert sum(r["cfg"] for r in rows) / sum(r["reg"] for r in rows) > 2.0


def test_samplers_reach_the_tilted_target_and_reg_beats_cfg() -> None:
    t = toy.make_toy_2d()
    gen = torch.Generator().manual_seed(4)
    samples = demo.run_samplers(t, 3.0, 400, 10, gen)
    swgen = torch.Generator().manual_seed(5)
    dist = {k: toy.sliced_wasserstein(v, samples["target"], swgen) for k, v in samples.items() if k != "target"}
    floor = dist["target (2nd draw)"]
    assert dist["optimal"] < 2 * floor
    assert dist["REG"] < dist["CFG"]
    assert abs(dist["REG (gradient-free)"] - dist["REG"]) < 0.01


def test_tilted_sampler_moments_1d() -> None:
    t = toys.make_toy_1d()
    draws = toy.sample_tilted(t, 2.0, 200000, torch.Generator().manual_seed(6))
    grid = torch.linspace(-4, 4, 20001)[:, None]
    p = torch.softmax(t.tilted_log_density(grid, 2.0), 0)
    assert float(draws.mean()) == pytest.approx(float((p * grid[:, 0]).sum()), abs=5e-3)


def test_sliced_wasserstein_of_a_shift_is_the_projected_shift() -> None:
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(500, 2, generator=gen)
    assert toy.sliced_wasserstein(a, a.clone(), gen) == 0.0
    # Shifting by (1, 0): every projection moves by cos θ; E[cos² θ] = 1/2 for uniform directions.
    sw = toy.sliced_wasserstein(a, a + torch.tensor([1.0, 0.0]), gen, projections=20000)
    assert sw == pytest.approx(math.sqrt(0.5), abs=0.01)
    with pytest.raises(ValueError, match="same shape"):
        toy.sliced_wasserstein(a, a[:10], gen)


def test_demo_writes_its_figures_where_told(tmp_path, monkeypatch) -> None:
    out, diagnostics_out = tmp_path / "toy.png", tmp_path / "diagnostics.png"
    monkeypatch.chdir(tmp_path)  # a default path would land here, and be caught below
    args = ["--points", "120", "--steps", "4", "--out", str(out), "--diagnostics-out", str(diagnostics_out)]
    assert demo.main(args) == 0
    from PIL import Image

    with Image.open(out) as image:
        assert image.size[0] > 1000 and image.size[1] > 600
    with Image.open(diagnostics_out) as image:
        assert image.size[0] > 500 and image.size[1] > 800
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diagnostics.png", "toy.png"]  # nothing else written
