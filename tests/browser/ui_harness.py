"""Drive the real ComfyUI frontend in Debian's chromium (Playwright, headless) against a real server,
and observe what the DomainStudio extension shows inside the nodes.

Used by tests/test_browser_ui.py; written so the same calls serve any workflow whose nodes are
DomainStudio_* trainers (the fake test trainer or the real ones)::

    with open_page(browser, server, vue_nodes=False, shots_dir=...) as ui:
        obs = run_workflow_in_browser(ui, workflow_ui_json, label="run1")
        # obs.samples[node_id]: what the node showed over time; obs.final[node_id]: at the end

Everything is read from the page (DOM geometry, text, SVG points, loaded <img> elements), not from
the extension's internals. Nothing here reaches the network beyond the local server: other requests
are aborted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

CHROMIUM = os.environ.get("DS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync", "--disable-dev-shm-usage"]
PREFIX = "DomainStudio_"
WIDGET = "domainstudio_progress"
PACK_JS = "/extensions/ComfyUI-DomainStudio/"
FINAL = ("done", "cancelled", "error")

# One snapshot of every DomainStudio_* node, read from the page. Geometry is in CSS pixels.
SNAPSHOT_JS = r"""
(args) => {
  const { widgetName, prefix } = args;
  const out = {};
  const graph = window.app?.graph;
  if (!graph) return out;
  const canvas = window.app.canvas;
  const vueMode = !!document.querySelector('[data-node-id]');
  const titleH = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  for (const node of graph._nodes ?? graph.nodes ?? []) {
    const type = String(node.comfyClass ?? node.type ?? "");
    if (!type.startsWith(prefix)) continue;
    const id = String(node.id);
    const w = (node.widgets ?? []).find((x) => x?.name === widgetName);
    const el = w?.element ?? null;
    const r = el && document.contains(el) ? el.getBoundingClientRect() : null;
    const cs = el && document.contains(el) ? getComputedStyle(el) : null;
    const visible = !!(r && r.width > 20 && r.height > 20 && cs.display !== "none" && cs.visibility !== "hidden");
    // The node's body in screen coordinates: the Vue node's element, or the canvas rectangle below the title.
    let body = null, title = null, vueEl = null;
    if (vueMode) {
      vueEl = document.querySelector(`[data-node-id="${CSS.escape(id)}"]`);
      if (vueEl) {
        const b = vueEl.getBoundingClientRect();
        body = { x: b.x, y: b.y, w: b.width, h: b.height };
      }
    } else if (canvas?.ds && canvas.canvas) {
      const c = canvas.canvas.getBoundingClientRect(), s = canvas.ds.scale, o = canvas.ds.offset;
      const x = c.x + (node.pos[0] + o[0]) * s, y = c.y + (node.pos[1] + o[1]) * s;
      body = { x, y, w: node.size[0] * s, h: node.size[1] * s };
      title = { x, y: y - titleH * s, w: node.size[0] * s, h: titleH * s };
    }
    const tol = 2;
    const inside = !!(r && body && r.left >= body.x - tol && r.right <= body.x + body.w + tol
                      && r.top >= body.y - tol && r.bottom <= body.y + body.h + tol);
    // Over the title: classic mode knows the title's rectangle; a Vue node's title is its first ~24 px.
    const overTitle = !!(r && (title ? r.top < title.y + title.h - tol : body && r.top < body.y + 24));
    const imgs = [];
    if (vueEl) {
      for (const img of vueEl.querySelectorAll("img")) {
        if (img.complete && img.naturalWidth > 0) imgs.push(img.currentSrc || img.src);
      }
    } else {
      for (const img of node.imgs ?? []) {
        if (img?.complete && img.naturalWidth > 0) imgs.push(img.currentSrc || img.src);
      }
    }
    const q = (sel) => el?.querySelector(sel);
    const lines = el ? [...el.querySelectorAll("svg polyline")].map((p) => ({
      term: p.dataset.term, points: (p.getAttribute("points") || "").trim().split(/\s+/).filter(Boolean).length,
    })) : [];
    out[id] = {
      type, hasWidget: !!w, connected: !!(el && document.contains(el)), visible, inside, overTitle,
      inVueNode: !!(vueEl && el && vueEl.contains(el)), inDomWidgetLayer: !!el?.closest?.(".dom-widget"),
      rect: r ? { x: r.x, y: r.y, w: r.width, h: r.height } : null, body,
      status: el?.dataset.dsStatus ?? null, step: Number(el?.dataset.dsStep ?? 0),
      total: Number(el?.dataset.dsTotal ?? 0), promptId: el?.dataset.dsPrompt ?? "",
      points: Number(el?.dataset.dsPoints ?? 0), logScale: el?.dataset.dsLog === "1",
      text: q(".domainstudio-progress-text")?.textContent ?? null,
      message: q(".domainstudio-progress-message")?.textContent ?? "",
      legend: [...(el?.querySelectorAll(".domainstudio-progress-legend [data-term]") ?? [])].map((x) => x.dataset.term),
      lines, images: imgs,
    };
  }
  return out;
}
"""


# Where every node of the loaded graph is on screen, and what covers it. Node rectangles: the Vue
# node's element (Nodes 2.0), or the canvas rectangle of the node with its title bar (classic).
# Each node is probed at 9 points with elementFromPoint: in classic mode a point must hit the canvas
# or a DOM widget (node widgets are DOM elements over the canvas), in Nodes 2.0 the node's own
# element. Notifications (toasts, the missing-model notice: they float above everything and go away)
# are hidden while probing.
LAYOUT_JS = r"""
() => {
  const notices = [...document.querySelectorAll('.p-toast, [role="status"], [role="alert"]')]
    .filter((e) => e.style.visibility !== 'hidden');
  for (const t of notices) t.style.visibility = 'hidden';
  const canvas = window.app.canvas, graph = window.app.graph;
  const vue = !!document.querySelector('[data-node-id]');
  const titleH = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  const c = canvas.canvas.getBoundingClientRect(), s = canvas.ds.scale, o = canvas.ds.offset;
  const describe = (el) => el ? `${el.tagName.toLowerCase()}${el.id ? '#' + el.id : ''}.${String(el.className?.baseVal ?? el.className ?? '').split(' ').slice(0, 3).join('.')}` : 'nothing';
  const nodes = [];
  for (const node of graph._nodes ?? graph.nodes ?? []) {
    const id = String(node.id);
    const el = vue ? document.querySelector(`[data-node-id="${CSS.escape(id)}"]`) : null;
    let r;
    if (el) { const b = el.getBoundingClientRect(); r = { x: b.x, y: b.y, w: b.width, h: b.height }; }
    else r = { x: c.x + (node.pos[0] + o[0]) * s, y: c.y + (node.pos[1] - titleH + o[1]) * s,
               w: node.size[0] * s, h: (node.size[1] + titleH) * s };
    const covered = [];
    for (const fx of [0.06, 0.5, 0.94]) for (const fy of [0.04, 0.5, 0.96]) {
      const x = r.x + r.w * fx, y = r.y + r.h * fy;
      const hit = document.elementFromPoint(x, y);
      const ok = !!hit && (vue ? !!el?.contains(hit)
        : hit === canvas.canvas || !!hit.closest?.('.dom-widget, .dom-widget-container'));
      if (!ok) covered.push({ x: Math.round(x), y: Math.round(y), by: describe(hit), parent: describe(hit?.parentElement) });
    }
    nodes.push({ id, type: String(node.comfyClass ?? node.type), title: node.title, rect: r, covered });
  }
  for (const t of notices) t.style.visibility = '';
  return { vue, scale: s, offset: [o[0], o[1]], canvas: { x: c.x, y: c.y, w: c.width, h: c.height }, nodes };
}
"""


@dataclass
class Observation:
    """What run_workflow_in_browser saw. samples[node_id] is the list of distinct snapshots in time
    order (each with "t", seconds since queueing); final[node_id] the last one."""

    label: str
    samples: dict[str, list[dict]] = field(default_factory=dict)
    final: dict[str, dict] = field(default_factory=dict)
    before: dict[str, dict] = field(default_factory=dict)
    screenshots: list[str] = field(default_factory=list)
    interrupted_at: int | None = None
    seconds: float = 0.0

    def running(self, node_id: str) -> list[dict]:
        return [s for s in self.samples.get(node_id, []) if s["status"] == "running"]

    def summary(self) -> str:
        return json.dumps({"label": self.label, "final": self.final, "samples": {k: len(v) for k, v in self.samples.items()},
                           "interrupted_at": self.interrupted_at, "seconds": round(self.seconds, 1)}, indent=1)


class BrowserUI:
    """One page of the frontend on `server`, in a fresh chromium profile. Use through open_page()."""

    def __init__(self, page, server, shots_dir: str, vue_nodes: bool):
        self.page, self.server, self.shots_dir, self.vue_nodes = page, server, shots_dir, vue_nodes
        self.console: list[dict] = []
        self.page_errors: list[str] = []
        self.failed: list[dict] = []
        page.on("console", self._on_console)
        page.on("pageerror", lambda e: self.page_errors.append(f"{e}\n{getattr(e, 'stack', '')}"))
        page.on("requestfailed", lambda r: self.failed.append({"url": r.url, "why": r.failure}))
        page.on("response", lambda r: r.status >= 400 and self.failed.append({"url": r.url, "why": r.status}))

    def _on_console(self, msg):
        if msg.type in ("error", "warning"):
            self.console.append({"type": msg.type, "text": msg.text, "url": (msg.location or {}).get("url", "")})

    # ---------------------------------------------------------------- page
    def open(self, timeout: float = 120.0) -> None:
        self.page.goto(self.server.url, wait_until="domcontentloaded", timeout=timeout * 1000)
        self.page.wait_for_function("() => !!(window.app && window.app.graph && window.app.canvas)",
                                    timeout=timeout * 1000)
        self.page.wait_for_timeout(500)
        self.page.keyboard.press("Escape")  # the Templates dialog on a first visit

    def setting(self, name: str):
        return self.page.evaluate("n => window.app.extensionManager?.setting?.get?.(n)", name)

    def refresh_node_definitions(self) -> None:
        """Re-read the server's node definitions (new model files in the combos), like the R key."""
        self.page.evaluate("async () => { await window.app.refreshComboInNodes?.(); }")

    def frontend_version(self) -> str:
        return self.page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ ?? ''")

    def close_dialogs(self, tries: int = 4) -> None:
        """Close the frontend's modal dialogs (e.g. the error dialog of a failed run) with Escape."""
        for _ in range(tries):
            if not self.page.evaluate("() => !!document.querySelector('.p-dialog-mask')"):
                return
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(300)

    def load_workflow(self, workflow: dict) -> None:
        self.close_dialogs()
        self.page.evaluate("wf => window.app.loadGraphData(wf)", workflow)
        self.page.wait_for_timeout(300)
        # Nodes 2.0 mounts its DOM nodes asynchronously.
        if self.vue_nodes:
            self.page.wait_for_selector("[data-node-id]", timeout=30000)
        self.page.wait_for_timeout(300)

    def snapshot(self) -> dict[str, dict]:
        return self.page.evaluate(SNAPSHOT_JS, {"widgetName": WIDGET, "prefix": PREFIX})

    def layout(self) -> dict:
        """Screen geometry of every node of the loaded graph and what covers it (LAYOUT_JS)."""
        return self.page.evaluate(LAYOUT_JS)

    def queue(self) -> None:
        self.page.evaluate("() => window.app.queuePrompt(0, 1)")

    def screenshot(self, name: str) -> str:
        path = os.path.join(self.shots_dir, f"{name}.png")
        self.page.screenshot(path=path)
        return path

    # ---------------------------------------------------------------- diagnostics
    def mark(self) -> tuple[int, int, int]:
        """A position in the logs, for our_problems(since=...)."""
        return len(self.console), len(self.page_errors), len(self.failed)

    def our_problems(self, since: tuple[int, int, int] = (0, 0, 0)) -> list[str]:
        """Console errors/warnings and failures that come from this pack's extension. The frontend's
        own noise (no internet, missing user.css, ...) is left out; uncaught page errors never are."""
        out = [f"pageerror: {e}" for e in self.page_errors[since[1]:]]
        for m in self.console[since[0]:]:
            here = m["url"].startswith(self.server.url)
            if "domainstudio" in m["text"].lower() or (here and PACK_JS in m["url"]):
                out.append(f"console {m['type']}: {m['text']} ({m['url']})")
        for f in self.failed[since[2]:]:
            if f["url"].startswith(self.server.url + PACK_JS):
                out.append(f"request failed: {f['url']} ({f['why']})")
        return out

    def dump_logs(self) -> str:
        path = os.path.join(self.shots_dir, "browser_console.json")
        with open(path, "w") as f:
            json.dump({"console": self.console, "page_errors": self.page_errors, "failed": self.failed}, f, indent=1)
        return path


