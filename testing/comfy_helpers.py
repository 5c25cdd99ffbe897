"""Helpers for tests against a real in-process ComfyUI (the `comfy` fixture of tests/conftest.py):
tiny training images, running our nodes the way ComfyUI's executor does, stock sampling and
loading, UNet outputs, synthetic LoRA files and embeddings. Imported by test modules and
benchmarks as ``comfyui_domainstudio.testing.comfy_helpers``; fixtures stay in conftest.py.

Functions that touch ComfyUI import it lazily, so importing this module needs no ComfyUI."""

from __future__ import annotations

import contextlib
import logging
import os

import torch

RES = 64  # training resolution of the tiny models (8x8 latents)


# ---------------------------------------------------------------------------------------------
# training images
# ---------------------------------------------------------------------------------------------

def stripes(n: int = 6, res: int = RES, seed: int = 0) -> torch.Tensor:
    """A tiny 'domain': diagonal stripes of varying phase and colour, IMAGE [n, res, res, 3]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(res), torch.arange(res), indexing="ij")
    out = []
    for _ in range(n):
        phase = torch.rand(1, generator=g) * 6.28
        band = 0.5 + 0.5 * torch.sin((xx + yy) / 4.0 + phase)
        colour = torch.rand(3, generator=g) * 0.6 + 0.2
        out.append(band[..., None] * colour)
    return torch.stack(out).float()


def subject_images(n: int = 3, res: int = RES, seed: int = 0) -> torch.Tensor:
    """A tiny 'subject': a coloured disc on varying backgrounds, IMAGE [n, res, res, 3]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(res).float(), torch.arange(res).float(), indexing="ij")
    out = []
    for _ in range(n):
        cx, cy = (torch.rand(2, generator=g) * 0.4 + 0.3) * res
        disc = (((xx - cx) ** 2 + (yy - cy) ** 2) < (res * 0.22) ** 2).float()[..., None]
        bg = torch.rand(3, generator=g) * 0.5
        out.append(disc * torch.tensor([0.9, 0.3, 0.1]) + (1 - disc) * bg)
    return torch.stack(out).float()


# ---------------------------------------------------------------------------------------------
# our nodes, run as ComfyUI's executor runs them
# ---------------------------------------------------------------------------------------------

def run_node(comfy, node_id: str, **inputs):
    """`execute` of a registered node under torch.inference_mode (as execution.py runs nodes);
    returns the NodeOutput."""
    with torch.inference_mode():
        return comfy.node(node_id).execute(**inputs)


class Outputs(dict):
    """A node's outputs by their display names (as the graph shows them), plus `ui`."""

    ui = None


def outputs(comfy, node_id: str, node_output) -> Outputs:
    cls = comfy.node(node_id)
    schema = cls.GET_SCHEMA() if hasattr(cls, "GET_SCHEMA") else cls.define_schema()
    names = [o.display_name or o.id for o in schema.outputs]
    assert len(names) == len(node_output.result), (names, len(node_output.result))
    out = Outputs(zip(names, node_output.result))
    out.ui = node_output.ui
    return out


DOMAIN_DEFAULTS = dict(method="domainstudio", target_prompt="", source_prompt="", steps=4, learning_rate=1e-3,
                       batch_size=3, resolution=RES, lambda_img=100.0, lambda_hf=100.0, lambda_hfmse=0.1,
                       train_mode="lora_attn", lora_rank=4, lora_alpha=4.0, feature_space="latent", prior_images=0,
                       lambda_prior=1.0, train_seed=0, precision="fp32", save_name="")


def train_domainstudio(comfy, model, clip, vae, **inputs):
    """DomainStudio Train on the tiny-model defaults above (images: `stripes()` unless given).
    Returns the node's outputs by name ("model", "delta", "loss_plot", "saved_path", ...)."""
    args = {**DOMAIN_DEFAULTS, "images": stripes(), **inputs}
    return _full_paths(comfy, outputs(comfy, "DomainStudio_Train",
                                      run_node(comfy, "DomainStudio_Train", model=model, clip=clip, vae=vae, **args)))


