"""ComfyUI host adapter: the only module of trainer/ that imports ComfyUI.

Training runs *inside* ComfyUI's own sampling machinery (a CFGGuider driving a custom Sampler,
as comfy_extras/nodes_train.py does), so conditioning, SD1/SDXL extras, model wrappers and the
model's parameterisation (eps, v, flow) are the host's own. Trainable weights are attached with
ModelPatcher.add_weight_wrapper; every wrapper reads one shared switch, so the frozen source model
is the very same weights with the adapter off (no second copy in memory).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.sd
import comfy.utils
from comfy.weight_adapter.lora import LoRAAdapter

from .. import deltas, layers
from ..domainstudio import DomainStudioConfig, TrainResult, TrainingError, train_domainstudio

log = logging.getLogger("DomainStudio")

TRAIN_MODES = layers.TRAIN_MODES


class AdapterSwitch:
    """Shared on/off flag read by every trainable wrapper of one training run."""

    def __init__(self):
        self.enabled = True


class SwitchedDelta(torch.nn.Module):
    """Weight wrapper: w -> w + delta(w) while the switch is on, w unchanged while it is off.

    `inner` is either ComfyUI's trainable LoRA (weight_adapter LoraDiff, called as inner(w) -> w')
    or None for a full delta held in `diff` (same shape as the weight, zero at start).
    """

    def __init__(self, switch: AdapterSwitch, inner: torch.nn.Module | None = None, diff: torch.Tensor | None = None):
        super().__init__()
        self.switch = switch
        self.inner = inner
        self.diff = None if diff is None else torch.nn.Parameter(diff)

    def __call__(self, w):
        if not self.switch.enabled:
            return w
        if self.inner is not None:
            return self.inner(w)
        return (w + self.diff.to(w.dtype)).to(w.dtype)

    def passive_memory_usage(self):
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def move_to(self, device):
        self.to(device=device)
        return self.passive_memory_usage()


def trainable_module_names(diffusion_model: torch.nn.Module, mode: str) -> list[str]:
    """Names (relative to diffusion_model) of the layers a train mode touches: ComfyUI's cast
    layers (they carry `weight_function`, where weight wrappers hook in) with a matrix weight."""
    def wrappable(m):
        w = getattr(m, "weight", None)
        return hasattr(m, "weight_function") and isinstance(w, torch.Tensor) and w.ndim >= 2

    return layers.select_layers(diffusion_model.named_modules(), mode, wrappable)


@dataclass
class AttachedDelta:
    switch: AdapterSwitch
    modules: dict[str, SwitchedDelta]  # diffusion_model-relative layer name -> wrapper
    mode: str
    rank: int
    alpha: float
    weight_shapes: dict[str, tuple[int, ...]]

    def parameters(self) -> list[torch.Tensor]:
        """The trained tensors (LoRA factors or full deltas; LoRA alpha is a fixed hyper-parameter)."""
        return [p for m in self.modules.values() for n, p in m.named_parameters() if not n.endswith("alpha")]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained delta as a portable file (kohya names; see trainer/deltas.py)."""
        out = {}
        for name, m in self.modules.items():
            if m.inner is not None:
                out.update(deltas.lora_entries(name, m.inner.lora_up.weight, m.inner.lora_down.weight,
                                               float(m.inner.alpha), self.weight_shapes[name]))
            else:
                out.update(deltas.diff_entries(name, m.diff))
        return out


