"""Merge runs of bench/domain_quality.py made with the same settings into one result (rows, summary
and samples), e.g. when the recipe x seed grid was run in parts on a small machine.

    $DS_VENV/bin/python bench/merge_results.py OUT.json IN1.json IN2.json ... [--drop RECIPE/SEED@IN.json ...]

A later input's row replaces an earlier one for the same (recipe, seed). `--drop` leaves out a row of
one input (a run known to be wrong). Settings that change results (prompts, steps, samples, sampler,
checkpoint, target style, shots) must agree; the seeds may differ. The output records where every row
came from. Samples are merged into OUT_samples.npz when every input has them, and the labelled grids
OUT_samples.png / OUT_content.png (lowest seed) are redrawn from them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if "bench_domain_quality" in sys.modules:
    dq = sys.modules["bench_domain_quality"]
else:
    _spec = importlib.util.spec_from_file_location("bench_domain_quality", os.path.join(REPO, "bench", "domain_quality.py"))
    dq = importlib.util.module_from_spec(_spec)
    sys.modules["bench_domain_quality"] = dq
    _spec.loader.exec_module(dq)

MUST_AGREE = ("target_prompt", "source_prompt", "steps", "prompts", "sample_steps", "cfg", "checkpoint", "style",
              "shots", "eval")
REAL_SETS = ("shots", "eval_target", "eval_source")


def samples_file(path: str, result: dict) -> str | None:
    name = result.get("samples_npz")
    full = os.path.join(os.path.dirname(os.path.abspath(path)), name) if name else None
    return full if full and os.path.exists(full) else None


def merge(inputs: list[str], drop: set[str] = frozenset()) -> tuple[dict, dict | None]:
    """(merged result, merged sample arrays or None)."""
    results = []
    for p in inputs:
        with open(p) as f:
            results.append((p, json.load(f)))
    ref_path, ref = results[0]
    for p, r in results[1:]:
        for k in MUST_AGREE:
            if r["setting"].get(k) != ref["setting"].get(k):
                raise ValueError(f"{p}: setting {k}={r['setting'].get(k)!r} differs from {ref_path}'s "
                                 f"{ref['setting'].get(k)!r}; only runs with the same settings can be merged")
    rows, origin, recipes = {}, {}, {}
    for p, r in results:
        recipes.update(r.get("recipes", {}))
        for row in r["rows"]:
            key = f"{row['recipe']}/{row['seed']}"
            if f"{key}@{os.path.basename(p)}" in drop:
                continue
            rows[key], origin[key] = row, os.path.basename(p)
    known = list(dq.RECIPES)
    names = sorted(dict.fromkeys(row["recipe"] for row in rows.values()),
                   key=lambda m: known.index(m) if m in known else len(known))
    ordered = sorted(rows.values(), key=lambda row: (names.index(row["recipe"]), row["seed"]))
    arrays = None
    files = [samples_file(p, r) for p, r in results]
    if all(files):
        arrays = {}
        for f in files:
            with np.load(f, allow_pickle=False) as z:
                for k in REAL_SETS:
                    if k in z.files:
                        arrays.setdefault(k, z[k])
        for key, src in origin.items():
            f = files[[os.path.basename(p) for p, _ in results].index(src)]
            with np.load(f, allow_pickle=False) as z:
                if f"{key}/samples" in z.files:
                    arrays[f"{key}/samples"] = z[f"{key}/samples"]
    setting = dict(ref["setting"], seeds=sorted({row["seed"] for row in ordered}))
    merged = {"complete": all(r.get("complete", True) for _, r in results), "setting": setting,
              "recipes": {m: recipes[m] for m in names if m in recipes},
              "merged_from": [os.path.basename(p) for p, _ in results], "dropped": sorted(drop),
              "row_source": {f"{row['recipe']}/{row['seed']}": origin[f"{row['recipe']}/{row['seed']}"] for row in ordered},
              "rows": ordered, "summary": dq.summarize(ordered, names)}
    return merged, arrays


def write_grids(arrays: dict, recipes: list[str], seed: int, stem: str, style: str = "target") -> dict:
    """<stem>_samples.png from one seed, labelled rows: the shots, the real target and source
    renderings of the first 12 evaluation emoji, then each recipe's samples of them."""
    shown = [m for m in recipes if f"{m}/{seed}/samples" in arrays]
    k = 12
    rows = [(arrays["shots"], "shots")]
    if "eval_target" in arrays:
        rows += [(arrays["eval_target"][:k], f"{style} (real)"), (arrays["eval_source"][:k], "google (real)")]
    rows += [(arrays[f"{m}/{seed}/samples"][:k], m) for m in shown]
    dq.save_png(dq.to_uint8(dq.labelled_rows(rows, label_width=170))[0], stem + "_samples.png")
    return {os.path.basename(stem) + "_samples.png": [r[1] for r in rows]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--drop", action="append", default=[], help="RECIPE/SEED@INPUT_FILE_NAME to leave out")
    args = ap.parse_args(argv)
    try:
        merged, arrays = merge(args.inputs, set(args.drop))
    except (OSError, ValueError, KeyError) as e:
        print(f"merge_results: {e}", file=sys.stderr)
        return 1
    names = list(merged["summary"])
    dq.print_table(merged["rows"], names, f"Merged {', '.join(merged['merged_from'])}; mean ± sd over seeds "
                   f"{merged['setting']['seeds']}")
    stem = args.out[:-5] if args.out.endswith(".json") else args.out
    if arrays is not None:
        np.savez_compressed(stem + "_samples.tmp.npz", **arrays)
        os.replace(stem + "_samples.tmp.npz", stem + "_samples.npz")
        merged["samples_npz"] = os.path.basename(stem) + "_samples.npz"
        merged["grids"] = write_grids(arrays, names, min(merged["setting"]["seeds"]), stem,
                                      merged["setting"].get("style", "target"))
    with open(args.out + ".tmp", "w") as f:
        json.dump(merged, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"saved {args.out}" + (f" and {merged['samples_npz']}" if arrays is not None else " (no samples: an input lacks them)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
