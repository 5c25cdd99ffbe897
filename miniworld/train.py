"""Reproduce the shipped miniworld weights (CPU-trainable; a GPU is used when present).

    python -m miniworld.train                       # both stages with the recorded settings
    python -m miniworld.train --stage vae           # TAESD-architecture VAE only
    python -m miniworld.train --stage unet          # UNet only (needs the VAE in miniworld/weights)

Stage ``vae``: ComfyUI's TAESD (encoder + decoder, 2.4 M params) trained from scratch on random
32x32 crops (aligned to the 8-pixel latent grid) of all source-style emoji, then ``vae_scale`` /
``vae_shift`` are set so that ComfyUI's SD1.5 latent scaling (x 0.18215) gives zero-mean,
unit-variance model-space latents. Stage ``unet``: the tiny SD1.5 UNet (config.UNET_CONFIG) on
the training subset, eps objective on SD's scaled-linear 1000-step schedule (what ComfyUI's
ModelSamplingDiscrete samples), min-SNR-5 weighting, 10 % caption dropout (empty-prompt context
for CFG), EMA. Caption contexts come from ComfyUI's own tokenizer and text encoder (the frozen
random CLIP-L, see models.new_clip) and are computed once.

Everything is seeded; on one machine with the same thread count the result is bit-identical.
Writes miniworld/weights/{taesd_fp16,unet_fp16}.safetensors and training.json (command, data
package versions and hashes, seeds, steps, throughput, wall time) plus a sample grid.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
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


def images_tensor(style: str = config.SOURCE_STYLE) -> torch.Tensor:
    """All subset images of ``style`` as float [N,3,64,64] in [0,1]."""
    return torch.from_numpy(data.load(style)["images"]).permute(0, 3, 1, 2).float() / 255.0


def train_indices(n: int) -> list[int]:
    """Indices (into the data subset) of the emoji the UNet is trained on."""
    return list(range(0, n, config.TRAIN_STRIDE))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.clamp(0, 1) - b).pow(2).mean(dim=(1, 2, 3))
    return float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean())


# --- VAE --------------------------------------------------------------------------------------------
def train_vae(steps: int, batch: int, lr: float, crop: int, seed: int, dev: torch.device) -> dict:
    imgs = images_tensor().to(dev)
    n = imgs.shape[0]
    vae = models.new_taesd(seed).to(dev).to(memory_format=torch.channels_last)
    enc, dec = vae.taesd_encoder, vae.taesd_decoder
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)) * 0.95 + 0.05)
    g = torch.Generator().manual_seed(seed)
    cells = (config.IMAGE_SIZE - crop) // 8 + 1
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, n, (batch,), generator=g)
        oy = torch.randint(0, cells, (batch,), generator=g) * 8
        ox = torch.randint(0, cells, (batch,), generator=g) * 8
        x = torch.stack([imgs[i, :, y:y + crop, xx:xx + crop] for i, y, xx in zip(idx.tolist(), oy.tolist(), ox.tolist())])
        x = x.contiguous(memory_format=torch.channels_last)
        d = enc(x)
        y = dec(d)
        loss = (y - x).pow(2).mean() + 0.1 * (y - x).abs().mean() + 1e-4 * d.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            _log(f"vae step {step}/{steps} loss {loss.item():.5f} psnr(crop) {psnr(y.detach(), x):.2f} dB "
                 f"{(step + 1) * batch / (time.time() - t0):.1f} crops/s")
    wall = time.time() - t0
    # latent statistics on full images, then ComfyUI's scale/shift (see module doc)
    with torch.no_grad():
        vae.eval()
        d = torch.cat([enc(imgs[i:i + 64].contiguous(memory_format=torch.channels_last)) for i in range(0, n, 64)])
        mean, std = float(d.mean()), float(d.std())
        vae.vae_scale.fill_(config.SD15_LATENT_SCALE * std)
        vae.vae_shift.fill_(-mean / (config.SD15_LATENT_SCALE * std))
    sd = _fp16({k: v.float() for k, v in vae.state_dict().items()})
    _save(sd, config.VAE_FILE, {"format": "comfy.taesd.taesd.TAESD", "latent_channels": 4})
    # quality of what ships (fp16 weights, full 64x64 images, ComfyUI's encode/decode)
    ship = load_vae(dev)
    with torch.no_grad():
        rec = torch.cat([vae_roundtrip(ship, imgs[i:i + 64]) for i in range(0, n, 64)])
    p = psnr(rec, imgs)
    _log(f"vae done in {wall:.0f}s: PSNR {p:.2f} dB on {n} images; latent mean {mean:.3f} std {std:.3f}")
    return {"steps": steps, "batch": batch, "lr": lr, "crop": crop, "seed": seed, "wall_s": round(wall, 1),
            "crops_per_s": round(steps * batch / wall, 2), "psnr_db": round(p, 2), "n_images": n,
            "latent_mean": mean, "latent_std": std, "params": sum(p.numel() for p in params)}


def finetune_decoder(steps: int, batch: int, lr: float, seed: int, dev: torch.device) -> dict:
    """Decoder-only fine-tuning on full 64x64 images: the encoder (and so every latent, vae_scale and
    vae_shift) stays bit-identical, so this can run beside/after the UNet stage."""
    imgs = images_tensor().to(dev)
    n = imgs.shape[0]
    vae = load_vae(dev).to(memory_format=torch.channels_last)
    before = _load(config.VAE_FILE)
    with torch.no_grad():
        d_all = torch.cat([vae.taesd_encoder(imgs[i:i + 64].contiguous(memory_format=torch.channels_last))
                           for i in range(0, n, 64)])
    dec = vae.taesd_decoder.train()
    opt = torch.optim.AdamW(dec.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)) * 0.95 + 0.05)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, n, (batch,), generator=g)
        x = imgs[idx].contiguous(memory_format=torch.channels_last)
        y = dec(d_all[idx].contiguous(memory_format=torch.channels_last))
        loss = (y - x).pow(2).mean() + 0.1 * (y - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            _log(f"decoder step {step}/{steps} loss {loss.item():.5f} psnr {psnr(y.detach(), x):.2f} dB "
                 f"{(step + 1) * batch / (time.time() - t0):.1f} img/s")
    wall = time.time() - t0
    sd = _fp16({k: v.float() for k, v in vae.state_dict().items()})
    assert all(torch.equal(sd[k], before[k]) for k in before if not k.startswith("taesd_decoder."))
    _save(sd, config.VAE_FILE, {"format": "comfy.taesd.taesd.TAESD", "latent_channels": 4})
    ship = load_vae(dev)
    with torch.no_grad():
        rec = torch.cat([vae_roundtrip(ship, imgs[i:i + 64]) for i in range(0, n, 64)])
    p = psnr(rec, imgs)
    _log(f"decoder done in {wall:.0f}s: PSNR {p:.2f} dB on {n} images")
    return {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "wall_s": round(wall, 1),
            "img_per_s": round(steps * batch / wall, 2), "psnr_db": round(p, 2)}


def load_vae(dev=torch.device("cpu")):
    vae = models.new_taesd()
    vae.load_state_dict({k: v.float() for k, v in _load(config.VAE_FILE).items()})
    return vae.to(dev).eval()


def vae_roundtrip(vae, x01: torch.Tensor) -> torch.Tensor:
    """[0,1] images -> ComfyUI raw latents -> [0,1] images, as comfy.sd.VAE does for TAESD."""
    return (vae.decode(vae.encode(x01 * 2 - 1)) + 1) / 2


def encode_model_space(vae, x01: torch.Tensor) -> torch.Tensor:
    """Latents as the UNet sees them in ComfyUI: raw TAESD latents x SD1.5's 0.18215."""
    return vae.encode(x01 * 2 - 1) * config.SD15_LATENT_SCALE


