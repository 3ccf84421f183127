"""REG's cost per sampling step and its peak memory, next to plain CFG, measured in one run.

    ./dev bench                       # = .venv/bin/python bench/bench_reg.py
    ./dev bench --sizes 32 --repeats 5 --models sd15

**With ComfyUI** (found like the integration tests do, through tests/integration/locate.py: ``COMFYUI_PATH``, the
``ComfyUI/custom_nodes/<pack>`` layout, or ``~/ComfyUI``) the script re-executes itself under ComfyUI's interpreter,
imports ComfyUI in-process, loads this pack through ComfyUI's own custom-node loader and samples with
``comfy.sample.sample`` (what KSampler calls: euler, normal schedule, cfg 4, batch 1) on the tiny random-weight models
of tests/integration/tiny_models.py (SD1.5-shaped UNet, 36.7M parameters, EPS; SD3 MMDiT at depth 6, 33M parameters,
flow), built on first use and cached in tests/.models/. REG is applied through the pack's ``REGGuidance`` node class.
**Without ComfyUI** (or with ``--core``) it runs the same configurations with the pure-torch core (reg_core.rectify)
on a small random conv denoiser (bench/core_bench.py).

Configurations: CFG; REG vjp, gradient-free and chain; vjp and gradient-free with ``refresh_every`` 2 and 4. Latent
sizes are in latent pixels (``--sizes 32 64`` = 32x32 and 64x64 latents, i.e. 256² and 512² images for SD1.5).

Timing. Every configuration runs ``--repeats`` times after one short warm-up round, with a CFG run between every two
runs: CFG A CFG B CFG C … CFG, the others' order rotating from repeat to repeat. A run's step time is the mean over
steps 1…S−1 from the sampler's per-step callback; step 0 also carries the run's setup and is reported separately
("run setup"). With ``refresh_every`` k the timed steps contain fresh and reused evaluations in the proportion
1 : k−1 (``--steps`` S must have S − 1 a multiple of 4; by default 5 steps for the ComfyUI models, 17 for the core
denoiser, whose steps take milliseconds). Each run's ratio to CFG is taken against the mean of the two CFG runs
bracketing it and summarised as median [min–max], so a drifting, shared machine shows up as a wide range rather than
as a bias.

Peak memory. CPU tensors live in ``malloc``ed memory, which ``tracemalloc`` does not see. Two measures, each sound
for what it answers:

- *Live tensor bytes* (the activation-memory targets, growth): two extra, untimed runs per configuration under the
  PyTorch profiler with ``profile_memory=True``. Every CPU tensor allocation and free is an event carrying the
  allocator's running total, so the peak above the run's start, the live bytes after every step (marked from the
  sampler's callback) and what a run leaves behind are exact and deterministic, independent of how ``malloc``
  recycles pages. The size of one conditional activation graph is measured exactly too, by summing the storages
  autograd saves for backward (``saved_tensors_hooks``, weights excluded), once per model and size (untimed).
- *Resident set* (what the operating system sees, allocator slack included) in every timed run: before the run the
  script returns freed heap memory to the kernel (``gc`` + glibc ``malloc_trim``), resets the kernel's RSS high-water
  mark (``/proc/self/clear_refs`` ← 5, Linux ≥ 4.0) and reads the RSS; after the run it reads ``VmHWM``. The kernel
  records the high-water mark at page granularity, so no short peak is missed (unlike polling with psutil), and the
  reset gives a per-run peak inside one process, so configurations can be interleaved; isolated subprocesses would
  pay a ComfyUI import (10–20 s) per configuration and their ``ru_maxrss`` would include the model-loading peak.
  Without ``clear_refs`` the RSS columns read n/a. glibc's arenas make this figure noisy (tens of MiB at 64²); read
  the tensor columns for activation memory.

Where the time goes. ``--breakdown-reps`` times the pieces of a step (CFG's batched cond+uncond pass; cond alone;
uncond alone in three grad modes; the finite-difference probe alone; the runtime's gradient-free pass, cond+uncond+probe
batched (batch 3); the cond pass with a graph and its backward; the same for a batch-2 cond+uncond graph; backward with
the weights requiring grad) inside a real sampling context, through ``comfy.samplers.calc_cond_batch`` with a real
guider's processed conds. The pure-torch core times the same pieces where they exist (uncond in inference mode only).

``--threads N`` sets torch's intra-op threads (default: torch's choice). On a machine shared with other jobs, one
thread per process gives far steadier timings (OpenMP threads spin at barriers when descheduled).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # appended: ComfyUI's own ``nodes`` module must win over the pack's ``nodes`` package
sys.path.insert(0, str(REPO / "tests" / "integration"))

import locate  # noqa: E402

log = logging.getLogger("bench_reg")
REEXEC_FLAG = "REG_BENCH_UNDER_COMFYUI"
# Steps per run: S − 1 timed steps, a multiple of 4 so refresh_every 2 and 4 see their exact fresh/reused mix.
DEFAULT_STEPS = {"sd15": 5, "sd3": 5, "core": 17}
DEFAULT_MODELS = ["sd15", "sd3"]
REAL_MODELS = ["sd15", "sdxl", "sd35m", "flux"]
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument(
        "--models",
        nargs="+",
        choices=sorted({*DEFAULT_MODELS, *REAL_MODELS}),
        help=f"ComfyUI only: tiny models {DEFAULT_MODELS} (default both); with --real-size {REAL_MODELS} "
        "(default sd15)",
        metavar="MODEL",
    )
    parser.add_argument(
        "--sizes", nargs="+", type=int, help="latent sizes in latent pixels (default 32 64; --real-size: per model)"
    )
    real = parser.add_argument_group("real sizes (bench/real_size.py)")
    real.add_argument("--real-size", action="store_true", help="full-size random-weight networks (see real_size.py)")
    real.add_argument("--tiny", action="store_true", help="with --real-size: tiny networks of the same classes")
    real.add_argument("--dtype", choices=sorted(DTYPES), help="weight dtype (default: sd15 fp32, others bf16 on CPU)")
    real.add_argument(
        "--flux-depth", nargs=2, type=int, metavar=("DOUBLE", "SINGLE"), help="Flux blocks (default CPU 2 4, GPU 19 38)"
    )
    real.add_argument("--precision-size", type=int, help="latent size of the M precision rows (0: skip)")
    real.add_argument("--profiled", type=int, choices=[0, 1, 2], default=1, help="profiled runs per config (CPU)")
    real.add_argument("--graph", action="store_true", help="also measure one conditional graph's size (one forward)")
    real.add_argument("--exact", action="store_true", help="also the exactness check on sdxl and flux")
    real.add_argument("--markdown", type=Path, help="also write the real-size report as markdown here")
    real.add_argument(
        "--gpu-plan", action="store_true", help="the GPU check's plan (bench/gpu_carry.py; ./dev bench --gpu)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        help="sampling steps per run, step 0 not timed; steps - 1 must be a multiple of 4 (default: 5 for the SD1.5 "
        "UNet and the SD3 MMDiT, 17 for the core denoiser, whose steps take milliseconds)",
    )
    parser.add_argument(
        "--repeats", type=int, help="interleaved repeats per configuration (default 3; --real-size 1, --gpu-plan 2)"
    )
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps of the untimed warm-up run (0: none)")
    parser.add_argument("--breakdown-reps", type=int, default=3, help="repeats of each piece (0: skip)")
    parser.add_argument("--configs", nargs="+", metavar="NAME", help="subset of configurations (default: all)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument(
        "--attention", choices=["default", "pytorch", "split"], help="ComfyUI only: its attention (default: default)"
    )
    parser.add_argument("--core", action="store_true", help="the pure-torch benchmark even if ComfyUI is found")
    parser.add_argument("--json", type=Path, help="also write every raw measurement here (e.g. bench/results/)")
    parser.add_argument("--report", type=Path, metavar="JSON", help="only print the tables of a --json file again")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse and check the arguments that need no torch (the re-exec decision comes before torch is imported)."""
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = (2 if args.gpu_plan else 1) if args.real_size else 3
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.real_size:
        if args.models and set(args.models) - set(REAL_MODELS):
            parser.error(f"--real-size models are {REAL_MODELS}")
        if args.steps is not None and (args.steps < 3 or (args.steps - 1) % 2):
            parser.error("--real-size --steps must be 3, 5, 7, …: step 0 is not timed and refresh_every 2 needs pairs")
        return args
    if args.models and set(args.models) - set(DEFAULT_MODELS):
        parser.error(f"the tiny-model benchmark's models are {DEFAULT_MODELS}; the others need --real-size")
    if args.steps is not None and (args.steps < 5 or (args.steps - 1) % 4):
        parser.error(
            "--steps must be 5, 9, 13, …: step 0 is not timed, and the timed steps (steps - 1) must be a multiple of 4 "
            "so refresh_every 2 and 4 see their exact fresh/reused mix"
        )
    return args


