"""In-process ComfyUI harness: load the pack like ComfyUI does and run API-format prompts through the real executor.

Import this module only after ComfyUI is importable (``conftest.py`` takes care of that); the ComfyUI modules are
imported lazily inside the functions so that importing this file has no side effects.
See README.md in this folder for how the pieces fit together.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PACK_NAME = "comfyui-reg-guidance"

# Nodes whose outputs stay in the executor's cache between runs: they only read model files, so sharing them across
# tests keeps the suite fast without hiding behaviour. Every other node is re-executed on each run unless
# ``run(..., cached=True)`` asks for ComfyUI's normal caching.
FILE_LOADERS = frozenset(
    {
        "CheckpointLoaderSimple",
        "CheckpointLoader",
        "UNETLoader",
        "CLIPLoader",
        "DualCLIPLoader",
        "TripleCLIPLoader",
        "VAELoader",
        "CLIPVisionLoader",
        "ControlNetLoader",
        "UpscaleModelLoader",
    }
)


class PackLoadError(RuntimeError):
    """The pack did not load through ComfyUI's custom-node loader."""


class PromptValidationError(AssertionError):
    """ComfyUI rejected the prompt (what the HTTP API reports as a 400 with ``node_errors``)."""

    def __init__(self, message: str, node_errors: dict[str, Any]):
        super().__init__(message)
        self.node_errors = node_errors


class PromptExecutionError(AssertionError):
    """A node raised (or was blocked) while the prompt executed."""

    def __init__(self, message: str, error: dict[str, Any]):
        super().__init__(message)
        self.error = error


def node_id(node: Any) -> str:
    """Accept a node id or a ``graph_utils.Node`` (as returned by ``GraphBuilder.node``)."""
    return node if isinstance(node, str) else node.id


@contextlib.contextmanager
def without_path(directory: Path) -> Iterator[None]:
    """Temporarily drop ``directory`` from ``sys.path``.

    pytest runs from the repository root, which puts the root on ``sys.path`` (``python -m`` and the ``pythonpath``
    setting). In a real install the pack lives in ``custom_nodes/`` and its root is *not* importable, so an absolute
    ``import reg_core`` would fail there. Hiding the root while the pack loads and runs makes that bug fail here too.
    """
    target = directory.resolve()
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if Path(p or os.getcwd()).resolve() != target]
    try:
        yield
    finally:
        sys.path[:] = saved


class _Collect(logging.Handler):
    """Collect formatted log records (the custom-node loader reports failures only through logging)."""

    def __init__(self, level: int = logging.WARNING):
        super().__init__(level)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@dataclass
class LoadedPack:
    """The pack as ComfyUI loaded it from ``custom_nodes/comfyui-reg-guidance`` (a symlink to the repository)."""

    path: Path  # the symlink inside the temporary custom_nodes folder
    module_name: str  # ComfyUI names the module after its path
    module: Any
    node_ids: list[str]
    failed_builtin_extras: list[str]

    def submodule(self, name: str) -> Any:
        """Import a module of the pack as ComfyUI sees it, e.g. ``pack.submodule("reg_core.math")``."""
        import importlib

        return importlib.import_module(f"{self.module_name}.{name}")


# The folders ComfyUI reads or writes outside its model folders, by their ``folder_paths`` setter.
WORK_DIRS = {"output": "set_output_directory", "temp": "set_temp_directory", "input": "set_input_directory"}
USER_DIR = "user"


def isolate_folders(root: Path) -> dict[str, list[str]]:
    """Point every folder ComfyUI uses at ``root``, so nothing of the ComfyUI tree's own folders is read or written.

    Each folder ``folder_paths`` knows (``checkpoints``, ``diffusion_models`` with its ``unet`` alias, ``vae``,
    ``text_encoders``/``clip``, ``controlnet``, the pack's ``clip_score``, ``custom_nodes``, …) keeps its layout but
    moves from the tree's base to ``root`` (``models/…`` to ``root/models/…``); folders registered from anywhere else
    (``extra_model_paths.yaml``) are dropped. ``output``, ``temp``, ``input`` and ``user`` move to ``root`` as well.
    The model folders are created empty: the tests register their stand-ins in front of them afterwards.
    Returns the new search list of every folder name.
    """
    import folder_paths

    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()
    models = root / "models"
    moves = [(Path(folder_paths.models_dir).resolve(), models), (Path(folder_paths.base_path).resolve(), root)]

    def moved(path: str) -> Path | None:
        resolved = Path(path).resolve()
        for old, new in moves:
            if resolved.is_relative_to(old):
                return new / resolved.relative_to(old)
        return None

    isolated: dict[str, list[str]] = {}
    for name, (paths, extensions) in list(folder_paths.folder_names_and_paths.items()):
        new_paths = list(dict.fromkeys(str(p) for p in map(moved, paths) if p is not None))
        for path in new_paths:
            Path(path).mkdir(parents=True, exist_ok=True)
        folder_paths.folder_names_and_paths[name] = (new_paths, extensions)
        isolated[name] = list(new_paths)
    folder_paths.base_path = str(root)
    folder_paths.models_dir = str(models)
    for name, setter in WORK_DIRS.items():
        (root / name).mkdir(exist_ok=True)
        getattr(folder_paths, setter)(str(root / name))
    (root / USER_DIR).mkdir(exist_ok=True)
    folder_paths.set_user_directory(str(root / USER_DIR))
    folder_paths.filename_list_cache.clear()
    folder_paths.cache_helper.clear()
    return isolated


