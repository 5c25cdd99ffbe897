"""The style / diversity frontier: DomainStudio against plain fine-tuning and DreamBooth with prior in
the miniature SD world, over steps x learning rate x lambda (x feature space), 3 seeds and 2 target
styles, in one picture.

    eval "$(bash .ci/setup.sh | tail -2)"
    OMP_NUM_THREADS=1 nice -n 10 $DS_VENV/bin/python bench/frontier.py            # resumable; ~1 h of one core
    $DS_VENV/bin/python bench/frontier.py --plot-only                              # table + picture from the JSON
    OMP_NUM_THREADS=1 $DS_VENV/bin/python bench/frontier.py --styles twitter --checkpoints 200 400 800 1600 \
        --settings ft_lr3e-4 ds_l1_lr3e-4 ds_paper_lr3e-4 \
        --out bench/results/frontier_long.json                                  # the long runs (~1 h of one core)

Every setting of GRID trains once per (target style, seed) to the largest step count and is sampled
at every step count of --checkpoints on the way (the live LoRA through ComfyUI's stock LoRA loader,
between two pieces of the training loop), so a step sweep costs one training. Setting and metrics are
bench/domain_quality.py's: shots captioned with their names ("a sks emoji of {caption}" vs the source
model's "an emoji of {caption}"); each point draws "a sks emoji of <name>" for the 24 evaluation emoji
(stock euler sampler, CFG 5, 20 steps, the same noise for every model of a seed), scored in
EfficientNet-Lite0 space by its World:

* style_rt   P(target style) of a logistic-regression classifier on the real renderings after a round
             trip through the miniature's VAE (x axis; the range the model can express: round-tripped
             Twemoji 0.83, Noto 0.31);
* style      the same classifier on the real renderings (the x axis before style_rt; the round trip
             alone takes real Twemoji from 0.92 to 0.57 on it, bench/style_probe.py);
* diversity  intra-cluster diversity (Intra-LPIPS recipe, cosine distance; y, left panels);
* shot_dist  mean distance to the nearest shot (lower = copies; y, right panels);
* content_dist, kid_target in the table (a high style score with a high KID and content distance is
             degradation the classifier calls "target", not the target style).

Results go to bench/results/frontier.json after every run (a stopped sweep continues where it
stopped), the picture beside it (--out with .png, here bench/results/frontier.png; PIL; one row per
target style), and the table (mean ± sd over seeds per setting and step count) is printed.
`--settings` picks a subset of GRID.

The claim tested (the DomainStudio paper's): at equal target style, DomainStudio keeps more diversity
and copies the shots less than fine-tuning. `compare()` reads it off the curves: for each method
family, the best diversity (and the largest shot distance) reached among its points whose style is
within a band, per style band.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
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

OUT_JSON = os.path.join(REPO, "bench", "results", "frontier.json")
STYLES = ("twitter", "openmoji")
SEEDS = (0, 1, 2)
CHECKPOINTS = (100, 200, 400)

# name -> (family, Recipe). LoRA runs use the pack's rank 8, alpha 8; a setting without an "_all" in
# its name trains attention only (lora_attn, the default until 2026-12-04, pinned below so the names
# keep their meaning), one with "_all" every layer (lora_all, the domain methods' default since). Every
# setting trains the whole schedule (timesteps 0-1000, pinned below: the default until 2026-12-05)
# unless its name says _thi (t >= 500), _tlo (t < 500, the default since), _t300 or _t700 (t < 300, 700).
_OFF = dq.LAMBDAS_OFF


def _ds(lam: float, lr: float, hfmse: float = 0.1, **extra) -> "dq.Recipe":
    return dq.Recipe("domainstudio", {"lambda_img": lam, "lambda_hf": lam, "lambda_hfmse": hfmse, "learning_rate": lr,
                                      **extra})


# History of the grid. The first sweeps used lr 1e-3 (with ComfyUI's LoRA start, 3e-4 had moved the
# style little); the `denoise loss x` column then showed every lr-1e-3 run ending 7-9x above its
# start: its high style scores were a model breaking down. With the kohya/PEFT start, lr 3e-4 is
# stable to ~200-400 steps (lr x steps ~0.06-0.12) and is the regime of the default sweep.
GRID: dict[str, tuple[str, "dq.Recipe"]] = {
    "ft_lr1e-3": ("finetune", dq.Recipe("finetune", {"learning_rate": 1e-3})),
    "ds_paper_lr1e-3": ("domainstudio", _ds(1e2, 1e-3)),                # the paper's lambdas 100 / 100 / 0.1
    "ds_nohfmse_lr1e-3": ("domainstudio", _ds(1e2, 1e-3, hfmse=0.0)),   # without the paired HF MSE
    "db_prior_lr1e-3": ("dreambooth_prior", dq.Recipe("domainstudio", {**dq.RECIPES["dreambooth_prior"].config,
                                                                       "learning_rate": 1e-3})),
    "ds_l10_lr1e-3": ("domainstudio", _ds(10.0, 1e-3, hfmse=0.01)),     # the paper's lambdas / 10
    # extras (fewer seeds)
    "ft_lr3e-4": ("finetune", dq.Recipe("finetune", {"learning_rate": 3e-4})),
    "ds_paper_lr3e-4": ("domainstudio", _ds(1e2, 3e-4)),
    "ftfull_lr3e-5": ("finetune_full", dq.Recipe("finetune", {"learning_rate": 3e-5}, {"train_mode": "full_attn"})),
    "ds_pixel_lr1e-3": ("domainstudio", _ds(1e2, 1e-3, feature_space="pixel")),  # the paper's feature space
    "ft_lr3e-3": ("finetune", dq.Recipe("finetune", {"learning_rate": 3e-3})),
    "ds_paper_lr3e-3": ("domainstudio", _ds(1e2, 3e-3)),
    # the stable regime: at lr 1e-3 every run's denoising loss ends 7-9x above its start
    "ds_l10_lr3e-4": ("domainstudio", _ds(10.0, 3e-4, hfmse=0.01)),
    "ds_l1_lr3e-4": ("domainstudio", _ds(1.0, 3e-4, hfmse=0.001)),    # the paper's lambdas / 100: the default until 2026-12-04
    "db_prior_lr3e-4": ("dreambooth_prior", dq.Recipe("domainstudio", {**dq.RECIPES["dreambooth_prior"].config,
                                                                       "learning_rate": 3e-4})),
    "ft_lr1e-4": ("finetune", dq.Recipe("finetune", {"learning_rate": 1e-4})),
    "ds_l10_lr1e-4": ("domainstudio", _ds(10.0, 1e-4, hfmse=0.01)),
    "ds_paper_lr1e-4": ("domainstudio", _ds(1e2, 1e-4)),
    # LoRA on every linear/conv weight (train_mode lora_all) instead of attention only: in the
    # miniature (8x8 latents, factorised convs) the look is mostly drawn by the res blocks
    "ft_all_lr3e-4": ("finetune", dq.Recipe("finetune", {"learning_rate": 3e-4}, {"train_mode": "lora_all"})),
    "ds_l10_all_lr3e-4": ("domainstudio", dq.Recipe("domainstudio", _ds(10.0, 3e-4, hfmse=0.01).config,
                                                    {"train_mode": "lora_all"})),
    "ds_l1_all_lr3e-4": ("domainstudio", dq.Recipe("domainstudio", _ds(1.0, 3e-4, hfmse=0.001).config,
                                                   {"train_mode": "lora_all"})),
    # on the GPU-trained miniworld (2026-12-04): every-layer LoRA at a higher lr, and DreamBooth with
    # prior on every layer (the third family at the candidate default)
    "ft_all_lr6e-4": ("finetune", dq.Recipe("finetune", {"learning_rate": 6e-4}, {"train_mode": "lora_all"})),
    "ds_l1_all_lr6e-4": ("domainstudio", dq.Recipe("domainstudio", _ds(1.0, 6e-4, hfmse=0.001).config,
                                                   {"train_mode": "lora_all"})),
    "ds_paper_all_lr3e-4": ("domainstudio", dq.Recipe("domainstudio", _ds(1e2, 3e-4).config,
                                                      {"train_mode": "lora_all"})),   # the default 2026-12-04..05
    # no identifier: the shots as "an emoji of <name>" for both models (the miniworld was trained to
    # ignore any word in the "a <w> emoji of" slot, so "sks" starts unbound and hard to bind; a domain
    # method may as well move the model's own emoji). Sampled as every setting, "a sks emoji of <name>".
    "ft_all_noid_lr3e-4": ("finetune", dq.Recipe("finetune", {"learning_rate": 3e-4,
                                                              "target_prompt": dq.SOURCE_PROMPT},
                                                 {"train_mode": "lora_all"})),
    "ds_l1_all_noid_lr3e-4": ("domainstudio", dq.Recipe("domainstudio", {**_ds(1.0, 3e-4, hfmse=0.001).config,
                                                                         "target_prompt": dq.SOURCE_PROMPT},
                                                        {"train_mode": "lora_all"})),
    "db_prior_all_lr3e-4": ("dreambooth_prior", dq.Recipe("domainstudio", {**dq.RECIPES["dreambooth_prior"].config,
                                                                           "learning_rate": 3e-4},
                                                          {"train_mode": "lora_all"})),
    # can the defaults move the style further? (2026-12-05) every layer at rank 32 (alpha 32: the same
    # alpha / rank as the default r8 / a8), and the default at twice the lr
    "ft_all_r32_lr3e-4": ("finetune", dq.Recipe("finetune", {"learning_rate": 3e-4},
                                                {"train_mode": "lora_all", "lora_rank": 32, "lora_alpha": 32.0})),
    "ds_paper_all_r32_lr3e-4": ("domainstudio", dq.Recipe("domainstudio", _ds(1e2, 3e-4).config,
                                                          {"train_mode": "lora_all", "lora_rank": 32,
                                                           "lora_alpha": 32.0})),
    "ds_paper_all_lr6e-4": ("domainstudio", dq.Recipe("domainstudio", _ds(1e2, 6e-4).config,
                                                      {"train_mode": "lora_all"})),
    # which noise levels carry the style? (2026-12-05) the default pair trained only on the noisier half
    # of the schedule (t >= 500: layout and colour fills are decided there) or only on the cleaner half
    # (t < 500: edges, shading, texture); a bench-only switch (Recipe.timesteps), not a setting of the pack
    "ft_all_thi_lr3e-4": ("finetune", dq.Recipe("finetune", {"learning_rate": 3e-4}, {"train_mode": "lora_all"},
                                                timesteps=(500, 1000))),
    "ft_all_tlo_lr3e-4": ("finetune", dq.Recipe("finetune", {"learning_rate": 3e-4}, {"train_mode": "lora_all"},
                                                timesteps=(0, 500))),
    "ds_paper_all_thi_lr3e-4": ("domainstudio", dq.Recipe("domainstudio", _ds(1e2, 3e-4).config,
                                                          {"train_mode": "lora_all"}, timesteps=(500, 1000))),
    "ds_paper_all_tlo_lr3e-4": ("domainstudio", dq.Recipe("domainstudio", _ds(1e2, 3e-4).config,
                                                          {"train_mode": "lora_all"}, timesteps=(0, 500))),  # default since 12-05
    # where is the cut? (2026-12-05, stop 31) DomainStudio at the paper's lambda on t < 300 and on t < 700
    "ds_paper_all_t300_lr3e-4": ("domainstudio", dq.Recipe("domainstudio", _ds(1e2, 3e-4).config,
                                                           {"train_mode": "lora_all"}, timesteps=(0, 300))),
    "ds_paper_all_t700_lr3e-4": ("domainstudio", dq.Recipe("domainstudio", _ds(1e2, 3e-4).config,
                                                           {"train_mode": "lora_all"}, timesteps=(0, 700))),
}
for _family, _recipe in GRID.values():
    _recipe.options.setdefault("train_mode", "lora_attn")
    if _recipe.timesteps is None:  # the whole schedule, whatever the pack's default is now
        _recipe.options.setdefault("min_timestep", 0)
        _recipe.options.setdefault("max_timestep", 1000)

# The default sweep, the stable regime the defaults were chosen from (5 settings x 2 styles x 3 seeds
# to 400 steps: ~30 runs of 1.5-2.5 min on one idle core, ~1.2 h); the others are extras run on fewer
# seeds or checkpoints (--settings ... --seeds 0 --checkpoints 100 200 400 800 1600).
DEFAULT_SETTINGS = ["ft_lr3e-4", "ds_l1_lr3e-4", "ds_l10_lr3e-4", "ds_paper_lr3e-4", "db_prior_lr3e-4"]
FAMILIES = ("finetune", "finetune_full", "dreambooth_prior", "domainstudio")
COLORS = {"finetune": (31, 119, 180), "finetune_full": (23, 190, 207), "dreambooth_prior": (255, 127, 14),
          "domainstudio": (214, 39, 40), "base": (60, 60, 60)}


def load(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"runs": {}, "base": {}}


def save(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)


def merge_into(result: dict, other: dict) -> None:
    """Adds `other`'s runs, base scores, worlds and failures that `result` does not have yet."""
    for k, run in other.get("runs", {}).items():
        result.setdefault("runs", {}).setdefault(k, run)
    for style, by_seed in other.get("base", {}).items():
        for seed, score in by_seed.items():
            result.setdefault("base", {}).setdefault(style, {}).setdefault(seed, score)
    for style, world in other.get("worlds", {}).items():
        result.setdefault("worlds", {}).setdefault(style, world)
    for k, why in other.get("failed", {}).items():
        if k not in result.get("runs", {}):
            result.setdefault("failed", {})[k] = why
    if "setting" not in result and "setting" in other:
        result["setting"] = other["setting"]
    elif "setting" in other:  # settings added to GRID since `result` was written keep their recipe
        for name, recipe in other["setting"].get("grid", {}).items():
            result["setting"].setdefault("grid", {}).setdefault(name, recipe)


