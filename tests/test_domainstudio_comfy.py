"""DomainStudio inside a real in-process ComfyUI on tiny SD1.5 / SDXL models (CPU): the DomainStudio
Train node as ComfyUI runs it, and the core's run() over ComfyHost (trainer/hosts/comfy.py)."""

import json
import os

import pytest
import torch

from comfyui_domainstudio.testing.comfy_helpers import (RES, interrupt_guard, ksample, progress_hook, read_file,
                                                         stripes, train_domainstudio, unet_state)

pytestmark = [pytest.mark.comfy, pytest.mark.usefixtures("unload_models")]


def _core(comfy):
    """(ComfyHost class, the run module) of the pack."""
    return comfy.pack("trainer.hosts.comfy").ComfyHost, comfy.pack("trainer.run")


def test_train_saves_lora_that_stock_loader_reproduces_exactly(comfy, sd15, loras_dir):
    model, clip, vae = sd15
    before = unet_state(model)
    base_sample = ksample(comfy, model, clip)

    out = train_domainstudio(comfy, model, clip, vae, save_name="ds_test", target_prompt="a sks house",
                             source_prompt="a house")
    trained, delta, plot, saved = out["model"], out["delta"], out["loss_plot"], out["saved_path"]
    after = unet_state(model)  # training itself never writes the shared weights
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert os.path.dirname(saved) == loras_dir and saved.endswith(".safetensors")
    assert plot.ndim == 4 and plot.shape[0] == 1 and plot.shape[-1] == 3

    ours = ksample(comfy, trained, clip)
    assert not torch.equal(ours, base_sample), "the trained MODEL should sample differently"
    # Stock LoraLoader + the saved file gives bit-identical samples.
    meta, tensors = read_file(saved)
    assert set(tensors) == set(delta) and meta["domainstudio.method"] == "domainstudio"
    assert all(torch.equal(tensors[k], delta[k]) for k in delta), "the delta output holds the file's values"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    stock, _ = comfy.nodes.LoraLoader().load_lora(model, clip, os.path.basename(saved), 1.0, 0.0)
    assert torch.equal(ksample(comfy, stock, clip), ours)
    # The input MODEL is untouched: same samples, and (once ComfyUI has loaded it again, which
    # restores the weights that patched clones modify in place) the same weights.
    assert torch.equal(ksample(comfy, model, clip), base_sample)
    after = unet_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_gradients_reach_exactly_the_trained_parameters(comfy, sd15):
    ComfyHost, core = _core(comfy)
    chost = comfy.pack("trainer.hosts.comfy")
    model, clip, vae = sd15
    cfg = core.resolve_config("domainstudio", dict(steps=2, batch_size=3, learning_rate=1e-3))
    opts = core.RunOptions(train_mode="lora_attn", lora_rank=4, lora_alpha=4.0, precision="fp32")
    with torch.inference_mode():  # run() leaves it itself, as inside a node
        out = core.run(ComfyHost(model, clip, vae), "domainstudio", cfg, stripes(), opts)
    params = out.adapter.parameters()
    names = chost.trainable_module_names(model.model.diffusion_model, "lora_attn")
    assert names and all(n.split(".")[-1] in ("to_q", "to_k", "to_v") or n.endswith("to_out.0") for n in names)
    assert set(out.adapter.modules) == set(names)
    assert len(params) == 2 * len(names)  # LoRA up and down of every selected layer, nothing else
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert all(p.grad.abs().sum() > 0 for p in params)
    for p in model.model.diffusion_model.parameters():
        assert not p.requires_grad and p.grad is None
    assert all(p.grad is None for p in clip.cond_stage_model.parameters())
    assert out.delta and all(v.dtype == torch.float32 for v in out.delta.values())  # the exact delta


def test_fixed_seed_gives_identical_delta(comfy, sd15):
    model, clip, vae = sd15
    d1 = train_domainstudio(comfy, model, clip, vae, steps=3, train_seed=5)["delta"]
    d2 = train_domainstudio(comfy, model, clip, vae, steps=3, train_seed=5)["delta"]
    d3 = train_domainstudio(comfy, model, clip, vae, steps=3, train_seed=6)["delta"]
    assert d1.keys() == d2.keys()
    assert all(torch.equal(d1[k], d2[k]) for k in d1)
    assert any(not torch.equal(d1[k], d3[k]) for k in d1)


