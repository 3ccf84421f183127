"""Conventions every node of the pack follows, read from the live V3 schemas."""

from __future__ import annotations

import torch
from prompts import ksampler, sd15_inputs
from test_reg_nodes import REG


def test_every_node_is_prefixed_categorised_and_every_input_has_a_tooltip(reg_pack):
    import nodes

    assert set(reg_pack.node_ids) == {
        "REGGuidance",
        "REGGuider",
        "REGGuidanceSchedule",
        "REGDiagnostics",
        "REGCLIPScoreLoader",
        "REGCLIPScore",
        "REGGuidanceSweep",
    }
    for node_id in reg_pack.node_ids:
        schema = nodes.NODE_CLASS_MAPPINGS[node_id].GET_SCHEMA()
        assert node_id.startswith("REG"), node_id
        assert schema.category.startswith("sampling/guidance/REG"), (node_id, schema.category)
        assert schema.display_name and schema.description, node_id
        for item in schema.inputs:
            assert item.tooltip, f"{node_id}.{item.id} has no tooltip"


def test_reg_never_takes_a_single_slot_hook(harness, tiny):
    """REG uses keyed wrappers only, so the cfg and calc-cond-batch slots stay free for other patches."""
    g = harness.graph()
    inp = sd15_inputs(g, tiny)
    patched = g.node("REGGuidance", model=inp.model, **REG)
    sched = g.node(
        "REGGuidanceSchedule",
        model=patched.out(0),
        schedule="cosine",
        end_cfg=1.0,
        sigma_low=0.28,
        sigma_high=2.9,
        exponent=1.0,
        progress="steps",
    )
    sampler = ksampler(g, inp, model=sched.out(0), steps=1)
    result = harness.run(g, outputs=[sampler, sched])
    patcher = result.value(sched, 0)
    options = patcher.model_options
    for slot in ("sampler_cfg_function", "sampler_calc_cond_batch_function", "model_function_wrapper"):
        assert slot not in options, slot
    assert not options.get("sampler_pre_cfg_function") and not options.get("sampler_post_cfg_function")
    keys = {key for by_key in patcher.wrappers.values() for key in by_key}  # positive control: both nodes patched it
    assert {"reg_guidance", "reg_schedule"} <= keys
    assert torch.isfinite(result.latent(sampler)).all()


def test_nodes_show_what_matters_where_comfyui_can_hide_the_rest(reg_pack):
    """Where ComfyUI's V3 inputs take ``advanced`` (0.33), REG Guider and the sweep show their main inputs and keep
    the parameters of one base, one schedule or one window under "advanced"; 0.3.64 shows them all (and loads)."""
    import inspect

    from comfy_api.latest import io

    import nodes

    if "advanced" not in inspect.signature(io.Input.__init__).parameters:
        schema = nodes.NODE_CLASS_MAPPINGS["REGGuider"].GET_SCHEMA()
        assert not any(getattr(i, "advanced", None) for i in schema.inputs)
        return
    shown = {
        node_id: [i.id for i in nodes.NODE_CLASS_MAPPINGS[node_id].GET_SCHEMA().inputs if not i.advanced]
        for node_id in ("REGGuidance", "REGGuider", "REGGuidanceSchedule")
    }
    assert shown["REGGuidance"] == ["model", "strength", "estimator"]
    assert shown["REGGuider"] == ["model", "positive", "negative", "cfg", "base", "strength", "estimator", "schedule"]
    assert len(shown["REGGuidanceSchedule"]) == 7  # the schedule node is about its parameters: all shown
