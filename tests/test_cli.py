"""The headless trainer `python -m dstrain`: trains from a folder against a checkpoint file, writes
the nodes' weight files, sample grids and run.json; bad input exits non-zero with a clear message."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, comfy_dir
from test_personalize_comfy import _subject

pytestmark = pytest.mark.comfy


def _dstrain(*args, timeout=600):
    env = {**os.environ, "COMFYUI_DIR": comfy_dir()}
    return subprocess.run([sys.executable, "-m", "dstrain", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def subject_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("subject")
    for i, img in enumerate(_subject(4)):
        Image.fromarray((img.numpy() * 255).round().astype(np.uint8)).save(d / f"s{i}.png")
    return str(d)


@pytest.mark.parametrize("method, extra", [
    ("domainstudio", ["--steps", "3", "--batch-size", "3"]),
    ("rare_token", ["--ti-steps", "2", "--unet-steps", "2", "--class-noun", "dog"]),
])
def test_cli_trains_and_writes_loadable_files(comfy, tiny_models, subject_dir, tmp_path, method, extra):
    out = tmp_path / "out"
    r = _dstrain("--method", method, "--images", subject_dir, "--checkpoint", tiny_models["sd15"], "--resolution",
                 "64", "--samples", "2", "--sample-steps", "2", "--out", str(out), *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == method and run["family"] == "sd1" and run["images"] == 4
    for g in run["grids"]:
        im = Image.open(out / g)
        assert im.size[0] == 2 * 64 and im.size[1] in (64, 128)
    delta_file = next(f for f in run["files"] if os.path.basename(f).startswith(method))
    from comfy import sd, utils

    tensors = utils.load_torch_file(delta_file, safe_load=True)
    model = comfy.nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(tiny_models["sd15"]))[0]
    patched, _ = sd.load_lora_for_models(model, None, tensors, 1.0, 0.0)
    n_modules = len({k.split(".")[0] for k in tensors})
    assert len(patched.patches) == n_modules, "every LoRA module maps onto a UNet weight"
    if method == "rare_token":
        assert any(f.endswith("ds_subject.safetensors") for f in run["files"])


def test_cli_defaults_to_the_miniature_model(subject_dir, tmp_path):
    out = tmp_path / "out"
    r = _dstrain("--method", "textual_inversion", "--images", subject_dir, "--resolution", "64", "--ti-steps", "2",
                 "--samples", "1", "--sample-steps", "2", "--class-noun", "animal", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["model"].endswith("miniworld_sd15.safetensors") and run["family"] == "sd1"
    assert [os.path.basename(f) for f in run["files"]] == ["ds_subject.safetensors"]


def test_cli_bad_input_exits_with_a_clear_message(tiny_models, subject_dir, tmp_path):
    r = _dstrain("--images", str(tmp_path / "nope"), "--checkpoint", tiny_models["sd15"], "--out", str(tmp_path / "o"),
                 timeout=120)
    assert r.returncode != 0 and "--images" in r.stderr and "Traceback" not in r.stderr
    r = _dstrain("--images", subject_dir, "--checkpoint", str(tmp_path / "missing.safetensors"), timeout=120)
    assert r.returncode != 0 and "--checkpoint" in r.stderr and "Traceback" not in r.stderr
    r = _dstrain("--images", subject_dir, "--checkpoint", tiny_models["sd15"], "--name", "../evil", timeout=120)
    assert r.returncode != 0 and "--name" in r.stderr and "Traceback" not in r.stderr
