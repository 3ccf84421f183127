"""Tables and target checks of ``bench_reg.py`` (plain text; every figure a median with its [min–max])."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from bench.benchlib import CONFIGS, MIB, Breakdown, Measurement, Summary, format_table

KIB = 1024

# Targets of issue 5 (CPU, ratios to CFG in the same run).
VJP_MAX_RATIO = 1.55
GF_MAX_RATIO = 1.5
GF_K2_MAX_RATIO = 1.25
# Peak tensor memory over CFG's. Exact REG (vjp, chain) may hold one conditional autograd graph. Gradient-free holds
# none, but its one batch-3 pass (cond, uncond, probe) keeps one more sample's inference activations alive than CFG's
# batch-2 pass, about half of CFG's peak: its extra may be at most this fraction of CFG's own tensor peak, or the
# allocator's noise floor.
GF_EXTRA_FRACTION = 0.6
GF_MEMORY_FLOOR = 1 * MIB
MEMORY_RULES = (
    "memory targets (live tensor bytes above CFG's peak): exact REG (vjp, chain) may hold one conditional autograd "
    "graph, measured per model and size (chain keeps it through the uncond pass, so that pass's activations count "
    "too); gradient-free keeps no graph, only one more sample's inference activations in its batch-3 pass: "
    f"extra <= max({GF_EXTRA_FRACTION:g} x CFG's tensor peak, {GF_MEMORY_FLOOR / MIB:g} MiB)\n"
)
EXACT_ESTIMATORS = ("vjp", "vjp-low-memory", "chain")
# Growth limits on live tensor bytes (exact): the per-step diagnostics record (M's statistics and a map of at most
# 48x48 per channel, kept for the REGDiagnostics node) is the only thing a run is meant to accumulate; its few
# per-sample statistics add well under 1 KiB. Nothing may grow from run to run.
RECORD_SLACK = 1024
RUN_GROWTH_LIMIT = 0


def _mib(values: list[int] | list[float]) -> str:
    return Summary.of(values).format(".1f", MIB)


def measurement_table(m: Measurement) -> str:
    """Per configuration: step time, ratio to the bracketing CFG runs, exact tensor memory (peak, vs CFG, growth),
    peak RSS."""
    rows = []
    ref = m.tensors.get(m.reference)
    for name in m.configs:
        runs = m.runs[name]
        ratio = "1" if name == m.reference else Summary.of(m.ratios(name)).format(".2f")
        tensor = m.tensors.get(name)
        if tensor is not None and ref is not None:
            t_peak = f"{tensor.peak / MIB:.1f}"
            t_over = f"{(tensor.peak - ref.peak) / MIB:+.1f}"
            growth = f"{tensor.step_growth / KIB:+.1f} / {tensor.run_growth / KIB:+.1f}"
        else:
            t_peak = t_over = growth = "n/a"
        if m.memory_available:
            rss = _mib([r.peak_extra for r in runs])
            rss_over = "0" if name == m.reference else _mib(m.extra_over_reference(name))
        else:
            rss = rss_over = "n/a"
        setup = Summary.of([r.setup for r in runs]).format(".2f")
        rows.append(
            [name, Summary.of(m.step_times(name)).format(".3f"), ratio, t_peak, t_over, growth, rss, rss_over, setup]
        )
    headers = [
        "configuration",
        "s/step",
        "x CFG (bracketed)",
        "tensor peak MiB",
        "vs CFG",
        "growth KiB /step /run",
        "RSS peak MiB",
        "RSS vs CFG",
        "run setup s",
    ]
    repeats = min(len(runs) for runs in m.runs.values())  # the reference runs between all the others
    title = (
        f"{m.label}, latent {m.size}x{m.size}, batch 1: {m.steps} steps per run "
        f"(s/step = mean of steps 1..{m.steps - 1}), {repeats} repeats with a CFG run between every two runs; "
        "median [min-max]"
    )
    notes = (
        "tensor peak: live tensor bytes above the run's start (profiled run, exact); growth: live tensor bytes gained "
        "per step (same-kind steps) / by one more run; RSS: resident-set high-water mark above the run's start "
        "(timed runs)\n"
    )
    if m.record_bytes:
        notes += f"expected per-step growth: the diagnostics record's M map, {m.record_bytes / KIB:.1f} KiB\n"
    if m.graph_bytes:
        notes += f"one conditional autograd graph (saved tensors, weights excluded): {m.graph_bytes / MIB:.1f} MiB\n"
    return format_table(headers, rows, title=title) + notes + growth_line(m) + "\n"


def growth_line(m: Measurement) -> str:
    steps = [r.step_growth for runs in m.runs.values() for r in runs]
    seq = m.rss_sequence
    return (
        f"RSS growth: within runs (same-kind steps) max {max(steps) / MIB:+.1f} MiB; across {len(seq)} timed runs "
        f"(RSS after each run, freed memory released) {seq[0] / MIB:.0f} -> {seq[-1] / MIB:.0f} MiB "
        f"({(seq[-1] - seq[0]) / MIB:+.1f} MiB)\n"
    )


def breakdown_table(b: Breakdown) -> str:
    """Median seconds of each piece, relative to a plain cond forward; graph sizes and peak memory of pieces."""
    cond = b.seconds["cond"].median
    rows = [[name, s.format(".1f", 1e-3), f"{s.median / cond:.2f}"] for name, s in b.seconds.items()]
    title = f"where the time goes: {b.label}, latent {b.size}x{b.size}, {b.reps} interleaved repeats"
    out = format_table(["piece", "ms", "x cond fwd"], rows, title=title)
    out += "autograd graph (saved tensors, weights excluded): " + ", ".join(
        f"{k} {v / MIB:.1f} MiB" for k, v in b.graph_bytes.items()
    )
    out += "\n"
    if b.peaks:
        out += "peak live tensor memory of single pieces: "
        out += ", ".join(f"{k} {v / MIB:.1f} MiB" for k, v in b.peaks.items()) + "\n"
    for key, value in b.notes.items():
        out += f"{key}: {value}\n"
    model = step_model(b)
    if model:
        rows = [[name, f"{value:.2f}"] for name, value in model.items()]
        out += format_table(["step assembled from the pieces", "x CFG pass"], rows)
    return out + "\n"


def step_model(b: Breakdown) -> dict[str, float]:
    """Step costs predicted from the pieces (medians), relative to CFG's batched pass.

    The runtime's steps are: CFG = batched pass; vjp = cond with graph + backward + uncond; gradient-free = one
    batched pass of cond, uncond and the probe (with a ControlNet: the batched pass, then the probe alone). The
    alternative shows what differentiating a batched cond+uncond pass (the authors' code) would cost.
    """
    sec = {k: v.median for k, v in b.seconds.items()}
    base = sec.get("cond+uncond, batched (CFG's pass)")
    need = [
        "cond with graph",
        "backward (cond with graph)",
        "uncond (inference_mode)",
        "FD probe: cond at x+h",
        "cond+uncond+probe, batched (batch 3)",
    ]
    if base is None or any(k not in sec for k in need):
        return {}
    vjp = sec["cond with graph"] + sec["backward (cond with graph)"] + sec["uncond (inference_mode)"]
    gf = sec["cond+uncond+probe, batched (batch 3)"]
    out = {
        "CFG: batched cond+uncond": 1.0,
        "vjp (runtime): cond graph + backward + uncond": vjp / base,
        "gradient-free (runtime): batch 3 with the probe": gf / base,
        "gradient-free with a ControlNet: batched + probe": (base + sec["FD probe: cond at x+h"]) / base,
        "vjp k=2: (fresh + batched) / 2": (vjp + base) / 2 / base,
        "gradient-free k=2: (fresh + batched) / 2": (gf + base) / 2 / base,
    }
    b2 = "cond+uncond with graph (batch 2)"
    if b2 in sec:
        alt = sec[b2] + sec[f"backward ({b2})"]
        out["alt. vjp: uncond batched into the graph pass"] = alt / base
    return out


@dataclass
class Target:
    what: str
    where: str
    measured: str
    met: bool | None  # None: not measurable in this run


def _median_ratio(m: Measurement, name: str) -> float | None:
    return statistics.median(m.ratios(name)) if name in m.runs else None


def check_targets(measurements: list[Measurement]) -> list[Target]:
    """Issue 5's targets, per model and latent size (medians of bracketed ratios; exact tensor memory)."""
    estimators = {c.name: c.estimator for c in CONFIGS}
    out: list[Target] = []
    for m in measurements:
        where = f"{m.label} {m.size}x{m.size}"
        for name, limit in (
            ("REG vjp", VJP_MAX_RATIO),
            ("REG gradient-free", GF_MAX_RATIO),
            ("REG gradient-free k=2", GF_K2_MAX_RATIO),
        ):
            ratio = _median_ratio(m, name)
            if ratio is not None:
                out.append(Target(f"{name} step <= {limit}x CFG", where, f"{ratio:.3f}x", ratio <= limit))
        ref = m.tensors.get(m.reference)
        for name in m.tensors:
            estimator = estimators.get(name)
            if ref is None or estimator is None:
                continue
            over = m.tensor_over_reference(name)
            if estimator in EXACT_ESTIMATORS:
                what = f"{name} peak <= CFG + one cond graph"
                if m.graph_bytes:
                    measured = f"{over / MIB:+.1f} MiB tensors vs CFG; graph {m.graph_bytes / MIB:.1f} MiB"
                    out.append(Target(what, where, measured, over <= m.graph_bytes))
                else:
                    out.append(Target(what, where, "graph not measured", None))
            elif estimator == "gradient-free":
                limit = max(GF_EXTRA_FRACTION * ref.peak, GF_MEMORY_FLOOR)
                out.append(
                    Target(
                        f"{name}: no graph, extra <= one sample's activations",
                        where,
                        f"{over / MIB:+.2f} MiB tensors vs CFG (limit {limit / MIB:.1f} MiB)",
                        over <= limit,
                    )
                )
        if m.tensors:
            worst_step = max(m.tensors.items(), key=lambda kv: kv[1].step_growth)
            worst_run = max(m.tensors.items(), key=lambda kv: kv[1].run_growth)
            limit = m.record_bytes + RECORD_SLACK
            out.append(
                Target(
                    "no per-step memory growth beyond the diagnostics record",
                    where,
                    f"max {worst_step[1].step_growth / KIB:+.1f} KiB/step ({worst_step[0]}); "
                    f"record {m.record_bytes / KIB:.1f} KiB",
                    worst_step[1].step_growth <= limit,
                )
            )
            out.append(
                Target(
                    "no per-run memory growth",
                    where,
                    f"max {worst_run[1].run_growth / KIB:+.1f} KiB/run ({worst_run[0]})",
                    worst_run[1].run_growth <= RUN_GROWTH_LIMIT,
                )
            )
    return out


def targets_table(targets: list[Target]) -> str:
    rows = [[t.what, t.where, t.measured, {True: "met", False: "MISSED", None: "n/a"}[t.met]] for t in targets]
    table = format_table(["target", "where", "measured (median)", "verdict"], rows, title="targets")
    return table + MEMORY_RULES + "\n"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table (first column left-aligned, the rest right-aligned), ending in a newline."""
    if any(len(r) != len(headers) for r in rows):
        raise ValueError("every row needs one cell per header")

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    align = "|---|" + "---:|" * (len(headers) - 1)
    return "\n".join([line(headers), align, *(line(r) for r in rows)]) + "\n"


def signed_size(n: float) -> str:
    """``+1.50 GiB`` from 1 GiB on, else ``+3.8 MiB`` (tiny networks' memory would read +0.00 GiB)."""
    return f"{n / 2**30:+.2f} GiB" if abs(n) >= 2**30 else f"{n / MIB:+.1f} MiB"


def memory_over_reference(m: Measurement, name: str) -> tuple[float, str]:
    """Peak memory of ``name`` above the reference's, and what it measures: exact live tensors when profiled, else the
    median of the bracketed per-run peaks (RSS on the CPU, the CUDA allocator's peak on a GPU)."""
    if name in m.tensors and m.reference in m.tensors:
        return float(m.tensor_over_reference(name)), "tensors"
    if name == m.reference:
        return 0.0, "run peak"
    return statistics.median(m.extra_over_reference(name)), "run peak"


def real_size_rows(m: Measurement) -> list[list[str]]:
    """Rows of the real-size table for one model and size: step time, ratio to CFG and to vjp, peak above CFG."""
    vjp = _median_ratio(m, "REG vjp")
    rows = []
    for name in m.configs:
        ratio = 1.0 if name == m.reference else statistics.median(m.ratios(name))
        over_vjp = f"{ratio / vjp:.2f}" if vjp and name != m.reference else ""
        over, _kind = memory_over_reference(m, name)
        rows.append([name, f"{statistics.median(m.step_times(name)):.3f}", f"{ratio:.2f}", over_vjp, signed_size(over)])
    return rows


def real_size_markdown(machine: str, models: list[str], measurements: list[Measurement], precision: list,
                       exactness: list) -> str:  # fmt: skip
    """The real-size report as markdown: what ran on what, then the tables (timings, precision, exactness)."""
    out = [f"Measured on: {machine}", ""]
    out += [f"- {desc}" for desc in models]
    out.append("")
    for m in measurements:
        kind = memory_over_reference(m, m.configs[-1])[1]
        what = "exact live tensor bytes (profiled run)" if kind == "tensors" else "median of the per-run peaks"
        repeats = min(len(r) for r in m.runs.values())
        out.append(
            f"**{m.label}, latent {m.size}x{m.size} (image {8 * m.size}²), batch 1**: {m.steps} steps per run, "
            f"s/step over steps 1..{m.steps - 1}, {repeats} repeat(s), each run against the CFG runs around it; "
            f"memory: {what}, above CFG's peak"
        )
        out.append("")
        out.append(markdown_table(["configuration", "s/step", "x CFG", "x vjp", "peak vs CFG"], real_size_rows(m)))
    if precision:
        rows = [precision_cells(p) for p in precision]
        out.append("**M in 16-bit compute vs float32** (same weights and input; cosine, relative L2 error)")
        out.append("")
        headers = ["model", "latent", "compute", "vjp cos", "vjp rel. L2", "gradient-free cos", "gradient-free rel. L2"]
        out.append(markdown_table(headers, rows))
    if exactness:
        rows = [exactness_cells(e)[:-1] for e in exactness]
        out.append("**Exactness: one REG step vs the independent autograd reference** (relative L2 errors)")
        out.append("")
        headers = ["model", "latent", "estimator", "compute", "output", "REG's correction", "tolerance", "verdict"]
        out.append(markdown_table(headers, rows))
    return "\n".join(out) + "\n"


def precision_cells(p) -> list[str]:
    """model, latent, compute dtype, then (cosine, relative L2) of the vjp M and of the gradient-free M."""
    return [p.label, f"{p.size}x{p.size}", p.dtype, f"{p.vjp[0]:.5f}", f"{p.vjp[1]:.2%}", f"{p.gradient_free[0]:.5f}",
            f"{p.gradient_free[1]:.2%}"]  # fmt: skip


def exactness_cells(e) -> list[str]:
    """model, latent, estimator, compute dtype, output and correction errors, tolerance, verdict, seconds."""
    return [e.label, f"{e.size}x{e.size}", e.estimator, e.compute, f"{e.output_rel:.1e}", f"{e.effect_rel:.1e}",
            f"{e.tolerance:.0e}", "ok" if e.ok else "FAILED", f"{e.seconds:.1f}"]  # fmt: skip


def precision_table(rows: list) -> str:
    table = [precision_cells(p) for p in rows]
    headers = ["model", "latent", "compute", "vjp cos", "vjp rel L2", "grad-free cos", "grad-free rel L2"]
    return format_table(headers, table, title="M in 16-bit compute vs float32, same weights and input") + "\n"


def exactness_table(rows: list) -> str:
    table = [exactness_cells(e) for e in rows]
    headers = ["model", "latent", "estimator", "compute", "output rel", "REG effect rel", "tolerance", "verdict", "s"]
    return format_table(headers, table, title="exactness: one REG step vs the independent reference") + "\n"