def run_id(setting: str, style: str, seed: int) -> str:
    return f"{setting}/{style}/{seed}"


# ---------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------

METRICS = ("style", "style_rt", "diversity", "shot_dist", "content_dist", "kid_target")
LABELS = {"style": "style score ↑", "style_rt": "style (VAE) ↑", "diversity": "diversity ↑",
          "shot_dist": "shot dist ↑", "content_dist": "content dist ↓", "kid_target": "KID→target ↓",
          "denoise_x": "denoise loss ×"}


def style_key(pts: list[dict], style: str) -> str:
    """The x axis for one target style: `style_rt` (the classifier trained on VAE round-tripped
    renderings, whose range is what the miniature can express) where the base model's point has it,
    else the real-image classifier's `style` (runs made before style_rt existed)."""
    base = [p for p in pts if p["target"] == style and p["setting"] == "base"]
    return "style_rt" if base and all("style_rt" in p for p in base) else "style"


def denoise_ratio(run: dict, step: int) -> float:
    """The denoising term's mean over the 50 steps before `step` divided by its mean over the first
    50 steps (NaN where the run did not record it). Near or below 1: the model still denoises the
    shots as well as at the start; several times above 1: the run is breaking down, and a rising
    style score there is damage the classifier calls "target"."""
    losses, at = run.get("losses", {}), run.get("loss_at", {})
    term = next((k for k in ("simple", "instance") if k in losses), None)
    if term is None:
        return float("nan")
    if str(step) in at:
        now = at[str(step)].get(term)
    elif step == max(int(s) for s in run["points"]):
        now = losses[term][1]
    else:
        return float("nan")
    return float(now) / max(float(losses[term][0]), 1e-12) if now is not None else float("nan")


