"""Subject personalization (trainer/methods/personalize.py) without a real host: settings checks,
prompts per method, and the token / UNet stages run by run() on ToyHost."""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_domainstudio.testing.toy import NaNToyHost, RecordingToyHost, ToyHost, toy_images
from comfyui_domainstudio.trainer.errors import SettingError, TrainingError
from comfyui_domainstudio.trainer.host import Token
from comfyui_domainstudio.trainer.methods import METHODS, get
from comfyui_domainstudio.trainer.methods.personalize import (DEFAULT_INIT_WORD, DEFAULT_TOKEN, TEMPLATES,
                                                              PersonalizeConfig)
from comfyui_domainstudio.trainer.run import RunOptions, run

SUBJECT_METHODS = ["rare_token", "textual_inversion", "dreambooth", "dreambooth_no_prior"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int = 3) -> torch.Tensor:
    """n identical constant latents (a subject the toy's source model does not expect)."""
    return torch.tensor([2.5, -2.0, 1.5, -1.5]).view(1, 4, 1, 1).expand(n, 4, 8, 8).clone()


def _cfg(**kw) -> PersonalizeConfig:
    base = dict(ti_steps=4, unet_steps=3, batch_size=1, class_images=2)
    base.update(kw)
    return PersonalizeConfig(**base)


def _opts(**kw) -> RunOptions:
    base = dict(train_mode="full_all", save_dtype="fp32", preview_every=0)
    base.update(kw)
    return RunOptions(**base)


def _train(host, method: str, cfg: PersonalizeConfig, n: int = 3, **kw):
    if host.latents is None:
        host.latents = _data(n)
    return run(host, method, cfg, toy_images(n), kw.pop("options", None) or _opts(), **kw)


def _fixed_batch_loss(host: ToyHost, x0: torch.Tensor, prompt: str, token: Token | None, draws: int = 16) -> float:
    """The source model's denoising loss with `prompt` (through `token`) on fixed draws."""
    g = torch.Generator().manual_seed(123)
    total = 0.0
    with torch.no_grad():
        cond = host.encode_prompt(prompt, token)
        for _ in range(draws):
            noise = torch.randn(x0.shape, generator=g)
            sigma = host.sample_sigmas(x0.shape[0], g)
            pred = host.predict_x0(host.add_noise(x0, noise, sigma), sigma, cond, adapted=False)
            total += float(host.denoising_loss(pred, x0, sigma))
    return total / draws


# ------------------------------------------------------------------ token stage


@pytest.mark.parametrize("method", ["textual_inversion", "rare_token"])
def test_token_stage_trains_only_the_token_and_lowers_the_loss(method):
    # Constant latents far from what the toy's prompts make it expect; lr 0.1, 120 token steps.
    # Measured over model seeds 0..2: after/before 0.18-0.32 (textual inversion) and 0.11-0.17
    # (rare token), so 0.8 leaves a wide margin.
    host = ToyHost()
    m = get(method)
    cfg = _cfg(ti_steps=120, unet_steps=1, ti_learning_rate=0.1, batch_size=2)
    prompt = m.prompts(cfg, [None] * 3).target[0]
    frozen = [t.clone() for t in host.frozen_tensors()]
    init = Token(cfg.new_token, host.token_init(m.init_word(cfg), cfg.num_vectors))
    before = _fixed_batch_loss(host, _data(), prompt, init)
    out = _train(host, method, cfg)
    after = _fixed_batch_loss(host, _data(), prompt, out.token)
    assert after < 0.8 * before, (before, after)
    token_stage = out.stages[0]
    assert token_stage.name == "token" and token_stage.steps_done == 120
    assert len(token_stage.history["total"]) == 120 and token_stage.seconds > 0
    assert not torch.equal(out.token.vectors["clip_l"], init.vectors["clip_l"])
    assert all(torch.equal(a, b) for a, b in zip(frozen, host.frozen_tensors()))
    # the token stage's session trains the token and attaches no adapter
    assert host.sessions[0].token is not None and host.sessions[0].adapter is None
    if method == "textual_inversion":
        assert host.calls["attach"] == 0 and out.delta is None and out.adapter is None
    subject = "ds_subject" if method == "textual_inversion" else "ds_subject dog"
    used = {p for p in host.encoded if subject in p}
    assert len(used & {t.format(subject) for t in TEMPLATES}) > 4, "templates are sampled"


