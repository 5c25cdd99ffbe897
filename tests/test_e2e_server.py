"""End-to-end: a real ComfyUI server loads the pack and runs our nodes from an API-format workflow."""

import os

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.comfy, pytest.mark.e2e]


def test_server_registers_pack_without_import_failure(server):
    info = server.get("/object_info")
    assert "DomainStudio_FewShotImageSet" in info and "DomainStudio_Train" in info
    assert info["DomainStudio_Train"]["category"] == "DomainStudio"
    log = server.log()
    # ComfyUI's own audio extras fail here without torchaudio; no failure may name our pack.
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line or "Cannot import" in line]
    assert not [line for line in failed if "DomainStudio" in line], failed
    loaded = [line for line in log.splitlines() if "seconds" in line and line.rstrip().endswith("ComfyUI-DomainStudio")]
    assert loaded and "IMPORT FAILED" not in loaded[0], log[-3000:]  # the import-times list names us
    exts = server.get("/extensions")
    assert any(e.endswith("domainstudio.js") for e in exts), exts


def test_server_runs_image_set_workflow(server):
    folder = os.path.join(server.base, "input", "e2e_set")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray((rng.random((50, 70, 3)) * 255).astype(np.uint8)).save(os.path.join(folder, f"{i}.png"))
    wf = {
        "1": {"class_type": "DomainStudio_FewShotImageSet",
              "inputs": {"folder": "e2e_set", "resolution": 64, "flip": True}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 1], "filename_prefix": "e2e_set"}},
    }
    prompt_id, msgs = server.run(wf, timeout=120)
    types = [m["type"] for m in msgs]
    assert "execution_error" not in types, [m for m in msgs if m["type"] == "execution_error"]
    images = server.outputs(prompt_id)["2"]["images"]
    assert len(images) == 6
    for im in images:
        with Image.open(server.output_file(im)) as f:
            assert f.size == (64, 64)


def test_server_reports_bad_input_without_dying(server):
    wf = {
        "1": {"class_type": "DomainStudio_FewShotImageSet",
              "inputs": {"folder": "no_such_folder_here", "resolution": 64, "flip": False}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 1], "filename_prefix": "bad"}},
    }
    _, msgs = server.run(wf, timeout=60)
    errors = [m for m in msgs if m["type"] == "execution_error"]
    assert errors and "no_such_folder_here" in errors[0]["data"]["exception_message"]
    assert server.get("/system_stats")  # still serving
