"""Weight files without a host: names, atomic writes, fingerprints, LoRA/diff/SVD conversions,
embedding formats and what each host's loader expects of them (pure torch + safetensors)."""

import os
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from comfyui_domainstudio.trainer import deltas, embeddings
from comfyui_domainstudio.trainer.deltas import WeightFileError


def _files(folder):
    return sorted(os.listdir(folder))


# --- names and paths -------------------------------------------------------------------------

@pytest.mark.parametrize("name, match", [
    ("../evil", "path separator"),
    ("a/b", "path separator"),
    ("a\\b", "path separator"),
    ("/abs/path", "path separator"),
    ("..", r"'\.\.'"),
    ("x..y", r"'\.\.'"),
    (".hidden", "starts with '.'"),
    ("", "empty"),
    ("   ", "empty"),
    ("a:b", "not allowed"),
    ("a*b?", "not allowed"),
    ("nul", "reserved"),
    ("x" * 121, "at most 120"),
])
def test_bad_names_are_refused_with_the_input_named(name, match):
    with pytest.raises(ValueError, match=match) as e:
        deltas.sanitize_name(name, "save_name")
    assert "save_name" in str(e.value)


def test_good_names_pass_unchanged_but_stripped():
    assert deltas.sanitize_name("  my style-v2.1 ") == "my style-v2.1"
    assert deltas.sanitize_name("häuser_ß") == "häuser_ß"


def test_unique_path_numbers_and_never_reuses(tmp_path):
    p1 = deltas.unique_path(str(tmp_path), "style")
    assert os.path.basename(p1) == "style_00001.safetensors"
    open(p1, "w").close()
    assert os.path.basename(deltas.unique_path(str(tmp_path), "style")) == "style_00002.safetensors"
    with pytest.raises(ValueError, match="path separator"):
        deltas.unique_path(str(tmp_path), "../style")


def test_exact_path_refuses_existing_file(tmp_path):
    p = deltas.exact_path(str(tmp_path), "tok", what="trigger_word")
    open(p, "w").close()
    with pytest.raises(WeightFileError, match="already exists"):
        deltas.exact_path(str(tmp_path), "tok", what="trigger_word")
    assert deltas.exact_path(str(tmp_path), "tok", overwrite=True) == p


# --- atomic, no-clobber writes ---------------------------------------------------------------

def _lora(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "lora_unet_a.lora_up.weight": torch.randn(8, 2, generator=g),
        "lora_unet_a.lora_down.weight": torch.randn(2, 6, generator=g),
        "lora_unet_a.alpha": torch.tensor(2.0),
    }


def test_save_delta_refuses_to_overwrite_and_leaves_no_temp(tmp_path):
    p = str(tmp_path / "d.safetensors")
    deltas.save_delta(p, _lora(0), {"x": "1"})
    before = load_file(p)
    with pytest.raises(WeightFileError, match="already exists"):
        deltas.save_delta(p, _lora(1), {"x": "2"})
    assert all(torch.equal(before[k], v) for k, v in load_file(p).items())
    assert _files(tmp_path) == ["d.safetensors"]
    deltas.save_delta(p, _lora(1), {"x": "2"}, overwrite=True)
    assert torch.equal(load_file(p)["lora_unet_a.lora_up.weight"], _lora(1)["lora_unet_a.lora_up.weight"].half())


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    def boom(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        deltas.save_delta(str(tmp_path / "x.safetensors"), _lora(), {})
    assert _files(tmp_path) == []


@pytest.mark.parametrize("bad, match", [
    ({"k.diff": torch.tensor([1.0, float("nan")])}, "non-finite"),
    ({"k.diff": torch.tensor([1e6])}, "overflows fp16"),
    ({}, "empty"),
])
def test_bad_tensors_write_nothing(tmp_path, bad, match):
    with pytest.raises(WeightFileError, match=match):
        deltas.save_delta(str(tmp_path / "x.safetensors"), bad, {})
    assert _files(tmp_path) == []


@pytest.mark.parametrize("dtype, want", [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32),
                                         (torch.bfloat16, torch.bfloat16)])
def test_save_dtypes(tmp_path, dtype, want):
    p = deltas.save_delta(str(tmp_path / "d.safetensors"), _lora(), {}, dtype=dtype)
    with safe_open(p, "pt") as f:
        assert f.get_tensor("lora_unet_a.lora_up.weight").dtype == want
        assert f.metadata()["domainstudio.dtype"] == deltas.dtype_name(want)
    with pytest.raises(WeightFileError, match="fp16"):
        deltas.save_delta(str(tmp_path / "e.safetensors"), _lora(), {}, dtype="int8")


