"""The example workflows (example_workflows/) as the end-to-end tests, the browser tests and
`scripts/demo.py --workflow` run them, importable as ``comfyui_domainstudio.testing.examples``.

Each example is one job: its UI workflow is ``example_workflows/<name>.json`` (what ComfyUI's
template browser lists) and its API twin ``example_workflows/api/<name>.json`` (what /prompt takes;
``scripts/api_to_ui.py --all`` makes the first from the second). The shipped files keep settings for
a real first run (SD1.5 at 512², hundreds of steps, previews on); ``tiny_changes`` gives what makes
one run in seconds on the tiny test checkpoint, and ``apply_api`` / ``apply_ui`` apply it to
either format, so the graphs tested are the shipped ones with a few values patched.

``run`` queues a workflow and follows /ws like testing/comfy_server.py's ``ComfyServer.run``, but
also keeps the binary preview frames (ProgressBar previews), which that one skips.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import os
import struct
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES_DIR = os.path.join(REPO, "example_workflows")
API_DIR = os.path.join(EXAMPLES_DIR, "api")
TINY_CHECKPOINT = "tiny_sd15.safetensors"
EVENT = "domainstudio.progress"
TRAINERS = ("DomainStudio_Train", "DomainStudio_Personalize")


@dataclass(frozen=True)
class Example:
    name: str  # example_workflows/<name>.json and example_workflows/api/<name>.json
    kind: str  # "domain" | "subject" | "load"
    method: str = ""
    trainer: str | None = "3"  # node id of the trainer (None: the graph only loads files)
    adapted: str = "9"  # SaveImage of the trained (or loaded) model's branch
    base: str = "12"  # SaveImage of the base model's branch, same seed
    folder: str = ""  # the input/ subfolder its Few-Shot Image Set reads

    @property
    def api_path(self) -> str:
        return os.path.join(API_DIR, f"{self.name}.json")

    @property
    def ui_path(self) -> str:
        return os.path.join(EXAMPLES_DIR, f"{self.name}.json")


EXAMPLES: dict[str, Example] = {e.name: e for e in (
    Example("domainstudio_text", "domain", "domainstudio", folder="domainstudio_shots"),
    Example("domainstudio_unconditional", "domain", "domainstudio", folder="domainstudio_shots"),
    Example("personalize_rare_token", "subject", "rare_token", folder="subject_photos"),
    Example("personalize_textual_inversion", "subject", "textual_inversion", folder="subject_photos"),
    Example("personalize_dreambooth", "subject", "dreambooth", folder="subject_photos"),
    Example("load_weights", "load", trainer=None),
)}
# What load_weights.json loads: the files the rare-token example writes on its first run.
LOAD_WEIGHTS_FILES = {"14": "loras/subject_00001.safetensors", "15": "embeddings/ds_subject.safetensors"}


def load(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def api(name: str) -> dict:
    return load(EXAMPLES[name].api_path)


def ui(name: str) -> dict:
    return load(EXAMPLES[name].ui_path)


def converter():
    """scripts/api_to_ui.py as a module (conversion, validation, widget layout)."""
    spec = importlib.util.spec_from_file_location("ds_api_to_ui", os.path.join(REPO, "scripts", "api_to_ui.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------ inputs

def subject_images(n: int = 3, resolution: int = 64, seed: int = 0) -> list[Image.Image]:
    """A tiny 'subject': an orange disc at varying places on varying dark backgrounds."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:resolution, 0:resolution].astype(np.float32)
    out = []
    for _ in range(n):
        cx, cy = (rng.random(2) * 0.4 + 0.3) * resolution
        disc = (((xx - cx) ** 2 + (yy - cy) ** 2) < (resolution * 0.22) ** 2)[..., None]
        bg = rng.random(3) * 0.5
        img = np.where(disc, np.array([0.9, 0.3, 0.1]), bg)
        out.append(Image.fromarray((img * 255).round().astype(np.uint8), "RGB"))
    return out


def write_inputs(input_dir: str, example: Example, n: int | None = None, resolution: int = 64) -> str | None:
    """The example's training images in `input_dir`/<folder> (ComfyUI's input folder); kept when
    present. Returns the folder, or None for an example without an image set."""
    if not example.folder:
        return None
    folder = os.path.join(input_dir, example.folder)
    if os.path.isdir(folder) and os.listdir(folder):
        return folder
    os.makedirs(folder, exist_ok=True)
    if example.kind == "domain":
        from .demo_data import write_domain

        write_domain(folder, n=n or 6, resolution=resolution)
    else:
        for i, im in enumerate(subject_images(n or 3, resolution)):
            im.save(os.path.join(folder, f"photo_{i}.png"))
    return folder


# ------------------------------------------------------------------------------------ tiny settings

