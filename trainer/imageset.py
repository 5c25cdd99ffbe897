"""Few-shot image set preparation: load a folder and/or an IMAGE batch, normalise every image to
RGB float32 in 0..1, resize (short side = resolution) and center-crop to a square, optionally add
mirrored copies. Images use ComfyUI's IMAGE layout, [N, H, W, 3] channels last.

Pure torch/PIL/numpy and deterministic: the same inputs always give bit-identical tensors.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

SUPPORTED_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

MIN_RESOLUTION = 64
MAX_RESOLUTION = 4096

# Resamplers overshoot a little around edges; only excursions beyond this are worth a warning.
_RANGE_TOLERANCE = 0.02

# Integer modes whose values span 0..65535 rather than 0..255. "I" is how Pillow opens 16-bit
# grayscale PNG/TIFF files in many versions (32-bit container holding 16-bit values).
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageSetError(ValueError):
    """A problem with the user's images or settings; the message says what and how to fix it."""


@dataclass
class ImageSet:
    images: torch.Tensor  # [N, R, R, 3] float32 0..1
    names: list[str]
    resolution: int
    flipped: bool
    warnings: list[str]
    # How many source images (before flipping) came from each input, e.g. {"IMAGE input": 3}.
    sources: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def describe(self) -> str:
        n = len(self)
        base = n // 2 if self.flipped else n
        parts = [f"{n} image{'s' if n != 1 else ''} at {self.resolution}×{self.resolution}"]
        if self.flipped:
            parts.append(f"({base} + {base} horizontally flipped copies)")
        else:
            parts.append("(no flip)")
        if self.sources:
            parts.append("from " + ", ".join(f"{k}: {v}" for k, v in self.sources.items()))
        if self.warnings:
            parts.append(f"{len(self.warnings)} warning{'s' if len(self.warnings) != 1 else ''}")
        return "; ".join([" ".join(parts[:2])] + parts[2:])


# ------------------------------------------------------------------ folder loading


def _clean_path(folder: str) -> str:
    # Pasted Windows "Copy as path" values come quoted; users also leave stray spaces.
    return os.path.expanduser(folder.strip().strip('"').strip("'").strip())


def _list_image_files(folder: str) -> tuple[str, list[str]]:
    """Validate `folder` and return (cleaned path, sorted supported file names)."""
    if folder is None or not str(folder).strip():
        raise ImageSetError(
            "folder is empty: give the path to a folder that contains your training images "
            f"({', '.join(SUPPORTED_EXTENSIONS)})."
        )
    path = _clean_path(str(folder))
    if not os.path.exists(path):
        raise ImageSetError(
            f"folder '{path}' does not exist: check the spelling, or give an absolute path "
            "(relative paths are resolved from ComfyUI's working directory)."
        )
    if not os.path.isdir(path):
        raise ImageSetError(
            f"folder '{path}' is a file, not a directory: give the folder that contains the images."
        )
    names = []
    for name in os.listdir(path):
        if name.startswith("."):  # hidden files, macOS "._x.png" resource forks, .DS_Store
            continue
        if not name.lower().endswith(SUPPORTED_EXTENSIONS):
            continue
        if os.path.isfile(os.path.join(path, name)):
            names.append(name)
    if not names:
        raise ImageSetError(
            f"folder '{path}' contains no supported images: put files with one of the extensions "
            f"{', '.join(SUPPORTED_EXTENSIONS)} in it (subfolders are not searched)."
        )
    # Sort case-insensitively so the order does not depend on the file system.
    names.sort(key=lambda n: (n.lower(), n))
    return path, names


def _has_transparency(img: Image.Image) -> bool:
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return True
    # Palette / RGB / L images can carry a tRNS transparent colour in their info.
    return "transparency" in img.info


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """Convert any PIL image to float32 [H, W, 3] in 0..1 (EXIF orientation applied,
    transparency composited over white, 16-bit data scaled by 65535)."""
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(img).astype(np.float32) / 65535.0
        arr = np.clip(arr, 0.0, 1.0)
        return torch.from_numpy(np.ascontiguousarray(np.repeat(arr[..., None], 3, axis=2)))
    if mode == "F":
        arr = np.asarray(img).astype(np.float32)
        arr = np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=0.0)
        # Float TIFFs are usually 0..1 already; larger values are taken as 8-bit style data.
        if arr.size and arr.max() > 1.0 + _RANGE_TOLERANCE:
            arr = arr / (65535.0 if arr.max() > 255.0 else 255.0)
        arr = np.clip(arr, 0.0, 1.0)
        return torch.from_numpy(np.ascontiguousarray(np.repeat(arr[..., None], 3, axis=2)))
    if _has_transparency(img):
        rgba = np.asarray(img.convert("RGBA")).astype(np.float32) / 255.0
        alpha = rgba[..., 3:4]
        rgb = rgba[..., :3] * alpha + (1.0 - alpha)  # composite over white
        return torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32))
    # 1, L, P, RGB, CMYK, YCbCr, ... : Pillow knows the conversion.
    rgb = np.asarray(img.convert("RGB")).astype(np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(rgb))


