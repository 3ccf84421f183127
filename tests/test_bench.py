"""The benchmark helpers measure what they claim (bench/benchlib.py, bench/quality.py); nothing here is timed."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from bench import quality
from bench.benchlib import (
    MIB,
    Measurement,
    PeakMemory,
    RunStats,
    bracketed,
    fresh_evaluations,
    interleaved,
    rss_bytes,
    same_kind_growth,
    saved_tensor_bytes,
    tensor_memory,
)
from reg_core import toy


def test_saved_tensor_bytes_counts_activations_and_skips_frozen_weights() -> None:
    """A frozen linear layer saves only its weight (excluded); ``tanh`` saves its output: 3x8 floats. With the weight
    trainable, autograd must also keep the layer's input for the weight gradient: 3x4 floats more."""
    layer = nn.Linear(4, 8)
    layer.requires_grad_(False)
    x = torch.randn(3, 4, requires_grad=True)
    with saved_tensor_bytes(exclude=layer.parameters()) as saved:
        torch.tanh(layer(x))
    assert saved.bytes == 3 * 8 * 4
    layer.requires_grad_(True)
    with saved_tensor_bytes(exclude=layer.parameters()) as saved:
        torch.tanh(layer(x))
    assert saved.bytes == 3 * 8 * 4 + 3 * 4 * 4


def test_tensor_memory_traces_live_bytes_and_peaks_exactly() -> None:
    with tensor_memory() as rec:
        start = rec.mark()
        a = torch.empty(2**20)  # 4 MiB
        after_a = rec.mark()
        b = a * 2  # another 4 MiB while a is alive
        del a
        after_b = rec.mark()
        del b
        end = rec.mark()
    trace = rec.trace
    assert [trace.at(m) for m in (start, after_a, after_b, end)] == [0, 4 * MIB, 4 * MIB, 0]
    assert 8 * MIB <= trace.peak(start, end) < 8 * MIB + 1024  # (plus the scalar 2, wrapped as a tensor)
    assert trace.peak(after_b, end) == 0


def test_peak_memory_keeps_a_freed_allocation_and_forgets_what_came_before_start() -> None:
    """Written to hold on a loaded machine whose kernel may reclaim cold pages at any time (which only lowers RSS):
    the high-water mark covers the RSS seen while a 64 MiB block lived, the block's pages leave on ``del`` (large
    blocks are ``mmap``ed), and a 256 MiB block freed before :meth:`PeakMemory.start` is not in the new peak."""
    memory = PeakMemory()
    if not memory.available:
        pytest.skip("no resettable RSS high-water mark (/proc/self/clear_refs) on this system")
    earlier = torch.ones(256 * MIB // 4)
    del earlier
    memory.start()
    block = torch.ones(64 * MIB // 4)  # every page touched
    during = rss_bytes()
    del block
    after = rss_bytes()
    assert during - after >= 48 * MIB
    # the kernel syncs per-thread RSS counters lazily (every few dozen page faults): allow 1 MiB of slack
    assert during - MIB <= memory.peak() < during + 128 * MIB


def test_growth_compares_steps_of_the_same_kind() -> None:
    assert fresh_evaluations(6, 2) == [True, False, True, False, True, False]
    assert fresh_evaluations(5, 4) == [True, False, False, False, True]
    # refresh_every = 2: fresh steps need more memory than reused ones; that pattern is not growth
    assert same_kind_growth([0, 5, 9, 5, 9], 2) == 0
    # a leak of 1 per step shows in both kinds
    assert same_kind_growth([0, 5, 10, 7, 12], 2) == 1
    assert same_kind_growth([3, 4, 5, 6], 1) == 1


def test_interleaved_runs_every_configuration_once_per_repeat_in_rotating_positions() -> None:
    order = interleaved(["A", "B", "C"], 3)
    assert [name for r, name in order if r == 1] == ["B", "C", "A"]
    for name in "ABC":
        positions = {[n for r2, n in order if r2 == r].index(name) for r in range(3)}
        assert positions == {0, 1, 2}


def test_bracketed_order_and_ratios_use_the_neighbouring_reference_runs() -> None:
    order = [name for _, name in bracketed(["R", "A", "B"], "R", 2)]
    assert order == ["R", "A", "R", "B", "R", "B", "R", "A", "R"]

    def run(seconds: float) -> RunStats:
        return RunStats(step_seconds=[seconds] * 3, peak_extra=0, step_rss=[0] * 3, rss_after=0)

    # the machine halves its speed half-way; A always costs 1.5 CFG, B 2 CFG
    speed = [1, 1, 1, 1, 2, 2, 2, 2, 2]
    cost = {"R": 1.0, "A": 1.5, "B": 2.0}
    runs: dict[str, list[RunStats]] = {"R": [], "A": [], "B": []}
    for name, slow in zip(order, speed, strict=True):
        runs[name].append(run(cost[name] * slow))
    m = Measurement("toy", 32, 3, ["R", "A", "B"], runs, [0] * 9, False, reference="R", sequence=order)
    assert m.ratios("A") == [1.5, 1.5]
    assert m.ratios("B") == [pytest.approx(2 / 1.5), 2.0]  # only the run straddling the change is off


def test_lagged_reg_with_k1_is_exact_reg_and_k2_reuses_the_previous_m() -> None:
    t = toy.make_toy_2d()
    start = 5.0 * torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = toy.karras_sigmas(5, 0.05, 5.0)
    exact = toy.sample_ode(lambda x, s: toy.reg_denoiser(t, x, s, 3.0), start.clone(), sigmas)
    k1 = quality.LaggedREG(t.cond.denoise, t.uncond.denoise, 3.0, "vjp", 1)
    assert torch.allclose(toy.sample_ode(k1, start.clone(), sigmas), exact, rtol=0, atol=1e-12)

    k2 = quality.LaggedREG(t.cond.denoise, t.uncond.denoise, 3.0, "vjp", 2, track=True)
    lagged = toy.sample_ode(k2, start.clone(), sigmas)
    evals = k2.evaluations
    assert [e.fresh for e in evals] == [i % 2 == 0 for i in range(len(evals))]  # Heun's corrections count too
    for prev, e in itertools.pairwise(evals):
        if not e.fresh:
            assert e.m_used is prev.m_used  # reused, not recomputed
            assert not torch.allclose(e.m_used, e.m_exact)  # and it differs from the fresh M at the new point
    assert not torch.allclose(lagged, exact)
