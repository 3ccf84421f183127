"""The GPU check as one command for a bare machine: python3 with torch (CUDA), no internet, this working tree and what
``./dev gpu-pack`` (tools/gpu_pack.py, run where PyPI is reachable) carried in ``.gpu-carry/``.

    ./dev bench --gpu                     # there: sized for < 8 minutes on one H100/H200
    ./dev bench --gpu --dry-run-cpu       # here: the same command on the CPU, tiny networks of the same classes

Standard library only until ComfyUI is importable: ComfyUI's source is unpacked from ``.gpu-carry/comfyui.tar.gz``
into a temporary folder, every carried wheel whose module this interpreter lacks and that was packed for its Python
version is unzipped into a temporary site folder (nothing is installed), every module the harness imports is checked,
and bench/cost.py runs :data:`PLAN` on full-size networks in ComfyUI's default dtypes, with its default memory
management set up as its main.py does (:func:`init_like_main`). The report goes to ``gpu_check.md`` under ``$OUT``
(else bench/results/); the exit status is 1 when an exactness row fails. Other options go to bench/cost.py.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / ".gpu-carry"
PLAN = ["--measure", "exact", "steps", "precision", "--models", "sdxl", "flux", "sd15", "sd3", "--steps", "5"]
ON_GPU = ["--real", "--gpu", "--repeats", "2"]  # SD1.5 at 512² and 768², the others at 1024², full Flux
DRY_RUN = ["--sizes", "8", "--repeats", "1", "--threads", "1", "--no-memory"]
# What the harness imports besides ComfyUI and the pack (ComfyUI's sampling and loader), checked before it starts.
NEEDED = ("torch", "torchvision", "numpy", "PIL", "scipy", "safetensors", "einops", "tqdm", "psutil", "yaml",
          "transformers", "tokenizers", "torchsde", "av", "comfy_aimdo", "comfy_kitchen")  # fmt: skip
log = logging.getLogger("bench.gpu")


def missing_modules(modules: list[str] | tuple[str, ...], pythonpath: Path | None = None) -> list[str]:
    """Which of ``modules`` this interpreter cannot find (asked in a child process, ``pythonpath`` first)."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    code = "import importlib.util as u, sys; print(*(m for m in sys.argv[1:] if u.find_spec(m) is None))"
    return subprocess.run([sys.executable, "-c", code, *modules], env=env, capture_output=True, text=True,
                          check=True).stdout.split()  # fmt: skip


def wheels_to_unzip(entries: list[dict], missing: set[str], python: str) -> list[str]:
    """The manifest's wheels this interpreter needs: its module missing, packed for ``python`` (``3.12``), the first
    such wheel per module."""
    chosen: dict[str, str] = {}
    for entry in entries:
        if entry["module"] in missing and python in entry["python"]:
            chosen.setdefault(entry["module"], entry["file"])
    return list(chosen.values())


def unzip_wheel(wheel: Path, site: Path) -> None:
    """Install a wheel by unpacking it: its root into ``site``, ``*.data/purelib|platlib/`` too; the rest of
    ``*.data/`` (scripts, headers) is not needed by an importing program."""
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            parts = info.filename.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                parts = parts[2:]
            if not info.is_dir():
                target = site.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(info))


