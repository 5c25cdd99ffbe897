"""Test fixtures. Two levels, both against a real ComfyUI tree (COMFYUI_DIR, set by .ci/setup.sh):

* in-process: the `comfy` fixture imports ComfyUI on the CPU and loads this pack exactly as
  ComfyUI's own loader does (nodes.load_custom_node), so the node classes tested are the ones
  ComfyUI registered;
* end-to-end: the `server` fixture starts `main.py --cpu` and talks HTTP/websocket to it.

Pure-torch tests of trainer/ need neither and run without COMFYUI_DIR.

The pack is imported only as its one package, `comfyui_domainstudio` (../__init__.py registers it);
neither the repo root nor tests/ is put on sys.path here, and shared scaffolding lives in the
package's testing/ folder (`comfyui_domainstudio.testing`), never in a test module.
"""

from __future__ import annotations

import os
import runpy

import pytest

runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "__init__.py"))

from comfyui_domainstudio.testing.harness import REPO, TESTS, Comfy, comfy_dir, tiny_model_paths  # noqa: E402

_COMFY: Comfy | None = None


@pytest.fixture(scope="session")
def comfy() -> Comfy:
    global _COMFY
    if _COMFY is None:
        _COMFY = Comfy(comfy_dir())
    return _COMFY


@pytest.fixture(scope="session")
def tiny_models(comfy) -> dict:
    """Paths of the tiny checkpoints (built once, cached across runs) registered with ComfyUI."""
    return tiny_model_paths(comfy)


@pytest.fixture(scope="session")
def sd15(comfy, tiny_models):
    """(MODEL, CLIP, VAE) of the tiny SD1.5 checkpoint through the stock CheckpointLoaderSimple."""
    loader = comfy.nodes.CheckpointLoaderSimple()
    return loader.load_checkpoint(os.path.basename(tiny_models["sd15"]))[:3]


@pytest.fixture(scope="session")
def sdxl(comfy, tiny_models):
    """(MODEL, CLIP, VAE) of the tiny SDXL-family UNet (stock UNETLoader) + tiny CLIP + SD1.5's VAE."""
    from comfyui_domainstudio.testing import tiny_models as tm

    (model,) = comfy.nodes.UNETLoader().load_unet(os.path.basename(tiny_models["sdxl_unet"]), "default")
    _, _, vae = comfy.nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(tiny_models["sd15"]))[:3]
    return model, tm.tiny_sdxl_clip(), vae


@pytest.fixture()
def unload_models(comfy):
    """Unload every model after the test: ComfyUI writes a loaded clone's patches into the shared
    weights and restores them only on unload, so a patched clone left loaded would change what the
    next test (in any file) sees as the base model's weights."""
    yield
    from comfy import model_management

    model_management.unload_all_models()


@pytest.fixture()
def loras_dir(comfy, tmp_path):
    """A fresh first models/loras folder (our nodes save to the first one)."""
    from comfyui_domainstudio.testing.comfy_helpers import model_folder

    with model_folder(comfy, "loras", str(tmp_path / "loras")) as d:
        yield d


@pytest.fixture()
def embeddings_dir(comfy, tmp_path):
    """A fresh first models/embeddings folder."""
    from comfyui_domainstudio.testing.comfy_helpers import model_folder

    with model_folder(comfy, "embeddings", str(tmp_path / "embeddings")) as d:
        yield d


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_models):
    """A real ComfyUI server (main.py --cpu) on a free loopback port with this pack added through
    --extra-model-paths-config; stopped by its PID at the end, also when tests fail."""
    from comfyui_domainstudio.testing.comfy_server import ComfyServer

    base = str(tmp_path_factory.mktemp("comfy_base"))
    srv = ComfyServer(comfy_dir(), base, REPO, {
        "checkpoints": os.path.dirname(tiny_models["sd15"]),
        "diffusion_models": os.path.dirname(tiny_models["sdxl_unet"]),
    }, extra_packs={"ds_test_nodes": os.path.join(TESTS, "comfy_test_nodes")})
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@pytest.fixture()
def one_thread():
    """Pure-torch tests on tiny tensors: extra intra-op threads only add contention on 2 cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
