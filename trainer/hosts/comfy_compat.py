"""The one place that relies on ComfyUI details beyond its documented node-facing surface.

Everything here detects a *capability* (a signature, an attribute, a behaviour), never a version
string, and tests/test_host_compat.py exercises it on every tested host. README's "Host
compatibility" section lists what each function relies on and why. The rest of the pack uses
ComfyUI's public surface: ModelPatcher (clone, add_weight_wrapper, set_model_compute_dtype),
comfy.model_management.load_models_gpu, BaseModel.apply_model / process_latent_in / encode_adm,
model_sampling, CLIP.tokenize / encode_from_tokens, comfy.sample.sample, comfy.sd /
comfy.lora for LoRA files, comfy.weight_adapter for trainable LoRA, folder_paths, ProgressBar and
PromptServer messaging.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import types
from typing import Callable

import torch

# ---------------------------------------------------------------------------------------------
# Checkpoints (tests/tiny_models.py, miniworld/build.py)
# ---------------------------------------------------------------------------------------------


def checkpoint_state_dict(base_model, clip_state_dict=None, vae_state_dict=None) -> dict[str, torch.Tensor]:
    """A full-checkpoint state dict (UNet + CLIP + VAE, checkpoint key layout) of a ComfyUI
    BaseModel, as comfy.sd.save_checkpoint writes it.

    BaseModel.state_dict_for_saving took (clip_state_dict, vae_state_dict, ...) up to 0.3.x and takes
    the UNet state first since (unet_state_dict, clip_state_dict=..., ...); a positional call writes
    a file ComfyUI cannot detect, so the UNet state is passed by keyword when the signature asks."""
    params = inspect.signature(base_model.state_dict_for_saving).parameters
    kwargs = {"clip_state_dict": clip_state_dict, "vae_state_dict": vae_state_dict}
    if "unet_state_dict" in params:
        kwargs["unet_state_dict"] = base_model.diffusion_model.state_dict()
    return base_model.state_dict_for_saving(**kwargs)


# ---------------------------------------------------------------------------------------------
# What this ComfyUI can do (nodes check it when queued)
# ---------------------------------------------------------------------------------------------

def host_version() -> str:
    try:
        import comfyui_version

        return str(comfyui_version.__version__)
    except Exception:  # noqa: BLE001 - a tree without the version file
        return "unknown"


def _has(path: str) -> bool:
    import importlib

    module, _, attr = path.rpartition(":")
    try:
        obj = importlib.import_module(module)
    except Exception:  # noqa: BLE001
        return False
    for part in attr.split(".") if attr else []:
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


# capability -> what the pack does with it
CAPABILITIES = {
    "comfy.model_patcher:ModelPatcher.add_weight_wrapper": "trainable weights (LoRA / full deltas)",
    "comfy.model_patcher:ModelPatcher.set_model_compute_dtype": "bf16 training",
    "comfy.weight_adapter.lora:LoRAAdapter.create_train": "trainable LoRA layers",
    "comfy.samplers:CFGGuider.inner_set_conds": "the training session (custom-sampling guider)",
    "comfy.samplers:Sampler": "the training session (custom sampler)",
    "comfy.sample:sample": "class images and previews",
    "comfy.sd:load_lora_for_models": "the returned MODEL and Load Weights",
    "comfy.lora:model_lora_keys_unet": "checking LoRA files against the model",
    "comfy.sd1_clip:SDTokenizer.tokenize_with_weights": "new tokens in prompts",
    "comfy.model_management:load_models_gpu": "loading models for training",
}


def missing_capabilities(needed=None) -> list[str]:
    """The capabilities (of CAPABILITIES, or `needed`) this ComfyUI lacks, as readable lines."""
    return [f"{path.replace(':', '.')} ({why})" for path, why in (needed or CAPABILITIES).items() if not _has(path)]


def require(node: str, needed=None) -> None:
    """Raise a clear error naming the ComfyUI version and what is missing (before any work)."""
    missing = missing_capabilities(needed)
    if missing:
        raise RuntimeError(
            f"{node} cannot run on this ComfyUI ({host_version()}): it lacks {'; '.join(missing)}. "
            "The pack is tested with ComfyUI 0.3.75 to 0.30.0; update ComfyUI (or the pack).")


def executing_context() -> tuple[str | None, str | None]:
    """(prompt id, node id) of the node ComfyUI is executing (comfy_execution.utils, both tested
    releases); (None, None) outside an execution."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None, None
    ctx = get_executing_context()
    if ctx is None:
        return None, None
    return getattr(ctx, "prompt_id", None), getattr(ctx, "node_id", None)


