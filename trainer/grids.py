"""Image grids and conversions for sample sheets (dstrain's before/after grids, the demo, the
benchmarks) and previews: IMAGE tensors or uint8 arrays, channels last."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_pil(image) -> Image.Image:
    """The first image of an IMAGE [N, H, W, 3] (or one [H, W, 3]) in 0..1 as a PIL image."""
    arr = to_uint8(image)
    return Image.fromarray(arr[0] if arr.ndim == 4 else arr)


def to_uint8(images) -> np.ndarray:
    """Float images in 0..1 (numpy or torch, any leading shape, channels last) -> uint8; uint8 passes."""
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().numpy()
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


def tile_rows(rows, gap: int = 0) -> np.ndarray:
    """Rows of same-size images (each [k, H, W, 3], channels last) -> one uint8 canvas on white;
    rows may differ in length, `gap` white pixels separate consecutive rows."""
    rows = [to_uint8(r) for r in rows]
    h, w = rows[0].shape[1:3]
    cols = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (h + gap) - gap, cols * w, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, im in enumerate(r):
            canvas[i * (h + gap):i * (h + gap) + h, j * w:(j + 1) * w] = im
    return canvas


def tile(images, cols: int) -> np.ndarray:
    """[N, H, W, 3] images -> a grid `cols` wide (the last row padded with white)."""
    return tile_rows([images[i:i + cols] for i in range(0, len(images), cols)])


def save_png(canvas: np.ndarray, path: str, *, optimize: bool = False, scale: int = 1) -> None:
    """Write an [H, W, 3] uint8 canvas as PNG atomically (temp file, then rename); `scale` enlarges
    with nearest-neighbour so small samples stay crisp."""
    import os

    img = Image.fromarray(canvas)
    if scale != 1:
        img = img.resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    img.save(tmp, optimize=optimize)
    os.replace(tmp, path)


def labelled_rows(rows, label_width: int = 96) -> torch.Tensor:
    """[(IMAGE [k, H, W, 3], label), ...] -> one IMAGE [1, H', W', 3]: a row per entry with its label
    written in a white column on the left (rows are resized to the first row's image size)."""
    from PIL import ImageDraw, ImageFont

    h, w = int(rows[0][0].shape[1]), int(rows[0][0].shape[2])
    scale = max(1, 64 // max(1, min(h, w)))  # tiny samples are enlarged so the grid stays readable
    ch, cw = h * scale, w * scale
    cols = max(int(r[0].shape[0]) for r in rows)
    canvas = Image.new("RGB", (label_width + cols * cw, len(rows) * ch), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default()
    except Exception:  # noqa: BLE001
        font = None
    for i, (images, label) in enumerate(rows):
        arr = to_uint8(images)
        for j in range(arr.shape[0]):
            tile_img = Image.fromarray(arr[j])
            if tile_img.size != (cw, ch):
                tile_img = tile_img.resize((cw, ch), Image.NEAREST if scale > 1 else Image.BICUBIC)
            canvas.paste(tile_img, (label_width + j * cw, i * ch))
        draw.text((4, i * ch + ch // 2 - 6), str(label), fill=(20, 20, 20), font=font)
    out = np.asarray(canvas, dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(out)).unsqueeze(0)
