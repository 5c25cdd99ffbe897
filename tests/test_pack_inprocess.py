"""The pack inside a real, in-process ComfyUI (CPU): loading, registration (one copy of every module),
stock loaders, the image-set node."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_domainstudio.testing.harness import PACKAGE, REPO, duplicate_pack_modules

pytestmark = pytest.mark.comfy

OUR_NODES = {"DomainStudio_FewShotImageSet", "DomainStudio_Train", "DomainStudio_Personalize",
             "DomainStudio_LoadWeights"}


def test_core_imports_without_comfyui(tmp_path):
    """The host-agnostic core (and the diffusers host) import through the package alone, from any
    working directory, without importing ComfyUI."""
    code = (
        "import runpy, sys, importlib; runpy.run_path(sys.argv[1]);"
        "mods = ['trainer', 'trainer.losses', 'trainer.loop', 'trainer.run', 'trainer.files', 'trainer.methods',"
        " 'trainer.methods.domainstudio', 'trainer.methods.personalize', 'trainer.imageset', 'trainer.deltas',"
        " 'trainer.embeddings', 'trainer.plot', 'trainer.memory', 'testing.toy'];"
        "[importlib.import_module('comfyui_domainstudio.' + m) for m in mods];"
        "bad=[m for m in sys.modules if m.split('.')[0] in ('comfy','comfy_api','folder_paths','nodes','trainer')];"
        "assert not bad, bad; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code, os.path.join(REPO, "__init__.py")], cwd=str(tmp_path),
                         capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_pack_registers_v3_nodes_and_web_directory(comfy):
    for node_id in OUR_NODES:
        cls = comfy.node(node_id)
        schema = cls.GET_SCHEMA() if hasattr(cls, "GET_SCHEMA") else cls.define_schema()
        assert schema.node_id == node_id
        info = cls.GET_NODE_INFO_V1()
        assert info["category"] == "DomainStudio"
        # The class ComfyUI registered is the package's own (not a second import of the module).
        assert cls.__module__.startswith(PACKAGE + ".nodes."), cls.__module__
        assert sys.modules[cls.__module__] is comfy.pack(cls.__module__[len(PACKAGE) + 1:])
    web = [d for d in comfy.nodes.EXTENSION_WEB_DIRS.values() if os.path.samefile(d, os.path.join(REPO, "js"))]
    assert web, comfy.nodes.EXTENSION_WEB_DIRS
    assert os.path.isfile(os.path.join(web[0], "domainstudio.js"))


def test_every_pack_module_is_imported_once(comfy, sd15):
    """ComfyUI's loader delegates to the registered package: one copy of each module, whatever
    imported it first (conftest's run_path, ComfyUI's load_custom_node, the tests)."""
    comfy.pack("trainer.run")
    comfy.pack("trainer.hosts.comfy")
    comfy.pack("nodes.common")
    assert duplicate_pack_modules() == {}
    for dotted in ("trainer.run", "trainer.hosts.comfy", "trainer.hosts.comfy_compat", "nodes.common",
                   "testing.tiny_models"):
        same = [m for m in sys.modules if m == dotted or m.endswith("." + dotted)]
        assert same == [f"{PACKAGE}.{dotted}"], same
    # No top-level `trainer` / `testing` of ours (ComfyUI's own `nodes` is the only `nodes`).
    assert "trainer" not in sys.modules and "testing" not in sys.modules
    assert sys.modules["nodes"] is comfy.nodes
    assert os.path.dirname(comfy.nodes.__file__) == os.path.realpath(comfy.root) or \
        os.path.samefile(os.path.dirname(comfy.nodes.__file__), comfy.root)
    # ComfyUI's module for the folder only re-exports the package's entry point.
    assert comfy.loader_module.comfy_entrypoint is sys.modules[PACKAGE].comfy_entrypoint
    assert not [m for m in sys.modules if m.startswith(comfy.loader_module_name + ".")]


def test_stock_checkpoint_loader_detects_tiny_sd15(comfy, sd15):
    import comfy.supported_models as sm

    model, clip, vae = sd15
    assert type(model.model.model_config) is sm.SD15
    assert type(vae.first_stage_model).__name__ == "TAESD"
    cond = clip.encode_from_tokens(clip.tokenize("a house"))
    assert cond.shape[-1] == 768 and torch.isfinite(cond).all()


def test_stock_unet_loader_detects_tiny_sdxl(comfy, sdxl):
    from comfy import model_base
    import comfy.supported_models as sm

    model, clip, _ = sdxl
    assert isinstance(model.model, model_base.SDXL)
    assert isinstance(model.model.model_config, sm.SDXL)
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a house"), return_pooled=True)
    assert cond.shape[-1] == 2048 and pooled.shape[-1] == 1280


def _write_images(folder, n, size=(80, 60)):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, f"img_{i}.png"))


@pytest.fixture()
def image_root(tmp_path, monkeypatch):
    """tmp_path allowed as an image folder root, as a server owner would with the environment variable."""
    monkeypatch.setenv("DOMAINSTUDIO_IMAGE_ROOTS", str(tmp_path))
    return tmp_path


def test_few_shot_image_set_node_from_folder_and_batch(comfy, image_root):
    node = comfy.node("DomainStudio_FewShotImageSet")
    _write_images(image_root / "set", 3)
    batch = torch.rand(2, 40, 48, 3)
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        out = node.execute(resolution=64, flip=True, folder=str(image_root / "set"), images=batch)
    image_set, images, summary = out.result
    assert images.shape == (10, 64, 64, 3)  # (2 + 3) images, doubled by flip
    assert torch.equal(images[5:], torch.flip(images[:5], dims=[2]))
    assert isinstance(summary, str) and "10" in summary


def test_few_shot_image_set_node_refuses_folders_outside_the_roots(comfy, tmp_path, monkeypatch):
    """Without the environment variable an absolute folder outside ComfyUI's input directory is
    refused with a message that shows only the user's own string."""
    monkeypatch.delenv("DOMAINSTUDIO_IMAGE_ROOTS", raising=False)
    node = comfy.node("DomainStudio_FewShotImageSet")
    _write_images(tmp_path / "set", 3)
    with pytest.raises(ValueError, match="input directory") as e:
        node.execute(resolution=64, flip=False, folder=str(tmp_path / "set"))
    assert comfy.folder_paths.get_input_directory() not in str(e.value)