def raise_if_cancelled() -> None:
    """Raise ComfyUI's InterruptProcessingException when the user pressed Cancel (the check the
    server's progress hook makes). Called every step: since 0.30.0 ComfyUI's ProgressBar throttles
    its hook (at most every ~1 % or 0.1 s), so the hook alone would notice Cancel steps late."""
    import comfy.model_management as mm

    mm.throw_exception_if_processing_interrupted()


def trainable_memory(device) -> int | None:
    """Bytes a training step may use on `device`: free memory plus what the models ComfyUI holds
    there occupy (training frees them: load_models_gpu with memory_required). CPU: available RAM."""
    import comfy.model_management as mm

    dev = torch.device(device)
    if dev.type == "cpu":
        from ..memory import cpu_available

        return cpu_available()
    free = int(mm.get_free_memory(dev))
    held = 0
    for lm in list(getattr(mm, "current_loaded_models", [])):
        size = getattr(lm, "model_loaded_memory", None)
        try:
            held += int(size()) if callable(size) else 0
        except Exception:  # noqa: BLE001 - an entry whose model is gone
            pass
    return free + held


def input_options(advanced: bool) -> dict:
    """Keyword arguments for a V3 io input: `advanced=True` where this ComfyUI's schema has the flag
    (the frontend then folds the input away), nothing where it does not."""
    if not advanced:
        return {}
    from comfy_api.v0_0_2 import io

    if "advanced" in inspect.signature(io.Int.Input.__init__).parameters:
        return {"advanced": True}
    return {}


# ---------------------------------------------------------------------------------------------
# The training session: ComfyUI's custom-sampling objects (a guider and a sampler, the same
# extension points SamplerCustomAdvanced uses) set up the model exactly as sampling does
# (models loaded, weight wrappers and patches applied, model options); our sampler then trains.
# ---------------------------------------------------------------------------------------------

def run_in_sampling(patcher, conditioning, batch_shape, fn: Callable, seed: int = 0):
    """Run fn(inner_model, transformer_options) inside ComfyUI's sampling set-up for `patcher`.
    `conditioning` is any CONDITIONING (the guider needs one); returns fn's result."""
    import comfy.samplers

    class _Sampler(comfy.samplers.Sampler):
        result = None

        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                   disable_pbar=False):
            options = extra_args.get("model_options", {}).get("transformer_options", {})
            self.result = fn(model_wrap.inner_model, options)
            return torch.zeros_like(noise)

    guider = comfy.samplers.CFGGuider(patcher)
    guider.inner_set_conds({"positive": conditioning})
    guider.set_cfg(1.0)
    sampler = _Sampler()
    latent = torch.zeros(batch_shape)
    guider.sample(latent, latent, sampler, torch.tensor([1.0, 0.0]), seed=seed, disable_pbar=True)
    return sampler.result


# ---------------------------------------------------------------------------------------------
# Fingerprint of the unpatched base weights
# ---------------------------------------------------------------------------------------------

