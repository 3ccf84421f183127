"""The example workflows in ``workflows/``: each UI template is exactly the graph of its API twin, every twin validates
and runs in real ComfyUI (with the tiny models standing in for the real files), and the template browser lists the UI
files only, each with its thumbnail.

The UI files are the source of truth; the API twins in ``workflows/api/`` are derived from them (the frontend's
Workflow → Export (API), or ``ui_to_api`` below). The conversion below is written from the frontend's
``graphToPrompt`` (ComfyUI_frontend 1.27, bundled with ComfyUI 0.3.64): widget values are assigned to the node
definition's widget inputs in the frontend's order (``input_order`` required, then optional), the extra value of a
``control_after_generate`` widget is skipped, linked inputs become ``[node id, slot]`` and frontend-only nodes (notes)
are dropped. tests/browser/ checks the same against the real page's ``app.graphToPrompt()``.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from comfy_harness import PACK_NAME, without_path

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"
API_DIR = WORKFLOWS / "api"
NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
# The template browser shows the file name as the card's title: "REG <n> - <what it compares> (<model>)".
FIRST = "REG 1 - CFG vs CFG + REG (SD1.5)"
REQUIRED = {
    FIRST,
    "REG 2 - Interval guidance schedule + REG (SD1.5)",
    "REG 3 - APG vs APG + REG (SD1.5)",
    "REG 4 - PAG vs PAG + REG (SD1.5)",
    "REG 5 - REG Guider with SamplerCustomAdvanced (SD1.5)",
    "REG 6 - CFG vs CFG + REG (SD3.5 Medium)",
}

# Nodes that exist only in the frontend and are never sent to the server.
FRONTEND_ONLY = {"Note", "MarkdownNote"}
RESULT_NODES = {"SaveImage", "PreviewImage", "PreviewAny"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
TITLE_BAR = 30  # LiteGraph draws the title above ``pos``

# The real model files the workflows name, and which tiny stand-in replaces each (see tiny_models.py).
SD15_CHECKPOINTS = {"v1-5-pruned-emaonly-fp16.safetensors"}
SD3_CHECKPOINTS = {"sd3.5_medium.safetensors"}
SD3_TEXT_ENCODERS = {"clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors"}
CLIP_SCORE_MODELS = {"clip-vit-base-patch16"}  # a transformers CLIPModel folder in models/clip_score/
MODEL_FILE_INPUTS = {
    "ckpt_name",
    "unet_name",
    "vae_name",
    "clip_name",
    "clip_name1",
    "clip_name2",
    "clip_name3",
    "model_name",
}
LOADERS = {
    "CheckpointLoaderSimple",
    "CheckpointLoader",
    "UNETLoader",
    "CLIPLoader",
    "DualCLIPLoader",
    "TripleCLIPLoader",
    "VAELoader",
    "REGCLIPScoreLoader",
}


def load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def api_twin(name: str) -> dict[str, Any]:
    return load(API_DIR / f"{name}.api.json")


# ------------------------------------------------------------------------------------------------------------------
# A model of the frontend: node definitions as GET /object_info serves them, and graphToPrompt
# ------------------------------------------------------------------------------------------------------------------


def object_info(class_type: str) -> dict[str, Any]:
    """server.py's ``node_info``: V3 nodes describe themselves, V1 nodes through INPUT_TYPES and RETURN_*."""
    from comfy_api.internal import _ComfyNodeInternal

    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS[class_type]
    if issubclass(cls, _ComfyNodeInternal):
        info = cls.GET_NODE_INFO_V1()
    else:
        inputs = cls.INPUT_TYPES()
        info = {
            "input": inputs,
            "input_order": {key: list(value.keys()) for key, value in inputs.items()},
            "output": cls.RETURN_TYPES,
            "output_name": getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES),
            "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(class_type, class_type),
        }
    return json.loads(json.dumps(info, default=str))


def frontend_inputs(info: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, type, options) in the frontend's order; V1 option lists become COMBO."""
    out = []
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        for name in info.get("input_order", {}).get(section, list(specs)):
            spec = specs[name]
            kind = "COMBO" if isinstance(spec[0], list) else spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            out.append((name, kind, options))
    return out


