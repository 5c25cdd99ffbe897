"""Assemble the miniworld single-file SD1.5 checkpoint that ComfyUI's stock CheckpointLoaderSimple reads.

    python -m miniworld.build [--out PATH]

Contents: the shipped UNet, trained and shipped as low-rank factors
(``weights/unet_factors_fp16.safetensors``, miniworld/factor.py) and multiplied out here into the
ordinary two-level SD1.5-layout UNet (``model.diffusion_model.*``, 44 M params in the checkpoint);
the frozen random CLIP-L regenerated from its seed (``cond_stage_model.transformer.text_model.*``,
~247 MB in fp16, which is why it never ships); and the shipped TAESD-architecture VAE
(``first_stage_model.taesd_*``, ``vae_scale``, ``vae_shift``); all fp16. The same inputs give a
byte-identical file; by default it goes to
``$DS_CACHE/miniworld-<key>/checkpoints/miniworld_sd15.safetensors`` where ``key`` hashes the
shipped weights and the recipe, so a retrain or a recipe change builds a new file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile

import torch

from . import config

BUILD_VERSION = "2"  # bump when the assembly below changes (2: factorised two-level UNet)


def key() -> str:
    h = hashlib.sha256()
    for f in (config.UNET_FILE, config.VAE_FILE):
        if not os.path.exists(f):
            raise FileNotFoundError(f"miniworld weights missing: {f} (retrain with `python -m miniworld.train`)")
        with open(f, "rb") as fh:
            h.update(hashlib.sha256(fh.read()).digest())
    h.update(json.dumps([BUILD_VERSION, config.CLIP_SEED, config.UNET_CONFIG, config.UNET_RANKS],
                        sort_keys=True).encode())
    return h.hexdigest()[:12]


def unet_state_dict() -> dict:
    """The shipped UNet as ordinary ComfyUI UNet tensors (float32): the factors multiplied out."""
    from . import factor, models

    return factor.expanded_state_dict(models.load_factored_unet(config.UNET_FILE))


def default_path() -> str:
    return os.path.join(config.cache_dir(), f"miniworld-{key()}", "checkpoints", config.CHECKPOINT_NAME)


def state_dict() -> dict:
    """The checkpoint's tensors (fp16), keyed as an original-format SD1.5 checkpoint."""
    import safetensors.torch

    from . import models

    base, unet = models.new_unet()
    unet.load_state_dict(unet_state_dict())
    vae_sd = safetensors.torch.load_file(config.VAE_FILE)
    clip_sd = models.clip_state_dict()
    # BaseModel.state_dict_for_saving's parameters changed between ComfyUI releases (a positional
    # (clip, vae) call writes a file newer hosts cannot detect): the pack's compat layer calls it.
    sd = _comfy_compat().checkpoint_state_dict(base, clip_sd, vae_sd)
    return {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def _comfy_compat():
    """trainer/hosts/comfy_compat.py under the pack's one package name, registered by the repo's
    __init__.py when nothing (ComfyUI, tests/conftest.py) has done so yet."""
    import importlib
    import runpy
    import sys

    if "comfyui_domainstudio" not in sys.modules:
        runpy.run_path(os.path.join(os.path.dirname(config.HERE), "__init__.py"))
    return importlib.import_module("comfyui_domainstudio.trainer.hosts.comfy_compat")


def check_loads_as_sd15(path: str) -> None:
    """Raise unless ComfyUI's own checkpoint loader reads ``path`` as SD1.5 with a CLIP and a TAESD VAE."""
    from .comfyenv import comfy

    c = comfy()
    import comfyui_version

    what = f"miniworld checkpoint written for ComfyUI {comfyui_version.__version__}"
    try:
        model, clip, vae = c.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)[:3]
    except Exception as e:
        raise RuntimeError(f"{what} does not load through comfy.sd.load_checkpoint_guess_config: {str(e).strip()} "
                           "Check trainer/hosts/comfy_compat.py checkpoint_state_dict against this host.") from e
    got = type(model.model.model_config) if model is not None else None
    if got is not c.supported_models.SD15:
        raise RuntimeError(f"{what} loads as {getattr(got, '__name__', got)}, not supported_models.SD15 "
                           "(see trainer/hosts/comfy_compat.py checkpoint_state_dict).")
    if clip is None or vae is None or not isinstance(vae.first_stage_model, c.taesd.taesd.TAESD):
        raise RuntimeError(f"{what} loads without its CLIP-L or TAESD VAE "
                           "(see trainer/hosts/comfy_compat.py checkpoint_state_dict).")


def build(out: str | None = None) -> str:
    """Write the checkpoint to ``out`` (default: the cache path) and return the path."""
    out = out or default_path()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    meta = {"miniworld.key": key(), "miniworld.build_version": BUILD_VERSION,
            "miniworld.text_encoder": f"frozen random CLIP-L, seed {config.CLIP_SEED}",
            "modelspec.architecture": "stable-diffusion-v1", "modelspec.title": "miniworld emoji SD1.5 (miniature)"}
    if os.path.exists(config.RECORD_FILE):
        with open(config.RECORD_FILE) as f:
            rec = json.load(f)
        meta["miniworld.data"] = json.dumps(rec.get("data", {}), sort_keys=True)
    # A temporary name of this call's own (two benchmark processes may build the same cache file at
    # once; equal inputs give equal bytes, so whichever lands last is the same file). It ends in
    # .safetensors because ComfyUI's loaders pick the format by the extension.
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(out) + ".", suffix=".tmp.safetensors",
                               dir=os.path.dirname(os.path.abspath(out)))
    os.close(fd)
    try:
        write_safetensors(state_dict(), tmp, meta)
        check_loads_as_sd15(tmp)  # a file the host cannot load never lands
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return out


_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64",
           torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(tensors: dict, path: str, metadata: dict) -> None:
    """A safetensors file with sorted keys and sorted metadata, so equal inputs give equal bytes
    (``safetensors.torch.save_file`` writes the metadata in hash-map order, which varies per run)."""
    import struct

    header: dict = {"__metadata__": {k: str(metadata[k]) for k in sorted(metadata)}}
    blobs, offset = [], 0
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        b = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[k] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    hj = json.dumps(header, separators=(",", ":")).encode()
    hj += b" " * (-len(hj) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for b in blobs:
            f.write(b)


def ensure() -> str:
    """Path of the cached checkpoint, building it on first use."""
    path = default_path()
    if not os.path.exists(path):
        build(path)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Assemble the miniworld SD1.5 checkpoint (UNet + random CLIP-L + TAESD).")
    p.add_argument("--out", default=None, help="output .safetensors (default: the $DS_CACHE path)")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    print(build(a.out))


if __name__ == "__main__":
    main()
