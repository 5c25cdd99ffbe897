"""The ComfyUI host: trainer.host.Host over the MODEL / CLIP / VAE of a ComfyUI graph.

Training happens on a *clone* of the input MODEL: trainable weights are attached with
ModelPatcher.add_weight_wrapper (ComfyUI's own LoRA weight adapters, or a full delta), all behind
one switch, so the frozen source model is the very same weights with the switch off (no second
copy in memory) and the input MODEL is never modified. The UNet is called through the host's own
BaseModel.apply_model (its parameterisation, model wrappers, SDXL's pooled-text `y` from
encode_adm) inside ComfyUI's sampling set-up (trainer/hosts/comfy_compat.run_in_sampling).
Learned words reach the text encoder the way `embedding:NAME` does (comfy_compat.clip_with_words).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.sd
from comfy.weight_adapter.lora import LoRAAdapter

from .. import deltas, layers, losses
from ..errors import TrainingError
from ..host import Adapter, AdapterSwitch, Exported, Host, LayerDelta, SessionNeeds, Token
from . import comfy_compat as compat

log = logging.getLogger("DomainStudio")


class SwitchedDelta(torch.nn.Module):
    """Weight wrapper: w -> w + delta(w) while the switch is on, w unchanged while it is off.
    `inner` is ComfyUI's trainable LoRA (weight_adapter LoraDiff, inner(w) -> w') or None for a
    full delta held in `diff` (same shape as the weight, zero at start)."""

    def __init__(self, switch: AdapterSwitch, inner: torch.nn.Module | None = None, diff: torch.Tensor | None = None):
        super().__init__()
        self.switch = switch
        self.inner = inner
        self.diff = None if diff is None else torch.nn.Parameter(diff)
        self.bypass = False  # set by `bypass`: the delta is added as its own branch instead

    def __call__(self, w):
        if not self.switch.enabled or self.bypass:
            return w
        if self.inner is not None:
            return self.inner(w)
        return (w + self.diff.to(w.dtype)).to(w.dtype)

    def passive_memory_usage(self):
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def move_to(self, device):
        self.to(device=device)
        return self.passive_memory_usage()


def _branch(wrapper: SwitchedDelta, module: torch.nn.Module, args, out):
    """Forward hook: the layer's output plus its trained delta applied to the same input."""
    if not wrapper.switch.enabled:
        return None
    x = args[0]
    conv = module.weight.ndim > 2
    kw = dict(stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups) \
        if conv else {}
    if wrapper.inner is not None:
        lora = wrapper.inner
        down, up = lora.lora_down.weight, lora.lora_up.weight
        if conv:
            h = torch.nn.functional.conv2d(x, down.reshape(down.shape[0], *module.weight.shape[1:]).to(x.dtype), **kw)
            d = torch.nn.functional.conv2d(h, up.reshape(*up.shape[:2], 1, 1).to(h.dtype))
        else:
            d = torch.nn.functional.linear(torch.nn.functional.linear(x, down.to(x.dtype)), up.to(x.dtype))
        d = d * (lora.alpha / lora.rank)
    else:
        diff = wrapper.diff.to(x.dtype)
        d = torch.nn.functional.conv2d(x, diff, **kw) if conv else torch.nn.functional.linear(x, diff)
    return out + d.to(out.dtype)


@contextlib.contextmanager
def bypass(diffusion_model: torch.nn.Module, modules: dict[str, SwitchedDelta]):
    """While training in a low-precision compute dtype, add every trained delta as its own branch
    of its layer's output (y = W x + delta(x), as kohya and PEFT do) instead of merging it into the
    weight. Merged, W + delta is rounded to bf16/fp16 before the matmul, and a delta below half a unit
    in the last place of each weight (bf16: ~0.4 % of it) vanishes from the forward pass while its
    gradient still flows: the first hundreds of LoRA steps trained blind, with a loss bit-identical
    to the untouched model's (measured on the miniature model: 100 steps at lr 3e-4 in bf16 gave
    exactly the lr-1e-8 losses; in fp32 the loss fell 0.150 -> 0.122). The hooks live only inside
    the session: the modules are shared with every other user of the model."""
    handles = []
    try:
        for name, wrapper in modules.items():
            wrapper.bypass = True
            handles.append(diffusion_model.get_submodule(name).register_forward_hook(
                lambda m, a, o, _w=wrapper: _branch(_w, m, a, o)))
        yield
    finally:
        for h in handles:
            h.remove()
        for wrapper in modules.values():
            wrapper.bypass = False


