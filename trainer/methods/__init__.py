"""The registry of training methods: name -> Method (trainer/methods/base.py).

A new method touches its own module, its test, and one line here."""

from __future__ import annotations

from .base import Method, Prompts, Stage, StageInputs
from .domainstudio import DomainStudio
from .finetune import Finetune
from .personalize import DreamBooth, DreamBoothNoPrior, RareToken, TextualInversion

METHODS: dict[str, Method] = {m.name: m for m in (
    DomainStudio(),
    Finetune(),
    RareToken(),
    TextualInversion(),
    DreamBooth(),
    DreamBoothNoPrior(),
)}


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"method={name!r} is unknown; choose one of {', '.join(METHODS)}") from None


def node_option_defaults(node: str) -> dict:
    """The RunOptions defaults a node shows: those of the methods it offers (which must agree)."""
    out: dict = {}
    for name in for_node(node):
        for k, v in METHODS[name].option_defaults.items():
            if out.setdefault(k, v) != v:
                raise ValueError(f"the {node} node's methods disagree on the default of {k}: {out[k]!r} vs {v!r}")
    return out


def for_node(node: str) -> list[str]:
    """Method names a node offers ("domain" or "subject"), registry order."""
    return [n for n, m in METHODS.items() if m.node == node]


__all__ = ["METHODS", "Method", "Prompts", "Stage", "StageInputs", "get", "for_node", "node_option_defaults"]
