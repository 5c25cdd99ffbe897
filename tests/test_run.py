"""run() (trainer/run.py) end to end on ToyHost with a files.Saver writing into temporary folders:
final files, Cancel (keep / discard), resume (bit-identical), periodic checkpoints, refusals of a
resume that does not fit, stops that keep nothing of the failed stage, save failures, and the
checks made before any training step. Pure torch."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from comfyui_domainstudio.testing.toy import NaNToyHost, ToyHost, image_set, structured_latents, toy_images
from comfyui_domainstudio.trainer import deltas, embeddings, files, run as core
from comfyui_domainstudio.trainer.errors import SettingError, TrainingError
from comfyui_domainstudio.trainer.files import Folders, SaveError, Saver, load_resume
from comfyui_domainstudio.trainer.methods import get
from comfyui_domainstudio.trainer.run import Outcome, RunOptions, resolve_config, run

N = 6


pytestmark = pytest.mark.usefixtures("one_thread")


class Cancel(Exception):
    """What a frontend raises from its progress callback when the user presses Cancel."""


CONFIGS = {
    "domainstudio": dict(steps=6, batch_size=3, learning_rate=1e-2, target_prompt="a sks house",
                         source_prompt="a house"),
    "finetune": dict(steps=6, batch_size=3, learning_rate=1e-2, target_prompt="a sks house"),
    "rare_token": dict(ti_steps=4, unet_steps=5, ti_learning_rate=5e-2, unet_learning_rate=1e-2),
    "textual_inversion": dict(ti_steps=6, ti_learning_rate=5e-2),
    "dreambooth": dict(unet_steps=5, class_images=2, unet_learning_rate=1e-2),
    "dreambooth_no_prior": dict(unet_steps=5, unet_learning_rate=1e-2),
}


def cfg_of(method: str, **kw):
    return resolve_config(method, {**CONFIGS[method], **kw})


def opts(**kw) -> RunOptions:
    base = dict(train_mode="lora_all", lora_rank=2, lora_alpha=2.0, preview_every=0, save_dtype="fp32")
    base.update(kw)
    return RunOptions(**base)


def folders(tmp_path) -> Folders:
    return Folders(str(tmp_path / "loras"), str(tmp_path / "embeddings"))


def saver(tmp_path, name: str = "style") -> Saver:
    return Saver(folders(tmp_path), name, host="toy", images=N, resolution=16)


def listing(tmp_path) -> dict[str, list[str]]:
    return {k: sorted(os.listdir(tmp_path / k)) if (tmp_path / k).is_dir() else [] for k in ("loras", "embeddings")}


def train(method: str, tmp_path=None, *, host=None, cfg=None, options=None, name: str = "style", **kw) -> Outcome:
    host = host or ToyHost()
    if host.latents is None:
        host.latents = structured_latents(N)
    return run(host, method, cfg or cfg_of(method), toy_images(N), options or opts(),
               saver=saver(tmp_path, name) if tmp_path is not None else None, **kw)


def cancel_at(step: int, stage: str | None = None, messages: list | None = None):
    """A progress callback that raises Cancel once, after `step` of `stage` (any stage if None)."""
    fired = []

    def on_progress(p):
        if messages is not None and p.message:
            messages.append(p.message)
        if not fired and p.stage_step == step and (stage is None or p.stage == stage) and p.losses is not None:
            fired.append(p.step)
            raise Cancel(p.step)

    return on_progress


# ------------------------------------------------------------------ final files


@pytest.mark.parametrize("method", list(CONFIGS))
def test_final_files_exist_load_and_name_the_method(method, tmp_path):
    host = ToyHost()
    out = train(method, tmp_path, host=host)
    m = get(method)
    assert out.completed and out.method == method and not out.save_error
    got = listing(tmp_path)
    assert [os.path.basename(p) for p in out.files] == (["ds_subject.safetensors"] if m.uses_token else []) + \
        (["style_00001.safetensors"] if m.trains_unet else [])
    assert got["loras"] == (["style_00001.safetensors"] if m.trains_unet else [])
    assert got["embeddings"] == (["ds_subject.safetensors"] if m.uses_token else [])
    for path in out.files:
        if path.endswith("ds_subject.safetensors"):
            vectors, md = embeddings.read_embedding(path, widths=host.encoder_widths())
            assert set(vectors) == {"clip_l"} and vectors["clip_l"].shape == (1, host.width)
            assert torch.equal(vectors["clip_l"], out.token.vectors["clip_l"])
            assert md["domainstudio.kind"] == "embedding" and md["domainstudio.steps"] == str(out.stages[0].steps)
        else:
            tensors, md = deltas.read_weight_file(path)
            assert set(tensors) == set(out.delta)
            assert all(torch.equal(tensors[k], out.delta[k]) for k in tensors)
            assert md["domainstudio.kind"] == "lora" and md["ss_network_dim"] == "2"
            assert md["domainstudio.steps"] == str(out.stages[-1].steps)
        assert md["domainstudio.method"] == method  # finetune is 'finetune', not 'domainstudio'
        assert md["domainstudio.base_fingerprint"] == host.fingerprint()
        training = json.loads(md["domainstudio.training"])
        assert training["method"] == method and training["host"] == "toy" and training["images"] == N
        assert training["train_mode"] == "lora_all"
    # the host's result holds the file's values
    assert host.exported is not None and host.exported.extra["token"] is out.token
    if m.trains_unet:
        assert all(torch.equal(host.exported.extra["delta"][k], out.delta[k]) for k in out.delta)


def test_an_embedding_has_the_models_own_width(tmp_path):
    host = ToyHost(width=256)
    out = train("textual_inversion", tmp_path, host=host)
    vectors, md = embeddings.read_embedding(out.files[0], widths=host.encoder_widths())
    assert vectors["clip_l"].shape == (1, 256) and torch.equal(vectors["clip_l"], out.token.vectors["clip_l"])


def test_saved_precision_is_what_the_model_keeps(tmp_path):
    host = ToyHost()
    out = train("finetune", tmp_path, host=host, options=opts(save_dtype="fp16"))
    tensors, md = deltas.read_weight_file(out.files[0])
    assert md["domainstudio.dtype"] == "fp16" and all(v.dtype == torch.float16 for v in tensors.values())
    assert all(v.dtype == torch.float32 for v in out.delta.values())  # Outcome.delta is exact
    # the adapted model now holds exactly the saved file's values
    assert all(torch.equal(host.adapter.state_dict()[k], tensors[k].float()) for k in tensors)
    assert any(not torch.equal(out.delta[k], tensors[k].float()) for k in tensors)  # fp16 did round


def test_empty_save_name_trains_and_writes_nothing(tmp_path):
    out = train("rare_token", tmp_path, name="")
    assert out.completed and out.files == [] and out.token is not None and out.delta is not None
    assert not (tmp_path / "loras").exists() and not (tmp_path / "embeddings").exists()


def test_svd_lora_and_diff_formats_through_run(tmp_path):
    out = train("finetune", tmp_path, options=opts(train_mode="full_all", save_format="svd_lora", svd_rank=2),
                name="svd")
    tensors, md = deltas.read_weight_file(out.files[0])
    assert md["domainstudio.kind"] == "svd_lora" and md["domainstudio.svd_rank"] == "2"
    assert 0 <= float(md["domainstudio.svd_rel_error"]) < 1
    assert any(k.endswith(".lora_up.weight") for k in tensors)
    assert any(k.endswith(".diff") for k in tensors)  # 1-D bias deltas stay full differences
    out = train("finetune", tmp_path, options=opts(train_mode="lora_all", save_format="diff"), name="diff")
    tensors, md = deltas.read_weight_file(out.files[0])
    assert md["domainstudio.kind"] == "diff" and all(k.endswith(".diff") for k in tensors)
    want = deltas.lora_to_diff(out.delta)
    assert all(torch.allclose(tensors[k], want[k]) for k in want)


# ------------------------------------------------------------------ Cancel


@pytest.mark.parametrize("method, k", [("domainstudio", 3), ("finetune", 1), ("dreambooth", 4)])
def test_cancel_keeps_the_last_completed_step_with_its_state(method, k, tmp_path):
    messages = []
    with pytest.raises(Cancel):
        train(method, tmp_path, on_progress=cancel_at(k, messages=messages))
    got = listing(tmp_path)
    assert got["loras"] == [f"style_partial_{k}.dsstate", f"style_partial_{k}.safetensors"]
    tensors, md = deltas.read_weight_file(str(tmp_path / "loras" / f"style_partial_{k}.safetensors"))
    assert md["domainstudio.steps"] == str(k) and md["domainstudio.snapshot"] == "partial"
    assert md["domainstudio.method"] == method
    assert any(f"style_partial_{k}.safetensors" in m for m in messages if m.startswith("kept"))


def test_cancel_with_discard_writes_nothing(tmp_path):
    with pytest.raises(Cancel):
        train("domainstudio", tmp_path, options=opts(on_cancel="discard"), on_progress=cancel_at(3))
    assert listing(tmp_path) == {"loras": [], "embeddings": []}


def test_cancel_while_making_class_images_keeps_nothing(tmp_path):
    def on_progress(p):
        if p.stage == "class images" and p.step == 1:
            raise Cancel()

    with pytest.raises(Cancel):
        train("dreambooth", tmp_path, on_progress=on_progress)
    assert listing(tmp_path)["loras"] == []


def test_two_stage_method_cancelled_in_stage_two_keeps_the_finished_embedding(tmp_path):
    with pytest.raises(Cancel):
        train("rare_token", tmp_path, on_progress=cancel_at(2, stage="unet"))
    got = listing(tmp_path)
    assert got["embeddings"] == ["ds_subject.safetensors"]
    assert got["loras"] == ["style_partial_2.dsstate", "style_partial_2.safetensors"]
    vectors, md = embeddings.read_embedding(str(tmp_path / "embeddings" / "ds_subject.safetensors"))
    assert md["domainstudio.steps"] == "4"  # the whole token stage
    # ... and it is the token an uninterrupted run ends with
    full = train("rare_token")
    assert torch.equal(vectors["clip_l"], full.token.vectors["clip_l"])


def test_cancel_in_the_token_stage_keeps_a_partial_embedding(tmp_path):
    with pytest.raises(Cancel):
        train("textual_inversion", tmp_path, on_progress=cancel_at(2))
    got = listing(tmp_path)
    assert got["loras"] == []
    assert got["embeddings"] == ["ds_subject_partial_2.dsstate", "ds_subject_partial_2.safetensors"]


# ------------------------------------------------------------------ resume


def _resume_from(path: str, method: str, cfg=None, options=None, host=None):
    host = host or ToyHost()
    return load_resume(path, method=get(method), cfg=cfg or cfg_of(method), opts=options or opts(),
                       fingerprint=host.fingerprint())


@pytest.mark.parametrize("method, k, stage, mode", [
    ("domainstudio", 3, None, "lora_all"),
    ("domainstudio", 2, None, "full_all"),
    ("finetune", 4, None, "lora_all"),
    ("rare_token", 2, "token", "lora_all"),
    ("rare_token", 3, "unet", "lora_all"),
    ("textual_inversion", 3, None, "lora_all"),
    ("dreambooth", 2, None, "full_all"),
])
def test_resume_after_cancel_is_bit_identical_to_an_uninterrupted_run(method, k, stage, mode, tmp_path):
    o = opts(train_mode=mode, optimizer="adamw")
    full = train(method, options=o)
    with pytest.raises(Cancel):
        train(method, tmp_path / "a", options=o, on_progress=cancel_at(k, stage))
    m = get(method)
    kept_stage = stage or m.stages(cfg_of(method))[0].name
    folder = "embeddings" if kept_stage == "token" else "loras"
    stem = "ds_subject" if kept_stage == "token" else "style"
    partial = str(tmp_path / "a" / folder / f"{stem}_partial_{k}.safetensors")
    state = _resume_from(partial, method, options=o)
    assert state.step == k and state.loop_state is not None
    resumed = train(method, tmp_path / "b", options=o, resume=state)
    assert resumed.completed
    if full.delta is not None:
        assert set(resumed.delta) == set(full.delta)
        assert all(torch.equal(resumed.delta[k_], full.delta[k_]) for k_ in full.delta)
    if full.token is not None:
        assert torch.equal(resumed.token.vectors["clip_l"], full.token.vectors["clip_l"])
    last = resumed.stages[-1]
    assert last.history["total"] == full.stages[-1].history["total"][-len(last.history["total"]):]
    # the resumed run's final files carry the full step count
    md = deltas.read_weight_file(resumed.files[-1])[1]
    assert md["domainstudio.steps"] == str(full.stages[-1].steps)


def test_adafactor_resume_is_bit_identical_too(tmp_path):
    o = opts(train_mode="full_all", optimizer="adafactor")
    full = train("finetune", options=o)
    with pytest.raises(Cancel):
        train("finetune", tmp_path, options=o, on_progress=cancel_at(2))
    state = _resume_from(str(tmp_path / "loras" / "style_partial_2.safetensors"), "finetune", options=o)
    resumed = train("finetune", options=o, resume=state)
    assert all(torch.equal(resumed.delta[k], full.delta[k]) for k in full.delta)


def test_resume_with_another_optimizer_is_refused_before_any_step(tmp_path):
    with pytest.raises(Cancel):
        train("finetune", tmp_path, options=opts(optimizer="adamw"), on_progress=cancel_at(2))
    o = opts(optimizer="adafactor")
    # Refused while reading resume_from, before anything is encoded or trained, naming the fix.
    with pytest.raises(TrainingError, match="resume_from=.*optimizer state is adamw's; set optimizer=adamw"):
        _resume_from(str(tmp_path / "loras" / "style_partial_2.safetensors"), "finetune", options=o)
    # With optimizer=auto the run's plan picks adamw again and the resume goes through.
    state = _resume_from(str(tmp_path / "loras" / "style_partial_2.safetensors"), "finetune", options=opts())
    assert state.step == 2


def test_save_every_writes_resumable_checkpoints(tmp_path):
    messages = []
    out = train("finetune", tmp_path, options=opts(save_every=2),
                on_progress=lambda p: p.message and messages.append(p.message))
    got = listing(tmp_path)["loras"]
    assert got == ["style_00001.safetensors", "style_step2.dsstate", "style_step2.safetensors", "style_step4.dsstate",
                   "style_step4.safetensors"]
    md = deltas.read_weight_file(str(tmp_path / "loras" / "style_step4.safetensors"))[1]
    assert md["domainstudio.steps"] == "4" and md["domainstudio.snapshot"] == "checkpoint"
    assert sum(m.startswith("saved style_step") for m in messages) == 2
    state = _resume_from(str(tmp_path / "loras" / "style_step4.safetensors"), "finetune")
    resumed = train("finetune", resume=state)
    assert all(torch.equal(resumed.delta[k], out.delta[k]) for k in out.delta)


def test_resume_from_a_delta_without_state_continues_from_its_values(tmp_path):
    short = train("finetune", tmp_path, cfg=cfg_of("finetune", steps=3))
    path = short.files[0]
    state = _resume_from(path, "finetune")  # no .dsstate beside a final file
    assert state.step == 3 and state.loop_state is None and state.delta is not None
    out = train("finetune", resume=state)
    assert out.stages[0].history_steps == [4, 5, 6] and out.stages[0].steps_done == 6
    # a fresh optimizer and generator: not the uninterrupted run (that needs the .dsstate)
    full = train("finetune")
    assert any(not torch.equal(out.delta[k], full.delta[k]) for k in full.delta)


@pytest.mark.parametrize("case, fix", [
    ("method", "trained with method 'finetune', this run is 'domainstudio'"),
    ("fingerprint", "trained on another base model"),
    ("done", "already has 6 train steps; set steps above 6"),
    ("train_mode", "use the same train_mode"),
    ("lora_alpha", "use the same lora_alpha"),
    ("foreign", "not written by this pack"),
    ("missing_state", "no such checkpoint"),
    ("token_done", "already has 4 token steps; set ti_steps above 4"),
])
def test_resume_refuses_what_it_cannot_continue(case, fix, tmp_path):
    method, options, host = "domainstudio", opts(), ToyHost()
    if case == "method":
        path = train("finetune", tmp_path).files[0]
    elif case == "done":
        path = train("domainstudio", tmp_path).files[0]
    elif case == "fingerprint":
        path = train("domainstudio", tmp_path).files[0]
        host = ToyHost(seed=1)
    elif case == "train_mode":
        path = train("domainstudio", tmp_path).files[0]
        options = opts(train_mode="full_all")
    elif case == "lora_alpha":  # LoRA factors trained at another scale would jump when continued
        with pytest.raises(Cancel):
            train("domainstudio", tmp_path, on_progress=cancel_at(2))
        path = str(tmp_path / "loras" / "style_partial_2.safetensors")
        options = opts(lora_alpha=4.0)
    elif case == "foreign":
        from safetensors.torch import save_file

        path = str(tmp_path / "foreign.safetensors")
        save_file({"x": torch.zeros(2)}, path)
    elif case == "missing_state":
        path = str(tmp_path / "nothing.dsstate")
    else:  # a finished embedding of a 4-step token stage, resumed to 4 steps
        method = "textual_inversion"
        path = train(method, tmp_path, cfg=cfg_of(method, ti_steps=4)).files[0]
        assert os.path.basename(path) == "ds_subject.safetensors"
        with pytest.raises(SettingError) as e:
            _resume_from(path, method, cfg=cfg_of(method, ti_steps=4), host=host)
        assert e.value.name == "resume_from" and fix in e.value.fix
        assert _resume_from(path, method, cfg=cfg_of(method, ti_steps=5)).step == 4  # more steps: continues
        return
    with pytest.raises(SettingError) as e:
        _resume_from(path, method, options=options, host=host)
    assert e.value.name == "resume_from" and fix in e.value.fix
    assert os.path.basename(path) in str(e.value) and str(tmp_path) not in str(e.value)  # no server paths


# ------------------------------------------------------------------ stops keep nothing of the stage


class ClimbingToyHost(ToyHost):
    """Its loss grows 4x per training step: a diverging run."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.n = 0

    def denoising_loss(self, x0_pred, x0, sigma):
        loss = super().denoising_loss(x0_pred, x0, sigma)
        if self.training:
            self.n += 1
            loss = loss * 4.0**self.n
        return loss


