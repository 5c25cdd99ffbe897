"""The domain benchmark's metrics (bench/domain_quality.py) on hand-computed cases; no ComfyUI."""

import importlib.util
import os

import numpy as np
import pytest

from conftest import REPO

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
