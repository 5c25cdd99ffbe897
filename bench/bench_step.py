"""Benchmark: cost of one DomainStudio training step against plain fine-tuning (the reference: the
registered `finetune` method, the same denoising step without the source pass and the pairwise /
high-frequency terms), in the same process, on the same model, through the core's one entry point
(trainer.run.run over ComfyHost).

Prints a table and writes JSON. Ratios are the portable result; absolute seconds mean something
only on a GPU (run with --device cuda there). On the CPU it uses the tiny SD1.5-detectable model of
comfyui_domainstudio.testing.tiny_models (built and cached on first use, the file the tests use).

    eval "$(bash .ci/setup.sh | tail -2)"
    $DS_VENV/bin/python bench/bench_step.py [--resolution 64] [--steps 12] [--out bench/results/step_cpu.json]
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

TARGET, SOURCE = "a sks house", "a house"
CONFIGS = (
    ("reference: plain fine-tune", "finetune", {"target_prompt": TARGET}),
    ("DomainStudio, lambdas 0", "domainstudio",
     {"target_prompt": TARGET, "source_prompt": SOURCE, "lambda_img": 0.0, "lambda_hf": 0.0, "lambda_hfmse": 0.0}),
    ("DomainStudio, latent features", "domainstudio", {"target_prompt": TARGET, "source_prompt": SOURCE}),
    ("DomainStudio, pixel features", "domainstudio",
     {"target_prompt": TARGET, "source_prompt": SOURCE, "feature_space": "pixel"}),
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per configuration (after 2 warm-up)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--checkpoint", default="", help="a real checkpoint instead of the tiny one (GPU runs)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "step_cpu.json"))
    args = ap.parse_args()

    from comfyui_domainstudio.dstrain.hosts import import_comfy

    import_comfy(os.environ.get("COMFYUI_DIR", ""), args.device)
    import numpy as np
    import torch

    import comfy.sd

    if args.threads:
        torch.set_num_threads(args.threads)
    from comfyui_domainstudio.testing import harness
    from comfyui_domainstudio.testing import tiny_models as tm
    from comfyui_domainstudio.testing.demo_data import striped_domain
    from comfyui_domainstudio.trainer import run as core
    from comfyui_domainstudio.trainer.hosts.comfy import ComfyHost

    ckpt = args.checkpoint
    if not ckpt:
        import comfyui_version

        ckpt = os.path.join(harness.cache_dir(), f"tiny-v{tm.TINY_VERSION}-comfy{comfyui_version.__version__}",
                            "checkpoints", "tiny_sd15.safetensors")
        if not os.path.exists(ckpt):
            tm.build_sd15_checkpoint(ckpt)
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(ckpt)
    host = ComfyHost(model, clip, vae)
    images = torch.from_numpy(np.stack([np.asarray(im) for im in striped_domain(8, args.resolution)])).float() / 255
    opts = core.RunOptions(train_mode="lora_attn", lora_rank=8, lora_alpha=8.0, train_seed=0, preview_every=0)

    def cfg_for(method, values, steps):
        return core.resolve_config(method, {**values, "steps": steps, "batch_size": args.batch,
                                            "learning_rate": 1e-4})

    with torch.inference_mode():  # first-call costs (kernel warm-up, the memory plan's probes) outside the table
        for _, method, values in CONFIGS:
            core.run(host, method, cfg_for(method, values, 1), images, opts)
    rows = []
    for name, method, values in CONFIGS:
        stamps = []
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()

        def on_progress(p, stamps=stamps):
            if args.device == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

        t0 = time.perf_counter()
        with torch.inference_mode():
            core.run(host, method, cfg_for(method, values, args.steps + 2), images, opts, on_progress=on_progress)
        steps = [b - a for a, b in zip(stamps[1:], stamps[2:])]  # drop 2 warm-up steps
        row = {"config": name, "method": method, "feature_space": values.get("feature_space", "latent"),
               "median_step_s": statistics.median(steps), "steps_per_s": 1 / statistics.median(steps),
               "wall_s": time.perf_counter() - t0}
        if args.device == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rows.append(row)
    ref = rows[0]["median_step_s"]
    for r in rows:
        r["ratio_vs_reference"] = r["median_step_s"] / ref

    load = os.getloadavg()
    print(f"\nDomainStudio step cost, {args.device}, {args.resolution}x{args.resolution}, batch {args.batch}, "
          f"LoRA attn rank 8, {os.path.basename(ckpt)}, load average {load[0]:.2f}")
    print(f"{'configuration':34s} {'s/step':>8s} {'steps/s':>8s} {'x ref':>7s}" +
          ("  peak GiB" if args.device == "cuda" else ""))
    for r in rows:
        extra = f"  {r['peak_mem_gib']:8.2f}" if "peak_mem_gib" in r else ""
        print(f"{r['config']:34s} {r['median_step_s']:8.3f} {r['steps_per_s']:8.2f} {r['ratio_vs_reference']:7.2f}{extra}")
    result = {"device": args.device, "platform": platform.platform(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "load_average": load, "resolution": args.resolution,
              "batch": args.batch, "timed_steps": args.steps, "checkpoint": os.path.basename(ckpt), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.out)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
