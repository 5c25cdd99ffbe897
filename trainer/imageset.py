"""Few-shot image set preparation: load a folder and/or an IMAGE batch, normalise every image to
RGB float32 in 0..1, resize (short side = resolution) and center-crop to a square, optionally add
mirrored copies. Images use ComfyUI's IMAGE layout, [N, H, W, 3] channels last.

Folders are read in one of two modes:

* **confined** (``roots`` given; the ComfyUI node): the folder must resolve (symlinks and ``..``
  resolved, no ``~`` expansion) to a folder inside one of the roots — ComfyUI's input directory
  first, then the folders the server owner lists in the ``DOMAINSTUDIO_IMAGE_ROOTS`` environment
  variable. Relative names are relative to the first root. Anything else — outside, missing, a
  file, unreadable, a link leading out — gets one and the same message, which shows only the
  user's own string, so a prompt cannot probe the server's file system. Files in the folder that
  link outside the roots are skipped.
* **unconfined** (``roots=ANY_FOLDER``, i.e. None, said by name; ``python -m dstrain``, run by the machine's own user): any path,
  ``~`` expanded, relative to the working directory, with specific messages.

Captions: ``name.txt`` beside ``name.png`` (UTF-8) is that image's caption (the kohya convention);
more captions can be given as text, one per line (see ``prepare_image_set``).

Large photos are decoded straight to near the target size (JPEG DCT scaling via ``draft``, then an
integer box ``reduce``), keeping at least twice the target resolution before the final antialiased
resize, the same two-step scheme Pillow's ``thumbnail`` uses.

Pure torch/PIL/numpy and deterministic: the same inputs always give bit-identical tensors.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

log = logging.getLogger("DomainStudio")

SUPPORTED_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

MIN_RESOLUTION = 64
MAX_RESOLUTION = 4096

# Environment variable through which a server owner allows extra image folders (absolute paths,
# separated by os.pathsep). Read by the node on every run; never a node input.
ROOTS_ENV = "DOMAINSTUDIO_IMAGE_ROOTS"

CAPTION_EXTENSION = ".txt"
MAX_CAPTION_CHARS = 2000

# Decode big images to at least this many times the target short side before the final
# antialiased resize (Pillow's thumbnail() default reducing_gap).
REDUCING_GAP = 2.0

# Resamplers overshoot a little around edges; only excursions beyond this are worth a warning.
_RANGE_TOLERANCE = 0.02

# Integer modes whose values span 0..65535 rather than 0..255. "I" is how Pillow opens 16-bit
# grayscale PNG/TIFF files in many versions (32-bit container holding 16-bit values).
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

_ECHO_MAX = 200


class ImageSetError(ValueError):
    """A problem with the user's images or settings; the message says what and how to fix it."""


class FolderRefused(ImageSetError):
    """Confined mode: the folder is not a readable folder inside the allowed roots. The message is
    the same whatever the reason, and shows only the user's own string."""


@dataclass
class ImageSet:
    images: torch.Tensor  # [N, R, R, 3] float32 0..1
    names: list[str]
    resolution: int
    flipped: bool
    warnings: list[str]
    # How many source images (before flipping) came from each input, e.g. {"IMAGE input": 3}.
    sources: dict[str, int] = field(default_factory=dict)
    # One entry per image (aligned with images/names; flipped copies share their source's
    # caption): the caption text, or None where the image has none.
    captions: list = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self)
        if not self.captions:
            self.captions = [None] * n
        elif len(self.captions) != n:
            raise ValueError(f"ImageSet: {len(self.captions)} captions for {n} images")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_captioned(self) -> int:
        return sum(c is not None for c in self.captions)

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
        k = self.num_captioned
        parts.append(f"captions for {k} of {n}" if k else "no captions")
        if self.warnings:
            parts.append(f"{len(self.warnings)} warning{'s' if len(self.warnings) != 1 else ''}")
        return "; ".join([" ".join(parts[:2])] + parts[2:])


# ------------------------------------------------------------------ folder resolution


class _Unset:
    def __repr__(self) -> str:
        return "<roots not given>"


_UNSET = _Unset()
ANY_FOLDER = None  # roots=ANY_FOLDER: no confinement (the command line, run by the machine's own user)


def clean_folder_string(folder) -> str:
    """Undo what pasting adds: surrounding quotes ("Copy as path" on Windows, file managers) and
    stray spaces. Done before anything else looks at the string."""
    return str(folder).strip().strip('"').strip("'").strip()


