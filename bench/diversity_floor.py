"""Where should the quality report stop giving a diversity ratio? (trainer/quality.py, DIVERSITY_FLOOR)

    eval "$(bash .ci/setup.sh | tail -2)"
    $DS_VENV/bin/python bench/diversity_floor.py --threads 1     # ~10 min of one core

The report divides the adapted model's sample diversity by the source model's; when the source draws
(nearly) the same picture for every seed that ratio is noise. This draws the source miniworld model's
samples for many prompts exactly as the report does (ComfyHost.sample: euler/normal, 12 steps, CFG 5,
one image per seed) and measures, per prompt, the report's diversity (mean pairwise cosine distance)
in both of its spaces — VAE-latent (its default) and an image encoder's (EfficientNet-Lite0 here,
standing in for a connected CLIP vision model) — on two disjoint sets of seeds. Per prompt:

* div      diversity over all 2 x --samples seeds;
* split    |d(seeds A) - d(seeds B)| / mean: how far two runs of the report on other seeds disagree,
           the noise of a ratio that has this diversity as its denominator.

Prompts: the domain prompt, emoji by name (training and held-out concepts), the personalization
benchmark's class prompts "a photo of <noun>" (out of the miniature's captions: where it collapses),
and "a sks emoji of <name>". Prints a table sorted by diversity and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

NOUNS = ("cat", "horse", "car", "tree", "heart", "dog", "house", "flower", "bird", "ball")


def split_disagreement(d_a: float, d_b: float) -> float:
    """|d_a - d_b| / their mean (0 = two seed sets agree); inf when both are 0."""
    m = (d_a + d_b) / 2
    return abs(d_a - d_b) / m if m > 0 else float("inf")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=8, help="seeds per set (the report's quality_samples); 2 sets")
    ap.add_argument("--names", type=int, default=16, help="training concepts prompted by name (and as 'a sks emoji')")
    ap.add_argument("--heldout", type=int, default=8, help="held-out concepts prompted by name")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "diversity_floor.json"))
    args = ap.parse_args(argv)

    import domain_quality as dq  # noqa: E402  (bench/ on the path)
    import torch

    torch.set_num_threads(args.threads)
    from comfyui_domainstudio.miniworld import data
    from comfyui_domainstudio.trainer import quality

    t0 = time.perf_counter()
    bench = dq.Bench()
    extract = dq.bench_module("features").Lite0Features()
    google = data.load("google")
    names = google["names"]
    rng = np.random.default_rng(0)
    train_idx = rng.choice(data.train_indices(google), size=args.names, replace=False)
    held_idx = rng.choice(sorted(data.heldout_indices(google)), size=args.heldout, replace=False)
    prompts = [("domain", "an emoji")]
    prompts += [("name", f"an emoji of {names[i]}") for i in train_idx]
    prompts += [("held-out name", f"an emoji of {names[i]}") for i in held_idx]
    prompts += [("class (personalization)", f"a photo of {n}") for n in NOUNS]
    prompts += [("sks name", f"a sks emoji of {names[i]}") for i in train_idx[: args.names // 2]]

    n = args.samples
    seeds = list(range(2 * n))
    rows = []
    for kind, prompt in prompts:
        lat = bench.host.sample(prompt, seeds, resolution=64, steps=12, cfg=5.0)
        img = bench.host.decode_images(lat)
        spaces = {"latent": quality.latent_features(lat),
                  "lite0": torch.from_numpy(extract(dq.to_uint8(img.float().clamp(0, 1))))}
        row = {"kind": kind, "prompt": prompt}
        for space, f in spaces.items():
            d_all = quality.mean_pairwise(f)
            d_a, d_b = quality.mean_pairwise(f[:n]), quality.mean_pairwise(f[n:])
            row[space] = {"div": d_all, "div_a": d_a, "div_b": d_b, "split": split_disagreement(d_a, d_b)}
        rows.append(row)
        print(f"{kind:24s} {prompt[:44]:44s} latent {row['latent']['div']:.4f} (split {row['latent']['split']:.2f})  "
              f"lite0 {row['lite0']['div']:.4f} (split {row['lite0']['split']:.2f})", flush=True)

    print(f"\nsorted by VAE-latent diversity (floor {quality.DIVERSITY_FLOOR}); {n} + {n} seeds, 12 steps, CFG 5")
    print(f"{'prompt':52s} {'latent':>8s} {'split':>6s} {'lite0':>8s} {'split':>6s}")
    for r in sorted(rows, key=lambda r: r["latent"]["div"]):
        print(f"{r['prompt'][:52]:52s} {r['latent']['div']:8.4f} {r['latent']['split']:6.2f} {r['lite0']['div']:8.4f} "
              f"{r['lite0']['split']:6.2f}")
    env = {k: v for k, v in bench.describe().items() if k in ("checkpoint", "torch", "threads", "platform")}
    result = {"setting": {"samples_per_set": n, "sets": 2, "sampler": "euler/normal", "steps": 12, "cfg": 5.0,
                          "resolution": 64, "floor": quality.DIVERSITY_FLOOR, **env},
              "rows": rows, "wall_s": round(time.perf_counter() - t0, 1)}
    from frontier import save  # atomic JSON write, shared by the bench scripts

    save(result, args.out)
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
