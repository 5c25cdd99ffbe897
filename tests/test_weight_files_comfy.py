"""Weight files in a real in-process ComfyUI (tiny SD1.5 / SDXL, CPU): every save format round-trips
through the stock LoraLoader with zero 'lora key not loaded' warnings, embeddings resolve as
`embedding:NAME`, the A1111 key layout resolves against the model's modules, and the Load Weights
node refuses files of another architecture / base model."""

import logging
import os

import pytest
import torch
from safetensors import safe_open

from test_domainstudio_comfy import _images, _train

pytestmark = pytest.mark.comfy


@pytest.fixture(autouse=True)
def restore_weights(comfy):
    """Unload every model after each test: ComfyUI writes a loaded clone's patches into the shared
    weights and restores them only on unload, so a patched clone left loaded would change what the
    next test (in any file) sees as the base model's weights."""
    yield
    from comfy import model_management

    model_management.unload_all_models()


def _register(comfy, kind, path):
    comfy.folder_paths.add_model_folder_path(kind, path, is_default=True)


def _unregister(comfy, kind, path):
    comfy.folder_paths.folder_names_and_paths[kind][0].remove(path)


@pytest.fixture()
def loras_dir(comfy, tmp_path):
    d = str(tmp_path / "loras")
    os.makedirs(d)
    _register(comfy, "loras", d)
    yield d
    _unregister(comfy, "loras", d)


@pytest.fixture()
def embeddings_dir(comfy, tmp_path):
    d = str(tmp_path / "embeddings")
    os.makedirs(d)
    _register(comfy, "embeddings", d)
    yield d
    _unregister(comfy, "embeddings", d)


def _inputs(context_dim=768, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([50.0, 700.0]),
            torch.randn(2, 77, context_dim, generator=g))


def unet_out(model, context_dim=768, y=None):
    """The UNet's raw output with `model`'s patches applied (as ComfyUI applies them for sampling)."""
    from comfy import model_management

    model_management.load_models_gpu([model])
    x, t, ctx = _inputs(context_dim)
    with torch.no_grad():
        kw = {} if y is None else {"y": y}
        return model.model.diffusion_model(x, t, context=ctx, **kw).float()


