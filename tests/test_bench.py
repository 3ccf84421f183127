"""The benchmark helpers measure what they claim (bench/benchlib.py, bench/report.py, bench/quality.py); nothing here
is timed."""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from bench import core_bench, quality, report
from bench.benchlib import (
    MIB,
    Breakdown,
    Measurement,
    PeakMemory,
    RunStats,
    Summary,
    TensorProfile,
    bracketed,
    breakdown_from_dict,
    fresh_evaluations,
    interleaved,
    measurement_from_dict,
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


def test_tensor_memory_is_not_offset_by_a_tensor_freed_after_an_earlier_session() -> None:
    """The profiler's running total is process-wide: a tensor allocated in one session and freed after it ended is
    never subtracted from it. The next session's levels must not carry it."""
    with tensor_memory():
        leftover = torch.empty(2**20)  # 4 MiB
    del leftover  # freed while no profiler records
    with tensor_memory() as rec:
        start = rec.mark()
        block = torch.empty(2**18)  # 1 MiB
        end = rec.mark()
    del block
    assert rec.trace.at(start) == 0
    assert rec.trace.at(end) == MIB
    assert MIB <= rec.trace.peak(start, end) < MIB + 1024


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
    m = Measurement("toy", 32, 3, ["R", "A", "B"], runs, [0] * 9, False, order, reference="R")
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


def test_setup_compares_step_0_with_the_later_fresh_steps_only() -> None:
    """With refresh_every 2, steps 0, 2, 4 estimate M (3 s each, step 0 plus 2 s of setup) and steps 1, 3 reuse it
    (1 s): the setup is step 0 minus a fresh step, not minus the mean of all later steps (2 s)."""
    stats = RunStats(
        step_seconds=[5.0, 1.0, 3.0, 1.0, 3.0], peak_extra=0, step_rss=[0] * 5, rss_after=0, refresh_every=2
    )
    assert stats.setup == 2.0
    assert stats.steady_step == 2.0


def _profile(peak_mib: float) -> TensorProfile:
    return TensorProfile(peak=int(peak_mib * MIB), run_growth=0, step_live=[0, 0, 0])


def _measurement(peaks_mib: dict[str, float], graph_bytes: int) -> Measurement:
    """CFG bracketing every other configuration once; each run's steps take 1 s (ratios 1)."""
    others = [name for name in peaks_mib if name != "CFG"]
    sequence = [name for _, name in bracketed(["CFG", *others], "CFG", 1)]
    runs: dict[str, list[RunStats]] = {name: [] for name in peaks_mib}
    for name in sequence:
        runs[name].append(RunStats(step_seconds=[1.0] * 3, peak_extra=0, step_rss=[0] * 3, rss_after=0))
    return Measurement(
        "toy",
        32,
        3,
        configs=list(peaks_mib),
        runs=runs,
        rss_sequence=[0] * len(sequence),
        memory_available=False,
        sequence=sequence,
        tensors={name: _profile(peak) for name, peak in peaks_mib.items()},
        graph_bytes=graph_bytes,
    )


def test_memory_targets_hold_every_exact_configuration_to_cfg_plus_one_graph() -> None:
    """CFG peaks at 10 MiB, one cond graph is 4 MiB: vjp and vjp k=2 stay within 14 MiB, chain (15 MiB) does not.
    Gradient-free may add 0.6 x CFG's peak = 6 MiB: 5 MiB is within, k=2 at 7 MiB is not."""
    peaks = {
        "CFG": 10,
        "REG vjp": 13.5,
        "REG vjp k=2": 14,
        "REG chain": 15,
        "REG gradient-free": 15,
        "REG gradient-free k=2": 17,
    }
    targets = report.check_targets([_measurement(peaks, graph_bytes=4 * MIB)])
    verdicts = {t.what: t.met for t in targets if "graph" in t.what}
    assert verdicts == {
        "REG vjp peak <= CFG + one cond graph": True,
        "REG vjp k=2 peak <= CFG + one cond graph": True,
        "REG chain peak <= CFG + one cond graph": False,
        "REG gradient-free: no graph, extra <= one sample's activations": True,
        "REG gradient-free k=2: no graph, extra <= one sample's activations": False,
    }


def test_memory_targets_without_a_graph_size_are_not_measurable() -> None:
    targets = report.check_targets([_measurement({"CFG": 10, "REG vjp": 11, "REG chain": 11}, graph_bytes=0)])
    exact = [t for t in targets if "cond graph" in t.what]
    assert [(t.what, t.met) for t in exact] == [
        ("REG vjp peak <= CFG + one cond graph", None),
        ("REG chain peak <= CFG + one cond graph", None),
    ]
    assert "n/a" in report.targets_table(exact)


def test_results_survive_a_json_round_trip() -> None:
    m = _measurement({"CFG": 10, "REG vjp": 13}, graph_bytes=4 * MIB)
    m.runs["REG vjp"][0].step_marks = [3, 4, 5]
    m.record_bytes = 2048
    b = Breakdown("toy", 32, 2, seconds={"cond": Summary(0.1, 0.2, 0.3)}, graph_bytes={"cond": 7}, notes={"k": "v"})
    m_json, b_json = (json.loads(json.dumps(dataclasses.asdict(x))) for x in (m, b))
    assert measurement_from_dict(m_json) == m
    assert breakdown_from_dict(b_json) == b
    del m_json["graph_bytes"]  # written before the graph was measured with the runs
    assert measurement_from_dict(m_json).graph_bytes == 0
    del m_json["sequence"]  # written before the bracketed run order
    with pytest.raises(ValueError, match="run order"):
        measurement_from_dict(m_json)


@pytest.fixture
def bench_reg(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench/bench_reg.py as a module (it extends ``sys.path`` on import; the original path is restored after)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    return importlib.import_module("bench.bench_reg")


def test_cli_rejects_runs_that_would_crash_or_skew_the_refresh_mix(
    bench_reg: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = bench_reg.make_parser()
    for argv, message in (
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--steps", "7"], "multiple of 4"),
        (["--steps", "1"], "multiple of 4"),
        (["--repeat", "2"], "unrecognized arguments: --repeat"),  # no abbreviations
    ):
        with pytest.raises(SystemExit):
            bench_reg.parse_args(parser, argv)
        assert message in capsys.readouterr().err
    args = bench_reg.parse_args(parser, ["--steps", "9", "--report=old.json", "--core"])
    assert (args.steps, args.report, args.core, args.models, args.attention) == (9, Path("old.json"), True, None, None)


def test_report_reprints_results_without_a_graph_size_and_refuses_them_without_a_run_order(
    bench_reg: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = dataclasses.asdict(_measurement({"CFG": 10, "REG vjp": 13}, graph_bytes=0))
    del data["graph_bytes"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"environment": "", "header": "", "measurements": [data], "breakdowns": []}))
    assert bench_reg.reprint(path) == 0
    out = capsys.readouterr().out
    assert "REG vjp peak <= CFG + one cond graph" in out
    assert "graph not measured" in out
    del data["sequence"]
    path.write_text(json.dumps({"environment": "", "header": "", "measurements": [data], "breakdowns": []}))
    with pytest.raises(SystemExit, match="run order") as exc:
        bench_reg.reprint(path)
    assert "\n" not in str(exc.value)


def test_core_graph_size_counts_the_activations_of_one_conditional_pass() -> None:
    """At least one width-64 float activation per residual block, growing with the latent's pixels (4x from 8x8 to
    16x16, minus the pixel-independent embedding)."""
    bench = core_bench.CoreBench()
    small, large = bench.cond_graph_bytes(8), bench.cond_graph_bytes(16)
    assert small >= len(bench.net.blocks) * 64 * 8 * 8 * 4
    assert 3.5 * small < large <= 4 * small


# --- real sizes and the GPU check (bench/report.py, bench/benchlib.py, bench/gpu_carry.py) ---


def test_map_agreement_is_one_and_zero_for_equal_maps_and_exact_for_a_known_pair() -> None:
    from bench.benchlib import map_agreement

    ref = torch.tensor([3.0, 4.0])  # |r| = 5
    assert map_agreement(ref.clone(), ref) == (1.0, 0.0)
    cosine, rel = map_agreement(torch.tensor([4.0, 3.0]), ref)  # <e, r> = 24, |e - r| = sqrt(2)
    assert cosine == pytest.approx(24 / 25, abs=1e-12)
    assert rel == pytest.approx(2**0.5 / 5, abs=1e-12)
    cosine, rel = map_agreement(-ref, ref)
    assert (cosine, rel) == (pytest.approx(-1.0), pytest.approx(2.0))
    with pytest.raises(ValueError, match="zero"):
        map_agreement(ref, torch.zeros(2))
    with pytest.raises(ValueError, match="size"):
        map_agreement(torch.ones(3), ref)


def test_markdown_table_aligns_numbers_right_and_escapes_pipes() -> None:
    table = report.markdown_table(["config", "x CFG"], [["a|b", "1.50"], ["REG vjp", "2.00"]])
    assert table == "| config | x CFG |\n|---|---:|\n| a\\|b | 1.50 |\n| REG vjp | 2.00 |\n"
    with pytest.raises(ValueError):
        report.markdown_table(["a", "b"], [["only one"]])


def _real_measurement(tensors: bool) -> Measurement:
    """CFG 10 s, vjp 20 s, low-memory 26 s per step, CFG run peaks 1 GiB, vjp 4 GiB, low-memory 2.5 GiB."""
    gib = 2**30
    step = {"CFG": 10.0, "REG vjp": 20.0, "REG vjp-low-memory": 26.0}
    peak = {"CFG": gib, "REG vjp": 4 * gib, "REG vjp-low-memory": int(2.5 * gib)}
    sequence = ["CFG", "REG vjp", "CFG", "REG vjp-low-memory", "CFG"]
    runs = {n: [] for n in step}
    for n in sequence:
        runs[n].append(RunStats(step_seconds=[99.0, step[n], step[n]], peak_extra=peak[n], step_rss=[0, 0, 0],
                                rss_after=0))  # fmt: skip
    profiles = {n: TensorProfile(peak=peak[n] // 2, run_growth=0, step_live=[0, 0]) for n in step} if tensors else {}
    return Measurement("SDXL", 128, 3, list(step), runs, [0] * 5, True, sequence, tensors=profiles)


def test_real_size_rows_give_ratios_to_cfg_and_to_vjp_and_memory_above_cfg() -> None:
    rows = report.real_size_rows(_real_measurement(tensors=False))
    assert rows == [
        ["CFG", "10.000", "1.00", "", "+0.0 MiB"],
        ["REG vjp", "20.000", "2.00", "1.00", "+3.00 GiB"],
        ["REG vjp-low-memory", "26.000", "2.60", "1.30", "+1.50 GiB"],
    ]
    exact = report.real_size_rows(_real_measurement(tensors=True))  # the profiled (exact) tensor peaks win
    assert [r[4] for r in exact] == ["+0.0 MiB", "+1.50 GiB", "+768.0 MiB"]
    markdown = report.real_size_markdown("CPU test", ["SDXL (2.57B)"], [_real_measurement(False)], [], [])
    assert "| REG vjp-low-memory | 26.000 | 2.60 | 1.30 | +1.50 GiB |" in markdown
    assert markdown.startswith("Measured on: CPU test\n\n- SDXL (2.57B)\n")


def test_exactness_verdict_uses_the_tolerance_of_reg_s_correction() -> None:
    from bench.real_size import Exactness

    ok = Exactness("SDXL", 128, "vjp", "bfloat16", 1e-3, 0.099, 0.1, 1.0)
    bad = Exactness("SDXL", 128, "vjp", "bfloat16", 1e-3, 0.5, 0.1, 1.0)
    assert ok.ok and not bad.ok
    assert report.exactness_cells(bad)[5:8] == ["5.0e-01", "1e-01", "FAILED"]


@pytest.mark.parametrize(
    ("name", "python", "fits"),
    [
        ("torchsde-0.2.6-py3-none-any.whl", (3, 12), True),
        ("av-18.1.0-cp311-abi3-manylinux_2_28_x86_64.whl", (3, 12), True),  # abi3 from 3.11 on
        ("av-18.1.0-cp311-abi3-manylinux_2_28_x86_64.whl", (3, 10), False),
        ("numpy-2.4.6-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl", (3, 12), True),
        ("numpy-2.4.6-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl", (3, 11), False),
        ("numpy-2.4.6-cp312-cp312-manylinux_2_17_aarch64.whl", (3, 12), False),
        ("numpy-2.4.6-cp312-cp312-win_amd64.whl", (3, 12), False),
        ("comfy_aimdo-0.4.13-cp39-abi3-manylinux2010_x86_64.manylinux2014_x86_64.whl", (3, 13), True),
        ("not-a-wheel.tar.gz", (3, 12), False),
    ],
)
def test_wheel_fits_reads_python_abi_and_platform_tags(name: str, python: tuple[int, int], fits: bool) -> None:
    from bench.gpu_carry import wheel_fits

    assert wheel_fits(name, python) is fits


def test_carry_takes_items_in_order_while_under_the_limit(tmp_path: Path) -> None:
    from bench.gpu_carry import LIMIT, fits_limit, folder_bytes

    assert LIMIT == 64 * MIB
    taken, left = fits_limit([("a", 30 * MIB), ("b", 30 * MIB), ("c", 10 * MIB), ("d", 3 * MIB)], used=1 * MIB)
    assert (taken, left) == (["a", "b", "d"], ["c"])  # 1 + 30 + 30 + 3 = 64 MiB exactly fits
    (tmp_path / "sub").mkdir()
    (tmp_path / "x").write_bytes(b"1" * 1000)
    (tmp_path / "sub" / "y").write_bytes(b"2" * 24)
    assert folder_bytes(tmp_path) == 1024


def test_unzipped_wheel_lands_importable_with_its_platlib(tmp_path: Path) -> None:
    import zipfile

    from bench.gpu_carry import unzip_wheel

    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("demo_pkg/__init__.py", "VALUE = 41\n")
        archive.writestr("demo-1.0.data/platlib/demo_ext.py", "VALUE = 1\n")
        archive.writestr("demo-1.0.data/scripts/tool", "#!/bin/sh\n")
    site = tmp_path / "site"
    unzip_wheel(wheel, site)
    assert (site / "demo_pkg" / "__init__.py").read_text() == "VALUE = 41\n"
    assert (site / "demo_ext.py").is_file()
    assert not (site / "tool").exists() and not (site / "demo-1.0.data").exists()
