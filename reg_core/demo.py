"""REG on the built-in exact 2-D toy: ``python -m reg_core.demo`` (the README's first Quick-start command).

Prints, per noise level, the mean error of the CFG and REG guidance terms against the exact optimal guidance
(CONTRIBUTING.md, "The exact toy"), then the sliced Wasserstein distance of unguided, CFG-, REG- and optimally
guided samples to the exact tilted target, and writes a figure (vector fields and samples side by side). No ComfyUI,
no downloads.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import diagnostics, plots, toy
from .plots import diagnostics as diagnostic_plots
from .rectify import Estimator, rectify, reg_factor_vjp

log = logging.getLogger(__name__)

TABLE_SIGMAS = (0.05, 0.1, 0.2, 0.4, 0.7, 1.0, 1.5, 2.5, 4.0)


def guidance_errors(t: toy.ConditionalToy, w: float, n: int, gen: torch.Generator) -> list[dict[str, float]]:
    """Mean Euclidean error of each guidance term ``D − D_c`` against the optimum, at points ``x ~ p_σ(x|y)``."""
    rows = []
    for sigma in TABLE_SIGMAS:
        x0 = t.cond.sample(n, gen)
        x = x0 + sigma * torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
        d_c = t.cond.denoise(x, sigma)
        best = toy.optimal_denoiser(t, x, sigma, w) - d_c

        def err(g: torch.Tensor, best: torch.Tensor = best) -> float:
            return float((g - best).norm(dim=1).mean())

        rows.append(
            {
                "sigma": sigma,
                "cfg": err(toy.cfg_denoiser(t, x, sigma, w) - d_c),
                "reg": err(toy.reg_denoiser(t, x, sigma, w) - d_c),
                "none": float(best.norm(dim=1).mean()),
            }
        )
    return rows


def run_samplers(t: toy.ConditionalToy, w: float, n: int, steps: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Deterministic Heun samples of each method from the same initial noise, plus exact target draws."""
    sigmas = toy.karras_sigmas(steps, 0.01, 20.0)
    start = 20.0 * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    methods = {
        "no guidance": lambda x, s: t.cond.denoise(x, s),
        "CFG": lambda x, s: toy.cfg_denoiser(t, x, s, w),
        "REG": lambda x, s: toy.reg_denoiser(t, x, s, w),
        "REG (gradient-free)": lambda x, s: toy.reg_denoiser(t, x, s, w, Estimator.GRADIENT_FREE),
        "optimal": lambda x, s: toy.optimal_denoiser(t, x, s, w, order=12),
    }
    out = {name: toy.sample_ode(fn, start.clone(), sigmas) for name, fn in methods.items()}
    out["target"] = toy.sample_tilted(t, w, n, gen)
    out["target (2nd draw)"] = toy.sample_tilted(t, w, n, gen)
    return out


def figure(t: toy.ConditionalToy, w: float, samples: dict[str, torch.Tensor], sigma: float) -> Image.Image:
    """Top: guidance fields (CFG, REG, optimal) and REG's factor M at ``sigma``; bottom: samples vs target."""
    size, pad, top = 300, 70, 60
    image = Image.new("RGB", (4 * (size + pad) + pad, 2 * (size + pad) + top), plots.WHITE)
    lim = (-2.0, 2.0)
    axis = torch.linspace(-1.8, 1.8, 15, dtype=torch.float64)
    grid = torch.stack([g.reshape(-1) for g in torch.meshgrid(axis, axis, indexing="xy")], dim=-1)
    d_c = t.cond.denoise(grid, sigma)
    fields = {
        "CFG": toy.cfg_denoiser(t, grid, sigma, w) - d_c,
        "REG": toy.reg_denoiser(t, grid, sigma, w) - d_c,
        "optimal": toy.optimal_denoiser(t, grid, sigma, w) - d_c,
    }
    scale = 0.2 / float(fields["optimal"].norm(dim=1).max())
    backdrop = samples["target"][:1500].numpy()
    for col, (name, field) in enumerate(fields.items()):
        box = (pad + col * (size + pad), top, pad + col * (size + pad) + size, top + size)
        panel = plots.Panel(image, box, lim, lim).scatter(backdrop, (215, 215, 215), 1.2)
        panel.arrows(grid.numpy(), field.numpy(), plots.PALETTE[col], scale=scale, cap=0.3)
        panel.frame(f"{name} guidance at sigma = {sigma}")
    fine = torch.linspace(-1.8, 1.8, 60, dtype=torch.float64)
    fgrid = torch.stack([g.reshape(-1) for g in torch.meshgrid(fine, fine, indexing="xy")], dim=-1).requires_grad_(True)
    (mf,) = torch.autograd.grad(t.cond.denoise(fgrid, sigma).sum(), fgrid)
    mean_m = mf.mean(1).reshape(60, 60).flip(0).numpy()
    lo, hi = float(mean_m.min()), float(mean_m.max())
    x0 = pad + 3 * (size + pad)
    image.paste(plots.heatmap(mean_m, lo, hi, (size, size)), (x0, top))
    plots.Panel(image, (x0, top, x0 + size, top + size), lim, lim).frame(
        f"REG factor M (mean over x, y), sigma = {sigma}"
    )
    image.paste(plots.colorbar(lo, hi, size - 20), (x0 + size + 4, top))
    names = ["CFG", "REG", "optimal", "target"]
    for col, name in enumerate(names):
        box = (
            pad + col * (size + pad),
            2 * top + size + pad - 10,
            pad + col * (size + pad) + size,
            2 * top + 2 * size + pad - 10,
        )
        panel = plots.Panel(image, box, lim, lim)
        panel.scatter(samples[name][:1500].numpy(), plots.PALETTE[col] if col < 3 else plots.BLACK, 1.2)
        panel.frame(f"{name} samples" if name != "target" else "exact tilted target")
    ImageDraw.Draw(image).text(
        (pad, 8),
        f"REG on the exact 2-D toy, w = {w:g} (cfg {w + 1:g}). Grey: exact tilted target. Arrows: guidance"
        " term D - D_c on one common scale (capped).",
        fill=plots.BLACK,
        font=plots.font(15),
    )
    return image


