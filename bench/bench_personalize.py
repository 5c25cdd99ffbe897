"""Benchmark: step cost of each personalization method's stages and its wall time to a result, in
the same process on the same model, through the core's one entry point (trainer.run.run over
ComfyHost). The reference is DreamBooth without prior (a plain UNet fine-tune step); ratios are the
portable result, absolute seconds mean something only on a GPU.

On the CPU it uses the tiny models of comfyui_domainstudio.testing.tiny_models (SD1.5: 1-level UNet +
12-layer CLIP-L; SDXL: KOALA-layout UNet + 3-layer CLIP-L/G), built and cached on first use (the
same files the tests use), or the miniature SD (--model miniworld), or any checkpoint (--checkpoint).

    eval "$(bash .ci/setup.sh | tail -2)"
    $DS_VENV/bin/python bench/bench_personalize.py [--family sd15|sdxl] [--model miniworld] [--steps 10] [--out ...json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import runpy
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
runpy.run_path(os.path.join(REPO, "__init__.py"))  # registers the one package name, comfyui_domainstudio

METHODS = ("dreambooth_no_prior", "dreambooth", "textual_inversion", "rare_token")  # the reference first


def load_models(args):
    """(MODEL, CLIP, VAE, description) for the chosen model."""
    import torch

    import comfy.sd

    from comfyui_domainstudio.testing import harness
    from comfyui_domainstudio.testing import tiny_models as tm

    if args.checkpoint or args.model == "miniworld":
        if args.model == "miniworld":
            from comfyui_domainstudio.miniworld import build

            args.checkpoint = build.ensure()
        with torch.inference_mode():
            model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(args.checkpoint)
        return model, clip, vae, os.path.basename(args.checkpoint)
    import comfyui_version

    d = os.path.join(harness.cache_dir(), f"tiny-v{tm.TINY_VERSION}-comfy{comfyui_version.__version__}")
    sd15 = os.path.join(d, "checkpoints", "tiny_sd15.safetensors")
    if not os.path.exists(sd15):
        tm.build_sd15_checkpoint(sd15)
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(sd15)
        if args.family == "sdxl":
            unet = os.path.join(d, "diffusion_models", "tiny_sdxl_unet.safetensors")
            if not os.path.exists(unet):
                tm.build_sdxl_unet(unet)
            model = comfy.sd.load_diffusion_model(unet)
            clip = tm.tiny_sdxl_clip()
    return model, clip, vae, f"tiny {args.family} (testing/tiny_models.py v{tm.TINY_VERSION})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="sd15", choices=["sd15", "sdxl"])
    ap.add_argument("--model", default="tiny", choices=["tiny", "miniworld"])
    ap.add_argument("--checkpoint", default="", help="a real checkpoint instead of the tiny one (GPU runs)")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per stage (after 2 warm-up)")
    ap.add_argument("--class-images", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    tag = "miniworld" if args.model == "miniworld" else args.family
    out_path = args.out or os.path.join(REPO, "bench", "results", f"personalize_{tag}_{args.device}.json")

    from comfyui_domainstudio.dstrain.hosts import import_comfy

    import_comfy(os.environ.get("COMFYUI_DIR", ""), args.device)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from comfyui_domainstudio.trainer import run as core
    from comfyui_domainstudio.trainer.hosts.comfy import ComfyHost

    model, clip, vae, described = load_models(args)
    host = ComfyHost(model, clip, vae)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, args.resolution, args.resolution, 3, generator=g)
    n = args.steps + 2
    opts = core.RunOptions(lora_rank=args.rank, lora_alpha=float(args.rank), train_seed=0, preview_every=0)

    def cfg_for(method: str, steps: int):
        return core.resolve_config(method, {"class_noun": "dog", "ti_steps": steps, "unet_steps": steps,
                                            "batch_size": args.batch, "class_images": args.class_images})

    # One-time start-up costs (first load, kernel warm-up, the memory plan's probes, which are cached
    # per step shape) outside the table; another seed, so the timed DreamBooth run makes its class
    # images anew (they are cached per seed).
    warm = core.RunOptions(**{**vars(opts), "train_seed": 1})
    with torch.inference_mode():
        for method in METHODS:
            core.run(host, method, cfg_for(method, 1), images, warm)
    rows = []
    for method in METHODS:
        stamps: dict[str, list[float]] = {}

        def on_progress(p, stamps=stamps):
            if args.device == "cuda":
                torch.cuda.synchronize()
            if p.stage in ("token", "unet"):
                stamps.setdefault(p.stage, []).append(time.perf_counter())
            elif p.stage == "class images":
                stamps.setdefault("class images", []).append(time.perf_counter())

        t0 = time.perf_counter()
        with torch.inference_mode():
            out = core.run(host, method, cfg_for(method, n), images, opts, on_progress=on_progress)
        row = {"method": method, "wall_s": time.perf_counter() - t0,
               "class_images_s": (stamps["class images"][-1] - t0) if "class images" in stamps else 0.0,
               "stage_loop_s": {s.name: s.seconds for s in out.stages}}
        for stage in ("token", "unet"):
            ts = stamps.get(stage, [])
            if len(ts) > 3:
                row[f"{stage}_step_s"] = statistics.median(b - a for a, b in zip(ts[1:], ts[2:]))  # 2 warm-up steps dropped
        rows.append(row)
    ref = rows[0]["unet_step_s"]
    for r in rows:
        for stage in ("token", "unet"):
            if f"{stage}_step_s" in r:
                r[f"{stage}_x_ref"] = r[f"{stage}_step_s"] / ref

    load = os.getloadavg()
    print(f"\nPersonalization step cost, {described}, {args.device}, {args.resolution}x{args.resolution}, batch "
          f"{args.batch}, LoRA attn rank {args.rank}, {args.steps} timed steps per stage; reference = "
          f"dreambooth_no_prior UNet step; load average {load[0]:.2f}")
    print(f"{'method':22s} {'token s/step':>12s} {'x ref':>6s} {'unet s/step':>12s} {'x ref':>6s} "
          f"{'class imgs s':>12s} {'wall s':>7s}")
    for r in rows:
        tok = f"{r['token_step_s']:12.3f} {r['token_x_ref']:6.2f}" if "token_step_s" in r else f"{'-':>12s} {'-':>6s}"
        un = f"{r['unet_step_s']:12.3f} {r['unet_x_ref']:6.2f}" if "unet_step_s" in r else f"{'-':>12s} {'-':>6s}"
        print(f"{r['method']:22s} {tok} {un} {r['class_images_s']:12.2f} {r['wall_s']:7.2f}")
    result = {"model": described, "family": args.family, "device": args.device, "platform": platform.platform(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "load_average": load,
              "resolution": args.resolution, "batch": args.batch, "rank": args.rank, "timed_steps": args.steps,
              "class_images": args.class_images, "rows": rows}
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(out_path + ".tmp", out_path)
    print(f"saved {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
