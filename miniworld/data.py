"""Emoji image sets from npm (emoji-datasource-<style>@EMOJI_VERSION), cached under $DS_CACHE/emoji.

The world: every emoji *concept* of the package except flags, the skin-tone components and ZWJ
sequences (skin-tone variants are not separate entries), that both the source (Google / Noto) and
the target (Twitter) style draw: 1,391 at 16.0.0, ordered by the package's ``sort_order``. A fixed
tenth of them (``config.HELDOUT_EVERY``) is the held-out caption split: the UNet never sees their
names or images (the VAE never sees their images either). Only training, the benchmarks and demos
call :func:`load` (it runs ``npm pack`` once); tests use the shipped sprite (:func:`reference`).
Images are the 64x64 RGBA PNGs composited on white.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import tempfile

import numpy as np

from . import config
from ..trainer.deltas import atomic_write


def _pkg(style: str) -> str:
    return f"emoji-datasource-{style}"


def tarball(style: str) -> str:
    """Path of the cached npm tarball for ``style`` (downloaded once with ``npm pack``)."""
    d = os.path.join(config.cache_dir(), "emoji")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"{_pkg(style)}-{config.EMOJI_VERSION}.tgz")
    if not os.path.exists(path):
        # npm writes into a folder of this call's own; the finished tarball is moved in one step, so
        # a second process never reads one that is still being written
        with tempfile.TemporaryDirectory(prefix=".npm-pack-", dir=d) as work:
            subprocess.run(["npm", "pack", "--silent", "--loglevel=error", f"{_pkg(style)}@{config.EMOJI_VERSION}",
                            "--pack-destination", work], check=True, stdout=subprocess.DEVNULL)
            got = os.path.join(work, os.path.basename(path))
            if not os.path.exists(got):
                raise RuntimeError(f"npm pack did not produce {os.path.basename(path)}")
            os.replace(got, path)
    return path


def _select(entries: list[dict]) -> list[dict]:
    styles = (config.SOURCE_STYLE,) + tuple(config.TARGET_STYLES)
    out = [e for e in entries
           if e["category"] not in config.EXCLUDED_CATEGORIES and all(e.get(f"has_img_{s}") for s in styles)
           and e.get("name") and "200D" not in e["unified"].split("-")]
    out.sort(key=lambda e: e["sort_order"])
    return out


def split_of(i: int) -> str:
    """'heldout' for every HELDOUT_EVERY-th concept (offset HELDOUT_OFFSET, in sort order), else 'train'."""
    return "heldout" if i % config.HELDOUT_EVERY == config.HELDOUT_OFFSET else "train"


def captions_for(name: str) -> list[str]:
    """The fixed named captions of a concept: ``{name}``, ``an emoji of {name}`` (index 1, what the
    tests and benchmarks prompt). Training adds ``a <filler> emoji of {name}`` (see miniworld.captions)."""
    return [t.format(name=name) for t in config.CAPTION_TEMPLATES]


def load(style: str) -> dict:
    """{'images': uint8 [N,64,64,3] on white, 'names', 'codes', 'categories', 'split' ('train' /
    'heldout'), 'style', 'package'} for every concept of the world, cached as .npz + .json."""
    d = os.path.join(config.cache_dir(), "emoji")
    cache = os.path.join(d, f"concepts-v{config.DATA_VERSION}-{style}-{config.EMOJI_VERSION}.npz")
    meta_path = cache[:-4] + ".json"
    if os.path.exists(cache) and os.path.exists(meta_path):
        with np.load(cache, allow_pickle=False) as z:
            images = z["images"]
        with open(meta_path) as f:
            meta = json.load(f)
        return {"images": images, **meta}
    from PIL import Image

    with tarfile.open(tarball(config.SOURCE_STYLE)) as tf:
        entries = json.load(tf.extractfile("package/emoji.json"))
    sel = _select(entries)
    images, names, codes, cats = [], [], [], []
    with tarfile.open(tarball(style)) as tf:
        for e in sel:
            member = f"package/img/{style}/{config.IMAGE_SIZE}/{e['image']}"
            im = Image.open(io.BytesIO(tf.extractfile(member).read())).convert("RGBA")
            if im.size != (config.IMAGE_SIZE, config.IMAGE_SIZE):
                im = im.resize((config.IMAGE_SIZE, config.IMAGE_SIZE), Image.LANCZOS)
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            images.append(np.asarray(Image.alpha_composite(bg, im).convert("RGB")))
            names.append(e["name"].lower())
            codes.append(e["unified"])
            cats.append(e["category"])
    meta = {"names": names, "codes": codes, "categories": cats, "split": [split_of(i) for i in range(len(sel))],
            "style": style, "package": f"{_pkg(style)}@{config.EMOJI_VERSION}"}
    arr = np.stack(images).astype(np.uint8)
    # each file written under a temporary name of its own and moved in one step (two processes may
    # build the same cache at once); the metadata first, since a reader takes the pair once both exist
    def write_meta(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(meta, f)

    def write_images(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: numpy would add ".npz" to a name without it
            np.savez_compressed(f, images=arr)

    atomic_write(meta_path, write_meta, overwrite=True)
    atomic_write(cache, write_images, overwrite=True)
    return {"images": arr, **meta}



SPRITE_COLS = 16


def write_sprite(images: np.ndarray, path: str) -> None:
    """uint8 [N,64,64,3] -> one PNG grid (SPRITE_COLS per row, white padding)."""
    from comfyui_domainstudio.trainer.grids import save_png, tile

    save_png(tile(images, SPRITE_COLS), path, optimize=True)


def read_sprite(path: str, n: int, size: int = config.IMAGE_SIZE) -> np.ndarray:
    from PIL import Image

    grid = np.asarray(Image.open(path).convert("RGB"))
    out = []
    for i in range(n):
        r, c = divmod(i, SPRITE_COLS)
        out.append(grid[r * size:(r + 1) * size, c * size:(c + 1) * size])
    return np.stack(out)


def train_indices(ds: dict) -> list[int]:
    return [i for i, s in enumerate(ds["split"]) if s == "train"]


def heldout_indices(ds: dict) -> list[int]:
    return [i for i, s in enumerate(ds["split"]) if s == "heldout"]


def reference() -> dict:
    """The UNet's training set, shipped (no download): {'images': uint8 [N,64,64,3], 'names', 'codes',
    'captions', 'categories'}; every code is in ``load(style)['codes']``, and the concepts of ``load``
    that are not here are the held-out ones the model never saw.

    The images are Google's Noto Color Emoji (Apache-2.0) from emoji-datasource-google, composited on white."""
    with open(config.REFERENCE_JSON) as f:
        meta = json.load(f)
    return {"images": read_sprite(config.REFERENCE_PNG, len(meta["names"])), **meta}


def export_reference() -> None:
    """Write the UNet's training images (sprite PNG) + names/captions (JSON) next to the weights."""
    ds = load(config.SOURCE_STYLE)
    idx = train_indices(ds)
    write_sprite(ds["images"][idx], config.REFERENCE_PNG)
    meta = {"names": [ds["names"][i] for i in idx], "codes": [ds["codes"][i] for i in idx],
            "categories": [ds["categories"][i] for i in idx],
            "captions": [captions_for(ds["names"][i]) for i in idx], "package": ds["package"],
            "license": "Noto Color Emoji images, Apache-2.0 (emoji-datasource-google)"}
    with open(config.REFERENCE_JSON, "w") as f:
        json.dump(meta, f, indent=0)
