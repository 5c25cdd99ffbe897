"""diffusers host adapter: the DomainStudio core (trainer/domainstudio.py) over diffusers models,
with no ComfyUI import anywhere (issue #6). Used by `python -m dstrain --host diffusers`.

Models: a diffusers SD folder (unet/ UNet2DConditionModel, text_encoder/ CLIPTextModel, tokenizer/,
vae/ AutoencoderKL or AutoencoderTiny, scheduler/ config), SD1.x / SD2.x, eps or v_prediction.
SDXL (two text encoders, added conditioning) is not supported by this host yet.

Sigma space (the same convention as trainer/hosts/comfy.py, i.e. k-diffusion's): from the DDPM
schedule, sigma_t = sqrt((1 - alphas_cumprod_t) / alphas_cumprod_t); x_t = x0 + sigma * noise; the
UNet sees x_t / sqrt(sigma^2 + 1) (the DDPM-scaled sample) at the timestep whose log sigma is nearest
(as ComfyUI's discrete model sampling does); x0 = x_t - sigma * eps (eps) or
x_t / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1) (v_prediction). Training sigmas are drawn
uniform in timestep (log-sigma interpolated, ComfyUI's percent_to_sigma). Latents are in model space:
VAE latents (posterior mode for AutoencoderKL) times vae.config.scaling_factor.

Trainable deltas (pure torch, no peft): every selected nn.Linear / nn.Conv2d of the UNet gets its
forward replaced on the instance (no module swapped, state_dict keys unchanged) by one that adds a
LoRA branch (up(down(x)) * alpha / rank, `up` zero-initialised) or uses W + diff (full delta) while
the shared switch is on, and calls the untouched original forward while it is off, so
`adapted=False` is exactly the frozen source model with the same weights. Source weights are never
written (requires_grad off); `AttachedDelta.detach()` restores the original forwards.
Module selection follows trainer/hosts/comfy.trainable_module_names: `*_attn` = to_q/to_k/to_v/
to_out.0 of attn1/attn2, `*_all` = every Linear/Conv2d weight of the UNet.

Files: kohya names built from the *diffusers* module paths,
`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight` /
`.lora_up.weight` / `.alpha` (conv factors 4-D), and `lora_unet_<path>.diff` for full deltas, with
the nodes' metadata (trainer/deltas.build_metadata) and atomic, never-overwriting writes
(trainer/deltas.save_delta). ComfyUI's stock LoRA loader maps these names through its
diffusers->ldm key map (comfy.lora.model_lora_keys_unet), diffusers' `load_lora_weights` reads
them natively (no unet_config needed) and A1111/Forge map kohya diffusers-path names too. The
nodes' files use ldm paths instead; both name the same weights. The base-model fingerprint is
computed over the ldm names (`ldm_unet_state`), so it equals the ComfyUI host's for the same
checkpoint and the Load Weights node's check accepts these files.

Personalization (trainer/personalize.py, every method): the new token is added to a *copy* of the
tokenizer (`tok`, `tok_1`, ... for several vectors, diffusers' convention) and its trainable vectors
are spliced into the text encoder's input embedding (`SplicedEmbedding`); the vocabulary matrix
and every other text-encoder weight stay untouched, so only the new row(s) learn. Embeddings are
saved with trainer/embeddings.py (`{"clip_l": [n, 768]}` SD1, `{"clip_h": [n, 1024]}` SD2), which
diffusers' `load_textual_inversion(file, token=<trigger>)` reads.

Sampling (before/after grids, class images): Euler with ComfyUI's 'normal' schedule and CFG; with
the adapter off it reproduces ComfyUI's KSampler (euler/normal) on the same checkpoint and seed.
"""

from __future__ import annotations

import json
import math
import os
import types
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .. import deltas, layers
from ..domainstudio import DomainStudioConfig, TrainResult, TrainingError, train_domainstudio

TRAIN_MODES = layers.TRAIN_MODES
SAVE_DTYPE = torch.float16


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

