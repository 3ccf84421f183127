"""REGGuidanceSweep inside real ComfyUI: tiny SD1.5 + tiny random CLIP, 2 cfg values × 2 methods, 32×32, batch 2.

The reference runs are ordinary nodes in the same prompt: KSampler (plain, and after REGGuidance) → VAEDecode →
REGCLIPScore. The sweep must reproduce their scores exactly and draw exactly their images into its grid.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import tiny_clip
import torch
from comfy_harness import PromptExecutionError, PromptValidationError
from prompts import POSITIVE, decode, ksampler, sd15_inputs

SEED, STEPS, CFGS = 5, 2, (3.0, 6.0)
REG = {"strength": 1.0, "estimator": "vjp", "start_percent": 0.0, "end_percent": 1.0, "refresh_every": 1}
APG = {"eta": 0.5, "norm_threshold": 2.0, "momentum": 0.3}
METRIC = "CLIP score (torchmetrics, ×100)"
# A caption the tiny random CLIP scores positively (about +4) on these images, so the clamped means are real numbers.
SCORE_PROMPT = "a forest at night"


@pytest.fixture(scope="module")
def clip_models(harness, tmp_path_factory) -> tiny_clip.TinyCLIP:
    return tiny_clip.build(tmp_path_factory.getbasetemp() / "clip_score_models")


def sweep_inputs(**overrides):
    inputs = {
        "score_prompt": SCORE_PROMPT,
        "seed": SEED,
        "steps": STEPS,
        "sampler_name": "euler",
        "scheduler": "normal",
        "cfg_values": "6, 3",
        "include_cfg": True,
        "include_reg": True,
        "include_apg_reg": False,
        "include_pag_reg": False,
        **REG,
        **APG,
        "pag_scale": 2.0,
        "truncation": "torchmetrics",
    }
    inputs.update(overrides)
    return inputs


def add_sweep(g, inp, loader, **overrides):
    return g.node(
        "REGGuidanceSweep",
        model=inp.model,
        positive=inp.positive,
        negative=inp.negative,
        latent_image=inp.latent,
        vae=inp.vae,
        clip_score_model=loader.out(0),
        **sweep_inputs(**overrides),
    )


def add_reference(g, inp, loader, cfg, patches=()):
    """KSampler (after ``patches``) → VAEDecode → REGCLIPScore; returns (decode node, score node)."""
    model = inp.model
    for class_type, inputs in patches:
        model = g.node(class_type, model=model, **inputs).out(0)
    sampler = ksampler(g, inp, model=model, seed=SEED, steps=STEPS, cfg=cfg)
    image = decode(g, inp, sampler.out(0))
    score = g.node(
        "REGCLIPScore",
        image=image.out(0),
        text=SCORE_PROMPT,
        clip_score_model=loader.out(0),
        truncation="torchmetrics",
    )
    return image, score


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def expected_grid(rows, images, scores, labels):
    """The grid drawn by reg_core.sweep from the reference images and scores (what the node must output)."""
    from reg_core.plots import sweep as sweep_plots

    grid, _ = sweep_plots.compose_grid(
        [[to_uint8(images[r, c]) for c in range(len(CFGS))] for r in range(len(rows))],
        row_labels=labels,
        col_labels=[f"cfg {c:g}" for c in CFGS],
        captions=[[f"{scores[r, c]:.2f}" for c in range(len(CFGS))] for r in range(len(rows))],
        title=f"{METRIC} · seed {SEED} · {STEPS} steps euler/normal",
    )
    return grid


@pytest.fixture(scope="module")
def cfg_reg(harness, tiny, clip_models):
    """One prompt: the sweep (cfg + reg at cfg 3 and 6) and the four reference workflows."""
    g = harness.graph()
    inp = sd15_inputs(g, tiny, batch_size=2)
    loader = g.node("REGCLIPScoreLoader", model_name=tiny_clip.FULL, dtype="fp32")
    node = add_sweep(g, inp, loader)
    refs = {}
    for cfg in CFGS:
        refs["cfg", cfg] = add_reference(g, inp, loader, cfg)
        refs["reg", cfg] = add_reference(g, inp, loader, cfg, [("REGGuidance", REG)])
    result = harness.run(g)
    return result, node, refs


def test_outputs_have_the_right_shapes(cfg_reg):
    from reg_core import plots

    result, node, _ = cfg_reg
    plot, grid = result.image(node, 0), result.image(node, 1)
    assert plot.shape == (1, 440, 720, 3) and 0 <= float(plot.min()) and float(plot.max()) <= 1
    pixels = to_uint8(plot[0])
    for colour in plots.PALETTE[:2]:  # one curve per method
        assert int(np.all(pixels == np.array(colour), axis=-1).sum()) > 50
    assert int(np.all(pixels == np.array(plots.PALETTE[2]), axis=-1).sum()) == 0
    assert grid.ndim == 4 and grid.shape[0] == 1 and grid.shape[-1] == 3
    # 2 rows × 2 columns of 2 side-by-side 32×32 images plus labels.
    assert grid.shape[1] >= 2 * 32 + 40 and grid.shape[2] >= 2 * 2 * 32 + 60
    report = json.loads(result.value(node, 2))
    assert [(r["method"], r["cfg"]) for r in report["runs"]] == [("cfg", 3.0), ("cfg", 6.0), ("reg", 3.0), ("reg", 6.0)]
    assert all(len(r["scores"]) == 2 for r in report["runs"])
    assert report["metric"] == METRIC and report["n"] == 2 and report["model"] == tiny_clip.FULL
    assert report["settings"]["cfg_values"] == [3.0, 6.0] and report["settings"]["methods"] == ["cfg", "reg"]
    assert report["settings"]["latent_shape"] == [2, 4, 4, 4]
    assert report["runs"][2]["reg"] == REG and "reg" not in report["runs"][0]
    assert report["runs"][2]["equivalent"].startswith("REGGuidance(strength=1.0")
    assert report["runs"][0]["equivalent"] == "KSampler(cfg=3)"
    ui = result.ui[node.id]
    assert "images" not in ui  # the plot and grid are shown once, by the preview nodes they are connected to
    assert ui["text"][0].splitlines()[0] == METRIC


def test_scores_equal_reg_clip_score_on_ksampler_images(cfg_reg):
    result, node, refs = cfg_reg
    report = json.loads(result.value(node, 2))
    for run in report["runs"]:
        _, score = refs[run["method"], run["cfg"]]
        assert run["score"] == result.value(score, 0)  # exact: same images, same scorer
        assert run["scores"] == json.loads(result.value(score, 1))["scores"]
    assert all(run["score"] > 1.0 for run in report["runs"])  # real means, not the clamp at 0
    by_run = {(r["method"], r["cfg"]): r["scores"] for r in report["runs"]}
    assert by_run["cfg", 3.0] != by_run["reg", 3.0]  # REG changed the images
    assert by_run["cfg", 3.0] != by_run["cfg", 6.0]  # and so did the cfg


def test_grid_holds_exactly_the_ksampler_images(cfg_reg):
    result, node, refs = cfg_reg
    images = np.empty((2, 2), dtype=object)
    scores = np.empty((2, 2))
    for r, method in enumerate(("cfg", "reg")):
        for c, cfg in enumerate(CFGS):
            image, score = refs[method, cfg]
            images[r, c] = result.image(image)
            scores[r, c] = result.value(score, 0)
    assert not torch.equal(images[0, 0], images[1, 0])
    want = expected_grid(("cfg", "reg"), images, scores, ["CFG", "CFG + REG"])
    got = to_uint8(result.image(node, 1)[0])
    assert got.shape == want.shape
    assert np.array_equal(got, want)


def test_apg_and_pag_methods_match_core_nodes_with_reg(harness, tiny, clip_models):
    """apg_reg/pag_reg equal ComfyUI's APG / PerturbedAttentionGuidance nodes followed by REGGuidance and KSampler.

    At sweep cfg 3 every curve has guidance weight w = 2: KSampler's cfg 3 for PAG, APG's cond-anchored scale 2.
    """
    g = harness.graph()
    inp = sd15_inputs(g, tiny, batch_size=2)
    loader = g.node("REGCLIPScoreLoader", model_name=tiny_clip.FULL, dtype="fp32")
    node = add_sweep(
        g, inp, loader, cfg_values="3", include_cfg=False, include_reg=False, include_apg_reg=True, include_pag_reg=True
    )
    refs = {
        "apg_reg": add_reference(g, inp, loader, 2.0, [("APG", APG), ("REGGuidance", REG)]),
        "pag_reg": add_reference(
            g, inp, loader, 3.0, [("PerturbedAttentionGuidance", {"scale": 2.0}), ("REGGuidance", REG)]
        ),
    }
    result = harness.run(g)
    from reg_core import sweep
    from reg_core.plots import sweep as sweep_plots

    report = json.loads(result.value(node, 2))
    assert [r["method"] for r in report["runs"]] == ["apg_reg", "pag_reg"]
    assert report["runs"][0]["apg"] == APG and report["runs"][1]["pag_scale"] == 2.0
    assert [(r["cfg"], r["guidance_weight"], r["sampler_cfg"]) for r in report["runs"]] == [(3, 2, 2), (3, 2, 3)]
    assert report["runs"][0]["equivalent"].endswith("KSampler(cfg=2)")
    assert report["x_axis"] == sweep.X_AXIS and "w = cfg - 1" in sweep.X_AXIS
    for run in report["runs"]:
        _, score = refs[run["method"]]
        want = json.loads(result.value(score, 1))["scores"]
        assert max(abs(a - b) for a, b in zip(run["scores"], want, strict=True)) <= 1e-3
    want_grid, _ = sweep_plots.compose_grid(
        [[to_uint8(result.image(refs[run["method"]][0]))] for run in report["runs"]],
        row_labels=["APG + REG", "PAG + REG"],
        col_labels=["cfg 3"],
        captions=[[f"{run['score']:.2f}"] for run in report["runs"]],
        title=f"{METRIC} · seed {SEED} · {STEPS} steps euler/normal",
    )
    got = to_uint8(result.image(node, 1)[0]).astype(int)
    assert got.shape == want_grid.shape
    assert np.abs(got - want_grid.astype(int)).max() <= 1  # ComfyUI's APG vs reg_core's: float rounding only


def run_sweep(harness, tiny, **overrides):
    g = harness.graph()
    inp = sd15_inputs(g, tiny, batch_size=2)
    loader = g.node("REGCLIPScoreLoader", model_name=tiny_clip.FULL, dtype="fp32")
    node = add_sweep(g, inp, loader, **overrides)
    return harness.run(g), node


@pytest.mark.parametrize(
    ("cfg_values", "message"),
    [
        (
            "2, four",
            r"cfg_values: 'four' is not a number\. Enter cfg scales separated by commas, e\.g\. \"2, 4, 6, 8\"",
        ),
        ("", r"cfg_values is empty"),
        ("3, 250", r"250 is outside KSampler's cfg range \[0, 100\]"),
    ],
)
def test_bad_cfg_values_are_rejected_before_running(harness, tiny, clip_models, cfg_values, message):
    with pytest.raises(PromptValidationError, match=message) as info:
        run_sweep(harness, tiny, cfg_values=cfg_values)
    assert [e["class_type"] for e in info.value.node_errors.values()] == ["REGGuidanceSweep"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"include_cfg": False, "include_reg": False},
            r"no method selected: switch on at least one of the method toggles",
        ),
        (
            {"cfg_values": ", ".join(str(v) for v in range(33))},
            r"2 methods × 33 cfg values = 66 sampling runs, over the limit of 64",
        ),
        ({"score_prompt": "one\ntwo\nthree"}, r"score_prompt has 3 lines but the image batch has 2 images"),
        ({"score_prompt": ""}, r"score_prompt is empty"),
    ],
    ids=["no-method", "too-many-runs", "prompt-count", "empty-prompt"],
)
def test_bad_settings_fail_with_a_clear_message(harness, tiny, clip_models, overrides, message):
    with pytest.raises(PromptExecutionError, match=message) as info:
        run_sweep(harness, tiny, **overrides)
    assert info.value.error["node_type"] == "REGGuidanceSweep"


# --- direct calls (the executor's code path without the server): progress and interrupts ---


@functools.cache
def _loaded(tiny):
    """Model, conditionings and VAE of the tiny SD1.5 checkpoint, loaded once for the direct calls."""
    import nodes

    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(tiny.sd15_checkpoint)[:3]

    def encode(text):
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))

    return model, encode(POSITIVE), encode("blurry"), vae


def _direct_inputs(tiny, clip_models):
    import nodes

    model, positive, negative, vae = _loaded(tiny)
    scorer = nodes.NODE_CLASS_MAPPINGS["REGCLIPScoreLoader"].execute(tiny_clip.FULL, "fp32").result[0]
    return {
        "model": model,
        "positive": positive,
        "negative": negative,
        "latent_image": {"samples": torch.zeros(1, 4, 4, 4)},
        "vae": vae,
        "clip_score_model": scorer,
        **sweep_inputs(cfg_values="2, 4", include_reg=False),
    }


def test_progress_covers_every_step_of_every_run(tiny, clip_models, reg_pack):
    import comfy.utils

    import nodes

    updates = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append((value, total)))
    try:
        with torch.inference_mode():
            out = nodes.NODE_CLASS_MAPPINGS["REGGuidanceSweep"].execute(**_direct_inputs(tiny, clip_models))
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    assert {total for _, total in updates} == {2 * STEPS}
    values = [value for value, _ in updates]
    assert values == sorted(values) and values[-1] == 2 * STEPS
    # ComfyUI 0.33's progress bar drops intermediate updates that come faster than its send interval; the first and
    # the final one are always sent, so the bar starts at step 1 of run 1 and ends at the last step of the last run
    assert values[0] == 1
    assert len(json.loads(out.result[2])["runs"]) == 2


def _with_outer_sample(inputs, wrapper):
    """``inputs`` with the model cloned and ``wrapper`` added around every sampling run."""
    from comfy.patcher_extension import WrappersMP

    model = inputs["model"].clone()
    model.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, "test_sweep", wrapper)
    return {**inputs, "model": model}


def test_interrupt_between_runs_stops_the_sweep(tiny, clip_models, reg_pack):
    import comfy.model_management

    import nodes

    started = []

    def interrupt_after_first_run(executor, *args, **kwargs):
        started.append(True)
        out = executor(*args, **kwargs)
        comfy.model_management.interrupt_current_processing(True)  # like the UI's cancel button, mid-sweep
        return out

    inputs = _with_outer_sample(_direct_inputs(tiny, clip_models), interrupt_after_first_run)
    try:
        with torch.inference_mode(), pytest.raises(comfy.model_management.InterruptProcessingException):
            nodes.NODE_CLASS_MAPPINGS["REGGuidanceSweep"].execute(**inputs)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert len(started) == 1  # the second run never started


def test_pag_on_a_dit_never_starts_sampling(tiny, clip_models, reg_pack):
    """PAG + REG perturbs a UNet's middle block: on an MMDiT the sweep names the input before its first run."""
    import nodes

    started = []

    def count(executor, *args, **kwargs):
        started.append(True)
        return executor(*args, **kwargs)

    dit = nodes.UNETLoader().load_unet(tiny.sd3_unet, "default")[0]
    inputs = _with_outer_sample({**_direct_inputs(tiny, clip_models), "model": dit, "include_pag_reg": True}, count)
    with torch.inference_mode(), pytest.raises(ValueError, match=r"include_pag_reg: PAG .* \(SD3\) does not have"):
        nodes.NODE_CLASS_MAPPINGS["REGGuidanceSweep"].execute(**inputs)
    assert started == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"include_cfg": False}, "no method selected"),
        ({"score_prompt": "one\ntwo"}, "prompt has 2 lines but the image batch has 1 images"),
        ({"cfg_values": ", ".join(str(v) for v in range(65))}, "at most 64 runs"),
        ({"cfg_values": "2, x"}, "'x' is not a number"),
        ({"start_percent": 0.9, "end_percent": 0.1}, "start_percent"),
        (
            {"latent_image": {"samples": torch.nested.nested_tensor([torch.zeros(4, 4, 4), torch.zeros(4, 8, 8)])}},
            r"REGGuidanceSweep: latent_image: nested latents \(several latents in one, e.g. LTX-2 audio \+ video\)",
        ),
    ],
    ids=["no-method", "prompt-count", "too-many-values", "cfg-values", "reg-window", "nested-latent"],
)
def test_bad_settings_never_start_sampling(tiny, clip_models, reg_pack, overrides, message):
    import nodes

    started = []

    def count(executor, *args, **kwargs):
        started.append(True)
        return executor(*args, **kwargs)

    inputs = _with_outer_sample({**_direct_inputs(tiny, clip_models), **overrides}, count)
    with torch.inference_mode(), pytest.raises(ValueError, match=message):
        nodes.NODE_CLASS_MAPPINGS["REGGuidanceSweep"].execute(**inputs)
    assert started == []


