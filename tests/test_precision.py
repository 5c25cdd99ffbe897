"""Precision and weights (issue: real-size memory): LoRA trains on base weights kept in the host's
low precision (bf16 compute; fp8 weights where ComfyUI loads them so), with the trainable
parameters in fp32, and no full-precision copy of the UNet is made."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [pytest.mark.comfy]


def _images(n=4, size=64):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, size, size, 3, generator=g)


def _dtypes(module: torch.nn.Module) -> dict:
    out: dict = {}
    for p in module.parameters():
        out[p.dtype] = out.get(p.dtype, 0) + p.numel()
    return out


def test_fp8_weights_train_with_bf16_compute_and_fp32_lora(comfy, tiny_models):
    """UNETLoader with weight_dtype fp8_e4m3fn keeps the UNet's weights in fp8; training casts them
    per layer (ComfyUI's own cast path), the LoRA is fp32, and the weights stay fp8 afterwards."""
    import comfyui_domainstudio.testing.tiny_models as tm
    from comfyui_domainstudio.trainer import run as core
    from comfyui_domainstudio.trainer.hosts.comfy import ComfyHost

    (model,) = comfy.nodes.UNETLoader().load_unet(os.path.basename(tiny_models["sdxl_unet"]), "fp8_e4m3fn")
    dm = model.model.diffusion_model
    before = _dtypes(dm)
    assert before.get(torch.float8_e4m3fn, 0) > 0.9 * sum(before.values()), before
    _, _, vae = comfy.nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(tiny_models["sd15"]))[:3]
    host = ComfyHost(model, tm.tiny_sdxl_clip(), vae)
    cfg = core.resolve_config("finetune", dict(steps=2, batch_size=2, learning_rate=1e-3))
    with torch.inference_mode():
        out = core.run(host, "finetune", cfg, _images(2), core.RunOptions(precision="bf16", preview_every=0))
    assert out.plan.dtype == torch.bfloat16
    assert {p.dtype for p in out.adapter.parameters()} == {torch.float32}
    assert all(torch.isfinite(v).all() for v in out.delta.values())
    assert any(v.abs().max() > 0 for k, v in out.delta.items() if k.endswith("lora_down.weight"))
    assert _dtypes(dm) == before  # no full-precision copy replaced the fp8 weights


def test_bf16_compute_keeps_weights_and_trains_fp32_parameters(comfy, sd15):
    from comfyui_domainstudio.trainer import run as core
    from comfyui_domainstudio.trainer.hosts.comfy import ComfyHost

    model, clip, vae = sd15
    before = _dtypes(model.model.diffusion_model)
    host = ComfyHost(model, clip, vae)
    cfg = core.resolve_config("domainstudio", dict(steps=2, batch_size=3))
    with torch.inference_mode():
        out = core.run(host, "domainstudio", cfg, _images(3), core.RunOptions(precision="bf16", preview_every=0))
    assert out.plan.dtype == torch.bfloat16
    assert {p.dtype for p in out.adapter.parameters()} == {torch.float32}
    assert all(torch.isfinite(v).all() for v in out.delta.values())
    assert _dtypes(model.model.diffusion_model) == before


def _bf16_losses(comfy, sd15, lr):
    from comfyui_domainstudio.trainer import run as core
    from comfyui_domainstudio.trainer.hosts.comfy import ComfyHost

    model, clip, vae = sd15
    cfg = core.resolve_config("finetune", dict(steps=4, batch_size=2, learning_rate=lr, target_prompt="a house"))
    with torch.inference_mode():
        out = core.run(ComfyHost(model, clip, vae), "finetune", cfg, _images(2),
                       core.RunOptions(precision="bf16", preview_every=0, train_mode="lora_attn"))
    return out.stages[-1].history["instance"]


def test_bf16_training_sees_its_own_small_updates(comfy, sd15, monkeypatch):
    """Merged into a bf16 weight, a delta below half a bf16 unit of each weight vanishes from the
    forward pass while its gradient still flows (the run trains blind). The ComfyUI host adds the
    delta as its own branch in low-precision sessions, so the second step's loss already differs
    from an untrained run's on the same noise; with the merge it does not."""
    import comfyui_domainstudio.trainer.hosts.comfy as chost

    still = _bf16_losses(comfy, sd15, 1e-8)
    moving = _bf16_losses(comfy, sd15, 1e-4)
    assert moving[0] == still[0]  # step 1 runs before any update
    assert all(m != s for m, s in zip(moving[1:], still[1:])), (moving, still)
    monkeypatch.setattr(chost, "bypass", lambda *a, **k: __import__("contextlib").nullcontext())
    merged = _bf16_losses(comfy, sd15, 1e-4)
    assert merged[1:] == still[1:], "with the delta merged into bf16 weights, small updates should be invisible"
