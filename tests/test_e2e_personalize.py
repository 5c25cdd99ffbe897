"""End-to-end: the personalization example workflows (example_workflows/personalize_*.json) and the
Load Weights example (load_weights.json) in a real ComfyUI server on the host under test, on the
tiny test checkpoint: Load Checkpoint -> Few-Shot Image Set -> Personalize -> stock CLIP Text Encode
(fed by the node's CLIP) / KSampler -> Save Image, beside the base model on the same seed.

Only testing/examples.py `tiny_changes` values are patched. The Load Weights example loads the files
the rare-token example writes on a first run; here the test runs the rare-token example first and
points Load Weights at the files that run wrote, then checks that loading them reproduces the
trained model's image exactly. One more run swaps in the tiny SDXL-family model (stock UNETLoader +
a test node for its two text encoders) to check the personalized CLIP with SDXL's encoders.
"""

import os
import re

import numpy as np
import pytest

from comfyui_domainstudio.testing import examples as ex

pytestmark = [pytest.mark.comfy, pytest.mark.e2e]

STEPS = 3
SEED = 2
# (new files in models/loras, new files in models/embeddings) each method writes.
# An embedding is numbered when its name is taken (other tests in the same server may have run the
# example). Each test trains with its own seed, so ComfyUI never serves a trainer from its cache.
WRITES = {"rare_token": (r"subject_\d{5}\.safetensors", r"ds_subject(_\d{5})?\.safetensors"),
          "textual_inversion": (None, r"ds_ti_subject(_\d{5})?\.safetensors"),
          "dreambooth": (r"subject_dreambooth_\d{5}\.safetensors", None)}


def _prepared(server, name, **changes):
    example = ex.EXAMPLES[name]
    ex.write_inputs(os.path.join(server.base, "input"), example)
    wf = ex.api(name)
    return example, ex.apply_api(wf, ex.tiny_changes(wf, **changes))


def _run_trainer_example(server, name, **changes):
    """Run a personalization example; check events, preview, files and images. Returns
    (run, {"loras": [new files], "embeddings": [new files]})."""
    example, wf = _prepared(server, name, steps=STEPS, preview_every=2, train_seed=SEED, **changes)
    before = {k: ex.model_files(server, k) for k in ("loras", "embeddings")}
    r = ex.run(server, wf, timeout=600)
    assert not r.errors(), r.error_text()
    new = {k: sorted(ex.model_files(server, k) - before[k]) for k in before}

    for kind, pattern in zip(("loras", "embeddings"), WRITES[example.method]):
        if pattern is None:
            assert new[kind] == [], (kind, new[kind])
        else:
            assert len(new[kind]) == 1 and re.fullmatch(pattern, new[kind][0]), (kind, new[kind])
    events = ex.check_progress_events(r, example, total=ex.step_total(example, wf))
    saved = [f for files in new.values() for f in files]
    assert events[-1]["message"].startswith("saved ") and all(f in events[-1]["message"] for f in saved), \
        (events[-1]["message"], saved)
    stages = [e["stage"] for e in events[:-1]]
    expected = {"rare_token": ["token", "unet"], "textual_inversion": ["token"],
                "dreambooth": ["class images", "unet"]}[example.method]
    assert [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s] == expected, stages
    if example.method == "dreambooth":
        # Class images carry no loss: their events have the stage and progress line only, counted in
        # the same total before the UNet steps (they are cached in memory per base model, prompt
        # and seed: a repeat jumps to n).
        n = wf[example.trainer]["inputs"]["class_images"]
        assert events[0]["step"] <= n and not events[0]["loss"]["steps"], events[0]
        assert [e for e in events if e["stage"] == "unet"][0]["step"] > n
        values = [p["value"] for p in r.progress(example.trainer)]
        assert values == sorted(values) and n in values, values
    ex.check_preview(r, example)

    personal, base = ex.saved_images(server, r, example.adapted), ex.saved_images(server, r, example.base)
    diff = ex.mean_abs_diff(personal, base)
    assert diff > 1.0, f"{name}: personalized and base samples are (nearly) identical: mean |diff| {diff:.3f}"
    return r, new


