"""Helpers shared by the benchmarks: robust summaries, interleaved schedules, peak-memory probes and graph sizes.

Pure Python + torch (no ComfyUI), so the unit tests can check them in the project's own venv.

Memory on the CPU
-----------------
CPU tensors are allocated with ``malloc``/``posix_memalign``, which ``tracemalloc`` and ``torch.cuda`` statistics do not
see. Two measures:

* :func:`tensor_memory` — live tensor bytes from the PyTorch profiler's allocator events (``profile_memory=True``):
  exact, deterministic and independent of ``malloc``'s page recycling; profiling slows execution, so profiled runs are
  never timed. :func:`saved_tensor_bytes` gives the size of an autograd graph the same exact way.
* :class:`PeakMemory` — the resident set's high-water mark per run. The kernel keeps the RSS high-water mark
  (``VmHWM`` in ``/proc/self/status``, the figure behind ``getrusage().ru_maxrss``) and lets a process reset it to the
  current RSS by writing ``5`` to ``/proc/self/clear_refs`` (Linux ≥ 4.0). Before a run :meth:`PeakMemory.start` runs
  the garbage collector and ``malloc_trim(0)`` (glibc otherwise keeps freed heap pages resident and a later run would
  reuse them without raising the RSS), resets the mark and reads the baseline; after the run ``VmHWM − baseline`` is
  the run's peak extra memory, sampled exactly by the kernel (no polling thread that could miss a short peak).
  Without ``clear_refs`` (other kernels) :attr:`PeakMemory.available` is False.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import ctypes.util
import gc
import json
import logging
import os
import statistics
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from reg_core.rectify import is_fresh_evaluation

MIB = 2**20
log = logging.getLogger("bench_reg.runs")


@dataclass(frozen=True)
class Summary:
    """Minimum, median and maximum of repeated measurements."""

    minimum: float
    median: float
    maximum: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Summary:
        data = [float(v) for v in values]
        if not data:
            raise ValueError("no values to summarise")
        return cls(min(data), statistics.median(data), max(data))

    def format(self, spec: str = ".3f", scale: float = 1.0) -> str:
        """``median [min–max]`` with every figure divided by ``scale``."""
        lo, mid, hi = (format(v / scale, spec) for v in (self.minimum, self.median, self.maximum))
        return f"{mid} [{lo}–{hi}]"


def interleaved(names: Sequence[str], repeats: int) -> list[tuple[int, str]]:
    """``(repeat, name)`` in run order: every name once per repeat (A B C, B C A, C A B, …).

    Rotating the start gives every configuration every position, so slow drifts and "runs right after X" effects are
    spread evenly instead of always hitting the same configuration.
    """
    order = []
    for r in range(repeats):
        shift = r % len(names) if names else 0
        order.extend((r, name) for name in [*names[shift:], *names[:shift]])
    return order


def bracketed(names: Sequence[str], reference: str, repeats: int) -> list[tuple[int, str]]:
    """``(repeat, name)`` in run order with the reference between every two others: R A R B R C R, R B R C R A R, …

    Consecutive repeats share their boundary R. Every other run is then bracketed by two reference runs, and its
    ratio to the mean of those two (:meth:`Measurement.ratios`) cancels any drift of the machine slower than three
    runs; the others' order rotates between repeats as in :func:`interleaved`.
    """
    others = [n for n in names if n != reference]
    order = [(0, reference)]
    for r in range(repeats):
        shift = r % len(others) if others else 0
        for name in [*others[shift:], *others[:shift]]:
            order += [(r, name), (r, reference)]
        if not others and r:
            order.append((r, reference))
    return order


def fresh_evaluations(count: int, refresh_every: int) -> list[bool]:
    """Which of ``count`` consecutive in-window evaluations estimate M anew (the rest reuse the last M).

    The same rule as the runtime's ``refresh_every``: evaluation ``e`` (1-based) is fresh when ``(e − 1) % k == 0``.
    """
    if refresh_every < 1:
        raise ValueError(f"refresh_every must be at least 1, got {refresh_every}")
    return [is_fresh_evaluation(e, refresh_every) for e in range(count)]


def _status_kib(name: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Current resident set size of this process."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil  # not Linux: ComfyUI ships psutil

    return int(psutil.Process().memory_info().rss)


def _libc_trim():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    return trim


_MALLOC_TRIM = _libc_trim()


def release_memory() -> None:
    """Collect garbage and return free heap pages to the kernel (glibc ``malloc_trim``; a no-op elsewhere)."""
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class PeakMemory:
    """Per-run RSS high-water mark through Linux's resettable ``VmHWM`` (see the module docstring)."""

    def __init__(self) -> None:
        self.available = self._reset() and _status_kib("VmHWM") is not None
        self.baseline = 0

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            return False
        return True

    def start(self) -> int:
        """Release freed memory, reset the high-water mark; returns (and keeps) the baseline RSS in bytes."""
        release_memory()
        self._reset()
        self.baseline = rss_bytes()
        return self.baseline

    def peak(self) -> int:
        """The RSS high-water mark since :meth:`start`, in bytes."""
        kib = _status_kib("VmHWM")
        return 0 if kib is None else kib * 1024

    def extra(self) -> int:
        """Peak minus baseline: the memory the measured code needed on top of what was resident before."""
        return self.peak() - self.baseline