PERSONALIZE_DEFAULTS = dict(method="rare_token", class_noun="dog", new_token="ds_subject", init_word="quaint",
                            num_vectors=1, dreambooth_identifier="sks", ti_steps=2, ti_learning_rate=5e-2,
                            unet_steps=2, unet_learning_rate=1e-3, train_mode="lora_attn", lora_rank=4,
                            lora_alpha=4.0, class_images=2, lambda_prior=1.0, batch_size=1, resolution=RES,
                            train_seed=0, precision="fp32", save_name="")


def personalize(comfy, model, clip, vae, **inputs):
    """Personalize on the tiny-model defaults above (images: `subject_images()` unless given).
    Returns the node's outputs by name ("model", "clip", "prompt", "delta", "loss_plot", "saved", ...)."""
    args = {**PERSONALIZE_DEFAULTS, "images": subject_images(), **inputs}
    return _full_paths(comfy, outputs(comfy, "DomainStudio_Personalize",
                                      run_node(comfy, "DomainStudio_Personalize", model=model, clip=clip, vae=vae,
                                               **args)))


def _full_paths(comfy, out: dict) -> dict:
    """The nodes report saved files by list name ("loras/x.safetensors"); tests read the files, so
    the list names are resolved to paths here (the raw text stays under "<name>_text")."""
    for key in ("saved_path", "saved"):
        if key in out:
            out[key + "_text"] = out[key]
            lines = []
            for line in out[key].splitlines():
                kind, _, rest = line.partition("/")
                full = comfy.folder_paths.get_full_path(kind, rest) if kind in ("loras", "embeddings") and rest else None
                lines.append(full or line)
            out[key] = "\n".join(lines)
    return out


@contextlib.contextmanager
def progress_hook(hook, every_update: bool = True):
    """Install `hook(value, total, preview, node_id=None)` as ComfyUI's global progress hook. With
    `every_update`, the host's progress throttling (newer releases skip updates closer than 0.1 s /
    0.5 %) is switched off so the hook sees every update our nodes make."""
    from comfy import utils as comfy_utils

    saved = {k: getattr(comfy_utils, k) for k in ("PROGRESS_THROTTLE_MIN_INTERVAL", "PROGRESS_THROTTLE_MIN_PERCENT")
             if hasattr(comfy_utils, k)}
    if every_update:
        for k in saved:
            setattr(comfy_utils, k, 0.0)
    comfy_utils.set_progress_bar_global_hook(hook)
    try:
        yield
    finally:
        comfy_utils.set_progress_bar_global_hook(None)
        for k, v in saved.items():
            setattr(comfy_utils, k, v)


@contextlib.contextmanager
def interrupt_guard():
    """Clears ComfyUI's interrupt flag afterwards (a test that presses Cancel must not leak it)."""
    import comfy.model_management as mm

    try:
        yield mm
    finally:
        mm.interrupt_current_processing(False)


# ---------------------------------------------------------------------------------------------
# stock nodes
# ---------------------------------------------------------------------------------------------

def ksample(comfy, model, clip, prompt: str = "a house", seed: int = 7, steps: int = 3, res: int = RES,
            cfg: float = 5.0) -> torch.Tensor:
    """Latents from the stock CLIPTextEncode + EmptyLatentImage + KSampler (euler / normal)."""
    pos = comfy.nodes.CLIPTextEncode().encode(clip, prompt)[0]
    neg = comfy.nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = comfy.nodes.EmptyLatentImage().generate(res, res, 1)[0]
    with torch.inference_mode():
        out = comfy.nodes.KSampler().sample(model, seed, steps, cfg, "euler", "normal", pos, neg, latent)[0]
    return out["samples"].clone()


def encode(comfy, clip, text: str) -> torch.Tensor:
    """The stock CLIPTextEncode's context for `text`, [1, tokens, width] fp32."""
    return comfy.nodes.CLIPTextEncode().encode(clip, text)[0][0][0].float()


def encode_pooled(clip, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, pooled) of `text` through a CLIP's own tokenize / encode_from_tokens."""
    with torch.inference_mode():
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return cond.clone().float(), pooled.clone().float()


