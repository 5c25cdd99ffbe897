"""A tiny pure-torch host for trainer.domainstudio (no ComfyUI), used by the core-loop tests.

ToyBackend is an epsilon-prediction denoiser over latents [N, 4, 8, 8]:

* frozen "source" net: three 3x3 Conv2d layers (weights and biases held as frozen parameters)
  with a fixed sinusoidal embedding of log(sigma) added after the first layer;
* the adapter is a full, zero-initialised delta on every conv weight and bias, applied through
  the `adapted` switch with torch.nn.functional.conv2d (adapted=False -> source weights only,
  adapted=True -> weights + delta), so no second copy of the network exists and at
  initialisation adapted == source bit for bit;
* prompts "target" / "source" pick one of two fixed per-channel conditioning vectors that are
  added to the (scaled) input; `unconditional=True` makes them identical;
* DDPM sigma schedule from SD's scaled-linear betas (0.00085 .. 0.012 over 1000 steps),
  sigma_t = sqrt((1 - abar_t) / abar_t); sample_sigmas draws timesteps uniformly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

CHANNELS = 4
SIZE = 8


def sd_sigmas(n_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, n_steps, dtype=torch.float64) ** 2
    abar = torch.cumprod(1.0 - betas, dim=0)
    return ((1.0 - abar) / abar).sqrt().float()


class ToyBackend(nn.Module):
    """Implements the trainer.domainstudio.Backend protocol with a 3-layer conv eps-predictor."""

    def __init__(self, hidden: int = 16, seed: int = 0, unconditional: bool = False, n_freqs: int = 4):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        shapes = [(hidden, CHANNELS), (hidden, hidden), (CHANNELS, hidden)]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for out_c, in_c in shapes:
            bound = 1.0 / math.sqrt(in_c * 9)  # PyTorch's default Conv2d init range
            w = (torch.rand(out_c, in_c, 3, 3, generator=g) * 2 - 1) * bound
            b = (torch.rand(out_c, generator=g) * 2 - 1) * bound
            self.weights.append(nn.Parameter(w, requires_grad=False))
            self.biases.append(nn.Parameter(b, requires_grad=False))
        # Trainable adapter: a full delta on every conv weight and bias, zero at start.
        self.weight_deltas = nn.ParameterList(nn.Parameter(torch.zeros_like(w)) for w in self.weights)
        self.bias_deltas = nn.ParameterList(nn.Parameter(torch.zeros_like(b)) for b in self.biases)
        # Fixed (frozen) sigma embedding: sin/cos of log(sigma) at a few frequencies -> hidden.
        self.register_buffer("freqs", torch.arange(1, n_freqs + 1, dtype=torch.float32) * 0.5)
        self.register_buffer("emb_proj", torch.randn(2 * n_freqs, hidden, generator=g) / math.sqrt(2 * n_freqs))
        cond_target = torch.randn(CHANNELS, generator=g) * 0.5
        cond_source = cond_target.clone() if unconditional else torch.randn(CHANNELS, generator=g) * 0.5
        self.register_buffer("cond_target", cond_target)
        self.register_buffer("cond_source", cond_source)
        self.register_buffer("sigmas", sd_sigmas())

    # ------------------------------------------------------------------ model
    def source_tensors(self) -> list[torch.Tensor]:
        return [*self.weights, *self.biases]

    def _cond(self, prompt: str) -> torch.Tensor:
        if prompt == "target":
            return self.cond_target
        if prompt == "source":
            return self.cond_source
        raise ValueError(f"unknown prompt {prompt!r}")

    def eps(self, x_in: torch.Tensor, sigma: torch.Tensor, prompt: str, adapted: bool) -> torch.Tensor:
        h = x_in + self._cond(prompt).view(1, -1, 1, 1)
        ls = sigma.log().view(-1, 1) * self.freqs.view(1, -1)
        emb = torch.cat([ls.sin(), ls.cos()], dim=1) @ self.emb_proj  # [N, hidden]
        n_layers = len(self.weights)
        for i in range(n_layers):
            w, b = self.weights[i], self.biases[i]
            if adapted:
                w = w + self.weight_deltas[i]
                b = b + self.bias_deltas[i]
            h = F.conv2d(h, w, b, padding=1)
            if i == 0:
                h = h + emb[:, :, None, None]
            if i < n_layers - 1:
                h = F.silu(h)
        return h

    # --------------------------------------------------------------- protocol
    def sample_sigmas(self, n: int, generator: torch.Generator) -> torch.Tensor:
        t = torch.randint(0, self.sigmas.shape[0], (n,), generator=generator)
        return self.sigmas[t]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x0 + sigma.view(-1, 1, 1, 1) * noise

    def predict_x0(self, xt: torch.Tensor, sigma: torch.Tensor, prompt: str, adapted: bool) -> torch.Tensor:
        s = sigma.view(-1, 1, 1, 1)
        return xt - s * self.eps(xt / (s * s + 1).sqrt(), sigma, prompt, adapted)

    def denoising_loss(self, x0_pred: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return (((x0_pred - x0) / sigma.view(-1, 1, 1, 1)) ** 2).mean()

    def features(self, x0: torch.Tensor) -> torch.Tensor:
        return x0

    def trainable_parameters(self) -> list[torch.Tensor]:
        return [*self.weight_deltas, *self.bias_deltas]


class NaNAfterBackend(ToyBackend):
    """ToyBackend whose adapted target prediction turns NaN from its (nan_from)-th call on.

    domainstudio_losses makes exactly one adapted "target" prediction per step, so with
    nan_from=3 the loss is finite at steps 1 and 2 and NaN at step 3.
    """

    def __init__(self, nan_from: int = 3, **kw):
        super().__init__(**kw)
        self.nan_from = nan_from
        self.target_calls = 0

    def predict_x0(self, xt, sigma, prompt, adapted):
        out = super().predict_x0(xt, sigma, prompt, adapted)
        if adapted and prompt == "target":
            self.target_calls += 1
            if self.target_calls >= self.nan_from:
                out = out * float("nan")
        return out


def structured_images(n: int = 6, seed: int = 123) -> torch.Tensor:
    """n fixed, structured latents [n, 4, 8, 8]: smooth gradients, stripes and checkerboards
    with per-image random channel mixes, scaled to roughly unit variance."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    checker = ((torch.arange(SIZE).view(-1, 1) + torch.arange(SIZE).view(1, -1)) % 2).float() * 2 - 1
    bases = torch.stack([xx, yy, torch.sin(3 * xx), torch.cos(3 * yy), checker, xx * yy])  # [6, 8, 8]
    mix = torch.randn(n, CHANNELS, bases.shape[0], generator=g)
    imgs = torch.einsum("ncb,bhw->nchw", mix, bases)
    return imgs / imgs.std()
