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


DRIVER = r"""
import assert from "node:assert/strict";
import { app } from "./scripts/app.js";
import { api } from "./scripts/api.js";
await import("./extensions/ds/domainstudio.js");

assert.equal(app.exts.length, 1);
const ext = app.exts[0];
assert.equal(ext.name, "DomainStudio.Progress");
ext.setup();

function Train() {}
await ext.beforeRegisterNodeDef(Train, { name: "DomainStudio_Train" });
const foreign = function () { return "orig"; };
function KSampler() {}
KSampler.prototype.onDrawForeground = foreign;
await ext.beforeRegisterNodeDef(KSampler, { name: "KSampler" });
assert.equal(KSampler.prototype.onDrawForeground, foreign, "foreign nodes must not be touched");
await ext.beforeRegisterNodeDef(undefined, undefined);  // defensive

const n = new Train(); n.id = 7; n.comfyClass = "DomainStudio_Train"; n.size = [300, 120];
const k = new KSampler(); k.id = 8; k.comfyClass = "KSampler";
app.graph.nodes.set(7, n); app.graph.nodes.set(8, k);

const texts = [];
const ctx = { save() {}, restore() {}, fillText(t) { texts.push(String(t)); } };
const draw = () => { texts.length = 0; n.onDrawForeground(ctx); return texts.join("|"); };
const send = (type, detail) => api.dispatchEvent(new CustomEvent(type, { detail }));

assert.equal(draw(), "");
send("progress", { value: 3, max: 10, node: "7", prompt_id: "p1" });
let s = draw();
assert.match(s, /3 \/ 10/); assert.match(s, /ETA/); assert.match(s, /\d:\d\d/);
send("progress", { value: 5, max: 10, node: "8", prompt_id: "p1" });  // not ours: ignored
assert.match(draw(), /3 \/ 10/);
send("executed", { node: "7", prompt_id: "p1" });
assert.equal(draw(), "");

send("executing", { node: "7" });
send("progress", { value: 1, max: 4, prompt_id: "p2" });  // no node field: uses executing node
assert.match(draw(), /1 \/ 4/);
send("execution_interrupted", { node_id: "7", prompt_id: "p2" });
assert.match(draw(), /cancelled/);

send("progress", { value: 2, max: 4, node: "7", prompt_id: "p3" });
send("execution_error", { node_id: "7" });
assert.equal(draw(), "");

for (const t of ["progress", "executed", "execution_error", "execution_interrupted", "executing"]) {
  send(t, undefined); send(t, null); send(t, {});
}
n.onDrawForeground(undefined);
n.flags = { collapsed: true };
send("progress", { value: 1, max: 2, node: 7 });
assert.equal(draw(), "", "nothing drawn on a collapsed node");
console.log("JS-OK");
process.exit(0);  // the extension's redraw ticker would keep node alive
"""


def test_js_behaviour(tmp_path):
    (tmp_path / "package.json").write_text('{"type": "module"}')
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "api.js").write_text("export const api = new EventTarget();\n")
    (tmp_path / "scripts" / "app.js").write_text(
        "export const app = { exts: [], registerExtension(e) { this.exts.push(e); },\n"
        "  graph: { nodes: new Map(), getNodeById(id) { return this.nodes.get(Number(id)) ?? null; },\n"
        "           setDirtyCanvas() {} } };\n")
    (tmp_path / "extensions" / "ds").mkdir(parents=True)
    shutil.copy(JS, tmp_path / "extensions" / "ds" / "domainstudio.js")
    (tmp_path / "driver.js").write_text(DRIVER)
    p = subprocess.run([_node(), "driver.js"], capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert p.returncode == 0 and "JS-OK" in p.stdout, p.stdout + p.stderr
