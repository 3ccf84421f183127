"""REG's cost with the pure-torch core only (no ComfyUI): a small random conv denoiser, the same configurations.

Used by ``bench_reg.py`` when no ComfyUI checkout is found (or with ``--core``). The denoiser is a class-conditional
conv net with EDM preconditioning in VE space (4 latent channels, like SD1.5's latents); the sampler is Euler on
Karras σ, run under ``torch.inference_mode`` like ComfyUI's, with REG's escape (inference mode off, autograd on) for
the graph. Each configuration does per step what the pack's runtime does:

- CFG: one batched cond+uncond forward;
- vjp: ``reg_factor_vjp`` of the cond branch, then the uncond forward;
- gradient-free: one batched forward of cond at ``x``, uncond at ``x`` and cond at ``x + h`` (the probe);
- chain: cond forward with graph, uncond forward, ``chain_product`` with the guidance delta;
- ``k = 2, 4``: a fresh M on every k-th evaluation, the batched forward and the last M in between.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from bench.benchlib import (
    Breakdown,
    Config,
    Measurement,
    PeakMemory,
    RunStats,
    Summary,
    TensorRecorder,
    fresh_evaluations,
    interleaved,
    measure_configs,
    release_memory,
    rss_bytes,
    saved_tensor_bytes,
)
from reg_core import rectify
from reg_core.toy import karras_sigmas

CFG_SCALE = 4.0
SIGMA_DATA = 0.5


class Block(nn.Module):
    def __init__(self, width: int, emb: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(8, width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.emb = nn.Linear(emb, width)
        self.norm2 = nn.GroupNorm(8, width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        return x + self.conv2(nn.functional.silu(self.norm2(h)))


class TinyDenoiser(nn.Module):
    """Class-conditional conv denoiser ``D(x, σ, label)`` with EDM preconditioning (label ``classes`` = no class)."""

    def __init__(self, channels: int = 4, width: int = 64, depth: int = 4, classes: int = 2, emb: int = 64) -> None:
        super().__init__()
        self.classes = classes
        self.label_emb = nn.Embedding(classes + 1, emb)
        self.freqs = nn.Parameter(torch.randn(emb // 2), requires_grad=False)
        self.emb_mlp = nn.Sequential(nn.Linear(2 * emb, emb), nn.SiLU())
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.blocks = nn.ModuleList(Block(width, emb) for _ in range(depth))
        self.norm_out = nn.GroupNorm(8, width)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: Tensor, sigma: Tensor, label: Tensor) -> Tensor:
        s = sigma.reshape(-1, 1, 1, 1)
        c_in = 1 / torch.sqrt(s**2 + SIGMA_DATA**2)
        c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
        c_out = s * SIGMA_DATA / torch.sqrt(s**2 + SIGMA_DATA**2)
        angle = torch.log(sigma.reshape(-1, 1)) / 4 * self.freqs[None]
        emb = self.emb_mlp(torch.cat([torch.cat([angle.sin(), angle.cos()], 1), self.label_emb(label)], 1))
        h = self.conv_in(c_in * x)
        for block in self.blocks:
            h = block(h, emb)
        return c_skip * x + c_out * self.conv_out(nn.functional.silu(self.norm_out(h)))


def make_denoiser(seed: int = 0) -> TinyDenoiser:
    torch.manual_seed(seed)
    net = TinyDenoiser()
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


@contextlib.contextmanager
def graph_mode():
    """REG's escape from the sampler's inference mode (ComfyUI samples under ``torch.inference_mode``; the runtime
    leaves it for the traced pass)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


