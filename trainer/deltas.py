"""Trained deltas as portable safetensors files.

Keys use kohya names (``lora_unet_<ldm module path with _>``), the container that ComfyUI's stock
LoraLoader and A1111/Forge both read: LoRA as ``.lora_up.weight`` / ``.lora_down.weight`` /
``.alpha`` (scale alpha/rank), full deltas as ``.diff`` (see ../shared/HOST_FACTS.md).
Files are written to a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import os
import tempfile

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


def build_metadata(*, kind: str, family: str, title: str, method: str, rank: int | None = None,
                   alpha: float | None = None, training: dict | None = None, trigger: str = "") -> dict[str, str]:
    """Metadata read by A1111 (ss_*), kohya/modelspec tools and by us (domainstudio.*)."""
    arch, base = ARCHITECTURES.get(family, ARCHITECTURES["sd1"])
    md = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "ss_output_name": title,
        "ss_base_model_version": base,
        "ss_v2": str(family == "sd2"),
        "ss_network_module": "networks.lora",
        "domainstudio.kind": kind,  # "lora" | "diff"
        "domainstudio.method": method,
    }
    if trigger:
        md["modelspec.trigger_phrase"] = trigger
    if rank is not None:
        md["ss_network_dim"] = str(rank)
    if alpha is not None:
        md["ss_network_alpha"] = str(alpha)
    if training:
        md["domainstudio.training"] = json.dumps(training, sort_keys=True, default=str)
    return md


def save_delta(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str], dtype=torch.float16) -> str:
    """Write `tensors` (cast to `dtype`) + metadata to `path` atomically; returns the path."""
    import safetensors.torch

    if not tensors:
        raise ValueError("refusing to write an empty delta file")
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"delta has non-finite values in {len(bad)} tensors (first: {bad[0]}); not written")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    out = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        safetensors.torch.save_file(out, tmp, metadata={k: str(v) for k, v in metadata.items()})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def unique_path(folder: str, stem: str, ext: str = ".safetensors") -> str:
    """folder/stem_00001.safetensors, the first number not taken (never overwrites)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem).strip("._") or "delta"
    i = 1
    while True:
        p = os.path.join(folder, f"{safe}_{i:05d}{ext}")
        if not os.path.exists(p):
            return p
        i += 1