def load_pack(repo: Path, custom_nodes_dir: Path) -> LoadedPack:
    """Symlink ``repo`` into ``custom_nodes_dir`` and run ComfyUI's own node initialisation (``init_extra_nodes``).

    ``custom_nodes_dir`` becomes the only custom-node folder, so exactly the built-in extras and this pack are loaded.
    Raises :class:`PackLoadError` with ComfyUI's logged traceback if the pack fails to import or register.
    """
    import folder_paths

    import nodes

    custom_nodes_dir.mkdir(parents=True, exist_ok=True)
    link = custom_nodes_dir / PACK_NAME
    if not link.exists():
        link.symlink_to(repo, target_is_directory=True)
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(custom_nodes_dir)], set())

    results: dict[str, bool] = {}
    pack_log: list[str] = []
    collect = _Collect()
    original = nodes.load_custom_node

    async def recording(module_path: str, *args: Any, **kwargs: Any) -> bool:
        start = len(collect.lines)
        ok = await original(module_path, *args, **kwargs)
        results[module_path] = ok
        if module_path == str(link):
            pack_log.extend(collect.lines[start:])
        return ok

    logging.getLogger().addHandler(collect)
    nodes.load_custom_node = recording
    try:
        with without_path(repo):
            asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    finally:
        nodes.load_custom_node = original
        logging.getLogger().removeHandler(collect)

    module_name = str(link).replace(".", "_x_")  # nodes.load_custom_node's naming for package directories
    if results.get(str(link)) is not True:
        details = "\n".join(pack_log)
        module = sys.modules.get(module_name)
        if callable(getattr(module, "comfy_entrypoint", None)):  # the entry point failed: ComfyUI logs only str(exc)
            details += "\n" + _entrypoint_traceback(module, repo)
        raise PackLoadError(
            f"ComfyUI failed to load the pack from {link} (load_custom_node -> {results.get(str(link))})\n{details}"
        )
    failed = sorted(Path(p).name for p, ok in results.items() if not ok and p != str(link))
    if failed:
        log.warning("built-in ComfyUI extras that failed to import (missing optional deps): %s", ", ".join(failed))

    module = sys.modules[module_name]

    async def node_classes() -> list[Any]:
        extension = await module.comfy_entrypoint()
        return await extension.get_node_list()

    with without_path(repo):
        classes = asyncio.run(node_classes())
    node_ids = []
    for cls in classes:
        schema_id = cls.GET_SCHEMA().node_id
        if nodes.NODE_CLASS_MAPPINGS.get(schema_id) is not cls:
            raise PackLoadError(f"node {schema_id} of the pack is not registered (id clash with a built-in node?)")
        node_ids.append(schema_id)
    return LoadedPack(link, module_name, module, node_ids, failed)


def _entrypoint_traceback(module: Any, repo: Path) -> str:
    """Call the pack's entry point again to get the full traceback ComfyUI swallowed."""
    import traceback

    async def call() -> None:
        extension = await module.comfy_entrypoint()
        await extension.get_node_list()

    try:
        with without_path(repo):
            asyncio.run(call())
    except Exception:
        return traceback.format_exc()
    return "(calling comfy_entrypoint again succeeded)"


