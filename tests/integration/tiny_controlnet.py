"""A tiny random-weight SD1.5 ControlNet for the integration tests, built with ComfyUI's own ``cldm.ControlNet``.

The network mirrors the tiny SD1.5 UNet of ``tiny_models.py`` (model_channels 320, num_res_blocks [1, 1],
channel_mult [1, 1], transformer_depth [0, 1], one middle transformer, context 768, 8 heads) plus the standard
8x-downsampling ``input_hint_block`` for a 3-channel hint image. It is written in the original (ldm) key layout
(``zero_convs.0.0.weight``, ``input_hint_block.0.weight``, …) that ``comfy.controlnet.load_controlnet_state_dict``
detects as a ControlNet and configures through ``comfy.model_detection``, so ``ControlNetLoader`` loads it unchanged.

Initialisation is ``tiny_models.randomise``: 1-D ``*.weight`` (norm scales) = 1, biases N(0, 0.02²), everything else
N(0, 1/fan_in). That deliberately includes the zero convolutions (``zero_convs.*``, ``middle_block_out``), which a
real, freshly initialised ControlNet has at zero: here they are non-zero so the control residuals really change the
UNet's output. Stored in fp16 like the other tiny models.

The file goes to ``<cache>/controlnet/tiny_sd15_controlnet.safetensors`` (the same cache folder as tiny_models.py,
gitignored), is rebuilt when missing or when ``RECIPE_VERSION`` changes, and the folder is registered with
``folder_paths`` under ``controlnet`` (the folder ``ControlNetLoader`` lists).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import locate
import tiny_models
import torch

log = logging.getLogger(__name__)

RECIPE_VERSION = 1
FOLDER = "controlnet"
SD15_CONTROLNET = "tiny_sd15_controlnet.safetensors"
SEED = 1515
HINT_CHANNELS = 3
HEADS = {"num_heads": 8, "num_head_channels": -1}  # comfy.supported_models.SD15.unet_extra_config

# What comfy.model_detection must read back from the ControlNet keys: the tiny UNet's structure.
DETECTED_KEYS = (
    "in_channels",
    "model_channels",
    "num_res_blocks",
    "channel_mult",
    "transformer_depth",
    "transformer_depth_middle",
    "context_dim",
    "use_linear_in_transformer",
    "adm_in_channels",
)


def controlnet_config() -> dict:
    """``comfy.cldm.cldm.ControlNet`` arguments matching ``tiny_models.SD15_UNET_CONFIG``."""
    config = {k: v for k, v in tiny_models.SD15_UNET_CONFIG.items() if k != "out_channels"}
    return {**config, **HEADS, "hint_channels": HINT_CHANNELS}


def _state_dict() -> dict[str, torch.Tensor]:
    import comfy.cldm.cldm
    import comfy.ops

    def build():
        return comfy.cldm.cldm.ControlNet(
            **controlnet_config(), dtype=torch.float32, operations=comfy.ops.disable_weight_init
        )

    return tiny_models.randomise(tiny_models._meta(build), SEED)


def check_detection(state: dict[str, torch.Tensor]) -> None:
    """Fail the build if ComfyUI would not read the tiny UNet's structure back from these ControlNet keys."""
    import comfy.model_detection

    if "zero_convs.0.0.weight" not in state or state["input_hint_block.0.weight"].shape[1] != HINT_CHANNELS:
        raise RuntimeError("tiny ControlNet lacks the keys load_controlnet_state_dict detects ControlNets by")
    detected = comfy.model_detection.model_config_from_unet(state, "", True).unet_config
    want = tiny_models.SD15_UNET_CONFIG
    wrong = {k: (detected.get(k), want[k]) for k in DETECTED_KEYS if detected.get(k) != want[k]}
    if wrong:
        raise RuntimeError(f"tiny ControlNet detected with a different structure (detected, wanted): {wrong}")


def _manifest(root: Path) -> Path:
    return root / FOLDER / "manifest.json"


def _cache_ok(root: Path) -> bool:
    try:
        manifest = json.loads(_manifest(root).read_text())
    except (OSError, ValueError):
        return False
    path = root / FOLDER / SD15_CONTROLNET
    return (
        manifest.get("recipe") == RECIPE_VERSION
        and manifest.get("torch") == torch.__version__
        and path.is_file()
        and path.stat().st_size == manifest.get("size")
    )


def ensure_controlnet(root: Path) -> float:
    """Build the ControlNet under ``root/controlnet`` unless this recipe's file exists; return the build seconds."""
    with locate.locked(root):
        if _cache_ok(root):
            return 0.0
        start = time.perf_counter()
        state = _state_dict()
        check_detection(state)
        path = root / FOLDER / SD15_CONTROLNET
        tiny_models._save(path, state)
        manifest = {"recipe": RECIPE_VERSION, "torch": torch.__version__, "size": path.stat().st_size}
        _manifest(root).write_text(json.dumps(manifest, indent=1) + "\n")
        elapsed = time.perf_counter() - start
        log.info("built the tiny ControlNet in %.1f s", elapsed)
        return elapsed


@dataclass(frozen=True)
class TinyControlNet:
    """The ControlNetLoader name of the tiny ControlNet and where it lives."""

    root: Path
    build_seconds: float  # 0.0 when an existing file was reused
    sd15: str = SD15_CONTROLNET

    @property
    def path(self) -> Path:
        return self.root / FOLDER / self.sd15


def prepare(root: Path) -> TinyControlNet:
    """Build the ControlNet if needed and register ``root/controlnet`` with ComfyUI (first in the search list)."""
    import folder_paths

    seconds = ensure_controlnet(root)
    folder_paths.add_model_folder_path(FOLDER, str(root / FOLDER), is_default=True)
    return TinyControlNet(root=root, build_seconds=seconds)