def trainable_module_names(diffusion_model: torch.nn.Module, mode: str) -> list[str]:
    """Layers a train mode touches: ComfyUI's cast layers (they carry `weight_function`, where
    weight wrappers hook in) with a matrix weight."""
    def wrappable(m):
        w = getattr(m, "weight", None)
        return hasattr(m, "weight_function") and isinstance(w, torch.Tensor) and w.ndim >= 2

    return layers.select_layers(diffusion_model.named_modules(), mode, wrappable)


class ComfyAdapter(Adapter):
    def __init__(self, patcher, switch: AdapterSwitch, modules: dict[str, SwitchedDelta], mode: str, rank: int,
                 alpha: float, shapes: dict[str, tuple[int, ...]]):
        self.patcher, self.switch, self.modules = patcher, switch, modules
        self.mode, self.rank, self.alpha, self.shapes = mode, rank, alpha, shapes

    def layers(self) -> list[LayerDelta]:
        out = []
        for name, m in self.modules.items():
            if m.inner is not None:
                out.append(LayerDelta(name, self.shapes[name], up=m.inner.lora_up.weight, down=m.inner.lora_down.weight,
                                      alpha=float(m.inner.alpha)))
            else:
                out.append(LayerDelta(name, self.shapes[name], diff=m.diff))
        return out


def start_like_kohya(lora) -> None:
    """Start a ComfyUI LoraDiff the way kohya, PEFT, diffusers and the pack's diffusers host do:
    down ~ Kaiming uniform over the input width (a = sqrt 5), up = 0. ComfyUI's create_train does the
    reverse (up ~ Kaiming over the rank, down = 0): the delta is zero either way, but its first updates
    are then scaled by |up| ~ 1/sqrt(rank) instead of |down| ~ 1/sqrt(in_width), which made the same
    learning rate move the weights 4-5x further (bench/personalize_quality.py --init comfy|peft:
    median |dW|/|W| 0.059 vs 0.013 after 400 steps at 1e-4) and left the usual LoRA learning rates
    (kohya's 1e-4) unsafe. Uses the caller's seeded RNG."""
    with torch.no_grad():  # fan-in of a [rank, in, (k, k)] weight is the layer's input width
        torch.nn.init.kaiming_uniform_(lora.lora_down.weight, a=math.sqrt(5))
        lora.lora_up.weight.zero_()


