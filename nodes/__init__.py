"""Thin ComfyUI adapters (V3 schema) over :mod:`reg_core`.

Every module in this package that defines a ``NODES`` list contributes its nodes to the extension, so adding a node
module needs no edit here.
"""

from __future__ import annotations

import importlib
import pkgutil

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override


def node_list() -> list[type[io.ComfyNode]]:
    """Collect ``NODES`` from every module of this package, in module-name order."""
    found: list[type[io.ComfyNode]] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        found.extend(getattr(module, "NODES", []))
    return found


class REGExtension(ComfyExtension):
    """The pack's extension: every node of :func:`node_list`."""

    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_list()