class LoraWarnings(logging.Handler):
    """Collects ComfyUI's 'lora key not loaded' / 'NOT LOADED' warnings."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if "lora key not loaded" in msg or "NOT LOADED" in msg:
            self.messages.append(msg)

    def __enter__(self):
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger().removeHandler(self)


def stock_load(comfy, model, clip, path: str, strength_model: float = 1.0, strength_clip: float = 0.0):
    """The stock LoraLoader on a file of models/loras; asserts ComfyUI placed every key."""
    with LoraWarnings() as w:
        m, c = comfy.nodes.LoraLoader().load_lora(model, clip, os.path.basename(path), strength_model, strength_clip)
    assert w.messages == [], w.messages[:3]
    return m, c


# ---------------------------------------------------------------------------------------------
# model state and outputs
# ---------------------------------------------------------------------------------------------

def unet_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}


def clip_state(clip) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in clip.cond_stage_model.state_dict().items()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    # Bitwise: SD1's unused clip_l text_projection is never loaded (ComfyUI drops it from SD1
    # checkpoints), so it is uninitialised memory that may hold NaNs, which torch.equal calls unequal.
    return t.reshape(-1).contiguous().view(torch.uint8) if t.is_floating_point() else t


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose tensors differ bit for bit (or exist on one side only)."""
    return sorted(set(a) ^ set(b)) + [k for k in a if k in b and not torch.equal(_bits(a[k]), _bits(b[k]))]


def unet_inputs(context_dim: int = 768, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([50.0, 700.0]),
            torch.randn(2, 77, context_dim, generator=g))


def unet_out(model, context_dim: int = 768, y=None, context=None) -> torch.Tensor:
    """The UNet's raw output with `model`'s patches applied (as ComfyUI applies them for sampling)."""
    from comfy import model_management

    model_management.load_models_gpu([model])
    x, t, ctx = unet_inputs(context_dim)
    with torch.no_grad():
        kw = {} if y is None else {"y": y}
        return model.model.diffusion_model(x, t, context=ctx if context is None else context, **kw).float()


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def model_folder(comfy, kind: str, path: str):
    """`path` as the first (default) ComfyUI folder of `kind` (our nodes save to the first one)."""
    os.makedirs(path, exist_ok=True)
    comfy.folder_paths.add_model_folder_path(kind, path, is_default=True)
    try:
        yield path
    finally:
        comfy.folder_paths.folder_names_and_paths[kind][0].remove(path)


def read_file(path: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}


def synthetic_lora(comfy, model, mode: str = "lora_all", rank: int = 4, scale: float = 0.05, seed: int = 0,
                   alpha: float = 2.0) -> dict[str, torch.Tensor]:
    """Random kohya LoRA entries for every layer `mode` trains on `model` (large enough to compare
    hosts sharply)."""
    host = comfy.pack("trainer.hosts.comfy")
    deltas = comfy.pack("trainer.deltas")
    dm = model.model.diffusion_model
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in host.trainable_module_names(dm, mode):
        w = dm.get_submodule(name).weight
        out.update(deltas.lora_entries(name, torch.randn(w.shape[0], rank, generator=g) * scale,
                                       torch.randn(rank, w[0].numel(), generator=g) * scale, alpha, tuple(w.shape)))
    return out


def save_synthetic(comfy, model, folder: str, name: str, kind: str = "lora", family: str = "sd1",
                   dtype=torch.float32, fingerprint: str | None = None, **kw) -> str:
    """A synthetic LoRA (or its `diff`) saved with our metadata (base fingerprint of `model`)."""
    host = comfy.pack("trainer.hosts.comfy")
    deltas = comfy.pack("trainer.deltas")
    t = synthetic_lora(comfy, model, **kw)
    if kind == "diff":
        t = deltas.lora_to_diff(t)
    md = deltas.build_metadata(kind=kind, family=family, title=name, method="test",
                               fingerprint=host.fingerprint(model) if fingerprint is None else fingerprint)
    return deltas.save_delta(os.path.join(folder, name + ".safetensors"), t, md, dtype=dtype)


def random_vectors(n: int, dims: dict[str, int], seed: int = 0, scale: float = 0.02) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, d, generator=g) * scale for k, d in dims.items()}


def save_test_embedding(comfy, folder: str, name: str, vectors: dict[str, torch.Tensor], family: str,
                        model=None, dtype=torch.float16) -> str:
    """An embedding file `<name>.safetensors` with our metadata (base fingerprint of `model` if given)."""
    embeddings = comfy.pack("trainer.embeddings")
    deltas = comfy.pack("trainer.deltas")
    host = comfy.pack("trainer.hosts.comfy")
    md = deltas.build_metadata(kind="embedding", family=family, title=name, method="test", trigger=name,
                               fingerprint=host.fingerprint(model) if model is not None else "")
    return embeddings.save_embedding(deltas.exact_path(folder, name, what="trigger"), vectors, md, dtype=dtype)


