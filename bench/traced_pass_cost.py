"""What the traced pass's switches cost: one exact M (forward + VJP) on a full-size random SD1.5 or SDXL UNet.

Modes, all on the same network, input and conditioning:
- ``cfg``: the batched positive+negative forward in inference mode that a CFG step runs;
- ``plain``: autograd on, nothing switched (what exact REG did before today's models needed more; SD1.5 needs
  nothing more);
- ``traced``: the pack's :class:`nodes.traced_pass.TracedPass` (``in_training``, the saved-tensor guard, the gradient
  audit) — what ``vjp`` runs;
- ``low-memory``: the same with per-block recomputation — what ``vjp-low-memory`` runs.

Time: the modes (``--time-modes``, default plain, traced, low-memory) alternate in one process, ``--repeats`` rounds
after one untimed forward, median seconds and the ratio to the first. Memory: each mode in its own process, the
kernel's resident-set high-water mark during the pass above the level after a warm-up forward
(``/proc/self/clear_refs`` resets it). It also checks that the timed exact modes give the same M.

Run with ComfyUI's interpreter from the repository root::

    COMFYUI_PATH=~/ComfyUI-0.33 ~/ComfyUI-0.33/.venv/bin/python bench/traced_pass_cost.py --size 512
    ... bench/traced_pass_cost.py --model sdxl --dtype bfloat16 --size 1024 --repeats 0 --memory cfg,low-memory
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("cfg", "plain", "traced", "low-memory")
log = logging.getLogger("bench.traced_pass_cost")


def _comfy(comfyui: Path):
    sys.path.insert(0, str(comfyui))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True


def _load_pack():
    """The pack's traced-pass module, imported as a package the way ComfyUI's loader does."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "reg_pack", REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    pack = importlib.util.module_from_spec(spec)
    sys.modules["reg_pack"] = pack
    spec.loader.exec_module(pack)
    return importlib.import_module("reg_pack.nodes.traced_pass")


def _configs() -> dict[str, dict]:
    """The full-size UNet configurations of the real-size benchmark (one home: bench/real_size.py)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from bench.real_size import SD15, SDXL

    return {"sd15": SD15, "sdxl": SDXL}


MODELS = ("sd15", "sdxl")


def _build(name: str, size: int, dtype: str):
    """A full-size SD1.5 (860M) or SDXL (2.6B) UNet with random weights through ComfyUI's classes, and its inputs."""
    import comfy.supported_models
    import torch

    torch_dtype = getattr(torch, dtype)
    family = comfy.supported_models.SD15 if name == "sd15" else comfy.supported_models.SDXL
    config = family(dict(_configs()[name]))
    config.set_inference_dtype(torch_dtype, None if torch_dtype == torch.float32 else torch.float32)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in config.get_model({}).diffusion_model.state_dict().items()}
    model = config.get_model({})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, param in model.diffusion_model.state_dict().items():
            shape = shapes[key]
            param.copy_(torch.randn(shape, generator=gen) * (0.02 if len(shape) > 1 else 0.0))
    model.eval().requires_grad_(False)
    latent = size // 8
    x = torch.randn(1, 4, latent, latent, generator=gen)
    context = torch.randn(1, 77, 768 if name == "sd15" else 2048, generator=gen)
    y = None if name == "sd15" else torch.randn(1, 2816, generator=gen)
    return model, x, (context, y)


def _pass(model, x, conds, mode: str, tp):
    """One exact M in ``mode`` (``cfg``: the batched cond+uncond forward a CFG step runs instead; returns D)."""
    import contextlib

    import torch

    context, y = conds
    sigma = torch.tensor([2.0])
    if mode == "cfg":
        with torch.inference_mode():
            kwargs = {} if y is None else {"y": torch.cat([y, y])}
            return model.apply_model(
                torch.cat([x, x]), sigma.repeat(2), c_crossattn=torch.cat([context, context]), **kwargs
            )
    kwargs = {} if y is None else {"y": y}
    if mode == "plain":
        scope = contextlib.nullcontext()
    else:
        weights = list(model.parameters())
        scope = tp.TracedPass(model.diffusion_model, weights, checkpoint=mode == "low-memory", copy=False)
    with torch.enable_grad(), scope:
        leaf = x.clone().requires_grad_(True)
        d = model.apply_model(leaf, sigma, c_crossattn=context, **kwargs)
        (m,) = torch.autograd.grad(d, leaf, torch.ones_like(d))
    return m


