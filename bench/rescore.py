"""Re-score saved samples in EfficientNet-Lite0 feature space: results of bench/personalize_quality.py,
and of the earlier, pixel-feature version of bench/domain_quality.py (the current one scores in
Lite0 space itself).

    eval "$(bash .ci/setup.sh | tail -2)"
    $DS_VENV/bin/python bench/rescore.py bench/results/domain_quality.json [more.json ...] [--threads 1]

The earlier bench/domain_quality.py wrote <result>.json and every image it scored to <result>_samples.npz
(uint8 [N,64,64,3]: shots, eval_twitter, eval_google, classifier_google, classifier_twitter,
"<method>/<seed>/domain", "<method>/<seed>/content"). This script recomputes its metrics for every
(method, seed) with bench/features.py's ImageNet EfficientNet-Lite0 features (1280-d, penultimate
layer) instead of 16x16 downsampled RGB, prints mean ± sd over seeds per method (in the order of the
JSON's rows) and writes <result>_lite0.json next to the input (atomically):

* style      mean P(twitter) of the domain samples under the same logistic-regression classifier
             (bench/domain_quality.py's StyleClassifier) trained on Lite0 features of the classifier
             split's Google vs Twitter renderings; its accuracy on the evaluation emoji's real
             renderings (Google = 0, Twitter = 1) is printed and stored;
* diversity  intra-cluster diversity with cosine distance (samples assigned to the nearest shot,
             mean pairwise distance inside clusters of >= 2 members, <= 50 per cluster);
* memorize   mean cosine distance from each sample to its nearest shot (lower = closer to copies);
* content    cosine distance of "a sks emoji of <name>" sample i to eval_twitter[i] (lower is
             better) and the style score of these samples (NaN in the unconditional setting);
* KID        Kernel Inception Distance (bench/features.py: unbiased, cubic polynomial kernel) of the
             domain samples to the real Twitter renderings of the classifier split (kid_twitter,
             lower = closer to the target domain) and to the real Google ones (kid_google).
             Printed x 1e3; stored raw.

`reference` in the output scores real image sets the same way (the 10 shots and the evaluation
emoji's Twitter and Google renderings) to calibrate the numbers; `pixel` in each row repeats the
original metrics of bench/domain_quality.py.
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

if "bench_domain_quality" in sys.modules:
    dq = sys.modules["bench_domain_quality"]
else:
    _spec = importlib.util.spec_from_file_location("bench_domain_quality", os.path.join(REPO, "bench", "domain_quality.py"))
    dq = importlib.util.module_from_spec(_spec)
    sys.modules["bench_domain_quality"] = dq
    _spec.loader.exec_module(dq)
features = dq.bench_module("features")

METRICS = ("style", "diversity", "memorize", "content_to_target", "content_style", "kid_twitter", "kid_google")
PIXEL_METRICS = ("style", "diversity", "memorize", "content_to_target", "content_style")
NAN = float("nan")
REAL_SETS = ("shots", "eval_twitter", "eval_google", "classifier_google", "classifier_twitter")


def intra_cluster_diversity(samples: np.ndarray, shots: np.ndarray, dist=features.cosine_distances) -> float:
    """bench/domain_quality.py's intra_cluster_diversity, cosine distance by default."""
    return dq.intra_cluster_diversity(samples, shots, dist=dist)


def memorization(samples: np.ndarray, shots: np.ndarray, dist=features.cosine_distances) -> float:
    """Mean distance from each sample to its nearest shot (default cosine)."""
    return dq.memorization(samples, shots, dist=dist)


def output_path(json_path: str) -> str:
    base = json_path[:-5] if json_path.endswith(".json") else json_path
    return base + "_lite0.json"


def samples_path(json_path: str, result: dict) -> str:
    d = os.path.dirname(os.path.abspath(json_path))
    if result.get("samples_npz"):
        return os.path.join(d, result["samples_npz"])
    base = json_path[:-5] if json_path.endswith(".json") else json_path
    return os.path.abspath(base + "_samples.npz")


def _kid_or_nan(x: np.ndarray, y: np.ndarray) -> float:
    return features.kid(x, y) if len(x) >= 2 and len(y) >= 2 else NAN


