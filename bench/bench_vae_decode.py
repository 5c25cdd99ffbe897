"""Benchmark: what feature_space="pixel" adds per step with a *real-size* SD VAE decoder.

Pixel mode decodes the adapted x0 prediction through the VAE with gradients (the source side
without). This times both on a randomly initialised decoder of the SD1.x/SDXL VAE architecture
(49 M params; cost depends on the architecture, not the weights) and reports the ratio and the
extra peak memory (RSS on the CPU, allocator peak on CUDA). Each case runs in its own process so
peaks do not mix.

    eval "$(bash .ci/setup.sh | tail -2)"
    $DS_VENV/bin/python bench/bench_vae_decode.py [--resolutions 128 256] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
            "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def _one(res: int, batch: int, grad: bool, device: str) -> dict:
    import resource
    import time

    import runpy

    runpy.run_path(os.path.join(REPO, "__init__.py"))  # registers the one package name, comfyui_domainstudio
    from comfyui_domainstudio.dstrain.hosts import import_comfy

    import_comfy(os.environ.get("COMFYUI_DIR", ""), device)
    import torch
    from comfy.ldm.modules.diffusionmodules.model import Decoder

    from comfyui_domainstudio.testing import tiny_models

    dec = Decoder(**DDCONFIG)
    tiny_models._init_(dec, 0)
    dec.requires_grad_(False).to(device)
    z = torch.randn(batch, 4, res // 8, res // 8, device=device, requires_grad=grad)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    t = time.perf_counter()
    with torch.set_grad_enabled(grad):
        out = dec(z)
        if grad:
            out.float().square().mean().backward()
    if device == "cuda":
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - base_cuda) / 2**30
    else:
        extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2**20  # KiB -> GiB
    return {"resolution": res, "batch": batch, "grad": grad, "seconds": time.perf_counter() - t, "extra_peak_gib": extra,
            "decoder_params_m": sum(p.numel() for p in dec.parameters()) / 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--one", nargs=2, metavar=("RES", "GRAD"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "vae_decode_cpu.json"))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_one(int(args.one[0]), args.batch, args.one[1] == "1", args.device)))
        return 0
    rows = []
    for res in args.resolutions:
        for grad in (False, True):
            cmd = [sys.executable, __file__, "--one", str(res), "1" if grad else "0", "--batch", str(args.batch),
                   "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\nSD VAE decoder ({rows[0]['decoder_params_m']:.0f} M params, random init), batch {args.batch}, {args.device}")
    print(f"{'resolution':>10s} {'no-grad s':>10s} {'+grad s':>8s} {'ratio':>6s} {'no-grad GiB':>12s} {'+grad GiB':>10s}")
    for res in args.resolutions:
        a, b = [r for r in rows if r["resolution"] == res]
        print(f"{res:>10d} {a['seconds']:10.2f} {b['seconds']:8.2f} {b['seconds'] / a['seconds']:6.2f} "
              f"{a['extra_peak_gib']:12.2f} {b['extra_peak_gib']:10.2f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump({"device": args.device, "batch": args.batch, "rows": rows}, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
