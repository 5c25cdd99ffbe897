"""The test harness's shared pieces, importable as ``comfyui_domainstudio.testing.harness`` (from
tests/conftest.py, test modules, benchmarks): where the repo and the ComfyUI tree are, the test
cache, and an in-process ComfyUI with this pack loaded the way ComfyUI loads it.

Two levels of ComfyUI in the tests, both against a real tree (COMFYUI_DIR, set by .ci/setup.sh):

* in-process (`Comfy`): ComfyUI imported on the CPU, the pack loaded by ComfyUI's own
  ``nodes.load_custom_node``. The pack's ``__init__.py`` hands ComfyUI the already-registered
  ``comfyui_domainstudio`` package, so the node classes ComfyUI registered and the modules the
  tests import are one and the same;
* end-to-end (testing/comfy_server.py): ``main.py --cpu`` in a child process.

Nothing here puts the repo or tests/ on sys.path: ``runpy.run_path(REPO/__init__.py)`` (done by
conftest.py before importing this) registers the package, and everything is imported through it.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
PACKAGE = "comfyui_domainstudio"


def comfy_dir() -> str:
    """The ComfyUI tree of COMFYUI_DIR; fails the test with how to set it when it is missing."""
    d = os.environ.get("COMFYUI_DIR", "")
    if not d or not os.path.isfile(os.path.join(d, "main.py")):
        import pytest

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
        # ComfyUI's module for the folder (named after its path) only re-exports the package's
        # entry point; every module of the pack lives under PACKAGE.
        self.loader_module_name = REPO.replace(".", "_x_")
        self.loader_module = sys.modules[self.loader_module_name]

    def pack(self, dotted: str):
        """A module of this pack (the one instance ComfyUI's nodes use too)."""
        return importlib.import_module(f"{PACKAGE}.{dotted}")

    def node(self, node_id: str):
        return self.nodes.NODE_CLASS_MAPPINGS[node_id]


def tiny_model_paths(comfy: Comfy) -> dict:
    """Paths of the tiny checkpoints (built once, cached across runs per ComfyUI version) registered
    with ComfyUI's checkpoints / diffusion_models folders."""
    import comfyui_version

    from . import tiny_models as tm

    d = os.path.join(cache_dir(), f"tiny-v{tm.TINY_VERSION}-comfy{comfyui_version.__version__}")
    os.makedirs(d, exist_ok=True)
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


def duplicate_pack_modules() -> dict[str, list[str]]:
    """Files of this pack imported under more than one module name: {file: [names]}.

    The package's __init__.py may also sit in sys.modules under other names (ComfyUI's loader names
    it after the folder's path; pytest imports a rootdir __init__.py as a package of its parent):
    each such module must be a pure delegate, i.e. re-export the package's entry point and have no
    submodules of its own; otherwise it is reported too."""
    by_file: dict[str, list[str]] = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not path:
            continue
        path = os.path.realpath(path)
        if path.startswith(os.path.realpath(REPO) + os.sep):
            by_file.setdefault(path, []).append(name)
    init = os.path.realpath(os.path.join(REPO, "__init__.py"))
    package = sys.modules.get(PACKAGE)
    out = {}
    for path, names in by_file.items():
        if path == init:
            def delegate(n):
                return (package is not None and n != PACKAGE
                        and getattr(sys.modules[n], "comfy_entrypoint", None) is package.comfy_entrypoint
                        and not any(m.startswith(n + ".") for m in sys.modules))

            bad = [n for n in names if n != PACKAGE and not delegate(n)]
            if bad or PACKAGE not in names:
                out[path] = sorted(names)
        elif len(names) > 1:
            out[path] = sorted(names)
    return out
