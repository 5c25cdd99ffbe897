"""End-to-end: each personalization method in a real ComfyUI server, tiny SD1.5 and SDXL, the
graph ending in stock CLIPTextEncode -> KSampler -> SaveImage, compared with the base model."""

import os

import numpy as np
import pytest
from PIL import Image

from test_personalize_comfy import _subject

pytestmark = [pytest.mark.comfy, pytest.mark.e2e]

RES = 64


def _write_subject(server):
    folder = os.path.join(server.base, "input", "subject")
    if not os.path.isdir(folder):
        os.makedirs(folder)
        for i, img in enumerate(_subject(3)):
            Image.fromarray((img.numpy() * 255).round().astype(np.uint8)).save(os.path.join(folder, f"s{i}.png"))
    return "subject"


def _graph(family: str, method: str, seed: int) -> dict:
    if family == "sd15":
        loaders = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}}}
        model, clip, vae = ["1", 0], ["1", 1], ["1", 2]
    else:
        loaders = {
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sdxl_unet.safetensors", "weight_dtype": "default"}},
            "20": {"class_type": "DSTest_TinySDXLClip", "inputs": {"seed": 3}},
            "21": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        }
        model, clip, vae = ["1", 0], ["20", 0], ["21", 2]

    def branch(prefix, m, c, tag):
        return {
            f"{prefix}1": {"class_type": "CLIPTextEncode", "inputs": {"clip": c, "text": ["3", 2]}},
            f"{prefix}2": {"class_type": "CLIPTextEncode", "inputs": {"clip": c, "text": ""}},
            f"{prefix}3": {"class_type": "KSampler", "inputs": {
                "model": m, "positive": [f"{prefix}1", 0], "negative": [f"{prefix}2", 0], "latent_image": ["6", 0],
                "seed": 11, "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
            f"{prefix}4": {"class_type": "VAEDecode", "inputs": {"samples": [f"{prefix}3", 0], "vae": vae}},
            f"{prefix}5": {"class_type": "SaveImage", "inputs": {"images": [f"{prefix}4", 0], "filename_prefix": tag}},
        }

    return {
        **loaders,
        "2": {"class_type": "DomainStudio_FewShotImageSet", "inputs": {"folder": "subject", "resolution": RES, "flip": False}},
        "3": {"class_type": "DomainStudio_Personalize", "inputs": {
            "model": model, "clip": clip, "vae": vae, "image_set": ["2", 0], "method": method, "class_noun": "dog",
            "new_token": f"ds_{family}_{method}", "init_word": "quaint", "num_vectors": 1,
            "dreambooth_identifier": "sks", "ti_steps": 3, "ti_learning_rate": 5e-2, "unet_steps": 3,
            "unet_learning_rate": 1e-3, "train_mode": "lora_attn", "lora_rank": 4, "lora_alpha": 4.0,
            "class_images": 2, "lambda_prior": 1.0, "batch_size": 1, "resolution": RES, "train_seed": seed,
            "precision": "fp32", "save_name": f"{family}_{method}"}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": RES, "height": RES, "batch_size": 1}},
        **branch("4", ["3", 0], ["3", 1], f"personal_{family}_{method}"),
        **branch("5", model, clip, f"base_{family}_{method}"),
    }


STEPS = {"rare_token": 6, "textual_inversion": 3, "dreambooth": 2 + 3, "dreambooth_no_prior": 3}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("method", list(STEPS))
def test_method_runs_end_to_end_into_stock_ksampler(server, family, method):
    _write_subject(server)
    prompt_id, msgs = server.run(_graph(family, method, seed=0), timeout=600)
    errors = [m for m in msgs if m["type"] == "execution_error"]
    assert not errors, errors[0]["data"].get("exception_message") + errors[0]["data"].get("traceback", [""])[-1]
    progress = [m["data"] for m in msgs if m["type"] == "progress" and m["data"].get("node") == "3"]
    assert [p["value"] for p in progress] == list(range(1, STEPS[method] + 1))

    out = server.outputs(prompt_id)
    personal = np.asarray(Image.open(server.output_file(out["45"]["images"][0]))).astype(int)
    base = np.asarray(Image.open(server.output_file(out["55"]["images"][0]))).astype(int)
    diff = np.abs(personal - base).mean()
    assert diff > 0.5, f"{method}: personalized and base samples are (nearly) identical: mean |diff| {diff:.3f}"

    emb = os.path.join(server.base, "models", "embeddings", f"ds_{family}_{method}.safetensors")
    loras = os.listdir(os.path.join(server.base, "models", "loras"))
    assert os.path.exists(emb) == (method in ("rare_token", "textual_inversion"))
    assert any(f.startswith(f"{family}_{method}_") for f in loras) == (method != "textual_inversion")
