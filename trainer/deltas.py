"""Trained deltas as portable safetensors files.

Keys use kohya names (``lora_unet_<ldm module path with _>``), the container that ComfyUI's stock
LoraLoader and A1111/Forge both read: LoRA as ``.lora_up.weight`` / ``.lora_down.weight`` /
``.alpha`` (scale alpha/rank), full deltas as ``.diff`` (see ../shared/HOST_FACTS.md).
Files are written to a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

KOHYA_UNET_PREFIX = "lora_unet_"

# modelspec architecture / kohya base-model ids, by the host's model family.
ARCHITECTURES = {
    "sd1": ("stable-diffusion-v1", "sd_v1"),
    "sd2": ("stable-diffusion-v2-512", "sd_v2"),
    "sdxl": ("stable-diffusion-xl-v1-base", "sdxl_base_v1-0"),
}


def kohya_unet_name(module_path: str) -> str:
    """'input_blocks.1.1.proj_in' -> 'lora_unet_input_blocks_1_1_proj_in'."""
    return KOHYA_UNET_PREFIX + module_path.replace(".", "_")


def lora_entries(module_path: str, up: torch.Tensor, down: torch.Tensor, alpha: float,
                 weight_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """LoRA factors of one layer. Conv factors get kohya's 4-D shapes ([out, r, 1, 1] and
    [r, in, kh, kw]) so that loaders which do not flatten still read them."""
    name = kohya_unet_name(module_path)
    up = up.detach()
    down = down.detach()
    if len(weight_shape) == 4:
        up = up.reshape(up.shape[0], up.shape[1], 1, 1)
        down = down.reshape(down.shape[0], *weight_shape[1:])
    return {
        f"{name}.lora_up.weight": up.contiguous(),
        f"{name}.lora_down.weight": down.contiguous(),
        f"{name}.alpha": torch.tensor(float(alpha)),
    }


def diff_entries(module_path: str, diff: torch.Tensor) -> dict[str, torch.Tensor]:
    return {f"{kohya_unet_name(module_path)}.diff": diff.detach().contiguous()}


class WeightFileError(ValueError):
    """A weight file that cannot be written or read as asked (the message names the file and the fix)."""


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FORMAT_VERSION = "1"


def resolve_dtype(dtype) -> torch.dtype:
    """torch dtype from a torch dtype or one of 'fp16' / 'bf16' / 'fp32'."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise WeightFileError(f"dtype={dtype!r} is not supported for weight files; use one of {', '.join(DTYPES)}")


def dtype_name(dtype) -> str:
    d = resolve_dtype(dtype)
    return next(k for k, v in DTYPES.items() if v == d)


# ---------------------------------------------------------------------------------------------
# Names and paths
# ---------------------------------------------------------------------------------------------

_NAME_OK = set("-_. ")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


def sanitize_name(name: str, what: str = "save_name") -> str:
    """A user-given file name stem, checked: letters, digits, '-', '_', '.', spaces; no path
    separators, no '..', no leading dot, at most 120 characters. Raises ValueError (naming `what`)
    instead of silently rewriting a name the user would then not find."""
    if not isinstance(name, str):
        raise WeightFileError(f"{what} must be a string, got {type(name).__name__}")
    stem = name.strip()
    if not stem:
        raise WeightFileError(f"{what} is empty; give a file name such as 'my_style'")
    if "/" in stem or "\\" in stem or os.sep in stem or (os.altsep and os.altsep in stem):
        raise WeightFileError(f"{what}={name!r} contains a path separator; give a plain file name (files always "
                              "go to the model folder), e.g. {!r}".format(os.path.basename(stem.replace("\\", "/")) or "my_style"))
    if ".." in stem or stem.startswith("."):
        raise WeightFileError(f"{what}={name!r} contains '..' or starts with '.'; give a plain file name such as 'my_style'")
    bad = sorted({c for c in stem if not (c.isalnum() or c in _NAME_OK)})
    if bad:
        raise WeightFileError(f"{what}={name!r} contains characters not allowed in a file name: {''.join(bad)!r}; "
                              "use letters, digits, '-', '_', '.' or spaces")
    if len(stem) > 120:
        raise WeightFileError(f"{what} is {len(stem)} characters long; use at most 120")
    if stem.split(".")[0].lower() in _WINDOWS_RESERVED:
        raise WeightFileError(f"{what}={name!r} is a reserved device name on Windows; choose another name")
    return stem