class AdapterSwitch:
    """Shared on/off flag read by every trainable layer of one run."""

    def __init__(self):
        self.enabled = True


class LayerDelta(torch.nn.Module):
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


def _make_forward(layer, delta: LayerDelta, switch: AdapterSwitch, original):
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
class AttachedDelta:
    switch: AdapterSwitch
    deltas: dict[str, LayerDelta]  # UNet-relative module path -> delta
    layers: dict[str, torch.nn.Module]
    mode: str
    rank: int
    alpha: float
    forwards: dict = None  # module path -> the switched forward installed on the layer

    def parameters(self) -> list[torch.Tensor]:
        return [p for d in self.deltas.values() for p in d.parameters()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained delta under kohya names of the diffusers module paths."""
        out = {}
        for name, d in self.deltas.items():
            if d.lora:
                out.update(deltas.lora_entries(name, d.up, d.down.reshape(d.rank, -1), d.alpha, d.weight_shape))
            else:
                out.update(deltas.diff_entries(name, d.diff))
        return out

    def round_to(self, dtype: torch.dtype) -> None:
        """Replace the trained values by their `dtype` rounding (what a file of that dtype holds), so
        the adapted model afterwards is exactly the saved one."""
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(p.to(dtype).to(p.dtype))

    def detach(self) -> None:
        """Restore the layers' own forwards (the UNet is then exactly as loaded)."""
        for layer in self.layers.values():
            layer.__dict__.pop("forward", None)

    def reattach(self) -> None:
        """Install the switched forwards again after detach() (same deltas, same switch)."""
        for name, layer in self.layers.items():
            if "forward" in layer.__dict__ and layer.__dict__["forward"] is not self.forwards[name]:
                raise TrainingError(f"layer {name} carries another trainable delta; detach it first")
            layer.forward = self.forwards[name]


def attach_trainable(unet: torch.nn.Module, mode: str, rank: int = 8, alpha: float = 8.0, seed: int = 0,
                     dtype: torch.dtype = torch.float32) -> AttachedDelta:
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
    found, layers, forwards = {}, {}, {}
    for name in names:
        layer = unet.get_submodule(name)
        if "forward" in layer.__dict__:
            raise TrainingError(f"layer {name} already carries a trainable delta; detach the previous run first")
        d = LayerDelta(layer, is_lora, rank, alpha, gen, dtype)
        d.requires_grad_(True)
        layer.forward = forwards[name] = _make_forward(layer, d, switch, types.MethodType(type(layer).forward, layer))
        found[name], layers[name] = d, layer
    return AttachedDelta(switch, found, layers, mode, rank, alpha, forwards)


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
# Backend
# ---------------------------------------------------------------------------------------------

class DiffusersBackend:
    """trainer.domainstudio.Backend over diffusers models (see the module docstring for the
    sigma-space conventions). `conds` maps "target"/"source" to [1, 77, dim] prompt embeddings."""

    def __init__(self, models: DiffusersModels, conds: dict[str, torch.Tensor], attached: AttachedDelta | None,
                 feature_space: str = "latent"):
        if feature_space not in ("latent", "pixel"):
            raise TrainingError(f"feature_space={feature_space!r} unknown; use 'latent' or 'pixel'")
        self.models = models
        self.conds = conds
        self.attached = attached
        self.feature_space = feature_space
        self.schedule = models.schedule

    def sample_sigmas(self, n, generator):
        u = torch.rand(n, generator=generator).clamp(max=0.999)
        return self.schedule.percent_to_sigma(u)

    def add_noise(self, x0, noise, sigma):
        return x0 + noise * sigma.to(x0).view(-1, *([1] * (x0.ndim - 1)))

    def model_x0(self, xt, sigma, cond):
        s = sigma.float().to(xt.device).view(-1, *([1] * (xt.ndim - 1)))
        x_in = xt / (s**2 + 1).sqrt()
        t = self.schedule.timestep(sigma.float()).to(xt.device)
        unet = self.models.unet
        dt = unet.dtype
        out = unet(x_in.to(dt), t, encoder_hidden_states=cond.expand(xt.shape[0], -1, -1).to(dt)).sample.float()
        xt = xt.float()
        if self.schedule.v_prediction:
            return xt / (s**2 + 1) - out * s / (s**2 + 1).sqrt()
        return xt - s * out

    def predict_x0(self, xt, sigma, prompt, adapted):
        cond = self.conds[prompt]
        if self.attached is None:
            return self.model_x0(xt, sigma, cond)
        self.attached.switch.enabled = adapted
        try:
            return self.model_x0(xt, sigma, cond)
        finally:
            self.attached.switch.enabled = True

    def denoising_loss(self, x0_pred, x0, sigma):
        # ||F - F*||^2 = ||x0_pred - x0||^2 / c_out^2 (c_out = -sigma for eps, sigma/sqrt(sigma^2+1) for v)
        s = sigma.float().to(x0.device).view(-1, *([1] * (x0.ndim - 1)))
        c_out2 = s**2 / (s**2 + 1) if self.schedule.v_prediction else s**2
        return (((x0_pred.float() - x0.float()) ** 2) / c_out2).mean()

    def features(self, x0):
        if self.feature_space == "latent":
            return x0.float()
        return self.models.decode(x0)

    def trainable_parameters(self):
        return self.attached.parameters()


# ---------------------------------------------------------------------------------------------
# Sampling (before/after grids, class images)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_latents(models: DiffusersModels, attached: AttachedDelta | None, prompt: str, seeds, resolution: int,
                   steps: int = 20, cfg: float = 6.0, adapted: bool = True, negative: str = "") -> torch.Tensor:
    """Euler sampling ('normal' schedule, classifier-free guidance) with the adapter on or off;
    noise per seed as ComfyUI's prepare_noise ([1, C, h, w] from torch.Generator(seed)): with the
    adapter off this is ComfyUI's KSampler (euler / normal) on the same checkpoint."""
    conds = {"pos": models.encode_prompt(prompt), "neg": models.encode_prompt(negative)}
    backend = DiffusersBackend(models, conds, attached)
    sigmas = models.schedule.sampling_sigmas(steps).to(models.device)
    h = w = resolution // models.vae_scale
    out = []
    for seed in seeds:
        noise = torch.randn([1, models.latent_channels, h, w], generator=torch.Generator().manual_seed(int(seed)))
        x = noise.to(models.device) * (1 + sigmas[0] ** 2).sqrt()  # full denoise: x_T ~ N(0, 1) in DDPM scale, as ComfyUI
        for i in range(len(sigmas) - 1):
            s = sigmas[i].view(1)
            den = backend.predict_x0(x, s, "pos", adapted)
            if cfg != 1.0:
                neg = backend.predict_x0(x, s, "neg", adapted)
                den = neg + cfg * (den - neg)
            d = (x - den) / sigmas[i]
            x = x + d * (sigmas[i + 1] - sigmas[i])
        out.append(x)
    return torch.cat(out)


