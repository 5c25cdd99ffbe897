"""Merge runs of bench/domain_quality.py made with the same settings into one result (rows, summary
and samples), e.g. when the method x seed grid was run in parts on a small machine.

    $DS_VENV/bin/python bench/merge_results.py OUT.json IN1.json IN2.json ... [--drop METHOD/SEED@IN.json ...]

A later input's row replaces an earlier one for the same (method, seed). `--drop` leaves out a row of
one input (a run known to be wrong). Settings that change results (steps, lr, rank, batch, samples,
sampler, prompts, checkpoint, data) must agree; the seeds and thread counts may differ. The output
records where every row came from. Samples are merged into OUT_samples.npz when every input has them,
and the grids domain_samples.png / domain_content.png (lowest seed) are redrawn from them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("domain_quality", os.path.join(REPO, "bench", "domain_quality.py"))
dq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dq)

MUST_AGREE = ("target_prompt", "source_prompt", "steps", "lr", "rank", "batch", "samples", "sample_steps", "cfg",
              "checkpoint", "data", "shots", "eval")
REAL_SETS = ("shots", "eval_twitter", "eval_google", "classifier_google", "classifier_twitter")


def samples_file(path: str, result: dict) -> str | None:
    name = result.get("samples_npz")
    full = os.path.join(os.path.dirname(os.path.abspath(path)), name) if name else None
    return full if full and os.path.exists(full) else None


def merge(inputs: list[str], drop: set[str] = frozenset()) -> tuple[dict, dict | None]:
    """(merged result, merged sample arrays or None)."""
    results = [(p, json.load(open(p))) for p in inputs]
    ref_path, ref = results[0]
    for p, r in results[1:]:
        for k in MUST_AGREE:
            if r["setting"].get(k) != ref["setting"].get(k):
                raise ValueError(f"{p}: setting {k}={r['setting'].get(k)!r} differs from {ref_path}'s "
                                 f"{ref['setting'].get(k)!r}; only runs with the same settings can be merged")
    rows, origin = {}, {}
    for p, r in results:
        for row in r["rows"]:
            key = f"{row['method']}/{row['seed']}"
            if f"{key}@{os.path.basename(p)}" in drop:
                continue
            rows[key], origin[key] = row, os.path.basename(p)
    known = list(dq.METHODS)
    methods = sorted(dict.fromkeys(row["method"] for row in rows.values()),
                     key=lambda m: known.index(m) if m in known else len(known))
    ordered = sorted(rows.values(), key=lambda row: (methods.index(row["method"]), row["seed"]))
    arrays = None
    files = [samples_file(p, r) for p, r in results]
    if all(files):
        arrays = {}
        for f in files:
            with np.load(f, allow_pickle=False) as z:
                for k in REAL_SETS:
                    arrays.setdefault(k, z[k])
        for key, src in origin.items():
            f = files[[os.path.basename(p) for p, _ in results].index(src)]
            with np.load(f, allow_pickle=False) as z:
                for part in ("domain", "content"):
                    if f"{key}/{part}" in z.files:
                        arrays[f"{key}/{part}"] = z[f"{key}/{part}"]
    setting = dict(ref["setting"], seeds=sorted({row["seed"] for row in ordered}))
    merged = {"complete": all(r.get("complete", True) for _, r in results), "setting": setting,
              "merged_from": [os.path.basename(p) for p, _ in results], "dropped": sorted(drop),
              "row_source": {f"{row['method']}/{row['seed']}": origin[f"{row['method']}/{row['seed']}"] for row in ordered},
              "rows": ordered, "summary": dq.summarize(ordered, methods)}
    return merged, arrays


def write_grids(arrays: dict, methods: list[str], seed: int, out_dir: str) -> dict:
    """domain_samples.png (the shots, then 10 samples per method) and domain_content.png (real
    Twemoji and Noto renderings of the held-out emoji, then each method's), from one seed."""
    f = lambda a: a.astype(np.float32) / 255  # noqa: E731
    shown = [m for m in methods if f"{m}/{seed}/domain" in arrays]
    dq.grid([f(arrays["shots"])] + [f(arrays[f"{m}/{seed}/domain"][:10]) for m in shown],
            os.path.join(out_dir, "domain_samples.png"))
    grids = {"domain_samples.png": ["shots"] + [f"{m} (seed {seed})" for m in shown]}
    content = [m for m in shown if f"{m}/{seed}/content" in arrays]
    if content:
        dq.grid([f(arrays["eval_twitter"]), f(arrays["eval_google"])] + [f(arrays[f"{m}/{seed}/content"]) for m in content],
                os.path.join(out_dir, "domain_content.png"))
        grids["domain_content.png"] = ["twitter (real)", "google (real)"] + [f"{m} (seed {seed})" for m in content]
    return grids


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--drop", action="append", default=[], help="METHOD/SEED@INPUT_FILE_NAME to leave out")
    args = ap.parse_args(argv)
    try:
        merged, arrays = merge(args.inputs, set(args.drop))
    except (OSError, ValueError, KeyError) as e:
        print(f"merge_results: {e}", file=sys.stderr)
        return 1
    methods = list(merged["summary"])
    dq.print_table(merged["rows"], methods, f"Merged {', '.join(merged['merged_from'])}; mean ± sd over seeds "
                   f"{merged['setting']['seeds']}")
    if arrays is not None:
        npz = args.out[:-5] + "_samples.npz" if args.out.endswith(".json") else args.out + "_samples.npz"
        np.savez_compressed(npz + ".tmp.npz", **arrays)
        os.replace(npz + ".tmp.npz", npz)
        merged["samples_npz"] = os.path.basename(npz)
        out_dir = os.path.dirname(os.path.abspath(args.out))
        merged["grids"] = write_grids(arrays, methods, min(merged["setting"]["seeds"]), out_dir)
    with open(args.out + ".tmp", "w") as f:
        json.dump(merged, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"saved {args.out}" + (f" and {merged['samples_npz']}" if arrays is not None else " (no samples: an input lacks them)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