def attach_trainable(patcher, mode: str, rank: int = 8, alpha: float = 8.0, seed: int = 0,
                     dtype: torch.dtype = torch.float32) -> AttachedDelta:
    """Attach switchable trainable deltas to the ModelPatcher `patcher` (a clone: wrappers are per
    clone, the weights themselves are shared and never written)."""
    dm = patcher.model.diffusion_model
    names = trainable_module_names(dm, mode)
    switch = AdapterSwitch()
    modules, shapes = {}, {}
    is_lora = mode.startswith("lora")
    if is_lora and (rank < 1 or not math.isfinite(alpha) or alpha <= 0):
        raise TrainingError(f"LoRA rank={rank} / alpha={alpha} invalid: rank >= 1 and alpha > 0 (alpha = rank is a safe default)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in names:
            weight = dm.get_submodule(name).weight
            shapes[name] = tuple(weight.shape)
            if is_lora:
                inner = LoRAAdapter.create_train(weight, rank=min(rank, *weight.shape[:2]), alpha=alpha).to(dtype)
                wrapper = SwitchedDelta(switch, inner=inner)
            else:
                wrapper = SwitchedDelta(switch, diff=torch.zeros(weight.shape, dtype=dtype, device=weight.device))
            wrapper.requires_grad_(True)
            if is_lora:
                wrapper.inner.alpha.requires_grad_(False)
            patcher.add_weight_wrapper(f"diffusion_model.{name}.weight", wrapper)
            modules[name] = wrapper
    return AttachedDelta(switch, modules, mode, rank, alpha, shapes)


class _TrainingGuider(comfy.samplers.CFGGuider):
    """Single-prompt guider (cfg 1) whose active conditioning can be switched per call."""

    active = "target"

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        return comfy.samplers.sampling_function(self.inner_model, x, timestep, None, self.conds[self.active],
                                                1.0, model_options=model_options, seed=seed)


class ComfyBackend:
    """trainer.domainstudio.Backend over a model that ComfyUI has loaded for sampling."""

    def __init__(self, guider: _TrainingGuider, extra_args: dict, attached: AttachedDelta, vae, feature_space: str):
        self.guider = guider
        self.extra_args = extra_args
        self.attached = attached
        self.vae = vae
        self.feature_space = feature_space
        self.ms = guider.inner_model.model_sampling

    def sample_sigmas(self, n, generator):
        # Uniform in "percent of the schedule", i.e. uniform timesteps, mapped through the host.
        u = torch.rand(n, generator=generator).clamp(max=0.999)
        return torch.tensor([float(self.ms.percent_to_sigma(float(p))) for p in u])

    def add_noise(self, x0, noise, sigma):
        return self.ms.noise_scaling(sigma, noise, x0, max_denoise=False)

    def predict_x0(self, xt, sigma, prompt, adapted):
        self.guider.active = prompt
        if self.attached is None:
            return self.guider(xt, sigma, **self.extra_args).float()
        self.attached.switch.enabled = adapted
        try:
            return self.guider(xt, sigma, **self.extra_args).float()
        finally:
            self.attached.switch.enabled = True

    def denoising_loss(self, x0_pred, x0, sigma):
        # The model's native loss written through x0: ||F - F*||^2 = ||x0_pred - x0||^2 / c_out^2
        # (c_out = -sigma for eps and flow models; sigma*sd/sqrt(sigma^2+sd^2) for v-prediction).
        s = sigma.float().view(-1, *([1] * (x0.ndim - 1)))
        if isinstance(self.ms, comfy.model_sampling.V_PREDICTION):
            sd = float(self.ms.sigma_data)
            c_out2 = (s * sd) ** 2 / (s**2 + sd**2)
        else:
            c_out2 = s**2
        return (((x0_pred.float() - x0.float()) ** 2) / c_out2).mean()

    def features(self, x0):
        if self.feature_space == "latent":
            return x0.float()
        raw = self.guider.inner_model.process_latent_out(x0)
        fsm = self.vae.first_stage_model
        return fsm.decode(raw.to(self.vae.vae_dtype)).float()  # [-1, 1], gradients flow to x0

    def trainable_parameters(self):
        return self.attached.parameters()


def make_autograd_safe(module: torch.nn.Module) -> int:
    """Swap inference-mode tensors of `module` for value-identical normal ones; returns how many.

    Graph nodes run under torch.inference_mode(), so a model loaded there holds inference tensors
    and autograd refuses to save them for backward (on the CPU, loading to the device is a no-op and
    does not copy them). Values are unchanged bit for bit, so the shared model behaves as before."""
    swapped = 0
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_inference():
                m._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
                swapped += 1
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_inference():
                m._buffers[name] = b.clone()
                swapped += 1
    return swapped


class _TrainingSampler(comfy.samplers.Sampler):
    def __init__(self, run: Callable):
        self.run = run
        self.result = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self.result = self.run(model_wrap, extra_args, latent_image)
        return torch.zeros_like(latent_image)


def model_family(model) -> str:
    """'sdxl', 'sd2' or 'sd1' (the default) from the host's detected model config."""
    import comfy.supported_models as sm

    cfg = model.model.model_config
    if isinstance(cfg, sm.SDXL):
        return "sdxl"
    if isinstance(cfg, sm.SD20):
        return "sd2"
    return "sd1"


def encode_prompt(clip, text: str):
    """CONDITIONING for `text`, as the stock CLIPTextEncode node makes it."""
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens)


