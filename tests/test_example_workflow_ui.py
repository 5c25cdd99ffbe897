"""The UI-format example workflows (example_workflows/*_basic.json, what ComfyUI's template
browser loads) against a live server: in sync with the API-format example, structurally valid for the
node definitions the server reports, and equivalent to the API workflow."""

import importlib.util
import json
import os
import shlex
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = [pytest.mark.comfy, pytest.mark.e2e]

# (API-format workflow, its UI-format twin) per example.
PAIRS = [("domainstudio_api.json", "domainstudio_basic.json"), ("personalize_api.json", "personalize_basic.json")]
SCRIPT = os.path.join(REPO, "scripts", "api_to_ui.py")
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_MODES = {"fixed", "increment", "decrement", "randomize"}


def _load_script():
    spec = importlib.util.spec_from_file_location("ds_api_to_ui", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


conv = _load_script()


def _read(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


@pytest.fixture(scope="module", params=PAIRS, ids=[a.split("_")[0] for a, _ in PAIRS])
def pair(request):
    return request.param


@pytest.fixture(scope="module")
def api(pair):
    return _read(os.path.join(REPO, "example_workflows", pair[0]))


@pytest.fixture(scope="module")
def ui(pair):
    return _read(os.path.join(REPO, "example_workflows", pair[1]))


def _regen_hint(tmp_path, object_info, pair) -> str:
    saved = tmp_path / "object_info.json"
    saved.write_text(json.dumps(object_info))
    cmd = [sys.executable, "scripts/api_to_ui.py", f"example_workflows/{pair[0]}",
           "--object-info", str(saved), "-o", f"example_workflows/{pair[1]}"]
    return (f"example_workflows/{pair[1]} is out of date; regenerate it (in the repo root) with\n  "
            + shlex.join(cmd) + "\n(or --object-info http://127.0.0.1:8188 against a running ComfyUI with this pack)")


# ------------------------------------------------------------------ (a) in sync with the API workflow

def test_ui_workflow_matches_conversion_of_api_workflow(api, ui, object_info, tmp_path, pair):
    expected = conv.convert(api, object_info)
    if ui != expected:
        pytest.fail(_regen_hint(tmp_path, object_info, pair), pytrace=False)


def test_cli_reproduces_the_committed_file_byte_for_byte(object_info, tmp_path, pair):
    saved = tmp_path / "object_info.json"
    saved.write_text(json.dumps(object_info))
    out = tmp_path / "out.json"
    api_path, ui_path = (os.path.join(REPO, "example_workflows", f) for f in pair)
    r = subprocess.run([sys.executable, SCRIPT, api_path, "--object-info", str(saved), "-o", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    with open(ui_path, encoding="utf-8") as f:
        committed = f.read()
    if out.read_text(encoding="utf-8") != committed:
        pytest.fail(_regen_hint(tmp_path, object_info), pytrace=False)


# ------------------------------------------------------------------ (b) structure vs live object_info

def _inputs_in_order(node_def):
    """(name, spec, optional) in the frontend's order: input_order's required, then optional."""
    out = []
    for section in ("required", "optional"):
        specs = node_def["input"].get(section) or {}
        names = (node_def.get("input_order") or {}).get(section) or list(specs)
        out += [(n, specs[n], section == "optional") for n in names if n in specs]
    return out


def _type(spec):
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def _opts(spec):
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def _is_widget(spec):
    return _type(spec) in WIDGET_TYPES and not _opts(spec).get("forceInput")


def _has_control(name, spec):
    if _type(spec) != "INT":
        return False
    flag = _opts(spec).get("control_after_generate")
    return name in ("seed", "noise_seed") if flag is None else bool(flag)


def _choices(spec):
    return spec[0] if isinstance(spec[0], list) else _opts(spec).get("options")


def test_top_level_and_node_fields_follow_the_0_4_schema(ui):
    assert ui["version"] == 0.4
    assert isinstance(ui["nodes"], list) and isinstance(ui["links"], list)
    assert isinstance(ui["groups"], list) and isinstance(ui["config"], dict) and isinstance(ui["extra"], dict)
    ids = [n["id"] for n in ui["nodes"]]
    assert len(set(ids)) == len(ids) and all(isinstance(i, int) for i in ids)
    assert ui["last_node_id"] == max(ids)
    link_ids = [link[0] for link in ui["links"]]
    assert len(set(link_ids)) == len(link_ids) and ui["last_link_id"] == max(link_ids)
    orders = sorted(n["order"] for n in ui["nodes"])
    assert orders == list(range(len(ids)))
    for n in ui["nodes"]:
        assert isinstance(n["type"], str) and n["mode"] == 0 and n["flags"] == {}
        assert len(n["pos"]) == 2 and len(n["size"]) == 2 and min(n["size"]) > 0
        assert n["properties"]["Node name for S&R"] == n["type"]
        assert isinstance(n["inputs"], list) and isinstance(n["outputs"], list)
        assert isinstance(n["widgets_values"], list)
        for i in n["inputs"]:
            assert set(i) >= {"name", "type", "link"}
        for slot, o in enumerate(n["outputs"]):
            assert set(o) >= {"name", "type", "links"} and o["slot_index"] == slot
    for link in ui["links"]:
        assert len(link) == 6 and all(isinstance(v, int) for v in link[:5]) and isinstance(link[5], str)


def test_nodes_links_and_widgets_are_valid_for_the_live_node_definitions(ui, object_info):
    nodes = {n["id"]: n for n in ui["nodes"]}
    for n in ui["nodes"]:
        assert n["type"] in object_info, f"node {n['id']}: unknown node type {n['type']}"

    # Links: slots exist; the link's type is the output's and the input's type; both ends agree.
    for link_id, src, src_slot, dst, dst_slot, ltype in ui["links"]:
        a, b = nodes[src], nodes[dst]
        a_def, b_def = object_info[a["type"]], object_info[b["type"]]
        assert 0 <= src_slot < len(a_def["output"]) and src_slot < len(a["outputs"]), (link_id, "from slot")
        assert 0 <= dst_slot < len(b["inputs"]), (link_id, "to slot")
        entry = b["inputs"][dst_slot]
        specs = {name: spec for name, spec, _ in _inputs_in_order(b_def)}
        assert entry["name"] in specs, (link_id, entry["name"])
        assert ltype == a_def["output"][src_slot] == _type(specs[entry["name"]]) == entry["type"] \
            == a["outputs"][src_slot]["type"], (link_id, ltype)
        assert entry["link"] == link_id and link_id in a["outputs"][src_slot]["links"], link_id
        assert a["order"] < b["order"], f"link {link_id} runs against the execution order"
    known = {link[0] for link in ui["links"]}
    for n in ui["nodes"]:
        for i in n["inputs"]:
            assert i["link"] is None or i["link"] in known
        for o in n["outputs"]:
            assert set(o["links"]) <= known

    for n in ui["nodes"]:
        node_def = object_info[n["type"]]
        ordered = _inputs_in_order(node_def)
        sockets = [(name, spec, opt) for name, spec, opt in ordered if not _is_widget(spec)]
        # Socket entries: the definition's sockets, in order (link slots index into this list), then
        # widgets fed by a link (entries that name their widget).
        assert [(i["name"], i["type"]) for i in n["inputs"] if "widget" not in i] == \
            [(s, _type(spec)) for s, spec, _ in sockets]
        all_specs = {name: spec for name, spec, _ in ordered}
        for i in (i for i in n["inputs"] if "widget" in i):
            spec = all_specs.get(i["widget"]["name"])
            assert spec is not None and _is_widget(spec) and i["name"] == i["widget"]["name"], (n["id"], i)
            assert i["type"] == _type(spec) and i["link"] is not None, (n["id"], i)
        linked = {i["name"] for i in n["inputs"] if i["link"] is not None}
        missing = [s for s, _, opt in sockets if not opt and s not in linked]
        assert not missing, f"node {n['id']} ({n['type']}): required inputs not connected: {missing}"
        assert [(o["name"], o["type"]) for o in n["outputs"]] == \
            list(zip(node_def["output_name"], node_def["output"]))

        # widgets_values: one per widget input (+1 after a control_after_generate INT), in order.
        widgets = [(name, spec) for name, spec, _ in ordered if _is_widget(spec)]
        values = list(n["widgets_values"])
        assert len(values) == len(widgets) + sum(_has_control(nm, sp) for nm, sp in widgets), \
            f"node {n['id']} ({n['type']}): {len(values)} widgets_values for {[w for w, _ in widgets]}"
        for name, spec in widgets:
            v, t, o = values.pop(0), _type(spec), _opts(spec)
            where = f"node {n['id']} ({n['type']}).{name} = {v!r}"
            if t == "COMBO":
                assert v in _choices(spec), f"{where} not among {_choices(spec)}"
            elif t == "BOOLEAN":
                assert isinstance(v, bool), where
            elif t == "STRING":
                assert isinstance(v, str), where
            else:
                assert isinstance(v, (int, float)) and not isinstance(v, bool), where
                assert t == "FLOAT" or isinstance(v, int), where
                assert o.get("min", v) <= v <= o.get("max", v), where
            if _has_control(name, spec):
                assert values.pop(0) in CONTROL_MODES, where
    ckpt = next(n for n in ui["nodes"] if n["type"] == "CheckpointLoaderSimple")
    assert ckpt["widgets_values"] == ["tiny_sd15.safetensors"]


def test_layout_is_readable(ui, api, object_info):
    nodes = {n["id"]: n for n in ui["nodes"]}
    title_h = 30  # litegraph draws the title bar above pos

    def box(n):
        (x, y), (w, h) = n["pos"], n["size"]
        return x, y - title_h, x + w, y + h

    boxes = [(n["id"], box(n)) for n in ui["nodes"]]
    for i, (ia, a) in enumerate(boxes):
        for ib, b in boxes[i + 1:]:
            overlap = a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
            assert not overlap, f"nodes {ia} and {ib} overlap"
    for _, src, _, dst, _, _ in ui["links"]:
        assert box(nodes[src])[2] < nodes[dst]["pos"][0], f"link {src}->{dst} does not run left to right"
    for k, node in api.items():
        title = node.get("_meta", {}).get("title")
        shown = nodes[int(k)].get("title") or object_info[node["class_type"]]["display_name"]
        assert title is None or shown == title, (k, shown, title)


# ------------------------------------------------------------------ (c) round trip back to API format

def test_round_trip_to_api_format_gives_the_api_workflow(api, ui, object_info):
    back = conv.ui_to_api(ui, object_info)
    strip = lambda wf: {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in wf.items()}  # noqa: E731
    assert strip(back) == strip(api)
    for k, node in api.items():
        if "title" in node.get("_meta", {}):
            assert back[k]["_meta"]["title"] == node["_meta"]["title"]


# ------------------------------------------------------------------ the server offers it as a template

def test_server_lists_and_serves_the_template(server, ui, pair):
    stem = pair[1].removesuffix(".json")
    templates = server.get("/workflow_templates")
    pack = next((name for name, files in templates.items() if stem in files), None)
    assert pack, templates
    assert server.get(f"/api/workflow_templates/{pack}/{pair[1]}") == ui


# ------------------------------------------------------------------ converter details (synthetic defs)

def test_converter_handles_linked_widgets_combo_controls_and_uploads():
    oi = {
        "Src": {"input": {"required": {}}, "output": ["INT", "IMAGE"], "output_name": ["n", "img"],
                "output_is_list": [False, True], "display_name": "Src"},
        "Dst": {"input": {"required": {"a": ["INT", {"default": 1}], "img": ["IMAGE", {}],
                                       "mode": [["x", "y"], {"control_after_generate": True}],
                                       "file": ["COMBO", {"options": ["f.png"], "image_upload": True}]},
                          "optional": {"seed": ["INT", {}], "extra": ["IMAGE", {}]}},
                "input_order": {"required": ["a", "img", "mode", "file"], "optional": ["seed", "extra"]},
                "output": [], "output_name": [], "display_name": "Dst"},
    }
    api = {"1": {"class_type": "Src", "inputs": {}},
           "2": {"class_type": "Dst", "inputs": {"a": ["1", 0], "img": ["1", 1], "mode": "y", "file": "f.png",
                                                  "seed": 5}, "_meta": {"title": "Target"}}}
    ui = conv.convert(api, oi)
    dst = ui["nodes"][1]
    assert dst["title"] == "Target"
    assert dst["widgets_values"] == [1, "y", "fixed", "", "f.png", 5, "fixed", "image"]
    # A widget driven by a link: every widget input gets a socket entry after the sockets.
    assert [(i["name"], i.get("widget"), i["link"]) for i in dst["inputs"]] == [
        ("img", None, 1), ("extra", None, None), ("a", {"name": "a"}, 2), ("mode", {"name": "mode"}, None),
        ("file", {"name": "file"}, None), ("seed", {"name": "seed"}, None)]
    assert ui["links"] == [[1, 1, 1, 2, 0, "IMAGE"], [2, 1, 0, 2, 2, "INT"]]
    assert ui["nodes"][0]["outputs"][1]["shape"] == 6 and dst["inputs"][1]["shape"] == 7
    back = conv.ui_to_api(ui, oi)
    assert {k: v["inputs"] for k, v in back.items()} == {k: v["inputs"] for k, v in api.items()}
    assert back["2"]["_meta"]["title"] == "Target" and back["1"]["_meta"]["title"] == "Src"
    with pytest.raises(KeyError):
        conv.convert({"1": {"class_type": "Nope", "inputs": {}}}, oi)