def _warm_up(model, x, conds) -> None:
    """One untimed forward without graph: weights paged in and the allocator warm before anything is measured."""
    import torch

    with torch.no_grad():
        model.apply_model(x, torch.tensor([2.0]), c_crossattn=conds[0], **({} if conds[1] is None else {"y": conds[1]}))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(args: argparse.Namespace, comfyui: Path) -> None:
    """One mode in this process: print the resident high-water mark of one pass above the warm level (JSON)."""
    _comfy(comfyui)

    tp = _load_pack()
    model, x, conds = _build(args.model, args.size, args.dtype)
    _warm_up(model, x, conds)
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kib("VmRSS")
    _pass(model, x, conds, args.memory_child, tp)
    row = {"mode": args.memory_child, "peak_above_gib": (_status_kib("VmHWM") - base) / 2**20}
    sys.stdout.write(json.dumps(row) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="sd15")
    parser.add_argument("--dtype", default="float32", help="weight dtype (bfloat16: stored so, computed in float32)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timing rounds (0: memory only)")
    parser.add_argument(
        "--time-modes",
        default="plain,traced,low-memory",
        help="modes to time, comma-separated; ratios are to the first, M is compared with the first exact mode",
    )
    parser.add_argument("--memory", default=",".join(MODES), help="modes whose peak to measure, comma-separated")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--memory-child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    comfyui = Path(os.environ.get("COMFYUI_PATH", Path.home() / "ComfyUI")).expanduser()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args, comfyui)
        return 0
    log.info("%s at %d² (%s weights), %d timing rounds", args.model, args.size, args.dtype, args.repeats)
    if args.repeats:
        _comfy(comfyui)
        tp = _load_pack()
        model, x, conds = _build(args.model, args.size, args.dtype)
        _warm_up(model, x, conds)
        timed = [m for m in args.time_modes.split(",") if m]
        if not timed or not set(timed) <= set(MODES):
            parser.error(f"--time-modes: comma-separated modes from {', '.join(MODES)}")
        times: dict[str, list[float]] = {mode: [] for mode in timed}
        ms = {}
        for round_ in range(args.repeats):
            for mode in timed:
                start = time.perf_counter()
                ms[mode] = _pass(model, x, conds, mode, tp)
                times[mode].append(time.perf_counter() - start)
            log.info("round %d: %s", round_ + 1, {m: round(t[-1], 2) for m, t in times.items()})
        first = statistics.median(times[timed[0]])
        ref = next((m for m in timed if m != "cfg"), None)  # the M the others are compared with
        log.info(
            "| mode | s per pass (median of %d) | ratio to %s | max abs(M − M_ref) / max abs(M_ref), ref = %s |",
            args.repeats, timed[0], ref,
        )  # fmt: skip
        log.info("|---|---|---|---|")
        for mode in timed:
            med = statistics.median(times[mode])
            err = "—" if mode == "cfg" else f"{float((ms[mode] - ms[ref]).abs().max() / ms[ref].abs().max()):.1e}"
            log.info("| %s | %.2f | %.3f | %s |", mode, med, med / first, err)
        del model, ms
    modes = [m for m in args.memory.split(",") if m]
    if modes:
        log.info("| mode | resident peak above the warm level (GiB, own process) |")
        log.info("|---|---|")
    for mode in modes:
        cmd = [sys.executable, __file__, "--model", args.model, "--dtype", args.dtype, "--size", str(args.size)]
        cmd += ["--memory-child", mode, "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ).stdout
        row = json.loads(out.strip().splitlines()[-1])
        log.info("| %s | %.2f |", mode, row["peak_above_gib"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