@pytest.mark.parametrize("host_cls, match", [(lambda: NaNToyHost(nan_from=3), "loss became nan at step 3"),
                                             (ClimbingToyHost, "the loss diverged")])
def test_nan_and_divergence_stops_write_no_delta(host_cls, match, tmp_path):
    with pytest.raises(TrainingError, match=match):
        train("finetune", tmp_path, host=host_cls(), cfg=cfg_of("finetune", steps=30),
              options=opts(save_every=0))
    assert listing(tmp_path) == {"loras": [], "embeddings": []}


class RisingToyHost(ClimbingToyHost):
    """Its training loss grows 3 % per step: far below the divergence stop, a run breaking down."""

    def denoising_loss(self, x0_pred, x0, sigma):
        loss = ToyHost.denoising_loss(self, x0_pred, x0, sigma)
        if self.training:
            self.n += 1
            loss = loss * 1.03**self.n
        return loss


def test_denoising_rise_compares_the_last_and_first_fifty_steps():
    from comfyui_domainstudio.trainer.quality import denoising_rise, rise_warning

    assert denoising_rise({"simple": [2.0] * 50 + [8.0] * 50, "img": [100.0] * 100}) == 4.0
    assert denoising_rise({"instance": [1.0] * 50 + [3.0] * 20 + [0.5] * 50}) == 0.5
    assert denoising_rise({"simple": [1.0] * 99}) is None  # too short to tell
    assert denoising_rise({"total": [1.0] * 200}) is None  # no denoising term (a token-only objective)
    assert denoising_rise({"simple": [float("nan")] + [1.0] * 100}) == 1.0
    w = rise_warning("unet", {"instance": [1.0] * 50 + [3.0] * 50}, "unet_learning_rate")
    assert w is not None and "3.0x" in w and "Lower unet_learning_rate" in w
    assert rise_warning("unet", {"instance": [1.0] * 50 + [2.9] * 50}, "unet_learning_rate") is None


