"""Tests of install.py (the dependency installer run by ComfyUI-Manager / A1111) and a syntax +
behaviour check of js/domainstudio.js under node. Needs neither ComfyUI nor network access; torch
must be installed in the test interpreter (the installer refuses to do anything without it)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import os
import shutil
import subprocess
import sys
from contextlib import redirect_stdout

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL = os.path.join(REPO, "install.py")
JS = os.path.join(REPO, "js", "domainstudio.js")
MISSING = "definitely-not-installed-pkg-xyz"


def load_install(name="ds_install_under_test"):
    spec = importlib.util.spec_from_file_location(name, INSTALL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def reqfile(tmp_path):
    def make(*lines):
        p = tmp_path / "requirements.txt"
        p.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return str(p)

    return make


def _run_subprocess(args, env=None):
    full_env = dict(os.environ, **(env or {}))
    p = subprocess.run([sys.executable, INSTALL, *args], capture_output=True, text=True, timeout=60,
                       env=full_env, cwd=REPO)
    return p.returncode, p.stdout + p.stderr


def _run_import(args, env=None):
    assert not env
    mod = load_install()
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = mod.main(list(args))
    return rc, buf.getvalue()


@pytest.fixture(params=["subprocess", "import"])
def run(request):
    """Runs install.py either as `python install.py ...` or through main(argv) of the imported file."""
    return _run_subprocess if request.param == "subprocess" else _run_import


def _line(out, prefix):
    hits = [ln for ln in out.splitlines() if prefix in ln]
    return hits[0] if hits else ""


def test_torch_present_in_test_interpreter():
    # Precondition of the dry-run tests below (the installer exits non-zero without torch).
    assert importlib.metadata.version("torch")


def test_satisfied_requirement_installs_nothing(run, reqfile):
    rc, out = run(["--dry-run", "--requirements", reqfile("pytest>=1.0")])
    assert rc == 0, out
    assert "all requirements satisfied" in out
    assert "would run" not in out and "would install" not in out


def test_too_old_requirement_is_listed(run, reqfile):
    rc, out = run(["--dry-run", "--requirements", reqfile("pytest>=999")])
    assert rc == 0, out
    assert "too old pytest" in out
    assert "pytest" in _line(out, "would install:")
    cmd = _line(out, "would run:")
    assert '"pytest>=999"' in cmd and "-m pip install" in cmd and sys.executable in cmd
    assert "all requirements satisfied" not in out


def test_missing_package_is_listed(run, reqfile):
    rc, out = run(["--dry-run", "--requirements", reqfile(f"{MISSING}>=1.0", "pytest>=1.0")])
    assert rc == 0, out
    assert _line(out, "would install:").endswith(MISSING)  # only the missing one, not pytest
    assert f'"{MISSING}>=1.0"' in _line(out, "would run:")


def test_torch_is_never_listed(run, reqfile):
    rc, out = run(["--dry-run", "--requirements", reqfile("torch>=999", MISSING)])
    assert rc == 0, out
    assert "skip    torch" in out
    assert "torch" not in _line(out, "would install:")
    cmd = _line(out, "would run:")
    assert MISSING in cmd and "torch>=999" not in cmd
    # pip gets a constraint pinning the installed torch, so no dependency can replace it
    assert f"torch=={importlib.metadata.version('torch')}" in _line(out, "constraints.txt> =")


def test_only_torch_is_all_satisfied(run, reqfile):
    rc, out = run(["--dry-run", "--requirements", reqfile("torch>=999")])
    assert rc == 0, out
    assert "all requirements satisfied" in out


def test_comments_and_blank_lines_ignored(run, reqfile):
    path = reqfile("# a comment", "", "   ", "   # indented comment", "pytest>=1.0  # trailing comment",
                   f"# {MISSING}>=1")
    rc, out = run(["--dry-run", "--requirements", path])
    assert rc == 0, out
    assert "all requirements satisfied" in out
    assert MISSING not in out


def test_missing_requirements_file_is_an_error(run, tmp_path):
    rc, out = run(["--dry-run", "--requirements", str(tmp_path / "nope.txt")])
    assert rc != 0
    assert "cannot read requirements" in out and "Traceback" not in out


def test_real_run_is_idempotent_and_runs_no_pip(reqfile, monkeypatch):
    mod = load_install()
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("pip must not run"))
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert mod.main(["--requirements", reqfile("pytest>=1.0", "torch>=999")]) == 0
        assert mod.main(["--requirements", reqfile("pytest>=1.0", "torch>=999")]) == 0
    assert buf.getvalue().count("all requirements satisfied") == 2


def test_real_run_pip_command_and_torch_pin(reqfile, monkeypatch):
    mod = load_install()
    seen = {}

    def fake_call(cmd, *a, **k):
        seen["cmd"] = list(cmd)
        with open(cmd[cmd.index("-c") + 1], encoding="utf-8") as f:
            seen["constraints"] = f.read()
        return 0

    monkeypatch.setattr(subprocess, "call", fake_call)
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = mod.main(["--requirements", reqfile("pytest>=999", "torch>=999", MISSING)])
    assert rc == 0, buf.getvalue()
    cmd = seen["cmd"]
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"]
    assert cmd[-2:] == ["pytest>=999", MISSING]
    assert not any(a.startswith("torch") for a in cmd)
    assert f"torch=={importlib.metadata.version('torch')}" in seen["constraints"].splitlines()
    assert not os.path.exists(cmd[cmd.index("-c") + 1]), "temporary constraints file left behind"


def test_missing_torch_is_a_clear_error(reqfile, monkeypatch):
    mod = load_install()
    real = mod.installed_version
    monkeypatch.setattr(mod, "installed_version", lambda n: None if n.lower().startswith("torch") else real(n))
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("pip must not run"))
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = mod.main(["--dry-run", "--requirements", reqfile("torch>=2.1", "pytest>=999")])
    out = buf.getvalue()
    assert rc != 0
    assert "PyTorch (torch) is not installed" in out and "pytorch.org" in out
    assert "would run" not in out


def test_missing_torchvision_is_not_installed(reqfile, monkeypatch):
    mod = load_install()
    real = mod.installed_version
    monkeypatch.setattr(mod, "installed_version", lambda n: None if n.lower() == "torchvision" else real(n))
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("pip must not run"))
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = mod.main(["--requirements", reqfile("torchvision>=0.1", MISSING)])
    assert rc != 0
    assert "torchvision missing" in buf.getvalue()


def test_pip_failure_is_reported_clearly(reqfile, tmp_path):
    empty = tmp_path / "empty-index"
    empty.mkdir()
    env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(empty), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    rc, out = _run_subprocess(["--requirements", reqfile(f"{MISSING}>=1.0", "pytest>=1.0")], env=env)
    assert rc != 0, out
    err = _line(out, "ERROR: pip failed")
    assert err, out
    assert MISSING in err and "exit code" in err
    assert "pytest" not in err.split("retry")[0]  # only the packages it tried to install are named
    assert "Traceback" not in out


def test_fallback_version_compare(monkeypatch):
    mod = load_install()
    monkeypatch.setattr(mod, "_PkgSpecifierSet", None)
    assert mod.satisfies("2.1.0+cu121", ">=2.1")
    assert mod.satisfies("0.10.0", ">=0.9")  # numeric, not string, compare
    assert not mod.satisfies("0.4.1", ">=0.4.2")
    assert not mod.satisfies("1.5", ">=1.0,<1.5")
    assert mod.satisfies("1.4.9", "~=1.4.2") and not mod.satisfies("1.5.0", "~=1.4.2")
    assert mod.satisfies("2.0.3", "==2.0.*") and not mod.satisfies("2.1", "==2.0.*")
    assert mod.satisfies("3", "")


def test_fallback_parser_without_packaging(monkeypatch):
    mod = load_install()
    monkeypatch.setattr(mod, "_PkgRequirement", None)
    r = mod.parse_line("Pillow[extra] >= 9.5, <99 ; python_version >= '3'  # comment")
    assert (r.key, r.spec) == ("pillow", ">=9.5,<99")
    assert mod.parse_line("  # only a comment") is None and mod.parse_line("") is None
    assert mod.parse_line("--index-url https://example.invalid/simple") is None


def test_import_under_other_name_runs_nothing(capsys):
    load_install("install_probe")
    assert capsys.readouterr().out == ""


def test_old_a1111_exec_does_not_exit_or_read_host_argv(monkeypatch, capsys):
    # Old A1111 launch: exec(code, {"__file__": path}) with the web UI's own argv.
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, *a, **k: calls.append(cmd) or 0)
    monkeypatch.setattr(sys, "argv", ["webui.py", "--xformers", "--listen"])
    with open(INSTALL, encoding="utf-8") as f:
        code = compile(f.read(), INSTALL, "exec")
    exec(code, {"__file__": INSTALL})  # must neither raise SystemExit nor argparse errors
    out = capsys.readouterr().out
    assert "[DomainStudio]" in out and "safetensors" in out  # read the pack's requirements.txt
    for cmd in calls:
        assert not any(a.split("=")[0].split(">")[0] in ("torch", "torchvision", "torchaudio") for a in cmd)


# ----------------------------------------------------------------------------- js/domainstudio.js

def _node():
    node = shutil.which("node")
    assert node, "node (Node.js >= 18) must be on PATH to check js/domainstudio.js"
    return node


def test_js_syntax(tmp_path):
    copy = tmp_path / "domainstudio.mjs"
    shutil.copy(JS, copy)
    p = subprocess.run([_node(), "--check", str(copy)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr


# A minimal DOM (what the extension's widget uses: elements with style, dataset, attributes, children
# and textContent) so the extension's event handling and rendering run under Node. The real frontend
# (both renderers) is covered by tests/test_browser_ui.py in a browser.
FAKE_DOM = r"""
class Node_ {
  constructor(tag) {
    this.tagName = tag; this.style = { cssText: "" }; this.dataset = {}; this.attrs = {};
    this.children = []; this.ownText = ""; this.className = "";
  }
  get textContent() { return this.ownText + this.children.map((c) => c.textContent).join(""); }
  set textContent(v) { this.ownText = String(v); this.children = []; }
  append(...cs) { for (const c of cs) this.children.push(typeof c === "string" ? new Text_(c) : c); }
  appendChild(c) { this.children.push(c); return c; }
  replaceChildren(...cs) { this.children = []; this.append(...cs); }
  setAttribute(k, v) { this.attrs[k] = String(v); }
  getAttribute(k) { return k in this.attrs ? this.attrs[k] : null; }
  all(tag) { return this.children.flatMap((c) => (c.tagName === tag ? [c] : []).concat(c.all ? c.all(tag) : [])); }
}
class Text_ { constructor(t) { this.textContent = String(t); } }
globalThis.document = {
  createElement: (t) => new Node_(t), createElementNS: (ns, t) => new Node_(t), createTextNode: (t) => new Text_(t),
};
"""

DRIVER = r"""
import assert from "node:assert/strict";
import "./fake_dom.js";
import { app } from "./scripts/app.js";
import { api } from "./scripts/api.js";
await import("./extensions/ds/domainstudio.js");

