"""Weight files in a real in-process ComfyUI (tiny SD1.5 / SDXL, CPU): every save format round-trips
through the stock LoraLoader with zero 'lora key not loaded' warnings, embeddings resolve as
`embedding:NAME`, the A1111 key layout resolves against the model's modules, and the Load Weights
node refuses files of another architecture / base model."""

import os

import pytest
import torch

from comfyui_domainstudio.testing.comfy_helpers import (a1111_updates, te_lora_entries, encode, progress_hook, random_vectors,
                                                         read_file, save_synthetic, save_test_embedding, stock_load,
                                                         synthetic_lora, train_domainstudio, unet_out)

pytestmark = [pytest.mark.comfy, pytest.mark.usefixtures("unload_models")]


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
    out = train_domainstudio(comfy, model, clip, vae, steps=3, train_mode=mode, lora_rank=4, lora_alpha=4.0,
                             learning_rate=1e-2 if mode.startswith("lora") else 1e-3, save_name="rt",
                             save_format=fmt, save_dtype=dtype, svd_rank=svd_rank)
    trained, delta, saved = out["model"], out["delta"], out["saved_path"]
    assert os.path.dirname(saved) == loras_dir and os.path.basename(saved) == "rt_00001.safetensors"
    assert [f for f in os.listdir(loras_dir)] == ["rt_00001.safetensors"]  # no temp file left
    md, tensors = read_file(saved)
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
        # The delta output is the trained delta in the file's precision (fp32 here): exact.
        exact = {k: v.float() for k, v in delta.items()}
        approx = deltas.lora_to_diff({k: v.float() for k, v in tensors.items()})
        num = sum(((approx[k] - exact[k]) ** 2).sum() for k in exact) ** 0.5
        den = sum((exact[k] ** 2).sum() for k in exact) ** 0.5
        assert rel == pytest.approx(float(num / den), rel=1e-3)
        assert (loaded - base).abs().max().item() > 0  # the extracted LoRA is applied


def test_bad_save_name_is_refused_before_training(comfy, sd15, loras_dir):
    model, clip, vae = sd15
    steps = []
    with progress_hook(lambda v, t, p, node_id=None: steps.append(v)):
        for name, match in [("../evil", "path separator"), ("a/b", "path separator"), ("x:y", "not allowed")]:
            with pytest.raises(ValueError, match=match) as e:
                train_domainstudio(comfy, model, clip, vae, steps=2, save_name=name)
            assert "save_name" in str(e.value)
        with pytest.raises(ValueError, match="save_dtype|fp16"):
            train_domainstudio(comfy, model, clip, vae, steps=2, save_name="ok", save_dtype="fp8")
    assert steps == [] and os.listdir(loras_dir) == []
    assert not os.path.exists(os.path.join(os.path.dirname(loras_dir), "evil_00001.safetensors"))


def test_saving_never_overwrites(comfy, sd15, loras_dir):
    model, clip, vae = sd15
    open(os.path.join(loras_dir, "same_00001.safetensors"), "wb").write(b"keep me")
    saved = train_domainstudio(comfy, model, clip, vae, steps=2, save_name="same")["saved_path"]
    assert os.path.basename(saved) == "same_00002.safetensors"
    assert open(os.path.join(loras_dir, "same_00001.safetensors"), "rb").read() == b"keep me"


# --- A1111 key layout --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["lora", "diff"])
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_a1111_key_layout_resolves_and_matches_comfy(comfy, request, loras_dir, kind, family):
    model, clip, _ = request.getfixturevalue(family)
    path = save_synthetic(comfy, model, loras_dir, f"a1111_{family}_{kind}", kind=kind,
                          family="sd1" if family == "sd15" else "sdxl")
    _, tensors = read_file(path)
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