@pytest.mark.parametrize("host_cls, warned", [(RisingToyHost, True), (ToyHost, False)])
def test_a_run_whose_denoising_loss_rises_says_so_naming_the_setting(host_cls, warned):
    out = train("dreambooth_no_prior", host=host_cls(), cfg=cfg_of("dreambooth_no_prior", unet_steps=110,
                                                                    unet_learning_rate=1e-3))
    assert out.completed
    rises = [w for w in out.warnings if "denoising loss" in w]
    assert bool(rises) == warned, out.warnings
    if warned:
        assert rises[0].startswith("unet:") and "Lower unet_learning_rate" in rises[0]


def test_fine_detail_hand_case():
    from comfyui_domainstudio.trainer.quality import fine_detail

    # one lit pixel in a 3x3 image: its edge-padded 3x3 box blur is 1/9 everywhere (every window
    # holds the centre exactly once), so |x - blur| is 8/9 at the centre and 1/9 at the 8 others.
    x = torch.zeros(1, 3, 3, 3)
    x[0, 1, 1] = 1.0
    assert fine_detail(x) == pytest.approx((8 / 9 + 8 / 9) / 9)
    assert fine_detail(torch.full((2, 5, 4, 3), 0.3)) == pytest.approx(0.0, abs=1e-7)


