"""REG on a network that learned real data: the paper's trade-off through ComfyUI's sampler and the pack's nodes.

    ./dev bench --trained                   # = .venv/bin/python bench/trained.py; re-runs under ComfyUI's interpreter
    ./dev bench --trained --seeds 2 --weights 0 1 10 --no-figures     # a quick look

ComfyUI is found like the integration tests find it (``COMFYUI_PATH``, tests/integration/locate.py, including the
interpreters ``./dev comfyui <tree>`` prepares). The network is bench/digits.py's SD3 MMDiT, trained on scikit-learn's
8×8 digits on first use (a few minutes; cached outside the repository). Everything is sampled with
``comfy.sample.sample`` (what KSampler calls: euler, simple schedule, 20 steps) with the pack's ``REGGuidance`` node and
ComfyUI's own ``APG`` node applied to the loaded model, ``--per-class`` samples of every class per run, and the same
noise (``comfy.sample.prepare_noise`` of the seed) for every method of a seed.

1. **The paper's trade-off** (Gao et al., ICML 2025: at equal prompt alignment REG reaches a better FID than CFG)
   for every guidance weight ``w`` (cond-anchored, ``D_c + w·(D_c − D_u)``: KSampler's cfg is ``w + 1``; APG runs at
   its own scale ``w``, the same weight) and method: CFG, REG (``vjp``), REG ``gradient-free``, ComfyUI's APG node,
   APG + REG; ``w = 0`` is the conditional network alone (cfg 1), shared by all. Per seed: *accuracy* of a classifier
   trained on the real training digits (the requested class is the target); *Fréchet distance* in that classifier's
   32-dimensional feature space to the held-out digits of the requested class, averaged over the classes (the floor:
   the same number of real training digits per class against the held-out ones); *diversity* within a class as
   *coverage* (Naeem et al. 2020, k = 5: the share of held-out digits with a sample inside their 5-nearest-neighbour
   ball, in the same feature space) and the mean pairwise feature distance; the *pixel spread* (saturation). Means
   over the seeds with a 95 % t-interval. Images are clamped to [−1, 1] before they are scored, as a decoder would.
2. **``refresh_every`` 2 and 4** at three weights: the same scores, and how far the final samples move from REG's
   (RMS pixel difference), next to how far REG's own correction moves them from CFG's.
3. **M on the trained network**, along one REG run: the pack's own diagnostics record per σ (mean, 5th/95th
   percentile, share < 0 and > 1), checked against M computed by autograd at the same points; the gradient-free M and
   the forward-mode ``J𝟙`` (``torch.func.jvp``) at those points, which separate the finite difference's own error
   (gradient-free vs ``J𝟙``) from the Jacobian's asymmetry (``J𝟙`` vs ``Jᵀ𝟙``); and M on the pixels that are blank
   in every training digit against the others.

Figures (``--figures``, default out/; ``--figures web/docs`` redraws the README's): ``trained_tradeoff.png``
(Fréchet distance against accuracy, one line per method, and against the weight) and ``trained_grid.png`` (samples at a
high weight: no guidance, CFG, REG, from the same noise, under real held-out digits), drawn with reg_core/plots.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # appended: ComfyUI's own ``nodes`` module must win over the pack's ``nodes`` package
sys.path.insert(0, str(REPO / "tests" / "integration"))

import locate  # noqa: E402

from bench import digits  # noqa: E402
from bench.benchlib import format_table  # noqa: E402
from reg_core import plots, rectify  # noqa: E402
from reg_core.plots.sweep import compose_grid  # noqa: E402

log = logging.getLogger("reg_bench.trained")
REEXEC_FLAG = "REG_BENCH_UNDER_COMFYUI"
FIGURES = REPO / "out"  # gitignored; --figures web/docs redraws the README's pictures


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--trained", action="store_true", help=argparse.SUPPRESS)  # ./dev bench's route flag
    parser.add_argument("--seeds", type=int, default=5, help="noise seeds per method and weight (default 5)")
    parser.add_argument("--per-class", type=int, default=64, help="samples of each class per run (default 64)")
    parser.add_argument(
        "--weights", type=float, nargs="+", default=[0, 0.5, 1, 2, 4, 7, 10], help="guidance weights w (cfg = w + 1)"
    )
    parser.add_argument("--refresh-weights", type=float, nargs="*", default=[1, 4, 10], help="weights of part 2")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (euler, simple schedule)")
    parser.add_argument("--m-weight", type=float, default=4.0, help="the weight of the M study (part 3)")
    parser.add_argument("--grid-weight", type=float, default=10.0, help="the weight of the sample grid")
    parser.add_argument("--apg", type=float, nargs=3, default=[0.0, 1.0, -0.5], metavar=("ETA", "NORM", "MOMENTUM"))
    parser.add_argument("--train-steps", type=int, help="training steps of the network (default: bench/digits.py)")
    parser.add_argument("--figures", type=Path, default=FIGURES, help="where the PNGs go (default out/)")
    parser.add_argument("--no-figures", action="store_true", help="print the tables only")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the network is tiny)")
    return parser


# --- ComfyUI ------------------------------------------------------------------------------------------------------


def reexec_under_comfyui(argv: list[str]) -> Path:
    """ComfyUI's checkout; re-executes this script under its interpreter first when this is another one."""
    comfyui, reason = locate.find_comfyui()
    python, why = locate.find_interpreter(comfyui) if comfyui is not None else (None, reason)
    if comfyui is None or python is None:
        raise SystemExit(f"--trained needs ComfyUI: {why}")
    if os.environ.get(REEXEC_FLAG) == "1" or locate.runs_here(python):
        return comfyui
    env = {**os.environ, REEXEC_FLAG: "1"}
    found = digits.digits_file()  # this interpreter may have scikit-learn where ComfyUI's has none
    if found is not None:
        env.setdefault("REG_DIGITS", str(found))
    log.info("re-running under ComfyUI's interpreter %s", python)
    os.execve(python, [python, str(Path(__file__).resolve()), *argv], env)
    raise AssertionError("not reached")