def init_like_main() -> str:
    """ComfyUI's GPU memory management as its main.py sets it up with every flag at its default (call after
    ``comfy.cli_args`` is imported, before CUDA is used): ``cuda_malloc``; where ``enables_dynamic_vram()``,
    comfy-aimdo's DynamicVRAM (``init``, ``init_devices``, ``ModelPatcherDynamic``), with main.py's ``TypeError``
    fallbacks for older comfy-aimdo protocols. ComfyUI without comfy-aimdo (0.3.x) gets the allocator only. Returns
    what is active, in words."""
    import comfy.cli_args
    import cuda_malloc  # noqa: F401  (sets PYTORCH_CUDA_ALLOC_CONF, as main.py imports it)

    args = comfy.cli_args.args
    if importlib.util.find_spec("comfy_aimdo") is None or not hasattr(comfy.cli_args, "enables_dynamic_vram"):
        return "legacy ModelPatcher (this ComfyUI has no comfy-aimdo DynamicVRAM)"
    import comfy_aimdo.control as aimdo

    enables = comfy.cli_args.enables_dynamic_vram()
    if enables:
        headroom = None if args.reserve_vram is None else int(args.reserve_vram * 1024**3)
        for kwargs in ({"simple_vram_headroom": headroom, "nvml_pressure": not args.disable_nvml_pressure},
                       {"simple_vram_headroom": headroom}, {}):  # fmt: skip
            try:
                aimdo.init(**kwargs)
                break
            except TypeError:
                continue
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher

    supported = mm.is_nvidia() or (mm.is_amd() and getattr(mm, "rocm_version", (0, 0)) >= (7, 14))
    if not (args.enable_dynamic_vram or (enables and supported)):
        return "legacy ModelPatcher (DynamicVRAM not enabled for this device)"
    devices = mm.get_all_torch_devices()
    try:
        ok = aimdo.init_devices((d.index, int(args.vram_headroom * 1024**3)) for d in devices)
    except TypeError:
        ok = aimdo.init_devices(d.index for d in devices)
    if not ok:
        log.warning("comfy-aimdo did not initialise: ComfyUI falls back to the legacy ModelPatcher, as main.py would")
        return "legacy ModelPatcher (comfy-aimdo failed to initialise)"
    aimdo.set_log_warning()
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    return "DynamicVRAM (comfy-aimdo, ModelPatcherDynamic)"


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--gpu"]
    dry = "--dry-run-cpu" in argv
    manifest_path = CARRY / "manifest.json"
    if not manifest_path.is_file():
        raise SystemExit(f"no {manifest_path}: build it with ./dev gpu-pack (needs PyPI) and carry .gpu-carry")
    manifest = json.loads(manifest_path.read_text())
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    with tempfile.TemporaryDirectory(prefix="reg-gpu-") as tmp:
        work = Path(tmp)
        with tarfile.open(CARRY / "comfyui.tar.gz") as tar:
            tar.extractall(work, filter="data")
        missing = set(missing_modules([e["module"] for e in manifest["wheels"]]))
        wheels = wheels_to_unzip(manifest["wheels"], missing, python)
        for name in wheels:
            unzip_wheel(CARRY / "wheels" / name, work / "site")
        say(f"ComfyUI unpacked in {work / 'ComfyUI'}; wheels unzipped: {', '.join(wheels) or 'none'}")
        still = missing_modules(NEEDED, work / "site")
        if still:
            raise SystemExit(
                f"{sys.executable} (Python {python}) lacks {still}, and .gpu-carry has no wheel for "
                f"it (packed for {manifest['python']}, left out: {manifest['left_out']}); rebuild with "
                "./dev gpu-pack --python-version X.Y (torchvision must match torch and is never packed)"
            )
        out = Path(os.environ.get("OUT") or REPO / "bench" / "results")
        out.mkdir(parents=True, exist_ok=True)
        report = out / ("gpu_check_dry_run.md" if dry else "gpu_check.md")
        cmd = [sys.executable, str(REPO / "bench" / "cost.py"), *PLAN, *(DRY_RUN if dry else ON_GPU), "--out",
               str(report), *(a for a in argv if a != "--dry-run-cpu")]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(work / "site"), os.environ.get("PYTHONPATH", "")]),
               "COMFYUI_PATH": str(work / "ComfyUI"), "COMFYUI_PYTHON": sys.executable,
               "REG_BENCH_UNDER_COMFYUI": "1", "PYTHONUNBUFFERED": "1"}  # fmt: skip
        say("running " + " ".join(cmd))
        return subprocess.run(cmd, env=env, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main())
