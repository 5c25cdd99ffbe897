"""The method registry (trainer/methods/) and what the methods share: the plain denoising objective
(methods/denoising.py), '{caption}' prompts with per-image captions, and the stages each method
declares. Runs on ToyHost (pure torch)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from comfyui_domainstudio.testing.toy import RecordingToyHost, ToyHost, image_set, stage_inputs, toy_images
from comfyui_domainstudio.trainer import settings
from comfyui_domainstudio.trainer.errors import SettingError
from comfyui_domainstudio.trainer.loop import Rng
from comfyui_domainstudio.trainer.methods import METHODS, Method, for_node, get
from comfyui_domainstudio.trainer.methods.base import NODES, batch_indices, require_prompt_captions
from comfyui_domainstudio.trainer.methods.denoising import DenoisingObjective
from comfyui_domainstudio.trainer.methods.finetune import FinetuneConfig
from comfyui_domainstudio.trainer.run import RunOptions, run


pytestmark = pytest.mark.usefixtures("one_thread")


OPTS = RunOptions(train_mode="full_all", save_dtype="fp32", preview_every=0)


# ------------------------------------------------------------------ registry


def test_registry_names_nodes_and_lookup():
    assert list(METHODS) == ["domainstudio", "finetune", "rare_token", "textual_inversion", "dreambooth",
                             "dreambooth_no_prior"]
    assert for_node("domain") == ["domainstudio", "finetune"]
    assert for_node("subject") == ["rare_token", "textual_inversion", "dreambooth", "dreambooth_no_prior"]
    for name, m in METHODS.items():
        assert isinstance(m, Method) and m.name == name and get(name) is m
        assert m.node in NODES and m.title and dataclasses.is_dataclass(m.config)
        cfg = m.config()
        assert m.validate(cfg, 6) == []  # the defaults are valid for a typical image set
        stages = m.stages(cfg)
        assert stages and all(s.trains in ("unet", "token") for s in stages)
        assert m.trains_unet == any(s.trains == "unet" for s in stages)
        assert m.uses_token == any(s.trains == "token" for s in stages)
        assert len({s.seed_offset for s in stages}) == len(stages)  # stages draw different streams
    with pytest.raises(KeyError, match="method='x' is unknown; choose one of domainstudio, finetune, rare_token"):
        get("x")


def test_finetune_is_plain_denoising_with_no_source_terms():
    m = get("finetune")
    cfg = FinetuneConfig(steps=3, learning_rate=1e-2, batch_size=2, target_prompt="a sks house")
    (stage,) = m.stages(cfg)
    assert (stage.name, stage.trains, stage.steps, stage.learning_rate) == ("train", "unet", 3, 1e-2)
    host = RecordingToyHost()
    out = run(host, m, cfg, toy_images(4), OPTS)
    assert out.method == "finetune" and out.completed and set(out.stages[0].history) == {"total", "instance", "prior"}
    assert host.source_batches == []  # the frozen source model is never asked
    assert len(host.batches) == 3 and out.stages[0].history["prior"] == [0.0] * 3
    with pytest.raises(SettingError, match="use at most 4") as e:
        run(ToyHost(), m, dataclasses.replace(cfg, batch_size=5), toy_images(4), OPTS)
    assert e.value.name == "batch_size"


# ------------------------------------------------------------------ the denoising objective


def test_denoising_objective_is_the_hosts_loss_on_the_drawn_batch():
    host = ToyHost()
    host.attach("full_all", 4, 4.0, 0)
    x0 = host.encode_images(toy_images(5))
    cfg = FinetuneConfig(target_prompt="a sks house", batch_size=3)
    obj = DenoisingObjective(stage_inputs(host, "finetune", cfg, x0), ["a sks house"], 3)
    total, parts = obj(Rng.seeded(11))
    # the same draws by hand: batch, prompt, noise, noise level
    rng = Rng.seeded(11)
    idx = batch_indices(5, 3, rng)
    torch.randint(1, (1,), generator=rng.cpu)
    noise = torch.randn((3, 4, 8, 8), generator=rng.device)
    sigma = host.sample_sigmas(3, rng.device)
    xt = host.add_noise(x0[idx], noise, sigma)
    want = host.denoising_loss(host.predict_x0(xt, sigma, host.encode_prompt("a sks house")), x0[idx], sigma)
    assert torch.equal(total, want) and torch.equal(parts["instance"], want) and float(parts["prior"]) == 0.0
    assert obj.terms == ("instance", "prior")


def test_denoising_objective_prior_term():
    host = ToyHost()
    host.attach("full_all", 4, 4.0, 0)
    m = get("dreambooth")
    cfg = m.config()
    x0, prior = host.encode_images(toy_images(3)), host.encode_images(toy_images(4, seed=1))
    inputs = stage_inputs(host, m, cfg, x0, prior_x0=prior)
    prompts = inputs.prompts
    with_prior = DenoisingObjective(inputs, prompts.target, 1, lambda_prior=0.5, prior_prompt=prompts.class_prompt)
    total, parts = with_prior(Rng.seeded(2))
    instance, prior_loss = float(parts["instance"].detach()), float(parts["prior"].detach())
    assert prior_loss > 0
    assert float(total.detach()) == pytest.approx(instance + 0.5 * prior_loss, rel=1e-6)
    for lam, p in ((0.0, prior), (1.0, None)):
        obj = DenoisingObjective(stage_inputs(host, m, cfg, x0, prior_x0=p), prompts.target, 1, lambda_prior=lam,
                                 prior_prompt=prompts.class_prompt)
        assert not obj.use_prior
        assert float(obj(Rng.seeded(2))[1]["prior"]) == 0.0


def test_per_step_prompts_are_drawn_from_the_list():
    host = ToyHost()
    x0 = host.encode_images(toy_images(2))
    templates = [f"t{i} zwx" for i in range(6)]
    cfg = get("textual_inversion").config()
    obj = DenoisingObjective(stage_inputs(host, "textual_inversion", cfg, x0, live=True), templates, 1)
    host.encoded.clear()
    rng = Rng.seeded(0)
    for _ in range(40):
        obj(rng)
    assert set(host.encoded) == set(templates)


# ------------------------------------------------------------------ captions


def _latent_index(host, images):
    lat = host.encode_images(images)
    return lambda row: next(i for i in range(lat.shape[0]) if torch.equal(lat[i], row))


CAPTIONS = ["red barn", " blue door ", "green roof", "red barn", "white fence", "old mill"]


@pytest.mark.parametrize("method", ["finetune", "domainstudio"])
def test_each_image_trains_with_its_own_caption(method):
    images = toy_images(6)
    host = RecordingToyHost()
    m = get(method)
    values = dict(steps=6, batch_size=3, learning_rate=1e-2, target_prompt="a sks {caption}")
    if method == "domainstudio":
        values["source_prompt"] = "a {caption}"
    cfg = m.config(**values)
    out = run(host, m, cfg, image_set(images, CAPTIONS), OPTS)
    assert out.prompts.target == [f"a sks {c.strip()}" for c in CAPTIONS]
    index = _latent_index(host, images)
    assert len(host.batches) == 6
    mixed = 0
    for recorded, template in ((host.batches, "a sks {}"), (host.source_batches, "a {}")):
        for x0, cond in recorded:
            rows = [index(r) for r in x0]
            want = torch.cat([host.encode_prompt(template.format(CAPTIONS[i].strip())) for i in rows])
            assert torch.equal(cond.expand_as(want), want), (rows, template)
            mixed += len({CAPTIONS[i] for i in rows}) > 1
    assert mixed >= 6  # batches really mixed captions (stacked conditioning, one row per image)
    if method == "domainstudio":
        assert len(host.source_batches) == 6


def test_a_prompt_without_caption_ignores_the_captions():
    host = RecordingToyHost()
    cfg = FinetuneConfig(steps=2, batch_size=2, target_prompt="a sks house")
    out = run(host, "finetune", cfg, image_set(toy_images(3), ["x", "y", "z"]), OPTS)
    assert out.prompts.target == ["a sks house"] * 3
    want = host.encode_prompt("a sks house")
    assert all(torch.equal(c, want) for _, c in host.batches)


@pytest.mark.parametrize("method, values, name", [
    ("finetune", dict(target_prompt="a photo of {caption}"), "target_prompt"),
    ("domainstudio", dict(target_prompt="a sks {caption}", source_prompt="a house"), "target_prompt"),
    ("domainstudio", dict(target_prompt="a sks house", source_prompt="a {caption}"), "source_prompt"),
])
def test_a_missing_caption_is_refused_naming_the_prompt(method, values, name):
    host = ToyHost()
    cfg = get(method).config(batch_size=3, **values)
    with pytest.raises(SettingError) as e:
        run(host, method, cfg, image_set(toy_images(3), ["a", None, ""]), OPTS)
    assert e.value.name == name
    assert "2 of 3 images have no caption" in e.value.fix and "remove {caption}" in e.value.fix
    assert host.sessions == [] and host.calls["encode_images"] == 0


def test_require_prompt_captions():
    assert require_prompt_captions("p", [None, None], "target_prompt") == ["p", "p"]
    assert require_prompt_captions("{caption}, sks", [" a ", "b"], "x") == ["a, sks", "b, sks"]
    with pytest.raises(SettingError, match="1 of 1 images"):
        require_prompt_captions("{caption}", [None], "x")


# ------------------------------------------------------------------ every config is declared


def test_every_method_config_field_is_a_declared_setting():
    for m in METHODS.values():
        declared = {s.name for s in settings.specs(m.config)}
        assert declared == {f.name for f in dataclasses.fields(m.config)}, m.name
        settings.check(m.config())
