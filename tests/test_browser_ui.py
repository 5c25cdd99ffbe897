"""The in-graph training display in a real browser: ComfyUI's own frontend (the version the host
pins: 1.32.9 with 0.3.75, 1.47.x with 0.30.0) in Debian's chromium, driven headless by Playwright,
against a real server (the `server` fixture: tiny models, this pack, the test nodes).

Two kinds of graphs, in both canvas modes the frontend offers (classic LiteGraph canvas, and
Nodes 2.0 = Vue nodes):

* the shipped example workflows (example_workflows/*.json, through testing/examples.py, with the
  few values `tiny_changes` patches so they train in seconds on the tiny model): each opens with
  every node in view, uncovered by the frontend's own chrome and not overlapping another; a run
  shows the progress line and the loss chart inside the trainer's body, updating, and a preview
  image, and ends "done" with the saved files named; Cancel leaves a `_partial_` file when
  on_cancel is keep. To keep the time down each example runs in one mode (both modes see both
  trainers), while every example's layout is checked in both;
* the test node DomainStudio_TestFakeTrainer (tests/comfy_test_nodes/fake_trainer.py), which sends
  the same events and previews as the real trainers without a model, for what needs exact control:
  the chart's lines and legend, a second run clearing the first, an error, malformed events.

Throughout, the browser console shows no error or warning from the extension, and no uncaught error.
Screenshots of every stage go to a folder under pytest's tmp dir (printed; kept on failure).
"""

from __future__ import annotations

import contextlib
import json
import os
import re

import pytest

from comfyui_domainstudio.testing import examples as ex
from comfyui_domainstudio.testing.harness import TESTS

pytestmark = [pytest.mark.comfy, pytest.mark.e2e]

WORKFLOW = os.path.join(TESTS, "browser", "fake_trainer_workflow.json")
NODE = "1"
TERMS = ["total", "simple", "100×img"]
MODES = ["classic", "vue"]
# Which mode runs which example (every example runs once per host; each mode sees both trainers).
RUNS = [("classic", "domainstudio_text"), ("classic", "personalize_rare_token"), ("classic", "load_weights"),
        ("vue", "domainstudio_unconditional"), ("vue", "personalize_textual_inversion"),
        ("vue", "personalize_dreambooth")]


@pytest.fixture(scope="module")
def ui_server(server):
    info = server.get("/object_info")
    # Both test nodes of the pack (the fake trainer was added beside the tiny SDXL CLIP builder).
    assert {"DomainStudio_TestFakeTrainer", "DSTest_TinySDXLClip"} <= set(info), server.log()[-3000:]
    return server


@pytest.fixture(scope="module")
def object_info(ui_server):
    return ui_server.get("/object_info")


