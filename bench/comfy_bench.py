"""REG's cost inside a real ComfyUI: whole sampling runs per configuration, and where a REG step's time goes.

Imported by ``bench_reg.py`` only under ComfyUI's interpreter. ComfyUI is imported in-process the way the integration
tests do it (tests/integration/conftest.py), the pack is loaded by ComfyUI's own custom-node loader and applied
through its ``REGGuidance`` node class, and the models are the tiny random-weight SD1.5 UNet and SD3 MMDiT of
tests/integration/tiny_models.py (built on first use, cached in tests/.models/).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.benchlib import (
    Breakdown,
    Config,
    Measurement,
    PeakMemory,
    RunStats,
    Summary,
    TensorRecorder,
    interleaved,
    measure_configs,
    release_memory,
    rss_bytes,
    saved_tensor_bytes,
    tensor_memory,
)

REPO = Path(__file__).resolve().parents[1]
INTEGRATION = REPO / "tests" / "integration"
CFG_SCALE = 4.0
SAMPLER = "euler"  # one model evaluation per step
SCHEDULER = "normal"
# The integration tests' depth-2 MMDiT (2M parameters) takes milliseconds per step, which Python overhead dominates;
# depth 6 (hidden 384, 33M parameters) makes the network the cost, as it is for real SD3 models.
MMDIT_DEPTH = 6


def import_comfyui(comfyui: Path, attention: str = "default", device: str = "cpu") -> str:
    """Import ComfyUI in-process. Order matters, see tests/integration/conftest.py ``_import_comfyui``.

    ``device`` "cpu" forces ComfyUI's ``--cpu``; "gpu" leaves every flag at its default and sets up memory management
    the way main.py does (:func:`bench.gpu_setup.init_like_main`: comfy-aimdo's DynamicVRAM where ComfyUI enables it).
    """
    sys.path.insert(0, str(comfyui))  # before the repository root, which has its own ``nodes`` package
    if str(INTEGRATION) not in sys.path:
        sys.path.insert(1, str(INTEGRATION))
    import comfy.cli_args

    args = comfy.cli_args.args
    if device == "cpu":
        args.cpu = True
        memory_mode = "CPU (--cpu)"
    elif device == "gpu":
        from bench import gpu_setup

        memory_mode = gpu_setup.init_like_main()
    else:
        raise ValueError(f"unknown device {device!r} (cpu, gpu)")
    if attention == "pytorch":
        args.use_pytorch_cross_attention = True
    elif attention == "split":
        args.use_split_cross_attention = True
    import utils.extra_config  # noqa: F401

    with contextlib.suppress(ImportError):  # only some image nodes need it
        import server  # noqa: F401
    import execution  # noqa: F401
    import folder_paths  # noqa: F401

    import nodes

    if Path(nodes.__file__).resolve() != (comfyui / "nodes.py").resolve():
        raise RuntimeError(f"'nodes' resolved to {nodes.__file__}, not ComfyUI's nodes.py")
    return memory_mode


@dataclass
class Family:
    """A loaded tiny model with its encoded prompts."""

    key: str
    label: str
    model: Any  # ModelPatcher
    positive: Any
    negative: Any
    channels: int
    params: int


class ComfyBench:
    """ComfyUI with the pack loaded and the tiny models registered."""

    def __init__(self, comfyui: Path, attention: str = "default", device: str = "cpu") -> None:
        self.memory_mode = import_comfyui(comfyui, attention, device)
        import comfy_harness

        self._tmp = tempfile.TemporaryDirectory(prefix="reg-bench-")
        root = Path(self._tmp.name)
        comfy_harness.isolate_folders(root)  # never read or write the ComfyUI tree's own folders
        self.pack = comfy_harness.load_pack(REPO, root / "custom_nodes")
        self.rectify = self.pack.submodule("reg_core.rectify")
        self.diagnostics = self.pack.submodule("reg_core.diagnostics")
        self._tiny = None
        self.cuda = device == "gpu"
        import comfy.ldm.modules.attention as attention_module

        self.attention = attention_module.optimized_attention.__name__
        self.families: dict[str, Family] = {}

    def make_differentiable(self, base: Any, conds: list[Any]) -> None:
        """The runtime's de-inference of the weights (what REG does before its first traced pass)."""
        import comfy.model_management

        traced_pass = self.pack.submodule("nodes.traced_pass")
        modules = traced_pass.differentiable_modules(base, conds)
        traced_pass.make_differentiable(modules, comfy.model_management.get_torch_device())

    def fd_step(self, base: Any, s: torch.Tensor, x: torch.Tensor, flow: bool) -> torch.Tensor:
        """The runtime's finite-difference probe step for this model's compute dtype."""
        relative = self.pack.submodule("nodes.passes").fd_relative_step(base)
        return self.rectify.fd_step(s, x, space=self.rectify.Space(flow=flow), relative=relative)

    @property
    def tiny(self) -> Any:
        """The tiny test models, built (once, cached in tests/.models/) and registered on first use."""
        if self._tiny is None:
            import tiny_models

            self._tiny = tiny_models.prepare(REPO / "tests" / ".models")
        return self._tiny

    # --- models and configurations ---

    def family(self, key: str) -> Family:
        if key not in self.families:
            self.families[key] = self._load(key)
        return self.families[key]

    def _load(self, key: str) -> Family:
        import comfy.sd
        import folder_paths
        import tiny_models
        from prompts import NEGATIVE, POSITIVE

        import nodes

        with torch.inference_mode():  # as ComfyUI's executor runs every node
            if key == "sd15":
                model, clip, _vae = nodes.CheckpointLoaderSimple().load_checkpoint(self.tiny.sd15_checkpoint)[:3]
                label, channels = "SD1.5 UNet (EPS)", 4
            elif key == "sd3":
                name = tiny_models.ensure_mmdit(self.tiny.root, MMDIT_DEPTH)
                model = nodes.UNETLoader().load_unet(name, "default")[0]
                clip = comfy.sd.load_clip(
                    ckpt_paths=[folder_paths.get_full_path_or_raise("text_encoders", self.tiny.clip_l)],
                    clip_type=comfy.sd.CLIPType.SD3,
                )
                label, channels = f"SD3 MMDiT depth {MMDIT_DEPTH} (flow)", 16
            else:
                raise ValueError(f"unknown model family {key!r} (sd15, sd3)")
            positive = clip.encode_from_tokens_scheduled(clip.tokenize(POSITIVE))
            negative = clip.encode_from_tokens_scheduled(clip.tokenize(NEGATIVE))
        del clip
        release_memory()
        params = sum(p.numel() for p in model.model.diffusion_model.parameters())
        return Family(key, label, model, positive, negative, channels, params)

    def configured(self, fam: Family, config: Config) -> Any:
        """The family's model as the workflow would see it: unchanged for CFG, else through the REGGuidance node."""
        if config.estimator is None:
            return fam.model
        import nodes

        node = nodes.NODE_CLASS_MAPPINGS["REGGuidance"]
        inputs = {
            "strength": 1.0,
            "estimator": config.estimator,
            "start_percent": 0.0,
            "end_percent": 1.0,
            "refresh_every": config.refresh_every,
        }
        return node.execute(fam.model, **inputs).result[0]

    # --- whole sampling runs ---

    def sample_run(
        self,
        model: Any,
        fam: Family,
        size: int,
        steps: int,
        seed: int,
        refresh_every: int,
        memory: PeakMemory | None = None,
        recorder: TensorRecorder | None = None,
    ) -> RunStats:
        """One KSampler-equivalent run (``comfy.sample.sample``, euler/normal, cfg 4, batch 1).

        Times every step through the sampler's callback; with ``memory`` also the run's peak extra RSS; with
        ``recorder`` (a profiled run) marks the live tensor bytes after every step.
        """
        import comfy.sample

        latent = torch.zeros(1, fam.channels, size, size)
        noise = comfy.sample.prepare_noise(latent, seed)
        sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        seconds: list[float] = []
        step_rss: list[int] = []
        step_marks: list[int] = []
        start = [0.0]  # when the current step started

        def callback(step, x0, x, total_steps):
            sync()  # a GPU step ends when its kernels have run
            seconds.append(time.perf_counter() - start[0])
            step_rss.append(rss_bytes())  # between the step's end and the next step's start: not timed
            if recorder is not None:
                step_marks.append(recorder.mark())
            start[0] = time.perf_counter()

        if memory is not None:
            memory.start()
        start[0] = time.perf_counter()
        with torch.inference_mode():
            comfy.sample.sample(
                model,
                noise,
                steps,
                CFG_SCALE,
                SAMPLER,
                SCHEDULER,
                fam.positive,
                fam.negative,
                latent,
                seed=seed,
                callback=callback,
                disable_pbar=True,
            )
        peak = memory.extra() if memory is not None else 0
        release_memory()
        return RunStats(
            step_seconds=seconds,
            peak_extra=peak,
            step_rss=step_rss,
            rss_after=rss_bytes(),
            refresh_every=refresh_every,
            step_marks=step_marks,
        )

    def measure(
        self,
        fam: Family,
        size: int,
        configs: list[Config],
        *,
        steps: int,
        repeats: int,
        warmup_steps: int,
        profiled: int = 2,
        graph: bool = True,
        memory: PeakMemory | None = None,
    ) -> Measurement:
        """Every configuration ``repeats`` times with a CFG run between every two (CFG A CFG B … CFG, rotating), after
        one warm-up round; then ``profiled`` profiled runs of each for the exact tensor memory (never timed), and with
        ``graph`` the size of one conditional autograd graph (one untimed forward). ``memory``: the per-run peak probe
        (default RSS; :class:`bench.benchlib.CudaPeakMemory` on a GPU).

        The warm-up round (``warmup_steps`` steps per configuration, not counted) also makes the weights
        differentiable (the pack's de-inference on its first run), so every timed run, CFG included, sees the same
        weights.
        """
        models = {c.name: self.configured(fam, c) for c in configs}
        if warmup_steps > 0:
            for c in configs:
                self.sample_run(models[c.name], fam, size, warmup_steps, 1000, c.refresh_every)

        def run(c: Config, seed: int, memory: PeakMemory | None, recorder: TensorRecorder | None) -> RunStats:
            return self.sample_run(models[c.name], fam, size, steps, seed, c.refresh_every, memory, recorder)

        return measure_configs(
            fam.label,
            size,
            steps,
            configs,
            repeats,
            run,
            profiled=profiled,
            memory=memory,
            record_bytes=self._record_bytes(fam, size),
            graph_bytes=self.in_sampling_context(fam, size, self._cond_graph_bytes) if graph else 0,
        )

    def _record_bytes(self, fam: Family, size: int) -> int:
        """Bytes of the M map the runtime keeps per step for the REGDiagnostics node (a downsampled float copy)."""
        m_map = self.diagnostics.downsample_map(torch.zeros(1, fam.channels, size, size))
        return m_map.numel() * m_map.element_size()

    # --- where a step's time goes ---

    def in_sampling_context(self, fam: Family, size: int, fn: Callable[..., Any]) -> Any:
        """``fn(guider, x, sigma, model_options)`` called inside a real sampling run (a custom one-step sampler, the
        family's CFG guider, latent ``size``); returns its result."""
        import comfy.sample
        import comfy.samplers

        result = []

        def sampler_fn(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
            result.append(fn(model_k.inner_model, x, sigmas[1], extra_args["model_options"]))
            return x

        guider = comfy.samplers.CFGGuider(fam.model)
        guider.set_conds(fam.positive, fam.negative)
        guider.set_cfg(CFG_SCALE)
        latent = torch.zeros(1, fam.channels, size, size)
        noise = comfy.sample.prepare_noise(latent, 0)
        sigmas = comfy.samplers.calculate_sigmas(fam.model.get_model_object("model_sampling"), SCHEDULER, 4)
        with torch.inference_mode():
            guider.sample(noise, latent, comfy.samplers.KSAMPLER(sampler_fn), sigmas, seed=0)
        return result[0]

    def _differentiable_base(self, guider) -> tuple[Any, Any, Any, list[torch.Tensor]]:
        """The guider's model with the runtime's de-inferenced weights, its processed conds and its parameters."""
        base = guider.inner_model
        pos, neg = guider.conds["positive"], guider.conds["negative"]
        self.make_differentiable(base, [pos, neg])
        return base, pos, neg, list(base.parameters())

    def _cond_graph_bytes(self, guider, x, sigma, model_options) -> int:
        """Saved-tensor bytes of the cond branch's autograd graph, weights excluded (one forward, untimed)."""
        base, pos, _neg, params = self._differentiable_base(guider)
        with saved_tensor_bytes(exclude=params) as saved:
            outs, leaf = _graph_forward(base, [pos], x, sigma * x.new_ones(x.shape[0]), model_options)
        del outs, leaf
        return saved.bytes

    def breakdown(self, fam: Family, size: int, reps: int) -> Breakdown:
        """Time the pieces of CFG and REG steps inside a real sampling context (:meth:`in_sampling_context`).

        The pieces call ``comfy.samplers.calc_cond_batch`` (what the pack's CALC_COND_BATCH wrapper calls as its
        executor) with the processed conds of a real guider, in the grad modes the runtime uses.
        """

        def pieces(guider, x, sigma, model_options) -> dict[str, Any]:
            return self._pieces(guider, x, sigma, model_options, reps)

        return Breakdown(fam.label, size, reps, **self.in_sampling_context(fam, size, pieces))

    def _pieces(self, guider, x, sigma, model_options, reps: int) -> dict[str, Any]:
        import comfy.model_sampling
        import comfy.samplers

        base, pos, neg, params = self._differentiable_base(guider)
        trainable = sum(1 for p in params if p.requires_grad)
        s = sigma * x.new_ones(x.shape[0])
        flow = isinstance(base.model_sampling, comfy.model_sampling.CONST)
        h = self.fd_step(base, s, x, flow)  # the runtime's probe

        def calc(conds, x_in, timestep=s):
            return comfy.samplers.calc_cond_batch(base, conds, x_in, timestep, model_options)

        def graph_forward(conds):
            return _graph_forward(base, conds, x, s, model_options)

        def backward(out, leaf):
            with torch.inference_mode(False), torch.enable_grad():
                return torch.autograd.grad(out, leaf, torch.ones_like(out))[0]

        @contextlib.contextmanager
        def weights_require_grad():
            with torch.inference_mode(False):
                for p in params:
                    p.requires_grad_(True)
            try:
                yield
            finally:
                with torch.inference_mode(False):
                    for p in params:
                        p.requires_grad_(False)

        timers: dict[str, Callable[[], float]] = {}

        def simple(fn):
            def timed() -> float:
                t = time.perf_counter()
                fn()
                return time.perf_counter() - t

            return timed

        def no_grad_uncond():
            with torch.inference_mode(False), torch.no_grad():
                calc([neg], x)

        def grad_mode_uncond():
            with torch.inference_mode(False), torch.enable_grad():
                calc([neg], x)

        def split(conds, weights=False):
            """(forward with graph, backward) seconds."""

            def run() -> tuple[float, float]:
                ctx = weights_require_grad() if weights else contextlib.nullcontext()
                with ctx:
                    t0 = time.perf_counter()
                    outs, leaf = graph_forward(conds)
                    t1 = time.perf_counter()
                    backward(outs[0], leaf)
                    t2 = time.perf_counter()
                return t1 - t0, t2 - t1

            return run

        timers["cond+uncond, batched (CFG's pass)"] = simple(lambda: calc([pos, neg], x))
        timers["cond"] = simple(lambda: calc([pos], x))
        timers["uncond (inference_mode)"] = simple(lambda: calc([neg], x))
        timers["uncond (no_grad)"] = simple(no_grad_uncond)
        timers["uncond (grad mode on)"] = simple(grad_mode_uncond)
        timers["FD probe: cond at x+h"] = simple(lambda: calc([pos], x + h))
        # the runtime's gradient-free pass: the probe is a third cond list, shifted by h inside apply_model
        timers["cond+uncond+probe, batched (batch 3)"] = simple(lambda: calc([pos, neg, pos], x))
        pairs = {
            "cond with graph | backward": split([pos]),
            "cond+uncond with graph (batch 2) | backward": split([pos, neg]),
            "cond with graph, weights requires_grad | backward": split([pos], weights=True),
        }
        samples: dict[str, list[float]] = {name: [] for name in timers}
        for name in pairs:
            fwd, bwd = name.split(" | ")
            samples[fwd] = []
            samples[f"{bwd} ({fwd})"] = []
        names = list(timers) + list(pairs)
        for name in names:  # warm-up
            (timers.get(name) or pairs[name])()
        for _, name in interleaved(names, reps):
            if name in timers:
                samples[name].append(timers[name]())
            else:
                fwd_s, bwd_s = pairs[name]()
                fwd, bwd = name.split(" | ")
                samples[fwd].append(fwd_s)
                samples[f"{bwd} ({fwd})"].append(bwd_s)

        # graph sizes (saved tensors) and peak memory of the pieces
        graphs = {}
        for label, conds, weights in (
            ("cond", [pos], False),
            ("cond+uncond (batch 2)", [pos, neg], False),
            ("cond, weights requires_grad", [pos], True),
        ):
            ctx = weights_require_grad() if weights else contextlib.nullcontext()
            with ctx, saved_tensor_bytes(exclude=params) as saved:
                outs, leaf = graph_forward(conds)
            graphs[label] = saved.bytes
            del outs, leaf
        pieces = (
            ("cond+uncond, batched (CFG's pass)", lambda: calc([pos, neg], x)),
            ("cond", lambda: calc([pos], x)),
            ("cond with graph + backward", lambda: backward(*_first(graph_forward([pos])))),
            ("cond+uncond with graph + backward of cond", lambda: backward(*_first(graph_forward([pos, neg])))),
        )
        with tensor_memory() as recorder:
            spans = []
            for _label, fn in pieces:
                start = recorder.mark()
                fn()
                spans.append((start, recorder.mark()))
        peaks = {label: recorder.trace.peak(a, b) for (label, _), (a, b) in zip(pieces, spans, strict=True)}

        # the batch-2 graph gives the same M as the batch-1 graph (per-sample network)
        outs1, leaf1 = graph_forward([pos])
        m1 = backward(outs1[0], leaf1)
        outs2, leaf2 = graph_forward([pos, neg])
        m2 = backward(outs2[0], leaf2)
        del outs1, outs2
        same_m = float((m1 - m2).abs().max() / m1.abs().max().clamp_min(1e-30))

        diag = self.diagnostics

        def diagnostics_cost() -> float:
            m = torch.rand_like(x)
            delta = torch.randn_like(x)
            t = time.perf_counter()
            diag.step_statistics(m, delta, m * delta)
            diag.downsample_map(m.expand_as(delta))
            return time.perf_counter() - t

        samples["per-step diagnostics (step_statistics + downsample_map)"] = [diagnostics_cost() for _ in range(reps)]
        notes = {
            "weights requiring grad after de-inference": f"{trainable} of {len(params)} tensors",
            "M from the batch-2 graph vs batch 1 (max rel. diff)": f"{same_m:.1e}",
        }
        return {
            "seconds": {name: Summary.of(v) for name, v in samples.items()},
            "graph_bytes": graphs,
            "peaks": peaks,
            "notes": notes,
        }


def _graph_forward(base, conds, x, s, model_options):
    """Like the runtime: a grad-requiring copy of x, a cloned σ, autograd on, outside inference mode."""
    import comfy.samplers

    with torch.inference_mode(False), torch.enable_grad():
        leaf = x.detach().clone().requires_grad_(True)
        outs = comfy.samplers.calc_cond_batch(base, conds, leaf, s.clone(), model_options)
    return outs, leaf


def _first(outs_leaf):
    outs, leaf = outs_leaf
    return outs[0], leaf
