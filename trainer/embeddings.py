"""Textual-inversion embeddings as files that ComfyUI, A1111/Forge and diffusers all read.

Default format (`.safetensors`), chosen because every host reads it unchanged:

* SD1.x: ``{"clip_l": [n, 768]}`` — one tensor. ComfyUI (``embedding:NAME``) reads its ``clip_l``
  key; A1111/Forge take a dict with exactly one tensor; diffusers' ``load_textual_inversion`` takes
  a one-tensor dict (pass ``token=NAME``, else the token would be the key ``clip_l``).
* SDXL: ``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` — ComfyUI's and A1111's SDXL layout;
  diffusers loads each half into its text encoder (``text_encoder`` / ``text_encoder_2``).
* SD2.x: ``{"clip_h": [n, 1024]}`` (ComfyUI's key for OpenCLIP-H; A1111/diffusers as for SD1).

In ComfyUI and A1111 the trigger word is the file name, so embeddings are saved as
``models/embeddings/<trigger>.safetensors`` (see trainer.deltas.exact_path).

`.pt` is written only on request, in A1111's own ``string_to_param`` layout (SD1/SD2) or as the
``clip_l``/``clip_g`` dict (SDXL). Reading accepts those, kohya's ``emb_params``, diffusers'
``{token: tensor}``, and A1111 ``.pt`` files — ``.pt``/``.bin`` only through
``torch.load(weights_only=True)``: nothing is ever unpickled.
"""

from __future__ import annotations

import os

import torch

from .deltas import WeightFileError, _torch_load_safe, atomic_write, dtype_name, resolve_dtype

# Encoder key -> width of its token embeddings in the standard architectures. Only a fallback for
# reading files whose single tensor names no encoder; writing checks against the loaded model's own
# widths (`widths`), so a model with a 256-wide text encoder saves 256-wide vectors.
ENCODER_DIMS = {"clip_l": 768, "clip_g": 1280, "clip_h": 1024}
_VALID_SETS = ({"clip_l"}, {"clip_l", "clip_g"}, {"clip_h"})