def load_folder(folder: str) -> list[tuple[str, torch.Tensor]]:
    """Load every supported image in `folder` (non-recursive, sorted by name, hidden files
    skipped) as (file name, float32 [H, W, 3] tensor in 0..1).

    All unreadable files are collected and reported together in one ImageSetError, so the user
    can fix them in one go."""
    path, names = _list_image_files(folder)
    out: list[tuple[str, torch.Tensor]] = []
    bad: list[str] = []
    for name in names:
        full = os.path.join(path, name)
        try:
            with Image.open(full) as img:
                img.load()  # decode now so truncated data fails here, inside the try
                tensor = pil_to_tensor(img)
            if tensor.shape[0] == 0 or tensor.shape[1] == 0:
                raise ValueError("image has zero width or height")
        except UnidentifiedImageError:
            bad.append(f"'{name}': not a recognised image format (corrupt or mislabelled file)")
            continue
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            bad.append(f"'{name}': {type(e).__name__}: {e}")
            continue
        out.append((name, tensor))
    if bad:
        raise ImageSetError(
            f"{len(bad)} file{'s' if len(bad) != 1 else ''} in folder '{path}' could not be read; "
            "re-export or remove them:\n  " + "\n  ".join(bad)
        )
    return out


# ------------------------------------------------------------------ validation helpers


def _nearest_valid_resolutions(value: int) -> list[int]:
    if value < MIN_RESOLUTION:
        return [MIN_RESOLUTION]
    if value > MAX_RESOLUTION:
        return [MAX_RESOLUTION]
    lo = (value // 8) * 8
    hi = lo + 8
    lo, hi = max(lo, MIN_RESOLUTION), min(hi, MAX_RESOLUTION)
    if value - lo == hi - value:
        return [lo, hi]
    return [lo if value - lo < hi - value else hi]


def validate_resolution(resolution) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)):
        if isinstance(resolution, float) and math.isfinite(resolution) and resolution.is_integer():
            resolution = int(resolution)
        else:
            raise ImageSetError(
                f"resolution must be a whole number (got {resolution!r}); use e.g. 512."
            )
    resolution = int(resolution)
    if (
        resolution % 8 != 0
        or resolution < MIN_RESOLUTION
        or resolution > MAX_RESOLUTION
    ):
        suggest = " or ".join(str(v) for v in _nearest_valid_resolutions(resolution))
        raise ImageSetError(
            f"resolution={resolution} is not valid: it must be a multiple of 8 between "
            f"{MIN_RESOLUTION} and {MAX_RESOLUTION}; use {suggest} instead."
        )
    return resolution


def _to_rgb(t: torch.Tensor, label: str) -> torch.Tensor:
    """[H, W, C] with C in 1..4 -> [H, W, 3]; alpha is composited over white."""
    c = t.shape[-1]
    if c == 3:
        return t
    if c == 1:
        return t.expand(-1, -1, 3)
    if c == 4:
        a = t[..., 3:4].clamp(0.0, 1.0)
        return t[..., :3] * a + (1.0 - a)
    if c == 2:  # gray + alpha
        a = t[..., 1:2].clamp(0.0, 1.0)
        return (t[..., 0:1] * a + (1.0 - a)).expand(-1, -1, 3)
    raise ImageSetError(
        f"{label} has {c} channels; expected an IMAGE tensor [N, H, W, C] with C = 1, 3 or 4 "
        "(channels last). If it is channels-first, convert it with an image node first."
    )


def _split_input_images(images) -> list[torch.Tensor]:
    """Turn the IMAGE input (batch tensor, single image, or a list of differently sized
    images) into a list of [H, W, C] tensors."""
    if images is None:
        return []
    items = [images] if isinstance(images, torch.Tensor) else list(images)
    out: list[torch.Tensor] = []
    for k, item in enumerate(items):
        if not isinstance(item, torch.Tensor):
            raise ImageSetError(
                f"images: entry {k} is a {type(item).__name__}, not an IMAGE tensor; "
                "connect an IMAGE output (e.g. Load Image) to the images input."
            )
        if item.dim() == 3:
            out.append(item)
        elif item.dim() == 4:
            out.extend(item.unbind(0))
        else:
            raise ImageSetError(
                f"images: entry {k} has shape {tuple(item.shape)}; expected [N, H, W, C] or "
                "[H, W, C] (ComfyUI IMAGE layout)."
            )
    return out


# ------------------------------------------------------------------ resize / crop


