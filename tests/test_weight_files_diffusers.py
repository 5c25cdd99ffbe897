"""Our files in diffusers: a tiny diffusers StableDiffusionPipeline built offline from the same tiny
SD1.5 checkpoint (testing/diffusers_twin.py) loads the LoRA / SVD-LoRA files that DomainStudio Train
writes and the embeddings we save, through diffusers' own loaders, and its UNet / text-encoder
outputs match ComfyUI's (stock LoraLoader, `embedding:NAME`) within fp32 tolerance.

diffusers reads kohya files with ldm block names (`lora_unet_input_blocks_*`) only when it is
told the UNet layout: `pipe.load_lora_weights(file, unet_config=pipe.unet.config)` (SDXL
pipelines pass it themselves; for SD1 it is a keyword argument)."""

import logging
import os

import pytest
import torch

from comfyui_domainstudio.testing.comfy_helpers import (a1111_embedding_load, a1111_updates,
                                                         diffusers_retrieve_embedding, encode, personalize,
                                                         random_vectors, read_file, save_test_embedding, stock_load,
                                                         synthetic_lora, train_domainstudio, unet_out)

pytestmark = [pytest.mark.comfy, pytest.mark.usefixtures("unload_models")]

TOL = 2e-4  # fp32 on both sides; different kernels (attention, conv) only


@pytest.fixture(scope="module")
def twin(comfy, tiny_models):
    from comfyui_domainstudio.testing import tiny_models as tm
    from comfyui_domainstudio.testing.diffusers_twin import build_sd15_twin

    return build_sd15_twin(tiny_models["sd15"], comfy.root, tm.sd15_unet_config())


