"""ComfyUI's GPU memory management set up the way its main.py sets it up, for benchmarks that import ComfyUI in-process.

ComfyUI 0.33's main.py (lines ~40-110 and ~290-330) does, with every flag at its default:

1. ``import cuda_malloc`` (chooses PyTorch's ``cudaMallocAsync`` allocator through ``PYTORCH_CUDA_ALLOC_CONF`` where the
   card supports it), before CUDA is first used;
2. ``comfy_aimdo.control.init(simple_vram_headroom=…, nvml_pressure=…)`` when ``enables_dynamic_vram()`` (no
   ``--cpu``/``--highvram``/``--gpu-only``/``--novram``/``--disable-dynamic-vram``);
3. after ``import comfy.model_management``: on NVIDIA (or ROCm ≥ 7.14) ``comfy_aimdo.control.init_devices(…)``, and when
   that succeeds ``comfy.model_patcher.CoreModelPatcher = ModelPatcherDynamic`` and
   ``comfy.memory_management.aimdo_enabled = True`` ("DynamicVRAM support detected and enabled").

Older comfy-aimdo protocols are handled with the same ``TypeError`` fallbacks main.py uses. ComfyUI versions without
comfy-aimdo (0.3.x) get step 1 only. Call :func:`init_like_main` after ``comfy.cli_args`` is imported and before CUDA
is used.
"""

from __future__ import annotations

import importlib.util
import logging

log = logging.getLogger("bench_reg.gpu")


def init_like_main() -> str:
    """Set up allocator and DynamicVRAM as main.py does; returns a one-line description of what is active."""
    import comfy.cli_args

    args = comfy.cli_args.args
    import cuda_malloc  # noqa: F401  (main.py imports it for its side effect on PYTORCH_CUDA_ALLOC_CONF)

    if importlib.util.find_spec("comfy_aimdo") is None or not hasattr(comfy.cli_args, "enables_dynamic_vram"):
        import comfy.model_management

        return "legacy ModelPatcher (this ComfyUI has no comfy-aimdo DynamicVRAM)"
    import comfy_aimdo.control

    enables = comfy.cli_args.enables_dynamic_vram()
    if enables:
        headroom = None if args.reserve_vram is None else int(args.reserve_vram * 1024**3)
        try:
            comfy_aimdo.control.init(simple_vram_headroom=headroom, nvml_pressure=not args.disable_nvml_pressure)
        except TypeError:
            try:
                comfy_aimdo.control.init(simple_vram_headroom=headroom)
            except TypeError:
                comfy_aimdo.control.init()
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher

    supported = mm.is_nvidia() or (mm.is_amd() and getattr(mm, "rocm_version", (0, 0)) >= (7, 14))
    if not (args.enable_dynamic_vram or (enables and supported)):
        return "legacy ModelPatcher (DynamicVRAM not enabled for this device)"
    devices = mm.get_all_torch_devices()
    try:
        ok = comfy_aimdo.control.init_devices((d.index, int(args.vram_headroom * 1024**3)) for d in devices)
    except TypeError:
        ok = comfy_aimdo.control.init_devices(d.index for d in devices)
    if not ok:
        log.warning("comfy-aimdo did not initialise: ComfyUI falls back to the legacy ModelPatcher, as main.py would")
        return "legacy ModelPatcher (comfy-aimdo failed to initialise)"
    comfy_aimdo.control.set_log_warning()
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    return "DynamicVRAM (comfy-aimdo, ModelPatcherDynamic)"