def widget_slots(info: dict[str, Any]) -> list[tuple[str, int]]:
    """The widgets the frontend creates, in order: (input name, number of widgets_values it takes)."""
    slots = []
    for name, kind, options in frontend_inputs(info):
        if kind not in WIDGET_TYPES or options.get("forceInput"):
            continue
        control = options.get("control_after_generate")
        if kind == "INT" and control is None:
            control = name in ("seed", "noise_seed")
        assert not (control and kind != "INT"), f"{name}: combo control widgets are not modelled here"
        slots.append((name, 2 if control else 1))
    return slots


def ui_to_api(ui: dict[str, Any]) -> dict[str, Any]:
    """graphToPrompt: what the frontend POSTs for a saved UI workflow (no bypassed or muted nodes expected)."""
    links = {link[0]: link for link in ui["links"]}
    prompt: dict[str, Any] = {}
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        assert node.get("mode", 0) == 0, f"node {node['id']} is muted or bypassed"
        info = object_info(node["type"])
        values = list(node.get("widgets_values", []))
        inputs: dict[str, Any] = {}
        for name, count in widget_slots(info):
            assert len(values) >= count, f"node {node['id']} ({node['type']}): too few widgets_values"
            inputs[name] = values[0]  # control_after_generate is not serialised into the prompt
            values = values[count:]
        assert not values, f"node {node['id']} ({node['type']}): {len(values)} widgets_values left over"
        for index, slot in enumerate(node.get("inputs", [])):
            if slot.get("link") is None:
                continue
            link_id, origin, origin_slot, target, target_slot, _kind = links[slot["link"]]
            assert (target, target_slot) == (node["id"], index), f"link {link_id} does not end at its input slot"
            inputs[slot["name"]] = [str(origin), origin_slot]
        title = node.get("title") or info.get("display_name") or node["type"]
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": node["type"], "_meta": {"title": title}}
    for inputs in (n["inputs"] for n in prompt.values()):  # the frontend drops links to nodes it did not send
        for key in [k for k, v in inputs.items() if isinstance(v, list) and len(v) == 2 and v[0] not in prompt]:
            del inputs[key]
    return prompt


# ------------------------------------------------------------------------------------------------------------------
# The files
# ------------------------------------------------------------------------------------------------------------------


def test_every_ui_template_has_an_api_twin_and_vice_versa():
    assert REQUIRED <= set(NAMES)
    twins = sorted(p.name.removesuffix(".api.json") for p in API_DIR.glob("*.json"))
    assert twins == NAMES
    assert all(p.name.endswith(".api.json") for p in API_DIR.glob("*.json"))


@pytest.mark.parametrize("name", NAMES)
def test_ui_template_converts_back_to_exactly_its_api_twin(reg_pack, name):
    ui = load(WORKFLOWS / f"{name}.json")
    assert ui["version"] == 0.4
    assert ui["last_node_id"] == max(n["id"] for n in ui["nodes"])
    assert ui["last_link_id"] == max(link[0] for link in ui["links"])
    assert ui_to_api(ui) == api_twin(name)


@pytest.mark.parametrize("name", NAMES)
def test_ui_template_links_and_sockets_are_consistent(reg_pack, name):
    ui = load(WORKFLOWS / f"{name}.json")
    by_id = {n["id"]: n for n in ui["nodes"]}
    for link_id, origin, origin_slot, target, target_slot, kind in ui["links"]:
        out = by_id[origin]["outputs"][origin_slot]
        into = by_id[target]["inputs"][target_slot]
        assert link_id in out["links"] and into["link"] == link_id
        assert kind == into["type"], f"link {link_id}: type {kind} vs input {into['type']}"
        assert out["type"] == into["type"] or "*" in (out["type"], into["type"])
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        info = object_info(node["type"])
        widgets = {name for name, _ in widget_slots(info)}
        # The frontend's socket order: inputs without a widget first, then one socket per widget.
        expected = [n for n, _, _ in frontend_inputs(info) if n not in widgets] + [n for n, _ in widget_slots(info)]
        assert [slot["name"] for slot in node["inputs"]] == expected, node["type"]
        assert all(("widget" in slot) == (slot["name"] in widgets) for slot in node["inputs"])
        # a newer ComfyUI may add outputs (0.33's SaveImage/PreviewImage return IMAGE); the frontend adds the socket
        outputs = [o["type"] for o in node["outputs"]]
        assert outputs == list(info["output"])[: len(outputs)], node["type"]


