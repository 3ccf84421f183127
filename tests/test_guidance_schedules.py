"""Guidance combiners (CFG, APG, reference guidance) and the paper's schedules."""

from __future__ import annotations

import math

import pytest
import torch

from reg_core import guidance, schedules
from reg_core.schedules import Progress, Schedule

pytestmark = pytest.mark.usefixtures("float64")


def tensors(seed: int, n: int = 2, shape: tuple[int, ...] = (2, 4, 6, 6)) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(n)]


def comfy_apg_reference(cond, uncond, cond_scale, sigma, state, eta, norm_threshold, momentum):
    """ComfyUI 0.3.64 comfy_extras/nodes_apg.py pre-cfg maths, written out independently for 4-D latents."""
    if state["prev"] is not None and sigma > state["prev"]:
        state["avg"] = 0
    state["prev"] = sigma
    g = cond - uncond
    if momentum != 0:
        state["avg"] = g if not torch.is_tensor(state["avg"]) else momentum * state["avg"] + g
        g = state["avg"]
    if norm_threshold > 0:
        norm = g.norm(p=2, dim=[-1, -2, -3], keepdim=True)
        g = g * torch.minimum(torch.ones_like(norm), norm_threshold / norm)
    unit = torch.nn.functional.normalize(cond, dim=[-1, -2, -3])
    par = (g * unit).sum(dim=[-1, -2, -3], keepdim=True) * unit
    g = (g - par) + eta * par
    modified = uncond + g + (cond - uncond) / cond_scale
    return uncond + (modified - uncond) * cond_scale


def test_cfg_is_comfyui_formula() -> None:
    d_c, d_u = tensors(0)
    assert torch.equal(guidance.cfg(d_c, d_u, 7.0), d_u + (d_c - d_u) * 7.0)
    assert torch.equal(guidance.cfg(d_c, d_u, 1.0), d_u + (d_c - d_u))


def test_apg_neutral_settings_equal_cfg_at_scale_plus_one() -> None:
    d_c, d_u = tensors(1)
    apg = guidance.APG(eta=1.0, norm_threshold=0.0, momentum=0.0)
    s = 4.5
    via_comfy_path = guidance.cfg(*apg.pre_cfg(d_c, d_u, s, 1.0), s)
    assert torch.allclose(via_comfy_path, guidance.cfg(d_c, d_u, s + 1), atol=1e-12)
    assert torch.allclose(d_c + s * apg.guidance(d_c, d_u, 0.9), guidance.cfg(d_c, d_u, s + 1), atol=1e-12)


@pytest.mark.parametrize("scale", [0.0, 1.0, -1.0, 2.5])
def test_apg_pre_cfg_pair_gives_apg_at_every_scale_including_zero(scale: float) -> None:
    d_c, d_u = tensors(2)
    apg = guidance.APG(eta=0.4, norm_threshold=3.0, momentum=0.0)
    got = guidance.cfg(*apg.pre_cfg(d_c, d_u, scale, 1.0), scale)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, d_c + scale * apg.guidance(d_c, d_u, 1.0), atol=1e-12)
    if scale == 0:
        assert torch.equal(got, d_c)  # APG at scale 0 is the conditional prediction, exactly
    else:  # ComfyUI's maths (which divides by the scale), written out independently
        want = comfy_apg_reference(d_c, d_u, scale, 1.0, {"avg": 0, "prev": None}, 0.4, 3.0, 0.0)
        assert torch.allclose(got, want, atol=1e-12)


@pytest.mark.parametrize(("eta", "tau", "momentum"), [(0.0, 5.0, 0.0), (0.3, 2.0, -0.5), (1.0, 0.0, 0.7)])
def test_apg_matches_comfyui_semantics_over_a_run(eta: float, tau: float, momentum: float) -> None:
    apg = guidance.APG(eta=eta, norm_threshold=tau, momentum=momentum)
    state = {"avg": 0, "prev": None}
    sigmas = [14.6, 7.0, 3.0, 1.0, 14.6, 5.0]  # σ rises once: both reset momentum
    for i, sigma in enumerate(sigmas):
        d_c, d_u = tensors(10 + i)
        ours = guidance.cfg(*apg.pre_cfg(d_c, d_u, 3.0, sigma), 3.0)
        ref = comfy_apg_reference(d_c, d_u, 3.0, sigma, state, eta, tau, momentum)
        assert torch.allclose(ours, ref, atol=1e-12)