def points(result: dict) -> list[dict]:
    """Mean ± sd over seeds for every (style, setting, step) with all its seeds' runs done, plus
    the base model (step 0) per style."""
    out = []
    groups: dict = {}
    for rid, run in result["runs"].items():
        for step, m in run["points"].items():
            groups.setdefault((run["style"], run["setting"], int(step)), []).append(
                {**m, "denoise_x": denoise_ratio(run, int(step))})
    for (style, setting, step), ms in sorted(groups.items()):
        row = {"target": style, "setting": setting, "family": result.get("families", {}).get(setting, setting),
               "step": step, "n_seeds": len(ms)}
        for k in METRICS:
            if all(k in m for m in ms):
                row[k] = dq.mean_sd([m[k] for m in ms])
        row["denoise_x"] = dq.mean_sd([m["denoise_x"] for m in ms])
        out.append(row)
    for style, per_seed in result.get("base", {}).items():
        ms = list(per_seed.values())
        row = {"target": style, "setting": "base", "family": "base", "step": 0, "n_seeds": len(ms)}
        for k in METRICS:
            if all(k in m for m in ms):
                row[k] = dq.mean_sd([m[k] for m in ms])
        out.append(row)
    return out


STYLE_BANDS = ((0.3, 0.6), (0.6, 0.85), (0.85, 1.01))


