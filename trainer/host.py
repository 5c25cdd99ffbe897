"""The host contract: what a model host (ComfyUI, diffusers, a toy model in tests) gives the core.

The core (trainer/run.py, trainer/loop.py, trainer/methods/) never imports a host; it talks to one
`Host` object. A host owns the model and its conventions (latent space, noise schedule,
parameterisation, text encoders, weight names) and provides:

* what the model is: `family` ('sd1' | 'sd2' | 'sdxl'), `fingerprint()`, `encoder_widths()`;
* inputs, encoded once per run: `encode_images`, `encode_prompt` (with a trainable `Token` spliced
  in, gradients reach its vectors), `stack_conds`, `knows_word`, `token_init`;
* trainable weights behind one switch: `attach()` -> `Adapter` (switch off = the frozen source
  model, same weights, no second copy);
* a training session: `session(fn, ...)` runs `fn` with the models loaded for training (the
  ComfyUI host runs it inside its own sampling set-up), where `sample_sigmas`, `add_noise`,
  `predict_x0`, `denoising_loss` and `decode` may be called;
* sampling outside sessions (previews, class images, the quality report): `sample`, `decode_images`;
* results in the host's own terms: `export()` (ComfyUI: a patched MODEL and a CLIP that knows the
  token).

Adding a host means one module implementing this class plus its test (see README "Layout").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import deltas


class AdapterSwitch:
    """Shared on/off flag read by every trainable layer of one run: off = the frozen source model."""

    def __init__(self):
        self.enabled = True


@dataclass
class LayerDelta:
    """The trainable tensors of one layer, host-independent: LoRA factors (up [out, r], down
    [r, in*kh*kw]) with alpha, or a full `diff` of the weight's shape."""

    name: str  # module path in the host's own layout (kohya name = lora_unet_ + path with _)
    weight_shape: tuple[int, ...]
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    alpha: float | None = None
    diff: torch.Tensor | None = None

    def entries(self) -> dict[str, torch.Tensor]:
        if self.diff is not None:
            return deltas.diff_entries(self.name, self.diff)
        return deltas.lora_entries(self.name, self.up, self.down.reshape(self.down.shape[0], -1), self.alpha,
                                   self.weight_shape)


class Adapter(ABC):
    """Trainable deltas attached to a host's UNet behind one switch."""

    switch: AdapterSwitch
    mode: str
    rank: int
    alpha: float

    @abstractmethod
    def layers(self) -> list[LayerDelta]:
        """The live trainable tensors per layer (Parameters; exact values, fp32)."""

    def parameters(self) -> list[torch.Tensor]:
        out = []
        for d in self.layers():
            out += [t for t in (d.up, d.down, d.diff) if t is not None]
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained delta under kohya names (exact values, before any cast to the file dtype)."""
        out = {}
        for d in self.layers():
            out.update(d.entries())
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Set the trainable values from a saved delta of the same layout (resume). Returns the
        kohya layer names of the file that match no layer here (the caller refuses them)."""
        by_name = {deltas.kohya_unet_name(d.name): d for d in self.layers()}
        seen, unknown = set(), []
        with torch.no_grad():
            for key, value in tensors.items():
                base, _, suffix = key.partition(".")
                d = by_name.get(base)
                if d is None:
                    unknown.append(key)
                    continue
                seen.add(base)
                if suffix == "diff" and d.diff is not None:
                    d.diff.copy_(value.reshape(d.diff.shape).to(d.diff))
                elif suffix == "lora_up.weight" and d.up is not None:
                    d.up.copy_(value.reshape(d.up.shape).to(d.up))
                elif suffix == "lora_down.weight" and d.down is not None:
                    d.down.copy_(value.reshape(d.down.shape).to(d.down))
                elif suffix == "alpha":
                    continue
                else:
                    unknown.append(key)
        missing = [n for n in by_name if n not in seen]
        return unknown + [f"{n} (missing from the file)" for n in missing]

    def detach(self) -> None:
        """Remove the trainable layers from the model (hosts whose wrappers outlive the run)."""


@dataclass
class Token:
    """A new word and its trainable vectors, one [n, width] tensor per text encoder ('clip_l',
    'clip_g', 'clip_h'), spliced into prompts wherever the word appears."""

    trigger: str
    vectors: dict[str, torch.Tensor]

    @property
    def num_vectors(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])

    def detached(self) -> "Token":
        return Token(self.trigger, {k: v.detach().float().clone() for k, v in self.vectors.items()})


