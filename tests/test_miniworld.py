"""The miniature SD1.5 world (miniworld/): the assembled checkpoint loads through the stock
CheckpointLoaderSimple as a two-level SD1.5 UNet with a TAESD VAE, the factors it ships multiply out
exactly, the stock KSampler draws a training caption near its own emoji (also with the DreamBooth /
DomainStudio identifier "sks" in the prompt), and "an emoji" gives varied images.

Uses only shipped files (miniworld/weights/): the checkpoint is assembled once into $DS_CACHE
(the random CLIP-L is regenerated from its seed); no download happens here. The full measurement
(Lite0 KID, diversity, held-out captions) is bench/miniworld_quality.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

# Floors below the shipped model's measurements (miniworld/weights/training.json, `quality`, and the
# README table), far from chance. In 16x16 pixel space the samples are blurry approximations of
# their emoji, so the check is the caption's own image's rank among all 1,252 training images (chance:
# the middle, 50 %; measured at seed 0: median 4 % plain, 11 % with "sks"); the feature-space
# accuracy is in bench/miniworld_quality.py.
MIN_VAE_PSNR_DB = 22.0
MAX_MEDIAN_RANK = 0.10
MAX_SKS_MEDIAN_RANK = 0.25
N_PROMPTS, N_SKS, N_DOMAIN = 12, 6, 8


@pytest.fixture(scope="session")
def miniworld_ckpt(comfy) -> str:
    from comfyui_domainstudio.miniworld import build

    path = build.ensure()
    comfy.folder_paths.add_model_folder_path("checkpoints", os.path.dirname(path))
    return path


@pytest.fixture(scope="session")
def mw(comfy, miniworld_ckpt):
    """(MODEL, CLIP, VAE) through the stock CheckpointLoaderSimple."""
    return comfy.nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(miniworld_ckpt))[:3]


@pytest.fixture(scope="session")
def reference():
    from comfyui_domainstudio.miniworld import data

    return data.reference()


def test_shipped_weights_fit_budget():
    from comfyui_domainstudio.miniworld import config

    shipped = [os.path.join(config.WEIGHTS_DIR, f) for f in os.listdir(config.WEIGHTS_DIR)]
    total = sum(os.path.getsize(f) for f in shipped)
    assert total <= config.SHIPPED_BUDGET_BYTES, sorted((os.path.getsize(f), f) for f in shipped)
    assert os.path.exists(config.UNET_FILE) and os.path.exists(config.VAE_FILE)
    assert not os.path.exists(os.path.join(config.WEIGHTS_DIR, "unet_fp16.safetensors"))  # the old one-level UNet


def test_loads_as_two_level_sd15_with_taesd(comfy, mw):
    from comfy import latent_formats, model_base, supported_models
    from comfy.taesd import taesd

    from comfyui_domainstudio.miniworld import config

    model, clip, vae = mw
    assert type(model.model.model_config) is supported_models.SD15
    assert type(model.model) is model_base.BaseModel
    assert model.model.model_type == model_base.ModelType.EPS
    assert isinstance(model.model.latent_format, latent_formats.SD15)
    detected = model.model.model_config.unet_config
    for k in ("channel_mult", "num_res_blocks", "transformer_depth", "transformer_depth_output",
              "transformer_depth_middle", "model_channels", "context_dim"):
        assert list(np.atleast_1d(detected[k])) == list(np.atleast_1d(config.UNET_CONFIG[k])), k
    assert len(detected["channel_mult"]) == 2  # 8x8 and 4x4 latents
    assert isinstance(vae.first_stage_model, taesd.TAESD)
    layers = clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers
    assert len(layers) == 12  # full-size CLIP-L on the loader path
    with torch.inference_mode():
        lat = vae.encode(torch.full((1, 64, 64, 3), 0.5))
    assert tuple(lat.shape) == (1, 4, 8, 8)


def test_factors_multiply_out_exactly(comfy):
    """The shipped parameterisation (miniworld/factor.py) and the ordinary UNet the checkpoint carries
    compute the same function; random factors, so every layer matters."""
    from comfyui_domainstudio.miniworld import factor, models

    fu = models.new_factored_unet(seed=3)
    with torch.no_grad():
        for _, p in fu.named_parameters():
            if p.ndim > 1 and (p == 0).all():  # zero-initialised residual outputs
                p.normal_(0, 0.05)
    full = factor.expanded_state_dict(fu)
    _, unet = models.new_unet()
    unet.load_state_dict(full, strict=True)
    n_factored = sum(isinstance(m, (factor.FactorConv2d, factor.FactorLinear)) for m in fu.modules())
    assert n_factored > 50
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([20.0, 800.0]), torch.randn(2, 77, 768)
    with torch.no_grad():
        a, b = fu.eval()(x, t, context=ctx), unet.eval()(x, t, context=ctx)
    assert a.abs().mean() > 0.1
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-10))


def test_vae_reconstruction_psnr(comfy, mw, reference):
    _, _, vae = mw
    x = torch.from_numpy(reference["images"][::8]).float() / 255.0
    with torch.inference_mode():
        rec = vae.decode(vae.encode(x)).float().clamp(0, 1).numpy()
    p = float(_psnr(rec, x.numpy()).mean())
    print(f"miniworld VAE PSNR over {len(x)} training images: {p:.2f} dB")
    assert p >= MIN_VAE_PSNR_DB


def test_ksampler_draws_recognisable_captions(comfy, mw, reference):
    """Stock KSampler at 64x64, one call for all prompts: N training captions "an emoji of <name>",
    N_SKS of them as "a sks emoji of <name>", N_DOMAIN "an emoji". The nearest training image (pixel
    MSE on 16x16 area-downsampled images, all training concepts as candidates): the caption's own image
    ranks near the top; the "an emoji" samples must be different emoji, not one image."""
    from comfyui_domainstudio.miniworld import evaluate

    refs = reference["images"].astype(np.float32) / 255.0
    ids = np.linspace(0, len(refs) - 1, N_PROMPTS).round().astype(int)
    names = [reference["names"][i] for i in ids]
    prompts = ([f"an emoji of {n}" for n in names] + [f"a sks emoji of {n}" for n in names[:N_SKS]]
               + ["an emoji"] * N_DOMAIN)
    imgs = evaluate.generate(comfy.nodes, mw, prompts, seed=0, batch=len(prompts))
    assert imgs.shape == (len(prompts), 64, 64, 3) and np.isfinite(imgs).all()
    plain, sks, domain = imgs[:N_PROMPTS], imgs[N_PROMPTS:N_PROMPTS + N_SKS], imgs[N_PROMPTS + N_SKS:]
    rank = evaluate.own_rank(plain, ids, refs)
    rank_sks = evaluate.own_rank(sks, ids[:N_SKS], refs)
    _, nn_dom = evaluate.nn_accuracy(domain, np.zeros(N_DOMAIN, int), refs)
    print(f"miniworld: the caption's own image ranks (of {len(refs)}) {rank.tolist()}, with 'sks' {rank_sks.tolist()}; "
          f"'an emoji': {len(set(nn_dom.tolist()))} distinct nearest emoji of {N_DOMAIN}")
    assert np.median(rank) <= MAX_MEDIAN_RANK * len(refs), (names, rank)
    assert np.median(rank_sks) <= MAX_SKS_MEDIAN_RANK * len(refs), (names[:N_SKS], rank_sks)
    assert len(set(nn_dom.tolist())) >= N_DOMAIN // 2
    assert domain.std(axis=0).mean() > 0.1  # the samples differ pixel-wise


def test_step_budget_fixes_the_total_from_measured_speed(monkeypatch):
    """`--unet-minutes` / `--unet-until` (a GPU lent for a fixed time): the total is fixed once, from
    the speed of steps 20..120 of this process, never below the steps done; a resumed run keeps its
    stored total; 0 minutes leaves the given total."""
    from comfyui_domainstudio.miniworld import train

    clock = {"t": 1000.0}
    monkeypatch.setattr(train.time, "time", lambda: clock["t"])

    def run(budget, start=0, s_per_step=0.5, steps=200):
        seen = []
        for step in range(start + 1, start + steps + 1):
            clock["t"] += s_per_step
            seen.append(budget.total(step))
        return seen

    b = train.StepBudget(minutes=2, total=4200)
    seen = run(b)
    assert seen[:119] == [4200] * 119          # unchanged until step 120
    assert seen[119:] == [240] * 81            # 2 min / 0.5 s per step
    assert b.record() == {"minutes_budget": 2.0, "s_per_step_measured": 0.5}

    b = train.StepBudget(minutes=0.5, total=4200)   # 60 steps fit, but 120 are already done
    assert run(b)[-1] == 121

    clock["t"] = 1000.0
    b = train.StepBudget(minutes=0, total=4200, until=1000.0 + 200)   # a deadline 200 s away
    seen = run(b)
    assert seen[-1] == 120 + int((200 - 120 * 0.5) / 0.5)            # what fits in the 140 s left
    assert b.record()["minutes_budget"] == pytest.approx((seen[-1]) * 0.5 / 60, abs=0.01)

    b = train.StepBudget(minutes=2, total=777, start_step=500, fixed=True)  # resumed: its stored total
    assert set(run(b, start=500)) == {777} and b.record() == {}
    b = train.StepBudget(minutes=0, total=300)
    assert set(run(b)) == {300} and b.record() == {}


def test_two_builds_of_the_same_checkpoint_at_once_both_land(tmp_path, monkeypatch):
    """Two benchmark processes started together both build the cached checkpoint: each writes its own
    temporary file (they once shared one name and the second move failed), and no temporary is left."""
    import threading

    from comfyui_domainstudio.miniworld import build

    both_writing = threading.Barrier(2, timeout=30)
    written = []

    def write(tensors, path, meta):
        written.append(path)
        with open(path, "wb") as f:
            f.write(b"checkpoint bytes")
        both_writing.wait()  # neither moves its file before the other has written

    monkeypatch.setattr(build, "state_dict", lambda: {})
    monkeypatch.setattr(build, "write_safetensors", write)
    monkeypatch.setattr(build, "check_loads_as_sd15", lambda path: None)
    out = str(tmp_path / "miniworld_sd15.safetensors")
    errors = []

    def one():
        try:
            build.build(out)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(2)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert errors == [] and len(set(written)) == 2
    assert all(p.endswith(".safetensors") for p in written)  # ComfyUI picks the loader by the extension
    assert os.listdir(tmp_path) == ["miniworld_sd15.safetensors"]


def test_a_second_process_never_reads_a_tarball_npm_is_still_writing(tmp_path, monkeypatch):
    """The emoji tarball appears under its name only once npm has finished writing it."""
    import threading

    from comfyui_domainstudio.miniworld import config, data

    monkeypatch.setenv("DS_CACHE", str(tmp_path))
    half_written, go_on = threading.Event(), threading.Event()
    whole = b"a whole tarball"

    def fake_npm(cmd, **kw):  # the first call writes half, waits; later calls write it whole
        dest = os.path.join(cmd[cmd.index("--pack-destination") + 1], f"emoji-datasource-google-{config.EMOJI_VERSION}.tgz")
        with open(dest, "wb") as f:
            if not half_written.is_set():
                f.write(whole[:5])
                f.flush()
                half_written.set()
                go_on.wait(30)
                f.write(whole[5:])
            else:
                f.write(whole)

    monkeypatch.setattr(data.subprocess, "run", fake_npm)
    first = threading.Thread(target=data.tarball, args=("google",))
    first.start()
    assert half_written.wait(30)
    with open(data.tarball("google"), "rb") as f:  # the second caller, while the first is mid-write
        assert f.read() == whole
    go_on.set()
    first.join(30)
    with open(data.tarball("google"), "rb") as f:
        assert f.read() == whole
    assert os.listdir(os.path.join(tmp_path, "emoji")) == [f"emoji-datasource-google-{config.EMOJI_VERSION}.tgz"]
