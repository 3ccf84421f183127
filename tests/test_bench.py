"""The benchmark helpers compute what they claim (bench/benchlib.py, bench/cost.py's command line, bench/gpu_check.py,
tools/gpu_pack.py); nothing here is timed and nothing needs ComfyUI."""

from __future__ import annotations

import importlib
import math
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest
import torch

from bench import gpu_check
from bench.benchlib import (
    GIB,
    MIB,
    PeakMemory,
    bracketed,
    bracketed_ratios,
    cost_rows,
    format_table,
    markdown_table,
    parse_config,
    random_weight,
    relative_error,
    signed_size,
    summary,
)
from tools import gpu_pack


@pytest.fixture
def cost(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench/cost.py as a module (it extends ``sys.path`` on import; the original path is restored after)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    return importlib.import_module("bench.cost")


def test_bracketed_order_rotates_and_ratios_cancel_a_drifting_machine() -> None:
    order = bracketed(["R", "A", "B"], "R", 2)
    assert order == ["R", "A", "R", "B", "R", "B", "R", "A", "R"]
    # the machine halves its speed half-way; A always costs 1.5 R, B 2 R
    slow = [1, 1, 1, 1, 2, 2, 2, 2, 2]
    cost = {"R": 1.0, "A": 1.5, "B": 2.0}
    seconds = [cost[name] * s for name, s in zip(order, slow, strict=True)]
    assert bracketed_ratios(order, seconds, "A", "R") == [1.5, 1.5]
    assert bracketed_ratios(order, seconds, "B", "R") == [pytest.approx(2 / 1.5), 2.0]  # only the straddling run


def test_cost_rows_give_median_seconds_bracketed_ratios_and_peaks_above_the_reference() -> None:
    order = bracketed(["CFG", "vjp"], "CFG", 2)
    assert order == ["CFG", "vjp", "CFG", "vjp", "CFG"]
    seconds = [1.0, 2.0, 1.0, 3.0, 1.0]
    peaks = {"CFG": [GIB], "vjp": [3 * GIB]}
    assert cost_rows(["CFG", "vjp"], order, seconds, peaks) == [
        ["CFG", "1.000", "1", "1.00 GiB", "+0.0 MiB"],
        ["vjp", "2.500", "2.50 [2.00–3.00]", "3.00 GiB", "+2.00 GiB"],
    ]
    assert [row[3:] for row in cost_rows(["CFG", "vjp"], order, seconds, {})] == [["n/a", "n/a"], ["n/a", "n/a"]]
    # memory only (no timed runs), and a process that failed (killed for lack of memory)
    assert cost_rows(["cfg", "plain", "vjp"], [], [], {"cfg": [MIB], "plain": [], "vjp": [3 * MIB]}) == [
        ["cfg", "—", "—", "1.0 MiB", "+0.0 MiB"],
        ["plain", "—", "—", "failed", "—"],
        ["vjp", "—", "—", "3.0 MiB", "+2.0 MiB"],
    ]


def test_configuration_names_give_the_estimator_and_refresh_every() -> None:
    assert parse_config("CFG") == (None, 1)
    assert parse_config("vjp-low-memory") == ("vjp-low-memory", 1)
    assert parse_config("gradient-free:4") == ("gradient-free", 4)
    for bad in ("chain:2", "vjp:0", "vjp:x", "vjp:", "cfg", "exact"):
        with pytest.raises(ValueError):
            parse_config(bad)


def test_summaries_sizes_and_errors_format_the_numbers_they_are_given() -> None:
    assert summary([1.0, 3.0, 2.0]) == "2.00 [1.00–3.00]"
    assert summary([1.234], ".1f") == "1.2"
    assert signed_size(1.5 * GIB) == "+1.50 GiB"
    assert signed_size(-3.8 * MIB) == "-3.8 MiB"
    assert relative_error(torch.tensor([4.0, 3.0]), torch.tensor([3.0, 4.0])) == pytest.approx(math.sqrt(2) / 5)
    assert relative_error(torch.ones(3), torch.ones(3)) == 0.0


def test_tables_align_the_first_column_left_and_the_others_right() -> None:
    assert markdown_table(["config", "x CFG"], [["vjp", "1.50"]]) == "| config | x CFG |\n|---|---:|\n| vjp | 1.50 |\n"
    assert format_table(["a", "bb"], [["xyz", "1"]], title="t") == "t\na    bb\n---  --\nxyz   1\n"


def test_random_weights_follow_the_tiny_models_rule_and_depend_on_the_name_only() -> None:
    assert torch.equal(random_weight("norm.weight", (5,)), torch.ones(5))
    bias = random_weight("proj.bias", (20000,))
    assert bias.std().item() == pytest.approx(0.02, rel=0.03)
    conv = random_weight("conv.weight", (64, 16, 3, 3))
    assert conv.std().item() == pytest.approx(1 / 12, rel=0.03)  # fan_in 16·3·3 = 144
    assert torch.equal(conv, random_weight("conv.weight", (64, 16, 3, 3)))
    assert not torch.equal(conv, random_weight("conv2.weight", (64, 16, 3, 3)))


def test_peak_memory_keeps_a_freed_allocation_and_forgets_what_came_before_start() -> None:
    """The high-water mark covers the RSS seen while a 64 MiB block lived, and a 256 MiB block freed before
    :meth:`PeakMemory.start` is not in it (both blocks are ``mmap``ed, so freeing them lowers the RSS)."""
    memory = PeakMemory(cuda=False)
    try:
        earlier = torch.ones(256 * MIB // 4)
        del earlier
        memory.start()
    except OSError:
        pytest.skip("no resettable RSS high-water mark (/proc/self/clear_refs) on this system")
    block = torch.ones(64 * MIB // 4)  # every page touched
    del block
    assert 63 * MIB <= memory.extra() < 128 * MIB


def test_cli_resolves_defaults_per_size_and_device(cost: ModuleType) -> None:
    tiny = cost.parse([])
    assert (tiny.models, tiny.configs, tiny.steps, tiny.repeats) == (["sd15", "sd3"], list(cost.CONFIGS), 5, 3)
    real = cost.parse(["--real", "--configs", "vjp:2", "CFG"])
    assert (real.models, real.configs, real.steps, real.repeats, real.flux_depth) == (
        ["sd15"], ["CFG", "vjp:2"], 3, 1, (2, 4)
    )  # fmt: skip
    gpu = cost.parse(["--real", "--gpu"])
    assert (gpu.configs, gpu.steps, gpu.repeats, gpu.flux_depth) == (list(cost.REAL_CONFIGS), 5, 2, (19, 38))
    assert cost.weight_dtype(real, "sd15") == torch.float32 and cost.weight_dtype(real, "sdxl") == torch.bfloat16
    assert cost.weight_dtype(gpu, "sdxl") is None and cost.weight_dtype(tiny, "sd15") is None
    assert cost.weight_dtype(cost.parse(["--dtype", "float16"]), "sd15") == torch.float16


def test_cli_rejects_runs_that_would_skew_the_refresh_mix(cost: ModuleType, capsys: pytest.CaptureFixture) -> None:
    for argv, message in (
        (["--steps", "7"], "multiple of every refresh_every ([1, 2, 4])"),  # 6 timed steps: vjp:4 would be skewed
        (["--real", "--steps", "4"], "multiple of every refresh_every ([1, 2])"),
        (["--steps", "1", "--configs", "vjp"], "step 0 is not timed"),
        (["--configs", "chain:2"], "unknown configuration 'chain:2'"),
        (["--repeats", "0", "--no-memory"], "nothing would be measured"),
        (["--real", "--gpu", "--repeats", "0"], "nothing would be measured"),
        (["--repeat", "2"], "unrecognized arguments"),  # no abbreviations
        (["--gpu", "--keep-freed-memory", "--no-memory"], "glibc's heap holds CPU memory only"),
        (["--keep-freed-memory"], "--keep-freed-memory times only (add --no-memory)"),
    ):
        with pytest.raises(SystemExit):
            cost.parse(argv)
        assert message in capsys.readouterr().err
    assert cost.parse(["--steps", "9"]).steps == 9
    assert cost.parse(["--repeats", "0"]).repeats == 0  # memory only


def test_keep_freed_memory_sets_glibc_for_the_timed_process_and_the_report_says_so(cost: ModuleType) -> None:
    shell = {
        "PATH": "/bin",
        "MALLOC_TOP_PAD_": "1",
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
        "THP_MEM_ALLOC_ENABLE": "1",
    }
    kept = cost.allocator_env(True, shell)
    assert kept == {"PATH": "/bin", "MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}
    assert cost.allocator_env(False, kept) == cost.allocator_env(False, shell) == {"PATH": "/bin"}
    assert cost.allocator_note(kept) == (
        "glibc keeps freed memory (MALLOC_MMAP_THRESHOLD_=4294967296, MALLOC_TRIM_THRESHOLD_=68719476736)"
    )
    assert cost.allocator_note(shell) == (
        "allocation set by (GLIBC_TUNABLES=glibc.malloc.hugetlb=1, MALLOC_TOP_PAD_=1, THP_MEM_ALLOC_ENABLE=1)"
    )
    assert cost.allocator_note({"PATH": "/bin"}) == "glibc's allocator defaults"
    assert cost.parse(["--keep-freed-memory", "--no-memory"]).keep_freed_memory
    assert not cost.parse([]).keep_freed_memory


def test_the_timed_process_re_executes_itself_once_to_get_the_allocator_asked_for(
    cost: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(cost.locate, "find_comfyui", lambda: (tmp_path, ""))
    monkeypatch.setattr(cost.locate, "find_interpreter", lambda tree: (None, "no interpreter found"))
    execs: list[tuple[str, dict]] = []
    monkeypatch.setattr(cost.os, "execve", lambda path, argv, env: execs.append((path, env)))
    monkeypatch.setattr(cost.os, "environ", {cost.UNDER_COMFYUI: "1", "PATH": "/bin", "MALLOC_TOP_PAD_": "1"})
    plain = cost.parse(["--no-memory"])
    cost.under_comfyui(plain, ["--no-memory"])  # a stray setting: re-executed (already under ComfyUI) without it
    assert execs == [(sys.executable, {cost.UNDER_COMFYUI: "1", "PATH": "/bin"})]
    kept = cost.parse(["--keep-freed-memory", "--no-memory"])
    monkeypatch.setattr(cost.os, "environ", execs[0][1])
    cost.under_comfyui(kept, [])
    assert execs[1][1] == {**execs[0][1], **cost.KEEP_FREED_MEMORY}
    monkeypatch.setattr(cost.os, "environ", execs[1][1])
    assert cost.under_comfyui(kept, []) == tmp_path and len(execs) == 2  # the process it asked for: it runs


def test_gpu_check_unzips_only_missing_modules_packed_for_this_python(tmp_path: Path) -> None:
    entries = [
        {"file": "av-cp312.whl", "module": "av", "python": ["3.12"]},
        {"file": "av-cp311.whl", "module": "av", "python": ["3.11"]},
        {"file": "numpy.whl", "module": "numpy", "python": ["3.11", "3.12"]},
        {"file": "tqdm.whl", "module": "tqdm", "python": ["3.11", "3.12"]},
    ]
    assert gpu_check.wheels_to_unzip(entries, {"av", "tqdm"}, "3.11") == ["av-cp311.whl", "tqdm.whl"]
    assert gpu_check.missing_modules(["json", "no_such_module_here"]) == ["no_such_module_here"]
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("demo_pkg/__init__.py", "VALUE = 41\n")
        archive.writestr("demo-1.0.data/platlib/demo_ext.py", "VALUE = 1\n")
        archive.writestr("demo-1.0.data/scripts/tool", "#!/bin/sh\n")
    gpu_check.unzip_wheel(wheel, tmp_path / "site")
    assert (tmp_path / "site" / "demo_pkg" / "__init__.py").read_text() == "VALUE = 41\n"
    assert (tmp_path / "site" / "demo_ext.py").is_file()
    assert not (tmp_path / "site" / "tool").exists() and not (tmp_path / "site" / "demo-1.0.data").exists()
    assert gpu_check.missing_modules(["demo_pkg", "demo_ext"], tmp_path / "site") == []


def test_gpu_pack_takes_wheels_in_order_while_under_the_limit(tmp_path: Path) -> None:
    assert gpu_pack.LIMIT == 64 * MIB
    sizes = [("a", 30 * MIB), ("b", 30 * MIB), ("c", 10 * MIB), ("d", 3 * MIB)]
    assert gpu_pack.fits_limit(sizes, used=MIB) == (["a", "b", "d"], ["c"])  # 1 + 30 + 30 + 3 = 64 MiB fits
    (tmp_path / "sub").mkdir()
    (tmp_path / "x").write_bytes(b"1" * 1000)
    (tmp_path / "sub" / "y").write_bytes(b"2" * 24)
    assert gpu_pack.folder_bytes(tmp_path) == 1024