def check_configs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check ``--configs`` against the known configurations (imports torch) and make sure CFG, the reference, runs."""
    from bench.benchlib import CONFIGS

    names = [c.name for c in CONFIGS]
    if args.configs is None:
        from bench.real_size import REAL_CONFIGS

        args.configs = list(REAL_CONFIGS) if args.real_size else names
    unknown = set(args.configs) - set(names)
    if unknown:
        parser.error(f"unknown configurations {sorted(unknown)}; choose from {names}")
    if "CFG" not in args.configs:
        args.configs.insert(0, "CFG")  # every ratio is to CFG


def comfyui_interpreter() -> tuple[Path | None, str | None, str]:
    comfyui, reason = locate.find_comfyui()
    if comfyui is None:
        return None, None, reason
    python, reason = locate.find_interpreter(comfyui)
    return comfyui, python, reason


def maybe_reexec(core: bool, argv: list[str]) -> Path | None:
    """Return ComfyUI's path when this process should benchmark it; re-exec under its interpreter when needed."""
    if core:
        return None
    comfyui, python, reason = comfyui_interpreter()
    if comfyui is None or python is None:
        log.warning("ComfyUI not usable (%s): running the pure-torch core benchmark instead", reason)
        return None
    if os.environ.get(REEXEC_FLAG) == "1" or Path(sys.executable) == Path(python):
        return comfyui
    log.info("re-running under ComfyUI's interpreter %s", python)
    env = {**os.environ, REEXEC_FLAG: "1"}
    sys.stdout.flush()
    os.execve(python, [python, str(Path(__file__).resolve()), *argv], env)
    return None  # not reached


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_comfyui(args: argparse.Namespace, comfyui: Path) -> tuple[list, list, str]:
    from bench import comfy_bench, report
    from bench.benchlib import CONFIGS

    try:
        bench = comfy_bench.ComfyBench(comfyui, args.attention or "default")
    except ImportError as exc:
        raise SystemExit(
            f"ComfyUI at {comfyui} does not import with {sys.executable} ({exc}); fix that install, point "
            "COMFYUI_PATH/COMFYUI_PYTHON elsewhere, or run the pure-torch benchmark with --core"
        ) from exc
    configs = [c for c in CONFIGS if c.name in args.configs]
    header = f"ComfyUI at {comfyui}; attention {bench.attention}; pack loaded as {bench.pack.module_name}"
    write(header + "\n\n")
    measurements, breakdowns = [], []
    for key in args.models or DEFAULT_MODELS:
        fam = bench.family(key)
        sizes = args.sizes or [32, 64]
        write(f"{fam.label}: {fam.params / 1e6:.2f}M parameters\n")
        for size in sizes:
            if args.breakdown_reps > 0:
                b = bench.breakdown(fam, size, args.breakdown_reps)
                breakdowns.append(b)
                write(report.breakdown_table(b))
            m = bench.measure(
                fam,
                size,
                configs,
                steps=args.steps or DEFAULT_STEPS[key],
                repeats=args.repeats,
                warmup_steps=args.warmup_steps,
            )
            measurements.append(m)
            write(report.measurement_table(m))
    return measurements, breakdowns, header