# --- reading: truncated / corrupt / pickles --------------------------------------------------

def test_truncated_and_corrupt_files_give_specific_errors(tmp_path):
    p = deltas.save_delta(str(tmp_path / "d.safetensors"), _lora(), {"a": "b"})
    data = open(p, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 10])
    with pytest.raises(WeightFileError, match="truncated or corrupt"):
        deltas.read_weight_file(str(cut))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(WeightFileError, match="truncated or corrupt"):
        deltas.read_weight_file(str(junk))
    with pytest.raises(WeightFileError, match="no such file"):
        deltas.read_weight_file(str(tmp_path / "missing.safetensors"))
    tensors, md = deltas.read_weight_file(p)
    assert md["a"] == "b" and set(tensors) == set(_lora())


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > " + os.environ.get("DS_EVIL_MARK", "/tmp/ds_evil_mark"),))


def test_pickled_code_is_never_run(tmp_path, monkeypatch):
    mark = tmp_path / "mark"
    monkeypatch.setenv("DS_EVIL_MARK", str(mark))
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"string_to_param": {"*": _Evil()}}, f)
    with pytest.raises(WeightFileError, match="weights_only"):
        embeddings.load_embedding(str(p))
    with pytest.raises(WeightFileError, match="weights_only"):
        deltas.read_weight_file(str(p))
    assert not mark.exists()


# --- fingerprint -----------------------------------------------------------------------------

def _unet_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "input_blocks.0.0.weight": torch.randn(32, 4, 3, 3, generator=g).half(),
        "input_blocks.0.0.bias": torch.randn(32, generator=g).half(),
        **{f"input_blocks.1.1.transformer_blocks.0.attn1.to_{n}.weight": torch.randn(32, 32, generator=g).half()
           for n in "qkv"},
        "out.2.weight": torch.randn(4, 32, 3, 3, generator=g).half(),
    }


def test_fingerprint_is_stable_across_dtypes_prefixes_and_order():
    sd = _unet_state()
    fp = deltas.model_fingerprint(sd)
    assert fp.startswith("ds1-") and len(fp) == 20
    assert deltas.model_fingerprint({k: v.float() for k, v in reversed(list(sd.items()))}) == fp
    assert deltas.model_fingerprint({k: v.bfloat16() for k, v in sd.items()}) == fp
    assert deltas.model_fingerprint({"model.diffusion_model." + k: v for k, v in sd.items()}) == fp
    assert deltas.model_fingerprint({"diffusion_model." + k: v for k, v in sd.items()}) == fp


def test_fingerprint_changes_with_weights_and_architecture():
    sd = _unet_state()
    fp = deltas.model_fingerprint(sd)
    assert deltas.model_fingerprint(_unet_state(seed=1)) != fp
    other = dict(sd)
    other["out.2.weight"] = other["out.2.weight"] + 0.25
    assert deltas.model_fingerprint(other) != fp
    fewer = {k: v for k, v in sd.items() if "to_v" not in k}
    assert deltas.model_fingerprint(fewer) != fp
    with pytest.raises(WeightFileError, match="no weight matrices"):
        deltas.model_fingerprint({"x.bias": torch.zeros(3)})


def test_check_compatible():
    md = deltas.build_metadata(kind="lora", family="sd1", title="t", method="m", fingerprint="ds1-aaaa")
    assert deltas.check_compatible(md, family="sd1", fingerprint="ds1-aaaa") == []
    with pytest.raises(WeightFileError, match="sd1 model but the loaded model is sdxl"):
        deltas.check_compatible(md, family="sdxl", fingerprint="ds1-aaaa")
    with pytest.raises(WeightFileError, match="trained on base model ds1-aaaa.*ignore_mismatch"):
        deltas.check_compatible(md, family="sd1", fingerprint="ds1-bbbb")
    assert deltas.check_compatible(md, family="sd1", fingerprint="ds1-bbbb", override=True)
    # A kohya file without our keys: architecture from ss_base_model_version, no fingerprint check.
    assert deltas.check_compatible({"ss_base_model_version": "sdxl_base_v1-0"}, family="sdxl", fingerprint="x") == []
    with pytest.raises(WeightFileError, match="sdxl model"):
        deltas.check_compatible({"ss_base_model_version": "sdxl_base_v1-0"}, family="sd1")