class LoraWarnings(logging.Handler):
    """Collects ComfyUI's 'lora key not loaded' / 'NOT LOADED' warnings."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        msg = record.getMessage()
        if "lora key not loaded" in msg or "NOT LOADED" in msg:
            self.messages.append(msg)

    def __enter__(self):
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger().removeHandler(self)


def stock_load(comfy, model, clip, path, strength_model=1.0, strength_clip=0.0):
    with LoraWarnings() as w:
        m, c = comfy.nodes.LoraLoader().load_lora(model, clip, os.path.basename(path), strength_model, strength_clip)
    assert w.messages == [], w.messages[:3]
    return m, c


def _meta(path):
    with safe_open(path, "pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


# --- DomainStudio's files: every format round-trips -----------------------------------------

ROUND_TRIPS = [
    # train_mode, save_format, save_dtype, svd_rank, relative tolerance on the delta's effect
    ("lora_attn", "auto", "fp16", 32, 0.0),  # bit-identical: the MODEL uses the file's values
    ("lora_all", "diff", "bf16", 32, 0.02),  # LoRA multiplied out, bf16 rounding of the product
    ("lora_attn", "svd_lora", "fp32", 4, 1e-3),  # re-factored at the trained rank: exact up to fp32
    ("full_attn", "svd_lora", "fp32", 2, None),  # truncated: error as reported
]


@pytest.mark.parametrize("mode, fmt, dtype, svd_rank, tol", ROUND_TRIPS, ids=[f"{m}-{f}-{d}" for m, f, d, _, _ in ROUND_TRIPS])
def test_domainstudio_file_round_trips_through_stock_loader(comfy, sd15, loras_dir, mode, fmt, dtype, svd_rank, tol):
    host = comfy.pack("trainer.hosts.comfy")
    deltas = comfy.pack("trainer.deltas")
    model, clip, vae = sd15
    trained, delta, _, saved = _train(comfy, model, clip, vae, steps=3, train_mode=mode, lora_rank=4, lora_alpha=4.0,
                                      learning_rate=1e-2 if mode.startswith("lora") else 1e-3, save_name="rt",
                                      save_format=fmt, save_dtype=dtype, svd_rank=svd_rank)
    assert os.path.dirname(saved) == loras_dir and os.path.basename(saved) == "rt_00001.safetensors"
    assert [f for f in os.listdir(loras_dir)] == ["rt_00001.safetensors"]  # no temp file left
    md, tensors = _meta(saved)
    want_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    assert all(v.dtype == want_dtype for k, v in tensors.items() if not k.endswith(".alpha"))
    kind = {"auto": "lora" if mode.startswith("lora") else "diff"}.get(fmt, fmt)
    assert md["domainstudio.kind"] == kind and md["domainstudio.dtype"] == dtype
    assert md["domainstudio.base_fingerprint"] == host.fingerprint(model)
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora" and md["ss_base_model_version"] == "sd_v1"
    assert md["modelspec.resolution"] == "64x64" and md["domainstudio.steps"] == "3" and md["modelspec.date"]
    if kind == "diff":
        assert all(k.endswith(".diff") for k in tensors)
    else:
        assert all(k.endswith((".lora_up.weight", ".lora_down.weight", ".alpha")) for k in tensors)
        assert all(k.startswith("lora_unet_") for k in tensors)

    stock, _ = stock_load(comfy, model, clip, saved)
    base = unet_out(model)
    ours = unet_out(trained)
    loaded = unet_out(stock)
    effect = (ours - base).abs().max().item()
    assert effect > 1e-3, "training should change the UNet output"
    err = (loaded - ours).abs().max().item()
    print(f"{mode}/{fmt}/{dtype}: effect {effect:.4g}, file vs in-memory {err:.3g}")
    if tol == 0.0:
        assert torch.equal(loaded, ours)
    elif tol is not None:
        assert err <= tol * effect + 1e-6
    else:  # truncated SVD: the reported error is the true weight-space error of the file
        rel = float(md["domainstudio.svd_rel_error"])
        assert md["domainstudio.svd_rank"] == "2" and 0 < rel < 1
        exact = {k: v.float() for k, v in delta.items()}
        approx = deltas.lora_to_diff({k: v.float() for k, v in tensors.items()})
        num = sum(((approx[k] - exact[k]) ** 2).sum() for k in exact) ** 0.5
        den = sum((exact[k] ** 2).sum() for k in exact) ** 0.5
        assert rel == pytest.approx(float(num / den), rel=1e-3)
        assert (loaded - base).abs().max().item() > 0  # the extracted LoRA is applied


def test_bad_save_name_is_refused_before_training(comfy, sd15, loras_dir):
    from comfy import utils as comfy_utils

    model, clip, vae = sd15
    steps = []
    comfy_utils.set_progress_bar_global_hook(lambda v, t, p, node_id=None: steps.append(v))
    try:
        for name, match in [("../evil", "path separator"), ("a/b", "path separator"), ("x:y", "not allowed")]:
            with pytest.raises(ValueError, match=match) as e:
                _train(comfy, model, clip, vae, steps=2, save_name=name)
            assert "save_name" in str(e.value)
        with pytest.raises(ValueError, match="save_dtype|fp16"):
            _train(comfy, model, clip, vae, steps=2, save_name="ok", save_dtype="fp8")
    finally:
        comfy_utils.set_progress_bar_global_hook(None)
    assert steps == [] and os.listdir(loras_dir) == []
    assert not os.path.exists(os.path.join(os.path.dirname(loras_dir), "evil_00001.safetensors"))


def test_saving_never_overwrites(comfy, sd15, loras_dir):
    model, clip, vae = sd15
    open(os.path.join(loras_dir, "same_00001.safetensors"), "wb").write(b"keep me")
    *_, saved = _train(comfy, model, clip, vae, steps=2, save_name="same")
    assert os.path.basename(saved) == "same_00002.safetensors"
    assert open(os.path.join(loras_dir, "same_00001.safetensors"), "rb").read() == b"keep me"


# --- synthetic deltas (large enough to compare hosts sharply) --------------------------------

def synthetic_lora(comfy, model, mode="lora_all", rank=4, scale=0.05, seed=0, alpha=2.0):
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


def save_synthetic(comfy, model, folder, name, kind="lora", family="sd1", dtype=torch.float32, fingerprint=None, **kw):
    host = comfy.pack("trainer.hosts.comfy")
    deltas = comfy.pack("trainer.deltas")
    t = synthetic_lora(comfy, model, **kw)
    if kind == "diff":
        t = deltas.lora_to_diff(t)
    md = deltas.build_metadata(kind=kind, family=family, title=name, method="test",
                               fingerprint=host.fingerprint(model) if fingerprint is None else fingerprint)
    return deltas.save_delta(os.path.join(folder, name + ".safetensors"), t, md, dtype=dtype)


# --- A1111 key layout --------------------------------------------------------------------------

def a1111_updates(model, tensors):
    """Resolve a file's keys the way A1111's extensions-builtin/Lora (networks.load_network) does
    for kohya ldm names, and compute each layer's weight update as its network_lora / network_full
    modules do. network_layer_mapping = {module path with '_': module} over sd_model.model, whose
    ldm layout (model.diffusion_model.<...>) ComfyUI's BaseModel shares. Returns {module: update}."""
    mapping = {name.replace(".", "_"): m for name, m in model.model.named_modules()}
    groups = {}
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


