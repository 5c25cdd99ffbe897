"""How big are DomainStudio's terms next to the denoising loss, and what does that depend on?

    eval "$(bash .ci/setup.sh | tail -2)"
    nice -n 10 $DS_VENV/bin/python bench/term_magnitudes.py [--steps 100] [--batches 4] [--sizes 64 128]

The pairwise terms (L_img, L_hf) are KL divergences between softmaxes over cosine similarities:
their value and gradient depend on how far the adapted model has moved from the source, on the
feature space (latent or decoded pixels; its dimension D), on the noise level, and on the batch
(the 'mean' reduction divides by N(N-1)). This script measures them on the miniature model:

1. trains plain fine-tuning (the `finetune` recipe of bench/domain_quality.py) for --steps steps on
   the Twemoji shots, so the adapted model has moved the way DomainStudio is meant to resist;
2. with that delta attached (and with a zero delta, the start of every run), draws --batches fixed
   batches of 4 shots per noise-level band (uniform timesteps in [0,250), [250,500), [500,750),
   [750,1000)) and evaluates, in fp32, each unweighted term (L_simple; L_img, L_hf, L_hfmse in latent
   and in pixel space) and the norm of its gradient on the trainable LoRA parameters;
3. repeats at 2x the resolution (shots resized; latents 16x16; --sizes adds more) to see how the
   ratios change with the feature dimension D (the UNet is convolutional; the model never saw these
   sizes, which matters little for a ratio of two gradients of the same network).

It prints and writes bench/results/term_magnitudes.json: per setting the mean term values, gradient
norms, and `lambda_parity` = |grad L_simple| / |grad L_term|, the weight at which the term pulls as
hard as the denoising loss (the paper's lambda_img = lambda_hf = 100, lambda_hfmse = 0.1 are for
comparison).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("bench_domain_quality", os.path.join(REPO, "bench", "domain_quality.py"))
if "bench_domain_quality" in sys.modules:
    dq = sys.modules["bench_domain_quality"]
else:
    dq = importlib.util.module_from_spec(_spec)
    sys.modules["bench_domain_quality"] = dq
    _spec.loader.exec_module(dq)

BANDS = ((0, 250), (250, 500), (500, 750), (750, 1000))
TERMS = ("simple", "img_latent", "hf_latent", "hfmse_latent", "img_pixel", "hf_pixel", "hfmse_pixel")


def resize(images: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if images.shape[1] == size:
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images])


def measure(bench, delta, shots: np.ndarray, names: list[str], *, batches: int, batch: int, seed: int,
            opts, log=print) -> dict:
    """{band: {term: {"value": mean, "grad": mean grad norm}}} for the model with `delta` (None = zero),
    on a LoRA placed, ranked and scaled as the RunOptions `opts` of the run that trained it."""
    import torch

    from comfyui_domainstudio.trainer import losses
    from comfyui_domainstudio.trainer.host import SessionNeeds

    host = bench.host
    adapter = host.attach(opts.train_mode, opts.lora_rank, opts.lora_alpha, 0)
    if delta:
        bad = adapter.load_state_dict(delta)
        if bad:
            raise RuntimeError(f"delta does not fit: {bad[:3]}")
    params = adapter.parameters()
    tensor = torch.from_numpy(shots.astype(np.float32) / 255.0)
    targets = [host.encode_prompt(dq.TARGET_PROMPT.replace("{caption}", n)) for n in names]
    sources = [host.encode_prompt(dq.SOURCE_PROMPT.replace("{caption}", n)) for n in names]
    with torch.no_grad():
        x0_all = host.encode_images(tensor)
        pix_all = tensor.movedim(-1, 1) * 2 - 1
    ms = bench.model.model.model_sampling
    out: dict = {}

    def body():
        g = torch.Generator().manual_seed(seed)
        for lo, hi in BANDS:
            acc = {t: {"value": [], "grad": []} for t in TERMS}
            for _ in range(batches):
                idx = torch.randperm(x0_all.shape[0], generator=g)[:batch]
                x0, pix = x0_all[idx], pix_all[idx]
                target = host.stack_conds([targets[i] for i in idx.tolist()])
                source = host.stack_conds([sources[i] for i in idx.tolist()])
                t = torch.randint(lo, hi, (batch,), generator=g).float()
                sigma = ms.sigma(t)
                noise = torch.randn(x0.shape, generator=g)
                xt = host.add_noise(x0, noise, sigma)
                with torch.no_grad():
                    src = host.predict_x0(xt, sigma, source, adapted=False)
                    src_pix = host.decode(src)
                pred = host.predict_x0(xt, sigma, target, adapted=True)
                f_pix = host.decode(pred)
                terms = {"simple": host.denoising_loss(pred, x0, sigma)}
                for space, f_ada, f_src, f_ref in (("latent", pred.float(), src.float(), x0), ("pixel", f_pix, src_pix, pix)):
                    terms[f"img_{space}"] = losses.relative_distance_kl(f_ada, f_src)
                    terms[f"hf_{space}"] = losses.high_frequency_kl(f_ada, f_src)
                    terms[f"hfmse_{space}"] = losses.high_frequency_mse(f_ada, f_ref)
                for term in TERMS:
                    grads = torch.autograd.grad(terms[term], params, retain_graph=True, allow_unused=True)
                    gn = torch.sqrt(sum((gr.float() ** 2).sum() for gr in grads if gr is not None))
                    acc[term]["value"].append(float(terms[term].detach()))
                    acc[term]["grad"].append(float(gn))
            out[f"{lo}-{hi}"] = {t: {k: float(np.mean(v)) for k, v in d.items()} for t, d in acc.items()}
            log(f"    t in [{lo}, {hi}): " + "  ".join(f"{t} {out[f'{lo}-{hi}'][t]['value']:.2e}/"
                                                        f"{out[f'{lo}-{hi}'][t]['grad']:.2e}" for t in TERMS))

    needs = SessionNeeds(adapter=adapter, decode=True, checkpointing=False, dtype=torch.float32,
                         batch_shape=(batch, *x0_all.shape[1:]))
    try:
        host.session(body, needs)
    finally:
        adapter.detach()
    # averaged over the bands (uniform timesteps, as training draws them)
    out["all"] = {t: {k: float(np.mean([out[b][t][k] for b in out])) for k in ("value", "grad")} for t in TERMS}
    for band in out.values():
        for t in TERMS:
            band[t]["lambda_parity"] = band["simple"]["grad"] / band[t]["grad"] if band[t]["grad"] > 0 else float("inf")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--style", default="twitter")
    ap.add_argument("--steps", type=int, default=100, help="plain fine-tuning steps of the adapted state")
    ap.add_argument("--batches", type=int, default=4, help="batches per noise band")
    ap.add_argument("--sizes", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-mode", default=None, choices=("lora_attn", "lora_all"),
                    help="where the LoRA sits, for the adapted state and the measured gradients (default: plain "
                         "fine-tuning's default, every layer; the first results, term_magnitudes.json, were "
                         "attention only on the previous miniature)")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "term_magnitudes.json"))
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    extract = dq.bench_module("features").Lite0Features()
    world = dq.World(args.style, extract)
    bench = dq.Bench()
    base = dq.RECIPES["finetune"]
    recipe = dq.Recipe(base.method, dict(base.config), {**base.options, **({"train_mode": args.train_mode}
                                                                         if args.train_mode else {})})
    opts = recipe.settings(args.steps)[1]
    info = bench.train(recipe, world.training_set(), seed=0, steps=args.steps, precision="fp32")
    print(f"adapted state: plain fine-tuning, {args.steps} steps, {opts.train_mode} rank {opts.lora_rank} "
          f"({info['train_s']:.0f} s)")
    results = {}
    for size in args.sizes:
        shots = resize(world.shots, size)
        for state, delta in (("start", None), (f"finetuned_{args.steps}", info["delta"])):
            key = f"{size}px/{state}"
            print(f"  {key} (latent {size // 8}x{size // 8}x4 = {size * size // 16} dims, pixel {size}x{size}x3 = "
                  f"{size * size * 3} dims)", flush=True)
            results[key] = measure(bench, delta, shots, world.shot_names, batches=args.batches, batch=4, seed=1,
                                   opts=opts)
    print("\nlambda at which each term's gradient equals L_simple's (uniform timesteps; paper: img/hf 100, hfmse 0.1)")
    print(f"{'setting':26s} " + " ".join(f"{t:>13s}" for t in TERMS[1:]))
    for key, r in results.items():
        print(f"{key:26s} " + " ".join(f"{r['all'][t]['lambda_parity']:13.3g}" for t in TERMS[1:]))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump({"setting": {"style": args.style, "finetune_steps": args.steps, "batches_per_band": args.batches,
                               "batch": 4, "bands": BANDS, "train_mode": opts.train_mode,
                               "lora_rank": opts.lora_rank, "lora_alpha": opts.lora_alpha, "target_prompt": dq.TARGET_PROMPT, "source_prompt": dq.SOURCE_PROMPT, "sizes": args.sizes, "precision": "fp32",
                               "reduction": "mean over N(N-1)", **bench.describe()},
                   "results": results, "wall_s": round(time.perf_counter() - t0, 1)}, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"saved {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