def test_few_shot_image_set_node_relative_folder_uses_input_dir(comfy):
    node = comfy.node("DomainStudio_FewShotImageSet")
    input_dir = comfy.folder_paths.get_input_directory()
    sub = "ds_test_set_rel"
    _write_images(os.path.join(input_dir, sub), 2)
    try:
        out = node.execute(resolution=64, flip=False, folder=sub)
        assert out.result[1].shape == (2, 64, 64, 3)
    finally:
        import shutil

        shutil.rmtree(os.path.join(input_dir, sub))


def test_few_shot_image_set_node_errors_are_specific(comfy, image_root):
    node = comfy.node("DomainStudio_FewShotImageSet")
    with pytest.raises(ValueError, match="resolution"):
        node.execute(resolution=100, flip=False, images=torch.rand(3, 64, 64, 3))
    # One photo is a valid set (personalization warns about it; DomainStudio Train refuses it itself).
    assert len(node.execute(resolution=64, flip=False, images=torch.rand(1, 64, 64, 3)).result[0]) == 1
    (image_root / "bad").mkdir()
    (image_root / "bad" / "broken.png").write_bytes(b"not a png at all")
    _write_images(image_root / "bad", 2)
    with pytest.raises(ValueError, match="broken.png"):
        node.execute(resolution=64, flip=False, folder=str(image_root / "bad"))
    with pytest.raises(ValueError, match="does_not_exist"):
        node.execute(resolution=64, flip=False, folder=str(image_root / "does_not_exist"))


@pytest.mark.parametrize("node_id", ["DomainStudio_Train", "DomainStudio_Personalize"])
def test_inputs_added_later_come_after_every_saved_widget(comfy, node_id):
    # the frontend restores a saved workflow's widget values by position: a new input must not
    # shift the values of the inputs before it
    info = comfy.node(node_id).GET_NODE_INFO_V1()
    required, optional = info["input_order"]["required"], info["input_order"].get("optional", [])
    appended = list(comfy.pack("nodes.schema").APPENDED_OPTIONS)
    assert appended == ["min_timestep", "max_timestep"]
    # widgets are the required inputs here (the optional ones are sockets: images, clip_vision)
    assert not any(isinstance(info["input"]["optional"][k][0], list) or info["input"]["optional"][k][0] in
                   ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO") for k in optional), optional
    assert required[-len(appended):] == appended and required.index("resume_from") < required.index(appended[0])
    # each node shows its methods' range: DomainStudio Train the cleaner half, Personalize all but the cleanest quarter
    shown = tuple(info["input"]["required"][k][1]["default"] for k in appended)
    assert shown == {"DomainStudio_Train": (0, 500), "DomainStudio_Personalize": (250, 1000)}[node_id]
