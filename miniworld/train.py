"""Reproduce the shipped miniworld weights: resumable, CPU-trainable (a CUDA GPU is used when present).

    python -m miniworld.train                        # every stage, then install into miniworld/weights
    python -m miniworld.train --stage vae            # one stage (vae | decoder | contexts | unet | install)
    nice -n 19 python -m miniworld.train --parallel-decoder --threads 1     # the CPU recipe (README)

Every stage keeps its state in the work directory (``$DS_CACHE/miniworld-train-v<DATA_VERSION>``,
``--work``): a stage that finished is skipped, a stage that was stopped (Ctrl-C, SIGTERM, a crash)
resumes from its last checkpoint (every ``--ckpt-every`` steps and on SIGTERM/SIGINT) with the same
data order. Rerun the same command to continue. Nothing under miniworld/weights changes before the
final ``install`` stage, so the shipped model keeps working while a retrain runs.

Stages:
* ``vae``: ComfyUI's TAESD (2.4 M params) from scratch on the training concepts' Google images,
  augmented (flips, colour-channel permutations, shifts on white) so other emoji styles encode too:
  random 32x32 crops (aligned to the 8-pixel latent grid), then full 64x64 images; L1 + MSE + an
  image-gradient L1 (edges) + a small latent L2. Then ``vae_scale``/``vae_shift`` are set so that
  SD1.5's x 0.18215 gives zero-mean, unit-variance model-space latents.
* ``decoder``: decoder-only training on full images (encoder, latents, scale and shift stay
  bit-identical), so it can run beside the UNet (``--parallel-decoder``).
* ``contexts``: every training caption through ComfyUI's tokenizer and the frozen random CLIP-L
  (miniworld.models.new_clip), once.
* ``unet``: the two-level SD1.5-layout UNet as low-rank factors (miniworld/factor.py) on eps with
  SD's scaled-linear 1000-step schedule (ComfyUI's ModelSamplingDiscrete), min-SNR-5 weighting,
  10 % empty captions (CFG), domain captions, EMA, AdamW with warm-up and cosine decay.
* ``install``: the EMA factors and the VAE (fp16) into miniworld/weights, the training sprite, and
  training.json (commands, data versions and hashes, seeds, steps, throughput, wall time, sha256).

bf16 autocast is used on the CPU when it supports it (AMX here: 2.7x faster than fp32 for the
UNet) and on CUDA; master weights, optimiser and EMA are float32.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from . import config, data, models


def _log(*a):
    print(f"[miniworld {time.strftime('%H:%M:%S')}]", *a, flush=True)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _save(sd: dict, path: str, meta: dict | None = None) -> None:
    import safetensors.torch

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    safetensors.torch.save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, tmp,
                                metadata={k: str(v) for k, v in (meta or {}).items()})
    os.replace(tmp, path)


def _load(path: str) -> dict:
    import safetensors.torch

    return safetensors.torch.load_file(path)


def _fp16(sd: dict) -> dict:
    return {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}


def _torch_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(obj, path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"   # two stages in two processes may write runs.json at once
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float().clamp(0, 1) - b.float()).pow(2).mean(dim=(1, 2, 3))
    return float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean())


class Stop:
    """SIGTERM / SIGINT set a flag; the training loops checkpoint and exit at the next step."""

    requested = False

    @classmethod
    def install(cls):
        def handler(signum, frame):
            cls.requested = True
            _log(f"signal {signum}: checkpointing and stopping after this step")
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def autocast(dev: torch.device, enabled: bool):
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=enabled)


def bf16_default(dev: torch.device) -> bool:
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "amx_bf16" in flags or "avx512_bf16" in flags
    except OSError:
        return False


# --- data ----------------------------------------------------------------------------------------
def source_images(split: str = "train") -> tuple[torch.Tensor, list[str]]:
    """Google images of the ``split`` concepts as float [N,3,64,64] in [0,1], and their names."""
    ds = data.load(config.SOURCE_STYLE)
    idx = data.train_indices(ds) if split == "train" else data.heldout_indices(ds)
    x = torch.from_numpy(ds["images"][idx]).permute(0, 3, 1, 2).float() / 255.0
    return x, [ds["names"][i] for i in idx]


_PERMS = [(0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]


def augment(x: torch.Tensor, g: torch.Generator, max_shift: int = 4, p_perm: float = 0.25) -> torch.Tensor:
    """VAE augmentation on white-background images [B,3,H,W]: horizontal flip (p 0.5), a colour-channel
    permutation (p ``p_perm``), a shift by up to ``max_shift`` pixels with white fill."""
    b = x.shape[0]
    flip = torch.rand(b, generator=g) < 0.5
    perm = torch.rand(b, generator=g) < p_perm
    which = torch.randint(0, len(_PERMS), (b,), generator=g)
    sh = torch.randint(-max_shift, max_shift + 1, (b, 2), generator=g)
    out = []
    for i in range(b):
        im = x[i]
        if flip[i]:
            im = im.flip(-1)
        if perm[i]:
            im = im[list(_PERMS[int(which[i])])]
        dy, dx = int(sh[i, 0]), int(sh[i, 1])
        if dy or dx:
            canvas = torch.ones_like(im)
            h, w = im.shape[-2:]
            canvas[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
                im[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
            im = canvas
        out.append(im)
    return torch.stack(out)


def grad_l1(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and vertical finite differences of y and x (edge sharpness)."""
    return ((y[..., 1:, :] - y[..., :-1, :]) - (x[..., 1:, :] - x[..., :-1, :])).abs().mean() + \
        ((y[..., :, 1:] - y[..., :, :-1]) - (x[..., :, 1:] - x[..., :, :-1])).abs().mean()


