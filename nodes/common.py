"""Pieces every REG node module shares: the user-facing error type and wrapper registration."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import comfy.patcher_extension

LOGGER_NAME = "reg_guidance"

AddWrapper = Callable[[str, str, Callable], None]


class REGConfigError(ValueError):
    """A user-facing configuration error (names the input and the fix)."""


def wrapper_adder(target: Any) -> AddWrapper:
    """``add_wrapper(type, key, fn)`` for a ModelPatcher (its own method) or a ``model_options`` dict."""
    if isinstance(target, dict):

        def add(kind: str, key: str, fn: Callable) -> None:
            comfy.patcher_extension.add_wrapper_with_key(kind, key, fn, target, is_model_options=True)

        return add
    return target.add_wrapper_with_key
