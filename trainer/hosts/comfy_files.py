"""Applying saved files to a ComfyUI MODEL / CLIP (the Load Weights node): a delta through the
stock LoRA loader, an embedding as vectors a prompt's `embedding:NAME` resolves to, each after
checking that the file fits the loaded model (architecture, base fingerprint, layer shapes, finite
values). Nothing here reveals a server path: files are named by their list name."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import comfy.sd

from .. import deltas, embeddings
from . import comfy_compat as compat
from .comfy import fingerprint, model_family

_ADAPTER_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", ".alpha", ".dora_scale",
                     ".lora_A.weight", ".lora_B.weight", ".lora.up.weight", ".lora.down.weight", ".diff", ".diff_b",
                     ".set_weight", ".w_norm", ".b_norm", ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b",
                     ".hada_t1", ".hada_t2", ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a",
                     ".lokr_w2_b", ".lokr_t2", ".oft_blocks", ".rescale")


def _split(key: str) -> tuple[str, str]:
    for s in _ADAPTER_SUFFIXES:
        if key.endswith(s):
            return key[: -len(s)], s
    base, _, rest = key.partition(".")
    return base, "." + rest


def _key_map(model, clip) -> dict[str, str]:
    import comfy.lora

    key_map = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    return key_map


def check_delta(model, clip, tensors: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """(keys that match no layer, keys whose shape does not fit their layer) of a LoRA/diff state
    dict for this MODEL (and CLIP when given), checked before anything is patched."""
    import comfy.lora_convert

    key_map = _key_map(model, clip)
    converted = comfy.lora_convert.convert_lora(dict(tensors))
    shapes = {}
    if model is not None:
        shapes.update({k: tuple(v.shape) for k, v in model.model.state_dict().items()})
    if clip is not None:
        shapes.update({k: tuple(v.shape) for k, v in clip.cond_stage_model.state_dict().items()})
    missing, wrong = [], []
    for k, v in converted.items():
        if k.startswith("bundle_emb."):
            continue
        base, suffix = _split(k)
        target = key_map.get(base)
        if target is None:
            missing.append(k)
            continue
        target = target[0] if isinstance(target, tuple) else target
        shape = shapes.get(target)
        if shape is None or not isinstance(v, torch.Tensor):
            continue
        out_dim, in_numel = shape[0], int(torch.Size(shape[1:]).numel()) if len(shape) > 1 else 1
        ok = True
        if suffix in (".diff", ".set_weight"):
            ok = tuple(v.shape) == shape
        elif suffix == ".diff_b":
            ok = v.numel() == out_dim
        elif suffix in (".lora_up.weight", ".lora_B.weight", ".lora.up.weight"):
            ok = v.shape[0] == out_dim
        elif suffix in (".lora_down.weight", ".lora_A.weight", ".lora.down.weight"):
            ok = v[0].numel() == in_numel
        if not ok:
            wrong.append(f"{k} {tuple(v.shape)} vs layer {shape}")
    return missing, wrong


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
            and not torch.isfinite(v).all()]


@dataclass
class AppliedWeights:
    model: object
    clip: object
    info: str
    mismatches: list


def apply_delta_file(model, clip, path: str, strength_model: float = 1.0, strength_clip: float = 1.0,
                     override: bool = False, name: str = "file") -> AppliedWeights:
    """Patch MODEL (and CLIP for text-encoder deltas) with a saved LoRA/diff file, after checking its
    values, architecture (metadata, key names, layer shapes) and base fingerprint."""
    tensors, md = deltas.read_weight_file(path, name)
    bad = non_finite(tensors)
    if bad:
        raise deltas.WeightFileError(f"{name} holds NaN or infinite values in {len(bad)} of {len(tensors)} tensors "
                                     f"(first: {bad[0]}); it would break every image. Not applied: re-save or retrain it")
    mismatches = deltas.check_compatible(md, family=model_family(model), fingerprint=fingerprint(model),
                                         override=override, name=name)
    has_te = any(k.startswith(("lora_te", "text_encoders.")) for k in tensors)
    missing, wrong = check_delta(model, clip if has_te else None, tensors)
    if has_te and clip is None:
        mismatches.append("the file has text-encoder weights but no CLIP is connected; they are ignored")
    for keys, what in ((missing, "match no layer of the loaded model"), (wrong, "have the wrong shape for their layer")):
        if not keys:
            continue
        msg = (f"{len(keys)} of {len(tensors)} weights in {name} {what} (first: {keys[0]}): it was made for another "
               "architecture")
        if not override:
            raise deltas.WeightFileError(msg + ". Load the matching model, or set ignore_mismatch to apply the rest")
        mismatches.append(msg)
    if missing or wrong:
        drop = set(missing) | {w.split(" ")[0] for w in wrong}
        bases = {_split(k)[0] for k in drop}
        tensors = {k: v for k, v in tensors.items() if _split(k)[0] not in bases}
    new_model, new_clip = comfy.sd.load_lora_for_models(model, clip if has_te else None, tensors, strength_model,
                                                        strength_clip)
    info = (f"{name}: {md.get('domainstudio.kind', 'delta')} ({md.get('domainstudio.method', 'unknown method')}), "
            f"{len(tensors)} tensors, strength {strength_model:g}")
    if mismatches:
        info += " | applied despite: " + "; ".join(mismatches)
    return AppliedWeights(new_model, new_clip if new_clip is not None else clip, info, mismatches)


def clip_embedding_keys(clip) -> set[str]:
    return set(compat.sub_tokenizers(clip.tokenizer))


def apply_embedding_file(clip, path: str, strength: float = 1.0, model=None, override: bool = False,
                         name: str = "file", word: str | None = None) -> AppliedWeights:
    """CLIP that understands `embedding:<word>` (default: the file stem) as the file's vectors ×
    strength, after checking the file's values, text encoders (and, with a MODEL, its base)."""
    import os

    widths = {k: int(compat.input_embedding_table(clip, k).shape[1]) for k in clip_embedding_keys(clip)}
    vectors, md = embeddings.read_embedding(path, widths, name)
    word = word or os.path.splitext(os.path.basename(path))[0]
    bad = non_finite(vectors)
    if bad:
        raise deltas.WeightFileError(f"{name} holds NaN or infinite values ({', '.join(bad)}); not applied: re-save "
                                     "or retrain it")
    mismatches = []
    wanted = set(widths)
    usable = {k: v for k, v in vectors.items() if k in wanted and v.shape[-1] == widths[k]}
    if set(usable) != wanted or set(vectors) != wanted:
        msg = (f"{name} holds vectors for {sorted((k, v.shape[-1]) for k, v in vectors.items())} "
               f"({embeddings.family_of(vectors)}) but the CLIP's text encoders are {sorted(widths.items())}")
        if not override or not usable:
            raise deltas.WeightFileError(msg + ". Use the CLIP of the model the embedding was trained for"
                                         + ("" if usable else " (nothing of it can be applied)"))
        mismatches.append(msg)
    if model is not None:
        mismatches += deltas.check_compatible(md, family=model_family(model), fingerprint=fingerprint(model),
                                              override=override, name=name)
    scaled = {k: v.float() * float(strength) for k, v in usable.items()}
    new = compat.clip_with_words(clip, {word: scaled}, bare=False)
    n = next(iter(usable.values())).shape[0]
    info = f"{name}: embedding, {n} vector(s); write embedding:{word} in the prompt"
    if mismatches:
        info += " | applied despite: " + "; ".join(mismatches)
    return AppliedWeights(model, new, info, mismatches)