class DiffusersLog(logging.Handler):
    """Collects diffusers' / peft's warnings about keys it could not place."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        msg = record.getMessage()
        if any(w in msg for w in ("unexpected keys", "missing keys", "not found", "incompatible")):
            self.messages.append(msg[:300])

    def __enter__(self):
        for name in ("diffusers", "peft"):
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc):
        for name in ("diffusers", "peft"):
            logging.getLogger(name).removeHandler(self)


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([50.0, 700.0]), torch.randn(2, 77, 768, generator=g)


def diffusers_unet_out(pipe, ctx=None):
    x, t, c = _inputs()
    with torch.no_grad():
        return pipe.unet(x, t, encoder_hidden_states=c if ctx is None else ctx).sample.float()


def comfy_unet_out(model, ctx=None):
    if ctx is None:
        return unet_out(model)
    from comfy import model_management

    model_management.load_models_gpu([model])
    x, t, _ = _inputs()
    with torch.no_grad():
        return model.model.diffusion_model(x, t, context=ctx).float()


def load_lora_in_diffusers(pipe, path, name):
    with DiffusersLog() as log:
        pipe.load_lora_weights(path, adapter_name=name, unet_config=pipe.unet.config)
    assert log.messages == [], log.messages
    return pipe


def _close(a, b, what, tol=TOL):
    err = (a - b).abs().max().item()
    scale = a.abs().max().item()
    print(f"{what}: max |comfy - diffusers| = {err:.3g} (output scale {scale:.3g})")
    assert err <= tol * max(1.0, scale), what


def test_twin_matches_comfy_without_lora(comfy, sd15, twin):
    model, clip, _ = sd15
    _close(comfy_unet_out(model), diffusers_unet_out(twin), "base UNet")
    cond = encode(comfy, clip, "a photo of a house")
    prompt_embeds = twin.encode_prompt("a photo of a house", "cpu", 1, False)[0].float()
    _close(cond, prompt_embeds.detach(), "base text encoder")


@pytest.mark.parametrize("mode, fmt", [("lora_all", "auto"), ("full_attn", "svd_lora")])
def test_trained_lora_file_loads_in_diffusers(comfy, sd15, twin, loras_dir, mode, fmt):
    model, clip, vae = sd15
    saved = train_domainstudio(comfy, model, clip, vae, steps=3, train_mode=mode, lora_rank=4, lora_alpha=4.0,
                               learning_rate=1e-2 if mode.startswith("lora") else 1e-3, save_name=f"dif_{mode}",
                               save_format=fmt, save_dtype="fp32", svd_rank=8)["saved_path"]
    stock, _ = stock_load(comfy, model, clip, saved)
    base = diffusers_unet_out(twin)
    ours = comfy_unet_out(stock)
    assert (ours - comfy_unet_out(model)).abs().max() > 1e-3
    try:
        load_lora_in_diffusers(twin, saved, "trained")
        got = diffusers_unet_out(twin)
    finally:
        twin.unload_lora_weights()
    assert (got - base).abs().max() > 1e-3, "diffusers applied nothing"
    _close(ours, got, f"{mode}/{fmt} LoRA UNet")
    _close(diffusers_unet_out(twin), base, "after unload")


def test_lora_all_layers_strength_matches_diffusers_scale(comfy, sd15, twin, loras_dir):
    deltas = comfy.pack("trainer.deltas")
    model, clip, _ = sd15
    t = synthetic_lora(comfy, model, mode="lora_all", rank=4, scale=0.05, alpha=2.0)
    path = deltas.save_delta(os.path.join(loras_dir, "syn.safetensors"), t, {}, dtype="fp32")
    half, _ = stock_load(comfy, model, clip, path, 0.5)
    try:
        load_lora_in_diffusers(twin, path, "syn")
        twin.set_adapters(["syn"], adapter_weights=[0.5])
        got = diffusers_unet_out(twin)
    finally:
        twin.unload_lora_weights()
    _close(comfy_unet_out(half), got, "synthetic lora_all at strength 0.5")


def test_embedding_and_lora_together_match_diffusers(comfy, sd15, twin, tiny_models, loras_dir, embeddings_dir):
    deltas = comfy.pack("trainer.deltas")
    model, _, _ = sd15
    vec = random_vectors(2, {"clip_l": 768}, seed=5)
    vec["clip_l"] = vec["clip_l"] * 25  # well away from any real token
    emb_path = save_test_embedding(comfy, embeddings_dir, "dsobj", vec, "sd1", model)
    lora_path = deltas.save_delta(os.path.join(loras_dir, "attn.safetensors"),
                                  synthetic_lora(comfy, model, mode="lora_attn", scale=0.08), {}, dtype="fp32")
    # ComfyUI: stock checkpoint CLIP (lists models/embeddings) + `embedding:NAME`, stock LoraLoader.
    _, clip, _ = comfy.nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(tiny_models["sd15"]))[:3]
    cond = encode(comfy, clip, "a photo of embedding:dsobj on a table")
    stock, _ = stock_load(comfy, model, clip, lora_path)
    ours = comfy_unet_out(stock, cond.expand(2, -1, -1))
    # diffusers: load_textual_inversion (token = the file name, as in ComfyUI and A1111) + LoRA.
    with DiffusersLog() as log:
        twin.load_textual_inversion(emb_path, token="dsobj")
    assert log.messages == []
    try:
        prompt_embeds = twin.encode_prompt("a photo of dsobj on a table", "cpu", 1, False)[0].float().detach()
        _close(cond, prompt_embeds, "text encoder with the embedding")
        plain = twin.encode_prompt("a photo of an object on a table", "cpu", 1, False)[0].float().detach()
        assert (prompt_embeds - plain).abs().max() > 1e-2
        load_lora_in_diffusers(twin, lora_path, "attn")
        got = diffusers_unet_out(twin, prompt_embeds.expand(2, -1, -1))
    finally:
        twin.unload_lora_weights()
        twin.unload_textual_inversion()
    _close(ours, got, "UNet with LoRA on the embedding's conditioning")


def test_sdxl_embedding_halves_load_with_diffusers_sdxl_recipe(comfy, sdxl, twin, embeddings_dir):
    """diffusers' documented SDXL recipe: state_dict['clip_l'] into text_encoder, ['clip_g'] into
    text_encoder_2 (here: 1-layer transformers CLIP models of the SDXL widths)."""
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    xl_model, _, _ = sdxl
    vec = random_vectors(2, {"clip_l": 768, "clip_g": 1280}, seed=9)
    path = save_test_embedding(comfy, embeddings_dir, "xlobj", vec, "sdxl", xl_model)
    state_dict = load_file(path)
    tok_dir = os.path.join(comfy.root, "comfy", "sd1_tokenizer")
    encoders = {
        "clip_l": CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                               num_hidden_layers=1, max_position_embeddings=77)),
        "clip_g": CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                             num_attention_heads=20, num_hidden_layers=1,
                                                             max_position_embeddings=77, projection_dim=1280,
                                                             hidden_act="gelu")),
    }
    for half, encoder in encoders.items():
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
        with DiffusersLog() as log:
            twin.load_textual_inversion(state_dict[half], token="xlobj", text_encoder=encoder, tokenizer=tokenizer)
        assert log.messages == []
        # n vectors -> tokens xlobj, xlobj_1 (the pipeline expands "xlobj" in prompts to both)
        ids = tokenizer.convert_tokens_to_ids(["xlobj", "xlobj_1"])
        assert twin.maybe_convert_prompt("a xlobj", tokenizer) == "a xlobj xlobj_1"
        rows = encoder.get_input_embeddings().weight[ids].detach()
        assert torch.allclose(rows, vec[half], atol=1e-3), half


def test_personalize_files_load_in_comfy_diffusers_and_a1111(comfy, sd15, twin, tiny_models, loras_dir,
                                                             embeddings_dir):
    """The Personalize node's own files (rare_token: embedding + UNet LoRA, fp16 as saved): a fresh
    stock ComfyUI CLIP (`embedding:NAME`) + stock LoraLoader, diffusers (load_textual_inversion +
    load_lora_weights) and A1111's key resolution all give the same model."""
    model, clip, vae = sd15
    saved = personalize(comfy, model, clip, vae, new_token="dspers", ti_steps=3, unet_steps=3, save_name="pers",
                        unet_learning_rate=1e-2)["saved"].splitlines()
    emb = next(p for p in saved if os.path.dirname(p) == embeddings_dir)
    lora = next(p for p in saved if os.path.dirname(p) == loras_dir)
    # ComfyUI, from the files alone.
    _, fresh_clip, _ = comfy.nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(tiny_models["sd15"]))[:3]
    cond = encode(comfy, fresh_clip, "a photo of embedding:dspers dog")
    stock, _ = stock_load(comfy, model, fresh_clip, lora)
    ours = comfy_unet_out(stock, cond.expand(2, -1, -1))
    assert (ours - comfy_unet_out(model, cond.expand(2, -1, -1))).abs().max() > 1e-4, "the LoRA changes the UNet"
    # diffusers, token = the file name.
    with DiffusersLog() as log:
        twin.load_textual_inversion(emb, token="dspers")
    assert log.messages == []
    try:
        prompt_embeds = twin.encode_prompt("a photo of dspers dog", "cpu", 1, False)[0].float().detach()
        _close(cond, prompt_embeds, "personalized text encoder")
        load_lora_in_diffusers(twin, lora, "pers")
        got = diffusers_unet_out(twin, prompt_embeds.expand(2, -1, -1))
    finally:
        twin.unload_lora_weights()
        twin.unload_textual_inversion()
    _close(ours, got, "personalized UNet")
    # A1111: the embedding is a one-tensor dict; every LoRA key resolves to a module with ComfyUI's update.
    assert a1111_embedding_load(emb)["vec"].shape == (1, 768)
    assert diffusers_retrieve_embedding(emb, "dspers")[0] == "dspers"
    _, tensors = read_file(lora)
    updates = a1111_updates(model, tensors)
    assert len(updates) == len({k.split(".")[0] for k in tensors})