def test_detail_warning_needs_both_the_source_and_the_training_images_exceeded():
    from comfyui_domainstudio.trainer.quality import DETAIL_WARN, detail_warning

    w = detail_warning(0.010, 0.020, 0.015, "unet_learning_rate", "unet_steps")
    assert w is not None and "2.0x the fine detail" in w and "lower unet_learning_rate" in w and "unet_steps" in w
    assert detail_warning(0.010, DETAIL_WARN * 0.010 - 1e-4, 0.005, "lr", "steps") is None  # below the ratio
    assert detail_warning(0.010, 0.020, 0.020, "lr", "steps") is None  # the training images are as detailed
    assert detail_warning(0.010, 0.020, float("nan"), "lr", "steps") is not None  # no training images: ratio only
    assert detail_warning(0.0, 0.020, 0.005, "lr", "steps") is None
    assert detail_warning(float("nan"), 0.020, 0.005, "lr", "steps") is None


def test_the_diversity_ratio_is_withheld_when_the_source_samples_are_near_identical():
    from comfyui_domainstudio.trainer.quality import DIVERSITY_FLOOR, QualityReport

    def rep(source):
        return QualityReport(space="VAE-latent", samples=8, diversity_source=source, diversity_adapted=0.268,
                             copy_source=0.4, copy_adapted=0.3)

    varied = rep(0.134)
    assert varied.diversity_ratio == pytest.approx(2.0)
    assert "(ratio 2.00; < 0.5 suggests a collapse" in varied.text()
    same = rep(0.001)  # the miniature's "a photo of tree": one tree on every seed, and a "ratio" of 268
    assert math.isnan(same.diversity_ratio) and "ratio 268" not in same.text()
    assert f"no ratio: the source's samples are near-identical, below {DIVERSITY_FLOOR}" in same.text()
    assert "adapted 0.268 vs source 0.001" in same.text()  # the numbers themselves are still shown
    d = same.as_dict()  # a ratio without meaning and unmeasured detail are null in strict JSON, not NaN
    assert d["diversity_ratio"] is None and d["detail_source"] is None and d["diversity_source"] == 0.001
    json.dumps(d, allow_nan=False)
    assert rep(DIVERSITY_FLOOR).diversity_ratio == pytest.approx(0.268 / DIVERSITY_FLOOR)