def compare(pts: list[dict]) -> dict:
    """Per target style and style band: for each method family the best diversity and the largest
    shot distance among its (setting, step) points whose mean style lies in the band (None: no point
    there). 'At equal style' is read as 'within the same band'."""
    out: dict = {}
    for style in sorted({p["target"] for p in pts}):
        out[style] = {}
        key = style_key(pts, style)
        for lo, hi in STYLE_BANDS:
            band = {}
            for fam in FAMILIES:
                inside = [p for p in pts if p["target"] == style and p["family"] == fam and key in p
                          and lo <= p[key][0] < hi]
                if inside:
                    best_div = max(inside, key=lambda p: p["diversity"][0])
                    best_far = max(inside, key=lambda p: p["shot_dist"][0])
                    band[fam] = {"diversity": best_div["diversity"], "diversity_at": f"{best_div['setting']}@{best_div['step']}",
                                 "shot_dist": best_far["shot_dist"], "shot_dist_at": f"{best_far['setting']}@{best_far['step']}",
                                 "points": len(inside)}
                else:
                    band[fam] = None
            out[style][f"{lo:.2f}-{min(hi, 1.0):.2f}"] = band
    return out


PAIRED_METRICS = ("diversity", "shot_dist", "kid_target", "content_dist")


def sign_flip_p(diffs, n_random: int = 100_000, seed: int = 0) -> float:
    """Two-sided p of a paired sign-flip permutation test of mean(diffs) = 0: the share of sign
    patterns whose |sum| reaches the observed one (exact up to 16 pairs, else n_random seeded draws).
    No distribution assumed, no scipy."""
    import numpy as np

    d = np.asarray(diffs, dtype=np.float64)
    if len(d) == 0:
        return float("nan")
    if len(d) <= 16:
        signs = 1 - 2 * ((np.arange(2 ** len(d))[:, None] >> np.arange(len(d))) & 1)
    else:
        signs = np.random.default_rng(seed).choice((-1.0, 1.0), size=(n_random, len(d)))
    return float(np.mean(np.abs(signs @ d) >= abs(d.sum()) - 1e-12))