@torch.no_grad()
def sample_images(models, attached, prompts: list[str], n: int, resolution: int, steps: int, cfg: float,
                  adapted: bool) -> torch.Tensor:
    """[len(prompts) * n, H, W, 3] in 0..1, row per prompt, seeds 0..n-1."""
    rows = []
    for p in prompts:
        lat = sample_latents(models, attached, p, range(n), resolution, steps, cfg, adapted)
        rows.append(((models.decode(lat) + 1) / 2).clamp(0, 1).movedim(1, -1).cpu())
    return torch.cat(rows)


# ---------------------------------------------------------------------------------------------
# Training entry point
# ---------------------------------------------------------------------------------------------

@dataclass
class DiffusersTrainOutput:
    delta: dict[str, torch.Tensor]  # in save_dtype; the attached delta holds exactly these values
    result: TrainResult
    attached: AttachedDelta


def train_domainstudio_diffusers(
    models: DiffusersModels, images: torch.Tensor, cfg: DomainStudioConfig, *, target_prompt: str = "",
    source_prompt: str = "", train_mode: str = "lora_attn", rank: int = 8, alpha: float = 8.0,
    feature_space: str = "latent", prior_latents: torch.Tensor | None = None, precision: str = "fp32",
    on_step: Callable | None = None, save_dtype: torch.dtype = SAVE_DTYPE,
) -> DiffusersTrainOutput:
    """DomainStudio on diffusers models; `images` [N, R, R, 3] in 0..1. The trained delta stays
    attached (switch on) to `models.unet`, rounded to `save_dtype`; `out.attached.detach()` removes it."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(precision)
    if dtype is None:
        raise TrainingError(f"precision={precision!r} unknown; use 'fp32' or 'bf16'")
    if feature_space not in ("latent", "pixel"):
        raise TrainingError(f"feature_space={feature_space!r} unknown; use 'latent' or 'pixel'")
    with torch.inference_mode(False), torch.enable_grad():
        images = images.detach().clone().float()
        x0 = models.encode_images(images)
        conds = {"target": models.encode_prompt(target_prompt), "source": models.encode_prompt(source_prompt)}
        feats = (images.movedim(-1, 1) * 2 - 1).to(x0.device) if feature_space == "pixel" else x0
        attached = attach_trainable(models.unet, train_mode, rank, alpha, cfg.seed)
        attached.switch.enabled = True
        backend = DiffusersBackend(models, conds, attached, feature_space)
        prior = None if prior_latents is None else prior_latents.float().to(x0.device)
        try:
            with torch.autocast(x0.device.type, dtype=dtype, enabled=dtype != torch.float32):
                result = train_domainstudio(backend, x0, feats, cfg, prior_x0=prior, on_step=on_step)
        except BaseException:
            attached.detach()
            raise
        attached.round_to(save_dtype)
        for d in attached.deltas.values():
            d.requires_grad_(False)
        delta = {k: v.to(save_dtype).clone() for k, v in attached.state_dict().items()}
    return DiffusersTrainOutput(delta=delta, result=result, attached=attached)


# ---------------------------------------------------------------------------------------------
# Personalization (trainer/personalize.py): rare_token, textual_inversion, dreambooth(_no_prior)
# ---------------------------------------------------------------------------------------------

class SplicedEmbedding(torch.nn.Module):
    """The text encoder's token embedding plus `vectors` for ids first_id .. first_id + n - 1 (the
    new token and its _1, _2 ... companions, as diffusers' load_textual_inversion names them; the
    tokenizer's length, at most the embedding's row count). The original embedding matrix is used as
    it is and never written."""

    def __init__(self, base: torch.nn.Embedding, vectors: torch.Tensor, first_id: int | None = None):
        super().__init__()
        self.base = base
        self.vocab = base.num_embeddings if first_id is None else int(first_id)
        self.vectors = vectors if isinstance(vectors, torch.nn.Parameter) else torch.nn.Parameter(vectors)

    @property
    def weight(self):  # what transformers reads for dtype/device
        return self.base.weight

    def forward(self, ids):
        new = ids >= self.vocab
        out = self.base(ids.clamp(max=self.vocab - 1))
        if new.any():
            rows = self.vectors.to(out.dtype)[(ids - self.vocab).clamp(min=0)]
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


@dataclass
class InstalledToken:
    trigger: str
    vectors: torch.nn.Parameter  # [n, dim]
    embedding: SplicedEmbedding
    base: torch.nn.Embedding

    def remove(self, models: "DiffusersModels") -> None:
        models.text_encoder.set_input_embeddings(self.base)


def install_token(models: DiffusersModels, trigger: str, init_word: str, n: int = 1) -> InstalledToken:
    """Give models.tokenizer (replaced by a copy: the caller's tokenizer is untouched) the words of
    `trigger` and splice trainable vectors for them, initialised from `init_word`'s embedding, into
    the text encoder's input embedding."""
    import copy

    tok = models.tokenizer
    ids = tok(trigger, add_special_tokens=False).input_ids
    if trigger in tok.get_vocab() or (len(ids) == 1 and tok.convert_ids_to_tokens(ids)[0] in (trigger, trigger + "</w>")):
        raise TrainingError(f"new_token={trigger!r} is already a word of CLIP's vocabulary; prompts using it would lose "
                            "its usual meaning. Choose a made-up word such as 'ds_subject' or 'zwx_dog'.")
    base = models.text_encoder.get_input_embeddings()
    if isinstance(base, SplicedEmbedding):
        raise TrainingError("the text encoder already carries a spliced token; remove it first")
    init_ids = tok(init_word, add_special_tokens=False).input_ids or [tok.eos_token_id]
    with torch.no_grad():
        init = base.weight[init_ids].float().mean(0) if len(init_ids) > 1 else base.weight[init_ids[0]].float()
    vectors = torch.nn.Parameter(init.detach().clone().unsqueeze(0).repeat(n, 1))
    new_tok = copy.deepcopy(tok)
    added = new_tok.add_tokens(token_names(trigger, n))
    first = new_tok.convert_tokens_to_ids(trigger)
    if added != n or first != len(tok) or first > base.num_embeddings:
        raise TrainingError(f"could not add {trigger!r} as {n} new token(s) after the vocabulary "
                            f"(got id {first}, tokenizer {len(tok)}, embedding rows {base.num_embeddings})")
    spliced = SplicedEmbedding(base, vectors, first)
    models.tokenizer = new_tok
    models.text_encoder.set_input_embeddings(spliced)
    return InstalledToken(trigger, vectors, spliced, base)


class DiffusersPromptBackend(DiffusersBackend):
    """trainer.personalize.PromptBackend over diffusers models. `cached` = None encodes every call
    (gradients reach trainable token vectors); a dict caches detached prompt embeddings."""

    def __init__(self, models: DiffusersModels, attached: AttachedDelta | None, cached: dict | None,
                 trigger: str = "", n_vectors: int = 1):
        super().__init__(models, {}, attached)
        self.cached = cached
        self.trigger, self.n_vectors = trigger, n_vectors

    def encode(self, prompt: str):
        if self.cached is not None and prompt in self.cached:
            return self.cached[prompt]
        m = self.models
        text = expand_trigger(prompt, self.trigger, self.n_vectors) if self.trigger else prompt
        max_len = min(int(m.tokenizer.model_max_length), int(m.text_encoder.config.max_position_embeddings))
        ids = m.tokenizer(text, padding="max_length", max_length=max_len, truncation=True,
                          return_tensors="pt").input_ids.to(m.device)
        cond = m.text_encoder(ids)[0].float()
        if self.cached is not None:
            cond = cond.detach()
            self.cached[prompt] = cond
        return cond

    def predict_x0(self, xt, sigma, cond):
        return self.model_x0(xt, sigma, cond)


EMBEDDING_KEYS = {"sd1": "clip_l", "sd2": "clip_h"}


@dataclass
class DiffusersPersonalizeOutput:
    delta: dict[str, torch.Tensor] | None  # UNet delta (save_dtype), kohya names of diffusers paths
    vectors: dict[str, torch.Tensor] | None  # {'clip_l': [n, 768]} (SD1) / {'clip_h': [n, 1024]} (SD2)
    stages: list = None
    warnings: list = None
    attached: AttachedDelta | None = None
    token: InstalledToken | None = None


def train_personalization_diffusers(
    models: DiffusersModels, images: torch.Tensor, cfg, *, train_mode: str = "lora_attn", rank: int = 8,
    alpha: float = 8.0, prior_latents: torch.Tensor | None = None, on_step: Callable | None = None,
    save_dtype: torch.dtype = SAVE_DTYPE,
) -> DiffusersPersonalizeOutput:
    """Run `cfg.method` (trainer.personalize.PersonalizeConfig) on diffusers models. Afterwards the
    learned token stays installed (models.tokenizer is a copy that knows it, the text encoder's input
    embedding is spliced) and the UNet delta stays attached, so sampling shows the result;
    out.token.remove(models) / out.attached.detach() undo them. Weights are never written."""
    from ..personalize import train_stage, trains_unet, uses_token

    warnings = cfg.validate(int(images.shape[0]))
    if models.family not in EMBEDDING_KEYS:
        raise TrainingError(f"personalization on {models.family} is not supported by the diffusers host")
    out = DiffusersPersonalizeOutput(delta=None, vectors=None, stages=[], warnings=warnings)
    trigger = cfg.trigger.strip()
    with torch.inference_mode(False), torch.enable_grad():
        x0 = models.encode_images(images.detach().clone().float())
        if uses_token(cfg.method):
            # rare_token starts from the rare adjective, Textual Inversion from the class noun (as the ComfyUI host)
            ti_noun = cfg.method == "textual_inversion" and cfg.class_noun.strip()
            init = cfg.class_noun.strip() if ti_noun else cfg.init_word.strip()
            out.token = install_token(models, trigger, init, cfg.num_vectors)
            models.text_encoder.requires_grad_(False)
            out.token.vectors.requires_grad_(True)
            backend = DiffusersPromptBackend(models, None, None, trigger, cfg.num_vectors)
            try:
                out.stages.append(train_stage(backend, x0, [out.token.vectors], name="token", steps=cfg.ti_steps,
                                              learning_rate=cfg.ti_learning_rate, prompts=cfg.stage1_prompts(),
                                              batch_size=cfg.batch_size, seed=cfg.seed,
                                              max_grad_norm=cfg.max_grad_norm, on_step=on_step))
            except BaseException:
                out.token.remove(models)
                raise
            touched = [n for n, p in models.text_encoder.named_parameters() if p.grad is not None and n != "vectors"
                       and not n.endswith(".vectors")]
            if touched:
                raise TrainingError(f"internal error: stage 1 reached text-encoder weights {touched[:3]}")
            out.token.vectors.requires_grad_(False)
            out.vectors = {EMBEDDING_KEYS[models.family]: out.token.vectors.detach().float().clone()}
        if trains_unet(cfg.method):
            use_prior = cfg.method == "dreambooth" and prior_latents is not None and cfg.lambda_prior > 0
            cached = {}
            backend = DiffusersPromptBackend(models, None, cached, trigger if out.token else "", cfg.num_vectors)
            with torch.no_grad():
                backend.encode(cfg.instance_prompt())
                if use_prior:
                    backend.encode(cfg.class_prompt())
            out.attached = attach_trainable(models.unet, train_mode, rank, alpha, cfg.seed)
            backend.attached = out.attached
            prior = prior_latents.float().to(x0.device) if use_prior else None
            try:
                out.stages.append(train_stage(backend, x0, out.attached.parameters(), name="unet",
                                              steps=cfg.unet_steps, learning_rate=cfg.unet_learning_rate,
                                              prompts=[cfg.instance_prompt()], batch_size=cfg.batch_size,
                                              seed=cfg.seed + 1, prior_x0=prior, prior_prompt=cfg.class_prompt(),
                                              lambda_prior=cfg.lambda_prior if use_prior else 0.0,
                                              max_grad_norm=cfg.max_grad_norm, on_step=on_step))
            except BaseException:
                out.attached.detach()
                if out.token:
                    out.token.remove(models)
                raise
            out.attached.round_to(save_dtype)
            for d in out.attached.deltas.values():
                d.requires_grad_(False)
            out.delta = {k: v.to(save_dtype).clone() for k, v in out.attached.state_dict().items()}
    return out
