"""Subject personalization from 3-5 images, host-agnostic: the rare-token two-stage method
(Zeng, Suganuma, Okatani, arXiv 2407.05312) and its two baselines, Textual Inversion (Gal et al.)
and DreamBooth (Ruiz et al.).

  rare_token          stage 1: textual inversion of a new token whose vectors start from a rare
                      adjective's embedding, prompts "a photo of <token> <class>" (several
                      templates); stage 2: fine-tune the UNet on the instance prompt with the text
                      encoder and the learned vectors frozen, no prior preservation.
  textual_inversion   stage 1 only, prompts "a photo of <token>", vectors start from the class noun.
  dreambooth          UNet fine-tune on "a photo of sks <class>" plus the prior-preservation loss
                      on class images the source model made from "a photo of <class>".
  dreambooth_no_prior the same without the prior term.

Every stage is the same denoising objective: the host's native loss of the model on noised
training latents, conditioned on a prompt. The host is reached only through `PromptBackend`; what
is trained (token vectors, UNet delta) is whatever parameters the caller passes in.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from .domainstudio import TrainingError

METHODS = ("rare_token", "textual_inversion", "dreambooth", "dreambooth_no_prior")
DEFAULT_METHOD = "rare_token"

# A rare adjective that is one token in CLIP's vocabulary (BPE id 45976 of 49408: a late, rarely
# merged word), so it brings little prior meaning while reading as a modifier of the class noun.
DEFAULT_INIT_WORD = "quaint"
DEFAULT_TRIGGER = "ds_subject"
DREAMBOOTH_IDENTIFIER = "sks"  # the identifier of the diffusers DreamBooth recipe

# Stage-1 prompt templates; "{}" is the subject phrase ("<token> <class>" or "<token>").
TEMPLATES = (
    "a photo of {}",
    "a photo of the {}",
    "a close-up photo of {}",
    "a bright photo of the {}",
    "a cropped photo of the {}",
    "a good photo of {}",
    "a rendering of {}",
    "a photo of one {}",
)
INSTANCE_TEMPLATE = TEMPLATES[0]

_WORD = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")


def uses_token(method: str) -> bool:
    """True for the methods that learn new token vectors (and so return a CLIP that knows them)."""
    return method in ("rare_token", "textual_inversion")


def trains_unet(method: str) -> bool:
    return method != "textual_inversion"


@dataclass
class PersonalizeConfig:
    method: str = DEFAULT_METHOD
    class_noun: str = "dog"
    trigger: str = DEFAULT_TRIGGER  # new token (rare_token / textual_inversion) or identifier (dreambooth)
    init_word: str = DEFAULT_INIT_WORD  # rare_token: adjective the vectors start from
    num_vectors: int = 1
    ti_steps: int = 500
    ti_learning_rate: float = 5e-3
    unet_steps: int = 400
    unet_learning_rate: float = 1e-4
    batch_size: int = 1
    lambda_prior: float = 1.0  # dreambooth only
    max_grad_norm: float = 1.0
    seed: int = 0

    def validate(self, n_images: int) -> list[str]:
        """Raise TrainingError naming the bad setting and the fix; return warnings."""
        def bad(name, value, fix):
            raise TrainingError(f"{name}={value!r} is invalid: {fix}")

        if self.method not in METHODS:
            bad("method", self.method, f"choose one of {', '.join(METHODS)}")
        for name in ("ti_learning_rate", "unet_learning_rate"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                bad(name, v, "use a finite number > 0 (e.g. 5e-3 for token vectors, 1e-4 for LoRA, 5e-6 full)")
        for name in ("lambda_prior", "max_grad_norm"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                bad(name, v, "use a finite number >= 0")
        for name in ("ti_steps", "unet_steps", "batch_size", "num_vectors"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                bad(name, v, "use a whole number")
        if uses_token(self.method) and self.ti_steps < 1:
            bad("ti_steps", self.ti_steps, f"method {self.method} learns token vectors: use at least 1 step")
        if trains_unet(self.method) and self.unet_steps < 1:
            bad("unet_steps", self.unet_steps, f"method {self.method} fine-tunes the UNet: use at least 1 step")
        if self.batch_size < 1:
            bad("batch_size", self.batch_size, "use at least 1")
        if not 1 <= self.num_vectors <= 16:
            bad("num_vectors", self.num_vectors, "use 1 to 16 vectors per token (1-4 is typical)")
        if n_images < 1:
            raise TrainingError("no training images: connect 3-5 photos of the subject")
        if self.batch_size > n_images:
            bad("batch_size", self.batch_size, f"only {n_images} image(s); use at most {n_images}")
        trigger = self.trigger.strip()
        if not trigger:
            bad("trigger_word", self.trigger, f"give a word to call the subject by, e.g. {DEFAULT_TRIGGER!r}"
                f" (or {DREAMBOOTH_IDENTIFIER!r} for DreamBooth)")
        if uses_token(self.method) and not _WORD.match(trigger):
            bad("trigger_word", self.trigger, "use one word of letters, digits, '_' or '-', starting with a "
                "letter (it becomes the embedding's file name and the word you type in prompts)")
        if uses_token(self.method) and trigger.lower().startswith("embedding"):
            bad("trigger_word", self.trigger, "it must not start with 'embedding' (ComfyUI's prompt syntax)")
        if self.method == "dreambooth" and self.lambda_prior > 0 and not self.class_noun.strip():
            bad("class_noun", self.class_noun, "DreamBooth with prior preservation needs the class noun "
                "(e.g. 'dog') to make the class prompt 'a photo of dog'; or choose dreambooth_no_prior")
        if self.method == "rare_token" and not self.class_noun.strip():
            bad("class_noun", self.class_noun, "the rare-token method prompts '<token> <class>'; name the class, e.g. 'dog'")
        if self.method == "rare_token" and not _WORD.match(self.init_word.strip() or "-"):
            bad("init_word", self.init_word, f"give one word the vectors start from, e.g. {DEFAULT_INIT_WORD!r}")
        warnings = []
        if n_images == 1:
            warnings.append("only 1 training image: the subject will be learned from a single view and the "
                            "model will tend to copy that photo; 3-5 photos with varied backgrounds work better")
        return warnings

    def subject(self) -> str:
        """The words that name the subject in prompts."""
        t, c = self.trigger.strip(), self.class_noun.strip()
        if self.method == "textual_inversion" or not c:
            return t
        return f"{t} {c}"

    def stage1_prompts(self) -> list[str]:
        return [tpl.format(self.subject()) for tpl in TEMPLATES]

    def instance_prompt(self) -> str:
        return INSTANCE_TEMPLATE.format(self.subject())

    def class_prompt(self) -> str:
        return INSTANCE_TEMPLATE.format(self.class_noun.strip())


class PromptBackend(Protocol):
    """What a personalization stage needs from a host. Tensors are in the model's latent space."""

    def sample_sigmas(self, n: int, generator: torch.Generator) -> torch.Tensor: ...

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...

    def encode(self, prompt: str):
        """Conditioning for `prompt` (host-specific object). Must carry gradients to any trainable
        token vectors; the host may cache it when nothing it depends on is trained."""

    def predict_x0(self, xt: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor: ...

    def denoising_loss(self, x0_pred: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...


@dataclass
class StageResult:
    name: str
    history: dict[str, list[float]] = field(default_factory=dict)
    steps_done: int = 0
    seconds: float = 0.0

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.steps_done if self.steps_done else float("nan")


def denoising_stage_loss(backend: PromptBackend, x0: torch.Tensor, cond, generator: torch.Generator) -> torch.Tensor:
    """The host's native denoising loss on `x0` noised at random levels, conditioned on `cond`."""
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    sigma = backend.sample_sigmas(x0.shape[0], generator).to(x0.device)
    pred = backend.predict_x0(backend.add_noise(x0, noise, sigma), sigma, cond)
    return backend.denoising_loss(pred, x0, sigma)


def train_stage(
    backend: PromptBackend,
    x0: torch.Tensor,
    params: list[torch.Tensor],
    *,
    name: str,
    steps: int,
    learning_rate: float,
    prompts: list[str],
    batch_size: int = 1,
    seed: int = 0,
    prior_x0: torch.Tensor | None = None,
    prior_prompt: str = "",
    lambda_prior: float = 0.0,
    max_grad_norm: float = 1.0,
    on_step: Callable[[str, int, float], None] | None = None,
) -> StageResult:
    """Train `params` with AdamW for `steps` steps on the denoising loss of `x0` ([N, C, h, w]).

    Each step draws a batch of images and one prompt of `prompts` (stage 1 varies the template; a
    single prompt is the instance prompt). With `prior_x0` and lambda_prior > 0, adds
    lambda_prior * the same loss on a batch of class latents with `prior_prompt` (DreamBooth's prior
    preservation). on_step(name, step, loss) runs after every optimiser step (progress, Cancel)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise TrainingError(f"{name}: nothing to train")
    if not prompts:
        raise TrainingError(f"{name}: no prompts")
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    use_prior = prior_x0 is not None and prior_x0.shape[0] > 0 and lambda_prior > 0
    result = StageResult(name, history={"loss": [], "instance": [], "prior": []})
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randperm(x0.shape[0], generator=gen)[:batch_size]
        prompt = prompts[int(torch.randint(len(prompts), (1,), generator=gen))]
        opt.zero_grad(set_to_none=True)
        instance = denoising_stage_loss(backend, x0[idx], backend.encode(prompt), gen)
        total = instance
        prior = torch.zeros(())
        if use_prior:
            pidx = torch.randperm(prior_x0.shape[0], generator=gen)[:batch_size]
            prior = denoising_stage_loss(backend, prior_x0[pidx], backend.encode(prior_prompt), gen)
            total = total + lambda_prior * prior
        value = float(total.detach())
        if not math.isfinite(value):
            raise TrainingError(
                f"{name}: loss became {value} at step {step}; training stopped and no weights were kept. "
                f"Lower the learning rate (now {learning_rate:g}), e.g. by 10x.")
        total.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        result.history["loss"].append(value)
        result.history["instance"].append(float(instance.detach()))
        result.history["prior"].append(float(prior.detach()))
        result.steps_done = step
        if on_step is not None:
            on_step(name, step, value)
    result.seconds = time.perf_counter() - t0
    return result
