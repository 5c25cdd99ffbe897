"""What a method is: its settings, its checks, the prompts it needs and the stages it trains.

A method never touches a host or a file: `trainer/run.py` builds the inputs (latents, prompt
conditionings, class images), runs each `Stage` through the one loop (trainer/loop.py) and writes
the files the stages produce (trainer/files.py: a token stage gives an embedding, a UNet stage a
delta). Adding a method = its module, its test, and one line in trainer/methods/__init__.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from .. import settings
from ..errors import SettingError, TrainingError
from ..loop import Objective, Rng

# Which node offers a method: "domain" (DomainStudio Train) or "subject" (Personalize).
NODES = ("domain", "subject")
# Timesteps lo <= t < hi of the 1000-step training schedule a run trains on (RunOptions'
# min_timestep / max_timestep); the whole schedule unless the user narrows it.
FULL_SCHEDULE = (0, 1000)


@dataclass
class Prompts:
    """The prompts of a run. Per-image lists are aligned with the training images."""

    target: list[str]  # the adapted model's prompt for each training image
    source: list[str]  # the frozen source model's prompt for each image (DomainStudio)
    class_prompt: str = ""  # prompt of the prior-preservation class images
    templates: list[str] = field(default_factory=list)  # token stage: drawn one per step
    usage: str = ""  # what the user types afterwards, e.g. "a photo of ds_subject dog"


@dataclass
class StageInputs:
    """Everything a stage's objective reads, prepared by the run (encoded once)."""

    host: Any
    x0: torch.Tensor  # [N, C, h, w] model-space training latents
    features: torch.Tensor | None  # pixel-space targets ([-1, 1]) when the method decodes
    prior_x0: torch.Tensor | None  # class-image latents, or None
    encode: Callable[[str], Any]  # prompt -> conditioning (cached, or live through a trainable token)
    prompts: Prompts
    timesteps: tuple[int, int] = FULL_SCHEDULE  # (lo, hi): the noise levels training draws


@dataclass
class Stage:
    """One optimisation stage: what it trains, for how long, and its objective."""

    name: str  # "train", "token" or "unet" (progress, history and file names)
    trains: str  # "unet" (an Adapter) or "token" (new word vectors)
    steps: int
    learning_rate: float
    seed_offset: int  # added to the run's seed (stages of one run draw different streams)
    objective: Callable[[StageInputs], Objective]
    decode: bool = False  # needs a differentiable VAE decode (pixel features)
    prompts: tuple[str, ...] = ()  # prompts encoded once for this stage (the rest are live)
    lr_setting: str = "learning_rate"  # the setting that holds learning_rate (named in warnings)
    steps_setting: str = "steps"  # the setting that holds steps (named in warnings)


class Method:
    """Base class. Subclasses set the class attributes and implement prompts() and stages()."""

    name: ClassVar[str]
    title: ClassVar[str]  # shown in logs and metadata
    node: ClassVar[str]  # "domain" or "subject"
    config: ClassVar[type]  # the settings dataclass
    min_images: ClassVar[int] = 1
    uses_token: ClassVar[bool] = False
    trains_unet: ClassVar[bool] = True
    # RunOptions values this method starts from instead of RunOptions' own (trainer/run.py
    # default_options); the methods one node offers must agree (the node shows one default).
    option_defaults: ClassVar[dict] = {}

    def validate(self, cfg, n_images: int) -> list[str]:
        """Check the settings against the image count; raise SettingError/TrainingError naming the
        setting and the fix; return warnings."""
        settings.check(cfg)
        if n_images < self.min_images:
            raise TrainingError(f"{self.title} needs at least {self.min_images} training image(s), got "
                                f"{n_images}; add images")
        return []

    def prompts(self, cfg, captions: list[str | None]) -> Prompts:
        raise NotImplementedError

    def class_images(self, cfg) -> int:
        """How many prior-preservation class images the source model must generate (0 = none)."""
        return 0

    def stages(self, cfg) -> list[Stage]:
        raise NotImplementedError

    def trigger(self, cfg) -> str:
        """The word files and metadata name as the trigger (a new token, an identifier, or '')."""
        return ""

    def init_word(self, cfg) -> str:
        """The word a new token's vectors start from (token methods)."""
        return ""

    def num_vectors(self, cfg) -> int:
        return 1


def batch_indices(n: int, batch_size: int, rng: Rng) -> torch.Tensor:
    """A random batch of distinct indices (the same draw for every method, so runs are comparable)."""
    return torch.randperm(n, generator=rng.cpu)[:batch_size]


def noise_levels(host, n: int, rng: Rng, timesteps: tuple[int, int] = FULL_SCHEDULE) -> torch.Tensor:
    """n noise levels uniform in timestep over lo <= t < hi (continuous t in [lo, hi - 1], mapped
    through the host's schedule). The whole schedule is the host's own draw, unchanged."""
    lo, hi = timesteps
    if (lo, hi) == FULL_SCHEDULE:
        return host.sample_sigmas(n, rng.device)
    u = torch.rand(n, generator=rng.device, device=rng.device.device)
    return host.sigma_at((lo + (hi - 1 - lo) * u.double()).float())


def noised(host, x0: torch.Tensor, rng: Rng, timesteps: tuple[int, int] = FULL_SCHEDULE
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, sigma): fresh noise and noise levels (uniform in timestep over `timesteps`) on the
    training device."""
    noise = torch.randn(x0.shape, generator=rng.device, device=rng.device.device).to(x0)
    sigma = noise_levels(host, x0.shape[0], rng, timesteps).to(x0.device)
    return host.add_noise(x0, noise, sigma), sigma


def require_prompt_captions(prompt: str, captions: list[str | None], name: str) -> list[str]:
    """Per-image prompts from a template: '{caption}' is replaced by each image's caption (all
    images need one then); a prompt without it is used for every image."""
    if "{caption}" not in prompt:
        return [prompt] * len(captions)
    missing = [i for i, c in enumerate(captions) if not c or not c.strip()]
    if missing:
        raise SettingError(name, prompt, f"it uses {{caption}} but {len(missing)} of {len(captions)} images have no "
                           "caption (a .txt file beside the image, or the image set's captions input); add "
                           "them or remove {caption}")
    return [prompt.replace("{caption}", c.strip()) for c in captions]