def base_unet_state(model) -> dict[str, torch.Tensor]:
    """The UNet state dict of a MODEL (ldm names, no prefix) with the *unpatched* weights. When a
    patched clone of the same model is loaded, ComfyUI has written its patches into the shared
    weights and keeps the originals in that clone's `backup` (ModelPatcher attribute, present in
    every tested release); those are substituted."""
    import comfy.model_management

    base = model.model
    state = dict(base.diffusion_model.state_dict())
    clones = [model] + [lm.model for lm in getattr(comfy.model_management, "current_loaded_models", [])
                        if getattr(lm, "model", None) is not None and getattr(lm.model, "model", None) is base]
    for patcher in clones:
        for key, bk in (getattr(patcher, "backup", None) or {}).items():
            if key.startswith("diffusion_model."):
                weight = getattr(bk, "weight", bk[0] if isinstance(bk, tuple) else None)
                if isinstance(weight, torch.Tensor):
                    state[key[len("diffusion_model."):]] = weight
    return state


# ---------------------------------------------------------------------------------------------
# Words and vectors in prompts: ComfyUI's own embedding path
#
# A prompt word that stands for learned vectors is handed to ComfyUI exactly the way it hands over
# `embedding:NAME`: as tensors in the token list that the tokenizer returns, which the text
# encoder splices into its input embeddings (keeping gradients). The word is replaced by a marker
# token before tokenizing and the marker by the vectors afterwards, through the public
# tokenize_with_weights, so no tokenizer method is replaced or copied.
# ---------------------------------------------------------------------------------------------

# Single-token English words (CLIP BPE) used as stand-ins; the first one absent from the prompt is taken.
_MARKERS = ("puffin", "pelican", "heron", "gecko", "bison", "yak")


def sub_tokenizers(tokenizer) -> dict[str, object]:
    """Encoder key ('clip_l', 'clip_g', 'clip_h') -> SDTokenizer of a CLIP's tokenizer."""
    import comfy.sd1_clip

    base = getattr(tokenizer, "ds_base", tokenizer)
    out = {}
    for value in vars(base).values():
        if isinstance(value, comfy.sd1_clip.SDTokenizer):
            out[value.embedding_key] = value
    return out


def knows_word(clip, word: str) -> bool:
    """True when `word` is one whole word of the CLIP tokenizers' vocabulary (it tokenizes to a
    single token: BPE gives one token exactly for the words its vocabulary holds)."""
    w = word.strip().lower()
    return any(len(_word_ids(tok, w)) == 1 for tok in sub_tokenizers(clip.tokenizer).values())


def _word_ids(tok, word: str) -> list[int]:
    """Token ids of `word` alone through the tokenizer's own tokenize_with_weights (special
    tokens and padding dropped)."""
    def ids(text):
        batches = tok.tokenize_with_weights(text, False)
        return [t[0] for batch in batches for t in batch if isinstance(t[0], int)]

    empty = set(ids(""))
    return [i for i in ids(word) if i not in empty]


def input_embedding_table(clip, key: str) -> torch.Tensor:
    """The token-embedding matrix [vocab, width] of text encoder `key`."""
    encoder = getattr(clip.cond_stage_model, key)
    return encoder.transformer.get_input_embeddings().weight


def init_vectors(clip, word: str, num_vectors: int) -> dict[str, torch.Tensor]:
    """`word`'s embedding (mean of its tokens) repeated num_vectors times, per encoder, fp32."""
    out = {}
    for key, tok in sub_tokenizers(clip.tokenizer).items():
        ids = _word_ids(tok, word)
        if not ids:
            raise ValueError(f"init word {word!r} gives no tokens; use a plain English word")
        table = input_embedding_table(clip, key)
        vec = table[ids].detach().float().mean(0)
        out[key] = vec.unsqueeze(0).repeat(num_vectors, 1).clone()
    return out


