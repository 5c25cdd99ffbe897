"""Benchmark: step cost of each personalization method's stages and its wall time to a result, in
the same run on the same model. The reference is DreamBooth without prior (a plain UNet fine-tune
step); ratios are the portable result, absolute seconds mean something only on a GPU.

On the CPU it uses the tiny models of tests/tiny_models.py (SD1.5: 1-level UNet + 12-layer CLIP-L;
SDXL: KOALA-layout UNet + 3-layer CLIP-L/G), built and cached on first use.

    eval "$(bash .ci/setup.sh | tail -2)"
    $DS_VENV/bin/python bench/bench_personalize.py [--family sd15|sdxl] [--steps 10] [--out ...json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="sd15", choices=["sd15", "sdxl"])
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per stage (after 2 warm-up)")
    ap.add_argument("--class-images", type=int, default=4)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    out_path = args.out or os.path.join(REPO, "bench", "results", f"personalize_{args.family}_{args.device}.json")

    comfy_dir = os.environ.get("COMFYUI_DIR") or sys.exit("COMFYUI_DIR not set (eval the output of .ci/setup.sh)")
    sys.path.insert(0, comfy_dir)
    import comfy.cli_args

    comfy.cli_args.args.cpu = args.device == "cpu"
    import comfy.sd
    import torch

    sys.path.append(REPO)
    import tiny_models
    from trainer.hosts import comfy as host
    from trainer.hosts import comfy_personalize as phost
    from trainer.personalize import METHODS, PersonalizeConfig

    cache = os.path.join(os.environ.get("DS_CACHE") or os.path.expanduser("~/.cache/comfyui-domainstudio"),
                         f"tiny-v{tiny_models.TINY_VERSION}-bench")
    sd15 = os.path.join(cache, "tiny_sd15.safetensors")
    if not os.path.exists(sd15):
        tiny_models.build_sd15_checkpoint(sd15)
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(sd15)
        if args.family == "sdxl":
            unet = os.path.join(cache, "tiny_sdxl_unet.safetensors")
            if not os.path.exists(unet):
                tiny_models.build_sdxl_unet(unet)
            model = comfy.sd.load_diffusion_model(unet)
            clip = tiny_models.tiny_sdxl_clip()

    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, args.resolution, args.resolution, 3, generator=g)
    n = args.steps + 2
    with torch.inference_mode():  # one-time start-up costs (first load, kernel warm-up) outside the table
        phost.train_personalization_comfy(model, clip, vae, images, PersonalizeConfig(
            method="rare_token", class_noun="dog", ti_steps=1, unet_steps=1), rank=8, alpha=8.0)
    rows = []
    for method in ["dreambooth_no_prior", *[m for m in METHODS if m != "dreambooth_no_prior"]]:
        cfg = PersonalizeConfig(method=method, class_noun="dog", trigger="sks" if "dreambooth" in method else "ds_subject",
                                ti_steps=n, unet_steps=n, batch_size=args.batch)
        stamps: dict[str, list[float]] = {}

        def on_step(stage, step, loss):
            if args.device == "cuda":
                torch.cuda.synchronize()
            stamps.setdefault(stage, []).append(time.perf_counter())

        t0 = time.perf_counter()
        prior = None
        with torch.inference_mode():
            if method == "dreambooth":
                prior = host.generate_class_latents(model, clip, cfg.class_prompt(), args.class_images, args.resolution, 0)
            t_prior = time.perf_counter() - t0
            phost.train_personalization_comfy(model, clip, vae, images, cfg, rank=8, alpha=8.0, prior_latents=prior,
                                              on_step=on_step)
        row = {"method": method, "wall_s": time.perf_counter() - t0, "class_images_s": t_prior}
        for stage, ts in stamps.items():
            row[f"{stage}_step_s"] = statistics.median(b - a for a, b in zip(ts[1:], ts[2:]))
        rows.append(row)
    ref = rows[0]["unet_step_s"]
    for r in rows:
        for stage in ("token", "unet"):
            if f"{stage}_step_s" in r:
                r[f"{stage}_x_ref"] = r[f"{stage}_step_s"] / ref

    print(f"\nPersonalization step cost, {args.family}, {args.device}, {args.resolution}x{args.resolution}, batch "
          f"{args.batch}, LoRA attn rank 8, {args.steps} timed steps per stage; reference = dreambooth_no_prior UNet step")
    print(f"{'method':22s} {'token s/step':>12s} {'x ref':>6s} {'unet s/step':>12s} {'x ref':>6s} {'class imgs s':>12s} {'wall s':>7s}")
    for r in rows:
        tok = f"{r['token_step_s']:12.3f} {r['token_x_ref']:6.2f}" if "token_step_s" in r else f"{'-':>12s} {'-':>6s}"
        un = f"{r['unet_step_s']:12.3f} {r['unet_x_ref']:6.2f}" if "unet_step_s" in r else f"{'-':>12s} {'-':>6s}"
        print(f"{r['method']:22s} {tok} {un} {r['class_images_s']:12.2f} {r['wall_s']:7.2f}")
    result = {"family": args.family, "device": args.device, "platform": platform.platform(), "torch": torch.__version__,
              "resolution": args.resolution, "batch": args.batch, "timed_steps": args.steps,
              "class_images": args.class_images, "rows": rows}
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(out_path + ".tmp", out_path)
    print(f"saved {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
