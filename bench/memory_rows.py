"""The rows of bench/bench_memory.py and the code that measures one of them in a fresh process:

    python bench/memory_rows.py SPEC.json RESULT.json        (bench_memory.py starts this)

A row is a `Row`: `load(ctx)` builds the weights the row needs (this is "the loaded weights"),
then the harness takes the memory baseline, and `train(ctx, assets)` trains, calling
`ctx.step_done()` after every optimiser step. `step_done` time-stamps the step and, after the
last one (`ctx.total_steps` = warm-up + timed), reads the peak memory and raises `StopRow`, so a
trainer is stopped between steps without finishing its post-processing (saving, patching).
A row function records facts about itself in `ctx.info` (train mode, rank, ...). It raises
`RowUnsupported("why")` when the code under test cannot do what the row asks (recorded as
"skipped: why"), never a fake result.

Our trainers' rows (section "our trainers") are one function per row kind with the signature
`fn(ctx: RowContext, assets: dict) -> None`; assets are a ComfyUI MODEL (ModelPatcher, bf16
random weights), a CLIP, a TAESD VAE and IMAGE tensors. They call the pack's one entry point,
trainer/run.py `run(ComfyHost(model, clip, vae), method, cfg, images, RunOptions, on_progress=...)`,
and time the steps of the stage the row is about from `on_progress`. Memory settings go through
`ours_run_options()`: gradient checkpointing on/off is RunOptions.memory "low"/"max_speed", and
every `--ours-option name=value` sets that RunOptions field. Whether a row really checkpointed is
not taken on trust: the harness counts calls of torch.utils.checkpoint.checkpoint in every row
and fails a row that asked for checkpointing but made none (or the reverse).

Architectures: the real SD1.5 / SDXL UNets are what ComfyUI itself builds for the diffusers
config of those models (comfy.model_detection.model_config_from_diffusers_unet on the diffusers
UNet's state dict built on the meta device -> comfy.supported_models.SD15 / SDXL), so the
ComfyUI rows and the diffusers reference rows are the same network; the parameter counts of both
are recorded and compared. Weights are random (seeded), created directly in bf16 on the target
device (no fp32 copy), scaled by 1/sqrt(fan_in) as testing/tiny_models.py does. `quick` mode uses
one-level / two-level tiny twins of both families instead.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import statistics
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2**30
LORA_RANK = 8

# ------------------------------------------------------------------------------------------------
# Architectures
# ------------------------------------------------------------------------------------------------

# The published diffusers UNet configs (unet/config.json) of SD1.5 and SDXL base 1.0; keys left at
# diffusers' defaults are omitted.
DIFFUSERS_CONFIGS = {
    "sd15": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280, 1280],
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=768, attention_head_dim=8),
    "sdxl": dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816),
}

# Tiny twins for --quick: (ComfyUI unet_config, diffusers config) describing the same network
# (the harness checks that both have the same number of parameters).
_COMMON_COMFY = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
                 "in_channels": 4, "out_channels": 4, "model_channels": 320,
                 "use_temporal_resblock": False, "use_temporal_attention": False}
TINY_CONFIGS = {
    "sd15": (
        dict(_COMMON_COMFY, adm_in_channels=None, num_res_blocks=[1], channel_mult=[1], transformer_depth=[1],
             transformer_depth_middle=1, transformer_depth_output=[1, 1], use_linear_in_transformer=False,
             context_dim=768, num_heads=8, num_head_channels=-1),
        dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[320],
             down_block_types=["CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D"],
             cross_attention_dim=768, attention_head_dim=8)),
    "sdxl": (
        dict(_COMMON_COMFY, adm_in_channels=2816, num_classes="sequential", num_res_blocks=[1, 1], channel_mult=[1, 2],
             transformer_depth=[0, 1], transformer_depth_middle=1, transformer_depth_output=[0, 0, 1, 1],
             use_linear_in_transformer=True, context_dim=2048, num_head_channels=64, num_heads=-1),
        dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[320, 640],
             down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
             up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
             transformer_layers_per_block=[1, 1], attention_head_dim=[5, 10], cross_attention_dim=2048,
             use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
             projection_class_embeddings_input_dim=2816)),
}

CONTEXT_DIM = {"sd15": 768, "sdxl": 2048}
POOLED_DIM = {"sd15": None, "sdxl": 1280}  # SDXL: CLIP-G pooled output, part of the 2816-wide `y`


def diffusers_config(family: str, quick: bool) -> dict:
    return dict(TINY_CONFIGS[family][1] if quick else DIFFUSERS_CONFIGS[family])


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Seeded random weights in place, in the tensors' own dtype and device (no fp32 copy):
    matrices N(0, 0.8/sqrt(fan_in)) so activations stay O(1), norm weights (and TAESD's scale) 1,
    other vectors 0 -- testing/tiny_models.py's recipe."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.ndim >= 2:
                p.normal_(0.0, 0.8 / math.sqrt(p[0].numel()))
            elif leaf in ("weight", "vae_scale"):
                p.fill_(1.0)
            else:
                p.zero_()
        for _, b in module.named_buffers():
            if b.is_floating_point() and not torch.isfinite(b).all():
                b.zero_()


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def diffusers_meta_unet(family: str, quick: bool):
    """The diffusers UNet2DConditionModel of a family on the meta device (no memory)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**diffusers_config(family, quick))