def unique_path(folder: str, stem: str, ext: str = ".safetensors") -> str:
    """folder/stem_00001.safetensors, the first number not taken (never overwrites). `stem` is
    checked with sanitize_name (ValueError on separators / traversal)."""
    safe = sanitize_name(stem)
    i = 1
    while True:
        p = os.path.join(folder, f"{safe}_{i:05d}{ext}")
        if not os.path.exists(p):
            return p
        i += 1


def exact_path(folder: str, stem: str, ext: str = ".safetensors", overwrite: bool = False, what: str = "name") -> str:
    """folder/stem.ext for files whose name matters (an embedding's file name is its trigger word in
    ComfyUI and A1111). Refuses an existing file unless overwrite=True."""
    p = os.path.join(folder, sanitize_name(stem, what) + ext)
    if os.path.exists(p) and not overwrite:
        raise WeightFileError(f"{p} already exists; choose another {what} or delete the old file (never overwritten silently)")
    return p


TEMP_MARK = ".dstmp-"  # temporary files: hidden, and an extension no model list shows


def atomic_write(path: str, write: Callable[[str], None], overwrite: bool = False) -> str:
    """Call write(tmp) on a temporary file beside `path`, then move it to `path` in one step.

    The temporary file is hidden and has no model extension (`.<name>.dstmp-XXXX`), so ComfyUI's
    and A1111's model lists never show a half-written file; `remove_stale_temp_files` clears the
    ones a crash leaves. Nothing is left behind when `write` fails; an existing `path` is refused
    unless overwrite. The file gets the usual permissions (0666 minus the umask)."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    if not overwrite and os.path.exists(path):
        raise WeightFileError(f"{os.path.basename(path)} already exists; not overwritten (choose another name)")
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + TEMP_MARK, dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:  # link() fails if `path` appeared meanwhile: never clobbers
                os.link(tmp, path)
            except FileExistsError:
                raise WeightFileError(f"{os.path.basename(path)} already exists; not overwritten (choose another name)") from None
            except OSError:  # file systems without hard links
                if os.path.exists(path):
                    raise WeightFileError(f"{os.path.basename(path)} already exists; not overwritten (choose another name)") from None
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temp_files(folders, min_age_s: float = 0.0) -> list[str]:
    """Delete temporary files atomic_write left in `folders` (a crash mid-save); returns them."""
    import time

    removed = []
    now = time.time()
    for folder in folders:
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            if name.startswith(".") and TEMP_MARK in name:
                p = os.path.join(folder, name)
                try:
                    if os.path.isfile(p) and now - os.path.getmtime(p) >= min_age_s:
                        os.unlink(p)
                        removed.append(p)
                except OSError:
                    pass
    return removed


# ---------------------------------------------------------------------------------------------
# Base-model fingerprint
# ---------------------------------------------------------------------------------------------

FINGERPRINT_TENSORS = 16
FINGERPRINT_VALUES = 1024
_UNET_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def model_fingerprint(unet_state: Mapping[str, torch.Tensor]) -> str:
    """Cheap, stable fingerprint of a UNet: 'ds1-<16 hex>'.

    `unet_state` maps the UNet's state-dict keys (ldm names as in ComfyUI's
    ``model.model.diffusion_model.state_dict()``; a checkpoint's ``model.diffusion_model.`` or
    ``diffusion_model.`` prefix is stripped) to tensors. In ComfyUI pass
    ``trainer.hosts.comfy.unet_base_state(MODEL)``, which substitutes the unpatched weights when a
    patched clone is currently loaded.

    Hashes the names and shapes of all weight matrices/kernels, plus 1024 evenly strided values of 16
    evenly spaced ones (rounded to bf16, so fp32/fp16/bf16 loads of the same checkpoint agree).
    Reads ~16 K values: milliseconds even for SDXL."""
    state = {}
    for k, v in unet_state.items():
        for p in _UNET_PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
                break
        state[k] = v
    keys = sorted(k for k, v in state.items()
                  if isinstance(v, torch.Tensor) and v.is_floating_point() and v.ndim >= 2 and k.endswith(".weight"))
    if not keys:
        raise WeightFileError("cannot fingerprint the model: its UNet state has no weight matrices")
    h = hashlib.sha256(f"ds-fingerprint-v1|{len(keys)}|".encode())
    for k in keys:
        h.update(f"{k}:{tuple(state[k].shape)};".encode())
    n = min(FINGERPRINT_TENSORS, len(keys))
    picks = sorted({round(i * (len(keys) - 1) / max(1, n - 1)) for i in range(n)})
    for i in picks:
        t = state[keys[i]]
        if t.device.type == "meta":
            raise WeightFileError(f"cannot fingerprint the model: weight {keys[i]} is not materialised (meta device)")
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // FINGERPRINT_VALUES)
        sample = flat[::step][:FINGERPRINT_VALUES].to("cpu", torch.float32).to(torch.bfloat16)
        h.update(keys[i].encode())
        h.update(sample.view(torch.int16).numpy().tobytes())
    return "ds1-" + h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------

def build_metadata(*, kind: str, family: str, title: str, method: str, rank: int | None = None,
                   alpha: float | None = None, training: dict | None = None, trigger: str = "",
                   fingerprint: str = "", steps: int | None = None, resolution: int | None = None,
                   learning_rate: float | None = None, dtype=None, extra: dict | None = None) -> dict[str, str]:
    """Metadata read by A1111 (ss_*), kohya/modelspec tools and by us (domainstudio.*).

    kind: 'lora' | 'diff' | 'svd_lora' (UNet deltas) or 'embedding' (textual inversion).
    family: 'sd1' | 'sd2' | 'sdxl' (as trainer.hosts.comfy.model_family reports it)."""
    if family not in ARCHITECTURES:
        raise WeightFileError(f"family={family!r} unknown; one of {', '.join(ARCHITECTURES)}")
    arch, base = ARCHITECTURES[family]
    is_embedding = kind == "embedding"
    md = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{arch}/{'textual-inversion' if is_embedding else 'lora'}",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "ss_output_name": title,
        "ss_base_model_version": base,
        "ss_v2": str(family == "sd2"),
        "domainstudio.format_version": FORMAT_VERSION,
        "domainstudio.kind": kind,
        "domainstudio.method": method,
        "domainstudio.family": family,
    }
    if not is_embedding:
        md["ss_network_module"] = "networks.lora"
    if trigger:
        md["modelspec.trigger_phrase"] = trigger
        md["domainstudio.trigger"] = trigger
    if fingerprint:
        md["domainstudio.base_fingerprint"] = fingerprint
    if resolution:
        md["modelspec.resolution"] = f"{int(resolution)}x{int(resolution)}"
        md["ss_resolution"] = f"({int(resolution)}, {int(resolution)})"
    if steps is not None:
        md["ss_steps"] = str(int(steps))
        md["ss_max_train_steps"] = str(int(steps))
        md["domainstudio.steps"] = str(int(steps))
    if learning_rate is not None:
        md["ss_learning_rate"] = str(learning_rate)
    if dtype is not None:
        md["domainstudio.dtype"] = dtype_name(dtype)
    if rank is not None:
        md["ss_network_dim"] = str(rank)
    if alpha is not None:
        md["ss_network_alpha"] = str(alpha)
    if training:
        md["domainstudio.training"] = json.dumps(training, sort_keys=True, default=str)
    for k, v in (extra or {}).items():
        md[k] = str(v)
    return md


def check_compatible(metadata: Mapping[str, str], *, family: str | None = None, fingerprint: str | None = None,
                     override: bool = False, name: str = "file") -> list[str]:
    """Compare a file's metadata with the loaded model. Returns the mismatches (empty when fine);
    raises WeightFileError listing them unless `override`. Files without our metadata pass on
    what they do not state (architecture still comes from modelspec/ss_base_model_version)."""
    problems = []
    file_family = metadata.get("domainstudio.family") or _family_from_metadata(metadata)
    if family and file_family and file_family != family:
        problems.append(f"it was made for a {file_family} model but the loaded model is {family}")
    fp = metadata.get("domainstudio.base_fingerprint")
    if fingerprint and fp and fp != fingerprint and not problems:
        problems.append(f"it was trained on base model {fp} but the loaded model is {fingerprint} (a different checkpoint)")
    if problems and not override:
        raise WeightFileError(f"{name}: {'; '.join(problems)}. Load the matching model, or set ignore_mismatch "
                              "to apply it anyway")
    return problems


def _family_from_metadata(md: Mapping[str, str]) -> str | None:
    arch = md.get("modelspec.architecture", "")
    base = md.get("ss_base_model_version", "")
    for fam, (a, b) in ARCHITECTURES.items():
        if (arch and arch.split("/")[0] == a) or (base and base == b):
            return fam
    if arch.startswith("stable-diffusion-xl") or base.startswith("sdxl"):
        return "sdxl"
    if arch.startswith("stable-diffusion-v2") or base.startswith("sd_v2"):
        return "sd2"
    if arch.startswith("stable-diffusion-v1") or base.startswith("sd_v1"):
        return "sd1"
    return None


# ---------------------------------------------------------------------------------------------
# Writing and reading
# ---------------------------------------------------------------------------------------------

def save_delta(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str], dtype=torch.float16,
               overwrite: bool = False) -> str:
    """Write `tensors` (floating ones cast to `dtype`: torch dtype or 'fp16'/'bf16'/'fp32') +
    metadata to `path` atomically; returns the path. Refuses an existing file unless overwrite."""
    import safetensors.torch

    dtype = resolve_dtype(dtype)
    if not tensors:
        raise WeightFileError("refusing to write an empty delta file")
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise WeightFileError(f"delta has non-finite values in {len(bad)} tensors (first: {bad[0]}); not written")
    out = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous() for k, v in tensors.items()}
    bad = [k for k, v in out.items() if not torch.isfinite(v).all()]
    if bad:
        raise WeightFileError(f"delta overflows {dtype_name(dtype)} in {len(bad)} tensors (first: {bad[0]}); save as fp32 or bf16")
    md = {k: str(v) for k, v in metadata.items()}
    md.setdefault("domainstudio.dtype", dtype_name(dtype))
    return atomic_write(path, lambda tmp: safetensors.torch.save_file(out, tmp, metadata=md), overwrite=overwrite)


def read_weight_file(path: str, name: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file, or of a .pt/.bin/.ckpt through
    torch.load(weights_only=True) (never unpickles code; metadata is then empty). Truncated or
    corrupt files raise WeightFileError naming the file as `name` (default: its base name; never
    the server path)."""
    name = name or os.path.basename(path)
    if not os.path.isfile(path):
        raise WeightFileError(f"{name}: no such file")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".safetensors", ".sft"):
        return read_weight_file_any(path, name)
    if ext in (".pt", ".bin", ".ckpt", ".pth"):
        return _torch_load_safe(path, name), {}
    raise WeightFileError(f"{name}: unsupported extension {ext!r}; use .safetensors (or .pt/.bin)")


