"""The headless trainer dstrain (dstrain/cli.py) end to end, as a user runs it: a subprocess,
`python -m dstrain` from the repository or `python path/to/repo/dstrain` from anywhere.

It trains from a folder and writes files ComfyUI's own loaders take, sample grids and run.json;
without --checkpoint it uses the miniature model (miniworld/); bad input exits non-zero with a
message naming the flag and no traceback. Input errors that need no model must come before the
ComfyUI import (~20 s): each run is made with `python -X importtime`, and the modules it imported
are read from that list, so the tests check what was imported rather than how long it took.
"""

import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from comfyui_domainstudio.testing.examples import subject_images
from comfyui_domainstudio.testing.harness import REPO, comfy_dir

pytestmark = pytest.mark.comfy

COMFY_MODULES = re.compile(r"^(comfy|comfy\..+|comfy_api(\..+)?|folder_paths|comfy_extras(\..+)?)$")


class Result:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.returncode, self.stdout = proc.returncode, proc.stdout
        lines = proc.stderr.splitlines()
        self.imported = [ln.rsplit("|", 1)[1].strip() for ln in lines if ln.startswith("import time:")]
        self.stderr = "\n".join(ln for ln in lines if not ln.startswith("import time:"))

    @property
    def comfy_imported(self) -> list[str]:
        return [m for m in self.imported if COMFY_MODULES.match(m)]


