"""Tiny, randomly initialised checkpoints that a real ComfyUI detects as SD1.5 / SDXL.

Built at test time from ComfyUI's own classes and never committed. What detection needs
(comfy/model_detection.py + supported_models.py, ComfyUI 0.3.75):

* SD1.5: ``model_channels`` 320, ``context_dim`` 768, ``use_linear_in_transformer`` False,
  ``adm_in_channels`` None, no temporal attention. Depth is free, so one level with one res-block
  and one transformer block is enough. The checkpoint-loader path always builds CLIP-L at full
  size (12 layers, 123 M params), so the file is ~275 MB in fp16. A TAESD-keyed VAE
  (``first_stage_model.taesd_*``) loads as TAESD (2.4 M params).
* SDXL family: ``model_channels`` 320, ``use_linear_in_transformer`` True, ``context_dim`` 2048,
  ``adm_in_channels`` 2816 and a ``transformer_depth`` list that equals one of the SDXL classes
  exactly. The smallest is KOALA-700M's ``[0, 2, 5]`` (three levels, one res-block each), which
  ComfyUI loads as ``model_base.SDXL`` (SDXL conditioning: pooled CLIP-G + size embeddings).
  A full SDXL checkpoint would carry CLIP-G (694 M params), so the SDXL test model is a UNet-only
  file (stock UNETLoader) plus a CLIP built in-process with 3-layer CLIP-L/CLIP-G.

Weights are drawn with a fixed seed and scaled by 1/sqrt(fan_in) so activations stay O(1): ComfyUI
builds layers without initialisation (torch.empty), which can hold NaNs.

The checkpoint's state dict comes from the pack's host-compatibility layer
(``comfyui_domainstudio.trainer.hosts.comfy_compat.checkpoint_state_dict``): ``BaseModel.state_dict_for_saving`` changed
its parameters between ComfyUI releases, and the old positional call writes a file that newer hosts
cannot detect. Every builder loads its file back through ComfyUI's own loader before it lands and
raises when ComfyUI does not see the intended model type.
"""

from __future__ import annotations

import math
import os

import torch

TINY_VERSION = "2"  # bump when the recipes below change (invalidates the cache)


def _init_(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (0.8 / math.sqrt(fan_in)))
            elif leaf in ("weight", "vae_scale") and p.ndim <= 1:
                p.fill_(1.0)  # norms and TAESD's scale
            else:
                p.zero_()
        for name, b in module.named_buffers():
            if b.is_floating_point() and not torch.isfinite(b).all():
                b.zero_()


def sd15_unet_config() -> dict:
    return {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
        "num_res_blocks": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
        "channel_mult": [1], "transformer_depth_middle": 0, "use_linear_in_transformer": False,
        "context_dim": 768, "num_head_channels": 64, "num_heads": -1,
        "use_temporal_resblock": False, "use_temporal_attention": False,
    }


def sdxl_unet_config() -> dict:
    return {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": 2816, "num_classes": "sequential", "in_channels": 4, "out_channels": 4,
        "model_channels": 320,
        "num_res_blocks": [1, 1, 1], "transformer_depth": [0, 2, 5],
        "transformer_depth_output": [0, 0, 0, 0, 1, 1], "channel_mult": [1, 1, 1],
        "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 2048,
        "num_head_channels": 64, "num_heads": -1,
        "use_temporal_resblock": False, "use_temporal_attention": False,
    }


def _comfy_compat():
    """The pack's host-compatibility layer (imported when needed: it imports ComfyUI)."""
    from ..trainer.hosts import comfy_compat

    return comfy_compat


def _host_version() -> str:
    try:
        import comfyui_version

        return comfyui_version.__version__
    except ImportError:
        return "(unknown version)"


def _taesd(seed: int):
    import comfy.taesd.taesd

    vae = comfy.taesd.taesd.TAESD(latent_channels=4)
    _init_(vae, seed)
    return vae


def build_sd15_checkpoint(path: str, seed: int = 0) -> str:
    """Write a tiny SD1.5-detectable checkpoint (UNet + CLIP-L + TAESD) to ``path``."""
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.utils

    cfg = comfy.supported_models.SD15(sd15_unet_config())
    model = cfg.get_model({})
    _init_(model.diffusion_model, seed)
    clip = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32)
    _init_(clip, seed + 1)
    vae = _taesd(seed + 2)
    sd = _comfy_compat().checkpoint_state_dict(model, clip.state_dict(), vae.state_dict())
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    _atomic_save(sd, path, check=_check_sd15_checkpoint)
    return path


