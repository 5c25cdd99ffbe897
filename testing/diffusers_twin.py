"""A diffusers twin of the tiny SD1.5 test checkpoint (testing/tiny_models.py), built offline from
the same file: UNet2DConditionModel with the tiny layout, transformers CLIPTextModel (CLIP-L config of
ComfyUI's sd1_clip_config.json), the CLIP tokenizer files that ship in the ComfyUI tree, a small
random AutoencoderKL (unused by the checks), assembled into a StableDiffusionPipeline so that the
stock diffusers loaders (`load_lora_weights`, `load_textual_inversion`) are what reads our files.

The tiny UNet's middle block has a SpatialTransformer of depth 0 (norm + proj_in + proj_out, no
transformer block); diffusers always builds >= 1 block there, so the twin empties that list.
Weights are mapped with ComfyUI's own diffusers<->ldm key map (comfy.utils.unet_to_diffusers).
"""

from __future__ import annotations

import json
import os

import torch


def sd15_unet_config_diffusers() -> dict:
    return dict(
        sample_size=32, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",), block_out_channels=(320,), layers_per_block=1,
        cross_attention_dim=768, attention_head_dim=8,  # diffusers' legacy name for 8 heads, as ComfyUI's SD15 (num_heads 8)
        norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0, use_linear_projection=False,
        transformer_layers_per_block=1,
    )


def build_sd15_twin(checkpoint: str, comfyui_dir: str, unet_config_ldm: dict):
    """StableDiffusionPipeline (CPU, fp32) with the UNet and CLIP weights of `checkpoint`."""
    from comfy import utils as comfy_utils
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sd = load_file(checkpoint)
    unet = UNet2DConditionModel(**sd15_unet_config_diffusers())
    unet.mid_block.attentions[0].transformer_blocks = torch.nn.ModuleList()  # depth-0 middle transformer
    key_map = comfy_utils.unet_to_diffusers(unet_config_ldm)  # diffusers key -> ldm key
    wanted = unet.state_dict()
    new = {}
    for dk in wanted:
        lk = key_map.get(dk)
        if lk is None:
            raise KeyError(f"no ldm key for diffusers key {dk}")
        new[dk] = sd["model.diffusion_model." + lk].float()
    unet.load_state_dict(new, strict=True)

    with open(os.path.join(comfyui_dir, "comfy", "sd1_clip_config.json")) as f:
        cfg = json.load(f)
    text_encoder = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")}))
    prefix = "cond_stage_model.transformer."
    te_sd = {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}
    if not any(k.startswith("text_model.") for k in text_encoder.state_dict()):  # transformers >= 5 layout
        te_sd = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in te_sd.items()}
    missing, unexpected = text_encoder.load_state_dict(te_sd, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or [k for k in unexpected if "position_ids" not in k and "text_projection" not in k]:
        raise KeyError(f"CLIP twin: missing {missing[:3]}, unexpected {unexpected[:3]}")
    # ComfyUI ships model_max_length 8192 (it chunks prompts itself); SD pipelines use 77.
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(comfyui_dir, "comfy", "sd1_tokenizer"), model_max_length=77)

    vae = AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=32)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(torch.float32)
    return pipe