def test_unet_stage_keeps_the_learned_token_frozen_and_conditions_on_it():
    # The token after stage 2 is the token of stage 1: a run with more UNet steps ends with the
    # same vectors; stage 2's session trains the adapter and no token.
    short = _train(ToyHost(), "rare_token", _cfg(ti_steps=5, unet_steps=1))
    host = RecordingToyHost()
    out = _train(host, "rare_token", _cfg(ti_steps=5, unet_steps=4))
    assert torch.equal(short.token.vectors["clip_l"], out.token.vectors["clip_l"])
    assert [s.name for s in out.stages] == ["token", "unet"] and out.steps_done == 9
    assert host.sessions[-1].adapter is not None and host.sessions[-1].token is None
    assert host.sessions[0].adapter is None and host.sessions[0].token is not None
    assert not out.token.vectors["clip_l"].requires_grad
    instance = host.encode_prompt("a photo of ds_subject dog", out.token)
    stage2 = host.batches[-4:]  # one adapted prediction per UNet step
    assert all(torch.equal(cond, instance) for _, cond in stage2)
    assert out.delta is not None and any(float(v.abs().max()) > 0 for v in out.delta.values())


# ------------------------------------------------------------------ UNet stage and prior


def test_unet_stage_with_prior_adds_the_class_term():
    host = ToyHost()
    grads = []

    def on_progress(p):
        if p.stage == "unet":
            grads.append(sum(float(t.grad.abs().sum()) for t in host.adapter.parameters()))

    out = _train(host, "dreambooth", _cfg(unet_steps=3, class_images=4, lambda_prior=1.0), on_progress=on_progress)
    prior = out.stages[0].history["prior"]
    assert len(prior) == 3 and all(p > 0 for p in prior) and len(grads) == 3 and all(g > 0 for g in grads)
    assert "a photo of dog" in host.encoded and host.calls["sample"] == 4  # 4 class images from the class prompt
    assert out.token is None and host.sessions[0].token is None
    for i in range(3):
        h = {k: v[i] for k, v in out.stages[0].history.items()}
        assert h["total"] == pytest.approx(h["instance"] + h["prior"], rel=1e-5)

    host0 = ToyHost()
    off = _train(host0, "dreambooth", _cfg(unet_steps=2, class_images=4, lambda_prior=0.0))
    assert off.stages[0].history["prior"] == [0.0, 0.0] and host0.calls["sample"] == 0
    host1 = ToyHost()
    no_prior = _train(host1, "dreambooth_no_prior", _cfg(unet_steps=2, class_images=4))
    assert no_prior.stages[0].history["prior"] == [0.0, 0.0] and host1.calls["sample"] == 0


def test_same_seed_same_result():
    def once(seed):
        out = _train(ToyHost(), "rare_token", _cfg(ti_steps=5, unet_steps=3), options=_opts(train_seed=seed))
        return out.token.vectors["clip_l"], out.delta

    (t1, d1), (t2, d2), (t3, d3) = once(7), once(7), once(8)
    assert torch.equal(t1, t2) and all(torch.equal(d1[k], d2[k]) for k in d1)
    assert not torch.equal(t1, t3) and any(not torch.equal(d1[k], d3[k]) for k in d1)


def test_non_finite_loss_stops_with_the_step_and_a_fix():
    with pytest.raises(TrainingError, match=r"token: loss became nan at step 1.*Lower the learning rate \(now 0.005\)"):
        _train(NaNToyHost(nan_from=1), "textual_inversion", _cfg())
    # in stage 2 the message names the UNet stage, its step and its learning rate
    with pytest.raises(TrainingError, match=r"unet: loss became nan at step 2.*Lower the learning rate \(now 0.0001\)"):
        _train(NaNToyHost(nan_from=4 + 2), "rare_token", _cfg(ti_steps=4))


# ------------------------------------------------------------------ prompts