def resize_and_center_crop(img: torch.Tensor, resolution: int) -> torch.Tensor:
    """[H, W, 3] -> [R, R, 3]: scale so the short side equals R (antialiased bicubic), then
    take the centered R×R square. Already-fitting sizes are not resampled (no blur)."""
    h, w = int(img.shape[0]), int(img.shape[1])
    if min(h, w) != resolution:
        scale = resolution / min(h, w)
        new_h = resolution if h <= w else max(resolution, round(h * scale))
        new_w = resolution if w <= h else max(resolution, round(w * scale))
        x = img.permute(2, 0, 1).unsqueeze(0)
        # antialias=True matters for downscaling: plain bicubic aliases badly on photos.
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False,
                          antialias=True)
        img = x.squeeze(0).permute(1, 2, 0).clamp(0.0, 1.0)  # bicubic overshoots at edges
        h, w = new_h, new_w
    top = (h - resolution) // 2
    left = (w - resolution) // 2
    return img[top:top + resolution, left:left + resolution, :]


# ------------------------------------------------------------------ main entry point


def prepare_image_set(
    images: "Sequence[torch.Tensor] | torch.Tensor | None",
    folder: "str | None",
    resolution: int,
    flip: bool,
    min_images: int = 2,
    max_images: int = 1000,
    names: "list[str] | None" = None,
) -> ImageSet:
    """Combine the IMAGE input (first) and the images of `folder` (second) into an ImageSet of
    square [N, R, R, 3] float32 tensors in 0..1.

    `names` optionally names the IMAGE-input images (one per image). `flip=True` is data
    augmentation: a horizontally mirrored copy of every image is appended, so N doubles; don't
    use it for subjects whose handedness matters (text, logos, asymmetric faces)."""
    resolution = validate_resolution(resolution)
    warnings: list[str] = []

    batch = _split_input_images(images)
    if names is not None and len(names) != len(batch):
        raise ImageSetError(
            f"names has {len(names)} entries but the images input holds {len(batch)} images; "
            "give one name per image or leave names empty."
        )
    batch_names = list(names) if names is not None else [f"input[{i}]" for i in range(len(batch))]

    use_folder = folder is not None and str(folder).strip() != ""
    folder_count = 0
    if use_folder:
        # Count before decoding so an oversized folder fails fast.
        _, files = _list_image_files(folder)
        folder_count = len(files)

    total = len(batch) + folder_count
    where = f"{len(batch)} from the images input, {folder_count} from the folder"
    if total == 0:
        raise ImageSetError(
            "no images: connect an IMAGE batch to the images input and/or set folder to a "
            "directory of images."
        )
    if total > max_images:
        raise ImageSetError(
            f"too many images: found {total} ({where}) but at most {max_images} are allowed; "
            "use a smaller selection."
        )
    if total < min_images:
        raise ImageSetError(
            f"not enough images: found {total} ({where}) but at least {min_images} are needed; "
            "add more images to the folder or the images input."
        )

    sources: list[tuple[str, torch.Tensor]] = []
    for i, (name, t) in enumerate(zip(batch_names, batch)):
        label = f"images input: image {i} ('{name}')"
        t = t.detach().to(device="cpu", dtype=torch.float32)
        if t.shape[0] == 0 or t.shape[1] == 0:
            raise ImageSetError(f"{label} is empty (shape {tuple(t.shape)}); remove it.")
        if not torch.isfinite(t).all():
            raise ImageSetError(
                f"{label} contains NaN or infinite values; fix or remove the node that produced "
                "it (often a VAE decode in fp16) before training."
            )
        t = _to_rgb(t, label)
        lo, hi = float(t.min()), float(t.max())
        if lo < -_RANGE_TOLERANCE or hi > 1.0 + _RANGE_TOLERANCE:
            hint = " (looks like 0..255 data; divide by 255)" if hi > 2.0 else ""
            warnings.append(
                f"image '{name}' has values in [{lo:.3g}, {hi:.3g}], clamped to 0..1{hint}"
            )
        sources.append((name, t.clamp(0.0, 1.0)))
    if use_folder:
        sources.extend(load_folder(folder))

    out = []
    for name, t in sources:
        h, w = int(t.shape[0]), int(t.shape[1])
        if min(h, w) < resolution:
            warnings.append(f"image '{name}' is {w}×{h}, upscaled to {resolution}")
        out.append(resize_and_center_crop(t.contiguous(), resolution))

    stacked = torch.stack(out).contiguous()
    all_names = [n for n, _ in sources]
    if flip:
        stacked = torch.cat([stacked, stacked.flip(2)], dim=0)  # dim 2 = width
        all_names = all_names + [f"{n} (flipped)" for n in all_names]

    counts: dict[str, int] = {}
    if batch:
        counts["images input"] = len(batch)
    if use_folder:
        counts["folder"] = folder_count
    return ImageSet(
        images=stacked,
        names=all_names,
        resolution=resolution,
        flipped=bool(flip),
        warnings=warnings,
        sources=counts,
    )
