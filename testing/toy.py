"""ToyHost: a tiny pure-torch implementation of the host contract (trainer/host.py) for tests.

The model is an epsilon-predictor over latents [N, 4, 8, 8]:

    eps(x_in, sigma, cond) = gauss(x_in, sigma, mean(cond)) + net(x_in + proj(cond), sigma)

* gauss: the Bayes-optimal eps of data ~ N(mean, DATA_STD^2 I),
  (x_t - mean) * sigma / (sigma^2 + DATA_STD^2), whose mean is the prompt's conditioning projected
  to 4 channels. So, as in a real text-conditioned model, the prompt (and a learned token) shifts
  what the model denoises towards at every noise level, and a token stage can lower the loss;
* net, the frozen "source" net: three 3x3 convolutions (weights and biases frozen) with a fixed
  sinusoidal embedding of log(sigma) added after the first layer, the conditioning (projected to
  4 channels) added to its input;
* the adapter (`attach`) is either a full, zero-initialised delta on every conv weight and bias
  (`full_*` modes) or LoRA factors on every conv weight (`lora_*`, up = 0, down seeded; the toy
  has no attention, so `*_attn` and `*_all` train the same layers), read
  through an AdapterSwitch: switched off (or `adapted=False`) the forward uses the frozen weights
  only, so adapted == source bit for bit at initialisation and there is no second copy;
* DDPM sigmas from SD's scaled-linear betas (0.00085 .. 0.012 over 1000 steps),
  sigma_t = sqrt((1 - abar_t) / abar_t); `sample_sigmas` draws timesteps uniformly;
* prompts: `encode_prompt(text)` is a fixed vector per text (seeded from crc32 of the text, so the
  same text always gives the same vector and "" has its own), [1, width]; a Token's vectors
  (encoder key 'clip_l') are added once per occurrence of its trigger word, so gradients reach
  them; `knows_word` has a small fixed vocabulary; `token_init(word)` is a fixed vector per word;
* images: `encode_images` area-downsamples IMAGE [N, H, W, 3] to 8x8 (3 channels in [-1, 1] plus
  their mean as the 4th), or returns the `latents` given to the constructor (the structured
  latents of `structured_latents`); `decode` maps latents back to pixels [N, 3, S, S]
  (S = `image_size`) differentiably; `sample` runs a few Euler steps with CFG.

Subclasses for failure paths: `NaNToyHost` (the k-th adapted prediction and every later one is
NaN) and `RecordingToyHost` (records which training latents and which conditioning each adapted
prediction used).
"""

from __future__ import annotations

import itertools
import math
import re
import zlib
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..trainer import deltas, losses
from ..trainer.errors import TrainingError
from ..trainer.host import Adapter, AdapterSwitch, Exported, Host, LayerDelta, SessionNeeds, Token
from ..trainer.imageset import ImageSet
from ..trainer.layers import TRAIN_MODES

CHANNELS = 4
SIZE = 8
ENCODER = "clip_l"
DATA_STD = 0.5  # the spread around the prompt's mean that the model's Gaussian term assumes
VOCABULARY = frozenset({"a", "an", "the", "of", "photo", "dog", "cat", "house", "quaint", "sks", "rendering"})


_INSTANCES = itertools.count()


