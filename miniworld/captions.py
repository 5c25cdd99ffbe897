"""The caption recipe of the miniworld UNet (config.py, "captions"): named captions per training
concept, filler-word variants, domain captions, and the empty caption for classifier-free guidance.

Contexts are indexed as ``[concept 0: named captions..., concept 1: ..., domain captions..., ""]``;
:func:`draw` picks one index per training example.
"""

from __future__ import annotations

import json
import os
import re

import torch

from . import config, data


def _vocab_path() -> str:
    return os.path.join(config.comfy_dir(), "comfy", "sd1_tokenizer", "vocab.json")


def fillers(names: list[str]) -> list[str]:
    """FILLER_COUNT whole-word CLIP tokens (3-6 letters), seeded, never a word of ``names`` (all
    concepts, held-out included), a template word or a RESERVED_WORDS identifier such as "sks"."""
    with open(_vocab_path(), encoding="utf-8") as f:
        vocab = json.load(f)
    banned = {w for n in names for w in re.findall(r"[a-z]+", n.lower())}
    banned |= {"a", "an", "of", "emoji", "emojis"} | set(config.RESERVED_WORDS)
    words = sorted({t[:-4] for t in vocab if t.endswith("</w>") and re.fullmatch(r"[a-z]{3,6}", t[:-4])} - banned)
    g = torch.Generator().manual_seed(config.FILLER_SEED)
    pick = torch.randperm(len(words), generator=g)[:config.FILLER_COUNT].tolist()
    return sorted(words[i] for i in pick)


def named_captions(name: str, concept_index: int, words: list[str]) -> list[str]:
    """The captions a training concept is drawn with: CAPTION_TEMPLATES, then N_FILLER_PER_NAME
    filler variants (the filler words chosen from the concept's index, so the set is fixed)."""
    out = data.captions_for(name)
    for k in range(config.N_FILLER_PER_NAME):
        w = words[(concept_index * 7919 + k * 104729) % len(words)]
        out.append(config.FILLER_TEMPLATE.format(filler=w, name=name))
    return out


def domain_captions(words: list[str]) -> list[str]:
    return list(config.DOMAIN_CAPTIONS) + [config.DOMAIN_FILLER_TEMPLATE.format(filler=w) for w in words]


class CaptionSet:
    """All training captions of ``train_names`` (in order) with the index layout of the contexts."""

    def __init__(self, train_names: list[str], all_names: list[str]):
        self.words = fillers(all_names)
        self.per_name = len(config.CAPTION_TEMPLATES) + config.N_FILLER_PER_NAME
        self.captions = [c for i, n in enumerate(train_names) for c in named_captions(n, i, self.words)]
        self.domain_start = len(self.captions)
        self.captions += domain_captions(self.words)
        self.n_domain = len(self.captions) - self.domain_start
        self.empty = len(self.captions)
        self.captions.append("")

    def draw(self, concept: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """One context index per example of concept indices ``concept`` (LongTensor)."""
        b = concept.shape[0]
        u = torch.rand(b, generator=g)
        named = concept * self.per_name + torch.randint(0, self.per_name, (b,), generator=g)
        # domain: the plain "an emoji" half of the time, else a filler variant
        plain = torch.rand(b, generator=g) < 0.5
        dom = self.domain_start + torch.where(plain, torch.zeros_like(concept),
                                              torch.randint(1, self.n_domain, (b,), generator=g))
        out = torch.where(u < config.CAPTION_DROPOUT + config.DOMAIN_CAPTION_P, dom, named)
        return torch.where(u < config.CAPTION_DROPOUT, torch.full_like(concept, self.empty), out)