def test_reg_already_on_the_model_is_replaced_by_the_sweeps_own(tiny, reg_pack):
    from comfy.patcher_extension import WrappersMP

    import nodes

    runtime, sweep_node = reg_pack.submodule("nodes.reg_runtime"), reg_pack.submodule("nodes.sweep")
    model = _loaded(tiny)[0]
    patched = nodes.NODE_CLASS_MAPPINGS["REGGuidance"].execute(model, **REG).result[0]
    kinds = runtime.WRAPPER_KINDS
    assert all(patched.get_wrappers(kind, runtime.WRAPPER_KEY) for kind in kinds)
    base = sweep_node._strip_reg(patched)
    assert not any(base.get_wrappers(kind, runtime.WRAPPER_KEY) for kind in kinds)  # "cfg" really is plain CFG
    assert all(patched.get_wrappers(kind, runtime.WRAPPER_KEY) for kind in kinds)  # the input model is untouched
    settings = runtime.REGSettings(strength=0.5)
    apg, pag = {"eta": 1.0, "norm_threshold": 0.0, "momentum": 0.0}, 2.0
    plan = sweep_node.SweepPlan([], settings, apg, pag)
    reg_model = plan.model(base, "reg")
    (patch,) = [w.__self__ for w in reg_model.get_wrappers(WrappersMP.OUTER_SAMPLE, runtime.WRAPPER_KEY)]
    assert patch.settings is settings
    assert not plan.model(base, "cfg").get_wrappers(WrappersMP.OUTER_SAMPLE, runtime.WRAPPER_KEY)
    apg_model = plan.model(base, "apg_reg")
    assert (
        len(apg_model.model_options["sampler_pre_cfg_function"])
        == len(base.model_options.get("sampler_pre_cfg_function", [])) + 1
    )
    assert apg_model.model_options["disable_cfg1_optimization"] is True  # APG at scale 1 keeps its negative pass
    assert "disable_cfg1_optimization" not in base.model_options
    pag_model = plan.model(base, "pag_reg")
    assert (
        len(pag_model.model_options["sampler_post_cfg_function"])
        == len(base.model_options.get("sampler_post_cfg_function", [])) + 1
    )