def _fixed_draw_loss(comfy, model, clip, vae, images, draws=6):
    """The model's own denoising loss on the training images over fixed (noise, sigma) draws,
    computed through ComfyHost inside ComfyUI's sampling set-up (patches of `model` applied)."""
    ComfyHost, _ = _core(comfy)
    SessionNeeds = comfy.pack("trainer.host").SessionNeeds
    host = ComfyHost(model, clip, vae)
    with torch.inference_mode(False), torch.no_grad():
        x0 = host.encode_images(images)
        cond = host.encode_prompt("")

        def fn():
            g = torch.Generator().manual_seed(123)
            total = 0.0
            with torch.no_grad():
                for _ in range(draws):
                    sigma = host.sample_sigmas(x0.shape[0], g)
                    noise = torch.randn(x0.shape, generator=g)
                    pred = host.predict_x0(host.add_noise(x0, noise, sigma), sigma, cond)
                    total += float(host.denoising_loss(pred, x0, sigma))
            return total / draws

        return host.session(fn, SessionNeeds(batch_shape=tuple(x0.shape)))


def test_twenty_steps_lower_the_denoising_loss(comfy, sd15):
    model, clip, vae = sd15
    images = stripes(4)
    before = _fixed_draw_loss(comfy, model, clip, vae, images)
    trained = train_domainstudio(comfy, model, clip, vae, images=images, steps=20, batch_size=4, learning_rate=3e-3,
                                 train_mode="lora_all", lora_rank=8, lora_alpha=8.0)["model"]
    after = _fixed_draw_loss(comfy, trained, clip, vae, images)
    print(f"denoising loss on the training set: {before:.4f} -> {after:.4f}")
    assert after < before * 0.9
    assert _fixed_draw_loss(comfy, model, clip, vae, images) == before, "the input MODEL is still the source"


def test_full_delta_mode_and_pixel_features(comfy, sd15, loras_dir):
    model, clip, vae = sd15
    out = train_domainstudio(comfy, model, clip, vae, steps=2, train_mode="full_attn", feature_space="pixel",
                             learning_rate=1e-4, save_name="ds_full")
    assert out["delta"] and all(k.endswith(".diff") for k in out["delta"])
    stock, _ = comfy.nodes.LoraLoader().load_lora(model, clip, os.path.basename(out["saved_path"]), 1.0, 0.0)
    assert torch.equal(ksample(comfy, stock, clip), ksample(comfy, out["model"], clip))