class CoreBench:
    """Per-step cost of CFG and the REG estimators on :class:`TinyDenoiser`."""

    label = "pure-torch conv denoiser"

    def __init__(self) -> None:
        self.net = make_denoiser()
        self.params = sum(p.numel() for p in self.net.parameters())
        self.cond, self.uncond = 0, self.net.classes

    def describe(self) -> str:
        blocks, width = len(self.net.blocks), self.net.conv_in.out_channels
        return (
            f"TinyDenoiser: {blocks} residual conv blocks, width {width}, {self.params / 1e6:.2f}M parameters, EDM/VE"
        )

    def _d(self, x: Tensor, sigma: Tensor, label: int) -> Tensor:
        return self.net(x, sigma, torch.full((x.shape[0],), label, dtype=torch.long))

    def _pair(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        labels = torch.tensor([self.cond] * n + [self.uncond] * n)
        out = self.net(torch.cat([x, x]), torch.cat([sigma, sigma]), labels)
        return out[:n], out[n:]

    def _with_probe(self, x: Tensor, sigma: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``D_c(x), D_u(x), D_c(x + h)`` in one batch, like the runtime's gradient-free pass."""
        n = x.shape[0]
        labels = torch.tensor([self.cond] * n + [self.uncond] * n + [self.cond] * n)
        out = self.net(torch.cat([x, x, x + h]), torch.cat([sigma, sigma, sigma]), labels)
        return out[:n], out[n : 2 * n], out[2 * n :]

    def guided(self, config: Config, x: Tensor, sigma: Tensor, fresh: bool, state: dict) -> Tensor:
        """One guided evaluation in ComfyUI's form (cfg = uncond + s·(cond − uncond)), rectified by REG."""

        def cfg(d_c: Tensor, d_u: Tensor) -> Tensor:
            return d_u + CFG_SCALE * (d_c - d_u)

        if config.estimator is None:
            return cfg(*self._pair(x, sigma))
        if not fresh:
            d_c, d_u = self._pair(x, sigma)
            return rectify.rectify(d_c, cfg(d_c, d_u), state["m"])
        if config.estimator == "vjp":
            with graph_mode():
                s_graph = sigma.clone()  # an inference tensor cannot be saved for backward
                d_c, m = rectify.reg_factor_vjp(lambda z: self._d(z, s_graph, self.cond), x, s_graph)
            d_u = self._d(x, sigma, self.uncond)
        elif config.estimator == "gradient-free":
            h = rectify.fd_step(sigma, x, space=rectify.VE)
            d_c, d_u, d_probe = self._with_probe(x, sigma, h)
            m = rectify.fd_factor(d_c, d_probe, h, rectify.VE.factor(sigma, x))
        elif config.estimator == "chain":
            with graph_mode():
                s_graph = sigma.clone()
                d_graph, leaf = rectify.denoise_with_graph(lambda z: self._d(z, s_graph, self.cond), x)
            d_c = d_graph.detach()
            guided = cfg(d_c, self._d(x, sigma, self.uncond))
            with graph_mode():
                jt_delta = rectify.chain_product(d_graph, leaf, (guided - d_c).clone())
            factor = rectify.VE.factor(sigma, x)
            return rectify.rectify_chain(d_c, guided, jt_delta, factor)
        else:
            raise ValueError(f"unknown estimator {config.estimator!r}")
        state["m"] = m
        return rectify.rectify(d_c, cfg(d_c, d_u), m)

    def sample_run(
        self,
        config: Config,
        size: int,
        steps: int,
        seed: int,
        memory: PeakMemory | None = None,
        recorder: TensorRecorder | None = None,
    ) -> RunStats:
        gen = torch.Generator().manual_seed(seed)
        sigmas = karras_sigmas(steps, 0.03, 14.6)
        fresh = fresh_evaluations(steps, config.refresh_every)
        seconds, step_rss, step_marks, state = [], [], [], {}
        if memory is not None:
            memory.start()
        start = time.perf_counter()
        with torch.inference_mode():
            x = torch.randn(1, 4, size, size, generator=gen) * sigmas[0]
            for i in range(steps):
                sigma = torch.full((1,), sigmas[i])
                d = self.guided(config, x, sigma, fresh[i], state)
                x = x + (sigmas[i + 1] - sigmas[i]) * (x - d) / sigmas[i]
                seconds.append(time.perf_counter() - start)
                step_rss.append(rss_bytes())  # between the step's end and the next step's start: not timed
                if recorder is not None:
                    step_marks.append(recorder.mark())
                start = time.perf_counter()
        peak = memory.extra() if memory is not None else 0
        state.clear()
        release_memory()
        return RunStats(seconds, peak, step_rss, rss_bytes(), config.refresh_every, step_marks)

    def measure(self, size: int, configs: list[Config], *, steps: int, repeats: int, warmup_steps: int) -> Measurement:
        if warmup_steps > 0:
            for c in configs:
                self.sample_run(c, size, warmup_steps, seed=1000, memory=None)

        def run(c: Config, seed: int, memory: PeakMemory | None, recorder: TensorRecorder | None) -> RunStats:
            return self.sample_run(c, size, steps, seed=seed, memory=memory, recorder=recorder)

        return measure_configs(self.label, size, steps, configs, repeats, run, graph_bytes=self.cond_graph_bytes(size))

    def _graph_forward(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """The cond branch with an autograd graph, as the vjp estimator records it."""
        with graph_mode():
            return rectify.denoise_with_graph(lambda z: self._d(z, sigma.clone(), self.cond), x)

    def cond_graph_bytes(self, size: int) -> int:
        """Saved-tensor bytes of one conditional autograd graph (weights excluded); untimed, one forward."""
        x = torch.zeros(1, 4, size, size)
        with saved_tensor_bytes(exclude=list(self.net.parameters())) as saved:
            d, leaf = self._graph_forward(x, torch.full((1,), 1.0))
        del d, leaf
        return saved.bytes

    def breakdown(self, size: int, reps: int) -> Breakdown:
        """Median seconds of the pieces a step is made of (interleaved), and the cond branch's graph size."""
        x = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(0))
        sigma = torch.full((1,), 1.0)
        h = rectify.fd_step(sigma, x, space=rectify.VE)

        def fwd_bwd() -> tuple[float, float]:
            t0 = time.perf_counter()
            d, leaf = self._graph_forward(x, sigma)
            t1 = time.perf_counter()
            with graph_mode():
                rectify.column_sums(d, leaf)
            return t1 - t0, time.perf_counter() - t1

        def timed(fn: Callable[[], object]) -> Callable[[], float]:
            def run() -> float:
                t = time.perf_counter()
                with torch.inference_mode():
                    fn()
                return time.perf_counter() - t

            return run

        timers = {
            "cond+uncond, batched (CFG's pass)": timed(lambda: self._pair(x, sigma)),
            "cond": timed(lambda: self._d(x, sigma, self.cond)),
            "uncond (inference_mode)": timed(lambda: self._d(x, sigma, self.uncond)),
            "FD probe: cond at x+h": timed(lambda: self._d(x + h, sigma, self.cond)),
            "cond+uncond+probe, batched (batch 3)": timed(lambda: self._with_probe(x, sigma, h)),
        }
        samples: dict[str, list[float]] = {name: [] for name in timers}
        samples["cond with graph"] = []
        samples["backward (cond with graph)"] = []
        names = [*timers, "graph"]
        for repeat, name in interleaved(names, reps + 1):
            if name == "graph":
                fwd, bwd = fwd_bwd()
                if repeat:
                    samples["cond with graph"].append(fwd)
                    samples["backward (cond with graph)"].append(bwd)
            else:
                seconds = timers[name]()
                if repeat:
                    samples[name].append(seconds)
        return Breakdown(
            self.label,
            size,
            reps,
            seconds={name: Summary.of(v) for name, v in samples.items()},
            graph_bytes={"cond": self.cond_graph_bytes(size)},
            notes={"parameters": f"{self.params / 1e6:.2f}M", "latent": f"1x4x{size}x{size}"},
        )