assert.equal(app.exts.length, 1);
const ext = app.exts[0];
assert.equal(ext.name, "DomainStudio.Progress");
ext.setup();

function makeNode(id, comfyClass) {
  return {
    id, comfyClass, graph: app.graph, size: [200, 80], widgets: [],
    addDOMWidget(name, type, el, opts) { const w = { name, type, el, opts }; this.widgets.push(w); return w; },
    computeSize() { return [240, 230]; }, setSize(s) { this.size = s; },
  };
}
const train = makeNode(7, "DomainStudio_Train");
const ksampler = makeNode(8, "KSampler");
app.graph.nodes.set(7, train); app.graph.nodes.set(8, ksampler);
ext.nodeCreated(train); ext.nodeCreated(ksampler); ext.nodeCreated(undefined);  // defensive
assert.equal(ksampler.widgets.length, 0, "foreign nodes get no widget");
assert.equal(train.widgets.length, 1);
const w = train.widgets[0];
assert.equal(w.serialize, false, "the display is not an input: never in the prompt or widgets_values");
assert.equal(w.opts.getMinHeight() >= 100, true);
assert.deepEqual(train.size, [240, 230], "an old, smaller node grows to fit the chart");
ext.nodeCreated(train);
assert.equal(train.widgets.length, 1, "one widget per node");

