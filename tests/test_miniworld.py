"""The miniature SD1.5 world (miniworld/): the assembled checkpoint loads through the stock
CheckpointLoaderSimple as SD1.5 with a TAESD VAE, the stock KSampler draws its training captions,
and the drawings are recognisable: each generated image is matched (nearest neighbour in pixel
space) to the training image of its own caption far more often than chance.

Uses only shipped files (miniworld/weights/): the checkpoint is assembled once into $DS_CACHE
(the random CLIP-L is regenerated from its seed); no download happens here.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

# Measured with the shipped weights (miniworld/weights/training.json, `quality`, from
# `python -m miniworld.evaluate --n 97 --cfg 5 7.5 3`): VAE PSNR 21.06 dB; nearest-neighbour accuracy
# 0.938 over all 97 training captions at CFG 5 (0.907 at 7.5, 0.928 at 3), chance 1/97 = 0.010.
# The bars sit below the measurements and far above chance.
MIN_VAE_PSNR_DB = 19.0
MIN_NN_ACCURACY = 0.5
N_PROMPTS = 16


@pytest.fixture(scope="session")
def miniworld_ckpt(comfy) -> str:
    from miniworld import build

    path = build.ensure()
    comfy.folder_paths.add_model_folder_path("checkpoints", os.path.dirname(path))
    return path


@pytest.fixture(scope="session")
def mw(comfy, miniworld_ckpt):
    """(MODEL, CLIP, VAE) through the stock CheckpointLoaderSimple."""
    return comfy.nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(miniworld_ckpt))[:3]


@pytest.fixture(scope="session")
def reference():
    from miniworld import data

    return data.reference()


def test_shipped_weights_fit_budget():
    from miniworld import config

    total = sum(os.path.getsize(f) for f in (config.UNET_FILE, config.VAE_FILE, config.REFERENCE_PNG))
    assert total <= 40 * 1024 * 1024, total


def test_loads_as_sd15_with_taesd(comfy, mw):
    from comfy import latent_formats, model_base, supported_models
    from comfy.taesd import taesd

    model, clip, vae = mw
    assert type(model.model.model_config) is supported_models.SD15
    assert type(model.model) is model_base.BaseModel
    assert model.model.model_type == model_base.ModelType.EPS
    assert isinstance(model.model.latent_format, latent_formats.SD15)
    assert isinstance(vae.first_stage_model, taesd.TAESD)
    # full-size CLIP-L on the loader path (12 layers, 768 wide)
    layers = clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers
    assert len(layers) == 12
    with torch.inference_mode():
        lat = vae.encode(torch.full((1, 64, 64, 3), 0.5))
    assert tuple(lat.shape) == (1, 4, 8, 8)


def _psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-10))


def test_vae_reconstruction_psnr(comfy, mw, reference):
    _, _, vae = mw
    x = torch.from_numpy(reference["images"]).float() / 255.0
    with torch.inference_mode():
        rec = vae.decode(vae.encode(x)).float().clamp(0, 1).numpy()
    p = float(_psnr(rec, x.numpy()).mean())
    print(f"miniworld VAE PSNR over {len(x)} training images: {p:.2f} dB")
    assert p >= MIN_VAE_PSNR_DB


def _generate(comfy, mw, prompts: list[str], seed: int = 0) -> np.ndarray:
    model, clip, vae = mw
    n = comfy.nodes
    out = []
    with torch.inference_mode():
        (neg,) = n.CLIPTextEncode().encode(clip, "")
        (latent,) = n.EmptyLatentImage().generate(64, 64, 1)
        for i, p in enumerate(prompts):
            (pos,) = n.CLIPTextEncode().encode(clip, p)
            (samples,) = n.KSampler().sample(model, seed + i, 20, 5.0, "euler", "normal", pos, neg, latent, denoise=1.0)
            (img,) = n.VAEDecode().decode(vae, samples)
            out.append(img[0].float().numpy())
    return np.stack(out)


def test_ksampler_draws_recognisable_captions(comfy, mw, reference):
    """Stock KSampler at 64x64 on N training captions; nearest training image (pixel MSE on 16x16
    area-downsampled images, all 97 training emoji as candidates) must be the caption's own."""
    refs = reference["images"].astype(np.float32) / 255.0
    ids = np.linspace(0, len(refs) - 1, N_PROMPTS).round().astype(int)
    prompts = [reference["captions"][i][1] for i in ids]
    imgs = _generate(comfy, mw, prompts)
    assert imgs.shape == (N_PROMPTS, 64, 64, 3) and np.isfinite(imgs).all()
    assert imgs.std() > 0.05  # not a blank image

    def small(a):
        return a.reshape(len(a), 16, 4, 16, 4, 3).mean(axis=(2, 4)).reshape(len(a), -1)

    d = ((small(imgs)[:, None, :] - small(refs)[None, :, :]) ** 2).mean(-1)
    nn = d.argmin(1)
    acc = float((nn == ids).mean())
    print(f"miniworld nearest-neighbour accuracy {acc:.2f} over {N_PROMPTS} captions (chance {1 / len(refs):.3f})")
    assert acc >= MIN_NN_ACCURACY, [(p, reference["names"][j]) for p, j in zip(prompts, nn)]
