"""ComfyUI adapter for subject personalization (trainer/personalize.py): the rare-token method,
Textual Inversion and DreamBooth on the MODEL/CLIP loaded in the graph.

The UNet is called through the host's own BaseModel.apply_model (its parameterisation, its model
wrappers), with the cross-attention context and, for SDXL, the pooled-text `y` vector computed by
the host's own encode_adm, so gradients can reach the token vectors through both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

import comfy.model_management
import comfy.sd

from ..domainstudio import TrainingError
from ..personalize import PersonalizeConfig, StageResult, train_stage, trains_unet, uses_token
from . import comfy_clip
from .comfy import (SAVE_DTYPE, AttachedDelta, ComfyBackend, attach_trainable, encode_images, encode_prompt,
                    make_autograd_safe, run_in_sampler)

log = logging.getLogger("DomainStudio")


class ComfyPromptBackend(ComfyBackend):
    """trainer.personalize.PromptBackend over a model ComfyUI has loaded for sampling."""

    def __init__(self, model_wrap, extra_args: dict, clip, cached: dict | None = None):
        self.inner = model_wrap.inner_model
        self.ms = self.inner.model_sampling
        self.clip = clip
        self.cached = cached  # prompt -> (context, pooled); None = encode every call (trainable tokens)
        self.transformer_options = extra_args.get("model_options", {}).get("transformer_options", {})

    def encode(self, prompt: str):
        if self.cached is not None and prompt in self.cached:
            return self.cached[prompt]
        cond = comfy_clip.encode(self.clip, prompt)
        if self.cached is not None:
            cond = tuple(None if t is None else t.detach() for t in cond)
            self.cached[prompt] = cond
        return cond

    def predict_x0(self, xt, sigma, cond):
        context, pooled = cond
        b = xt.shape[0]
        extra = {}
        if pooled is not None:
            h, w = xt.shape[-2] * 8, xt.shape[-1] * 8
            adm = self.inner.encode_adm(pooled_output=pooled.to(xt.device), width=w, height=h,
                                        target_width=w, target_height=h)
            if adm is not None:  # SDXL: pooled text + size embeddings
                extra["y"] = adm.to(xt.device).expand(b, -1)
        context = context.to(xt.device).expand(b, -1, -1)
        return self.inner.apply_model(xt, sigma, c_crossattn=context,
                                      transformer_options=self.transformer_options, **extra).float()


@dataclass
class PersonalizeOutput:
    model: object  # patched clone (or the input MODEL for textual inversion)
    clip: object  # clone that knows the token (or the input CLIP for DreamBooth)
    delta: dict[str, torch.Tensor] | None  # UNet delta in SAVE_DTYPE, kohya keys
    vectors: dict[str, torch.Tensor] | None  # {'clip_l': [n, 768], ('clip_g': [n, 1280])}, fp32
    stages: list[StageResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    attached: AttachedDelta | None = None


def check_trigger(clip, cfg: PersonalizeConfig) -> None:
    """A new token must not shadow a word CLIP already knows (the patched CLIP would change what
    that word means in every prompt)."""
    if not uses_token(cfg.method):
        return
    trigger = cfg.trigger.strip()
    for key, tok in comfy_clip.subtokenizers(clip.tokenizer).items():
        if comfy_clip.word_in_vocabulary(tok, trigger):
            raise TrainingError(
                f"new_token={trigger!r} is already a word of CLIP's vocabulary ({key}); prompts using it "
                "would lose its usual meaning. Choose a made-up word such as 'ds_subject' or 'zwx_dog'.")


def init_word_for(cfg: PersonalizeConfig) -> str:
    """rare_token starts from the rare adjective; Textual Inversion from the class noun (Gal et
    al. start from a coarse descriptor of the concept), falling back to the adjective."""
    if cfg.method == "textual_inversion" and cfg.class_noun.strip():
        return cfg.class_noun.strip()
    return cfg.init_word.strip()


def train_personalization_comfy(
    model, clip, vae, images: torch.Tensor, cfg: PersonalizeConfig, *, train_mode: str = "lora_attn",
    rank: int = 8, alpha: float = 8.0, prior_latents: torch.Tensor | None = None, precision: str = "fp32",
    on_step: Callable[[str, int, float], None] | None = None,
) -> PersonalizeOutput:
    """Run `cfg.method` on ComfyUI's MODEL/CLIP. `images` IMAGE [N, R, R, 3]. Inputs are never
    modified: the UNet is trained through weight wrappers on a clone, the token vectors are separate
    tensors spliced into the prompt."""
    warnings = cfg.validate(int(images.shape[0]))
    check_trigger(clip, cfg)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(precision)
    if dtype is None:
        raise TrainingError(f"precision={precision!r} unknown; use 'fp32' or 'bf16'")
    autocast = dict(dtype=dtype, enabled=dtype != torch.float32)
    out = PersonalizeOutput(model=model, clip=clip, delta=None, vectors=None, warnings=warnings)

    with torch.inference_mode(False), torch.enable_grad():
        images = images.detach().clone().float()  # graph inputs are inference tensors
        with torch.no_grad():
            raw = encode_images(vae, images).clone()
            empty = encode_prompt(clip, "")

        if uses_token(cfg.method):
            params = {k: torch.nn.Parameter(v) for k, v in
                      comfy_clip.init_vectors(clip, init_word_for(cfg), cfg.num_vectors).items()}
            train_clip = comfy_clip.clip_with_token(clip, cfg.trigger.strip(), params)
            work = model.clone()
            if dtype != torch.float32:
                work.set_model_compute_dtype(dtype)
            work.model.requires_grad_(False)
            comfy.model_management.load_models_gpu([work, train_clip.patcher], force_full_load=True)

            def run_tokens(model_wrap, extra_args, latent_in):
                make_autograd_safe(model_wrap.inner_model.diffusion_model)
                with comfy_clip.differentiable_text_encoder(train_clip):
                    backend = ComfyPromptBackend(model_wrap, extra_args, train_clip, cached=None)
                    with torch.autocast(latent_in.device.type, **autocast):
                        return train_stage(backend, latent_in.float().clone(), list(params.values()), name="token",
                                           steps=cfg.ti_steps, learning_rate=cfg.ti_learning_rate,
                                           prompts=cfg.stage1_prompts(), batch_size=cfg.batch_size, seed=cfg.seed,
                                           max_grad_norm=cfg.max_grad_norm, on_step=on_step)

            out.stages.append(run_in_sampler(work, {"target": empty}, raw, run_tokens, seed=cfg.seed))
            # Only the new token's vectors may have learned: nothing of the text encoder got a gradient.
            touched = [n for n, p in clip.cond_stage_model.named_parameters() if p.grad is not None]
            if touched:
                raise TrainingError(f"internal error: stage 1 reached text-encoder weights {touched[:3]}")
            out.vectors = {k: p.detach().clone() for k, p in params.items()}
            out.clip = comfy_clip.clip_with_token(clip, cfg.trigger.strip(), out.vectors)

        if trains_unet(cfg.method):
            with torch.no_grad():  # text encoder and token frozen: encode once, reuse every step
                cached = {cfg.instance_prompt(): comfy_clip.encode(out.clip, cfg.instance_prompt())}
                use_prior = cfg.method == "dreambooth" and prior_latents is not None and cfg.lambda_prior > 0
                if use_prior:
                    cached[cfg.class_prompt()] = comfy_clip.encode(clip, cfg.class_prompt())
            cached = {k: tuple(None if t is None else t.detach().clone() for t in v) for k, v in cached.items()}
            work = model.clone()
            if dtype != torch.float32:
                work.set_model_compute_dtype(dtype)
            attached = attach_trainable(work, train_mode, rank, alpha, cfg.seed)
            work.model.requires_grad_(False)
            n = raw.shape[0]
            all_raw = torch.cat([raw, prior_latents.to(raw)]) if use_prior else raw
            # Room for activations and optimiser state: free other models and load this one fully.
            comfy.model_management.load_models_gpu([work], memory_required=1e20, force_full_load=True)

            def run_unet(model_wrap, extra_args, latent_in):
                make_autograd_safe(model_wrap.inner_model.diffusion_model)
                backend = ComfyPromptBackend(model_wrap, extra_args, out.clip, cached=cached)
                x0 = latent_in[:n].float().clone()
                prior = latent_in[n:].float().clone() if use_prior else None
                with torch.autocast(x0.device.type, **autocast):
                    return train_stage(backend, x0, attached.parameters(), name="unet", steps=cfg.unet_steps,
                                       learning_rate=cfg.unet_learning_rate, prompts=[cfg.instance_prompt()],
                                       batch_size=cfg.batch_size, seed=cfg.seed + 1, prior_x0=prior,
                                       prior_prompt=cfg.class_prompt(), lambda_prior=cfg.lambda_prior if use_prior else 0.0,
                                       max_grad_norm=cfg.max_grad_norm, on_step=on_step)

            out.stages.append(run_in_sampler(work, {"target": empty}, all_raw, run_unet, seed=cfg.seed))
            out.delta = {k: v.detach().to(SAVE_DTYPE).clone() for k, v in attached.state_dict().items()}
            for m in attached.modules.values():
                m.requires_grad_(False)
            out.attached = attached

    if out.delta is not None:
        out.model, _ = comfy.sd.load_lora_for_models(model, None, out.delta, 1.0, 0.0)
    return out