def _paired_stats(diffs) -> dict:
    import numpy as np

    d = np.asarray(diffs, dtype=np.float64)
    sd = float(d.std(ddof=1)) if len(d) > 1 else None
    return {"mean": float(d.mean()), "sd": sd, "n": int(len(d)),
            "n_higher": int((d > 0).sum()), "p": sign_flip_p(d)}


def paired(result: dict, a: str, b: str, metrics=PAIRED_METRICS) -> dict:
    """Setting `b` against setting `a`, seed by seed (the same seed = the same shots order, noise and
    base samples), per target style and step of `b`:

    * same_step: b's metric minus a's at the same step (and the style, how far each moved);
    * equal_style: b's metric minus a's interpolated at b's style along a's own curve (base model,
      then every checkpoint, linear in the style: style_rt where the base has it, as style_key) --
      the paper's claim is about equal style, and a setting that moves less keeps more diversity for
      that reason alone. Seeds where b's style lies outside a's curve are left out (n says how many
      remain).
    * over_steps: per seed, b minus a averaged over the steps both have (one number per run pair:
      less noisy than one checkpoint, which moves by ±0.05–0.1 from step to step on the miniature);
      `per_seed` keeps the differences so that styles can be pooled (pool_over_steps).

    Each entry: mean ± sd of the differences, how many seeds are higher, and the sign-flip p."""
    import numpy as np

    out: dict = {}
    runs = result["runs"]
    for style in sorted({r["style"] for r in runs.values()}):
        seeds = sorted({r["seed"] for r in runs.values() if r["style"] == style and r["setting"] == a}
                       & {r["seed"] for r in runs.values() if r["style"] == style and r["setting"] == b})
        if not seeds:
            continue
        steps = sorted({int(k) for s in seeds for k in runs[run_id(b, style, s)]["points"]})
        key = "style_rt" if all("style_rt" in v for v in result["base"][style].values()) else "style"
        per_step = {}
        for step in steps:
            same = {m: [] for m in (key, *metrics)}
            equal = {m: [] for m in metrics}
            for s in seeds:
                pa, pb = runs[run_id(a, style, s)]["points"], runs[run_id(b, style, s)]["points"].get(str(step))
                if pb is None:
                    continue
                if str(step) in pa:
                    for m in same:
                        same[m].append(pb[m] - pa[str(step)][m])
                curve = [result["base"][style][str(s)]] + [pa[k] for k in sorted(pa, key=int)]
                order = np.argsort([c[key] for c in curve], kind="stable")
                xs = np.array([curve[i][key] for i in order])
                if xs[0] <= pb[key] <= xs[-1]:
                    for m in metrics:
                        equal[m].append(pb[m] - float(np.interp(pb[key], xs, [curve[i][m] for i in order])))
            per_step[str(step)] = {"same_step": {m: _paired_stats(v) for m, v in same.items() if v},
                                   "equal_style": {m: _paired_stats(v) for m, v in equal.items() if v}}
        over = {m: [] for m in (key, *metrics)}
        for s in seeds:
            pa, pb = runs[run_id(a, style, s)]["points"], runs[run_id(b, style, s)]["points"]
            common = sorted(set(pa) & set(pb), key=int)
            if common:
                for m in over:
                    over[m].append(float(np.mean([pb[k][m] - pa[k][m] for k in common])))
        out[style] = {"seeds": seeds, "style_key": key, "steps": per_step,
                      "over_steps": {"per_seed": over, "stats": {m: _paired_stats(v) for m, v in over.items() if v}}}
    return out


def pool_over_steps(res: dict) -> dict:
    """paired()'s over_steps differences of every style together (each style-seed pair is its own
    run pair), per metric; the style metric under the name 'style'."""
    pooled: dict[str, list] = {}
    for r in res.values():
        for m, v in r["over_steps"]["per_seed"].items():
            pooled.setdefault("style" if m == r["style_key"] else m, []).extend(v)
    return {m: _paired_stats(v) for m, v in pooled.items() if v}


def _stat_cells(ms: dict) -> str:
    return "; ".join(f"{m} {v['mean']:+.4f}±{'-' if v['sd'] is None else format(v['sd'], '.4f')} "
                     f"({v['n_higher']}/{v['n']}, p {v['p']:.3f})" for m, v in ms.items())


