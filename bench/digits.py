"""A class-conditional SD3 MMDiT trained at run time on scikit-learn's 8×8 digits, loaded and sampled the ComfyUI way.

Used by bench/trained.py (the paper's trade-off on a network that learned real data) and by
tests/integration/test_trained.py. Import it only after ComfyUI is importable: the ComfyUI modules are imported inside
the functions.

* **Data**: scikit-learn's bundled digits (1,797 images, 10 classes), read from its CSV with numpy, so ComfyUI's
  interpreter needs no scikit-learn (:func:`digits_file`); pixels 0…16 scaled to [−1, 1]; a stratified split, 70 %
  for training.
* **Latent**: an SD3 latent has 16 channels, so the 8×8 digit becomes a 16×2×2 latent, each 4×4 block of pixels
  spread over the channels (``pixel_unshuffle``): every latent element is one pixel, nothing is duplicated, so the
  data is full-rank in latent space (a 16×8×8 layout would put 64 numbers in 1,024 dimensions, and the ideal
  denoiser's Jacobian would be a projector there). ComfyUI's SD3 latent format maps it to what the network sees.
* **Network**: ComfyUI's own SD3 class (``model_base.SD3``, flow, shift 3), an MMDiT of depth 2 (hidden 128, patch 2,
  so one image token), with a 64-wide context and pooled vector; the loader reads every size back from the keys.
  It is trained through ``BaseModel.apply_model`` (the same ``D(x, σ)`` the sampler sees) with the rectified-flow
  loss ``‖(D − x₀)/σ‖²``, σ logit-normal, and 15 % label dropout for the unconditional branch.
* **Conditioning**: the class is a learned embedding (a [1, 64] context token and a 64-wide pooled vector per class,
  row 10 = no class), fed as ComfyUI conditioning ``[[context, {"pooled_output": pooled}]]``: it stands in for the
  text encoder.
* **Cache**: weights and embeddings are saved under ``${REG_CACHE:-~/.cache/reg-guidance}/trained/<recipe key>/``
  and loaded with ``comfy.sd.load_diffusion_model`` (what UNETLoader calls); a recipe change gives a new key.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

log = logging.getLogger("reg_bench.digits")

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "tests" / "integration") not in sys.path:
    sys.path.append(str(REPO / "tests" / "integration"))  # locate.py: where the cache lives

import locate  # noqa: E402

# Bump when the training or the network changes: cached weights of an older recipe are never reused.
RECIPE_VERSION = 1
CLASSES = 10
NULL_CLASS = CLASSES  # the label-dropout class: the unconditional branch
CONTEXT_WIDTH = 64
POOLED_WIDTH = 64
LATENT_SHAPE = (16, 2, 2)
WEIGHTS_FILE = "digits_mmdit.safetensors"
EMBEDDINGS_FILE = "class_embeddings.safetensors"


@dataclass(frozen=True)
class Recipe:
    """How the network is trained; :meth:`key` names its cache folder."""

    steps: int = 4000
    batch: int = 256
    lr: float = 2e-3
    depth: int = 2
    label_dropout: float = 0.15
    seed: int = 0

    def key(self) -> str:
        return f"v{RECIPE_VERSION}-depth{self.depth}-steps{self.steps}-batch{self.batch}-lr{self.lr:g}-seed{self.seed}"


BENCH_RECIPE = Recipe()
TEST_RECIPE = Recipe(steps=600)


# --- data ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Digits:
    """The split digits: pixels ``[N, 64]`` in [−1, 1] and labels ``[N]``."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def digits_file() -> Path | None:
    """scikit-learn's ``digits.csv.gz``: ``REG_DIGITS``, else the running interpreter's scikit-learn, else the project
    venv's (``REG_VENV``, default ``.venv``, which ``./dev`` creates with scikit-learn)."""
    explicit = os.environ.get("REG_DIGITS")
    if explicit:
        return Path(explicit)
    with contextlib.suppress(ImportError):
        import sklearn.datasets

        return Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"
    venv = REPO / os.environ.get("REG_VENV", ".venv")
    found = sorted(venv.glob("lib/python3*/site-packages/sklearn/datasets/data/digits.csv.gz"))
    return found[-1] if found else None