@pytest.mark.parametrize("name", NAMES)
def test_ui_template_is_laid_out_legibly(name):
    ui = load(WORKFLOWS / f"{name}.json")

    def box(node):  # including the title bar
        x, y = node["pos"]
        w, h = node["size"]
        return x, y - TITLE_BAR, x + w, y + h

    def intersects(a, b):
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    def inside(inner, outer):
        return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]

    nodes = ui["nodes"]
    for a, b in itertools.combinations(nodes, 2):
        assert not intersects(box(a), box(b)), f"{a['title']} overlaps {b['title']}"
    groups = [
        (
            g["title"],
            (
                g["bounding"][0],
                g["bounding"][1],
                g["bounding"][0] + g["bounding"][2],
                g["bounding"][1] + g["bounding"][3],
            ),
        )
        for g in ui["groups"]
    ]
    for (ta, a), (tb, b) in itertools.combinations(groups, 2):
        assert not intersects(a, b), f"groups {ta} and {tb} overlap"
    for node in nodes:
        for title, g in groups:
            assert inside(box(node), g) or not intersects(box(node), g), f"{node['title']} straddles group {title}"
    # Data flows left to right, every node has its own title, and one Markdown note explains the workflow.
    by_id = {n["id"]: n for n in nodes}
    for _, origin, _, target, _, _ in ui["links"]:
        assert box(by_id[origin])[2] < box(by_id[target])[0], f"{by_id[origin]['title']} → {by_id[target]['title']}"
    assert all(n.get("title") for n in nodes)
    notes = [n for n in nodes if n["type"] == "MarkdownNote"]
    assert len(notes) == 1 and len(notes[0]["widgets_values"][0]) > 200
    assert "models/" in notes[0]["widgets_values"][0]  # the note says which model files the workflow expects


# ------------------------------------------------------------------------------------------------------------------
# The API twins in real ComfyUI
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_api_twin_validates_except_for_the_absent_model_files(reg_pack, name):
    """Every node type exists (built-in or this pack) and every input is valid; the only errors ComfyUI may report are
    the real model files, which are not installed here."""
    import execution

    import nodes

    prompt = api_twin(name)
    assert {n["class_type"] for n in prompt.values()} <= set(nodes.NODE_CLASS_MAPPINGS)
    ui_types = {n["type"] for n in load(WORKFLOWS / f"{name}.json")["nodes"]}
    assert ui_types <= set(nodes.NODE_CLASS_MAPPINGS) | FRONTEND_ONLY
    with without_path(REPO):
        ok, error, _, node_errors = asyncio.run(execution.validate_prompt(f"validate-{name}", prompt, None))
    if ok:
        return
    assert error["type"] == "prompt_outputs_failed_validation", error
    for nid, entry in node_errors.items():
        assert prompt[nid]["class_type"] in LOADERS, (nid, entry)
        for problem in entry["errors"]:
            assert problem["type"] == "value_not_in_list", problem
            assert problem["extra_info"]["input_name"] in MODEL_FILE_INPUTS, problem


def uses_interval_schedule(api: dict[str, Any]) -> bool:
    return any(
        n["class_type"] in ("REGGuidanceSchedule", "REGGuider") and n["inputs"].get("schedule") == "interval"
        for n in api.values()
    )


