"""reg_core.diagnostics: per-step statistics, map pooling and rendering."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from reg_core import demo, diagnostics
from reg_core.plots import diagnostics as diagnostic_plots


def test_statistics_per_sample_against_direct_formulas() -> None:
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64) * 0.8 + 0.7
    delta = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    stats = diagnostics.step_statistics(m, delta, m * delta)
    for b in range(2):
        flat = m[b].flatten().float()
        assert math.isclose(float(stats["mean"][b]), float(flat.mean()), rel_tol=1e-6)
        assert math.isclose(float(stats["p50"][b]), float(flat.quantile(0.5)), rel_tol=1e-6)
        assert math.isclose(float(stats["frac_neg"][b]), float((flat < -1e-3).float().mean()), rel_tol=1e-6)
        assert math.isclose(float(stats["frac_gt1"][b]), float((flat > 1.001).float().mean()), rel_tol=1e-6)
        ratio = float((m[b] * delta[b]).norm() / delta[b].norm())
        assert math.isclose(float(stats["norm_ratio"][b]), ratio, rel_tol=1e-5)


def test_rounding_noise_is_not_counted_and_zero_guidance_has_no_ratio() -> None:
    m = torch.ones(1, 1, 4, 4) + 1e-7
    stats = diagnostics.step_statistics(m, torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))
    assert float(stats["frac_gt1"][0]) == 0.0
    assert math.isnan(float(stats["norm_ratio"][0]))
    chain = diagnostics.step_statistics(None, torch.ones(1, 1, 4, 4), 0.5 * torch.ones(1, 1, 4, 4))
    assert math.isnan(float(chain["mean"][0])) and float(chain["norm_ratio"][0]) == 0.5


def test_maps_are_pooled_to_a_bounded_size_and_video_frames_averaged() -> None:
    m = torch.arange(2 * 4 * 96 * 64, dtype=torch.float32).reshape(2, 4, 96, 64)
    pooled = diagnostics.downsample_map(m)
    assert pooled.shape == (2, 4, 48, 32)
    assert torch.allclose(pooled[0, 0, 0, 0], m[0, 0, :2, :2].mean())
    video = torch.ones(1, 16, 3, 10, 10) * torch.tensor([1.0, 2.0, 3.0]).reshape(1, 1, 3, 1, 1)
    assert torch.allclose(diagnostics.downsample_map(video), torch.full((1, 16, 10, 10), 2.0))


def test_image_toy_record_goes_from_no_guidance_to_cfg_and_renders() -> None:
    record = demo.image_toy_record(3.0, 6, torch.Generator().manual_seed(1))
    means = [float(step.stats["mean"][0]) for step in record.steps]
    assert means[0] < 0.05 and means[-1] > 0.99  # M → 0 at high noise, → 1 at low noise (M = SNR·Cov[x0|x]·1)
    assert all(a <= b + 1e-9 for a, b in itertools.pairwise(means))
    shown = diagnostics.pick_steps(record, 3)
    assert shown == [0, 2, 5]
    image = demo.diagnostics_figure(record)
    assert image.width > 500 and image.height > 800
    assert record.to_dict()["steps"][0]["sigma"] == [20.0, 20.0]


def test_percentiles_of_large_maps_come_from_a_bounded_strided_sample() -> None:
    m = torch.linspace(0, 1, 4 * 128 * 128).reshape(1, 4, 128, 128)
    stats = diagnostics.step_statistics(m, torch.ones_like(m), m)
    # 65,536 elements, stride 4: the strided sample of a ramp has the same percentiles to within the stride.
    assert abs(float(stats["p50"][0]) - 0.5) < 1e-4 and abs(float(stats["p95"][0]) - 0.95) < 1e-4
    assert abs(float(stats["mean"][0]) - 0.5) < 1e-6  # the mean stays exact


def test_video_statistics_span_every_frame_and_maps_average_the_frames() -> None:
    gen = torch.Generator().manual_seed(3)
    m = torch.randn(2, 16, 3, 6, 10, generator=gen, dtype=torch.float64) + 0.8  # [B, C, T, H, W]
    delta = torch.randn(2, 16, 3, 6, 10, generator=gen, dtype=torch.float64)
    stats = diagnostics.step_statistics(m, delta, m * delta)
    for b in range(2):
        assert math.isclose(float(stats["mean"][b]), float(m[b].mean()), rel_tol=1e-6)
        assert math.isclose(float(stats["frac_neg"][b]), float((m[b] < -1e-3).double().mean()), rel_tol=1e-6)
        want = float((m[b] * delta[b]).norm() / delta[b].norm())
        assert math.isclose(float(stats["norm_ratio"][b]), want, rel_tol=1e-5)
    pooled = diagnostics.downsample_map(m)
    assert pooled.shape == (2, 16, 6, 10)
    assert torch.allclose(pooled, m.float().mean(2))
    record = diagnostics.RunRecord(0.0, 1.0, True, "vjp")
    record.steps.append(diagnostics.StepRecord(torch.ones(2), True, stats, pooled))
    image = diagnostic_plots.render_maps(record, [0], sample=1, cell=100)
    assert image.height == 60 + 2 * 10 + 34  # one heatmap at the 6 × 10 aspect ratio, 100 wide


def test_latent_key_identifies_values_and_shape_not_device_or_layout() -> None:
    x = torch.arange(24.0).reshape(1, 2, 3, 4)
    assert diagnostics.latent_key(x) == diagnostics.latent_key(x.double().transpose(2, 3).contiguous().transpose(2, 3))
    assert diagnostics.latent_key(x) != diagnostics.latent_key(x.reshape(1, 2, 4, 3))
    y = x.clone()
    y[0, 1, 2, 3] += 1e-6
    assert diagnostics.latent_key(x) != diagnostics.latent_key(y)


def test_latent_key_in_a_storage_dtype_matches_the_stored_latent() -> None:
    """A sampler node may hand its float32 output on in float16 (ComfyUI's --fp16-intermediates): keyed in that
    dtype, the output and the stored latent are the same run; keyed in float32 they are not."""
    x = torch.linspace(-3, 3, 24, dtype=torch.float32).reshape(1, 2, 3, 4) / 7
    stored = x.half()
    assert diagnostics.latent_key(x, torch.float16) == diagnostics.latent_key(stored, torch.float16)
    assert diagnostics.latent_key(x) != diagnostics.latent_key(stored)


def test_latents_are_checked_by_rank_and_nested_ones_refused() -> None:
    diagnostics.check_latent(torch.zeros(1, 4, 8, 8), "latent")
    diagnostics.check_latent(torch.zeros(1, 16, 2, 8, 8), "latent")
    nested = torch.nested.nested_tensor([torch.zeros(16, 2, 8, 8), torch.zeros(16, 3, 8, 8)])
    with pytest.raises(diagnostics.UnsupportedLatentError, match=r"^latent_image: nested latents"):
        diagnostics.check_latent(nested, "latent_image")
    with pytest.raises(diagnostics.UnsupportedLatentError, match=r"latent: expected an image latent .* \(1, 8, 5\)"):
        diagnostics.check_latent(torch.zeros(1, 8, 5), "latent")


def test_a_run_without_rectification_renders_a_message() -> None:
    record = diagnostics.RunRecord(0.1, 5.0, False, "vjp")
    record.steps += [diagnostics.StepRecord(torch.full((1,), s), False) for s in (14.6, 3.0)]
    record.skipped.update(["strength is 0", "strength is 0"])
    note = diagnostics.inactive_note(record)
    assert note == "REG did not act in this run (2 model evaluations): strength is 0 (2)."
    image = np.asarray(diagnostic_plots.render_inactive(record))
    assert image.shape[1] == 720 and (image < 128).any() and (image == 255).mean() > 0.8
