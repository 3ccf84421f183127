"""How far the cheap REG estimators are from exact REG: the gradient-free M and the lagged M (``refresh_every``).

    .venv/bin/python bench/quality.py              # both parts, about 3 minutes on 2 CPU cores
    .venv/bin/python bench/quality.py --skip-digits

Pure torch (plus scikit-learn for part b, a dev dependency); no ComfyUI, nothing downloaded, nothing saved.

**(a) The exact 2-D toy** (reg_core.toy, three overlapping classes, w = 3, as in the README). Every method samples
with the deterministic Heun sampler (24 steps, Karras σ from 20 to 0.01, 2,000 points, the same initial noise):
exact REG (``vjp``), the gradient-free M (``reg_factor_fd``, the runtime's forward difference), and the lagged
variants, which estimate M on every k-th model evaluation and reuse it in between exactly as the runtime's
``refresh_every`` does (:class:`LaggedREG`; Heun's correction evaluations count). Along each method's own trajectory,
at every evaluation, the script records the error of the M it used against the exact M at that point, and the error
of its guidance term against the exact optimal guidance ``σ²∇ log E[R_0]``; the tables average them per σ. The
samples' sliced Wasserstein distance to the exact tilted target closes part (a).

**(b) A denoiser trained on real data at run time**: a class-conditional MLP denoiser with EDM preconditioning (VE σ)
trained for a few minutes on scikit-learn's bundled 8×8 digits (1,797 images, 80 % for training), with 15 % label
dropout for the unconditional branch. Never saved. Reported:

- M maps, gradient-free vs exact (``Jᵀ𝟙`` by VJP) at fixed σ on held-out digits: cosine similarity of the maps, of
  the maps minus their mean (the spatial pattern), and the relative error; the same for the untrained network (a
  random MLP, the no-structure reference) and the forward difference's own error against the exact ``J𝟙``
  (forward-mode JVP), which separates finite-difference error from Jacobian asymmetry;
- the lagged M (k = 2, 4) against a fresh M at the same point along the guided sampler's trajectories;
- sample quality of each method from the same noise (Heun, 18 steps): accuracy of a logistic-regression classifier
  trained on the real training digits (the requested class is the target), its mean confidence, and the class-wise
  sliced Wasserstein distance to the held-out digits of the requested class (the real train-vs-held-out distance is
  the floor).
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.benchlib import format_table  # noqa: E402
from reg_core import rectify, toy  # noqa: E402

log = logging.getLogger("bench_reg.quality")

Denoise = Callable[[Tensor, float], Tensor]


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# --- REG with a lagged factor, on any pair of denoisers -------------------------------------------------------------


def estimate_m(cond: Denoise, x: Tensor, sigma: float, estimator: str) -> tuple[Tensor, Tensor]:
    """``(D_c, M)`` at ``(x, σ)`` with the pack's core estimators (VE space, so ``a(σ) = 1``)."""
    if estimator == "vjp":
        return rectify.reg_factor_vjp(lambda z: cond(z, sigma), x, sigma)
    if estimator == "gradient-free":
        return rectify.reg_factor_fd(lambda z: cond(z, sigma), x, sigma)
    raise ValueError(f"unknown estimator {estimator!r}")


@dataclass
class Evaluation:
    """What one guided evaluation did: its σ, whether M was fresh, the M it used and a fresh reference M there."""

    sigma: float
    fresh: bool
    m_used: Tensor
    m_exact: Tensor | None
    x: Tensor
    d: Tensor


@dataclass
class LaggedREG:
    """REG ``D_c + M ⊙ w(D_c − D_u)`` with M estimated on every ``refresh_every``-th evaluation and reused in between.

    The runtime's ``refresh_every`` rule, :func:`reg_core.rectify.is_fresh_evaluation`; every evaluation (also a
    Heun correction) counts. ``track`` keeps an :class:`Evaluation` per call with a fresh M of the ``reference``
    estimator at the evaluated point (``vjp``: the exact M), for measuring the
    error of the M actually used.
    """

    cond: Denoise
    uncond: Denoise
    w: float
    estimator: str = "vjp"
    refresh_every: int = 1
    track: bool = False
    reference: str = "vjp"  # the estimator of the fresh M that tracked evaluations are compared with
    evaluations: list[Evaluation] = field(default_factory=list)
    count: int = 0
    m: Tensor | None = None

    def __call__(self, x: Tensor, sigma: float) -> Tensor:
        fresh = rectify.is_fresh_evaluation(self.count, self.refresh_every) or self.m is None or self.m.shape != x.shape
        self.count += 1
        if fresh:
            d_c, self.m = estimate_m(self.cond, x, sigma, self.estimator)
        else:
            d_c = self.cond(x, sigma)
        d = rectify.rectify(d_c, d_c + self.w * (d_c - self.uncond(x, sigma)), self.m)
        if self.track:
            same = fresh and self.estimator == self.reference
            exact = self.m if same else estimate_m(self.cond, x, sigma, self.reference)[1]
            self.evaluations.append(Evaluation(sigma, fresh, self.m, exact, x, d))
        return d