def decode_model_space(vae, z: torch.Tensor) -> torch.Tensor:
    return ((vae.decode(z / config.SD15_LATENT_SCALE) + 1) / 2).clamp(0, 1)


# --- text contexts ------------------------------------------------------------------------------------
def caption_contexts(captions: list[str]) -> torch.Tensor:
    """[len(captions), 77, 768] contexts from ComfyUI's tokenizer + the random CLIP-L (fp32 copy)."""
    clip = models.comfy_clip()
    out = []
    for s in captions:
        out.append(clip.encode_from_tokens(clip.tokenize(s)).float()[0])
    return torch.stack(out)


# --- diffusion ----------------------------------------------------------------------------------------
def alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


@torch.no_grad()
def ddim_sample(unet, ctx: torch.Tensor, uncond: torch.Tensor, seed: int, steps: int = 25, cfg: float = 4.0) -> torch.Tensor:
    """Deterministic DDIM (eta 0) in model space, for the sample grid (the tests use stock KSampler)."""
    ac = alphas_cumprod()
    g = torch.Generator().manual_seed(seed)
    b = ctx.shape[0]
    x = torch.randn(b, 4, 8, 8, generator=g)
    ts = torch.linspace(999, 0, steps).round().long()
    for i, t in enumerate(ts):
        tt = torch.full((2 * b,), float(t))
        eps_c, eps_u = unet(torch.cat([x, x]), tt, context=torch.cat([ctx, uncond.expand(b, -1, -1)])).float().chunk(2)
        eps = eps_u + cfg * (eps_c - eps_u)
        a = ac[t]
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        a_next = ac[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x


def train_unet(steps: int, batch: int, lr: float, ema_decay: float, seed: int, dev: torch.device,
               grid_path: str | None) -> dict:
    ds = data.load(config.SOURCE_STYLE)
    imgs = images_tensor()
    idx = train_indices(len(imgs))
    names = [ds["names"][i] for i in idx]
    vae = load_vae()
    with torch.no_grad():
        z = torch.cat([encode_model_space(vae, imgs[idx][i:i + 64]) for i in range(0, len(idx), 64)])
    _log(f"{len(idx)} training emoji; model-space latents mean {z.mean():.3f} std {z.std():.3f}")
    caps = [c for n in names for c in data.captions_for(n)]
    t0 = time.time()
    ctx_all = caption_contexts(caps + [""])
    ctx_time = time.time() - t0
    ctx, uncond = ctx_all[:-1], ctx_all[-1:]
    n_t = len(config.CAPTION_TEMPLATES)
    _log(f"{len(caps)} caption contexts in {ctx_time:.0f}s")

    _, unet = models.new_unet(seed)
    unet = unet.to(dev).to(memory_format=torch.channels_last).train()
    ema = {k: v.detach().clone().float() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    warm = 50
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps))))
    ac = alphas_cumprod().to(dev)
    g = torch.Generator().manual_seed(seed + 7)
    z, ctx, uncond = z.to(dev), ctx.to(dev), uncond.to(dev)
    grid_ids = list(range(0, len(idx), max(1, len(idx) // 8)))[:8]

    def grid_row(state: str):
        with torch.no_grad():
            unet.eval()
            lat = ddim_sample(unet, ctx[[i * n_t + 1 for i in grid_ids]], uncond, seed=seed)
            unet.train()
            return decode_model_space(vae, lat.float().cpu())

    rows = [imgs[idx][grid_ids], grid_row("before")] if grid_path else []
    losses = []
    t0 = time.time()
    for step in range(steps):
        bi = torch.randint(0, len(idx), (batch,), generator=g)
        ti = torch.randint(0, n_t, (batch,), generator=g)
        drop = torch.rand(batch, generator=g) < config.CAPTION_DROPOUT
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn(batch, 4, 8, 8, generator=g)
        x0 = z[bi]
        c = torch.where(drop.view(-1, 1, 1).to(dev), uncond.expand(batch, -1, -1), ctx[bi * n_t + ti])
        a = ac[t].view(-1, 1, 1, 1)
        xt = (a.sqrt() * x0 + (1 - a).sqrt() * noise.to(dev)).contiguous(memory_format=torch.channels_last)
        pred = unet(xt, t.float().to(dev), context=c).float()
        snr = a.view(-1) / (1 - a.view(-1))
        w = torch.clamp(snr, max=config.MIN_SNR_GAMMA) / snr
        loss = (w * (pred - noise.to(dev)).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for k, v in unet.state_dict().items():
                ema[k].mul_(d).add_(v.float(), alpha=1 - d)
        losses.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            el = time.time() - t0
            _log(f"unet step {step}/{steps} loss(avg25) {np.mean(losses[-25:]):.4f} "
                 f"{(step + 1) * batch / el:.1f} img/s, {el / 60:.1f} min")
    wall = time.time() - t0
    unet.load_state_dict({k: v.to(unet.state_dict()[k].dtype) for k, v in ema.items()})
    sd = _fp16(unet.state_dict())
    _save(sd, config.UNET_FILE, {"format": "comfy UNetModel (diffusion_model.*)", "config": json.dumps(config.UNET_CONFIG)})
    if grid_path:
        unet.load_state_dict({k: v.float() for k, v in sd.items()})
        unet.float()
        rows.append(grid_row("after"))
        save_grid(rows, grid_path)
        _log(f"sample grid (rows: training image, before training, after training): {grid_path}")
    return {"steps": steps, "batch": batch, "lr": lr, "ema_decay": ema_decay, "seed": seed, "wall_s": round(wall, 1),
            "img_per_s": round(steps * batch / wall, 2), "caption_contexts_s": round(ctx_time, 1),
            "n_emoji": len(idx), "n_captions": len(caps), "caption_dropout": config.CAPTION_DROPOUT,
            "min_snr_gamma": config.MIN_SNR_GAMMA, "loss_first100": float(np.mean(losses[:100])),
            "loss_last100": float(np.mean(losses[-100:])), "params": sum(p.numel() for p in unet.parameters()),
            "grid_captions": [data.captions_for(names[i])[1] for i in grid_ids]}


def save_grid(rows: list[torch.Tensor], path: str) -> None:
    """Rows of [k, 3, H, W] images in 0..1 -> one PNG, enlarged 2x."""
    from trainer.plot import save_png, tile_rows

    save_png(tile_rows([r.permute(0, 2, 3, 1) for r in rows]), path, scale=2)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=["all", "vae", "unet", "decoder"], default="all")
    p.add_argument("--dec-steps", type=int, default=config.DECODER_STEPS)
    p.add_argument("--dec-batch", type=int, default=16)
    p.add_argument("--dec-lr", type=float, default=5e-4)
    p.add_argument("--vae-steps", type=int, default=config.VAE_STEPS)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-crop", type=int, default=32)
    p.add_argument("--unet-steps", type=int, default=config.UNET_STEPS)
    p.add_argument("--unet-batch", type=int, default=16)
    p.add_argument("--unet-lr", type=float, default=5e-4)
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default); 1 was fastest on a shared 2-core CPU")
    p.add_argument("--grid", default=os.path.join(config.HERE, "samples_before_after.png"))
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    record = {}
    if os.path.exists(config.RECORD_FILE):
        with open(config.RECORD_FILE) as f:
            record = json.load(f)
    record.update({
        "data": {s: {"package": f"emoji-datasource-{s}@{config.EMOJI_VERSION}", "tarball_sha256": _sha256(data.tarball(s))}
                 for s in (config.SOURCE_STYLE,) + tuple(config.TARGET_STYLES)},
        "subset": {"categories": list(config.CATEGORIES), "train_stride": config.TRAIN_STRIDE,
                   "templates": list(config.CAPTION_TEMPLATES), "data_version": config.DATA_VERSION},
        "text_encoder": f"frozen random CLIP-L (seed {config.CLIP_SEED}, layers >= {models.ACTIVE_CLIP_LAYERS} identities), "
                        "regenerated by miniworld.build, not shipped",
        "unet_config": config.UNET_CONFIG,
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "device": str(dev),
                        "threads": torch.get_num_threads(), "machine": platform.machine(),
                        "cpu_count": os.cpu_count()},
    })
    stages = {}
    cmd = "python -m miniworld.train " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.stage in ("all", "vae"):
        data.load(config.SOURCE_STYLE)
        stages["vae"] = train_vae(a.vae_steps, a.vae_batch, a.vae_lr, a.vae_crop, config.SEED + 1, dev)
        stages["vae"]["command"] = cmd
        stages["vae"]["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    if a.stage in ("all", "decoder"):
        # each run continues from the current decoder: the record keeps every run, in order
        run = finetune_decoder(a.dec_steps, a.dec_batch, a.dec_lr, config.SEED + 2, dev)
        run["command"] = cmd
        run["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        stages["decoder_runs"] = [run]
    if a.stage in ("all", "unet"):
        data.export_reference()
        stages["unet"] = train_unet(a.unet_steps, a.unet_batch, a.unet_lr, a.ema, config.SEED, dev, a.grid)
        stages["unet"]["command"] = cmd
        stages["unet"]["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    if os.path.exists(config.RECORD_FILE):  # another stage may have finished meanwhile
        with open(config.RECORD_FILE) as f:
            record["stages"] = json.load(f).get("stages", {})
    if "decoder_runs" in stages:
        prev = record.get("stages", {}).get("decoder_runs") or (
            [record["stages"].pop("decoder")] if "decoder" in record.get("stages", {}) else [])
        stages["decoder_runs"] = prev + stages["decoder_runs"]
    record.setdefault("stages", {}).update(stages)
    record["weights"] = {os.path.basename(f): {"bytes": os.path.getsize(f), "sha256": _sha256(f)}
                         for f in (config.VAE_FILE, config.UNET_FILE) if os.path.exists(f)}
    with open(config.RECORD_FILE + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(config.RECORD_FILE + ".tmp", config.RECORD_FILE)
    _log(f"record: {config.RECORD_FILE}")


if __name__ == "__main__":
    main()