def read_weight_file_any(path: str, name: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file whatever its extension (.dsstate sidecars)."""
    from safetensors import safe_open

    name = name or os.path.basename(path)
    try:
        with safe_open(path, "pt", device="cpu") as f:
            md = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError / OSError types
        raise WeightFileError(f"{name} is not a readable safetensors file (truncated or corrupt?): "
                              f"{type(e).__name__}") from None
    return tensors, md


def _torch_load_safe(path: str, name: str | None = None):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightFileError(f"{name or os.path.basename(path)} could not be read with torch.load(weights_only=True) "
                              f"(truncated, corrupt, or it holds pickled objects other than tensors, which are never "
                              f"unpickled here): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


# ---------------------------------------------------------------------------------------------
# Conversions between delta forms
# ---------------------------------------------------------------------------------------------

def _lora_modules(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    return sorted({k[: -len(".lora_up.weight")] for k in tensors if k.endswith(".lora_up.weight")})


def lora_to_diff(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LoRA entries (kohya names) -> full weight differences `<name>.diff` = up @ down * alpha/rank
    (computed in fp32); non-LoRA entries are passed through."""
    out = {}
    names = _lora_modules(tensors)
    for name in names:
        up = tensors[f"{name}.lora_up.weight"].float()
        down = tensors[f"{name}.lora_down.weight"].float()
        if f"{name}.lora_down.weight" not in tensors:
            raise WeightFileError(f"{name} has lora_up but no lora_down")
        rank = down.shape[0]
        alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else float(rank)
        d = (up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)) * (alpha / rank)
        out[f"{name}.diff"] = d.reshape(up.shape[0], *down.shape[1:]) if down.ndim == 4 else d
    for k, v in tensors.items():
        if not any(k.startswith(n + ".") for n in names):
            out[k] = v
    return out


