"""The GPU check as one prepared command: what travels with the working tree, and the command that uses it.

    ./dev gpu-pack                      # here (internet: PyPI): build .gpu-carry/ (gitignored, at most 64 MiB)
    ./dev bench --gpu                   # there (no internet, python3 with torch >= 2.11): run the check
    ./dev bench --gpu --dry-run-cpu     # here: the same command on the CPU with tiny networks of the same classes

``pack`` writes ``.gpu-carry/``: ComfyUI's source as ``comfyui.tar.gz`` (a tree such as ~/ComfyUI-0.33 without
``.venv``, ``.git``, models, tests and caches) and ``wheels/`` with the distributions ComfyUI imports that the target
lacks, downloaded for the target's platform (linux x86_64, ``--python-version``, default 3.12; pure-Python or abi3
wheels wherever the project publishes them), plus ``manifest.json``. The wheels come in two tiers: ``core`` (what
the lent H200 image does not have: comfy-aimdo, comfy-kitchen, torchsde, PyAV, …) and ``bare`` (what a machine with
nothing but torch also needs: numpy, Pillow, SciPy, transformers, …), packed in that order while the folder stays
under the limit; what did not fit is listed (torchvision is never packed: its binary must match the installed torch).

``run`` (standard library only until ComfyUI is importable) unpacks ComfyUI into a temporary folder, unzips every
carried wheel whose module this interpreter cannot import and whose tags fit it into a temporary site folder (wheels
are zip archives; nothing is installed into the interpreter), checks that everything the benchmark imports is
importable, and runs ``bench_reg.py --real-size --gpu-plan`` with ComfyUI's default memory management
(bench/gpu_setup.py: DynamicVRAM and async offload as main.py sets them up). Results: ``gpu_check.json`` and
``gpu_check.md`` under ``$OUT`` if set, else bench/results/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / ".gpu-carry"
LIMIT = 64 * 2**20  # what one device call carries: the working tree plus the carried paths
MARGIN = 2**20  # for files the tree gains between packing and running
COMFYUI_ARCHIVE = "comfyui.tar.gz"
# Paths of a ComfyUI tree that the benchmark never reads (relative, first component or any component for caches).
SKIP_TOP = {".venv", ".git", ".github", "models", "tests", "tests-unit", "input", "output", "temp", "user"}
SKIP_ANY = {"__pycache__", ".pytest_cache", ".ruff_cache"}

log = logging.getLogger("bench_reg.gpu_carry")


@dataclass(frozen=True)
class Wheel:
    """One carried distribution: what to download and which module tells whether the target already has it."""

    requirement: str  # name==version, the versions of ComfyUI 0.33's own environment
    module: str
    tier: str  # "core" or "bare"
    pure: bool = False  # download the pure-Python build even where a binary one exists (comfy-kitchen: 58 MB)


WHEELS = (
    Wheel("comfy-aimdo==0.4.13", "comfy_aimdo", "core"),
    Wheel("comfy-kitchen==0.2.31", "comfy_kitchen", "core", pure=True),
    Wheel("torchsde==0.2.6", "torchsde", "core"),
    Wheel("trampoline==0.1.2", "trampoline", "core"),
    Wheel("av==18.1.0", "av", "core"),
    Wheel("simpleeval==1.0.8", "simpleeval", "core"),
    Wheel("einops==0.8.2", "einops", "bare"),
    Wheel("safetensors==0.8.0", "safetensors", "bare"),
    Wheel("psutil==7.2.2", "psutil", "bare"),
    Wheel("tqdm==4.70.1", "tqdm", "bare"),
    Wheel("pyyaml==6.0.4", "yaml", "bare"),
    Wheel("numpy==2.4.6", "numpy", "bare"),
    Wheel("pillow==13.0.0", "PIL", "bare"),
    Wheel("regex==2026.11.19", "regex", "bare"),
    Wheel("packaging==26.4", "packaging", "bare"),
    Wheel("tokenizers==0.23.3", "tokenizers", "bare"),
    Wheel("huggingface-hub==2.4.0", "huggingface_hub", "bare"),
    Wheel("transformers==5.24.0", "transformers", "bare"),
    Wheel("scipy==1.17.1", "scipy", "bare"),
)
# What the benchmark imports (ComfyUI's sampling, loaders and node API, and the pack); checked before it starts.
NEEDED = (
    "torch",
    "torchvision",
    "numpy",
    "PIL",
    "scipy",
    "safetensors",
    "einops",
    "tqdm",
    "psutil",
    "yaml",
    "transformers",
    "tokenizers",
    "torchsde",
    "av",
    "comfy_aimdo",
    "comfy_kitchen",
)

_WHEEL_NAME = re.compile(
    r"^(?P<name>.+?)-(?P<version>[^-]+)(-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$"
)


def wheel_fits(filename: str, python: tuple[int, int], platform: str = "linux_x86_64") -> bool:
    """Whether a wheel (by its file name's tags, PEP 427/425) installs on CPython ``python`` on ``platform``.

    Accepted: ``py3``/``py3X`` pure wheels (``none``/``any``), ``cpXY-cpXY`` for exactly this version, ``cpXY-abi3`` for
    this version or an older one, on ``any`` or a manylinux/linux platform of the same architecture.
    """
    match = _WHEEL_NAME.match(filename)
    if match is None:
        return False
    arch = platform.split("_", 1)[1]
    plats = match["plat"].split(".")
    if not any(p == "any" or (p.endswith(arch) and p.startswith(("manylinux", "linux"))) for p in plats):
        return False
    here = python[0] * 100 + python[1]
    exact = {f"py{python[0]}", f"py{python[0]}{python[1]}", f"cp{python[0]}{python[1]}"}
    for py in match["py"].split("."):
        for abi in match["abi"].split("."):
            if abi == "none" and py in exact:
                return True
            version = py.removeprefix("cp")
            if not py.startswith("cp") or not version.isdigit():
                continue
            wanted = int(version[0]) * 100 + int(version[1:])
            if abi == "abi3" and wanted <= here:
                return True
            if abi == py and wanted == here:
                return True
    return False


def folder_bytes(root: Path) -> int:
    """Total size of the files under ``root`` (what the carry costs of the 64 MiB a device call may carry)."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def working_tree_bytes() -> int:
    """Size of what travels with the carry anyway: tracked and untracked, not ignored files (``git ls-files``)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout  # fmt: skip
    paths = [REPO / name for name in listed.decode().split("\0") if name]
    return sum(p.stat().st_size for p in paths if p.is_file())


def fits_limit(sizes: list[tuple[str, int]], used: int, limit: int = LIMIT) -> tuple[list[str], list[str]]:
    """Take items in order while the running total stays within ``limit``; returns (taken, left out)."""
    taken, left = [], []
    for name, size in sizes:
        if used + size <= limit:
            taken.append(name)
            used += size
        else:
            left.append(name)
    return taken, left


def _skipped(rel: Path) -> bool:
    return (rel.parts and rel.parts[0] in SKIP_TOP) or any(p in SKIP_ANY for p in rel.parts) or rel.suffix == ".pyc"


def pack_comfyui(tree: Path, archive: Path) -> int:
    """ComfyUI's source tree as a gzip tarball (see SKIP_TOP / SKIP_ANY); returns the archive's size."""
    if not (tree / "comfy" / "sd.py").is_file():
        raise SystemExit(f"{tree} is not a ComfyUI source tree (no comfy/sd.py); pass --comfyui")
    with tarfile.open(archive, "w:gz", compresslevel=9) as tar:
        for path in sorted(tree.rglob("*")):
            rel = path.relative_to(tree)
            if path.is_file() and not path.is_symlink() and not _skipped(rel):
                tar.add(path, arcname=str(Path("ComfyUI") / rel), recursive=False)
    return archive.stat().st_size


def download(wheel: Wheel, dest: Path, python: str) -> Path:
    """``pip download`` one wheel for linux x86_64 / CPython ``python`` (pure-Python when ``wheel.pure``) into
    ``dest/<python>/`` (kept between packs: pip skips what is there)."""
    dest = dest / python
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    cmd += ["--python-version", python]
    if wheel.pure:
        cmd += ["--implementation", "py", "--platform", "any", "--abi", "none"]
    else:
        cmd += ["--implementation", "cp"]
        for plat in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                     "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"):  # fmt: skip
            cmd += ["--platform", plat]
    subprocess.run([*cmd, wheel.requirement], check=True)
    new = sorted(set(dest.glob("*.whl")) - before)
    if not new:  # already there from an earlier pack
        name = wheel.requirement.split("==")[0].replace("-", "_").lower()
        new = [p for p in dest.glob("*.whl") if p.name.lower().startswith(name + "-")]
    if len(new) != 1:
        raise SystemExit(f"pip download {wheel.requirement} gave {[p.name for p in new]}, expected one wheel")
    return new[0]


def pack(args: argparse.Namespace) -> int:
    tree = Path(args.comfyui or os.environ.get("COMFYUI_PATH") or Path.home() / "ComfyUI-0.33").expanduser()
    CARRY.mkdir(exist_ok=True)
    staging = CARRY / "downloads"
    staging.mkdir(exist_ok=True)
    wheels_dir = CARRY / "wheels"
    for old in wheels_dir.glob("*.whl"):
        old.unlink()
    wheels_dir.mkdir(exist_ok=True)
    size = pack_comfyui(tree, CARRY / COMFYUI_ARCHIVE)
    log.info("ComfyUI source from %s: %.1f MiB", tree, size / 2**20)
    tiers = ("core",) if args.core_only else ("core", "bare")
    files: dict[str, tuple[Wheel, Path]] = {}
    for wheel in WHEELS:
        if wheel.tier in tiers:
            for python in args.python_version:
                path = download(wheel, staging, python)
                files[path.name] = (wheel, path)
    order = sorted(files.items(), key=lambda kv: (tiers.index(kv[1][0].tier), WHEELS.index(kv[1][0])))
    tree_size = working_tree_bytes()
    budget = LIMIT - tree_size - MARGIN
    taken, left = fits_limit([(n, p.stat().st_size) for n, (_w, p) in order], size + 4096, budget)
    manifest = {"comfyui": str(tree), "python": args.python_version, "wheels": [], "left_out": left}
    for name in taken:
        wheel, path = files[name]
        (wheels_dir / name).write_bytes(path.read_bytes())
        manifest["wheels"].append({"file": name, "module": wheel.module, "tier": wheel.tier})
    (CARRY / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = folder_bytes(CARRY) - folder_bytes(staging)
    sys.stdout.write(
        f"{CARRY}: {total / 2**20:.1f} MiB + the working tree's {tree_size / 2**20:.1f} MiB "
        f"of the {LIMIT / 2**20:.0f} MiB "
        "a device call carries (downloads/ stays here)\n"
    )
    for entry in manifest["wheels"]:
        sys.stdout.write(f"  {entry['tier']:4}  {entry['file']}\n")
    for name in left:
        sys.stdout.write(f"  left out (no room): {name}\n")
    sys.stdout.write("carry: ['.gpu-carry/comfyui.tar.gz', '.gpu-carry/wheels', '.gpu-carry/manifest.json']\n")
    return 0


def unzip_wheel(wheel: Path, site: Path) -> None:
    """Install a wheel by unpacking it: the archive's root into ``site``, ``*.data/purelib|platlib/`` too (moved to the
    root); the rest of ``*.data/`` (scripts, headers) is not needed by an importing program and is skipped."""
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            parts = info.filename.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                parts = parts[2:]
            target = site.joinpath(*parts)
            if info.is_dir():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(info))


def missing_modules(modules: tuple[str, ...] | list[str], pythonpath: str | None = None) -> list[str]:
    """Which of ``modules`` this interpreter cannot find (checked in a child process, with ``pythonpath`` first)."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    code = "import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))"
    out = subprocess.run([sys.executable, "-c", code, *modules], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


def run(args: argparse.Namespace, extra: list[str]) -> int:
    manifest_path = CARRY / "manifest.json"
    if not manifest_path.is_file():
        raise SystemExit(f"no {manifest_path}: build it with ./dev gpu-pack (needs PyPI) and carry .gpu-carry")
    manifest = json.loads(manifest_path.read_text())
    work = Path(tempfile.mkdtemp(prefix="reg-gpu-"))
    try:
        return _run_in(work, manifest, args, extra)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_in(work: Path, manifest: dict, args: argparse.Namespace, extra: list[str]) -> int:
    with tarfile.open(CARRY / COMFYUI_ARCHIVE) as tar:
        tar.extractall(work, filter="data")
    comfyui = work / "ComfyUI"
    site = work / "site"
    site.mkdir()
    present = set(NEEDED) - set(missing_modules(NEEDED))
    python = sys.version_info[:2]
    installed = []
    for entry in manifest["wheels"]:
        if entry["module"] in present or entry["module"] in installed:
            continue
        if wheel_fits(entry["file"], python):
            unzip_wheel(CARRY / "wheels" / entry["file"], site)
            installed.append(entry["module"])
    sys.stdout.write(f"ComfyUI unpacked in {comfyui}; unpacked wheels: {', '.join(installed) or 'none'}\n")
    still = missing_modules(NEEDED, str(site))
    if still:
        raise SystemExit(
            f"this interpreter ({sys.executable}, Python {python[0]}.{python[1]}) lacks {still} and .gpu-carry has no "
            f"fitting wheel (packed for Python {manifest['python']}; left out: {manifest['left_out']}); rebuild with "
            "./dev gpu-pack --python-version X.Y (torchvision must match the installed torch and is never packed)"
        )
    out_dir = Path(os.environ.get("OUT") or REPO / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "gpu_check_dry_run" if args.dry_run_cpu else "gpu_check"
    cmd = [sys.executable, str(REPO / "bench" / "bench_reg.py"), "--real-size", "--gpu-plan"]
    cmd += ["--json", str(out_dir / f"{stem}.json"), "--markdown", str(out_dir / f"{stem}.md")]
    if args.dry_run_cpu:
        cmd += ["--tiny", "--repeats", "1", "--threads", "1"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
        "COMFYUI_PATH": str(comfyui),
        "COMFYUI_PYTHON": sys.executable,
        "REG_BENCH_UNDER_COMFYUI": "1",
        "REG_BENCH_DEVICE": "cpu" if args.dry_run_cpu else "gpu",
        "PYTHONUNBUFFERED": "1",
    }
    sys.stdout.write(f"running {' '.join(cmd + extra)}\n")
    sys.stdout.flush()
    return subprocess.run(cmd + extra, env=env, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    p_pack = sub.add_parser("pack", help="build .gpu-carry/ here (needs PyPI)")
    p_pack.add_argument("--comfyui", help="ComfyUI source tree (default: COMFYUI_PATH or ~/ComfyUI-0.33)")
    p_pack.add_argument("--python-version", nargs="+", default=["3.12"], help="target CPython versions (3.12)")
    p_pack.add_argument("--core-only", action="store_true", help="only what the lent H200 image lacks")
    p_run = sub.add_parser("run", help="run the GPU check from .gpu-carry/ (other options go to bench_reg.py)")
    p_run.add_argument("--dry-run-cpu", action="store_true", help="on the CPU with tiny networks")
    args, extra = parser.parse_known_args(argv)
    if args.command == "pack":
        if extra:
            parser.error(f"unknown arguments {extra}")
        return pack(args)
    return run(args, [a for a in extra if a != "--gpu"])


if __name__ == "__main__":
    raise SystemExit(main())