def tiny_changes(workflow: dict, *, steps: int = 4, preview_every: int = 2, resolution: int = 64,
                 sampler_steps: int = 3, checkpoint: str = TINY_CHECKPOINT, **trainer) -> dict[str, dict]:
    """{node id: {input: value}} that make an example (API format) run in seconds on the tiny
    checkpoint: small images and latents, few steps, fp32, a higher learning rate so a few steps
    change the samples. `steps` counts each training stage; `trainer` overrides trainer inputs."""
    changes: dict[str, dict] = {}
    for k, node in workflow.items():
        t, inputs = node["class_type"], node.get("inputs", {})
        c: dict = {}
        if t == "CheckpointLoaderSimple":
            c = {"ckpt_name": checkpoint}
        elif t == "DomainStudio_FewShotImageSet":
            c = {"resolution": resolution}
        elif t == "EmptyLatentImage":
            c = {"width": resolution, "height": resolution, "batch_size": min(2, inputs.get("batch_size", 1))}
        elif t == "KSampler":
            c = {"steps": sampler_steps}
        elif t == "DomainStudio_Train":
            c = {"steps": steps, "batch_size": 3, "learning_rate": 1e-3, "precision": "fp32",
                 "preview_every": preview_every, "resolution": resolution}
        elif t == "DomainStudio_Personalize":
            c = {"ti_steps": steps, "unet_steps": steps, "ti_learning_rate": 5e-2, "unet_learning_rate": 1e-3,
                 "class_images": 2, "precision": "fp32", "preview_every": preview_every, "resolution": resolution}
        if t in TRAINERS:
            c.update(trainer)
        if c:
            changes[k] = c
    return changes


def apply_api(workflow: dict, changes: dict[str, dict]) -> dict:
    out = copy.deepcopy(workflow)
    for k, c in changes.items():
        unknown = set(c) - set(out[k]["inputs"])
        assert not unknown, f"node {k} ({out[k]['class_type']}) has no inputs {sorted(unknown)}"
        out[k]["inputs"].update(c)
    return out


def apply_ui(workflow: dict, changes: dict[str, dict], object_info: dict) -> dict:
    """The same changes on a UI-format workflow: widget values by name, through the frontend's
    widget order for the node definitions of the host in `object_info`."""
    conv = converter()
    out = copy.deepcopy(workflow)
    nodes = {str(n["id"]): n for n in out["nodes"]}
    for k, c in changes.items():
        node = nodes[k]
        layout = conv.widget_layout(object_info[node["type"]])
        index = {name: i for i, (name, kind, _) in enumerate(layout) if kind == "value"}
        unknown = set(c) - set(index)
        assert not unknown, f"node {k} ({node['type']}) has no widgets {sorted(unknown)}"
        values = node["widgets_values"]
        for name, v in c.items():
            values[index[name]] = v
    return out


def step_total(example: Example, workflow: dict) -> int:
    """The progress total of the example's trainer (class images and every stage)."""
    inputs = workflow[example.trainer]["inputs"]
    if example.kind == "domain":
        return inputs["steps"]
    method = inputs["method"]
    return {"rare_token": inputs["ti_steps"] + inputs["unet_steps"], "textual_inversion": inputs["ti_steps"],
            "dreambooth": inputs["class_images"] + inputs["unet_steps"],
            "dreambooth_no_prior": inputs["unet_steps"]}[method]


# ------------------------------------------------------------------------------------ running

@dataclass
class Run:
    prompt_id: str
    messages: list[dict] = field(default_factory=list)  # JSON messages, each with "t" (time received)
    previews: list[dict] = field(default_factory=list)  # binary frames: {"t", "event", "format", "data"}

    def of(self, kind: str) -> list[dict]:
        return [m for m in self.messages if m["type"] == kind]

    def errors(self) -> list[dict]:
        return [m["data"] for m in self.of("execution_error")]

    def error_text(self) -> str:
        return "\n".join(f"{e.get('node_type')}: {e.get('exception_message')}\n{''.join(e.get('traceback') or [])}"
                         for e in self.errors())

    def events(self, node: str) -> list[dict]:
        """The pack's progress events of one node, in order."""
        return [m["data"] for m in self.of(EVENT) if str(m["data"].get("node")) == str(node)]

    def progress(self, node: str) -> list[dict]:
        return [m["data"] for m in self.of("progress") if str(m["data"].get("node")) == str(node)]

    def executing_window(self, node: str) -> tuple[float, float]:
        """(start, end) times of `node`'s execution, from the executing messages."""
        t0 = next(m["t"] for m in self.of("executing") if str(m["data"].get("node")) == str(node))
        later = [m["t"] for m in self.messages if m["t"] > t0 and (
            (m["type"] == "executing" and str(m["data"].get("node")) != str(node))
            or m["type"] in ("execution_success", "execution_error", "execution_interrupted"))]
        return t0, min(later) if later else float("inf")


