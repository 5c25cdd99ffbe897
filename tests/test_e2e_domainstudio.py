"""End-to-end: the DomainStudio example workflows (example_workflows/domainstudio_*.json, API twins
in example_workflows/api/) in a real ComfyUI server on the host under test, on the tiny test
checkpoint: Load Checkpoint -> Few-Shot Image Set -> DomainStudio Train -> stock CLIP Text Encode /
KSampler -> Save Image, beside the base model on the same seed.

Only the values testing/examples.py `tiny_changes` lists are patched (checkpoint, sizes, steps,
learning rate); the graphs are the shipped ones. Checked from outside, as a client sees it: the
files written, the adapted samples differing from the base samples, the pack's progress events over
/ws (what the in-node chart draws), a ProgressBar preview, Cancel through POST /interrupt keeping
(or discarding) the last step, and resume_from continuing a kept partial file.
"""

import os
import re

import pytest
from safetensors import safe_open

from comfyui_domainstudio.testing import examples as ex

pytestmark = [pytest.mark.comfy, pytest.mark.e2e]

DOMAIN = [name for name, e in ex.EXAMPLES.items() if e.kind == "domain"]


def _prepared(server, name, **changes):
    example = ex.EXAMPLES[name]
    ex.write_inputs(os.path.join(server.base, "input"), example)
    wf = ex.api(name)
    return example, ex.apply_api(wf, ex.tiny_changes(wf, **changes))


def _metadata(path):
    with safe_open(path, "pt") as f:
        return f.metadata() or {}


@pytest.mark.parametrize("name", DOMAIN)
def test_example_trains_and_changes_the_ksampler_image(server, name):
    example, wf = _prepared(server, name, steps=4, preview_every=2, train_seed=1)  # own seed: never cached
    save_name = wf[example.trainer]["inputs"]["save_name"]
    before = ex.model_files(server)
    r = ex.run(server, wf, timeout=600)
    assert not r.errors(), r.error_text()

    new = sorted(ex.model_files(server) - before)
    assert len(new) == 1 and re.fullmatch(rf"{save_name}_\d{{5}}\.safetensors", new[0]), new
    md = _metadata(os.path.join(server.base, "models", "loras", new[0]))
    assert md["domainstudio.method"] == "domainstudio" and md["domainstudio.steps"] == "4", md

    events = ex.check_progress_events(r, example, total=4)
    # Named as the loaders list it, so it can be picked in Load Weights / resume_from as shown.
    assert events[-1]["message"] == f"saved loras/{new[0]}", events[-1]["message"]
    ex.check_preview(r, example)

    adapted, base = ex.saved_images(server, r, example.adapted), ex.saved_images(server, r, example.base)
    assert len(adapted) == len(base) == 2  # the latent batch
    diff = ex.mean_abs_diff(adapted, base)
    assert diff > 1.0, f"adapted and base samples are (nearly) identical: mean |diff| {diff:.3f}"


def _cancelled_run(server, *, on_cancel, seed, steps=40, at_step=2):
    """The text example with many steps, POST /interrupt once the node reports `at_step`."""
    example, wf = _prepared(server, "domainstudio_text", steps=steps, preview_every=0, on_cancel=on_cancel,
                            train_seed=seed)
    state = {}

    def on_message(msg):
        d = msg.get("data") or {}
        if msg["type"] == ex.EVENT and d.get("status") == "running" and d.get("step", 0) >= at_step \
                and "asked_at" not in state:
            state["asked_at"] = d["step"]
            server.post("/interrupt")

    before = ex.model_files(server)
    r = ex.run(server, wf, timeout=600, on_message=on_message)
    assert "asked_at" in state, r.error_text() or [m["type"] for m in r.messages]
    stopped = r.of("execution_interrupted")
    assert stopped and stopped[0]["data"]["node_id"] == example.trainer, [m["type"] for m in r.messages]
    events = ex.check_progress_events(r, example, total=steps, final="cancelled")
    last_step = events[-2]["step"]
    assert state["asked_at"] <= last_step <= state["asked_at"] + 1, (state, last_step)  # at most one more step
    return example, wf, r, events, sorted(ex.model_files(server) - before)


def test_cancel_keeps_the_partial_file_and_resume_continues_it(server):
    example, wf, r, events, new = _cancelled_run(server, on_cancel="keep", seed=11)
    save_name = wf[example.trainer]["inputs"]["save_name"]
    step = events[-1]["step"]
    partial = f"{save_name}_partial_{step}"
    assert new == [f"{partial}.dsstate", f"{partial}.safetensors"], new
    assert events[-1]["message"] == f"kept {partial}.safetensors", events[-1]["message"]
    md = _metadata(os.path.join(server.base, "models", "loras", f"{partial}.safetensors"))
    assert md["domainstudio.steps"] == str(step), md

    # resume_from continues it (same method, settings and seed) up to the requested steps.
    total = step + 3
    _, resumed = _prepared(server, "domainstudio_text", steps=total, preview_every=0, train_seed=11,
                           resume_from=f"loras/{partial}.safetensors")
    before = ex.model_files(server)
    r2 = ex.run(server, resumed, timeout=600)
    assert not r2.errors(), r2.error_text()
    events2 = ex.check_progress_events(r2, example, total=total)
    assert events2[0]["step"] == step + 1, f"resumed at step {events2[0]['step']}, the partial file had {step}"
    (final,) = sorted(ex.model_files(server) - before)
    assert re.fullmatch(rf"{save_name}_\d{{5}}\.safetensors", final), final
    md = _metadata(os.path.join(server.base, "models", "loras", final))
    assert md["domainstudio.steps"] == str(total), md


def test_cancel_with_discard_writes_nothing(server):
    example, _, r, events, new = _cancelled_run(server, on_cancel="discard", seed=12)
    assert new == [], new
    assert events[-1]["message"] == "", events[-1]["message"]
    assert server.get("/system_stats")  # still serving


def test_quality_report_in_a_real_server(server):
    """quality_samples > 0 in the shipped graph: the report image reaches a stock Save Image node
    and the report's numbers reach the server log (the node's `report` STRING output)."""
    example, wf = _prepared(server, "domainstudio_text", steps=3, preview_every=0, train_seed=13, quality_samples=2)
    outputs = server.get("/object_info/DomainStudio_Train")["DomainStudio_Train"]["output_name"]
    wf["ds_report"] = {"class_type": "SaveImage",
                       "inputs": {"images": [example.trainer, outputs.index("report_image")],
                                  "filename_prefix": "ds_quality_report"}}
    log_before = len(server.log())
    r = ex.run(server, wf, timeout=600)
    assert not r.errors(), r.error_text()
    (report,) = ex.saved_images(server, r, "ds_report")
    assert report.shape[0] >= 3 * 64 and report.shape[2] == 3, report.shape  # training / source / adapted rows
    log = server.log()[log_before:]
    m = re.search(r"quality report \(2 samples per model, VAE-latent features\):\s+diversity: adapted (\d+\.\d+) vs "
                  r"source (\d+\.\d+)", log)
    assert m, log[-2000:]