def _check_sd15_checkpoint(path: str) -> None:
    """Raise unless ComfyUI's checkpoint loader reads ``path`` as SD1.5 with a CLIP and a TAESD VAE."""
    import comfy.sd
    import comfy.supported_models
    import comfy.taesd.taesd

    what = f"tiny SD1.5 checkpoint written for ComfyUI {_host_version()}"
    try:
        out = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)
    except Exception as e:  # detection failure, missing keys...: say which builder wrote a bad file
        raise RuntimeError(f"{what} does not load through comfy.sd.load_checkpoint_guess_config: {str(e).strip()} "
                           "Its keys are wrong for this host: check trainer/hosts/comfy_compat.py "
                           "checkpoint_state_dict against comfy.model_base.BaseModel.state_dict_for_saving.") from e
    model, clip, vae = out[:3]
    got = type(model.model.model_config) if model is not None else None
    if got is not comfy.supported_models.SD15:
        raise RuntimeError(f"{what} loads as {getattr(got, '__name__', got)}, not supported_models.SD15: its "
                           "UNet keys are wrong for this host (see trainer/hosts/comfy_compat.py checkpoint_state_dict).")
    if clip is None or vae is None or not isinstance(vae.first_stage_model, comfy.taesd.taesd.TAESD):
        raise RuntimeError(f"{what} loads without its CLIP-L or TAESD VAE (clip={type(clip).__name__}, vae="
                           f"{type(getattr(vae, 'first_stage_model', None)).__name__}): its CLIP/VAE keys are wrong "
                           "for this host (see trainer/hosts/comfy_compat.py checkpoint_state_dict).")


def build_sdxl_unet(path: str, seed: int = 0) -> str:
    """Write a tiny SDXL-family (KOALA-700M layout) UNet-only file for the stock UNETLoader."""
    import comfy.supported_models

    cfg = comfy.supported_models.KOALA_700M(sdxl_unet_config())
    model = cfg.get_model({})
    _init_(model.diffusion_model, seed)
    sd = model.diffusion_model.state_dict()
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    _atomic_save(sd, path, check=_check_sdxl_unet)
    return path


def _check_sdxl_unet(path: str) -> None:
    """Raise unless ComfyUI's UNet loader reads ``path`` as the SDXL-family KOALA-700M layout."""
    import comfy.model_base
    import comfy.sd
    import comfy.supported_models

    what = f"tiny SDXL-family UNet written for ComfyUI {_host_version()}"
    try:
        model = comfy.sd.load_diffusion_model(path)
    except Exception as e:
        raise RuntimeError(f"{what} does not load through comfy.sd.load_diffusion_model: {e}") from e
    got = type(model.model.model_config) if model is not None else None
    if got is not comfy.supported_models.KOALA_700M or not isinstance(model.model, comfy.model_base.SDXL):
        raise RuntimeError(f"{what} loads as {getattr(got, '__name__', got)} "
                           f"({type(getattr(model, 'model', None)).__name__}), not supported_models.KOALA_700M "
                           "(model_base.SDXL): this host's SDXL detection changed; see sdxl_unet_config().")


def build_taesd_vae(path: str, seed: int = 2) -> str:
    _atomic_save({k: v.half() for k, v in _taesd(seed).state_dict().items()}, path, check=_check_taesd)
    return path


def _check_taesd(path: str) -> None:
    import comfy.sd
    import comfy.taesd.taesd
    import comfy.utils

    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(path))
    if not isinstance(vae.first_stage_model, comfy.taesd.taesd.TAESD):
        raise RuntimeError(f"tiny VAE written for ComfyUI {_host_version()} loads as "
                           f"{type(vae.first_stage_model).__name__}, not TAESD")


def tiny_sdxl_clip(seed: int = 3):
    """A ComfyUI CLIP object for SDXL with 3-layer CLIP-L and CLIP-G (SDXL reads the penultimate layer, so 3 is the least) (random, seeded)."""
    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models_base

    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    model_options = {"clip_l_model_config": {"num_hidden_layers": 3}, "clip_g_model_config": {"num_hidden_layers": 3}}
    clip = comfy.sd.CLIP(target, model_options=model_options)
    _init_(clip.cond_stage_model, seed)
    return clip


def _atomic_save(sd: dict, path: str, check=None) -> None:
    """Write ``sd`` to ``path`` through a temporary file; ``check(tmp)`` must pass before it lands, so a
    file the host cannot load never reaches the cache."""
    import safetensors.torch

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # Per process (two test runs building the cache at once must not share it); the extension stays
    # last because ComfyUI's loaders pick the file format by it.
    root, ext = os.path.splitext(path)
    tmp = f"{root}.{os.getpid()}.tmp{ext}"
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, tmp)
    try:
        if check is not None:
            check(tmp)
    except BaseException:
        os.remove(tmp)
        raise
    os.replace(tmp, path)