def attach_trainable(patcher, mode: str, rank: int = 8, alpha: float = 8.0, seed: int = 0) -> ComfyAdapter:
    """Attach switchable trainable deltas to the ModelPatcher `patcher` (a clone: wrappers are per
    clone; the weights themselves are shared and never written)."""
    dm = patcher.model.diffusion_model
    names = trainable_module_names(dm, mode)
    switch = AdapterSwitch()
    modules, shapes = {}, {}
    is_lora = mode.startswith("lora")
    if is_lora and (rank < 1 or not math.isfinite(alpha) or alpha <= 0):
        raise TrainingError(f"LoRA rank={rank} / alpha={alpha} invalid: rank >= 1 and alpha > 0 (alpha = rank is a "
                            "safe default)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in names:
            weight = dm.get_submodule(name).weight
            shapes[name] = tuple(weight.shape)
            if is_lora:
                inner = LoRAAdapter.create_train(weight, rank=min(rank, *weight.shape[:2]), alpha=alpha).to(torch.float32)
                start_like_kohya(inner)
                wrapper = SwitchedDelta(switch, inner=inner)
            else:
                wrapper = SwitchedDelta(switch, diff=torch.zeros(weight.shape, dtype=torch.float32, device=weight.device))
            wrapper.requires_grad_(True)
            if is_lora:
                wrapper.inner.alpha.requires_grad_(False)
            patcher.add_weight_wrapper(f"diffusion_model.{name}.weight", wrapper)
            modules[name] = wrapper
    return ComfyAdapter(patcher, switch, modules, mode, rank, alpha, shapes)


def model_family(model) -> str:
    """'sdxl', 'sd2' or 'sd1' (the default) from the host's detected model config."""
    import comfy.supported_models as sm

    cfg = model.model.model_config
    if isinstance(cfg, sm.SDXL):
        return "sdxl"
    if isinstance(cfg, sm.SD20):
        return "sd2"
    return "sd1"


def fingerprint(model) -> str:
    """deltas.model_fingerprint of a ComfyUI MODEL's unpatched UNet weights."""
    return deltas.model_fingerprint(compat.base_unet_state(model))


@dataclass
class Cond:
    """Conditioning of the host's UNet: cross-attention context [B or 1, T, D] and, for SDXL,
    the pooled CLIP-G output [B or 1, P] (turned into `y` by the model's encode_adm)."""

    context: torch.Tensor
    pooled: torch.Tensor | None


def _lcm_repeat(t: torch.Tensor, length: int) -> torch.Tensor:
    return t if t.shape[1] == length else t.repeat(1, length // t.shape[1], 1)


class ComfyHost(Host):
    name = "comfy"

    def __init__(self, model, clip, vae):
        self.model, self.clip, self.vae = model, clip, vae
        self.family = model_family(model)
        self.device = model.load_device
        self._fingerprint: str | None = None
        self._token_clips: dict[int, Any] = {}
        self._inner = None  # BaseModel inside a session
        self._topts: dict = {}
        self._adapter: ComfyAdapter | None = None
        self._empty = None

    # --- what the model is -----------------------------------------------------------------
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.model)
        return self._fingerprint

    def cache_key(self):
        return (id(self.model.model), getattr(self.model, "patches_uuid", None))

    def encoder_widths(self) -> dict[str, int]:
        return {k: int(compat.input_embedding_table(self.clip, k).shape[1])
                for k in compat.sub_tokenizers(self.clip.tokenizer)}

    def latent_format(self) -> tuple[int, int]:
        fmt = self.model.model.latent_format
        return int(getattr(fmt, "latent_channels", 4)), int(getattr(fmt, "spacial_downscale_ratio", 8))

    def free_memory(self) -> int | None:
        return compat.trainable_memory(self.device)

    def native_resolution(self) -> int | None:
        size = getattr(self.model.model.model_config, "unet_config", {}).get("image_size")
        return {"sdxl": 1024, "sd2": 768}.get(self.family, 512) if size else None

    # --- inputs --------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        raw = self.vae.encode(images[:, :, :, :3]).clone()
        return self.model.model.process_latent_in(raw).float().to(self.device)

    def _clip_for(self, token: Token | None):
        if token is None:
            return self.clip
        key = id(token)
        entry = self._token_clips.get(key)
        if entry is None or entry[0] is not token:
            entry = (token, compat.clip_with_words(self.clip, {token.trigger: token.vectors}))
            self._token_clips = {key: entry}  # one live token at a time
        return entry[1]

    def token_clip(self, token: Token):
        return self._clip_for(token)

    def encode_prompt(self, text: str, token: Token | None = None) -> Cond:
        clip = self._clip_for(token)
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        return Cond(cond, pooled)

    def conditioning(self, text: str, token: Token | None = None):
        """CONDITIONING as the stock CLIPTextEncode makes it (for ComfyUI's samplers)."""
        clip = self._clip_for(token)
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))

    def stack_conds(self, conds: list[Cond]) -> Cond:
        if len(conds) == 1 or all(c is conds[0] for c in conds):
            return conds[0]
        length = math.lcm(*[c.context.shape[1] for c in conds])
        context = torch.cat([_lcm_repeat(c.context, length) for c in conds])
        pooled = None if conds[0].pooled is None else torch.cat([c.pooled for c in conds])
        return Cond(context, pooled)

    def knows_word(self, word: str) -> bool:
        return compat.knows_word(self.clip, word)

    def token_init(self, word: str, num_vectors: int) -> dict[str, torch.Tensor]:
        return compat.init_vectors(self.clip, word, num_vectors)

    # --- trainable weights ---------------------------------------------------------------------
    def attach(self, mode: str, rank: int, alpha: float, seed: int) -> ComfyAdapter:
        return attach_trainable(self.model.clone(), mode, rank, alpha, seed)

    # --- training session ----------------------------------------------------------------------
    def session(self, fn: Callable[[], Any], needs: SessionNeeds) -> Any:
        adapter = needs.adapter
        work = adapter.patcher if adapter is not None else self.model.clone()
        if needs.dtype != torch.float32:
            work.set_model_compute_dtype(needs.dtype)
        work.model.requires_grad_(False)
        token_clip = self._clip_for(needs.token) if needs.token is not None else None
        if self._empty is None:
            with torch.inference_mode(False), torch.no_grad():
                self._empty = self.conditioning("")
        to_load = [work] + ([token_clip.patcher] if token_clip is not None else [])
        # Room for activations and optimiser state: free other models and load these fully.
        comfy.model_management.load_models_gpu(to_load, memory_required=1e20, force_full_load=True)
        if needs.decode:
            comfy.model_management.load_models_gpu([self.vae.patcher])
            self.vae.first_stage_model.requires_grad_(False)
            compat.make_autograd_safe(self.vae.first_stage_model)

        def body(inner_model, transformer_options):
            compat.make_autograd_safe(inner_model.diffusion_model)  # after load: the weights are final here
            self._inner, self._topts, self._adapter = inner_model, transformer_options, adapter
            try:
                with torch.inference_mode(False), torch.enable_grad(), contextlib.ExitStack() as stack:
                    if token_clip is not None:
                        stack.enter_context(compat.differentiable_text_encoder(token_clip))
                    if adapter is not None and needs.dtype != torch.float32:
                        stack.enter_context(bypass(inner_model.diffusion_model, adapter.modules))
                    if needs.checkpointing:
                        stack.enter_context(gradient_checkpointing(inner_model.diffusion_model))
                        if token_clip is not None:
                            stack.enter_context(gradient_checkpointing(token_clip.cond_stage_model))
                    stack.enter_context(torch.autocast(_device_type(self.device), dtype=needs.dtype,
                                                       enabled=needs.dtype != torch.float32))
                    return fn()
            finally:
                self._inner, self._topts, self._adapter = None, {}, None

        shape = tuple(needs.batch_shape)
        return compat.run_in_sampling(work, self._empty, shape, body)

    @property
    def _ms(self):
        return (self._inner or self.model.model).model_sampling

    def sample_sigmas(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Uniform in "percent of the schedule" (uniform timesteps), mapped through the host's own
        model sampling, drawn on the generator's device. For the discrete schedules of SD models
        this is percent_to_sigma computed for the whole batch at once, in the same float64 steps
        (so the values are bit-identical to calling it per sample); other samplings go one by one."""
        u = torch.rand(n, generator=generator, device=generator.device).clamp(max=0.999)
        ms = self._ms
        discrete = comfy.model_sampling.ModelSamplingDiscrete
        if (isinstance(ms, discrete) and type(ms).sigma is discrete.sigma
                and type(ms).percent_to_sigma is discrete.percent_to_sigma):
            t = ((1.0 - u.double()) * 999.0).float()
            return ms.sigma(t.to(ms.log_sigmas.device)).to(u.device)
        return torch.tensor([float(ms.percent_to_sigma(float(p))) for p in u.cpu()], device=u.device)

    def sigma_at(self, t: torch.Tensor) -> torch.Tensor:
        """ModelSamplingDiscrete.sigma (log-interpolated between the schedule's steps) for SD
        models; other samplings through percent_to_sigma(1 - t / 999), one by one."""
        ms = self._ms
        discrete = comfy.model_sampling.ModelSamplingDiscrete
        if isinstance(ms, discrete) and type(ms).sigma is discrete.sigma:
            return ms.sigma(t.float().to(ms.log_sigmas.device)).to(t.device)
        return torch.tensor([float(ms.percent_to_sigma(1.0 - float(x) / 999.0)) for x in t.cpu()], device=t.device)

    def add_noise(self, x0, noise, sigma):
        return self._ms.noise_scaling(sigma, noise, x0, max_denoise=False)

    def predict_x0(self, xt, sigma, cond: Cond, adapted: bool = True):
        inner = self._inner
        if inner is None:
            raise RuntimeError("predict_x0 is only available inside ComfyHost.session")
        b = xt.shape[0]
        extra = {}
        if cond.pooled is not None:
            h, w = xt.shape[-2] * 8, xt.shape[-1] * 8
            adm = inner.encode_adm(pooled_output=cond.pooled.to(xt.device), width=w, height=h, target_width=w,
                                   target_height=h)
            if adm is not None:  # SDXL: pooled text + size embeddings
                extra["y"] = adm.to(xt.device).expand(b, -1) if adm.shape[0] == 1 else adm.to(xt.device)
        context = cond.context.to(xt.device)
        context = context.expand(b, -1, -1) if context.shape[0] == 1 else context
        adapter = self._adapter
        if adapter is not None:
            adapter.switch.enabled = adapted
        try:
            return inner.apply_model(xt, sigma, c_crossattn=context, transformer_options=self._topts, **extra).float()
        finally:
            if adapter is not None:
                adapter.switch.enabled = True

    def denoising_loss(self, x0_pred, x0, sigma):
        ms = self._ms
        v = isinstance(ms, comfy.model_sampling.V_PREDICTION)
        return losses.denoising_loss_x0(x0_pred, x0, sigma, "v" if v else "eps", float(getattr(ms, "sigma_data", 1.0)))

    def decode(self, x0):
        raw = (self._inner or self.model.model).process_latent_out(x0)
        return self.vae.first_stage_model.decode(raw.to(self.vae.vae_dtype)).float()  # [-1, 1], gradients flow

    # --- sampling ------------------------------------------------------------------------------
    def sample(self, prompt: str, seeds, *, resolution: int, steps: int = 20, cfg: float = 6.0,
               adapter: ComfyAdapter | None = None, token: Token | None = None, negative: str = "") -> torch.Tensor:
        patcher = adapter.patcher if adapter is not None else self.model
        with torch.inference_mode():
            positive = self.conditioning(prompt, token)
            neg = self.conditioning(negative, None)
            out = []
            for seed in seeds:
                latent = torch.zeros([1, 4, resolution // 8, resolution // 8])
                latent = comfy.sample.fix_empty_latent_channels(patcher, latent)
                noise = comfy.sample.prepare_noise(latent, int(seed))
                out.append(comfy.sample.sample(patcher, noise, steps, cfg, "euler", "normal", positive, neg, latent,
                                               disable_pbar=True, seed=int(seed)))
            raw = torch.cat(out)
        with torch.inference_mode(False):
            return self.model.model.process_latent_in(raw.clone()).float().to(self.device)

    def decode_images(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            img = self.vae.decode(self.model.model.process_latent_out(latents.clone()))
        img = img.reshape(-1, *img.shape[-3:]).clamp(0, 1)
        return img.clone()

    # --- results -------------------------------------------------------------------------------
    def export(self, delta, token: Token | None) -> Exported:
        model = self.model
        if delta:
            model, _ = comfy.sd.load_lora_for_models(self.model, None, delta, 1.0, 0.0)
        clip = self.clip
        if token is not None:
            clip = compat.clip_with_words(self.clip, {token.trigger: token.detached().vectors})
        return Exported(model=model, clip=clip)


# The blocks the UNet's activations are checkpointed at: each residual block and transformer block
# (ComfyUI's built-in trainer wraps top-level forwards the same way, with torch's non-reentrant
# checkpoint; the ldm `use_checkpoint` flags use a reentrant function that only differentiates
# the blocks' own parameters, not the weight wrappers we train through).
def _checkpoint_types():
    import comfy.clip_model
    import comfy.ldm.modules.attention as attention
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel

    return (openaimodel.ResBlock, attention.BasicTransformerBlock, comfy.clip_model.CLIPLayer)


@contextlib.contextmanager
def gradient_checkpointing(module: torch.nn.Module):
    """Within the block, `module`'s residual / transformer / CLIP layers recompute their activations
    in the backward pass instead of keeping them (torch.utils.checkpoint, non-reentrant)."""
    import torch.utils.checkpoint

    wrapped = []
    types = _checkpoint_types()
    try:
        for m in module.modules():
            if isinstance(m, types):
                inner = m.forward  # an instance forward (e.g. the out-of-place CLIP one) is kept inside

                def fwd(*args, _inner=inner, **kwargs):
                    if not torch.is_grad_enabled():
                        return _inner(*args, **kwargs)
                    return torch.utils.checkpoint.checkpoint(_inner, *args, use_reentrant=False, **kwargs)

                previous = m.__dict__.get("forward")
                m.forward = fwd
                wrapped.append((m, previous))
        yield len(wrapped)
    finally:
        for m, previous in reversed(wrapped):
            if previous is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = previous


def _device_type(device) -> str:
    return torch.device(device).type


def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents of IMAGE [N, H, W, 3] in 0..1 (host latent space, before process_latent_in)."""
    return vae.encode(images[:, :, :, :3])


def encode_prompt(clip, text: str):
    """CONDITIONING for `text`, as the stock CLIPTextEncode node makes it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))
