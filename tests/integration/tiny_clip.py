"""A tiny random-weight transformers CLIPModel in every layout the CLIP score loader accepts, for the node tests.

Built at test time (about 4 s, 13.5 MB; no download) into a temporary folder that is registered with ComfyUI's
``folder_paths`` under ``clip_score``, the folder REGCLIPScoreLoader lists:

* ``tiny-clip/``: config.json + model.safetensors + the openai preprocessor_config.json + tokenizer files (the OpenAI
  BPE from ComfyUI's ``comfy/sd1_tokenizer``), i.e. the layout of a downloaded openai/clip-vit-base-patch16;
* ``tiny-clip-single.safetensors``: the same weights as one file (config inferred from the shapes);
* ``bare-clip/``: config + weights only (the loader falls back to ComfyUI's tokenizer and default preprocessing);
* ``broken-clip/``: config.json without weights (the documented "missing model.safetensors" error).

The model is 64 wide with one 64-dim head per layer (the head size single-file mode assumes) and the real 49408-token
vocabulary, so the real BPE works.
"""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

FOLDER = "clip_score"
FULL, SINGLE, BARE, BROKEN = "tiny-clip", "tiny-clip-single.safetensors", "bare-clip", "broken-clip"
SEED = 0
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
OPENAI_PREPROCESSOR_CONFIG = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": MEAN,
    "image_std": STD,
    "resample": 3,
    "size": 224,
}


@dataclass(frozen=True)
class TinyCLIP:
    """Where the tiny CLIP files are, and the loader choices that point at them."""

    root: Path
    tokenizer_dir: Path  # ComfyUI's comfy/sd1_tokenizer, the loader's fallback

    def path(self, entry: str) -> Path:
        return self.root / entry


def _config():
    import transformers

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


@functools.cache
def build(root: Path) -> TinyCLIP:
    """Write every layout under ``root`` (once per process) and register ``root`` as a ``clip_score`` folder."""
    import comfy.model_management
    import folder_paths
    import torch
    import transformers

    tokenizer_dir = Path(comfy.model_management.__file__).resolve().parent / "sd1_tokenizer"
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    model = transformers.CLIPModel(_config()).eval()
    full = root / FULL
    model.save_pretrained(str(full), safe_serialization=True)
    shutil.copytree(full, root / BARE)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / name, full / name)
    (full / "preprocessor_config.json").write_text(json.dumps(OPENAI_PREPROCESSOR_CONFIG))
    shutil.copy(full / "model.safetensors", root / SINGLE)
    (root / BROKEN).mkdir()
    shutil.copy(full / "config.json", root / BROKEN / "config.json")
    folder_paths.add_model_folder_path(FOLDER, str(root))
    return TinyCLIP(root, tokenizer_dir)