def print_paired(name: str, res: dict, log=print) -> None:
    log(f"\n{name}, paired by seed (difference mean ± sd, seeds higher, sign-flip p):")
    for style, r in res.items():
        for step, kinds in r["steps"].items():
            for kind, ms in kinds.items():
                cells = _stat_cells(ms) or "no seed's style lies on A's curve"
                log(f"  {style:9s} @{step:>4s} {kind:11s} {cells}")
    rows = [(style, r["over_steps"]["stats"]) for style, r in res.items()] + [("pooled", pool_over_steps(res))]
    for style, ms in rows:
        log(f"  {style:9s} all steps   {_stat_cells(ms)}")


def table(pts: list[dict], log=print) -> None:
    cols = (*METRICS, "denoise_x")
    log(f"{'style':9s} {'setting':18s} {'step':>5s} {'n':>2s} " + " ".join(f"{LABELS[k]:>16s}" for k in cols))
    for p in sorted(pts, key=lambda p: (p["target"], p["setting"] != "base", p["setting"], p["step"])):
        cells = " ".join(f"{p[k][0]:8.4f}±{p[k][1]:<7.4f}" if k in p else f"{'-':>16s}" for k in cols)
        log(f"{p['target']:9s} {p['setting']:18s} {p['step']:5d} {p['n_seeds']:2d} {cells}")


# ---------------------------------------------------------------------------------------------
# the picture (PIL: matplotlib is not a dependency)
# ---------------------------------------------------------------------------------------------

def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font only
        return ImageFont.load_default()


