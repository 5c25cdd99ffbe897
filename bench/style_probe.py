"""Why the style score hardly moves in the miniature world: three probes beside bench/frontier.py.

    eval "$(bash .ci/setup.sh | tail -2)"
    OMP_NUM_THREADS=1 nice -n 10 $DS_VENV/bin/python bench/style_probe.py --seeds 0 1 2   # ~4 min per run

1. **Ceiling.** The style classifier (bench/domain_quality.py's World, Lite0 features) scores the real
   target and source renderings of the evaluation emoji, and the same images after a round trip through
   the miniature's own VAE (encode, decode): a model that drew the real target renderings perfectly in
   its latent space could score no more than the round trip.
2. **Learned on the shots?** Each trained model draws the *shots'* own captions ("a sks emoji of
   <shot name>"): their style score, and whether each sample is nearest to its own shot (the shots were
   what it trained on; a high score here and a low one on the evaluation prompts means the style was
   learned as the shots' content and did not transfer to other prompts).
3. **Transfer.** The evaluation prompts, as in frontier.py (24 other emoji, the same noise per seed).

Every sample is scored twice: by frontier.py's classifier (trained on real renderings) and by one
trained on the same renderings after the VAE round trip (`style_rt`), whose 0..1 range is what the
miniature can express.

Settings are frontier.py's GRID entries (--settings), trained once per seed to --steps. Results:
bench/results/style_probe.json (per run and mean ± sd over seeds), printed as a table.
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
if "bench_frontier" in sys.modules:
    fr = sys.modules["bench_frontier"]
else:
    _spec = importlib.util.spec_from_file_location("bench_frontier", os.path.join(REPO, "bench", "frontier.py"))
    fr = importlib.util.module_from_spec(_spec)
    sys.modules["bench_frontier"] = fr
    _spec.loader.exec_module(fr)
dq = fr.dq

OUT_JSON = os.path.join(REPO, "bench", "results", "style_probe.json")


def shot_scores(world, f: np.ndarray) -> dict:
    """Samples of the shots' own captions (one per shot, in order): style, distance to the own shot,
    and how often the own shot is the nearest one."""
    feats = dq.bench_module("features")
    d = feats.cosine_distances(f, world.f_shots)
    return {"style": float(world.clf.prob(f).mean()), "style_rt": float(world.clf_rt.prob(f).mean()),
            "own_shot_dist": float(np.diag(d).mean()),
            "own_shot_nearest": float((d.argmin(axis=1) == np.arange(len(f))).mean())}


def probe(bench, world, model, seed: int) -> dict:
    shots_prompts = [dq.EVAL_TEMPLATE.format(name=n) for n in world.shot_names]
    f_shot = world.extract(bench.sample(model, shots_prompts, seed=seed))
    f_eval = world.extract(bench.sample(model, world.prompts, seed=seed))
    return {"shot_prompts": shot_scores(world, f_shot),
            "eval_prompts": world.score_features(f_eval)}


def ceiling(bench, world) -> dict:
    """Mean P(target style) of real renderings and of their VAE round trips, by both classifiers
    (the evaluation emoji's are World.reference's; the shots' are scored here)."""
    ref = world.reference
    out = {}
    for name, real, rt in (("target", "real_target_eval", "roundtrip_target_eval"),
                           ("source", "real_source_eval", "roundtrip_source_eval")):
        out[f"{name}_real"] = ref[real]["style"]
        out[f"{name}_vae_roundtrip"] = ref[rt]["style"]
        out[f"{name}_vae_roundtrip.style_rt"] = ref[rt]["style_rt"]
    f_rt = world.extract(bench.roundtrip(world.shots))
    out["shots_real"] = float(world.clf.prob(world.extract(world.shots)).mean())
    out["shots_vae_roundtrip"] = float(world.clf.prob(f_rt).mean())
    out["shots_vae_roundtrip.style_rt"] = float(world.clf_rt.prob(f_rt).mean())
    return out


def summary(result: dict) -> dict:
    rows: dict = {}
    for run in result["runs"].values():
        for part in ("shot_prompts", "eval_prompts"):
            for k, v in run[part].items():
                rows.setdefault(run["setting"], {}).setdefault(f"{part}.{k}", []).append(v)
    return {s: {k: dq.mean_sd(v) for k, v in m.items()} for s, m in rows.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=["ft_lr3e-4", "ds_l10_lr3e-4"], choices=list(fr.GRID))
    ap.add_argument("--style", default="twitter", choices=list(fr.STYLES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=OUT_JSON)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    result = json.load(open(args.out)) if os.path.isfile(args.out) else {"runs": {}}
    bench = dq.Bench(batch=dq.N_EVAL)
    world = dq.World(args.style, dq.bench_module("features").Lite0Features(), roundtrip=bench.roundtrip)
    result.update({"benchmark": "bench/style_probe.py", "style": args.style, "steps": args.steps,
                   "setting": bench.describe()})
    result["ceiling"] = ceiling(bench, world)
    print("ceiling (mean P(target style)):", json.dumps({k: round(v, 3) for k, v in result["ceiling"].items()}))

    def save():
        result["summary"] = summary(result)
        with open(args.out + ".tmp", "w") as fh:
            json.dump(result, fh, indent=1)
        os.replace(args.out + ".tmp", args.out)

    for seed in args.seeds:
        if f"base/{seed}" not in result["runs"]:
            result["runs"][f"base/{seed}"] = {"setting": "base", "seed": seed,
                                              **probe(bench, world, bench.model, seed)}
            save()
        for s in args.settings:
            rid = f"{s}/{seed}"
            if rid in result["runs"]:
                continue
            t0 = time.perf_counter()
            got: dict = {}

            def on_checkpoint(step, model, got=got, seed=seed):
                got.update(probe(bench, world, model, seed))

            bench.train(fr.GRID[s][1], world.training_set(), seed=seed, steps=args.steps,
                        on_checkpoint=on_checkpoint)
            result["runs"][rid] = {"setting": s, "seed": seed, **got, "wall_s": round(time.perf_counter() - t0, 1)}
            save()
            print(f"  {rid:24s} shots: style {got['shot_prompts']['style']:.3f} own-shot nearest "
                  f"{got['shot_prompts']['own_shot_nearest']:.2f}; eval: style {got['eval_prompts']['style']:.3f}",
                  flush=True)
    save()
    cols = ("shot_prompts.style", "shot_prompts.style_rt", "shot_prompts.own_shot_dist",
            "shot_prompts.own_shot_nearest", "eval_prompts.style", "eval_prompts.style_rt", "eval_prompts.kid_target")
    print("\n" + f"{'setting':16s}" + "".join(f"{k:>26s}" for k in cols))
    for s, m in result["summary"].items():
        print(f"{s:16s}" + "".join(f"{m[k][0]:>17.3f}±{m[k][1]:<8.3f}" for k in cols))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