@dataclass
class Plain:
    """CFG (``w > 0``) or the conditional prediction alone (``w = 0``), cond-anchored: ``D_c + w(D_c − D_u)``."""

    cond: Denoise
    uncond: Denoise
    w: float
    track: bool = False
    evaluations: list[Evaluation] = field(default_factory=list)

    def __call__(self, x: Tensor, sigma: float) -> Tensor:
        d_c = self.cond(x, sigma)
        d = d_c if self.w == 0 else d_c + self.w * (d_c - self.uncond(x, sigma))
        if self.track:
            self.evaluations.append(Evaluation(sigma, True, torch.ones_like(x), None, x, d))
        return d


def by_sigma(evaluations: list[Evaluation], value: Callable[[Evaluation], float | None]) -> dict[float, float]:
    """Mean of ``value`` over the evaluations at each σ (Heun evaluates most σ twice: correction and next step)."""
    groups: dict[float, list[float]] = {}
    for e in evaluations:
        v = value(e)
        if v is not None:
            groups.setdefault(round(e.sigma, 10), []).append(v)
    return {s: statistics.fmean(v) for s, v in sorted(groups.items(), reverse=True)}


def pick_rows(sigmas: list[float], targets: tuple[float, ...]) -> list[float]:
    """The schedule's σ closest to each target (distinct, descending)."""
    picked = {min(sigmas, key=lambda s, t=t: abs(math.log(s) - math.log(t))) for t in targets}
    return sorted(picked, reverse=True)


# --- (a) the exact 2-D toy ------------------------------------------------------------------------------------------

ERROR_POINTS = 500
TOY_ROWS = (4.0, 2.5, 1.5, 1.0, 0.7, 0.4, 0.2, 0.1, 0.05)
TOY_METHODS = (
    ("REG vjp", "vjp", 1),
    ("REG gradient-free", "gradient-free", 1),
    ("REG vjp k=2", "vjp", 2),
    ("REG vjp k=4", "vjp", 4),
    ("REG gradient-free k=2", "gradient-free", 2),
    ("REG gradient-free k=4", "gradient-free", 4),
)