def recon_loss(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (y - x).abs().mean() + (y - x).pow(2).mean() + 0.5 * grad_l1(y, x)


def cosine_lr(step: int, total: int, warm: int, floor: float = 0.05) -> float:
    return min(1.0, (step + 1) / warm) * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))


class StepBudget:
    """``--unet-minutes`` / ``--dec-minutes``: fix a loop's total step count from its own measured speed,
    so that it trains for about ``minutes`` of wall time (a GPU lent for a fixed lease).

    The loop calls :meth:`total` after every step; steps FIRST..LAST of this process are timed (after
    start-up, allocation and autotuning), and from then on the total is fixed at
    ``minutes * 60 / seconds_per_step``, never below the steps already done. With ``minutes`` 0, or on a
    resumed run (its checkpoint keeps the total it fixed), the given total stands. The warm-up of the
    learning-rate schedule is at least as long as LAST for the unet stage (200 steps), so fixing the total late
    changes none of its learning rates; the decoder's 50-step warm-up ends earlier, and its steps 50-120
    follow the cosine of ``--dec-steps`` (within 2 % of the final one)."""

    FIRST, LAST = 20, 120

    def __init__(self, minutes: float, total: int, start_step: int = 0, fixed: bool = False,
                 until: float = 0):
        self.minutes, self.value, self.start = float(minutes or 0), int(total), int(start_step)
        self.until = float(until or 0)   # or a wall-clock deadline (epoch seconds) for the whole loop
        self.fixed = fixed or not (self.minutes or self.until)
        self.t_first = None
        self.s_per_step = None

    def total(self, step: int) -> int:
        if self.fixed:
            return self.value
        done = step - self.start
        if done == self.FIRST:
            self.t_first = time.time()
        elif done == self.LAST and self.t_first is not None:
            self.s_per_step = (time.time() - self.t_first) / (self.LAST - self.FIRST)
            if self.until:
                self.value = max(step + 1, step + int((self.until - time.time()) / self.s_per_step))
                self.minutes = round((self.value - self.start) * self.s_per_step / 60, 2)
            else:
                self.value = max(step + 1, int(self.minutes * 60 / self.s_per_step))
            self.fixed = True
            _log(f"{self.s_per_step * 1000:.1f} ms/step: {self.value} steps fill {self.minutes:g} min")
        return self.value

    def record(self) -> dict:
        return ({"minutes_budget": self.minutes, "s_per_step_measured": round(self.s_per_step, 5)}
                if self.s_per_step else {})


# --- VAE ------------------------------------------------------------------------------------------
def load_vae(path: str = config.VAE_FILE, dev=torch.device("cpu")):
    vae = models.new_taesd()
    vae.load_state_dict({k: v.float() for k, v in _load(path).items()})
    return vae.to(dev).eval()


def vae_roundtrip(vae, x01: torch.Tensor) -> torch.Tensor:
    """[0,1] images -> ComfyUI raw latents -> [0,1] images, as comfy.sd.VAE does for TAESD."""
    return (vae.decode(vae.encode(x01 * 2 - 1)) + 1) / 2


def encode_model_space(vae, x01: torch.Tensor) -> torch.Tensor:
    """Latents as the UNet sees them in ComfyUI: raw TAESD latents x SD1.5's 0.18215."""
    return vae.encode(x01 * 2 - 1) * config.SD15_LATENT_SCALE


def decode_model_space(vae, z: torch.Tensor) -> torch.Tensor:
    return ((vae.decode(z / config.SD15_LATENT_SCALE) + 1) / 2).clamp(0, 1)


def _batched(fn, x: torch.Tensor, n: int = 64) -> torch.Tensor:
    return torch.cat([fn(x[i:i + n]) for i in range(0, len(x), n)])


def vae_quality(vae, dev, n: int = 256) -> dict:
    """PSNR of the VAE's ComfyUI-style round trip (float32) on ``n`` evenly spread training images, all
    held-out ones and ``n`` target-style images."""
    out = {}
    ds_t = data.load(config.TARGET_STYLES[0])
    tw = torch.from_numpy(ds_t["images"]).permute(0, 3, 1, 2).float() / 255.0
    tr = source_images("train")[0]

    def spread(x):
        return x[np.linspace(0, len(x) - 1, min(n, len(x))).round().astype(int)]

    for name, x in (("train", spread(tr)), ("heldout", source_images("heldout")[0]),
                    (config.TARGET_STYLES[0], spread(tw))):
        with torch.no_grad():
            rec = _batched(lambda b: vae_roundtrip(vae, b.to(dev)).cpu(), x)
        out[f"psnr_db_{name}"] = round(psnr(rec, x), 2)
    return out


