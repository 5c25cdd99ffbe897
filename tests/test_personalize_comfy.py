"""Personalization (rare-token, Textual Inversion, DreamBooth) through the core's run() over
ComfyHost in a real in-process ComfyUI on the tiny SD1.5 and SDXL models (CPU)."""

import pytest
import torch

from comfyui_domainstudio.testing.comfy_helpers import (RES, clip_state, differing, encode, encode_pooled,
                                                         personalize, subject_images, unet_state)

pytestmark = [pytest.mark.comfy, pytest.mark.usefixtures("unload_models")]


def _cfg(comfy, method="rare_token", **kw):
    core = comfy.pack("trainer.run")
    args = dict(class_noun="dog", new_token="ds_subject", ti_steps=3, unet_steps=3, ti_learning_rate=5e-2,
                unet_learning_rate=1e-3, batch_size=2, class_images=2)
    args.update(kw)
    return core.resolve_config(method, args)


def _opts(comfy, **kw):
    core = comfy.pack("trainer.run")
    return core.RunOptions(**{**dict(lora_rank=4, lora_alpha=4.0, train_seed=0, precision="fp32"), **kw})


def _run(comfy, model, clip, vae, method="rare_token", cfg=None, images=None, on_progress=None, opts=None, **kw):
    """run() over ComfyHost as a node calls it (under inference mode). Returns (outcome, host)."""
    core = comfy.pack("trainer.run")
    host = comfy.pack("trainer.hosts.comfy").ComfyHost(model, clip, vae)
    cfg = cfg if cfg is not None else _cfg(comfy, method, **kw)
    with torch.inference_mode():
        out = core.run(host, method, cfg, subject_images() if images is None else images, opts or _opts(comfy),
                       on_progress=on_progress)
    return out, host


def _compat(comfy):
    return comfy.pack("trainer.hosts.comfy_compat")


def test_rare_token_two_stages_sd15(comfy, sd15):
    model, clip, vae = sd15
    clip_before, unet_before = clip_state(clip), unet_state(model)
    seen = []
    out, host = _run(comfy, model, clip, vae,
                     on_progress=lambda p: seen.append((p.stage, p.stage_step, p.step, p.total)))
    assert [(s, i) for s, i, _, _ in seen] == [("token", 1), ("token", 2), ("token", 3),
                                               ("unet", 1), ("unet", 2), ("unet", 3)]
    assert [(n, t) for _, _, n, t in seen] == [(i, 6) for i in range(1, 7)]
    # Stage 1 moved only the new token's vectors: the text encoder (incl. its vocabulary rows) is
    # bit-identical; stage 2 trained the UNet delta and left the input model untouched.
    assert differing(clip_state(clip), clip_before) == []
    assert differing(unet_state(model), unet_before) == []
    init = _compat(comfy).init_vectors(clip, "quaint", 1)
    vectors = out.token.vectors
    assert out.token.trigger == "ds_subject"
    assert set(vectors) == {"clip_l"} and vectors["clip_l"].shape == (1, 768)
    assert not torch.equal(vectors["clip_l"], init["clip_l"]), "stage 1 should move the vectors"
    assert out.delta and any(v.abs().sum() > 0 for k, v in out.delta.items() if k.endswith("lora_up.weight"))
    assert [s.name for s in out.stages] == ["token", "unet"] and [s.steps_done for s in out.stages] == [3, 3]
    assert out.prompts.usage == "a photo of ds_subject dog"

    # The returned CLIP knows the token, in stock CLIPTextEncode, bare or as embedding:NAME; the
    # input CLIP does not.
    p_clip = out.exported.clip
    with_token = encode(comfy, p_clip, "a photo of ds_subject dog")
    as_embedding = encode(comfy, p_clip, "a photo of embedding:ds_subject dog")
    plain = encode(comfy, clip, "a photo of ds_subject dog")
    assert torch.equal(with_token, as_embedding)
    assert not torch.allclose(with_token, plain)
    # Same words elsewhere in the prompt keep their meaning.
    assert torch.equal(encode(comfy, p_clip, "a photo of a dog"), encode(comfy, clip, "a photo of a dog"))
    # The token's vectors are exactly what stage 2 used (frozen): the host's conditioning with the
    # final token equals the returned CLIP's.
    with torch.inference_mode(False), torch.no_grad():
        cond = host.encode_prompt(out.prompts.usage, out.token).context
    assert torch.equal(cond.float(), with_token)


