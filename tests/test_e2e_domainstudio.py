"""End-to-end: the example workflow (checkpoint -> image set -> DomainStudio -> KSampler -> Save)
in a real ComfyUI server; progress events; Cancel mid-training."""

import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

pytestmark = [pytest.mark.comfy, pytest.mark.e2e]


def _workflow(server, steps):
    from trainer.demo_data import write_domain

    write_domain(os.path.join(server.base, "input", "domainstudio_demo"), n=6, resolution=64)
    with open(os.path.join(REPO, "example_workflows", "domainstudio_api.json")) as f:
        wf = json.load(f)
    wf["3"]["inputs"]["steps"] = steps
    wf["7"]["inputs"]["steps"] = wf["10"]["inputs"]["steps"] = 4
    return wf


def test_example_workflow_trains_and_changes_ksampler_output(server):
    wf = _workflow(server, steps=6)
    prompt_id, msgs = server.run(wf, timeout=600)
    errors = [m for m in msgs if m["type"] == "execution_error"]
    assert not errors, errors[0]["data"].get("traceback")
    progress = [m["data"] for m in msgs if m["type"] == "progress" and m["data"].get("node") == "3"]
    assert [p["value"] for p in progress] == [1, 2, 3, 4, 5, 6] and all(p["max"] == 6 for p in progress)

    out = server.outputs(prompt_id)
    adapted = [np.asarray(Image.open(server.output_file(i))).astype(int) for i in out["9"]["images"]]
    base = [np.asarray(Image.open(server.output_file(i))).astype(int) for i in out["12"]["images"]]
    assert len(adapted) == len(base) == 4
    diff = np.mean([np.abs(a - b).mean() for a, b in zip(adapted, base)])
    assert diff > 0.5, f"adapted and base samples are (nearly) identical: mean |diff| {diff:.3f}"
    loras = os.path.join(server.base, "models", "loras")
    assert any(f.startswith("domainstudio_demo_") and f.endswith(".safetensors") for f in os.listdir(loras))
    assert "DomainStudio: saved" in server.log()


def test_cancel_mid_training_stops_within_one_step(server):
    wf = _workflow(server, steps=400)
    wf["3"]["inputs"]["train_seed"] = 1  # a different input than the other test, so nothing is cached
    state = {}

    def on_message(msg):
        d = msg.get("data", {})
        if msg["type"] == "progress" and d.get("node") == "3":
            state["last"] = d["value"]
            if d["value"] >= 3 and "asked_at" not in state:
                state["asked_at"] = d["value"]
                state["t"] = time.time()
                server.post("/interrupt")

    _, msgs = server.run(wf, timeout=300, on_message=on_message)
    types = [m["type"] for m in msgs]
    assert "execution_interrupted" in types, types
    stopped = next(m for m in msgs if m["type"] == "execution_interrupted")
    assert stopped["data"]["node_id"] == "3"
    assert state["last"] <= state["asked_at"] + 1, state  # at most one more step ran
    ticks = [m["t"] for m in msgs if m["type"] == "progress" and m["data"].get("node") == "3"]
    step_s = (ticks[-1] - ticks[0]) / max(1, len(ticks) - 1)
    print(f"cancel: asked at step {state['asked_at']}, stopped after step {state['last']}, "
          f"{stopped['t'] - state['t']:.3f} s after the request (one step = {step_s:.3f} s)")
    assert server.get("/system_stats")
