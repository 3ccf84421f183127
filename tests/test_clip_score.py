"""Tests of :mod:`reg_core.metrics.clip_score` against an independent reference on a tiny random-weight CLIP.

The reference computes torchmetrics' formula directly: its own PIL preprocessing (bicubic shortest-edge resize with the
long side truncated to int, centre crop with top = (h - 224) // 2, /255, OpenAI mean/std), its own tokenizer call, and
``CLIPModel.get_image_features`` / ``get_text_features`` on the in-memory model the files were saved from. The BPE is
ComfyUI's bundled ``comfy/sd1_tokenizer`` (the OpenAI CLIP vocabulary); without a ComfyUI checkout the tests skip.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from reg_core.metrics import clip_score as cs  # noqa: E402
from tests.integration.locate import find_comfyui  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
TOLERANCE = 1e-4
PROMPTS = [
    "a photo of a cat",
    "A man riding a wave on top of a surfboard.",
    "two dogs playing in the snow",
    "a red double-decker bus driving down a city street",
    "a plate of food with broccoli, rice and a fork",
    "an empty kitchen with white cabinets",
    "a giraffe standing next to a tree",
]
LONG_PROMPT = " ".join(["a small brown dog running across a green field chasing a red ball"] * 7)
# The openai/clip-vit-base-patch16 preprocessor_config.json, in its legacy (integer size) format.
OPENAI_PREPROCESSOR_CONFIG = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": MEAN.tolist(),
    "image_std": STD.tolist(),
    "resample": 3,
    "size": 224,
}


@dataclass
class Tiny:
    """The tiny model, its reference tokenizer and the files it was saved to."""

    model: torch.nn.Module
    tokenizer: object
    tokenizer_dir: Path
    full_dir: Path  # config + weights + openai preprocessor config + tokenizer files
    bare_dir: Path  # config + weights only
    single_file: Path  # model.safetensors alone, HF CLIPModel key layout


def _tiny_config() -> object:
    """64-wide, 2-layer CLIP with the real vocabulary and OpenAI's legacy special-token ids (eos 2)."""
    return transformers.CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 1,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "bos_token_id": 0,
            "eos_token_id": 2,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 1,
            "image_size": 224,
            "patch_size": 32,
            "hidden_act": "quick_gelu",
        },
        projection_dim=32,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    comfyui, reason = find_comfyui()
    if comfyui is None:
        pytest.skip(f"needs ComfyUI's bundled CLIP tokenizer (comfy/sd1_tokenizer): {reason}")
    tokenizer_dir = comfyui / "comfy" / "sd1_tokenizer"
    root = tmp_path_factory.mktemp("clip_score")
    torch.manual_seed(0)
    model = transformers.CLIPModel(_tiny_config()).eval()
    full_dir, bare_dir = root / "tiny-clip", root / "bare"
    model.save_pretrained(str(full_dir), safe_serialization=True)
    shutil.copytree(full_dir, bare_dir)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / name, full_dir / name)
    (full_dir / "preprocessor_config.json").write_text(json.dumps(OPENAI_PREPROCESSOR_CONFIG))
    single_file = root / "tiny-clip-single.safetensors"
    shutil.copy(full_dir / "model.safetensors", single_file)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    return Tiny(model, tokenizer, tokenizer_dir, full_dir, bare_dir, single_file)


@pytest.fixture(scope="module")
def scorer(tiny: Tiny) -> cs.CLIPScoreModel:
    return cs.load_clip_score_model(tiny.full_dir)