class FragmentingToyHost(ToyHost):
    """The adapted model's samples come out as a fine checkerboard (an over-trained model's
    fragments, at their extreme); the source's stay as they are."""

    def sample(self, prompt, seeds, *, adapter=None, **kw):
        out = super().sample(prompt, seeds, adapter=adapter, **kw)
        if adapter is None:
            return out
        yy, xx = torch.meshgrid(torch.arange(out.shape[-2]), torch.arange(out.shape[-1]), indexing="ij")
        return (0.5 * ((yy + xx) % 2 * 2 - 1)).to(out).expand_as(out).clone()


@pytest.mark.parametrize("host_cls, warned", [(FragmentingToyHost, True), (ToyHost, False)])
def test_the_quality_report_flags_fragmented_samples_naming_the_settings(host_cls, warned):
    out = train("dreambooth_no_prior", host=host_cls(), cfg=cfg_of("dreambooth_no_prior", unet_steps=3),
                options=opts(quality_samples=3))
    q = out.quality
    assert q is not None and q.detail_source > 0 and q.detail_training > 0 and q.detail_adapted >= 0
    assert "fine detail (pixels): adapted" in q.text()
    assert set(q.as_dict()) >= {"detail_source", "detail_adapted", "detail_training"}
    flags = [w for w in out.warnings if "fine detail" in w]
    assert bool(flags) == warned, (q.as_dict(), out.warnings)
    if warned:
        assert "lower unet_learning_rate" in flags[0] and "unet_steps" in flags[0]
        assert q.detail_adapted > 1.5 * q.detail_source


