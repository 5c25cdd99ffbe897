"""What a run writes, without a model host (trainer/files.py, trainer/deltas.py's atomic writes):
temporary files no model list shows, permissions, stale-temp clean-up after a crash mid-save (a
child process killed inside save_file), the format registry, and the .dsstate sidecar."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import save_file

from comfyui_domainstudio.trainer import deltas, files
from comfyui_domainstudio.trainer.deltas import TEMP_MARK, atomic_write, remove_stale_temp_files
from comfyui_domainstudio.trainer.errors import SettingError
from comfyui_domainstudio.trainer.files import FORMATS, STATE_EXT, delta_format
from comfyui_domainstudio.trainer.run import RunOptions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The extensions ComfyUI's model lists show (folder_paths.supported_pt_extensions) and A1111's.
MODEL_EXTENSIONS = (".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft")


def _listable(name: str) -> bool:
    return name.lower().endswith(MODEL_EXTENSIONS)


def _lora(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"lora_unet_a.lora_up.weight": torch.randn(8, 2, generator=g),
            "lora_unet_a.lora_down.weight": torch.randn(2, 6, generator=g),
            "lora_unet_a.alpha": torch.tensor(2.0)}


# ------------------------------------------------------------------ atomic writes


def test_atomic_write_uses_a_hidden_unlistable_temp_and_leaves_only_the_file(tmp_path):
    seen = []

    def write(tmp):
        seen.append(sorted(os.listdir(tmp_path)))
        assert os.path.dirname(tmp) == str(tmp_path)
        with open(tmp, "wb") as f:
            f.write(b"data")

    path = atomic_write(str(tmp_path / "style.safetensors"), write)
    (names,) = seen
    assert len(names) == 1
    temp = names[0]
    assert temp.startswith(".style.safetensors" + TEMP_MARK) and not _listable(temp)
    assert sorted(os.listdir(tmp_path)) == ["style.safetensors"] and open(path, "rb").read() == b"data"


def test_atomic_write_never_overwrites_unless_asked_and_cleans_up_on_failure(tmp_path):
    p = str(tmp_path / "a.safetensors")
    atomic_write(p, lambda t: open(t, "wb").write(b"1"))
    with pytest.raises(deltas.WeightFileError, match="already exists"):
        atomic_write(p, lambda t: open(t, "wb").write(b"2"))
    assert open(p, "rb").read() == b"1"
    atomic_write(p, lambda t: open(t, "wb").write(b"3"), overwrite=True)
    assert open(p, "rb").read() == b"3"

    def fail(t):
        open(t, "wb").write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(str(tmp_path / "b.safetensors"), fail)
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_get_0666_minus_the_umask(umask, tmp_path):
    old = os.umask(umask)
    try:
        p = deltas.save_delta(str(tmp_path / "d.safetensors"), _lora(), {})
        q = atomic_write(str(tmp_path / "e.bin"), lambda t: open(t, "wb").write(b"x"))
    finally:
        os.umask(old)
    for path in (p, q):
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask, oct(os.stat(path).st_mode)


def test_remove_stale_temp_files_removes_only_ours(tmp_path):
    ours = tmp_path / (".style.safetensors" + TEMP_MARK + "abc123")
    fresh = tmp_path / (".new.safetensors" + TEMP_MARK + "def456")
    others = [tmp_path / "style.safetensors", tmp_path / ".hidden", tmp_path / ("visible" + TEMP_MARK + "x"),
              tmp_path / ".notes.txt"]
    for p in [ours, fresh, *others]:
        p.write_bytes(b"x")
    (tmp_path / (".dir" + TEMP_MARK + "x")).mkdir()  # a folder, not a file of ours
    old = time.time() - 3600
    os.utime(ours, (old, old))
    removed = remove_stale_temp_files([str(tmp_path), str(tmp_path / "missing")], min_age_s=60)
    assert removed == [str(ours)]
    assert fresh.exists() and all(p.exists() for p in others)
    assert remove_stale_temp_files([str(tmp_path)]) == [str(fresh)]
    assert sorted(os.listdir(tmp_path)) == sorted([p.name for p in others] + [".dir" + TEMP_MARK + "x"])


def test_a_crash_inside_save_file_leaves_no_visible_file_and_its_temp_is_cleaned(tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    ready = tmp_path / "ready"
    child = textwrap.dedent(f"""
        import os, runpy, sys, time
        runpy.run_path({os.path.join(REPO, "__init__.py")!r})
        import safetensors.torch, torch
        from comfyui_domainstudio.trainer import deltas

        def slow_save(tensors, path, metadata=None):
            with open(path, "wb") as f:
                f.write(b"half a file")
                f.flush()
            open({str(ready)!r}, "w").close()
            time.sleep(120)

        safetensors.torch.save_file = slow_save
        deltas.save_delta({str(folder / "style_00001.safetensors")!r}, {{"k.diff": torch.ones(2)}}, {{}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not ready.exists():
            if proc.poll() is not None:
                pytest.fail(f"the child exited early: {proc.stderr.read().decode()[-2000:]}")
            if time.time() > deadline:
                pytest.fail("the child never reached save_file")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # a crash in the middle of writing
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    names = os.listdir(folder)
    assert len(names) == 1 and names[0].startswith(".style_00001.safetensors" + TEMP_MARK)
    assert not any(_listable(n) for n in names)  # no model list shows the half-written file
    assert remove_stale_temp_files([str(folder)]) == [str(folder / names[0])]
    assert os.listdir(folder) == []


# ------------------------------------------------------------------ formats


def test_format_registry_and_auto():
    assert set(FORMATS) == {"lora", "diff", "svd_lora", "embedding"}
    assert FORMATS["embedding"].folder == "embeddings"
    assert all(FORMATS[n].folder == "loras" for n in ("lora", "diff", "svd_lora"))
    for mode, want in (("lora_attn", "lora"), ("lora_all", "lora"), ("full_attn", "diff"), ("full_all", "diff")):
        assert delta_format(RunOptions(train_mode=mode)).name == want
    for fmt in ("diff", "svd_lora"):
        assert delta_format(RunOptions(train_mode="lora_attn", save_format=fmt)).name == fmt


def test_formats_build_what_they_name():
    opts = RunOptions(train_mode="lora_all", lora_rank=2, lora_alpha=2.0, svd_rank=1)
    lora = _lora()
    w = FORMATS["lora"].build(lora, opts)
    assert w.kind == "lora" and w.tensors is lora and (w.rank, w.alpha) == (2, 2.0)
    d = FORMATS["diff"].build(lora, opts)
    want = lora["lora_unet_a.lora_up.weight"] @ lora["lora_unet_a.lora_down.weight"]  # alpha / rank = 1
    assert d.kind == "diff" and set(d.tensors) == {"lora_unet_a.diff"}
    torch.testing.assert_close(d.tensors["lora_unet_a.diff"], want)
    s = FORMATS["svd_lora"].build({"lora_unet_a.diff": want}, opts)
    assert s.kind == "svd_lora" and (s.rank, s.alpha) == (1, 1.0)
    assert s.tensors["lora_unet_a.lora_down.weight"].shape == (1, 6)
    rel = float(s.extra["domainstudio.svd_rel_error"])
    sv = torch.linalg.svdvals(want)
    assert rel == pytest.approx(float(sv[1:].norm() / sv.norm()), rel=1e-4)  # the rank-1 truncation error
    assert s.extra["domainstudio.svd_rank"] == 1
    assert "domainstudio.svd_max_layer_rel_error" in s.extra


# ------------------------------------------------------------------ snapshots and their sidecar


class _Out:
    """The parts of run.Outcome the Saver reads."""

    def __init__(self, method="finetune"):
        from comfyui_domainstudio.trainer.methods import get
        from comfyui_domainstudio.trainer.methods.base import Prompts
        from comfyui_domainstudio.trainer.run import StageOutcome

        self.method, self.family, self.fingerprint = method, "sd1", "ds1-0123456789abcdef"
        self.config = get(method).config()
        self.options = RunOptions(train_mode="lora_all", lora_rank=2, lora_alpha=2.0)
        self.stages = [StageOutcome("train", 10, 3, 1.5, {}, [])]
        self.prompts = Prompts(target=["a sks house"], source=[], usage="a sks house")
        self.token = None
        self.delta = _lora()


def test_snapshot_sidecar_holds_the_exact_state(tmp_path):
    saver = files.Saver(files.Folders(str(tmp_path / "l"), str(tmp_path / "e")), "style", host="toy", images=4,
                        resolution=16)
    out = _Out()
    loop_state = {"tensors": {"opt.0.exp_avg": torch.ones(3), "rng.cpu": torch.zeros(5, dtype=torch.uint8)},
                  "header": {"step": 3, "optimizer": "adamw", "param_groups": [{"lr": 0.1, "params": [0]}],
                             "state_keys": {"0": ["exp_avg"]}}}
    written = saver.save_snapshot(out, stage_index=0, stage="train", step=3, delta=out.delta, token=None,
                                  loop_state=loop_state, kind="partial")
    assert [os.path.basename(p) for p in written] == ["style_partial_3.safetensors", "style_partial_3" + STATE_EXT]
    assert not _listable(written[1])
    tensors, md = deltas.read_weight_file_any(written[1])
    header = json.loads(md["domainstudio.state"])
    assert (header["method"], header["stage"], header["step"], header["fingerprint"]) == ("finetune", "train", 3,
                                                                                         out.fingerprint)
    assert header["options"]["train_mode"] == "lora_all" and header["config"]["steps"] == 200
    assert header["loop"]["optimizer"] == "adamw"
    assert torch.equal(tensors["delta.lora_unet_a.lora_up.weight"], out.delta["lora_unet_a.lora_up.weight"])
    assert torch.equal(tensors["loop.opt.0.exp_avg"], torch.ones(3))
    # the visible snapshot says what it is
    md = deltas.read_weight_file(written[0])[1]
    assert md["domainstudio.snapshot"] == "partial" and md["domainstudio.steps"] == "3"
    # a later snapshot of the same name (another run cancelled at the same step) never overwrites
    before = open(written[0], "rb").read()
    again = saver.save_snapshot(out, stage_index=0, stage="train", step=3, delta=_lora(1), token=None,
                                loop_state=loop_state, kind="partial")
    assert [os.path.basename(p) for p in again] == ["style_partial_3_00001.safetensors",
                                                    "style_partial_3_00001" + STATE_EXT]
    assert open(written[0], "rb").read() == before


def test_a_foreign_dsstate_is_refused(tmp_path):
    from comfyui_domainstudio.trainer.methods import get

    p = str(tmp_path / ("x" + STATE_EXT))
    save_file({"a": torch.zeros(1)}, p)
    m = get("finetune")
    with pytest.raises(SettingError) as e:
        files.load_resume(p, method=m, cfg=m.config(), opts=RunOptions(), fingerprint="")
    assert e.value.name == "resume_from" and "not one this pack wrote" in e.value.fix
    with pytest.raises(SettingError, match="no such checkpoint") as e:
        files.load_resume(str(tmp_path / ("y" + STATE_EXT)), method=m, cfg=m.config(), opts=RunOptions(),
                          fingerprint="", label="--resume")
    assert e.value.labelled("--resume").startswith("--resume='y.dsstate' is invalid")
