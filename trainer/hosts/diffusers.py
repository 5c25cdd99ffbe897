"""The diffusers host: trainer.host.Host over diffusers models, with no ComfyUI import anywhere.
Used by `python -m dstrain --host diffusers`.

Models: a diffusers SD folder (unet/ UNet2DConditionModel, text_encoder/ CLIPTextModel, tokenizer/,
vae/ AutoencoderKL or AutoencoderTiny, scheduler/ config), SD1.x / SD2.x, eps or v_prediction.
SDXL (two text encoders, added conditioning) is not supported by this host yet.

Sigma space (the same convention as the ComfyUI host, i.e. k-diffusion's): from the DDPM schedule,
sigma_t = sqrt((1 - alphas_cumprod_t) / alphas_cumprod_t); x_t = x0 + sigma * noise; the UNet sees
x_t / sqrt(sigma^2 + 1) (the DDPM-scaled sample) at the timestep whose log sigma is nearest (as
ComfyUI's discrete model sampling does); x0 = x_t - sigma * eps (eps) or
x_t / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1) (v_prediction). Training sigmas are drawn
uniform in timestep (log-sigma interpolated, ComfyUI's percent_to_sigma). Latents are in model space:
VAE latents (posterior mode for AutoencoderKL) times vae.config.scaling_factor.

Trainable deltas (pure torch, no peft): every selected nn.Linear / nn.Conv2d of the UNet gets its
forward replaced on the instance (no module swapped, state_dict keys unchanged) by one that adds a
LoRA branch (up(down(x)) * alpha / rank, `up` zero-initialised) or uses W + diff (full delta) while
the shared switch is on, and calls the untouched original forward while it is off, so
`adapted=False` is exactly the frozen source model with the same weights. Source weights are never
written (requires_grad off); `release()` restores the original forwards. Module selection is
trainer/layers.py's rule, shared with the ComfyUI host.

Files: kohya names built from the *diffusers* module paths,
`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight` /
`.lora_up.weight` / `.alpha` (conv factors 4-D), and `lora_unet_<path>.diff` for full deltas.
ComfyUI's stock LoRA loader maps these names through its diffusers->ldm key map, diffusers'
`load_lora_weights` reads them natively and A1111/Forge map kohya diffusers-path names too. The
base-model fingerprint is computed over the ldm names (`ldm_unet_state`), so it equals the ComfyUI
host's for the same checkpoint and the Load Weights node accepts these files.

Personalization: the new token is added to a *copy* of the tokenizer (`tok`, `tok_1`, ... for several
vectors, diffusers' convention) and its vectors are spliced into the text encoder's input embedding
(`SplicedEmbedding`); the vocabulary matrix and every other text-encoder weight stay untouched.
Widths come from the loaded text encoder (a 256-wide miniature encoder saves 256-wide vectors).

Sampling (previews, class images, before/after grids): Euler with ComfyUI's 'normal' schedule and
CFG; with the adapter off it reproduces ComfyUI's KSampler (euler/normal) on the same checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .. import deltas, layers, losses
from ..errors import TrainingError
from ..host import Adapter, AdapterSwitch, Exported, Host, LayerDelta, SessionNeeds, Token

TRAIN_MODES = layers.TRAIN_MODES
EMBEDDING_KEYS = {"sd1": "clip_l", "sd2": "clip_h"}

# ---------------------------------------------------------------------------------------------
# Noise schedule
# ---------------------------------------------------------------------------------------------

class Schedule:
    """Discrete DDPM schedule of a diffusers scheduler config, in sigma space."""

    def __init__(self, scheduler_config: dict):
        from diffusers import DDPMScheduler

        cfg = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
        self.prediction_type = cfg.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise TrainingError(f"scheduler prediction_type={self.prediction_type!r} is not supported; "
                                "the diffusers host trains eps and v_prediction models")
        n = int(cfg.get("num_train_timesteps", 1000))
        b0, b1 = float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02))
        kind = cfg.get("beta_schedule", "linear")
        if cfg.get("trained_betas") is not None:
            betas = torch.tensor(cfg["trained_betas"], dtype=torch.float64)
        elif kind == "linear" and not cfg.get("rescale_betas_zero_snr"):
            betas = torch.linspace(b0, b1, n, dtype=torch.float64)
        elif kind == "scaled_linear" and not cfg.get("rescale_betas_zero_snr"):
            betas = torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float64) ** 2  # as ComfyUI, in float64
        else:  # other schedules (squaredcos_cap_v2, zero-SNR rescaling): diffusers' own computation
            keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "rescale_betas_zero_snr")
            betas = DDPMScheduler(**{k: cfg[k] for k in keep if k in cfg}).betas.double()
        acp = torch.cumprod(1.0 - betas, dim=0)
        if float(acp[-1]) <= 0:  # zero terminal SNR: sigma would be infinite; as ComfyUI, clamp
            acp = acp.clone()
            acp[-1] = 4.8973451890853435e-08
        self.sigmas = ((1 - acp) / acp).sqrt().float()
        self.log_sigmas = self.sigmas.log()

    @property
    def v_prediction(self) -> bool:
        return self.prediction_type == "v_prediction"

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma at (fractional) timestep t, log-interpolated."""
        t = t.float().clamp(0, len(self.sigmas) - 1)
        lo = t.floor().long()
        hi = t.ceil().long()
        w = t.frac()
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()

    def percent_to_sigma(self, percent: torch.Tensor) -> torch.Tensor:
        return self.sigma((1.0 - percent.double()).float() * (len(self.sigmas) - 1))

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Nearest discrete timestep of sigma (as ComfyUI's ModelSamplingDiscrete.timestep)."""
        d = sigma.float().log().cpu().view(-1, 1) - self.log_sigmas.view(1, -1)
        return d.abs().argmin(dim=1).view(sigma.shape).to(sigma.device)

    def sampling_sigmas(self, steps: int) -> torch.Tensor:
        """ComfyUI's 'normal' scheduler: `steps` sigmas evenly spaced in timestep, then 0."""
        n = len(self.sigmas) - 1
        t_max = float(self.timestep(self.sigmas[-1:]))
        t_min = float(self.timestep(self.sigmas[:1]))
        ts = torch.linspace(t_max, t_min, steps)
        return torch.cat([self.sigma(ts.clamp(0, n)), torch.zeros(1)])


# ---------------------------------------------------------------------------------------------
# Switchable trainable deltas
# ---------------------------------------------------------------------------------------------

class DiffLayer(torch.nn.Module):
    """Trainable delta of one Linear/Conv2d: LoRA factors (down [r, in(, kh, kw)], up [out, r])
    or a full `diff` of the weight's shape. Holds no reference to the frozen weight."""

    def __init__(self, layer: torch.nn.Module, lora: bool, rank: int, alpha: float, generator: torch.Generator,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        w = layer.weight
        self.is_conv = isinstance(layer, torch.nn.Conv2d)
        self.weight_shape = tuple(w.shape)
        self.lora = lora
        if lora:
            r = min(rank, w.shape[0], w.shape[1:].numel())
            down = torch.empty(r, *w.shape[1:], dtype=torch.float32)
            torch.nn.init.kaiming_uniform_(down.view(r, -1), a=math.sqrt(5), generator=generator)
            self.down = torch.nn.Parameter(down.to(device=w.device, dtype=dtype))
            self.up = torch.nn.Parameter(torch.zeros(w.shape[0], r, device=w.device, dtype=dtype))
            self.rank = r
            self.alpha = float(alpha)
        else:
            self.diff = torch.nn.Parameter(torch.zeros(w.shape, device=w.device, dtype=dtype))

    def lora_out(self, layer, x):
        scale = self.alpha / self.rank
        if self.is_conv:
            h = F.conv2d(x, self.down.to(x.dtype), None, layer.stride, layer.padding, layer.dilation, layer.groups)
            return F.conv2d(h, self.up.to(x.dtype)[:, :, None, None]) * scale
        return F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype)) * scale