def _check_vectors(vectors: dict[str, torch.Tensor], widths: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Normalise and check {'clip_l': [n, d], ...}. `widths` (from the loaded model) fixes the
    expected width per encoder; without it any width is accepted."""
    if not isinstance(vectors, dict) or set(vectors) not in _VALID_SETS:
        got = sorted(vectors) if isinstance(vectors, dict) else type(vectors).__name__
        raise WeightFileError(f"embedding vectors must have keys 'clip_l' (SD1), 'clip_l'+'clip_g' (SDXL) or 'clip_h' "
                              f"(SD2); got {got}")
    out = {}
    n = None
    for k, v in vectors.items():
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise WeightFileError(f"embedding vectors[{k!r}] must be a floating tensor")
        if v.ndim == 1:
            v = v.unsqueeze(0)
        want = (widths or {}).get(k)
        if v.ndim != 2 or v.shape[0] < 1 or (want is not None and v.shape[1] != want):
            raise WeightFileError(f"embedding vectors[{k!r}] has shape {tuple(v.shape)}; this model's {k} expects "
                                  f"[n, {want if want is not None else 'width'}]")
        if n is not None and v.shape[0] != n:
            raise WeightFileError(f"embedding halves differ in token count ({n} vs {v.shape[0]}); both need the same n")
        n = v.shape[0]
        if not torch.isfinite(v).all():
            raise WeightFileError(f"embedding vectors[{k!r}] has non-finite (NaN or infinite) values")
        out[k] = v
    return out


def save_embedding(path: str, vectors: dict[str, torch.Tensor], metadata: dict[str, str],
                   dtype=torch.float16, overwrite: bool = False, widths: dict[str, int] | None = None) -> str:
    """Write an embedding atomically; returns the path.

    vectors: {"clip_l": [n, 768]} (SD1), {"clip_l": [n, 768], "clip_g": [n, 1280]} (SDXL) or
    {"clip_h": [n, 1024]} (SD2). The format follows the extension: `.safetensors` (default,
    loads everywhere, carries `metadata`) or `.pt` (A1111 `string_to_param` for one encoder,
    the clip_l/clip_g dict for SDXL; metadata keeps only name/step). Refuses an existing file
    unless overwrite. `widths`: the loaded model's encoder widths, checked when given."""
    vectors = _check_vectors(vectors, widths)
    dtype = resolve_dtype(dtype)
    out = {k: v.detach().to("cpu", dtype).contiguous() for k, v in vectors.items()}
    if not all(torch.isfinite(v).all() for v in out.values()):
        raise WeightFileError(f"embedding overflows {dtype_name(dtype)}; save as fp32 or bf16")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        import safetensors.torch

        md = {k: str(v) for k, v in metadata.items()}
        md.setdefault("domainstudio.dtype", dtype_name(dtype))
        md.setdefault("domainstudio.vectors", str(next(iter(out.values())).shape[0]))
        return atomic_write(path, lambda tmp: safetensors.torch.save_file(out, tmp, metadata=md), overwrite=overwrite)
    if ext == ".pt":
        name = os.path.splitext(os.path.basename(path))[0]
        if len(out) == 1:
            (t,) = out.values()
            data = {"string_to_token": {"*": 265}, "string_to_param": {"*": t}, "name": name,
                    "step": int(metadata.get("domainstudio.steps", 0) or 0)}
        else:
            data = dict(out)
        return atomic_write(path, lambda tmp: torch.save(data, tmp), overwrite=overwrite)
    raise WeightFileError(f"{path}: embeddings are saved as .safetensors (recommended) or .pt, not {ext!r}")


def _by_width(t: torch.Tensor, where: str, widths: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    if t.ndim == 1:
        t = t.unsqueeze(0)
    if t.ndim == 3 and t.shape[0] == 1:
        t = t[0]
    for k, dim in (widths or {}).items():  # the loaded model's encoders first
        if t.ndim == 2 and t.shape[1] == dim:
            return {k: t}
    for k, dim in ENCODER_DIMS.items():
        if t.ndim == 2 and t.shape[1] == dim:
            return {k: t}
    raise WeightFileError(f"{where}: embedding tensor of shape {tuple(t.shape)} matches no known text encoder "
                          f"(widths {', '.join(f'{k} {d}' for k, d in ENCODER_DIMS.items())})")


def vectors_from_data(data, where: str = "embedding", widths: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Normalise the contents of an embedding file to {'clip_l'|'clip_g'|'clip_h': [n, dim]}."""
    if not isinstance(data, dict):
        raise WeightFileError(f"{where}: not an embedding (expected a dict of tensors, got {type(data).__name__})")
    if "string_to_param" in data:  # A1111 / original textual inversion
        params = data["string_to_param"]
        if not isinstance(params, dict) or not params:
            raise WeightFileError(f"{where}: 'string_to_param' holds no tensor")
        return _by_width(next(iter(params.values())), where, widths)
    if any(k in data for k in ENCODER_DIMS):  # ComfyUI / A1111 SDXL layout (and ours)
        out = {k: (v.unsqueeze(0) if v.ndim == 1 else v) for k, v in data.items() if k in ENCODER_DIMS}
        for k, v in out.items():
            if v.ndim != 2:
                raise WeightFileError(f"{where}: {k!r} has shape {tuple(v.shape)}; expected [n, width]")
        if set(out) not in _VALID_SETS:
            return out
        try:
            return _check_vectors(out)
        except WeightFileError as e:  # name the file being read
            raise WeightFileError(f"{where}: {e}") from None
    if "emb_params" in data:  # kohya
        return _by_width(data["emb_params"], where, widths)
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:  # diffusers {token: tensor}, or any single-tensor dict
        return _by_width(next(iter(tensors.values())), where, widths)
    raise WeightFileError(f"{where}: unrecognised embedding layout (keys {sorted(map(str, data))[:6]}); expected "
                          "clip_l/clip_g, string_to_param, emb_params or a single tensor")


def load_embedding(path: str) -> dict[str, torch.Tensor]:
    """{'clip_l': [n, 768]} / {'clip_l', 'clip_g'} / {'clip_h'} from any common embedding file
    (.safetensors; .pt/.bin through torch.load(weights_only=True)). Tensors come back as fp32."""
    return {k: v.float() for k, v in read_embedding(path)[0].items()}


def read_embedding(path: str, widths: dict[str, int] | None = None,
                   name: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(vectors, metadata) — metadata is empty for .pt/.bin files. `widths` (the loaded model's
    encoder widths) resolves single-tensor layouts of non-standard widths. Errors name the file as
    `name` (default: its base name; never the server path)."""
    name = name or os.path.basename(path)
    if not os.path.isfile(path):
        raise WeightFileError(f"{name}: no such embedding file")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        from .deltas import read_weight_file

        data, md = read_weight_file(path, name)
    elif ext in (".pt", ".bin"):
        data, md = _torch_load_safe(path, name), {}
    else:
        raise WeightFileError(f"{name}: unsupported embedding extension {ext!r}; use .safetensors, .pt or .bin")
    return vectors_from_data(data, name, widths), md


def family_of(vectors: dict[str, torch.Tensor]) -> str:
    """'sdxl' for clip_l+clip_g, 'sd2' for clip_h, 'sd1' for clip_l."""
    if "clip_g" in vectors:
        return "sdxl"
    if "clip_h" in vectors:
        return "sd2"
    return "sd1"