class DummyServer:
    """The parts of ``server.PromptServer`` the executor touches; messages are kept for error reporting."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.sockets_metadata: dict[str, Any] = {}
        self.messages: list[tuple[Any, Any]] = []

    def send_sync(self, event: Any, data: Any, sid: Any = None) -> None:
        if event == "execution_error":  # blocked executions are reported only here, not in status_messages
            self.messages.append((event, data))

    def queue_updated(self) -> None:
        pass


@dataclass
class RunResult:
    """What one run produced. ``outputs[node][slot]`` is ComfyUI's cached list of values (one per list item)."""

    prompt_id: str
    prompt: dict[str, Any]
    outputs: dict[str, list[list[Any]]]
    ui: dict[str, Any]
    executed: set[str]
    cached: set[str]
    seconds: float
    status_messages: list[tuple[str, dict[str, Any]]] = field(repr=False)

    def values(self, node: Any, slot: int = 0) -> list[Any]:
        nid = node_id(node)
        if nid not in self.outputs:
            raise KeyError(f"node {nid} produced no cached output (was it executed? targets default to sink nodes)")
        return self.outputs[nid][slot]

    def value(self, node: Any, slot: int = 0) -> Any:
        """The single value of output ``slot`` of ``node``."""
        values = self.values(node, slot)
        if len(values) != 1:
            raise ValueError(f"node {node_id(node)} slot {slot} holds {len(values)} values; use values()")
        return values[0]

    def latent(self, node: Any, slot: int = 0) -> Any:
        """``LATENT["samples"]`` of a node output as a normal (non-inference) tensor."""
        latent = self.value(node, slot)
        if not isinstance(latent, dict) or "samples" not in latent:
            raise TypeError(f"node {node_id(node)} slot {slot} is not a LATENT: {type(latent).__name__}")
        return latent["samples"].clone()

    def image(self, node: Any, slot: int = 0) -> Any:
        """An ``IMAGE`` output ([B, H, W, C] in 0..1) as a normal (non-inference) tensor."""
        import torch

        image = self.value(node, slot)
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"node {node_id(node)} slot {slot} is not an IMAGE tensor: {type(image).__name__}")
        return image.clone()


def classic_cache_kwargs() -> dict[str, Any]:
    """``PromptExecutor`` keyword arguments for ComfyUI's classic cache, whichever signature this ComfyUI has.

    0.3.64 takes ``cache_type`` (and ``cache_size`` for LRU); 0.33 also needs ``cache_args`` with the ``lru``, ``ram``
    and ``ram_inactive`` sizes, which its ``main.py`` sets to 0 under ``--cache-classic``.
    """
    import inspect

    import execution

    kwargs: dict[str, Any] = {"cache_type": execution.CacheType.CLASSIC}
    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:
        kwargs["cache_args"] = {"lru": 0, "ram": 0, "ram_inactive": 0}
    return kwargs


def cached_outputs(cache: Any, nid: str) -> list[list[Any]] | None:
    """A node's outputs in the executor's output cache, or None.

    0.3.64's ``get`` is synchronous and returns the output lists; 0.33's is a coroutine that also asks external cache
    providers and returns a ``CacheEntry(ui, outputs)``, so its synchronous local lookup ``get_local`` is used.
    """
    getter = getattr(cache, "get_local", None) or cache.get
    value = getter(nid)
    if value is None:
        return None
    return value.outputs if hasattr(value, "outputs") else value


