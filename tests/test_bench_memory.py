"""Smoke test of bench/bench_memory.py: its --quick mode (tiny twins of the SD1.5 architecture, 64^2,
one warm-up + one timed step) run in a subprocess against the real ComfyUI tree, one row of each
kind. Checks the JSON's fields and that the values are sane -- never timings (speed and memory
targets live in the benchmark's own tables)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from comfyui_domainstudio.testing.harness import REPO, comfy_dir

BENCH = os.path.join(REPO, "bench", "bench_memory.py")


def _run(args: list[str], tmp_path) -> tuple[dict, str]:
    out = tmp_path / "memory.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", COMFYUI_DIR=comfy_dir())
    proc = subprocess.run([sys.executable, BENCH, *args, "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_quick_rows_of_each_kind(tmp_path):
    data, stdout = _run(["--quick", "--family", "sd15", "--rows", "builtin_b1,diffusers_lora,ours_domainstudio",
                         "--checkpointing", "off"], tmp_path)
    rows = {r["row"]: r for r in data["rows"]}
    assert set(rows) == {"builtin_b1", "diffusers_lora", "ours_domainstudio"}
    assert {r["kind"] for r in rows.values()} == {"builtin", "diffusers", "ours"}
    assert data["settings"]["timed"] == 1 and data["settings"]["quick"] is True
    for r in rows.values():
        assert r["status"] == "ok", (r["row"], r.get("reason"), r.get("traceback"))
        assert r["family"] == "sd15" and r["resolution"] == 64 and r["checkpointing"] is False
        assert r["s_per_step"] > 0 and len(r["step_times_s"]) == 1
        assert r["peak_above_weights_gib"] > 0, r  # adapters, optimizer state and activations cost something
        assert r["weights_gib"] > 0 and r["baseline_gib"] > 0
        assert abs(r["peak_gib"] - r["baseline_gib"] - r["peak_above_weights_gib"]) < 1e-6
        assert r["trainable_params"] > 0 and r["trainable_dtypes"]
        assert r["checkpoint_calls"] == 0
        assert r["threads"] == 1
    # The diffusers twin is the same network ComfyUI builds (same parameter count).
    assert rows["diffusers_lora"]["unet_params"] == rows["builtin_b1"]["unet_params"] > 0
    # The built-in node trains every linear/conv weight (+ bias/norm diffs); the others attention only.
    assert rows["builtin_b1"]["trainable_params"] > rows["diffusers_lora"]["trainable_params"]
    # Ratios are to the built-in node's row (DomainStudio runs batch 4: falls back to the batch-1 row).
    assert rows["builtin_b1"]["ratio_s_per_step_vs_builtin"] == 1.0
    for rid in ("diffusers_lora", "ours_domainstudio"):
        assert rows[rid]["builtin_ref"] == "builtin_b1"
        assert rows[rid]["ratio_s_per_step_vs_builtin"] > 0 and rows[rid]["ratio_peak_vs_builtin"] > 0
    assert "peak>w GiB" in stdout and "ours: DomainStudio" in stdout


def test_checkpointing_is_counted(tmp_path):
    """A row with checkpointing on must really checkpoint: the harness counts the calls."""
    data, _ = _run(["--quick", "--family", "sd15", "--rows", "diffusers_lora", "--checkpointing", "on"], tmp_path)
    (row,) = data["rows"]
    assert row["status"] == "ok", (row.get("reason"), row.get("traceback"))
    assert row["checkpointing"] is True and row["checkpoint_calls"] > 0


def test_rows_that_cannot_fit_are_skipped_not_run(tmp_path):
    """The real-size plan: with (pretend) too little free memory every row is recorded as skipped
    with the memory it would need; --dry-run builds nothing."""
    data_path = tmp_path / "plan.json"
    env = dict(os.environ, COMFYUI_DIR=comfy_dir())
    proc = subprocess.run([sys.executable, BENCH, "--family", "sdxl", "--res", "512", "--rows", "ours_dreambooth_full",
                           "--checkpointing", "off", "--min-free-gib", "100000", "--dry-run", "--out", str(data_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "skipped: would need ~" in proc.stdout
    assert not data_path.exists()  # a dry run writes nothing
