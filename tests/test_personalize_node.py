"""The Personalize node in a real in-process ComfyUI: files land where stock loaders find them, a
fresh stock CLIP reads the saved embedding, Cancel works in each stage."""

import os

import pytest
import torch

from test_personalize_comfy import RES, _subject

pytestmark = pytest.mark.comfy


@pytest.fixture()
def model_dirs(comfy, tmp_path):
    """Fresh first models/loras and models/embeddings folders (our node saves to the first ones)."""
    dirs = {}
    for kind in ("loras", "embeddings"):
        d = tmp_path / kind
        d.mkdir()
        comfy.folder_paths.add_model_folder_path(kind, str(d), is_default=True)
        dirs[kind] = str(d)
    yield dirs
    for kind, d in dirs.items():
        comfy.folder_paths.folder_names_and_paths[kind][0].remove(d)


def _run(comfy, model, clip, vae, **kw):
    node = comfy.node("DomainStudio_Personalize")
    args = dict(method="rare_token", class_noun="dog", new_token="ds_subject", init_word="quaint", num_vectors=1,
                dreambooth_identifier="sks", ti_steps=2, ti_learning_rate=5e-2, unet_steps=2,
                unet_learning_rate=1e-3, train_mode="lora_attn", lora_rank=4, lora_alpha=4.0, class_images=2,
                lambda_prior=1.0, batch_size=1, resolution=RES, train_seed=0, precision="fp32", save_name="",
                images=_subject())
    args.update(kw)
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return node.execute(model=model, clip=clip, vae=vae, **args).result


def _ksample(comfy, model, clip, prompt, seed=3):
    pos = comfy.nodes.CLIPTextEncode().encode(clip, prompt)[0]
    neg = comfy.nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = comfy.nodes.EmptyLatentImage().generate(RES, RES, 1)[0]
    with torch.inference_mode():
        return comfy.nodes.KSampler().sample(model, seed, 2, 5.0, "euler", "normal", pos, neg, latent)[0]["samples"]


def test_rare_token_node_saves_files_stock_loaders_read(comfy, sd15, tiny_models, model_dirs):
    from safetensors import safe_open

    model, clip, vae = sd15
    p_model, p_clip, prompt, delta, plot, saved = _run(comfy, model, clip, vae, save_name="subj")
    assert prompt == "a photo of ds_subject dog"
    files = saved.splitlines()
    emb = os.path.join(model_dirs["embeddings"], "ds_subject.safetensors")
    assert emb in files and any(os.path.dirname(f) == model_dirs["loras"] for f in files)
    with safe_open(emb, "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"].endswith("/textual-inversion") and meta["domainstudio.method"] == "rare_token"

    # A fresh CLIP from the stock loader, prompting embedding:ds_subject, reads the saved file and
    # matches our patched CLIP (the file is fp16, the in-memory vectors fp32).
    fresh = comfy.nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(tiny_models["sd15"]))[1]
    ours = comfy.nodes.CLIPTextEncode().encode(p_clip, "a photo of ds_subject dog")[0][0][0]
    stock = comfy.nodes.CLIPTextEncode().encode(fresh, "a photo of embedding:ds_subject dog")[0][0][0]
    assert torch.allclose(ours, stock, atol=2e-2), (ours - stock).abs().max()
    assert not torch.allclose(stock, comfy.nodes.CLIPTextEncode().encode(fresh, "a photo of dog")[0][0][0], atol=2e-2)

    # The stock LoraLoader + saved LoRA reproduce our MODEL's samples exactly.
    lora = next(f for f in files if os.path.dirname(f) == model_dirs["loras"])
    stock_model = comfy.nodes.LoraLoader().load_lora(model, clip, os.path.basename(lora), 1.0, 0.0)[0]
    assert torch.equal(_ksample(comfy, stock_model, p_clip, prompt), _ksample(comfy, p_model, p_clip, prompt))
    assert not torch.equal(_ksample(comfy, p_model, p_clip, prompt), _ksample(comfy, model, clip, prompt))

    # A second run never overwrites: the embedding gets a numbered name.
    saved2 = _run(comfy, model, clip, vae, save_name="subj", method="textual_inversion")[5].splitlines()
    assert len(saved2) == 1 and saved2[0] != emb and os.path.exists(emb)


@pytest.mark.parametrize("stage_at", [("token", 2), ("unet", 2)])
def test_cancel_stops_within_one_step_in_each_stage(comfy, sd15, stage_at):
    import comfy.model_management as mm
    from comfy import utils as comfy_utils

    model, clip, vae = sd15
    unet = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    ti_steps = 20 if stage_at[0] == "token" else 2
    cancel_at = stage_at[1] if stage_at[0] == "token" else ti_steps + stage_at[1]
    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append(value)
        if value == cancel_at:
            mm.interrupt_current_processing(True)  # what POST /interrupt does

    comfy_utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _run(comfy, model, clip, vae, ti_steps=ti_steps, unet_steps=20)
    finally:
        comfy_utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    assert seen == list(range(1, cancel_at + 1)), seen  # the next step's update raised
    assert all(torch.equal(unet[k], v) for k, v in model.model.diffusion_model.state_dict().items())


def test_progress_counts_class_images_and_both_stages(comfy, sd15):
    from comfy import utils as comfy_utils

    model, clip, vae = sd15
    seen = []
    comfy_utils.set_progress_bar_global_hook(lambda v, t, p, node_id=None: seen.append((v, t)))
    try:
        _run(comfy, model, clip, vae, method="dreambooth", class_images=2, unet_steps=3)
    finally:
        comfy_utils.set_progress_bar_global_hook(None)
    assert [v for v, _ in seen] == [1, 2, 3, 4, 5] and all(t == 5 for _, t in seen)


@pytest.mark.parametrize("kw, match", [
    (dict(new_token="dog"), "already a word"),
    (dict(method="dreambooth", class_noun=" "), "class_noun"),
    (dict(unet_learning_rate=float("nan")), "unet_learning_rate"),
    (dict(images=None), "no training images"),
])
def test_node_errors_name_the_input(comfy, sd15, kw, match):
    model, clip, vae = sd15
    with pytest.raises(ValueError, match=match) as e:
        _run(comfy, model, clip, vae, **kw)
    assert str(e.value).startswith("Personalize:")