def test_prompts_per_method():
    cfg = PersonalizeConfig(class_noun="backpack", new_token="zwx", dreambooth_identifier="sks")
    rare = get("rare_token").prompts(cfg, [None] * 3)
    assert rare.target == ["a photo of zwx backpack"] and rare.usage == "a photo of zwx backpack"
    assert all("zwx backpack" in p for p in rare.templates) and len(set(rare.templates)) > 4
    ti = get("textual_inversion").prompts(cfg, [None] * 3)
    assert ti.target == ["a photo of zwx"] and all(p.endswith("zwx") for p in ti.templates)
    db = get("dreambooth").prompts(cfg, [None] * 3)
    assert db.target == ["a photo of sks backpack"] and db.class_prompt == "a photo of backpack"
    assert get("dreambooth_no_prior").prompts(cfg, [None]).target == ["a photo of sks backpack"]
    assert [n for n in SUBJECT_METHODS if METHODS[n].uses_token] == ["rare_token", "textual_inversion"]
    assert [n for n in SUBJECT_METHODS if not METHODS[n].trains_unet] == ["textual_inversion"]
    assert [s.trains for s in get("rare_token").stages(cfg)] == ["token", "unet"]
    assert [s.trains for s in get("textual_inversion").stages(cfg)] == ["token"]
    assert get("dreambooth").class_images(cfg) == 100 and get("dreambooth_no_prior").class_images(cfg) == 0
    assert get("rare_token").trigger(cfg) == "zwx" and get("dreambooth").trigger(cfg) == "sks"
    assert get("rare_token").init_word(cfg) == DEFAULT_INIT_WORD == PersonalizeConfig().init_word
    assert get("textual_inversion").init_word(cfg) == "backpack"  # Gal et al.: the class noun
    assert PersonalizeConfig().new_token == DEFAULT_TOKEN


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("method, kw, n, name, fix", [
    ("rare_token", dict(ti_learning_rate=math.nan), 3, "ti_learning_rate", "finite number"),
    ("rare_token", dict(unet_learning_rate=-1.0), 3, "unet_learning_rate", "between"),
    ("dreambooth", dict(lambda_prior=math.inf), 3, "lambda_prior", "finite number"),
    ("rare_token", dict(num_vectors=0), 3, "num_vectors", "between 1 and 16"),
    ("rare_token", dict(batch_size=4), 3, "batch_size", "use at most 3"),
    ("rare_token", dict(new_token="two words"), 3, "new_token", "one word"),
    ("textual_inversion", dict(new_token="embeddingfoo"), 3, "new_token", "must not start with 'embedding'"),
    ("rare_token", dict(new_token=" "), 3, "new_token", "give a word"),
    ("dreambooth", dict(dreambooth_identifier=""), 3, "dreambooth_identifier", "give a word"),
    ("dreambooth", dict(class_noun=""), 3, "class_noun", "dreambooth_no_prior"),
    ("rare_token", dict(class_noun=""), 3, "class_noun", "name the class"),
    ("rare_token", dict(init_word="two words"), 3, "init_word", "one word"),
    ("rare_token", dict(new_token="dog"), 3, "new_token", "already a word"),
    ("rare_token", dict(), 0, None, "no training images"),
])
def test_bad_settings_are_refused_naming_the_setting_before_training(method, kw, n, name, fix):
    host = ToyHost()
    with pytest.raises(TrainingError) as e:
        run(host, method, PersonalizeConfig(**kw), toy_images(n) if n else torch.zeros(0, 16, 16, 3), _opts())
    if name is None:
        assert not isinstance(e.value, SettingError)
    else:
        assert isinstance(e.value, SettingError) and e.value.name == name
    assert fix in str(e.value)
    assert host.sessions == [] and host.calls["predict_x0"] == 0 and host.calls["encode_images"] == 0


def test_unknown_method_is_refused_with_the_choices():
    with pytest.raises(KeyError, match="method='lora' is unknown; choose one of domainstudio, finetune"):
        run(ToyHost(), "lora", PersonalizeConfig(), toy_images(3))


def test_dreambooth_without_prior_needs_no_class_noun_and_one_image_warns():
    cfg = PersonalizeConfig(class_noun="", dreambooth_identifier="sks")
    assert get("dreambooth_no_prior").validate(cfg, 3) == []
    warnings = get("rare_token").validate(PersonalizeConfig(batch_size=1), 1)
    assert "1 training image" in warnings[0]
    out = _train(ToyHost(), "dreambooth_no_prior", _cfg(class_noun="", unet_steps=1), n=1)
    assert out.completed and any("1 training image" in w for w in out.warnings)
    assert out.prompts.target == ["a photo of sks"]
