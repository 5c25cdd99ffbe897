"""DomainStudio inside a real in-process ComfyUI on tiny SD1.5 / SDXL models (CPU)."""

import os

import pytest
import torch

pytestmark = pytest.mark.comfy

RES = 64


def _images(n=6, res=RES, seed=0):
    """A tiny 'domain': diagonal stripes of varying phase and colour, IMAGE [n, res, res, 3]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(res), torch.arange(res), indexing="ij")
    out = []
    for i in range(n):
        phase = torch.rand(1, generator=g) * 6.28
        stripes = 0.5 + 0.5 * torch.sin((xx + yy) / 4.0 + phase)
        colour = torch.rand(3, generator=g) * 0.6 + 0.2
        out.append(stripes[..., None] * colour)
    return torch.stack(out).float()


def _ksample(comfy, model, clip, seed=7, steps=3, prompt="a house"):
    pos = comfy.nodes.CLIPTextEncode().encode(clip, prompt)[0]
    neg = comfy.nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = comfy.nodes.EmptyLatentImage().generate(RES, RES, 1)[0]
    with torch.inference_mode():
        out = comfy.nodes.KSampler().sample(model, seed, steps, 5.0, "euler", "normal", pos, neg, latent)[0]
    return out["samples"].clone()


def _train(comfy, model, clip, vae, **kw):
    node = comfy.node("DomainStudio_Train")
    args = dict(target_prompt="", source_prompt="", steps=4, learning_rate=1e-3, batch_size=3, resolution=RES,
                lambda_img=100.0, lambda_hf=100.0, lambda_hfmse=0.1, train_mode="lora_attn", lora_rank=4,
                lora_alpha=4.0, feature_space="latent", prior_images=0, lambda_prior=1.0, train_seed=0,
                precision="fp32", save_name="", images=_images())
    args.update(kw)
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return node.execute(model=model, clip=clip, vae=vae, **args).result


@pytest.fixture()
def loras_dir(comfy, tmp_path):
    """A fresh first models/loras folder (our node saves to the first one)."""
    d = tmp_path / "loras"
    d.mkdir()
    comfy.folder_paths.add_model_folder_path("loras", str(d), is_default=True)
    yield str(d)
    comfy.folder_paths.folder_names_and_paths["loras"][0].remove(str(d))


def _unet_state(model):
    return {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}


def test_train_saves_lora_that_stock_loader_reproduces_exactly(comfy, sd15, loras_dir):
    model, clip, vae = sd15
    before = _unet_state(model)
    base_sample = _ksample(comfy, model, clip)

    trained, delta, plot, saved = _train(comfy, model, clip, vae, save_name="ds_test", target_prompt="a sks house",
                                         source_prompt="a house")
    after = _unet_state(model)  # training itself never writes the shared weights
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert os.path.dirname(saved) == loras_dir and saved.endswith(".safetensors")
    assert plot.shape[0] == 1 and plot.shape[-1] == 3

    ours = _ksample(comfy, trained, clip)
    assert not torch.equal(ours, base_sample), "the trained MODEL should sample differently"
    # Stock LoraLoader + the saved file gives bit-identical samples.
    from safetensors import safe_open

    with safe_open(saved, "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert keys == set(delta) and meta["domainstudio.method"] == "domainstudio"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    stock, _ = comfy.nodes.LoraLoader().load_lora(model, clip, os.path.basename(saved), 1.0, 0.0)
    assert torch.equal(_ksample(comfy, stock, clip), ours)
    # The input MODEL is untouched: same samples, and (once ComfyUI has loaded it again, which
    # restores the weights that patched clones modify in place) the same weights.
    assert torch.equal(_ksample(comfy, model, clip), base_sample)
    after = _unet_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_gradients_reach_exactly_the_trained_parameters(comfy, sd15):
    host = comfy.pack("trainer.hosts.comfy")
    DomainStudioConfig = comfy.pack("trainer.domainstudio").DomainStudioConfig
    model, clip, vae = sd15

    out = host.train_domainstudio_comfy(model, clip, vae, _images(), DomainStudioConfig(steps=2, batch_size=3,
                                        learning_rate=1e-3), train_mode="lora_attn", rank=4, alpha=4.0)
    params = out.attached.parameters()
    assert params and all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert all(p.grad.abs().sum() > 0 for p in params)
    names = host.trainable_module_names(model.model.diffusion_model, "lora_attn")
    assert set(out.attached.modules) == set(names)
    assert all(n.split(".")[-1] in ("to_q", "to_k", "to_v") or n.endswith("to_out.0") for n in names)
    for p in model.model.diffusion_model.parameters():
        assert not p.requires_grad and p.grad is None


def test_fixed_seed_gives_identical_delta(comfy, sd15):
    model, clip, vae = sd15
    _, d1, _, _ = _train(comfy, model, clip, vae, steps=3, train_seed=5)
    _, d2, _, _ = _train(comfy, model, clip, vae, steps=3, train_seed=5)
    _, d3, _, _ = _train(comfy, model, clip, vae, steps=3, train_seed=6)
    assert d1.keys() == d2.keys()
    assert all(torch.equal(d1[k], d2[k]) for k in d1)
    assert any(not torch.equal(d1[k], d3[k]) for k in d1)


def test_twenty_steps_lower_the_denoising_loss(comfy, sd15):
    host = comfy.pack("trainer.hosts.comfy")

    model, clip, vae = sd15
    images = _images(4)
    before = host.denoising_loss_on_set(model, clip, vae, images, draws=6)
    trained, *_ = _train(comfy, model, clip, vae, images=images, steps=20, batch_size=4, learning_rate=3e-3,
                         train_mode="lora_all", lora_rank=8, lora_alpha=8.0)
    after = host.denoising_loss_on_set(trained, clip, vae, images, draws=6)
    print(f"denoising loss on the training set: {before:.4f} -> {after:.4f}")
    assert after < before * 0.9


def test_full_delta_mode_and_pixel_features(comfy, sd15, loras_dir):
    model, clip, vae = sd15
    trained, delta, _, saved = _train(comfy, model, clip, vae, steps=2, train_mode="full_attn",
                                      feature_space="pixel", learning_rate=1e-4, save_name="ds_full")
    assert delta and all(k.endswith(".diff") for k in delta)
    stock, _ = comfy.nodes.LoraLoader().load_lora(model, clip, os.path.basename(saved), 1.0, 0.0)
    assert torch.equal(_ksample(comfy, stock, clip), _ksample(comfy, trained, clip))


def test_prior_preservation_generates_and_caches_class_images(comfy, sd15):
    host = comfy.pack("trainer.hosts.comfy")

    model, clip, vae = sd15
    host._PRIOR_CACHE.clear()
    _train(comfy, model, clip, vae, steps=2, prior_images=3, target_prompt="a sks house", source_prompt="a house")
    assert len(host._PRIOR_CACHE) == 1
    (lat,) = host._PRIOR_CACHE.values()
    assert lat.shape == (3, 4, RES // 8, RES // 8) and torch.isfinite(lat).all()
    _train(comfy, model, clip, vae, steps=2, prior_images=3, target_prompt="a sks house", source_prompt="a house",
           learning_rate=5e-4)
    assert len(host._PRIOR_CACHE) == 1  # reused, not regenerated


def test_v_prediction_model_uses_host_parameterisation(comfy, sd15):
    from comfy import model_sampling
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    model, clip, vae = sd15
    (vmodel,) = ModelSamplingDiscrete().patch(model, "v_prediction", False)
    trained, delta, _, _ = _train(comfy, vmodel, clip, vae, steps=2)
    assert isinstance(trained.get_model_object("model_sampling"), model_sampling.V_PREDICTION)
    assert all(torch.isfinite(v).all() for v in delta.values())


def test_sdxl_family_model_trains_and_samples(comfy, sdxl):
    model, clip, vae = sdxl
    base = _ksample(comfy, model, clip, steps=2)
    trained, delta, _, _ = _train(comfy, model, clip, vae, steps=2, target_prompt="a sks house",
                                  source_prompt="a house", learning_rate=1e-3)
    assert any("input_blocks" in k for k in delta)
    assert not torch.equal(_ksample(comfy, trained, clip, steps=2), base)


def test_cancel_stops_within_one_step_and_leaves_model_untouched(comfy, sd15):
    import comfy.model_management as mm
    from comfy import utils as comfy_utils

    model, clip, vae = sd15
    base_sample = _ksample(comfy, model, clip)
    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append(value)
        if value == 3:
            mm.interrupt_current_processing(True)  # what POST /interrupt does

    comfy_utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _train(comfy, model, clip, vae, steps=50)
    finally:
        comfy_utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    assert seen == [1, 2, 3], seen  # the 4th step's progress update raised: one step after the request
    assert torch.equal(_ksample(comfy, model, clip), base_sample)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(images=_images(1)), "at least 2"),
        (dict(batch_size=8), "batch_size"),
        (dict(batch_size=2), "identically zero"),
        (dict(learning_rate=float("nan")), "learning_rate"),
        (dict(lambda_img=-1.0), "lambda_img"),
        (dict(lambda_hfmse=float("inf")), "lambda_hfmse"),
    ],
)
def test_bad_input_gives_specific_error(comfy, sd15, kw, match):
    model, clip, vae = sd15
    with pytest.raises(ValueError, match=match):
        _train(comfy, model, clip, vae, **kw)


def test_both_image_inputs_or_none_is_an_error(comfy, sd15):
    model, clip, vae = sd15
    with pytest.raises(ValueError, match="no training images"):
        _train(comfy, model, clip, vae, images=None)


def test_progress_every_step_with_loss_curve_preview(comfy, sd15):
    from comfy import utils as comfy_utils
    from PIL import Image

    model, clip, vae = sd15
    seen = []
    comfy_utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total, preview)))
    try:
        _train(comfy, model, clip, vae, steps=25)
    finally:
        comfy_utils.set_progress_bar_global_hook(None)
    assert [v for v, _, _ in seen] == list(range(1, 26)) and all(t == 25 for _, t, _ in seen)
    previews = [p for _, _, p in seen if p is not None]
    assert len(previews) == 1 and previews[0][0] == "JPEG" and isinstance(previews[0][1], Image.Image)


def test_bf16_precision_trains_finite(comfy, sd15):
    model, clip, vae = sd15
    _, delta, _, _ = _train(comfy, model, clip, vae, steps=2, precision="bf16")
    assert delta and all(torch.isfinite(v).all() for v in delta.values())
    assert any(v.abs().sum() > 0 for k, v in delta.items() if k.endswith("lora_down.weight"))