def _make_forward(layer, delta: DiffLayer, switch: AdapterSwitch, original):
    if delta.lora:
        def forward(x):
            out = original(x)
            if switch.enabled:
                out = out + delta.lora_out(layer, x)
            return out
    elif delta.is_conv:
        def forward(x):
            if not switch.enabled:
                return original(x)
            return layer._conv_forward(x, layer.weight + delta.diff.to(layer.weight.dtype), layer.bias)
    else:
        def forward(x):
            if not switch.enabled:
                return original(x)
            return F.linear(x, layer.weight + delta.diff.to(layer.weight.dtype), layer.bias)
    return forward


def trainable_module_names(unet: torch.nn.Module, mode: str) -> list[str]:
    """Names (relative to the UNet) of the Linear/Conv2d layers a train mode touches (grouped
    convolutions excluded)."""
    def wrappable(m):
        return (isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.weight.ndim >= 2
                and not (isinstance(m, torch.nn.Conv2d) and m.groups != 1))

    return layers.select_layers(unet.named_modules(), mode, wrappable)


@dataclass
class DiffusersAdapter(Adapter):
    def __init__(self, switch: AdapterSwitch, found: dict[str, DiffLayer], layers_: dict[str, torch.nn.Module],
                 mode: str, rank: int, alpha: float):
        self.switch, self.deltas, self.modules = switch, found, layers_
        self.mode, self.rank, self.alpha = mode, rank, alpha

    def layers(self) -> list[LayerDelta]:
        out = []
        for name, d in self.deltas.items():
            if d.lora:
                out.append(LayerDelta(name, d.weight_shape, up=d.up, down=d.down, alpha=d.alpha))
            else:
                out.append(LayerDelta(name, d.weight_shape, diff=d.diff))
        return out

    def parameters(self) -> list[torch.Tensor]:
        return [p for d in self.deltas.values() for p in d.parameters()]

    def detach(self) -> None:
        """Restore the layers' own forwards (the UNet is then exactly as loaded)."""
        for layer in self.modules.values():
            layer.__dict__.pop("forward", None)