def test_nan_in_stage_two_keeps_the_finished_embedding(tmp_path):
    with pytest.raises(TrainingError) as e:
        train("rare_token", tmp_path, host=NaNToyHost(nan_from=4 + 2))
    assert "unet: loss became nan at step 2" in str(e.value)
    assert "The finished token stage was kept: ds_subject.safetensors" in str(e.value)
    assert listing(tmp_path) == {"loras": [], "embeddings": ["ds_subject.safetensors"]}


# ------------------------------------------------------------------ save failures


def test_a_save_failure_is_reported_and_the_result_still_returned(tmp_path):
    loras = tmp_path / "loras"

    def break_folder(p):
        if p.step == p.total and loras.is_dir():  # after the check, before the final save
            os.rmdir(loras)
            loras.write_text("a file where the folder should be")

    host = ToyHost()
    out = train("finetune", tmp_path, host=host, on_progress=break_folder)
    assert out.completed and out.files == []
    assert "models/loras" in out.save_error and "Save LoRA" in out.save_error
    assert str(tmp_path) not in out.save_error  # the label, never the server path
    assert out.delta is not None and host.exported is not None and out.exported is host.exported


def test_a_failure_after_the_embedding_names_what_was_written(tmp_path, monkeypatch):
    def no_space(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(deltas, "save_delta", no_space)
    out = train("rare_token", tmp_path)
    assert "No space left on device" in out.save_error and "models/loras" in out.save_error
    assert "Written before the failure: ds_subject.safetensors" in out.save_error
    assert [os.path.basename(p) for p in out.files] == ["ds_subject.safetensors"]
    assert out.delta is not None and out.token is not None


def test_bad_save_names_are_refused_naming_the_input(tmp_path):
    for name, match in (("../evil", "path separator"), (".hidden", "starts with '.'"), ("a:b", "not allowed")):
        with pytest.raises(ValueError, match=match) as e:
            Saver(folders(tmp_path), name)
        assert "save_name" in str(e.value)
    with pytest.raises(ValueError, match="--name"):
        Saver(folders(tmp_path), "a/b", what="--name")


@pytest.mark.parametrize("method, blocked, label", [("finetune", "loras", "models/loras"),
                                                    ("textual_inversion", "embeddings", "models/embeddings"),
                                                    ("rare_token", "loras", "models/loras")])
def test_unwritable_folders_are_refused_before_any_training_step(method, blocked, label, tmp_path):
    (tmp_path / blocked).write_text("not a folder")
    host = ToyHost()
    with pytest.raises(SaveError) as e:
        train(method, tmp_path, host=host)
    msg = str(e.value)
    assert label in msg and "writable folder" in msg and "save_name empty" in msg and str(tmp_path) not in msg
    # refused before the memory probe, the encoding and any step
    assert host.calls["predict_x0"] == 0 and host.calls["encode_images"] == 0
    assert host.sessions == [] and host.probe_sessions == []


# ------------------------------------------------------------------ progress, previews, options


def test_progress_counts_class_images_and_every_stage(tmp_path):
    seen = []
    out = train("rare_token", on_progress=lambda p: seen.append((p.stage, p.step, p.total, p.stage_step)))
    assert seen == [("token", i, 9, i) for i in range(1, 5)] + [("unet", 4 + i, 9, i) for i in range(1, 6)]
    assert out.steps_done == 9
    seen.clear()
    train("dreambooth", on_progress=lambda p: seen.append((p.stage, p.step, p.total)))
    assert seen[:2] == [("class images", 1, 7), ("class images", 2, 7)] and seen[-1] == ("unet", 7, 7)


def test_previews_are_sampled_with_the_current_weights():
    previews = []
    out = train("finetune", options=opts(preview_every=2, preview_steps=3),
                on_progress=lambda p: p.preview is not None and previews.append((p.step, p.preview)))
    assert [s for s, _ in previews] == [2, 4]  # every 2 steps (the final one is out.last_preview)
    assert out.last_preview.shape == (1, 8, 8, 3)
    assert not torch.equal(previews[0][1], previews[1][1])  # the weights moved between them


def test_weighted_history_shows_the_terms_as_they_enter_the_objective():
    cfg = cfg_of("domainstudio", lambda_img=100.0, lambda_hf=0.0, lambda_hfmse=0.1)
    out = train("domainstudio", cfg=cfg)
    hist = core.weighted_history(out, out.stages[0])
    assert set(hist) == {"total", "simple", "100×img", "0.1×hfmse"}
    assert hist["100×img"] == [100.0 * v for v in out.stages[0].history["img"]]


def test_resolve_config_refuses_unknown_names():
    assert resolve_config("finetune", {"steps": 3}).steps == 3
    with pytest.raises(KeyError, match="FinetuneConfig has no setting lambda_img"):
        resolve_config("finetune", {"lambda_img": 1.0})


def test_run_under_inference_mode_trains():
    # ComfyUI calls nodes under torch.inference_mode(); run() leaves it for training.
    with torch.inference_mode():
        out = train("domainstudio")
    assert out.completed and all(v.isfinite().all() for v in out.delta.values())
    assert not any(v.is_inference() for v in out.delta.values())


def test_run_options_are_checked_before_training():
    host = ToyHost()
    with pytest.raises(SettingError) as e:
        train("finetune", host=host, options=opts(lora_rank=0))
    assert e.value.name == "lora_rank" and host.calls["encode_images"] == 0
    with pytest.raises(SettingError) as e:
        train("finetune", host=host, options=opts(on_cancel="save"))
    assert e.value.name == "on_cancel" and "keep, discard" in e.value.fix


def test_captions_come_from_the_image_set():
    host = ToyHost()
    images = toy_images(3)
    out = run(host, "finetune", cfg_of("finetune", batch_size=2, steps=1, target_prompt="{caption}, sks"),
              image_set(images, ["red", "green", "blue"]), opts())
    assert out.prompts.target == ["red, sks", "green, sks", "blue, sks"]
    assert files.delta_format(out.options).name == "lora"


class DecodeCountingToyHost(ToyHost):
    """Counts how many sample images go through the VAE decoder."""

    decoded = 0

    def decode_images(self, latents):
        self.decoded += latents.shape[0]
        return super().decode_images(latents)


@pytest.mark.parametrize("with_encoder", [False, True])
def test_the_quality_report_decodes_each_sample_once(with_encoder):
    """Personalization's report draws 4 sets of samples (source, adapted, class before/after): each
    set is decoded at most once, and the source's class samples only when an image encoder needs them."""
    host, n = DecodeCountingToyHost(), 3
    seen = []

    def features(img):
        seen.append(img.shape[0])
        return torch.nn.functional.adaptive_avg_pool2d(img.movedim(-1, 1), 4).flatten(1)

    out = train("dreambooth_no_prior", host=host, cfg=cfg_of("dreambooth_no_prior", unet_steps=2),
                options=opts(quality_samples=n), **({"image_features": features} if with_encoder else {}))
    assert out.quality is not None and out.quality.drift is not None
    # the training images come from the image set, not decoded again
    assert host.decoded == (4 if with_encoder else 3) * n, host.decoded
    if with_encoder:
        assert seen.count(n) == 4  # source, adapted, class before, class after


class PromptRecordingToyHost(ToyHost):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.sampled = []  # (prompt, adapted?) of every sample() call

    def sample(self, prompt, seeds, *, adapter=None, **kw):
        self.sampled.append((prompt, adapter is not None))
        return super().sample(prompt, seeds, adapter=adapter, **kw)


@pytest.mark.parametrize("method, config, adapted, source", [
    # per-image captions: both models get the template without the caption (not the first image's prompt)
    ("domainstudio", {"target_prompt": "a sks emoji of {caption}", "source_prompt": "an emoji of {caption}"},
     "a sks emoji of", "an emoji of"),
    ("domainstudio", {"target_prompt": "a sks house", "source_prompt": "a house"}, "a sks house", "a house"),
    ("finetune", {"target_prompt": "{caption}, sks"}, ", sks", ", sks"),
    ("dreambooth_no_prior", {}, "a photo of sks dog", "a photo of dog"),
])
def test_the_quality_report_asks_both_models_for_the_same_kind_of_prompt(method, config, adapted, source):
    host = PromptRecordingToyHost()
    host.latents = structured_latents(3)
    cfg = cfg_of(method, **({"batch_size": 3, "steps": 1} if method != "dreambooth_no_prior" else {"unet_steps": 1}),
                 **config)
    out = run(host, method, cfg, image_set(toy_images(3), ["red heart", "cat face", "tree"]),
              opts(quality_samples=3, preview_every=0))
    q = out.quality
    assert (q.prompt_adapted, q.prompt_source) == (adapted, source)
    assert (adapted, True) in host.sampled and (source, False) in host.sampled
    assert not any("red heart" in p for p, _ in host.sampled), host.sampled  # no single image's caption
    assert f"prompts: adapted {adapted!r}, source {source!r}" in q.text()
    assert q.as_dict()["prompt_source"] == source


class SigmaRecordingToyHost(ToyHost):
    """Records the noise level of every adapted and source prediction made while training."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.trained_sigmas: list[torch.Tensor] = []

    def predict_x0(self, xt, sigma, cond, adapted: bool = True):
        if self.training:
            self.trained_sigmas.append(sigma.detach().flatten().clone())
        return super().predict_x0(xt, sigma, cond, adapted)


@pytest.mark.parametrize("method", ["domainstudio", "finetune", "dreambooth", "rare_token"])
@pytest.mark.parametrize("lo, hi", [(0, 300), (700, 1000), (400, 401)])
def test_a_timestep_range_trains_only_those_noise_levels(method, lo, hi):
    host = SigmaRecordingToyHost()
    out = train(method, host=host, options=opts(min_timestep=lo, max_timestep=hi))
    assert out.completed and out.options.timesteps == (lo, hi)
    drawn = torch.cat(host.trained_sigmas)
    assert drawn.numel() >= out.steps_done  # every step (and the prior / source passes) is recorded
    assert drawn.min() >= host.sigmas[lo] and drawn.max() <= host.sigmas[hi - 1], (drawn.min(), drawn.max())
    if hi - lo > 1:  # spread over the range, not one level
        assert drawn.unique().numel() > 3


def test_the_whole_schedule_is_the_hosts_own_draw_and_reaches_both_ends():
    from comfyui_domainstudio.trainer.loop import Rng
    from comfyui_domainstudio.trainer.methods.base import FULL_SCHEDULE, noise_levels

    host = ToyHost()
    # the default range is the host's unchanged stream (runs before the setting existed reproduce)
    assert torch.equal(noise_levels(host, 64, Rng.seeded(5, "cpu"), FULL_SCHEDULE),
                       host.sample_sigmas(64, Rng.seeded(5, "cpu").device))
    full = SigmaRecordingToyHost()
    train("finetune", host=full, options=opts())
    drawn = torch.cat(full.trained_sigmas)
    assert drawn.min() < host.sigmas[300] and drawn.max() > host.sigmas[700]


@pytest.mark.parametrize("lo, hi", [(500, 500), (600, 200)])
def test_an_empty_timestep_range_is_refused_before_training_naming_both_settings(lo, hi):
    host = ToyHost()
    with pytest.raises(SettingError) as e:
        train("finetune", host=host, options=opts(min_timestep=lo, max_timestep=hi))
    assert e.value.name == "max_timestep" and "min_timestep" in e.value.fix and host.calls["encode_images"] == 0
    with pytest.raises(SettingError) as e:
        train("finetune", host=host, options=opts(max_timestep=1001))
    assert e.value.name == "max_timestep"
