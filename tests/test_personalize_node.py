"""The Personalize node in a real in-process ComfyUI: files land where stock loaders find them, a
fresh stock CLIP reads the saved embedding, Cancel works in every stage (class images, token, UNet)."""

import os

import pytest
import torch

from comfyui_domainstudio.testing.comfy_helpers import (RES, encode, interrupt_guard, ksample, personalize,
                                                         progress_hook, read_file, unet_state)

pytestmark = [pytest.mark.comfy, pytest.mark.usefixtures("unload_models")]


def test_rare_token_node_saves_files_stock_loaders_read(comfy, sd15, tiny_models, loras_dir, embeddings_dir):
    model, clip, vae = sd15
    out = personalize(comfy, model, clip, vae, save_name="subj")
    p_model, p_clip, prompt = out["model"], out["clip"], out["prompt"]
    assert prompt == "a photo of ds_subject dog"
    files = out["saved"].splitlines()
    emb = os.path.join(embeddings_dir, "ds_subject.safetensors")
    assert emb in files and any(os.path.dirname(f) == loras_dir for f in files) and len(files) == 2
    meta, _ = read_file(emb)
    assert meta["modelspec.architecture"].endswith("/textual-inversion") and meta["domainstudio.method"] == "rare_token"

    # A fresh CLIP from the stock loader, prompting embedding:ds_subject, reads the saved file and
    # matches our patched CLIP (the file is fp16, the in-memory vectors fp32).
    fresh = comfy.nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(tiny_models["sd15"]))[1]
    ours = encode(comfy, p_clip, "a photo of ds_subject dog")
    stock = encode(comfy, fresh, "a photo of embedding:ds_subject dog")
    assert torch.allclose(ours, stock, atol=2e-2), (ours - stock).abs().max()
    assert not torch.allclose(stock, encode(comfy, fresh, "a photo of dog"), atol=2e-2)

    # The stock LoraLoader + saved LoRA reproduce our MODEL's samples exactly.
    lora = next(f for f in files if os.path.dirname(f) == loras_dir)
    _, lora_tensors = read_file(lora)
    assert set(lora_tensors) == set(out["delta"])
    stock_model = comfy.nodes.LoraLoader().load_lora(model, clip, os.path.basename(lora), 1.0, 0.0)[0]
    assert torch.equal(ksample(comfy, stock_model, p_clip, prompt, steps=2),
                       ksample(comfy, p_model, p_clip, prompt, steps=2))
    assert not torch.equal(ksample(comfy, p_model, p_clip, prompt, steps=2),
                           ksample(comfy, model, clip, prompt, steps=2))

    # A second run never overwrites: the embedding gets a numbered name.
    saved2 = personalize(comfy, model, clip, vae, save_name="subj", method="textual_inversion")["saved"].splitlines()
    assert len(saved2) == 1 and saved2[0] != emb and os.path.exists(emb)
    assert os.path.dirname(saved2[0]) == embeddings_dir


@pytest.mark.parametrize("stage, at", [("token", 2), ("unet", 2)])
def test_cancel_stops_within_one_step_in_each_stage(comfy, sd15, loras_dir, embeddings_dir, stage, at):
    model, clip, vae = sd15
    unet = unet_state(model)
    ti_steps = 20 if stage == "token" else 2
    cancel_at = at if stage == "token" else ti_steps + at
    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append(value)
        if value == cancel_at:
            mm.interrupt_current_processing(True)  # what POST /interrupt does

    with interrupt_guard() as mm, progress_hook(hook):
        with pytest.raises(mm.InterruptProcessingException):
            personalize(comfy, model, clip, vae, ti_steps=ti_steps, unet_steps=20, save_name="subj")
    # ComfyUI's layers check for Cancel on every forward: the next step stopped at once and the
    # last completed one was kept (a "kept" message repeats its progress value).
    assert sorted(set(seen)) == list(range(1, cancel_at + 1)), seen
    if stage == "token":
        assert sorted(os.listdir(embeddings_dir)) == [f"ds_subject_partial_{at}.dsstate",
                                                      f"ds_subject_partial_{at}.safetensors"]
        assert os.listdir(loras_dir) == []
    else:  # the finished token stage is kept as the final embedding, the UNet stage as a partial delta
        assert sorted(os.listdir(embeddings_dir)) == ["ds_subject.safetensors"]
        assert sorted(os.listdir(loras_dir)) == [f"subj_partial_{at}.dsstate", f"subj_partial_{at}.safetensors"]
    assert all(torch.equal(unet[k], v) for k, v in model.model.diffusion_model.state_dict().items())


def test_cancel_while_generating_class_images(comfy, sd15, loras_dir, embeddings_dir):
    core = comfy.pack("trainer.run")
    model, clip, vae = sd15
    core._CLASS_CACHE.clear()
    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append((value, total))
        if value == 1:
            mm.interrupt_current_processing(True)

    with interrupt_guard() as mm, progress_hook(hook):
        with pytest.raises(mm.InterruptProcessingException):
            personalize(comfy, model, clip, vae, method="dreambooth", class_images=4, unet_steps=3, save_name="db")
    assert seen == [(1, 7)], seen  # the second class image was not finished
    assert os.listdir(loras_dir) == [] and os.listdir(embeddings_dir) == [] and core._CLASS_CACHE == {}


def test_progress_counts_class_images_and_both_stages(comfy, sd15):
    model, clip, vae = sd15
    comfy.pack("trainer.run")._CLASS_CACHE.clear()
    seen = []
    with progress_hook(lambda v, t, p, node_id=None: seen.append((v, t))):
        personalize(comfy, model, clip, vae, method="dreambooth", class_images=2, unet_steps=3)
    assert [v for v, _ in seen] == [1, 2, 3, 4, 5] and all(t == 5 for _, t in seen)
    seen.clear()
    with progress_hook(lambda v, t, p, node_id=None: seen.append((v, t))):
        personalize(comfy, model, clip, vae, method="rare_token", ti_steps=2, unet_steps=3)
    assert [v for v, _ in seen] == [1, 2, 3, 4, 5] and all(t == 5 for _, t in seen)


@pytest.mark.parametrize("kw, match", [
    (dict(new_token="dog"), "already a word"),
    (dict(method="dreambooth", class_noun=" "), "class_noun"),
    (dict(unet_learning_rate=float("nan")), "unet_learning_rate"),
    (dict(images=None), "no training images"),
    (dict(save_name="../evil"), "save_name"),
    (dict(new_token="a/b"), "new_token"),
    (dict(resolution=RES + 4), "resolution"),
])
def test_node_errors_name_the_input(comfy, sd15, kw, match):
    model, clip, vae = sd15
    seen = []
    with progress_hook(lambda v, t, p, node_id=None: seen.append(v)):
        with pytest.raises(ValueError, match=match) as e:
            personalize(comfy, model, clip, vae, **kw)
    assert str(e.value).startswith("Personalize:"), e.value
    assert seen == [], "refused before any work"
