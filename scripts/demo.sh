#!/usr/bin/env bash
# The main job on a fresh machine: set up (cached in $DS_CACHE; its progress lines go to stderr), then
# adapt the miniature emoji SD to 10 shots of another emoji style with DomainStudio and with plain
# fine-tuning, next to the base model on the same seeds (scripts/demo.py). Results: demo_output/
# (samples.png, content.png, metrics.json, summary.md). `--workflow` runs an example workflow in a
# real ComfyUI server instead; `--style openmoji` the other target style.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
t0=$(date +%s)
echo "[demo] set-up: venv, ComfyUI tree (first time several minutes, then cached) ..." >&2
setup_out=$(bash .ci/setup.sh) || { echo "demo: set-up failed" >&2; exit 1; }
eval "$(echo "$setup_out" | tail -2)"
echo "[demo] set-up ready in $(( $(date +%s) - t0 )) s" >&2
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec "$DS_VENV/bin/python" scripts/demo.py "$@"
