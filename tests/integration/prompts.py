"""Builders for the standard test workflows (API format, via ComfyUI's ``GraphBuilder``).

Each ``*_inputs`` helper adds the loaders, the two text encodes and the empty latent to a graph and returns their
output handles; the sampler helpers add the sampling part. To test a model-patch node, put it between
``inputs.model`` and the sampler::

    g = harness.graph()
    inp = sd15_inputs(g, tiny)
    patched = g.node("SomePatchNode", model=inp.model, scale=2.0)
    sampler = ksampler(g, inp, model=patched.out(0))
    latent = harness.run(g).latent(sampler)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Link = list  # ["node id", output index], as produced by Node.out(i)

POSITIVE = "a photo of a red cube on a wooden table"
NEGATIVE = "blurry, low quality"


@dataclass(frozen=True)
class Inputs:
    """Output handles of the loader part of a workflow."""

    model: Link
    clip: Link
    vae: Link
    positive: Link
    negative: Link
    latent: Link


def _encode(g: Any, clip: Link, positive: str, negative: str) -> tuple[Link, Link]:
    pos = g.node("CLIPTextEncode", text=positive, clip=clip)
    neg = g.node("CLIPTextEncode", text=negative, clip=clip)
    return pos.out(0), neg.out(0)


def sd15_inputs(
    g: Any,
    tiny: Any,
    *,
    positive: str = POSITIVE,
    negative: str = NEGATIVE,
    width: int = 32,
    height: int = 32,
    batch_size: int = 1,
) -> Inputs:
    """Tiny SD1.5 checkpoint (EPS, TAESD VAE, CLIP-L) + text encodes + EmptyLatentImage."""
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=tiny.sd15_checkpoint)
    pos, neg = _encode(g, ckpt.out(1), positive, negative)
    latent = g.node("EmptyLatentImage", width=width, height=height, batch_size=batch_size)
    return Inputs(ckpt.out(0), ckpt.out(1), ckpt.out(2), pos, neg, latent.out(0))


def sd3_inputs(
    g: Any,
    tiny: Any,
    *,
    positive: str = POSITIVE,
    negative: str = NEGATIVE,
    width: int = 32,
    height: int = 32,
    batch_size: int = 1,
) -> Inputs:
    """Tiny SD3 MMDiT (CONST flow) via UNETLoader + CLIPLoader(sd3) + VAELoader(taesd3) + EmptySD3LatentImage."""
    unet = g.node("UNETLoader", unet_name=tiny.sd3_unet, weight_dtype="default")
    clip = g.node("CLIPLoader", clip_name=tiny.clip_l, type="sd3")
    vae = g.node("VAELoader", vae_name=tiny.sd3_vae)
    pos, neg = _encode(g, clip.out(0), positive, negative)
    latent = g.node("EmptySD3LatentImage", width=width, height=height, batch_size=batch_size)
    return Inputs(unet.out(0), clip.out(0), vae.out(0), pos, neg, latent.out(0))


def ksampler(
    g: Any,
    inputs: Inputs,
    *,
    model: Link | None = None,
    seed: int = 42,
    steps: int = 2,
    cfg: float = 5.0,
    sampler_name: str = "euler",
    scheduler: str = "normal",
    denoise: float = 1.0,
) -> Any:
    """A KSampler node; its output 0 is the LATENT."""
    return g.node(
        "KSampler",
        model=model or inputs.model,
        seed=seed,
        steps=steps,
        cfg=cfg,
        sampler_name=sampler_name,
        scheduler=scheduler,
        positive=inputs.positive,
        negative=inputs.negative,
        latent_image=inputs.latent,
        denoise=denoise,
    )


def custom_advanced(
    g: Any,
    inputs: Inputs,
    *,
    model: Link | None = None,
    guider: Link | None = None,
    seed: int = 42,
    steps: int = 2,
    cfg: float = 5.0,
    sampler_name: str = "euler",
    scheduler: str = "normal",
    denoise: float = 1.0,
) -> Any:
    """SamplerCustomAdvanced with RandomNoise / KSamplerSelect / BasicScheduler and a CFGGuider (or ``guider``).

    Output 0 is the LATENT ("output"), output 1 the last denoised prediction ("denoised_output").
    """
    model = model or inputs.model
    if guider is None:
        guider = g.node("CFGGuider", model=model, positive=inputs.positive, negative=inputs.negative, cfg=cfg).out(0)
    noise = g.node("RandomNoise", noise_seed=seed)
    sampler = g.node("KSamplerSelect", sampler_name=sampler_name)
    sigmas = g.node("BasicScheduler", model=model, scheduler=scheduler, steps=steps, denoise=denoise)
    return g.node(
        "SamplerCustomAdvanced",
        noise=noise.out(0),
        guider=guider,
        sampler=sampler.out(0),
        sigmas=sigmas.out(0),
        latent_image=inputs.latent,
    )


def decode(g: Any, inputs: Inputs, samples: Link) -> Any:
    """VAEDecode of ``samples`` with the workflow's VAE; output 0 is the IMAGE."""
    return g.node("VAEDecode", samples=samples, vae=inputs.vae)