@pytest.mark.parametrize("kind", ["lora", "diff"])
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_a1111_key_layout_resolves_and_matches_comfy(comfy, request, loras_dir, kind, family):
    model, clip, _ = request.getfixturevalue(family)
    path = save_synthetic(comfy, model, loras_dir, f"a1111_{family}_{kind}", kind=kind,
                          family="sd1" if family == "sd15" else "sdxl")
    _, tensors = _meta(path)
    updates = a1111_updates(model, tensors)
    assert len(updates) == len(comfy.pack("trainer.hosts.comfy").trainable_module_names(model.model.diffusion_model,
                                                                                          "lora_all"))
    # ComfyUI's patched weights equal base + A1111's update for every layer.
    stock, _ = stock_load(comfy, model, clip, path)
    from comfy import model_management

    model_management.load_models_gpu([model])
    base = {k: v.detach().float().clone() for k, v in model.model.diffusion_model.state_dict().items()}
    model_management.load_models_gpu([stock])
    patched = stock.model.diffusion_model.state_dict()
    by_path = {name: m for name, m in model.model.diffusion_model.named_modules()}
    for name, m in by_path.items():
        hit = updates.get(name.replace(".", "_"))
        if hit is None:
            continue
        assert hit[0] is m
        got = patched[name + ".weight"].float() - base[name + ".weight"]
        assert torch.allclose(got, hit[1], atol=1e-5, rtol=1e-4), name
    model_management.load_models_gpu([model])


# --- the Load Weights node -------------------------------------------------------------------

def _load_node(comfy, model, clip, file, strength_model=1.0, strength_clip=1.0, ignore=False):
    node = comfy.node("DomainStudio_LoadWeights")
    with torch.inference_mode():
        return node.execute(model=model, clip=clip, file=file, strength_model=strength_model,
                            strength_clip=strength_clip, ignore_mismatch=ignore).result


def test_load_node_applies_lora_with_strength(comfy, sd15, loras_dir):
    model, clip, _ = sd15
    path = save_synthetic(comfy, model, loras_dir, "node_lora")
    node = comfy.node("DomainStudio_LoadWeights")
    assert "loras/node_lora.safetensors" in node.define_schema().inputs[2].options
    m1, c1, info = _load_node(comfy, model, clip, "loras/node_lora.safetensors")
    assert "node_lora.safetensors" in info and c1 is clip
    stock, _ = stock_load(comfy, model, clip, path)
    assert torch.equal(unet_out(m1), unet_out(stock))
    half, _, _ = _load_node(comfy, model, clip, "loras/node_lora.safetensors", strength_model=0.5)
    stock_half, _ = stock_load(comfy, model, clip, path, 0.5)
    assert torch.equal(unet_out(half), unet_out(stock_half))
    assert not torch.equal(unet_out(half), unet_out(m1))


