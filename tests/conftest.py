"""Test harness. Two levels, both against a real ComfyUI tree (COMFYUI_DIR, set by .ci/run):

* in-process: the `comfy` fixture imports ComfyUI on the CPU and loads this pack exactly as
  ComfyUI's own loader does (nodes.load_custom_node), so the node classes tested are the ones
  ComfyUI registered;
* end-to-end: tests/test_e2e_server.py starts `main.py --cpu` and talks HTTP/websocket to it.

Pure-torch tests of trainer/ need neither and run without COMFYUI_DIR.
"""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
if REPO not in sys.path:
    sys.path.append(REPO)  # for `import trainer`; appended so ComfyUI's `nodes` wins over ours


def comfy_dir() -> str:
    d = os.environ.get("COMFYUI_DIR", "")
    if not d or not os.path.isfile(os.path.join(d, "main.py")):
        pytest.fail(
            "COMFYUI_DIR is not set to a ComfyUI tree (a folder with main.py). Run the tests through "
            "`bash .ci/run`, or `eval \"$(bash .ci/setup.sh | tail -2)\"` first.",
            pytrace=False,
        )
    return d


def cache_dir() -> str:
    d = os.environ.get("DS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "comfyui-domainstudio")
    os.makedirs(d, exist_ok=True)
    return d


class Comfy:
    """Handle on an in-process ComfyUI: its modules plus our registered node classes."""

    def __init__(self, root: str):
        self.root = root
        if root not in sys.path:
            sys.path.insert(0, root)
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # must precede comfy.model_management (it probes CUDA)
        import comfy.model_management  # noqa: F401
        import folder_paths
        import nodes

        self.folder_paths = folder_paths
        self.nodes = nodes
        ok = asyncio.run(nodes.load_custom_node(REPO))
        assert ok, "ComfyUI failed to import this pack (see the log above)"
        self.pack_name = REPO.replace(".", "_x_")
        self.pack_module = sys.modules[self.pack_name]

    def pack(self, dotted: str):
        """A module of this pack as ComfyUI imported it (the instance the nodes use)."""
        import importlib

        return importlib.import_module(f"{self.pack_name}.{dotted}")

    def node(self, node_id: str):
        return self.nodes.NODE_CLASS_MAPPINGS[node_id]


_COMFY: Comfy | None = None


@pytest.fixture(scope="session")
def comfy() -> Comfy:
    global _COMFY
    if _COMFY is None:
        _COMFY = Comfy(comfy_dir())
    return _COMFY


def _tiny_dir(comfy: Comfy) -> str:
    import comfyui_version
    from tiny_models import TINY_VERSION

    d = os.path.join(cache_dir(), f"tiny-v{TINY_VERSION}-comfy{comfyui_version.__version__}")
    os.makedirs(d, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def tiny_models(comfy) -> dict:
    """Paths of the tiny checkpoints (built once, cached across runs) registered with ComfyUI."""
    import tiny_models as tm

    d = _tiny_dir(comfy)
    paths = {
        "sd15": os.path.join(d, "checkpoints", "tiny_sd15.safetensors"),
        "sdxl_unet": os.path.join(d, "diffusion_models", "tiny_sdxl_unet.safetensors"),
    }
    if not os.path.exists(paths["sd15"]):
        tm.build_sd15_checkpoint(paths["sd15"])
    if not os.path.exists(paths["sdxl_unet"]):
        tm.build_sdxl_unet(paths["sdxl_unet"])
    comfy.folder_paths.add_model_folder_path("checkpoints", os.path.dirname(paths["sd15"]))
    comfy.folder_paths.add_model_folder_path("diffusion_models", os.path.dirname(paths["sdxl_unet"]))
    paths["dir"] = d
    return paths


@pytest.fixture(scope="session")
def sd15(comfy, tiny_models):
    """(MODEL, CLIP, VAE) of the tiny SD1.5 checkpoint through the stock CheckpointLoaderSimple."""
    loader = comfy.nodes.CheckpointLoaderSimple()
    return loader.load_checkpoint(os.path.basename(tiny_models["sd15"]))[:3]


@pytest.fixture(scope="session")
def sdxl(comfy, tiny_models):
    """(MODEL, CLIP, VAE) of the tiny SDXL-family UNet (stock UNETLoader) + tiny CLIP + SD1.5's VAE."""
    import tiny_models as tm

    (model,) = comfy.nodes.UNETLoader().load_unet(os.path.basename(tiny_models["sdxl_unet"]), "default")
    _, _, vae = comfy.nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(tiny_models["sd15"]))[:3]
    return model, tm.tiny_sdxl_clip(), vae


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_models):
    """A real ComfyUI server (main.py --cpu) on a free loopback port with this pack added through
    --extra-model-paths-config; stopped by its PID at the end, also when tests fail."""
    from comfy_server import ComfyServer

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