def image_toy_record(w: float, steps: int, gen: torch.Generator, batch: int = 2) -> diagnostics.RunRecord:
    """REG-guided Euler sampling of the Gaussian image toy, recorded step by step as the pack's nodes record it."""
    t = toy.make_image_toy()
    side = int(t.cond.dim**0.5)
    sigmas = toy.karras_sigmas(steps, 0.02, 20.0)
    record = diagnostics.RunRecord(sigma_low=0.0, sigma_high=float("inf"), flow=False, estimator="vjp")
    x = sigmas[0] * torch.randn(batch, t.cond.dim, generator=gen, dtype=torch.float64)
    for s, s_next in itertools.pairwise(sigmas):
        d_c, m = reg_factor_vjp(lambda z, s=s: t.cond.denoise(z, s), x, s)
        d_guided = d_c + w * (d_c - t.uncond.denoise(x, s))
        d = rectify(d_c, d_guided, m)
        delta = d_guided - d_c

        def image(v: torch.Tensor) -> torch.Tensor:
            return v.reshape(batch, 1, side, side)

        record.steps.append(
            diagnostics.StepRecord(
                sigma=torch.full((batch,), s),
                active=True,
                stats=diagnostics.step_statistics(image(m), image(delta), image(d - d_c)),
                m_map=diagnostics.downsample_map(image(m)),
            )
        )
        x = x + (s_next - s) * (x - d) / s
    return record


def diagnostics_figure(record: diagnostics.RunRecord) -> Image.Image:
    """The pack's REGDiagnostics pictures (statistics over the run, M maps at six steps) stacked in one image."""
    stats = diagnostic_plots.render_statistics(record)
    maps = diagnostic_plots.render_maps(record, diagnostics.pick_steps(record), cell=110)
    image = Image.new("RGB", (max(stats.width, maps.width), stats.height + maps.height), plots.WHITE)
    image.paste(stats, (0, 0))
    image.paste(maps, (0, stats.height))
    return image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--w", type=float, default=3.0, help="cond-anchored guidance weight (cfg = w + 1); default 3")
    parser.add_argument("--points", type=int, default=2000, help="points per noise level and samples per method")
    parser.add_argument("--steps", type=int, default=24, help="Heun steps of the samplers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/toy_reg.png"), help="figure path (PNG)")
    parser.add_argument(
        "--diagnostics-out",
        type=Path,
        default=Path("out/toy_diagnostics.png"),
        help="REG diagnostics of the Gaussian image toy (PNG)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    t = toy.make_toy_2d()
    gen = torch.Generator().manual_seed(args.seed)

    log.info(
        "Guidance error against the exact optimum, mean ‖g − g*‖ over %d points x ~ p_σ(x|y), w = %g",
        args.points,
        args.w,
    )
    log.info("%8s %10s %10s %12s %10s", "sigma", "CFG", "REG", "no guidance", "CFG/REG")
    rows = guidance_errors(t, args.w, args.points, gen)
    for r in rows:
        log.info("%8.2f %10.4f %10.4f %12.4f %9.2fx", r["sigma"], r["cfg"], r["reg"], r["none"], r["cfg"] / r["reg"])
    log.info(
        "%8s %10.4f %10.4f %12.4f",
        "mean",
        np.mean([r["cfg"] for r in rows]),
        np.mean([r["reg"] for r in rows]),
        np.mean([r["none"] for r in rows]),
    )

    samples = run_samplers(t, args.w, args.points, args.steps, gen)
    swgen = torch.Generator().manual_seed(args.seed + 1)
    log.info("")
    log.info(
        "Sliced Wasserstein-2 distance to the exact tilted target (%d samples, %d Heun steps)", args.points, args.steps
    )
    for name, pts in samples.items():
        if name == "target":
            continue
        label = "sampling noise floor" if name == "target (2nd draw)" else name
        log.info("%24s %8.4f", label, toy.sliced_wasserstein(pts, samples["target"], swgen))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure(t, args.w, samples, 0.7).save(args.out)
    args.diagnostics_out.parent.mkdir(parents=True, exist_ok=True)
    record = image_toy_record(args.w, args.steps, gen)
    diagnostics_figure(record).save(args.diagnostics_out)
    log.info("")
    log.info(
        "Gaussian image toy (16x16, REG, w = %g): mean M %.3f at sigma %.3g -> %.3f at sigma %.3g",
        args.w,
        float(record.steps[0].stats["mean"][0]),
        float(record.steps[0].sigma[0]),
        float(record.steps[-1].stats["mean"][0]),
        float(record.steps[-1].sigma[0]),
    )
    log.info("figures written to %s and %s (%.1f s)", args.out, args.diagnostics_out, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