def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents of IMAGE [N, H, W, 3] in 0..1 (host latent space, before process_latent_in)."""
    return vae.encode(images[:, :, :, :3])


_PRIOR_CACHE: dict = {}


def generate_class_latents(model, clip, prompt: str, count: int, resolution: int, seed: int, steps: int = 20,
                           cfg: float = 6.0, progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Class images for prior preservation, sampled by the *source* model from the source prompt.
    Cached in memory per (model weights + patches, prompt, count, size, seed, steps, cfg)."""
    key = (id(model.model), getattr(model, "patches_uuid", None), prompt, count, resolution, seed, steps, cfg)
    if key in _PRIOR_CACHE:
        return _PRIOR_CACHE[key]
    positive = encode_prompt(clip, prompt)
    negative = encode_prompt(clip, "")
    h = w = resolution // 8
    out = []
    for i in range(count):
        latent = torch.zeros([1, 4, h, w])
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        noise = comfy.sample.prepare_noise(latent, seed + i)
        out.append(comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                                       disable_pbar=True, seed=seed + i))
        if progress:
            progress(i + 1)
    lat = torch.cat(out).float()
    if len(_PRIOR_CACHE) > 4:
        _PRIOR_CACHE.pop(next(iter(_PRIOR_CACHE)))
    _PRIOR_CACHE[key] = lat
    return lat


@dataclass
class ComfyTrainOutput:
    model: object  # patched ModelPatcher clone (stock LoRA/diff patches, as LoraLoader makes them)
    delta: dict[str, torch.Tensor]  # the trained delta in the file's dtype (save_dtype); the MODEL uses these values
    result: TrainResult
    attached: AttachedDelta


SAVE_DTYPE = torch.float16  # default file dtype; the returned MODEL uses the same values as the file


def run_in_sampler(patcher, conds: dict, latents: torch.Tensor, fn: Callable, seed: int = 0):
    """Run fn(model_wrap, extra_args, model_space_latents) inside ComfyUI's sampling set-up for
    `patcher` (models loaded, wrappers/patches applied, `conds` processed). Returns fn's result."""
    guider = _TrainingGuider(patcher)
    guider.inner_set_conds(conds)
    sampler = _TrainingSampler(fn)
    guider.sample(torch.zeros_like(latents), latents, sampler, torch.tensor([1.0, 0.0]), seed=seed, disable_pbar=True)
    return sampler.result


