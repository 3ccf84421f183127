"""Thin ComfyUI adapters (V3 schema) over :mod:`reg_core`.

The extension's nodes are listed explicitly, as ComfyUI's own extensions list theirs: a new node module must be
added to :func:`node_list`.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override


def node_list() -> list[type[io.ComfyNode]]:
    """Every node of the pack, in display order (the modules are imported on first use)."""
    from . import clip_score, diagnostics, guidance, sweep

    return [*clip_score.NODES, *diagnostics.NODES, *guidance.NODES, *sweep.NODES]


class REGExtension(ComfyExtension):
    """The pack's extension: every node of :func:`node_list`."""

    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_list()