def test_load_node_refuses_other_architecture_and_base(comfy, sd15, sdxl, loras_dir):
    model, clip, _ = sd15
    xl_model, xl_clip, _ = sdxl
    save_synthetic(comfy, model, loras_dir, "made_for_sd1")
    with pytest.raises(ValueError, match="made for a sd1 model but the loaded model is sdxl.*ignore_mismatch"):
        _load_node(comfy, xl_model, xl_clip, "loras/made_for_sd1.safetensors")
    # Same architecture, other base weights: the fingerprint differs.
    save_synthetic(comfy, model, loras_dir, "other_base", fingerprint="ds1-00000000deadbeef")
    with pytest.raises(ValueError, match="trained on base model ds1-00000000deadbeef but the loaded model is ds1-"):
        _load_node(comfy, model, clip, "loras/other_base.safetensors")
    forced, _, info = _load_node(comfy, model, clip, "loras/other_base.safetensors", ignore=True)
    assert "applied despite" in info and not torch.equal(unet_out(forced), unet_out(model))
    # A file with no metadata at all whose keys fit another UNet: caught by the key check.
    deltas = comfy.pack("trainer.deltas")
    xl_keys = synthetic_lora(comfy, xl_model, mode="lora_attn")
    deltas.save_delta(os.path.join(loras_dir, "bare_xl.safetensors"), xl_keys, {})
    with pytest.raises(ValueError, match=r"match no layer of the loaded model.*another architecture"):
        _load_node(comfy, model, clip, "loras/bare_xl.safetensors")


def test_load_node_reports_corrupt_files(comfy, sd15, loras_dir):
    model, clip, _ = sd15
    path = save_synthetic(comfy, model, loras_dir, "whole")
    data = open(path, "rb").read()
    open(os.path.join(loras_dir, "cut.safetensors"), "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.safetensors is not a readable safetensors file"):
        _load_node(comfy, model, clip, "loras/cut.safetensors")
    with pytest.raises(ValueError, match="must start with 'loras/' or 'embeddings/'"):
        _load_node(comfy, model, clip, "../../etc/passwd")
    with pytest.raises(ValueError, match="was not found"):
        _load_node(comfy, model, clip, "loras/../../secret.safetensors")


# --- embeddings in ComfyUI --------------------------------------------------------------------

def _encode(comfy, clip, text):
    return comfy.nodes.CLIPTextEncode().encode(clip, text)[0][0][0].float()


def _vectors(n, dims, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, d, generator=g) * 0.02 for k, d in dims.items()}


def save_test_embedding(comfy, folder, name, vectors, family, model=None):
    embeddings = comfy.pack("trainer.embeddings")
    deltas = comfy.pack("trainer.deltas")
    host = comfy.pack("trainer.hosts.comfy")
    md = deltas.build_metadata(kind="embedding", family=family, title=name, method="test", trigger=name,
                               fingerprint=host.fingerprint(model) if model is not None else "")
    return embeddings.save_embedding(deltas.exact_path(folder, name, what="trigger"), vectors, md)


def test_sd1_embedding_resolves_by_name_in_stock_comfy_and_node(comfy, sd15, tiny_models, embeddings_dir):
    model, _, _ = sd15
    save_test_embedding(comfy, embeddings_dir, "dstok", _vectors(2, {"clip_l": 768}), "sd1", model)
    # A CLIP loaded after the folder was registered lists it, as the stock loader does.
    _, clip, _ = comfy.nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(tiny_models["sd15"]))[:3]
    tokens = clip.tokenize("a photo of embedding:dstok")["l"][0]
    spliced = [t for t, _ in tokens if isinstance(t, torch.Tensor)]
    assert len(spliced) == 2  # both vectors spliced in
    with_emb = _encode(comfy, clip, "a photo of embedding:dstok")
    plain = _encode(comfy, clip, "a photo of dstok")
    assert not torch.allclose(with_emb, plain)
    # The node gives the same conditioning through any CLIP, strength scales the vectors.
    _, sd15_clip, _ = sd15
    _, node_clip, info = _load_node(comfy, model, sd15_clip, "embeddings/dstok.safetensors")
    assert "embedding:dstok" in info
    assert torch.allclose(_encode(comfy, node_clip, "a photo of embedding:dstok"), with_emb, atol=1e-5)
    _, half_clip, _ = _load_node(comfy, model, sd15_clip, "embeddings/dstok.safetensors", strength_clip=0.5)
    assert not torch.allclose(_encode(comfy, half_clip, "a photo of embedding:dstok"), with_emb, atol=1e-4)
    assert torch.equal(_encode(comfy, sd15_clip, "a photo of dstok"), plain)  # the input CLIP is untouched


