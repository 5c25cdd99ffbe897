"""Which UNet layers a train mode trains, for every host: attention projections are named
`...attn1.to_q` / `...attn2.to_out.0` in both the ldm (ComfyUI, A1111) and the diffusers layout, so
one rule selects the same weights in each (tests compare the two selections)."""

from __future__ import annotations

from .errors import TrainingError

TRAIN_MODES = ("lora_attn", "lora_all", "full_attn", "full_all")
ATTN_LEAVES = ("to_q", "to_k", "to_v", "to_out.0")


def check_train_mode(mode: str) -> None:
    if mode not in TRAIN_MODES:
        raise TrainingError(f"train_mode={mode!r} is unknown; choose one of {', '.join(TRAIN_MODES)}")


def is_attention_projection(name: str) -> bool:
    """True for the self/cross-attention q, k, v and output projections of a transformer block."""
    return (".attn1." in name or ".attn2." in name) and name.endswith(ATTN_LEAVES)


def mode_selects(name: str, mode: str) -> bool:
    """Whether `mode` trains the (matrix-shaped) layer `name`: *_all trains every one, *_attn only
    the attention projections."""
    return not mode.endswith("_attn") or is_attention_projection(name)


def select_layers(named_modules, mode: str, is_candidate) -> list[str]:
    """Names of the modules (from `named_modules`, (name, module) pairs) that `mode` trains, among
    those the host can wrap (`is_candidate(module)`)."""
    check_train_mode(mode)
    names = [name for name, m in named_modules if is_candidate(m) and mode_selects(name, mode)]
    if not names:
        raise TrainingError(f"train_mode={mode!r} found no layers to train in this model")
    return names