def toy_part(points: int, steps: int, w: float, seed: int) -> str:
    t = toy.make_toy_2d()
    gen = torch.Generator().manual_seed(seed)
    sigmas = toy.karras_sigmas(steps, 0.01, 20.0)
    start = 20.0 * torch.randn(points, 2, generator=gen, dtype=torch.float64)
    cond, uncond = t.cond.denoise, t.uncond.denoise
    samplers: dict[str, LaggedREG | Plain] = {
        "no guidance": Plain(cond, uncond, 0.0),
        "CFG": Plain(cond, uncond, w, track=True),
    }
    for name, estimator, k in TOY_METHODS:
        samplers[name] = LaggedREG(cond, uncond, w, estimator, k, track=True)
    samples = {name: toy.sample_ode(fn, start.clone(), sigmas) for name, fn in samplers.items()}
    samples["optimal"] = toy.sample_ode(lambda x, s: toy.optimal_denoiser(t, x, s, w, order=12), start.clone(), sigmas)
    target = toy.sample_tilted(t, w, points, gen)
    floor = toy.sliced_wasserstein(toy.sample_tilted(t, w, points, gen), target, torch.Generator().manual_seed(1))

    probe = slice(0, min(points, ERROR_POINTS))  # the optimum's quadrature is costly: errors on a fixed subset

    def optimal_guidance(e: Evaluation) -> tuple[Tensor, Tensor]:
        x = e.x[probe]
        d_c = t.cond.denoise(x, e.sigma)
        return d_c, toy.optimal_denoiser(t, x, e.sigma, w, order=12) - d_c

    def guidance_error(e: Evaluation) -> float:
        d_c, best = optimal_guidance(e)
        return float(((e.d[probe] - d_c) - best).norm(dim=1).mean())

    def m_error(e: Evaluation) -> float | None:
        return None if e.m_exact is None else float((e.m_used - e.m_exact).abs().mean())

    tracked = [n for n, s in samplers.items() if isinstance(s, LaggedREG) or n == "CFG"]
    rows_sigma = pick_rows([s for s in sigmas if s > 0], TOY_ROWS)
    m_err = {n: by_sigma(samplers[n].evaluations, m_error) for n in tracked if n != "CFG"}
    m_scale = by_sigma(samplers["REG vjp"].evaluations, lambda e: float((e.m_exact - 1).abs().mean()))
    g_err = {n: by_sigma(samplers[n].evaluations, guidance_error) for n in tracked}
    g_star = by_sigma(samplers["REG vjp"].evaluations, lambda e: float(optimal_guidance(e)[1].norm(dim=1).mean()))

    def table(values: dict[str, dict[float, float]], extra: dict[float, float], spec: str) -> list[list]:
        """Rows per σ of each method's values, then the ``extra`` column; a last row of means over all σ."""
        rows = []
        for s in rows_sigma:
            rows.append([f"{s:.3g}", *(format(values[n].get(round(s, 10), float("nan")), spec) for n in values)])
            rows[-1].append(format(extra.get(round(s, 10), float("nan")), spec))
        means = [statistics.fmean(v.values()) for v in values.values()]
        rows.append(["mean (all σ)", *(format(v, spec) for v in means), format(statistics.fmean(extra.values()), spec)])
        return rows

    out = f"(a) exact 2-D toy: w = {w:g}, Heun {steps} steps, {points} points, seed {seed}\n\n"
    names = [n for n in m_err]
    out += format_table(
        ["σ", *names, "|M − 1| (scale)"],
        table(m_err, m_scale, ".4f"),
        title="mean |M_used − M_exact| at each evaluation, along each method's own trajectory (exact = vjp there)",
    )
    out += "\n"
    out += format_table(
        ["σ", *g_err, "no guidance |g*|"],
        table(g_err, g_star, ".4f"),
        title=f"mean ‖guidance − optimal guidance‖ along each method's own trajectory (first {ERROR_POINTS} points)",
    )
    out += "\n"
    sw_gen = torch.Generator().manual_seed(1)
    rows = [[name, f"{toy.sliced_wasserstein(x, target, sw_gen):.3f}"] for name, x in samples.items()]
    rows.append(["target, 2nd draw (noise floor)", f"{floor:.3f}"])
    out += format_table(["method", "SW2 to the tilted target"], rows, title="samples vs the exact tilted target")
    return out + "\n"


# --- (b) a denoiser trained on the 8x8 digits ---------------------------------------------------------------------


class DigitDenoiser(nn.Module):
    """Class-conditional MLP denoiser with EDM preconditioning: ``D(x, σ, y)``, label ``classes`` = unconditional."""

    def __init__(self, dim: int = 64, classes: int = 10, width: int = 384, sigma_data: float = 0.5) -> None:
        super().__init__()
        self.classes = classes
        self.sigma_data = sigma_data
        self.register_buffer("freqs", torch.randn(16, generator=torch.Generator().manual_seed(7)) * 4)
        self.label = nn.Embedding(classes + 1, 64)
        self.inp = nn.Linear(dim + 32 + 64, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, dim)

    def forward(self, x: Tensor, sigma: Tensor, y: Tensor) -> Tensor:
        s = sigma.reshape(-1, 1)
        sd = self.sigma_data
        c_in = 1 / torch.sqrt(s**2 + sd**2)
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / torch.sqrt(s**2 + sd**2)
        angle = (torch.log(s) / 4) * self.freqs[None]
        h = torch.cat([c_in * x, angle.sin(), angle.cos(), self.label(y)], dim=1)
        h = nn.functional.silu(self.inp(h))
        for layer in self.hidden:
            h = h + nn.functional.silu(layer(h))
        return c_skip * x + c_out * self.out(h)


