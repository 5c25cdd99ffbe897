"""What both trainer nodes share: turning node inputs into a core run (trainer/run.py) and the
outcome into node outputs, progress for the stock UI (ProgressBar, Cancel, previews) and the
pack's own extension (js/domainstudio.js, through ComfyUI's server messaging), and errors that
name the node and the input. Nothing here trains or writes files itself."""

from __future__ import annotations

import logging
import os
import time

import comfy.utils
import torch
import folder_paths

from ..trainer import files, grids, imageset, plot, run as core
from ..trainer.errors import SettingError, TrainingError
from ..trainer.hosts import comfy_compat as compat
from ..trainer.hosts.comfy import ComfyHost

log = logging.getLogger("DomainStudio")

EVENT = "domainstudio.progress"
EVENT_EVERY_S = 0.5  # at most two chart updates a second (and always on a loss sync after that)
HISTORY_POINTS = 256


def fail(node: str, e: Exception) -> ValueError:
    return ValueError(f"{node}: {e}")


def resolve_images(node: str, image_set, images, resolution: int, min_images: int):
    if image_set is not None and images is not None:
        raise ValueError(f"{node}: connect either image_set or images, not both")
    if image_set is not None:
        return image_set
    if images is None:
        raise ValueError(f"{node}: no training images; connect a Few-Shot Image Set or an IMAGE batch")
    try:
        return imageset.prepare_image_set(images, None, resolution, flip=False, min_images=min_images)
    except imageset.ImageSetError as e:
        raise ValueError(f"{node}: images: {e}") from None


def folders() -> files.Folders:
    return files.Folders(loras=folder_paths.get_folder_paths("loras")[0],
                         embeddings=folder_paths.get_folder_paths("embeddings")[0])


NONE = "none"


def weight_file_options() -> list[str]:
    """'loras/<file>' and 'embeddings/<file>' for every file the stock loaders list."""
    out = ["loras/" + f for f in folder_paths.get_filename_list("loras")]
    out += ["embeddings/" + f for f in folder_paths.get_filename_list("embeddings")]
    return out


def resolve_weight_file(node: str, choice: str, what: str = "file") -> tuple[str, str]:
    """('loras' | 'embeddings', absolute path) of a combo choice; refuses anything else."""
    for folder in ("loras", "embeddings"):
        prefix = folder + "/"
        if choice.startswith(prefix):
            path = folder_paths.get_full_path(folder, choice[len(prefix):])
            if path is None:
                raise ValueError(f"{node}: {what}={choice!r} was not found in models/{folder} (refresh the node list "
                                 "after adding files)")
            return folder, path
    raise ValueError(f"{node}: {what}={choice!r} must start with 'loras/' or 'embeddings/'")


class NodeProgress:
    """core.Progress -> ProgressBar (stock progress, previews and Cancel), the pack's chart event
    and a log line every few steps."""

    def __init__(self, node: str, total_hint: int = 1):
        self.node = node
        self.pbar = comfy.utils.ProgressBar(max(1, total_hint))
        self.prompt_id, self.node_id = compat.executing_context()
        self.last_event = 0.0
        self.last_log_step = -1
        self.last: core.Progress | None = None

    def __call__(self, p: core.Progress) -> None:
        self.last = p
        preview = None
        if p.preview is not None:
            preview = ("JPEG", grids.to_pil(p.preview), 512)
        now = time.monotonic()
        new_stage = p.stage != getattr(self, "last_stage", None)
        self.last_stage = p.stage
        # Loss syncs at most twice a second; stages without losses (class images, the quality
        # report) still get their progress line, once a second.
        if (p.losses is not None and (now - self.last_event >= EVENT_EVERY_S or p.step >= p.total or p.message)) \
                or new_stage or (p.losses is None and now - self.last_event >= 2 * EVENT_EVERY_S):
            self.send(p, "running")
        if p.losses is not None and (p.stage_step == 1 or p.stage_step % 10 == 0 or p.stage_step == p.stage_total):
            shown = " ".join(f"{k} {v:.4g}" for k, v in p.losses.items())
            log.info("%s %s step %d/%d: %s", self.node, p.stage, p.stage_step, p.stage_total, shown)
        compat.raise_if_cancelled()  # every step: the host's hook is throttled on newer ComfyUI
        self.pbar.update_absolute(p.step, p.total, preview)  # the stock bar (its hook may also raise)

    def send(self, p: core.Progress | None, status: str, message: str = "") -> None:
        p = p or self.last
        if p is None and status == "running":
            return
        self.last_event = time.monotonic()
        data = {"node": self.node_id, "prompt_id": self.prompt_id, "status": status,
                "stage": p.stage if p else "", "step": p.step if p else 0, "total": p.total if p else 0,
                "elapsed": round(p.seconds, 3) if p else 0.0,
                "s_per_step": round(p.seconds_per_step, 4) if p and p.seconds_per_step else None,
                "eta": round(p.eta, 1) if p and p.eta is not None and status == "running" else None,
                "text": progress_text(p, status), "loss": history_payload(p.history if p else None),
                "message": message or (p.message if p and p.message not in ("", "preview") else "")}
        send_event(EVENT, data)


