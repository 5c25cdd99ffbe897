"""How well does the quality report's damage check (trainer/quality.py, detail_warning) flag the
runs whose subjects broke into fragments? Applied to saved personalization results
(bench/personalize_quality.py), no training:

    eval "$(bash .ci/setup.sh | tail -2)"
    $DS_VENV/bin/python bench/damage_check.py bench/results/personalize_sweep_lr_gpu.json \
        bench/results/personalize_quality_gpu.json --out bench/results/damage_check_gpu.json

Per run it takes what the in-graph report compares: the fine detail of the adapted model's instance
samples (the result's `hf`), of the source model's class-prompt samples on the same seeds (the
`base` row of that subject and seed) and of the 4 training images (recomputed from the emoji data),
and asks detail_warning whether it would warn. Beside the flag it puts a damage measure that needs
no threshold: how much worse the run's pixel fidelity is than the best run of the same subject and
seed in the same file ("excess", 0 = the best setting). Prints a table per (method, variant) and the
flagged runs; writes JSON (atomically, frontier.save).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def check_rows(rows: list[dict], training_detail: dict[int, float], warn) -> list[dict]:
    """One dict per trained run: its flag and excess fidelity loss. `warn(source, adapted, training)`
    returns a warning or None (detail_warning with the setting names bound)."""
    base = {(r["si"], r["seed"]): r for r in rows if r["method"] == "base"}
    trained = [r for r in rows if r["method"] != "base" and (r["si"], r["seed"]) in base]
    best: dict[tuple, float] = {}
    for r in trained:
        k = (r["si"], r["seed"])
        best[k] = min(best.get(k, float("inf")), r["fidelity"])
    out = []
    for r in trained:
        k = (r["si"], r["seed"])
        src = base[k]["hf"]
        out.append({"method": r["method"], "variant": r.get("variant", ""), "subject": r["subject"],
                    "seed": r["seed"], "detail_adapted": r["hf"], "detail_source": src,
                    "detail_training": training_detail[r["si"]], "ratio": r["hf"] / src,
                    "fidelity": r["fidelity"], "excess": r["fidelity"] - best[k],
                    "flagged": warn(src, r["hf"], training_detail[r["si"]]) is not None})
    return out


def summarize(checked: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for c in checked:
        groups.setdefault((c["method"], c["variant"]), []).append(c)
    table = []
    for (method, variant), cs in groups.items():
        table.append({"method": method, "variant": variant, "runs": len(cs), "flagged": sum(c["flagged"] for c in cs),
                      "ratio_mean": statistics.fmean(c["ratio"] for c in cs), "ratio_max": max(c["ratio"] for c in cs),
                      "excess_mean": statistics.fmean(c["excess"] for c in cs)})
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="bench/personalize_quality.py result JSONs")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "damage_check.json"))
    args = ap.parse_args(argv)

    import personalize_quality as pq
    from frontier import save
    from comfyui_domainstudio.miniworld import data
    from comfyui_domainstudio.trainer.quality import DETAIL_WARN, detail_warning

    google, twitter = data.load("google"), data.load("twitter")
    g_img, t_img = google["images"].astype(np.float32) / 255, twitter["images"].astype(np.float32) / 255

    def warn(src, ada, train):
        return detail_warning(src, ada, train, "unet_learning_rate", "unet_steps")

    checked = []
    for path in args.results:
        with open(path) as f:
            res = json.load(f)
        sis = {r["si"] for r in res["rows"]}
        training = {si: pq.high_frequency(pq.subject_images(g_img[si], t_img[si])) for si in sis}
        for c in check_rows(res["rows"], training, warn):
            c["file"] = os.path.basename(path)
            checked.append(c)
    table = summarize(checked)
    print(f"damage check (detail_warning: adapted >= {DETAIL_WARN}x source and > training images)")
    print(f"{'method':<22s} {'variant':<32s} {'runs':>4s} {'flag':>4s} {'ratio':>6s} {'max':>6s} {'excess':>7s}")
    for t in table:
        print(f"{t['method']:<22s} {t['variant']:<32s} {t['runs']:4d} {t['flagged']:4d} {t['ratio_mean']:6.2f} "
              f"{t['ratio_max']:6.2f} {t['excess_mean']:7.3f}")
    flagged = [c for c in checked if c["flagged"]]
    print(f"\nflagged runs ({len(flagged)} of {len(checked)}):")
    for c in flagged:
        print(f"  {c['method']} {c['variant']} {c['subject']} seed {c['seed']}: detail {c['detail_adapted']:.4f} = "
              f"{c['ratio']:.2f}x source, training {c['detail_training']:.4f}; fidelity {c['fidelity']:.3f} "
              f"(+{c['excess']:.3f} over the best setting)")
    clean = [c for c in checked if not c["flagged"]]
    for name, cs in (("flagged", flagged), ("not flagged", clean)):
        if cs:
            print(f"{name}: mean excess {statistics.fmean(c['excess'] for c in cs):.3f} over {len(cs)} runs")
    out = {"detail_warn": DETAIL_WARN, "inputs": [os.path.basename(p) for p in args.results], "table": table,
           "runs": checked}
    save(out, args.out)
    print(f"wrote {os.path.relpath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
