"""The embedded default training set for the demo and tests: a procedurally drawn 'domain'
(striped tiles in a few colours), so the demo needs no downloaded data."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image


def striped_domain(n: int = 8, resolution: int = 64, seed: int = 0) -> list[Image.Image]:
    """n RGB images sharing a style (diagonal stripes, soft palette) but differing in phase,
    frequency and colour, like ~10 shots of one domain."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:resolution, 0:resolution].astype(np.float32)
    out = []
    for _ in range(n):
        angle = rng.uniform(0.6, 1.0) * math.pi / 4
        freq = rng.uniform(0.18, 0.3)
        phase = rng.uniform(0, 2 * math.pi)
        wave = 0.5 + 0.5 * np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * freq + phase)
        c1, c2 = rng.uniform(0.15, 0.95, size=(2, 3))
        img = wave[..., None] * c1 + (1 - wave[..., None]) * c2
        out.append(Image.fromarray((img * 255).round().astype(np.uint8), "RGB"))
    return out


def write_domain(folder: str, n: int = 8, resolution: int = 64, seed: int = 0) -> list[str]:
    import os

    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, im in enumerate(striped_domain(n, resolution, seed)):
        p = os.path.join(folder, f"shot_{i:02d}.png")
        im.save(p)
        paths.append(p)
    return paths