class SplicingTokenizer:
    """A CLIP tokenizer that resolves some words to vectors. `words` maps a word to
    {encoder key: [n, width]}; `bare` words match as plain words as well as `embedding:word`
    (a learned token), otherwise only as `embedding:word` (an embedding applied with a strength).
    Everything else is the wrapped tokenizer's own behaviour."""

    def __init__(self, base, words: dict[str, dict[str, torch.Tensor]], bare: bool):
        self.ds_base = getattr(base, "ds_base", base)
        inherited = dict(getattr(base, "ds_words", {}))
        self.ds_words = {**inherited, **{w: (v, bare) for w, v in words.items()}}
        self._keys = {k: tok for k, tok in sub_tokenizers(self.ds_base).items()}

    def __getattr__(self, name):
        if name.startswith(("ds_", "__")):  # not set yet (copy/pickle): never recurse
            raise AttributeError(name)
        return getattr(self.ds_base, name)

    def _pattern(self) -> re.Pattern:
        alts = []
        for word, (_, bare) in sorted(self.ds_words.items(), key=lambda kv: -len(kv[0])):
            w = re.escape(word)
            alts.append(rf"(?<![\w:])embedding:{w}(?:\.safetensors|\.pt|\.bin)?(?![\w])")
            if bare:
                alts.append(rf"(?<![\w:]){w}(?![\w])")
        return re.compile("|".join(f"({a})" for a in alts), re.IGNORECASE)

    def _which(self, match: str) -> str:
        m = match.lower()
        if m.startswith("embedding:"):
            m = m[len("embedding:"):]
            for ext in (".safetensors", ".pt", ".bin"):
                if m.endswith(ext):
                    m = m[: -len(ext)]
        for word in self.ds_words:
            if word.lower() == m:
                return word
        raise KeyError(match)

    def tokenize_with_weights(self, text: str, return_word_ids=False, **kwargs):
        pattern = self._pattern()
        found = [self._which(m.group(0)) for m in pattern.finditer(text)]
        if not found:
            return self.ds_base.tokenize_with_weights(text, return_word_ids, **kwargs)
        marker, marker_ids = self._marker(pattern.sub(" ", text), kwargs)
        order = []

        def sub(m):
            word = self._which(m.group(0))
            vectors, _ = self.ds_words[word]
            n = next(iter(vectors.values())).shape[0]
            order.append(word)
            return " ".join([marker] * n)

        tokens = self.ds_base.tokenize_with_weights(pattern.sub(sub, text), return_word_ids, **kwargs)
        for out_key, batches in tokens.items():
            enc_key = self._encoder_key(out_key)
            mid = marker_ids.get(enc_key)
            if mid is None:
                continue
            seq = [(w, i) for w in order for i in range(next(iter(self.ds_words[w][0].values())).shape[0])]
            pos = 0
            for batch in batches:
                for j, t in enumerate(batch):
                    if isinstance(t[0], int) and t[0] == mid and pos < len(seq):
                        word, i = seq[pos]
                        vectors = self.ds_words[word][0]
                        if enc_key not in vectors:
                            raise ValueError(f"{word!r} has no vectors for the {enc_key} text encoder "
                                             f"(it has {sorted(vectors)}): wrong architecture")
                        batch[j] = (vectors[enc_key][i],) + tuple(t[1:])
                        pos += 1
        return tokens

    def _encoder_key(self, out_key: str) -> str:
        key = f"clip_{out_key}"
        return key if key in self._keys else out_key

    def _marker(self, text: str, kwargs) -> tuple[str, dict[str, int]]:
        """A single-token stand-in word whose token does not occur in the rest of the prompt."""
        present = set()
        for batches in self.ds_base.tokenize_with_weights(text, False, **kwargs).values():
            present.update(t[0] for batch in batches for t in batch if isinstance(t[0], int))
        cache = self.__dict__.setdefault("ds_marker_ids", {})
        for marker in _MARKERS:
            if marker not in cache:
                cache[marker] = {k: _word_ids(tok, marker) for k, tok in self._keys.items()}
            ids = cache[marker]
            if all(len(v) == 1 and v[0] not in present for v in ids.values()):
                return marker, {k: v[0] for k, v in ids.items()}
        raise ValueError("could not find a free marker word for the learned token in this prompt")