def _write_raw(path, tensors, metadata=None):
    """A safetensors file written as another tool would (our writers refuse non-finite values)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_load_node_refuses_non_finite_values(comfy, sd15, loras_dir, embeddings_dir, bad):
    model, clip, _ = sd15
    t = synthetic_lora(comfy, model, mode="lora_attn")
    key = sorted(k for k in t if k.endswith("lora_up.weight"))[1]
    t[key] = t[key].clone()
    t[key][0, 0] = bad
    _write_raw(os.path.join(loras_dir, "broken.safetensors"), t)
    with pytest.raises(ValueError, match=rf"broken.safetensors holds NaN or infinite values in 1 of {len(t)} tensors "
                                         rf"\(first: {key}\)") as e:
        _load_node(comfy, model, clip, "loras/broken.safetensors")
    assert str(e.value).startswith("DomainStudio Load Weights:")
    with pytest.raises(ValueError, match="NaN or infinite"):  # ignore_mismatch does not apply it either
        _load_node(comfy, model, clip, "loras/broken.safetensors", ignore=True)
    vec = random_vectors(2, {"clip_l": 768})
    vec["clip_l"][1, 5] = bad
    _write_raw(os.path.join(embeddings_dir, "badtok.safetensors"), vec)
    with pytest.raises(ValueError, match="badtok.safetensors.*(NaN or infinite|non-finite)"):
        _load_node(comfy, model, clip, "embeddings/badtok.safetensors")


def test_load_node_reports_layers_of_the_wrong_shape_with_a_count(comfy, sd15, loras_dir):
    deltas = comfy.pack("trainer.deltas")
    model, clip, _ = sd15
    t = synthetic_lora(comfy, model, mode="lora_attn", scale=0.05)
    downs = sorted(k for k in t if k.endswith("lora_down.weight"))
    broken = downs[:3]
    for k in broken:  # a LoRA made for a model whose layers take other input widths
        t[k] = torch.randn(t[k].shape[0], t[k].shape[1] + 16) * 0.05
    md = deltas.build_metadata(kind="lora", family="sd1", title="shapes", method="test")
    deltas.save_delta(os.path.join(loras_dir, "shapes.safetensors"), t, md, dtype="fp32")
    with pytest.raises(ValueError, match=rf"3 of {len(t)} weights in loras/shapes.safetensors have the wrong shape "
                                         r"for their layer \(first: .*lora_down.weight \(\d+, \d+\) vs layer"):
        _load_node(comfy, model, clip, "loras/shapes.safetensors")
    # ignore_mismatch applies the layers that fit and says what it left out.
    forced, _, info = _load_node(comfy, model, clip, "loras/shapes.safetensors", ignore=True)
    assert "applied despite" in info and "3 of" in info
    layers = {k.split(".")[0] for k in broken}
    fitting = {k: v for k, v in t.items() if k.split(".")[0] not in layers}
    deltas.save_delta(os.path.join(loras_dir, "fitting.safetensors"), fitting, md, dtype="fp32")
    stock, _ = stock_load(comfy, model, clip, os.path.join(loras_dir, "fitting.safetensors"))
    assert torch.equal(unet_out(forced), unet_out(stock))


# --- embeddings in ComfyUI --------------------------------------------------------------------

def test_sd1_embedding_resolves_by_name_in_stock_comfy_and_node(comfy, sd15, tiny_models, embeddings_dir):
    model, _, _ = sd15
    save_test_embedding(comfy, embeddings_dir, "dstok", random_vectors(2, {"clip_l": 768}), "sd1", model)
    # A CLIP loaded after the folder was registered lists it, as the stock loader does.
    _, clip, _ = comfy.nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(tiny_models["sd15"]))[:3]
    tokens = clip.tokenize("a photo of embedding:dstok")["l"][0]
    spliced = [t for t, _ in tokens if isinstance(t, torch.Tensor)]
    assert len(spliced) == 2  # both vectors spliced in
    with_emb = encode(comfy, clip, "a photo of embedding:dstok")
    plain = encode(comfy, clip, "a photo of dstok")
    assert not torch.allclose(with_emb, plain)
    # The node gives the same conditioning through any CLIP, strength scales the vectors.
    _, sd15_clip, _ = sd15
    _, node_clip, info = _load_node(comfy, model, sd15_clip, "embeddings/dstok.safetensors")
    assert "embedding:dstok" in info
    assert torch.allclose(encode(comfy, node_clip, "a photo of embedding:dstok"), with_emb, atol=1e-5)
    _, half_clip, _ = _load_node(comfy, model, sd15_clip, "embeddings/dstok.safetensors", strength_clip=0.5)
    assert not torch.allclose(encode(comfy, half_clip, "a photo of embedding:dstok"), with_emb, atol=1e-4)
    assert torch.equal(encode(comfy, sd15_clip, "a photo of dstok"), plain)  # the input CLIP is untouched


def test_sdxl_embedding_resolves_in_comfy_and_wrong_architecture_is_refused(comfy, sd15, sdxl, embeddings_dir):
    import copy

    xl_model, xl_clip, _ = sdxl
    vec = random_vectors(1, {"clip_l": 768, "clip_g": 1280}, seed=3)
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
    assert torch.allclose(encode(comfy, node_clip, "embedding:xltok house"),
                          encode(comfy, stock, "embedding:xltok house"), atol=1e-5)
    # An SDXL embedding on an SD1 CLIP / model, and an SD1 one on SDXL, are refused.
    model, clip, _ = sd15
    with pytest.raises(ValueError, match=r"xltok.safetensors holds vectors for .*clip_g.*clip_l.*\(sdxl\) but the "
                                         r"CLIP's text encoders are \[\('clip_l', 768\)\]"):
        _load_node(comfy, model, clip, "embeddings/xltok.safetensors")
    save_test_embedding(comfy, embeddings_dir, "sd1tok", random_vectors(1, {"clip_l": 768}), "sd1", model)
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
            t.update(te_lora_entries(f"text_model.encoder.layers.{layer}.self_attn.{proj}",
                                     torch.randn(768, 4, generator=g) * 0.1, torch.randn(4, 768, generator=g) * 0.1, 4.0))
    md = deltas.build_metadata(kind="lora", family="sd1", title="te", method="test")
    path = deltas.save_delta(os.path.join(loras_dir, "te.safetensors"), t, md)
    _, te_clip = stock_load(comfy, model, clip, path, 0.0, 1.0)
    assert not torch.allclose(encode(comfy, te_clip, "a house"), encode(comfy, clip, "a house"))
    _, node_clip, _ = _load_node(comfy, model, clip, "loras/te.safetensors")
    assert torch.equal(encode(comfy, node_clip, "a house"), encode(comfy, te_clip, "a house"))
