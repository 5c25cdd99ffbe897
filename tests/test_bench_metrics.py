"""The domain benchmark's metrics (bench/domain_quality.py) on hand-computed cases; no ComfyUI."""

import importlib.util
import os

import numpy as np
import pytest

from comfyui_domainstudio.testing.harness import REPO

spec = importlib.util.spec_from_file_location("domain_quality", os.path.join(REPO, "bench", "domain_quality.py"))
dq = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dq)


def test_features_are_16x16_area_means():
    img = np.zeros((1, 64, 64, 3), np.float32)
    img[0, :4, :4, 0] = 1.0  # exactly the first 4x4 cell, red
    f = dq.features(img).reshape(16, 16, 3)
    assert f[0, 0, 0] == 1.0 and f.sum() == 1.0


def test_distances_are_rms():
    a = np.array([[0.0, 0.0], [3.0, 4.0]], np.float32)
    d = dq.distances(a, a)
    assert d[0, 1] == pytest.approx(np.sqrt((9 + 16) / 2)) and d[0, 0] == 0


def test_intra_cluster_diversity_hand_case():
    shots = np.array([[0.0, 0.0], [10.0, 10.0]], np.float32)
    # Cluster 0: three samples at pairwise RMS distances 1/sqrt2, 1/sqrt2, 1; cluster 1: one sample (ignored).
    samples = np.array([[0, 0], [1, 0], [0, 1], [10, 10]], np.float32)
    expect = np.mean([np.sqrt(0.5), np.sqrt(0.5), 1.0])
    assert dq.intra_cluster_diversity(samples, shots) == pytest.approx(expect)
    assert dq.intra_cluster_diversity(np.repeat(shots, 5, axis=0), shots) == 0.0  # copying the shots scores 0


def test_memorization_is_mean_nearest_shot_distance():
    shots = np.array([[0.0, 0.0]], np.float32)
    assert dq.memorization(shots.copy(), shots) == 0.0
    assert dq.memorization(np.array([[2.0, 2.0], [0.0, 0.0]], np.float32), shots) == pytest.approx(1.0)


def test_style_classifier_separates_styles():
    rng = np.random.default_rng(0)
    src = rng.normal(0.3, 0.05, (100, 20)).astype(np.float32)
    tgt = rng.normal(0.5, 0.05, (100, 20)).astype(np.float32)
    clf = dq.StyleClassifier(src, tgt)
    assert clf.prob(tgt).mean() > 0.9 and clf.prob(src).mean() < 0.1


def test_splits_are_fixed_and_disjoint():
    a, b = dq.splits(100, list(range(0, 100, 3))), dq.splits(100, list(range(0, 100, 3)))
    assert a == b and len(a["shots"]) == 10 and len(a["eval"]) == 10
    assert not set(a["shots"]) & set(a["eval"]) and not (set(a["shots"]) | set(a["eval"])) & set(a["classifier"])
    assert set(a["shots"]) <= set(range(0, 100, 3))


def test_method_settings_are_the_same_for_every_seed():
    """Every seed of a method must train the same way: reading a method's settings never changes them."""
    first = {m: dq.method_settings(m, 5e-4) for m in dq.METHODS if dq.METHODS[m] is not None}
    again = {m: dq.method_settings(m, 5e-4) for m in dq.METHODS if dq.METHODS[m] is not None}
    assert first == again
    assert first["finetune_full"][1:3] == ("full_all", 5e-5)
    assert first["dreambooth_prior"][0] == 20 and first["dreambooth_prior"][3] == dq.LAMBDAS_OFF
    assert first["domainstudio"] == (0, "lora_all", 5e-4, {})
    assert first["domainstudio_no_pairwise"][3] == {"lambda_img": 0.0}


def test_merge_results_overrides_drops_and_refuses_other_settings(tmp_path):
    import json

    spec_m = importlib.util.spec_from_file_location("merge_results", os.path.join(REPO, "bench", "merge_results.py"))
    mr = importlib.util.module_from_spec(spec_m)
    spec_m.loader.exec_module(mr)
    setting = {"steps": 300, "lr": 5e-4, "target_prompt": "a sks emoji", "seeds": [0]}
    real = {k: np.zeros((2, 4, 4, 3), np.uint8) for k in mr.REAL_SETS}

    def run(name, rows, **extra):
        samples = {f"{r['method']}/{r['seed']}/domain": np.full((2, 4, 4, 3), int(r["style"] * 100), np.uint8)
                   for r in rows}
        np.savez(tmp_path / f"{name}_samples.npz", **real, **samples)
        full = [dict(r, diversity=0.1, memorize=0.2, content_to_target=0.3, content_style=0.4, train_s=1.0) for r in rows]
        (tmp_path / f"{name}.json").write_text(json.dumps({"setting": dict(setting, **extra), "rows": full,
                                                           "samples_npz": f"{name}_samples.npz"}))
        return str(tmp_path / f"{name}.json")

    a = run("a", [{"method": "ft", "seed": 0, "style": 0.1}, {"method": "ft", "seed": 1, "style": 0.9},
                  {"method": "ds", "seed": 0, "style": 0.3}])
    b = run("b", [{"method": "ft", "seed": 1, "style": 0.5}, {"method": "ds", "seed": 1, "style": 0.7}])
    out = str(tmp_path / "m.json")
    assert mr.main([out, a, b, "--drop", "ds/0@a.json"]) == 0
    merged = json.loads(open(out).read())
    got = {(r["method"], r["seed"]): r["style"] for r in merged["rows"]}
    assert got == {("ft", 0): 0.1, ("ft", 1): 0.5, ("ds", 1): 0.7}         # b replaced ft/1, ds/0 dropped
    assert merged["row_source"]["ft/1"] == "b.json" and merged["setting"]["seeds"] == [0, 1]
    assert merged["summary"]["ft"]["style"][0] == pytest.approx(0.3)
    z = np.load(tmp_path / "m_samples.npz")
    assert int(z["ft/1/domain"][0, 0, 0, 0]) == 50 and "ds/0/domain" not in z.files
    c = run("c", [{"method": "ft", "seed": 2, "style": 0.2}], steps=1200)
    assert mr.main([str(tmp_path / "m2.json"), a, c]) == 1 and not (tmp_path / "m2.json").exists()
