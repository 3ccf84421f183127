"""The pack's root module imports without ComfyUI and has no side effects."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_root_module_imports_without_comfyui_and_exposes_the_v3_entry_point() -> None:
    before = set(sys.modules)
    spec = importlib.util.spec_from_file_location(
        "reg_pack_under_test", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert inspect.iscoroutinefunction(module.comfy_entrypoint)
    assert not hasattr(module, "NODE_CLASS_MAPPINGS")  # V1 mappings would make ComfyUI ignore the V3 entry point
    loaded = set(sys.modules) - before
    assert not any(name == "comfy" or name.startswith(("comfy.", "comfy_api")) for name in loaded)
    assert not any(name.startswith("reg_pack_under_test.nodes") for name in loaded)  # nodes load only on demand


def test_dev_demo_runs_the_demo_module() -> None:
    """``./dev demo`` calls ``python -m reg_core.<module>``: that module exists and has the demo's ``main``."""
    (module,) = re.findall(r'"\$PY" -m (reg_core\.\w+)', (ROOT / "dev").read_text())
    assert module == "reg_core.demo"
    demo = importlib.import_module(module)
    with pytest.raises(SystemExit) as info:
        demo.main(["--help"])
    assert info.value.code == 0


def test_registry_metadata_ships_only_what_runs_in_comfyui() -> None:
    """No runtime dependency of ComfyUI's own is declared (installing the pack never changes ComfyUI's torch), the
    licence file is the one pyproject names, and the published archive leaves out tests, benchmarks and tools."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == []
    assert project["license"] == {"file": "LICENSE"} and (ROOT / "LICENSE").read_text().startswith("MIT License")
    ignored = {line.strip() for line in (ROOT / ".comfyignore").read_text().splitlines() if not line.startswith("#")}
    assert {"tests/", "bench/", "tools/", ".ci/", "dev"} <= ignored
    assert not ignored & {"nodes/", "reg_core/", "web/", "workflows/", "__init__.py", "README.md", "LICENSE"}