def run(server, workflow: dict, timeout: float = 600.0, on_message=None) -> Run:
    """Queue an API-format workflow on `server` (testing.comfy_server.ComfyServer) and follow /ws
    until the prompt ends. on_message(msg) sees every JSON message as it arrives (e.g. to POST
    /interrupt mid-run) and every binary frame as {"type": "binary", ...}."""
    import websocket  # websocket-client

    client_id = uuid.uuid4().hex
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}", timeout=timeout)
    try:
        prompt_id = server.post("/prompt", {"prompt": workflow, "client_id": client_id})["prompt_id"]
        out = Run(prompt_id)
        deadline = time.time() + timeout
        while time.time() < deadline:
            raw = ws.recv()
            now = time.time()
            if isinstance(raw, bytes):
                event, fmt = struct.unpack(">II", raw[:8]) if len(raw) >= 8 else (0, 0)
                frame = {"type": "binary", "t": now, "event": event, "format": fmt, "data": raw[8:]}
                out.previews.append(frame)
                if on_message:
                    on_message(frame)
                continue
            msg = json.loads(raw)
            msg["t"] = now
            out.messages.append(msg)
            if on_message:
                on_message(msg)
            data = msg.get("data") or {}
            if not isinstance(data, dict) or data.get("prompt_id") not in (None, prompt_id):
                continue
            if msg["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                return out
            if msg["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                return out
        raise TimeoutError(f"workflow did not finish within {timeout} s")
    finally:
        ws.close()


def preview_image(frame: dict) -> Image.Image:
    """A binary preview frame (event 1: format 1 JPEG / 2 PNG, then the image) as a PIL image."""
    return Image.open(io.BytesIO(frame["data"]))


def saved_images(server, run_: Run, node: str) -> list[np.ndarray]:
    """The images a SaveImage node wrote in this run, as int arrays."""
    out = server.outputs(run_.prompt_id)
    return [np.asarray(Image.open(server.output_file(im))).astype(int) for im in out[node]["images"]]


def model_files(server, kind: str = "loras") -> set[str]:
    folder = os.path.join(server.base, "models", kind)
    return set(os.listdir(folder)) if os.path.isdir(folder) else set()


# ------------------------------------------------------------------------------------ checks

def check_progress_events(r: Run, example: Example, total: int, *, final: str = "done") -> list[dict]:
    """The trainer's "domainstudio.progress" events of run `r` (what js/domainstudio.js draws):
    statuses running ... `final`; steps and loss history grow; every running text names the step of
    `total`, the time per step and an ETA; the final text the step and the time taken. Returns the
    events."""
    import re

    events = r.events(example.trainer)
    assert events, f"no {EVENT} event from node {example.trainer}"
    statuses = [e["status"] for e in events]
    assert statuses[-1] == final and set(statuses[:-1]) == {"running"}, statuses
    running = events[:-1]
    assert len(running) >= 2, f"too few running events: {statuses}"
    assert all(e["prompt_id"] == r.prompt_id and e["total"] == total for e in events), events[0]
    steps = [e["step"] for e in running]
    assert steps == sorted(steps) and steps[0] >= 1, steps
    # Stages without losses (DreamBooth's class images) come first and carry an empty history.
    trained = [e for e in running if e["stage"] != "class images"]
    assert len(trained) >= 2, f"too few training events: {[e['stage'] for e in running]}"
    lengths = [len(e["loss"]["steps"]) for e in trained]
    assert lengths == sorted(lengths) and lengths[-1] > lengths[0], f"the loss history does not grow: {lengths}"
    for e in trained + events[-1:]:
        terms = e["loss"]["terms"]
        assert terms and all(len(v) == len(e["loss"]["steps"]) for v in terms.values()), e["loss"]
    # The text carries no stage or status: the frontend extension puts them in front.
    for e in running:
        assert re.match(rf"step {e['step']}/{total} · .* · ETA \d+:\d\d$", e["text"]), e["text"]
    last = events[-1]
    assert re.match(rf"step {last['step']}/{total} · \d+:\d\d$", last["text"]), last["text"]
    if final == "done":
        assert steps[-1] == total and last["step"] == total, (steps, last)
    return events


def check_preview(r: Run, example: Example, resolution: int = 64) -> Image.Image:
    """A ProgressBar preview (binary frame) arrived while the trainer ran, and it is a square,
    non-blank image; the trainer's UI shows the last preview as its image."""
    t0, t1 = r.executing_window(example.trainer)
    frames = [f for f in r.previews if f["event"] == 1 and t0 <= f["t"] <= t1]
    assert frames, f"no preview image arrived while node {example.trainer} ran ({len(r.previews)} frames in all)"
    im = preview_image(frames[-1])
    im.load()
    # The server scales a preview to fit its max size (512 here), keeping the aspect ratio.
    assert im.size[0] == im.size[1] and im.size[0] in (resolution, 512), im.size
    assert np.asarray(im).std() > 1, "the preview is a blank image"
    executed = [m["data"] for m in r.of("executed") if str(m["data"].get("node")) == example.trainer]
    assert executed and (executed[0].get("output") or {}).get("images"), "the trainer shows no image after the run"
    return im


def mean_abs_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert a and len(a) == len(b), (len(a), len(b))
    return float(np.mean([np.abs(x - y).mean() for x, y in zip(a, b)]))
