"""Every example workflow in example_workflows/ against the node definitions a live server of the
host under test reports (/object_info): it loads and queues there as saved.

Workflows are discovered, not listed: every ``example_workflows/*.json`` is a UI-format workflow
(litegraph JSON, what ComfyUI's template browser lists: it globs that folder only) and its API twin
(what /prompt takes) is ``example_workflows/api/<same name>.json``, from which
``scripts/api_to_ui.py --all`` generates it.

The checks are about meaning, so they survive host releases: a host that adds an output or an
optional input to a node does not break a saved workflow, and neither does it break these tests
(ComfyUI 0.30.0's SaveImage gained an IMAGE output; the workflows saved against 0.3.75 load and run).
What is checked (scripts/api_to_ui.py ``validate_ui``), for UI and API workflows alike: every node
type exists; every saved widget value fits its input (combo value among the options, numbers within
min/max, the right type); every link joins an existing output to an existing input of a compatible
type; every required input is linked or has a value. Model files (the checkpoint, the files Load
Weights loads) are the user's: they are checked for their form, not for being on the test server.
An API twin must mean the same as its UI workflow (same nodes, values and links), whatever the
bytes. The saved view shows every node in the free part of a 1400x900 window at a zoom where the
canvas still draws text (tests/test_browser_ui.py checks the same in the real frontend), and the
trainers keep settings for a real first run (SD1.5, 512², the nodes' default steps, previews on).
"""

import copy
import importlib.util
import json
import os
import re

import pytest

from comfyui_domainstudio.testing.harness import REPO

pytestmark = [pytest.mark.comfy, pytest.mark.e2e]

EXAMPLES = os.path.join(REPO, "example_workflows")
API = os.path.join(EXAMPLES, "api")
SCRIPT = os.path.join(REPO, "scripts", "api_to_ui.py")
# Inputs that name the user's model files: (node type, input) -> the form a value must have.
FILE_INPUTS = {("CheckpointLoaderSimple", "ckpt_name"): r"[^/\\]+\.safetensors",
               ("DomainStudio_LoadWeights", "file"): r"(loras|embeddings)/[^/\\]+\.safetensors"}
TRAINERS = ("DomainStudio_Train", "DomainStudio_Personalize")


