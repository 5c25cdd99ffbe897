"""Domain-driven quality benchmark in the miniature SD world (miniworld/): adapt the emoji model,
trained on Google's Noto style, to 10 shots of Twitter's Twemoji style with each method, and measure
what the DomainStudio paper cares about. Prints a table, writes JSON and image grids.

    eval "$(bash .ci/setup.sh | tail -2)"
    $DS_VENV/bin/python bench/domain_quality.py                 # 7 methods x 3 seeds
    $DS_VENV/bin/python bench/domain_quality.py --demo          # README demo: base / fine-tune / DomainStudio, 1 seed

Setting: text-conditional, target prompt "a sks emoji" vs source prompt "an emoji" (the paper's
"a [V] house" vs "a house"), LoRA on every layer (rank 16) unless the method says otherwise, the same
steps, learning rate, batch and seeds for every method. Fixed splits (seed 0) of the emoji subset:
10 shots, 10 held-out evaluation emoji (known to the base model by name), the rest for the style
classifier. Features are 16x16 area-downsampled RGB in 0..1 (an offline stand-in for LPIPS /
Inception features, which have no weights on these machines):

* style      mean P(twitter) of the generated "a sks emoji" samples under a logistic-regression
             classifier trained on Google vs Twitter renderings of the classifier split (its accuracy
             on the evaluation emoji's real renderings is reported);
* diversity  Intra-cluster diversity (the Intra-LPIPS recipe with this feature distance): samples
             assigned to their nearest shot, mean pairwise distance inside each cluster (<= 50
             members), averaged over clusters with >= 2 members (copying the shots scores 0);
* memorize   mean distance from each sample to its nearest shot (lower = closer to copies);
* content    "a sks emoji of <name>" for the 10 held-out names: distance to that emoji's Twitter
             rendering (target style, right content; lower is better) and style score of these.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from trainer.plot import save_png, tile_rows, to_uint8  # noqa: E402  (pure numpy/PIL)

TARGET_PROMPT, SOURCE_PROMPT = "a sks emoji", "an emoji"
LAMBDAS_OFF = dict(lambda_img=0.0, lambda_hf=0.0, lambda_hfmse=0.0)
METHODS = {
    "base": None,
    "finetune_lora": dict(**LAMBDAS_OFF),
    "finetune_full": dict(**LAMBDAS_OFF, train_mode="full_all", learning_rate=5e-5),
    "dreambooth_prior": dict(**LAMBDAS_OFF, prior=20),
    "domainstudio": dict(),
    "domainstudio_no_pairwise": dict(lambda_img=0.0),
    "domainstudio_no_hf": dict(lambda_hf=0.0, lambda_hfmse=0.0),
    "domainstudio_lambda10": dict(lambda_img=10.0, lambda_hf=10.0),  # the paper's SD lambdas / 10
}
DEMO_METHODS = ("base", "finetune_lora", "domainstudio")


def method_settings(method: str, default_lr: float) -> tuple[int, str, float, dict]:
    """(class images, train mode, learning rate, DomainStudio lambdas) of a METHODS entry; never
    mutates METHODS (an earlier version popped keys from a shared dict, so seeds after the first ran
    the defaults)."""
    spec = dict(METHODS[method])
    return spec.pop("prior", 0), spec.pop("train_mode", "lora_all"), spec.pop("learning_rate", default_lr), spec


def features(images: np.ndarray) -> np.ndarray:
    """[N, 64, 64, 3] in 0..1 -> [N, 768]: 16x16 area-downsampled RGB."""
    n, h, w, c = images.shape
    return images.reshape(n, 16, h // 16, 16, w // 16, c).mean(axis=(2, 4)).reshape(n, -1).astype(np.float32)


def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """RMS distance between every row of a and of b."""
    return np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).mean(-1), 0.0))


def intra_cluster_diversity(samples: np.ndarray, shots: np.ndarray, max_members: int = 50, dist=None) -> float:
    """Assign each sample to its nearest shot; mean pairwise distance inside clusters with >= 2 members.
    `dist(a, b)` -> all-pairs distance matrix, default `distances` (RMS)."""
    dist = dist or distances
    nearest = dist(samples, shots).argmin(1)
    scores = []
    for k in range(len(shots)):
        members = samples[nearest == k][:max_members]
        if len(members) >= 2:
            d = dist(members, members)
            scores.append(d[np.triu_indices(len(members), 1)].mean())
    return float(np.mean(scores)) if scores else 0.0


def memorization(samples: np.ndarray, shots: np.ndarray, dist=None) -> float:
    """Mean distance from each sample to its nearest shot (lower = closer to copies)."""
    return float((dist or distances)(samples, shots).min(1).mean())


class StyleClassifier:
    """Logistic regression on standardised features: P(target style)."""

    def __init__(self, source: np.ndarray, target: np.ndarray, seed: int = 0):
        import torch

        x = np.concatenate([source, target])
        y = np.concatenate([np.zeros(len(source)), np.ones(len(target))]).astype(np.float32)
        self.mu, self.sd = x.mean(0), x.std(0) + 1e-3
        g = torch.Generator().manual_seed(seed)
        xt = torch.from_numpy((x - self.mu) / self.sd)
        yt = torch.from_numpy(y)
        self.w = torch.zeros(x.shape[1], requires_grad=True)
        self.b = torch.zeros((), requires_grad=True)
        opt = torch.optim.Adam([self.w, self.b], lr=0.01)
        for _ in range(400):
            idx = torch.randperm(len(xt), generator=g)[:256]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(xt[idx] @ self.w + self.b, yt[idx])
            loss = loss + 1e-3 * self.w.square().sum()
            opt.zero_grad()
            loss.backward()
            opt.step()

    def prob(self, feats: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            z = torch.from_numpy((feats - self.mu) / self.sd) @ self.w + self.b
        return torch.sigmoid(z).numpy()


def splits(n_subset: int, train_idx: list[int], seed: int = 0) -> dict:
    """Fixed shot / evaluation / classifier splits. Shots and evaluation emoji are training emoji of
    the base model (so their names mean something to it); the classifier never sees either."""
    rng = np.random.default_rng(seed)
    known = rng.permutation(train_idx)
    shots, evals = sorted(known[:10].tolist()), sorted(known[10:20].tolist())
    rest = sorted(set(range(n_subset)) - set(shots) - set(evals))
    return {"shots": shots, "eval": evals, "classifier": rest}


SUMMARY_KEYS = ("style", "diversity", "memorize", "content_to_target", "content_style", "train_s")


def summarize(rows: list[dict], methods: list[str]) -> dict:
    """{method: {metric: (mean, sd over seeds)}}."""
    def agg(method, key):
        vals = [r[key] for r in rows if r["method"] == method]
        return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    return {m: {k: agg(m, k) for k in SUMMARY_KEYS} for m in methods}


def print_table(rows: list[dict], methods: list[str], title: str) -> dict:
    summary = summarize(rows, methods)
    print(title)
    print(f"{'method':26s} {'style ↑':>14s} {'diversity ↑':>16s} {'shot dist ↑':>16s} {'content dist ↓':>16s} {'train s':>8s}")
    for m in methods:
        s = summary[m]
        print(f"{m:26s} {s['style'][0]:7.3f}±{s['style'][1]:.3f} {s['diversity'][0]:9.4f}±{s['diversity'][1]:.4f} "
              f"{s['memorize'][0]:9.4f}±{s['memorize'][1]:.4f} {s['content_to_target'][0]:9.4f}±"
              f"{s['content_to_target'][1]:.4f} {s['train_s'][0]:8.1f}")
    return summary


def sample_images(model, clip, vae, prompts: list[str], seed: int, steps: int, cfg: float) -> np.ndarray:
    """One 64x64 sample per prompt (stock euler/normal sampling; prompt i uses seed 1000*seed + i),
    [N, 64, 64, 3] in 0..1."""
    import torch

    import comfy.sample
    from trainer.hosts.comfy import encode_prompt

    out = []
    with torch.inference_mode():
        neg = encode_prompt(clip, "")
        for i, p in enumerate(prompts):
            latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros([1, 4, 8, 8]))
            noise = comfy.sample.prepare_noise(latent, 1000 * seed + i)
            s = comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", encode_prompt(clip, p), neg, latent,
                                    disable_pbar=True, seed=1000 * seed + i)
            out.append(vae.decode(s).float().clamp(0, 1).reshape(-1, 64, 64, 3)[0].cpu().numpy())
    return np.stack(out)


def grid(rows: list[np.ndarray], path: str) -> None:
    """Rows of [k, 64, 64, 3] images -> PNG, 4 px between rows."""
    save_png(tile_rows(rows, gap=4), path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=5e-4, help="LoRA learning rate (full fine-tuning uses its own)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--samples", type=int, default=40, help="'a sks emoji' samples per (method, seed)")
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--uncond", action="store_true",
                    help="the paper's unconditional setting: empty target and source prompt, CFG 1 sampling, no "
                         "content metric (its prompts need text)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--demo", action="store_true", help="the README demo: base / fine-tune / DomainStudio, one seed")
    ap.add_argument("--out", default="", help="JSON path (default bench/results/domain_quality.json; demo: demo_output/)")
    args = ap.parse_args(argv)
    if args.demo:
        args.methods, args.seeds = list(DEMO_METHODS), [0]
    target_prompt, source_prompt = ("", "") if args.uncond else (TARGET_PROMPT, SOURCE_PROMPT)
    if args.uncond and args.cfg == 5.0:
        args.cfg = 1.0  # cond == uncond, so guidance would only cost time
    out_json = args.out or (os.path.join(REPO, "demo_output", "metrics.json") if args.demo
                            else os.path.join(REPO, "bench", "results",
                                              "domain_quality_uncond.json" if args.uncond else "domain_quality.json"))
    samples_png = "domain_uncond_samples.png" if args.uncond else "domain_samples.png"
    out_dir = os.path.dirname(os.path.abspath(out_json))
    os.makedirs(out_dir, exist_ok=True)

    from miniworld import build, data
    from miniworld.comfyenv import comfy

    comfy()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import comfy.sd
    from trainer.domainstudio import DomainStudioConfig
    from trainer.hosts import comfy as host

    t_start = time.perf_counter()
    ckpt = build.ensure()
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(ckpt)
    google, twitter, ref = data.load("google"), data.load("twitter"), data.reference()
    assert google["codes"] == twitter["codes"], "the two styles must list the same emoji"
    train_idx = [google["codes"].index(c) for c in ref["codes"]]
    sp = splits(len(google["codes"]), train_idx)
    g_img = google["images"].astype(np.float32) / 255
    t_img = twitter["images"].astype(np.float32) / 255
    shots = t_img[sp["shots"]]
    shot_f = features(shots)
    clf = StyleClassifier(features(g_img[sp["classifier"]]), features(t_img[sp["classifier"]]))
    ev_real = np.concatenate([clf.prob(features(g_img[sp["eval"]])) < 0.5, clf.prob(features(t_img[sp["eval"]])) >= 0.5])
    eval_names = [google["names"][i] for i in sp["eval"]]
    print(f"data: {len(google['codes'])} emoji ({twitter['package']} vs {google['package']}), shots "
          f"{[google['names'][i] for i in sp['shots']]}; style classifier accuracy on held-out real images "
          f"{ev_real.mean():.2f}")

    def sample(m, prompts: list[str], seed: int) -> np.ndarray:
        return sample_images(m, clip, vae, prompts, seed, args.sample_steps, args.cfg)

    samples_npz = out_json[:-5] + "_samples.npz" if out_json.endswith(".json") else out_json + "_samples.npz"

    def save(complete: bool) -> dict:
        """JSON + samples after every (method, seed), so a stopped run keeps what it measured."""
        done = [m for m in args.methods if any(r["method"] == m for r in rows)]
        result = {"complete": complete,
                  "setting": {"target_prompt": target_prompt, "source_prompt": source_prompt, "uncond": args.uncond,
                              "steps": args.steps, "lr": args.lr, "rank": args.rank, "batch": args.batch,
                              "samples": args.samples, "sample_steps": args.sample_steps, "cfg": args.cfg,
                              "seeds": args.seeds, "checkpoint": os.path.basename(ckpt),
                              "data": [google["package"], twitter["package"]],
                              "shots": [google["names"][i] for i in sp["shots"]], "eval": eval_names,
                              "classifier_accuracy_real": float(ev_real.mean())},
                  "grids": {samples_png: ["shots"] + [m for m in args.methods if m in grids],
                            **({} if args.uncond else {"domain_content.png": ["twitter (real)", "google (real)"]
                                                       + [m for m in args.methods if m in grids]})},
                  "rows": rows, "summary": summarize(rows, done),
                  "samples_npz": os.path.basename(samples_npz), "platform": platform.platform(),
                  "torch": torch.__version__, "wall_s": round(time.perf_counter() - t_start, 1)}
        np.savez_compressed(samples_npz + ".tmp.npz", shots=to_uint8(shots), eval_twitter=to_uint8(t_img[sp["eval"]]),
                            eval_google=to_uint8(g_img[sp["eval"]]), classifier_google=to_uint8(g_img[sp["classifier"]]),
                            classifier_twitter=to_uint8(t_img[sp["classifier"]]), **saved)
        os.replace(samples_npz + ".tmp.npz", samples_npz)
        with open(out_json + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(out_json + ".tmp", out_json)
        return result

    shots_t = torch.from_numpy(shots)
    rows, grids, saved = [], {}, {}
    for method in args.methods:
        for seed in args.seeds:
            t0 = time.perf_counter()
            m, train_s, losses = model, 0.0, {}
            if METHODS[method] is not None:
                prior_n, mode, lr, lambdas = method_settings(method, args.lr)
                cfg = DomainStudioConfig(steps=args.steps, learning_rate=lr, batch_size=args.batch, seed=seed,
                                         lambda_prior=1.0 if prior_n else 0.0, **lambdas)
                prior = None
                if prior_n:
                    with torch.inference_mode():
                        prior = host.generate_class_latents(model, clip, source_prompt, prior_n, 64, seed)
                with torch.inference_mode():
                    res = host.train_domainstudio_comfy(model, clip, vae, shots_t, cfg, target_prompt=target_prompt,
                                                        source_prompt=source_prompt, train_mode=mode, rank=args.rank,
                                                        alpha=float(args.rank), prior_latents=prior)
                m, train_s = res.model, res.result.seconds
                # first / last 50-step means of each weighted term: shows divergence and which term leads
                losses = {k: [round(float(np.mean(v[:50])), 5), round(float(np.mean(v[-50:])), 5)]
                          for k, v in res.result.history.items() if v}
            dom = sample(m, [target_prompt] * args.samples, seed)
            con = None if args.uncond else sample(m, [f"{TARGET_PROMPT} of {n}" for n in eval_names], seed + 100)
            df = features(dom)
            cf = None if con is None else features(con)
            row = {
                "method": method, "seed": seed, "train_s": round(train_s, 2),
                "style": float(clf.prob(df).mean()),
                "diversity": intra_cluster_diversity(df, shot_f),
                "memorize": memorization(df, shot_f),
                "content_to_target": (float("nan") if cf is None else
                                      float(np.sqrt(((cf - features(t_img[sp["eval"]])) ** 2).mean(1)).mean())),
                "content_style": float("nan") if cf is None else float(clf.prob(cf).mean()),
                "wall_s": round(time.perf_counter() - t0, 2), "loss_first_last50": losses,
            }
            rows.append(row)
            saved[f"{method}/{seed}/domain"] = to_uint8(dom)
            if con is not None:
                saved[f"{method}/{seed}/content"] = to_uint8(con)
            print(f"{method:26s} seed {seed}: style {row['style']:.3f} diversity {row['diversity']:.4f} "
                  f"memorize {row['memorize']:.4f} content {row['content_to_target']:.4f} ({row['wall_s']:.0f} s)")
            if seed == args.seeds[0]:
                grids[method] = (dom[:10], con)
            save(complete=False)

    print_table(rows, args.methods, f"\nDomain adaptation to Twemoji from 10 shots (miniworld, "
                f"{'unconditional' if args.uncond else 'text'}, {args.steps} steps, seeds {args.seeds}); mean ± sd over seeds")
    ref_rows = [shots[:10]] + [grids[m][0] for m in args.methods if m in grids]
    grid(ref_rows, os.path.join(out_dir, samples_png))
    if not args.uncond:
        grid([t_img[sp["eval"]], g_img[sp["eval"]]] + [grids[m][1] for m in args.methods if m in grids],
             os.path.join(out_dir, "domain_content.png"))
    result = save(complete=True)
    print(f"saved {out_json}, {os.path.basename(samples_npz)} and {', '.join(result['grids'])} in {out_dir} "
          f"({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