class ComfyHarness:
    """Runs API-format prompts in-process through ``execution.PromptExecutor`` (one executor per session).

    The loaders' outputs stay cached across runs (models are loaded once); all other nodes re-execute on every run
    unless ``cached=True`` is passed, in which case ComfyUI's own input-signature caching applies.
    """

    def __init__(self, repo: Path, keep_cached: Iterable[str] = FILE_LOADERS):
        import execution

        self.repo = repo
        self.keep_cached = frozenset(keep_cached)
        self.server = DummyServer()
        self.executor = execution.PromptExecutor(self.server, **classic_cache_kwargs())
        self._ids = itertools.count(1)
        self._last_prompt: dict[str, Any] | None = None

    @staticmethod
    def graph() -> Any:
        """A fresh ``GraphBuilder`` with plain ids ("1", "2", …)."""
        from comfy_execution.graph_utils import GraphBuilder

        return GraphBuilder(prefix="")

    def run(
        self,
        prompt: Any,
        outputs: Iterable[Any] | None = None,
        *,
        cached: bool = False,
        extra_data: dict[str, Any] | None = None,
    ) -> RunResult:
        """Validate and execute ``prompt`` (a dict or a ``GraphBuilder``); return every node's cached outputs.

        ``outputs`` are the nodes to execute (with their ancestors). By default: every output node plus every sink
        (a node whose outputs nothing consumes), so a prompt ending in a KSampler runs that KSampler.
        Raises :class:`PromptValidationError` or :class:`PromptExecutionError` with ComfyUI's error text.
        """
        prompt = copy.deepcopy(prompt.finalize() if hasattr(prompt, "finalize") else prompt)
        prompt_id = f"reg-test-{next(self._ids)}"
        targets = [node_id(n) for n in outputs] if outputs is not None else self._default_targets(prompt)
        with without_path(self.repo):
            asyncio.run(self._validate(prompt_id, prompt, targets, explicit=outputs is not None))
            self.server.messages.clear()
            before = time.perf_counter()
            try:
                self.executor.execute(prompt, prompt_id, extra_data or {}, targets)
                seconds = time.perf_counter() - before
                messages = list(self.executor.status_messages)
                self._raise_on_failure(messages)
                return self._collect(prompt_id, prompt, messages, seconds)
            finally:  # also after a failure: nodes that ran before it must not be served from the cache later
                self._last_prompt = prompt
                if not cached:
                    self.forget()

    def _collect(
        self, prompt_id: str, prompt: dict[str, Any], messages: list[tuple[str, Any]], seconds: float
    ) -> RunResult:
        outputs = {}
        for nid in prompt:
            value = cached_outputs(self.executor.caches.outputs, nid)
            if value is not None:
                outputs[nid] = value
        cached_ids: set[str] = set()
        for event, data in messages:
            if event == "execution_cached":
                cached_ids = set(data["nodes"])
        return RunResult(
            prompt_id=prompt_id,
            prompt=prompt,
            outputs=outputs,
            ui=dict(self.executor.history_result.get("outputs", {})),
            executed=set(outputs) - cached_ids,
            cached=cached_ids & set(outputs),
            seconds=seconds,
            status_messages=messages,
        )

    @staticmethod
    def _is_output_node(class_type: str) -> bool:
        import nodes

        cls = nodes.NODE_CLASS_MAPPINGS.get(class_type)
        return cls is not None and getattr(cls, "OUTPUT_NODE", False) is True

    def _default_targets(self, prompt: dict[str, Any]) -> list[str]:
        from comfy_execution.graph_utils import is_link

        consumed = {v[0] for node in prompt.values() for v in node.get("inputs", {}).values() if is_link(v)}
        return [nid for nid, node in prompt.items() if nid not in consumed or self._is_output_node(node["class_type"])]

    @staticmethod
    async def _validate(prompt_id: str, prompt: dict[str, Any], targets: list[str], explicit: bool) -> None:
        """ComfyUI's ``validate_prompt`` for the output nodes, plus ``validate_inputs`` for non-output targets.

        ``validate_prompt`` only walks back from output nodes, and a test often wants the LATENT of a KSampler that
        feeds nothing; those targets go through the same per-node ``validate_inputs`` that ``validate_prompt`` uses.
        """
        import execution

        partial = targets if explicit else None
        ok, error, _good, node_errors = await execution.validate_prompt(prompt_id, prompt, partial)
        node_errors = dict(node_errors)
        if not ok and error["type"] != "prompt_no_outputs":
            if error["type"] != "prompt_outputs_failed_validation" or not node_errors:
                raise PromptValidationError(f"{error['message']}: {error['details']}", node_errors)
        if ok or error["type"] == "prompt_no_outputs":
            validated: dict[str, Any] = {}
            for target in targets:
                await execution.validate_inputs(prompt_id, prompt, target, validated)
            for nid, (valid, reasons, _) in validated.items():
                if valid is not True and reasons and nid not in node_errors:
                    node_errors[nid] = {"errors": reasons, "class_type": prompt[nid]["class_type"]}
        if node_errors:
            lines = ["prompt failed validation:"]
            for nid, entry in node_errors.items():
                for reason in entry["errors"]:
                    lines.append(f"  node {nid} ({entry['class_type']}): {reason['message']}: {reason['details']}")
            raise PromptValidationError("\n".join(lines), node_errors)

    def _raise_on_failure(self, messages: list[tuple[str, dict[str, Any]]]) -> None:
        errors = [data for event, data in messages + self.server.messages if event == "execution_error"]
        interrupted = [data for event, data in messages if event == "execution_interrupted"]
        if errors:
            e = errors[0]
            trace = "".join(e.get("traceback") or [])
            raise PromptExecutionError(
                f"node {e['node_id']} ({e['node_type']}) failed: {e['exception_type']}: "
                f"{e['exception_message'].strip()}\n{trace}",
                e,
            )
        if interrupted:
            raise PromptExecutionError(f"execution interrupted at node {interrupted[0]['node_id']}", interrupted[0])
        if not any(event == "execution_success" for event, _ in messages):
            raise PromptExecutionError("execution did not report success", {})

    def forget(self) -> None:
        """Drop the cached outputs of every non-loader node of the last run, so they execute again next time.

        ``run`` does this itself unless ``cached=True``. Uses the classic cache's internals (``cache``, ``subcaches``
        and the key set of the prompt that ran last), which ComfyUI 0.3.64 and 0.33 share. 0.3.64 keeps the UI
        outputs in a second cache (``caches.ui``); 0.33 stores them with the outputs (``CacheEntry``).
        """
        if self._last_prompt is None:
            return
        caches = self.executor.caches
        for cache in (caches.outputs, getattr(caches, "ui", None)):
            if cache is None:
                continue
            keys = cache.cache_key_set
            for nid, node in self._last_prompt.items():
                if node["class_type"] in self.keep_cached:
                    continue
                cache.cache.pop(keys.get_data_key(nid), None)
                cache.subcaches.pop(keys.get_subcache_key(nid), None)