def stage_vae(a, dev, work: str) -> dict:
    final = os.path.join(work, "vae_encoder_stage.safetensors")
    rec_path = os.path.join(work, "record_vae.json")
    if os.path.exists(final) and os.path.exists(rec_path):
        _log("vae: done (work dir)")
        return _read_json(rec_path)
    imgs, _ = source_images("train")
    n = len(imgs)
    steps1, steps2 = a.vae_crop_steps, a.vae_full_steps
    total = steps1 + steps2
    vae = models.new_taesd(config.SEED + 1).to(dev).to(memory_format=torch.channels_last)
    params = list(vae.taesd_encoder.parameters()) + list(vae.taesd_decoder.parameters())
    opt = torch.optim.AdamW(params, lr=a.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(config.SEED + 11)
    ckpt = os.path.join(work, "vae_ckpt.pt")
    step, wall0 = 0, 0.0
    if os.path.exists(ckpt):
        st = torch.load(ckpt, map_location="cpu", weights_only=True)
        vae.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        g.set_state(st["gen"])
        step, wall0 = st["step"], st["wall"]
        _log(f"vae: resumed at step {step}/{total}")
    bf16 = a.bf16
    t0 = time.time()

    def save_ckpt():
        _torch_save({"model": vae.state_dict(), "opt": opt.state_dict(), "gen": g.get_state(), "step": step,
                     "wall": wall0 + time.time() - t0}, ckpt)

    last = []
    while step < total:
        for pg in opt.param_groups:
            pg["lr"] = a.vae_lr * cosine_lr(step, total, 100)
        full = step >= steps1
        b = a.vae_full_batch if full else a.vae_crop_batch
        idx = torch.randint(0, n, (b,), generator=g)
        x = augment(imgs[idx], g)
        if not full:
            cells = (config.IMAGE_SIZE - a.vae_crop) // 8 + 1
            oy = (torch.randint(0, cells, (b,), generator=g) * 8).tolist()
            ox = (torch.randint(0, cells, (b,), generator=g) * 8).tolist()
            x = torch.stack([x[i, :, y:y + a.vae_crop, xx:xx + a.vae_crop] for i, (y, xx) in enumerate(zip(oy, ox))])
        x = x.to(dev).contiguous(memory_format=torch.channels_last)
        with autocast(dev, bf16):
            d = vae.taesd_encoder(x)
            y = vae.taesd_decoder(d)
        loss = recon_loss(y.float(), x) + 1e-4 * d.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        last.append(loss.item())
        if step % 50 == 0 or step == total:
            el = wall0 + time.time() - t0
            _log(f"vae step {step}/{total} ({'full' if full else 'crops'}) loss(avg50) {np.mean(last[-50:]):.4f} "
                 f"psnr(batch) {psnr(y.detach().float(), x):.2f} dB, {el / 60:.1f} min")
        if step % a.ckpt_every == 0 or Stop.requested:
            save_ckpt()
            if Stop.requested:
                sys.exit(3)
    wall = wall0 + time.time() - t0
    vae.eval()
    with torch.no_grad():
        d = _batched(lambda b: vae.taesd_encoder(b.to(dev).contiguous(memory_format=torch.channels_last)).float().cpu(), imgs)
        mean, std = float(d.mean()), float(d.std())
        vae.vae_scale.fill_(config.SD15_LATENT_SCALE * std)
        vae.vae_shift.fill_(-mean / (config.SD15_LATENT_SCALE * std))
    _save(_fp16({k: v.float() for k, v in vae.state_dict().items()}), final,
          {"format": "comfy.taesd.taesd.TAESD", "latent_channels": 4})
    ship = load_vae(final, dev)
    q = vae_quality(ship, dev)
    rec = {"crop_steps": steps1, "crop_batch": a.vae_crop_batch, "crop": a.vae_crop, "full_steps": steps2,
           "full_batch": a.vae_full_batch, "lr": a.vae_lr, "seed": config.SEED + 1, "data_seed": config.SEED + 11,
           "augment": "hflip 0.5, channel permutation 0.25, shift <= 4 px on white",
           "loss": "L1 + MSE + 0.5 gradient-L1 + 1e-4 latent L2", "bf16_autocast": bf16,
           "wall_s": round(wall, 1), "samples_per_s": round((steps1 * a.vae_crop_batch + steps2 * a.vae_full_batch) / wall, 2),
           "n_images": n, "latent_mean": mean, "latent_std": std, "params": sum(p.numel() for p in params), **q,
           "finished": datetime.datetime.now().isoformat(timespec="seconds")}
    _write_json(rec, rec_path)
    _log(f"vae done in {wall / 60:.1f} min: {q}")
    return rec


class PatchDiscriminator(torch.nn.Module):
    """A small PatchGAN (64x64 -> 7x7 logits, 0.7 M params) for the decoder's optional hinge loss."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        sn = nn.utils.parametrizations.spectral_norm
        self.net = nn.Sequential(
            sn(nn.Conv2d(3, 64, 4, 2, 1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(64, 128, 4, 2, 1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(128, 256, 4, 2, 1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(256, 1, 2, 1, 0)))

    def forward(self, x):
        return self.net(x * 2 - 1)


def stage_decoder(a, dev, work: str) -> dict:
    """Decoder-only training on full images from the vae stage's weights; the encoder and every latent
    stay bit-identical."""
    src = os.path.join(work, "vae_encoder_stage.safetensors")
    final = os.path.join(work, "taesd_fp16.safetensors")
    rec_path = os.path.join(work, "record_decoder.json")
    if os.path.exists(final) and os.path.exists(rec_path):
        _log("decoder: done (work dir)")
        return _read_json(rec_path)
    imgs, _ = source_images("train")
    n = len(imgs)
    vae = load_vae(src, dev).to(memory_format=torch.channels_last)
    before = _load(src)
    dec = vae.taesd_decoder.train()
    opt = torch.optim.AdamW(dec.parameters(), lr=a.dec_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(config.SEED + 12)
    ckpt = os.path.join(work, "decoder_ckpt.pt")
    step, wall0, total = 0, 0.0, a.dec_steps
    resumed = os.path.exists(ckpt)
    if resumed:
        st = torch.load(ckpt, map_location="cpu", weights_only=True)
        dec.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        g.set_state(st["gen"])
        step, wall0 = st["step"], st["wall"]
        total = int(st.get("total", total))
        _log(f"decoder: resumed at step {step}/{total}")
    budget = StepBudget(a.dec_minutes, total, step, fixed=resumed, until=a.dec_until)
    disc = disc_opt = None
    if a.dec_adv > 0:
        torch.manual_seed(config.SEED + 13)
        disc = PatchDiscriminator().to(dev)
        disc_opt = torch.optim.Adam(disc.parameters(), lr=a.dec_lr, betas=(0.5, 0.9))
        if os.path.exists(ckpt) and "disc" in st:
            disc.load_state_dict(st["disc"])
            disc_opt.load_state_dict(st["disc_opt"])
    t0 = time.time()
    last = []
    enc = vae.taesd_encoder.eval()
    while step < total:
        for pg in opt.param_groups:
            pg["lr"] = a.dec_lr * cosine_lr(step, total, 50)
        idx = torch.randint(0, n, (a.dec_batch,), generator=g)
        x = augment(imgs[idx], g).to(dev).contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), autocast(dev, a.bf16):
            d = enc(x)
        with autocast(dev, a.bf16):
            y = dec(d)
        loss = recon_loss(y.float(), x)
        adv_on = disc is not None and step >= a.dec_adv_start
        if adv_on:
            loss = loss - a.dec_adv * disc(y.float()).mean()   # hinge generator loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
        opt.step()
        if disc is not None:
            d_loss = torch.relu(1 - disc(x)).mean() + torch.relu(1 + disc(y.detach().float())).mean()
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_opt.step()
        step += 1
        total = budget.total(step)
        last.append(loss.item())
        if step % 100 == 0 or step == total:
            el = wall0 + time.time() - t0
            _log(f"decoder step {step}/{total} loss(avg100) {np.mean(last[-100:]):.4f} "
                 f"psnr(batch) {psnr(y.detach().float(), x):.2f} dB, {el / 60:.1f} min")
        if step % a.ckpt_every == 0 or Stop.requested:
            extra = {"disc": disc.state_dict(), "disc_opt": disc_opt.state_dict()} if disc is not None else {}
            _torch_save({"model": dec.state_dict(), "opt": opt.state_dict(), "gen": g.get_state(), "step": step,
                         "total": total, "wall": wall0 + time.time() - t0, **extra}, ckpt)
            if Stop.requested:
                sys.exit(3)
    wall = wall0 + time.time() - t0
    sd = _fp16({k: v.float().cpu() for k, v in vae.state_dict().items()})
    assert all(torch.equal(sd[k], before[k]) for k in before if not k.startswith("taesd_decoder."))
    _save(sd, final, {"format": "comfy.taesd.taesd.TAESD", "latent_channels": 4})
    q = vae_quality(load_vae(final, dev), dev)
    rec = {"steps": total, "batch": a.dec_batch, "lr": a.dec_lr, "data_seed": config.SEED + 12,
           "loss": "L1 + MSE + 0.5 gradient-L1" + (f" + {a.dec_adv} x hinge GAN (PatchDiscriminator, from step "
                                                    f"{a.dec_adv_start})" if a.dec_adv > 0 else ""),
           "augment": "as the vae stage", "bf16_autocast": a.bf16,
           "wall_s": round(wall, 1), "img_per_s": round(total * a.dec_batch / wall, 2), **q, **budget.record(),
           "finished": datetime.datetime.now().isoformat(timespec="seconds")}
    _write_json(rec, rec_path)
    _log(f"decoder done in {wall / 60:.1f} min: {q}")
    return rec


# --- text contexts ----------------------------------------------------------------------------------
def caption_contexts(captions: list[str], batch: int = 32) -> torch.Tensor:
    """[len(captions), 77, 768] contexts from ComfyUI's tokenizer + the random CLIP-L (float32), the
    same path CLIPTextEncode takes; ``batch`` prompts go through the encoder together."""
    clip = models.comfy_clip()
    out = []
    for i in range(0, len(captions), batch):
        chunk = captions[i:i + batch]
        sections = [clip.tokenize(s)["l"] for s in chunk]
        assert all(len(s) == 1 for s in sections), "a caption longer than 75 tokens"
        cond = clip.encode_from_tokens({"l": [s[0] for s in sections]}).float()
        out.append(cond.reshape(len(chunk), -1, cond.shape[-1]))
    return torch.cat(out)


def stage_contexts(a, work: str):
    from .captions import CaptionSet

    ds = data.load(config.SOURCE_STYLE)
    train_names = [ds["names"][i] for i in data.train_indices(ds)]
    cs = CaptionSet(train_names, ds["names"])
    key = hashlib.sha256(json.dumps([cs.captions, config.CLIP_SEED]).encode()).hexdigest()[:12]
    path = os.path.join(work, f"contexts-{key}.pt")
    if os.path.exists(path):
        return cs, torch.load(path, map_location="cpu", weights_only=True), path
    t0 = time.time()
    ctx = caption_contexts(cs.captions).to(torch.bfloat16)
    _torch_save(ctx, path)
    _log(f"{len(cs.captions)} caption contexts in {time.time() - t0:.0f}s -> {path}")
    _write_json({"n_captions": len(cs.captions), "seconds": round(time.time() - t0, 1), "fillers": cs.words,
                 "file": os.path.basename(path)}, os.path.join(work, "record_contexts.json"))
    return cs, ctx, path


# --- diffusion ------------------------------------------------------------------------------------------
def alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


@torch.no_grad()
def ddim_sample(unet, ctx: torch.Tensor, uncond: torch.Tensor, seed: int, steps: int = 25, cfg: float = 4.0,
                dev=torch.device("cpu"), bf16: bool = False) -> torch.Tensor:
    """Deterministic DDIM (eta 0) in model space, for grids and monitoring (tests use stock KSampler)."""
    ac = alphas_cumprod()
    g = torch.Generator().manual_seed(seed)
    b = ctx.shape[0]
    x = torch.randn(b, 4, 8, 8, generator=g)
    ts = torch.linspace(999, 0, steps).round().long()
    for i, t in enumerate(ts):
        tt = torch.full((2 * b,), float(t), device=dev)
        with autocast(dev, bf16):
            out = unet(torch.cat([x, x]).to(dev), tt, context=torch.cat([ctx, uncond.expand(b, -1, -1)]).to(dev))
        eps_c, eps_u = out.float().cpu().chunk(2)
        eps = eps_u + cfg * (eps_c - eps_u)
        a = ac[t]
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        a_next = ac[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x


def cycle_end(step: int, cycles, total: int) -> int:
    """The end of the cosine cycle ``step`` is in: the first of ``cycles`` (ascending step counts)
    above ``step``, else ``total``. Each later cycle continues the cosine from where a schedule
    ending at its end would be (a warm restart to a lower learning rate), as `--unet-steps N` did
    when the recorded run was extended from a finished checkpoint."""
    for c in sorted(cycles or ()):
        if step < c:
            return c
    return total


def stage_unet(a, dev, work: str) -> dict:
    final = os.path.join(work, "unet_factors_fp16.safetensors")
    rec_path = os.path.join(work, "record_unet.json")
    if os.path.exists(final) and os.path.exists(rec_path):
        _log("unet: done (work dir)")
        return _read_json(rec_path)
    cs, ctx_all, ctx_path = stage_contexts(a, work)
    imgs, names = source_images("train")
    enc_file = os.path.join(work, "vae_encoder_stage.safetensors")   # the encoder is final after stage vae
    lat_path = os.path.join(work, f"latents-{_sha256(enc_file)[:12]}.pt")
    if os.path.exists(lat_path):
        z = torch.load(lat_path, map_location="cpu", weights_only=True)
    else:
        vae = load_vae(enc_file)
        with torch.no_grad():
            z = _batched(lambda b: encode_model_space(vae, b), imgs).float()
        _torch_save(z, lat_path)
    _log(f"{len(names)} training concepts; model-space latents mean {z.mean():.3f} std {z.std():.3f}; "
         f"{len(cs.captions)} captions")
    unet = models.new_factored_unet(config.SEED).to(dev).train()
    params = [p for p in unet.parameters()]
    ema = [p.detach().clone().float() for p in params]
    opt = torch.optim.AdamW(params, lr=a.unet_lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(config.SEED + 7)
    ckpt = os.path.join(work, "unet_ckpt.pt")
    step, wall0, losses = 0, 0.0, []
    total, batch = a.unet_steps, a.unet_batch
    if os.path.exists(ckpt):
        st = torch.load(ckpt, map_location="cpu", weights_only=True)
        unet.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        for e, v in zip(ema, st["ema"]):
            e.copy_(v)
        g.set_state(st["gen"])
        step, wall0, losses = st["step"], st["wall"], st["losses"].tolist()
        total = int(st.get("total", total))
        _log(f"unet: resumed at step {step}/{total}")
    budget = StepBudget(a.unet_minutes, total, step, fixed=os.path.exists(ckpt), until=a.unet_until)
    snapshots = {}
    ac = alphas_cumprod().to(dev)
    z, ctx_all = z.to(dev), ctx_all.to(dev)
    t0 = time.time()

    def save_ckpt():
        _torch_save({"model": unet.state_dict(), "opt": opt.state_dict(), "ema": ema, "gen": g.get_state(),
                     "step": step, "total": total, "wall": wall0 + time.time() - t0, "losses": torch.tensor(losses)},
                    ckpt)

    def save_ema_snapshot():
        """The EMA weights now, as a factor file beside the final one (``--ema-snapshots``)."""
        sd = dict(unet.state_dict())
        sd.update({n: e for (n, _), e in zip(unet.named_parameters(), ema)})
        path = os.path.join(work, f"unet_factors_fp16_step{step}.safetensors")
        _save(_fp16(sd), path, {"format": "miniworld factorised comfy UNetModel (miniworld/factor.py)",
                                "step": step, "of": total})
        snapshots[step] = os.path.basename(path)
        _log(f"EMA snapshot at step {step}/{total} -> {path}")

    while step < total:
        lr = a.unet_lr * cosine_lr(step, cycle_end(step, a.unet_cycles, total), 200, floor=0.1)
        for pg in opt.param_groups:
            pg["lr"] = lr
        bi = torch.randint(0, len(names), (batch,), generator=g)
        ci = cs.draw(bi, g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn(batch, 4, 8, 8, generator=g).to(dev)
        al = ac[t.to(dev)].view(-1, 1, 1, 1)
        xt = al.sqrt() * z[bi.to(dev)] + (1 - al).sqrt() * noise
        with autocast(dev, a.bf16):
            pred = unet(xt, t.float().to(dev), context=ctx_all[ci.to(dev)])
        snr = al.view(-1) / (1 - al.view(-1))
        w = torch.clamp(snr, max=config.MIN_SNR_GAMMA) / snr
        loss = (w * (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(a.ema, (1 + step) / (10 + step))
            torch._foreach_mul_(ema, d)
            torch._foreach_add_(ema, [p.detach().float() for p in params], alpha=1 - d)
        step += 1
        total = budget.total(step)
        losses.append(loss.item())
        if budget.fixed and any(step == int(f * total) for f in a.ema_snapshots) and step < total:
            save_ema_snapshot()
        if step % 50 == 0 or step == total:
            el = wall0 + time.time() - t0
            rate = (step * batch) / el
            _log(f"unet step {step}/{total} loss(avg50) {np.mean(losses[-50:]):.4f} lr {lr:.2e} "
                 f"{rate:.1f} img/s (mean), {el / 60:.1f} min, ETA {(total - step) * batch / rate / 60:.0f} min")
        if step % a.ckpt_every == 0 or Stop.requested or step == total:
            save_ckpt()
            if Stop.requested:
                sys.exit(3)
    wall = wall0 + time.time() - t0
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    sd = _fp16(unet.state_dict())
    _save(sd, final, {"format": "miniworld factorised comfy UNetModel (miniworld/factor.py)",
                      "config": json.dumps(config.UNET_CONFIG), "ranks": json.dumps(config.UNET_RANKS)})
    rec = {"steps": total, "batch": batch, "lr": a.unet_lr,
           "schedule": "linear warm-up 200, cosine to 10 %" + (f" over cycles ending at {sorted(a.unet_cycles)} and {total}"
                                                              if a.unet_cycles else ""),
           "ema_decay": a.ema, "seed": config.SEED, "data_seed": config.SEED + 7, "bf16_autocast": a.bf16,
           "wall_s": round(wall, 1), "img_per_s": round(total * batch / wall, 2), "n_concepts": len(names),
           "n_captions": len(cs.captions), "caption_dropout": config.CAPTION_DROPOUT,
           "domain_caption_p": config.DOMAIN_CAPTION_P, "min_snr_gamma": config.MIN_SNR_GAMMA,
           "loss_first200": float(np.mean(losses[:200])), "loss_last200": float(np.mean(losses[-200:])),
           "loss_curve_every_250": [round(float(np.mean(losses[i:i + 250])), 4) for i in range(0, len(losses), 250)],
           "params": sum(p.numel() for p in params), "contexts_file": os.path.basename(ctx_path),
           **budget.record(), **({"ema_snapshots": snapshots} if snapshots else {}),
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "finished": datetime.datetime.now().isoformat(timespec="seconds")}
    _write_json(rec, rec_path)
    _log(f"unet done in {wall / 60:.1f} min")
    return rec


def save_grid(rows: list[torch.Tensor], path: str) -> None:
    """Rows of [k, 3, H, W] images in 0..1 -> one PNG, enlarged 2x."""
    from comfyui_domainstudio.trainer.grids import save_png, tile_rows

    save_png(tile_rows([r.permute(0, 2, 3, 1) for r in rows]), path, scale=2)


def sample_grid(work: str, path: str, dev) -> list[str]:
    """Training image / DDIM sample (EMA UNet, work-dir VAE) for 12 training captions."""
    cs_names = source_images("train")
    imgs, names = cs_names
    from .captions import CaptionSet

    ds = data.load(config.SOURCE_STYLE)
    cs, ctx_all, _ = stage_contexts(None, work)
    unet = models.load_factored_unet(os.path.join(work, "unet_factors_fp16.safetensors")).to(dev).eval()
    vae = load_vae(os.path.join(work, "taesd_fp16.safetensors"))
    ids = np.linspace(0, len(names) - 1, 12).round().astype(int).tolist()
    ctx = ctx_all[[i * cs.per_name + 1 for i in ids]].float()
    lat = ddim_sample(unet, ctx, ctx_all[cs.empty:cs.empty + 1].float(), seed=0, dev=dev)
    save_grid([imgs[ids], decode_model_space(vae, lat)], path)
    return [cs.captions[i * cs.per_name + 1] for i in ids]


# --- install --------------------------------------------------------------------------------------------
def stage_install(a, work: str, record_extra: dict) -> None:
    files = {"unet_factors_fp16.safetensors": config.UNET_FILE, "taesd_fp16.safetensors": config.VAE_FILE}
    for src, dst in files.items():
        if not os.path.exists(os.path.join(work, src)):
            raise SystemExit(f"install: {src} is missing in {work}: run the training stages first")
    os.makedirs(config.WEIGHTS_DIR, exist_ok=True)
    for src, dst in files.items():
        shutil.copyfile(os.path.join(work, src), dst + ".tmp")
        os.replace(dst + ".tmp", dst)
    legacy = os.path.join(config.WEIGHTS_DIR, "unet_fp16.safetensors")  # the one-level UNet before v2
    if os.path.exists(legacy):
        os.remove(legacy)
    data.export_reference()
    record = dict(record_extra)
    record["stages"] = {s: _read_json(os.path.join(work, f"record_{s}.json"))
                        for s in ("vae", "decoder", "contexts", "unet") if os.path.exists(os.path.join(work, f"record_{s}.json"))}
    old = _read_json(config.RECORD_FILE) if os.path.exists(config.RECORD_FILE) else {}
    if old.get("unet_config") == config.UNET_CONFIG and "quality" in old:
        record["quality"] = old["quality"]  # measured on the same layout; the evaluation reruns anyway
    record["weights"] = {os.path.basename(f): {"bytes": os.path.getsize(f), "sha256": _sha256(f)}
                         for f in (config.VAE_FILE, config.UNET_FILE, config.REFERENCE_PNG, config.REFERENCE_JSON)}
    record["shipped_bytes"] = sum(os.path.getsize(os.path.join(config.WEIGHTS_DIR, f))
                                  for f in os.listdir(config.WEIGHTS_DIR) if f != os.path.basename(config.RECORD_FILE))
    _write_json(record, config.RECORD_FILE)
    _log(f"installed into {config.WEIGHTS_DIR}; record: {config.RECORD_FILE}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=["all", "vae", "decoder", "contexts", "unet", "install", "grid"], default="all")
    p.add_argument("--work", default=None, help="work directory (default $DS_CACHE/miniworld-train-v<DATA_VERSION>)")
    p.add_argument("--parallel-decoder", action="store_true",
                   help="stage all: run the decoder stage in a child process beside the unet stage (2 cores)")
    p.add_argument("--vae-crop-steps", type=int, default=config.VAE_CROP_STEPS)
    p.add_argument("--vae-crop-batch", type=int, default=config.VAE_CROP_BATCH)
    p.add_argument("--vae-crop", type=int, default=config.VAE_CROP)
    p.add_argument("--vae-full-steps", type=int, default=config.VAE_FULL_STEPS)
    p.add_argument("--vae-full-batch", type=int, default=config.VAE_FULL_BATCH)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--dec-steps", type=int, default=config.DECODER_STEPS)
    p.add_argument("--dec-batch", type=int, default=config.DECODER_BATCH)
    p.add_argument("--dec-lr", type=float, default=3e-4)
    p.add_argument("--dec-adv", type=float, default=config.DECODER_ADV, help="hinge GAN weight for the decoder (0: off)")
    p.add_argument("--dec-adv-start", type=int, default=config.DECODER_ADV_START)
    p.add_argument("--unet-steps", type=int, default=config.UNET_STEPS)
    p.add_argument("--unet-batch", type=int, default=config.UNET_BATCH)
    p.add_argument("--unet-lr", type=float, default=config.UNET_LR)
    p.add_argument("--unet-cycles", type=int, nargs="*", default=list(config.UNET_CYCLES),
                   help="ends of earlier cosine cycles (warm restarts), e.g. 2000 3000")
    p.add_argument("--unet-minutes", type=float, default=0,
                   help="fix --unet-steps from the measured speed of steps 20-120 so the unet stage trains for "
                        "about this many minutes (a GPU lent for a fixed time); 0: use --unet-steps")
    p.add_argument("--dec-minutes", type=float, default=0, help="the same for the decoder stage's --dec-steps")
    p.add_argument("--unet-until", type=float, default=0,
                   help="like --unet-minutes, but end the unet loop by this wall-clock time (epoch seconds)")
    p.add_argument("--dec-until", type=float, default=0, help="the same for the decoder stage")
    p.add_argument("--ema-snapshots", type=float, nargs="*", default=[],
                   help="fractions of the unet steps at which to save the EMA weights too, e.g. 0.5")
    p.add_argument("--ema", type=float, default=config.EMA_DECAY)
    p.add_argument("--ckpt-every", type=int, default=200, help="checkpoint every N steps (and on SIGTERM/SIGINT)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--dec-threads", type=int, default=1, help="--parallel-decoder: the decoder process's threads")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", default=None, help="float32 compute")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.bf16 is None:
        a.bf16 = bf16_default(dev)
    work = a.work or config.work_dir()
    os.makedirs(work, exist_ok=True)
    Stop.install()
    cmd = "python -m miniworld.train " + " ".join(argv if argv is not None else sys.argv[1:])
    _log(f"stage {a.stage}, device {dev}, bf16 {a.bf16}, threads {torch.get_num_threads()}, work {work}")
    runs_path = os.path.join(work, "runs.json")
    runs = _read_json(runs_path) if os.path.exists(runs_path) else []
    runs.append({"command": cmd, "stage": a.stage, "started": datetime.datetime.now().isoformat(timespec="seconds"),
                 "pid": os.getpid()})
    _write_json(runs, runs_path)
    t_all = time.time()
    if a.stage in ("all", "vae"):
        stage_vae(a, dev, work)
    child = None
    if a.stage in ("all", "decoder") and not (a.stage == "all" and a.parallel_decoder):
        stage_decoder(a, dev, work)
    elif a.stage == "all":
        args = [sys.executable, "-m", "miniworld.train", "--stage", "decoder", "--work", work,
                "--threads", str(a.dec_threads), "--dec-steps", str(a.dec_steps), "--dec-batch", str(a.dec_batch),
                "--dec-lr", str(a.dec_lr), "--dec-adv", str(a.dec_adv), "--dec-adv-start", str(a.dec_adv_start), "--dec-minutes", str(a.dec_minutes), "--dec-until", str(a.dec_until),
                "--ckpt-every", str(a.ckpt_every)] + ([] if a.bf16 else ["--no-bf16"])
        log = open(os.path.join(work, "decoder.log"), "a")
        child = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=os.path.dirname(config.HERE))
        _log(f"decoder stage in child process {child.pid} (log: {log.name})")
    if a.stage == "contexts":
        stage_contexts(a, work)
    if a.stage in ("all", "unet"):
        stage_unet(a, dev, work)
    if child is not None:
        rc = child.wait()
        if rc != 0:
            raise SystemExit(f"decoder child process failed (rc {rc}); see {os.path.join(work, 'decoder.log')}")
    if a.stage in ("all", "grid"):
        caps = sample_grid(work, os.path.join(work, "samples_ddim.png"), dev)
        _log(f"grid: {os.path.join(work, 'samples_ddim.png')} ({caps})")
    if a.stage in ("all", "install"):
        extra = {
            "data": {s: {"package": f"emoji-datasource-{s}@{config.EMOJI_VERSION}",
                         "tarball_sha256": _sha256(data.tarball(s))}
                     for s in (config.SOURCE_STYLE,) + tuple(config.TARGET_STYLES)},
            "concepts": {"excluded_categories": list(config.EXCLUDED_CATEGORIES), "zwj_sequences": "excluded",
                         "heldout": f"index % {config.HELDOUT_EVERY} == {config.HELDOUT_OFFSET} in sort order",
                         "data_version": config.DATA_VERSION,
                         "templates": list(config.CAPTION_TEMPLATES) + [config.FILLER_TEMPLATE],
                         "domain_captions": list(config.DOMAIN_CAPTIONS) + [config.DOMAIN_FILLER_TEMPLATE]},
            "text_encoder": f"frozen random CLIP-L (seed {config.CLIP_SEED}, layers >= {models.ACTIVE_CLIP_LAYERS} "
                            "identities), regenerated by miniworld.build, not shipped",
            "unet_config": config.UNET_CONFIG, "unet_ranks": config.UNET_RANKS,
            "runs": runs,
            "environment": {"torch": torch.__version__, "python": platform.python_version(), "device": str(dev),
                            "threads": torch.get_num_threads(), "machine": platform.machine(),
                            "cpu_count": os.cpu_count(), "bf16_autocast": a.bf16},
        }
        stage_install(a, work, extra)
    _log(f"stage {a.stage} finished in {(time.time() - t_all) / 60:.1f} min")


if __name__ == "__main__":
    main()