@contextlib.contextmanager
def open_page(browser_type, server, *, vue_nodes: bool, shots_dir: str, viewport=(1400, 900)):
    """A fresh chromium profile on `server` with Nodes 2.0 on or off (the user setting
    Comfy.VueNodes.Enabled, stored through the server's settings API before the page loads)."""
    os.makedirs(shots_dir, exist_ok=True)
    set_setting(server, "Comfy.VueNodes.Enabled", bool(vue_nodes))
    set_setting(server, "Comfy.TutorialCompleted", True)
    profile = tempfile.mkdtemp(prefix="ds_chromium_")
    ctx = browser_type.launch_persistent_context(
        profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
        viewport={"width": viewport[0], "height": viewport[1]})
    try:
        local = server.url + "/"
        ws = server.url.replace("http://", "ws://", 1) + "/"
        ctx.route("**/*", lambda route: route.continue_() if route.request.url.startswith((local, ws))
                  else route.abort())
        page = ctx.pages[0] if ctx.pages else ctx.new_page()
        ui = BrowserUI(page, server, shots_dir, vue_nodes)
        ui.open()
        yield ui
    finally:
        with contextlib.suppress(Exception):
            ui.dump_logs()
        with contextlib.suppress(Exception):
            ctx.close()
        shutil.rmtree(profile, ignore_errors=True)