def comfy_model_config(family: str, quick: bool):
    """ComfyUI's model config (comfy.supported_models.SD15 / SDXL instance) for the family."""
    import comfy.model_detection
    import comfy.supported_models as sm

    cls = {"sd15": sm.SD15, "sdxl": sm.SDXL}[family]
    if quick:
        return cls(dict(TINY_CONFIGS[family][0]))
    config = comfy.model_detection.model_config_from_diffusers_unet(diffusers_meta_unet(family, quick).state_dict())
    if type(config) is not cls:
        raise RuntimeError(f"ComfyUI detected the diffusers {family} config as {type(config).__name__}, expected "
                           f"{cls.__name__}: DIFFUSERS_CONFIGS[{family!r}] is wrong")
    return config


# ------------------------------------------------------------------------------------------------
# Memory probe
# ------------------------------------------------------------------------------------------------

def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


class MemoryProbe:
    """Process memory on the CPU (resident set), allocated CUDA memory on a GPU.

    CPU peak: the kernel's high-water mark VmHWM, reset by writing 5 to /proc/self/clear_refs
    (Linux >= 4.0). If that reset does not take effect, a 1 ms sampler thread tracks VmRSS instead
    (`method` says which was used)."""

    def __init__(self, device: str):
        self.device = device
        self.method = "cuda.max_memory_allocated" if device == "cuda" else "VmHWM"
        self._sampled = 0
        self._sampler = None

    def trim(self) -> None:
        """Give freed memory back (so the baseline RSS is live memory, not allocator slack)."""
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass

    def current(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return _proc_status_bytes("VmRSS")

    def reset_peak(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        if self.method == "VmHWM":
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                if _proc_status_bytes("VmHWM") <= _proc_status_bytes("VmRSS") + 64 * 2**20:
                    return
            except OSError:
                pass
            self.method = "VmRSS sampled every 1 ms"
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        self._sampled = _proc_status_bytes("VmRSS")

    def _sample(self) -> None:
        while True:
            self._sampled = max(self._sampled, _proc_status_bytes("VmRSS"))
            time.sleep(0.001)

    def peak(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        if self.method == "VmHWM":
            return _proc_status_bytes("VmHWM")
        return max(self._sampled, _proc_status_bytes("VmRSS"))


# ------------------------------------------------------------------------------------------------
# Row context
# ------------------------------------------------------------------------------------------------

class StopRow(Exception):
    """Raised by RowContext.step_done after the last measured step."""


class RowUnsupported(Exception):
    """The code under test cannot run this row (recorded as skipped with the message)."""


@dataclass
class RowContext:
    family: str
    resolution: int
    batch: int
    warmup: int
    timed: int
    device: str
    checkpointing: bool
    quick: bool
    probe: MemoryProbe
    ours_options: dict = field(default_factory=dict)
    seed: int = 0
    stamps: list = field(default_factory=list)
    peak_bytes: int | None = None
    info: dict = field(default_factory=dict)

    dtype = torch.bfloat16  # weights and compute (the built-in trainer trains bf16 or fp32; bf16 everywhere)

    @property
    def total_steps(self) -> int:
        return self.warmup + self.timed

    @property
    def latent_size(self) -> int:
        return self.resolution // 8

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cuda" if self.device == "cuda" else "cpu")

    def step_done(self) -> None:
        """Call after every optimiser step of the measured training."""
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        if len(self.stamps) >= self.total_steps:
            self.peak_bytes = self.probe.peak()
            raise StopRow

    def restart(self) -> None:
        """Forget the steps and the peak so far (a staged trainer whose later stage is the row)."""
        self.stamps.clear()
        self.probe.reset_peak()


@dataclass(frozen=True)
class Row:
    id: str
    kind: str  # "builtin" | "diffusers" | "ours"
    label: str
    batch: int
    load: Callable[[RowContext], dict]
    train: Callable[[RowContext, dict], None]
    # For bench_memory.py's memory estimate: what is trained and how many UNet passes with grad per step.
    trains: str = "lora"  # "lora" | "full" | "tokens"
    # UNet passes per step in units of `batch` (prior preservation: 2; DomainStudio's no-grad source pass: ~1.3)
    samples_per_step: float = 1.0
    full_text_encoder: bool = False


# ------------------------------------------------------------------------------------------------
# Loaded weights
# ------------------------------------------------------------------------------------------------

def comfy_model(ctx: RowContext):
    """A ComfyUI MODEL (ModelPatcher) of the family with random bf16 weights on the device."""
    patcher = build_comfy_model(ctx.family, ctx.quick, ctx.device, ctx.seed)
    ctx.info["unet_params"] = count_params(patcher.model.diffusion_model)
    ctx.info["comfy_model_config"] = type(patcher.model.model_config).__name__
    return patcher


def build_comfy_model(family: str, quick: bool, device: str, seed: int, disable_dynamic: bool = False):
    """Build the ModelPatcher; also ComfyUI's reload factory for it. Hosts that deep-copy a MODEL
    by loading it again (0.30.0's Train LoRA node: model.clone(force_deepcopy=True) calls the
    patcher's `cached_patcher_init`, which the stock loaders set to "load this file again") get the
    same thing from here: the same seeded weights built again, as a second load of a file would."""
    import comfy.model_patcher

    dev = torch.device("cuda" if device == "cuda" else "cpu")
    config = comfy_model_config(family, quick)
    config.set_inference_dtype(RowContext.dtype, None)
    base = config.get_model({}, device=dev)
    randomize_(base.diffusion_model, seed)
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=dev, offload_device=dev)
    if hasattr(patcher, "cached_patcher_init"):
        patcher.cached_patcher_init = (build_comfy_model, (family, quick, device, seed))
    return patcher


def comfy_clip(ctx: RowContext, full: bool):
    """A ComfyUI CLIP of the family, random bf16 weights. `full`: real-size CLIP-L (12 layers; SDXL
    also CLIP-G, 32 layers). Otherwise the same encoders cut to 1 layer (SD1: it reads the last
    layer) or 3 layers (SDXL reads the penultimate one): same output shapes (77x768 / 77x2048 plus
    the 1280-wide pooled vector), used where the text encoder only encodes fixed prompts once."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models_base as smb

    if ctx.family == "sd15":
        target = smb.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
        layers = {} if full else {"clip_l_model_config": {"num_hidden_layers": 1}}
    else:
        target = smb.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
        layers = {} if full else {"clip_l_model_config": {"num_hidden_layers": 3},
                                  "clip_g_model_config": {"num_hidden_layers": 3}}
    dev = ctx.torch_device
    clip = comfy.sd.CLIP(target, model_options={**layers, "dtype": ctx.dtype, "load_device": dev,
                                                "offload_device": dev, "initial_device": dev})
    randomize_(clip.cond_stage_model, ctx.seed + 1)
    ctx.info["text_encoder_params"] = count_params(clip.cond_stage_model)
    return clip


def comfy_vae(ctx: RowContext):
    """ComfyUI's TAESD (2.4 M params) as the VAE that turns training images into latents."""
    import comfy.sd
    import comfy.taesd.taesd

    taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    randomize_(taesd, ctx.seed + 2)
    return comfy.sd.VAE(sd=taesd.state_dict(), device=ctx.torch_device)


def random_conditioning(ctx: RowContext):
    """A ComfyUI CONDITIONING with random tensors of the family's shapes (77 x context dim; SDXL
    also the pooled CLIP-G vector and the size entries its `y` vector is made of)."""
    g = torch.Generator().manual_seed(ctx.seed + 3)
    cross = torch.randn(1, 77, CONTEXT_DIM[ctx.family], generator=g)
    extra = {}
    if POOLED_DIM[ctx.family]:
        r = ctx.resolution
        extra = {"pooled_output": torch.randn(1, POOLED_DIM[ctx.family], generator=g), "width": r, "height": r,
                 "target_width": r, "target_height": r, "crop_w": 0, "crop_h": 0}
    return [[cross, extra]]


def tensor_bytes(obj) -> int:
    """Bytes of the distinct tensors held by loaded models (ModelPatcher, CLIP, VAE, modules)."""
    seen, total = set(), 0

    def visit(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            key = (t.device.type, t.untyped_storage().data_ptr())
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()

    def walk(o):
        if isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
        elif isinstance(o, torch.Tensor):
            visit(o)
        elif isinstance(o, torch.nn.Module):
            for t in list(o.parameters()) + list(o.buffers()):
                visit(t)
        elif hasattr(o, "first_stage_model"):  # comfy.sd.VAE
            walk(o.first_stage_model)
        elif hasattr(o, "cond_stage_model"):  # comfy.sd.CLIP
            walk(o.cond_stage_model)
        elif isinstance(getattr(o, "model", None), torch.nn.Module):  # ModelPatcher
            walk(o.model)

    walk(obj)
    return total


# ------------------------------------------------------------------------------------------------
# Row kind 1: ComfyUI's built-in Train LoRA node
# ------------------------------------------------------------------------------------------------

def builtin_load(ctx: RowContext) -> dict:
    g = torch.Generator().manual_seed(ctx.seed + 4)
    n = max(4, ctx.batch)
    return {"model": comfy_model(ctx), "positive": random_conditioning(ctx),
            "latents": torch.randn(n, 4, ctx.latent_size, ctx.latent_size, generator=g)}


def builtin_train(ctx: RowContext, assets: dict) -> None:
    """comfy_extras/nodes_train.py TrainLoraNode, run through its own class the way execution.py
    runs a V3 node (PREPARE_CLASS_CLONE, FUNCTION, list inputs, under inference mode). Every input
    the row does not set keeps its schema default, so later node versions with more inputs work.

    Workaround for Comfy-Org/ComfyUI#11124 (0.3.75: `UnboundLocalError: multi_res` when the node
    gets exactly one LATENT): the latents are passed as a list of one-image LATENTs of equal size
    (what a list-output loader feeds it), which takes the node's other branch (multi_res = False,
    the list is concatenated into one batch). Same training, no patched ComfyUI code."""
    import comfy.utils
    from comfy_extras.nodes_train import TrainLoraNode

    schema = TrainLoraNode.define_schema()
    values = {i.id: getattr(i, "default", None) for i in schema.inputs}
    lat = assets["latents"]
    values.update(
        model=assets["model"], positive=assets["positive"], batch_size=ctx.batch, steps=ctx.total_steps, rank=LORA_RANK,
        training_dtype="bf16", lora_dtype="bf16", gradient_checkpointing=ctx.checkpointing, existing_lora="[None]",
        grad_accumulation_steps=1, optimizer="AdamW", loss_function="MSE", seed=ctx.seed)
    values["algorithm"] = "LoRA" if "LoRA" in _combo_options(schema, "algorithm") else values["algorithm"]
    inputs = {k: [v] for k, v in values.items()}
    inputs["latents"] = [{"samples": lat[i:i + 1]} for i in range(lat.shape[0])]  # see the docstring
    ctx.info.update(train_mode=f"{values['algorithm']} r{LORA_RANK} on every linear/conv weight + bias/norm diffs",
                    node_inputs={k: v for k, v in values.items() if k not in ("model", "positive", "latents")})

    def hook(value, total, preview, node_id=None, **_):
        if total == ctx.total_steps:  # the node's ProgressBar advances once per optimiser step
            ctx.step_done()

    cls = TrainLoraNode.PREPARE_CLASS_CLONE({}) if hasattr(TrainLoraNode, "PREPARE_CLASS_CLONE") else TrainLoraNode
    old_hook = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with torch.inference_mode():
            getattr(cls, cls.FUNCTION)(**inputs)
    finally:
        comfy.utils.set_progress_bar_global_hook(old_hook)


def _combo_options(schema, input_id: str) -> list:
    for i in schema.inputs:
        if i.id == input_id:
            return list(getattr(i, "options", None) or [])
    return []


# ------------------------------------------------------------------------------------------------
# Row kind 2: diffusers reference step (UNet2DConditionModel, eager)
# ------------------------------------------------------------------------------------------------

def diffusers_unet(ctx: RowContext, dtype: torch.dtype):
    """The family's diffusers UNet with random weights in `dtype`, built on the meta device and
    materialised on the target device (no transient fp32 copy)."""
    unet = diffusers_meta_unet(ctx.family, ctx.quick).to(dtype=dtype).to_empty(device=ctx.torch_device)
    randomize_(unet, ctx.seed)
    ctx.info["unet_params"] = count_params(unet)
    return unet


def diffusers_load_lora(ctx: RowContext) -> dict:
    return {"unet": diffusers_unet(ctx, ctx.dtype)}


def diffusers_load_full(ctx: RowContext) -> dict:
    # diffusers' train_text_to_image.py keeps the trained UNet in fp32 under bf16 mixed precision.
    return {"unet": diffusers_unet(ctx, torch.float32)}


def _diffusers_steps(ctx: RowContext, unet, params: list, lr: float) -> None:
    """The loop of diffusers' examples/text_to_image train scripts: DDPM noise (SD's scaled-linear
    betas), epsilon MSE, autocast to bf16, grad-norm clip 1.0, AdamW. Conditioning is random."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    opt = torch.optim.AdamW(params, lr=lr)
    dev, b, h, r = ctx.torch_device, ctx.batch, ctx.latent_size, ctx.resolution
    g = torch.Generator().manual_seed(ctx.seed + 5)
    unet.train()
    for _ in range(ctx.total_steps):
        latents = torch.randn(b, 4, h, h, generator=g).to(dev)
        noise = torch.randn(b, 4, h, h, generator=g).to(dev)
        t = torch.randint(0, 1000, (b,), generator=g).to(dev)
        noisy = sched.add_noise(latents, noise, t)
        context = torch.randn(b, 77, CONTEXT_DIM[ctx.family], generator=g).to(dev)
        added = None
        if POOLED_DIM[ctx.family]:
            added = {"text_embeds": torch.randn(b, POOLED_DIM[ctx.family], generator=g).to(dev),
                     "time_ids": torch.tensor([[r, r, 0, 0, r, r]] * b, dtype=torch.float32, device=dev)}
        with torch.autocast(dev.type, dtype=ctx.dtype):
            pred = unet(noisy, t, context, added_cond_kwargs=added).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ctx.step_done()


def diffusers_train_lora(ctx: RowContext, assets: dict) -> None:
    """LoRA r8 on the attention projections through peft, as train_text_to_image_lora.py: frozen
    bf16 UNet, `unet.add_adapter(LoraConfig(...))`, adapter weights cast to fp32."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    unet = assets["unet"]
    unet.requires_grad_(False)
    if ctx.checkpointing:
        unet.enable_gradient_checkpointing()
    unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    cast_training_params(unet, dtype=torch.float32)
    ctx.info.update(train_mode=f"peft LoRA r{LORA_RANK} on attention q/k/v/out (fp32 adapters, bf16 base)")
    _diffusers_steps(ctx, unet, [p for p in unet.parameters() if p.requires_grad], lr=1e-4)


def diffusers_train_full(ctx: RowContext, assets: dict) -> None:
    """Full fine-tuning as train_text_to_image.py: fp32 weights trained under bf16 autocast."""
    unet = assets["unet"]
    unet.requires_grad_(True)
    if ctx.checkpointing:
        unet.enable_gradient_checkpointing()
    ctx.info.update(train_mode="full UNet (fp32 weights, bf16 autocast)")
    _diffusers_steps(ctx, unet, list(unet.parameters()), lr=5e-6)


# ------------------------------------------------------------------------------------------------
# Row kind 3: our trainers (comfyui_domainstudio.trainer.hosts.*)
# ------------------------------------------------------------------------------------------------

def ours_load(ctx: RowContext, full_text_encoder: bool = False) -> dict:
    g = torch.Generator().manual_seed(ctx.seed + 6)
    n = max(4, ctx.batch)
    r = ctx.resolution
    return {"model": comfy_model(ctx), "clip": comfy_clip(ctx, full=full_text_encoder), "vae": comfy_vae(ctx),
            "images": torch.rand(n, r, r, 3, generator=g)}


def ours_load_full_text_encoder(ctx: RowContext) -> dict:
    return ours_load(ctx, full_text_encoder=True)


def _pack():
    """Our package under its one name (see ../__init__.py), imported after ComfyUI is on the path."""
    import runpy

    if "comfyui_domainstudio" not in sys.modules:
        runpy.run_path(os.path.join(REPO, "__init__.py"))
    from comfyui_domainstudio.trainer import run as run_module
    from comfyui_domainstudio.trainer.hosts.comfy import ComfyHost

    return run_module, ComfyHost


def ours_run_options(ctx: RowContext, **fixed):
    """The RunOptions of our trainer for this row: `fixed` (train mode, rank, precision), the memory
    setting that turns gradient checkpointing on or off, then every --ours-option name=value.

    Checkpointing: RunOptions.memory = "low" (on) / "max_speed" (off). The rows fix AdamW (as the
    built-in node and diffusers use) so on/off differ by checkpointing alone; `--ours-option
    optimizer=auto` measures memory="low" as users get it (Adafactor for full deltas). A RunOptions
    with a plain `gradient_checkpointing` field gets that instead. A
    name RunOptions does not have makes the row RowUnsupported (reported, never silently ignored);
    the harness also counts torch.utils.checkpoint calls, so a switch the trainer ignores shows."""
    import dataclasses

    run_module, _ = _pack()
    names = {f.name for f in dataclasses.fields(run_module.RunOptions)}
    values = dict(fixed)
    if "gradient_checkpointing" in names:
        values["gradient_checkpointing"] = ctx.checkpointing
    elif "memory" in names:
        values["memory"] = "low" if ctx.checkpointing else "max_speed"
    elif ctx.checkpointing:
        raise RowUnsupported("RunOptions has no memory / gradient_checkpointing setting")
    for key, value in ctx.ours_options.items():
        if key not in names:
            raise RowUnsupported(f"RunOptions has no {key!r} (from --ours-option); it has {', '.join(sorted(names))}")
        values[key] = value
    ctx.info["ours_run_options"] = dict(values)
    return run_module.RunOptions(**values)


def run_ours(ctx: RowContext, assets: dict, method: str, values: dict, measured_stage: str, *,
             restart_after: tuple[str, ...] = (), train_mode: str = "lora_attn") -> None:
    """Run our trainer (trainer/run.py `run`, ComfyUI host) on the row's assets and time the steps of
    `measured_stage`; time and peak restart when a stage in `restart_after` ends (stages that are not
    the row: a 1-step token stage before the UNet stage, DreamBooth's class-image sampling)."""
    run_module, ComfyHost = _pack()
    cfg = run_module.resolve_config(method, values)
    opts = ours_run_options(ctx, train_mode=train_mode, lora_rank=LORA_RANK, lora_alpha=float(LORA_RANK),
                            precision="bf16", optimizer="adamw", preview_every=0, quality_samples=0)
    trains = "token vectors" if measured_stage == "token" else \
        train_mode + (f" r{LORA_RANK}" if train_mode.startswith("lora") else "")
    ctx.info.update(method=method, train_mode=trains, measured_stage=measured_stage)

    def on_progress(p):
        if p.message:  # previews and notes, not steps
            return
        if p.stage == measured_stage:
            ctx.step_done()
        elif p.stage in restart_after and p.stage_step >= p.stage_total:
            ctx.restart()

    host = ComfyHost(assets["model"], assets["clip"], assets["vae"])
    make_plan = run_module.make_plan

    def plan_then_reset(*args, **kwargs):
        """The memory plan's probes (one forward + backward at latent sides 16 and 32, the latter the
        training size at 256^2) are recorded on their own; the row's peak is training's."""
        plan = make_plan(*args, **kwargs)
        ctx.info["plan_peak_bytes"] = ctx.probe.peak()
        if getattr(plan, "estimate_bytes", None) is not None:  # what the memory guard predicted
            ctx.info["memory_plan_estimate_gib"] = plan.estimate_bytes / GiB
        ctx.probe.trim()
        ctx.probe.reset_peak()
        return plan

    run_module.make_plan = plan_then_reset
    try:
        with torch.inference_mode():  # as inside a node
            run_module.run(host, method, cfg, assets["images"], opts, on_progress=on_progress)
    finally:
        run_module.make_plan = make_plan


def ours_domainstudio(ctx: RowContext, assets: dict) -> None:
    """DomainStudio, batch 4, LoRA r8 on attention, latent features: per step one adapted UNet pass
    with gradients and one frozen-source pass without (the adapter switched off)."""
    run_ours(ctx, assets, "domainstudio", {"target_prompt": "a sks painting", "source_prompt": "a painting",
                                           "steps": ctx.total_steps, "batch_size": ctx.batch,
                                           "feature_space": "latent"}, "train")


def ours_rare_token_tokens(ctx: RowContext, assets: dict) -> None:
    """Rare-token method, stage 1: gradients flow through the UNet and the real-size text encoder(s)
    to the new token's vectors. Stopped before stage 2."""
    run_ours(ctx, assets, "rare_token", {"class_noun": "dog", "ti_steps": ctx.total_steps, "unet_steps": 1,
                                         "batch_size": ctx.batch}, "token")


def ours_rare_token_unet(ctx: RowContext, assets: dict) -> None:
    """Rare-token method, stage 2: UNet LoRA r8 (attention) on the instance prompt, conditioning
    cached, no prior. Stage 1 runs one step first (small text encoder); measuring restarts after it."""
    run_ours(ctx, assets, "rare_token", {"class_noun": "dog", "ti_steps": 1, "unet_steps": ctx.total_steps,
                                         "batch_size": ctx.batch}, "unet", restart_after=("token",))


def _dreambooth(ctx: RowContext, assets: dict, train_mode: str, lr: float) -> None:
    ctx.info["prior"] = "1 class image sampled by the source model (20 steps) before training; 2 UNet passes per step"
    run_ours(ctx, assets, "dreambooth", {"class_noun": "dog", "unet_steps": ctx.total_steps, "unet_learning_rate": lr,
                                         "class_images": 1, "lambda_prior": 1.0, "batch_size": ctx.batch},
             "unet", restart_after=("class images",), train_mode=train_mode)


def ours_dreambooth_lora(ctx: RowContext, assets: dict) -> None:
    """DreamBooth with prior preservation, LoRA r8 on attention."""
    _dreambooth(ctx, assets, "lora_attn", 1e-4)


def ours_dreambooth_full(ctx: RowContext, assets: dict) -> None:
    """DreamBooth with prior preservation, full deltas of every linear/conv weight."""
    _dreambooth(ctx, assets, "full_all", 5e-6)


def _finetune(ctx: RowContext, assets: dict, train_mode: str, lr: float) -> None:
    run_ours(ctx, assets, "finetune", {"target_prompt": "a sks painting", "steps": ctx.total_steps,
                                       "batch_size": ctx.batch, "learning_rate": lr}, "train", train_mode=train_mode)


def ours_finetune_lora_all(ctx: RowContext, assets: dict) -> None:
    """Plain fine-tuning, LoRA r8 on every linear/conv weight (the built-in node's layer set, minus
    its bias/norm differences)."""
    _finetune(ctx, assets, "lora_all", 1e-4)


def ours_finetune_lora_attn(ctx: RowContext, assets: dict) -> None:
    """Plain fine-tuning, LoRA r8 on attention: DomainStudio's reference step (same layers, batch)."""
    _finetune(ctx, assets, "lora_attn", 1e-4)


def ours_finetune_full(ctx: RowContext, assets: dict) -> None:
    """Plain fine-tuning of full deltas of every linear/conv weight."""
    _finetune(ctx, assets, "full_all", 5e-6)


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------

ROWS: dict[str, Row] = {r.id: r for r in [
    Row("builtin_b1", "builtin", "ComfyUI Train LoRA node, batch 1", 1, builtin_load, builtin_train),
    Row("builtin_b4", "builtin", "ComfyUI Train LoRA node, batch 4", 4, builtin_load, builtin_train),
    Row("diffusers_lora", "diffusers", "diffusers UNet + peft LoRA", 1, diffusers_load_lora, diffusers_train_lora),
    Row("diffusers_full", "diffusers", "diffusers UNet full fine-tune", 1, diffusers_load_full, diffusers_train_full,
        trains="full"),
    Row("ours_domainstudio", "ours", "ours: DomainStudio (+frozen source pass)", 4, ours_load, ours_domainstudio,
        samples_per_step=1.3),
    Row("ours_rare_token_tokens", "ours", "ours: rare-token, token stage", 1, ours_load_full_text_encoder,
        ours_rare_token_tokens, trains="tokens", full_text_encoder=True),
    Row("ours_rare_token_unet", "ours", "ours: rare-token, UNet stage", 1, ours_load, ours_rare_token_unet),
    Row("ours_dreambooth_lora", "ours", "ours: DreamBooth + prior, LoRA", 1, ours_load, ours_dreambooth_lora,
        samples_per_step=2.0),
    Row("ours_dreambooth_full", "ours", "ours: DreamBooth + prior, full", 1, ours_load, ours_dreambooth_full,
        trains="full", samples_per_step=2.0),
    Row("ours_lora_b1", "ours", "ours: plain LoRA r8, every layer, batch 1", 1, ours_load, ours_finetune_lora_all),
    Row("ours_lora_b4", "ours", "ours: plain LoRA r8, every layer, batch 4", 4, ours_load, ours_finetune_lora_all),
    Row("ours_lora_attn_b4", "ours", "ours: plain LoRA r8, attention, batch 4", 4, ours_load, ours_finetune_lora_attn),
    Row("ours_full_b1", "ours", "ours: plain full fine-tune, batch 1", 1, ours_load, ours_finetune_full,
        trains="full"),
]}
KINDS = ("builtin", "diffusers", "ours")


# ------------------------------------------------------------------------------------------------
# One measurement (child process)
# ------------------------------------------------------------------------------------------------

def setup_host(spec: dict) -> None:
    """Put ComfyUI on the path and configure it for the device before comfy.model_management."""
    comfy_dir = spec["comfyui_dir"]
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    import comfy.cli_args

    comfy.cli_args.args.cpu = spec["device"] == "cpu"
    comfy.cli_args.args.gpu_only = spec["device"] == "cuda"  # keep models on the GPU: weights stay the baseline
    import comfy.model_management  # noqa: F401


def _host_facts() -> dict:
    facts = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    try:
        import comfyui_version

        facts["comfyui"] = comfyui_version.__version__
    except ImportError:
        pass
    try:
        import comfy.ldm.modules.attention as attn

        facts["comfy_attention"] = attn.optimized_attention.__name__
    except (ImportError, AttributeError):
        pass
    for mod in ("diffusers", "peft"):
        try:
            facts[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return facts


CHECKPOINT_CALLS = [0]


def count_checkpoint_calls() -> None:
    """Wrap torch.utils.checkpoint.checkpoint (before anything imports it) to count its calls: the
    built-in node, diffusers and torch.utils.checkpoint.checkpoint_sequential all go through it."""
    import functools
    import torch.utils.checkpoint as tuc

    original = tuc.checkpoint
    if getattr(original, "_bench_counted", False):
        return

    @functools.wraps(original)
    def counted(*args, **kwargs):
        CHECKPOINT_CALLS[0] += 1
        return original(*args, **kwargs)

    counted._bench_counted = True
    tuc.checkpoint = counted


def run_measurement(spec: dict, baseline_path: str | None = None) -> dict:
    """Load, baseline, train (warm-up + timed steps), measure. Returns the result dict."""
    count_checkpoint_calls()
    setup_host(spec)
    row = ROWS[spec["row"]]
    probe = MemoryProbe(spec["device"])
    ctx = RowContext(family=spec["family"], resolution=spec["resolution"], batch=row.batch, warmup=spec["warmup"],
                     timed=spec["timed"], device=spec["device"], checkpointing=spec["checkpointing"],
                     quick=spec.get("quick", False), probe=probe, ours_options=spec.get("ours_options", {}),
                     seed=spec.get("seed", 0))
    t0 = time.perf_counter()
    assets = row.load(ctx)
    load_s = time.perf_counter() - t0
    weights = tensor_bytes(assets)
    probe.trim()
    baseline = probe.current()
    if baseline_path:
        with open(baseline_path, "w") as f:
            f.write(str(baseline))
    probe.reset_peak()

    optimizers = {}

    def opt_hook(opt, args, kwargs):
        if id(opt) not in optimizers:
            ps = [p for g in opt.param_groups for p in g["params"]]
            optimizers[id(opt)] = (sum(p.numel() for p in ps), sorted({str(p.dtype).replace("torch.", "") for p in ps}))
        ctx.info["trainable_params"], ctx.info["trainable_dtypes"] = optimizers[id(opt)]

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(opt_hook)
    t1 = time.perf_counter()
    try:
        row.train(ctx, assets)
        raise RuntimeError(f"row {row.id} returned after {len(ctx.stamps)} of {ctx.total_steps} steps")
    except StopRow:
        pass
    finally:
        handle.remove()
    train_s = time.perf_counter() - t1
    calls = CHECKPOINT_CALLS[0]
    if ctx.checkpointing and calls == 0:
        raise RuntimeError("gradient checkpointing was asked for but torch.utils.checkpoint.checkpoint was never "
                           "called: the trainer ignored the setting")
    if not ctx.checkpointing and calls:
        raise RuntimeError(f"gradient checkpointing was off but torch.utils.checkpoint.checkpoint ran {calls} times")
    times = [b - a for a, b in zip(ctx.stamps[ctx.warmup - 1:], ctx.stamps[ctx.warmup:])]
    peak = ctx.peak_bytes if ctx.peak_bytes is not None else probe.peak()
    plan_peak = ctx.info.pop("plan_peak_bytes", None)
    if plan_peak is not None:
        ctx.info["memory_plan_peak_above_weights_gib"] = (plan_peak - baseline) / GiB
    return {
        "status": "ok", "s_per_step": statistics.median(times), "step_times_s": times,
        "peak_above_weights_gib": (peak - baseline) / GiB, "weights_gib": weights / GiB,
        "baseline_gib": baseline / GiB, "peak_gib": peak / GiB, "peak_method": probe.method,
        "load_s": load_s, "train_s": train_s, "checkpoint_calls": calls, **ctx.info, **_host_facts(),
    }


def main(argv: list[str]) -> int:
    spec_path, result_path = argv[1], argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    if spec.get("warmup", 1) < 1:
        raise SystemExit("warmup must be >= 1 (the first timed step is measured from the last warm-up step)")
    try:
        result = run_measurement(spec, baseline_path=result_path + ".baseline")
    except RowUnsupported as e:
        result = {"status": "skipped", "reason": str(e)}
    except Exception as e:  # recorded in the table, the benchmark goes on with the next row
        oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
        result = {"status": "oom" if oom else "failed", "reason": f"{type(e).__name__}: {e}"[:500],
                  "traceback": traceback.format_exc()[-3000:]}
    with open(result_path + ".tmp", "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(result_path + ".tmp", result_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