def plot(pts: list[dict], path: str, title: str = "") -> None:
    """One picture: a row per target style; left panel style vs diversity, right panel style vs
    shot distance. A line per setting through its step counts (marker size grows with steps), error
    bars = sd over seeds, the base model as a black square."""
    from PIL import Image, ImageDraw

    styles = [s for s in STYLES if any(p["target"] == s for p in pts)] or sorted({p["target"] for p in pts})
    pw, ph, ml, mr, mt, mb = 520, 360, 70, 20, 40, 55
    legend_h = 120
    width, height = 2 * (pw + ml + mr), len(styles) * (ph + mt + mb) + legend_h + 40
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    f_small, f_mid, f_big = _font(13), _font(15), _font(18)
    d.text((10, 8), title or "Style vs diversity and copying (miniworld, Lite0 features; mean ± sd over seeds)",
           fill="black", font=f_big)
    for r, style in enumerate(styles):
        sk = style_key(pts, style)
        sp = [p for p in pts if p["target"] == style and sk in p]
        for c, (key, label) in enumerate((("diversity", "diversity (intra-cluster, cosine; higher = more varied)"),
                                          ("shot_dist", "distance to the nearest shot (low = copies)"))):
            x0, y0 = c * (pw + ml + mr) + ml, 40 + r * (ph + mt + mb) + mt
            ys = [p[key][0] for p in sp] + [p[key][0] + p[key][1] for p in sp] + [p[key][0] - p[key][1] for p in sp]
            ylo, yhi = (min(ys), max(ys)) if ys else (0.0, 1.0)
            pad = 0.08 * (yhi - ylo or 1.0)
            ylo, yhi = ylo - pad, yhi + pad

            def X(v):
                return x0 + (min(max(v, 0.0), 1.0)) * pw

            def Y(v, ylo=ylo, yhi=yhi, y0=y0):
                return y0 + ph - (v - ylo) / (yhi - ylo) * ph

            d.rectangle([x0, y0, x0 + pw, y0 + ph], outline=(0, 0, 0))
            for t in range(6):
                xv = t / 5
                d.line([X(xv), y0 + ph, X(xv), y0 + ph + 4], fill="black")
                d.text((X(xv) - 10, y0 + ph + 6), f"{xv:.1f}", fill="black", font=f_small)
                yv = ylo + t / 5 * (yhi - ylo)
                d.line([x0 - 4, Y(yv), x0, Y(yv)], fill="black")
                d.text((x0 - 52, Y(yv) - 7), f"{yv:.3f}", fill="black", font=f_small)
                d.line([x0 + 1, Y(yv), x0 + pw - 1, Y(yv)], fill=(235, 235, 235))
            d.text((x0, y0 - 22), f"{dq.bench_module('emoji_styles').TITLES.get(style, style)}: {label}",
                   fill="black", font=f_mid)
            d.text((x0 + pw // 2 - 150, y0 + ph + 24), "style score P(target style)" + (
                ", classifier on VAE round trips" if sk == "style_rt" else ""), fill="black", font=f_small)
            settings = sorted({p["setting"] for p in sp if p["setting"] != "base"})
            for s in settings:
                line = sorted([p for p in sp if p["setting"] == s], key=lambda p: p["step"])
                fam = line[0]["family"]
                col = COLORS.get(fam, (120, 120, 120))
                shade = _shade(col, s, settings, fam, sp)
                line = [p for p in line if sk in p]
                if not line:
                    continue
                xy = [(X(p[sk][0]), Y(p[key][0])) for p in line]
                if len(xy) > 1:
                    d.line(xy, fill=shade, width=2)
                for i, p in enumerate(line):
                    x, y = X(p[sk][0]), Y(p[key][0])
                    ex, ey = p[sk][1] * pw, p[key][1] / (yhi - ylo) * ph
                    d.line([x - ex, y, x + ex, y], fill=_light(shade))
                    d.line([x, y - ey, x, y + ey], fill=_light(shade))
                    rad = 2 + i
                    d.ellipse([x - rad, y - rad, x + rad, y + rad], fill=shade)
            for p in sp:
                if p["setting"] == "base" and sk in p:
                    x, y = X(p[sk][0]), Y(p[key][0])
                    d.rectangle([x - 5, y - 5, x + 5, y + 5], fill=COLORS["base"])
    # legend
    ly = height - legend_h - 10
    settings = sorted({p["setting"] for p in pts if p["setting"] != "base"})
    d.text((ml, ly), "lines: one setting through its step counts (dot size grows with steps: "
           + ", ".join(str(s) for s in sorted({p['step'] for p in pts if p['step']})) + "); black square: base model",
           fill="black", font=f_small)
    for i, s in enumerate(settings):
        fam = next(p["family"] for p in pts if p["setting"] == s)
        col = _shade(COLORS.get(fam, (120, 120, 120)), s, settings, fam, pts)
        x, y = ml + (i % 4) * 260, ly + 24 + (i // 4) * 22
        d.rectangle([x, y + 3, x + 14, y + 13], fill=col)
        d.text((x + 20, y), s, fill="black", font=f_small)
    img.save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


def _shade(col, setting, settings, family, pts):
    """Settings of one family get darker-to-lighter variants of the family colour."""
    same = [s for s in settings if any(p["setting"] == s and p["family"] == family for p in pts)]
    k = same.index(setting) if setting in same else 0
    f = 0.55 + 0.45 * (k / max(1, len(same) - 1)) if len(same) > 1 else 1.0
    return tuple(int(255 - (255 - v) * f) for v in col)


def _light(col):
    return tuple(int(255 - (255 - v) * 0.45) for v in col)


# ---------------------------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, choices=list(GRID))
    ap.add_argument("--styles", nargs="+", default=list(STYLES))
    ap.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    ap.add_argument("--checkpoints", nargs="+", type=int, default=list(CHECKPOINTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=OUT_JSON)
    ap.add_argument("--png", default=None, help="the picture (default: --out with .png, so a part run with its own "
                                                "--out never overwrites bench/results/frontier.png)")
    ap.add_argument("--plot-only", action="store_true", help="redraw the table and the picture from --out")
    ap.add_argument("--plot-settings", nargs="+", default=[], metavar="SETTING",
                    help="draw only these settings (and the base) in the picture; the table and JSON keep all")
    ap.add_argument("--max-runs", type=int, default=0, help="stop after this many new runs (0: all)")
    ap.add_argument("--paired", nargs=2, action="append", default=[], metavar=("A", "B"),
                    help="also compare setting B with setting A seed by seed, at the same step and at equal style "
                         "(repeatable; stored under 'paired' in --out)")
    ap.add_argument("--merge", nargs="*", default=[], metavar="PART.json",
                    help="first take the runs of these results (parts of the sweep run as separate processes, each "
                         "with its own --out); a run already in --out is kept")
    ap.add_argument("--keep-settings", nargs="+", default=[], metavar="SETTING",
                    help="after merging, keep only the runs of these settings (a study of its own out of a larger "
                         "results file)")
    args = ap.parse_args(argv)
    if args.png is None:
        args.png = os.path.splitext(args.out)[0] + ".png"
    result = load(args.out)
    for part in args.merge:
        merge_into(result, load(part))
    if args.keep_settings:
        result["runs"] = {k: r for k, r in result.get("runs", {}).items() if r["setting"] in args.keep_settings}
        result.pop("paired", None)  # comparisons of settings that may be gone; --paired recomputes
    result.setdefault("families", {}).update({s: GRID[s][0] for s in GRID})
    # --paired names are checked before any training: a typo must not surface after an hour's sweep
    have = {r["setting"] for r in result["runs"].values()} | (set() if args.plot_only else set(args.settings))
    for a, b in args.paired:
        for name in (a, b):
            if name not in have:
                raise SystemExit(f"frontier: --paired {a} {b}: {args.out} has no runs of {name!r} and this command "
                                 f"trains none; its settings: {', '.join(sorted(have)) or 'none yet'}")
    if args.plot_only:
        return finish(result, args)

    import torch

    torch.set_num_threads(args.threads)
    steps = max(args.checkpoints)
    extract = dq.bench_module("features").Lite0Features()
    bench = dq.Bench(batch=dq.N_EVAL)
    result["setting"] = {"target_prompt": dq.TARGET_PROMPT, "source_prompt": dq.SOURCE_PROMPT, "steps": steps,
                         "checkpoints": args.checkpoints, "samples": dq.N_EVAL, **bench.describe(),
                         "grid": {s: {"family": GRID[s][0], "method": GRID[s][1].method, "config": GRID[s][1].config,
                                      "options": GRID[s][1].options,
                                      **({"timesteps": list(GRID[s][1].timesteps)} if GRID[s][1].timesteps else {})}
                                  for s in GRID}}
    worlds: dict = {}
    # seed-major order: a sweep stopped early still has every setting on the first seeds
    todo = [(seed, style, s) for seed in args.seeds for style in args.styles for s in args.settings
            if run_id(s, style, seed) not in result["runs"]]
    print(f"frontier: {len(todo)} runs to do ({len(result['runs'])} done), {steps} steps each, samples at "
          f"{args.checkpoints}", flush=True)
    new = 0
    for seed, style, s in todo:
        if args.max_runs and new >= args.max_runs:
            break
        if style not in worlds:
            worlds[style] = dq.World(style, extract, roundtrip=bench.roundtrip)
            result.setdefault("worlds", {})[style] = worlds[style].describe()
        world = worlds[style]
        base = result.setdefault("base", {}).setdefault(style, {})
        if str(seed) not in base:
            base[str(seed)] = world.score(bench.sample(bench.model, world.prompts, seed=seed))
            save(result, args.out)
        family, recipe = GRID[s]
        t0 = time.perf_counter()
        pts: dict = {}
        sample_s = [0.0]

        def on_checkpoint(step, model, pts=pts, world=world, seed=seed):
            t1 = time.perf_counter()
            pts[str(step)] = world.score(bench.sample(model, world.prompts, seed=seed))
            sample_s[0] += time.perf_counter() - t1

        try:
            info = bench.train(recipe, world.training_set(), seed=seed, steps=steps, checkpoints=args.checkpoints,
                               on_checkpoint=on_checkpoint)
        except Exception as e:  # noqa: BLE001 - a diverged setting is a result too
            print(f"  {run_id(s, style, seed)}: failed: {e}", flush=True)
            result.setdefault("failed", {})[run_id(s, style, seed)] = str(e)
            save(result, args.out)
            continue
        result["runs"][run_id(s, style, seed)] = {
            "setting": s, "family": family, "style": style, "seed": seed, "points": pts, "train_s": info["train_s"],
            "seconds_per_step": info["seconds_per_step"], "sample_s": round(sample_s[0], 1), "losses": info["losses"],
            "loss_at": info["loss_at"],
            "wall_s": round(time.perf_counter() - t0, 1)}
        save(result, args.out)
        new += 1
        last = pts[str(steps)]
        print(f"  {run_id(s, style, seed):32s} {info['train_s']:6.0f} s train + {sample_s[0]:4.0f} s sampling; at "
              f"{steps}: style {last['style']:.3f} diversity {last['diversity']:.4f} shot dist {last['shot_dist']:.4f}",
              flush=True)
    return finish(result, args)


def finish(result: dict, args) -> int:
    pts = points(result)
    table(pts)
    cmp_ = compare(pts)
    print("\nAt equal style (best point of each family inside a style band; diversity ↑, shot distance ↑):")
    for style, bands in cmp_.items():
        for band, fams in bands.items():
            cells = []
            for fam, v in fams.items():
                cells.append(f"{fam} " + ("-" if v is None else f"div {v['diversity'][0]:.3f} ({v['diversity_at']}), "
                                                              f"dist {v['shot_dist'][0]:.3f}"))
            print(f"  {style:9s} style {band}: " + "; ".join(cells))
    for a, b in args.paired:
        res = paired(result, a, b)
        print_paired(f"{b} vs {a}", res)
        result.setdefault("paired", {})[f"{b} vs {a}"] = res
    result["points"] = pts
    result["compare"] = cmp_
    result["style_keys"] = {style: style_key(pts, style) for style in cmp_}
    save(result, args.out)
    shown = [p for p in pts if not args.plot_settings or p["setting"] in ("base", *args.plot_settings)]
    if shown:
        plot(shown, args.png)
        print(f"wrote {args.out} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