def tinyfy(api: dict[str, Any], tiny: Any, clip_score_model: str | None = None) -> dict[str, Any]:
    """The twin with the tiny models instead of the real files, 32×32 latents, 2 steps and (sweep) 2 cfg values.

    With an interval schedule 3 steps: SD1.5's 2-step sigmas (14.6, 0.029) both miss the default window [0.28, 2.90],
    where the schedule would be plain conditional sampling and REG a no-op; with 3 steps σ = 1.62 is inside it.
    """
    prompt = copy.deepcopy(api)
    steps = 3 if uses_interval_schedule(api) else 2
    fresh = (str(i) for i in itertools.count(max(map(int, prompt)) + 1))
    for nid, node in list(prompt.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple" and inputs["ckpt_name"] in SD15_CHECKPOINTS:
            inputs["ckpt_name"] = tiny.sd15_checkpoint
        elif kind == "CheckpointLoaderSimple" and inputs["ckpt_name"] in SD3_CHECKPOINTS:
            # The tiny SD3 is a bare MMDiT plus a separate TAESD3: UNETLoader for MODEL, VAELoader for VAE.
            node.update(class_type="UNETLoader", inputs={"unet_name": tiny.sd3_unet, "weight_dtype": "default"})
            vae = next(fresh)
            prompt[vae] = {"class_type": "VAELoader", "inputs": {"vae_name": tiny.sd3_vae}}
            for other in prompt.values():
                for key, value in other["inputs"].items():
                    assert value != [nid, 1], "the SD3.5 checkpoint has no text encoders; CLIP must come from elsewhere"
                    if value == [nid, 2]:
                        other["inputs"][key] = [vae, 0]
        elif kind == "TripleCLIPLoader":
            assert {inputs["clip_name1"], inputs["clip_name2"], inputs["clip_name3"]} == SD3_TEXT_ENCODERS
            node.update(class_type="CLIPLoader", inputs={"clip_name": tiny.clip_l, "type": "sd3"})
        elif kind == "REGCLIPScoreLoader" and inputs["model_name"] in CLIP_SCORE_MODELS:
            assert clip_score_model is not None, "this workflow needs the tiny CLIP score model"
            inputs["model_name"] = clip_score_model
        elif kind in ("EmptyLatentImage", "EmptySD3LatentImage"):
            inputs.update(width=32, height=32)
        elif kind == "REGGuidanceSweep":  # one sampling run per method and cfg value: keep the first and last value
            values = [v.strip() for v in inputs["cfg_values"].split(",")]
            inputs["cfg_values"] = f"{values[0]}, {values[-1]}"
        elif kind in LOADERS:
            raise AssertionError(f"no tiny stand-in for {kind} {inputs}; add one to tinyfy()")
        if isinstance(inputs.get("steps"), int):
            inputs["steps"] = steps
    return prompt


@pytest.mark.parametrize("name", NAMES)
def test_api_twin_runs_with_tiny_models_and_every_image_is_finite(harness, tiny, name, tmp_path_factory):
    api = api_twin(name)
    clip_score_model = None
    if any(n["class_type"] == "REGCLIPScoreLoader" for n in api.values()):
        import tiny_clip  # the random CLIPModel of the CLIP-score tests, registered under models/clip_score

        tiny_clip.build(tmp_path_factory.getbasetemp() / "clip_score_models")
        clip_score_model = tiny_clip.FULL
    prompt = tinyfy(api, tiny, clip_score_model)
    result = harness.run(prompt)
    shown = 0
    for nid, node in prompt.items():
        if node["class_type"] in ("SaveImage", "PreviewImage"):
            source, slot = node["inputs"]["images"]
            image = result.image(source, slot)
            assert image.ndim == 4 and image.shape[-1] == 3 and torch.isfinite(image).all(), (nid, image.shape)
            assert len(result.ui[nid]["images"]) == image.shape[0]
            shown += 1
        elif node["class_type"] == "PreviewAny":
            source, slot = node["inputs"]["source"]
            assert result.ui[nid]["text"] and result.value(source, slot)
            json.loads(result.value(source, slot))  # the reports shown are JSON
    assert shown >= 1
    decoded = {nid: result.image(nid) for nid, n in prompt.items() if n["class_type"] == "VAEDecode"}
    assert all(img.shape == (1, 32, 32, 3) for img in decoded.values())
    # Each branch of a comparison shows something different (the guidance nodes really act).
    for (a, img_a), (b, img_b) in itertools.combinations(decoded.items(), 2):
        assert not torch.equal(img_a, img_b), f"{prompt[a]['_meta']} and {prompt[b]['_meta']} decode identically"


# ------------------------------------------------------------------------------------------------------------------
# Template browser, first view and queue-time validation
# ------------------------------------------------------------------------------------------------------------------


def test_template_browser_lists_only_the_ui_workflows_and_serves_them(reg_pack, caplog):
    """ComfyUI's own routes (app/custom_node_manager.py) on a real aiohttp server, with the pack in custom_nodes."""
    from urllib.parse import quote

    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer
    from app.custom_node_manager import CustomNodeManager

    import nodes

    base = f"/api/workflow_templates/{PACK_NAME}/{quote(FIRST)}"

    async def fetch() -> tuple[dict[str, list[str]], dict[str, Any], int, list[tuple[int, str, bytes]]]:
        routes = web.RouteTableDef()
        app = web.Application()
        CustomNodeManager().add_routes(routes, app, [(PACK_NAME, nodes.LOADED_MODULE_DIRS[PACK_NAME])])
        app.add_routes(routes)
        async with TestClient(TestServer(app)) as client:
            listing = await (await client.get("/workflow_templates")).json()
            served = await (await client.get(f"{base}.json")).json()
            api_status = (await client.get(f"{base}.api.json")).status
            thumbs = []
            for name in listing[PACK_NAME]:
                response = await client.get(f"/api/workflow_templates/{PACK_NAME}/{quote(name)}.jpg")
                thumbs.append((response.status, response.content_type, await response.read()))
        return listing, served, api_status, thumbs

    with caplog.at_level(logging.DEBUG):
        listing, served, api_status, thumbs = asyncio.run(fetch())
    assert sorted(listing[PACK_NAME]) == NAMES
    assert not any(name.endswith(".api") for name in listing[PACK_NAME])
    assert served == load(WORKFLOWS / f"{FIRST}.json")
    assert api_status == 404  # the twins live in workflows/api/, not next to the templates
    # The card's picture: <name>.jpg (the frontend asks for jpg), a small JPEG.
    for status, content_type, data in thumbs:
        assert (status, content_type, data[:2]) == (200, "image/jpeg", b"\xff\xd8")
        assert len(data) < 50_000
    # ComfyUI accepts workflows/ but suggests example_workflows/ (at debug level only).
    assert any("consider renaming it to 'example_workflows'" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", NAMES)
def test_template_opens_with_its_results_in_view(name):
    """The saved view (extra.ds, which the frontend restores on load) shows the result column on the canvas of a
    1600×900 window (1536×820 px right of the sidebar, below the tab and menu bars): every result node's full width and
    the first one's title bar, at a zoom where LiteGraph still draws widgets (0.6). tests/integration/test_browser.py
    checks the real page."""
    ui = load(WORKFLOWS / f"{name}.json")
    scale, (ox, oy) = ui["extra"]["ds"]["scale"], ui["extra"]["ds"]["offset"]
    assert scale >= 0.6
    results = [n for n in ui["nodes"] if n["type"] in RESULT_NODES]
    for node in results:
        left, right = (node["pos"][0] + ox) * scale, (node["pos"][0] + node["size"][0] + ox) * scale
        assert 0 <= left and right <= 1536, (node["title"], left, right)
    top = (min(n["pos"][1] for n in results) - TITLE_BAR + oy) * scale
    assert 0 <= top <= 200, top


def test_a_window_that_can_never_work_is_refused_when_queued(reg_pack):
    """validate_inputs on REGGuidance: the REG branch fails validation (it never runs) with the pack's message, once
    per window input."""
    import execution

    prompt = api_twin(FIRST)
    nid = next(k for k, n in prompt.items() if n["class_type"] == "REGGuidance")
    prompt[nid]["inputs"].update(start_percent=0.8, end_percent=0.2)
    with without_path(REPO):
        _, _, _, node_errors = asyncio.run(execution.validate_prompt("never-works", prompt, None))
    custom = {k: [e for e in v["errors"] if e["type"] == "custom_validation_failed"] for k, v in node_errors.items()}
    assert [k for k, errors in custom.items() if errors] == [nid]  # (and the real checkpoint file is absent here)
    errors = custom[nid]
    assert [e["extra_info"]["input_name"] for e in errors] == ["start_percent", "end_percent"]
    assert all("start_percent (0.8) is after end_percent (0.2)" in e["details"] for e in errors), errors