def a1111_updates(model, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    """Resolve a file's keys the way A1111's extensions-builtin/Lora (networks.load_network) does
    for kohya ldm names, and compute each layer's weight update as its network_lora / network_full
    modules do. network_layer_mapping = {module path with '_': module} over sd_model.model, whose
    ldm layout (model.diffusion_model.<...>) ComfyUI's BaseModel shares. Returns
    {module path with '_' (no diffusion_model prefix): (module, update)}; asserts every key resolves."""
    mapping = {name.replace(".", "_"): m for name, m in model.model.named_modules()}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, w in tensors.items():
        base, part = key.split(".", 1)  # A1111: key_network.split(".", 1)
        # convert_diffusers_name_to_compvis leaves ldm names alone; then the documented fallback:
        assert "lora_unet" in base, key
        sd_key = base.replace("lora_unet", "diffusion_model")
        assert sd_key in mapping, f"A1111 would not match {key} (looked for {sd_key})"
        groups.setdefault(sd_key, {})[part] = w.float()
    out = {}
    for sd_key, w in groups.items():
        module = mapping[sd_key]
        target = module.weight.shape
        if {"lora_up.weight", "lora_down.weight"} <= set(w):  # network_lora.ModuleTypeLora
            up, down = w["lora_up.weight"], w["lora_down.weight"]
            if isinstance(module, torch.nn.Conv2d):
                assert down.ndim == 4 and tuple(down.shape[2:]) == tuple(module.kernel_size), sd_key
                assert up.ndim == 4 and tuple(up.shape[2:]) == (1, 1), sd_key
            else:
                assert down.ndim == 2 and up.ndim == 2, sd_key
            dim = down.shape[0]
            alpha = float(w["alpha"]) if "alpha" in w else dim
            upd = (up.reshape(up.shape[0], -1) @ down.reshape(dim, -1)).reshape(target) * (alpha / dim)
        elif "diff" in w:  # network_full.ModuleTypeFull
            upd = w["diff"]
            assert upd.shape == target, sd_key
        else:
            raise AssertionError(f"A1111 has no module type for {sd_key}: {sorted(w)}")
        out[sd_key.replace("diffusion_model_", "", 1)] = (module, upd)
    return out


def a1111_embedding_load(path: str) -> dict[str, torch.Tensor]:
    """What A1111's textual_inversion.create_embedding_from_data accepts (its documented branches):
    'string_to_param'; 'clip_g' + 'clip_l'; else a dict whose single value is a tensor."""
    from safetensors.torch import load_file

    data = load_file(path) if path.endswith(".safetensors") else torch.load(path, weights_only=True)
    if "string_to_param" in data:
        (emb,) = data["string_to_param"].values()
        return {"vec": emb}
    if "clip_g" in data and "clip_l" in data:
        return {"clip_g": data["clip_g"], "clip_l": data["clip_l"]}
    assert len(data) == 1, "embedding file has multiple terms in it"  # A1111's own assertion
    return {"vec": next(iter(data.values()))}


def diffusers_retrieve_embedding(path: str, token: str):
    """diffusers TextualInversionLoaderMixin._retrieve_tokens_and_embeddings, the dict branches."""
    from safetensors.torch import load_file

    data = load_file(path) if path.endswith(".safetensors") else torch.load(path, weights_only=True)
    if len(data) == 1:
        return token, next(iter(data.values()))
    if "string_to_param" in data:
        return data["name"], data["string_to_param"]["*"]
    raise ValueError("Loaded state dictionary is incorrect")


def te_lora_entries(layer_path: str, up: torch.Tensor, down: torch.Tensor, alpha: float) -> dict:
    """A text-encoder LoRA layer of SD1's CLIP-L under kohya's name (`lora_te_text_model_...`), as
    other trainers write them: the pack trains no text encoder, but Load Weights applies such files."""
    name = "lora_te_" + layer_path.replace(".", "_")
    return {f"{name}.lora_up.weight": up.contiguous(), f"{name}.lora_down.weight": down.contiguous(),
            f"{name}.alpha": torch.tensor(float(alpha))}
