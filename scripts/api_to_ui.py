#!/usr/bin/env python3
"""Convert an API-format ComfyUI workflow (what /prompt takes) into a UI-format one (the litegraph
JSON, schema 0.4, that the frontend loads from example_workflows/ as a template), and back.

    python scripts/api_to_ui.py example_workflows/api/domainstudio_text.json \\
        --object-info http://127.0.0.1:8188 -o example_workflows/domainstudio_text.json
    python scripts/api_to_ui.py --all --object-info http://127.0.0.1:8188   # every example

--object-info is a ComfyUI server (its /object_info is fetched) or a saved /object_info JSON file.
The result depends only on the node definitions' structure (input names, types, order, outputs,
defaults), not on a server's model lists, so any server with this pack gives the same file. Use
the oldest supported host (its frontend shows every input, so its nodes are the tallest).

Layout: when every node of the API workflow carries `"_meta": {"layout": [column, row]}`, nodes are
placed in that grid (columns left to right, rows stacked); otherwise in columns by graph depth.
`"_meta": {"size": [width, height]}` sets a node's width (its height only grows past the minimum).
Sizes follow the frontend's own minimum sizes (and the DOM widget js/domainstudio.js adds), and
the saved view (`extra.ds`) shows every node in the free part of a 1400x900 window.
`--complete` / `--all` fill in inputs an API workflow leaves out with the node's defaults, so the
API twins stay complete (what /prompt needs) when a node gains an input.

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

validate_ui() lists what stops a UI workflow from loading and queueing on a given host (unknown node
types, widget values that do not fit, incompatible links, unconnected required inputs);
api_meaning() reduces an API workflow to what it means, to compare twins whatever their bytes.
tests/test_example_workflow_ui.py runs both against a live server for every example workflow.

Pure standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.parse
import urllib.request

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_MODES = ["fixed", "increment", "decrement", "randomize"]
CONTROL_VALUE = "fixed"  # keeps the seeds of the API workflow, so runs are reproducible
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # UI nodes that never reach /prompt

# Layout (canvas units). Heights follow litegraph's computeSize (measured in the 1.32 and 1.47
# frontends): a slot row is 20, a plain widget 24, a multiline text at least 54 (given MULTILINE_H
# here, room to read a prompt), 14 of padding; the title bar (TITLE_H) is drawn above `pos`.
SLOT_H, WIDGET_H, MULTILINE_H, PAD_H, TITLE_H = 20, 24, 96, 20, 30
# DOM widgets that frontend extensions add to nodes, by node type: js/domainstudio.js gives the two
# trainer nodes their progress display (getMinHeight 170, plus the frontend's 4 of margin).
DOM_WIDGETS = {"DomainStudio_Train": 174, "DomainStudio_Personalize": 174}
COL_GAP, ROW_GAP, ORIGIN = 60, 60, (50, 80)
SHAPE_GRID, SHAPE_HOLLOW_CIRCLE = 6, 7  # litegraph RenderShape
# The saved view (extra.ds) fits every node into the part of a 1400x900 window that the frontend's
# own chrome leaves free: the left sidebar (60 px), the tabs, banner and floating run bar above
# (up to y 130 in 1.32), a margin. Measured in the 1.32 and 1.47 frontends (tests/browser checks
# that nothing covers a node when the workflow opens).
VIEW_BOX = (75, 140, 1385, 885)  # x0, y0, x1, y1 in CSS pixels
# Below this zoom the classic canvas draws nodes without text (LiteGraph's level of detail: the
# setting LiteGraph.Canvas.MinFontSizeForLOD, default 8 px, over NODE_TEXT_SIZE 14 px): a saved view
# must not open a workflow there, so a layout that only fits further out is refused.
MIN_SCALE = 0.58


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


def _node_size(node_def: dict, n_inputs: int, title: str, node_type: str = "") -> list[int]:
    widgets = widget_layout(node_def)
    multiline = sum(1 for _, kind, spec in widgets if kind == "value" and input_type(spec) == "STRING"
                    and input_options(spec).get("multiline"))
    rows = max(n_inputs, len(node_def.get("output", [])))
    h = rows * SLOT_H + (len(widgets) - multiline) * WIDGET_H + multiline * MULTILINE_H + PAD_H
    h += DOM_WIDGETS.get(node_type, 0)
    w = 315
    if multiline:
        w = 400
    elif not widgets and rows <= 2:
        w = 240
    w = max(w, 8 * len(title) + 60)
    if node_def.get("output_node") and any(input_type(s) == "IMAGE" for _, s, _ in socket_inputs(node_def)):
        w, h = max(w, 300), max(h, 300)  # room for the image preview
    return [w, h]


def complete(api: dict, object_info: dict) -> dict:
    """The API workflow with every widget input the node has and the workflow leaves out set to its
    default (what the frontend would queue), in the node's input order; links and values it sets
    are kept. A combo without a default (a file list) stays missing: it must be chosen."""
    out = {}
    for k, node in api.items():
        node_def = object_info[node["class_type"]]
        values = dict(node.get("inputs", {}))
        for name, spec, _ in widget_inputs(node_def):
            if name not in values and ("default" in input_options(spec) or input_type(spec) != "COMBO"):
                values[name] = default_value(spec)
        order = [n for n, _, _ in ordered_inputs(node_def)]
        inputs = {n: values[n] for n in order if n in values}
        inputs.update({n: v for n, v in values.items() if n not in inputs})  # unknown: convert() reports them
        out[k] = {**node, "inputs": inputs}
    return out


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
        ui_node["size"] = _node_size(node_def, len(entries), title or node_def.get("display_name") or "",
                                     node["class_type"])
        wanted = (node.get("_meta") or {}).get("size")
        if isinstance(wanted, list) and len(wanted) == 2:  # a chosen width; a height only to grow
            ui_node["size"] = [int(wanted[0]), max(ui_node["size"][1], int(wanted[1]))]
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

    if all(isinstance((api[k].get("_meta") or {}).get("layout"), list) for k in keys):
        _grid_layout(api, nodes, keys)
    else:
        _layout(api, nodes, keys)

    # Execution order: by column, then top to bottom (a topological order, as columns follow depth).
    for order, k in enumerate(sorted(keys, key=lambda k: (nodes[k]["pos"][0], nodes[k]["pos"][1], ids[k]))):
        nodes[k]["order"] = order

    return {
        "last_node_id": max(ids.values(), default=0),
        "last_link_id": len(links),
        "nodes": [nodes[k] for k in keys],
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": fit_view(nodes.values())},
        "version": 0.4,
    }


def bounds(nodes) -> tuple[float, float, float, float]:
    """Canvas rectangle (x0, y0, x1, y1) holding every node with its title bar."""
    nodes = list(nodes)
    return (min(n["pos"][0] for n in nodes), min(n["pos"][1] - TITLE_H for n in nodes),
            max(n["pos"][0] + n["size"][0] for n in nodes), max(n["pos"][1] + n["size"][1] for n in nodes))


def fit_view(nodes, box=VIEW_BOX) -> dict:
    """The frontend's saved view ({"scale", "offset"}: screen = (canvas + offset) * scale) that shows
    every node inside `box` (CSS pixels), at most at 100 %."""
    nodes = list(nodes)
    if not nodes:
        return {"scale": 1, "offset": [0, 0]}
    x0, y0, x1, y1 = bounds(nodes)
    scale = min(1.0, (box[2] - box[0]) / (x1 - x0), (box[3] - box[1]) / (y1 - y0))
    scale = int(scale * 100) / 100  # rounded down: never larger than what fits
    return {"scale": scale, "offset": [round(box[0] / scale - x0, 1), round(box[1] / scale - y0, 1)]}


def _grid_layout(api: dict, nodes: dict[str, dict], keys: list[str]) -> None:
    """Positions from each node's `_meta.layout` = [column, row]: columns left to right (as wide as
    their widest node), rows stacked top to bottom in each column."""
    cells = {k: tuple(api[k]["_meta"]["layout"]) for k in keys}
    columns: dict[int, list[str]] = {}
    for k in sorted(keys, key=lambda k: cells[k]):
        columns.setdefault(cells[k][0], []).append(k)
    x = ORIGIN[0]
    for c in sorted(columns):
        y = ORIGIN[1]
        for k in columns[c]:
            nodes[k]["pos"] = [x, y]
            y += nodes[k]["size"][1] + ROW_GAP + TITLE_H
        x += max(nodes[k]["size"][0] for k in columns[c]) + COL_GAP


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
            y = top + nodes[k]["size"][1] + ROW_GAP + TITLE_H
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
            # Positional, as the frontend restores them: value i goes to widget i; widgets past the end
            # keep their defaults (a host that appends a widget does not break a saved workflow), and
            # values past the last widget would be dropped, which changes the workflow.
            layout = widget_layout(node_def)
            if len(wv) > len(layout):
                raise ValueError(f"node {node['id']} ({t}): {len(wv)} widgets_values, but its widgets are "
                                 f"{[n for n, _, _ in layout]}")
            values.update({name: v for (name, kind, _), v in zip(layout, wv) if kind == "value"})
            values.update({name: default_value(spec) for name, kind, spec in layout[len(wv):]
                           if kind == "value" and name not in values})
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


# --------------------------------------------------------------------------- checks

def types_compatible(out_type, in_type) -> bool:
    """Whether the frontend lets an output of ``out_type`` connect to an input of ``in_type``: equal
    types, "*" on either side, or a shared member of comma-separated type lists ("IMAGE,MASK")."""
    a = "COMBO" if isinstance(out_type, list) else str(out_type)
    b = "COMBO" if isinstance(in_type, list) else str(in_type)
    if "*" in (a, b):
        return True
    return bool({t.strip() for t in a.split(",")} & {t.strip() for t in b.split(",")})


def value_problem(spec, value) -> str | None:
    """Why ``value`` does not fit the widget input ``spec`` (None when it fits)."""
    t, opts = input_type(spec), input_options(spec)
    if t == "COMBO":
        choices = combo_options(spec) or []
        return None if value in choices else f"not among the options {choices[:20]}"
    if t == "BOOLEAN":
        return None if isinstance(value, bool) else "not a boolean"
    if t == "STRING":
        return None if isinstance(value, str) else "not a string"
    if t in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"not a number ({t})"
        if t == "INT" and not (isinstance(value, int) or float(value).is_integer()):
            return "not an integer"
        lo, hi = opts.get("min"), opts.get("max")
        if lo is not None and value < lo or hi is not None and value > hi:
            return f"outside [{lo}, {hi}]"
    return None


def validate_ui(ui: dict, object_info: dict) -> list[str]:
    """Problems that stop a UI-format workflow from loading and queueing as saved on the host whose
    /object_info is given; empty when there are none. Checked: every node type exists (frontend-only
    notes aside); every saved widget value fits its input (combo value among the options, numbers
    within min/max, the right type) and none would be dropped; every link joins an existing output to
    an existing input of a compatible type; every required input is linked or has a widget value.
    What a newer host adds without breaking saved workflows (extra outputs, optional inputs, widgets
    appended after the saved ones that have defaults) is not a problem."""
    problems: list[str] = []
    nodes = {n["id"]: n for n in ui.get("nodes", [])}
    for n in ui.get("nodes", []):
        t = n.get("type")
        where = f"node {n.get('id')} ({t})"
        if t in FRONTEND_ONLY:
            continue
        if t not in object_info:
            problems.append(f"{where}: no such node type on this host")
            continue
        node_def = object_info[t]
        specs = {name: (spec, opt) for name, spec, opt in ordered_inputs(node_def)}
        linked = {(i.get("widget") or {}).get("name", i.get("name")) for i in n.get("inputs") or []
                  if i.get("link") is not None}
        for i in n.get("inputs") or []:
            if i.get("link") is not None and i.get("name") not in specs:
                problems.append(f"{where}: input {i.get('name')!r} is linked but the node has no such input")
        # Socket inputs (no widget): required ones need a link.
        for name, spec, opt in socket_inputs(node_def):
            if not opt and name not in linked:
                problems.append(f"{where}: required input {name!r} ({input_type(spec)}) is not connected")
        # Widget values.
        layout, wv = widget_layout(node_def), n.get("widgets_values") or []
        if isinstance(wv, dict):
            saved = {name: wv[name] for name, _, _ in widget_inputs(node_def) if name in wv}
            extra = sorted(set(wv) - set(saved))
            if extra:
                problems.append(f"{where}: widgets_values for inputs it does not have: {extra}")
        else:
            if len(wv) > len(layout):
                problems.append(f"{where}: {len(wv)} widgets_values but only {len(layout)} widgets "
                                f"{[nm for nm, _, _ in layout]}; the extra values would be dropped")
            saved = {}
            for (name, kind, spec), v in zip(layout, wv):
                if kind == "value":
                    saved[name] = v
                elif kind == "control" and v not in CONTROL_MODES:
                    problems.append(f"{where}.{name}: control_after_generate {v!r} not among {CONTROL_MODES}")
        for name, spec, opt in widget_inputs(node_def):
            if name in linked:
                continue  # the link's value is used
            if name not in saved:
                if not opt and "default" not in input_options(spec):
                    problems.append(f"{where}: required widget {name!r} has no saved value and no default")
                continue
            why = value_problem(spec, saved[name])
            if why:
                problems.append(f"{where}.{name} = {saved[name]!r}: {why}")
        # Saved outputs: existing slots keep a compatible type; slots the host dropped carry no link.
        outs = node_def.get("output", [])
        for slot, o in enumerate(n.get("outputs") or []):
            if slot < len(outs):
                if not types_compatible(o.get("type"), outs[slot]):
                    problems.append(f"{where}: output {slot} saved as {o.get('type')}, the node gives {outs[slot]}")
            elif o.get("links"):
                problems.append(f"{where}: output {slot} is linked but the node has only {len(outs)} outputs")

    for link in ui.get("links", []):
        if isinstance(link, dict):
            link = [link.get(k) for k in ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")]
        link_id, src, src_slot, dst, dst_slot, ltype = link[:6]
        where = f"link {link_id} ({src}:{src_slot} -> {dst}:{dst_slot})"
        a, b = nodes.get(src), nodes.get(dst)
        if a is None or b is None:
            problems.append(f"{where}: joins a node that is not in the workflow")
            continue
        if a["type"] not in object_info or b["type"] not in object_info:
            if a["type"] in FRONTEND_ONLY or b["type"] in FRONTEND_ONLY:
                problems.append(f"{where}: links to a frontend-only node ({a['type']} -> {b['type']})")
            continue  # unknown node types are reported above
        outs = object_info[a["type"]].get("output", [])
        if not 0 <= src_slot < len(outs):
            problems.append(f"{where}: node {src} ({a['type']}) has no output {src_slot}")
            continue
        entries = b.get("inputs") or []
        if not 0 <= dst_slot < len(entries):
            problems.append(f"{where}: node {dst} ({b['type']}) has no input slot {dst_slot}")
            continue
        entry = entries[dst_slot]
        if entry.get("link") != link_id:
            problems.append(f"{where}: input slot {dst_slot} of node {dst} does not hold this link")
        saved_outs = a.get("outputs") or []
        if src_slot >= len(saved_outs) or link_id not in (saved_outs[src_slot].get("links") or []):
            problems.append(f"{where}: output {src_slot} of node {src} does not list this link")
        name = (entry.get("widget") or {}).get("name", entry.get("name"))
        spec = {n_: s for n_, s, _ in ordered_inputs(object_info[b["type"]])}.get(name)
        if spec is None:
            continue  # reported with the node
        if not types_compatible(outs[src_slot], input_type(spec)):
            problems.append(f"{where}: output type {outs[src_slot]} does not fit input {name!r} "
                            f"({input_type(spec)}) of node {dst} ({b['type']})")
        elif ltype is not None and not types_compatible(ltype, outs[src_slot]):
            problems.append(f"{where}: saved type {ltype} differs from the output's type {outs[src_slot]}")
    return problems


def api_meaning(api: dict, object_info: dict) -> dict:
    """An API-format workflow reduced to what it means on a host: per node id, its class and every
    input's value (a link [source id, slot] or a widget value; an optional widget input left out
    takes its default, as the frontend would send it; a required one left out stays missing)."""
    out = {}
    for k, node in api.items():
        node_def = object_info.get(node["class_type"], {})
        inputs = dict(node.get("inputs", {}))
        for name, spec, opt in widget_inputs(node_def) if node_def else []:
            if opt and name not in inputs and "default" in input_options(spec):
                inputs[name] = input_options(spec)["default"]
        out[str(k)] = {"class_type": node["class_type"],
                       "inputs": {n: ([str(v[0]), v[1]] if _is_link(v) else v) for n, v in inputs.items()}}
    return out


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


EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "example_workflows")


def dumps_api(api: dict) -> str:
    return json.dumps(api, indent=1, ensure_ascii=False) + "\n"


def regenerate(object_info: dict, folder: str = EXAMPLES) -> list[str]:
    """Every API workflow in `folder`/api/: completed with the current defaults (written back), and
    converted into its UI twin `folder`/<same name>.json. Returns the files written."""
    written = []
    api_dir = os.path.join(folder, "api")
    for name in sorted(os.listdir(api_dir)):
        if not name.endswith(".json"):
            continue
        path = os.path.join(api_dir, name)
        with open(path, encoding="utf-8") as f:
            api = complete(json.load(f), object_info)
        ui = convert(api, object_info)  # raises before anything is written for a broken workflow
        if ui["extra"]["ds"]["scale"] < MIN_SCALE:
            x0, y0, x1, y1 = bounds(ui["nodes"])
            raise ValueError(f"{name}: the layout ({x1 - x0:.0f} x {y1 - y0:.0f} canvas units) only fits the view at "
                             f"{ui['extra']['ds']['scale']:.0%}, where the canvas draws nodes without text (below "
                             f"{MIN_SCALE:.0%}): make it more compact")
        for target, text in ((path, dumps_api(api)), (os.path.join(folder, name), dumps(ui))):
            with open(target, "w", encoding="utf-8") as f:
                f.write(text)
            written.append(target)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Convert an API-format ComfyUI workflow to the UI (litegraph) format.")
    p.add_argument("api", nargs="?", help="API-format workflow JSON")
    p.add_argument("--object-info", required=True, help="ComfyUI server URL or a saved /object_info JSON file")
    p.add_argument("-o", "--output", help="output file (default: stdout)")
    p.add_argument("--complete", action="store_true", help="fill in every widget input the API workflow leaves "
                   "out with its default, and print (or -o) the API workflow instead of converting it")
    p.add_argument("--all", action="store_true", help=f"regenerate the examples: complete every "
                   f"example_workflows/api/*.json in place and write its UI twin example_workflows/<name>.json")
    args = p.parse_args(argv)
    info = load_object_info(args.object_info)
    if args.all:
        for path in regenerate(info):
            print(f"wrote {os.path.relpath(path)}")
        return 0
    if not args.api:
        p.error("give an API workflow, or --all")
    with open(args.api, encoding="utf-8") as f:
        api = json.load(f)
    text = dumps_api(complete(api, info)) if args.complete else dumps(convert(api, info))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
