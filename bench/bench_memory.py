"""Benchmark: training memory and speed on real-size SD1.5 and SDXL UNets, side by side:

  builtin    ComfyUI's own "Train LoRA" node (comfy_extras/nodes_train.py), LoRA rank 8, batch 1 and 4
  diffusers  a diffusers reference step (UNet2DConditionModel, eager): peft LoRA r8 and full fine-tuning
  ours       this pack's trainers: DomainStudio (batch 4, frozen source pass), rare-token token stage and
             UNet stage, DreamBooth with prior (LoRA r8 and full)

each with gradient checkpointing off and on. Prints a table and writes JSON (bench/results/). Per row:
s/step (median of the timed steps after the warm-up), peak memory above the loaded weights, and both
as a ratio to the built-in node's row with the same checkpointing setting (and the same batch size
when the node was run at it, else batch 1). Never a unit test: tests/test_bench_memory.py only runs
--quick and checks the fields.

How it measures. Every row runs in a FRESH process (bench/memory_rows.py). It builds the weights the
row needs -- random, seeded, bf16, created on the device without an fp32 copy (the diffusers full
fine-tune keeps fp32 weights, as diffusers' train_text_to_image.py does) -- then takes the baseline:
CPU: resident set size after the weights are built (freed heap handed back with malloc_trim), and
resets the kernel's high-water mark (echo 5 > /proc/self/clear_refs); peak = VmHWM after the last
step. CUDA: torch.cuda.memory_allocated / max_memory_allocated. "peak above weights" therefore counts
everything training adds: adapters or deltas, gradients, optimiser state, activations, copies.
The architectures are the real ones: ComfyUI's own model config (comfy.supported_models.SD15 / SDXL,
as ComfyUI detects it from the published diffusers UNet config; see memory_rows.py) and the diffusers
UNet2DConditionModel from that same config (equal parameter counts are recorded). Text encoders are
not part of the UNet rows: conditioning is random tensors of the right shapes (77x768; SDXL 77x2048 +
pooled 1280 and size entries = the 2816-wide `y`). Our trainers encode prompts themselves, so they
get a ComfyUI CLIP cut to 1 layer (SD1) / 3 layers (SDXL) with the real output shapes -- except the
rare-token token stage, which backpropagates through the text encoder and so gets the real-size
CLIP-L (SDXL: CLIP-L + CLIP-G), random init. Training images go through ComfyUI's TAESD (2.4 M params).

Memory safety (CPU). Before each row the estimated need (weights + trainable state + an activation
estimate) is compared with MemAvailable (what `free` reports as available); a row that cannot fit is
recorded as "skipped: would need ~X GiB". While a row runs, a watchdog kills it (its own process
group) when available memory falls below --min-free-gib and records the size it had reached.

Run (CPU, shared machine: one thread, low priority):
    eval "$(bash .ci/setup.sh | tail -2)"
    OMP_NUM_THREADS=1 nice -n 10 $DS_VENV/bin/python bench/bench_memory.py --family sd15 --res 256
    $DS_VENV/bin/python bench/bench_memory.py --family sdxl --res 512 --rows builtin,ours --dry-run
    $DS_VENV/bin/python bench/bench_memory.py --quick            # tiny twins, seconds (the smoke test)
Options: --rows builtin,diffusers,ours or row ids (builtin_b1, ours_dreambooth_full, ...), --checkpointing
off,on, --steps (timed) / --warmup, --out, --ours-option name=value (passed to our trainer functions,
e.g. a memory choice; a function that lacks the keyword makes the row "skipped").

On a CUDA machine (`--device cuda`: SD1.5 at 512^2, SDXL at 1024^2 by default). With only torch
installed and no internet, carry a wheelhouse made on a machine with internet, for the target's
Python version and platform:
    pip download -d wheels --only-binary :all: --python-version 3.11 --platform manylinux2014_x86_64 \
        -r $COMFYUI_DIR/requirements.txt diffusers peft requests      # then delete torch*/nvidia* wheels
and the ComfyUI tree itself ($COMFYUI_DIR, from .ci/setup.sh). On the target:
    pip install --no-index --find-links wheels -r ComfyUI/requirements.txt diffusers peft requests
    COMFYUI_DIR=$PWD/ComfyUI python bench/bench_memory.py --device cuda
ComfyUI's requirements bring transformers, tokenizers, safetensors, einops, torchsde, etc. (its CLIP
tokenizer and model code need them); diffusers brings huggingface_hub; peft brings accelerate.
Nothing is downloaded at run time (no weights exist; the CLIP tokenizer files ship with ComfyUI).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import memory_rows  # noqa: E402  (imports torch only; ComfyUI/diffusers are imported in the row processes)

GiB = 2**30

# --- memory estimate (CPU pre-check; the watchdog catches what it misses) ------------------------
UNET_PARAMS = {"sd15": 859.52e6, "sdxl": 2567.46e6}  # the real architectures (checked in every row)
TEXT_ENCODER_PARAMS = {"sd15": {"full": 123.06e6, "cut": 45.7e6}, "sdxl": {"full": 817.6e6, "cut": 254.0e6}}
# Activations kept for backward per image at 512^2, bf16, no checkpointing (GiB), when only attention
# layers (or token vectors) train; scaled with the pixel count. Training every layer keeps every
# layer's input (x ALL_LAYERS_FACTOR); checkpointing keeps ~CHECKPOINTING_FACTOR of it. Rough, from
# bench/results/memory_cpu.json (SD1.5 256^2, ComfyUI 0.3.75 sub-quadratic attention on the CPU:
# ours LoRA attention ~0.8 GiB above the weights at batch 1, the built-in node ~1.9 GiB per image
# plus a bf16 copy of the weights); the SDXL value is a guess until measured.
ACTIVATION_GIB_512 = {"sd15": 3.2, "sdxl": 4.5}
ALL_LAYERS_FACTOR = 2.5
CHECKPOINTING_FACTOR = 0.35
PROCESS_OVERHEAD_GIB = 1.0  # python + torch + ComfyUI / diffusers imports


def estimate_gib(row: memory_rows.Row, family: str, resolution: int, checkpointing: bool,
                 ours_options: dict | None = None) -> dict:
    p = UNET_PARAMS[family]
    weights = p * (4 if (row.kind == "diffusers" and row.trains == "full") else 2)
    if row.kind == "ours":
        weights += TEXT_ENCODER_PARAMS[family]["full" if row.full_text_encoder else "cut"] * 2
    state = 0.3 * GiB
    if row.trains == "full":
        # ours: fp32 delta + grad + 2 AdamW moments (Adafactor: factored moments, ~nothing);
        # diffusers: fp32 grad + 2 moments + autocast's bf16 weight cache
        optimizer = (ours_options or {}).get("optimizer", "adamw")
        factored = optimizer == "adafactor" or (optimizer == "auto" and checkpointing)
        state = p * ((8 if factored else 16) if row.kind == "ours" else 14)
    elif row.kind == "builtin":
        # LoRA on every layer: each patched bf16 weight is saved for backward (recomputed when checkpointing)
        state += p * 2 * (0.2 if checkpointing else 1.0)
    act = (ACTIVATION_GIB_512[family] * GiB * row.batch * row.samples_per_step * (resolution / 512) ** 2
           * (ALL_LAYERS_FACTOR if (row.kind == "builtin" or row.trains == "full") else 1.0)
           * (CHECKPOINTING_FACTOR if checkpointing else 1.0))
    total = PROCESS_OVERHEAD_GIB * GiB + weights + state + act
    return {k: round(v / GiB, 2) for k, v in
            {"weights": weights, "trainable_state": state, "activations": act, "total": total}.items()}


def mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GiB
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def process_rss_gib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / GiB
    except OSError:
        pass
    return 0.0


# --- running one row --------------------------------------------------------------------------------

def run_row(spec: dict, workdir: str, min_free_gib: float, timeout_s: float, watch_memory: bool) -> dict:
    """Run one measurement in a fresh process with the memory watchdog; returns the result dict."""
    name = f"{spec['family']}_{spec['resolution']}_{spec['row']}_{'ckpt' if spec['checkpointing'] else 'nockpt'}"
    spec_path = os.path.join(workdir, name + ".spec.json")
    result_path = os.path.join(workdir, name + ".result.json")
    log_path = os.path.join(workdir, name + ".log")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    t0 = time.time()
    stopped = None
    max_rss = 0.0
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "memory_rows.py"), spec_path, result_path],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
        try:
            while proc.poll() is None:
                time.sleep(0.2)
                rss = process_rss_gib(proc.pid)
                max_rss = max(max_rss, rss)
                if watch_memory and mem_available_gib() < min_free_gib:
                    stopped = ("memory", rss)
                elif time.time() - t0 > timeout_s:
                    stopped = ("time", rss)
                if stopped:
                    os.killpg(proc.pid, signal.SIGKILL)  # the row's own process group (start_new_session)
                    proc.wait()
        except BaseException:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise
    wall = time.time() - t0
    if stopped:
        baseline = _read_float(result_path + ".baseline")
        if stopped[0] == "memory":
            above = (f"{stopped[1] - baseline / GiB:.1f} GiB above the weights" if baseline
                     else f"{stopped[1]:.1f} GiB RSS")
            return {"status": "skipped", "wall_s": wall, "reason": (
                f"would need more than {stopped[1]:.1f} GiB: stopped at {above} when available memory fell "
                f"below {min_free_gib} GiB")}
        return {"status": "failed", "wall_s": wall, "reason": f"timed out after {timeout_s:.0f} s"}
    if not os.path.exists(result_path):
        with open(log_path) as f:
            tail = f.read()[-1500:]
        return {"status": "failed", "wall_s": wall,
                "reason": f"row process exited with code {proc.returncode} and no result; log tail: {tail}"}
    with open(result_path) as f:
        result = json.load(f)
    result["wall_s"] = wall
    result["process_max_rss_gib_sampled"] = max_rss
    return result


def _read_float(path: str) -> float:
    try:
        with open(path) as f:
            return float(f.read().strip())
    except (OSError, ValueError):
        return 0.0


# --- table ------------------------------------------------------------------------------------------

def add_ratios(rows: list[dict]) -> None:
    """ratio_* = this row / the built-in node's row (same family, resolution, checkpointing; same
    batch if measured, else batch 1)."""
    ok = {(r["family"], r["resolution"], r["checkpointing"], r["batch"]): r for r in rows
          if r["kind"] == "builtin" and r.get("status") == "ok"}
    for r in rows:
        key = (r["family"], r["resolution"], r["checkpointing"])
        ref = ok.get(key + (r["batch"],)) or ok.get(key + (1,))
        r["builtin_ref"] = ref["row"] if ref else None
        if ref and r.get("status") == "ok":
            r["ratio_s_per_step_vs_builtin"] = r["s_per_step"] / ref["s_per_step"]
            r["ratio_peak_vs_builtin"] = (r["peak_above_weights_gib"] / ref["peak_above_weights_gib"]
                                          if ref["peak_above_weights_gib"] > 0 else None)
        else:
            r["ratio_s_per_step_vs_builtin"] = r["ratio_peak_vs_builtin"] = None


def unet_params(rows: list[dict]) -> dict:
    """{family: {"comfyui": n, "diffusers": n}}: the UNet parameter counts each host's rows built."""
    out: dict = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("unet_params"):
            host = "diffusers" if r["kind"] == "diffusers" else "comfyui"
            out.setdefault(r["family"], {})[host] = r["unet_params"]
    return out


