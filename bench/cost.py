"""REG's cost next to CFG's inside a real ComfyUI, on tiny or full-size random-weight networks (bench/README.md).

    ./dev bench                                                 # tiny sd15 and sd3 at 32² and 64²: every config
    ./dev bench --real --models sdxl --sizes 32 --threads 2     # full size, CFG vs the estimators per step
    ./dev bench --real --measure pass --modes plain vjp-low-memory --sizes 96
    ./dev bench --real --measure precision --models sdxl --sizes 16

What it measures per model and latent size (``--measure``): ``steps``, seconds per sampling step of each
configuration, every run bracketed by CFG runs, and peak memory above CFG's; ``pass``, one M per mode outside the
sampler loop, timed and measured the same way against the first mode; ``precision``, M in bf16 and fp16 compute
against float32 on the same weights; ``exact``, one REG step against an independent autograd reference (exit 1 when
one fails). Peak memory on the CPU: each configuration's run in its own process; on a GPU: the allocator's per-run
peak.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import itertools
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))  # locate.py (where ComfyUI is), tiny_models.py (configs)
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # appended: the pack's ``nodes`` package must not shadow ComfyUI's nodes.py

import locate  # noqa: E402
import tiny_models  # noqa: E402

from bench.benchlib import (  # noqa: E402
    GIB,
    SEED,
    PeakMemory,
    bracketed,
    cost_rows,
    markdown_table,
    parse_config,
    random_weight,
    relative_error,
    release_memory,
)

log = logging.getLogger("bench.cost")
UNDER_COMFYUI = "REG_BENCH_UNDER_COMFYUI"
CFG_SCALE = 4.0
CONFIGS = ("CFG", "vjp", "vjp-low-memory", "gradient-free", "chain", "vjp:2", "gradient-free:2", "vjp:4",
           "gradient-free:4")  # fmt: skip
REAL_CONFIGS = ("CFG", "vjp", "vjp-low-memory", "gradient-free", "vjp:2")
MODES = ("cfg", "plain", "vjp", "vjp-low-memory", "gradient-free")
MEASURES = ("steps", "pass", "precision", "exact")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FLUX_FULL = (19, 38)
WARM_UP_SIZE = 8  # latent size of the memory processes' warm-up
# glibc told to keep what a process frees (README, "What it costs", on a CPU): no heap trimming, no mmap per block
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}


def sd15(real: bool, _depth: tuple[int, int]) -> dict:
    config = dict(tiny_models.SD15_UNET_CONFIG)
    if real:
        config.update(num_res_blocks=[2] * 4, channel_mult=[1, 2, 4, 4], transformer_depth=[1] * 6 + [0] * 2,
                      transformer_depth_output=[1] * 9 + [0] * 3)  # fmt: skip
    return config


def sdxl(real: bool, _depth: tuple[int, int]) -> dict:
    config = dict(tiny_models.SDXL_CONFIG)
    if real:
        config.update(channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                      transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10])  # fmt: skip
    return config


def sd3(real: bool, _depth: tuple[int, int]) -> dict:
    if not real:
        return tiny_models.sd3_config(6)
    return {**tiny_models.sd3_config(24), "num_patches": 384**2, "pos_embed_max_size": 384, "qk_norm": "rms",
            "x_block_self_attn_layers": list(range(13))}  # fmt: skip


def flux(real: bool, depth: tuple[int, int]) -> dict:
    config = tiny_models.family_config("flux")
    if real:
        config.update(hidden_size=3072, num_heads=24, depth=depth[0], depth_single_blocks=depth[1], context_in_dim=4096)
    return config


@dataclass(frozen=True)
class Family:
    """One network family: its config, the ComfyUI classes its loader must pick, and its conditioning."""

    label: str
    config: Callable[[bool, tuple[int, int]], dict]  # (real, flux depth) -> unet config
    classes: tuple[str, ...]
    channels: int
    context: tuple[int, int]  # (tokens, width) of the text conditioning
    pooled: int | None
    store: torch.dtype  # what real checkpoints store
    one_step: tuple[str, float]  # scheduler and denoise of the exactness step (it ends at σ = 0)
    sizes: tuple[int, ...]  # default latent sizes at full size
    tiny_context: tuple[int, int] | None = None


FAMILIES = {
    "sd15": Family("SD1.5 UNet", sd15, ("SD15",), 4, (77, 768), None, torch.float16, ("normal", 1.0), (64, 96)),
    "sdxl": Family("SDXL UNet", sdxl, ("SDXL", "Segmind_Vega"), 4, (77, 2048), 1280, torch.float16,
                   ("normal", 1.0), (128,)),
    "sd3": Family("SD3.5-Medium-size MMDiT", sd3, ("SD35", "SD3"), 16, (154, 4096), 2048, torch.float16,
                  ("simple", 0.5), (128,)),
    "flux": Family("Flux-size DiT", flux, ("FluxSchnell", "Flux"), 16, (256, 4096), 768, torch.bfloat16,
                   ("simple", 0.5), (128,), tiny_context=(8, 64)),
}  # fmt: skip


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line, with every default resolved (they depend on --real and --gpu) and checked."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--real", action="store_true", help="full-size networks (default: tiny ones of the same classes)")
    p.add_argument("--models", nargs="+", choices=FAMILIES, help="default: sd15 sd3 (tiny), sd15 (--real)")
    p.add_argument("--sizes", nargs="+", type=int, help="latent sizes (default 32 64; --real: sd15 64 96, others 128)")
    p.add_argument("--measure", nargs="+", choices=MEASURES, default=["steps"], help="what to measure (steps)")
    p.add_argument("--configs", nargs="+", help=f"steps: CFG and estimator[:refresh_every] (default "
                   f"{' '.join(CONFIGS)}; --real {' '.join(REAL_CONFIGS)})")  # fmt: skip
    p.add_argument("--modes", nargs="+", choices=MODES, default=["plain", "vjp", "vjp-low-memory"],
                   help="pass: modes, the first is the reference")  # fmt: skip
    p.add_argument("--steps", type=int, help="steps per run, step 0 untimed (default 5; --real on the CPU: 3)")
    p.add_argument("--repeats", type=int, help="bracketed repeats (default 3; --real: CPU 1, GPU 2; 0: memory only)")
    p.add_argument("--no-memory", action="store_true", help="CPU: skip the peak-memory processes")
    p.add_argument("--keep-freed-memory", action="store_true", help="CPU: time with glibc keeping freed memory "
                   "(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_)")  # fmt: skip
    p.add_argument("--dtype", choices=DTYPES, help="weights (default ComfyUI's; --real on the CPU: sd15 float32, "
                   "others bfloat16)")  # fmt: skip
    p.add_argument("--flux-depth", nargs=2, type=int, metavar=("DOUBLE", "SINGLE"), help="--real flux blocks "
                   "(default: CPU 2 4, GPU 19 38)")  # fmt: skip
    p.add_argument("--threads", type=int, help="torch threads (default torch's)")
    p.add_argument("--gpu", action="store_true", help="CUDA with ComfyUI's default memory management (the GPU check)")
    p.add_argument("--out", type=Path, help="also write the report (markdown) here")
    p.add_argument("--memory-of", help=argparse.SUPPRESS)  # a child process: one peak, printed as JSON
    args = p.parse_args(argv)
    cpu_real = args.real and not args.gpu
    args.models = args.models or (["sd15"] if args.real else ["sd15", "sd3"])
    args.configs = args.configs or list(REAL_CONFIGS if args.real else CONFIGS)
    args.steps = (3 if cpu_real else 5) if args.steps is None else args.steps
    args.repeats = ((2 if args.gpu else 1) if args.real else 3) if args.repeats is None else args.repeats
    args.flux_depth = tuple(args.flux_depth or ((2, 4) if cpu_real else FLUX_FULL))
    args.configs = ["CFG", *(c for c in args.configs if c != "CFG")]  # every ratio is to CFG, the first
    try:
        every = [parse_config(name)[1] for name in args.configs]
    except ValueError as err:
        p.error(str(err))
    if args.steps < 2 or any((args.steps - 1) % k for k in every):
        p.error(f"--steps {args.steps}: step 0 is not timed, and steps - 1 must be a multiple of every refresh_every "
                f"({sorted(set(every))}) so each configuration times its exact fresh/reused mix")  # fmt: skip
    if args.repeats < (1 if args.gpu or args.no_memory else 0):
        p.error(f"--repeats {args.repeats}: nothing would be measured")
    if args.keep_freed_memory and args.gpu:
        p.error("--keep-freed-memory: glibc's heap holds CPU memory only (the GPU's allocator keeps its own)")
    if args.keep_freed_memory and not args.no_memory:
        p.error("--keep-freed-memory times only (add --no-memory): memory freed by one run stays with the process "
                "and shrinks the free memory a later size's memory process sees")  # fmt: skip
    return args


def allocator_settings(env: Mapping[str, str]) -> dict[str, str]:
    """The variables of ``env`` that change how CPU memory is allocated: glibc's (``MALLOC_*``, ``GLIBC_TUNABLES``)
    and PyTorch's huge pages for large CPU tensors (``THP_MEM_ALLOC_ENABLE``)."""
    return {k: v for k, v in env.items() if k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE")}


def allocator_env(keep: bool, env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with glibc keeping freed memory (``keep``, ``--keep-freed-memory``) or left to its defaults."""
    base = {k: v for k, v in env.items() if k not in allocator_settings(env)}
    return {**base, **KEEP_FREED_MEMORY} if keep else base


def allocator_note(env: Mapping[str, str]) -> str:
    """How glibc's allocator was told to behave in ``env``, for the report's header."""
    settings = allocator_settings(env)
    if not settings:
        return "glibc's allocator defaults"
    label = "glibc keeps freed memory" if settings == KEEP_FREED_MEMORY else "allocation set by"
    return f"{label} ({', '.join(f'{k}={v}' for k, v in sorted(settings.items()))})"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def weight_dtype(args: argparse.Namespace, key: str) -> torch.dtype | None:
    if args.dtype:
        return DTYPES[args.dtype]
    if args.real and not args.gpu:
        return torch.float32 if key == "sd15" else torch.bfloat16  # the CPU table's rows
    return None  # ComfyUI's choice for the device


def under_comfyui(args: argparse.Namespace, argv: list[str]) -> Path:
    """ComfyUI's tree (tests/integration/locate.py finds it); re-executes this script under its interpreter first, and
    again where the allocator's environment (:func:`allocator_env`) is not yet this process's."""
    comfyui, reason = locate.find_comfyui()
    if comfyui is None:
        raise SystemExit(f"no ComfyUI found ({reason}); set COMFYUI_PATH")
    python, reason = locate.find_interpreter(comfyui)
    under = os.environ.get(UNDER_COMFYUI) == "1" or (python and Path(sys.executable) == Path(python))
    env = dict(os.environ) if args.memory_of else allocator_env(args.keep_freed_memory, os.environ)
    if under and env == dict(os.environ):
        return comfyui
    if under:
        python = sys.executable
    elif python is None:
        raise SystemExit(f"no interpreter for ComfyUI at {comfyui} ({reason}); set COMFYUI_PYTHON")
    sys.stdout.flush()
    os.execve(python, [python, __file__, *argv], {**env, UNDER_COMFYUI: "1"})


@dataclass
class Model:
    """A built network with its random conditioning."""

    key: str
    label: str
    patcher: Any
    positive: list
    negative: list
    channels: int
    compute: torch.dtype
    description: str


@contextlib.contextmanager
def compute_dtype(base: Any, dtype: torch.dtype) -> Iterator[None]:
    """Run ``base`` (a ComfyUI BaseModel) in ``dtype`` on its own weights, as ComfyUI's manual cast does: the inputs
    cast to ``dtype`` and every layer's weight cast per call (``comfy_cast_weights``); restored after."""
    layers = [m for m in base.diffusion_model.modules() if hasattr(m, "comfy_cast_weights")]
    own = [vars(m).get("comfy_cast_weights") for m in layers]
    old, base.manual_cast_dtype = base.manual_cast_dtype, None if dtype == base.get_dtype() else dtype
    for m in layers:
        m.comfy_cast_weights = True
    try:
        yield
    finally:
        base.manual_cast_dtype = old
        for m, value in zip(layers, own, strict=True):
            if value is None:
                del m.comfy_cast_weights
            else:
                m.comfy_cast_weights = value


@contextlib.contextmanager
def independent_autograd() -> Iterator[None]:
    """Plain autograd through any ComfyUI model: ``in_training`` on (plain-torch paths where a custom kernel has no
    backward) and every saved tensor cloned, so no in-place update or reused weight buffer reaches the gradient."""
    import comfy.model_management as mm

    previous = getattr(mm, "in_training", False)
    mm.in_training = True
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t), torch.enable_grad():
            yield
    finally:
        mm.in_training = previous


class Bench:
    """ComfyUI imported in-process (CPU, or CUDA set up as main.py does) and the pack imported as a package."""

    def __init__(self, comfyui: Path, gpu: bool) -> None:
        sys.path.insert(0, str(comfyui))
        import comfy.cli_args

        if gpu:
            from bench.gpu_check import init_like_main

            self.memory_mode = init_like_main()
        else:
            comfy.cli_args.args.cpu = True
            self.memory_mode = "CPU (--cpu)"
        self.cuda = gpu
        self.failures = 0
        spec = importlib.util.spec_from_file_location("reg_pack", REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])  # fmt: skip
        sys.modules["reg_pack"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["reg_pack"])
        self.version = locate.comfyui_version(comfyui)

    @staticmethod
    def pack(name: str) -> Any:
        return importlib.import_module(f"reg_pack.{name}")

    def describe(self) -> str:
        if self.cuda:
            props = torch.cuda.get_device_properties(0)
            where = f"GPU {props.name} ({props.total_memory / GIB:.0f} GiB)"
        else:
            with open("/proc/cpuinfo") as info:
                name = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), "")
            where = f"CPU {name or platform.machine()}, {os.cpu_count()} cores, {allocator_note(os.environ)}"
        threads = torch.get_num_threads()
        return f"{where}; torch {torch.__version__}, {threads} threads; ComfyUI {self.version}, {self.memory_mode}"

    def build(self, key: str, args: argparse.Namespace) -> Model:
        """Family ``key`` (tiny, or full size with ``--real``) with random weights and random conditioning."""
        fam, start = FAMILIES[key], time.perf_counter()
        patcher = self.load(fam, fam.config(args.real, args.flux_depth), weight_dtype(args, key))
        found = type(patcher.model.model_config).__name__
        params = sum(p.numel() for p in patcher.model.diffusion_model.parameters())
        if not args.real:
            label = f"tiny {found} network ({params / 1e6:.1f}M)"
        elif key == "flux" and args.flux_depth != FLUX_FULL:
            depth = "+".join(map(str, args.flux_depth))
            label = f"{fam.label} (full width, {depth} of 19+38 blocks, {params / 1e9:.2f}B)"
        else:
            label = f"{fam.label} ({params / 1e9:.2f}B)"
        base = patcher.model
        compute = base.manual_cast_dtype or base.get_dtype()
        tokens, width = fam.context if args.real or fam.tiny_context is None else fam.tiny_context
        conds = []
        for seed in (SEED, SEED + 1):
            gen = torch.Generator().manual_seed(seed)
            extra = {} if fam.pooled is None else {"pooled_output": torch.randn(1, fam.pooled, generator=gen)}
            conds.append([[torch.randn(1, tokens, width, generator=gen), extra]])
        description = (f"{label}: {found}, weights {dtype_name(base.get_dtype())}, compute {dtype_name(compute)}, "
                       f"built in {time.perf_counter() - start:.0f} s")  # fmt: skip
        return Model(key, label, patcher, *conds, fam.channels, compute, description)

    def load(self, fam: Family, config: dict, dtype: torch.dtype | None) -> Any:
        """The network of ``config`` through ComfyUI's own loader (``load_diffusion_model_state_dict``), which must
        detect one of ``fam.classes``. Where the loader copies the state dict (CPU) it gets zero-stride views and the
        weights are filled in place afterwards, so no second copy is held; where it adopts the tensors (DynamicVRAM)
        they are generated first. Values: :func:`bench.benchlib.random_weight` rounded to the checkpoints' dtype;
        the weights never require grad."""
        import comfy.model_detection
        import comfy.model_management as mm
        import comfy.model_patcher
        import comfy.sd

        detected = comfy.model_detection.model_config_from_unet_config(config, None)
        detected.set_inference_dtype(torch.float32, None)
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in detected.get_model({}).diffusion_model.state_dict().items()}
        core = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
        adopt = core is not comfy.model_patcher.ModelPatcher and not mm.is_device_cpu(mm.get_torch_device())
        fill = "cuda" if self.cuda else "cpu"
        if adopt:
            state = {n: random_weight(n, s, fill).to(fam.store).cpu() for n, s in shapes.items()}
        else:
            state = {n: torch.zeros((), dtype=fam.store).expand(s) for n, s in shapes.items()}
        patcher = comfy.sd.load_diffusion_model_state_dict(state, model_options={"dtype": dtype} if dtype else {})
        found = type(patcher.model.model_config).__name__ if patcher is not None else None
        if found not in fam.classes:
            raise RuntimeError(f"the {fam.label} loaded as {found}, expected one of {fam.classes}")
        network = patcher.model.diffusion_model
        if not adopt:
            with torch.no_grad():
                for name, tensor in network.state_dict(keep_vars=True).items():
                    if name in shapes:
                        tensor.copy_(random_weight(name, tensor.shape, fill).to(fam.store))
        network.requires_grad_(False)
        return patcher

    def configured(self, model: Model, name: str) -> Any:
        """The model as a workflow sees it: unchanged for CFG, else with REG installed as REGGuidance installs it."""
        estimator, every = parse_config(name)
        if estimator is None:
            return model.patcher
        runtime = self.pack("nodes.reg_runtime")
        patched = model.patcher.clone()
        patch = runtime.REGPatch(runtime.REGSettings(1.0, estimator, 0.0, 1.0, every))
        patch.install(self.pack("nodes.common").wrapper_adder(patched))
        return patched

    def sample(self, patcher: Any, model: Model, size: int, steps: int, seed: int) -> float:
        """One KSampler run (``comfy.sample.sample``: euler, normal, cfg 4, batch 1); the mean seconds of steps
        1…S−1 (step 0 carries the run's setup), from the sampler's per-step callback."""
        import comfy.sample

        latent = torch.zeros(1, model.channels, size, size)
        times = [time.perf_counter()]

        def step_done(*_: Any) -> None:
            if self.cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

        with torch.inference_mode():
            comfy.sample.sample(patcher, comfy.sample.prepare_noise(latent, seed), steps, CFG_SCALE, "euler", "normal",
                                model.positive, model.negative, latent, seed=seed, callback=step_done,
                                disable_pbar=True)  # fmt: skip
        seconds = [b - a for a, b in itertools.pairwise(times)]
        return statistics.fmean(seconds[1:] or seconds)

    def custom_step(self, patcher: Any, model: Model, size: int, sampler: Any, sigmas: torch.Tensor) -> torch.Tensor:
        """ComfyUI's sampling (``comfy.sample.sample_custom``, cfg 4) with ``sampler`` over ``sigmas``."""
        import comfy.sample

        latent = torch.zeros(1, model.channels, size, size)
        with torch.inference_mode():
            out = comfy.sample.sample_custom(patcher, comfy.sample.prepare_noise(latent, SEED), CFG_SCALE, sampler,
                                             sigmas, model.positive, model.negative, latent, disable_pbar=True,
                                             seed=SEED)  # fmt: skip
        return out.float().cpu()

    def in_step(self, model: Model, size: int, fn: Callable[[Step], Any]) -> Any:
        """``fn(step)`` inside a real sampling run (the second σ of four, the guider's processed conds)."""
        import comfy.samplers

        result = []

        def sampler(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
            guider = model_k.inner_model
            s = sigmas[0] * x.new_ones(x.shape[0])
            conds = guider.conds["positive"], guider.conds["negative"]
            result.append(fn(Step(self, guider.inner_model, *conds, x, s, extra_args["model_options"])))
            return x

        sigmas = comfy.samplers.calculate_sigmas(model.patcher.get_model_object("model_sampling"), "normal", 4)
        self.custom_step(model.patcher, model, size, comfy.samplers.KSAMPLER(sampler), sigmas[1:])
        return result[0]

    def one_step(self, model: Model, patcher: Any, size: int, reference: bool = False) -> torch.Tensor:
        """One step to σ = 0 (the result is the guided prediction itself): euler, or :meth:`reference_step`."""
        import comfy.samplers

        scheduler, denoise = FAMILIES[model.key].one_step
        sampling = patcher.get_model_object("model_sampling")
        sigmas = comfy.samplers.calculate_sigmas(sampling, scheduler, round(1 / denoise))[-2:]
        sampler = comfy.samplers.KSAMPLER(self.reference_step) if reference else comfy.samplers.ksampler("euler")
        return self.custom_step(patcher, model, size, sampler, sigmas)

    def reference_step(self, model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        """``D_c + a(σ)·∇_xΣD_c ⊙ (D_cfg − D_c)`` by :func:`independent_autograd`; ``D_c`` alone at cfg 1, where
        ComfyUI skips the negative pass."""
        import comfy.model_management as mm

        guider = model_k.inner_model
        self.pack("nodes.traced_pass").make_differentiable([guider.inner_model], mm.get_torch_device())
        s = sigmas[0] * x.new_ones(x.shape[0])
        d_cfg = model_k(x, s, **extra_args)
        guider.cfg = 1.0
        try:
            with torch.inference_mode(False), independent_autograd():
                leaf = x.detach().clone().requires_grad_(True)
                d_c = model_k(leaf, s.clone(), **extra_args)
                (grad,) = torch.autograd.grad(d_c.float().sum(), leaf)
        finally:
            guider.cfg = CFG_SCALE
        a = self.pack("nodes.common").model_space(guider.inner_model.model_sampling).factor(s, x)
        d_c = d_c.detach()
        return d_c + (a * grad).to(d_c.dtype) * (d_cfg - d_c)


@dataclass
class Step:
    """One model evaluation inside a sampling run: what the modes of ``--measure pass`` and ``precision`` call."""

    bench: Bench
    base: Any
    positive: list
    negative: list
    x: torch.Tensor
    sigma: torch.Tensor
    options: dict

    def forward(self) -> torch.Tensor:
        """The positive branch alone, without graph (a warm-up)."""
        import comfy.samplers

        return comfy.samplers.calc_cond_batch(self.base, [self.positive], self.x, self.sigma, self.options)[0]

    def plain(self) -> torch.Tensor:
        """``∇_x Σ D_c`` by autograd through the positive pass with nothing switched (weights de-inferenced as the
        runtime does it: ComfyUI may load them in inference mode)."""
        import comfy.model_management as mm
        import comfy.samplers

        self.bench.pack("nodes.traced_pass").make_differentiable([self.base], mm.get_torch_device())
        with torch.inference_mode(False), torch.enable_grad():
            leaf = self.x.detach().clone().requires_grad_(True)
            d_c = comfy.samplers.calc_cond_batch(self.base, [self.positive], leaf, self.sigma.clone(), self.options)[0]
            try:
                return self.bench.pack("reg_core.rectify").column_sums(d_c, leaf)
            except RuntimeError as err:
                raise SystemExit(f"plain autograd fails on this network: {str(err).splitlines()[0]}") from None

    def run(self, mode: str) -> torch.Tensor:
        """``cfg``: CFG's batched prediction; otherwise M: ``plain`` autograd through the positive pass, nothing
        switched; ``vjp``, ``vjp-low-memory``, ``gradient-free``: the runtime's estimator (its audit left out)."""
        import comfy.samplers

        calc, pack = comfy.samplers.calc_cond_batch, self.bench.pack
        if mode == "cfg":
            return calc(self.base, [self.positive, self.negative], self.x, self.sigma, self.options)[0]
        space = pack("nodes.common").model_space(self.base.model_sampling)
        if mode == "plain":
            return self.plain() * space.factor(self.sigma, self.x)
        cond_pass = pack("nodes.passes").CondPass(executor=calc, model=self.base, conds=[self.positive], positive=0,
                                                  x=self.x, timestep=self.sigma, model_options=self.options,
                                                  space=space)  # fmt: skip
        if mode == "gradient-free":
            estimator = pack("nodes.estimators.gradient_free").GradientFree()
        else:
            estimator = pack("nodes.estimators.vjp").ExactVJP(low_memory=mode == "vjp-low-memory", audited=True)
        return estimator.evaluate(cond_pass)[1].m


class Report:
    """What goes to stdout, kept for ``--out``."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> None:
        self.parts.append(text)
        sys.stdout.write(text)
        sys.stdout.flush()


def timed(names: list[str], repeats: int, run: Callable[[str, int], float], cuda: bool):
    """``run(name, index)`` in :func:`bench.benchlib.bracketed` order; returns (order, seconds, CUDA peaks or {})."""
    order = bracketed(names, names[0], repeats) if repeats else []
    memory = PeakMemory(cuda=True) if cuda else None
    seconds: list[float] = []
    peaks: dict[str, list[int]] = {}
    for i, name in enumerate(order):
        if memory:
            memory.start()
        faults = minor_faults()
        seconds.append(run(name, i))
        faults = minor_faults() - faults
        if memory:
            peaks.setdefault(name, []).append(memory.extra())
        log.info("run %d/%d %s: %.3f s, %d minor page faults", i + 1, len(order), name, seconds[-1], faults)
    return order, seconds, peaks


def minor_faults() -> int:
    """The pages the kernel has handed this process so far, each fresh and zeroed: memory touched for the first time,
    or again after the allocator gave it back to the kernel."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def child_peaks(args: argparse.Namespace, argv: list[str], key: str, size: int, what: str) -> dict[str, list[int]]:
    """CPU: each name's peak in its own process (this script with ``--memory-of``), or {} with --no-memory. Called
    before this model and size's timed runs, so each child sees the free memory beside this process's weights (what
    vjp's graph budget is taken from) and what earlier sizes' runs left to its allocator: with one size, the weights
    alone."""
    if args.gpu or args.no_memory:
        return {}
    peaks = {}
    for name in args.configs if what == "steps" else args.modes:
        log.info("%s %d²: peak memory of %s in its own process", key, size, name)
        cmd = [sys.executable, __file__, *argv, "--models", key, "--sizes", str(size), "--measure", what,
               "--memory-of", name]  # fmt: skip
        # glibc's dynamic mmap threshold keeps freed memory of the backward's short-lived copies resident (SDXL at
        # 256²: 3.8 GiB above what is live); a fixed threshold hands it back at once, so the peak is what was held
        env = {**allocator_env(False, os.environ), "MALLOC_MMAP_THRESHOLD_": "131072"}
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if done.returncode:  # e.g. killed for lack of memory: a result, reported as such
            log.warning("the memory process for %s failed (exit %d): %s", name, done.returncode, done.stderr[-2000:])
        peaks[name] = [json.loads(done.stdout.splitlines()[-1])["peak"]] if done.returncode == 0 else []
    return peaks


def memory_peak(bench: Bench, model: Model, args: argparse.Namespace) -> int:
    """A child's one measurement: the peak of one run (or pass) after a warm-up of the same configuration (or mode)
    at latent 8, which pages its code in and leaves no working set behind."""
    size, memory = args.sizes[0], PeakMemory(bench.cuda)
    if args.measure == ["steps"]:
        patcher = bench.configured(model, args.memory_of)
        bench.sample(patcher, model, WARM_UP_SIZE, 1, SEED)
        memory.start()
        bench.sample(patcher, model, size, args.steps, SEED)
        return memory.extra()

    def one(step: Step) -> int:
        memory.start()
        step.run(args.memory_of)
        return memory.extra()

    bench.in_step(model, WARM_UP_SIZE, lambda step: step.run(args.memory_of))
    return bench.in_step(model, size, one)


def memory_note(args: argparse.Namespace) -> str:
    if args.gpu:
        return "peak: the CUDA allocator's during a run, above the level before it (median of the runs)"
    if args.no_memory:
        return "peak: not measured"
    return "peak: the resident high-water mark during one run in its own process, above the level before the run"


def measure_steps(bench: Bench, model: Model, size: int, args: argparse.Namespace, argv: list[str]) -> str:
    peaks = child_peaks(args, argv, model.key, size, "steps")
    patchers = {name: bench.configured(model, name) for name in args.configs}
    if args.repeats:
        bench.sample(model.patcher, model, size, 1, SEED)  # warm-up: weights in place, caches and allocator warm

    def run(name: str, index: int) -> float:
        return bench.sample(patchers[name], model, size, args.steps, SEED + index)

    order, seconds, gpu_peaks = timed(args.configs, args.repeats, run, bench.cuda)
    rows = cost_rows(args.configs, order, seconds, gpu_peaks or peaks)
    title = (f"**{model.label}, latent {size}² (image {8 * size}²), batch 1**: s/step over steps 1–{args.steps - 1} of "
             f"{args.steps}, {args.repeats} repeat(s), each run against the CFG runs around it; "
             f"{memory_note(args)}\n\n")  # fmt: skip
    return title + markdown_table(["configuration", "s/step", "× CFG", "peak", "peak vs CFG"], rows) + "\n"


def measure_pass(bench: Bench, model: Model, size: int, args: argparse.Namespace, argv: list[str]) -> str:
    maps: dict[str, torch.Tensor] = {}

    def rounds(step: Step):
        step.forward()

        def run(mode: str, _index: int) -> float:
            start = time.perf_counter()
            maps[mode] = step.run(mode)
            if bench.cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - start

        return timed(args.modes, args.repeats, run, bench.cuda)

    peaks = child_peaks(args, argv, model.key, size, "pass")
    order, seconds, gpu_peaks = bench.in_step(model, size, rounds) if args.repeats else ([], [], {})
    rows = cost_rows(args.modes, order, seconds, gpu_peaks or peaks)
    exact = next((m for m in args.modes if m != "cfg"), None)
    for row in rows:
        same = row[0] in ("cfg", exact) or exact not in maps
        row.append("—" if same else f"{relative_error(maps[row[0]], maps[exact]):.1e}")
    ref = args.modes[0]
    title = (f"**{model.label}, latent {size}² (image {8 * size}²): one M per mode**, {args.repeats} round(s), each "
             f"pass against the {ref} passes around it; {memory_note(args)}\n\n")  # fmt: skip
    headers = ["mode", "s/pass", f"× {ref}", "peak", f"peak vs {ref}", f"M vs {exact} (rel. L2)"]
    return title + markdown_table(headers, rows) + "\n"


def measure_precision(bench: Bench, model: Model, size: int, *_: Any) -> str:
    def rows(step: Step) -> list[list[str]]:
        with compute_dtype(step.base, torch.float32):
            want = [step.run("vjp"), step.run("gradient-free")]
        out = []
        for dtype in (torch.bfloat16, torch.float16):
            with compute_dtype(step.base, dtype):
                got = [step.run("vjp"), step.run("gradient-free")]
            errors = [f"{relative_error(g, w):.2%}" for g, w in zip(got, want, strict=True)]
            out.append([model.label, f"{size}²", dtype_name(dtype), *errors])
        return out

    headers = ["network", "latent", "compute", "vjp M: rel. L2 vs float32", "gradient-free M: rel. L2 vs float32"]
    title = "**M in 16-bit compute against float32**, same weights and input\n\n"
    return title + markdown_table(headers, bench.in_step(model, size, rows)) + "\n"


def measure_exact(bench: Bench, model: Model, size: int, *_: Any) -> str:
    """One REG step per exact estimator against the reference, in the model's compute dtype and in float32 on the same
    weights; the error of REG's correction (result − CFG's result). Tolerance: 1e-4 in float32 (rounding only), 0.1
    in 16 bits (both sides round differently; a wrong weight buffer or a lost layer changes M by O(1))."""
    rows = []
    for dtype in dict.fromkeys([model.compute, torch.float32]):
        same = dtype == model.compute
        with contextlib.nullcontext() if same else compute_dtype(model.patcher.model, dtype):
            cfg = bench.one_step(model, model.patcher, size)
            want = bench.one_step(model, model.patcher, size, reference=True) - cfg
            for estimator in ("vjp", "vjp-low-memory"):
                error = relative_error(bench.one_step(model, bench.configured(model, estimator), size) - cfg, want)
                tolerance = 1e-4 if dtype == torch.float32 else 0.1
                bench.failures += error > tolerance
                rows.append([model.label, f"{size}²", estimator, dtype_name(dtype), f"{error:.1e}", f"{tolerance:g}",
                             "ok" if error <= tolerance else "FAILED"])  # fmt: skip
    headers = ["network", "latent", "estimator", "compute", "REG's correction: rel. L2", "tolerance", "verdict"]
    return "**Exactness: one REG step against the independent autograd reference**\n\n" + markdown_table(headers, rows)


MEASURE = {"steps": measure_steps, "pass": measure_pass, "precision": measure_precision, "exact": measure_exact}


def unload() -> None:
    import comfy.model_management as mm

    mm.unload_all_models()
    mm.soft_empty_cache()
    release_memory()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    comfyui = under_comfyui(args, argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")  # ComfyUI logs every model load
    log.setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench(comfyui, args.gpu)
    if args.memory_of:
        sys.stdout.write(json.dumps({"peak": memory_peak(bench, bench.build(args.models[0], args), args)}) + "\n")
        return 0
    report, start = Report(), time.perf_counter()
    report.write(f"{bench.describe()}\n\n")
    for key in args.models:
        model = bench.build(key, args)
        report.write(f"{model.description}\n\n")
        for what in args.measure:
            for size in args.sizes or (FAMILIES[key].sizes if args.real else (32, 64)):
                log.info("%s %d²: %s", key, size, what)
                report.write(MEASURE[what](bench, model, size, args, argv) + "\n")
        del model
        unload()
    report.write(f"total {time.perf_counter() - start:.0f} s\n")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(report.parts))
    return 1 if bench.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
