"""Benchmark: cost of one DomainStudio training step against plain fine-tuning (the reference:
the same step with lambda_img = lambda_hf = lambda_hfmse = 0), in the same run, on the same model.

Prints a table and writes JSON. Ratios are the portable result; absolute seconds mean something
only on a GPU (run with --device cuda there). On the CPU it uses the tiny SD1.5-detectable model
from tests/tiny_models.py (built and cached on first use).

    eval "$(bash .ci/setup.sh | tail -2)"
    $DS_VENV/bin/python bench/bench_step.py [--resolution 64] [--steps 12] [--out bench/results/step_cpu.json]
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
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per configuration (after 2 warm-up)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--checkpoint", default="", help="a real checkpoint instead of the tiny one (GPU runs)")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "step_cpu.json"))
    args = ap.parse_args()

    comfy_dir = os.environ.get("COMFYUI_DIR") or sys.exit("COMFYUI_DIR not set (eval the output of .ci/setup.sh)")
    sys.path.insert(0, comfy_dir)
    import comfy.cli_args

    comfy.cli_args.args.cpu = args.device == "cpu"
    import comfy.sd
    import torch

    sys.path.append(REPO)
    from trainer.demo_data import striped_domain
    from trainer.domainstudio import DomainStudioConfig
    from trainer.hosts import comfy as host

    ckpt = args.checkpoint
    if not ckpt:
        import tiny_models

        cache = os.environ.get("DS_CACHE") or os.path.expanduser("~/.cache/comfyui-domainstudio")
        ckpt = os.path.join(cache, f"tiny-v{tiny_models.TINY_VERSION}-bench", "tiny_sd15.safetensors")
        if not os.path.exists(ckpt):
            tiny_models.build_sd15_checkpoint(ckpt)
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(ckpt)
    import numpy as np

    images = torch.from_numpy(np.stack([np.asarray(im) for im in striped_domain(8, args.resolution)])).float() / 255

    configs = [
        ("reference: plain fine-tune", dict(lambda_img=0.0, lambda_hf=0.0, lambda_hfmse=0.0), "latent"),
        ("DomainStudio, latent features", {}, "latent"),
        ("DomainStudio, pixel features", {}, "pixel"),
    ]
    rows = []
    for name, lambdas, space in configs:
        cfg = DomainStudioConfig(steps=args.steps + 2, batch_size=args.batch, learning_rate=1e-4, **lambdas)
        stamps = []
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()

        def on_step(step, parts):
            if args.device == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

        t0 = time.perf_counter()
        host.train_domainstudio_comfy(model, clip, vae, images, cfg, train_mode="lora_attn", rank=8, alpha=8.0,
                                      feature_space=space, on_step=on_step)
        steps = [b - a for a, b in zip(stamps[1:], stamps[2:])]  # drop 2 warm-up steps
        row = {"config": name, "feature_space": space, "median_step_s": statistics.median(steps),
               "steps_per_s": 1 / statistics.median(steps), "wall_s": time.perf_counter() - t0}
        if args.device == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rows.append(row)
    ref = rows[0]["median_step_s"]
    for r in rows:
        r["ratio_vs_reference"] = r["median_step_s"] / ref

    print(f"\nDomainStudio step cost, {args.device}, {args.resolution}x{args.resolution}, batch {args.batch}, "
          f"LoRA attn rank 8, {os.path.basename(ckpt)}")
    print(f"{'configuration':34s} {'s/step':>8s} {'steps/s':>8s} {'x ref':>7s}" + ("  peak GiB" if args.device == "cuda" else ""))
    for r in rows:
        extra = f"  {r['peak_mem_gib']:8.2f}" if "peak_mem_gib" in r else ""
        print(f"{r['config']:34s} {r['median_step_s']:8.3f} {r['steps_per_s']:8.2f} {r['ratio_vs_reference']:7.2f}{extra}")
    result = {"device": args.device, "platform": platform.platform(), "torch": torch.__version__,
              "resolution": args.resolution, "batch": args.batch, "timed_steps": args.steps,
              "checkpoint": os.path.basename(ckpt), "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.out)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