def run_core(args: argparse.Namespace) -> tuple[list, list, str]:
    from bench import core_bench, report
    from bench.benchlib import CONFIGS

    bench = core_bench.CoreBench()
    configs = [c for c in CONFIGS if c.name in args.configs]
    header = f"pure-torch core benchmark (no ComfyUI): {bench.describe()}"
    write(header + "\n\n")
    measurements, breakdowns = [], []
    for size in args.sizes or [32, 64]:
        if args.breakdown_reps > 0:
            b = bench.breakdown(size, args.breakdown_reps)
            breakdowns.append(b)
            write(report.breakdown_table(b))
        steps = args.steps or DEFAULT_STEPS["core"]
        m = bench.measure(size, configs, steps=steps, repeats=args.repeats, warmup_steps=args.warmup_steps)
        measurements.append(m)
        write(report.measurement_table(m))
    return measurements, breakdowns, header


def real_size_plan(args: argparse.Namespace, gpu: bool):
    """The :class:`bench.real_size.Plan` of the command line (defaults per device, see bench/README.md)."""
    import torch

    from bench import real_size

    models = args.models or (["sdxl", "flux", "sd15", "sd35m"] if gpu else ["sd15"])
    tiny_sizes = {key: [8] for key in models}
    sizes = (
        {key: args.sizes for key in models} if args.sizes else (tiny_sizes if args.tiny else real_size.DEFAULT_SIZES)
    )
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    if dtype is None and not gpu and not args.tiny:
        dtype = None if models == ["sd15"] else torch.bfloat16  # the CPU rows: SD1.5 fp32, the rest bf16
    depth = tuple(args.flux_depth) if args.flux_depth else (real_size.FLUX_FULL_DEPTH if gpu else (2, 4))
    return real_size.Plan(
        models=models,
        sizes={key: sizes[key] for key in models},
        configs=args.configs,
        steps=args.steps or (5 if gpu else 3),
        repeats=args.repeats,
        tiny=args.tiny,
        dtype=dtype,
        flux_depth=depth,
        precision_size=args.precision_size,
        profiled=args.profiled,
        graph=args.graph,
        exact=args.exact or gpu,
        exact_fp32=gpu,
    )