def test_schema_category_outputs_and_a_tooltip_on_every_input(reg_pack):
    import comfy.samplers

    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS["REGGuidanceSweep"]
    schema = cls.GET_SCHEMA()
    assert schema.category == "sampling/guidance/REG/eval" and schema.is_output_node
    assert [i.id for i in schema.inputs if not i.tooltip] == []
    inputs = {i.id: i for i in schema.inputs}
    assert inputs["sampler_name"].options == comfy.samplers.KSampler.SAMPLERS
    assert inputs["scheduler"].options == comfy.samplers.KSampler.SCHEDULERS
    assert [o.display_name for o in schema.outputs] == ["plot", "grid", "json"]
    assert list(cls.RETURN_TYPES) == ["IMAGE", "IMAGE", "STRING"]


class _VideoShapedVAE:
    """The tiny image VAE decoding as a video VAE does, (latents, frames, height, width, channels): each latent's
    image repeated as ``frames`` frames."""

    def __init__(self, vae, frames: int) -> None:
        self.vae, self.frames = vae, frames

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(samples).unsqueeze(1).repeat(1, self.frames, 1, 1, 1)


def test_a_videos_frames_are_scored_against_its_own_line(tiny, clip_models, reg_pack):
    import nodes

    inputs = _direct_inputs(tiny, clip_models)
    inputs |= {
        "latent_image": {"samples": torch.zeros(2, 4, 4, 4)},
        "vae": _VideoShapedVAE(inputs["vae"], 3),
        "score_prompt": "a red cube\na blue ball",
    }
    with torch.inference_mode():
        report = json.loads(nodes.NODE_CLASS_MAPPINGS["REGGuidanceSweep"].execute(**inputs).result[2])
    assert report["score_prompt"] == ["a red cube"] * 3 + ["a blue ball"] * 3
    for run in report["runs"]:  # the same frame with the same line scores the same; the two videos differ
        scores = run["scores"]
        assert len(set(scores[:3])) == 1 and len(set(scores[3:])) == 1 and scores[0] != scores[3], scores


def test_a_vae_for_other_latents_is_named(tiny, clip_models, reg_pack):
    import nodes

    inputs = {**_direct_inputs(tiny, clip_models), "vae": nodes.VAELoader().load_vae(tiny.sd3_vae)[0]}
    with torch.inference_mode(), pytest.raises(ValueError, match=r"^REGGuidanceSweep: vae cannot decode this model's"):
        nodes.NODE_CLASS_MAPPINGS["REGGuidanceSweep"].execute(**inputs)


def test_a_real_error_in_reg_names_the_sweep(tiny, clip_models, reg_pack):
    from test_runtime_defects import _shape_bug

    import nodes

    inputs = {**_direct_inputs(tiny, clip_models), "include_cfg": False, "include_reg": True}
    with _shape_bug(inputs["model"]), torch.inference_mode():
        with pytest.raises(RuntimeError, match=r"^REGGuidanceSweep \(vjp\).*mat1 and mat2"):
            nodes.NODE_CLASS_MAPPINGS["REGGuidanceSweep"].execute(**inputs)