def clip_with_words(clip, words: dict[str, dict[str, torch.Tensor]], bare: bool = True):
    """A clone of `clip` whose prompts resolve the given words to vectors (see SplicingTokenizer).
    The input CLIP and its tokenizer are untouched. Vectors are used as given: Parameters train,
    detached tensors are frozen."""
    out = clip.clone()
    keys = set(sub_tokenizers(clip.tokenizer))
    for word, vectors in words.items():
        if not set(vectors) & keys:
            raise ValueError(f"{word!r} has vectors for {sorted(vectors)} but this CLIP's text encoders are "
                             f"{sorted(keys)} (wrong architecture)")
    out.tokenizer = SplicingTokenizer(clip.tokenizer, words, bare)
    return out


# ---------------------------------------------------------------------------------------------
# Backpropagating through ComfyUI's CLIP
# ---------------------------------------------------------------------------------------------

def make_autograd_safe(module: torch.nn.Module) -> int:
    """Swap inference-mode tensors of `module` for value-identical normal ones; returns how many.

    Graph nodes run under torch.inference_mode(), so a model loaded there holds inference tensors
    and autograd refuses to save them for backward (on the CPU, loading to the device is a no-op
    and does not copy them). Values are unchanged bit for bit."""
    swapped = 0
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_inference():
                m._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
                swapped += 1
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_inference():
                m._buffers[name] = b.clone()
                swapped += 1
    return swapped


def _out_of_place_forward(self, x, mask=None, optimized_attention=None):
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    return x + self.mlp(self.layer_norm2(x))


_NEEDS_OUT_OF_PLACE: dict[type, bool] = {}


def _encoder_adds_in_place(clip) -> bool:
    """Whether backpropagating through this CLIP's text encoder fails on in-place residual adds.
    Detected once per encoder class from behaviour: a backward from a one-word prompt whose word is
    a trainable vector either works or fails with autograd's in-place error."""
    cls = type(clip.cond_stage_model)
    if cls not in _NEEDS_OUT_OF_PLACE:
        widths = {k: input_embedding_table(clip, k).shape[1] for k in sub_tokenizers(clip.tokenizer)}
        probe_vectors = {k: torch.zeros(1, w, requires_grad=True) for k, w in widths.items()}
        probe = clip_with_words(clip, {"dsprobe": probe_vectors})
        try:
            with torch.inference_mode(False), torch.enable_grad():
                cond, _ = probe.encode_from_tokens(probe.tokenize("dsprobe"), return_pooled=True)
                cond.float().sum().backward()
            _NEEDS_OUT_OF_PLACE[cls] = False
        except RuntimeError as e:
            if "inplace" not in str(e):
                raise
            _NEEDS_OUT_OF_PLACE[cls] = True
    return _NEEDS_OUT_OF_PLACE[cls]


@contextlib.contextmanager
def differentiable_text_encoder(clip):
    """Within the block, gradients flow through `clip`'s text encoder(s) to spliced token vectors;
    the encoder's weights stay frozen and bit-identical. ComfyUI's CLIPLayer adds residuals in
    place (`x += ...` in comfy/clip_model.py, still so in 0.30.0); where that is detected, those
    layer *instances* get an out-of-place forward for the duration of the block only."""
    import comfy.clip_model

    clip.load_model()
    encoder = clip.cond_stage_model
    make_autograd_safe(encoder)
    patched = []
    try:
        if _encoder_adds_in_place(clip):
            expected = ["self", "x", "mask", "optimized_attention"]
            if list(inspect.signature(comfy.clip_model.CLIPLayer.forward).parameters) != expected:
                raise RuntimeError("this ComfyUI's CLIPLayer adds residuals in place and its forward is not "
                                   f"({', '.join(expected[1:])}); token training cannot backpropagate through it "
                                   "(update the pack)")
            for m in encoder.modules():
                if isinstance(m, comfy.clip_model.CLIPLayer) and "forward" not in m.__dict__:
                    m.forward = types.MethodType(_out_of_place_forward, m)
                    patched.append(m)
        yield
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)