def start_comfyui(comfyui: Path) -> Any:
    """Import ComfyUI in-process (--cpu, base directory in a temp folder removed at exit) and load the pack through its
    own loader.

    The import order is the integration tests' (tests/integration/conftest.py); returns the loaded pack.
    """
    base = Path(tempfile.mkdtemp(prefix="reg-trained-"))
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    sys.path.insert(0, str(comfyui))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.base_directory = str(base)
    import utils.extra_config  # noqa: F401

    try:
        import server  # noqa: F401
    except ImportError as exc:
        log.warning("ComfyUI's server module does not import (%s)", exc)
    import comfy_harness
    import execution  # noqa: F401
    import folder_paths  # noqa: F401

    import nodes  # noqa: F401

    comfy_harness.isolate_folders(base)
    return comfy_harness.load_pack(REPO, base / "custom_nodes")


# --- the classifier and the scores -------------------------------------------------------------------------------


def train_classifier(data: digits.Digits, seed: int = 0, steps: int = 3000) -> nn.Sequential:
    """An MLP (64 → 128 → 32 → 10) trained on the real training digits, with a little input noise for robustness."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(data.x_train), (128,), generator=gen)
        noisy = data.x_train[idx] + 0.1 * torch.randn(128, 64, generator=gen)
        loss = nn.functional.cross_entropy(net(noisy), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.requires_grad_(False).eval()


def frechet(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to the rows of ``a`` and ``b`` (FID's formula; ``tr √(Σa·Σb)`` from
    the eigenvalues of ``√Σa·Σb·√Σa``, which stays real for singular covariances)."""
    a, b = a.double(), b.double()
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((a.mean(0) - b.mean(0)).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def coverage(real: Tensor, fake: Tensor, k: int = 5) -> float:
    """Share of ``real`` points with a ``fake`` point inside their k-nearest-neighbour ball (Naeem et al. 2020)."""
    radius = torch.cdist(real, real).kthvalue(k + 1, dim=1).values  # the point itself is its own 1st neighbour
    return float((torch.cdist(real, fake).min(dim=1).values <= radius).float().mean())


@dataclass(frozen=True)
class Scores:
    """One sample set's scores (means over the classes where per class)."""

    accuracy: float
    distance: float
    coverage: float
    pairwise: float
    spread: float


def score(
    classifier: nn.Sequential, pixels: Tensor, labels: Tensor, reference: Tensor, reference_labels: Tensor
) -> Scores:
    """:class:`Scores` of ``pixels`` (requested ``labels``) against the ``reference`` digits of the same classes."""
    pixels = pixels.clamp(-1, 1)
    features = classifier[:-1]  # the 32 activations before the classifier's last layer
    feats, ref = features(pixels), features(reference)
    per_class = [(feats[labels == c], ref[reference_labels == c]) for c in range(digits.CLASSES)]
    return Scores(
        accuracy=float((classifier(pixels).argmax(1) == labels).float().mean()),
        distance=statistics.fmean(frechet(f, r) for f, r in per_class),
        coverage=statistics.fmean(coverage(r, f) for f, r in per_class),
        pairwise=statistics.fmean(float(torch.pdist(f).mean()) for f, _ in per_class),
        spread=float(pixels.std()),
    )


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t-interval (0 for a single value)."""
    import scipy.stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, float(scipy.stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5)


def ci_text(values: Sequence[float], spec: str) -> str:
    mean, half = mean_ci(values)
    return f"{mean:{spec}} ± {half:{spec}}"


# --- the methods and the sampler ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """A guidance setup: REG's estimator (None: no REG) on top of CFG or ComfyUI's APG node."""

    name: str
    estimator: str | None = None
    apg: bool = False
    refresh_every: int = 1


NO_GUIDANCE = "no guidance"
METHODS = (
    Method("CFG"),
    Method("REG", "vjp"),
    Method("REG gradient-free", "gradient-free"),
    Method("APG", apg=True),
    Method("APG + REG", "vjp", apg=True),
)
REFRESH = (Method("REG refresh 2", "vjp", refresh_every=2), Method("REG refresh 4", "vjp", refresh_every=4))


@dataclass
class Setup:
    """What every run shares: the trained network, the classes, the conditioning and the nodes' settings."""

    trained: digits.Trained
    labels: Tensor
    positive: list
    negative: list
    steps: int
    apg: tuple[float, float, float]

    def model(self, method: Method) -> Any:  # a ModelPatcher
        """The loaded model patched by the method's nodes (APG first, then REGGuidance), as a workflow would."""
        import nodes

        model = self.trained.model
        if method.apg:
            eta, norm, momentum = self.apg
            model = nodes.NODE_CLASS_MAPPINGS["APG"].execute(model, eta, norm, momentum).result[0]
            model.model_options["disable_cfg1_optimization"] = True  # APG at scale 1 still needs the negative pass
        if method.estimator is not None:
            reg = nodes.NODE_CLASS_MAPPINGS["REGGuidance"]
            settings = {"strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}
            model = reg.execute(model, estimator=method.estimator, refresh_every=method.refresh_every, **settings)
            model = model.result[0]
        return model

    def sample(self, method: Method, w: float, seed: int, callback: Callable | None = None) -> tuple[Tensor, Any]:
        """``(pixels [N, 64], patched model)`` of one KSampler run at weight ``w`` from the seed's noise."""
        import comfy.sample

        model = self.model(method) if w > 0 else self.trained.model
        cfg = w if method.apg else w + 1
        latent = torch.zeros(len(self.labels), *digits.LATENT_SHAPE)
        noise = comfy.sample.prepare_noise(latent, seed)
        with torch.inference_mode():
            out = comfy.sample.sample(
                model, noise, self.steps, cfg, "euler", "simple", self.positive, self.negative, latent,
                seed=seed, callback=callback, disable_pbar=True,
            )  # fmt: skip
        return self.trained.from_comfy(out).clone(), model


# --- part 1 and 2: the trade-off ----------------------------------------------------------------------------------


def run_sweep(setup: Setup, runs: list[tuple[Method, float]], seeds: int) -> dict[tuple[str, float, int], Tensor]:
    """The samples of every ``(method name, w, seed)`` (``w = 0`` is :data:`NO_GUIDANCE`)."""
    samples = {}
    for seed in range(seeds):
        start = time.perf_counter()
        for method, w in runs:
            samples[(NO_GUIDANCE if w == 0 else method.name, w, seed)] = setup.sample(method, w, seed)[0]
        log.info("seed %d: %d runs in %.0f s", seed, len(runs), time.perf_counter() - start)
    return samples


def by_run(samples: dict, judge: Callable) -> dict[tuple[str, float], list[Scores]]:
    """The scores of every ``(method name, w)``, one per seed."""
    scores: dict[tuple[str, float], list[Scores]] = {}
    for (name, w, _), pixels in samples.items():
        scores.setdefault((name, w), []).append(judge(pixels))
    return scores


def cells(values: Sequence[Scores]) -> list[str]:
    return [ci_text([getattr(v, f.name) for v in values], ".3f") for f in fields(Scores)]


def tradeoff_rows(scores: dict, floor: list[Scores]) -> list[list[str]]:
    """Per weight and method: the scores, and the Fréchet distance minus CFG's at the same weight and seed."""
    shown = [NO_GUIDANCE, *(m.name for m in METHODS)]
    order = sorted((key for key in scores if key[0] in shown), key=lambda key: (key[1], shown.index(key[0])))
    rows = []
    for name, w in order:
        cfg = scores.get(("CFG", w))
        paired = (
            ""
            if cfg is None or name == "CFG"
            else ci_text([s.distance - c.distance for s, c in zip(scores[(name, w)], cfg, strict=True)], ".2f")
        )
        rows.append([name, f"{w:g}", *cells(scores[(name, w)]), paired])
    return [*rows, ["real training digits (floor)", "", *cells(floor), ""]]


def floor_scores(classifier: nn.Sequential, data: digits.Digits, per_class: int, draws: int) -> list[Scores]:
    """The real training digits scored like samples: ``per_class`` of each class drawn ``draws`` times."""
    out = []
    for draw in range(draws):
        gen = torch.Generator().manual_seed(draw)
        picks = []
        for c in range(digits.CLASSES):
            idx = torch.nonzero(data.y_train == c).flatten()
            picks.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
        idx = torch.cat(picks)
        out.append(score(classifier, data.x_train[idx], data.y_train[idx], data.x_test, data.y_test))
    return out


def rms_change(samples: dict, name: str, w: float, seeds: int) -> list[float]:
    """Per seed, the RMS pixel difference between ``name``'s final samples and REG's (clamped images)."""
    return [
        float((samples[(name, w, s)].clamp(-1, 1) - samples[("REG", w, s)].clamp(-1, 1)).pow(2).mean().sqrt())
        for s in range(seeds)
    ]


def refresh_rows(samples: dict, scores: dict, weights: Sequence[float], seeds: int) -> list[list[str]]:
    """Part 2: per weight, REG with refresh_every 1, 2, 4: scores and how far the final samples moved."""
    rows = []
    for w in weights:
        cfg_moved = ci_text(rms_change(samples, "CFG", w, seeds), ".4f")
        for name in ("REG", *(m.name for m in REFRESH)):
            values = scores[(name, w)]
            moved = ci_text(rms_change(samples, name, w, seeds), ".4f")
            rows.append([name, f"{w:g}", *cells(values)[:3], moved, cfg_moved])
    return rows


# --- part 3: M on the trained network -----------------------------------------------------------------------------


def m_rows(setup: Setup, w: float, blank: Tensor, pack: Any) -> list[list[str]]:
    """Part 3: one REG run's record per σ (found as REGDiagnostics finds it), against autograd, the forward difference
    and ``J𝟙`` at the same points."""
    states: list[Tensor] = []
    _, model = setup.sample(METHODS[1], w, 0, callback=lambda i, x0, x, n: states.append(x.clone()))
    (record,) = pack.submodule("nodes.diagnostics").find_patch(model, None).records.values()  # a fresh patch
    base = setup.trained.model.model
    context, pooled = setup.positive[0][0], setup.positive[0][1]["pooled_output"]
    rows = []
    for step, state in zip(record.steps, states, strict=True):
        sigma = float(step.sigma.flatten()[0])
        if sigma >= 1:
            continue  # a(σ) = 1 − σ = 0: M vanishes identically
        x = state.clone()

        def denoise(z: Tensor, s: float = sigma) -> Tensor:
            return base.apply_model(z, torch.full((len(z),), s), c_crossattn=context, y=pooled)

        _, exact = rectify.reg_factor_vjp(denoise, x, sigma, space=rectify.FLOW)
        _, gradient_free = rectify.reg_factor_fd(denoise, x, sigma, space=rectify.FLOW)
        with torch.no_grad():
            j_ones = torch.func.jvp(denoise, (x,), (torch.ones_like(x),))[1] * (1 - sigma)
        stats = {k: float(v.mean()) for k, v in step.stats.items()}
        rows.append([
            f"{sigma:.3f}", f"{stats['mean']:.3f}", f"{stats['p05']:.3f}", f"{stats['p95']:.3f}",
            f"{stats['frac_neg']:.3f}", f"{stats['frac_gt1']:.3f}", f"{float((step.m_map - exact).abs().max()):.0e}",
            f"{relative(gradient_free, exact):.3f}", f"{cosine(gradient_free, exact):.3f}",
            f"{relative(gradient_free, j_ones):.0e}", f"{relative(j_ones, exact):.3f}",
            f"{float(exact[:, blank].mean()):.3f}", f"{float(exact[:, ~blank].mean()):.3f}",
        ])  # fmt: skip
    return rows


def relative(estimate: Tensor, reference: Tensor) -> float:
    """Mean over the samples of ``‖estimate − reference‖ / ‖reference‖``."""
    diff = (estimate - reference).flatten(1).norm(dim=1)
    return float((diff / reference.flatten(1).norm(dim=1)).mean())


def cosine(a: Tensor, b: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1).mean())


# --- figures ------------------------------------------------------------------------------------------------------


def tradeoff_figure(scores: dict, floor: list[Scores], weights: Sequence[float]) -> Image.Image:
    """Fréchet distance against accuracy (one line per method through the weights) and against the weight."""

    def series(name: str, attr: str) -> tuple[list[float], list[float]]:
        keys = [(NO_GUIDANCE, 0.0)] if 0 in weights else []
        keys += [(name, w) for w in weights if w > 0]
        xs = [statistics.fmean(getattr(v, attr) for v in scores[k]) if attr else k[1] for k in keys]
        return xs, [statistics.fmean(v.distance for v in scores[k]) for k in keys]

    names = [m.name for m in METHODS]
    floor_mean = statistics.fmean(v.distance for v in floor)
    image = Image.new("RGB", (1000, 420), plots.WHITE)
    panels = []
    for left, attr, xlabel in ((0, "accuracy", "classifier accuracy"), (500, "", "guidance weight w (cfg = w + 1)")):
        lines = [series(name, attr) for name in names]
        xs = [x for line in lines for x in line[0]]
        ys = [y for line in lines for y in line[1]] + [floor_mean]
        panel = plots.Panel(image, (left + 70, 40, left + 480, 360), plots.limits(xs), plots.limits(ys, 0.08))
        panel.line(list(panel.xlim), [floor_mean, floor_mean], plots.GREY, width=1)
        for i, (x, y) in enumerate(lines):
            panel.line(x, y, plots.PALETTE[i], marker=True)
        panels.append(panel.frame("", xlabel, "Frechet distance (features)"))
    panels[1].legend([(n, plots.PALETTE[i]) for i, n in enumerate(names)] + [("real digits (floor)", plots.GREY)])
    title = "Frechet distance to the held-out digits of the requested class (features of a digit classifier)"
    panels[0].draw.text((70, 12), title, fill=plots.BLACK, font=plots.font(14))
    return image


def grid_figure(samples: dict, data: digits.Digits, w: float, per_cell: int = 4) -> Image.Image:
    """Seed 0's samples of every class at weight ``w`` (rows: no guidance, CFG, REG, from the same noise), under real
    held-out digits."""

    def tiles(pixels: Tensor, labels: Tensor) -> list[np.ndarray]:
        """The first ``per_cell`` images of each class, 4× enlarged, as uint8 RGB batches."""
        out = []
        for c in range(digits.CLASSES):
            images = ((pixels[labels == c][:per_cell].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            big = images.reshape(-1, 8, 8).repeat_interleave(4, 1).repeat_interleave(4, 2)
            out.append(big[..., None].expand(-1, -1, -1, 3).numpy())
        return out

    first = samples[(NO_GUIDANCE, 0.0, 0)]
    labels = torch.arange(digits.CLASSES).repeat_interleave(len(first) // digits.CLASSES)
    rows = [tiles(data.x_test, data.y_test), tiles(first, labels)]
    rows += [tiles(samples[(name, w, 0)], labels) for name in ("CFG", "REG")]
    grid, _ = compose_grid(
        rows,
        row_labels=["real (held out)", "no guidance", f"CFG, cfg {w + 1:g}", f"REG, cfg {w + 1:g}"],
        col_labels=[str(c) for c in range(digits.CLASSES)],
        captions=[[""] * 10 for _ in rows],
        title=f"w = {w:g}: no guidance, CFG and REG from the same noise ({per_cell} per class); real digits on top",
    )
    return Image.fromarray(grid)


# --- main ---------------------------------------------------------------------------------------------------------

TRADEOFF_HEADERS = [
    "method", "w", "accuracy", "Fréchet distance", "coverage", "pairwise distance", "pixel spread", "Fréchet − CFG's",
]  # fmt: skip
TRADEOFF_TITLE = "1. the trade-off: mean ± 95 % interval over the seeds (floor: real training digits, same count)"
REFRESH_HEADERS = ["method", "w", "accuracy", "Fréchet distance", "coverage", "RMS change vs REG", "CFG vs REG"]
REFRESH_TITLE = "2. refresh_every: scores, and the RMS pixel change of the final samples from REG's"
M_HEADERS = ["σ", "mean M", "p05", "p95", "M < 0", "M > 1", "record vs autograd", "gf rel. err", "gf cos",
             "gf vs J1", "J1 vs JT1", "M blank px", "M other px"]  # fmt: skip
M_TITLE = (
    "3. M along one REG run (w = {w:g}, seed 0): the pack's record per σ; the gradient-free M (gf) and the "
    "forward-mode J1 against the exact JT1 ({blank} of 64 pixels are blank in every training digit)"
)


def header(comfyui: Path, recipe: digits.Recipe, trained: digits.Trained, data: digits.Digits, classifier: nn.Module,
           args: argparse.Namespace) -> str:  # fmt: skip
    """What was measured with what."""
    accuracy = float((classifier(data.x_test).argmax(1) == data.y_test).float().mean())
    return (
        f"REG on a trained network: ComfyUI {locate.comfyui_version(comfyui)} at {comfyui}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)\nnetwork: {recipe.key()}, trained in {trained.info['train_seconds']} s "
        f"(final loss {trained.info['final_loss']:.3f}); digits {len(data.x_train)} train / {len(data.x_test)} held "
        f"out; classifier accuracy on held-out digits {accuracy:.3f}\nsampling: euler, simple, {args.steps} steps, "
        f"{args.per_class} per class, seeds 0…{args.seeds - 1}; APG eta {args.apg[0]:g}, norm_threshold "
        f"{args.apg[1]:g}, momentum {args.apg[2]:g}\n\n"
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    log.setLevel(logging.INFO)
    logging.getLogger("reg_bench.digits").setLevel(logging.INFO)
    argv = sys.argv[1:] if argv is None else argv
    parser = make_parser()
    args = parser.parse_args(argv)
    if not set(args.refresh_weights) <= set(args.weights) - {0}:
        parser.error("--refresh-weights must be non-zero values of --weights")
    comfyui = reexec_under_comfyui(argv)
    start = time.perf_counter()
    pack = start_comfyui(comfyui)
    torch.set_num_threads(args.threads)
    recipe = digits.BENCH_RECIPE if args.train_steps is None else digits.Recipe(steps=args.train_steps)
    trained = digits.load(recipe)
    data = digits.load_digits(recipe.seed)
    classifier = train_classifier(data)
    labels = torch.arange(digits.CLASSES).repeat_interleave(args.per_class)
    setup = Setup(trained, labels, trained.positive(labels), trained.negative(len(labels)), args.steps, tuple(args.apg))
    write(header(comfyui, recipe, trained, data, classifier, args))
    runs = [(METHODS[0], 0.0)] if 0 in args.weights else []
    runs += [(m, float(w)) for w in args.weights if w > 0 for m in METHODS]
    runs += [(m, float(w)) for w in args.refresh_weights for m in REFRESH]
    samples = run_sweep(setup, runs, args.seeds)
    scores = by_run(samples, lambda pixels: score(classifier, pixels, labels, data.x_test, data.y_test))
    floor = floor_scores(classifier, data, args.per_class, args.seeds)
    write(format_table(TRADEOFF_HEADERS, tradeoff_rows(scores, floor), title=TRADEOFF_TITLE) + "\n")
    if args.refresh_weights:
        rows = refresh_rows(samples, scores, args.refresh_weights, args.seeds)
        write(format_table(REFRESH_HEADERS, rows, title=REFRESH_TITLE) + "\n")
    blank = digits.to_latent(data.x_train).std(0) < 0.05
    title = M_TITLE.format(w=args.m_weight, blank=int(blank.sum()))
    write(format_table(M_HEADERS, m_rows(setup, args.m_weight, blank, pack), title=title) + "\n")
    if not args.no_figures:
        args.figures.mkdir(parents=True, exist_ok=True)
        paths = args.figures / "trained_tradeoff.png", args.figures / "trained_grid.png"
        tradeoff_figure(scores, floor, args.weights).save(paths[0], optimize=True)
        grid_figure(samples, data, args.grid_weight).save(paths[1], optimize=True)
        write("figures: " + ", ".join(f"{p} ({p.stat().st_size / 1024:.0f} KiB)" for p in paths) + "\n")
    write(f"total {time.perf_counter() - start:.0f} s\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