def train_domainstudio_comfy(
    model, clip, vae, images: torch.Tensor, cfg: DomainStudioConfig, *,
    target_prompt: str = "", source_prompt: str = "", train_mode: str = "lora_attn", rank: int = 8,
    alpha: float = 8.0, feature_space: str = "latent", prior_latents: torch.Tensor | None = None,
    precision: str = "fp32", on_step: Callable | None = None, save_dtype: torch.dtype = SAVE_DTYPE,
) -> ComfyTrainOutput:
    """Run DomainStudio on a ComfyUI MODEL. `images` IMAGE [N, R, R, 3]; the input model is never
    modified (training happens on a clone whose wrappers are discarded afterwards)."""
    if feature_space not in ("latent", "pixel"):
        raise TrainingError(f"feature_space={feature_space!r} unknown; use 'latent' or 'pixel'")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(precision)
    if dtype is None:
        raise TrainingError(f"precision={precision!r} unknown; use 'fp32' or 'bf16'")

    with torch.inference_mode(False), torch.enable_grad():
        images = images.detach().clone().float()  # inputs from the graph are inference tensors
        with torch.no_grad():
            raw = encode_images(vae, images).clone()
            conds = {"target": encode_prompt(clip, target_prompt), "source": encode_prompt(clip, source_prompt)}
        feats = images.movedim(-1, 1).clone() * 2 - 1 if feature_space == "pixel" else None  # decoder range

        work = model.clone()
        if dtype != torch.float32:
            work.set_model_compute_dtype(dtype)
        attached = attach_trainable(work, train_mode, rank, alpha, cfg.seed)
        work.model.requires_grad_(False)
        if feature_space == "pixel":
            comfy.model_management.load_models_gpu([vae.patcher])
            vae.first_stage_model.requires_grad_(False)
            make_autograd_safe(vae.first_stage_model)

        n = raw.shape[0]
        all_raw = raw if prior_latents is None else torch.cat([raw, prior_latents.to(raw)])
        # Training needs room for activations and optimiser state that the sampling estimate does
        # not count: like the built-in trainer, free other models and load this one fully.
        comfy.model_management.load_models_gpu([work], memory_required=1e20, force_full_load=True)

        def run(model_wrap, extra_args, latent_in):
            make_autograd_safe(model_wrap.inner_model.diffusion_model)  # after load: weights are final here
            backend = ComfyBackend(model_wrap, extra_args, attached, vae, feature_space)
            x0 = latent_in[:n].float().clone()
            prior = latent_in[n:].float().clone() if prior_latents is not None else None
            with torch.autocast(x0.device.type, dtype=dtype, enabled=dtype != torch.float32):
                return train_domainstudio(backend, x0, feats.to(x0.device) if feats is not None else x0, cfg,
                                          prior_x0=prior, on_step=on_step)

        result = run_in_sampler(work, conds, all_raw, run, seed=cfg.seed)
        delta = {k: v.detach().to(save_dtype).clone() for k, v in attached.state_dict().items()}
        for m in attached.modules.values():
            m.requires_grad_(False)

    patched, _ = comfy.sd.load_lora_for_models(model, None, delta, 1.0, 0.0)
    return ComfyTrainOutput(model=patched, delta=delta, result=result, attached=attached)


def denoising_loss_on_set(model, clip, vae, images: torch.Tensor, prompt: str = "", draws: int = 8,
                          seed: int = 0) -> float:
    """Mean native denoising loss of `model` on `images` over fixed (noise, sigma) draws: the same
    draws for every model given the same seed, so two models can be compared (tests, benchmarks)."""
    with torch.inference_mode(False), torch.no_grad():
        images = images.detach().clone().float()
        raw = encode_images(vae, images).clone()
        conds = {"target": encode_prompt(clip, prompt)}

        def run(model_wrap, extra_args, latent_in):
            backend = ComfyBackend(model_wrap, extra_args, None, vae, "latent")
            gen = torch.Generator().manual_seed(seed)
            x0 = latent_in.float()
            total = 0.0
            for _ in range(draws):
                noise = torch.randn(x0.shape, generator=gen).to(x0)
                sigma = backend.sample_sigmas(x0.shape[0], gen).to(x0.device)
                pred = backend.predict_x0(backend.add_noise(x0, noise, sigma), sigma, "target", adapted=True)
                total += float(backend.denoising_loss(pred, x0, sigma))
            return total / draws

        return run_in_sampler(model.clone(), conds, raw, run, seed=seed)