class CudaPeakMemory(PeakMemory):
    """Per-run peak of the CUDA caching allocator (``torch.cuda.max_memory_allocated``), the GPU counterpart of
    :class:`PeakMemory` with the same interface: exact for every tensor PyTorch allocates on the device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.available = torch.cuda.is_available()
        self.baseline = 0

    def start(self) -> int:
        """Synchronise, free cached blocks, reset the peak; returns (and keeps) the allocated bytes."""
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.baseline = torch.cuda.memory_allocated(self.device)
        return self.baseline

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)


def map_agreement(estimate: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """``(cosine, relative L2 error)`` of ``estimate`` against ``reference``, flattened, computed in float64.

    cosine = ⟨e, r⟩ / (‖e‖ ‖r‖); relative error = ‖e − r‖ / ‖r‖ (0 and 1 for identical maps). Used for M computed in a
    low-precision dtype against M in float32 on the same weights and input.
    """
    e = estimate.detach().reshape(-1).to(torch.float64)
    r = reference.detach().reshape(-1).to(torch.float64)
    if e.shape != r.shape:
        raise ValueError(f"maps differ in size: {tuple(estimate.shape)} vs {tuple(reference.shape)}")
    r_norm = float(r.norm())
    if r_norm == 0.0:
        raise ValueError("the reference map is zero: relative error undefined")
    e_norm = float(e.norm())
    cosine = float(e @ r) / (e_norm * r_norm) if e_norm else 0.0
    return cosine, float((e - r).norm()) / r_norm


class SavedTensors:
    """Bytes of the distinct storages autograd saves for backward (see :func:`saved_tensor_bytes`)."""

    def __init__(self, exclude: Iterable[torch.Tensor]) -> None:
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.seen: set[int] = set()
        self.bytes = 0
        self.count = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.excluded and key not in self.seen:
            self.seen.add(key)
            self.bytes += storage.nbytes()
            self.count += 1
        return tensor


@contextlib.contextmanager
def saved_tensor_bytes(exclude: Iterable[torch.Tensor] = ()) -> Iterator[SavedTensors]:
    """Count the memory an autograd graph recorded inside the block holds: the activation graph's size.

    Every tensor saved for backward passes through a ``saved_tensors_hooks`` pack hook; distinct storages are summed
    once each (views and repeated saves share one storage). Pass the model's parameters as ``exclude``: weights saved
    by ``linear``/``conv`` exist anyway and are not activation memory. The hook returns the tensor unchanged, so the
    graph and its memory are exactly what they would be without it.
    """
    counter = SavedTensors(exclude)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda tensor: tensor):
        yield counter


MARK = "reg_bench_mark"


class TensorRecorder:
    """Marks positions inside a :func:`tensor_memory` block; after the block, :attr:`trace` holds the result."""

    def __init__(self) -> None:
        self.count = 0
        self.trace: TensorTrace | None = None

    def mark(self) -> int:
        """Record the live tensor bytes at this point; returns the mark's index."""
        with torch.profiler.record_function(f"{MARK}{self.count}"):
            pass
        self.count += 1
        return self.count - 1


