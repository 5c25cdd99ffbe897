"""ComfyUI CLIP for personalization: new token vectors that a stock CLIPTextEncode understands,
and backpropagation through the text encoder without editing ComfyUI.

* ComfyUI's CLIP layers add residuals in place (`x += ...` in comfy/clip_model.py), which autograd
  refuses to differentiate. `differentiable_text_encoder` gives those layer *instances* an
  out-of-place forward for the duration of a `with` block and restores them afterwards, so no other
  node ever sees a difference.
* A learned token is handed to ComfyUI the way it hands over embeddings: as tensors inside the token
  list (sd1_clip.SDClipModel.process_tokens splices them into the input embeddings, keeping
  gradients). `clip_with_token` returns a CLIP clone whose tokenizer (a patched copy; the input
  CLIP's is untouched) maps both the bare trigger word and `embedding:<trigger>` to the vectors.
"""

from __future__ import annotations

import contextlib
import copy
import re
import types

import torch

import comfy.clip_model
import comfy.model_management
import comfy.sd1_clip

from .comfy import make_autograd_safe


def _out_of_place_forward(self, x, mask=None, optimized_attention=None):
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    return x + self.mlp(self.layer_norm2(x))


@contextlib.contextmanager
def differentiable_text_encoder(clip):
    """Within the block, gradients flow through `clip`'s text encoder(s) to spliced token vectors.
    The encoder's own weights stay frozen (requires_grad False) and bit-identical."""
    clip.load_model()
    encoder = clip.cond_stage_model
    make_autograd_safe(encoder)  # weights loaded under inference mode cannot be saved for backward
    patched = []
    try:
        for m in encoder.modules():
            if isinstance(m, comfy.clip_model.CLIPLayer) and "forward" not in m.__dict__:
                m.forward = types.MethodType(_out_of_place_forward, m)
                patched.append(m)
        yield
    finally:
        for m in patched:
            del m.forward


def subtokenizers(tokenizer) -> dict[str, comfy.sd1_clip.SDTokenizer]:
    """{'clip_l': ..., 'clip_g': ...}: the per-encoder tokenizers of a ComfyUI CLIP tokenizer. The
    attribute names equal the encoder attributes of cond_stage_model and the embedding-file keys."""
    out = {k: v for k, v in vars(tokenizer).items() if isinstance(v, comfy.sd1_clip.SDTokenizer)}
    if not out:
        raise ValueError(f"this CLIP ({type(tokenizer).__name__}) has no CLIP-style tokenizer; "
                         "personalization supports SD1.x/SD2.x/SDXL text encoders")
    return out


def word_token_ids(tok: comfy.sd1_clip.SDTokenizer, word: str) -> list[int]:
    """Token ids of `word` alone, without start/end tokens."""
    ids = tok.tokenizer(word)["input_ids"]
    end = -1 if tok.tokenizer_adds_end_token else None
    return list(ids[tok.tokens_start:end])


def word_in_vocabulary(tok: comfy.sd1_clip.SDTokenizer, word: str) -> bool:
    """True when `word` is a whole word of the tokenizer's vocabulary (one token, end-of-word form)."""
    vocab = tok.tokenizer.get_vocab()
    return f"{word.lower()}</w>" in vocab


def input_embeddings(clip, key: str) -> torch.Tensor:
    """The token-embedding table of encoder `key` ('clip_l' / 'clip_g'), [vocab, dim]."""
    return getattr(clip.cond_stage_model, key).transformer.get_input_embeddings().weight


def init_vectors(clip, word: str, num_vectors: int) -> dict[str, torch.Tensor]:
    """Starting vectors for a new token: `word`'s embedding (mean of its tokens if it has several),
    repeated `num_vectors` times, for every encoder of `clip`. fp32, detached."""
    out = {}
    for key, tok in subtokenizers(clip.tokenizer).items():
        ids = word_token_ids(tok, word)
        if not ids:
            raise ValueError(f"init word {word!r} gives no tokens; use a plain English word")
        table = input_embeddings(clip, key)
        vec = table[ids].detach().float().mean(0)
        out[key] = vec.unsqueeze(0).repeat(num_vectors, 1).clone()
    return out


def _trigger_pattern(trigger: str) -> re.Pattern:
    return re.compile(r"(?<![\w:])" + re.escape(trigger) + r"(?![\w])", re.IGNORECASE)


def _rewrite(text: str, pattern: re.Pattern, trigger: str, identifier: str) -> str:
    """'a photo of ds_subject dog' -> 'a photo of embedding:ds_subject dog' (ComfyUI's embedding
    syntax needs a space or a line start before it)."""
    def sub(m):
        start = m.start()
        lead = "" if start == 0 or text[start - 1] in " \n(" else " "
        return f"{lead}{identifier}{trigger}"
    return pattern.sub(sub, text)


def _patched_tokenizer(tok, trigger: str, vectors: torch.Tensor):
    """A copy of SDTokenizer `tok` that resolves `trigger` (bare or as embedding:trigger) to `vectors`."""
    new = copy.copy(tok)
    if new.embedding_directory is None:
        new.embedding_directory = []  # ComfyUI only parses embedding:NAME when a directory is set
    pattern = _trigger_pattern(trigger)
    base_tokenize = type(tok).tokenize_with_weights
    base_lookup = tok._try_get_embedding
    low = trigger.lower()

    def _try_get_embedding(self, embedding_name: str):
        parts = embedding_name.split()
        first = parts[0] if parts else ""
        head, rest = first[: len(low)], first[len(low):]
        if head.lower() == low and (not rest or not (rest[0].isalnum() or rest[0] in "_-")):
            leftover = " ".join(([rest] if rest else []) + parts[1:])
            return vectors, leftover
        return base_lookup(embedding_name)

    def tokenize_with_weights(self, text: str, return_word_ids=False, **kwargs):
        return base_tokenize(self, _rewrite(text, pattern, trigger, self.embedding_identifier),
                             return_word_ids, **kwargs)

    new._try_get_embedding = types.MethodType(_try_get_embedding, new)
    new.tokenize_with_weights = types.MethodType(tokenize_with_weights, new)
    new.ds_trigger = trigger
    return new


def clip_with_token(clip, trigger: str, vectors: dict[str, torch.Tensor]):
    """A clone of `clip` whose prompts understand `trigger` (and embedding:`trigger`) as `vectors`
    ({'clip_l': [n, 768]} or, for SDXL, clip_l + clip_g). The input CLIP is not changed; the
    vectors are used as given (pass Parameters to train them, detached tensors to freeze them)."""
    out = clip.clone()
    tokenizer = copy.copy(clip.tokenizer)  # CLIP.clone() shares the tokenizer object
    subs = subtokenizers(clip.tokenizer)
    missing = set(subs) - set(vectors)
    if missing:
        raise ValueError(f"vectors for {sorted(missing)} are missing (this CLIP has {sorted(subs)})")
    for key, tok in subs.items():
        setattr(tokenizer, key, _patched_tokenizer(tok, trigger, vectors[key]))
    out.tokenizer = tokenizer
    return out


def encode(clip, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(cross-attention context [1, T, D], pooled [1, P] or None), as CLIPTextEncode computes them,
    with gradients to any trainable vectors when grad mode is on."""
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return cond, pooled
