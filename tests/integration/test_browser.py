"""The artist's path in the real web frontend: a ComfyUI server with the pack, driven by headless Chromium.

A real ``main.py`` server (``--cpu``, 127.0.0.1, a free port, every folder in a temp base directory) serves the
frontend this ComfyUI ships (1.27 with 0.3.64, 1.49 with 0.33). The tiny random-weight models stand in under the
file names the templates expect (SD1.5 checkpoint, CLIP-score folder); SD3.5 Medium, whose checkpoint has no text
encoders, has no such stand-in, so that template's prompt is queued through the page's API client after the
integration tests' substitution (``tinyfy``). For every template: it is listed in the template browser with its
thumbnail, opens without a missing-node dialog, keeps every widget value of the file, opens with its results in view,
converts (the page's own ``app.graphToPrompt()``) to exactly its API twin, and — shrunk in the page to 32² latents
and 2–3 steps — runs from the page without an error and shows its images. Plus a REG tooltip, a node docs page, and
two bad inputs whose messages the page shows, after which the server runs the next good prompt.

Needs Chromium (Debian's ``chromium``; ``REG_CHROMIUM`` overrides the path) and Playwright in ComfyUI's interpreter
(``./dev`` installs both; Playwright never downloads a browser here). Screenshots of failures go to the folder the
failure message names.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path(os.environ.get("REG_CHROMIUM", "/usr/bin/chromium"))


def _missing(reason: str) -> None:
    """Skip the module for a missing prerequisite, or fail it where the browser tests must run (CI sets
    ``REG_REQUIRE_BROWSER=1``)."""
    if os.environ.get("REG_REQUIRE_BROWSER") == "1":
        pytest.fail(f"browser tests cannot run: {reason}", pytrace=False)
    pytest.skip(f"browser tests skipped: {reason}", allow_module_level=True)


try:
    from playwright.sync_api import Page, sync_playwright
except ImportError:
    _missing(f"playwright is not installed for {sys.executable} (./dev test installs it)")
if not CHROMIUM.is_file():
    _missing(f"no Chromium at {CHROMIUM} (apt-get install chromium)")

import locate  # noqa: E402
from comfy_harness import PACK_NAME  # noqa: E402
from test_workflows import (  # noqa: E402
    FIRST,
    NAMES,
    REPO,
    RESULT_NODES,
    SD3_CHECKPOINTS,
    WORKFLOWS,
    api_twin,
    load,
    tinyfy,
    uses_interval_schedule,
)

FRONTEND_DISPLAY_INPUTS = {"PreviewAny": ("preview",)}
VIEWPORT = {"width": 1600, "height": 900}
MENU_BARS = 100  # the frontend's tab and menu bars above the canvas, in pixels
SHOTS = Path(tempfile.mkdtemp(prefix="reg-browser-shots-"))
SD15_FILE = "v1-5-pruned-emaonly-fp16.safetensors"
CLIP_SCORE_FOLDER = "clip-vit-base-patch16"
START_AFTER_END = "start_percent (0.8) is after end_percent (0.2)"
EMPTY_CAPTION = "score_prompt is empty"


@dataclass
class Server:
    url: str
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory) -> Iterator[Server]:
    """``main.py`` of the ComfyUI under test, the pack in its custom_nodes and the tiny models in its model paths."""
    import tiny_clip

    comfyui, _ = locate.find_comfyui()
    base = tmp_path_factory.mktemp("browser_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK_NAME).symlink_to(REPO)
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    # First start: no tutorial dialog. The SD3.5 files are absent by design, so no missing-models dialog either;
    # the missing-nodes dialog stays on.
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False}))
    stand_ins = base / "stand_ins"
    (stand_ins / "checkpoints").mkdir(parents=True)
    (stand_ins / "checkpoints" / SD15_FILE).symlink_to(tiny.root / "checkpoints" / tiny.sd15_checkpoint)
    clip_root = tmp_path_factory.mktemp("browser_clip_score")
    tiny_clip.build(clip_root)
    (stand_ins / "clip_score").mkdir()
    (stand_ins / "clip_score" / CLIP_SCORE_FOLDER).symlink_to(clip_root / tiny_clip.FULL, target_is_directory=True)
    folders = ("checkpoints", "diffusion_models", "text_encoders", "vae_approx")
    config = base / "extra_model_paths.yaml"
    config.write_text(
        "tiny:\n"
        f"  base_path: {tiny.root}\n"
        + "".join(f"  {kind}: {kind}\n" for kind in folders)
        + f"stand_ins:\n  base_path: {stand_ins}\n  checkpoints: checkpoints\n  clip_score: clip_score\n"
    )
    port = free_port()
    log = base / "server.log"
    command = [
        sys.executable,
        "main.py",
        "--cpu",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--base-directory",
        str(base),
        "--extra-model-paths-config",
        str(config),
        "--database-url",
        "sqlite:///:memory:",
        "--disable-auto-launch",
    ]
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=comfyui, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"{url}/system_stats", timeout=5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI did not start ({command}); its log:\n{log.read_text()[-4000:]}")
                time.sleep(1)
        yield Server(url, log)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def page(server: Server) -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        tab = browser.new_page(viewport=VIEWPORT)
        tab.goto(server.url)
        tab.wait_for_function(
            "() => window.app?.graph && window.app.canvas && window.app.extensionManager", timeout=90_000
        )
        tab.wait_for_timeout(1000)
        yield tab
        browser.close()


@contextlib.contextmanager
def screenshot_on_failure(page: Page, label: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        path = SHOTS / f"{''.join(c if c.isalnum() else '_' for c in label)}.png"
        page.screenshot(path=str(path))
        raise AssertionError(f"{exc}\nscreenshot: {path}") from exc


JS_HELPERS = """
window.regTest = {
  nodes: () => app.graph.nodes ?? app.graph._nodes,
  dialogs: () => [...document.querySelectorAll('[role=dialog], .p-toast-message')].filter(d => d.offsetParent !== null)
      .map(d => d.innerText),
  setWidget(id, name, value) {
    const node = app.graph.getNodeById(id);
    const widget = node.widgets.find(w => w.name === name);
    widget.value = value;
    widget.callback?.(value);
  },
  run(queue) {  // the outcome of the next prompt this page queues: success, error, or refused when queued
    return new Promise((resolve) => {
      let started = false;
      const start = () => { started = true; };
      const done = (kind) => (event) => {
        app.api.removeEventListener('execution_start', start);
        app.api.removeEventListener('execution_success', success);
        app.api.removeEventListener('execution_error', failure);
        resolve({kind, detail: event?.detail ?? null, dialogs: regTest.dialogs()});
      };
      const success = done('success'), failure = done('error'), refused = done('refused');
      app.api.addEventListener('execution_start', start);
      app.api.addEventListener('execution_success', success);
      app.api.addEventListener('execution_error', failure);
      // Refused: nothing started and the page shows a dialog (or nothing started within a minute).
      const deadline = Date.now() + 60000;
      const poll = () => {
        if (started) return;
        if (regTest.dialogs().length || Date.now() > deadline) refused();
        else setTimeout(poll, 500);
      };
      queue().then(() => setTimeout(poll, 1000), () => refused());
    });
  },
};
"""


def close_dialogs(page: Page) -> None:
    for _ in range(3):
        if not page.evaluate("regTest.dialogs().length"):
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)


def open_from_template_browser(page: Page, name: str) -> dict[str, Any]:
    """Browse Templates → this pack → the card titled ``name``; returns the card's thumbnail size."""
    page.evaluate(JS_HELPERS)
    page.keyboard.press("Escape")
    close_dialogs(page)
    page.evaluate("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    dialog = page.get_by_role("dialog").last
    category = dialog.get_by_text(PACK_NAME, exact=True).first
    category.wait_for(state="attached", timeout=20_000)
    if not category.is_visible():  # frontend 1.49: under the collapsed "Extensions" section of the side bar
        dialog.get_by_text("Extensions", exact=True).first.click()
    category.scroll_into_view_if_needed()
    category.click()
    card = dialog.get_by_text(name, exact=True).first
    card.wait_for(timeout=20_000)
    card.scroll_into_view_if_needed()
    thumbnail = card.locator("xpath=ancestor::*[.//img][1]//img").first
    thumbnail.wait_for(state="attached", timeout=10_000)
    thumbnail.scroll_into_view_if_needed()
    page.wait_for_function("(img) => img.complete", arg=thumbnail.element_handle(), timeout=10_000)
    size = thumbnail.evaluate("(img) => ({src: img.src, width: img.naturalWidth, height: img.naturalHeight})")
    card.click()
    expected = len(load(WORKFLOWS / f"{name}.json")["nodes"])
    page.wait_for_function(
        "([n]) => (app.graph.nodes ?? app.graph._nodes).length === n",  # the browser closes before loading
        arg=[expected],
        timeout=20_000,
    )
    page.wait_for_timeout(1000)
    return size


def shrink_in_page(page: Page, ui: dict[str, Any]) -> None:
    """As ``tinyfy`` does to the twin: 32² latents, 2 steps (3 with an interval schedule), first and last cfg value."""
    steps = 3 if uses_interval_schedule(api_twin_of(ui)) else 2
    for node in ui["nodes"]:
        names = page.evaluate(
            "(id) => (app.graph.getNodeById(id).widgets ?? []).map(w => [w.name, w.value])", node["id"]
        )
        for widget, value in names:
            if widget in ("width", "height") and node["type"].startswith("Empty"):
                page.evaluate("(a) => regTest.setWidget(...a)", [node["id"], widget, 32])
            elif widget == "steps" and isinstance(value, int):
                page.evaluate("(a) => regTest.setWidget(...a)", [node["id"], widget, steps])
            elif widget == "cfg_values":
                values = [v.strip() for v in value.split(",")]
                page.evaluate("(a) => regTest.setWidget(...a)", [node["id"], widget, f"{values[0]}, {values[-1]}"])


def page_prompt(page: Page) -> dict[str, Any]:
    """``app.graphToPrompt()``'s output without the inputs no node declares: frontend 1.27 sends PreviewAny's own
    read-only text box as ``preview`` (the server ignores it), 1.49 does not."""
    output = page.evaluate("async () => (await app.graphToPrompt()).output")
    for node in output.values():
        for key in FRONTEND_DISPLAY_INPUTS.get(node["class_type"], ()):
            node["inputs"].pop(key, None)
    return output


def api_twin_of(ui: dict[str, Any]) -> dict[str, Any]:
    return api_twin(next(n for n in NAMES if load(WORKFLOWS / f"{n}.json")["id"] == ui["id"]))


def queue_from_page(page: Page, name: str, tiny) -> dict[str, Any]:
    """Queue the shrunk graph as the Run button does; SD3.5 (no stand-in under its name) through the page's API
    client with ``tinyfy``'s loaders."""
    ui = load(WORKFLOWS / f"{name}.json")
    shrink_in_page(page, ui)
    twin = api_twin(name)
    if not any(n["inputs"].get("ckpt_name") in SD3_CHECKPOINTS for n in twin.values()):
        return page.evaluate("regTest.run(() => app.queuePrompt(0, 1))")
    output = page.evaluate("async () => (await app.graphToPrompt()).output")
    prompt = tinyfy(output, tiny)
    return page.evaluate(
        "(prompt) => regTest.run(() => app.api.queuePrompt(0, {output: prompt, workflow: app.graph.serialize()}))",
        prompt,
    )


@pytest.mark.parametrize("name", NAMES)
def test_template_in_the_page(page, tiny, name):
    ui = load(WORKFLOWS / f"{name}.json")
    with screenshot_on_failure(page, name):
        thumbnail = open_from_template_browser(page, name)
        assert (thumbnail["width"], thumbnail["height"]) == (480, 360), thumbnail  # workflows/<name>.jpg
        assert page.evaluate("regTest.dialogs()") == [], "a dialog opened with the template (missing nodes?)"
        # Every widget keeps its value from the file.
        graph = page.evaluate("app.graph.serialize()")
        shown = {n["id"]: n.get("widgets_values", []) for n in graph["nodes"]}
        assert shown == {n["id"]: n.get("widgets_values", []) for n in ui["nodes"]}
        # The result column is in view, below the menu bars: 1.27 restores the file's view (extra.ds), 1.49 fits the
        # whole graph to the window when it opens a template.
        view = page.evaluate("({scale: app.canvas.ds.scale, offset: [...app.canvas.ds.offset]})")
        results = [n for n in ui["nodes"] if n["type"] in RESULT_NODES]
        canvas = page.evaluate(
            "(() => { const r = app.canvas.canvas.getBoundingClientRect(); return [r.left, r.top]; })()"
        )
        for node in results:
            left = canvas[0] + (node["pos"][0] + view["offset"][0]) * view["scale"]
            right = canvas[0] + (node["pos"][0] + node["size"][0] + view["offset"][0]) * view["scale"]
            assert canvas[0] <= left and right <= VIEWPORT["width"], (node["title"], canvas, left, right)
        top = canvas[1] + (min(n["pos"][1] for n in results) - 30 + view["offset"][1]) * view["scale"]
        assert max(canvas[1], MENU_BARS) - 5 <= top < VIEWPORT["height"] / 2, (canvas, top)
        # The page's own API conversion is the twin (less the frontend's display widgets).
        assert page_prompt(page) == api_twin(name)
        # Shrunk and queued from the page: no error, and every result node shows its output.
        outcome = queue_from_page(page, name, tiny)
        assert outcome["kind"] == "success", (outcome, page.evaluate("regTest.dialogs()"))
        for node in results:  # the page received each result and can fetch every image it lists
            shown = page.evaluate(
                """async (id) => {
                  const out = app.nodeOutputs?.[String(id)] ?? {};
                  const urls = (out.images ?? []).map(i => app.api.apiURL(
                      `/view?filename=${encodeURIComponent(i.filename)}&subfolder=${encodeURIComponent(i.subfolder)}`
                      + `&type=${i.type}`));
                  const status = await Promise.all(urls.map(async u => (await fetch(u)).status));
                  return {images: status, text: (out.text ?? []).length};
                }""",
                node["id"],
            )
            if node["type"] == "PreviewAny":
                assert shown["text"] > 0, (node["title"], shown)
            else:
                assert shown["images"] and set(shown["images"]) == {200}, (node["title"], shown)
        assert page.evaluate("regTest.dialogs()") == []


def show_error_details(page: Page, input_name: str | None = None) -> None:
    """Frontend 1.27 shows the error in a dialog; 1.49 in a toast whose "View details" opens the error panel, where
    each failing input's message is the tooltip of the (i) next to "<node> - <input>"."""
    details = page.get_by_text("View details", exact=True)
    if not details.count():
        return
    details.first.click()
    if input_name is not None:
        row = page.get_by_text(re.compile(rf" - {input_name}$")).first
        row.wait_for(timeout=10_000)
        row.locator("xpath=..").locator("i, svg, button").first.hover()


def load_first(page: Page) -> dict[str, Any]:
    """Open the first template; its REGGuidance node."""
    open_from_template_browser(page, FIRST)
    ui = load(WORKFLOWS / f"{FIRST}.json")
    return next(n for n in ui["nodes"] if n["type"] == "REGGuidance")


def test_reg_tooltip_shows(page):
    with screenshot_on_failure(page, "tooltip"):
        reg = load_first(page)
        x, y = page.evaluate(
            """(id) => {
              const node = app.graph.getNodeById(id), ds = app.canvas.ds;
              const widget = node.widgets.find(w => w.name === 'strength');
              const rect = app.canvas.canvas.getBoundingClientRect();
              const cx = node.pos[0] + node.size[0] / 2, cy = node.pos[1] + widget.last_y + 10;
              return [rect.left + (cx + ds.offset[0]) * ds.scale, rect.top + (cy + ds.offset[1]) * ds.scale];
            }""",
            reg["id"],
        )
        page.mouse.move(x, y)
        page.mouse.move(x + 2, y)
        page.get_by_text("How much of REG's correction to apply", exact=False).first.wait_for(timeout=10_000)


def test_node_docs_page_shows(page):
    """The REG Guidance help page (web/docs/REGGuidance.md) with its picture in the node-docs panel: opened from the
    selected node's "Node Info" button (1.49) or the node library's "?" (1.27)."""
    with screenshot_on_failure(page, "docs"):
        reg = load_first(page)
        page.evaluate("(id) => app.canvas.selectNode(app.graph.getNodeById(id))", reg["id"])
        node_info = page.get_by_role("button", name="Node Info")
        page.wait_for_timeout(500)
        if node_info.count():
            node_info.first.click()
        else:
            page.evaluate("app.extensionManager.command.execute('Workspace.ToggleSidebarTab.node-library')")
            page.get_by_placeholder(re.compile("search", re.IGNORECASE)).first.fill("REG Guidance (rectify")
            item = page.get_by_text("REG Guidance (rectify any guidance)", exact=True).first
            item.wait_for(timeout=10_000)
            item.hover()
            page.locator(".help-button:visible").first.click()
        page.get_by_text("When to use it", exact=True).first.wait_for(timeout=10_000)
        image = page.locator("img[src*='toy_reg.png']").first
        page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=image.element_handle())
        page.keyboard.press("Escape")