def _load_script():
    spec = importlib.util.spec_from_file_location("ds_api_to_ui", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


conv = _load_script()


def _read(name, folder=EXAMPLES):
    with open(os.path.join(folder, name), encoding="utf-8") as f:
        return json.load(f)


def _is_ui(wf) -> bool:
    return isinstance(wf, dict) and isinstance(wf.get("nodes"), list) and isinstance(wf.get("links"), list)


def _is_api(wf) -> bool:
    return isinstance(wf, dict) and bool(wf) and all(isinstance(v, dict) and "class_type" in v for v in wf.values())


def _discover():
    ui, other = [], []
    for name in sorted(os.listdir(EXAMPLES)):
        if name.endswith(".json"):
            (ui if _is_ui(_read(name)) else other).append(name)
    api = sorted(n for n in os.listdir(API) if n.endswith(".json")) if os.path.isdir(API) else []
    return ui, api, other


UI_FILES, API_FILES, OTHER_FILES = _discover()


def _twin(ui_name):
    """The API-format twin of a UI workflow: api/<same name>, when it exists."""
    return ui_name if ui_name in API_FILES else None


def _stem(name):
    return name.removesuffix(".json")


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def _file_value_problems(nodes):
    """(problems, ignored prefixes): model-file inputs must have the right form; whether the file is
    on this server is not checked (validate_ui's complaint about them is dropped)."""
    problems, ignore = [], []
    for k, t, values in nodes:
        for (node_type, name), pattern in FILE_INPUTS.items():
            if t == node_type and name in values:
                ignore.append(f"node {k} ({t}).{name} = ")
                if not (isinstance(values[name], str) and re.fullmatch(pattern, values[name])):
                    problems.append(f"node {k} ({t}).{name} = {values[name]!r}: not a file name of the form {pattern}")
    return problems, ignore


def _ui_problems(ui, object_info):
    api = conv.ui_to_api(ui, object_info)
    problems, ignore = _file_value_problems([(k, v["class_type"], v["inputs"]) for k, v in api.items()])
    return problems + [p for p in conv.validate_ui(ui, object_info) if not p.startswith(tuple(ignore))]


def _report(problems, what):
    if problems:
        pytest.fail(f"{what} does not fit this host's node definitions:\n  " + "\n  ".join(problems)
                    + "\n(regenerate the UI workflows from their API twins: scripts/api_to_ui.py --all)", pytrace=False)


# ------------------------------------------------------------------ the folder

def test_every_example_file_is_a_workflow_with_a_twin():
    assert not OTHER_FILES, f"example_workflows/ holds JSON that is not a UI-format workflow: {OTHER_FILES}"
    assert UI_FILES, "no UI-format workflow found in example_workflows/"
    not_api = [n for n in API_FILES if not _is_api(_read(n, API))]
    assert not not_api, f"example_workflows/api/ holds JSON that is not an API-format workflow: {not_api}"
    assert sorted(UI_FILES) == sorted(API_FILES), "every example needs its UI workflow and its API twin"


# ------------------------------------------------------------------ per UI workflow, on the live host

@pytest.mark.parametrize("name", UI_FILES, ids=[_stem(n) for n in UI_FILES])
def test_ui_workflow_fits_the_live_node_definitions(name, object_info):
    _report(_ui_problems(_read(name), object_info), f"example_workflows/{name}")


@pytest.mark.parametrize("name", API_FILES, ids=[_stem(n) for n in API_FILES])
def test_api_workflow_fits_the_live_node_definitions(name, object_info):
    api = _read(name, API)
    unknown = [f"node {k}: no such node type {v['class_type']!r} on this host"
               for k, v in api.items() if v["class_type"] not in object_info]
    _report(unknown, f"example_workflows/api/{name}")
    _report(_ui_problems(conv.convert(api, object_info), object_info) + _missing_required(api, object_info),
            f"example_workflows/api/{name}")


TWINS = [(u, _twin(u)) for u in UI_FILES if _twin(u)]


@pytest.mark.parametrize("name,twin", TWINS, ids=[_stem(u) for u, _ in TWINS])
def test_api_twin_means_the_same_as_the_ui_workflow(name, twin, object_info):
    api, ui = _read(twin, API), _read(name)
    back = conv.ui_to_api(ui, object_info)
    assert conv.api_meaning(back, object_info) == conv.api_meaning(api, object_info), \
        f"example_workflows/{name} and api/{twin} differ in nodes, values or links"
    for k, node in api.items():
        if "title" in node.get("_meta", {}):
            assert back[k]["_meta"]["title"] == node["_meta"]["title"], (name, k)


def _missing_required(api, object_info):
    """Required inputs an API workflow leaves out (the server rejects such a prompt)."""
    out = []
    for k, node in api.items():
        for n, spec, opt in conv.ordered_inputs(object_info[node["class_type"]]):
            if not opt and n not in node.get("inputs", {}):
                out.append(f"node {k} ({node['class_type']}): required input {n!r} is missing")
    return out


@pytest.mark.parametrize("name", UI_FILES, ids=[_stem(n) for n in UI_FILES])
def test_server_lists_and_serves_the_template(name, server):
    templates = server.get("/workflow_templates")
    pack = next((p for p, files in templates.items() if _stem(name) in files), None)
    assert pack, templates
    assert server.get(f"/api/workflow_templates/{pack}/{name}") == _read(name)


# ------------------------------------------------------------------ per UI workflow, host-independent

@pytest.mark.parametrize("name", UI_FILES, ids=[_stem(n) for n in UI_FILES])
def test_top_level_and_node_fields_follow_the_0_4_schema(name):
    ui = _read(name)
    assert ui["version"] == 0.4
    assert isinstance(ui["groups"], list) and isinstance(ui["config"], dict) and isinstance(ui["extra"], dict)
    ids = [n["id"] for n in ui["nodes"]]
    assert len(set(ids)) == len(ids) and all(isinstance(i, int) for i in ids)
    assert ui["last_node_id"] >= max(ids)
    link_ids = [link[0] for link in ui["links"]]
    assert len(set(link_ids)) == len(link_ids) and ui["last_link_id"] >= max(link_ids, default=0)
    assert sorted(n["order"] for n in ui["nodes"]) == list(range(len(ids)))
    order = {n["id"]: n["order"] for n in ui["nodes"]}
    for n in ui["nodes"]:
        assert isinstance(n["type"], str) and n["mode"] == 0, (n["id"], "every node runs")
        assert isinstance(n.get("flags", {}), dict)
        assert len(n["pos"]) == 2 and len(n["size"]) == 2 and min(n["size"]) > 0
        assert isinstance(n.get("inputs", []), list) and isinstance(n.get("outputs", []), list)
        for i in n.get("inputs", []):
            assert set(i) >= {"name", "type", "link"}
        for slot, o in enumerate(n.get("outputs", [])):
            assert set(o) >= {"name", "type", "links"} and o.get("slot_index", slot) == slot
    for link in ui["links"]:
        assert len(link) == 6 and all(isinstance(v, int) for v in link[:5]) and isinstance(link[5], str)
        assert order[link[1]] < order[link[3]], f"link {link[0]} runs against the execution order"


@pytest.mark.parametrize("name", UI_FILES, ids=[_stem(n) for n in UI_FILES])
def test_layout_is_readable(name):
    ui = _read(name)
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
    twin = _twin(name)
    for k, node in (_read(twin, API) if twin else {}).items():
        title = node.get("_meta", {}).get("title")
        assert title is None or nodes[int(k)].get("title", title) == title, (k, title)


@pytest.mark.parametrize("name", UI_FILES, ids=[_stem(n) for n in UI_FILES])
def test_saved_view_shows_every_node_readably(name):
    ui = _read(name)
    view = ui["extra"]["ds"]
    scale, (ox, oy) = view["scale"], view["offset"]
    assert conv.MIN_SCALE <= scale <= 1, f"the view opens at {scale:.0%}: the canvas draws no text below " \
        f"{conv.MIN_SCALE:.0%}"
    x0, y0, x1, y1 = conv.bounds(ui["nodes"])
    box = conv.VIEW_BOX
    screen = ((x0 + ox) * scale, (y0 + oy) * scale, (x1 + ox) * scale, (y1 + oy) * scale)
    tol = 1
    assert screen[0] >= box[0] - tol and screen[1] >= box[1] - tol and screen[2] <= box[2] + tol \
        and screen[3] <= box[3] + tol, f"the nodes span {screen} on screen, outside the free area {box}"
    for n in ui["nodes"]:
        assert n["size"][0] >= 200 and n["size"][1] >= 40, (n["id"], n["type"], n["size"])


@pytest.mark.parametrize("name", API_FILES, ids=[_stem(n) for n in API_FILES])
def test_shipped_settings_suit_a_real_first_run(name, object_info):
    """SD1.5 at 512² with the nodes' default steps and learning rates, previews on at an interval
    that gives a few of them, the partial result kept on Cancel: what a first run needs (tests
    patch smaller values in for the tiny model)."""
    api = _read(name, API)
    for k, node in api.items():
        t, values = node["class_type"], node["inputs"]
        if t == "CheckpointLoaderSimple":
            assert values["ckpt_name"] == "v1-5-pruned-emaonly.safetensors", values
        if t in ("DomainStudio_FewShotImageSet", "EmptyLatentImage"):
            assert values.get("resolution", values.get("width")) == 512, (k, values)
        if t not in TRAINERS:
            continue
        specs = {n: conv.input_options(spec) for n, spec, _ in conv.ordered_inputs(object_info[t])}
        for setting in ("steps", "ti_steps", "unet_steps", "learning_rate", "unet_learning_rate",
                        "ti_learning_rate", "train_mode", "lora_rank", "batch_size", "precision"):
            if setting in values:
                assert values[setting] == specs[setting]["default"], (k, setting, values[setting])
        steps = values.get("steps") or values["ti_steps"] + values["unet_steps"]
        assert 0 < values["preview_every"] <= steps // 2, (k, values["preview_every"], steps)
        assert values["on_cancel"] == "keep" and values["resume_from"] == "none", values


# ------------------------------------------------------------------ the checks themselves (synthetic defs)

SYNTH = {
    "Src": {"input": {"required": {}}, "output": ["INT", "IMAGE"], "output_name": ["n", "img"],
            "output_is_list": [False, True], "display_name": "Src"},
    "Dst": {"input": {"required": {"a": ["INT", {"default": 1, "min": 0, "max": 10}], "img": ["IMAGE", {}],
                                   "mode": [["x", "y"], {"control_after_generate": True}],
                                   "file": ["COMBO", {"options": ["f.png"], "image_upload": True}]},
                      "optional": {"seed": ["INT", {}], "extra": ["IMAGE", {}]}},
            "input_order": {"required": ["a", "img", "mode", "file"], "optional": ["seed", "extra"]},
            "output": [], "output_name": [], "display_name": "Dst"},
}
SYNTH_API = {"1": {"class_type": "Src", "inputs": {}},
             "2": {"class_type": "Dst", "inputs": {"a": ["1", 0], "img": ["1", 1], "mode": "y", "file": "f.png",
                                                    "seed": 5}, "_meta": {"title": "Target"}}}


def test_converter_handles_linked_widgets_combo_controls_and_uploads():
    ui = conv.convert(SYNTH_API, SYNTH)
    dst = ui["nodes"][1]
    assert dst["title"] == "Target"
    assert dst["widgets_values"] == [1, "y", "fixed", "", "f.png", 5, "fixed", "image"]
    # A widget driven by a link: every widget input gets a socket entry after the sockets.
    assert [(i["name"], i.get("widget"), i["link"]) for i in dst["inputs"]] == [
        ("img", None, 1), ("extra", None, None), ("a", {"name": "a"}, 2), ("mode", {"name": "mode"}, None),
        ("file", {"name": "file"}, None), ("seed", {"name": "seed"}, None)]
    assert ui["links"] == [[1, 1, 1, 2, 0, "IMAGE"], [2, 1, 0, 2, 2, "INT"]]
    assert ui["nodes"][0]["outputs"][1]["shape"] == 6 and dst["inputs"][1]["shape"] == 7
    back = conv.ui_to_api(ui, SYNTH)
    assert {k: v["inputs"] for k, v in back.items()} == {k: v["inputs"] for k, v in SYNTH_API.items()}
    assert back["2"]["_meta"]["title"] == "Target" and back["1"]["_meta"]["title"] == "Src"
    assert conv.validate_ui(ui, SYNTH) == []
    with pytest.raises(KeyError):
        conv.convert({"1": {"class_type": "Nope", "inputs": {}}}, SYNTH)


def test_validation_flags_what_breaks_a_workflow():
    api = copy.deepcopy(SYNTH_API)
    api["2"]["inputs"]["a"] = 3  # a plain widget value, so its range is checked
    base = conv.convert(api, SYNTH)
    assert conv.validate_ui(base, SYNTH) == []

    def run(change):
        ui = copy.deepcopy(base)
        change(ui, {n["id"]: n for n in ui["nodes"]})
        return "\n".join(conv.validate_ui(ui, SYNTH))

    assert "no such node type" in run(lambda ui, n: n[2].update(type="Gone"))
    assert "not among the options" in run(lambda ui, n: n[2]["widgets_values"].__setitem__(1, "z"))
    assert "outside [0, 10]" in run(lambda ui, n: n[2]["widgets_values"].__setitem__(0, 11))
    assert "not a number" in run(lambda ui, n: n[2]["widgets_values"].__setitem__(0, "3"))
    assert "control_after_generate" in run(lambda ui, n: n[2]["widgets_values"].__setitem__(2, "sometimes"))
    assert "would be dropped" in run(lambda ui, n: n[2]["widgets_values"].append(1))
    assert "required input 'img'" in run(lambda ui, n: (ui["links"].clear(), n[2]["inputs"][0].update(link=None)))
    assert "does not fit input 'img'" in run(lambda ui, n: ui["links"][0].__setitem__(2, 0))  # INT -> IMAGE
    assert "has no output 5" in run(lambda ui, n: ui["links"][0].__setitem__(2, 5))
    # A host that drops a linked output, or a widget a workflow saved a value for.
    defs = copy.deepcopy(SYNTH)
    defs["Src"]["output"], defs["Src"]["output_name"] = ["INT"], ["n"]
    assert any("has no output 1" in p for p in conv.validate_ui(base, defs))


def test_validation_accepts_what_a_newer_host_adds():
    ui = conv.convert(SYNTH_API, SYNTH)
    newer = copy.deepcopy(SYNTH)
    newer["Dst"]["output"], newer["Dst"]["output_name"] = ["IMAGE"], ["images"]  # like SaveImage in 0.30.0
    newer["Dst"]["input"]["optional"]["mask"] = ["MASK", {}]                    # a new optional socket
    newer["Dst"]["input_order"]["optional"].append("mask")
    newer["Src"]["input"]["optional"] = {"strength": ["FLOAT", {"default": 1.0}]}  # a new widget, appended
    assert conv.validate_ui(ui, newer) == []
    back = conv.ui_to_api(ui, newer)
    assert back["1"]["inputs"] == {"strength": 1.0}  # restored as the frontend does: the default
    assert conv.api_meaning(back, newer) == conv.api_meaning(SYNTH_API, newer)


def test_validation_flags_a_widget_inserted_before_saved_values():
    # widgets_values are restored by position: a widget inserted before saved ones shifts them.
    newer = copy.deepcopy(SYNTH)
    newer["Dst"]["input"]["required"] = {"strength": ["FLOAT", {"default": 1.0}], **newer["Dst"]["input"]["required"]}
    newer["Dst"]["input_order"]["required"].insert(0, "strength")
    problems = conv.validate_ui(conv.convert(SYNTH_API, SYNTH), newer)
    assert problems and any("Dst" in p for p in problems), problems