def test_apg_momentum_state_resets_between_runs() -> None:
    apg = guidance.APG(eta=0.5, norm_threshold=0.0, momentum=0.8)
    steps = [(s, *tensors(20 + i)) for i, s in enumerate([5.0, 2.0, 1.0])]
    first = [apg.guidance(c, u, s) for s, c, u in steps]
    assert apg.state.running is not None
    apg.state.reset()
    second = [apg.guidance(c, u, s) for s, c, u in steps]
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    # Without a reset the momentum would carry over and change the first step of the next run.
    carried = apg.guidance(steps[0][1], steps[0][2], 0.5)
    assert not torch.allclose(carried, first[0])


def test_apg_norms_are_per_sample_over_all_non_batch_dims_for_video() -> None:
    d_c, d_u = tensors(30, shape=(2, 4, 3, 5, 5))
    apg = guidance.APG(eta=1.0, norm_threshold=1.0, momentum=0.0)
    g = apg.guidance(d_c, d_u, 1.0)
    norms = g.flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.ones(2), atol=1e-12)  # clipped to τ = 1 per sample


def test_reference_guidance_form() -> None:
    d, d_c, d_ref = tensors(40, 3)
    assert torch.equal(guidance.reference_guidance(d, d_c, d_ref, 0.0), d)
    assert torch.allclose(guidance.reference_guidance(d, d_c, d_ref, 2.0), d + 2 * (d_c - d_ref))


def test_schedule_end_points() -> None:
    w = 6.0
    assert schedules.cosine_weight(w, 0.0, 1.0) == 0.0
    assert schedules.cosine_weight(w, 1.0, 1.0) == pytest.approx(w)
    assert schedules.cosine_weight(w, 0.5, 1.0) == pytest.approx(w / 2)
    assert schedules.cosine_weight(w, 0.5, 2.0) == pytest.approx(0.5 * w * (1 - math.cos(math.pi * 0.25)))
    assert schedules.linear_weight(w, 1.0, 0.0) == w and schedules.linear_weight(w, 1.0, 1.0) == 1.0
    assert schedules.interval_weight(w, 1.0, 0.28, 2.9) == w
    assert schedules.interval_weight(w, 0.28, 0.28, 2.9) == w and schedules.interval_weight(w, 2.9, 0.28, 2.9) == w
    assert schedules.interval_weight(w, 3.0, 0.28, 2.9) == 0.0 and schedules.interval_weight(w, 0.2, 0.28, 2.9) == 0.0


def test_progress_definitions() -> None:
    sample_sigmas = [14.6, 7.0, 3.0, 1.0, 0.0]
    assert schedules.step_progress(14.6, sample_sigmas) == 0.0
    assert schedules.step_progress(1.0, sample_sigmas) == 1.0
    assert schedules.step_progress(3.0, sample_sigmas) == pytest.approx(2 / 3)
    assert schedules.step_progress(5.0, [5.0, 0.0]) == 0.0
    assert schedules.sigma_progress(80.0, 80.0) == 0.0 and schedules.sigma_progress(0.0, 80.0) == 1.0
    with pytest.raises(ValueError, match="sigma_max"):
        schedules.sigma_progress(1.0, 0.0)
    assert [p.value for p in Progress] == ["steps", "sigma"]


def test_scheduled_weight_dispatch() -> None:
    kw = {"sigma": 1.0, "progress": 0.25, "w_end": 2.0, "exponent": 1.0}
    assert schedules.scheduled_weight(Schedule.CONSTANT, 5.0, **kw) == 5.0
    assert schedules.scheduled_weight(Schedule.INTERVAL, 5.0, **kw) == 5.0
    assert schedules.scheduled_weight(Schedule.INTERVAL, 5.0, **{**kw, "sigma": 10.0}) == 0.0
    assert schedules.scheduled_weight(Schedule.LINEAR, 5.0, **kw) == pytest.approx(5.0 - 3.0 * 0.25)
    assert schedules.scheduled_weight(Schedule.COSINE, 5.0, **kw) == pytest.approx(2.5 * (1 - math.cos(math.pi / 4)))