def _echo(text: str) -> str:
    """The user's own string, safe to quote in a message (bounded, control characters escaped)."""
    text = text if len(text) <= _ECHO_MAX else text[:_ECHO_MAX] + "…"
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def image_roots(input_dir: str, environ: "Mapping[str, str] | None" = None) -> list[str]:
    """The folders a prompt may read images from: `input_dir` (the host's input directory; relative
    folder names are taken from it) followed by the absolute paths listed in DOMAINSTUDIO_IMAGE_ROOTS
    (separated by os.pathsep). Entries that are not absolute are ignored with a log warning."""
    env = os.environ if environ is None else environ
    roots = [input_dir]
    for entry in env.get(ROOTS_ENV, "").split(os.pathsep):
        entry = entry.strip()
        if not entry:
            continue
        if not os.path.isabs(entry):
            log.warning("%s: ignoring '%s': entries must be absolute paths", ROOTS_ENV, entry)
            continue
        roots.append(entry)
    return roots


def _within(path: str, root: str) -> bool:
    path, root = os.path.normcase(path), os.path.normcase(root)
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives (Windows), mixed absolute/relative
        return False


def _real_roots(roots: Sequence[str]) -> list[str]:
    return [os.path.realpath(r) for r in roots]


def refusal_message(folder: str) -> str:
    """The one message for every folder a confined caller may not read."""
    return (
        f"folder '{_echo(folder)}' is not a folder of images inside ComfyUI's input directory: put "
        "the images in a subfolder of ComfyUI's input folder and give its name (e.g. 'my_style'). "
        f"A server owner can allow other folders with the {ROOTS_ENV} environment variable."
    )


def _empty_folder_error() -> ImageSetError:
    return ImageSetError(
        "folder is empty: give the path to a folder that contains your training images "
        f"({', '.join(SUPPORTED_EXTENSIONS)})."
    )


def _resolve(folder, roots: "Sequence[str] | None | _Unset") -> tuple[str, str]:
    """(path to read, label for messages). See resolve_image_folder."""
    if roots is _UNSET:  # reading a folder is confined unless the caller says otherwise, by name
        raise ValueError("say which folders may be read: roots=image_roots(input_dir) for anything a "
                         "prompt can reach, roots=ANY_FOLDER only for the machine's own user (the command line)")
    if folder is None or not str(folder).strip():
        raise _empty_folder_error()
    text = clean_folder_string(folder)
    if not text:
        raise _empty_folder_error()
    if roots is None:
        path = os.path.expanduser(text)
        if not os.path.exists(path):
            raise ImageSetError(
                f"folder '{path}' does not exist: check the spelling, or give an absolute path "
                "(relative paths are resolved from the current working directory)."
            )
        if not os.path.isdir(path):
            raise ImageSetError(
                f"folder '{path}' is a file, not a directory: give the folder that contains the images."
            )
        return path, path
    if not roots:
        raise ValueError("roots must name at least the input directory (or be None for no confinement)")
    try:
        real = os.path.realpath(os.path.join(roots[0], text))  # an absolute `text` replaces roots[0]
        ok = any(_within(real, r) for r in _real_roots(roots)) and os.path.isdir(real)
    except (OSError, ValueError):  # embedded NUL, name too long, permission, ...
        ok = False
    if not ok:
        raise FolderRefused(refusal_message(text))
    return real, text


def resolve_image_folder(folder, roots: "Sequence[str] | None | _Unset" = _UNSET) -> str:
    """Path of the folder the user means.

    roots=ANY_FOLDER (None): no confinement (the command line): `~` is expanded, relative paths are taken from
    the working directory, and errors say what is wrong with the path.
    roots=[input_dir, *extra]: quotes and spaces are removed first, nothing is expanded, relative
    names are joined to input_dir, and the real path (links and `..` resolved) must be a folder
    inside one of the roots; every failure raises FolderRefused with refusal_message()."""
    return _resolve(folder, roots)[0]


def _list_image_files(folder, roots: "Sequence[str] | None | _Unset" = _UNSET) -> tuple[str, str, list[str], list[str]]:
    """Resolve and list `folder`: (path, label, sorted image file names, warnings)."""
    path, label = _resolve(folder, roots)
    try:
        entries = os.listdir(path)
    except OSError:
        if roots is not None:
            raise FolderRefused(refusal_message(label)) from None
        raise ImageSetError(f"folder '{label}' cannot be read: check its permissions.") from None
    real_roots = _real_roots(roots) if roots is not None else None
    names, warnings = [], []
    for name in entries:
        if name.startswith("."):  # hidden files, macOS "._x.png" resource forks, .DS_Store
            continue
        if not name.lower().endswith(SUPPORTED_EXTENSIONS):
            continue
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            continue
        if real_roots is not None and not any(_within(os.path.realpath(full), r) for r in real_roots):
            warnings.append(f"skipped '{name}': it links to a file outside the allowed folders")
            continue
        names.append(name)
    if not names:
        raise ImageSetError(
            f"folder '{_echo(label)}' contains no supported images: put files with one of the "
            f"extensions {', '.join(SUPPORTED_EXTENSIONS)} in it (subfolders are not searched)."
        )
    # Sort case-insensitively so the order does not depend on the file system.
    names.sort(key=lambda n: (n.lower(), n))
    warnings.sort()
    return path, label, names, warnings


