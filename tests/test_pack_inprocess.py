"""The pack inside a real, in-process ComfyUI (CPU): loading, registration, stock loaders, our nodes."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO

pytestmark = pytest.mark.comfy

OUR_NODES = {"DomainStudio_FewShotImageSet", "DomainStudio_Train"}


def test_core_imports_without_comfyui():
    code = (
        "import sys; import trainer, trainer.losses, trainer.domainstudio, trainer.imageset, trainer.deltas, "
        "trainer.plot; bad=[m for m in sys.modules if m.split('.')[0] in ('comfy','comfy_api','folder_paths','nodes')];"
        "assert not bad, bad; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_pack_registers_v3_nodes_and_web_directory(comfy):
    for node_id in OUR_NODES:
        cls = comfy.node(node_id)
        schema = cls.GET_SCHEMA() if hasattr(cls, "GET_SCHEMA") else cls.define_schema()
        assert schema.node_id == node_id
        info = cls.GET_NODE_INFO_V1()
        assert info["category"] == "DomainStudio"
    web = [d for d in comfy.nodes.EXTENSION_WEB_DIRS.values() if os.path.samefile(d, os.path.join(REPO, "js"))]
    assert web, comfy.nodes.EXTENSION_WEB_DIRS
    assert os.path.isfile(os.path.join(web[0], "domainstudio.js"))


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


def test_few_shot_image_set_node_from_folder_and_batch(comfy, tmp_path):
    node = comfy.node("DomainStudio_FewShotImageSet")
    _write_images(tmp_path / "set", 3)
    batch = torch.rand(2, 40, 48, 3)
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        out = node.execute(resolution=64, flip=True, folder=str(tmp_path / "set"), images=batch)
    image_set, images, summary = out.result
    assert images.shape == (10, 64, 64, 3)  # (2 + 3) images, doubled by flip
    assert torch.equal(images[5:], torch.flip(images[:5], dims=[2]))
    assert isinstance(summary, str) and "10" in summary


def test_few_shot_image_set_node_relative_folder_uses_input_dir(comfy, tmp_path):
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


def test_few_shot_image_set_node_errors_are_specific(comfy, tmp_path):
    node = comfy.node("DomainStudio_FewShotImageSet")
    with pytest.raises(ValueError, match="resolution"):
        node.execute(resolution=100, flip=False, images=torch.rand(3, 64, 64, 3))
    # One photo is a valid set (personalization warns about it; DomainStudio Train refuses it itself).
    assert len(node.execute(resolution=64, flip=False, images=torch.rand(1, 64, 64, 3)).result[0]) == 1
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png at all")
    _write_images(tmp_path / "bad", 2)
    with pytest.raises(ValueError, match="broken.png"):
        node.execute(resolution=64, flip=False, folder=str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="does_not_exist"):
        node.execute(resolution=64, flip=False, folder=str(tmp_path / "does_not_exist"))