def sd_sigmas(n_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """SD's discrete schedule (scaled-linear betas) in sigma space, ascending."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, n_steps, dtype=torch.float64) ** 2
    abar = torch.cumprod(1.0 - betas, dim=0)
    return ((1.0 - abar) / abar).sqrt().float()


def _seeded(key: str, shape, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")))
    return torch.randn(shape, generator=g) * scale


def structured_latents(n: int = 6, seed: int = 123) -> torch.Tensor:
    """n fixed, structured latents [n, 4, 8, 8]: smooth gradients, stripes and checkerboards with
    per-image random channel mixes, scaled to roughly unit variance."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    checker = ((torch.arange(SIZE).view(-1, 1) + torch.arange(SIZE).view(1, -1)) % 2).float() * 2 - 1
    bases = torch.stack([xx, yy, torch.sin(3 * xx), torch.cos(3 * yy), checker, xx * yy])  # [6, 8, 8]
    mix = torch.randn(n, CHANNELS, bases.shape[0], generator=g)
    imgs = torch.einsum("ncb,bhw->nchw", mix, bases)
    return imgs / imgs.std()


def toy_images(n: int = 6, size: int = 16, seed: int = 0) -> torch.Tensor:
    """n distinct deterministic IMAGE tensors [n, size, size, 3] in 0..1 (smooth colour ramps with
    a per-image pattern), so every image encodes to a different latent."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for i in range(n):
        a, b, c = torch.rand(3, generator=g).tolist()
        freq = 1 + i % 4
        r = (a + 0.5 * torch.sin(freq * math.pi * xx)) % 1.0
        gr = (b + 0.5 * yy * (i + 1) / n) % 1.0
        bl = (c + 0.25 * torch.cos(freq * math.pi * (xx + yy))) % 1.0
        out.append(torch.stack([r, gr, bl], dim=-1))
    return torch.stack(out).clamp(0, 1)


def image_set(images: torch.Tensor, captions: list | None = None) -> ImageSet:
    """An ImageSet over an IMAGE tensor, with optional per-image captions."""
    n = int(images.shape[0])
    return ImageSet(images=images, names=[f"img{i}.png" for i in range(n)], resolution=int(images.shape[1]),
                    flipped=False, warnings=[], captions=list(captions) if captions is not None else [])


class ToyAdapter(Adapter):
    """Trainable deltas of the toy's three convolutions behind one switch."""

    def __init__(self, host: "ToyHost", mode: str, rank: int, alpha: float, seed: int):
        self.switch = AdapterSwitch()
        self.host = host
        self.mode, self.alpha = mode, float(alpha)
        self.full = mode.startswith("full")
        g = torch.Generator().manual_seed(int(seed))
        self.diffs: list[torch.nn.Parameter] = []
        self.bias_diffs: list[torch.nn.Parameter] = []
        self.ups: list[torch.nn.Parameter] = []
        self.downs: list[torch.nn.Parameter] = []
        self.ranks: list[int] = []
        self.shapes = [tuple(w.shape) for w in host.weights]
        for w, b in zip(host.weights, host.biases):
            if self.full:
                self.diffs.append(torch.nn.Parameter(torch.zeros_like(w)))
                self.bias_diffs.append(torch.nn.Parameter(torch.zeros_like(b)))
            else:
                fan_in = w[0].numel()
                r = min(int(rank), w.shape[0], fan_in)
                bound = 1.0 / math.sqrt(fan_in)
                self.downs.append(torch.nn.Parameter((torch.rand(r, fan_in, generator=g) * 2 - 1) * bound))
                self.ups.append(torch.nn.Parameter(torch.zeros(w.shape[0], r)))
                self.ranks.append(r)
        self.rank = max(self.ranks) if self.ranks else int(rank)

    def layers(self) -> list[LayerDelta]:
        out = []
        for i, shape in enumerate(self.shapes):
            if self.full:
                out.append(LayerDelta(f"conv{i}", shape, diff=self.diffs[i]))
                out.append(LayerDelta(f"conv{i}_bias", (shape[0],), diff=self.bias_diffs[i]))
            else:
                out.append(LayerDelta(f"conv{i}", shape, up=self.ups[i], down=self.downs[i], alpha=self.alpha))
        return out

    def detach(self) -> None:
        if self.host.adapter is self:
            self.host.adapter = None

    def weight(self, i: int, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's weight and bias with the delta applied."""
        if self.full:
            return w + self.diffs[i], b + self.bias_diffs[i]
        scale = self.alpha / self.ranks[i]
        return w + (self.ups[i] @ self.downs[i]).reshape(w.shape) * scale, b


class ToyHost(Host):
    """A 3-layer conv eps-predictor over [N, 4, 8, 8] latents implementing the Host contract."""

    name = "toy"
    family = "sd1"
    device = "cpu"

    def __init__(self, hidden: int = 16, seed: int = 0, width: int = 32, latents: torch.Tensor | None = None,
                 image_size: int = 16, n_freqs: int = 4):
        g = torch.Generator().manual_seed(seed)
        self.seed, self.hidden, self.width, self.image_size = seed, hidden, width, image_size
        self.weights: list[torch.Tensor] = []
        self.biases: list[torch.Tensor] = []
        for out_c, in_c in [(hidden, CHANNELS), (hidden, hidden), (CHANNELS, hidden)]:
            bound = 1.0 / math.sqrt(in_c * 9)  # PyTorch's default Conv2d init range
            self.weights.append((torch.rand(out_c, in_c, 3, 3, generator=g) * 2 - 1) * bound)
            self.biases.append((torch.rand(out_c, generator=g) * 2 - 1) * bound)
        self.freqs = torch.arange(1, n_freqs + 1, dtype=torch.float32) * 0.5
        self.emb_proj = torch.randn(2 * n_freqs, hidden, generator=g) / math.sqrt(2 * n_freqs)
        self.cond_proj = torch.randn(width, CHANNELS, generator=g) / math.sqrt(width)
        self.mean_proj = torch.randn(width, CHANNELS, generator=g) / math.sqrt(width)
        self.sigmas = sd_sigmas()
        self.latents = None if latents is None else latents.detach().clone().float()
        self.adapter: ToyAdapter | None = None
        self.instance = next(_INSTANCES)
        # What tests inspect: every encoded prompt, call counts, and every session's needs:
        # `sessions` those after the training images were encoded (training, previews), and
        # `probe_sessions` those before (run()'s memory probes measure one step of each stage
        # first; `training` tells the two apart for the subclasses below).
        self.sessions: list[SessionNeeds] = []
        self.probe_sessions: list[SessionNeeds] = []
        self.encoded: list[str] = []
        self.calls: dict[str, int] = {"predict_x0": 0, "attach": 0, "sample": 0, "encode_images": 0}
        self.exported: Exported | None = None

    # --- what the model is -----------------------------------------------------------------
    def frozen_tensors(self) -> list[torch.Tensor]:
        return [*self.weights, *self.biases, self.freqs, self.emb_proj, self.cond_proj, self.mean_proj, self.sigmas]

    def fingerprint(self) -> str:
        state = {f"conv{i}.weight": w for i, w in enumerate(self.weights)}
        state.update({"emb_proj.weight": self.emb_proj, "cond_proj.weight": self.cond_proj,
                      "mean_proj.weight": self.mean_proj})
        return deltas.model_fingerprint(state)

    def cache_key(self):
        """One cache entry per host object: run() caches class images per (fingerprint, cache_key),
        and tests count the samples each host makes."""
        return (type(self).__name__, self.instance)

    @property
    def training(self) -> bool:
        """True once run() encoded the training images (its memory probes come before that)."""
        return self.calls["encode_images"] > 0

    def encoder_widths(self) -> dict[str, int]:
        return {ENCODER: self.width}

    def native_resolution(self) -> int | None:
        return self.image_size

    def latent_format(self) -> tuple[int, int]:
        return CHANNELS, max(1, self.image_size // SIZE)

    # --- inputs --------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        self.calls["encode_images"] += 1
        n = int(images.shape[0])
        if self.latents is not None:
            if self.latents.shape[0] != n:
                raise ValueError(f"ToyHost(latents=...) holds {self.latents.shape[0]} latents, got {n} images")
            return self.latents.clone()
        x = images.float().movedim(-1, 1) * 2 - 1  # [N, 3, H, W] in [-1, 1]
        x = F.adaptive_avg_pool2d(x, SIZE)
        return torch.cat([x, x.mean(dim=1, keepdim=True)], dim=1)

    def text_vector(self, text: str) -> torch.Tensor:
        return _seeded("prompt:" + text, (self.width,), 0.5)

    def encode_prompt(self, text: str, token: Token | None = None) -> torch.Tensor:
        self.encoded.append(text)
        cond = self.text_vector(text)
        if token is not None:
            hits = len(re.findall(r"(?<![\w-])" + re.escape(token.trigger) + r"(?![\w-])", text))
            for _ in range(hits):
                cond = cond + token.vectors[ENCODER].float().mean(dim=0)
        return cond.unsqueeze(0)

    def stack_conds(self, conds: list) -> torch.Tensor:
        if len(conds) == 1 or all(c is conds[0] for c in conds):
            return conds[0]
        return torch.cat(conds)

    def knows_word(self, word: str) -> bool:
        return word.strip().lower() in VOCABULARY

    def token_init(self, word: str, num_vectors: int) -> dict[str, torch.Tensor]:
        return {ENCODER: _seeded("word:" + word, (self.width,), 0.5).unsqueeze(0).repeat(num_vectors, 1)}

    # --- trainable weights ---------------------------------------------------------------------
    def attach(self, mode: str, rank: int, alpha: float, seed: int) -> ToyAdapter:
        if mode not in TRAIN_MODES:
            raise TrainingError(f"train_mode={mode!r} is unknown; choose one of {', '.join(TRAIN_MODES)}")
        self.calls["attach"] += 1
        self.adapter = ToyAdapter(self, mode, rank, alpha, seed)
        return self.adapter

    # --- the model -----------------------------------------------------------------------------
    def eps(self, x_in: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, adapter: ToyAdapter | None):
        s = sigma.float().view(-1, 1, 1, 1)
        mean = (cond.float() @ self.mean_proj).view(-1, CHANNELS, 1, 1)
        gauss = (x_in * (s * s + 1).sqrt() - mean) * s / (s * s + DATA_STD**2)
        h = x_in + (cond.float() @ self.cond_proj).view(-1, CHANNELS, 1, 1)
        ls = sigma.float().log().view(-1, 1) * self.freqs.view(1, -1)
        emb = torch.cat([ls.sin(), ls.cos()], dim=1) @ self.emb_proj  # [N, hidden]
        n_layers = len(self.weights)
        for i in range(n_layers):
            w, b = self.weights[i], self.biases[i]
            if adapter is not None:
                w, b = adapter.weight(i, w, b)
            h = F.conv2d(h, w, b, padding=1)
            if i == 0:
                h = h + emb[:, :, None, None]
            if i < n_layers - 1:
                h = F.silu(h)
        return gauss + h

    def _x0(self, xt, sigma, cond, adapter):
        s = sigma.float().view(-1, 1, 1, 1)
        return xt - s * self.eps(xt / (s * s + 1).sqrt(), sigma, cond, adapter)

    # --- training session ----------------------------------------------------------------------
    def session(self, fn: Callable[[], Any], needs: SessionNeeds) -> Any:
        (self.sessions if self.training else self.probe_sessions).append(needs)
        with torch.inference_mode(False), torch.enable_grad():
            return fn()

    def sample_sigmas(self, n: int, generator: torch.Generator) -> torch.Tensor:
        t = torch.randint(0, self.sigmas.shape[0], (n,), generator=generator)
        return self.sigmas[t]

    def sigma_at(self, t: torch.Tensor) -> torch.Tensor:
        """The schedule at the nearest step (the toy's sigmas are the 1000 discrete ones)."""
        return self.sigmas[t.round().long().clamp(0, self.sigmas.shape[0] - 1).cpu()].to(t.device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x0 + sigma.view(-1, 1, 1, 1) * noise

    def predict_x0(self, xt, sigma, cond, adapted: bool = True):
        self.calls["predict_x0"] += 1
        a = self.adapter
        use = a if (adapted and a is not None and a.switch.enabled) else None
        return self._x0(xt, sigma, cond, use)

    def denoising_loss(self, x0_pred, x0, sigma):
        return losses.denoising_loss_x0(x0_pred, x0, sigma, "eps")

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Differentiable 'VAE decode': the first 3 channels, upsampled to image_size."""
        return F.interpolate(x0[:, :3].float(), size=(self.image_size, self.image_size), mode="nearest")

    # --- sampling outside sessions -------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompt: str, seeds, *, resolution: int, steps: int = 20, cfg: float = 6.0,
               adapter: Adapter | None = None, token: Token | None = None, negative: str = "") -> torch.Tensor:
        self.calls["sample"] += 1
        with torch.inference_mode(False):
            pos = self.encode_prompt(prompt, token)
            neg = self.encode_prompt(negative, token)
            idx = torch.linspace(self.sigmas.shape[0] - 1, 0, max(1, int(steps))).round().long()
            sig = torch.cat([self.sigmas[idx], torch.zeros(1)])
            out = []
            for seed in seeds:
                x = torch.randn(1, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(int(seed))) * sig[0]
                for i in range(len(sig) - 1):
                    s = sig[i].view(1)
                    den = self._x0(x, s, pos, adapter)
                    if cfg != 1.0:
                        neg_den = self._x0(x, s, neg, adapter)
                        den = neg_den + cfg * (den - neg_den)
                    x = x + (x - den) / sig[i] * (sig[i + 1] - sig[i])
                out.append(x)
            return torch.cat(out)

    @torch.no_grad()
    def decode_images(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents[:, :3].float() + 1) / 2).clamp(0, 1).movedim(1, -1)

    # --- results -------------------------------------------------------------------------------
    def export(self, delta, token: Token | None) -> Exported:
        self.exported = Exported(extra={"delta": delta, "token": token})
        return self.exported

    def release(self, adapter=None, token=None) -> None:
        self.adapter = None


class NaNToyHost(ToyHost):
    """ToyHost whose adapted predictions are NaN from the `nan_from`-th one on (counting calls
    with adapted=True once training started; memory probes do not count). DomainStudio without a
    prior makes one adapted prediction per step, so with nan_from=3 steps 1 and 2 are finite and
    step 3 is NaN."""

    def __init__(self, nan_from: int = 3, **kw):
        super().__init__(**kw)
        self.nan_from = nan_from
        self.adapted_calls = 0

    def predict_x0(self, xt, sigma, cond, adapted: bool = True):
        out = super().predict_x0(xt, sigma, cond, adapted)
        if adapted and self.training:
            self.adapted_calls += 1
            if self.adapted_calls >= self.nan_from:
                out = out * float("nan")
        return out


class RecordingToyHost(ToyHost):
    """ToyHost recording, for every prediction once training started (memory probes are not
    recorded), the clean training latents that were noised for it (the last add_noise) and the
    conditioning it used: `batches` (adapted model) and `source_batches` (frozen source,
    adapted=False) are lists of (x0 [B, 4, 8, 8], cond [B or 1, width]) pairs."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.source_batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._last_x0: torch.Tensor | None = None

    def add_noise(self, x0, noise, sigma):
        self._last_x0 = x0.detach().clone()
        return super().add_noise(x0, noise, sigma)

    def predict_x0(self, xt, sigma, cond, adapted: bool = True):
        if self._last_x0 is not None and self.training:
            (self.batches if adapted else self.source_batches).append((self._last_x0, cond.detach().clone()))
        return super().predict_x0(xt, sigma, cond, adapted)


def randomise(adapter: ToyAdapter, scale: float = 0.05, seed: int = 7) -> None:
    """Give every trainable tensor of `adapter` random values (adapted != source)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def stage_inputs(host: Host, method, cfg, x0: torch.Tensor, *, captions: list | None = None,
                 prior_x0: torch.Tensor | None = None, features: torch.Tensor | None = None,
                 token: Token | None = None, live: bool = False):
    """StageInputs as trainer/run.py builds them, for calling a method's objective directly: the
    method's prompts for `captions`, every fixed prompt encoded once (or, with `live`, encoded on
    every call through `token`, as a token stage does)."""
    from ..trainer.methods import StageInputs, get

    m = get(method) if isinstance(method, str) else method
    prompts = m.prompts(cfg, list(captions) if captions is not None else [None] * int(x0.shape[0]))
    if live:
        encode = lambda p: host.encode_prompt(p, token)  # noqa: E731
    else:
        wanted = dict.fromkeys(prompts.target + prompts.source + ([prompts.class_prompt] if prior_x0 is not None
                                                                   else []))
        with torch.no_grad():
            cache = {p: host.encode_prompt(p, token) for p in wanted}
        encode = cache.__getitem__
    return StageInputs(host, x0, features, prior_x0, encode, prompts)
