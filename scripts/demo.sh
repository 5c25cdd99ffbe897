#!/usr/bin/env bash
# The main job on a fresh machine: set up (cached in $DS_CACHE), then run the DomainStudio demo in a
# real ComfyUI server on the CPU. Results land in demo_output/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
setup_out=$(bash .ci/setup.sh) || { echo "demo: set-up failed" >&2; exit 1; }
eval "$(echo "$setup_out" | tail -2)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec "$DS_VENV/bin/python" scripts/demo.py "$@"
