"""The domain benchmarks' metrics, recipes and aggregation (bench/domain_quality.py, bench/frontier.py,
bench/merge_results.py, bench/emoji_styles.py) on hand-computed cases; no ComfyUI, no download."""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

from comfyui_domainstudio.testing.harness import REPO


def _bench(name):
    """bench/<name>.py loaded once as bench_<name>, the name the bench scripts share."""
    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, os.path.join(REPO, "bench", f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


dq = _bench("domain_quality")
fr = _bench("frontier")
dfl = _bench("diversity_floor")
es = _bench("emoji_styles")
pq = _bench("personalize_quality")


def test_a_recipes_timestep_range_is_the_run_options_range():
    _, opts = fr.GRID["ds_paper_all_t300_lr3e-4"][1].settings(steps=10)
    assert (opts.min_timestep, opts.max_timestep) == (0, 300)
    _, opts = fr.GRID["ds_paper_all_lr3e-4"][1].settings(steps=10)
    assert (opts.min_timestep, opts.max_timestep) == (0, 1000)


def test_personalize_sweep_sets_the_runs_timestep_range():
    import argparse

    args = argparse.Namespace(**{k: None for k in pq.SWEEP_KEYS})  # every flag at "not given"
    variants = pq.parse_sweep(["min_timestep=0,200", "max_timestep=1000"])
    assert [pq.variant_name(v) for v in variants] == ["max_timestep=1000,min_timestep=0",
                                                      "max_timestep=1000,min_timestep=200"]
    _, opts, _ = pq.resolve(args, variants[1], "dreambooth_no_prior", 3, "cat")
    assert (opts.min_timestep, opts.max_timestep, opts.train_seed) == (200, 1000, 3)
    from comfyui_domainstudio.trainer.run import default_options

    _, opts, _ = pq.resolve(args, {}, "rare_token", 0, "cat")  # no flag, no variant: the node's default range
    node = default_options("rare_token")
    assert (opts.min_timestep, opts.max_timestep) == (node.min_timestep, node.max_timestep)
    args.max_timestep = 500  # a flag, then a variant over it
    assert pq.resolve(args, {}, "rare_token", 0, "cat")[1].max_timestep == 500
    assert pq.resolve(args, {"max_timestep": 700}, "rare_token", 0, "cat")[1].max_timestep == 700


def test_personalize_paired_comparison_hand_case():
    def row(variant, subject, seed, fid, l0, hf, method="dreambooth_no_prior"):
        return {"variant": variant, "subject": subject, "method": method, "seed": seed, "fidelity": fid,
                "drift": 0.2, "forget": 0.03, "hf": hf, "lite0": {"fidelity": l0}}

    rows = [row("A", "cat", 0, 0.10, 0.60, 0.020), row("A", "cat", 1, 0.20, 0.50, 0.030),
            row("A", "car", 0, 0.30, 0.40, 0.010),
            row("B", "cat", 0, 0.12, 0.62, 0.010), row("B", "cat", 1, 0.16, 0.49, 0.020),
            row("B", "car", 0, 0.33, 0.43, 0.011),
            row("B", "palm", 0, 0.5, 0.5, 0.5),                       # no partner in A: left out
            row("B", "cat", 0, 0.9, 0.9, 0.9, method="rare_token"),   # another method: no partner either
            {"variant": "B", "subject": "car", "method": "dreambooth_no_prior", "seed": 1, "error": "diverged"},
            {"variant": "base", "subject": "cat", "method": "base", "seed": 0, "fidelity": 0.3, "hf": 0.01}]
    out = pq.paired(rows, "A")
    assert list(out) == ["B"] and list(out["B"]) == ["dreambooth_no_prior"]
    fid, l0, hf = (out["B"]["dreambooth_no_prior"][k] for k in ("fidelity", "lite0.fidelity", "hf"))
    assert fid["n"] == 3 and fid["mean_diff"] == pytest.approx((0.02 - 0.04 + 0.03) / 3)
    assert fid["higher"] == 2 and fid["sd_diff"] == pytest.approx(np.std([0.02, -0.04, 0.03], ddof=1))
    assert l0["mean_diff"] == pytest.approx((0.02 - 0.01 + 0.03) / 3) and l0["higher"] == 2
    assert hf["mean_diff"] == pytest.approx((-0.01 - 0.01 + 0.001) / 3) and hf["higher"] == 1
    assert hf["p"] == pytest.approx(fr.sign_flip_p([-0.01, -0.01, 0.001]))
    assert out["B"]["dreambooth_no_prior"]["drift"]["mean_diff"] == 0.0


def test_split_disagreement_is_relative_to_the_mean():
    assert dfl.split_disagreement(0.1, 0.3) == pytest.approx(1.0)  # |0.1 - 0.3| / 0.2
    assert dfl.split_disagreement(0.2, 0.2) == 0.0
    assert dfl.split_disagreement(0.0, 0.0) == float("inf")


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
    assert a == b and len(a["shots"]) == dq.N_SHOTS and len(a["eval"]) == dq.N_EVAL
    assert not set(a["shots"]) & set(a["eval"]) and not (set(a["shots"]) | set(a["eval"])) & set(a["classifier"])
    assert set(a["shots"]) | set(a["eval"]) <= set(range(0, 100, 3))  # names the base model knows
    assert sorted(a["shots"] + a["eval"] + a["classifier"]) == list(range(100))


def test_summarize_mean_and_sd_over_seeds():
    rows = [{"recipe": "a", "seed": s, "style": v, "train_s": 1.0} for s, v in ((0, 0.2), (1, 0.4))]
    rows.append({"recipe": "b", "seed": 0, "style": 0.9, "train_s": 2.0})
    s = dq.summarize(rows, ["a", "b"], keys=("style", "train_s"))
    assert s["a"]["style"] == pytest.approx((0.3, np.std([0.2, 0.4], ddof=1)))
    assert s["b"]["style"] == (0.9, 0.0)
    assert np.isnan(dq.mean_sd([1.0, float("nan")])[0])


def test_recipes_resolve_onto_the_registered_methods():
    """Every recipe is a registered method with valid settings; each seed trains the same way; the
    DreamBooth-with-prior recipe is DomainStudio with every DomainStudio term off and class images."""
    from comfyui_domainstudio.trainer import settings
    from comfyui_domainstudio.trainer.methods import METHODS
    from comfyui_domainstudio.trainer.methods.domainstudio import DomainStudioConfig

    for name, r in dq.RECIPES.items():
        if r.method is None:
            continue
        assert r.method in METHODS, name
        cfg, opts = r.settings(steps=7, seed=3)
        settings.check(cfg)
        settings.check(opts)
        assert cfg.steps == 7 and opts.train_seed == 3 and opts.preview_every == 0
        assert (cfg, opts) == r.settings(steps=7, seed=3)  # reading settings never changes a recipe
        assert cfg.target_prompt == dq.TARGET_PROMPT and "{caption}" in cfg.target_prompt
    db, _ = dq.RECIPES["dreambooth_prior"].settings()
    assert (db.lambda_img, db.lambda_hf, db.lambda_hfmse) == (0.0, 0.0, 0.0) and db.prior_images > 0
    assert db.source_prompt == dq.CLASS_PROMPT == "an emoji" and db.lambda_prior > 0  # the class images' prompt
    ds, _ = dq.RECIPES["domainstudio"].settings()
    assert ds.lambda_img == DomainStudioConfig().lambda_img and ds.steps == DomainStudioConfig().steps
    _, full = dq.RECIPES["finetune_full"].settings()
    assert full.train_mode.startswith("full")
    for name, (family, r) in fr.GRID.items():
        assert family in fr.FAMILIES and r.method in METHODS, name
        cfg, opts = r.settings(steps=10)
        settings.check(cfg)
        # a setting's name says what it trains, whatever the pack's default is now
        want = "lora_all" if "_all" in name else "full_attn" if name.startswith("ftfull") else "lora_attn"
        assert opts.train_mode == want, (name, opts.train_mode)
        assert (opts.lora_rank, opts.lora_alpha) == ((32, 32.0) if "_r32" in name else (8, 8.0)), name
        want = {"_thi": (500, 1000), "_tlo": (0, 500), "_t300": (0, 300), "_t700": (0, 700)}
        assert r.timesteps == next((v for k, v in want.items() if k + "_" in name), None), name
        assert opts.timesteps == (r.timesteps or (0, 1000)), name
    # the recipes without options train what a user gets: the methods' own defaults
    assert dq.RECIPES["domainstudio"].settings()[1].train_mode == "lora_all"
    assert dq.RECIPES["finetune"].settings()[1].train_mode == "lora_all"


def test_frontier_points_compare_and_plot(tmp_path):
    def run(setting, family, seed, style, pts):
        return {"setting": setting, "family": family, "style": style, "seed": seed,
                "points": {str(k): {"style": s, "diversity": d, "shot_dist": m, "content_dist": 0.4, "kid_target": 0.1}
                           for k, (s, d, m) in pts.items()}}

    result = {"runs": {}, "families": {"ft": "finetune", "ds": "domainstudio"},
              "base": {"twitter": {"0": {"style": 0.0, "diversity": 0.3, "shot_dist": 0.6, "content_dist": 0.4,
                                          "kid_target": 0.5}}}}
    result["runs"]["ft/twitter/0"] = run("ft", "finetune", 0, "twitter", {50: (0.4, 0.20, 0.50), 100: (0.9, 0.10, 0.30)})
    result["runs"]["ft/twitter/1"] = run("ft", "finetune", 1, "twitter", {50: (0.6, 0.22, 0.52), 100: (0.95, 0.12, 0.32)})
    result["runs"]["ds/twitter/0"] = run("ds", "domainstudio", 0, "twitter", {50: (0.5, 0.30, 0.55), 100: (0.9, 0.25, 0.45)})
    pts = fr.points(result)
    ft50 = next(p for p in pts if p["setting"] == "ft" and p["step"] == 50)
    assert ft50["n_seeds"] == 2 and ft50["style"] == pytest.approx((0.5, np.std([0.4, 0.6], ddof=1)))
    assert ft50["diversity"][0] == pytest.approx(0.21) and ft50["family"] == "finetune"
    assert any(p["setting"] == "base" and p["step"] == 0 for p in pts)
    cmp_ = fr.compare(pts)["twitter"]
    assert cmp_["0.30-0.60"]["domainstudio"]["diversity"][0] == pytest.approx(0.30)
    assert cmp_["0.30-0.60"]["finetune"]["diversity"][0] == pytest.approx(0.21)
    assert cmp_["0.85-1.00"]["finetune"]["diversity_at"] == "ft@100" and cmp_["0.85-1.00"]["finetune_full"] is None
    png = tmp_path / "f.png"
    fr.plot(pts, str(png))
    from PIL import Image

    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[0] > 300 and img.shape[1] > 1000
    red = np.array(fr.COLORS["domainstudio"])
    assert (np.abs(img.astype(int) - red).sum(-1) < 30).sum() > 20  # DomainStudio's line is drawn
    out = tmp_path / "fr.json"
    out.write_text(json.dumps(result))
    assert fr.main(["--plot-only", "--out", str(out), "--png", str(png)]) == 0
    assert "compare" in json.loads(out.read_text())
    assert fr.main(["--plot-only", "--out", str(out), "--png", str(png), "--plot-settings", "ft"]) == 0
    img = np.asarray(Image.open(png).convert("RGB"))
    assert (np.abs(img.astype(int) - red).sum(-1) < 30).sum() == 0  # DomainStudio left out of the picture
    assert {p["setting"] for p in json.loads(out.read_text())["points"]} == {"ft", "ds", "base"}  # not the table


def test_merge_results_overrides_drops_and_refuses_other_settings(tmp_path):
    mr = _bench("merge_results")
    setting = {"steps": 300, "target_prompt": "a sks emoji", "style": "twitter", "seeds": [0]}
    real = {k: np.zeros((2, 4, 4, 3), np.uint8) for k in mr.REAL_SETS}

    def run(name, rows, **extra):
        samples = {f"{r['recipe']}/{r['seed']}/samples": np.full((2, 4, 4, 3), int(r["style"] * 100), np.uint8)
                   for r in rows}
        np.savez(tmp_path / f"{name}_samples.npz", **real, **samples)
        full = [dict(r, diversity=0.1, shot_dist=0.2, kid_target=0.3, content_dist=0.3, content_style=0.4,
                     train_s=1.0) for r in rows]
        (tmp_path / f"{name}.json").write_text(json.dumps({"setting": dict(setting, **extra), "rows": full,
                                                           "samples_npz": f"{name}_samples.npz"}))
        return str(tmp_path / f"{name}.json")

    a = run("a", [{"recipe": "finetune", "seed": 0, "style": 0.1}, {"recipe": "finetune", "seed": 1, "style": 0.9},
                  {"recipe": "domainstudio", "seed": 0, "style": 0.3}])
    b = run("b", [{"recipe": "finetune", "seed": 1, "style": 0.5}, {"recipe": "domainstudio", "seed": 1, "style": 0.7}])
    out = str(tmp_path / "m.json")
    assert mr.main([out, a, b, "--drop", "domainstudio/0@a.json"]) == 0
    merged = json.loads(open(out).read())
    got = {(r["recipe"], r["seed"]): r["style"] for r in merged["rows"]}
    assert got == {("finetune", 0): 0.1, ("finetune", 1): 0.5, ("domainstudio", 1): 0.7}  # b replaced, a's ds/0 dropped
    assert merged["row_source"]["finetune/1"] == "b.json" and merged["setting"]["seeds"] == [0, 1]
    assert merged["summary"]["finetune"]["style"][0] == pytest.approx(0.3)
    z = np.load(tmp_path / "m_samples.npz")
    assert int(z["finetune/1/samples"][0, 0, 0, 0]) == 50 and "domainstudio/0/samples" not in z.files
    assert (tmp_path / "m_samples.png").exists()
    c = run("c", [{"recipe": "finetune", "seed": 2, "style": 0.2}], steps=1200)
    assert mr.main([str(tmp_path / "m2.json"), a, c]) == 1 and not (tmp_path / "m2.json").exists()


def test_emoji_style_codes_match_without_the_variation_selector():
    assert es.normalise_code("263a-fe0f") == "263A"
    assert es.normalise_code("1F3F3-FE0F-200D-1F308") == "1F3F3-200D-1F308"
    assert es.normalise_code("1F600") == "1F600"
    with pytest.raises(ValueError, match="twitter, openmoji"):
        es.load("comic")


def test_render_svg_rasterises_on_white_or_names_the_package():
    svg = (b'<svg xmlns="http://www.w3.org/2000/svg" width="72" height="72" viewBox="0 0 72 72">'
           b'<rect x="0" y="0" width="36" height="72" fill="#ff0000"/></svg>')
    try:
        import resvg_py  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install resvg-py"):
            es.render_svg(svg, 8)
        return
    img = es.render_svg(svg, 8)
    assert img.shape == (8, 8, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img[:, :4], np.broadcast_to([255, 0, 0], (8, 4, 3)))  # left half red
    np.testing.assert_array_equal(img[:, 4:], 255)  # transparent right half composited on white


def test_style_probe_shot_scores_hand_case():
    """bench/style_probe.py: a sample per shot; own-shot distance and nearest-shot rate on features
    where sample 0 sits on its shot and sample 1 on the other shot."""
    sp = _bench("style_probe")

    class _Clf:
        def prob(self, f):
            return np.full(len(f), 0.25)

    class _Rt:
        def prob(self, f):
            return np.array([1.0, 0.0])

    class _World:
        f_shots = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
        clf = _Clf()
        clf_rt = _Rt()

    got = sp.shot_scores(_World(), np.array([[2.0, 0.0], [1.0, 0.0]], np.float32))
    assert got["own_shot_nearest"] == 0.5  # sample 1 is nearest to shot 0, not its own
    assert got["own_shot_dist"] == pytest.approx(0.5)  # cosine distances 0 and 1
    assert got["style"] == 0.25 and got["style_rt"] == 0.5


def test_style_probe_summary_groups_seeds_per_setting():
    sp = _bench("style_probe")
    runs = {f"ft/{s}": {"setting": "ft", "seed": s, "shot_prompts": {"style": v}, "eval_prompts": {"style": 2 * v}}
            for s, v in ((0, 0.2), (1, 0.4))}
    got = sp.summary({"runs": runs})
    assert got["ft"]["shot_prompts.style"][0] == pytest.approx(0.3)
    assert got["ft"]["eval_prompts.style"][0] == pytest.approx(0.6) and got["ft"]["eval_prompts.style"][1] > 0


def test_sign_flip_p_hand_cases():
    # [1, 2, 3]: of the 8 sign patterns only +++ and --- reach |sum| 6
    assert fr.sign_flip_p([1.0, 2.0, 3.0]) == pytest.approx(0.25)
    assert fr.sign_flip_p([1.0, -1.0]) == pytest.approx(1.0)
    assert fr.sign_flip_p([0.5] * 20) < 1e-3  # past 16 pairs: seeded random patterns (exact: 2 / 2**20)


def test_frontier_paired_same_step_and_equal_style(tmp_path):
    """B against A per seed: at the same step, and at B's style along A's own curve (base, then A's
    checkpoints, linear in style_rt); a seed whose B style lies beyond A's curve is left out."""
    def m(rt, div):
        return {"style": 0.0, "style_rt": rt, "diversity": div, "shot_dist": 0.5, "content_dist": 0.5, "kid_target": 0.1}

    def run(setting, seed, pts):
        return {"setting": setting, "family": "x", "style": "twitter", "seed": seed,
                "points": {str(k): m(*v) for k, v in pts.items()}}

    result = {"families": {}, "base": {"twitter": {"0": m(0.0, 0.3), "1": m(0.1, 0.4)}},
              "runs": {"ft/twitter/0": run("ft", 0, {50: (0.4, 0.2), 100: (0.9, 0.1)}),
                       "ft/twitter/1": run("ft", 1, {50: (0.5, 0.3), 100: (1.0, 0.2)}),
                       "ds/twitter/0": run("ds", 0, {50: (0.2, 0.35), 100: (0.95, 0.3)}),
                       "ds/twitter/1": run("ds", 1, {50: (0.3, 0.36), 100: (0.75, 0.3)})}}
    res = fr.paired(result, "ft", "ds")["twitter"]
    assert res["seeds"] == [0, 1] and res["style_key"] == "style_rt"
    s50 = res["steps"]["50"]
    assert s50["same_step"]["diversity"]["mean"] == pytest.approx((0.15 + 0.06) / 2)
    assert s50["same_step"]["style_rt"]["mean"] == pytest.approx((-0.2 - 0.2) / 2)
    # seed 0: ft at style 0.2 = halfway base (0.0, 0.3) -> (0.4, 0.2) = 0.25; seed 1: at 0.3 -> 0.35
    eq = s50["equal_style"]["diversity"]
    assert eq["mean"] == pytest.approx((0.10 + 0.01) / 2) and eq["n"] == 2 and eq["n_higher"] == 2
    assert eq["p"] == pytest.approx(0.5)
    eq100 = res["steps"]["100"]["equal_style"]["diversity"]  # seed 0's 0.95 lies beyond ft's 0.9
    assert eq100["n"] == 1 and eq100["mean"] == pytest.approx(0.3 - 0.25) and eq100["sd"] is None
    # over the steps: seed 0 ((-0.2) + 0.05) / 2, seed 1 ((-0.2) + (-0.25)) / 2
    over = res["over_steps"]
    assert over["per_seed"]["style_rt"] == pytest.approx([-0.075, -0.225])
    assert over["stats"]["diversity"]["mean"] == pytest.approx(((0.15 + 0.2) / 2 + (0.06 + 0.1) / 2) / 2)
    pooled = fr.pool_over_steps({"twitter": res, "openmoji": res})
    assert pooled["style"]["n"] == 4 and pooled["style"]["mean"] == pytest.approx(-0.15)
    assert pooled["style"]["n_higher"] == 0 and pooled["style"]["p"] == pytest.approx(2 / 16)
    out = tmp_path / "fr.json"
    out.write_text(json.dumps(result))
    assert fr.main(["--plot-only", "--out", str(out), "--paired", "ft", "ds"]) == 0
    assert (tmp_path / "fr.png").exists()  # the picture goes beside --out
    assert json.loads(out.read_text())["paired"]["ds vs ft"]["twitter"]["seeds"] == [0, 1]
    with pytest.raises(SystemExit, match="no runs of 'dss'"):
        fr.main(["--plot-only", "--out", str(out), "--paired", "ft", "dss"])
    # a study of its own out of the file: only the kept settings' runs, comparisons recomputed
    study = tmp_path / "study.json"
    assert fr.main(["--plot-only", "--out", str(study), "--merge", str(out), "--keep-settings", "ds"]) == 0
    kept = json.loads(study.read_text())
    assert sorted(kept["runs"]) == ["ds/twitter/0", "ds/twitter/1"] and "paired" not in kept


def test_frontier_uses_the_vae_space_style_where_the_base_has_it():
    """points() keeps style_rt only where every seed has it; style_key() picks it as the x axis per
    target style when the base model's point has it, else the raw classifier's style."""
    def m(style, rt=None):
        out = {"style": style, "diversity": 0.4, "shot_dist": 0.5, "content_dist": 0.5, "kid_target": 0.1}
        return out if rt is None else {**out, "style_rt": rt}

    result = {"families": {"ft": "finetune"},
              "runs": {"ft/twitter/0": {"setting": "ft", "family": "finetune", "style": "twitter", "seed": 0,
                                        "points": {"100": m(0.3, 0.6)}},
                       "ft/twitter/1": {"setting": "ft", "family": "finetune", "style": "twitter", "seed": 1,
                                        "points": {"100": m(0.5, 0.8)}},
                       "ft/openmoji/0": {"setting": "ft", "family": "finetune", "style": "openmoji", "seed": 0,
                                         "points": {"100": m(0.2)}}},
              "base": {"twitter": {"0": m(0.1, 0.3)}, "openmoji": {"0": m(0.05)}}}
    pts = fr.points(result)
    tw = next(p for p in pts if p["target"] == "twitter" and p["setting"] == "ft")
    om = next(p for p in pts if p["target"] == "openmoji" and p["setting"] == "ft")
    assert tw["style_rt"][0] == pytest.approx(0.7) and "style_rt" not in om
    assert fr.style_key(pts, "twitter") == "style_rt" and fr.style_key(pts, "openmoji") == "style"
    cmp_ = fr.compare(pts)
    assert cmp_["twitter"]["0.60-0.85"]["finetune"] is not None  # banded by style_rt 0.7, not style 0.4
    assert cmp_["openmoji"]["0.30-0.60"]["finetune"] is None  # raw style 0.2: below every band


@pytest.mark.parametrize("argv, named", [(["--sks", "0"], "--sks 0"), (["--domain", "0"], "--domain 0"),
                                         (["--train", "4", "--sks", "8"], "--sks 8 is more than --train 4"),
                                         (["--heldout", "-1"], "--heldout -1")])
def test_miniworld_quality_refuses_empty_sections_before_any_work(argv, named, capsys):
    # --sks 0 once crashed after ~30 min of sampling, losing the CFG sweep it had drawn
    mq = _bench("miniworld_quality")
    with pytest.raises(SystemExit) as e:
        mq.main(argv)
    assert e.value.code == 2
    assert named in capsys.readouterr().err


def test_miniworld_quality_refuses_an_unknown_sampler_before_any_work(capsys):
    mq = _bench("miniworld_quality")
    with pytest.raises(SystemExit) as e:
        mq.main(["--domain-sampler-sweep", "euler_ancestral", "eulr"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--domain-sampler-sweep eulr" in err and "euler_ancestral," in err  # names the bad one, lists the rest


def test_damage_check_flags_with_the_report_rule_and_measures_excess_against_the_best_run():
    from comfyui_domainstudio.trainer.quality import detail_warning

    dc = _bench("damage_check")
    rows = [{"method": "base", "si": 7, "seed": 0, "subject": "s", "hf": 0.010, "fidelity": 0.30},
            {"method": "m", "variant": "hot", "si": 7, "seed": 0, "subject": "s", "hf": 0.020, "fidelity": 0.25},
            {"method": "m", "variant": "cool", "si": 7, "seed": 0, "subject": "s", "hf": 0.011, "fidelity": 0.15},
            {"method": "m", "variant": "hot", "si": 7, "seed": 1, "subject": "s", "hf": 0.020, "fidelity": 0.2}]
    checked = dc.check_rows(rows, {7: 0.015}, lambda s, a, t: detail_warning(s, a, t, "lr", "steps"))
    # the seed-1 run has no base row (no source detail): it is left out, not guessed
    assert [(c["variant"], c["flagged"]) for c in checked] == [("hot", True), ("cool", False)]
    assert checked[0]["ratio"] == pytest.approx(2.0) and checked[0]["excess"] == pytest.approx(0.10)
    assert checked[1]["excess"] == 0.0
    table = {t["variant"]: t for t in dc.summarize(checked)}
    assert table["hot"]["flagged"] == 1 and table["cool"]["flagged"] == 0 and table["cool"]["runs"] == 1


def test_merging_keeps_the_first_runs_and_adds_new_settings_recipes():
    a = {"runs": {"s/twitter/0": {"v": 1}}, "setting": {"steps": 400, "grid": {"s": {"method": "finetune"}}}}
    b = {"runs": {"s/twitter/0": {"v": 2}, "t/twitter/0": {"v": 3}},
         "setting": {"steps": 400, "grid": {"s": {"method": "other"}, "t": {"method": "domainstudio",
                                                                          "timesteps": [500, 1000]}}}}
    fr.merge_into(a, b)
    assert a["runs"] == {"s/twitter/0": {"v": 1}, "t/twitter/0": {"v": 3}}
    assert a["setting"]["grid"] == {"s": {"method": "finetune"},
                                    "t": {"method": "domainstudio", "timesteps": [500, 1000]}}


def test_personalize_merge_takes_only_the_runs_the_command_names():
    def row(variant, method, seed, subject="cat", si=3):
        return {"variant": variant, "method": method, "seed": seed, "subject": subject, "si": si,
                "key": pq._key(variant, method)}

    part = [row("base", "base", 0), row("t=250", "rare_token", 0), row("t=250", "textual_inversion", 0),
            row("t=250", "rare_token", 1), row("lr=1", "rare_token", 0), row("t=250", "rare_token", 0, "dog", 4)]
    have = {("t=250", "dog", "rare_token", 0)}
    kept = pq.part_rows(part, have, seeds=[0], methods=["rare_token"], variants=["t=0", "t=250"])
    assert kept == [part[0], part[1]]  # not another method, seed or variant, nor a run already here
    # their samples: the subject's images, the kept seed's base samples and the kept run's; not the others'
    keys = ["3/subject", "base/0/unrelated", "base/1/unrelated", "3/base/0/class", "3/base/1/class",
            "3/rare_token@t=250/0/instance", "3/textual_inversion@t=250/0/instance", "3/rare_token@t=250/1/class",
            "4/rare_token@t=250/0/instance", "prompt_google"]
    assert [k for k in keys if pq._merged_sample(k, kept, [0])] == [
        "3/subject", "base/0/unrelated", "3/base/0/class", "3/rare_token@t=250/0/instance"]


def test_personalize_pairs_with_an_earlier_results_differently_named_runs():
    """Seed 0 of 't=250' pairs with an earlier result's 'defaults' (the same settings before the
    setting had a name), seed 1 with this result's own 't=0'."""
    def row(variant, seed, fid):
        return {"variant": variant, "method": "rare_token", "seed": seed, "subject": "cat", "fidelity": fid}

    earlier = [row("defaults", 0, 0.30), row("other", 0, 9.0)]
    ours = [row("t=250", 0, 0.20), row("t=250", 1, 0.25), row("t=0", 1, 0.35)]
    theirs = pq.reference_runs(earlier, "defaults", "t=0")
    assert theirs == [row("t=0", 0, 0.30)] and earlier[0]["variant"] == "defaults"
    s = pq.paired(ours + theirs, "t=0")["t=250"]["rare_token"]["fidelity"]
    assert s["n"] == 2 and s["mean_diff"] == pytest.approx(-0.10) and s["higher"] == 0