@dataclass
class TensorTrace:
    """Live CPU tensor bytes inside a profiled block, relative to the level just before the block's first allocator
    event (tensors allocated before the block are not counted)."""

    times: list[float]  # profiler timestamps (µs) of the allocator events, ascending
    live: list[int]  # live bytes after each event, relative to the level before the first event
    mark_times: list[float]

    def at(self, mark: int) -> int:
        """Live bytes at a mark (0 before the first event)."""
        i = bisect.bisect_right(self.times, self.mark_times[mark])
        return self.live[i - 1] if i else 0

    def peak(self, start: int, end: int) -> int:
        """The largest live bytes between two marks, above the live bytes at ``start``."""
        lo = bisect.bisect_left(self.times, self.mark_times[start])
        hi = bisect.bisect_right(self.times, self.mark_times[end])
        base = self.at(start)
        return max([base, *self.live[lo:hi]]) - base


@contextlib.contextmanager
def tensor_memory() -> Iterator[TensorRecorder]:
    """Track every CPU tensor allocation and free inside the block with the PyTorch profiler (``profile_memory``).

    Every allocator event carries its size (``Bytes``, negative for a free) and the allocator's running total
    (``Total Allocated``), exact and independent of how ``malloc`` recycles pages, so peaks, the size of what a run
    leaves behind and the live bytes at each :meth:`TensorRecorder.mark` are deterministic. The running total is
    process-wide and only counts while a profiler records: a tensor allocated in an earlier profiled block and freed
    after that block ended stays in it. The levels are therefore taken relative to the level just before the block's
    first event (its total minus its size). The events are read from the profiler's documented Chrome-trace export.
    Profiling slows execution down, so profiled runs are never timed.
    """
    recorder = TensorRecorder()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        yield recorder
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as handle:
            data = json.load(handle)
    events = data["traceEvents"] if isinstance(data, dict) else data
    memory = sorted(
        (float(e["ts"]), int(e["args"]["Total Allocated"]), int(e["args"]["Bytes"]))
        for e in events
        if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0
    )
    before = memory[0][1] - memory[0][2] if memory else 0  # the running total just before the first event
    marks = {e["name"]: float(e["ts"]) for e in events if str(e.get("name", "")).startswith(MARK)}
    recorder.trace = TensorTrace(
        times=[t for t, _, _ in memory],
        live=[total - before for _, total, _ in memory],
        mark_times=[marks[f"{MARK}{i}"] for i in range(recorder.count)],
    )


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, title: str = "") -> str:
    """A plain-text table (first column left-aligned, the rest right-aligned), as one string ending in a newline."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        parts = [str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in pairs]
        return "  ".join(parts).rstrip()

    out = [title] if title else []
    out += [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out) + "\n"


def environment_line() -> str:
    """Torch version, threads and CPU count (for the header of every report)."""
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs"


@dataclass
class RunStats:
    """One sampling run: seconds per step (step 0 includes the run's setup), peak extra RSS and RSS traces."""

    step_seconds: list[float]
    peak_extra: int  # bytes above the RSS at the start of the run (0 when not measured)
    step_rss: list[int]  # RSS after each step
    rss_after: int  # RSS after the run, freed memory released

    @property
    def steady_step(self) -> float:
        """Mean seconds per step over steps 1…S−1 (step 0 carries the per-run setup)."""
        return statistics.fmean(self.step_seconds[1:])

    @property
    def setup(self) -> float:
        """How much longer the first step took than later steps doing the same work (the per-run overhead).

        Step 0 always estimates M afresh, so it is compared with the later fresh steps (all steps when
        ``refresh_every`` is 1), not with the cheaper reused ones.
        """
        fresh = fresh_evaluations(len(self.step_seconds), self.refresh_every)
        same = [t for t, f in zip(self.step_seconds[1:], fresh[1:], strict=True) if f] or self.step_seconds[1:]
        return self.step_seconds[0] - statistics.fmean(same)

    refresh_every: int = 1
    step_marks: list[int] = field(default_factory=list)  # TensorRecorder marks after each step (profiled runs)

    @property
    def step_growth(self) -> float:
        """RSS growth per step between steps of the same kind (see :func:`same_kind_growth`)."""
        return same_kind_growth(self.step_rss, self.refresh_every)


def same_kind_growth(values: Sequence[int], refresh_every: int) -> float:
    """Growth per step of a per-step quantity between steps of the same kind (fresh or reused M); the larger one.

    Step 0 is left out (it allocates the run's working set) and a step is compared only with steps doing the same
    work, from the first such step to the last: without a leak a repeated step needs no more memory than its
    predecessor.
    """
    fresh = fresh_evaluations(len(values), refresh_every)
    growth = 0.0
    for kind in (True, False):
        idx = [i for i in range(1, len(values)) if fresh[i] is kind]
        if len(idx) >= 2:
            growth = max(growth, (values[idx[-1]] - values[idx[0]]) / (idx[-1] - idx[0]))
    return growth


@dataclass
class TensorProfile:
    """Exact tensor memory of one configuration, from two consecutive profiled runs (:func:`profile_runs`)."""

    peak: int  # largest live tensor bytes during the second run, above its start
    run_growth: int  # live bytes after the second run minus after the first (what each run leaves behind, growing)
    step_live: list[int]  # live bytes after each step of the second run, relative to its start
    refresh_every: int = 1

    @property
    def step_growth(self) -> float:
        """Live tensor bytes gained per step (see :func:`same_kind_growth`)."""
        return same_kind_growth(self.step_live, self.refresh_every)


def profile_runs(run: Callable[[TensorRecorder], RunStats], refresh_every: int, runs: int = 2) -> TensorProfile:
    """Consecutive runs under :func:`tensor_memory`; ``run(recorder)`` must mark after every step.

    With two runs (the default) the peak and per-step levels come from the second and ``run_growth`` is what it left
    behind beyond the first; with one run (full-size models, where every run costs minutes) the peak and levels come
    from that run and ``run_growth`` is 0 (not measured).
    """
    if runs not in (1, 2):
        raise ValueError(f"runs must be 1 or 2, got {runs}")
    with tensor_memory() as rec:
        first_end = rec.mark()
        if runs == 2:
            run(rec)
            first_end = rec.mark()
        second = run(rec)
        second_end = rec.mark()
    trace = rec.trace
    base = trace.at(first_end)
    return TensorProfile(
        peak=trace.peak(first_end, second_end),
        run_growth=trace.at(second_end) - base,
        step_live=[trace.at(i) - base for i in second.step_marks],
        refresh_every=refresh_every,
    )


@dataclass
class Measurement:
    """Interleaved whole-run measurements of several configurations on one model and latent size."""

    label: str
    size: int
    steps: int
    configs: list[str]
    runs: dict[str, list[RunStats]]
    rss_sequence: list[int]  # RSS after every run, in run order
    memory_available: bool
    sequence: list[str]  # names in run order (see :func:`bracketed`)
    tensors: dict[str, TensorProfile] = field(default_factory=dict)
    record_bytes: int = 0  # what the runtime's per-step diagnostics record is expected to keep (0: no records)
    graph_bytes: int = 0  # saved tensors of one conditional autograd graph, weights excluded (0: not measured)
    reference: str = "CFG"

    def step_times(self, name: str) -> list[float]:
        return [r.steady_step for r in self.runs[name]]

    def _bracketed(self, name: str, value: Callable[[RunStats], float]) -> list[tuple[float, float]]:
        """``(value of a run of name, mean value of the reference runs right before and after it)``, in run order."""
        seen: dict[str, int] = {}
        stats = []
        for n in self.sequence:
            stats.append((n, self.runs[n][seen.get(n, 0)]))
            seen[n] = seen.get(n, 0) + 1
        pairs = []
        for i, (n, run) in enumerate(stats):
            if n != name:
                continue
            around = [stats[j][1] for j in (i - 1, i + 1) if 0 <= j < len(stats) and stats[j][0] == self.reference]
            if around:
                pairs.append((value(run), statistics.fmean(value(r) for r in around)))
        return pairs

    def ratios(self, name: str) -> list[float]:
        """Steady step time over the reference's: each run against the reference runs bracketing it."""
        if name == self.reference:
            return [1.0] * len(self.runs[name])
        return [a / b for a, b in self._bracketed(name, lambda r: r.steady_step)]

    def tensor_over_reference(self, name: str) -> int:
        """Peak live tensor bytes minus the reference's."""
        return self.tensors[name].peak - self.tensors[self.reference].peak

    def extra_over_reference(self, name: str) -> list[float]:
        """Peak extra RSS minus the reference's (bracketing reference runs, as for :meth:`ratios`)."""
        if name == self.reference:
            return [0.0] * len(self.runs[name])
        return [a - b for a, b in self._bracketed(name, lambda r: r.peak_extra)]


@dataclass
class Breakdown:
    """Where a step's time goes: timed pieces, autograd graph sizes and peak memory of the pieces."""

    label: str
    size: int
    reps: int
    seconds: dict[str, Summary] = field(default_factory=dict)
    graph_bytes: dict[str, int] = field(default_factory=dict)
    peaks: dict[str, int] = field(default_factory=dict)  # peak live tensor bytes of single pieces
    notes: dict[str, str] = field(default_factory=dict)


def measurement_from_dict(data: dict) -> Measurement:
    """Rebuild a :class:`Measurement` from its ``dataclasses.asdict`` form (``bench_reg.py --json``).

    Fields added later (``graph_bytes``) take their defaults; results without a run order (written before CFG runs
    bracketed every other run) cannot give bracketed ratios and are refused.
    """
    if not data.get("sequence"):
        raise ValueError("no run order ('sequence'): written before the bracketed runs; re-run the benchmark")
    data = dict(data)
    data["runs"] = {name: [RunStats(**r) for r in runs] for name, runs in data["runs"].items()}
    data["tensors"] = {name: TensorProfile(**t) for name, t in data.get("tensors", {}).items()}
    return Measurement(**data)


def breakdown_from_dict(data: dict) -> Breakdown:
    """Rebuild a :class:`Breakdown` from its ``dataclasses.asdict`` form."""
    data = dict(data)
    data["seconds"] = {name: Summary(**v) for name, v in data["seconds"].items()}
    return Breakdown(**data)


@dataclass(frozen=True)
class Config:
    """One benchmarked configuration: plain CFG (``estimator`` None) or REG with this estimator and refresh."""

    name: str
    estimator: str | None = None
    refresh_every: int = 1


CONFIGS = (
    Config("CFG"),
    Config("REG vjp", "vjp"),
    Config("REG vjp-low-memory", "vjp-low-memory"),
    Config("REG gradient-free", "gradient-free"),
    Config("REG chain", "chain"),
    Config("REG vjp k=2", "vjp", 2),
    Config("REG gradient-free k=2", "gradient-free", 2),
    Config("REG vjp k=4", "vjp", 4),
    Config("REG gradient-free k=4", "gradient-free", 4),
)


RunFn = Callable[[Config, int, PeakMemory | None, TensorRecorder | None], RunStats]


def measure_configs(
    label: str,
    size: int,
    steps: int,
    configs: Sequence[Config],
    repeats: int,
    run: RunFn,
    *,
    profiled: int = 2,
    memory: PeakMemory | None = None,
    **extra: int,
) -> Measurement:
    """The timed runs, bracketed by CFG (see :func:`bracketed`), then ``profiled`` profiled runs of each configuration
    (0: none, the tensor columns read n/a; 1 or 2: see :func:`profile_runs`).

    ``run(config, seed, memory, recorder)`` samples once; ``memory`` is the per-run peak probe (default: the RSS
    high-water mark, :class:`PeakMemory`; on a GPU :class:`CudaPeakMemory`); ``extra`` fills Measurement's remaining
    fields (``record_bytes``, ``graph_bytes``).
    """
    if profiled not in (0, 1, 2):
        raise ValueError(f"profiled must be 0, 1 or 2, got {profiled}")
    memory = PeakMemory() if memory is None else memory
    by_name = {c.name: c for c in configs}
    runs: dict[str, list[RunStats]] = {c.name: [] for c in configs}
    rss_sequence = []  # the RSS after each run (freed memory released), in run order
    sequence = [name for _, name in bracketed(list(by_name), "CFG", repeats)]
    for index, name in enumerate(sequence):
        stats = run(by_name[name], index, memory if memory.available else None, None)
        runs[name].append(stats)
        rss_sequence.append(stats.rss_after)
        log.info("%s %dx%d run %d/%d %s: %.2f s/step", label, size, size, index + 1, len(sequence), name,
                 stats.steady_step)  # fmt: skip
    tensors = {}
    if profiled:
        for c in configs:
            log.info("%s %dx%d: profiled run(s) of %s", label, size, size, c.name)
            tensors[c.name] = profile_runs(lambda recorder, c=c: run(c, 0, None, recorder), c.refresh_every, profiled)
    return Measurement(
        label,
        size,
        steps,
        configs=list(by_name),
        runs=runs,
        rss_sequence=rss_sequence,
        memory_available=memory.available,
        sequence=sequence,
        tensors=tensors,
        **extra,
    )
