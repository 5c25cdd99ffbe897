#!/usr/bin/env python3
"""Convert an API-format ComfyUI workflow (what /prompt takes) into a UI-format one (the litegraph
JSON, schema 0.4, that the frontend loads from example_workflows/ as a template), and back.

    python scripts/api_to_ui.py example_workflows/domainstudio_api.json \\
        --object-info http://127.0.0.1:8188 -o example_workflows/domainstudio_basic.json

--object-info is a ComfyUI server (its /object_info is fetched) or a saved /object_info JSON file.
The result depends only on the node definitions' structure (input names, types, order, outputs),
not on a server's model lists, so any server with this pack gives the same file.

How the frontend (ComfyUI_frontend 1.32, src/services/litegraphService.ts) builds a node, mirrored here:
* inputs are taken in `input_order` (required, then optional);
* socket inputs (types without a widget: MODEL, IMAGE, DS_IMAGE_SET, ... or forceInput) become the
  node's "inputs" entries, in that order; a link's target slot is the index in that list;
* widget inputs (INT, FLOAT, STRING, BOOLEAN, COMBO / a list of options) become widgets, whose
  values are saved positionally in "widgets_values";
* an INT with control_after_generate (or, when the option is absent, one named seed/noise_seed)
  gets one extra widget right after it ("fixed"/"increment"/"decrement"/"randomize"); a COMBO with
  control_after_generate gets two (the mode and a filter-list string);
* file COMBOs with image_upload/video_upload (LoadImage, ...) get an upload widget, audio_upload two,
  after all other widgets (frontend extensions add them).

Pure standard library.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
import urllib.request

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_MODES = ["fixed", "increment", "decrement", "randomize"]
CONTROL_VALUE = "fixed"  # keeps the seeds of the API workflow, so runs are reproducible
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # UI nodes that never reach /prompt

# Layout (canvas units). Heights follow litegraph's computeSize: a slot row is 20, a widget 24.
SLOT_H, WIDGET_H, MULTILINE_H, PAD_H = 20, 24, 150, 14
COL_GAP, ROW_GAP, ORIGIN = 90, 60, (50, 80)
SHAPE_GRID, SHAPE_HOLLOW_CIRCLE = 6, 7  # litegraph RenderShape


# --------------------------------------------------------------------------- node definitions

def input_type(spec) -> str:
    """The socket/widget type of an /object_info input spec ([type, options] or [[options...], {...}])."""
    t = spec[0]
    return "COMBO" if isinstance(t, list) else str(t)


def input_options(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def combo_options(spec) -> list | None:
    """Allowed values of a COMBO input (V1 list form, or V3 "COMBO" with options), else None."""
    if isinstance(spec[0], list):
        return list(spec[0])
    if input_type(spec) == "COMBO":
        return list(input_options(spec).get("options", []))
    return None


def ordered_inputs(node_def: dict) -> list[tuple[str, list, bool]]:
    """(name, spec, optional) of the node's inputs in the frontend's order (input_order: required, then
    optional; anything not listed there after). Hidden inputs are not part of the graph."""
    sections = node_def.get("input", {})
    order = node_def.get("input_order", {})
    out, seen = [], set()
    for section in ("required", "optional"):
        specs = sections.get(section) or {}
        for name in list(order.get(section) or []) + list(specs):
            if name in specs and name not in seen:
                seen.add(name)
                out.append((name, specs[name], section == "optional"))
    return out


def is_widget(spec) -> bool:
    return input_type(spec) in WIDGET_TYPES and not input_options(spec).get("forceInput", False)


def control_extras(name: str, spec) -> int:
    """How many extra widgets the frontend adds after this widget (seed control, combo filter)."""
    t, opts = input_type(spec), input_options(spec)
    if t == "INT":
        ctrl = opts.get("control_after_generate")
        if ctrl is None:
            ctrl = name in ("seed", "noise_seed")
        return 1 if ctrl else 0
    if t == "COMBO" and opts.get("control_after_generate"):
        return 2
    return 0


def socket_inputs(node_def: dict) -> list[tuple[str, list, bool]]:
    return [(n, s, o) for n, s, o in ordered_inputs(node_def) if not is_widget(s)]


def widget_inputs(node_def: dict) -> list[tuple[str, list, bool]]:
    return [(n, s, o) for n, s, o in ordered_inputs(node_def) if is_widget(s)]


def widget_layout(node_def: dict) -> list[tuple[str, str, list]]:
    """One entry per widgets_values position: (input name, kind, spec); kind is "value" (the input's
    own widget), "control" (control_after_generate mode) or "filter" (a combo control's filter list)."""
    out, uploads = [], []
    for name, spec, _ in widget_inputs(node_def):
        out.append((name, "value", spec))
        out += [(name, kind, spec) for kind in ("control", "filter")[:control_extras(name, spec)]]
        uploads += [(name, kind, spec) for kind in upload_extras(spec)]
    return out + uploads  # the upload widgets' inputs are added by frontend extensions, hence last


def upload_extras(spec) -> list[str]:
    """Kinds of the widgets the frontend's upload extensions add for a file COMBO: an image/video upload
    button (saved as "image"), or an audio player + upload button (saved as null, null)."""
    opts = input_options(spec)
    if input_type(spec) != "COMBO":
        return []
    if opts.get("image_upload") or opts.get("video_upload") or opts.get("animated_image_upload"):
        return ["upload"]
    if opts.get("audio_upload"):
        return ["audio_ui", "upload_audio"]
    return []


EXTRA_VALUES = {"control": CONTROL_VALUE, "filter": "", "upload": "image", "audio_ui": None, "upload_audio": None}


def default_value(spec):
    opts = input_options(spec)
    if "default" in opts:
        return opts["default"]
    choices = combo_options(spec)
    if choices is not None:
        return choices[0] if choices else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(input_type(spec))


def _is_link(value) -> bool:
    """An API-format link: [source node id, output index]."""
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))
            and isinstance(value[1], int) and not isinstance(value[1], bool))