# ---------------------------------------------------------------------------------------------
# Weight files: fingerprint, applying saved deltas and embeddings (see trainer/deltas.py,
# trainer/embeddings.py)
# ---------------------------------------------------------------------------------------------

def unet_base_state(model) -> dict[str, torch.Tensor]:
    """The UNet state dict of a ComfyUI MODEL (ldm names, no prefix) with the *unpatched* weights:
    when a patched clone of the same model is loaded, ComfyUI has written its patches into the
    shared weights and kept the originals in that clone's `backup`; those are substituted here."""
    base = model.model
    state = dict(base.diffusion_model.state_dict())
    clones = [model] + [lm.model for lm in comfy.model_management.current_loaded_models
                        if lm.model is not None and getattr(lm.model, "model", None) is base]
    for patcher in clones:
        for key, bk in getattr(patcher, "backup", {}).items():
            if key.startswith("diffusion_model."):
                state[key[len("diffusion_model."):]] = bk.weight
    return state


def fingerprint(model) -> str:
    """deltas.model_fingerprint of a ComfyUI MODEL's base UNet weights."""
    return deltas.model_fingerprint(unet_base_state(model))


_ADAPTER_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", ".alpha", ".dora_scale",
                     ".lora_A.weight", ".lora_B.weight", ".lora.up.weight", ".lora.down.weight", ".diff", ".diff_b",
                     ".set_weight", ".w_norm", ".b_norm", ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b",
                     ".hada_t1", ".hada_t2", ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a",
                     ".lokr_w2_b", ".lokr_t2", ".oft_blocks", ".rescale")