def _mean_sd(vals: list[float]) -> tuple[float, float]:
    vals = [float(v) for v in vals]
    if any(np.isnan(v) for v in vals):
        return NAN, NAN
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def rescore(json_path: str, extract, log=print) -> dict:
    """Score one result file; returns the output dict (also written to output_path(json_path))."""
    t0 = time.perf_counter()
    with open(json_path) as f:
        result = json.load(f)
    if "rows" not in result or "setting" not in result:
        raise ValueError(f"{json_path}: not a bench/domain_quality.py result (no 'setting'/'rows')")
    if result["rows"] and "recipe" in result["rows"][0]:
        raise ValueError(f"{json_path}: already scored in Lite0 space by bench/domain_quality.py (this script "
                         "re-scores results of its earlier, pixel-feature version)")
    npz = samples_path(json_path, result)
    if not os.path.exists(npz):
        raise FileNotFoundError(f"{json_path}: no samples file {npz} (results written before "
                                "bench/domain_quality.py saved its samples? re-run it)")
    with np.load(npz, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    missing = [k for k in REAL_SETS if k not in arrays]
    if missing:
        raise ValueError(f"{npz}: missing arrays {missing}")

    real = {k: extract(arrays[k]) for k in REAL_SETS}
    clf = dq.StyleClassifier(real["classifier_google"], real["classifier_twitter"])
    ev_real = np.concatenate([clf.prob(real["eval_google"]) < 0.5, clf.prob(real["eval_twitter"]) >= 0.5])
    acc = float(ev_real.mean())
    log(f"{os.path.basename(json_path)}: Lite0 style classifier accuracy on held-out real images {acc:.2f} "
        f"(pixel features: {result['setting'].get('classifier_accuracy_real', NAN):.2f})")
    reference = {name: {"style": float(clf.prob(real[name]).mean()),
                        "kid_twitter": _kid_or_nan(real[name], real["classifier_twitter"]),
                        "kid_google": _kid_or_nan(real[name], real["classifier_google"])}
                 for name in ("shots", "eval_twitter", "eval_google")}
    reference["classifier_google_vs_twitter"] = {"kid": features.kid(real["classifier_google"],
                                                                     real["classifier_twitter"])}

    rows = []
    for src in result["rows"]:
        method, seed = src["method"], src["seed"]
        key = f"{method}/{seed}/domain"
        if key not in arrays:
            log(f"  warning: {key} is not in {os.path.basename(npz)}; row skipped")
            continue
        df = extract(arrays[key])
        row = {"method": method, "seed": seed,
               "style": float(clf.prob(df).mean()),
               "diversity": intra_cluster_diversity(df, real["shots"]),
               "memorize": memorization(df, real["shots"]),
               "content_to_target": NAN, "content_style": NAN,
               "kid_twitter": _kid_or_nan(df, real["classifier_twitter"]),
               "kid_google": _kid_or_nan(df, real["classifier_google"]),
               "n_domain": int(len(df))}
        ckey = f"{method}/{seed}/content"
        if ckey in arrays:
            cf = extract(arrays[ckey])
            if len(cf) != len(real["eval_twitter"]):
                raise ValueError(f"{ckey}: {len(cf)} content samples for {len(real['eval_twitter'])} eval emoji")
            row["content_to_target"] = float(np.diag(features.cosine_distances(cf, real["eval_twitter"])).mean())
            row["content_style"] = float(clf.prob(cf).mean())
        row["train_s"] = src.get("train_s", NAN)
        row["pixel"] = {k: src[k] for k in PIXEL_METRICS if k in src}
        rows.append(row)

    methods = list(dict.fromkeys(r["method"] for r in rows))
    summary = {m: {k: _mean_sd([r[k] for r in rows if r["method"] == m]) for k in METRICS} for m in methods}
    seeds = sorted({r["seed"] for r in rows})
    setting = result["setting"]
    log(f"\nLite0 re-score of {os.path.basename(json_path)} ({'unconditional' if setting.get('uncond') else 'text'}, "
        f"{setting.get('steps')} steps, seeds {seeds}); mean ± sd over seeds; cosine distances; KID x 1e3")
    log(f"{'method':26s} {'style ↑':>13s} {'diversity ↑':>15s} {'shot dist ↑':>15s} {'content dist ↓':>15s} "
        f"{'content style':>13s} {'KID twitter ↓':>15s} {'KID google':>15s}")

    def cell(m, k, width, prec, scale=1.0):
        mu, sd = summary[m][k]
        return f"{mu * scale:{width}.{prec}f}±{sd * scale:<{prec + 2}.{prec}f}"

    for m in methods:
        log(f"{m:26s} {cell(m, 'style', 7, 3)} {cell(m, 'diversity', 8, 4)} {cell(m, 'memorize', 8, 4)} "
            f"{cell(m, 'content_to_target', 8, 4)} {cell(m, 'content_style', 7, 3)} "
            f"{cell(m, 'kid_twitter', 8, 2, 1e3)} {cell(m, 'kid_google', 8, 2, 1e3)}")
    log("real images (reference): " + "; ".join(
        f"{name} style {v['style']:.3f} KID twitter {v['kid_twitter'] * 1e3:.2f} google {v['kid_google'] * 1e3:.2f}"
        for name, v in reference.items() if name != "classifier_google_vs_twitter")
        + f"; KID classifier google vs twitter {reference['classifier_google_vs_twitter']['kid'] * 1e3:.2f}")

    import timm
    import torch

    out = {"source": os.path.basename(json_path), "samples_npz": os.path.basename(npz),
           "features": {"model": f"timm {features.ARCH}", "weights": features.WEIGHTS_PACKAGE,
                        "dim": features.FEATURE_DIM,
                        "input": f"bilinear antialiased resize to {features.INPUT_SIZE}, (x - 0.5) / 0.5",
                        "distance": "cosine", "kid": "unbiased MMD^2, k(a,b) = (a.b/d + 1)^3, full sets"},
           "setting": setting, "classifier_accuracy_real": acc, "reference": reference,
           "rows": rows, "summary": summary, "platform": platform.platform(), "torch": torch.__version__,
           "timm": timm.__version__, "wall_s": round(time.perf_counter() - t0, 1)}
    dest = output_path(json_path)
    tmp = dest + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, dest)
    log(f"saved {dest} ({out['wall_s']:.0f} s)")
    return out


