"""Loading a model for dstrain: ComfyUI's model code as a library (any checkpoint ComfyUI loads,
its own detection of SD1.x/SD2.x/SDXL and eps/v), or diffusers alone (no ComfyUI import)."""

from __future__ import annotations

import os
import sys


def checkpoint_resolution(path: str) -> int | None:
    """The training size a checkpoint file declares: the ModelSpec key `modelspec.resolution`
    ("1024x1024"), or the miniature emoji SD's own size (its `miniworld.key`); None otherwise.
    Reads only a safetensors header (never unpickles)."""
    if not path or not path.lower().endswith(".safetensors") or not os.path.isfile(path):
        return None
    try:
        from safetensors import safe_open

        with safe_open(path, "np") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - an unreadable header: the loader reports it
        return None
    spec = meta.get("modelspec.resolution", "")
    w, _, h = spec.lower().partition("x")
    if w.strip().isdigit() and (not h.strip() or h.strip() == w.strip()) and int(w) > 0:
        return int(w)
    if "miniworld.key" in meta:
        from ..miniworld import config

        return config.IMAGE_SIZE
    return None


def import_comfy(comfy_dir: str, device: str) -> None:
    if not comfy_dir or not os.path.isfile(os.path.join(comfy_dir, "comfy", "sd.py")):
        raise SystemExit("dstrain: ComfyUI's code is needed as a library: pass --comfyui DIR or set COMFYUI_DIR "
                         "(`eval \"$(bash .ci/setup.sh | tail -2)\"` installs the pinned tree), or use --host diffusers")
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    import torch

    import comfy.cli_args

    comfy.cli_args.args.cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    import comfy.sd  # noqa: F401  (model_management reads the args on import)


def load(args):
    """The host for the parsed arguments; sets `host.describe` for messages."""
    if args.host == "diffusers":
        import torch

        from ..trainer.errors import TrainingError
        from ..trainer.hosts import diffusers as dh

        device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
        try:
            models = dh.load_diffusers_folder(args.diffusers, device)
        except TrainingError as e:
            raise SystemExit(f"dstrain: --diffusers: {e}") from None
        host = dh.DiffusersHost(models)
        host.describe = f"{args.diffusers} (diffusers, {models.schedule.prediction_type})"
        return host
    import_comfy(args.comfyui, args.device)
    import comfy.diffusers_load
    import comfy.sd

    from ..trainer.hosts.comfy import ComfyHost

    if not args.checkpoint and not args.diffusers:
        from ..miniworld import build

        args.checkpoint = build.ensure()
    if args.checkpoint:
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(args.checkpoint)
    else:
        model, clip, vae = comfy.diffusers_load.load_diffusers(args.diffusers)
    if model is None or clip is None or vae is None:
        raise SystemExit("dstrain: the checkpoint lacks a UNet, text encoder or VAE")
    host = ComfyHost(model, clip, vae)
    host.describe = args.checkpoint or args.diffusers
    return host
