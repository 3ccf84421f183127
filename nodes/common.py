"""Pieces every REG node module shares: the user-facing error type, wrapper registration, the model's σ space."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import comfy.model_sampling
import comfy.patcher_extension

from ..reg_core import rectify
from ..reg_core.rectify import Space

LOGGER_NAME = "reg_guidance"


def _advanced() -> dict:
    """``advanced=True`` where the running ComfyUI's V3 inputs take it (0.33: shown under the node's "advanced"
    toggle); nothing on 0.3.64, whose inputs do not know the argument."""
    from comfy_api.latest import io

    return {"advanced": True} if "advanced" in inspect.signature(io.Input.__init__).parameters else {}


ADVANCED = _advanced()

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


def model_space(sampling: Any) -> Space | None:
    """The sampler's space for a ComfyUI model-sampling object; None for a model that adds no noise.

    Flow models (``CONST``) carry their ``noise_scale``; ``IMG_TO_IMG_FLOW`` (Wan FlowRVS) maps an image to an image
    without noise, so there is no noise level for M.
    """
    no_noise = getattr(comfy.model_sampling, "IMG_TO_IMG_FLOW", None)
    if no_noise is not None and isinstance(sampling, no_noise):
        return None
    if isinstance(sampling, comfy.model_sampling.CONST):
        return Space(flow=True, noise_scale=float(getattr(sampling, "noise_scale", 1.0)))
    return rectify.VE
