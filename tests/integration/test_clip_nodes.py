"""REGCLIPScoreLoader + REGCLIPScore through the real executor, scoring the VAEDecode output of a tiny SD1.5 workflow.

The tiny random CLIP (tiny_clip.py) lives in a temporary folder registered under ``folder_paths`` "clip_score". The
node outputs are compared with :mod:`reg_core.metrics.clip_score` imported from the repository (not through the
pack) and run on a separately loaded copy of the same files.
"""

from __future__ import annotations

import json

import pytest
import tiny_clip
from comfy_harness import PromptExecutionError, PromptValidationError
from prompts import decode, ksampler, sd15_inputs

TOLERANCE = 1e-4
# Captions the tiny random CLIP happens to score positively on the tiny SD1.5 images (about +4 each), so that the
# clamped mean is a real number; NEGATIVE_CAPTION scores about -15 (mean below zero).
PROMPTS = ["a forest at night", "trees at night"]
NEGATIVE_CAPTION = "a photo of a cat"
LONG_PROMPT = " ".join(["a small brown dog running across a green field chasing a red ball"] * 7)


@pytest.fixture(scope="module")
def clip_models(harness, tmp_path_factory) -> tiny_clip.TinyCLIP:
    return tiny_clip.build(tmp_path_factory.getbasetemp() / "clip_score_models")


def score_workflow(harness, tiny, *, model_name, prompt, truncation="torchmetrics", label="", batch_size=2, steps=1):
    """Tiny SD1.5 → KSampler → VAEDecode → REGCLIPScore(REGCLIPScoreLoader); returns (graph, decode, score)."""
    g = harness.graph()
    inp = sd15_inputs(g, tiny, batch_size=batch_size)
    sampler = ksampler(g, inp, steps=steps, seed=11)
    image = decode(g, inp, sampler.out(0))
    loader = g.node("REGCLIPScoreLoader", model_name=model_name, dtype="fp32")
    score = g.node(
        "REGCLIPScore",
        image=image.out(0),
        text=prompt,
        clip_score_model=loader.out(0),
        truncation=truncation,
        label=label,
    )
    return g, image, score


def core_result(clip_models, entry, images, prompts, truncation):
    """reg_core.metrics.clip_score on the same images, with its own copy of the model loaded from the same files."""
    from reg_core.metrics import clip_score as core

    scorer = core.load_clip_score_model(clip_models.path(entry), tokenizer_fallback=clip_models.tokenizer_dir)
    return core.compute_clip_score(scorer, images, prompts, truncation=truncation)


def test_loader_lists_folders_and_single_files(clip_models, reg_pack):
    import nodes

    kind, spec = nodes.NODE_CLASS_MAPPINGS["REGCLIPScoreLoader"].INPUT_TYPES()["required"]["model_name"][:2]
    options = spec["options"] if kind == "COMBO" else kind  # V3 combos: ("COMBO", {"options": [...]})
    for entry in (tiny_clip.FULL, tiny_clip.SINGLE, tiny_clip.BARE, tiny_clip.BROKEN):
        assert entry in options
    assert f"{tiny_clip.FULL}/model.safetensors" not in options  # weights inside a model folder are not offered


@pytest.mark.parametrize("entry", [tiny_clip.FULL, tiny_clip.SINGLE, tiny_clip.BARE])
def test_scores_of_decoded_images_match_core(harness, tiny, clip_models, entry):
    g, image, score = score_workflow(harness, tiny, model_name=entry, prompt="\n".join(PROMPTS), label="cfg 5")
    result = harness.run(g)
    images = result.image(image)
    assert images.shape == (2, 32, 32, 3)
    expected = core_result(clip_models, entry, images, PROMPTS, "torchmetrics")
    value, report = result.value(score, 0), json.loads(result.value(score, 1))
    assert isinstance(value, float)
    assert abs(value - expected.mean) <= TOLERANCE
    assert len(report["scores"]) == 2
    assert max(abs(a - b) for a, b in zip(report["scores"], expected.scores, strict=True)) <= TOLERANCE
    assert abs(report["scores"][0] - report["scores"][1]) > 0.01  # two different, real per-image scores
    assert value > 1.0  # a real mean, not the clamp
    assert report["mean"] == value and report["n"] == 2
    assert report["model"] == entry.removesuffix(".safetensors")
    assert report["label"] == "cfg 5" and report["truncation"] == "torchmetrics" and report["notes"] == []
    assert report["metric"] == "CLIP score (torchmetrics, ×100)"
    text = result.ui[score.id]["text"][0]
    assert text.splitlines()[0] == f"CLIP score (torchmetrics, ×100): {value:.4f}"


@pytest.mark.parametrize("truncation", ["torchmetrics", "clip"])
def test_one_long_prompt_is_broadcast_and_truncated_like_core(harness, tiny, clip_models, truncation):
    g, image, score = score_workflow(
        harness, tiny, model_name=tiny_clip.FULL, prompt=LONG_PROMPT, truncation=truncation
    )
    result = harness.run(g)
    images = result.image(image)
    expected = core_result(clip_models, tiny_clip.FULL, images, [LONG_PROMPT] * 2, truncation)
    report = json.loads(result.value(score, 1))
    assert abs(result.value(score, 0) - expected.mean) <= TOLERANCE
    assert max(abs(a - b) for a, b in zip(report["scores"], expected.scores, strict=True)) <= TOLERANCE
    assert len(report["notes"]) == 2 and all("over the 77-token limit" in note for note in report["notes"])
    assert ("EOS dropped" in report["notes"][0]) == (truncation == "torchmetrics")