# --------------------------------------------------------------------------- API -> UI

def _node_ids(api: dict) -> dict[str, int]:
    """API node ids (strings) -> UI ids (ints): numeric ids are kept, others numbered after them."""
    ids, nxt = {}, 1 + max((int(k) for k in api if str(k).isdigit()), default=0)
    for k in api:
        if str(k).isdigit():
            ids[k] = int(k)
    for k in api:
        if k not in ids:
            ids[k], nxt = nxt, nxt + 1
    return ids


def _sorted_keys(api: dict) -> list[str]:
    return sorted(api, key=lambda k: (0, int(k), "") if str(k).isdigit() else (1, 0, str(k)))


def _depths(api: dict) -> dict[str, int]:
    """Longest path from a source node: the column a node goes in."""
    depth: dict[str, int] = {}

    def visit(k, stack=()):
        if k in depth:
            return depth[k]
        if k in stack:
            raise ValueError(f"the workflow has a cycle through node {k}")
        srcs = [str(v[0]) for v in api[k].get("inputs", {}).values() if _is_link(v) and str(v[0]) in api]
        depth[k] = 1 + max((visit(s, stack + (k,)) for s in srcs), default=-1)
        return depth[k]

    for k in _sorted_keys(api):
        visit(k)
    return depth


def _node_size(node_def: dict, n_inputs: int, title: str) -> list[int]:
    widgets = widget_layout(node_def)
    multiline = sum(1 for _, kind, spec in widgets if kind == "value" and input_type(spec) == "STRING"
                    and input_options(spec).get("multiline"))
    rows = max(n_inputs, len(node_def.get("output", [])))
    h = rows * SLOT_H + (len(widgets) - multiline) * WIDGET_H + multiline * MULTILINE_H + PAD_H
    w = 315
    if multiline:
        w = 400
    elif not widgets and rows <= 2:
        w = 240
    w = max(w, 8 * len(title) + 60)
    if node_def.get("output_node") and any(input_type(s) == "IMAGE" for _, s, _ in socket_inputs(node_def)):
        w, h = max(w, 320), max(h, 290)  # room for the image preview
    return [w, h]