def test_bad_inputs_show_the_packs_message_and_the_next_prompt_runs(page, tiny):
    with screenshot_on_failure(page, "bad_inputs"):
        # start_percent > end_percent: refused when queued (validate_inputs), the page's error dialog says why. In a
        # template where every output needs the REG node (ComfyUI runs the valid outputs of a partly invalid prompt).
        diagnostics = next(n for n in NAMES if any(v["class_type"] == "REGDiagnostics" for v in api_twin(n).values()))
        open_from_template_browser(page, diagnostics)
        ui = load(WORKFLOWS / f"{diagnostics}.json")
        reg = next(n for n in ui["nodes"] if n["type"] == "REGGuidance")
        page.evaluate("(a) => regTest.setWidget(...a)", [reg["id"], "start_percent", 0.8])
        page.evaluate("(a) => regTest.setWidget(...a)", [reg["id"], "end_percent", 0.2])
        shrink_in_page(page, ui)
        outcome = page.evaluate("regTest.run(() => app.queuePrompt(0, 1))")
        assert outcome["kind"] == "refused", outcome
        show_error_details(page, "start_percent")
        page.get_by_text(START_AFTER_END, exact=False).first.wait_for(timeout=10_000)
        close_dialogs(page)
        # An empty CLIP caption: the sweep stops with its message in the page's error dialog.
        sweep_name = next(n for n in NAMES if any(v["class_type"] == "REGGuidanceSweep" for v in api_twin(n).values()))
        open_from_template_browser(page, sweep_name)
        sweep_ui = load(WORKFLOWS / f"{sweep_name}.json")
        shrink_in_page(page, sweep_ui)
        twin = api_twin(sweep_name)
        caption = next(v["inputs"]["score_prompt"][0] for v in twin.values() if v["class_type"] == "REGGuidanceSweep")
        assert twin[caption]["class_type"] == "PrimitiveStringMultiline"  # the Prompt node feeds score_prompt
        page.evaluate("(a) => regTest.setWidget(...a)", [int(caption), "value", ""])
        outcome = page.evaluate("regTest.run(() => app.queuePrompt(0, 1))")
        assert outcome["kind"] == "error", outcome
        show_error_details(page)
        page.get_by_text(EMPTY_CAPTION, exact=False).first.wait_for(timeout=10_000)
        close_dialogs(page)
        # The server runs the next good prompt.
        open_from_template_browser(page, FIRST)
        outcome = queue_from_page(page, FIRST, tiny)
        assert outcome["kind"] == "success", outcome
