"""Pack what the GPU check (bench/gpu_check.py, ``./dev bench --gpu``) needs on a machine without internet.

    ./dev gpu-pack                              # = .venv/bin/python tools/gpu_pack.py (needs PyPI)
    ./dev gpu-pack --python-version 3.11 3.12 --comfyui ~/ComfyUI-0.33

Writes the gitignored ``.gpu-carry/``: ComfyUI's source as ``comfyui.tar.gz`` (a tree such as ~/ComfyUI-0.33 without
``.venv``, ``.git``, models, tests and caches), ``wheels/`` with the distributions ComfyUI imports that the target
may lack, downloaded for linux x86_64 and each ``--python-version`` (pure-Python or abi3 wheels where published), and
``manifest.json`` (each wheel's module and the Python versions it was downloaded for, which the check reads). The
wheels come in two tiers: ``core`` (what the lent H200 image lacks: comfy-aimdo, comfy-kitchen, torchsde, PyAV, …)
and ``bare`` (what a machine with nothing but torch also needs: numpy, Pillow, SciPy, transformers, …), packed in
that order while the carry stays within what one device call carries with the working tree (64 MiB); what did not
fit is listed. torchvision is never packed: its binary must match the installed torch.

Not part of the published pack (.comfyignore).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / ".gpu-carry"
LIMIT = 64 * 2**20  # what one device call carries: the working tree plus the carried paths
MARGIN = 2**20  # for files the tree gains between packing and running
# Paths of a ComfyUI tree the check never reads (first path component; caches anywhere).
SKIP_TOP = {".venv", ".git", ".github", "models", "tests", "tests-unit", "input", "output", "temp", "user"}
SKIP_ANY = {"__pycache__", ".pytest_cache", ".ruff_cache"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")  # fmt: skip


@dataclass(frozen=True)
class Wheel:
    """One carried distribution, and the module that tells whether the target already has it."""

    requirement: str  # name==version, as in ComfyUI 0.33's own environment
    module: str
    tier: str  # "core" or "bare"
    pure: bool = False  # the pure-Python build even where a binary one exists (comfy-kitchen's is 58 MB)


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


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def working_tree_bytes() -> int:
    """What travels with the carry anyway: tracked and untracked, not ignored files."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout  # fmt: skip
    paths = [REPO / name for name in listed.decode().split("\0") if name]
    return sum(p.stat().st_size for p in paths if p.is_file())


def pack_comfyui(tree: Path, archive: Path) -> int:
    """ComfyUI's source tree as a gzip tarball under ``ComfyUI/``; returns the archive's size."""
    if not (tree / "comfy" / "sd.py").is_file():
        raise SystemExit(f"{tree} is not a ComfyUI source tree (no comfy/sd.py); pass --comfyui")
    with tarfile.open(archive, "w:gz", compresslevel=9) as tar:
        for path in sorted(tree.rglob("*")):
            rel = path.relative_to(tree)
            skipped = rel.parts[0] in SKIP_TOP or any(p in SKIP_ANY for p in rel.parts) or rel.suffix == ".pyc"
            if path.is_file() and not path.is_symlink() and not skipped:
                tar.add(path, arcname=str(Path("ComfyUI") / rel), recursive=False)
    return archive.stat().st_size


def download(wheel: Wheel, dest: Path, python: str) -> Path:
    """``pip download`` one wheel for linux x86_64 / CPython ``python`` into ``dest/<python>/`` (kept between packs:
    pip skips what is there)."""
    dest = dest / python
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest),
           "--python-version", python]  # fmt: skip
    if wheel.pure:
        cmd += ["--implementation", "py", "--platform", "any", "--abi", "none"]
    else:
        cmd += ["--implementation", "cp", *(arg for plat in PLATFORMS for arg in ("--platform", plat))]
    subprocess.run([*cmd, wheel.requirement], check=True)
    name, version = wheel.requirement.lower().replace("-", "_").split("==")
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{name}-{version}-")]
    if len(found) != 1:
        raise SystemExit(f"pip download {wheel.requirement} left {[p.name for p in found]}, expected one wheel")
    return found[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--comfyui", help="ComfyUI source tree (default: COMFYUI_PATH or ~/ComfyUI-0.33)")
    parser.add_argument("--python-version", nargs="+", default=["3.12"], help="the target's CPython (3.12)")
    parser.add_argument("--core-only", action="store_true", help="only what the lent H200 image lacks")
    args = parser.parse_args(argv)
    tree = Path(args.comfyui or os.environ.get("COMFYUI_PATH") or Path.home() / "ComfyUI-0.33").expanduser()
    wheels_dir, staging = CARRY / "wheels", CARRY / "downloads"
    wheels_dir.mkdir(parents=True, exist_ok=True)
    for old in wheels_dir.glob("*.whl"):
        old.unlink()
    size = pack_comfyui(tree, CARRY / "comfyui.tar.gz")
    files: dict[str, tuple[Wheel, Path, list[str]]] = {}  # file name -> wheel, path, Python versions
    for wheel in (w for w in WHEELS if w.tier == "core" or not args.core_only):  # core first
        for python in args.python_version:
            path = download(wheel, staging, python)
            files.setdefault(path.name, (wheel, path, []))[2].append(python)
    tree_size = working_tree_bytes()
    sizes = [(name, path.stat().st_size) for name, (_w, path, _p) in files.items()]
    taken, left = fits_limit(sizes, size + 4096, LIMIT - tree_size - MARGIN)
    manifest = {"comfyui": str(tree), "python": args.python_version, "left_out": left, "wheels": []}
    for name in taken:
        wheel, path, pythons = files[name]
        (wheels_dir / name).write_bytes(path.read_bytes())
        manifest["wheels"].append({"file": name, "module": wheel.module, "tier": wheel.tier, "python": pythons})
    (CARRY / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = folder_bytes(CARRY) - folder_bytes(staging)
    lines = [f"{CARRY}: {total / 2**20:.1f} MiB + the working tree's {tree_size / 2**20:.1f} MiB of the "
             f"{LIMIT / 2**20:.0f} MiB a device call carries (downloads/ stays here)"]  # fmt: skip
    lines += [f"  {e['tier']:4}  {e['file']}" for e in manifest["wheels"]]
    lines += [f"  left out (no room): {name}" for name in left]
    lines.append("carry: ['.gpu-carry/comfyui.tar.gz', '.gpu-carry/wheels', '.gpu-carry/manifest.json']")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