def count_images(folder, roots: "Sequence[str] | None | _Unset" = _UNSET) -> int:
    """How many images `folder` holds (checked like prepare_image_set does, nothing decoded):
    frontends check the count before loading a model."""
    return len(_list_image_files(folder, roots)[2])


# ------------------------------------------------------------------ decoding


def _has_transparency(img: Image.Image) -> bool:
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return True
    # Palette / RGB / L images can carry a tRNS transparent colour in their info.
    return "transparency" in img.info


def _pil_to_float(img: Image.Image) -> torch.Tensor:
    """Any PIL image (already upright) -> float32 [H, W, 3] in 0..1 (transparency composited over
    white, 16-bit data scaled by 65535)."""
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


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """Convert any PIL image to float32 [H, W, 3] in 0..1 (EXIF orientation applied,
    transparency composited over white, 16-bit data scaled by 65535)."""
    return _pil_to_float(ImageOps.exif_transpose(img))


_TRANSPOSE_FOR_ORIENTATION = {  # EXIF orientation -> the transpose that makes the image upright
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _reducible(img: Image.Image) -> Image.Image:
    """A mode whose pixels can be box-averaged (palette indices and bit masks cannot; Pillow's
    reduce() has no 16-bit modes); transparency keys become an alpha channel first."""
    mode = img.mode
    if mode in ("P", "PA") or (_has_transparency(img) and mode not in ("RGBA", "LA", "RGBa", "La")):
        return img.convert("RGBA")
    if mode == "1":
        return img.convert("L")
    if mode.startswith("I;16"):
        return img.convert("I")
    if mode in ("L", "LA", "La", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr", "I", "F"):
        return img
    return img.convert("RGB")


def decode_image(path: str, resolution: "int | None" = None) -> torch.Tensor:
    """Decode one image file to float32 [H, W, 3] in 0..1, upright (EXIF orientation applied).

    With `resolution`, a large image is decoded at a reduced size whose short side stays at least
    REDUCING_GAP × resolution (JPEG: the decoder's DCT scaling, never below that; other formats:
    an integer box reduce() right after decoding, before any float copy exists), so memory follows
    the target size rather than the photo's."""
    with Image.open(path) as img:
        if resolution:
            w, h = img.size
            keep = resolution * REDUCING_GAP
            if min(w, h) > keep:
                k = keep / min(w, h)
                img.draft(None, (max(1, math.ceil(w * k)), max(1, math.ceil(h * k))))
        img.load()  # decode now so truncated data fails here, inside the caller's try
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        out = img
        if resolution:
            factor = int(min(out.size) // (resolution * REDUCING_GAP))
            if factor >= 2:
                out = _reducible(out).reduce(factor)
        method = _TRANSPOSE_FOR_ORIENTATION.get(orientation)
        if method is not None:
            out = out.transpose(method)
        tensor = _pil_to_float(out)
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError("image has zero width or height")
    return tensor


def _error_text(e: BaseException, full: str, name: str) -> str:
    if isinstance(e, OSError) and e.filename and e.strerror:
        return e.strerror  # the path it would name is the server's
    return str(e).replace(full, name)


def _load_files(path: str, label: str, names: Sequence[str], resolution: "int | None",
                transform=None) -> list[tuple[str, torch.Tensor]]:
    """Decode `names` one at a time; `transform(name, tensor)` (e.g. resize and crop) is applied
    right after each decode, so only one decoded photo is alive at a time."""
    out: list[tuple[str, torch.Tensor]] = []
    bad: list[str] = []
    for name in names:
        full = os.path.join(path, name)
        try:
            tensor = decode_image(full, resolution)
            if transform is not None:
                tensor = transform(name, tensor)
        except UnidentifiedImageError:
            bad.append(f"'{name}': not a recognised image format (corrupt or mislabelled file)")
            continue
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            bad.append(f"'{name}': {type(e).__name__}: {_error_text(e, full, name)}")
            continue
        out.append((name, tensor))
    if bad:
        raise ImageSetError(
            f"{len(bad)} file{'s' if len(bad) != 1 else ''} in folder '{_echo(label)}' could not be "
            "read; re-export or remove them:\n  " + "\n  ".join(bad)
        )
    return out


def load_folder(folder: str, resolution: "int | None" = None, roots: "Sequence[str] | None | _Unset" = _UNSET
                ) -> list[tuple[str, torch.Tensor]]:
    """Load every supported image in `folder` (non-recursive, sorted by name, hidden files
    skipped) as (file name, float32 [H, W, 3] tensor in 0..1). With `resolution`, large images are
    decoded at a reduced size (see decode_image); `roots` confines the folder (see
    resolve_image_folder).

    All unreadable files are collected and reported together in one ImageSetError, so the user
    can fix them in one go."""
    path, label, names, _ = _list_image_files(folder, roots)
    return _load_files(path, label, names, resolution)


# ------------------------------------------------------------------ captions


def _check_caption(text: str, where: str) -> str:
    if len(text) > MAX_CAPTION_CHARS:
        raise ImageSetError(
            f"{where} is {len(text)} characters long; a caption may have at most {MAX_CAPTION_CHARS}: "
            "shorten it to a sentence or a list of tags describing the image."
        )
    return text


def _read_caption(path: str, txt_name: str, label: str) -> str:
    """A caption file's text: UTF-8 (a BOM is ignored); runs of whitespace, line breaks included,
    become single spaces."""
    where = f"caption file '{txt_name}' in folder '{_echo(label)}'"
    try:
        with open(os.path.join(path, txt_name), "rb") as f:
            raw = f.read(MAX_CAPTION_CHARS * 4 + 8)  # enough for MAX chars of UTF-8 plus a BOM
            longer = bool(f.read(1))
    except OSError as e:
        raise ImageSetError(f"{where} cannot be read ({e.strerror or type(e).__name__}): "
                            "check its permissions or remove it.") from None
    if longer:
        raise ImageSetError(
            f"{where} is longer than {MAX_CAPTION_CHARS} characters; a caption may have at most "
            f"{MAX_CAPTION_CHARS}: shorten it to a sentence or a list of tags describing the image."
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ImageSetError(f"{where} is not UTF-8 text: save it again with UTF-8 encoding.") from None
    return _check_caption(" ".join(text.split()), where)


def _folder_captions(path: str, label: str, names: Sequence[str], roots: "Sequence[str] | None"
                     ) -> tuple[list["str | None"], list[str]]:
    """For each image name, the text of its `<stem>.txt` (exact name first, then a case-insensitive
    match), or None. Caption files that link outside the roots are ignored with a warning."""
    try:
        entries = os.listdir(path)
    except OSError:
        entries = []
    txts: dict[str, str] = {}
    for entry in sorted(entries):
        if entry.lower().endswith(CAPTION_EXTENSION) and not entry.startswith("."):
            txts.setdefault(entry[: -len(CAPTION_EXTENSION)].lower(), entry)
    real_roots = _real_roots(roots) if roots is not None else None
    captions: list[str | None] = []
    warnings: list[str] = []
    for name in names:
        stem = os.path.splitext(name)[0]
        exact = stem + CAPTION_EXTENSION
        txt = exact if exact in entries else txts.get(stem.lower())
        if txt is None or not os.path.isfile(os.path.join(path, txt)):
            captions.append(None)
            continue
        if real_roots is not None and not any(
                _within(os.path.realpath(os.path.join(path, txt)), r) for r in real_roots):
            warnings.append(f"ignored caption file '{txt}': it links to a file outside the allowed folders")
            captions.append(None)
            continue
        captions.append(_read_caption(path, txt, label))
    return captions, warnings


def parse_caption_lines(captions: "str | Sequence[str | None] | None") -> list["str | None"]:
    """The `captions` input as one entry per image: a multiline string gives one caption per line
    (an empty line = no caption for that image; trailing empty lines are ignored)."""
    if captions is None:
        return []
    if isinstance(captions, str):
        items: list[str | None] = list(captions.splitlines())
    else:
        items = list(captions)
    out: list[str | None] = []
    for i, item in enumerate(items):
        text = None if item is None else " ".join(str(item).split())
        out.append(_check_caption(text, f"captions: line {i + 1}") if text else None)
    while out and out[-1] is None:
        out.pop()
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
    roots: "Sequence[str] | None | _Unset" = _UNSET,
    captions: "str | Sequence[str | None] | None" = None,
) -> ImageSet:
    """Combine the IMAGE input (first) and the images of `folder` (second) into an ImageSet of
    square [N, R, R, 3] float32 tensors in 0..1.

    `names` optionally names the IMAGE-input images (one per image). `flip=True` is data
    augmentation: a horizontally mirrored copy of every image is appended, so N doubles; don't
    use it for subjects whose handedness matters (text, logos, asymmetric faces).

    `roots` confines the folder (see resolve_image_folder); ANY_FOLDER = any path (command line); a folder read without `roots` is a ValueError.

    Captions: a folder image `name.png` with a `name.txt` beside it gets that file's text. The
    `captions` text (one caption per line) then goes, in order, to the images of the IMAGE input
    and after them to the folder's images that have no caption file (in file-name order); an
    empty line leaves that image without a caption, more lines than such images is an error,
    fewer leaves the rest without (with a warning)."""
    resolution = validate_resolution(resolution)
    warnings: list[str] = []

    batch = _split_input_images(images)
    if names is not None and len(names) != len(batch):
        raise ImageSetError(
            f"names has {len(names)} entries but the images input holds {len(batch)} images; "
            "give one name per image or leave names empty."
        )
    batch_names = list(names) if names is not None else [f"input[{i}]" for i in range(len(batch))]
    caption_lines = parse_caption_lines(captions)

    use_folder = folder is not None and str(folder).strip() != ""
    folder_count = 0
    files: list[str] = []
    file_captions: list[str | None] = []
    if use_folder:
        # List (and read the small caption files) before decoding so an oversized folder fails fast.
        path, label, files, skipped = _list_image_files(folder, roots)
        warnings.extend(skipped)
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

    if use_folder:
        file_captions, caption_warnings = _folder_captions(path, label, files, roots)
        warnings.extend(caption_warnings)
    all_captions: list[str | None] = [None] * len(batch) + file_captions
    open_slots = [i for i, c in enumerate(all_captions) if c is None]
    if len(caption_lines) > len(open_slots):
        raise ImageSetError(
            f"captions has {len(caption_lines)} lines but only {len(open_slots)} images take a caption "
            f"from it ({len(batch)} from the images input, {len(open_slots) - len(batch)} folder images "
            "without a .txt caption file); give one line per such image, in that order, or remove "
            "the extra lines."
        )
    for slot, text in zip(open_slots, caption_lines):
        all_captions[slot] = text
    if caption_lines and len(caption_lines) < len(open_slots):
        rest = len(open_slots) - len(caption_lines)
        warnings.append(
            f"captions has {len(caption_lines)} lines for {len(open_slots)} images without a caption "
            f"file; the last {rest} get no caption"
        )

    sources: list[tuple[str, torch.Tensor]] = []
    for i, (name, t) in enumerate(zip(batch_names, batch)):
        label_i = f"images input: image {i} ('{name}')"
        t = t.detach().to(device="cpu", dtype=torch.float32)
        if t.shape[0] == 0 or t.shape[1] == 0:
            raise ImageSetError(f"{label_i} is empty (shape {tuple(t.shape)}); remove it.")
        if not torch.isfinite(t).all():
            raise ImageSetError(
                f"{label_i} contains NaN or infinite values; fix or remove the node that produced "
                "it (often a VAE decode in fp16) before training."
            )
        t = _to_rgb(t, label_i)
        lo, hi = float(t.min()), float(t.max())
        if lo < -_RANGE_TOLERANCE or hi > 1.0 + _RANGE_TOLERANCE:
            hint = " (looks like 0..255 data; divide by 255)" if hi > 2.0 else ""
            warnings.append(
                f"image '{name}' has values in [{lo:.3g}, {hi:.3g}], clamped to 0..1{hint}"
            )
        sources.append((name, t.clamp(0.0, 1.0)))

    out = []
    for name, t in sources:
        out.append(_fit(name, t, resolution, warnings))
    if use_folder:
        # Decode one file at a time and keep only its resized square.
        fitted = _load_files(path, label, files, resolution,
                             transform=lambda name, t: _fit(name, t, resolution, warnings))
        out.extend(t for _, t in fitted)

    stacked = torch.stack(out).contiguous()
    all_names = [n for n, _ in sources] + list(files)
    if flip:
        stacked = torch.cat([stacked, stacked.flip(2)], dim=0)  # dim 2 = width
        all_names = all_names + [f"{n} (flipped)" for n in all_names]
        all_captions = all_captions + all_captions

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
        captions=all_captions,
    )


def _fit(name: str, t: torch.Tensor, resolution: int, warnings: list[str]) -> torch.Tensor:
    h, w = int(t.shape[0]), int(t.shape[1])
    if min(h, w) < resolution:
        warnings.append(f"image '{name}' is {w}×{h}, upscaled to {resolution}")
    return resize_and_center_crop(t.contiguous(), resolution).clone()  # not a view of the big one