def test_prior_preservation_generates_and_caches_class_images(comfy, sd15):
    core = comfy.pack("trainer.run")
    model, clip, vae = sd15
    core._CLASS_CACHE.clear()
    seen = []
    with progress_hook(lambda v, t, p, node_id=None: seen.append((v, t))):
        out = train_domainstudio(comfy, model, clip, vae, steps=2, prior_images=3, target_prompt="a sks house",
                                 source_prompt="a house")
    assert [v for v, _ in seen] == [1, 2, 3, 4, 5] and all(t == 5 for _, t in seen)  # 3 class images + 2 steps
    assert len(core._CLASS_CACHE) == 1
    (lat,) = core._CLASS_CACHE.values()
    assert lat.shape == (3, 4, RES // 8, RES // 8) and torch.isfinite(lat).all()
    assert out["delta"]
    train_domainstudio(comfy, model, clip, vae, steps=2, prior_images=3, target_prompt="a sks house",
                       source_prompt="a house", learning_rate=5e-4)
    assert len(core._CLASS_CACHE) == 1 and next(iter(core._CLASS_CACHE.values())) is lat  # reused


def test_v_prediction_model_uses_host_parameterisation(comfy, sd15):
    from comfy import model_management, model_sampling
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    ComfyHost, _ = _core(comfy)
    losses = comfy.pack("trainer.losses")
    SessionNeeds = comfy.pack("trainer.host").SessionNeeds
    model, clip, vae = sd15
    (vmodel,) = ModelSamplingDiscrete().patch(model, "v_prediction", False)
    # The host's x0 and loss follow the model's own parameterisation (ComfyUI's model_sampling).
    host = ComfyHost(vmodel, clip, vae)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    with torch.inference_mode(False), torch.no_grad():
        cond = host.encode_prompt("a house")

        def fn():
            with torch.no_grad():
                sigma = torch.tensor([0.5, 3.0])
                xt = host.add_noise(x0, noise, sigma)
                pred = host.predict_x0(xt, sigma, cond)
                ms = vmodel.get_model_object("model_sampling")
                inner = vmodel.model
                out = inner.diffusion_model(ms.calculate_input(sigma, xt), ms.timestep(sigma),
                                            context=cond.context.expand(2, -1, -1)).float()
                ref = ms.calculate_denoised(sigma, out, xt)
                loss = host.denoising_loss(pred, x0, sigma)
                sd = float(getattr(ms, "sigma_data", 1.0))
                return pred, ref, loss, [losses.denoising_loss_x0(pred, x0, sigma, k, sd) for k in ("v", "eps")]

        pred, ref, loss, (as_v, as_eps) = host.session(fn, SessionNeeds(batch_shape=(2, 4, 8, 8)))
    model_management.unload_all_models()
    assert torch.allclose(pred, ref, atol=1e-5, rtol=1e-5), (pred - ref).abs().max()
    assert torch.equal(loss, as_v) and not torch.allclose(as_v, as_eps)
    # And the node trains it and returns a MODEL with the same sampling.
    out = train_domainstudio(comfy, vmodel, clip, vae, steps=2)
    assert isinstance(out["model"].get_model_object("model_sampling"), model_sampling.V_PREDICTION)
    assert all(torch.isfinite(v).all() for v in out["delta"].values())


def test_sdxl_family_model_trains_and_samples(comfy, sdxl):
    model, clip, vae = sdxl
    base = ksample(comfy, model, clip, steps=2)
    out = train_domainstudio(comfy, model, clip, vae, steps=2, target_prompt="a sks house", source_prompt="a house",
                             learning_rate=1e-3)
    assert any("input_blocks" in k for k in out["delta"])
    assert not torch.equal(ksample(comfy, out["model"], clip, steps=2), base)


def test_cancel_stops_within_one_step_and_leaves_model_untouched(comfy, sd15, loras_dir):
    model, clip, vae = sd15
    base_sample = ksample(comfy, model, clip)
    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append(value)
        if value == 3:
            mm.interrupt_current_processing(True)  # what POST /interrupt does

    with interrupt_guard() as mm, progress_hook(hook):
        with pytest.raises(mm.InterruptProcessingException):
            train_domainstudio(comfy, model, clip, vae, steps=50, save_name="cancelled")
    # ComfyUI's layers check for Cancel on every forward: the 4th step stopped at once, and the
    # last completed step is kept (its "kept" message is one more update of step 3).
    assert sorted(set(seen)) == [1, 2, 3], seen
    assert sorted(os.listdir(loras_dir)) == ["cancelled_partial_3.dsstate", "cancelled_partial_3.safetensors"]
    assert torch.equal(ksample(comfy, model, clip), base_sample)


def test_cancel_with_the_servers_hook_and_throttled_progress(comfy, sd15, loras_dir):
    """As in a server: the progress hook checks for Cancel (main.py's hook; it clears the request as
    it raises) and newer releases throttle ProgressBar updates (at most one per 0.1 s and 0.5 % of
    the run reaches the hook). Cancel still stops the very next step, because ComfyUI's layers check
    for it on every forward, and the last completed step is kept."""
    from comfy import utils as comfy_utils

    model, clip, vae = sd15
    seen = []

    def server_hook(value, total, preview, node_id=None):
        mm.throw_exception_if_processing_interrupted()
        seen.append(value)
        if len(seen) == 1:
            mm.interrupt_current_processing(True)

    with interrupt_guard() as mm, progress_hook(server_hook, every_update=False):
        if hasattr(comfy_utils, "PROGRESS_THROTTLE_MIN_INTERVAL"):
            comfy_utils.PROGRESS_THROTTLE_MIN_INTERVAL = 1e9  # steps faster than the throttle
        with pytest.raises(mm.InterruptProcessingException):
            train_domainstudio(comfy, model, clip, vae, steps=8, save_name="throttled")
        assert not mm.processing_interrupted(), "the request was consumed by the raise"
    assert set(seen) == {1}, seen
    assert sorted(os.listdir(loras_dir)) == ["throttled_partial_1.dsstate", "throttled_partial_1.safetensors"]


def test_bad_settings_are_refused_before_training(comfy, sd15):
    model, clip, vae = sd15
    seen = []
    cases = [
        (dict(images=stripes(1)), "at least 2"),
        (dict(batch_size=8), "batch_size"),
        (dict(batch_size=2), "identically zero"),
        (dict(learning_rate=float("nan")), "learning_rate"),
        (dict(lambda_img=-1.0), "lambda_img"),
        (dict(lambda_hfmse=float("inf")), "lambda_hfmse"),
        (dict(lora_rank=0), "lora_rank"),
        (dict(min_timestep=600, max_timestep=500), "max_timestep"),
    ]
    with progress_hook(lambda v, t, p, node_id=None: seen.append(v)):
        for kw, match in cases:
            with pytest.raises(ValueError, match=match) as e:
                train_domainstudio(comfy, model, clip, vae, **kw)
            assert str(e.value).startswith("DomainStudio Train"), e.value
    assert seen == [], "nothing trained"


def test_both_image_inputs_or_none_is_an_error(comfy, sd15):
    model, clip, vae = sd15
    with pytest.raises(ValueError, match="no training images"):
        train_domainstudio(comfy, model, clip, vae, images=None)
    image_set = comfy.node("DomainStudio_FewShotImageSet").execute(resolution=RES, flip=False,
                                                                   images=stripes(3)).result[0]
    with pytest.raises(ValueError, match="either image_set or images"):
        train_domainstudio(comfy, model, clip, vae, image_set=image_set)


def test_progress_every_step_with_previews(comfy, sd15):
    from PIL import Image

    model, clip, vae = sd15
    seen = []
    with progress_hook(lambda value, total, preview, node_id=None: seen.append((value, total, preview))):
        out = train_domainstudio(comfy, model, clip, vae, steps=12, preview_every=5)
    assert [v for v, _, p in seen if p is None] == list(range(1, 13)) and all(t == 12 for _, t, _ in seen)
    previews = [(v, p) for v, _, p in seen if p is not None]
    assert [v for v, _ in previews] == [5, 10]  # sampled from the weights of steps 5 and 10
    assert all(p[0] == "JPEG" and isinstance(p[1], Image.Image) for _, p in previews)
    assert out.ui is not None  # the final preview is the node's UI image


def test_bf16_precision_trains_finite(comfy, sd15):
    model, clip, vae = sd15
    delta = train_domainstudio(comfy, model, clip, vae, steps=2, precision="bf16")["delta"]
    assert delta and all(torch.isfinite(v).all() for v in delta.values())
    assert any(v.abs().sum() > 0 for k, v in delta.items() if k.endswith("lora_down.weight"))


_NUMBER = r"(\d+\.\d+|nan)"


def test_quality_report_compares_source_and_adapted_samples(comfy, sd15):
    import re

    model, clip, vae = sd15
    out = train_domainstudio(comfy, model, clip, vae, steps=3, quality_samples=3, target_prompt="a sks house",
                             source_prompt="a house")
    text = out["report"]
    assert "quality report (3 samples per model, VAE-latent features)" in text, text
    m = re.search(rf"diversity: adapted {_NUMBER} vs source {_NUMBER} \(ratio {_NUMBER}", text)
    assert m and all(float(v) > 0 for v in m.groups()), text
    m = re.search(rf"nearest training image: adapted {_NUMBER} vs source {_NUMBER}", text)
    assert m and all(0 <= float(v) <= 2 for v in m.groups()), text
    assert "class-prompt drift" not in text  # a domain method has no class prompt
    m = re.search(rf"fine detail \(pixels\): adapted {_NUMBER} vs source {_NUMBER}, training images {_NUMBER}", text)
    assert m and all(0 < float(v) < 1 for v in m.groups()), text  # the tiny model's samples are noisy, not flat
    img = out["report_image"]  # rows: training images, source samples, adapted samples
    assert img.ndim == 4 and img.shape[0] == 1 and img.shape[-1] == 3 and img.shape[1] >= 3 * RES, img.shape
    assert torch.isfinite(img).all() and 0 <= img.min() and img.max() <= 1


def test_quality_report_is_off_by_default(comfy, sd15):
    model, clip, vae = sd15
    out = train_domainstudio(comfy, model, clip, vae, steps=2)
    assert out["report"] == "quality report off (set quality_samples)"


def test_a_timestep_range_draws_through_the_models_own_schedule(comfy, sd15):
    ComfyHost, _ = _core(comfy)
    base, Rng = comfy.pack("trainer.methods.base"), comfy.pack("trainer.loop").Rng
    model, clip, vae = sd15
    host = ComfyHost(model, clip, vae)
    ms = model.get_model_object("model_sampling")
    t = torch.tensor([0.0, 1.0, 499.0, 499.5, 999.0])
    assert torch.equal(host.sigma_at(t), ms.sigma(t))
    assert torch.allclose(host.sigma_at(torch.arange(1000.0)), ms.sigmas.float())
    low = base.noise_levels(host, 512, Rng.seeded(0), (0, 500))
    high = base.noise_levels(host, 512, Rng.seeded(0), (500, 1000))
    assert ms.sigmas[0] <= low.min() and low.max() <= ms.sigmas[499] < ms.sigmas[500] <= high.min()
    # uniform in timestep: the draw the frontier's split runs made (bench/domain_quality.py, before
    # this setting existed) is the same, so those results are reproducible with the setting
    u = torch.rand(512, generator=torch.Generator().manual_seed(0))
    assert torch.equal(low, ms.sigma((499 * u.double()).float()))


def test_the_timestep_range_reaches_the_run_and_the_files_metadata(comfy, sd15, loras_dir):
    model, clip, vae = sd15
    out = train_domainstudio(comfy, model, clip, vae, save_name="ds_trange", min_timestep=0, max_timestep=300)
    meta, _ = read_file(out["saved_path"])
    training = json.loads(meta["domainstudio.training"])
    assert (training["min_timestep"], training["max_timestep"]) == (0, 300)
    assert (meta["ss_min_timestep"], meta["ss_max_timestep"]) == ("0", "300")  # kohya's names, for other tools