PERSONALIZE_METRICS = ("fidelity", "drift", "forget", "prompt")


def rescore_personalize(json_path: str, result: dict, extract, log=print) -> dict:
    """bench/personalize_quality.py's result in Lite0 space:

    * fidelity  mean cosine *similarity* between every instance-prompt sample and every subject image
                (DreamBooth's DINO score recipe with Lite0 features; higher is better; the base row
                scores the untouched model's class-prompt samples);
    * drift     mean cosine distance between the personalized and the base model's class-prompt
                samples on the same seeds (paired);
    * forget    the same on the unrelated prompts;
    * prompt    share of unrelated-prompt samples whose nearest (cosine) training emoji is the
                prompted one."""
    t0 = time.perf_counter()
    npz = samples_path(json_path, result)
    if not os.path.exists(npz):
        raise FileNotFoundError(f"{json_path}: no samples file {npz}; re-run bench/personalize_quality.py")
    with np.load(npz, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    index_of = {name: idx for idx, name in result["subject_index"].items()}
    known = extract(arrays["known_google"])
    want = arrays["prompt_target"]

    def prompt_acc(f):
        return float((features.cosine_distances(f, known).argmin(1) == want).mean())

    def paired(a, b):
        return float(np.diag(features.cosine_distances(a, b)).mean())

    cache = {}

    def feats(key):
        if key not in cache:
            cache[key] = extract(arrays[key])
        return cache[key]

    rows = []
    for src in result["rows"]:
        si, m, seed = index_of[src["subject"]], src["method"], src["seed"]
        subj = feats(f"{si}/subject")
        b_cls, b_unrel = feats(f"{si}/base/{seed}/class"), feats(f"{si}/base/{seed}/unrelated")
        if m == "base":
            row = {"fidelity": float(1 - features.cosine_distances(b_cls, subj).mean()), "drift": 0.0,
                   "forget": 0.0, "prompt": prompt_acc(b_unrel)}
        else:
            inst, cls, unrel = (feats(f"{si}/{m}/{seed}/{k}") for k in ("instance", "class", "unrelated"))
            row = {"fidelity": float(1 - features.cosine_distances(inst, subj).mean()), "drift": paired(cls, b_cls),
                   "forget": paired(unrel, b_unrel), "prompt": prompt_acc(unrel)}
        row.update(subject=src["subject"], method=m, seed=seed, time_s=src.get("time_s", NAN),
                   pixel={k: src[k] for k in ("fidelity", "drift", "forget", "prompt") if k in src})
        rows.append(row)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    summary = {m: {k: _mean_sd([r[k] for r in rows if r["method"] == m]) for k in PERSONALIZE_METRICS + ("time_s",)}
               for m in methods}
    log(f"\nLite0 re-score of {os.path.basename(json_path)} ({len(index_of)} subjects, seeds "
        f"{result['setting'].get('seeds')}); mean ± sd over subjects and seeds; cosine")
    log(f"{'method':22s} {'fidelity ↑':>15s} {'drift ↓':>15s} {'forget ↓':>15s} {'prompt ↑':>13s} {'time s':>8s}")
    for m in methods:
        s = summary[m]
        log(f"{m:22s} " + " ".join(f"{s[k][0]:8.4f}±{s[k][1]:<6.4f}" for k in ("fidelity", "drift", "forget"))
            + f" {s['prompt'][0]:6.2f}±{s['prompt'][1]:<5.2f} {s['time_s'][0]:8.1f}")
    import torch

    out = {"source": os.path.basename(json_path), "samples_npz": os.path.basename(npz),
           "features": {"model": f"timm {features.ARCH}", "weights": features.WEIGHTS_PACKAGE, "distance": "cosine"},
           "setting": result["setting"], "rows": rows, "summary": summary, "platform": platform.platform(),
           "torch": torch.__version__, "wall_s": round(time.perf_counter() - t0, 1)}
    dest = output_path(json_path)
    with open(dest + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(dest + ".tmp", dest)
    log(f"saved {dest} ({out['wall_s']:.0f} s)")
    return out


def main(argv=None, extractor=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="bench/domain_quality.py or bench/personalize_quality.py result "
                    "JSON(s) with their _samples.npz")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--batch", type=int, default=8, help="feature extraction batch size (small is faster on CPU)")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    extract = extractor or features.Lite0Features(batch_size=args.batch)
    failed = 0
    for path in args.results:
        if path.endswith("_lite0.json"):
            print(f"{path}: skipped (a re-score output)")
            continue
        try:
            with open(path) as f:
                result = json.load(f)
            if "subject_index" in result:
                rescore_personalize(path, result, extract)
            else:
                rescore(path, extract)
        except (OSError, ValueError) as e:
            print(f"{path}: {e}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