# --------------------------------------------------------------------------------------------------- the reference


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float (B, H, W, C) in [0, 1] → uint8 numpy, rounding like a saved PNG."""
    return np.round(np.clip(images.numpy(), 0.0, 1.0) * 255.0).astype(np.uint8)


def reference_pixel_values(images: np.ndarray) -> torch.Tensor:
    """CLIP preprocessing written out with PIL: RGB, bicubic shortest edge 224, centre crop 224, /255, mean/std."""
    out = []
    for array in images:
        image = Image.fromarray(array).convert("RGB")
        width, height = image.size
        if width <= height:
            size = (224, int(224 * height / width))
        else:
            size = (int(224 * width / height), 224)
        image = image.resize(size, Image.Resampling.BICUBIC)
        width, height = image.size
        top, left = (height - 224) // 2, (width - 224) // 2
        crop = np.asarray(image, dtype=np.float32)[top : top + 224, left : left + 224] / 255.0
        out.append(torch.from_numpy(((crop - MEAN) / STD).transpose(2, 0, 1).copy()))
    return torch.stack(out)


def unwrap(output: object) -> torch.Tensor:
    """transformers 5.x returns a ModelOutput from get_*_features; 4.x the tensor."""
    return output if torch.is_tensor(output) else output.pooler_output


def reference_text_inputs(tiny: Tiny, prompts: list[str], truncation: str) -> dict[str, torch.Tensor]:
    if truncation == "clip":
        return dict(tiny.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt"))
    batch = tiny.tokenizer(prompts, padding=True, return_tensors="pt")
    return {"input_ids": batch["input_ids"][:, :77], "attention_mask": batch["attention_mask"][:, :77]}


def reference_scores(tiny: Tiny, images: np.ndarray, prompts: list[str], truncation: str) -> torch.Tensor:
    """Per-sample 100·cos of the projected, L2-normalised embeddings."""
    with torch.no_grad():
        image_features = unwrap(tiny.model.get_image_features(pixel_values=reference_pixel_values(images)))
        text_features = unwrap(tiny.model.get_text_features(**reference_text_inputs(tiny, prompts, truncation)))
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return 100 * (image_features * text_features).sum(dim=-1)


def random_images(batch: int, height: int, width: int, seed: int, channels: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, height, width, channels, generator=generator)


# ------------------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("truncation", cs.TRUNCATION_MODES)
@pytest.mark.parametrize(("height", "width"), [(200, 300), (320, 256), (224, 224)])
def test_matches_independent_reference(scorer, tiny, truncation, height, width):
    images = random_images(len(PROMPTS), height, width, seed=height + width)
    result = cs.compute_clip_score(scorer, images, PROMPTS, truncation=truncation)
    expected = reference_scores(tiny, to_uint8(images), PROMPTS, truncation)
    assert result.n == len(PROMPTS)
    assert np.max(np.abs(np.array(result.scores) - expected.numpy())) <= TOLERANCE
    assert result.mean == pytest.approx(max(float(expected.double().mean()), 0.0), abs=TOLERANCE)
    assert result.notes == []


def test_known_token_ids(scorer):
    ids = cs.tokenize_prompts(scorer, ["a photo of a cat"])["input_ids"]
    assert ids.tolist() == [[49406, 320, 1125, 539, 320, 2368, 49407]]


def test_negative_mean_clamps_to_zero_but_samples_stay_negative(scorer, tiny):
    images = random_images(len(PROMPTS), 224, 224, seed=7)
    expected = reference_scores(tiny, to_uint8(images), PROMPTS, "torchmetrics")
    negative = [i for i, value in enumerate(expected.tolist()) if value < 0]
    assert len(negative) >= 2, "the seeded tiny model should give some negative pairs"
    result = cs.compute_clip_score(scorer, images[negative], [PROMPTS[i] for i in negative])
    assert all(value < 0 for value in result.scores)
    assert np.max(np.abs(np.array(result.scores) - expected[negative].numpy())) <= TOLERANCE
    assert result.mean == 0.0
    assert cs.clamped_mean([-3.0, 1.0]) == 0.0
    assert cs.clamped_mean([-1.0, 3.0]) == pytest.approx(1.0)


def test_float_and_uint8_inputs_agree(scorer):
    images = random_images(3, 160, 240, seed=3)
    pixels = torch.from_numpy(to_uint8(images))
    from_float = cs.clip_scores(scorer, images, PROMPTS[:3])
    from_uint8 = cs.clip_scores(scorer, pixels, PROMPTS[:3])
    from_quantised = cs.clip_scores(scorer, pixels.float() / 255.0, PROMPTS[:3])
    assert torch.equal(from_float, from_uint8)
    assert torch.equal(from_float, from_quantised)
    assert from_float.abs().min() > 0.01  # real, non-degenerate scores


def test_long_captions_in_both_truncation_modes(scorer, tiny, caplog):
    prompts = [LONG_PROMPT, PROMPTS[0], LONG_PROMPT + " at sunset"]
    images = random_images(3, 224, 224, seed=11)
    assert len(tiny.tokenizer(LONG_PROMPT)["input_ids"]) > 77
    sliced = cs.tokenize_prompts(scorer, prompts, "torchmetrics")["input_ids"]
    truncated = cs.tokenize_prompts(scorer, prompts, "clip")["input_ids"]
    assert sliced.shape == truncated.shape == (3, 77)
    assert sliced[0, -1] != 49407 and truncated[0, -1] == 49407
    assert torch.equal(sliced[0, :76], truncated[0, :76])

    with caplog.at_level(logging.WARNING, logger=cs.__name__):
        by_mode = {
            mode: cs.compute_clip_score(scorer, images, prompts, truncation=mode) for mode in cs.TRUNCATION_MODES
        }
    for mode, result in by_mode.items():
        expected = reference_scores(tiny, to_uint8(images), prompts, mode)
        assert np.max(np.abs(np.array(result.scores) - expected.numpy())) <= TOLERANCE
        assert [note.split(" has ")[0] for note in result.notes] == ["prompt 1", "prompt 3"]
    torchmetrics_scores, clip_scores = by_mode["torchmetrics"].scores, by_mode["clip"].scores
    assert abs(torchmetrics_scores[0] - clip_scores[0]) > 0.1  # EOS dropped vs kept: different pooled token
    assert torchmetrics_scores[1] == clip_scores[1]  # short caption: identical in both modes
    assert "EOS dropped" in caplog.text


def test_sliced_captions_pool_at_bos(scorer):
    """Without EOS, argmax(ids) under eos_token_id = 2 is BOS (49406, the largest id left): the text tower is causal,
    so every sliced caption gets the same embedding, whatever it says. Keeping EOS ("clip") tells them apart."""
    other = "a red car parked next to a fire hydrant on a rainy evening " + LONG_PROMPT
    images = random_images(1, 224, 224, seed=13).expand(2, -1, -1, -1)
    sliced = cs.clip_scores(scorer, images, [LONG_PROMPT, other], truncation="torchmetrics")
    kept = cs.clip_scores(scorer, images, [LONG_PROMPT, other], truncation="clip")
    assert sliced[0] == sliced[1]
    assert abs(float(kept[0] - kept[1])) > 0.1


def test_single_file_matches_folder(scorer, tiny):
    single = cs.load_clip_score_model(tiny.single_file, tokenizer_fallback=tiny.tokenizer_dir)
    config, inferred = tiny.model.config, single.model.config
    for part in ("text_config", "vision_config"):
        for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            assert getattr(getattr(inferred, part), field) == getattr(getattr(config, part), field)
    assert inferred.vision_config.patch_size == 32 and inferred.vision_config.image_size == 224
    assert inferred.projection_dim == 32 and inferred.text_config.vocab_size == 49408
    assert single.model_id == "tiny-clip-single" and scorer.model_id == "tiny-clip"
    prompts = [*PROMPTS[:3], LONG_PROMPT]
    images = random_images(4, 180, 250, seed=5)
    for mode in cs.TRUNCATION_MODES:
        assert torch.equal(
            cs.clip_scores(single, images, prompts, truncation=mode),
            cs.clip_scores(scorer, images, prompts, truncation=mode),
        )


def test_tokenizer_fallback_and_default_preprocessing(scorer, tiny):
    bare = cs.load_clip_score_model(tiny.bare_dir, tokenizer_fallback=tiny.tokenizer_dir)
    assert bare.tokenizer_path == tiny.tokenizer_dir and scorer.tokenizer_path == tiny.full_dir
    images = random_images(3, 300, 200, seed=9)
    assert torch.equal(cs.clip_scores(bare, images, PROMPTS[:3]), cs.clip_scores(scorer, images, PROMPTS[:3]))


def test_missing_and_invalid_files(tiny, tmp_path):
    with pytest.raises(cs.MissingModelFilesError, match=r"does not exist.*config\.json, model\.safetensors"):
        cs.load_clip_score_model(tmp_path / "nowhere")
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(tiny.full_dir / "config.json", config_only)
    with pytest.raises(FileNotFoundError, match=r"missing model\.safetensors or model\.safetensors\.index\.json"):
        cs.load_clip_score_model(config_only)
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    shutil.copy(tiny.full_dir / "model.safetensors", weights_only)
    with pytest.raises(cs.MissingModelFilesError, match=r"missing config\.json"):
        cs.load_clip_score_model(weights_only)
    with pytest.raises(cs.MissingModelFilesError, match=r"No tokenizer .*vocab\.json \+ merges\.txt"):
        cs.load_clip_score_model(tiny.bare_dir)
    with pytest.raises(cs.MissingModelFilesError, match=r"No tokenizer"):
        cs.load_clip_score_model(tiny.single_file, tokenizer_fallback=tmp_path)

    text_only = tmp_path / "clip_l.safetensors"
    state = {k: v for k, v in tiny.model.state_dict().items() if k.startswith("text_model.")}
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(text_only))
    with pytest.raises(cs.InvalidModelError, match=r"missing .*text_projection\.weight.*text encoder only"):
        cs.load_clip_score_model(text_only, tokenizer_fallback=tiny.tokenizer_dir)

    wrong_type = tmp_path / "text_model"
    shutil.copytree(tiny.full_dir, wrong_type)
    config = json.loads((wrong_type / "config.json").read_text())
    (wrong_type / "config.json").write_text(json.dumps({**config, "model_type": "clip_text_model"}))
    with pytest.raises(ValueError, match=r"model_type is 'clip_text_model', expected 'clip'"):
        cs.load_clip_score_model(wrong_type)

    no_projection = tmp_path / "no_projection"
    no_projection.mkdir()
    shutil.copy(tiny.full_dir / "config.json", no_projection)
    state = {k: v.contiguous() for k, v in tiny.model.state_dict().items() if k != "text_projection.weight"}
    save_file(state, str(no_projection / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(cs.InvalidModelError, match=r"missing: \['text_projection.weight'\]"):
        cs.load_clip_score_model(no_projection, tokenizer_fallback=tiny.tokenizer_dir)

    pickle_file = tmp_path / "model.bin"
    pickle_file.write_bytes(b"\0")
    with pytest.raises(cs.InvalidModelError, match=r"only \.safetensors files or model folders"):
        cs.load_clip_score_model(pickle_file)


def test_split_prompts():
    assert cs.split_prompts("  a cat \n", 3) == ["a cat"] * 3
    assert cs.split_prompts("a cat\na dog\n\n", 2) == ["a cat", "a dog"]
    with pytest.raises(cs.InvalidInputError, match=r"prompt has 2 lines but the image batch has 3 images.*one prompt"):
        cs.split_prompts("a cat\na dog", 3)
    for empty in ("", " \n\t "):
        with pytest.raises(cs.InvalidInputError, match="prompt is empty"):
            cs.split_prompts(empty, 1)
    with pytest.raises(cs.InvalidInputError, match="prompt line 2 is blank"):
        cs.split_prompts("a cat\n\na dog", 2)


def test_alpha_and_greyscale_channels(scorer, tiny):
    rgb = random_images(2, 200, 260, seed=21)
    alpha = random_images(2, 200, 260, seed=22, channels=1)
    assert torch.equal(
        cs.clip_scores(scorer, torch.cat([rgb, alpha], dim=-1), PROMPTS[:2]), cs.clip_scores(scorer, rgb, PROMPTS[:2])
    )
    grey = random_images(2, 200, 260, seed=23, channels=1)
    from_grey = cs.clip_scores(scorer, grey, PROMPTS[:2])
    assert torch.equal(from_grey, cs.clip_scores(scorer, torch.cat([grey, alpha], dim=-1), PROMPTS[:2]))
    grey_as_rgb = np.repeat(to_uint8(grey), 3, axis=-1)
    expected = reference_scores(tiny, grey_as_rgb, PROMPTS[:2], "torchmetrics")
    assert torch.max(torch.abs(from_grey - expected)) <= TOLERANCE


def test_out_of_range_values_are_clamped_with_a_warning(scorer, caplog):
    images = random_images(2, 224, 224, seed=31) * 1.6 - 0.3
    with caplog.at_level(logging.WARNING, logger=cs.__name__):
        result = cs.compute_clip_score(scorer, images, PROMPTS[:2])
    assert "clamped to [0, 1]" in caplog.text
    assert len(result.notes) == 1 and "clamped" in result.notes[0]
    assert result.scores == cs.clip_scores(scorer, images.clamp(0, 1), PROMPTS[:2]).tolist()


def test_uint8_conversion_across_chunks(caplog):
    images = random_images(2 * cs.DEFAULT_CHUNK_SIZE + 5, 6, 5, seed=71, channels=4)
    images[0, 0, 0, 1] = -0.5  # minimum in the first chunk, maximum in the last
    images[-1, 0, 0, 0] = 1.25
    images[1, 0, 0, 3] = 7.0  # alpha is dropped before the range check
    with caplog.at_level(logging.WARNING, logger=cs.__name__):
        pixels, notes = cs.images_to_uint8(images)
    assert pixels.dtype == torch.uint8 and pixels.shape == (images.shape[0], 6, 5, 3)
    assert np.array_equal(pixels.numpy(), to_uint8(images[..., :3]))
    assert notes == ["image values span [-0.5, 1.25]; clamped to [0, 1] before the uint8 conversion"]
    assert "clamped" in caplog.text


def test_batch_of_one_and_chunking(scorer, tiny):
    images = random_images(len(PROMPTS), 190, 230, seed=41)
    expected = reference_scores(tiny, to_uint8(images), PROMPTS, "torchmetrics")
    one = cs.compute_clip_score(scorer, images[:1], PROMPTS[:1])
    assert one.n == 1 and abs(one.scores[0] - float(expected[0])) <= TOLERANCE
    whole = cs.clip_scores(scorer, images, PROMPTS, chunk_size=len(PROMPTS))
    for chunk_size in (1, 3):
        chunked = cs.clip_scores(scorer, images, PROMPTS, chunk_size=chunk_size)
        assert torch.max(torch.abs(chunked - whole)) <= TOLERANCE  # float32 batching noise only (~1e-5 on 4.37)
    assert torch.max(torch.abs(whole - expected)) <= TOLERANCE


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.rand(8, 8, 3), r"shape \(batch, height, width, channels\)"),
        (torch.rand(0, 8, 8, 3), r"non-empty"),
        (torch.rand(1, 8, 8, 5), r"5 channels"),
        (torch.full((1, 8, 8, 3), float("nan")), r"NaN"),
        (torch.zeros(1, 8, 8, 3, dtype=torch.int32), r"dtype torch.int32"),
    ],
)
def test_invalid_images(scorer, images, message):
    with pytest.raises(cs.InvalidInputError, match=message):
        cs.compute_clip_score(scorer, images, ["a cat"] * max(images.shape[0], 1))


def test_invalid_arguments(scorer):
    images = random_images(2, 64, 64, seed=1)
    with pytest.raises(cs.InvalidInputError, match="got 1 prompts for 2 images"):
        cs.clip_scores(scorer, images, ["a cat"])
    with pytest.raises(cs.InvalidInputError, match="truncation must be one of"):
        cs.compute_clip_score(scorer, images, ["a", "b"], truncation="none")
    with pytest.raises(cs.InvalidInputError, match="chunk_size must be a positive integer"):
        cs.clip_scores(scorer, images, ["a", "b"], chunk_size=0)


def test_dtype_is_applied(tiny):
    half = cs.load_clip_score_model(tiny.full_dir, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.device.type == "cpu"
    images = random_images(2, 224, 224, seed=51)
    expected = reference_scores(tiny, to_uint8(images), PROMPTS[:2], "torchmetrics")
    error = float(torch.max(torch.abs(cs.clip_scores(half, images, PROMPTS[:2]) - expected)))
    assert error <= 0.02 * float(expected.abs().max())  # bf16: about three digits


def test_import_needs_no_transformers():
    code = "import sys; sys.modules['transformers'] = None; import reg_core, reg_core.metrics.clip_score"
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr


def test_matches_torchmetrics(scorer, tiny):
    functional = pytest.importorskip(
        "torchmetrics.functional.multimodal.clip_score", reason="torchmetrics is optional and not installed"
    )

    class Unwrapped(torch.nn.Module):
        """torchmetrics 1.9 calls .norm on get_*_features, which returns a ModelOutput on transformers 5.x."""

        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, *args, **kwargs):
            return unwrap(self.model.get_image_features(*args, **kwargs))

        def get_text_features(self, *args, **kwargs):
            return unwrap(self.model.get_text_features(*args, **kwargs))

    processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor = transformers.CLIPProcessor(image_processor=processor_class(), tokenizer=tiny.tokenizer)
    images = random_images(4, 200, 280, seed=61)
    prompts = [*PROMPTS[:3], LONG_PROMPT]
    chw = [torch.from_numpy(array).permute(2, 0, 1) for array in to_uint8(images)]
    with torch.no_grad():
        per_sample, _ = functional._clip_score_update(chw, prompts, Unwrapped(tiny.model), processor)
        mean = functional.clip_score(chw, prompts, model_name_or_path=lambda: (Unwrapped(tiny.model), processor))
    result = cs.compute_clip_score(scorer, images, prompts)
    assert np.max(np.abs(np.array(result.scores) - per_sample.numpy())) <= TOLERANCE
    assert result.mean == pytest.approx(float(mean), abs=TOLERANCE)
