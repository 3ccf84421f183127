"""Integration tests: the pack inside a real, in-process ComfyUI (see README.md in this folder).

When ComfyUI cannot be imported by the running interpreter (for example plain ``pytest`` from the project's own venv),
the whole folder is skipped with one reason. Run the suite with ComfyUI's interpreter: ``./dev integration``.

The session never touches the ComfyUI tree's own ``models/``, ``custom_nodes/``, ``output/``, ``input/``, ``temp/`` or
``user/``: ComfyUI is imported with its base directory in a session temp dir (``--base-directory``), and
``comfy_harness.isolate_folders`` points every folder there before anything is loaded.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MODELS_DIR = Path(os.environ.get("REG_TEST_MODELS", REPO / "tests" / ".models"))
if str(HERE) not in sys.path:  # helpers next to this file, whatever pytest's import mode
    sys.path.insert(0, str(HERE))

import locate  # noqa: E402

if TYPE_CHECKING:
    import comfy_harness
    import tiny_models

log = logging.getLogger(__name__)


# ComfyUI's base directory for the session: every folder it would read or write in its own tree lives here instead.
SESSION_BASE = Path(tempfile.mkdtemp(prefix="reg-comfyui-"))


def _running_comfy_interpreter(comfyui: Path) -> bool:
    """True when this interpreter is the one locate.py picked for ComfyUI (then import errors are real failures)."""
    python, _ = locate.find_interpreter(comfyui)
    return python is not None and locate.runs_here(python)


def _import_comfyui(comfyui: Path) -> str | None:
    """Import ComfyUI the way the headless harness needs it; return why it failed (None on success).

    Order matters (see tests/integration/README.md, "How it works"): ``args.cpu`` before any other comfy module, and
    ``utils.extra_config`` (plus ``server``) before ``nodes``, because nodes.py puts ``comfy/`` first on ``sys.path``,
    after which ``utils`` would resolve to comfy/utils.py. ComfyUI also goes first on ``sys.path``: the repository
    root is on it too and has its own ``nodes`` package. ``args.base_directory`` (ComfyUI's ``--base-directory``) is
    set before ``folder_paths`` is imported, which otherwise derives its folders from the tree (and creates ``input/``
    there when it is missing).
    """
    saved_path = list(sys.path)
    before = set(sys.modules)
    sys.path.insert(0, str(comfyui))
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
        comfy.cli_args.args.base_directory = str(SESSION_BASE)
        import utils.extra_config  # noqa: F401

        try:
            import server  # noqa: F401
        except ImportError as exc:  # only the image nodes need it; the executor does not
            log.warning("ComfyUI's server module does not import (%s); comfy_extras/nodes_images.py will fail", exc)
        import execution  # noqa: F401
        import folder_paths  # noqa: F401
        from comfy_execution import graph_utils  # noqa: F401

        import nodes
    except ImportError as exc:
        # Undo the partial import so the rest of the session (unit tests) is unaffected.
        sys.path[:] = saved_path
        for name in set(sys.modules) - before:
            file = getattr(sys.modules[name], "__file__", None) or ""
            if file.startswith(str(comfyui)):
                del sys.modules[name]
        return f"{type(exc).__name__}: {exc}"
    if Path(nodes.__file__).resolve() != (comfyui / "nodes.py").resolve():
        raise RuntimeError(f"'nodes' resolved to {nodes.__file__}, not ComfyUI's nodes.py (imported too early?)")
    return None


def _skip_reason() -> str | None:
    """Import ComfyUI, or say why the integration tests cannot run in this interpreter."""
    comfyui, reason = locate.find_comfyui()
    if comfyui is None:
        return f"ComfyUI integration tests skipped: {reason}"
    failure = _import_comfyui(comfyui)
    if failure is None:
        return None
    if _running_comfy_interpreter(comfyui):
        raise RuntimeError(f"ComfyUI at {comfyui} does not import with its own interpreter: {failure}")
    python, _ = locate.find_interpreter(comfyui)
    runner = python or "ComfyUI's own interpreter"
    return (
        f"ComfyUI integration tests skipped: ComfyUI at {comfyui} cannot be imported by {sys.executable} "
        f"({failure}); run them with {runner} (./dev integration)"
    )


SKIP_REASON = _skip_reason()
COMFYUI, _ = locate.find_comfyui()


def pytest_report_header(config: pytest.Config) -> str:
    if SKIP_REASON is not None:
        return SKIP_REASON
    return f"ComfyUI {locate.comfyui_version(COMFYUI)} at {COMFYUI}, session base directory {SESSION_BASE}"


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(SESSION_BASE, ignore_errors=True)


if SKIP_REASON is not None:
    # Report one skip for the whole folder without importing the test modules (they need ComfyUI). A module-level
    # pytest.skip() here would crash pytest when this folder is given on the command line (initial conftest).

    class _SkippedFolder(pytest.File):
        def collect(self):
            pytest.skip(SKIP_REASON)

    def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
        inside = collection_path.resolve().is_relative_to(HERE)
        if inside and collection_path.suffix == ".py" and collection_path.name != "conftest.py":
            return True
        return None

    def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
        if file_path.resolve() == Path(__file__).resolve():
            return _SkippedFolder.from_parent(parent, path=file_path)
        return None

    def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
        for item in items:  # test files named explicitly on the command line are not subject to ignore_collect
            if Path(item.path).resolve().is_relative_to(HERE):
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


# The fixtures import the helpers lazily: without ComfyUI (skipped folder) nothing below ever runs.


@pytest.fixture(scope="session", autouse=True)
def comfyui_dirs() -> Path:
    """ComfyUI's base directory for the session: empty ``models/…`` folders, ``custom_nodes/`` (the pack symlink),
    ``output/``, ``temp/``, ``input/`` and ``user/``. Set up before any other fixture, so nothing sees the tree's own.
    """
    import comfy_harness

    comfy_harness.isolate_folders(SESSION_BASE)
    return SESSION_BASE


@pytest.fixture(scope="session")
def reg_pack(comfyui_dirs: Path) -> comfy_harness.LoadedPack:
    """The pack, loaded by ComfyUI's ``init_extra_nodes`` from ``custom_nodes/comfyui-reg-guidance``."""
    import comfy_harness

    return comfy_harness.load_pack(REPO, comfyui_dirs / "custom_nodes")


@pytest.fixture(scope="session")
def tiny(comfyui_dirs: Path) -> tiny_models.TinyModels:
    """The tiny random-weight models: built once per cache directory, registered with ``folder_paths``."""
    import tiny_models

    return tiny_models.prepare(MODELS_DIR)


@pytest.fixture(scope="session")
def harness(reg_pack: comfy_harness.LoadedPack, tiny: tiny_models.TinyModels) -> comfy_harness.ComfyHarness:
    """One executor for the whole session, with the pack loaded and the tiny models registered."""
    import comfy_harness

    return comfy_harness.ComfyHarness(REPO)


@pytest.fixture(scope="session")
def tiny_lora(tiny, tmp_path_factory) -> str:
    """A rank-2 LoRA on two attention projections of the tiny SD1.5 UNet, in a temp folder registered as ``loras``:
    one whose input depends on the latent (its weight is in the backward), one that projects the text."""
    import comfy.lora
    import folder_paths
    import safetensors.torch
    import torch
    from test_reg_nodes import load_family

    model, _, _, _ = load_family(tiny, "sd15")
    keys = comfy.lora.model_lora_keys_unet(model.model, {})
    unet_keys = [(k, target) for k, target in keys.items() if k.startswith("lora_unet_")]
    chosen = [
        next(k for k, target in unet_keys if target.endswith(end)) for end in ("attn1.to_q.weight", "attn2.to_k.weight")
    ]
    weights = model.model.state_dict()
    generator = torch.Generator().manual_seed(11)
    state = {}
    for key in chosen:
        out_features, in_features = weights[keys[key]].shape
        state[f"{key}.lora_down.weight"] = torch.randn(2, in_features, generator=generator) * 0.05
        state[f"{key}.lora_up.weight"] = torch.randn(out_features, 2, generator=generator) * 0.05
        state[f"{key}.alpha"] = torch.tensor(2.0)
    folder = tmp_path_factory.mktemp("loras")
    safetensors.torch.save_file(state, str(folder / "tiny_lora.safetensors"))
    folder_paths.add_model_folder_path("loras", str(folder), is_default=True)
    return "tiny_lora.safetensors"