def attach_trainable(unet: torch.nn.Module, mode: str, rank: int = 8, alpha: float = 8.0, seed: int = 0,
                     dtype: torch.dtype = torch.float32) -> DiffusersAdapter:
    """Attach switchable trainable deltas to `unet`'s layers (forwards replaced on the instances;
    weights untouched and frozen)."""
    names = trainable_module_names(unet, mode)
    is_lora = mode.startswith("lora")
    if is_lora and (not isinstance(rank, int) or rank < 1 or not math.isfinite(alpha) or alpha <= 0):
        raise TrainingError(f"LoRA rank={rank} / alpha={alpha} invalid: rank >= 1 and alpha > 0 "
                            "(alpha = rank is a safe default)")
    unet.requires_grad_(False)
    switch = AdapterSwitch()
    gen = torch.Generator().manual_seed(seed)
    found, mods = {}, {}
    for name in names:
        layer = unet.get_submodule(name)
        if "forward" in layer.__dict__:
            raise TrainingError(f"layer {name} already carries a trainable delta; release the previous run first")
        d = DiffLayer(layer, is_lora, rank, alpha, gen, dtype)
        d.requires_grad_(True)
        layer.forward = _make_forward(layer, d, switch, types.MethodType(type(layer).forward, layer))
        found[name], mods[name] = d, layer
    return DiffusersAdapter(switch, found, mods, mode, rank, alpha)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