def test_negative_mean_is_clamped_but_per_image_scores_are_not(harness, tiny, clip_models):
    prompts = [PROMPTS[0], NEGATIVE_CAPTION]
    g, image, score = score_workflow(harness, tiny, model_name=tiny_clip.FULL, prompt="\n".join(prompts))
    result = harness.run(g)
    expected = core_result(clip_models, tiny_clip.FULL, result.image(image), prompts, "torchmetrics")
    scores = json.loads(result.value(score, 1))["scores"]
    assert max(abs(a - b) for a, b in zip(scores, expected.scores, strict=True)) <= TOLERANCE
    assert scores[0] > 0 > scores[1] and sum(scores) < 0
    assert result.value(score, 0) == 0.0 == expected.mean


def test_same_files_give_the_same_scores_in_every_layout(harness, tiny, clip_models):
    g, image, _ = score_workflow(harness, tiny, model_name=tiny_clip.FULL, prompt="\n".join(PROMPTS))
    scores = {}
    for entry in (tiny_clip.FULL, tiny_clip.SINGLE, tiny_clip.BARE):  # three loaders scoring the same decoded batch
        loader = g.node("REGCLIPScoreLoader", model_name=entry, dtype="fp32")
        scores[entry] = g.node(
            "REGCLIPScore",
            image=image.out(0),
            text="\n".join(PROMPTS),
            clip_score_model=loader.out(0),
            truncation="torchmetrics",
        )
    result = harness.run(g)
    values = {entry: json.loads(result.value(node, 1))["scores"] for entry, node in scores.items()}
    assert values[tiny_clip.FULL] == values[tiny_clip.SINGLE] == values[tiny_clip.BARE]


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("\n".join([*PROMPTS, "a third caption"]), r"text has 3 lines but the image batch has 2 images"),
        ("", r"text is empty: enter the caption"),
        (" \n ", r"text is empty"),
        ("a cat\n\na dog", r"text line 2 is blank"),
    ],
)
def test_bad_prompts_fail_with_a_clear_message(harness, tiny, clip_models, prompt, message):
    g, _, _ = score_workflow(harness, tiny, model_name=tiny_clip.FULL, prompt=prompt)
    with pytest.raises(PromptExecutionError, match=message) as info:
        harness.run(g)
    assert info.value.error["node_type"] == "REGCLIPScore"
    assert info.value.error["exception_type"].endswith("InvalidInputError")


def test_folder_without_weights_is_the_documented_error(harness, tiny, clip_models):
    g, _, _ = score_workflow(harness, tiny, model_name=tiny_clip.BROKEN, prompt=PROMPTS[0])
    with pytest.raises(
        PromptExecutionError, match=r"missing model\.safetensors or model\.safetensors\.index\.json"
    ) as info:
        harness.run(g)
    assert info.value.error["node_type"] == "REGCLIPScoreLoader"
    message = info.value.error["exception_message"]
    assert "Expected a transformers CLIPModel folder (e.g. openai/clip-vit-base-patch16)" in message
    assert info.value.error["exception_type"].endswith("MissingModelFilesError")


def test_unknown_model_name_is_a_clear_error(harness, tiny, clip_models):
    # The name the README has users install: never present in the session's own clip_score folders (conftest.py).
    # ComfyUI 0.33 rejects it at validation, listing the choices; 0.3.64 does not check V3 combo values against their
    # options, so there the loader itself must say it.
    g, _, _ = score_workflow(harness, tiny, model_name="clip-vit-base-patch16", prompt=PROMPTS[0])
    with pytest.raises((PromptValidationError, PromptExecutionError), match=r"'clip-vit-base-patch16'") as info:
        harness.run(g)
    if isinstance(info.value, PromptValidationError):
        assert [e["class_type"] for e in info.value.node_errors.values()] == ["REGCLIPScoreLoader"]
        assert f"'{tiny_clip.FULL}'" in str(info.value)  # the choices are listed
    else:
        message = info.value.error["exception_message"]
        assert "model_name 'clip-vit-base-patch16' was not found in [" in message
        assert str(clip_models.root) in message
        assert "into models/clip_score/ and refresh the node list" in message


def test_scorer_is_managed_by_comfyui_and_freed_by_unload_all_models(harness, tiny, clip_models, reg_pack):
    """The loaded scorer is a ComfyUI ModelPatcher: scoring loads it like any model, "free memory" unloads it."""
    import comfy.model_management

    def loaded(patcher) -> bool:
        return any(entry.model is patcher for entry in comfy.model_management.current_loaded_models)

    g, _, score = score_workflow(harness, tiny, model_name=tiny_clip.FULL, prompt=PROMPTS[0])
    result = harness.run(g)
    loader = next(node for node in g.nodes.values() if node.class_type == "REGCLIPScoreLoader")
    managed = result.value(loader, 0)
    assert managed.patcher.load_device == comfy.model_management.text_encoder_device()
    assert managed.patcher.offload_device == comfy.model_management.text_encoder_offload_device()
    assert managed.patcher.model.clip is managed.scorer.model
    assert loaded(managed.patcher)  # listed by ComfyUI after scoring, with its size counted
    assert managed.patcher.model_size() > 1_000_000
    comfy.model_management.unload_all_models()
    assert not loaded(managed.patcher)
    assert result.value(score, 0) > 0