def send_event(event: str, data: dict) -> None:
    """ComfyUI's server messaging, to the client that queued the prompt (no server: no-op)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None:
        server.send_sync(event, data, getattr(server, "client_id", None))


def progress_text(p: core.Progress | None, status: str) -> str:
    """The progress line without the stage or status: js/domainstudio.js puts those in front
    ("train · " while running, "done · " after)."""
    if p is None:
        return ""
    if status != "running":
        return f"step {p.step}/{p.total} · {_clock(p.seconds)}"
    text = f"step {p.step}/{p.total}"
    if p.seconds_per_step:
        text += f" · {p.seconds_per_step:.2f} s/step · ETA {_clock(p.eta or 0)}"
    return text


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def history_payload(history: dict | None) -> dict:
    """The run's weighted loss history, downsampled to at most HISTORY_POINTS points."""
    if not history or not history.get("steps"):
        return {"steps": [], "terms": {}}
    steps = history["steps"]
    n = len(steps)
    stride = max(1, -(-n // HISTORY_POINTS))
    idx = list(range(0, n, stride))
    if idx[-1] != n - 1:
        idx.append(n - 1)

    def clean(v):
        return None if v is None or v != v or v in (float("inf"), float("-inf")) else round(float(v), 6)

    terms = {k: [clean(vals[i]) if i < len(vals) else None for i in idx] for k, vals in history["terms"].items()}
    return {"steps": [steps[i] for i in idx], "terms": terms}


def train(node: str, method: str, values: dict, *, model, clip, vae, image_set, images, resolution: int,
          save_name: str, resume_from: str = NONE, clip_vision=None):
    """Run `method` for a node. Returns (outcome, NodeProgress)."""
    compat.require(node)
    try:
        m = core.get(method)
    except KeyError as e:
        raise fail(node, e.args[0] if e.args else e) from None
    images_set = resolve_images(node, image_set, images, resolution, m.min_images)
    method_values = {k: v for k, v in values.items() if k in {s.name for s in core.settings.specs(m.config)}}
    option_values = {k: v for k, v in values.items() if k in {s.name for s in core.settings.specs(core.RunOptions)}}
    try:
        cfg = core.resolve_config(m, method_values)
        opts = core.default_options(m, **option_values)
        saver = files.Saver(folders(), save_name, host="comfy", images=len(images_set),
                            resolution=images_set.resolution)
    except (TrainingError, ValueError) as e:
        raise fail(node, e) from None
    for w in getattr(images_set, "warnings", []) or []:
        log.warning("%s: %s", node, w)
    host = ComfyHost(model, clip, vae)
    resume = None
    if resume_from and resume_from != NONE:
        _, path = resolve_weight_file(node, resume_from, "resume_from")
        try:
            # Read outside ComfyUI's inference mode: the optimizer updates these tensors in place.
            with torch.inference_mode(False):
                resume = files.load_resume(path, method=m, cfg=cfg, opts=opts, fingerprint=host.fingerprint())
        except (TrainingError, ValueError) as e:
            raise fail(node, e) from None
    progress = NodeProgress(node)
    try:
        features = None
        if clip_vision is not None:
            def features(img):
                return clip_vision.encode_image(img[..., :3]).image_embeds.float()
        outcome = core.run(host, m, cfg, images_set, opts, saver=saver, resume=resume, on_progress=progress,
                           image_features=features, feature_space="CLIP vision" if clip_vision is not None else "")
    except TrainingError as e:
        progress.send(None, "error", str(e))
        raise fail(node, e) from None
    except BaseException:
        last = progress.last
        progress.send(last, "cancelled", last.message if last is not None and last.message.startswith("kept") else "")
        raise
    for w in outcome.warnings:
        log.warning("%s: %s", node, w)
    for s in outcome.stages:
        log.info("%s %s: %d steps in %.1f s (%.3f s/step)", node, s.name, s.steps_done, s.seconds, s.seconds_per_step)
    message = ""
    if outcome.save_error:
        message = f"{node}: {outcome.save_error}"
        log.error(message)
    elif outcome.files:
        message = "saved " + ", ".join(list_name(p) for p in outcome.files)
        for p in outcome.files:
            log.info("%s: saved %s", node, p)
    progress.send(progress.last, "done", message)
    return outcome, message


def loss_plot(outcome) -> "torch.Tensor":
    """The weighted loss terms of every stage as one IMAGE."""
    history = {}
    for s in outcome.stages:
        if not s.history_steps:
            continue
        for k, vals in core.weighted_history(outcome, s).items():
            label = k if len(outcome.stages) == 1 else f"{s.name} {k}"
            history[label] = vals
    return plot.render_loss_plot(history or {"loss": []}, title=f"{outcome.method} loss (weighted terms)")


def run_trainer(cls, node: str, inputs: dict):
    """A trainer node's execute: its inputs as given by ComfyUI -> (outcome, outputs())."""
    inputs = dict(inputs)
    fixed = {k: inputs.pop(k, None) for k in ("model", "clip", "vae", "method", "save_name", "image_set", "images",
                                               "clip_vision")}
    outcome, message = train(node, fixed["method"], {k: v for k, v in inputs.items()
                                                     if k not in ("resolution", "resume_from")},
                             model=fixed["model"], clip=fixed["clip"], vae=fixed["vae"], image_set=fixed["image_set"],
                             images=fixed["images"], resolution=inputs.get("resolution", 512),
                             save_name=fixed["save_name"] or "", resume_from=inputs.get("resume_from", NONE),
                             clip_vision=fixed["clip_vision"])
    return outcome, outputs(cls, outcome, message)


def outputs(cls, outcome, message: str) -> dict:
    """What every trainer node returns besides its MODEL/CLIP: the delta in the file's precision,
    the loss plot, the saved-files text, and the last preview as the node's UI image."""
    from comfy_api.v0_0_2 import ui

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[outcome.options.save_dtype]
    q = outcome.quality
    return {"delta": {k: v.to(dtype) for k, v in (outcome.delta or {}).items()}, "plot": loss_plot(outcome),
            "saved": saved_text(outcome, message),
            "report": "\n".join([*(f"warning: {w}" for w in outcome.warnings),
                                  q.text() if q is not None else "quality report off (set quality_samples)"]),
            "report_image": q.grid if q is not None and q.grid is not None else torch.ones(1, 64, 64, 3),
            "ui": ui.PreviewImage(outcome.last_preview, cls=cls) if outcome.last_preview is not None else None}


def saved_text(outcome, message: str) -> str:
    """Saved files as ComfyUI list names ("loras/x_00001.safetensors"), one per line, never a
    server path; then the save error, when there was one."""
    lines = [list_name(p) for p in outcome.files]
    if outcome.save_error:
        lines.append(message)
    return "\n".join(lines)


def list_name(path: str) -> str:
    """'loras/<file>' / 'embeddings/<file>' for a file in one of those model folders (the names the
    stock loaders and Load Weights list), else the bare file name."""
    real = os.path.realpath(path)
    for kind in ("loras", "embeddings"):
        for folder in folder_paths.get_folder_paths(kind):
            root = os.path.realpath(folder)
            if real.startswith(root + os.sep):
                return f"{kind}/{os.path.relpath(real, root).replace(os.sep, '/')}"
    return os.path.basename(path)