def set_setting(server, name: str, value) -> None:
    req = urllib.request.Request(f"{server.url}/settings/{name}", data=json.dumps(value).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        r.read()


def _queue_empty(server) -> bool:
    q = server.get("/queue")
    return not q.get("queue_running") and not q.get("queue_pending")


def run_workflow_in_browser(ui: BrowserUI, workflow: dict | None, *, label: str, timeout: float = 600.0,
                            interrupt_at_step: int | None = None, poll: float = 0.25,
                            load: bool = True, settle_timeout: float = 10.0,
                            watch: list[str] | None = None) -> Observation:
    """Load `workflow` (UI format; None or load=False: run the graph already in the page), queue it,
    and watch every DomainStudio_* node until the server's queue is empty and each node that shows a
    run of this prompt shows a final status (done/cancelled/error). Fails when the queue has been
    empty for `settle_timeout` s without that (a node ComfyUI served from its cache runs no new run:
    change an input to re-run it). With interrupt_at_step, POST /interrupt once a node shows that
    step. watch: the node ids whose final state to wait for (default: every node showing a new run;
    [] for a graph without a trainer: the queue emptying is enough). Screenshots (label-*.png in
    the page's shots_dir): before, early, mid, final."""
    obs = Observation(label)
    if load and workflow is not None:
        ui.load_workflow(workflow)
    obs.before = ui.snapshot()
    obs.screenshots.append(ui.screenshot(f"{label}-0-before"))
    old_prompts = {k: v["promptId"] for k, v in obs.before.items()}
    start = time.time()
    ui.queue()
    shots = {"early": False, "mid": False}
    idle_since = None
    while True:
        now = time.time() - start
        snap = ui.snapshot()
        for nid, s in snap.items():
            s["t"] = round(now, 2)
            seq = obs.samples.setdefault(nid, [])
            sig = {k: v for k, v in s.items() if k != "t"}
            if not seq or {k: v for k, v in seq[-1].items() if k != "t"} != sig:
                seq.append(s)
        # Nodes showing a run queued now (a node the prompt does not execute keeps its old run).
        new_run = [s for nid, s in snap.items() if s["promptId"] and s["promptId"] != old_prompts.get(nid)]
        running = [s for s in new_run if s["status"] == "running"]
        if not shots["early"] and any(s["points"] >= 2 for s in running):
            obs.screenshots.append(ui.screenshot(f"{label}-1-early"))
            shots["early"] = True
        if not shots["mid"] and any(s["total"] and s["step"] * 2 >= s["total"] for s in running):
            obs.screenshots.append(ui.screenshot(f"{label}-2-mid"))
            shots["mid"] = True
        if interrupt_at_step is not None and obs.interrupted_at is None and any(
                s["step"] >= interrupt_at_step for s in running):
            obs.interrupted_at = max(s["step"] for s in running)
            ui.server.post("/interrupt", {})
        if watch is None:
            finished = bool(new_run) and all(s["status"] in FINAL for s in new_run)
        else:
            finished = all(snap.get(n, {}).get("promptId") not in ("", None, old_prompts.get(n))
                           and snap[n]["status"] in FINAL for n in watch)
        if _queue_empty(ui.server):
            idle_since = idle_since or time.time()
            if finished and time.time() - idle_since > 0.5:  # let late events (executed, images) land
                break
            if time.time() - idle_since > settle_timeout:
                obs.screenshots.append(ui.screenshot(f"{label}-unsettled"))
                raise AssertionError(f"{label}: the prompt ended {settle_timeout} s ago but the nodes show no final "
                                     f"state of a new run (cached, or no display?): {json.dumps(snap)[:2000]}")
        else:
            idle_since = None
        if now > timeout:
            obs.screenshots.append(ui.screenshot(f"{label}-timeout"))
            raise TimeoutError(f"{label}: no final state within {timeout} s; last: {json.dumps(snap)[:2000]}")
        time.sleep(poll)
    obs.final = ui.snapshot()
    obs.seconds = time.time() - start
    obs.screenshots.append(ui.screenshot(f"{label}-3-final"))
    return obs
