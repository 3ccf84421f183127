"""REG on a network that learned real data: bench/digits.py's SD3 MMDiT, trained on scikit-learn's 8×8 digits.

The network is trained once (``digits.TEST_RECIPE``: 600 steps, 40 s on 2 busy CPU cores) and cached outside the
repository under ``${REG_CACHE:-~/.cache/reg-guidance}/trained/``, so later sessions and the other ComfyUI version load
it in a second. It is loaded by ``comfy.sd.load_diffusion_model`` (detected as SD3) and sampled by
``comfy.sample.sample`` with the REGGuidance node, as a workflow would. Each test checks the pack against an
independent computation through ComfyUI's own model (``BaseModel.apply_model`` with autograd).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from bench import digits

CFG = 4.0
SEED = 3
REG = {"strength": 1.0, "estimator": "vjp", "start_percent": 0.0, "end_percent": 1.0, "refresh_every": 1}


@pytest.fixture(scope="module")
def trained(reg_pack) -> Iterator[digits.Trained]:
    """The network, and torch on one thread for this module (bench/digits.py ``one_thread``: far faster on a busy
    machine for a network this small)."""
    found = digits.digits_file()
    if found is None or not found.is_file():
        pytest.skip("scikit-learn's digits.csv.gz not found (./dev test creates .venv with it; or set REG_DIGITS)")
    with digits.one_thread():
        yield digits.load(digits.TEST_RECIPE)


@pytest.fixture(scope="module")
def data() -> digits.Digits:
    return digits.load_digits(digits.TEST_RECIPE.seed)


def with_reg(model):
    import nodes

    return nodes.NODE_CLASS_MAPPINGS["REGGuidance"].execute(model, **REG).result[0]


def sample(model, trained, labels, latent, *, steps, denoise=1.0, callback=None):
    """KSampler's path (``comfy.sample.sample``: euler, simple) at cfg :data:`CFG` from the noise of :data:`SEED`."""
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, SEED)
    positive, negative = trained.positive(labels), trained.negative(len(labels))
    with torch.inference_mode():
        return comfy.sample.sample(
            model, noise, steps, CFG, "euler", "simple", positive, negative, latent,
            denoise=denoise, seed=SEED, callback=callback, disable_pbar=True,
        )  # fmt: skip


def denoiser(model, trained, labels):
    """``D(x, σ)`` of ``labels`` (row 10: no class) straight from ComfyUI's model, no sampler, no REG."""
    context, pooled = trained.embed(labels)

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return model.model.apply_model(x, torch.full((len(x),), sigma), c_crossattn=context, y=pooled)

    return denoise


def exact_m(denoise, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``a(σ)·∇_x Σ D_c`` by autograd (flow: ``a = 1 − σ``)."""
    leaf = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(denoise(leaf, sigma).sum(), leaf)
    return (1 - sigma) * grad


def test_network_is_detected_and_has_learned_the_digits(trained):
    assert type(trained.model.model.model_config).__name__ == "SD3"
    assert trained.info["recipe"]["steps"] == digits.TEST_RECIPE.steps
    assert trained.info["final_loss"] < 0.6  # at initialisation D(x) = x, whose loss E‖ε − x₀‖² is about 1.7


def test_one_step_equals_the_reg_formula_on_the_trained_network(trained, data):
    """Image-to-image from noised held-out digits (one per class), one step to σ = 0 at the last σ of a 10-step
    schedule: the sampler's result is the rectified prediction ``D_c + M ⊙ (D_cfg − D_c)`` itself."""
    import comfy.sample
    import comfy.samplers

    base = trained.model.model
    pick = torch.stack([torch.nonzero(data.y_test == c)[0, 0] for c in range(10)])
    labels, start = data.y_test[pick], trained.to_comfy(data.x_test[pick])
    got = sample(with_reg(trained.model), trained, labels, start, steps=1, denoise=0.1)
    plain = sample(trained.model, trained, labels, start, steps=1, denoise=0.1)

    sigma = float(comfy.samplers.calculate_sigmas(base.model_sampling, "simple", 10)[-2])
    noise = comfy.sample.prepare_noise(start, SEED)
    x = sigma * noise + (1 - sigma) * base.latent_format.process_in(start)
    cond = denoiser(trained.model, trained, labels)
    uncond = denoiser(trained.model, trained, torch.full((10,), digits.NULL_CLASS))
    m = exact_m(cond, x, sigma)
    with torch.no_grad():
        d_c, d_u = cond(x, sigma), uncond(x, sigma)
    want = base.latent_format.process_out(d_c + m * (d_u + CFG * (d_c - d_u) - d_c))
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-4 * scale
    assert float((got - plain).abs().max()) > 1e-2 * scale  # REG changed the result
    assert 0.2 < float(m.mean()) < 0.8  # σ ≈ 0.25: M is neither 0 nor 1


def m_along_a_run(model, trained, reg_pack) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
    """``(σ, the M REG used, autograd's M)`` at every step of a 10-step run (2 samples per class), σ < 1."""
    labels = torch.arange(10).repeat_interleave(2)
    states = []
    reg = with_reg(model)
    out = sample(reg, trained, labels, torch.zeros(20, *digits.LATENT_SHAPE), steps=10,
                 callback=lambda i, x0, x, n: states.append(x.clone()))  # fmt: skip
    record = reg_pack.submodule("nodes.diagnostics").find_patch(reg, None).record_for(out)
    cond = denoiser(model, trained, labels)
    rows = []
    for step, x in zip(record.steps, states, strict=True):
        sigma = float(step.sigma.flatten()[0])
        if sigma < 1:
            rows.append((sigma, step.m_map.clone(), exact_m(cond, x, sigma)))
    return rows


def random_weights(trained):
    """The same SD3 network with random weights (tests/integration/tiny_models.py's rule), loaded the same way."""
    import comfy.sd
    import tiny_models

    shapes = {k: v.shape for k, v in trained.model.model.diffusion_model.state_dict().items()}
    return comfy.sd.load_diffusion_model_state_dict(tiny_models.randomise(shapes, 5))


def test_m_reflects_what_the_network_learned(trained, data, reg_pack):
    """The M REG used (its diagnostics record) equals autograd's along a whole run, and shows what training taught
    the network, which the same network with random weights does not show: the column sums ``M / a(σ)`` rise from
    near 0 at high noise (the denoiser barely follows its input there) towards 1, and M stays near 0 on the pixels
    that are blank in every training digit (the denoiser ignores them)."""
    blank = digits.to_latent(data.x_train).std(0) < 0.05
    assert 8 <= int(blank.sum()) <= 16  # the digits' empty border columns

    def learned(model) -> tuple[list[float], float]:
        rows = m_along_a_run(model, trained, reg_pack)
        for _, used, exact in rows:
            assert float((used - exact).abs().max()) <= 1e-5
        column_sums = [float(exact.mean()) / (1 - sigma) for sigma, _, exact in rows]
        low = [exact for sigma, _, exact in rows if sigma <= 0.6]
        blank_ratio = sum(float(m[:, blank].mean()) / float(m[:, ~blank].mean()) for m in low) / len(low)
        return column_sums, blank_ratio

    sums, ratio = learned(trained.model)
    assert sums[0] < 0.3 and sums[-1] > 0.5 and sums[-1] - sums[0] > 0.4
    assert ratio < 0.4
    random_sums, random_ratio = learned(random_weights(trained))
    assert all(0.8 < s < 1.3 for s in random_sums)
    assert random_ratio > 0.7
