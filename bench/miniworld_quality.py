"""Quality of the miniature SD world (miniworld/), drawn through ComfyUI's stock nodes and measured in
EfficientNet-Lite0 feature space (bench/features.py). Prints a table, writes JSON and a sample grid.

    eval "$(bash .ci/setup.sh | tail -2)"
    $DS_VENV/bin/python bench/miniworld_quality.py [--domain 128] [--train 128] [--sks 64] [--record]

Every sample: CheckpointLoaderSimple (the built miniworld checkpoint) -> CLIPTextEncode (negative:
empty) -> EmptyLatentImage 64x64 -> KSampler (euler/normal, --steps, --cfg) -> VAEDecode; prompts are
drawn --batch at a time (their conditionings stacked on the batch axis). Real images: the Google
(source-style) renderings of all 1,391 concepts, from the npm package (miniworld.data.load).

* domain   "an emoji" (the DomainStudio source prompt), one sample per seed: KID to the real
           source renderings, intra-set diversity (mean pairwise cosine distance of the features)
           as a fraction of the real renderings' diversity, and coverage (distinct nearest real
           concepts / samples). Targets (issue "Quality a user can see"): KID <= 0.15, diversity
           >= 0.8x real.
* train    "an emoji of <name>" for evenly spread training concepts: nearest-neighbour caption
           accuracy (the nearest real rendering among all 1,391 concepts, cosine on the features, is
           the prompted one; chance 1/1391), top-5, and KID of these samples to the real renderings.
* sks      "a sks emoji of <name>" for the first --sks of those concepts: the DreamBooth/DomainStudio
           identifier slot must not change the content (accuracy as for train).
* heldout  "an emoji of <name>" for every held-out concept (names and images never trained):
           accuracy among all concepts and among the held-out ones (chance 1/139), next to a
           word-overlap oracle (draw the training concept whose name shares most words; how often is
           that image nearest the held-out target among the held-out ones).
* vae      the checkpoint VAE's round trip of all real renderings: KID to the originals (the ceiling
           for samples) and PSNR; Twitter renderings' PSNR (the target style has to pass the VAE).
* reference KID between two halves of the real renderings (the noise floor) and between the
           Twitter and Google renderings of the same concepts.

--record also writes the numbers under ``quality`` in miniworld/weights/training.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import runpy  # noqa: E402

runpy.run_path(os.path.join(REPO, "__init__.py"))  # the pack's one package name: comfyui_domainstudio
_spec = importlib.util.spec_from_file_location("bench_features", os.path.join(REPO, "bench", "features.py"))
F = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(F)

# The targets for the source model's "an emoji" samples.
TARGET_KID = 0.15
TARGET_DIVERSITY_RATIO = 0.8


def diversity(f: np.ndarray) -> float:
    """Mean pairwise cosine distance of a feature set (0 = all identical)."""
    d = F.cosine_distances(f, f)
    n = len(f)
    return float((d.sum() - np.trace(d)) / (n * (n - 1)))


def nn_accuracy(gen_f: np.ndarray, want: np.ndarray, cand_f: np.ndarray, k: int = 5) -> tuple[float, float, np.ndarray]:
    """(top-1, top-k accuracy, nearest index) of generated features against candidate features."""
    d = F.cosine_distances(gen_f, cand_f)
    order = np.argsort(d, axis=1)
    return (float((order[:, 0] == want).mean()), float((order[:, :k] == want[:, None]).any(1).mean()), order[:, 0])


def word_overlap_oracle(heldout_names: list[str], train_names: list[str], train_f: np.ndarray,
                        heldout_f: np.ndarray) -> float:
    """Accuracy among held-out concepts if each held-out caption were drawn as the real image of the
    training concept whose name shares the most words (Jaccard; ties: first in sort order)."""
    words = [set(re.findall(r"[a-z0-9]+", n)) for n in train_names]
    pick = []
    for n in heldout_names:
        w = set(re.findall(r"[a-z0-9]+", n))
        scores = [len(w & t) / max(1, len(w | t)) for t in words]
        pick.append(int(np.argmax(scores)))
    acc, _, _ = nn_accuracy(train_f[pick], np.arange(len(heldout_names)), heldout_f)
    return acc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domain", type=int, default=128, help="'an emoji' samples")
    ap.add_argument("--train", type=int, default=128, help="training concepts prompted by name")
    ap.add_argument("--sks", type=int, default=64, help="of those, also prompted as 'a sks emoji of <name>'")
    ap.add_argument("--heldout", type=int, default=0, help="held-out concepts prompted (0: all)")
    ap.add_argument("--domain-cfg-sweep", type=float, nargs="*", default=[],
                    help="also measure 'an emoji' (KID, diversity) at these CFG scales, --domain samples each")
    ap.add_argument("--domain-sampler-sweep", nargs="*", default=[], metavar="SAMPLER",
                    help="also draw the 'an emoji' samples with these KSampler samplers (e.g. euler_ancestral "
                         "dpmpp_2m), at --steps and --cfg, scheduler normal")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--checkpoint", default=None, help="a built miniworld checkpoint (default: miniworld.build.ensure())")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "miniworld_quality.json"))
    ap.add_argument("--record", action="store_true", help="also write the numbers into miniworld/weights/training.json")
    args = ap.parse_args(argv)
    for flag, value in (("--domain", args.domain), ("--train", args.train), ("--sks", args.sks)):
        if value < 1:
            ap.error(f"{flag} {value}: every section needs at least one sample; use 1 or more")
    if args.heldout < 0:
        ap.error(f"--heldout {args.heldout}: use 0 (every held-out concept) or a positive count")
    if args.sks > args.train:
        ap.error(f"--sks {args.sks} is more than --train {args.train}: the sks prompts reuse those concepts")

    from comfyui_domainstudio.miniworld import config, data, evaluate
    from comfyui_domainstudio.miniworld.comfyenv import comfy

    comfy()
    from comfy.samplers import KSampler

    unknown = [s for s in args.domain_sampler_sweep if s not in KSampler.SAMPLERS]
    if unknown:
        ap.error(f"--domain-sampler-sweep {' '.join(unknown)}: not a KSampler sampler on this ComfyUI; "
                 f"use one of {', '.join(KSampler.SAMPLERS)}")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    nodes, mw = evaluate.load_nodes(args.checkpoint)
    google, twitter = data.load(config.SOURCE_STYLE), data.load(config.TARGET_STYLES[0])
    real = google["images"]
    tr_idx, ho_idx = data.train_indices(google), data.heldout_indices(google)
    names = google["names"]
    ext = F.Lite0Features()
    t0 = time.perf_counter()
    f_real, f_tw = ext(real), ext(twitter["images"])
    feat_s = time.perf_counter() - t0

    def gen(prompts, seed):
        t = time.perf_counter()
        imgs = evaluate.generate(nodes, mw, prompts, seed=seed, steps=args.steps, cfg=args.cfg, batch=args.batch)
        return imgs, time.perf_counter() - t

    res = {"setting": {"steps": args.steps, "cfg": args.cfg, "sampler": "euler/normal", "negative": "",
                       "batch": args.batch, "seed": args.seed, "checkpoint": os.path.basename(args.checkpoint or "")
                       or config.CHECKPOINT_NAME, "features": F.ARCH, "real": f"{google['package']} ({len(real)} concepts)",
                       "targets": {"domain_kid_max": TARGET_KID, "domain_diversity_ratio_min": TARGET_DIVERSITY_RATIO}},
           "environment": {"torch": torch.__version__, "python": platform.python_version(),
                           "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}}
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(real))
    half = len(real) // 2
    res["reference"] = {"kid_real_half_vs_half": F.kid(f_real[perm[:half]], f_real[perm[half:]]),
                        "kid_twitter_vs_google": F.kid(f_tw, f_real), "diversity_real": diversity(f_real),
                        "diversity_twitter": diversity(f_tw)}

    # VAE ceiling
    real01 = real.astype(np.float32) / 255.0
    rec = evaluate.vae_roundtrip(mw[2], real01)
    tw01 = twitter["images"].astype(np.float32) / 255.0
    rec_tw = evaluate.vae_roundtrip(mw[2], tw01)

    def psnr(a, b):
        mse = ((a - b) ** 2).mean(axis=(1, 2, 3))
        return float((10 * np.log10(1.0 / np.maximum(mse, 1e-10))).mean())

    f_rec = ext(rec)
    res["vae"] = {"kid_roundtrip_vs_real": F.kid(f_rec, f_real), "psnr_db_train": psnr(rec[tr_idx], real01[tr_idx]),
                  "psnr_db_heldout": psnr(rec[ho_idx], real01[ho_idx]), "psnr_db_twitter": psnr(rec_tw, tw01),
                  "kid_twitter_roundtrip_vs_twitter": F.kid(ext(rec_tw), f_tw)}

    # domain prompt
    dom, dom_s = gen(["an emoji"] * args.domain, args.seed)
    f_dom = ext(dom)
    _, _, nn_dom = nn_accuracy(f_dom, np.zeros(len(f_dom), int), f_real)
    res["domain"] = {"prompt": "an emoji", "n": len(dom), "kid": F.kid(f_dom, f_real), "diversity": diversity(f_dom),
                     "diversity_ratio": diversity(f_dom) / res["reference"]["diversity_real"],
                     "coverage": len(set(nn_dom.tolist())) / len(dom),
                     "nearest_real_distance_median": float(np.median(F.cosine_distances(f_dom, f_real).min(1))),
                     "seconds": round(dom_s, 1)}

    res["domain_cfg_sweep"] = []
    for cfg in args.domain_cfg_sweep:
        t = time.perf_counter()
        imgs = evaluate.generate(nodes, mw, ["an emoji"] * args.domain, seed=args.seed, steps=args.steps, cfg=cfg,
                                 batch=args.batch)
        f = ext(imgs)
        res["domain_cfg_sweep"].append({"cfg": cfg, "kid": F.kid(f, f_real), "diversity_ratio": diversity(f) /
                                        res["reference"]["diversity_real"], "seconds": round(time.perf_counter() - t, 1)})

    res["domain_sampler_sweep"], sweep_rows = [], []
    for name in args.domain_sampler_sweep:
        t = time.perf_counter()
        imgs = evaluate.generate(nodes, mw, ["an emoji"] * args.domain, seed=args.seed, steps=args.steps, cfg=args.cfg,
                                 batch=args.batch, sampler=name)
        f = ext(imgs)
        sweep_rows.append(imgs[:16])
        _, _, nn_s = nn_accuracy(f, np.zeros(len(f), int), f_real)
        res["domain_sampler_sweep"].append({"sampler": name, "scheduler": "normal", "kid": F.kid(f, f_real),
                                            "diversity_ratio": diversity(f) / res["reference"]["diversity_real"],
                                            "coverage": len(set(nn_s.tolist())) / len(f),
                                            "seconds": round(time.perf_counter() - t, 1)})

    # training captions
    pick = np.linspace(0, len(tr_idx) - 1, min(args.train, len(tr_idx))).round().astype(int)
    want = np.array([tr_idx[i] for i in pick])
    trn, trn_s = gen([f"an emoji of {names[i]}" for i in want], args.seed + 10_000)
    f_trn = ext(trn)
    top1, top5, nn_trn = nn_accuracy(f_trn, want, f_real)
    px_acc, _ = evaluate.nn_accuracy(trn, want, real01)
    res["train"] = {"template": "an emoji of {name}", "n": len(want), "nn_accuracy": top1, "top5_accuracy": top5,
                    "chance": 1 / len(real), "nn_accuracy_pixel16": px_acc, "kid": F.kid(f_trn, f_real),
                    "diversity": diversity(f_trn), "seconds": round(trn_s, 1)}

    # identifier slot
    ws = want[:args.sks]
    sks, sks_s = gen([f"a sks emoji of {names[i]}" for i in ws], args.seed + 10_000)
    top1_s, top5_s, _ = nn_accuracy(ext(sks), ws, f_real)
    res["sks"] = {"template": "a sks emoji of {name}", "n": len(ws), "nn_accuracy": top1_s, "top5_accuracy": top5_s,
                  "same_concepts_plain_accuracy": float((nn_trn[:len(ws)] == ws).mean()), "seconds": round(sks_s, 1)}

    # held-out captions
    hsel = np.array(ho_idx[:args.heldout] if args.heldout else ho_idx)
    ho, ho_s = gen([f"an emoji of {names[i]}" for i in hsel], args.seed + 20_000)
    f_ho = ext(ho)
    top1_h, top5_h, _ = nn_accuracy(f_ho, hsel, f_real)
    ho_pos = np.array([ho_idx.index(i) for i in hsel])
    top1_hh, top5_hh, _ = nn_accuracy(f_ho, ho_pos, f_real[ho_idx])
    oracle = word_overlap_oracle([names[i] for i in hsel], [names[i] for i in tr_idx], f_real[tr_idx], f_real[hsel])
    res["heldout"] = {"template": "an emoji of {name}", "n": len(hsel), "nn_accuracy_all": top1_h,
                      "top5_accuracy_all": top5_h, "nn_accuracy_among_heldout": top1_hh,
                      "top5_accuracy_among_heldout": top5_hh, "chance_among_heldout": 1 / len(ho_idx),
                      "word_overlap_oracle_among_heldout": oracle, "seconds": round(ho_s, 1)}
    res["feature_seconds_real"] = round(feat_s, 1)
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    res["meets_targets"] = {"domain_kid": res["domain"]["kid"] <= TARGET_KID,
                            "domain_diversity": res["domain"]["diversity_ratio"] >= TARGET_DIVERSITY_RATIO}

    r, d, t, h, v = res["reference"], res["domain"], res["train"], res["heldout"], res["vae"]
    print(f"\nminiworld quality (stock KSampler euler/normal {args.steps} steps, CFG {args.cfg}; Lite0 features)")
    print(f"{'':34s} {'value':>8s}  {'reference / target':s}")
    print(f"{'domain KID (an emoji)':34s} {d['kid']:8.4f}  target <= {TARGET_KID}; real half/half {r['kid_real_half_vs_half']:.4f}, "
          f"twitter/google {r['kid_twitter_vs_google']:.4f}, VAE round trip {v['kid_roundtrip_vs_real']:.4f}")
    print(f"{'domain diversity / real':34s} {d['diversity_ratio']:8.3f}  target >= {TARGET_DIVERSITY_RATIO} "
          f"({d['diversity']:.4f} vs {r['diversity_real']:.4f}); coverage {d['coverage']:.2f}")
    for sw in res["domain_cfg_sweep"]:
        print(f"{'  an emoji at CFG ' + str(sw['cfg']):34s} {sw['kid']:8.4f}  diversity / real {sw['diversity_ratio']:.3f}")
    for sw in res["domain_sampler_sweep"]:
        print(f"{'  an emoji, sampler ' + sw['sampler']:34s} {sw['kid']:8.4f}  diversity / real {sw['diversity_ratio']:.3f}, "
              f"coverage {sw['coverage']:.2f}")
    print(f"{'train captions NN accuracy':34s} {t['nn_accuracy']:8.3f}  top-5 {t['top5_accuracy']:.3f}, pixel {t['nn_accuracy_pixel16']:.3f}, "
          f"chance {t['chance']:.4f} (n {t['n']}); KID {t['kid']:.4f}")
    print(f"{'sks captions NN accuracy':34s} {res['sks']['nn_accuracy']:8.3f}  same concepts plain "
          f"{res['sks']['same_concepts_plain_accuracy']:.3f} (n {res['sks']['n']})")
    print(f"{'held-out NN accuracy (all)':34s} {h['nn_accuracy_all']:8.3f}  top-5 {h['top5_accuracy_all']:.3f}")
    print(f"{'held-out NN accuracy (held-out)':34s} {h['nn_accuracy_among_heldout']:8.3f}  top-5 {h['top5_accuracy_among_heldout']:.3f}, "
          f"chance {h['chance_among_heldout']:.4f}, word-overlap oracle {h['word_overlap_oracle_among_heldout']:.3f}")
    print(f"{'VAE PSNR train / held-out / twitter':34s} {v['psnr_db_train']:8.2f}  {v['psnr_db_heldout']:.2f} / {v['psnr_db_twitter']:.2f} dB")
    print(f"wall {res['wall_s']:.0f}s")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    from comfyui_domainstudio.trainer.grids import save_png, tile_rows

    k = 16
    save_png(tile_rows([dom[:k], *sweep_rows, real[want[:k]], trn[:k], sks[:k], real[hsel[:k]], ho[:k]], gap=4),
             args.out[:-5] + "_samples.png" if args.out.endswith(".json") else args.out + "_samples.png", scale=2)
    print(f"wrote {args.out} (grid rows: 'an emoji'{', then with each --domain-sampler-sweep sampler' if sweep_rows else ''}; real / 'an emoji of <name>' / 'a sks emoji of <name>' for training "
          f"concepts; real / 'an emoji of <name>' for held-out concepts)")
    if args.record and os.path.exists(config.RECORD_FILE):
        with open(config.RECORD_FILE) as f:
            rec_json = json.load(f)
        res["command"] = "python bench/miniworld_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
        rec_json["quality"] = res
        with open(config.RECORD_FILE + ".tmp", "w") as f:
            json.dump(rec_json, f, indent=1)
        os.replace(config.RECORD_FILE + ".tmp", config.RECORD_FILE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
