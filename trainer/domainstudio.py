"""DomainStudio training loop (Zhu et al., arXiv 2306.14153), host-agnostic.

The host (ComfyUI, diffusers, a toy model in tests) is reached only through the small `Backend`
protocol below, so the same objective and loop run under every host.

Objective per step, on a batch of B training latents x0 noised to x_t at noise level sigma:

    L = L_simple + lambda_prior * L_prior
        + lambda_img * L_img + lambda_hf * L_hf + lambda_hfmse * L_hfmse

* L_simple: the host's own denoising loss of the adapted model with the target prompt.
* L_prior: the same loss on class images made by the source model, with the source prompt
  (text-conditional mode, optional).
* L_img / L_hf: relative-distance KL between the *frozen source* and the adapted model's x0
  predictions for the *same* x_t (source with the source prompt, adapted with the target prompt),
  on the features and on their Haar high-frequency bands (trainer.losses).
* L_hfmse: high-frequency MSE between the adapted prediction and the very training image noised.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

import torch

from . import losses

FEATURE_SPACES = ("latent", "pixel")


class TrainingError(RuntimeError):
    """A user-facing training failure (bad settings, diverged loss)."""


class Backend(Protocol):
    """What the loop needs from a host model. Tensors are in the model's own latent space."""

    def sample_sigmas(self, n: int, generator: torch.Generator) -> torch.Tensor: ...

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...

    def predict_x0(self, xt: torch.Tensor, sigma: torch.Tensor, prompt: str, adapted: bool) -> torch.Tensor:
        """x0 prediction from the host's own parameterisation; prompt is "target" or "source";
        adapted=False must give the frozen source model (the adapter switched off)."""

    def denoising_loss(self, x0_pred: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The model's native training loss (e.g. epsilon-MSE) expressed through x0, scalar."""

    def features(self, x0: torch.Tensor) -> torch.Tensor:
        """Feature space for the pairwise/hf terms: identity ("latent") or VAE decode ("pixel")."""

    def trainable_parameters(self) -> list[torch.Tensor]: ...


@dataclass
class DomainStudioConfig:
    steps: int = 200
    learning_rate: float = 1e-4
    batch_size: int = 4
    lambda_img: float = 100.0  # paper's SD defaults (lambda_img = lambda_hf = 1e2, lambda_hfmse = 0.1)
    lambda_hf: float = 100.0
    lambda_hfmse: float = 0.1
    lambda_prior: float = 1.0
    prior_batch_size: int = 0  # 0 = same as batch_size (used only when class latents are given)
    kl_reduction: str = "mean"
    max_grad_norm: float = 1.0  # 0 disables clipping
    weight_decay: float = 0.0
    seed: int = 0

    def validate(self, n_images: int, n_prior: int = 0) -> None:
        def bad(name, value, fix):
            raise TrainingError(f"{name}={value!r} is invalid: {fix}")

        for name in ("lambda_img", "lambda_hf", "lambda_hfmse", "lambda_prior", "weight_decay", "max_grad_norm"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                bad(name, v, "use a finite number >= 0")
        for name in ("steps", "batch_size", "prior_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                bad(name, v, "use a whole number >= 0" if name == "prior_batch_size" else "use a whole number >= 1")
        lr = self.learning_rate
        if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            bad("learning_rate", self.learning_rate, "use a finite number > 0, e.g. 1e-4 (LoRA) or 5e-6 (full)")
        if self.steps < 1:
            bad("steps", self.steps, "use at least 1")
        if n_images < 2:
            raise TrainingError(
                f"DomainStudio needs at least 2 training images, got {n_images}: its pairwise "
                "relative-distance terms compare samples with each other. Add images (about 10 is typical)."
            )
        if self.batch_size < 2:
            bad("batch_size", self.batch_size, "the pairwise terms need a batch of at least 2")
        if self.batch_size == 2 and (self.lambda_img > 0 or self.lambda_hf > 0):
            # With two samples each softmax has one entry (p = 1), so L_img and L_hf are exactly 0.
            bad("batch_size", 2, "with 2 samples the relative-distance terms are identically zero; use a "
                "batch of 3 or more (turn on flip to double a small set), or set lambda_img = lambda_hf = 0")
        if self.batch_size > n_images:
            bad("batch_size", self.batch_size, f"it is larger than the image set ({n_images} images); "
                f"use at most {n_images} or add images")
        if self.kl_reduction not in ("mean", "batchmean", "sum"):
            bad("kl_reduction", self.kl_reduction, "use 'mean', 'batchmean' or 'sum'")
        if self.lambda_prior > 0 and n_prior and self.prior_batch_size > n_prior:
            bad("prior_batch_size", self.prior_batch_size, f"only {n_prior} class images exist")


@dataclass
class StepLosses:
    total: float
    simple: float
    img: float = 0.0
    hf: float = 0.0
    hfmse: float = 0.0
    prior: float = 0.0


@dataclass
class TrainResult:
    history: dict[str, list[float]] = field(default_factory=dict)
    steps_done: int = 0
    seconds: float = 0.0

    @property
    def steps_per_second(self) -> float:
        return self.steps_done / self.seconds if self.seconds > 0 else float("nan")


def domainstudio_losses(
    backend: Backend,
    x0: torch.Tensor,
    x0_features: torch.Tensor,
    cfg: DomainStudioConfig,
    generator: torch.Generator,
    prior_x0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, StepLosses]:
    """One evaluation of the DomainStudio objective on a batch; returns (total, parts)."""
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    sigma = backend.sample_sigmas(x0.shape[0], generator).to(x0.device)
    xt = backend.add_noise(x0, noise, sigma)

    pred = backend.predict_x0(xt, sigma, "target", adapted=True)
    simple = backend.denoising_loss(pred, x0, sigma)
    total = simple
    parts = {"simple": simple}

    needs_source = cfg.lambda_img > 0 or cfg.lambda_hf > 0
    needs_features = needs_source or cfg.lambda_hfmse > 0
    if needs_features:
        f_ada = backend.features(pred)
    if needs_source:
        with torch.no_grad():
            f_src = backend.features(backend.predict_x0(xt, sigma, "source", adapted=False))
        if cfg.lambda_img > 0:
            parts["img"] = losses.relative_distance_kl(f_ada, f_src, cfg.kl_reduction)
            total = total + cfg.lambda_img * parts["img"]
        if cfg.lambda_hf > 0:
            parts["hf"] = losses.high_frequency_kl(f_ada, f_src, cfg.kl_reduction)
            total = total + cfg.lambda_hf * parts["hf"]
    if cfg.lambda_hfmse > 0:
        parts["hfmse"] = losses.high_frequency_mse(f_ada, x0_features.to(f_ada))
        total = total + cfg.lambda_hfmse * parts["hfmse"]

    if prior_x0 is not None and cfg.lambda_prior > 0:
        p_noise = torch.randn(prior_x0.shape, generator=generator).to(prior_x0)
        p_sigma = backend.sample_sigmas(prior_x0.shape[0], generator).to(prior_x0.device)
        p_xt = backend.add_noise(prior_x0, p_noise, p_sigma)
        p_pred = backend.predict_x0(p_xt, p_sigma, "source", adapted=True)
        parts["prior"] = backend.denoising_loss(p_pred, prior_x0, p_sigma)
        total = total + cfg.lambda_prior * parts["prior"]

    return total, StepLosses(total=float(total.detach()), **{k: float(v.detach()) for k, v in parts.items()})


def train_domainstudio(
    backend: Backend,
    x0: torch.Tensor,
    x0_features: torch.Tensor,
    cfg: DomainStudioConfig,
    prior_x0: torch.Tensor | None = None,
    on_step: Callable[[int, StepLosses], None] | None = None,
) -> TrainResult:
    """Train backend.trainable_parameters() with AdamW for cfg.steps steps.

    x0: [N, C, h, w] training latents (model space); x0_features: their features in the chosen
    feature space (the training images themselves for "pixel"); prior_x0: optional class latents.
    on_step(step, losses) runs after every optimiser step; the host uses it for progress and
    cancellation (an exception raised there stops training cleanly between steps).
    """
    n_prior = 0 if prior_x0 is None else prior_x0.shape[0]
    cfg.validate(x0.shape[0], n_prior)
    params = [p for p in backend.trainable_parameters() if p.requires_grad]
    if not params:
        raise TrainingError("nothing to train: the backend exposes no trainable parameters")
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    prior_bs = (cfg.prior_batch_size or cfg.batch_size) if n_prior else 0
    prior_bs = min(prior_bs, n_prior)

    result = TrainResult(history={k: [] for k in ("total", "simple", "img", "hf", "hfmse", "prior")})
    t0 = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        idx = torch.randperm(x0.shape[0], generator=gen)[: cfg.batch_size]
        p_batch = None
        if prior_bs:
            p_batch = prior_x0[torch.randperm(n_prior, generator=gen)[:prior_bs]]
        opt.zero_grad(set_to_none=True)
        total, parts = domainstudio_losses(backend, x0[idx], x0_features[idx], cfg, gen, p_batch)
        if not math.isfinite(parts.total):
            raise TrainingError(
                f"loss became {parts.total} at step {step} (parts: {asdict(parts)}); training stopped "
                f"and no weights were kept. Lower the learning rate (now {cfg.learning_rate:g}), "
                "e.g. by 10x, or lower the lambda weights."
            )
        total.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        for k, v in asdict(parts).items():
            result.history[k].append(v)
        result.steps_done = step
        if on_step is not None:
            on_step(step, parts)
    result.seconds = time.perf_counter() - t0
    return result
