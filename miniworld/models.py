"""Building (and initialising) the three parts from ComfyUI's own classes.

ComfyUI builds layers without initialisation (``comfy.ops.disable_weight_init``), so every part is
initialised here from a fixed seed: PyTorch's default Linear/Conv init, unit norms, and the usual
zero-init of residual output layers for the UNet (as in the original LDM code).
"""

from __future__ import annotations

import math
import zlib

import torch

from . import config
from .comfyenv import comfy


def _default_init(module: torch.nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d)):
            torch.nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
            if m.bias is not None:
                fan_in = m.weight[0].numel()
                torch.nn.init.uniform_(m.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        elif isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            if m.weight is not None:
                torch.nn.init.ones_(m.weight)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)


def new_unet(seed: int = config.SEED):
    """(comfy BaseModel, its diffusion_model) with the miniworld UNet layout, seeded init."""
    c = comfy()
    model = c.supported_models.SD15(dict(config.UNET_CONFIG)).get_model({})
    unet = model.diffusion_model
    torch.manual_seed(seed)
    _default_init(unet)
    with torch.no_grad():
        zero = [unet.out[-1]]
        for m in unet.modules():
            name = type(m).__name__
            if name == "ResBlock":
                zero.append(m.out_layers[-1])
            elif name == "SpatialTransformer":
                zero.append(m.proj_out)
        for m in zero:
            for p in m.parameters():
                p.zero_()
    return model, unet


def new_factored_unet(seed: int = config.SEED):
    """The UNet as it is trained: ``new_unet`` with its big layers replaced by low-rank factors
    (miniworld/factor.py, ranks config.UNET_RANKS; fresh seeded init, zero-init layers stay zero)."""
    from . import factor

    _, unet = new_unet(seed)
    factor.factorize(unet, config.UNET_RANKS, seed + 1)
    return unet


def load_factored_unet(path: str = config.UNET_FILE):
    """The shipped (or a work-dir) factor file in a factorised UNet, float32."""
    import safetensors.torch

    unet = new_factored_unet()
    unet.load_state_dict({k: v.float() for k, v in safetensors.torch.load_file(path).items()})
    return unet


def new_taesd(seed: int = config.SEED + 1):
    c = comfy()
    vae = c.taesd.taesd.TAESD(latent_channels=config.LATENT_CHANNELS)
    torch.manual_seed(seed)
    _default_init(vae)
    return vae


def new_clip(seed: int = config.CLIP_SEED):
    """The frozen random CLIP-L: ComfyUI's SD1ClipModel with weights drawn from per-tensor seeds.

    Nothing is trained and nothing ships: the weights are regenerated from ``seed`` at build time.
    Each tensor gets its own generator seeded from (seed, crc32(name)), so the result does not depend
    on parameter order. Token embeddings ~ N(0, 1) (token identity dominates the residual stream),
    position embeddings ~ N(0, 0.5), other matrices ~ N(0, 0.8/sqrt(fan_in)), norms 1, biases 0.
    Layers ``ACTIVE_CLIP_LAYERS`` and above are exact identities (attention ``out_proj`` and MLP
    ``fc2`` weights and biases are zero, so both residual branches add 0): the encoder is embeddings
    + one random pre-LN layer (near-uniform causal attention: each position mixes in its prefix) +
    the final LayerNorm, and a 1-layer ComfyUI CLIP with the same tensors gives the same output.
    """
    c = comfy()
    clip = c.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32)
    with torch.no_grad():
        for name, p in clip.named_parameters():
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            leaf = name.rsplit(".", 1)[-1]
            if "token_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif "position_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (0.8 / math.sqrt(p[0].numel())))
            elif leaf == "weight":
                p.fill_(1.0)
            else:
                p.zero_()
            if _silenced_layer(name):
                p.zero_()
        for name, b in clip.named_buffers():
            if b.is_floating_point() and not torch.isfinite(b).all():
                b.zero_()
    return clip


ACTIVE_CLIP_LAYERS = 1


def _silenced_layer(name: str) -> bool:
    parts = name.split(".")
    if "layers" not in parts:
        return False
    i = int(parts[parts.index("layers") + 1])
    return i >= ACTIVE_CLIP_LAYERS and (".self_attn.out_proj." in name or ".mlp.fc2." in name)


def clip_state_dict(seed: int = config.CLIP_SEED) -> dict:
    """ComfyUI-keyed (``clip_l.transformer...``) fp16 state dict of the frozen random CLIP-L."""
    return {k: (v.half() if v.is_floating_point() else v) for k, v in new_clip(seed).state_dict().items()}


def comfy_clip(num_layers: int = ACTIVE_CLIP_LAYERS, seed: int = config.CLIP_SEED):
    """A ComfyUI ``CLIP`` object (stock tokenizer, default text-encoder dtype) carrying the random CLIP-L
    with only its first ``num_layers`` layers built: with the default (the active layers) it encodes
    exactly like the full 12-layer model in the checkpoint, at 1/12 of the cost."""
    c = comfy()
    target = c.supported_models_base.ClipTarget(c.sd1_clip.SD1Tokenizer, c.sd1_clip.SD1ClipModel)
    clip = c.sd.CLIP(target, model_options={"clip_l_model_config": {"num_hidden_layers": num_layers}})
    sd = clip_state_dict(seed)
    keep = {k: v for k, v in sd.items()
            if ".layers." not in k or int(k.split(".layers.")[1].split(".")[0]) < num_layers}
    missing, unexpected = clip.cond_stage_model.load_state_dict(keep, strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise RuntimeError(f"random CLIP-L does not match ComfyUI's: missing {missing}, unexpected {unexpected}")
    return clip
