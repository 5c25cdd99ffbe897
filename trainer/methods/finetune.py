"""Plain fine-tuning: the baseline DomainStudio is compared against. The UNet (LoRA or full delta)
learns the training images with the model's own denoising loss and nothing else: no source-model
terms, no prior. Each image can carry its own caption ('{caption}' in the prompt)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SettingError
from ..settings import setting
from .base import Method, Prompts, Stage, require_prompt_captions
from .denoising import DenoisingObjective


@dataclass
class FinetuneConfig:
    target_prompt: str = setting("", "Prompt of the training images, e.g. 'a sks house'. Empty = unconditional. "
                                 "'{caption}' inserts each image's caption.")
    steps: int = setting(200, "Training steps.", min=1, max=100000)
    learning_rate: float = setting(3e-4, "3e-4 suits LoRA (rank 8, alpha 8) for ~200 steps: keep learning rate x "
                                   "steps near 0.06 (README, Defaults); full fine-tuning wants ~5e-6.",
                                   min=1e-8, max=1.0, step=1e-6, flag="--lr")
    batch_size: int = setting(4, "Images per step.", min=1, max=64)


class Finetune(Method):
    name = "finetune"
    title = "Plain fine-tuning"
    node = "domain"
    config = FinetuneConfig
    min_images = 1
    # as DomainStudio's (the same node shows one default; README, Defaults): on the cleaner half plain
    # fine-tuning moved as far as on the whole schedule, with a little less diversity
    option_defaults = {"train_mode": "lora_all", "max_timestep": 500}

    def validate(self, cfg: FinetuneConfig, n_images: int) -> list[str]:
        super().validate(cfg, n_images)
        if cfg.batch_size > n_images:
            raise SettingError("batch_size", cfg.batch_size, f"it is larger than the image set ({n_images} images); "
                               f"use at most {n_images} or add images")
        return []

    def prompts(self, cfg: FinetuneConfig, captions) -> Prompts:
        return Prompts(target=require_prompt_captions(cfg.target_prompt, captions, "target_prompt"), source=[],
                       usage=cfg.target_prompt.replace("{caption}", "").strip())

    def trigger(self, cfg: FinetuneConfig) -> str:
        return cfg.target_prompt

    def stages(self, cfg: FinetuneConfig) -> list[Stage]:
        return [Stage("train", "unet", cfg.steps, cfg.learning_rate, 0,
                      lambda inputs: DenoisingObjective(inputs, inputs.prompts.target, cfg.batch_size, per_image=True))]