const el = w.el;
const text = () => el.children[0].textContent;
const legend = () => el.children[2].children.map((c) => c.textContent);
const lines = () => el.all("polyline");
const send = (type, detail) => api.dispatchEvent(new CustomEvent(type, { detail }));
const event = (d) => send("domainstudio.progress", d);

assert.equal(el.dataset.dsStatus, "idle"); assert.equal(text(), "not trained yet");
send("execution_start", { prompt_id: "p1" });
send("executing", { node: "7", prompt_id: "p1" });
assert.equal(el.dataset.dsStatus, "starting"); assert.match(text(), /starting/);

const loss = { steps: [1, 2, 3], terms: { total: [1.0, 0.5, 0.2], "100×img": [0.01, 0.02, 0.03] } };
event({ node: "7", prompt_id: "p1", status: "running", stage: "train", step: 3, total: 10, elapsed: 1.5,
        s_per_step: 0.5, eta: 3.5, text: "train · step 3/10 · 0.50 s/step · ETA 0:04", loss, message: "" });
assert.equal(el.dataset.dsStatus, "running");
assert.equal(el.dataset.dsStep, "3"); assert.equal(el.dataset.dsTotal, "10"); assert.equal(el.dataset.dsPrompt, "p1");
assert.equal(el.dataset.dsPoints, "3");
assert.equal(el.dataset.dsLog, "1", "terms two decades apart: log scale");
assert.match(text(), /step 3\/10/); assert.match(text(), /ETA 0:04/);
assert.deepEqual(legend(), ["total 0.2", "100×img 0.03"]);
const pl = lines();
assert.equal(pl.length, 2);
const total = pl.find((p) => p.dataset.term === "total");
assert.equal(total.getAttribute("stroke-dasharray"), "5 3", "the total is dashed over the terms");
assert.equal(total.getAttribute("points").split(" ").length, 3);