@dataclass
class SessionNeeds:
    """What a training session must have loaded."""

    adapter: Adapter | None = None
    token: Token | None = None  # trainable: gradients flow through the text encoder to it
    decode: bool = False  # differentiable VAE decode (pixel features)
    checkpointing: bool = False  # gradient checkpointing of the UNet (and text encoder for a token)
    dtype: torch.dtype = torch.float32  # compute dtype of the frozen weights
    batch_shape: tuple[int, ...] = (1, 4, 8, 8)


@dataclass
class Exported:
    """The result in the host's terms (ComfyUI: MODEL/CLIP objects; diffusers: None)."""

    model: Any = None
    clip: Any = None
    extra: dict = field(default_factory=dict)


class Host(ABC):
    name: str = "host"
    family: str = "sd1"

    # --- what the model is -----------------------------------------------------------------
    @abstractmethod
    def fingerprint(self) -> str: ...

    @abstractmethod
    def encoder_widths(self) -> dict[str, int]:
        """Token-embedding width per text encoder key, read from the loaded model."""

    def native_resolution(self) -> int | None:
        """The model's training resolution when the host knows it (a default for image sets)."""
        return None

    def latent_format(self) -> tuple[int, int]:
        """(latent channels, pixels per latent pixel)."""
        return 4, 8

    def free_memory(self) -> int | None:
        """Bytes a training step may use on the training device (models this run loads may be
        swapped out to make room); None when unknown."""
        return None

    # --- inputs --------------------------------------------------------------------------------
    @abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Model-space latents [N, C, h, w] of IMAGE [N, H, W, 3] in 0..1 (no gradients)."""

    @abstractmethod
    def encode_prompt(self, text: str, token: Token | None = None) -> Any:
        """Conditioning for `text` (host object). With a `token`, its word is spliced in; with
        trainable vectors and grad enabled, gradients reach them (call inside a session then)."""

    def stack_conds(self, conds: list) -> Any:
        """One conditioning for a batch whose items have their own prompts (default: stacked by
        the host). A list of one returns that conditioning unchanged (broadcast)."""
        if len(conds) == 1 or all(c is conds[0] for c in conds):
            return conds[0]
        raise NotImplementedError

    @abstractmethod
    def knows_word(self, word: str) -> bool:
        """True when `word` is a whole word of the text encoders' vocabulary."""

    @abstractmethod
    def token_init(self, word: str, num_vectors: int) -> dict[str, torch.Tensor]:
        """Starting vectors: `word`'s embedding (mean of its tokens) repeated, per encoder, fp32."""

    # --- trainable weights ---------------------------------------------------------------------
    @abstractmethod
    def attach(self, mode: str, rank: int, alpha: float, seed: int) -> Adapter: ...

    # --- training session ----------------------------------------------------------------------
    @abstractmethod
    def session(self, fn: Callable[[], Any], needs: SessionNeeds) -> Any:
        """Run fn() with the models loaded for training as `needs` says; returns fn's result."""

    @abstractmethod
    def sample_sigmas(self, n: int, generator: torch.Generator) -> torch.Tensor: ...

    @abstractmethod
    def sigma_at(self, t: torch.Tensor) -> torch.Tensor:
        """Noise levels at (fractional) timesteps t of the 1000-step training schedule (0 = cleanest,
        999 = noisiest), on t's device: how the run's min_timestep / max_timestep are drawn."""

    @abstractmethod
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def predict_x0(self, xt: torch.Tensor, sigma: torch.Tensor, cond: Any, adapted: bool = True) -> torch.Tensor:
        """x0 prediction of the adapted model (adapter switch on) or of the frozen source (off)."""

    @abstractmethod
    def denoising_loss(self, x0_pred: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The model's native training loss (eps / v MSE) written through x0, a scalar."""

    @abstractmethod
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Differentiable VAE decode of model-space latents to [-1, 1] pixels [N, 3, H, W]."""

    # --- sampling outside sessions -------------------------------------------------------------
    @abstractmethod
    def sample(self, prompt: str, seeds, *, resolution: int, steps: int = 20, cfg: float = 6.0,
               adapter: Adapter | None = None, token: Token | None = None, negative: str = "") -> torch.Tensor:
        """Model-space latents [len(seeds), C, h, w]: Euler, 'normal' schedule, CFG; the adapter's
        switch on (adapted model) when given, the source model otherwise."""

    @abstractmethod
    def decode_images(self, latents: torch.Tensor) -> torch.Tensor:
        """IMAGE [N, H, W, 3] in 0..1 of model-space latents (no gradients)."""

    # --- results -------------------------------------------------------------------------------
    def export(self, delta: dict[str, torch.Tensor] | None, token: Token | None) -> Exported:
        """The trained result in the host's own terms; `delta` holds the saved file's values."""
        return Exported()

    def release(self, adapter: Adapter | None = None, token: Token | None = None) -> None:
        """Undo what a run left attached (hosts whose changes outlive the run)."""