@dataclass
class DiffusersModels:
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    vae: torch.nn.Module
    schedule: Schedule
    path: str = ""

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def family(self) -> str:
        cfg = self.unet.config
        if getattr(cfg, "addition_embed_type", None) == "text_time":
            return "sdxl"
        return "sd2" if int(cfg.cross_attention_dim) == 1024 else "sd1"

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def vae_scale(self) -> int:
        cfg = self.vae.config
        if hasattr(cfg, "block_out_channels") and "AutoencoderKL" in type(self.vae).__name__:
            return 2 ** (len(cfg.block_out_channels) - 1)
        if hasattr(cfg, "upsampling_scaling_factor"):  # AutoencoderTiny
            return int(cfg.upsampling_scaling_factor) ** (len(cfg.decoder_block_out_channels) - 1)
        return 8

    def encode_prompt(self, text: str) -> torch.Tensor:
        """[1, 77, dim] CLIP hidden states of `text`, as StableDiffusionPipeline.encode_prompt."""
        tok = self.tokenizer
        max_len = min(int(tok.model_max_length), int(self.text_encoder.config.max_position_embeddings))
        ids = tok(text, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return self.text_encoder(ids.to(self.device))[0].float()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Model-space latents of IMAGE [N, H, W, 3] in 0..1."""
        x = images[..., :3].movedim(-1, 1).to(self.device, next(self.vae.parameters()).dtype) * 2 - 1
        with torch.no_grad():
            out = self.vae.encode(x)
            lat = out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latents
        return self.to_model_space(lat.float())

    def to_model_space(self, lat):
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (lat - shift) * float(self.vae.config.scaling_factor)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """VAE decode of model-space latents -> [-1, 1] pixels (gradients flow)."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        raw = x0 / float(self.vae.config.scaling_factor) + shift
        return self.vae.decode(raw.to(next(self.vae.parameters()).dtype)).sample.float()


def _vae_class(folder: str):
    import diffusers

    with open(os.path.join(folder, "config.json")) as f:
        name = json.load(f).get("_class_name", "AutoencoderKL")
    if name not in ("AutoencoderKL", "AutoencoderTiny"):
        raise TrainingError(f"{folder}: VAE class {name!r} is not supported (AutoencoderKL or AutoencoderTiny)")
    return getattr(diffusers, name)


def load_diffusers_folder(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> DiffusersModels:
    """UNet, text encoder, tokenizer, VAE and schedule of a diffusers SD1.x/SD2.x folder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    need = ("unet", "text_encoder", "tokenizer", "vae", "scheduler")
    missing = [s for s in need if not os.path.isdir(os.path.join(path, s))]
    if missing:
        raise TrainingError(f"{path} is not a diffusers SD folder: missing {', '.join(m + '/' for m in missing)}")
    if os.path.isdir(os.path.join(path, "text_encoder_2")):
        raise TrainingError(f"{path} looks like an SDXL folder (text_encoder_2/); the diffusers host supports SD1.x/SD2.x only")
    sched_dir = os.path.join(path, "scheduler")
    sched_file = next((os.path.join(sched_dir, f) for f in ("scheduler_config.json", "config.json")
                       if os.path.isfile(os.path.join(sched_dir, f))), None)
    if sched_file is None:
        raise TrainingError(f"{sched_dir} has no scheduler_config.json")
    with open(sched_file) as f:
        schedule = Schedule(json.load(f))
    unet, info = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype,
                                                      output_loading_info=True)
    if info.get("missing_keys") or any(p.device.type == "meta" for p in unet.parameters()):
        missing = sorted(info.get("missing_keys") or [])
        raise TrainingError(f"{path}/unet: the weights file lacks {len(missing)} weights of the configured UNet "
                            f"(first: {missing[:1]}); the folder is incomplete")
    if getattr(unet.config, "addition_embed_type", None) is not None:
        raise TrainingError(f"{path}: UNet with addition_embed_type={unet.config.addition_embed_type!r} (SDXL-style) "
                            "is not supported by the diffusers host")
    te = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype)
    tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    vae = _vae_class(os.path.join(path, "vae")).from_pretrained(path, subfolder="vae", torch_dtype=dtype)
    for m in (unet, te, vae):
        m.requires_grad_(False).eval().to(device)
    return DiffusersModels(unet, te, tok, vae, schedule, path)


_RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_BASIC_LDM = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
              "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def ldm_unet_key(key: str, layers_per_block) -> str:
    """diffusers UNet2DConditionModel state-dict key -> the ldm (ComfyUI / original checkpoint) key,
    for the SD UNet layout (the inverse of ComfyUI's comfy.utils.unet_to_diffusers).
    `layers_per_block`: the UNet config's value (int or per-level list)."""
    def lpb(i):
        return layers_per_block[i] if isinstance(layers_per_block, (list, tuple)) else layers_per_block

    module, _, leaf = key.rpartition(".")
    for d, l in _BASIC_LDM.items():
        if module == d:
            return f"{l}.{leaf}"
    parts = module.split(".")

    def inner(rest, is_resnet):
        if is_resnet and rest:
            rest = [_RESNET_LDM.get(rest[0], rest[0])] + rest[1:]
        return ".".join(rest + [leaf])

    if parts[0] == "down_blocks":
        i, kind, j = int(parts[1]), parts[2], int(parts[3])
        base = 1 + sum(lpb(k) + 1 for k in range(i))
        if kind == "resnets":
            return f"input_blocks.{base + j}.0.{inner(parts[4:], True)}"
        if kind == "attentions":
            return f"input_blocks.{base + j}.1.{inner(parts[4:], False)}"
        if kind == "downsamplers":  # downsamplers.0.conv
            return f"input_blocks.{base + lpb(i)}.0.op.{leaf}"
    if parts[0] == "mid_block":
        kind, j = parts[1], int(parts[2])
        idx = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[(kind, j)]
        return f"middle_block.{idx}.{inner(parts[3:], kind == 'resnets')}"
    if parts[0] == "up_blocks":
        i, kind, j = int(parts[1]), parts[2], int(parts[3])
        n_levels = len(layers_per_block) if isinstance(layers_per_block, (list, tuple)) else None
        # up block i mirrors down level (levels - 1 - i); every up level has lpb + 1 resnets
        rev = (lambda k: lpb(n_levels - 1 - k)) if n_levels else lpb
        base = sum(rev(k) + 1 for k in range(i))
        if kind == "resnets":
            return f"output_blocks.{base + j}.0.{inner(parts[4:], True)}"
        if kind == "attentions":
            return f"output_blocks.{base + j}.1.{inner(parts[4:], False)}"
        if kind == "upsamplers":
            return f"output_blocks.{base + rev(i)}.{{up}}.conv.{leaf}"
    raise KeyError(f"no ldm name for diffusers UNet key {key!r}")


def ldm_unet_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's state dict under ldm names (as ComfyUI's diffusion_model.state_dict())."""
    state = unet.state_dict()
    lpb = unet.config.layers_per_block
    out = {}
    for k, v in state.items():
        name = ldm_unet_key(k, lpb)
        if "{up}" in name:  # the upsampler follows the resnet, and the attention if the level has one
            block = k.split(".upsamplers")[0]
            name = name.replace("{up}", "2" if any(q.startswith(block + ".attentions.") for q in state) else "1")
        out[name] = v
    return out


def fingerprint(unet: torch.nn.Module) -> str:
    """trainer.deltas.model_fingerprint over the UNet's ldm-named weights: the same value ComfyUI's
    host computes for the same checkpoint, so the Load Weights node accepts files trained here.
    '' (no fingerprint in the file) for a UNet layout without ldm names."""
    try:
        return deltas.model_fingerprint(ldm_unet_state(unet))
    except (KeyError, ValueError):
        return ""


# ---------------------------------------------------------------------------------------------
# New words
# ---------------------------------------------------------------------------------------------

class SplicedEmbedding(torch.nn.Module):
    """The text encoder's token embedding plus `vectors` for ids first_id .. first_id + n - 1 (the
    new token and its _1, _2 ... companions, as diffusers' load_textual_inversion names them). The
    original embedding matrix is used as it is and never written. `vectors` is a plain attribute
    (trainable or frozen as the caller passes it), not a parameter of the text encoder."""

    def __init__(self, base: torch.nn.Embedding, vectors: torch.Tensor, first_id: int):
        super().__init__()
        self.base = base
        self.vocab = int(first_id)
        self.__dict__["vectors"] = vectors

    @property
    def weight(self):  # what transformers reads for dtype/device
        return self.base.weight

    def forward(self, ids):
        new = ids >= self.vocab
        out = self.base(ids.clamp(max=self.vocab - 1))
        if new.any():
            rows = self.__dict__["vectors"].to(out.dtype)[(ids - self.vocab).clamp(min=0)]
            out = torch.where(new[..., None], rows, out)
        return out


def token_names(trigger: str, n: int) -> list[str]:
    """'tok', 'tok_1', ... (diffusers' multi-vector textual-inversion convention)."""
    return [trigger] + [f"{trigger}_{i}" for i in range(1, n)]


def expand_trigger(prompt: str, trigger: str, n: int) -> str:
    """'a photo of tok dog' -> 'a photo of tok tok_1 dog' for n vectors (as diffusers' pipeline does)."""
    if n == 1:
        return prompt
    return " ".join(" ".join(token_names(trigger, n)) if w == trigger else w for w in prompt.split(" "))


# ---------------------------------------------------------------------------------------------
# The host
# ---------------------------------------------------------------------------------------------

class DiffusersHost(Host):
    """trainer.host.Host over DiffusersModels (see the module docstring for the conventions)."""

    name = "diffusers"

    def __init__(self, models: DiffusersModels):
        self.models = models
        self.family = models.family
        self.device = models.device
        self._adapter: DiffusersAdapter | None = None
        self._base_tokenizer = models.tokenizer
        self._base_embedding = models.text_encoder.get_input_embeddings()
        self._token: Token | None = None  # the word currently spliced in
        self._fingerprint: str | None = None

    @property
    def key(self) -> str:
        if self.family not in EMBEDDING_KEYS:
            raise TrainingError(f"personalization on {self.family} is not supported by the diffusers host")
        return EMBEDDING_KEYS[self.family]

    # --- what the model is -----------------------------------------------------------------
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.models.unet)
        return self._fingerprint

    def encoder_widths(self) -> dict[str, int]:
        return {EMBEDDING_KEYS.get(self.family, "clip_l"): int(self._base_embedding.weight.shape[1])}

    def latent_format(self) -> tuple[int, int]:
        return self.models.latent_channels, self.models.vae_scale

    def free_memory(self) -> int | None:
        dev = torch.device(self.device)
        if dev.type == "cuda":
            return int(torch.cuda.mem_get_info(dev)[0])
        from ..memory import cpu_available

        return cpu_available()

    def native_resolution(self) -> int | None:
        size = getattr(self.models.unet.config, "sample_size", None)
        return int(size) * self.models.vae_scale if size else None

    # --- inputs --------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.models.encode_images(images)

    def _use_token(self, token: Token | None) -> None:
        """Splice `token` (or nothing) into the tokenizer copy and the input embedding."""
        m = self.models
        if token is None:
            m.tokenizer = self._base_tokenizer
            m.text_encoder.set_input_embeddings(self._base_embedding)
            self._token = None
            return
        if self._token is not None and self._token.trigger == token.trigger:
            emb = m.text_encoder.get_input_embeddings()
            emb.__dict__["vectors"] = token.vectors[self.key]
            self._token = token
            return
        tok = self._base_tokenizer
        names = token_names(token.trigger, token.num_vectors)
        new_tok = copy.deepcopy(tok)
        added = new_tok.add_tokens(names)
        first = new_tok.convert_tokens_to_ids(token.trigger)
        base = self._base_embedding
        if added != len(names) or first != len(tok) or first > base.num_embeddings:
            raise TrainingError(f"could not add {token.trigger!r} as {len(names)} new token(s) after the vocabulary "
                                f"(got id {first}, tokenizer {len(tok)}, embedding rows {base.num_embeddings})")
        m.tokenizer = new_tok
        m.text_encoder.set_input_embeddings(SplicedEmbedding(base, token.vectors[self.key], first))
        self._token = token

    def encode_prompt(self, text: str, token: Token | None = None):
        m = self.models
        self._use_token(token)
        if token is not None:
            text = expand_trigger(text, token.trigger, token.num_vectors)
        max_len = min(int(m.tokenizer.model_max_length), int(m.text_encoder.config.max_position_embeddings))
        ids = m.tokenizer(text, padding="max_length", max_length=max_len, truncation=True,
                          return_tensors="pt").input_ids.to(m.device)
        return m.text_encoder(ids)[0].float()

    def stack_conds(self, conds: list) -> torch.Tensor:
        if len(conds) == 1 or all(c is conds[0] for c in conds):
            return conds[0]
        return torch.cat(conds)

    def knows_word(self, word: str) -> bool:
        tok = self._base_tokenizer
        ids = tok(word, add_special_tokens=False).input_ids
        return word in tok.get_vocab() or (len(ids) == 1 and tok.convert_ids_to_tokens(ids)[0] in (word, word + "</w>"))

    def token_init(self, word: str, num_vectors: int) -> dict[str, torch.Tensor]:
        tok = self._base_tokenizer
        init_ids = tok(word, add_special_tokens=False).input_ids or [tok.eos_token_id]
        table = self._base_embedding.weight
        with torch.no_grad():
            init = table[init_ids].float().mean(0) if len(init_ids) > 1 else table[init_ids[0]].float()
        return {self.key: init.detach().clone().unsqueeze(0).repeat(num_vectors, 1)}

    # --- trainable weights ---------------------------------------------------------------------
    def attach(self, mode: str, rank: int, alpha: float, seed: int) -> DiffusersAdapter:
        if self._adapter is not None:
            self._adapter.detach()
        self._adapter = attach_trainable(self.models.unet, mode, rank, alpha, seed)
        return self._adapter

    # --- training session ----------------------------------------------------------------------
    def session(self, fn: Callable[[], Any], needs: SessionNeeds) -> Any:
        m = self.models
        unet, te = m.unet, m.text_encoder
        if needs.checkpointing:
            unet.enable_gradient_checkpointing()
            if needs.token is not None and hasattr(te, "gradient_checkpointing_enable"):
                te.gradient_checkpointing_enable()
        if needs.adapter is not None:
            needs.adapter.switch.enabled = True
        try:
            with torch.inference_mode(False), torch.enable_grad(), torch.autocast(
                    torch.device(self.device).type, dtype=needs.dtype, enabled=needs.dtype != torch.float32):
                return fn()
        finally:
            if needs.checkpointing:
                unet.disable_gradient_checkpointing()
                if hasattr(te, "gradient_checkpointing_disable"):
                    te.gradient_checkpointing_disable()

    def sample_sigmas(self, n, generator):
        u = torch.rand(n, generator=generator, device=generator.device).clamp(max=0.999)
        return self.models.schedule.percent_to_sigma(u.cpu()).to(u.device)

    def sigma_at(self, t):
        return self.models.schedule.sigma(t.cpu()).to(t.device)

    def add_noise(self, x0, noise, sigma):
        return x0 + noise * sigma.to(x0).view(-1, *([1] * (x0.ndim - 1)))

    def _model_x0(self, xt, sigma, cond):
        schedule = self.models.schedule
        s = sigma.float().to(xt.device).view(-1, *([1] * (xt.ndim - 1)))
        x_in = xt / (s**2 + 1).sqrt()
        t = schedule.timestep(sigma.float()).to(xt.device)
        unet = self.models.unet
        dt = unet.dtype
        cond = cond.expand(xt.shape[0], -1, -1) if cond.shape[0] == 1 else cond
        out = unet(x_in.to(dt), t, encoder_hidden_states=cond.to(dt)).sample.float()
        xt = xt.float()
        if schedule.v_prediction:
            return xt / (s**2 + 1) - out * s / (s**2 + 1).sqrt()
        return xt - s * out

    def predict_x0(self, xt, sigma, cond, adapted: bool = True):
        adapter = self._adapter
        if adapter is None:
            return self._model_x0(xt, sigma, cond)
        adapter.switch.enabled = adapted
        try:
            return self._model_x0(xt, sigma, cond)
        finally:
            adapter.switch.enabled = True

    def denoising_loss(self, x0_pred, x0, sigma):
        return losses.denoising_loss_x0(x0_pred, x0, sigma, "v" if self.models.schedule.v_prediction else "eps", 1.0)

    def decode(self, x0):
        return self.models.decode(x0)

    # --- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompt: str, seeds, *, resolution: int, steps: int = 20, cfg: float = 6.0,
               adapter: DiffusersAdapter | None = None, token: Token | None = None, negative: str = "") -> torch.Tensor:
        """Euler ('normal' schedule, CFG); noise per seed as ComfyUI's prepare_noise ([1, C, h, w] from
        torch.Generator(seed)): with no adapter this is ComfyUI's KSampler (euler/normal)."""
        m = self.models
        with torch.inference_mode(False):
            pos = self.encode_prompt(prompt, token)
            neg = self.encode_prompt(negative, token)
            sigmas = m.schedule.sampling_sigmas(steps).to(m.device)
            h = w = resolution // m.vae_scale
            adapted = adapter is not None
            out = []
            for seed in seeds:
                noise = torch.randn([1, m.latent_channels, h, w], generator=torch.Generator().manual_seed(int(seed)))
                x = noise.to(m.device) * (1 + sigmas[0] ** 2).sqrt()  # full denoise: x_T ~ N(0, 1) in DDPM scale
                for i in range(len(sigmas) - 1):
                    s = sigmas[i].view(1)
                    den = self.predict_x0(x, s, pos, adapted)
                    if cfg != 1.0:
                        neg_den = self.predict_x0(x, s, neg, adapted)
                        den = neg_den + cfg * (den - neg_den)
                    d = (x - den) / sigmas[i]
                    x = x + d * (sigmas[i + 1] - sigmas[i])
                out.append(x)
            return torch.cat(out)

    @torch.no_grad()
    def decode_images(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(False):
            return ((self.models.decode(latents) + 1) / 2).clamp(0, 1).movedim(1, -1).cpu()

    # --- results -------------------------------------------------------------------------------
    def export(self, delta, token: Token | None) -> Exported:
        """The adapter stays attached (switch on) and the token spliced: sampling shows the result;
        release() undoes both."""
        if token is not None:
            self._use_token(token)
        return Exported(extra={"models": self.models})

    def release(self, adapter=None, token=None) -> None:
        if self._adapter is not None:
            self._adapter.detach()
            self._adapter = None
        self._use_token(None)