def test_metadata_fields():
    md = deltas.build_metadata(kind="svd_lora", family="sdxl", title="My Style", method="domainstudio", rank=16,
                               alpha=16.0, trigger="a sks house", fingerprint="ds1-0123", steps=200,
                               resolution=1024, learning_rate=1e-4, dtype="bf16", training={"lambda_img": 100.0})
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert md["modelspec.title"] == md["ss_output_name"] == "My Style"
    assert md["modelspec.resolution"] == "1024x1024" and md["modelspec.date"][:2] == "20"
    assert md["modelspec.trigger_phrase"] == "a sks house"
    assert md["ss_base_model_version"] == "sdxl_base_v1-0" and md["ss_network_dim"] == "16"
    assert md["domainstudio.base_fingerprint"] == "ds1-0123" and md["domainstudio.steps"] == "200"
    assert md["domainstudio.dtype"] == "bf16" and '"lambda_img": 100.0' in md["domainstudio.training"]
    assert all(isinstance(v, str) for v in md.values())
    emb = deltas.build_metadata(kind="embedding", family="sd1", title="tok", method="ti")
    assert emb["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    with pytest.raises(WeightFileError, match="family"):
        deltas.build_metadata(kind="lora", family="flux", title="t", method="m")


# --- conversions -----------------------------------------------------------------------------

def test_lora_to_diff_matches_comfy_scale_convention():
    g = torch.Generator().manual_seed(0)
    lin = deltas.lora_entries("a.b", torch.randn(8, 4, generator=g), torch.randn(4, 6, generator=g), 2.0, (8, 6))
    conv = deltas.lora_entries("c", torch.randn(8, 4, generator=g), torch.randn(4, 5 * 9, generator=g), 8.0, (8, 5, 3, 3))
    d = deltas.lora_to_diff({**lin, **conv})
    up, down = lin["lora_unet_a_b.lora_up.weight"], lin["lora_unet_a_b.lora_down.weight"]
    assert torch.allclose(d["lora_unet_a_b.diff"], up @ down * (2.0 / 4))
    assert d["lora_unet_c.diff"].shape == (8, 5, 3, 3)
    assert conv["lora_unet_c.lora_up.weight"].shape == (8, 4, 1, 1)
    assert conv["lora_unet_c.lora_down.weight"].shape == (4, 5, 3, 3)


def test_svd_extraction_error_and_exactness():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(64, 3, generator=g) @ torch.randn(3, 40, generator=g)  # rank 3
    full = torch.randn(16, 8, 3, 3, generator=g)
    tensors = {"lora_unet_low.diff": low, "lora_unet_conv.diff": full, "lora_unet_x.diff_b": torch.ones(4)}
    lora, rep = deltas.extract_lora_svd(tensors, 3)
    assert rep.rank == 3 and rep.layers == 2 and 0 < rep.rel_error < 1 and "relative reconstruction error" in rep.describe()
    back = deltas.lora_to_diff(lora)
    assert torch.allclose(back["lora_unet_low.diff"], low, atol=1e-4)  # rank-3 layer recovered exactly
    err = (back["lora_unet_conv.diff"] - full).norm() / full.norm()
    assert rep.max_layer_rel_error == pytest.approx(float(err), rel=1e-3)
    expect = ((back["lora_unet_conv.diff"] - full).norm() ** 2 + (back["lora_unet_low.diff"] - low).norm() ** 2).sqrt() / (
        (full.norm() ** 2 + low.norm() ** 2).sqrt())
    assert rep.rel_error == pytest.approx(float(expect), rel=1e-3)
    assert torch.equal(lora["lora_unet_x.diff_b"], torch.ones(4)) and lora["lora_unet_conv.alpha"].item() == 3.0
    assert lora["lora_unet_conv.lora_down.weight"].shape == (3, 8, 3, 3)
    # Full rank: lossless. A LoRA input is re-factored.
    _, rep_full = deltas.extract_lora_svd(tensors, 1000)
    assert rep_full.rel_error < 1e-5
    relora, rep2 = deltas.extract_lora_svd(lora, 2)
    assert rep2.rank == 2 and relora["lora_unet_low.lora_down.weight"].shape == (2, 40)
    with pytest.raises(WeightFileError, match="rank"):
        deltas.extract_lora_svd(tensors, 0)


# --- embeddings ------------------------------------------------------------------------------

def _vec(n, dim, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def _a1111_load(path):
    """What A1111's textual_inversion.create_embedding_from_data accepts (its documented branches):
    'string_to_param'; 'clip_g' + 'clip_l'; else a dict whose single value is a tensor."""
    data = load_file(path) if path.endswith(".safetensors") else torch.load(path, weights_only=True)
    if "string_to_param" in data:
        (emb,) = data["string_to_param"].values()
        return {"vec": emb}
    if "clip_g" in data and "clip_l" in data:
        return {"clip_g": data["clip_g"], "clip_l": data["clip_l"]}
    assert len(data) == 1, "embedding file has multiple terms in it"  # A1111's own assertion
    return {"vec": next(iter(data.values()))}


def _diffusers_retrieve(path, token):
    """diffusers TextualInversionLoaderMixin._retrieve_tokens_and_embeddings, the dict branches."""
    data = load_file(path) if path.endswith(".safetensors") else torch.load(path, weights_only=True)
    if len(data) == 1:
        return token, next(iter(data.values()))
    if "string_to_param" in data:
        return data["name"], data["string_to_param"]["*"]
    raise ValueError("Loaded state dictionary is incorrect")


def test_sd1_embedding_default_format_reads_in_every_layout(tmp_path):
    v = _vec(3, 768)
    md = deltas.build_metadata(kind="embedding", family="sd1", title="mytok", method="ti", trigger="mytok")
    p = embeddings.save_embedding(str(tmp_path / "mytok.safetensors"), {"clip_l": v}, md)
    raw = load_file(p)
    assert set(raw) == {"clip_l"} and raw["clip_l"].dtype == torch.float16  # one tensor: A1111, ComfyUI, diffusers
    assert torch.allclose(_a1111_load(p)["vec"].float(), v, atol=2e-3)
    tok, emb = _diffusers_retrieve(p, "mytok")
    assert emb.shape == (3, 768)
    back = embeddings.load_embedding(p)
    assert set(back) == {"clip_l"} and torch.allclose(back["clip_l"], v, atol=2e-3)
    with safe_open(p, "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"


def test_sdxl_embedding_layout(tmp_path):
    v = {"clip_l": _vec(2, 768), "clip_g": _vec(2, 1280, 1)}
    p = embeddings.save_embedding(str(tmp_path / "x.safetensors"), v, {}, dtype=torch.float32)
    assert set(load_file(p)) == {"clip_l", "clip_g"}
    a = _a1111_load(p)
    assert torch.equal(a["clip_l"], v["clip_l"]) and torch.equal(a["clip_g"], v["clip_g"])
    back = embeddings.load_embedding(p)
    assert all(torch.equal(back[k], v[k]) for k in v)
    assert embeddings.family_of(back) == "sdxl"


def test_pt_formats_write_and_read_back(tmp_path):
    v = _vec(2, 768)
    p = embeddings.save_embedding(str(tmp_path / "tok.pt"), {"clip_l": v}, {"domainstudio.steps": "12"},
                                  dtype=torch.float32)
    data = torch.load(p, weights_only=True)
    assert data["name"] == "tok" and data["step"] == 12 and torch.equal(data["string_to_param"]["*"], v)
    assert torch.equal(_a1111_load(p)["vec"], v)
    assert _diffusers_retrieve(p, None)[0] == "tok"
    assert torch.equal(embeddings.load_embedding(p)["clip_l"], v)
    px = embeddings.save_embedding(str(tmp_path / "tx.pt"), {"clip_l": v, "clip_g": _vec(2, 1280)}, {})
    assert set(embeddings.load_embedding(px)) == {"clip_l", "clip_g"}


@pytest.mark.parametrize("layout", ["emb_params", "diffusers", "a1111_1d", "clip_h"])
def test_foreign_embedding_layouts_load(tmp_path, layout):
    v = _vec(1, 1024 if layout == "clip_h" else 768)
    data = {"emb_params": {"emb_params": v}, "diffusers": {"<cat-toy>": v[0]}, "a1111_1d": {"*": v[0]}, "clip_h": {"clip_h": v}}[layout]
    p = str(tmp_path / "e.safetensors")
    save_file(data, p)
    out = embeddings.load_embedding(p)
    key = "clip_h" if layout == "clip_h" else "clip_l"
    assert set(out) == {key} and torch.equal(out[key], v)


@pytest.mark.parametrize("vectors, match", [
    ({"clip_g": _vec(1, 1280)}, "keys"),
    ({"clip_l": torch.zeros(0, 768)}, r"has shape \(.*\); this model.s clip_l expects \[n, width\]"),
    ({"clip_l": torch.zeros(1, 2, 768)}, r"has shape \(.*\); this model.s clip_l expects \[n, width\]"),
    ({"clip_l": _vec(2, 768), "clip_g": _vec(3, 1280)}, "token count"),
    ({"clip_l": torch.full((1, 768), float("nan"))}, "non-finite"),
    ({"clip_l": torch.full((1, 768), 1e6)}, "overflows"),
])
def test_bad_embeddings_write_nothing(tmp_path, vectors, match):
    with pytest.raises(WeightFileError, match=match):
        embeddings.save_embedding(str(tmp_path / "e.safetensors"), vectors, {})
    assert _files(tmp_path) == []


def test_unrecognised_embedding_is_refused(tmp_path):
    p = str(tmp_path / "two.safetensors")
    save_file({"a": _vec(1, 768), "b": _vec(1, 768)}, p)
    with pytest.raises(WeightFileError, match="unrecognised embedding layout"):
        embeddings.load_embedding(p)
    q = str(tmp_path / "odd.safetensors")
    save_file({"x": _vec(1, 500)}, q)
    with pytest.raises(WeightFileError, match="matches no known text encoder"):
        embeddings.load_embedding(q)


# --- widths from the loaded model --------------------------------------------------------------

def test_non_standard_widths_save_and_read_back_when_the_model_gives_them(tmp_path):
    # A miniature text encoder 256 wide: the file is written with the model's own width (a hard-coded
    # 768 once refused such a file at the end of a 7-minute run).
    v = _vec(2, 256)
    widths = {"clip_l": 256}
    p = embeddings.save_embedding(str(tmp_path / "mini.safetensors"), {"clip_l": v}, {}, dtype=torch.float32,
                                  widths=widths)
    vectors, _ = embeddings.read_embedding(p, widths=widths)
    assert torch.equal(vectors["clip_l"], v)
    assert torch.equal(embeddings.load_embedding(p)["clip_l"], v)  # keyed by encoder: no widths needed
    # a single unnamed tensor (diffusers' {token: tensor}) is placed by the model's widths
    q = str(tmp_path / "single.safetensors")
    save_file({"<mini>": v}, q)
    assert torch.equal(embeddings.read_embedding(q, widths=widths)[0]["clip_l"], v)
    with pytest.raises(WeightFileError, match="matches no known text encoder"):
        embeddings.read_embedding(q)
    sdxl = {"clip_l": _vec(1, 256), "clip_g": _vec(1, 320)}
    r = embeddings.save_embedding(str(tmp_path / "x.safetensors"), sdxl, {}, dtype=torch.float32,
                                  widths={"clip_l": 256, "clip_g": 320})
    assert all(torch.equal(embeddings.load_embedding(r)[k], sdxl[k]) for k in sdxl)


@pytest.mark.parametrize("vectors, widths, match", [
    ({"clip_l": _vec(1, 256)}, {"clip_l": 768}, r"vectors\['clip_l'\] has shape \(1, 256\); this model's clip_l "
                                                r"expects \[n, 768\]"),
    ({"clip_l": _vec(1, 768)}, {"clip_l": 256}, r"expects \[n, 256\]"),
    ({"clip_l": _vec(1, 768), "clip_g": _vec(1, 1024)}, {"clip_l": 768, "clip_g": 1280},
     r"vectors\['clip_g'\].*expects \[n, 1280\]"),
])
def test_widths_that_do_not_match_the_model_are_refused(tmp_path, vectors, widths, match):
    with pytest.raises(WeightFileError, match=match):
        embeddings.save_embedding(str(tmp_path / "e.safetensors"), vectors, {}, widths=widths)
    assert _files(tmp_path) == []


def test_core_modules_import_without_any_host():
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import runpy, sys; runpy.run_path(sys.argv[1]); "
            "import comfyui_domainstudio.trainer.deltas, comfyui_domainstudio.trainer.embeddings, "
            "comfyui_domainstudio.trainer.files, comfyui_domainstudio.trainer.run, "
            "comfyui_domainstudio.trainer.loop, comfyui_domainstudio.trainer.methods, "
            "comfyui_domainstudio.testing.toy; "
            "bad=[m for m in sys.modules if m.split('.')[0] in ('comfy','comfy_api','folder_paths','nodes','diffusers',"
            "'transformers', 'trainer')];"
            "assert not bad, bad; print('ok')")
    out = subprocess.run([sys.executable, "-c", code, os.path.join(repo, "__init__.py")], cwd=os.path.dirname(repo),
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
