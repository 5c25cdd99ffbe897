"""The main job (README): adapt the miniature emoji SD (miniworld/, trained here on Google's Noto
emoji) to 10 shots of another emoji style on the CPU, with DomainStudio and with plain fine-tuning,
first with each method's default settings (what a first run with only images and prompts gets), then
DomainStudio on the whole noise schedule (the default until 2026-12-05) and fine-tuning trained twice as long, and
show them next to the untouched base model on the same seeds.

    bash scripts/demo.sh                      # set-up + this script; results in demo_output/
    bash scripts/demo.sh --style openmoji     # the other target style (OpenMoji SVGs via resvg-py)

Training: the 10 shots, each captioned with its emoji's name, as "a sks emoji of <name>" (the frozen
source model sees "an emoji of <name>"). Then every model draws "a sks emoji of <name>" for 24 other
emoji from the same noise. It writes to --out (demo_output/):
  samples.png   labelled rows: the shots; the real target-style and Noto renderings of 12 of the 24
                emoji; then base / fine-tune / DomainStudio at the defaults / DomainStudio on the
                whole schedule / fine-tune for twice the default steps (column i
                of every model row starts from the same noise and names the same emoji)
  metrics.json  style score, diversity, distance to the shots, content distance and KID per model
                (bench/domain_quality.py's World: EfficientNet-Lite0 features), timings, settings
  summary.md    what to look for, the numbers, and what they can and cannot say
Everything runs through the pack's core (trainer.run.run on a ComfyHost) and ComfyUI's stock
sampler; bench/domain_quality.py and bench/frontier.py measure the same things over more seeds.

`--workflow` instead runs an example workflow (example_workflows/api/<--example>.json, or all of
them) in a real ComfyUI server on the tiny random test model, with only sizes and step counts made
small (proves the in-graph pipeline; its samples are noise); --steps counts each training stage.
Needs COMFYUI_DIR (scripts/demo.sh sets it).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import runpy
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
runpy.run_path(os.path.join(REPO, "__init__.py"))  # the pack, as comfyui_domainstudio

N_SHOWN = 12  # evaluation emoji shown in the grid (all 24 are scored)
WHOLE_SCHEDULE = {"min_timestep": 0, "max_timestep": 1000}  # the default until 2026-12-05 (now max_timestep 500)


def _package():
    """The pack's one package name (comfyui_domainstudio), registered by the repository's __init__.py."""
    runpy.run_path(os.path.join(REPO, "__init__.py"))


def build_checkpoint(comfy_dir: str, cache: str) -> str:
    """The tiny checkpoint, built by a child process that imports ComfyUI on the CPU."""
    import subprocess

    _package()
    from comfyui_domainstudio.testing import tiny_models

    path = os.path.join(cache, f"tiny-v{tiny_models.TINY_VERSION}-demo", "checkpoints", "tiny_sd15.safetensors")
    if not os.path.exists(path):
        code = (
            f"import sys, runpy; sys.path.insert(0, {comfy_dir!r}); runpy.run_path({os.path.join(REPO, '__init__.py')!r});"
            "import comfy.cli_args; comfy.cli_args.args.cpu = True;"
            "from comfyui_domainstudio.testing import tiny_models;"
            f"tiny_models.build_sd15_checkpoint({path!r})"
        )
        subprocess.run([sys.executable, "-c", code], check=True)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--style", default="twitter", help="target style: twitter (Twemoji) or openmoji")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: each method's default; "
                    "--workflow: 30 per stage)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    ap.add_argument("--out", default=os.path.join(REPO, "demo_output"))
    ap.add_argument("--workflow", action="store_true", help="run an example workflow in a ComfyUI server instead")
    ap.add_argument("--example", default="domainstudio_text",
                    help="--workflow: the example_workflows/ name to run (domainstudio_text, domainstudio_unconditional, "
                    "personalize_rare_token, personalize_textual_inversion, personalize_dreambooth, load_weights) "
                    "or 'all' (default: domainstudio_text)")
    args = ap.parse_args()
    if not os.environ.get("COMFYUI_DIR"):
        sys.exit("COMFYUI_DIR is not set: run `bash scripts/demo.sh`")
    if args.workflow:
        args.steps = args.steps or 30
        return run_workflow(args)
    return run_demo(args)


@contextlib.contextmanager
def phase(name: str, log):
    """A line when a phase starts and when it ends, with its time (phases without a bar of their own)."""
    t = time.perf_counter()
    log(f"{name} ...")
    yield
    log(f"{name}: done in {time.perf_counter() - t:.0f} s")


def run_demo(args) -> int:
    from tqdm import tqdm

    t_start = time.perf_counter()

    def log(msg):
        tqdm.write(f"[demo {time.perf_counter() - t_start:5.0f} s] {msg}")

    spec = importlib.util.spec_from_file_location("bench_domain_quality", os.path.join(REPO, "bench", "domain_quality.py"))
    dq = importlib.util.module_from_spec(spec)
    sys.modules["bench_domain_quality"] = dq
    spec.loader.exec_module(dq)
    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    styles = dq.bench_module("emoji_styles")
    from comfyui_domainstudio.miniworld import build

    with phase("the miniature emoji SD (built into the cache on first use)", log):
        ckpt = build.ensure()
    with phase(f"emoji images: Noto and {styles.TITLES.get(args.style, args.style)} (npm, fetched once)", log):
        styles.load("google")
        styles.load(args.style)
    features = dq.bench_module("features")
    lite0 = features.Lite0Features()

    def extract(images):
        """Lite0 features with a bar when there are many images (the real renderings, once)."""
        if len(images) <= 64:
            return lite0(images)
        out = []
        with tqdm(total=len(images), desc="Lite0 features of the real renderings (cached)", unit="img",
                  dynamic_ncols=True) as bar:
            for i in range(0, len(images), 64):
                out.append(lite0(images[i:i + 64]))
                bar.update(len(out[-1]))
        return np.concatenate(out)

    with phase("loading the checkpoint into ComfyUI (CPU)", log):
        bench = dq.Bench(ckpt, batch=dq.N_EVAL)
    world = dq.World(args.style, extract, log=log, roundtrip=bench.roundtrip)
    os.makedirs(args.out, exist_ok=True)
    # The defaults (bench/frontier.py chose them: the style moves, diversity stays), then two ways
    # they were chosen against: DomainStudio trained on the whole noise schedule (the style moves
    # less) and fine-tuning trained twice as long (no further, less diverse).
    recipes = {"base": (dq.RECIPES["base"], 1), "fine-tune": (dq.RECIPES["finetune"], 1),
               "DomainStudio": (dq.RECIPES["domainstudio"], 1),
               "DomainStudio, whole schedule": (dq.Recipe("domainstudio", {}, WHOLE_SCHEDULE,
                                                          note="max_timestep 1000: every noise level"), 1),
               "fine-tune, 2x steps": (dq.RECIPES["finetune"], 2)}
    models, info = {}, {}
    for label, (recipe, times) in recipes.items():
        if recipe.method is None:
            models[label] = bench.model
            continue
        steps = times * (args.steps or recipe.settings(None, args.seed)[0].steps)
        cfg, opts = recipe.settings(steps, args.seed)
        with tqdm(total=cfg.steps, desc=f"training {label}", unit="step", dynamic_ncols=True) as bar:
            def on_progress(p, bar=bar):
                if p.stage == "class images":
                    return
                if p.losses:
                    bar.set_postfix_str(" ".join(f"{k} {v:.3g}" for k, v in list(p.losses.items())[:4]))
                bar.update(max(0, p.stage_step - bar.n))

            got = {}
            res = bench.train(recipe, world.training_set(), seed=args.seed, steps=steps,
                              on_checkpoint=lambda step, m: got.update(model=m), on_progress=on_progress)
        models[label] = got["model"]
        info[label] = {"method": recipe.method, "train_s": res["train_s"], "steps": res["steps"],
                       "seconds_per_step": res["seconds_per_step"], "losses_first_last_50": res["losses"],
                       "settings": dict(vars(cfg)),
                       "options": {k: getattr(opts, k) for k in ("train_mode", "lora_rank", "lora_alpha", "precision",
                                                                 "min_timestep", "max_timestep")}}
        log(f"{label}: {res['steps']} steps in {res['train_s']:.0f} s")
    samples, rows = {}, {}
    n_steps = bench.sample_steps * -(-len(world.prompts) // bench.batch) * len(models)  # a step per batch
    with tqdm(total=n_steps, desc="sampling (stock euler, 20 steps, CFG 5)", unit="step", dynamic_ncols=True) as bar:
        for label, model in models.items():
            start = bar.n
            samples[label] = bench.sample(model, world.prompts, seed=args.seed,
                                          progress=lambda k, b=start: bar.update(b + k - bar.n))
    with phase("scoring (Lite0 features)", log):
        for label, images in samples.items():
            rows[label] = world.score(images)
    title = styles.TITLES.get(args.style, args.style)
    k = N_SHOWN
    grid = dq.labelled_rows([(world.shots, f"{title} shots"), (world.eval_target[:k], f"{title} (real)"),
                             (world.eval_source[:k], "Noto (real)")]
                            + [(samples[m][:k], m) for m in models], label_width=150)
    dq.save_png(dq.to_uint8(grid)[0], os.path.join(args.out, "samples.png"))
    wall = time.perf_counter() - t_start
    metrics = {"style": args.style, "seed": args.seed, "target_prompt": dq.TARGET_PROMPT,
               "source_prompt": dq.SOURCE_PROMPT, "prompts": world.prompts, "shown": world.eval_names[:k],
               "models": rows, "training": info, "world": world.describe(), "sampling": bench.describe(),
               "wall_s": round(wall, 1)}
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1, default=str)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(summary_md(metrics, title))
    log(f"wrote samples.png, metrics.json and summary.md in {args.out}")
    print("\n" + table_md(rows))
    print(f"\ndemo done in {wall:.0f} s; open {os.path.join(args.out, 'summary.md')}")
    return 0


def table_md(rows: dict) -> str:
    lines = ["| model | style (VAE space) ↑ | style score ↑ | diversity ↑ | distance to shots ↑ | content distance ↓ "
             "| KID to target ↓ |",
             "|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r.get('style_rt', float('nan')):.2f} | {r['style']:.2f} | {r['diversity']:.3f} | "
                     f"{r['shot_dist']:.3f} | {r['content_dist']:.3f} | {r['kid_target']:.3f} |")
    return "\n".join(lines)


# What bench/frontier.py found at the defaults on the shipped miniworld weights (README, Defaults), per
# target style, over seeds 0-4 at 200 steps (bench/results/frontier_gpu_timesteps.json: the defaults
# train on timesteps below 500 since 2026-12-05). One seed, the demo's, varies around these.
EXPECT = {
    "twitter": "over 5 seeds (`bench/frontier.py`, README \"Defaults\"), DomainStudio moves the style in VAE\n"
               "  space from about 0.35 to 0.48 in 200 steps (of round-tripped Twemoji's 0.77), seen as warmer, more\n"
               "  saturated fills with harder edges, not yet Twemoji's flat look, and keeps the base's diversity\n"
               "  (0.46 vs 0.46) and nearly its KID to Twemoji (0.12 vs 0.10); fine-tuning moves less (0.42) and\n"
               "  loses diversity (0.38) and drifts (KID 0.16).",
    "openmoji": "over 5 seeds (`bench/frontier.py`), DomainStudio moves the style in VAE space from about\n"
                "  0.10 to 0.31 in 200 steps with a lower KID to OpenMoji than fine-tuning (0.18 vs 0.21), which\n"
                "  moves further (0.35); neither keeps the base's diversity (0.40 and 0.43 vs 0.46).",
}
# DomainStudio on the whole schedule (the default until 2026-12-05), same seeds and steps
WHOLE = {
    "twitter": "0.42 over 5 seeds against 0.48, with the same diversity and KID",
    "openmoji": "0.27 over 5 seeds against 0.31; it keeps a little more diversity there, 0.42 vs 0.40",
}


def _ref(m: dict, name: str, key: str = "style_rt") -> str:
    v = m["world"].get("reference", {}).get(name, {}).get(key)
    return "n/a" if v is None else f"{v:.2f}"


def summary_md(m: dict, title: str) -> str:
    tr = m["training"]
    steps = ", ".join(f"{k} {v['steps']} steps ({v['train_s']:.0f} s)" for k, v in tr.items())
    ds = tr.get("DomainStudio", {}).get("settings", {})
    ds_opts = tr.get("DomainStudio", {}).get("options", {})
    return f"""# DomainStudio demo: Noto emoji -> {title}