def unmatched_lora_keys(model, clip, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Keys of a LoRA/diff state dict that ComfyUI would report as 'lora key not loaded' for this
    MODEL (and CLIP, when given): the architecture check done before anything is patched."""
    import comfy.lora
    import comfy.lora_convert

    key_map = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    converted = comfy.lora_convert.convert_lora(dict(tensors))
    missing = []
    for k in converted:
        base = next((k[: -len(s)] for s in _ADAPTER_SUFFIXES if k.endswith(s)), None)
        if base is None:
            base = k.partition(".")[0]
        if base not in key_map and not k.startswith("bundle_emb."):
            missing.append(k)
    return missing


@dataclass
class AppliedWeights:
    model: object
    clip: object
    info: str
    mismatches: list


def apply_delta_file(model, clip, path: str, strength_model: float = 1.0, strength_clip: float = 1.0,
                     override: bool = False) -> AppliedWeights:
    """Patch MODEL (and CLIP for text-encoder deltas) with a saved LoRA/diff file, after checking its
    architecture (metadata and key names) and base-model fingerprint against the loaded model."""
    tensors, md = deltas.read_weight_file(path)
    name = os.path.basename(path)
    mismatches = deltas.check_compatible(md, family=model_family(model), fingerprint=fingerprint(model),
                                         override=override, name=name)
    has_te = any(k.startswith(("lora_te", "text_encoders.")) for k in tensors)
    missing = unmatched_lora_keys(model, clip if has_te else None, tensors)
    if has_te and clip is None:
        mismatches.append("the file has text-encoder weights but no CLIP is connected; they are ignored")
    if missing:
        msg = (f"{len(missing)} of {len(tensors)} weights in {name} match no layer of the loaded model "
               f"(first: {missing[0]}): it was made for another architecture")
        if not override:
            raise deltas.WeightFileError(msg + ". Load the matching model, or set ignore_mismatch to apply the rest")
        mismatches.append(msg)
        tensors = {k: v for k, v in tensors.items() if k not in set(missing)}
    new_model, new_clip = comfy.sd.load_lora_for_models(model, clip if has_te else None, tensors, strength_model,
                                                        strength_clip)
    info = (f"{name}: {md.get('domainstudio.kind', 'delta')} ({md.get('domainstudio.method', 'unknown method')}), "
            f"{len(tensors)} tensors, strength {strength_model:g}")
    if mismatches:
        info += " | applied despite: " + "; ".join(mismatches)
    return AppliedWeights(new_model, new_clip if new_clip is not None else clip, info, mismatches)


def _sub_tokenizers(tokenizer):
    from comfy.sd1_clip import SDTokenizer

    for attr, value in list(vars(tokenizer).items()):
        if isinstance(value, SDTokenizer):
            yield attr, value


def clip_with_embedding(clip, name: str, vectors: dict[str, torch.Tensor], strength: float = 1.0):
    """A clone of `clip` whose prompts resolve `embedding:<name>` to `vectors` (scaled by
    `strength`), whatever its embedding folders hold. The input CLIP and its tokenizer are untouched
    (CLIP.clone shares the tokenizer, so it is copied)."""
    import copy
    import types

    new = clip.clone()
    new.tokenizer = copy.copy(clip.tokenizer)
    hooked = 0
    for attr, tok in _sub_tokenizers(new.tokenizer):
        vec = vectors.get(tok.embedding_key)
        if vec is None:
            continue
        sub = copy.copy(tok)
        if sub.embedding_directory is None:
            sub.embedding_directory = []  # ComfyUI only parses embedding:NAME when a directory is set
        base_lookup = tok._try_get_embedding
        scaled = (vec.float() * float(strength))

        def _try_get_embedding(self, embedding_name, _base=base_lookup, _vec=scaled):
            parts = embedding_name.split()
            if parts:
                word = parts[0].strip(",")
                stem = os.path.splitext(word)[0] if word.lower().endswith((".safetensors", ".pt", ".bin")) else word
                if stem == name:
                    rest = parts[0][len(word):]
                    return _vec.clone(), " ".join(([rest] if rest else []) + parts[1:])
            return _base(embedding_name)

        sub._try_get_embedding = types.MethodType(_try_get_embedding, sub)
        setattr(new.tokenizer, attr, sub)
        hooked += 1
    if not hooked:
        raise deltas.WeightFileError(f"embedding {name!r} has vectors for {sorted(vectors)} but this CLIP's text "
                                     "encoders take none of them (wrong architecture)")
    return new


def clip_embedding_keys(clip) -> set[str]:
    return {tok.embedding_key for _, tok in _sub_tokenizers(clip.tokenizer)}


def apply_embedding_file(clip, path: str, strength: float = 1.0, model=None, override: bool = False) -> AppliedWeights:
    """CLIP that understands `embedding:<file stem>` as the file's vectors × strength, after checking
    that the file's text encoders are the CLIP's (and, with a MODEL, the base fingerprint)."""
    from ..embeddings import family_of, read_embedding

    vectors, md = read_embedding(path)
    name = os.path.splitext(os.path.basename(path))[0]
    mismatches = []
    wanted = clip_embedding_keys(clip)
    if set(vectors) != wanted:
        msg = (f"{os.path.basename(path)} holds vectors for {sorted(vectors)} ({family_of(vectors)}) but the CLIP's "
               f"text encoders are {sorted(wanted)}")
        if not override or not set(vectors) & wanted:
            raise deltas.WeightFileError(msg + ". Use the CLIP of the model the embedding was trained for"
                                         + ("" if set(vectors) & wanted else " (nothing of it can be applied)"))
        mismatches.append(msg)
    if model is not None:
        mismatches += deltas.check_compatible(md, family=model_family(model), fingerprint=fingerprint(model),
                                              override=override, name=os.path.basename(path))
    new = clip_with_embedding(clip, name, vectors, strength)
    n = next(iter(vectors.values())).shape[0]
    info = f"{os.path.basename(path)}: embedding, {n} vector(s); write embedding:{name} in the prompt"
    if mismatches:
        info += " | applied despite: " + "; ".join(mismatches)
    return AppliedWeights(model, new, info, mismatches)
