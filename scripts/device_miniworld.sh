#!/usr/bin/env bash
# Train the miniworld UNet (and refine the TAESD decoder beside it) on a lent CUDA GPU within a fixed
# lease, with the same code as the CPU recipe (python -m miniworld.train), and hand back the files.
#
#   bash scripts/device_miniworld.sh prep      # here: fill .devc/ (git-ignored) with what the GPU machine
#                                              # lacks: a ComfyUI tree, the emoji cache, the encoder
#   bash scripts/device_miniworld.sh run       # there: train; results into $OUT (files <= 16 MiB each)
#   bash scripts/device_miniworld.sh join DIR  # here: rejoin the shards from DIR into .devc/result/
#
# Knobs (environment): RUN_SECONDS (480: both loops end by then), UNET_BATCH (256), UNET_LR (6e-4),
# DEC_BATCH (64), SNAPSHOTS (0.5), THREADS (8). Each loop's length is fixed from its measured speed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cmd=${1:-}
dev=$PWD/.devc

case "$cmd" in
prep)
  : "${COMFYUI_DIR:?set COMFYUI_DIR to a ComfyUI 0.3.75 tree (eval \"\$(bash .ci/setup.sh 0.3.75 | tail -2)\")}"
  grep -qxF "/.devc/" .git/info/exclude || echo "/.devc/" >> .git/info/exclude
  rm -rf "$dev/comfyui" && mkdir -p "$dev/cache/emoji" "$dev/work"
  cp -a "$COMFYUI_DIR" "$dev/comfyui"
  (cd "$dev/comfyui" && rm -rf tests tests-unit comfy_api_nodes extra_model_paths.yaml comfy/text_encoders/*_tokenizer/ \
     && find . -name __pycache__ -prune -exec rm -rf {} +)
  python_bin=${DS_VENV:+$DS_VENV/bin/}python
  "$python_bin" -c "from miniworld import data, config; data.load(config.SOURCE_STYLE)"
  cache=${DS_CACHE:-$HOME/.cache/comfyui-domainstudio}
  "$python_bin" -c "from miniworld import data, config; [data.load(s) for s in config.TARGET_STYLES]"   # vae_quality reads them
  cp "$cache"/emoji/concepts-v2-*.npz "$cache"/emoji/concepts-v2-*.json "$dev/cache/emoji/"
  # The shipped VAE's encoder is the vae stage's encoder (the decoder stage never changes it).
  cp miniworld/weights/taesd_fp16.safetensors "$dev/work/vae_encoder_stage.safetensors"
  du -sh "$dev"
  ;;
run)
  OUT=${OUT:-/tmp/device_out}; mkdir -p "$OUT"
  export DS_CACHE=$dev/cache COMFYUI_DIR=$dev/comfyui PYTHONUNBUFFERED=1
  py=${PYTHON:-python3}
  work=${WORK:-$dev/work}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  # Both loops end by one deadline (RUN_SECONDS after this point), whatever the set-up took.
  until=$(( $(date +%s) + ${RUN_SECONDS:-480} ))
  "$py" -m miniworld.train --stage decoder --work "$work" --dec-until "$until" \
      --dec-batch "${DEC_BATCH:-64}" --threads 4 > "$OUT/decoder.log" 2>&1 &
  dpid=$!
  rc=0
  "$py" -m miniworld.train --stage unet --work "$work" --unet-until "$until" \
      --unet-batch "${UNET_BATCH:-256}" --unet-lr "${UNET_LR:-6e-4}" --unet-cycles \
      --ema-snapshots ${SNAPSHOTS:-0.5} --threads "${THREADS:-8}" 2>&1 | tee "$OUT/unet.log" || rc=$?
  wait "$dpid" || { echo "decoder stage failed:"; tail -n 30 "$OUT/decoder.log"; rc=1; }
  # Shards: the device hands back files of at most 16 MiB.
  "$py" - "$work" "$OUT" <<'EOF'
import os, sys, safetensors.torch
work, out = sys.argv[1:]
for f in sorted(os.listdir(work)):
    if f.startswith("unet_factors_fp16") and f.endswith(".safetensors"):
        sd = safetensors.torch.load_file(os.path.join(work, f))
        keys = sorted(sd)
        for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
            safetensors.torch.save_file({k: sd[k] for k in part}, os.path.join(out, f"{f[:-12]}.part{i}.safetensors"))
EOF
  [ -f "$work/taesd_fp16.safetensors" ] && cp "$work/taesd_fp16.safetensors" "$OUT/"
  # At most 8 files come back: the small records travel as one tar.
  (cd "$work" && tar cf "$OUT/records.tar" $(ls record_*.json runs.json 2>/dev/null))
  ls -la "$OUT"
  exit "$rc"
  ;;
join)
  src=${2:?usage: device_miniworld.sh join DIR}
  mkdir -p "$dev/result"
  python_bin=${DS_VENV:+$DS_VENV/bin/}python
  "$python_bin" - "$src" "$dev/result" <<'EOF'
import glob, os, shutil, sys, safetensors.torch
src, out = sys.argv[1:]
for p0 in sorted(glob.glob(os.path.join(src, "*.part0.safetensors"))):
    base = os.path.basename(p0)[: -len(".part0.safetensors")]
    sd = {}
    for p in (p0, p0.replace(".part0.", ".part1.")):
        sd.update(safetensors.torch.load_file(p))
    safetensors.torch.save_file(sd, os.path.join(out, base + ".safetensors"))
    print(base, len(sd), "tensors")
for f in glob.glob(os.path.join(src, "*")):
    if f.endswith(".tar"):
        shutil.unpack_archive(f, out)
    elif ".part" not in f and os.path.isfile(f):
        shutil.copy(f, out)
EOF
  ls -la "$dev/result"
  ;;
*)
  echo "usage: bash scripts/device_miniworld.sh prep|run|join DIR" >&2; exit 2 ;;
esac