The miniature SD (`miniworld/`, trained here on Google's Noto emoji) was adapted to the 10 {title}
shots in the first row of `samples.png`, each captioned with its emoji's name
("{m['target_prompt']}"; the frozen source model reads "{m['source_prompt']}"), once with **plain
fine-tuning** and with **DomainStudio**, first at each method's default settings, then DomainStudio
on the whole noise schedule and fine-tuning for twice the steps ({steps}; seed {m['seed']}). Every model then drew "a sks emoji of <name>" for 24 emoji that are not shots,
from the same noise: in `samples.png` column *i* of every model row names the same emoji and starts
from the same noise, so differences between rows are the adaptation.

## What to look for in `samples.png`
- rows 2-3 are the real {title} and Noto renderings of the emoji the columns name: the target is
  "row 2's look with row 3's content".
- *base*: the source style (Noto-like: glossy, shaded), drawn as well as this miniature can.
- *fine-tune* and *DomainStudio* at the defaults ({ds.get('steps')} steps, lr {ds.get('learning_rate')},
  {ds_opts.get('train_mode')} LoRA, timesteps below {ds_opts.get('max_timestep')} of 1000; DomainStudio's lambdas {ds.get('lambda_img')} / {ds.get('lambda_hf')} / {ds.get('lambda_hfmse')}): {EXPECT.get(m['style'], EXPECT['twitter'])}
- *DomainStudio, whole schedule* (max_timestep 1000, the default until 2026-12-05): the same training on
  every noise level instead of the cleaner half; over seeds the style moves less far ({WHOLE.get(m['style'], '')}).
- *fine-tune, 2x steps*: more training moves the style further; watch the distance to the shots and
  the content distance (a heart or a WC sign where a penguin was asked for is copying, the failure
  DomainStudio's paper addresses). README, "Defaults", has the same comparison over seeds.

## Numbers (EfficientNet-Lite0 features; 24 samples per model, one seed)
{table_md(m['models'])}

- *style (VAE space)*: P({title}) of a logistic-regression classifier trained on real Noto vs {title}
  renderings after a round trip through the miniature's own VAE (what the model can draw at best:
  round-tripped {title} scores {_ref(m, 'roundtrip_target_eval')}, round-tripped Noto
  {_ref(m, 'roundtrip_source_eval')}). *style score*: the same classifier trained on the real renderings
  (accuracy on held-out real renderings {m['world']['classifier_accuracy_real']:.2f}); the VAE round trip
  alone takes real {title} from {_ref(m, 'real_target_eval', 'style')} to
  {_ref(m, 'roundtrip_target_eval', 'style')} on it, so it compresses what a miniature can show.
- *diversity*: intra-cluster diversity (samples grouped by nearest shot, mean pairwise cosine distance
  inside a group; 0 = copies of the shots). *distance to shots*: mean cosine distance from each sample
  to its nearest shot (low = copying). *content distance*: each sample to the real {title} rendering of
  the emoji it names (low = right emoji in the right style). *KID*: to the real {title} renderings; a
  high style score with a KID above the base model's is degradation, not style.

## What this can and cannot say
One seed and 24 samples: differences of a few hundredths are noise (the seed-to-seed sd in
`bench/results/frontier.json` is of that size). The model is a miniature (13.9 M trained parameters, 1,252
emoji), its samples are blurry 64x64 emoji, and the features are an ImageNet network's, not LPIPS or Inception.
`bench/frontier.py` sweeps steps, learning rates and DomainStudio's weights (`bench/results/frontier.json`
and `.png`; README says how many seeds and styles it covers so far): read it for whether DomainStudio
keeps more diversity than fine-tuning *at equal style*, which one seed of two default runs cannot show.

DomainStudio settings used: lambda_img {ds.get('lambda_img')}, lambda_hf {ds.get('lambda_hf')},
lambda_hfmse {ds.get('lambda_hfmse')}, feature space {ds.get('feature_space')}, learning rate
{ds.get('learning_rate')}, batch {ds.get('batch_size')}. Total time {m['wall_s']:.0f} s.
"""


def run_workflow(args) -> int:
    """Run example workflow(s) from example_workflows/api/ in a real ComfyUI server on the tiny
    model, with only the values testing/examples.py `tiny_changes` lists made small; copy what they
    made (samples of the trained and the base model, previews, weight files) into --out."""
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        sys.exit("COMFYUI_DIR is not set: run `bash scripts/demo.sh`")
    cache = os.environ.get("DS_CACHE") or os.path.expanduser("~/.cache/comfyui-domainstudio")
    _package()
    from comfyui_domainstudio.testing import examples as ex
    from comfyui_domainstudio.testing.comfy_server import ComfyServer

    if args.example != "all" and args.example not in ex.EXAMPLES:
        sys.exit(f"--example {args.example!r}: choose one of {', '.join(ex.EXAMPLES)} or 'all'")
    names = list(ex.EXAMPLES) if args.example == "all" else [args.example]
    if "load_weights" in names and "personalize_rare_token" not in names:
        names.insert(names.index("load_weights"), "personalize_rare_token")  # it loads what that one writes
    ckpt = build_checkpoint(comfy_dir, cache)
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    base = os.path.join(args.out, "comfy_base")
    os.makedirs(base)
    srv = ComfyServer(comfy_dir, base, REPO, {"checkpoints": os.path.dirname(ckpt)})
    t0 = time.time()
    srv.start()
    print(f"ComfyUI up on {srv.url} in {time.time() - t0:.1f} s")
    written: dict[str, list[str]] = {"loras": [], "embeddings": []}
    try:
        for name in names:
            example = ex.EXAMPLES[name]
            ex.write_inputs(os.path.join(base, "input"), example, n=8 if example.kind == "domain" else 4)
            wf = ex.api(name)
            wf = ex.apply_api(wf, ex.tiny_changes(wf, steps=args.steps, preview_every=max(1, args.steps // 3)))
            if example.kind == "load":
                if not (written["loras"] and written["embeddings"]):
                    print(f"{name}: skipped, the rare-token example wrote no files", file=sys.stderr)
                    return 1
                delta = next(f for f in written["loras"] if f.startswith("subject_"))
                embedding = next(f for f in written["embeddings"] if f.startswith("ds_subject"))
                wf = ex.apply_api(wf, {"14": {"file": f"loras/{delta}"}, "15": {"file": f"embeddings/{embedding}"}})
                word = os.path.splitext(embedding)[0]
                wf["4"]["inputs"]["text"] = wf["4"]["inputs"]["text"].replace("embedding:ds_subject", f"embedding:{word}")
            before = {k: ex.model_files(srv, k) for k in written}
            print(f"{name}: training {args.steps} steps per stage ..." if example.trainer else f"{name}: loading ...")
            t1 = time.time()

            def show(msg, node=example.trainer):
                d = msg.get("data") or {}
                if msg["type"] == ex.EVENT and str(d.get("node")) == node and d.get("status") == "running" \
                        and (d["step"] % 10 == 0 or d["step"] == d["total"]):
                    print(f"  {d.get('stage', '')} step {d['step']}/{d['total']}  ({time.time() - t1:.1f} s)")

            r = ex.run(srv, wf, timeout=3600, on_message=show)
            if r.errors():
                print(r.error_text(), file=sys.stderr)
                return 1
            out_dir = os.path.join(args.out, name)
            os.makedirs(out_dir)
            for node, label in ((example.adapted, "trained" if example.trainer else "loaded"), (example.base, "base")):
                for i, im in enumerate(srv.outputs(r.prompt_id)[node]["images"]):
                    shutil.copy(srv.output_file(im), os.path.join(out_dir, f"{label}_{i}.png"))
            for i, frame in enumerate(f for f in r.previews if f["event"] == 1):
                with open(os.path.join(out_dir, f"preview_{i}.{'png' if frame['format'] == 2 else 'jpg'}"), "wb") as f:
                    f.write(frame["data"])
            for kind in written:
                for f in sorted(ex.model_files(srv, kind) - before[kind]):
                    written[kind].append(f)
                    shutil.copy(os.path.join(base, "models", kind, f), os.path.join(out_dir, f))
            print(f"{name}: done in {time.time() - t1:.1f} s -> {out_dir}: {', '.join(sorted(os.listdir(out_dir)))}")
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