def test_token_gradients_reach_only_the_vectors(comfy, sd15):
    model, clip, vae = sd15
    compat = _compat(comfy)
    from comfy import clip_model

    params = {k: torch.nn.Parameter(v) for k, v in compat.init_vectors(clip, "quaint", 2).items()}
    tclip = compat.clip_with_words(clip, {"ds_subject": params})
    with torch.inference_mode(False), torch.enable_grad():
        with compat.differentiable_text_encoder(tclip):
            ctx, pooled = tclip.encode_from_tokens(tclip.tokenize("a photo of ds_subject dog"), return_pooled=True)
            (ctx.float().square().mean() + pooled.float().square().mean()).backward()
    g = params["clip_l"].grad
    assert g is not None and torch.isfinite(g).all() and (g.abs().sum(1) > 0).all(), "both vectors get gradient"
    assert all(p.grad is None for p in clip.cond_stage_model.parameters())
    # The layers are back to ComfyUI's own forward afterwards.
    layers = [m for m in clip.cond_stage_model.modules() if isinstance(m, clip_model.CLIPLayer)]
    assert layers and all("forward" not in m.__dict__ for m in layers)


def test_seed_reproducible(comfy, sd15):
    model, clip, vae = sd15
    a, _ = _run(comfy, model, clip, vae, ti_steps=2, unet_steps=2)
    b, _ = _run(comfy, model, clip, vae, ti_steps=2, unet_steps=2)
    c, _ = _run(comfy, model, clip, vae, ti_steps=2, unet_steps=2, opts=_opts(comfy, train_seed=1))
    assert torch.equal(a.token.vectors["clip_l"], b.token.vectors["clip_l"])
    assert a.delta.keys() == b.delta.keys() and all(torch.equal(a.delta[k], b.delta[k]) for k in a.delta)
    assert a.stages[0].history == b.stages[0].history and a.stages[1].history == b.stages[1].history
    assert not torch.equal(a.token.vectors["clip_l"], c.token.vectors["clip_l"])


def test_textual_inversion_only_trains_vectors(comfy, sd15):
    model, clip, vae = sd15
    unet_before = unet_state(model)
    out, _ = _run(comfy, model, clip, vae, "textual_inversion", ti_steps=2, num_vectors=2)
    assert out.delta is None and out.adapter is None and out.exported.model is model
    assert out.token.vectors["clip_l"].shape == (2, 768)
    assert [s.name for s in out.stages] == ["token"]
    # TI prompts name the token alone, and start from the class noun.
    assert out.prompts.usage == "a photo of ds_subject"
    ti = comfy.pack("trainer.methods").get("textual_inversion")
    assert ti.init_word(_cfg(comfy, "textual_inversion")) == "dog"
    assert differing(unet_state(model), unet_before) == []