def format_table(rows: list[dict], device: str) -> str:
    def num(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    head = (f"{'model':5s} {'res':>5s} {'row':52s} {'ckpt':>4s} {'batch':>5s} {'s/step':>8s} {'x node':>6s} "
            f"{'peak>w GiB':>10s} {'x node':>6s} {'weights':>7s}  status")
    lines = [f"Training memory and speed ({device}; peak = memory above the loaded weights; x node = ratio to "
             f"ComfyUI's Train LoRA row, same checkpointing)", head, "-" * len(head)]
    for r in rows:
        status = r.get("status", "?")
        if status != "ok":
            status = f"{status}: {r.get('reason', '')}"[:110]
        lines.append(
            f"{r['family']:5s} {r['resolution']:5d} {r['label'][:52]:52s} {'on' if r['checkpointing'] else 'off':>4s} "
            f"{r['batch']:5d} {num(r.get('s_per_step'), '8.3f'):>8s} "
            f"{num(r.get('ratio_s_per_step_vs_builtin'), '6.2f'):>6s} "
            f"{num(r.get('peak_above_weights_gib'), '10.2f'):>10s} {num(r.get('ratio_peak_vs_builtin'), '6.2f'):>6s} "
            f"{num(r.get('weights_gib'), '7.2f'):>7s}  {status}")
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------------

DEFAULT_RES = {"cpu": {"sd15": [256, 512], "sdxl": [512]}, "cuda": {"sd15": [512], "sdxl": [1024]}}
QUICK_ROWS = ["builtin_b1", "diffusers_lora", "ours_domainstudio"]


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--ours-option {text!r}: write name=value, e.g. memory=low")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def select_rows(spec: str) -> list[str]:
    out = []
    for item in _csv(spec):
        if item in memory_rows.KINDS:
            out += [r.id for r in memory_rows.ROWS.values() if r.kind == item]
        elif item in memory_rows.ROWS:
            out.append(item)
        else:
            raise SystemExit(f"--rows: unknown {item!r}; use kinds {', '.join(memory_rows.KINDS)} or row ids "
                             f"{', '.join(memory_rows.ROWS)}")
    return list(dict.fromkeys(out))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--family", default="sd15,sdxl", help="sd15, sdxl or both (comma list)")
    ap.add_argument("--res", default="", help="image resolutions, comma list (default: cpu sd15 256,512 / sdxl 512; "
                                              "cuda sd15 512 / sdxl 1024; quick 64)")
    ap.add_argument("--rows", default="", help="kinds (builtin,diffusers,ours) and/or row ids; default all "
                                               "(quick: " + ",".join(QUICK_ROWS) + ")")
    ap.add_argument("--checkpointing", default="", help="off,on (default both; quick: off)")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per row (default cpu 3, cuda 5, quick 1)")
    ap.add_argument("--warmup", type=int, default=0, help="warm-up steps before the timed ones (default cpu 1, cuda 2)")
    ap.add_argument("--quick", action="store_true", help="tiny twins of the architectures at 64^2 (smoke test)")
    ap.add_argument("--ours-option", action="append", type=_option, default=[],
                    help="name=value passed to our trainer functions (value parsed as JSON when it can be)")
    ap.add_argument("--min-free-gib", type=float, default=2.0, help="CPU: stop a row when available memory falls below")
    ap.add_argument("--row-timeout", type=float, default=4 * 3600, help="seconds before a row is stopped")
    ap.add_argument("--dry-run", action="store_true", help="print the plan with memory estimates; run nothing")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR", ""), help="ComfyUI tree (default $COMFYUI_DIR)")
    ap.add_argument("--out", default="")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows already in --out (same device) and add/replace the ones run now")
    args = ap.parse_args(argv)

    if not args.comfyui or not os.path.isfile(os.path.join(args.comfyui, "main.py")):
        raise SystemExit("no ComfyUI tree: set COMFYUI_DIR (eval \"$(bash .ci/setup.sh | tail -2)\") "
                         "or pass --comfyui DIR")
    families = _csv(args.family)
    for fam in families:
        if fam not in memory_rows.CONTEXT_DIM:
            raise SystemExit(f"--family: unknown {fam!r}; use sd15 and/or sdxl")
    row_ids = select_rows(args.rows or (",".join(QUICK_ROWS) if args.quick else ",".join(memory_rows.KINDS)))
    ckpts = _csv(args.checkpointing or ("off" if args.quick else "off,on"))
    if any(c not in ("off", "on") for c in ckpts):
        raise SystemExit(f"--checkpointing {args.checkpointing!r}: use off, on or off,on")
    warmup = args.warmup or (2 if args.device == "cuda" else 1)
    timed = args.steps or (1 if args.quick else 5 if args.device == "cuda" else 3)
    if args.res:
        try:
            res_for = {f: [int(x) for x in _csv(args.res)] for f in families}
        except ValueError:
            raise SystemExit(f"--res {args.res!r}: give whole numbers, e.g. 256,512")
    else:
        res_for = {f: [64] if args.quick else DEFAULT_RES[args.device][f] for f in families}
    for f, rs in res_for.items():
        for r in rs:
            if r < 64 or r % 64:
                raise SystemExit(f"--res {r}: use a multiple of 64 (>= 64)")
    out = args.out or os.path.join(HERE, "results", f"memory_{args.device}{'_quick' if args.quick else ''}.json")
    ours_options = dict(args.ours_option)

    plan = [(f, r, rid, c == "on") for f in families for r in res_for[f] for rid in row_ids for c in ckpts]
    rows: list[dict] = []
    if args.append and os.path.exists(out):
        with open(out) as f:
            previous = json.load(f)
        if previous.get("device") != args.device or previous.get("settings", {}).get("quick") != args.quick:
            raise SystemExit(f"--append: {out} holds rows of another device or mode "
                             f"({previous.get('device')}, quick={previous.get('settings', {}).get('quick')}); "
                             "use another --out")
        planned = {_key(f, r, rid, c, ours_options) for f, r, rid, c in plan}
        rows += [r for r in previous.get("rows", [])
                 if _key(r["family"], r["resolution"], r["row"], r["checkpointing"], r.get("ours_options"))
                 not in planned]
    result = {"benchmark": "bench/bench_memory.py", "created": datetime.datetime.now().isoformat(timespec="seconds"),
              "device": args.device, "platform": platform.platform(), "cpu": _cpu_name(),
              "python": platform.python_version(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "argv": sys.argv[1:] if argv is None else argv,
              "settings": {"warmup": warmup, "timed": timed, "quick": args.quick, "lora_rank": memory_rows.LORA_RANK,
                           "dtype": "bf16", "min_free_gib": args.min_free_gib, "ours_options": ours_options},
              "rows": rows}
    print(f"{len(plan)} row(s); warm-up {warmup} + timed {timed} steps each; "
          f"{mem_available_gib():.1f} GiB available now", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as workdir:
        for family, res, rid, ckpt in plan:
            row = memory_rows.ROWS[rid]
            entry = {"family": family, "resolution": res, "row": rid, "kind": row.kind, "label": row.label,
                     "batch": row.batch, "checkpointing": ckpt, "warmup": warmup, "timed": timed}
            if row.kind == "ours" and ours_options:
                entry["ours_options"] = ours_options
                entry["label"] += " [" + ", ".join(f"{k}={v}" for k, v in ours_options.items()) + "]"
            avail = mem_available_gib()
            entry["mem_available_gib_before"] = round(avail, 2)
            watch = True  # host memory, also on a GPU machine
            if not args.quick and args.device == "cpu":
                entry["estimate_gib"] = est = estimate_gib(row, family, res, ckpt, ours_options)
                if watch and est["total"] > avail - args.min_free_gib:
                    entry.update(status="skipped", reason=(
                        f"would need ~{est['total']:.0f} GiB (estimate: weights {est['weights']}, trainable state "
                        f"{est['trainable_state']}, activations {est['activations']}); {avail:.1f} GiB available"))
            if args.dry_run:
                entry.setdefault("status", "planned")
            if "status" not in entry:
                print(f"[{time.strftime('%H:%M:%S')}] {family} {res}^2 {rid} ckpt={'on' if ckpt else 'off'} "
                      f"({avail:.1f} GiB available) ...", flush=True)
                spec = {"row": rid, "family": family, "resolution": res, "checkpointing": ckpt, "device": args.device,
                        "warmup": warmup, "timed": timed, "quick": args.quick, "ours_options": ours_options,
                        "comfyui_dir": os.path.abspath(args.comfyui), "seed": 0}
                entry.update(run_row(spec, workdir, args.min_free_gib, args.row_timeout, watch))
                brief = (f"{entry['s_per_step']:.3f} s/step, {entry['peak_above_weights_gib']:.2f} GiB above weights"
                         if entry["status"] == "ok" else f"{entry['status']}: {entry.get('reason', '')[:200]}")
                print(f"    -> {brief}", flush=True)
            rows.append(entry)
            order = list(memory_rows.ROWS)
            rows.sort(key=lambda r: (r["family"], r["resolution"], order.index(r["row"]), r["checkpointing"]))
            add_ratios(rows)
            if not args.dry_run:
                _save(result, out)
    hosts = [r for r in rows if r.get("status") == "ok"]
    if hosts:
        result["host"] = {k: hosts[0].get(k)
                          for k in ("torch", "comfyui", "diffusers", "peft", "comfy_attention", "threads")}
    result["unet_params"] = twins = unet_params(rows)
    print()
    print(format_table(rows, args.device))
    for family, counts in twins.items():
        same = len(set(counts.values())) == 1
        print(f"{family} UNet parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items())
              + ("" if len(counts) < 2 else " (the same network)" if same else "  <-- MISMATCH: not the same network"))
    if args.dry_run:
        for r in rows:
            if "estimate_gib" in r:
                print(f"  {r['family']} {r['resolution']} {r['row']} ckpt={r['checkpointing']}: "
                      f"estimate {r['estimate_gib']}")
        return 0
    _save(result, out)
    print(f"saved {out}")
    return 0


def _key(family, resolution, row_id, checkpointing, ours_options) -> tuple:
    """What makes two rows the same measurement (for --append)."""
    opts = json.dumps(ours_options or {}, sort_keys=True) if memory_rows.ROWS[row_id].kind == "ours" else ""
    return family, resolution, row_id, bool(checkpointing), opts


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _save(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