@pytest.fixture(scope="module")
def chromium():
    from browser.ui_harness import CHROMIUM

    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium` (bash .ci/setup.sh does it). "
                    "Never `playwright install`.", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed in this venv: pip install -r requirements-dev.txt", pytrace=False)
    with sync_playwright() as p:
        yield p.chromium


@pytest.fixture(scope="module")
def shots_root(tmp_path_factory):
    d = tmp_path_factory.mktemp("browser_ui_screenshots")
    print(f"\nbrowser UI screenshots: {d}")
    return str(d)


@pytest.fixture(scope="module")
def pages(ui_server, chromium, shots_root):
    """One page per canvas mode (a fresh chromium profile each), opened on first use and kept for
    the module, so tests of both modes in any order share two pages."""
    from browser.ui_harness import open_page

    opened = {}
    with contextlib.ExitStack() as stack:
        def get(mode):
            if mode not in opened:
                shots = os.path.join(shots_root, mode)
                page_ui = stack.enter_context(open_page(chromium, ui_server, vue_nodes=mode == "vue", shots_dir=shots))
                page_ui.mode = mode
                print(f"\nfrontend {_frontend_version(page_ui)}, mode {mode}, screenshots {shots}")
                assert page_ui.setting("Comfy.VueNodes.Enabled") is (mode == "vue"), \
                    "the canvas-mode setting did not apply"
                opened[mode] = page_ui
            return opened[mode]

        yield get


@pytest.fixture(params=MODES)
def ui(request, pages):
    """The page of one canvas mode."""
    return pages(request.param)


# ------------------------------------------------------------------ the shipped example workflows: layout
# (first in each mode: a fresh page, before any run opened the frontend's queue panel)

def _frontend_scales_vue_layouts(ui) -> bool:
    """Frontend 1.32 (ComfyUI 0.3.75) in Nodes 2.0 scales a LiteGraph-saved layout by 1.2 when it
    loads it (setting Comfy.VueNodes.AutoScaleLayout) and then restores the saved view unscaled, so
    the right and bottom of any saved layout leave the window there; 1.47 does not scale."""
    version = tuple(int(x) for x in (ui.frontend_version() or "0").split(".")[:2] if x.isdigit())
    return ui.mode == "vue" and version < (1, 33) and ui.setting("Comfy.VueNodes.AutoScaleLayout") is not False


def _overlaps(a, b, tol=1.0):
    return (a["x"] + tol < b["x"] + b["w"] and b["x"] + tol < a["x"] + a["w"]
            and a["y"] + tol < b["y"] + b["h"] and b["y"] + tol < a["y"] + a["h"])


def _tiny_ui(name, object_info, **changes):
    """The shipped UI workflow with the tiny-model values patched in (and its inputs written)."""
    wf = ex.api(name)
    return ex.apply_ui(ex.ui(name), ex.tiny_changes(wf, **changes), object_info)


@pytest.mark.parametrize("name", list(ex.EXAMPLES))
def test_example_opens_with_every_node_in_view(ui, object_info, name):
    mark = ui.mark()
    saved = ex.ui(name)
    # The shipped file as a user opens it, with a checkpoint this server has (else the frontend's
    # missing-model notice lies over the nodes; it is hidden while probing anyway).
    ui.load_workflow(ex.apply_ui(saved, {"1": {"ckpt_name": ex.TINY_CHECKPOINT}}, object_info))
    ui.page.wait_for_timeout(500)
    layout = ui.layout()
    ui.screenshot(f"layout-{name}")
    assert abs(layout["scale"] - saved["extra"]["ds"]["scale"]) < 1e-6, "the saved view was not restored"
    assert len(layout["nodes"]) == len(saved["nodes"])
    c, nodes = layout["canvas"], layout["nodes"]
    scaled = _frontend_scales_vue_layouts(ui)
    for n in nodes:
        r = n["rect"]
        where = f"{name}: node {n['id']} ({n['type']}) at {({k: round(v) for k, v in r.items()})}"
        inside = (r["x"] >= c["x"] - 1 and r["y"] >= c["y"] - 1 and r["x"] + r["w"] <= c["x"] + c["w"] + 1
                  and r["y"] + r["h"] <= c["y"] + c["h"] + 1)
        if scaled:  # see _frontend_scales_vue_layouts: only what lies inside the window is checked
            covered = [p for p in n["covered"] if p["by"] != "nothing"]
        else:
            assert inside, f"{where} is not entirely in the window ({c})"
            covered = n["covered"]
        assert not covered, f"{where} is covered: {covered[:3]}"
        assert r["w"] >= 100 and r["h"] >= 25, f"{where} is too small to read"
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            assert not _overlaps(a["rect"], b["rect"]), f"{name}: nodes {a['id']} and {b['id']} overlap"
    _assert_no_problems(ui, mark)


# ------------------------------------------------------------------ the fake trainer

def _workflow(steps=30, seconds_per_step=0.25, preview_every=5, fail_at_step=0):
    with open(WORKFLOW, encoding="utf-8") as f:
        wf = json.load(f)
    (node,) = [n for n in wf["nodes"] if n["type"] == "DomainStudio_TestFakeTrainer"]
    node["widgets_values"] = [steps, seconds_per_step, preview_every, fail_at_step]
    return wf


def _frontend_version(ui):
    return ui.page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ ?? null")


def _assert_mode(ui):
    vue_nodes = ui.page.evaluate("() => document.querySelectorAll('[data-node-id]').length")
    if ui.mode == "vue":
        assert vue_nodes >= 1, "Nodes 2.0 is on but no Vue node was rendered"
    else:
        assert vue_nodes == 0, "classic mode is on but Vue nodes were rendered"


def _assert_placement(s, mode, where):
    assert s["hasWidget"] and s["connected"] and s["visible"], f"{where}: display widget missing/hidden: {s}"
    assert s["inside"], f"{where}: display not inside the node body: rect {s['rect']} body {s['body']}"
    assert not s["overTitle"], f"{where}: display overlaps the node title: rect {s['rect']} body {s['body']}"
    if mode == "vue":
        assert s["inVueNode"], f"{where}: in Nodes 2.0 the display must be part of the node's own DOM"
    else:
        assert s["inDomWidgetLayer"] and not s["inVueNode"], f"{where}: classic mode should place a DOM widget"


def _assert_no_problems(ui, mark):
    problems = ui.our_problems(since=mark)
    assert not problems, "browser console problems from the extension:\n" + "\n".join(problems)


def test_training_run_then_cancelled_run(ui):
    from browser.ui_harness import run_workflow_in_browser

    mode, mark = ui.mode, ui.mark()
    # ---- run 1: a full run -----------------------------------------------------------------------
    steps = 20
    obs = run_workflow_in_browser(ui, _workflow(steps=steps), label="run1-done", timeout=180)
    _assert_mode(ui)
    before = obs.before[NODE]
    _assert_placement(before, mode, "before run")
    assert before["status"] == "idle" and before["points"] == 0 and not before["lines"], before

    running = obs.running(NODE)
    assert len(running) >= 4, f"too few distinct running states seen: {obs.summary()}"
    for s in running:
        _assert_placement(s, mode, f"running step {s['step']}")
        assert s["text"].startswith("train · ") and f"/{steps}" in s["text"] and "ETA" in s["text"], s["text"]
    charted = [s for s in running if s["points"] >= 2]
    assert len(charted) >= 3, f"the chart never showed a history: {obs.summary()}"
    for s in charted:
        assert sorted(ln["term"] for ln in s["lines"]) == sorted(TERMS), s["lines"]
        assert all(ln["points"] == s["points"] for ln in s["lines"]), s["lines"]
        assert s["legend"] == TERMS, s["legend"]
        assert s["logScale"], "terms 100x apart should get a log scale"
    # It updates over time: steps, chart length and text move forward.
    assert [s["step"] for s in running] == sorted(s["step"] for s in running)
    assert charted[-1]["points"] > charted[0]["points"] and charted[-1]["t"] > charted[0]["t"]
    assert len({s["text"] for s in running}) >= 3
    assert any(s["images"] for s in running), "no preview image appeared on the node while training"

    final = obs.final[NODE]
    _assert_placement(final, mode, "after done")
    assert final["status"] == "done", final
    assert final["text"].startswith("done · ") and f"step {steps}/{steps}" in final["text"], final["text"]
    assert "ETA" not in final["text"], f"stale ETA after the run: {final['text']}"
    assert final["points"] == steps and all(ln["points"] == steps for ln in final["lines"]), final
    assert final["message"] == "fake trainer: nothing saved", final["message"]
    assert final["images"], "no image on the node after the run"
    first_prompt = final["promptId"]

    # ---- run 2: the same graph again (the fake node is never cached), cancelled ----------------------
    obs2 = run_workflow_in_browser(ui, None, label="run2-cancel", timeout=180, interrupt_at_step=6, load=False)
    assert obs2.interrupted_at is not None, obs2.summary()
    new = [s for s in obs2.samples[NODE] if s["promptId"] and s["promptId"] != first_prompt]
    assert new, obs2.summary()
    # The old chart is gone as soon as the new run shows: never the 30 points of the old run.
    assert all(s["points"] <= max(s["step"], 1) for s in new), [(s["status"], s["step"], s["points"]) for s in new]
    fin = obs2.final[NODE]
    _assert_placement(fin, mode, "after cancel")
    assert fin["status"] == "cancelled", fin
    assert fin["text"].startswith("cancelled · ") and "ETA" not in fin["text"], fin["text"]
    assert fin["total"] == steps and 6 <= fin["step"] < steps and fin["points"] == fin["step"], fin
    assert fin["message"].startswith(f"cancelled at step {fin['step']}"), fin["message"]
    for path in obs.screenshots + obs2.screenshots:
        assert os.path.getsize(path) > 0
    _assert_no_problems(ui, mark)


def test_failing_run_shows_the_error(ui):
    from browser.ui_harness import run_workflow_in_browser

    mark = ui.mark()
    obs = run_workflow_in_browser(ui, _workflow(steps=20, seconds_per_step=0.1, fail_at_step=4), label="run3-error",
                                  timeout=120)
    ui.page.keyboard.press("Escape")  # the frontend's own error dialog
    fin = obs.final[NODE]
    _assert_placement(fin, ui.mode, "after error")
    assert fin["status"] == "error", fin
    assert fin["text"].startswith("error · step 3/20") and "ETA" not in fin["text"], fin["text"]
    assert fin["points"] == 3 and fin["message"] == "RuntimeError: fake failure at step 4", fin
    _assert_no_problems(ui, mark)


# Events the extension must survive without a console error or warning, and what it shows then.
MALFORMED_JS = r"""
async () => {
  const api = window.comfyAPI.api.api;
  const send = (type, detail) => api.dispatchEvent(new CustomEvent(type, { detail }));
  const el = () => document.querySelector('.domainstudio-progress');
  const read = () => ({ status: el().dataset.dsStatus, points: Number(el().dataset.dsPoints),
    log: el().dataset.dsLog === "1", text: el().querySelector('.domainstudio-progress-text').textContent,
    terms: [...el().querySelectorAll('svg polyline')].map((p) => p.dataset.term) });
  const tick = () => new Promise((r) => setTimeout(r, 30));
  const out = {};
  // Garbage only in our own event: the frontend's handlers of its stock events expect what the
  // server sends, so those get well-formed events about other nodes and prompts.
  for (const d of [undefined, null, "x", 42, [], {}, { node: null }, { node: "999" }, { node: {} }]) {
    send("domainstudio.progress", d);
  }
  send("execution_start", { prompt_id: "other" });
  send("executing", "999");
  send("progress", { value: 1, max: 2, node: "999", prompt_id: "other" });
  send("executed", { node: "999", display_node: "999", prompt_id: "other", output: {} });
  send("execution_success", { prompt_id: "other" });
  await tick(); out.garbage = read();
  send("domainstudio.progress", { node: "1", prompt_id: "m0", loss: null });
  send("domainstudio.progress", { node: "1", prompt_id: "m0", step: 1, loss: { steps: null, terms: [] } });
  await tick(); out.emptyLoss = read();
  send("domainstudio.progress", { node: "1", prompt_id: "m1", status: "weird", step: "a", total: null,
    loss: { steps: [1, 2, 3], terms: { short: [1, 2], notalist: "x", c: [NaN, 1, 2] } } });
  await tick(); out.partial = read();
  send("domainstudio.progress", { node: "1", prompt_id: "m1", status: "running", step: 2, total: 5,
    loss: { steps: [1, 2], terms: { x: [-1, 0.5] } } });
  await tick(); out.negative = read();
  const n = 300, steps = [...Array(n).keys()].map((i) => i + 1);
  send("domainstudio.progress", { node: "1", prompt_id: "m1", status: "running", step: n, total: 400,
    loss: { steps, terms: { a: steps.map((s) => 1 / s), b: steps.map(() => 0) } } });
  await tick(); out.long = read();
  send("domainstudio.progress", { node: "1", prompt_id: "m1", status: "done", step: 3, total: 3,
    text: "step 3/3 · ETA 0:05", loss: { steps: [1], terms: { a: [1] } } });
  await tick(); out.doneWithEta = read();
  send("domainstudio.progress", { node: "1", prompt_id: "m2", status: "running", step: 1, total: 9, loss: {} });
  send("execution_error", { node_id: "1", prompt_id: "m2", node_type: "DomainStudio_TestFakeTrainer", executed: [],
    exception_message: "boom\nsecond line", exception_type: "RuntimeError", traceback: [], current_inputs: {},
    current_outputs: {} });
  await tick(); out.errorWithoutFinalEvent = read();
  out.errorMessage = el().querySelector('.domainstudio-progress-message').textContent;
  send("execution_start", { prompt_id: "m3" });
  send("executing", "1");
  await tick(); out.starting = read();
  send("progress", { value: 3, max: 10, node: "1", prompt_id: "m3" });
  await tick(); out.stockProgress = read();
  send("executed", { node: "1", prompt_id: "m3", output: {} });
  await tick(); out.stockDone = read();
  const node = window.app.graph.getNodeById(1);
  window.app.graph.remove(node);
  send("domainstudio.progress", { node: "1", prompt_id: "m4", status: "running", step: 1, total: 2 });
  send("executing", "1");
  await tick();
  return out;
}
"""


def test_malformed_events_are_survived(ui):
    mark = ui.mark()
    ui.load_workflow(_workflow())
    out = ui.page.evaluate(MALFORMED_JS)
    ui.screenshot("malformed-events")
    assert out["garbage"]["status"] == "idle" and out["garbage"]["points"] == 0, out["garbage"]
    assert out["emptyLoss"]["status"] == "running" and out["emptyLoss"]["points"] == 0, out["emptyLoss"]
    assert out["emptyLoss"]["text"] == "step 1", out["emptyLoss"]
    # Unknown status reads as running; terms whose length differs from steps, or not lists, are dropped.
    assert out["partial"]["status"] == "running" and out["partial"]["terms"] == ["c"], out["partial"]
    assert out["negative"]["terms"] == ["x"] and not out["negative"]["log"], out["negative"]
    assert out["long"]["points"] == 300 and sorted(out["long"]["terms"]) == ["a", "b"], out["long"]
    assert out["doneWithEta"]["status"] == "done" and "ETA" not in out["doneWithEta"]["text"], out["doneWithEta"]
    assert out["errorWithoutFinalEvent"]["status"] == "error" and out["errorMessage"] == "boom", out
    assert out["starting"]["status"] == "starting" and out["starting"]["points"] == 0, out["starting"]
    assert out["stockProgress"]["text"] == "step 3/10", out["stockProgress"]
    assert out["stockDone"]["status"] == "done", out["stockDone"]
    _assert_no_problems(ui, mark)


# ------------------------------------------------------------------ the shipped example workflows: runs

def _rare_token_files(server) -> dict[str, str]:
    """Load Weights' file choices for files the rare-token example wrote in this server (run it
    through the API first when no test has)."""
    loras = sorted(f for f in ex.model_files(server) if f.startswith("subject_") and "_partial_" not in f)
    embeddings = sorted(f for f in ex.model_files(server, "embeddings") if f.startswith("ds_subject"))
    if not loras or not embeddings:
        example = ex.EXAMPLES["personalize_rare_token"]
        ex.write_inputs(os.path.join(server.base, "input"), example)
        wf = ex.api("personalize_rare_token")
        r = ex.run(server, ex.apply_api(wf, ex.tiny_changes(wf, steps=2, preview_every=0)), timeout=600)
        assert not r.errors(), r.error_text()
        return _rare_token_files(server)
    return {"14": f"loras/{loras[0]}", "15": f"embeddings/{embeddings[0]}"}


def _assert_trainer_run(obs, node, total, mode, label):
    running = obs.running(node)
    charted = [s for s in running if s["points"] >= 1]
    assert len(charted) >= 2, f"{label}: too few charted states seen: {obs.summary()}"
    for s in running:
        _assert_placement(s, mode, f"{label} running step {s['step']}")
    for s in charted:  # states from the pack's events (stock progress alone draws no chart)
        assert re.match(rf"(train|token|unet) · step {s['step']}/{total} · .* · ETA \d+:\d\d$", s["text"]), s["text"]
        assert s["lines"] and sorted(ln["term"] for ln in s["lines"]) == sorted(s["legend"]), s
        # One point is drawn as a dot-length line of two.
        assert all(ln["points"] == max(2, s["points"]) for ln in s["lines"]), (s["points"], s["lines"])
    assert [s["step"] for s in running] == sorted(s["step"] for s in running)
    assert charted[-1]["points"] > charted[0]["points"] and charted[-1]["t"] > charted[0]["t"], \
        f"{label}: the chart did not grow: {[(s['t'], s['points']) for s in charted]}"
    assert len({s["text"] for s in charted}) >= 2, f"{label}: the progress line never changed"


@pytest.mark.parametrize("ui, name", RUNS, indirect=["ui"], ids=[f"{m}-{n}" for m, n in RUNS])
def test_example_runs_in_the_browser(ui, ui_server, object_info, name):
    from browser.ui_harness import run_workflow_in_browser

    mark = ui.mark()
    example = ex.EXAMPLES[name]
    ex.write_inputs(os.path.join(ui_server.base, "input"), example)
    wf = _tiny_ui(name, object_info, steps=3, preview_every=2)
    if example.kind == "load":
        wf = ex.apply_ui(wf, {k: {"file": v} for k, v in _rare_token_files(ui_server).items()}, object_info)
        ui.refresh_node_definitions()  # the page lists the files written since it opened
    before = {k: ex.model_files(ui_server, k) for k in ("loras", "embeddings")}
    obs = run_workflow_in_browser(ui, wf, label=f"example-{name}", timeout=600,
                                  watch=[example.trainer] if example.trainer else [])
    new = sorted(f for k in before for f in ex.model_files(ui_server, k) - before[k])
    images = ui.page.evaluate("""(ids) => ids.map((id) => {
        const n = window.app.graph.getNodeById(Number(id)) ?? window.app.graph.getNodeById(id);
        const vue = document.querySelector(`[data-node-id="${id}"]`);
        const imgs = vue ? [...vue.querySelectorAll('img')] : (n?.imgs ?? []);
        return imgs.filter((i) => i.complete && i.naturalWidth > 0).length; })""", [example.adapted, example.base])
    assert all(images), f"{name}: the Save Image nodes show no image after the run: {images}"
    if example.trainer is None:
        assert new == [], new
        _assert_no_problems(ui, mark)
        return
    wf_api = ex.apply_api(ex.api(name), ex.tiny_changes(ex.api(name), steps=3, preview_every=2))
    total = ex.step_total(example, wf_api)
    _assert_placement(obs.before[example.trainer], ui.mode, "before the run")
    _assert_trainer_run(obs, example.trainer, total, ui.mode, name)
    assert any(s["images"] for s in obs.running(example.trainer)), "no preview image appeared on the node"
    final = obs.final[example.trainer]
    _assert_placement(final, ui.mode, "after the run")
    assert final["status"] == "done", final
    assert re.match(rf"done · step {total}/{total} · \d+:\d\d$", final["text"]), final["text"]
    assert new and final["message"].startswith("saved ") and all(f in final["message"] for f in new
                                                                    if f.endswith(".safetensors")), (final, new)
    assert final["images"], "no image on the trainer after the run"
    _assert_no_problems(ui, mark)


def test_cancel_in_the_browser_keeps_the_partial_file(ui, ui_server, object_info):
    from browser.ui_harness import run_workflow_in_browser

    mark = ui.mark()
    example = ex.EXAMPLES["domainstudio_text"]
    ex.write_inputs(os.path.join(ui_server.base, "input"), example)
    steps = 40
    wf = _tiny_ui("domainstudio_text", object_info, steps=steps, preview_every=0, on_cancel="keep",
                  train_seed=20 + MODES.index(ui.mode), save_name=f"browser_cancel_{ui.mode}")
    before = ex.model_files(ui_server)
    obs = run_workflow_in_browser(ui, wf, label="example-cancel", timeout=600, interrupt_at_step=2,
                                  watch=[example.trainer])
    assert obs.interrupted_at is not None, obs.summary()
    fin = obs.final[example.trainer]
    _assert_placement(fin, ui.mode, "after cancel")
    assert fin["status"] == "cancelled" and "ETA" not in fin["text"], fin
    step = fin["step"]
    assert 2 <= step < steps, fin
    partial = f"browser_cancel_{ui.mode}_partial_{step}"
    assert fin["message"] == f"kept {partial}.safetensors", fin["message"]
    assert sorted(ex.model_files(ui_server) - before) == [f"{partial}.dsstate", f"{partial}.safetensors"]
    _assert_no_problems(ui, mark)