def load_digits(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    data = sk_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 8 - 1  # 0..16 → [−1, 1]
    y = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.2, random_state=seed, stratify=data.target)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def train_denoiser(x: Tensor, y: Tensor, steps: int, seed: int, width: int) -> tuple[DigitDenoiser, float]:
    """EDM training (Karras et al. 2022): log-normal σ (P_mean −1.2, P_std 1.2), loss weight (σ²+σ_d²)/(σσ_d)²."""
    torch.manual_seed(seed)
    sigma_data = float(x.std())
    net = DigitDenoiser(sigma_data=sigma_data, width=width)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    start, losses = time.perf_counter(), []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (256,), generator=gen)
        x0, labels = x[idx], y[idx].clone()
        labels[torch.rand(len(idx), generator=gen) < 0.15] = net.classes  # label dropout → unconditional
        sigma = torch.exp(-1.2 + 1.2 * torch.randn(len(idx), generator=gen))
        noisy = x0 + sigma[:, None] * torch.randn(x0.shape, generator=gen)
        weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
        loss = (weight[:, None] * (net(noisy, sigma, labels) - x0) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    for p in net.parameters():
        p.requires_grad_(False)
    log.info("trained the digit denoiser in %.0f s", time.perf_counter() - start)
    return net.eval(), statistics.fmean(losses[-200:])


def denoisers(net: DigitDenoiser, labels: Tensor) -> tuple[Denoise, Denoise]:
    null = torch.full_like(labels, net.classes)

    def cond(x: Tensor, sigma: float) -> Tensor:
        return net(x, torch.full((len(x),), float(sigma)), labels)

    def uncond(x: Tensor, sigma: float) -> Tensor:
        return net(x, torch.full((len(x),), float(sigma)), null)

    return cond, uncond


def cosine(a: Tensor, b: Tensor) -> float:
    return float(nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1).mean())


def centred_cosine(a: Tensor, b: Tensor) -> float:
    return cosine(a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True))


def rel_err(a: Tensor, b: Tensor) -> float:
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).mean())


def jvp_ones(cond: Denoise, x: Tensor, sigma: float) -> Tensor:
    """Exact ``J𝟙`` by forward-mode autodiff (what the forward difference approximates)."""
    _, tangent = torch.func.jvp(lambda z: cond(z, sigma), (x,), (torch.ones_like(x),))
    return tangent


M_SIGMAS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def m_map_rows(net: DigitDenoiser, random_net: DigitDenoiser, x0: Tensor, y: Tensor, seed: int) -> list[list[str]]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for sigma in M_SIGMAS:
        x = x0 + sigma * torch.randn(x0.shape, generator=gen)
        cond, _ = denoisers(net, y)
        _, m_vjp = estimate_m(cond, x, sigma, "vjp")
        _, m_fd = estimate_m(cond, x, sigma, "gradient-free")
        m_jvp = jvp_ones(cond, x, sigma)
        rcond, _ = denoisers(random_net, y)
        _, r_vjp = estimate_m(rcond, x, sigma, "vjp")
        _, r_fd = estimate_m(rcond, x, sigma, "gradient-free")
        rows.append(
            [
                f"{sigma:g}",
                f"{float(m_vjp.mean()):.3f}",
                f"{cosine(m_fd, m_vjp):.4f}",
                f"{centred_cosine(m_fd, m_vjp):.3f}",
                f"{rel_err(m_fd, m_vjp):.3f}",
                f"{rel_err(m_fd, m_jvp):.1e}",
                f"{centred_cosine(r_fd, r_vjp):.3f}",
            ]
        )
    return rows


def sliced_w2(a: Tensor, b: Tensor, dirs: Tensor, levels: int = 64) -> float:
    """Sliced 2-Wasserstein distance between point sets of any sizes (quantiles at ``levels`` common levels)."""
    q = (torch.arange(levels, dtype=a.dtype) + 0.5) / levels
    pa = torch.quantile(a @ dirs.T, q, dim=0)
    pb = torch.quantile(b @ dirs.T, q, dim=0)
    return float(((pa - pb) ** 2).mean().sqrt())


DIGIT_METHODS = (("no guidance", None, 1), ("CFG", "cfg", 1), *TOY_METHODS)
LAG_ROWS = (10.0, 5.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.05)