@dataclass
class SvdReport:
    rank: int
    rel_error: float  # ||D - LoRA||_F / ||D||_F over all extracted layers together
    max_layer_rel_error: float
    layers: int

    def describe(self) -> str:
        return (f"SVD LoRA rank {self.rank}: relative reconstruction error {self.rel_error:.4f} overall, "
                f"worst layer {self.max_layer_rel_error:.4f} ({self.layers} layers)")


def extract_lora_svd(tensors: Mapping[str, torch.Tensor], rank: int) -> tuple[dict[str, torch.Tensor], SvdReport]:
    """LoRA (kohya names, alpha = rank so the scale is 1) from full differences `<name>.diff` by
    truncated SVD at `rank` (capped per layer at min(out, in*kh*kw)). Entries that are not weight
    matrices / kernels (1-D diffs, `.diff_b`) are kept as they are. LoRA entries are first
    materialised, so a LoRA can also be re-factored at another rank."""
    if not isinstance(rank, int) or rank < 1:
        raise WeightFileError(f"svd rank={rank!r} invalid; use an integer >= 1")
    if any(k.endswith(".lora_up.weight") for k in tensors):
        tensors = lora_to_diff(tensors)
    out = {}
    err2 = tot2 = 0.0
    worst = 0.0
    layers = 0
    for k, v in tensors.items():
        if not (k.endswith(".diff") and v.ndim in (2, 4)):
            out[k] = v
            continue
        name = k[: -len(".diff")]
        d = v.float().reshape(v.shape[0], -1)
        r = min(rank, *d.shape)
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        up = u[:, :r] * s[:r]
        down = vh[:r]
        e2 = float((s[r:] ** 2).sum())
        n2 = float((s ** 2).sum())
        err2 += e2
        tot2 += n2
        worst = max(worst, math.sqrt(e2 / n2) if n2 > 0 else 0.0)
        layers += 1
        if v.ndim == 4:
            up = up.reshape(up.shape[0], r, 1, 1)
            down = down.reshape(r, *v.shape[1:])
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(r))
    if not layers:
        raise WeightFileError("no full weight differences (.diff) to extract a LoRA from")
    rel = math.sqrt(err2 / tot2) if tot2 > 0 else 0.0
    return out, SvdReport(rank, rel, worst, layers)