// A later event without history keeps the chart; events of other nodes and stock progress of a
// node that sends its own events change nothing.
event({ node: "7", prompt_id: "p1", status: "running", stage: "train", step: 4, total: 10 });
assert.equal(el.dataset.dsStep, "4"); assert.equal(el.dataset.dsPoints, "3");
event({ node: "8", prompt_id: "p1", status: "running", step: 9, total: 9, loss: { steps: [1], terms: { x: [1] } } });
assert.equal(el.dataset.dsStep, "4");
send("progress", { value: 9, max: 10, node: "7", prompt_id: "p1" });
assert.equal(el.dataset.dsStep, "4");

// Cancel: the run ends as cancelled, and no ETA stays on a finished run.
send("execution_interrupted", { prompt_id: "p1", node_id: "7" });
assert.equal(el.dataset.dsStatus, "cancelled"); assert.match(text(), /^cancelled/); assert.doesNotMatch(text(), /ETA/);

// A new run clears the old chart at once; stock progress stands in until our first event.
send("execution_start", { prompt_id: "p2" });
send("executing", { node: "7", prompt_id: "p2" });
assert.equal(el.dataset.dsStatus, "starting"); assert.equal(el.dataset.dsPoints, "0");
send("progress", { value: 2, max: 5, prompt_id: "p2" });  // no node field: the executing node
assert.equal(el.dataset.dsStatus, "running");
assert.equal(el.dataset.dsStep, "2"); assert.equal(el.dataset.dsTotal, "5");
send("execution_error", { prompt_id: "p2", node_id: "7", exception_message: "DomainStudio Train: boom\nTraceback" });
assert.equal(el.dataset.dsStatus, "error");
assert.equal(el.children[3].textContent, "DomainStudio Train: boom", "first line of the error");

// A finished run without a final event is settled when the prompt succeeds.
send("executing", { node: "7", prompt_id: "p3" });
event({ node: "7", prompt_id: "p3", status: "running", step: 1, total: 2,
        loss: { steps: [1], terms: { total: [0.3] } } });
assert.equal(el.dataset.dsLog, "0");
send("execution_success", { prompt_id: "p3" });
assert.equal(el.dataset.dsStatus, "done"); assert.match(text(), /^done/);

// Loading another workflow forgets finished runs (a new node with the same id shows nothing old).
ext.beforeConfigureGraph();
event({ node: "8", prompt_id: "p4", status: "running", step: 1, total: 1 });  // any event re-renders
assert.equal(el.dataset.dsStatus, "idle");

// Malformed events are ignored; a removed node is no longer rendered.
for (const t of ["domainstudio.progress", "progress", "executed", "executing", "execution_error",
                 "execution_interrupted", "execution_success"]) {
  send(t, undefined); send(t, null); send(t, {}); send(t, "garbage");
}
event({ node: "7", prompt_id: "p5", status: "bogus", step: "x", total: null,
        loss: { steps: [1, 2], terms: { a: [1] } } });  // unknown status, bad step, ragged history
assert.equal(el.dataset.dsStatus, "running");
assert.equal(el.dataset.dsStep, "0"); assert.equal(el.dataset.dsPoints, "0");
train.onRemoved();
event({ node: "7", prompt_id: "p6", status: "done", step: 2, total: 2 });
assert.equal(el.dataset.dsStatus, "running", "a removed node's widget is not updated");
console.log("JS-OK");
"""


def test_js_behaviour(tmp_path):
    """The extension under Node with a minimal DOM: only our nodes get the display widget (not
    serialized), and the progress / loss chart / status follow ComfyUI's and our events through a
    run, Cancel, an error, a new run and a workflow switch; malformed events are ignored."""
    (tmp_path / "package.json").write_text('{"type": "module"}')
    (tmp_path / "fake_dom.js").write_text(FAKE_DOM)
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "api.js").write_text("export const api = new EventTarget();\n")
    (tmp_path / "scripts" / "app.js").write_text(
        "export const app = { exts: [], registerExtension(e) { this.exts.push(e); },\n"
        "  graph: { nodes: new Map(), getNodeById(id) { return this.nodes.get(Number(id)) ?? null; },\n"
        "           setDirtyCanvas() {} } };\n")
    (tmp_path / "extensions" / "ds").mkdir(parents=True)
    shutil.copy(JS, tmp_path / "extensions" / "ds" / "domainstudio.js")
    (tmp_path / "driver.js").write_text(DRIVER, encoding="utf-8")
    p = subprocess.run([_node(), "driver.js"], capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert p.returncode == 0 and "JS-OK" in p.stdout, p.stdout + p.stderr
