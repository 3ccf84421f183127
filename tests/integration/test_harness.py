"""The harness itself: pack loading, tiny models, the executor round trip and the standard sampling paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from comfy_harness import PACK_NAME, PromptExecutionError, PromptValidationError
from prompts import custom_advanced, decode, ksampler, sd3_inputs, sd15_inputs

REPO = Path(__file__).resolve().parents[2]


def test_pack_loads_through_comfyui_custom_node_loader(reg_pack):
    import nodes

    assert reg_pack.path.is_symlink() and reg_pack.path.resolve() == REPO
    assert reg_pack.path.name == PACK_NAME
    assert nodes.LOADED_MODULE_DIRS[PACK_NAME] == os.path.abspath(reg_pack.path)
    assert Path(reg_pack.module.__file__) == reg_pack.path / "__init__.py"
    # V3 only: a module that also exports NODE_CLASS_MAPPINGS is registered as V1 and its entry point is ignored.
    assert callable(reg_pack.module.comfy_entrypoint)
    assert getattr(reg_pack.module, "NODE_CLASS_MAPPINGS", None) is None
    # Every node module in nodes/ is in the extension's node list: each of its NODES is registered.
    for path in sorted((REPO / "nodes").glob("*.py")):
        if path.stem == "__init__":
            continue
        module = reg_pack.submodule(f"nodes.{path.stem}")
        for cls in getattr(module, "NODES", []):
            node_id = cls.GET_SCHEMA().node_id
            assert nodes.NODE_CLASS_MAPPINGS.get(node_id) is cls, f"{node_id} from nodes/{path.name} not registered"
            assert node_id in reg_pack.node_ids


def test_tiny_models_load_with_the_real_loaders_and_detect(harness, tiny):
    import comfy.model_sampling
    import comfy.supported_models

    g = harness.graph()
    sd15 = g.node("CheckpointLoaderSimple", ckpt_name=tiny.sd15_checkpoint)
    sd3 = g.node("UNETLoader", unet_name=tiny.sd3_unet, weight_dtype="default")
    result = harness.run(g)

    sd15_model = result.value(sd15, 0).model
    assert type(sd15_model.model_config) is comfy.supported_models.SD15
    assert isinstance(sd15_model.model_sampling, comfy.model_sampling.EPS)
    n_params = sum(p.numel() for p in sd15_model.diffusion_model.parameters())
    assert 36.0e6 < n_params < 37.5e6
    assert result.value(sd15, 1) is not None and result.value(sd15, 2) is not None  # CLIP and VAE present

    sd3_model = result.value(sd3, 0).model
    assert type(sd3_model.model_config) is comfy.supported_models.SD3
    assert isinstance(sd3_model.model_sampling, comfy.model_sampling.CONST)


def test_sd15_ksampler_produces_a_finite_latent(harness, tiny):
    g = harness.graph()
    sampler = ksampler(g, sd15_inputs(g, tiny))
    latent = harness.run(g).latent(sampler)
    assert latent.shape == (1, 4, 4, 4)
    assert torch.isfinite(latent).all()
    assert latent.std() > 0.05  # sampled from noise, not the empty latent


def test_same_prompt_twice_gives_identical_output_and_seed_matters(harness, tiny):
    def latent(seed):
        g = harness.graph()
        sampler = ksampler(g, sd15_inputs(g, tiny), seed=seed)
        result = harness.run(g)
        assert sampler.id in result.executed  # really sampled again, not served from ComfyUI's output cache
        return result.latent(sampler)

    first, second, other = latent(7), latent(7), latent(8)
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)


def test_sd3_flow_path_runs_and_decodes(harness, tiny):
    g = harness.graph()
    inputs = sd3_inputs(g, tiny)
    sampler = ksampler(g, inputs, steps=2, cfg=4.0)
    image_node = decode(g, inputs, sampler.out(0))
    result = harness.run(g)

    latent = result.latent(sampler)
    assert latent.shape == (1, 16, 4, 4)
    assert torch.isfinite(latent).all() and latent.std() > 0.05
    image = result.image(image_node)
    assert image.shape == (1, 32, 32, 3)
    assert torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1


def test_sampler_custom_advanced_matches_ksampler(harness, tiny):
    g = harness.graph()
    inputs = sd15_inputs(g, tiny)
    plain = ksampler(g, inputs, seed=123, steps=2, cfg=6.0)
    custom = custom_advanced(g, inputs, seed=123, steps=2, cfg=6.0)
    result = harness.run(g)

    expected = result.latent(plain)
    assert torch.equal(result.latent(custom, 0), expected)
    denoised = result.latent(custom, 1)
    assert denoised.shape == expected.shape and torch.isfinite(denoised).all()


def test_cached_runs_use_comfyui_caching(harness, tiny):
    g = harness.graph()
    sampler = ksampler(g, sd15_inputs(g, tiny), seed=99)
    first = harness.run(g, cached=True)
    second = harness.run(g, cached=True)
    assert sampler.id in first.executed
    assert sampler.id in second.cached and sampler.id not in second.executed
    assert torch.equal(first.latent(sampler), second.latent(sampler))
    harness.forget()  # later tests get a fresh KSampler again
    assert sampler.id in harness.run(g).executed


def test_validation_errors_raise_with_node_errors(harness, tiny):
    g = harness.graph()
    sampler = ksampler(g, sd15_inputs(g, tiny), steps=0)  # KSampler's steps has min 1
    with pytest.raises(PromptValidationError) as info:
        harness.run(g)
    assert sampler.id in info.value.node_errors
    assert "steps" in str(info.value)

    g = harness.graph()
    g.node("CheckpointLoaderSimple", ckpt_name="missing.safetensors")
    with pytest.raises(PromptValidationError, match=r"missing\.safetensors"):
        harness.run(g)


def test_execution_errors_raise_with_the_node_and_traceback(harness, tiny):
    g = harness.graph()
    sd15 = sd15_inputs(g, tiny)
    vae3 = g.node("VAELoader", vae_name=tiny.sd3_vae)
    bad = g.node("VAEDecode", samples=sd15.latent, vae=vae3.out(0))  # 4-channel latent into a 16-channel decoder
    with pytest.raises(PromptExecutionError) as info:
        harness.run(g, outputs=[bad])
    assert info.value.error["node_id"] == bad.id
    assert "VAEDecode" in str(info.value)
