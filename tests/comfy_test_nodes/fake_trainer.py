"""DomainStudio_TestFakeTrainer: a test-only V3 node that behaves like a DomainStudio trainer towards
the frontend without any model. Loaded only by the test servers (tests/comfy_test_nodes).

Per step it sleeps `seconds_per_step`, then sends what the real trainer nodes send:

* a ``domainstudio.progress`` event (to the client that queued the prompt) with the whole loss history
  so far, downsampled to <= 256 points: terms "total", "simple" and "100×img" (two orders of magnitude
  apart, as the real weighted terms are);
* a stock ProgressBar update, with a small generated JPEG preview every `preview_every` steps. The
  ProgressBar update also raises InterruptProcessingException when the user pressed Cancel; the node
  then sends a final "cancelled" event and re-raises.

At the end it sends a final "done" event and returns two UI images the stock way (a loss plot and the
last preview), as the real nodes do. With fail_at_step it raises there, after a final "error" event.
"""

from __future__ import annotations

import math
import time

import comfy.model_management
import comfy.utils
import numpy as np
import torch
from comfy_api.v0_0_2 import io, ui
from PIL import Image, ImageDraw
from server import PromptServer

EVENT = "domainstudio.progress"
MAX_POINTS = 256
TERMS = ("total", "simple", "100×img")


def _fmt(sec: float | None) -> str:
    if sec is None or not math.isfinite(sec) or sec < 0:
        return "?"
    sec = int(round(sec))
    h, rest = divmod(sec, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _loss(step: int) -> dict[str, float]:
    """Deterministic, decaying, slightly noisy terms; 100×img is ~100 times the others."""
    wobble = 0.08 * math.sin(step * 1.7)
    simple = 0.5 * math.exp(-step / 40.0) + 0.05 + 0.02 * wobble
    img = 100.0 * (0.3 * math.exp(-step / 25.0) + 0.02 + 0.01 * wobble)
    return {"total": simple + img, "simple": simple, "100×img": img}


def _downsample(steps: list[int], terms: dict[str, list[float]]) -> dict:
    n = len(steps)
    if n <= MAX_POINTS:
        idx = list(range(n))
    else:  # evenly spaced, always keeping the first and the last point
        idx = sorted({round(i * (n - 1) / (MAX_POINTS - 1)) for i in range(MAX_POINTS)})
    return {"steps": [steps[i] for i in idx], "terms": {k: [v[i] for i in idx] for k, v in terms.items()}}


def _preview(step: int, total: int) -> Image.Image:
    img = Image.new("RGB", (96, 96), (30, 30, 40))
    d = ImageDraw.Draw(img)
    frac = step / max(total, 1)
    d.rectangle([8, 8, 8 + int(80 * frac), 88], fill=(60, 140 + int(100 * frac), 220))
    d.text((12, 40), str(step), fill=(255, 255, 255))
    return img


def _plot(steps: list[int], terms: dict[str, list[float]], size=(256, 192)) -> Image.Image:
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    w, h = size
    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44)]
    vals = [v for series in terms.values() for v in series if v > 0]
    if steps and vals:
        lo, hi = math.log10(min(vals)), math.log10(max(vals))
        span = (hi - lo) or 1.0
        x0, x1 = steps[0], max(steps[-1], steps[0] + 1)
        for color, series in zip(colors, terms.values()):
            pts = [(8 + (w - 16) * (s - x0) / (x1 - x0), h - 8 - (h - 16) * (math.log10(max(v, 1e-12)) - lo) / span)
                   for s, v in zip(steps, series)]
            if len(pts) > 1:
                d.line(pts, fill=color, width=2)
    d.text((10, 6), "fake loss", fill=(0, 0, 0))
    return img


def _to_tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i in images]))


class FakeTrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DomainStudio_TestFakeTrainer",
            display_name="DomainStudio Test Fake Trainer",
            category="testing",
            description="Test only: emits DomainStudio training events and previews without training anything.",
            inputs=[
                io.Int.Input("steps", default=30, min=1, max=10000),
                io.Float.Input("seconds_per_step", default=0.2, min=0.0, max=10.0, step=0.01),
                io.Int.Input("preview_every", default=5, min=1, max=10000),
                io.Int.Input("fail_at_step", default=0, min=0, max=10000, optional=True,
                             tooltip="Raise an error at this step (0 = never), to test the error display."),
            ],
            outputs=[],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")  # never cached: every queue runs again, as a test needs

    @classmethod
    def execute(cls, steps, seconds_per_step, preview_every, fail_at_step=0) -> io.NodeOutput:
        server = PromptServer.instance
        node_id = str(cls.hidden.unique_id)
        prompt_id = _prompt_id(server)
        client = server.client_id  # the client that queued this prompt (None when queued without one)
        start = time.perf_counter()
        hist_steps: list[int] = []
        hist: dict[str, list[float]] = {k: [] for k in TERMS}
        last_preview = _preview(0, steps)

        def send(status: str, stage: str, step: int, message: str | None = None):
            elapsed = time.perf_counter() - start
            sps = elapsed / step if step else None
            eta = sps * (steps - step) if sps is not None and status == "running" else None
            parts = [f"step {step}/{steps}"]
            if sps is not None:
                parts.append(f"{sps:.2f} s/step")
            parts.append(f"ETA {_fmt(eta)}" if status == "running" else f"{_fmt(elapsed)} total")
            data = {"node": node_id, "prompt_id": prompt_id, "status": status, "stage": stage, "step": step,
                    "total": steps, "elapsed": elapsed, "s_per_step": sps, "eta": eta, "text": " · ".join(parts),
                    "loss": _downsample(hist_steps, hist)}
            if message:
                data["message"] = message
            server.send_sync(EVENT, data, client)

        pbar = comfy.utils.ProgressBar(steps)
        done = 0  # steps completed (in the history)
        try:
            send("running", "train", 0)
            for step in range(1, steps + 1):
                if seconds_per_step:
                    time.sleep(seconds_per_step)
                comfy.model_management.throw_exception_if_processing_interrupted()
                if step == fail_at_step:
                    raise RuntimeError(f"fake failure at step {step}")
                hist_steps.append(step)
                for k, v in _loss(step).items():
                    hist[k].append(v)
                preview = None
                if step % preview_every == 0 or step == steps:
                    last_preview = _preview(step, steps)
                    preview = ("JPEG", last_preview, 512)
                done = step
                pbar.update_absolute(step, steps, preview)  # raises on Cancel
                send("running", "train", step)
        except comfy.model_management.InterruptProcessingException:
            send("cancelled", "train", done, message=f"cancelled at step {done}; nothing kept (fake trainer)")
            raise
        except Exception as e:  # reported to the UI, then re-raised for ComfyUI
            send("error", "train", done, message=f"{type(e).__name__}: {e}")
            raise
        send("done", "saving", steps, message="fake trainer: nothing saved")
        images = _to_tensor([_plot(hist_steps, hist), last_preview.resize((256, 192))])
        return io.NodeOutput(ui=ui.PreviewImage(images, cls=cls))


def _prompt_id(server) -> str | None:
    """The running prompt's id: ComfyUI's executing context (0.3.75 and 0.30.0 both set it around a
    node's execute), else the server's last_prompt_id."""
    try:
        from comfy_execution.utils import get_executing_context

        ctx = get_executing_context()
        if ctx is not None and ctx.prompt_id:
            return ctx.prompt_id
    except ImportError:
        pass
    return getattr(server, "last_prompt_id", None)