def test_dreambooth_with_prior_uses_class_images(comfy, sd15):
    core = comfy.pack("trainer.run")
    model, clip, vae = sd15
    core._CLASS_CACHE.clear()
    seen = []
    out, _ = _run(comfy, model, clip, vae, "dreambooth", new_token="unused", unet_steps=2, unet_learning_rate=1e-2,
                  on_progress=lambda p: seen.append((p.stage, p.step, p.total)))
    assert seen[:2] == [("class images", 1, 4), ("class images", 2, 4)] and seen[-1] == ("unet", 4, 4)
    (lat,) = core._CLASS_CACHE.values()  # sampled by the source model from "a photo of dog"
    assert lat.shape == (2, 4, RES // 8, RES // 8) and next(iter(core._CLASS_CACHE))[3] == "a photo of dog"
    assert out.token is None and out.exported.clip is clip and out.prompts.usage == "a photo of sks dog"
    (stage,) = out.stages
    assert stage.name == "unet" and len(stage.history["total"]) == 2
    assert all(p > 0 for p in stage.history["prior"])
    assert all(t == pytest.approx(i + p) for t, i, p in zip(stage.history["total"], stage.history["instance"],
                                                           stage.history["prior"]))
    nop, _ = _run(comfy, model, clip, vae, "dreambooth_no_prior", unet_steps=2, unet_learning_rate=1e-2)
    assert all(p == 0 for p in nop.stages[0].history["prior"])
    assert len(core._CLASS_CACHE) == 1, "no class images without the prior"


def test_sdxl_learns_both_encoders(comfy, sdxl):
    model, clip, vae = sdxl
    clip_before = clip_state(clip)
    out, _ = _run(comfy, model, clip, vae, ti_steps=2, unet_steps=1, num_vectors=2)
    vectors = out.token.vectors
    assert set(vectors) == {"clip_l", "clip_g"}
    assert vectors["clip_l"].shape == (2, 768) and vectors["clip_g"].shape == (2, 1280)
    init = _compat(comfy).init_vectors(clip, "quaint", 2)
    for k in ("clip_l", "clip_g"):
        assert not torch.equal(vectors[k], init[k]), f"{k} vectors should train"
    assert differing(clip_state(clip), clip_before) == []
    # The pooled output (SDXL's y vector) changes with the token too.
    _, pooled_tok = encode_pooled(out.exported.clip, "a photo of ds_subject dog")
    _, pooled_plain = encode_pooled(clip, "a photo of ds_subject dog")
    assert not torch.allclose(pooled_tok, pooled_plain)


@pytest.mark.parametrize("method, kw, match", [
    ("rare_token", dict(new_token="dog"), "already a word"),
    ("dreambooth", dict(class_noun=""), "class_noun"),
    ("rare_token", dict(class_noun=" "), "class_noun"),
    ("rare_token", dict(ti_learning_rate=float("nan")), "ti_learning_rate"),
    ("rare_token", dict(unet_learning_rate=float("inf")), "unet_learning_rate"),
    ("rare_token", dict(new_token="my subject"), "new_token"),
    ("textual_inversion", dict(new_token="embeddingfoo"), "new_token"),
    ("rare_token", dict(batch_size=9), "batch_size"),
])
def test_bad_input_is_refused_clearly_before_training(comfy, sd15, method, kw, match):
    core = comfy.pack("trainer.run")
    errors = comfy.pack("trainer.errors")
    model, clip, vae = sd15
    seen = []
    with pytest.raises((errors.TrainingError, ValueError), match=match):
        cfg = core.resolve_config(method, {**dict(class_noun="dog", new_token="ds_subject", ti_steps=2, unet_steps=2,
                                                  batch_size=1), **kw})
        _run(comfy, model, clip, vae, method, cfg=cfg, on_progress=seen.append)
    assert seen == []


def test_one_image_is_allowed_with_a_warning(comfy, sd15):
    methods = comfy.pack("trainer.methods")
    cfg = _cfg(comfy, batch_size=1)
    warnings = methods.get("rare_token").validate(cfg, 1)
    assert warnings and "only 1 training image" in warnings[0]
    model, clip, vae = sd15
    out, _ = _run(comfy, model, clip, vae, "textual_inversion", images=subject_images(1), batch_size=1, ti_steps=1)
    assert out.warnings and "only 1 training image" in out.warnings[0]


def test_quality_report_measures_class_drift(comfy, sd15):
    import re

    model, clip, vae = sd15
    out = personalize(comfy, model, clip, vae, method="dreambooth_no_prior", quality_samples=2)
    m = re.search(r"class-prompt drift: (\d+\.\d+)", out["report"])
    assert m and float(m.group(1)) >= 0, out["report"]
    assert "quality report (2 samples per model" in out["report"]
    m = re.search(r"fine detail \(pixels\): adapted (\d+\.\d+) vs source (\d+\.\d+), training images (\d+\.\d+)",
                  out["report"])
    assert m and all(0 < float(v) < 1 for v in m.groups()), out["report"]
    assert out["report_image"].shape[1] >= 4 * RES  # training, source, adapted, class after
