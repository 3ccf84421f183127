"""The suite never sees the ComfyUI tree's own folders: models a user installed, other custom nodes, outputs.

``populate`` fills a tree the way a user's install would look: every model file name the templates
(``workflows/*.json``, ``workflows/api/*.api.json``) and the README use, plus the tiny stand-ins' own names, in every
model folder (empty files; the CLIP-score model as a folder with ``config.json``), another copy of the pack in
``custom_nodes/``, and files in ``output/``, ``input/``, ``temp/`` and ``user/``. The fast test makes the running
ComfyUI look like one installed there (ComfyUI's own ``folder_paths`` computed for that base) and checks that the
harness's isolation leaves only its own folders and stand-ins. The whole suite on such a tree, by hand::

    python tests/integration/test_isolation.py ~/ComfyUI-0.33 /tmp/populated-0.33   # a view: symlinks + populated
    COMFYUI_PATH=/tmp/populated-0.33 COMFYUI_PYTHON=~/ComfyUI-0.33/.venv/bin/python ./dev integration
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PACK_NAME = "comfyui-reg-guidance"  # comfy_harness.PACK_NAME; this file also runs as a script without ComfyUI
MODEL_FILE = re.compile(r"^[\w .+-]+\.(safetensors|ckpt|pt|pth|bin|sft)$")
README_MODEL = re.compile(r"models/([a-z_]+)/([\w.+-]+)")
CLIP_SCORE = "clip_score"
# The model folders a populated tree fills: ComfyUI's (with the unet/clip aliases) and the pack's clip_score.
MODEL_KINDS = (
    "checkpoints",
    "diffusion_models",
    "unet",
    "text_encoders",
    "clip",
    "vae",
    "vae_approx",
    "controlnet",
    "clip_vision",
    "loras",
    "upscale_models",
    CLIP_SCORE,
)
STAND_INS = (  # tiny_models / tiny_controlnet file names, so that a user's file of the same name is present too
    "tiny_sd15.safetensors",
    "tiny_sd3_mmdit.safetensors",
    "tiny_rand_clip_l.safetensors",
    "taesd3_encoder.safetensors",
    "taesd3_decoder.safetensors",
    "tiny_sd15_controlnet.safetensors",
)
WORK_DIRS = ("output", "input", "temp", "user")


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def template_model_names() -> tuple[set[str], set[str]]:
    """(model file names, CLIP-score folder names) used by the templates and the README."""
    files: set[str] = set()
    folders: set[str] = set()
    for path in [*sorted((REPO / "workflows").glob("*.json")), *sorted((REPO / "workflows" / "api").glob("*.json"))]:
        data = json.loads(path.read_text(encoding="utf-8"))
        files |= {s for s in _strings(data) if MODEL_FILE.match(s)}
        for node in data["nodes"] if "nodes" in data else data.values():  # UI format, API format
            if node.get("type") == "REGCLIPScoreLoader":
                folders.add(node["widgets_values"][0])  # model_name is the loader's first widget
            elif node.get("class_type") == "REGCLIPScoreLoader":
                folders.add(node["inputs"]["model_name"])
    for kind, name in README_MODEL.findall((REPO / "README.md").read_text(encoding="utf-8")):
        (folders if kind == CLIP_SCORE and not MODEL_FILE.match(name) else files).add(name)
    return files, folders


def populate(tree: Path) -> dict[str, set[str]]:
    """Fill ``tree``'s models/, custom_nodes/ and work folders like a user's install; return what each kind holds."""
    files, folders = template_model_names()
    files |= set(STAND_INS)
    held: dict[str, set[str]] = {}
    for kind in MODEL_KINDS:
        directory = tree / "models" / kind
        directory.mkdir(parents=True, exist_ok=True)
        for name in files:
            (directory / name).write_bytes(b"")
        held[kind] = set(files)
    for name in folders:
        model = tree / "models" / CLIP_SCORE / name
        model.mkdir()
        (model / "config.json").write_text("{}")
        (model / "model.safetensors").write_bytes(b"")
        held[CLIP_SCORE].add(name)
    copy_of_pack = tree / "custom_nodes" / PACK_NAME
    shutil.copytree(
        REPO, copy_of_pack, ignore=shutil.ignore_patterns(".git", ".venv", ".models", "__pycache__", "*_cache", "*.jpg")
    )
    (tree / "custom_nodes" / "other_pack.py").write_text("raise RuntimeError('a custom node of the tree was loaded')\n")
    for name in WORK_DIRS:
        (tree / name).mkdir(exist_ok=True)
        (tree / name / "users_file.png").write_bytes(b"")
    return held


def populated_view(comfyui: Path, dest: Path) -> Path:
    """A populated copy-like view of ``comfyui`` at ``dest``: its sources symlinked, its folders populated.

    ``folder_paths.py`` is copied (ComfyUI derives its base directory from that file's real path), every other entry
    except the folders :func:`populate` fills is a symlink, so ComfyUI and its interpreter run from ``dest``.
    """
    dest.mkdir(parents=True)
    skip = {"models", "custom_nodes", "folder_paths.py", *WORK_DIRS}
    for entry in comfyui.iterdir():
        if entry.name not in skip:
            (dest / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    shutil.copy(comfyui / "folder_paths.py", dest / "folder_paths.py")
    populate(dest)
    return dest


class _FolderPathsState:
    """Everything of ``folder_paths`` the isolation changes, to put it back afterwards."""

    ATTRIBUTES = ("base_path", "models_dir", "output_directory", "temp_directory", "input_directory", "user_directory")

    def __init__(self, folder_paths: Any):
        self.module = folder_paths
        self.values = {name: getattr(folder_paths, name) for name in self.ATTRIBUTES}
        self.folders = copy.deepcopy(folder_paths.folder_names_and_paths)

    def restore(self) -> None:
        for name, value in self.values.items():
            setattr(self.module, name, value)
        self.module.folder_names_and_paths.clear()
        self.module.folder_names_and_paths.update(self.folders)
        self.module.filename_list_cache.clear()
        self.module.cache_helper.clear()


def _install_at(tree: Path, reg_pack: Any) -> None:
    """Make the running ComfyUI's ``folder_paths`` what ComfyUI computes for a tree at ``tree``, with the pack loaded.

    ComfyUI's own ``folder_paths.py`` runs again as a separate module with ``--base-directory`` set to ``tree``; its
    folders and directories replace the live ones, and the pack registers its ``clip_score`` folder as at load.
    """
    import comfy.cli_args
    import folder_paths

    args = comfy.cli_args.args
    saved = args.base_directory
    args.base_directory = str(tree)
    try:
        spec = importlib.util.spec_from_file_location("reg_test_fresh_folder_paths", folder_paths.__file__)
        fresh = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(fresh)
    finally:
        args.base_directory = saved
    for name in _FolderPathsState.ATTRIBUTES:
        setattr(folder_paths, name, getattr(fresh, name))
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update(fresh.folder_names_and_paths)
    folder_paths.filename_list_cache.clear()
    reg_pack.submodule("nodes.clip_score").register_model_folder()


def _inside(path: str | Path, root: Path) -> bool:
    return Path(path).resolve().is_relative_to(root.resolve())


def test_isolation_hides_a_populated_tree(tmp_path, reg_pack, tiny):
    import comfy_harness
    import folder_paths
    import tiny_models

    tree = tmp_path / "ComfyUI"
    held = populate(tree)
    clip_entries = reg_pack.submodule("nodes.clip_score").model_entries
    state = _FolderPathsState(folder_paths)
    try:
        _install_at(tree, reg_pack)
        # Without the isolation the user's files are what the loaders list (so this test can fail).
        for kind in ("checkpoints", "diffusion_models", "text_encoders", "vae", "controlnet"):
            assert held[kind] <= set(folder_paths.get_filename_list(kind)), kind
        assert held[CLIP_SCORE] - set(STAND_INS) <= set(clip_entries())
        assert str(tree / "custom_nodes") in folder_paths.get_folder_paths("custom_nodes")

        root = (tmp_path / "session").resolve()
        isolated = comfy_harness.isolate_folders(root)
        tiny_models.register(tiny.root)

        models = root / "models"
        assert isolated["checkpoints"] == [str(models / "checkpoints")]
        assert isolated["diffusion_models"] == [str(models / "unet"), str(models / "diffusion_models")]
        for kind, (paths, _) in folder_paths.folder_names_and_paths.items():
            for path in paths:
                assert _inside(path, root) or _inside(path, tiny.root), f"{kind}: {path}"
        for kind in MODEL_KINDS:
            listed = set(folder_paths.get_filename_list(kind))
            assert listed <= set(STAND_INS), f"{kind} lists {sorted(listed - set(STAND_INS))}"
            for name in listed:
                assert _inside(folder_paths.get_full_path(kind, name), tiny.root)
            for name in held[kind] - listed:
                assert folder_paths.get_full_path(kind, name) is None, f"{kind}/{name} is visible"
        assert _inside(folder_paths.get_full_path("checkpoints", tiny.sd15_checkpoint), tiny.root)
        assert clip_entries() == []
        assert folder_paths.get_folder_paths("custom_nodes") == [str(root / "custom_nodes")]
        directories = [
            folder_paths.get_output_directory(),
            folder_paths.get_temp_directory(),
            folder_paths.get_input_directory(),
            folder_paths.get_user_directory(),
        ]
        assert directories == [str(root / name) for name in ("output", "temp", "input", "user")]
    finally:
        state.restore()


def _users(path: str | Path, tree: Path) -> bool:
    """True for a path in one of the tree's own folders (this repository may sit in its custom_nodes/)."""
    in_tree = any(_inside(path, tree / name) for name in ("models", "custom_nodes", *WORK_DIRS))
    return in_tree and not _inside(path, REPO)


def test_the_session_uses_only_its_own_folders_and_this_repository(comfyui_dirs, reg_pack, tiny, tmp_path_factory):
    import folder_paths

    import nodes

    tree = Path(folder_paths.__file__).resolve().parent
    own = (comfyui_dirs, tiny.root, tmp_path_factory.getbasetemp())
    for kind, (paths, _) in folder_paths.folder_names_and_paths.items():
        for path in paths:
            assert not _users(path, tree), f"{kind} reads the ComfyUI tree's folder {path}"
            assert any(_inside(path, root) for root in own), f"{kind}: {path}"
    for directory in (
        folder_paths.get_output_directory(),
        folder_paths.get_temp_directory(),
        folder_paths.get_input_directory(),
        folder_paths.get_user_directory(),
    ):
        assert _inside(directory, comfyui_dirs), directory
    assert Path(reg_pack.module.__file__).resolve() == REPO / "__init__.py"
    assert Path(nodes.LOADED_MODULE_DIRS[PACK_NAME]).resolve() == REPO
    assert not [d for d in nodes.LOADED_MODULE_DIRS.values() if _users(d, tree)]
    loaded = [getattr(m, "__file__", None) or "" for m in list(sys.modules.values())]
    assert not [f for f in loaded if f and _users(f, tree)]


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python tests/integration/test_isolation.py <ComfyUI tree> <new folder for the view>")
    sys.stdout.write(f"{populated_view(Path(sys.argv[1]).expanduser(), Path(sys.argv[2]).expanduser())}\n")