def digits_part(args: argparse.Namespace) -> str:
    from sklearn.linear_model import LogisticRegression

    x_train, y_train, x_test, y_test = load_digits(args.seed)
    classifier = LogisticRegression(max_iter=5000).fit(x_train.numpy(), y_train.numpy())
    test_acc = float(classifier.score(x_test.numpy(), y_test.numpy()))
    net, loss = train_denoiser(x_train, y_train, args.digit_steps, args.seed, args.width)
    random_net = DigitDenoiser(sigma_data=net.sigma_data, width=args.width).eval()
    for p in random_net.parameters():
        p.requires_grad_(False)
    out = (
        f"(b) 8x8 digits (scikit-learn, {len(x_train)} train / {len(x_test)} held out), MLP denoiser "
        f"width {args.width}, {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params, EDM, "
        f"{args.digit_steps} Adam steps (final weighted loss {loss:.3f}); classifier on real held-out digits: "
        f"{test_acc:.3f} accuracy\n\n"
    )
    out += format_table(
        ["σ", "mean M", "cos(gf, vjp)", "cos centred", "rel. err", "FD vs exact J1", "random net: cos centred"],
        m_map_rows(net, random_net, x_test, y_test, args.seed),
        title="M maps on held-out digits: gradient-free (forward difference, fp32, h = 1e-3·√(1+σ²)) vs exact vjp",
    )
    out += "\n"

    # samplers: the same noise for every method, 'per_class' samples of each class
    per_class = args.samples_per_class
    labels = torch.arange(10).repeat_interleave(per_class)
    gen = torch.Generator().manual_seed(args.seed + 1)
    sigmas = toy.karras_sigmas(args.digit_sampler_steps, 0.02, 20.0)
    start = 20.0 * torch.randn(len(labels), 64, generator=gen)
    cond, uncond = denoisers(net, labels)
    results, lag = {}, {}
    for name, kind, k in DIGIT_METHODS:
        if kind is None:
            fn = Plain(cond, uncond, 0.0)
        elif kind == "cfg":
            fn = Plain(cond, uncond, args.w)
        else:
            fn = LaggedREG(cond, uncond, args.w, kind, k, track=k > 1, reference=kind)  # the lag alone
        with torch.no_grad() if kind in (None, "cfg") else torch.enable_grad():
            samples = toy.sample_ode(fn, start.clone(), sigmas).detach()
        results[name] = samples
        if isinstance(fn, LaggedREG) and fn.track:
            lag[name] = fn.evaluations

    rows_sigma = pick_rows([s for s in sigmas if s > 0], LAG_ROWS)
    lag_rows = []
    for s in rows_sigma:
        row = [f"{s:.3g}"]
        for name in lag:
            reused = [e for e in lag[name] if not e.fresh and round(e.sigma, 10) == round(s, 10)]
            if reused:
                cos = statistics.fmean(centred_cosine(e.m_used, e.m_exact) for e in reused)
                err = statistics.fmean(rel_err(e.m_used, e.m_exact) for e in reused)
                row.append(f"{cos:.3f} / {err:.3f}")
            else:
                row.append("fresh")
        lag_rows.append(row)
    out += format_table(
        ["σ", *(f"{n}: cos centred / rel. err" for n in lag)],
        lag_rows,
        title="lagged M (reused from an earlier evaluation) vs a fresh M of the same estimator at the same point",
    )
    out += "\n"

    dirs = torch.randn(128, 64, generator=torch.Generator().manual_seed(3))
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    real = torch.cat([x_train, x_test])

    def class_sw(samples: Tensor, reference: Tensor, reference_y: Tensor) -> float:
        return statistics.fmean(sliced_w2(samples[labels == c], reference[reference_y == c], dirs) for c in range(10))

    rows = []
    for name, samples in results.items():
        probs = torch.tensor(classifier.predict_proba(samples.clamp(-1, 1).numpy()))
        acc = float((probs.argmax(1) == labels).float().mean())
        conf = float(probs[torch.arange(len(labels)), labels].mean())
        rows.append(
            [
                name,
                f"{acc:.3f}",
                f"{conf:.3f}",
                f"{class_sw(samples, x_test, y_test):.3f}",
                f"{float(samples.std()):.3f}",
            ]
        )
    floor = statistics.fmean(sliced_w2(x_train[y_train == c], x_test[y_test == c], dirs) for c in range(10))
    rows.append(["real train digits (floor)", "", "", f"{floor:.3f}", f"{float(real.std()):.3f}"])
    out += format_table(
        ["method", "class accuracy", "confidence", "class SW2 to held-out", "pixel std"],
        rows,
        title=(
            f"samples: w = {args.w:g} (cfg {args.w + 1:g}), Heun {args.digit_sampler_steps} steps, "
            f"{per_class} per class from the same noise"
        ),
    )
    return out + "\n"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--toy-points", type=int, default=2000)
    parser.add_argument("--toy-steps", type=int, default=24)
    parser.add_argument("--toy-w", type=float, default=3.0)
    parser.add_argument("--skip-toy", action="store_true")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--digit-steps", type=int, default=4000, help="training steps of the digit denoiser")
    parser.add_argument("--width", type=int, default=384, help="hidden width of the digit denoiser")
    parser.add_argument("--w", type=float, default=2.0, help="digits: cond-anchored guidance weight (cfg = w + 1)")
    parser.add_argument("--samples-per-class", type=int, default=100)
    parser.add_argument("--digit-sampler-steps", type=int, default=18)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if not args.skip_toy:
        write(toy_part(args.toy_points, args.toy_steps, args.toy_w, args.seed))
    if not args.skip_digits:
        write(digits_part(args))
    write(f"total {time.perf_counter() - start:.0f} s\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