def load_digits(seed: int = 0, test_fraction: float = 0.3) -> Digits:
    """The digits, split per class (stratified) with a seeded permutation."""
    path = digits_file()
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "scikit-learn's digits.csv.gz not found: install scikit-learn, run ./dev test once (it creates .venv with "
            "it), or set REG_DIGITS to the file"
        )
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",")
    x = torch.tensor(table[:, :64], dtype=torch.float32) / 8 - 1
    y = torch.tensor(table[:, 64], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in range(CLASSES):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        cut = round(len(idx) * test_fraction)
        test.append(idx[:cut])
        train.append(idx[cut:])
    tr, te = torch.cat(train), torch.cat(test)
    return Digits(x[tr], y[tr], x[te], y[te])


def to_latent(pixels: Tensor) -> Tensor:
    """Pixels ``[N, 64]`` → the network's latent ``[N, 16, 2, 2]`` (each 4×4 block over the channels)."""
    return nn.functional.pixel_unshuffle(pixels.reshape(-1, 1, 8, 8), 4)


def to_pixels(latent: Tensor) -> Tensor:
    """The inverse of :func:`to_latent`: ``[N, 16, 2, 2]`` → ``[N, 64]``."""
    return nn.functional.pixel_shuffle(latent, 4).reshape(-1, 64)


# --- the network --------------------------------------------------------------------------------------------------


def unet_config(depth: int) -> dict:
    """The SD3 MMDiT config that ComfyUI's detection reads back from the keys (hidden = 64·depth, heads = depth)."""
    hidden = 64 * depth
    return {
        "in_channels": 16,
        "patch_size": 2,
        "out_channels": 16,
        "depth": depth,
        "input_size": None,
        "adm_in_channels": POOLED_WIDTH,
        "context_embedder_config": {
            "target": "torch.nn.Linear",
            "params": {"in_features": CONTEXT_WIDTH, "out_features": hidden},
        },
        "num_patches": 1,  # one patch: the 2×2 latent
        "pos_embed_max_size": 1,
        "pos_embed_scaling_factor": None,
        "x_block_self_attn_layers": [],
    }


class ClassEmbedding(nn.Module):
    """The learned stand-in for a text encoder: a context token and a pooled vector per class (row 10: no class)."""

    def __init__(self) -> None:
        super().__init__()
        self.context = nn.Parameter(torch.randn(CLASSES + 1, 1, CONTEXT_WIDTH))
        self.pooled = nn.Parameter(torch.randn(CLASSES + 1, POOLED_WIDTH))

    def forward(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        return self.context[labels], self.pooled[labels]

    def conditioning(self, labels: Tensor) -> list:
        """ComfyUI conditioning for a batch (one class per sample) or a single label."""
        with torch.no_grad():
            context, pooled = self(labels)
        return [[context.clone(), {"pooled_output": pooled.clone()}]]


def _init_weights(net: nn.Module, gen: torch.Generator) -> None:
    """ComfyUI's ops skip initialisation: N(0, 1/fan_in) matrices, zero biases, unit norm scales, and the DiT's
    adaLN-zero (every modulation and the final projection start at zero, so each block starts as the identity)."""
    for name, p in net.named_parameters():
        with torch.no_grad():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
            else:
                p.fill_(1.0 if name.endswith(".weight") else 0.0)
            if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                p.zero_()
    net.pos_embed.zero_()


def build_model(depth: int, seed: int) -> Any:
    """A trainable ``model_base.SD3`` of :func:`unet_config` through ComfyUI's own classes, initialised."""
    import comfy.supported_models

    config = comfy.supported_models.SD3(unet_config(depth))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    _init_weights(model.diffusion_model, torch.Generator().manual_seed(seed))
    return model


def train(recipe: Recipe, data: Digits) -> tuple[Any, ClassEmbedding, list[float]]:
    """Rectified-flow training through ``BaseModel.apply_model``; returns the model, the embeddings and the losses."""
    torch.manual_seed(recipe.seed)
    model = build_model(recipe.depth, recipe.seed)
    net = model.diffusion_model.requires_grad_(True).train()
    embed = ClassEmbedding()
    params = [*net.parameters(), *embed.parameters()]
    opt = torch.optim.Adam(params, lr=recipe.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(recipe.seed)
    latents = to_latent(data.x_train)
    losses = []
    for _ in range(recipe.steps):
        idx = torch.randint(0, len(latents), (recipe.batch,), generator=gen)
        x0, labels = latents[idx], data.y_train[idx].clone()
        labels[torch.rand(recipe.batch, generator=gen) < recipe.label_dropout] = NULL_CLASS
        sigma = torch.sigmoid(torch.randn(recipe.batch, generator=gen)).clamp(1e-3, 1 - 1e-3)
        s = sigma.reshape(-1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * torch.randn(x0.shape, generator=gen)
        context, pooled = embed(labels)
        denoised = model.apply_model(noisy, sigma, c_crossattn=context, y=pooled)
        loss = (((denoised - x0) / s) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    net.requires_grad_(False).eval()
    embed.requires_grad_(False)
    return model, embed, losses


# --- the cache ----------------------------------------------------------------------------------------------------


def cache_dir(recipe: Recipe) -> Path:
    """``${REG_CACHE:-~/.cache/reg-guidance}/trained/<recipe key>`` (the root of tests/integration/locate.py)."""
    return locate.cache_root() / "trained" / recipe.key()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread inside the block. The network is small: on 2 busy cores a training step took 0.06 s on
    one thread and 0.3–0.75 s on two (OpenMP threads spin while descheduled); it also keeps the trained weights
    independent of the caller's thread setting."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def ensure_trained(recipe: Recipe) -> Path:
    """Train and save the network of ``recipe`` unless its cache folder holds it already; returns the folder."""
    import safetensors.torch

    folder = cache_dir(recipe)
    with locate.locked(folder):
        manifest = folder / "manifest.json"
        if manifest.is_file():
            return folder
        log.info("training the digits MMDiT (%s) into %s", recipe.key(), folder)
        start = time.perf_counter()
        with one_thread():
            model, embed, losses = train(recipe, load_digits(recipe.seed))
        seconds = time.perf_counter() - start
        state = {k: v.contiguous() for k, v in model.diffusion_model.state_dict().items()}
        safetensors.torch.save_file(state, str(folder / WEIGHTS_FILE))
        embeddings = {k: v.contiguous() for k, v in embed.state_dict().items()}
        safetensors.torch.save_file(embeddings, str(folder / EMBEDDINGS_FILE))
        info = {
            "recipe": asdict(recipe),
            "recipe_version": RECIPE_VERSION,
            "torch": torch.__version__,
            "train_seconds": round(seconds, 1),
            "final_loss": float(np.mean(losses[-200:])),
        }
        manifest.write_text(json.dumps(info, indent=1) + "\n")
        log.info("trained in %.0f s (final loss %.3f)", seconds, info["final_loss"])
    return folder


@dataclass
class Trained:
    """The network as ComfyUI loaded it, its class embeddings and what the cache says about its training."""

    model: Any  # ModelPatcher
    embed: ClassEmbedding
    info: dict

    def positive(self, labels: Tensor) -> list:
        return self.embed.conditioning(labels)

    def negative(self, batch: int) -> list:
        return self.embed.conditioning(torch.full((batch,), NULL_CLASS))

    def to_comfy(self, pixels: Tensor) -> Tensor:
        """Digits ``[N, 64]`` as a ComfyUI LATENT (the latent format's ``process_out`` of the network's space)."""
        return self.model.model.latent_format.process_out(to_latent(pixels))

    def from_comfy(self, samples: Tensor) -> Tensor:
        """A sampled LATENT ``[N, 16, 2, 2]`` as digits ``[N, 64]``."""
        return to_pixels(self.model.model.latent_format.process_in(samples.float()))


def load(recipe: Recipe) -> Trained:
    """Train if needed, then load the weights with ``comfy.sd.load_diffusion_model`` (detected as SD3)."""
    import comfy.sd
    import safetensors.torch

    folder = ensure_trained(recipe)
    model = comfy.sd.load_diffusion_model(str(folder / WEIGHTS_FILE))
    found = type(model.model.model_config).__name__
    if found != "SD3":
        raise RuntimeError(f"the digits MMDiT loaded as {found}, expected SD3")
    embed = ClassEmbedding()
    embed.load_state_dict(safetensors.torch.load_file(str(folder / EMBEDDINGS_FILE)))
    embed.requires_grad_(False)
    return Trained(model, embed, json.loads((folder / "manifest.json").read_text()))