def _dstrain(*args, cwd=REPO, as_path=False, timeout=900) -> Result:
    """Run dstrain in a subprocess (-X importtime lists every module it imports on stderr)."""
    env = {**os.environ, "COMFYUI_DIR": comfy_dir(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    entry = [os.path.join(REPO, "dstrain")] if as_path else ["-m", "dstrain"]
    proc = subprocess.run([sys.executable, "-X", "importtime", *entry, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return Result(proc)


def _assert_refused(r: Result, flag: str, *words: str):
    assert r.returncode != 0, r.stdout[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    message = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    assert message.startswith("dstrain: ") and flag in message, r.stderr[-2000:]
    for w in words:
        assert w in message, (w, message)
    assert not r.comfy_imported, f"ComfyUI was imported before the error: {r.comfy_imported[:5]}"


@pytest.fixture(scope="module")
def subject_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("subject")
    for i, im in enumerate(subject_images(4)):
        im.save(d / f"s{i}.png")
    return str(d)


@pytest.mark.parametrize("method, extra, as_path", [
    ("domainstudio", ["--steps", "3", "--batch-size", "3", "--max-timestep", "500"], False),
    ("rare_token", ["--ti-steps", "2", "--unet-steps", "2", "--class-noun", "dog"], True),
])
def test_trains_and_writes_files_comfyui_loads(comfy, tiny_models, subject_dir, tmp_path, method, extra, as_path):
    out = tmp_path / "out"
    cwd = str(tmp_path) if as_path else REPO  # `python path/to/repo/dstrain` from another folder
    r = _dstrain("--method", method, "--images", subject_dir, "--checkpoint", tiny_models["sd15"], "--resolution",
                 "64", "--samples", "2", "--sample-steps", "2", "--out", str(out), *extra, cwd=cwd, as_path=as_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.comfy_imported, "a training run imports ComfyUI's model code (and -X importtime shows it)"
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == method and run["family"] == "sd1" and run["images"] == 4
    # DomainStudio's range given as a flag; rare_token at its default (the cleanest quarter left out)
    assert (run["options"]["min_timestep"], run["options"]["max_timestep"]) == ((0, 500) if method == "domainstudio"
                                                                                 else (250, 1000))
    for g in run["grids"]:
        with Image.open(out / g) as im:
            assert im.size[0] == 2 * 64 and im.size[1] in (64, 128)
    delta_file = next(f for f in run["files"] if os.path.basename(f).startswith(method))
    assert os.path.dirname(os.path.abspath(delta_file)) == str(out)

    from comfy import sd, utils

    tensors = utils.load_torch_file(delta_file, safe_load=True)
    model = comfy.nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(tiny_models["sd15"]))[0]
    patched, _ = sd.load_lora_for_models(model, None, tensors, 1.0, 0.0)
    n_modules = len({k.split(".")[0] for k in tensors})
    assert n_modules and len(patched.patches) == n_modules, "every LoRA module maps onto a UNet weight"
    if method == "rare_token":
        emb = next(f for f in run["files"] if os.path.basename(f) == "ds_subject.safetensors")
        vectors = utils.load_torch_file(emb, safe_load=True)
        assert set(vectors) == {"clip_l"} and tuple(vectors["clip_l"].shape) == (1, 768), vectors.keys()


def test_defaults_to_the_miniature_model(subject_dir, tmp_path):
    out = tmp_path / "out"
    r = _dstrain("--method", "textual_inversion", "--images", subject_dir, "--ti-steps", "2",
                 "--samples", "1", "--sample-steps", "2", "--class-noun", "animal", "--out", str(out))
    assert r.returncode == 0, ("miniworld.build.ensure() or the run failed:\n" + r.stderr[-3000:])
    run = json.loads((out / "run.json").read_text())
    assert run["model"].endswith("miniworld_sd15.safetensors") and run["family"] == "sd1"
    assert run["resolution"] == 64  # the miniature's own size, not SD1's 512 (35 s a step there)
    assert [os.path.basename(f) for f in run["files"]] == ["ds_subject.safetensors"]


def test_setting_errors_name_the_flag_before_comfyui_is_imported(tiny_models, subject_dir, tmp_path):
    ckpt = tiny_models["sd15"]
    _assert_refused(_dstrain("--images", subject_dir, "--lr", "-5"), "--lr", "-5")
    _assert_refused(_dstrain("--images", subject_dir, "--method", "rare_token", "--steps", "3"), "--steps",
                    "--ti-steps", "--unet-steps")
    _assert_refused(_dstrain("--images", subject_dir, "--method", "dreambooth", "--target-prompt", "x"),
                    "--target-prompt")
    _assert_refused(_dstrain("--images", subject_dir, "--batch-size", "0"), "--batch-size")
    # a rule across two settings, before the model loads; the other setting is named by its flag too
    r = _dstrain("--images", subject_dir, "--min-timestep", "600", "--max-timestep", "500")
    _assert_refused(r, "--max-timestep=500", "above --min-timestep (600)")
    assert "min_timestep" not in r.stderr, r.stderr[-1000:]
    _assert_refused(_dstrain("--images", subject_dir, "--checkpoint", ckpt, "--name", "../evil"), "--name")
    _assert_refused(_dstrain("--images", subject_dir, "--checkpoint", str(tmp_path / "missing.safetensors")),
                    "--checkpoint")
    r = _dstrain("--images", subject_dir, "--steps", "many")
    assert r.returncode == 2 and "--steps" in r.stderr and "invalid int value" in r.stderr, r.stderr[-1000:]


def test_folder_errors_come_before_comfyui_is_imported(tmp_path):
    """A folder that cannot train is refused without loading a model, from another working folder."""
    _assert_refused(_dstrain("--images", str(tmp_path / "nope"), cwd=str(tmp_path), as_path=True), "--images")
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_refused(_dstrain("--images", str(empty)), "--images", "no supported images")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("not an image")
    _assert_refused(_dstrain("--images", str(notes)), "--images", "no supported images")
    one = tmp_path / "one"
    one.mkdir()
    subject_images(1)[0].save(one / "a.png")
    _assert_refused(_dstrain("--images", str(one), "--method", "domainstudio"), "--images")


def test_help_shows_every_default_from_any_folder(tmp_path):
    r = _dstrain("-h", cwd=str(tmp_path), as_path=True)
    assert r.returncode == 0 and r.stdout.startswith("usage: dstrain"), r.stderr[-2000:]
    assert not r.comfy_imported, r.comfy_imported[:5]
    # One help block per option: "  --flag METAVAR  text..." up to the next option.
    blocks = re.split(r"\n  (?=-)", r.stdout)
    options = {b.split()[0].rstrip(","): " ".join(b.split()) for b in blocks[1:]}
    from comfyui_domainstudio.dstrain.cli import _flag_specs, build_parser

    parser = build_parser()
    flags = [a.option_strings[-1] for a in parser._actions if a.option_strings and a.dest != "help"]
    assert set(flags) <= set(options), sorted(set(flags) - set(options))
    for a in parser._actions:  # every option that has a value when not given says which
        if not a.option_strings or a.dest == "help" or a.required or a.default in (None, False, ""):
            continue
        text = options[a.option_strings[-1]]
        assert "default" in text.lower(), f"{a.option_strings[-1]} shows no default: {text}"
    for flag, owners in _flag_specs().items():
        text = options[flag]
        for _, spec in owners:  # the setting's own default, as declared in the core
            assert repr(spec.default) in text, (flag, spec.default, text)


def test_checkpoint_resolution_reads_only_the_safetensors_header(tmp_path):
    import torch
    from safetensors.torch import save_file

    from comfyui_domainstudio.dstrain.hosts import checkpoint_resolution

    def ckpt(name, meta):
        path = str(tmp_path / name)
        save_file({"w": torch.zeros(1)}, path, metadata=meta)
        return path

    assert checkpoint_resolution(ckpt("xl.safetensors", {"modelspec.resolution": "1024x1024"})) == 1024
    assert checkpoint_resolution(ckpt("one.safetensors", {"modelspec.resolution": "768"})) == 768
    assert checkpoint_resolution(ckpt("wide.safetensors", {"modelspec.resolution": "512x768"})) is None  # not square
    assert checkpoint_resolution(ckpt("mini.safetensors", {"miniworld.key": "abc"})) == 64
    assert checkpoint_resolution(ckpt("plain.safetensors", {})) is None
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    assert checkpoint_resolution(str(tmp_path / "bad.safetensors")) is None
    (tmp_path / "old.ckpt").write_bytes(b"\x80\x02}q\x00.")  # a pickle: never opened
    assert checkpoint_resolution(str(tmp_path / "old.ckpt")) is None
    assert checkpoint_resolution("") is None and checkpoint_resolution(None) is None
