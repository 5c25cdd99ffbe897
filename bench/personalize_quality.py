"""Personalization quality benchmark in the miniature SD world (miniworld/): learn subjects the
emoji model never saw from 4 images each with Textual Inversion, DreamBooth (with and without
prior) and the rare-token method, with the same budget, and measure fidelity, language drift,
forgetting and time. Prints a table, writes JSON and a sample grid.

    eval "$(bash .ci/setup.sh | tail -2)"
    $DS_VENV/bin/python bench/personalize_quality.py [--subjects 4] [--seeds 0]

Subjects: emoji of the subset that are *not* among the base model's training emoji (fixed choice),
each given as 4 images: its Google and Twitter renderings, and both shifted by a few pixels.
Features and distances are bench/domain_quality.py's (16x16 area-downsampled RGB, RMS distance):

* fidelity  mean over samples of the instance prompt of the distance to the nearest subject image
            (lower = more faithful; a DINO-score stand-in);
* drift     distance between the personalized and the base model's samples of the class prompt
            (the methods' own "a photo of <class>") on the same seeds (lower = less language drift);
* forget    the same on "an emoji of <name>" for 8 unrelated training emoji (lower = less forgetting);
* prompt    prompt fidelity: share of those 8 unrelated prompts whose sample's nearest training emoji
            is the prompted one (the miniature model cannot compose "<subject> on a beach", so this
            asks whether the personalized model still draws what the prompt names; a CLIP-T stand-in);
* time      wall seconds of training (class-image generation included for DreamBooth).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
_spec = importlib.util.spec_from_file_location("domain_quality", os.path.join(REPO, "bench", "domain_quality.py"))
dq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dq)

METHODS = ("textual_inversion", "dreambooth", "dreambooth_no_prior", "rare_token")
CLASS_BY_CATEGORY = {"Animals & Nature": "animal", "Food & Drink": "food"}


def subject_images(google: np.ndarray, twitter: np.ndarray) -> np.ndarray:
    """4 views of one emoji: both styles, and both shifted by (3, -2) pixels on white."""
    def shift(im):
        out = np.ones_like(im)
        out[3:, :-2] = im[:-3, 2:]
        return out
    return np.stack([google, twitter, shift(google), shift(twitter)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--ti-steps", type=int, default=150)
    ap.add_argument("--unet-steps", type=int, default=150)
    ap.add_argument("--class-images", type=int, default=20)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "personalize_quality.json"))
    args = ap.parse_args(argv)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)

    from miniworld import build, config, data
    from miniworld.comfyenv import comfy

    comfy()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    import comfy.sd
    from trainer.hosts import comfy as host
    from trainer.hosts import comfy_personalize as phost
    from trainer.personalize import PersonalizeConfig

    t_start = time.perf_counter()
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(build.ensure())
    google, twitter, ref = data.load("google"), data.load("twitter"), data.reference()
    trained = {google["codes"].index(c) for c in ref["codes"]}
    unseen = [i for i in range(len(google["codes"])) if i not in trained]
    rng = np.random.default_rng(0)
    subjects = sorted(rng.choice(unseen, size=args.subjects, replace=False).tolist())
    categories = _categories(google["codes"], data, config)
    unrelated_idx = sorted(rng.choice(sorted(trained), size=8, replace=False).tolist())
    unrelated = [google["names"][i] for i in unrelated_idx]
    unrelated_prompts = [f"an emoji of {u}" for u in unrelated]
    g_img = google["images"].astype(np.float32) / 255
    t_img = twitter["images"].astype(np.float32) / 255
    known = sorted(trained)
    known_f = dq.features(g_img[known])
    want = np.array([known.index(i) for i in unrelated_idx])

    def prompt_accuracy(unrel_feats: np.ndarray) -> float:
        return float((dq.distances(unrel_feats, known_f).argmin(1) == want).mean())

    def sample(m, c, prompts, seed):
        return dq.sample_images(m, c, vae, prompts, seed, args.sample_steps, args.cfg)

    rows, grid_rows, saved = [], [], {"known_google": dq.to_uint8(g_img[known]), "prompt_target": want}
    for si in subjects:
        name = google["names"][si]
        noun = CLASS_BY_CATEGORY.get(categories[si], "emoji")
        imgs = subject_images(g_img[si], t_img[si])
        feats = dq.features(imgs)
        class_prompts = [PersonalizeConfig(class_noun=noun).class_prompt()] * args.samples
        base_cache = {}
        for seed in args.seeds:
            base_class_img = sample(model, clip, class_prompts, seed)
            base_unrel_img = sample(model, clip, unrelated_prompts, seed)
            saved[f"{si}/base/{seed}/class"] = dq.to_uint8(base_class_img)
            saved[f"{si}/base/{seed}/unrelated"] = dq.to_uint8(base_unrel_img)
            base_class, base_unrel = dq.features(base_class_img), dq.features(base_unrel_img)
            base_cache[seed] = (base_class, base_unrel)
            rows.append({"subject": name, "class_noun": noun, "method": "base", "seed": seed,
                         "fidelity": float(dq.distances(base_class, feats).min(1).mean()), "drift": 0.0,
                         "forget": 0.0, "prompt": prompt_accuracy(base_unrel), "time_s": 0.0})
        grid_rows.append(imgs)
        saved[f"{si}/subject"] = dq.to_uint8(imgs)
        for method in args.methods:
            for seed in args.seeds:
                cfg = PersonalizeConfig(method=method, class_noun=noun,
                                        trigger="sks" if "dreambooth" in method else "ds_subject",
                                        ti_steps=args.ti_steps, unet_steps=args.unet_steps, ti_learning_rate=5e-3,
                                        unet_learning_rate=5e-4, batch_size=2, seed=seed)
                t0 = time.perf_counter()
                prior = None
                with torch.inference_mode():
                    if method == "dreambooth":
                        prior = host.generate_class_latents(model, clip, cfg.class_prompt(), args.class_images, 64, seed)
                    out = phost.train_personalization_comfy(model, clip, vae, torch.from_numpy(imgs), cfg,
                                                            train_mode="lora_all", rank=16, alpha=16.0,
                                                            prior_latents=prior)
                train_s = time.perf_counter() - t0
                imgs_out = {"instance": sample(out.model, out.clip, [cfg.instance_prompt()] * args.samples, seed),
                            "class": sample(out.model, out.clip, class_prompts, seed),
                            "unrelated": sample(out.model, out.clip, unrelated_prompts, seed)}
                for k, v in imgs_out.items():
                    saved[f"{si}/{method}/{seed}/{k}"] = dq.to_uint8(v)
                inst, cls, unrel = (dq.features(imgs_out[k]) for k in ("instance", "class", "unrelated"))
                bc, bu = base_cache[seed]
                row = {"subject": name, "class_noun": noun, "method": method, "seed": seed,
                       "fidelity": float(dq.distances(inst, feats).min(1).mean()),
                       "drift": float(np.sqrt(((cls - bc) ** 2).mean(1)).mean()),
                       "forget": float(np.sqrt(((unrel - bu) ** 2).mean(1)).mean()),
                       "prompt": prompt_accuracy(unrel), "time_s": round(train_s, 1)}
                rows.append(row)
                print(f"{name:24s} {method:20s} seed {seed}: fidelity {row['fidelity']:.4f} drift {row['drift']:.4f} "
                      f"forget {row['forget']:.4f} prompt {row['prompt']:.2f} ({train_s:.0f} s)")
                if seed == args.seeds[0]:
                    grid_rows.append(imgs_out["instance"][:8])

    summary = {}
    listed = ["base"] + list(args.methods)
    for m in listed:
        sel = [r for r in rows if r["method"] == m]
        summary[m] = {k: statistics.mean(r[k] for r in sel) for k in ("fidelity", "drift", "forget", "prompt", "time_s")}
    print(f"\nPersonalization of {len(subjects)} unseen emoji from 4 images (miniworld, TI {args.ti_steps} / UNet "
          f"{args.unet_steps} steps, seeds {args.seeds}); means over subjects and seeds; base = the untouched "
          "model's class-prompt samples")
    print(f"{'method':22s} {'fidelity ↓':>10s} {'drift ↓':>9s} {'forget ↓':>9s} {'prompt ↑':>9s} {'time s':>8s}")
    for m in listed:
        s = summary[m]
        print(f"{m:22s} {s['fidelity']:10.4f} {s['drift']:9.4f} {s['forget']:9.4f} {s['prompt']:9.2f} {s['time_s']:8.1f}")
    dq.grid(grid_rows, os.path.join(out_dir, "personalize_samples.png"))
    result = {"setting": {**{k: v for k, v in vars(args).items() if k != "out"},
                          "subjects": [google["names"][i] for i in subjects], "unrelated": unrelated},
              "grid": "personalize_samples.png: per subject, its 4 images then one row per method "
                      f"({', '.join(args.methods)})",
              "rows": rows, "summary": summary, "platform": platform.platform(), "torch": torch.__version__,
              "wall_s": round(time.perf_counter() - t_start, 1)}
    samples_npz = args.out[:-5] + "_samples.npz" if args.out.endswith(".json") else args.out + "_samples.npz"
    np.savez_compressed(samples_npz + ".tmp.npz", **saved)
    os.replace(samples_npz + ".tmp.npz", samples_npz)
    result["samples_npz"] = os.path.basename(samples_npz)
    result["subject_index"] = {str(i): google["names"][i] for i in subjects}
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"saved {args.out} ({result['wall_s']:.0f} s)")
    return 0


def _categories(codes, data, config) -> list[str]:
    """Category of each emoji of the subset, from the package's emoji.json."""
    import json as _json
    import tarfile

    with tarfile.open(data.tarball(config.SOURCE_STYLE)) as tf:
        entries = {e["unified"]: e["category"] for e in _json.load(tf.extractfile("package/emoji.json"))}
    return [entries.get(c, "") for c in codes]


if __name__ == "__main__":
    sys.exit(main())