def run_real_size(args: argparse.Namespace, comfyui: Path, device: str = "cpu") -> dict:
    """Full-size (or ``--tiny``) networks through ComfyUI: the tables of bench/real_size.py; returns the raw results."""
    from bench import comfy_bench, real_size, report
    from bench.benchlib import environment_line

    bench = comfy_bench.ComfyBench(comfyui, args.attention or "default", device)
    plan = real_size_plan(args, device == "gpu" or args.gpu_plan)
    machine = f"{machine_line(device)}; {environment_line()}; ComfyUI at {comfyui}; {bench.memory_mode}"
    write(f"{machine}\nplan: {plan}\n\n")
    out = real_size.run(bench, plan, write)
    out["machine"] = machine
    out["markdown"] = report.real_size_markdown(
        machine, out["models"], out["measurements"], out["precision"], out["exactness"]
    )
    write("\n" + out["markdown"])
    return out


def machine_line(device: str) -> str:
    """The processor or GPU the numbers were measured on."""
    import platform

    import torch

    if device == "gpu" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"GPU {props.name} ({props.total_memory / 2**30:.0f} GiB), torch CUDA {torch.version.cuda}"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            name = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), name)
    except OSError:
        pass
    return f"CPU {name}, {os.cpu_count()} cores"


def write_results(out: dict, json_path: Path | None, markdown_path: Path | None, args: argparse.Namespace) -> None:
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "machine": out["machine"],
            "args": {k: str(v) for k, v in vars(args).items()},
            "models": out["models"],
            "measurements": [asdict(m) for m in out["measurements"]],
            "precision": [asdict(p) for p in out["precision"]],
            "exactness": [{**asdict(e), "ok": e.ok} for e in out["exactness"]],
        }
        json_path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    if markdown_path is not None:
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        markdown_path.write_text(out["markdown"])


def reprint(path: Path) -> int:
    """Print the tables and targets of a ``--json`` file again (e.g. after changing the report's format)."""
    from bench import report
    from bench.benchlib import breakdown_from_dict, measurement_from_dict

    try:
        payload = json.loads(path.read_text())
        measurements = [measurement_from_dict(m) for m in payload["measurements"]]
        breakdowns = [breakdown_from_dict(b) for b in payload["breakdowns"]]
    except (OSError, ValueError) as exc:
        raise SystemExit(f"cannot re-print {path}: {exc}") from None
    write(f"REG benchmark (from {path}): {payload['environment']}\n{payload['header']}\n\n")
    for b in breakdowns:
        write(report.breakdown_table(b))
        for m in measurements:
            if (m.label, m.size) == (b.label, b.size):
                write(report.measurement_table(m))
    shown = {(b.label, b.size) for b in breakdowns}
    for m in measurements:
        if (m.label, m.size) not in shown:
            write(report.measurement_table(m))
    write(report.targets_table(report.check_targets(measurements)))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")  # ComfyUI logs every model load
    log.setLevel(logging.INFO)
    argv = sys.argv[1:] if argv is None else argv
    parser = make_parser()
    args = parse_args(parser, argv)
    if args.report is not None:
        return reprint(args.report)
    comfyui = maybe_reexec(args.core, argv)  # before importing torch here: the other interpreter imports its own
    check_configs(parser, args)
    if comfyui is None:
        ignored = [flag for flag, value in (("--models", args.models), ("--attention", args.attention)) if value]
        if ignored:
            log.warning("%s only apply to the ComfyUI benchmark: ignored by the pure-torch core", " and ".join(ignored))
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from bench import report
    from bench.benchlib import environment_line

    start = time.perf_counter()
    write(f"REG benchmark: {environment_line()}\n")
    if args.real_size:
        if comfyui is None:
            raise SystemExit("--real-size needs ComfyUI (COMFYUI_PATH, see tests/integration/locate.py)")
        out = run_real_size(args, comfyui, os.environ.get("REG_BENCH_DEVICE", "cpu"))
        write_results(out, args.json, args.markdown, args)
        write(f"total {time.perf_counter() - start:.0f} s\n")
        failed = [e for e in out["exactness"] if not e.ok]
        return 1 if failed else 0
    if comfyui is not None:
        measurements, breakdowns, header = run_comfyui(args, comfyui)
    else:
        measurements, breakdowns, header = run_core(args)
    write(report.targets_table(report.check_targets(measurements)))
    write(f"total {time.perf_counter() - start:.0f} s\n")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "environment": environment_line(),
            "header": header,
            "args": {k: str(v) for k, v in vars(args).items()},
            "measurements": [asdict(m) for m in measurements],
            "breakdowns": [asdict(b) for b in breakdowns],
        }
        args.json.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
