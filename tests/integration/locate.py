"""Find the ComfyUI checkouts to test against and the interpreter that runs each.

Which trees:

* ``COMFYUI_PATHS``: several checkouts separated by ``os.pathsep`` (``:`` on Linux and macOS), tested in that order;
* else ``COMFYUI_PATH``: exactly one checkout;
* else every default that exists: the ``ComfyUI/custom_nodes/<pack>`` layout this repository may sit in,
  ``~/ComfyUI`` and ``~/ComfyUI-0.33``.

A tree named in ``COMFYUI_PATHS`` or ``COMFYUI_PATH`` that is not a ComfyUI checkout, or has no interpreter, is an
error; a default without an interpreter is left out with a note on stderr.

Which interpreter: ``COMFYUI_PYTHON`` for the tree named by ``COMFYUI_PATH`` (or the only one found), otherwise
``<tree>/.venv/bin/python``, ``<tree>/venv/bin/python``, or the one ``./dev comfyui <tree>`` prepared in the cache
(:func:`env_dir`: outside the checkout and the tree, so a read-only tree works).

Run as a script it prints one line per tree, ``<version>\\t<checkout>\\t<interpreter>`` (exit 0); or one line saying
why none was found (exit 1, the integration tests are skipped); or why a named tree cannot be used (exit 2).
``locate.py --env-dir TREE`` prints where ``./dev comfyui`` keeps that tree's interpreter.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class TreeError(ValueError):
    """A tree the user named explicitly cannot be used."""


@dataclass(frozen=True)
class Tree:
    """One ComfyUI checkout, its version and the interpreter that runs it."""

    path: Path
    python: str
    version: str


def is_comfyui(path: Path) -> bool:
    return (path / "comfy" / "samplers.py").is_file() and (path / "nodes.py").is_file()


def comfyui_version(path: Path) -> str:
    """``__version__`` from the checkout's ``comfyui_version.py`` (read, not imported), or ``"unknown"``."""
    try:
        text = (path / "comfyui_version.py").read_text(encoding="utf-8")
    except OSError:
        return "unknown"
    match = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", text)
    return match.group(1) if match else "unknown"


def cache_root() -> Path:
    """Where prepared interpreters live: ``REG_CACHE``, else ``$XDG_CACHE_HOME/reg-guidance`` (``~/.cache``)."""
    explicit = os.environ.get("REG_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "reg-guidance"


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """One builder at a time per cache folder (several test sessions or benchmarks may start together)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def env_dir(comfyui: Path) -> Path:
    """The cached virtual environment for a tree: one per version and requirements file.

    A tree whose requirements change gets a new environment; two copies of the same release share one.
    """
    try:
        requirements = (comfyui / "requirements.txt").read_bytes()
    except OSError:
        requirements = b""
    key = hashlib.sha256(requirements).hexdigest()[:12]
    return cache_root() / f"comfyui-{comfyui_version(comfyui)}-{key}"


def default_candidates() -> list[Path]:
    """The places looked at when no tree is named: the custom_nodes layout, ``~/ComfyUI``, ``~/ComfyUI-0.33``."""
    home = Path.home()
    return [REPO.parent.parent, home / "ComfyUI", home / "ComfyUI-0.33"]


def _named() -> tuple[list[Path], bool]:
    """(trees named in the environment, whether COMFYUI_PYTHON applies to the single one)."""
    many = os.environ.get("COMFYUI_PATHS")
    if many:
        return [Path(p).expanduser() for p in many.split(os.pathsep) if p], False
    one = os.environ.get("COMFYUI_PATH")
    if one:
        return [Path(one).expanduser()], True
    return [], True


def find_interpreter(comfyui: Path, use_env: bool = True) -> tuple[str | None, str]:
    """Return (python executable, reason) for running the ComfyUI at ``comfyui``."""
    env = os.environ.get("COMFYUI_PYTHON") if use_env else None
    if env:
        candidates = [Path(env)]
    else:
        cached = env_dir(comfyui) / "bin" / "python"
        candidates = [comfyui / ".venv" / "bin" / "python", comfyui / "venv" / "bin" / "python", cached]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate), ""
    return None, f"no interpreter for ComfyUI at {comfyui} (run ./dev comfyui {comfyui}, or set COMFYUI_PYTHON)"


def find_trees() -> tuple[list[Tree], str]:
    """Every tree to test, in order, and the reason when there is none. Raises :class:`TreeError` for a bad name."""
    named, env_python = _named()
    trees: list[Tree] = []
    if named:
        for path in named:
            if not is_comfyui(path):
                raise TreeError(f"{path} is not a ComfyUI checkout (no comfy/samplers.py and nodes.py)")
            python, reason = find_interpreter(path, use_env=env_python)
            if python is None:
                raise TreeError(reason)
            trees.append(Tree(path, python, comfyui_version(path)))
        return trees, ""
    seen: set[Path] = set()
    for path in default_candidates():
        if not is_comfyui(path) or path.resolve() in seen:
            continue
        seen.add(path.resolve())
        python, reason = find_interpreter(path)
        if python is None:
            sys.stderr.write(f"note: {reason}; not tested\n")
            continue
        trees.append(Tree(path, python, comfyui_version(path)))
    if trees:
        return trees, ""
    return [], (
        "no ComfyUI found (name one with COMFYUI_PATH or several with COMFYUI_PATHS=path1:path2, install the pack in "
        "ComfyUI/custom_nodes/, or keep a checkout with a .venv in ~/ComfyUI or ~/ComfyUI-0.33)"
    )


def find_comfyui() -> tuple[Path | None, str]:
    """The tree the running test session imports: ``COMFYUI_PATH``, else the found tree this interpreter runs.

    Falls back to the first tree found; returns (None, reason) when there is none.
    """
    one = os.environ.get("COMFYUI_PATH")
    if one and not os.environ.get("COMFYUI_PATHS"):
        path = Path(one).expanduser()
        if is_comfyui(path):
            return path, ""
        return None, f"COMFYUI_PATH={one} is not a ComfyUI checkout (no comfy/samplers.py and nodes.py)"
    try:
        trees, reason = find_trees()
    except TreeError as exc:
        return None, str(exc)
    for tree in trees:
        if runs_here(tree.python):
            return tree.path, ""
    if trees:
        return trees[0].path, ""
    return None, reason


def runs_here(python: str) -> bool:
    """True when ``python`` is the running interpreter (same executable or same environment)."""
    path = Path(python)
    return Path(sys.executable) == path or Path(sys.prefix).resolve() == path.parent.parent.resolve()


def main() -> int:
    if sys.argv[1:2] == ["--env-dir"] and len(sys.argv) == 3:
        sys.stdout.write(f"{env_dir(Path(sys.argv[2]).expanduser().resolve())}\n")
        return 0
    try:
        trees, reason = find_trees()
    except TreeError as exc:
        sys.stdout.write(f"{exc}\n")
        return 2
    if not trees:
        sys.stdout.write(reason + "\n")
        return 1
    for tree in trees:
        sys.stdout.write(f"{tree.version}\t{tree.path}\t{tree.python}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
