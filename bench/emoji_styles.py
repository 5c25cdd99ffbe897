"""Target emoji styles for the domain benchmarks: the same 1,391 concepts as miniworld's source style
(Google / Noto, miniworld.data), drawn by another emoji set.

    twitter   Twemoji, emoji-datasource-twitter@16.0.0 (CC-BY 4.0): flat, no outlines, bright fills.
              The PNGs come from miniworld.data.load (npm pack once, cached in $DS_CACHE/emoji).
    openmoji  OpenMoji, openmoji@17.0.0 (CC-BY-SA 4.0): flat with thick black outlines and a wide
              white margin (its 72-unit grid). The npm package ships SVGs only
              (package/color/svg/<HEXCODE>.svg, 4,495 files, and data/openmoji.csv); they are
              rasterised here to 64x64 with resvg (the `resvg-py` wheel, a self-contained binary;
              `pip install resvg-py`) and composited on white like the other styles. OpenMoji names
              an emoji by its code without the FE0F variation selector ("263A" for emoji-datasource's
              "263A-FE0F"); with that one normalisation every concept of the world is found.

`load(style)` returns the images in the order of `miniworld.data.load("google")` (same codes, names
and train / held-out split), cached as .npz next to the npm tarballs. Only benchmarks and demos call
it; tests never download.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile

import numpy as np

STYLES = ("twitter", "openmoji")
TITLES = {"google": "Noto (Google)", "twitter": "Twemoji (Twitter)", "openmoji": "OpenMoji"}
LICENSES = {"twitter": "CC-BY 4.0", "openmoji": "CC-BY-SA 4.0"}
OPENMOJI_VERSION = "17.0.0"
CACHE_VERSION = "1"  # bump when the rendering below changes


def _cache_dir() -> str:
    from comfyui_domainstudio.miniworld import config

    d = os.path.join(config.cache_dir(), "emoji")
    os.makedirs(d, exist_ok=True)
    return d


def openmoji_tarball() -> str:
    """The cached `openmoji` npm tarball (fetched once with `npm pack`, quietly)."""
    d = _cache_dir()
    path = os.path.join(d, f"openmoji-{OPENMOJI_VERSION}.tgz")
    if not os.path.exists(path):
        subprocess.run(["npm", "pack", "--silent", "--loglevel=error", f"openmoji@{OPENMOJI_VERSION}",
                        "--pack-destination", d], check=True, stdout=subprocess.DEVNULL)
        if not os.path.exists(path):
            raise RuntimeError(f"npm pack did not produce {path}")
    return path


def normalise_code(code: str) -> str:
    """Uppercase code points without the FE0F variation selector: '263a-fe0f' -> '263A'."""
    return "-".join(p for p in code.upper().split("-") if p != "FE0F")


def render_svg(svg: bytes, size: int = 64) -> np.ndarray:
    """An SVG document -> uint8 [size, size, 3] composited on white (resvg)."""
    try:
        import resvg_py
    except ImportError as e:
        raise ImportError("the OpenMoji style needs the `resvg-py` package to rasterise its SVGs: "
                          "pip install resvg-py") from e
    from PIL import Image

    png = bytes(resvg_py.svg_to_bytes(svg_string=svg.decode("utf-8"), width=size, height=size))
    im = Image.open(io.BytesIO(png)).convert("RGBA")
    if im.size != (size, size):
        im = im.resize((size, size), Image.LANCZOS)
    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(bg, im).convert("RGB"))


def _load_openmoji(codes: list[str], progress=None) -> np.ndarray:
    by_code = {}
    with tarfile.open(openmoji_tarball()) as tf:
        for member in tf.getmembers():
            if member.name.startswith("package/color/svg/") and member.name.endswith(".svg"):
                by_code[normalise_code(os.path.basename(member.name)[:-4])] = member
        missing = [c for c in codes if normalise_code(c) not in by_code]
        if missing:
            raise RuntimeError(f"openmoji@{OPENMOJI_VERSION} has no image for {len(missing)} concepts, e.g. {missing[:5]}")
        out = []
        for i, c in enumerate(codes):
            out.append(render_svg(tf.extractfile(by_code[normalise_code(c)]).read()))
            if progress:
                progress(i + 1, len(codes))
    return np.stack(out).astype(np.uint8)


def load(style: str, progress=None) -> dict:
    """{'images': uint8 [N, 64, 64, 3], 'names', 'codes', 'split', 'style', 'package'} in the order of
    miniworld's concepts. 'google' is the source style itself."""
    from comfyui_domainstudio.miniworld import config, data

    if style in ("google", "twitter"):
        return data.load(style)
    if style != "openmoji":
        raise ValueError(f"unknown emoji style {style!r}; choose one of {', '.join(('google',) + STYLES)}")
    source = data.load(config.SOURCE_STYLE)
    cache = os.path.join(_cache_dir(), f"concepts-v{config.DATA_VERSION}.{CACHE_VERSION}-openmoji-{OPENMOJI_VERSION}.npz")
    meta = {k: source[k] for k in ("names", "codes", "categories", "split")}
    meta.update(style="openmoji", package=f"openmoji@{OPENMOJI_VERSION}")
    if os.path.exists(cache):
        with np.load(cache, allow_pickle=False) as z:
            if json.loads(str(z["codes"])) == meta["codes"]:
                return {"images": z["images"], **meta}
    images = _load_openmoji(meta["codes"], progress)
    tmp = cache + ".tmp.npz"
    np.savez_compressed(tmp, images=images, codes=json.dumps(meta["codes"]))
    os.replace(tmp, cache)
    return {"images": images, **meta}
