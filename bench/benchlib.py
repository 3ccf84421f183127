"""Pure helpers of the benchmarks (no ComfyUI, so tests/test_bench.py checks them in the project's own venv): the
bracketed run order and its ratios, configuration names, summaries, peak memory and tables."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
import statistics
import zlib
from collections.abc import Sequence

import torch

GIB = 2**30
MIB = 2**20
SEED = 2025
ESTIMATORS = ("vjp", "vjp-low-memory", "gradient-free", "chain")


def bracketed(names: Sequence[str], reference: str, repeats: int) -> list[str]:
    """Run order with the reference around every other run: R A R B R, then R B R A R, … (consecutive repeats share
    their boundary R; the others' order rotates so each takes every position)."""
    others = [n for n in names if n != reference]
    order = [reference]
    for r in range(repeats):
        shift = r % len(others) if others else 0
        for name in [*others[shift:], *others[:shift]]:
            order += [name, reference]
    return order


def bracketed_ratios(order: Sequence[str], values: Sequence[float], name: str, reference: str) -> list[float]:
    """``values[i]`` of each run of ``name`` over the mean of the reference runs right before and after it: a drift of
    the machine slower than three runs cancels, a busy spell widens the spread instead of biasing the median."""
    ratios = []
    for i, n in enumerate(order):
        if n == name:
            around = [values[j] for j in (i - 1, i + 1) if 0 <= j < len(order) and order[j] == reference]
            ratios.append(values[i] / statistics.fmean(around))
    return ratios


def parse_config(name: str) -> tuple[str | None, int]:
    """``CFG`` → (None, 1); ``vjp`` → ("vjp", 1); ``gradient-free:4`` → ("gradient-free", 4) (``refresh_every``)."""
    if name == "CFG":
        return None, 1
    estimator, sep, every = name.partition(":")
    k = int(every) if every.isdigit() else 0 if sep else 1
    if estimator not in ESTIMATORS or k < 1 or (k > 1 and estimator == "chain"):
        raise ValueError(f"unknown configuration {name!r}: CFG, or vjp, vjp-low-memory, gradient-free or chain, "
                         "optionally with :refresh_every (not chain: it has no M to reuse)")  # fmt: skip
    return estimator, k


def summary(values: Sequence[float], spec: str = ".2f") -> str:
    """``median [min–max]``, or the value alone when there is one."""
    mid = format(statistics.median(values), spec)
    if len(values) == 1:
        return mid
    return f"{mid} [{min(values):{spec}}–{max(values):{spec}}]"


def signed_size(n: float) -> str:
    """``+1.50 GiB`` from 1 GiB on, else ``+3.8 MiB``."""
    return f"{n / GIB:+.2f} GiB" if abs(n) >= GIB else f"{n / MIB:+.1f} MiB"


def cost_rows(
    names: Sequence[str], order: Sequence[str], seconds: Sequence[float], peaks: dict[str, list[int]]
) -> list[list[str]]:
    """Per name: median seconds and the bracketed ratio to ``names[0]`` (median [min–max]; — without timed runs),
    then the median peak and the peak above ``names[0]``'s (n/a: not measured; failed: its process failed)."""
    ref = names[0]
    rows = []
    for name in names:
        own = [s for n, s in zip(order, seconds, strict=True) if n == name]
        ratio = "—" if not own else "1" if name == ref else summary(bracketed_ratios(order, seconds, name, ref))
        row = [name, f"{statistics.median(own):.3f}" if own else "—", ratio]
        if name not in peaks:
            row += ["n/a", "n/a"]
        elif not peaks[name]:
            row += ["failed", "—"]
        else:
            peak = statistics.median(peaks[name])
            row.append(signed_size(peak).lstrip("+"))
            row.append(signed_size(peak - statistics.median(peaks[ref])) if peaks.get(ref) else "—")
        rows.append(row)
    return rows


def random_weight(name: str, shape: Sequence[int], device: str = "cpu") -> torch.Tensor:
    """The value of one weight of a random network (the rule of tests/integration/tiny_models.py, seeded per name):
    1-D ``*.weight`` (norm scales) 1, other 1-D tensors N(0, 0.02²), the rest N(0, 1/fan_in), in float32."""
    if len(shape) == 1 and name.endswith(".weight"):
        return torch.ones(tuple(shape), device=device)
    gen = torch.Generator(device).manual_seed(SEED * 1_000_003 + zlib.crc32(name.encode()))
    value = torch.randn(tuple(shape), generator=gen, device=device)
    return value.mul_(0.02 if len(shape) <= 1 else 1 / math.sqrt(math.prod(shape[1:])))


def relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    """``‖e − r‖ / ‖r‖`` in float64."""
    e, r = (t.detach().double().flatten().cpu() for t in (estimate, reference))
    return float((e - r).norm() / r.norm())


def _malloc_trim():
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
    return trim


MALLOC_TRIM = _malloc_trim()


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the kernel (glibc ``malloc_trim``; elsewhere a no-op)."""
    gc.collect()
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


class PeakMemory:
    """The peak of the code between :meth:`start` and :meth:`extra`, above the level at :meth:`start`.

    On a GPU the CUDA allocator's peak of live tensors (exact, reset per run). On the CPU the kernel's resident-set
    high-water mark (``VmHWM``, reset by writing 5 to ``/proc/self/clear_refs``, Linux): freed memory is collected and
    handed back to the kernel first (glibc ``malloc_trim``), so the level is what is really held."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.base = 0

    def start(self) -> None:
        if self.cuda:
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        release_memory()
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        self.base = _status_bytes("VmRSS")

    def extra(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _status_bytes("VmHWM") - self.base


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table: first column left-aligned, the others right-aligned."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c) for c in cells) + " |"

    return "\n".join([line(headers), "|---|" + "---:|" * (len(headers) - 1), *map(line, rows)]) + "\n"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, title: str = "") -> str:
    """A plain-text table (first column left-aligned, the rest right-aligned), as one string ending in a newline."""
    widths = [max([len(str(h)), *(len(str(r[i])) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in pairs).rstrip()

    out = [title] if title else []
    out += [line(headers), "  ".join("-" * w for w in widths), *map(line, rows)]
    return "\n".join(out) + "\n"
