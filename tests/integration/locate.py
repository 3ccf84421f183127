"""Find a ComfyUI checkout and the interpreter that runs it.

Order: ``COMFYUI_PATH``; the usual ``ComfyUI/custom_nodes/<pack>`` layout; ``~/ComfyUI``.
The interpreter is ``COMFYUI_PYTHON`` or ``<ComfyUI>/.venv`` / ``<ComfyUI>/venv``.
Run as a script it prints the checkout and interpreter on two lines (exit 0),
or one line saying why none was found (exit 1).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _is_comfyui(path: Path) -> bool:
    return (path / "comfy" / "samplers.py").is_file() and (path / "nodes.py").is_file()


def find_comfyui() -> tuple[Path | None, str]:
    """Return (checkout, reason); checkout is None when nothing was found."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = Path(env).expanduser()
        if _is_comfyui(path):
            return path, ""
        return None, f"COMFYUI_PATH={env} is not a ComfyUI checkout (no comfy/samplers.py)"
    for path in (REPO.parent.parent, Path.home() / "ComfyUI"):
        if _is_comfyui(path):
            return path, ""
    return None, (
        "ComfyUI not found (set COMFYUI_PATH, install the pack in ComfyUI/custom_nodes/, "
        "or keep a checkout in ~/ComfyUI)"
    )


def find_interpreter(comfyui: Path) -> tuple[str | None, str]:
    """Return (python executable, reason) for running ComfyUI."""
    env = os.environ.get("COMFYUI_PYTHON")
    candidates = [Path(env)] if env else [comfyui / ".venv" / "bin" / "python", comfyui / "venv" / "bin" / "python"]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate), ""
    return None, f"no interpreter for ComfyUI at {comfyui} (set COMFYUI_PYTHON or create {comfyui}/.venv)"


def main() -> int:
    comfyui, reason = find_comfyui()
    if comfyui is None:
        sys.stdout.write(reason + "\n")
        return 1
    python, reason = find_interpreter(comfyui)
    if python is None:
        sys.stdout.write(reason + "\n")
        return 1
    sys.stdout.write(f"{comfyui}\n{python}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