@pytest.mark.parametrize("name", ["personalize_textual_inversion", "personalize_dreambooth"])
def test_example_trains_and_changes_the_ksampler_image(server, name):
    _run_trainer_example(server, name)


def test_rare_token_example_then_load_weights_example_reproduces_it(server):
    r, new = _run_trainer_example(server, "personalize_rare_token")
    trained = ex.saved_images(server, r, ex.EXAMPLES["personalize_rare_token"].adapted)

    # The Load Weights example, pointed at the files this run wrote (on a first run they are the
    # names it ships with).
    (delta,), (embedding,) = new["loras"], new["embeddings"]
    files = {"14": f"loras/{delta}", "15": f"embeddings/{embedding}"}
    if (delta, embedding) == ("subject_00001.safetensors", "ds_subject.safetensors"):
        assert files == ex.LOAD_WEIGHTS_FILES
    example, wf = _prepared(server, "load_weights")
    wf = ex.apply_api(wf, {k: {"file": v} for k, v in files.items()})
    word = os.path.splitext(embedding)[0]
    wf["4"]["inputs"]["text"] = wf["4"]["inputs"]["text"].replace("embedding:ds_subject", f"embedding:{word}")
    before = {k: ex.model_files(server, k) for k in ("loras", "embeddings")}
    r2 = ex.run(server, wf, timeout=300)
    assert not r2.errors(), r2.error_text()
    assert {k: ex.model_files(server, k) for k in before} == before, "loading wrote files"
    info = [m["data"] for m in r2.of("executed") if m["data"].get("node") in ("14", "15")]
    loaded, base = ex.saved_images(server, r2, example.adapted), ex.saved_images(server, r2, example.base)
    assert ex.mean_abs_diff(loaded, base) > 1.0, "the loaded weights do not change the image"
    # Same prompt, seed and sampler as the rare-token example's own branch: the files are what it used.
    assert np.abs(loaded[0] - trained[0]).max() <= 2, (
        f"loading the saved files does not reproduce the trained model's image: max |diff| "
        f"{np.abs(loaded[0] - trained[0]).max()} ({info})")


def test_rare_token_example_on_an_sdxl_family_model(server):
    """The same graph with the tiny SDXL-family UNet (stock UNETLoader) and a two-encoder CLIP."""
    example, wf = _prepared(server, "personalize_rare_token", steps=2, preview_every=0, new_token="ds_xl_subject",
                            save_name="subject_xl", train_seed=SEED)
    wf["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sdxl_unet.safetensors",
                                                       "weight_dtype": "default"}}
    wf["20"] = {"class_type": "DSTest_TinySDXLClip", "inputs": {"seed": 3}}
    wf["21"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ex.TINY_CHECKPOINT}}
    for node in wf.values():
        for k, v in node["inputs"].items():
            if isinstance(v, list) and v[0] == "1" and v[1] > 0:
                node["inputs"][k] = ["20", 0] if v[1] == 1 else ["21", 2]  # CLIP, VAE
    for k in ("4", "13"):
        wf[k]["inputs"]["text"] = wf[k]["inputs"]["text"].replace("ds_subject", "ds_xl_subject")
    before = ex.model_files(server, "embeddings")
    r = ex.run(server, wf, timeout=600)
    assert not r.errors(), r.error_text()
    assert sorted(ex.model_files(server, "embeddings") - before) == ["ds_xl_subject.safetensors"]
    ex.check_progress_events(r, example, total=4)
    diff = ex.mean_abs_diff(ex.saved_images(server, r, example.adapted), ex.saved_images(server, r, example.base))
    assert diff > 1.0, f"SDXL: personalized and base samples are (nearly) identical: mean |diff| {diff:.3f}"