def test_sdxl_embedding_resolves_in_comfy_and_wrong_architecture_is_refused(comfy, sd15, sdxl, embeddings_dir):
    import copy

    xl_model, xl_clip, _ = sdxl
    vec = _vectors(1, {"clip_l": 768, "clip_g": 1280}, seed=3)
    save_test_embedding(comfy, embeddings_dir, "xltok", vec, "sdxl", xl_model)
    # Stock resolution: both of the SDXL tokenizers read their half of the file by key.
    stock = xl_clip.clone()
    stock.tokenizer = copy.copy(xl_clip.tokenizer)
    for attr in ("clip_l", "clip_g"):
        sub = copy.copy(getattr(xl_clip.tokenizer, attr))
        sub.embedding_directory = [embeddings_dir]
        setattr(stock.tokenizer, attr, sub)
    toks = stock.tokenize("embedding:xltok house")
    for key, half in (("l", "clip_l"), ("g", "clip_g")):
        (t,) = [t for t, _ in toks[key][0] if isinstance(t, torch.Tensor)]
        assert torch.allclose(t.float(), vec[half][0], atol=1e-4)
    _, node_clip, _ = _load_node(comfy, xl_model, xl_clip, "embeddings/xltok.safetensors")
    assert torch.allclose(_encode(comfy, node_clip, "embedding:xltok house"),
                          _encode(comfy, stock, "embedding:xltok house"), atol=1e-5)
    # An SDXL embedding on an SD1 CLIP / model, and an SD1 one on SDXL, are refused.
    model, clip, _ = sd15
    with pytest.raises(ValueError, match=r"\['clip_g', 'clip_l'\].*text encoders are \['clip_l'\]"):
        _load_node(comfy, model, clip, "embeddings/xltok.safetensors")
    save_test_embedding(comfy, embeddings_dir, "sd1tok", _vectors(1, {"clip_l": 768}), "sd1", model)
    with pytest.raises(ValueError, match="text encoders are"):
        _load_node(comfy, xl_model, xl_clip, "embeddings/sd1tok.safetensors")
    with pytest.raises(ValueError, match="needs a CLIP"):
        _load_node(comfy, model, None, "embeddings/sd1tok.safetensors")


def test_text_encoder_lora_loads_in_comfy_without_warnings(comfy, sd15, loras_dir):
    deltas = comfy.pack("trainer.deltas")
    model, clip, _ = sd15
    g = torch.Generator().manual_seed(0)
    t = {}
    for layer in range(2):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t.update(deltas.te_lora_entries("sd1", "clip_l", f"text_model.encoder.layers.{layer}.self_attn.{proj}",
                                            torch.randn(768, 4, generator=g) * 0.1, torch.randn(4, 768, generator=g) * 0.1, 4.0))
    md = deltas.build_metadata(kind="lora", family="sd1", title="te", method="test")
    path = deltas.save_delta(os.path.join(loras_dir, "te.safetensors"), t, md)
    _, te_clip = stock_load(comfy, model, clip, path, 0.0, 1.0)
    assert not torch.allclose(_encode(comfy, te_clip, "a house"), _encode(comfy, clip, "a house"))
    _, node_clip, _ = _load_node(comfy, model, clip, "loras/te.safetensors")
    assert torch.equal(_encode(comfy, node_clip, "a house"), _encode(comfy, te_clip, "a house"))
    with pytest.raises(deltas.WeightFileError, match="prefix"):
        deltas.kohya_te_name("sd1", "clip_g", "x")