def convert(api: dict, object_info: dict) -> dict:
    """API-format workflow -> UI-format (litegraph 0.4) workflow, using /object_info's node definitions."""
    api = {str(k): v for k, v in api.items()}
    for k, node in api.items():
        if node.get("class_type") not in object_info:
            raise KeyError(f"node {k}: unknown node type {node.get('class_type')!r} (not in object_info)")
    ids = _node_ids(api)
    keys = _sorted_keys(api)

    # Nodes without positions yet; links gathered in node order, then input order.
    nodes: dict[str, dict] = {}
    links: list[list] = []
    out_links: dict[tuple[str, int], list[int]] = {}
    for k in keys:
        node, node_def = api[k], object_info[api[k]["class_type"]]
        values = node.get("inputs", {})
        linked_widgets = {n for n, _, _ in widget_inputs(node_def) if _is_link(values.get(n))}
        known = {n for n, _, _ in ordered_inputs(node_def)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise KeyError(f"node {k} ({node['class_type']}): inputs {unknown} are not in its definition")

        # Socket entries: the sockets; and when a widget input is driven by a link, also every widget
        # input (after the sockets, as the frontend lays them out), so slot indices stay right.
        entries = [{"name": n, "type": input_type(s), **({"shape": SHAPE_HOLLOW_CIRCLE} if o else {}), "link": None}
                   for n, s, o in socket_inputs(node_def)]
        if linked_widgets:
            entries += [{"name": n, "type": input_type(s), **({"shape": SHAPE_HOLLOW_CIRCLE} if o else {}),
                         "widget": {"name": n}, "link": None} for n, s, o in widget_inputs(node_def)]
        for slot, entry in enumerate(entries):
            v = values.get(entry["name"])
            if not _is_link(v):
                if v is not None and "widget" not in entry:
                    raise ValueError(f"node {k}: socket input {entry['name']!r} must be a link, got {v!r}")
                continue
            src = str(v[0])
            if src not in api:
                raise KeyError(f"node {k}: input {entry['name']!r} links to missing node {src}")
            src_def = object_info[api[src]["class_type"]]
            if not 0 <= v[1] < len(src_def.get("output", [])):
                raise ValueError(f"node {k}: input {entry['name']!r} links to output {v[1]} of node {src}, "
                                 f"which has {len(src_def.get('output', []))} outputs")
            link_id = len(links) + 1
            entry["link"] = link_id
            links.append([link_id, ids[src], v[1], ids[k], slot, entry["type"]])
            out_links.setdefault((src, v[1]), []).append(link_id)

        widgets_values = []
        for name, kind, spec in widget_layout(node_def):
            if kind != "value":
                widgets_values.append(EXTRA_VALUES[kind])
                continue
            v = values.get(name)
            widgets_values.append(default_value(spec) if v is None or _is_link(v) else v)

        title = (node.get("_meta") or {}).get("title")
        ui_node = {
            "id": ids[k],
            "type": node["class_type"],
            "pos": [0, 0],
            "size": [0, 0],
            "flags": {},
            "order": 0,
            "mode": 0,
            "inputs": entries,
            "outputs": [],
            "properties": {"Node name for S&R": node["class_type"]},
            "widgets_values": widgets_values,
        }
        if title and title != node_def.get("display_name", node["class_type"]):
            ui_node["title"] = title
        ui_node["size"] = _node_size(node_def, len(entries), title or node_def.get("display_name") or "")
        nodes[k] = ui_node

    for k in keys:
        node_def = object_info[api[k]["class_type"]]
        names = node_def.get("output_name") or node_def.get("output", [])
        is_list = node_def.get("output_is_list") or []
        nodes[k]["outputs"] = [
            {"name": names[i], "type": t, **({"shape": SHAPE_GRID} if i < len(is_list) and is_list[i] else {}),
             "links": out_links.get((k, i), []), "slot_index": i}
            for i, t in enumerate(node_def.get("output", []))
        ]

    _layout(api, nodes, keys)

    # Execution order: by column, then top to bottom (a topological order, as columns follow depth).
    for order, k in enumerate(sorted(keys, key=lambda k: (nodes[k]["pos"][0], nodes[k]["pos"][1], ids[k]))):
        nodes[k]["order"] = order

    right = max(n["pos"][0] + n["size"][0] for n in nodes.values()) if nodes else 0
    bottom = max(n["pos"][1] + n["size"][1] for n in nodes.values()) if nodes else 0
    scale = round(max(0.4, min(1.0, 1800 / (right + 100), 950 / (bottom + 100))), 2)
    return {
        "last_node_id": max(ids.values(), default=0),
        "last_link_id": len(links),
        "nodes": [nodes[k] for k in keys],
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": scale, "offset": [0, 0]}},
        "version": 0.4,
    }


def _layout(api: dict, nodes: dict[str, dict], keys: list[str]) -> None:
    """Columns by graph depth, left to right; in a column, nodes sit near the middle of their sources."""
    depth = _depths(api)
    columns: dict[int, list[str]] = {}
    for k in keys:
        columns.setdefault(depth[k], []).append(k)
    x = ORIGIN[0]
    for d in sorted(columns):
        def target(k):
            srcs = [str(v[0]) for v in api[k].get("inputs", {}).values() if _is_link(v) and str(v[0]) in api]
            ys = [nodes[s]["pos"][1] + nodes[s]["size"][1] / 2 for s in srcs]
            return sum(ys) / len(ys) if ys else None

        col = columns[d]
        targets = {k: target(k) for k in col}
        col.sort(key=lambda k: (targets[k] if targets[k] is not None else -1, keys.index(k)))
        y = ORIGIN[1]
        for k in col:
            t = targets[k]
            top = y if t is None else max(y, int(t - nodes[k]["size"][1] / 2))
            nodes[k]["pos"] = [x, top]
            y = top + nodes[k]["size"][1] + ROW_GAP
        x += max(nodes[k]["size"][0] for k in col) + COL_GAP


# --------------------------------------------------------------------------- UI -> API

def ui_to_api(ui: dict, object_info: dict) -> dict:
    """UI-format workflow -> API format ({id: {class_type, inputs, _meta}}), as the frontend queues it.
    Muted nodes (mode 2) and frontend-only notes are left out; bypassed nodes (mode 4) and other
    frontend-only nodes (reroutes, primitives) are not supported."""
    link_src = {link[0]: (link[1], link[2]) for link in ui.get("links", [])}
    modes = {n["id"]: n.get("mode", 0) for n in ui.get("nodes", [])}
    api = {}
    for node in ui.get("nodes", []):
        t = node["type"]
        if t in FRONTEND_ONLY or node.get("mode", 0) == 2:
            continue
        if node.get("mode", 0) == 4:
            raise NotImplementedError(f"node {node['id']} ({t}) is bypassed; bypass is not supported")
        if t not in object_info:
            raise KeyError(f"node {node['id']}: unknown node type {t!r} (not in object_info)")
        node_def = object_info[t]
        values = {}
        wv = node.get("widgets_values") or []
        if isinstance(wv, dict):
            values.update(wv)
        else:
            layout = widget_layout(node_def)
            if len(wv) != len(layout):
                raise ValueError(f"node {node['id']} ({t}): {len(wv)} widgets_values, expected {len(layout)}")
            values.update({name: v for (name, kind, _), v in zip(layout, wv) if kind == "value"})
        for entry in node.get("inputs") or []:
            link = entry.get("link")
            if link is None:
                continue
            src, slot = link_src[link]
            if modes.get(src, 0) == 2:
                values.pop(entry["name"], None)
                continue
            values[entry["name"]] = [str(src), slot]
        order = [n for n, _, _ in ordered_inputs(node_def)]
        inputs = {n: values[n] for n in order if n in values}
        api[str(node["id"])] = {
            "class_type": t,
            "inputs": inputs,
            "_meta": {"title": node.get("title") or node_def.get("display_name") or t},
        }
    return api


# --------------------------------------------------------------------------- CLI

def load_object_info(source: str) -> dict:
    """/object_info from a server URL (http://host:port, with or without /object_info) or a JSON file."""
    if source.startswith(("http://", "https://")):
        url = source.rstrip("/")
        if not urllib.parse.urlparse(url).path.endswith("object_info"):
            url += "/object_info"
        with urllib.request.urlopen(url, timeout=60) as r:
            return json.loads(r.read())
    with open(source, encoding="utf-8") as f:
        return json.load(f)


def dumps(ui: dict) -> str:
    """JSON with 2-space indents, but lists of plain values (positions, sizes, links, widgets_values) on
    one line each, to keep the file short and diffable."""
    return _fmt(ui, "") + "\n"


def _fmt(o, ind: str) -> str:
    scalar = (str, int, float, bool, type(None))
    if isinstance(o, list) and all(isinstance(v, scalar) for v in o):
        return json.dumps(o, ensure_ascii=False)
    inner = ind + "  "
    if isinstance(o, list):
        return "[\n" + ",\n".join(inner + _fmt(v, inner) for v in o) + "\n" + ind + "]"
    if isinstance(o, dict):
        if not o:
            return "{}"
        items = (inner + json.dumps(str(k), ensure_ascii=False) + ": " + _fmt(v, inner) for k, v in o.items())
        return "{\n" + ",\n".join(items) + "\n" + ind + "}"
    return json.dumps(o, ensure_ascii=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Convert an API-format ComfyUI workflow to the UI (litegraph) format.")
    p.add_argument("api", help="API-format workflow JSON")
    p.add_argument("--object-info", required=True, help="ComfyUI server URL or a saved /object_info JSON file")
    p.add_argument("-o", "--output", help="output file (default: stdout)")
    args = p.parse_args(argv)
    with open(args.api, encoding="utf-8") as f:
        api = json.load(f)
    text = dumps(convert(api, load_object_info(args.object_info)))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
