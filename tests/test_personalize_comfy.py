"""Personalization (rare-token, Textual Inversion, DreamBooth) in a real in-process ComfyUI on the
tiny SD1.5 and SDXL models (CPU)."""

import pytest
import torch

pytestmark = pytest.mark.comfy

RES = 64


def _subject(n=3, res=RES, seed=0):
    """A tiny 'subject': a coloured disc on varying backgrounds, IMAGE [n, res, res, 3]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(res).float(), torch.arange(res).float(), indexing="ij")
    out = []
    for _ in range(n):
        cx, cy = (torch.rand(2, generator=g) * 0.4 + 0.3) * res
        disc = (((xx - cx) ** 2 + (yy - cy) ** 2) < (res * 0.22) ** 2).float()[..., None]
        bg = torch.rand(3, generator=g) * 0.5
        out.append(disc * torch.tensor([0.9, 0.3, 0.1]) + (1 - disc) * bg)
    return torch.stack(out).float()


def _host(comfy):
    return comfy.pack("trainer.hosts.comfy_personalize")


def _cfg(comfy, **kw):
    P = comfy.pack("trainer.personalize")
    args = dict(method="rare_token", class_noun="dog", trigger="ds_subject", ti_steps=3, unet_steps=3,
                ti_learning_rate=5e-2, unet_learning_rate=1e-3, batch_size=2, seed=0)
    args.update(kw)
    return P.PersonalizeConfig(**args)


def _clip_state(clip):
    return {k: v.detach().clone() for k, v in clip.cond_stage_model.state_dict().items()}


def _unet_state(model):
    return {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}


def _bits(t):
    # Bitwise: SD1's unused clip_l text_projection is never loaded (ComfyUI drops it from SD1
    # checkpoints), so it is uninitialised memory that may hold NaNs, which torch.equal calls unequal.
    return t.reshape(-1).contiguous().view(torch.uint8) if t.is_floating_point() else t


def _same(a, b):
    diff = sorted(set(a) ^ set(b)) + [k for k in a if k in b and not torch.equal(_bits(a[k]), _bits(b[k]))]
    assert not diff, f"tensors differ: {diff[:5]}"
    return True


def _encode(comfy, clip, text):
    return comfy.nodes.CLIPTextEncode().encode(clip, text)[0]


def _train(comfy, model, clip, vae, cfg, **kw):
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return _host(comfy).train_personalization_comfy(model, clip, vae, _subject(), cfg, rank=4, alpha=4.0, **kw)


def test_rare_token_two_stages_sd15(comfy, sd15):
    model, clip, vae = sd15
    clip_before, unet_before = _clip_state(clip), _unet_state(model)
    seen = []
    cfg = _cfg(comfy)
    out = _train(comfy, model, clip, vae, cfg, on_step=lambda name, step, loss: seen.append((name, step)))
    assert seen == [("token", 1), ("token", 2), ("token", 3), ("unet", 1), ("unet", 2), ("unet", 3)]
    # Stage 1 moved only the new token's vectors: the text encoder (incl. its vocabulary rows) is
    # bit-identical; stage 2 trained the UNet delta and left the input model untouched.
    assert _same(_clip_state(clip), clip_before)
    assert _same(_unet_state(model), unet_before)
    init = comfy.pack("trainer.hosts.comfy_clip").init_vectors(clip, "quaint", 1)
    assert set(out.vectors) == {"clip_l"} and out.vectors["clip_l"].shape == (1, 768)
    assert not torch.equal(out.vectors["clip_l"], init["clip_l"]), "stage 1 should move the vectors"
    assert out.delta and any(v.abs().sum() > 0 for k, v in out.delta.items() if k.endswith("lora_up.weight"))
    assert [s.name for s in out.stages] == ["token", "unet"]

    # The returned CLIP knows the token, in stock CLIPTextEncode, bare or as embedding:NAME; the
    # input CLIP does not.
    with_token = _encode(comfy, out.clip, "a photo of ds_subject dog")[0][0]
    as_embedding = _encode(comfy, out.clip, "a photo of embedding:ds_subject dog")[0][0]
    plain = _encode(comfy, clip, "a photo of ds_subject dog")[0][0]
    assert torch.equal(with_token, as_embedding)
    assert not torch.allclose(with_token, plain)
    # Same words elsewhere in the prompt keep their meaning.
    assert torch.equal(_encode(comfy, out.clip, "a photo of a dog")[0][0], _encode(comfy, clip, "a photo of a dog")[0][0])
    # The token's vectors are exactly what stage 2 used (frozen): encoding gives the same context.
    cond = comfy.pack("trainer.hosts.comfy_clip").encode(out.clip, cfg.instance_prompt())[0]
    assert torch.equal(cond, with_token.unsqueeze(0) if with_token.ndim == 2 else with_token)


def test_token_gradients_reach_only_the_vectors(comfy, sd15):
    model, clip, vae = sd15
    cc = comfy.pack("trainer.hosts.comfy_clip")
    params = {k: torch.nn.Parameter(v) for k, v in cc.init_vectors(clip, "quaint", 2).items()}
    tclip = cc.clip_with_token(clip, "ds_subject", params)
    with torch.inference_mode(False), torch.enable_grad():
        with cc.differentiable_text_encoder(tclip):
            ctx, pooled = cc.encode(tclip, "a photo of ds_subject dog")
            (ctx.square().mean() + pooled.square().mean()).backward()
    g = params["clip_l"].grad
    assert g is not None and torch.isfinite(g).all() and (g.abs().sum(1) > 0).all(), "both vectors get gradient"
    assert all(p.grad is None for p in clip.cond_stage_model.parameters())
    # The layers are back to ComfyUI's own forward afterwards.
    from comfy import clip_model

    layers = [m for m in clip.cond_stage_model.modules() if isinstance(m, clip_model.CLIPLayer)]
    assert layers and all("forward" not in m.__dict__ for m in layers)


def test_seed_reproducible(comfy, sd15):
    model, clip, vae = sd15
    cfg = _cfg(comfy, ti_steps=2, unet_steps=2)
    a = _train(comfy, model, clip, vae, cfg)
    b = _train(comfy, model, clip, vae, cfg)
    assert torch.equal(a.vectors["clip_l"], b.vectors["clip_l"])
    assert all(torch.equal(a.delta[k], b.delta[k]) for k in a.delta)
    assert a.stages[0].history == b.stages[0].history


def test_textual_inversion_only_trains_vectors(comfy, sd15):
    model, clip, vae = sd15
    out = _train(comfy, model, clip, vae, _cfg(comfy, method="textual_inversion", ti_steps=2, num_vectors=2))
    assert out.delta is None and out.model is model
    assert out.vectors["clip_l"].shape == (2, 768)
    assert [s.name for s in out.stages] == ["token"]
    # TI prompts name the token alone, and start from the class noun.
    assert _cfg(comfy, method="textual_inversion").instance_prompt() == "a photo of ds_subject"


def test_dreambooth_with_prior_uses_class_images(comfy, sd15):
    model, clip, vae = sd15
    prior = torch.randn(2, 4, RES // 8, RES // 8)
    out = _train(comfy, model, clip, vae, _cfg(comfy, method="dreambooth", trigger="sks", unet_steps=2),
                 prior_latents=prior)
    assert out.vectors is None and out.clip is clip
    hist = out.stages[0].history
    assert all(p > 0 for p in hist["prior"]) and len(hist["loss"]) == 2
    nop = _train(comfy, model, clip, vae, _cfg(comfy, method="dreambooth_no_prior", trigger="sks", unet_steps=2),
                 prior_latents=prior)
    assert all(p == 0 for p in nop.stages[0].history["prior"])


def test_sdxl_learns_both_encoders(comfy, sdxl):
    model, clip, vae = sdxl
    clip_before = _clip_state(clip)
    out = _train(comfy, model, clip, vae, _cfg(comfy, ti_steps=2, unet_steps=1, num_vectors=2))
    assert set(out.vectors) == {"clip_l", "clip_g"}
    assert out.vectors["clip_l"].shape == (2, 768) and out.vectors["clip_g"].shape == (2, 1280)
    init = comfy.pack("trainer.hosts.comfy_clip").init_vectors(clip, "quaint", 2)
    for k in ("clip_l", "clip_g"):
        assert not torch.equal(out.vectors[k], init[k]), f"{k} vectors should train"
    assert _same(_clip_state(clip), clip_before)
    # The pooled output (SDXL's y vector) changes with the token too.
    cc = comfy.pack("trainer.hosts.comfy_clip")
    _, pooled_tok = cc.encode(out.clip, "a photo of ds_subject dog")
    _, pooled_plain = cc.encode(clip, "a photo of ds_subject dog")
    assert not torch.allclose(pooled_tok, pooled_plain)


@pytest.mark.parametrize("kw, match", [
    (dict(trigger="dog"), "already a word"),
    (dict(method="dreambooth", class_noun="", trigger="sks"), "class_noun"),
    (dict(ti_learning_rate=float("nan")), "ti_learning_rate"),
    (dict(unet_learning_rate=float("inf")), "unet_learning_rate"),
    (dict(trigger="my subject"), "trigger_word"),
    (dict(batch_size=9), "batch_size"),
])
def test_bad_input_is_refused_clearly(comfy, sd15, kw, match):
    model, clip, vae = sd15
    with pytest.raises(comfy.pack("trainer.domainstudio").TrainingError, match=match):
        _train(comfy, model, clip, vae, _cfg(comfy, **kw))


def test_one_image_is_allowed_with_a_warning(comfy):
    cfg = _cfg(comfy, batch_size=1)
    warnings = cfg.validate(1)
    assert warnings and "1 training image" in warnings[0]
