"""ComfyUI-DomainStudio: ComfyUI entry point, and the one way to import the pack.

ComfyUI imports ``custom_nodes/<folder>/__init__.py`` under a module name made from the folder's
path. Every module of the pack instead lives under one fixed package name, ``comfyui_domainstudio``,
so that ComfyUI, the tests, the benchmarks and ``dstrain`` share one copy of each module and a
top-level name of ours (``nodes``, ``trainer``) can never shadow ComfyUI's. Importing this file
under any other name (ComfyUI's, or ``runpy.run_path`` from a script) registers that package and
re-exports its entry points::

    import os, runpy
    runpy.run_path(os.path.join(REPO, "__init__.py"))      # scripts, tests, dstrain
    from comfyui_domainstudio.trainer import losses

Everything under ``trainer/`` is host-agnostic and imports without ComfyUI; ``nodes/`` and
``trainer/hosts/comfy*.py`` touch ComfyUI.
"""

import importlib.util
import os
import sys

PACKAGE = "comfyui_domainstudio"
WEB_DIRECTORY = "./js"

if __name__ != PACKAGE:
    if PACKAGE not in sys.modules:
        _here = os.path.dirname(os.path.abspath(__file__))
        _spec = importlib.util.spec_from_file_location(PACKAGE, os.path.join(_here, "__init__.py"),
                                                       submodule_search_locations=[_here])
        _module = importlib.util.module_from_spec(_spec)
        sys.modules[PACKAGE] = _module
        try:
            _spec.loader.exec_module(_module)
        except BaseException:
            del sys.modules[PACKAGE]
            raise
    comfy_entrypoint = sys.modules[PACKAGE].comfy_entrypoint
else:
    async def comfy_entrypoint():
        # Imported lazily so that importing the package (tests, CLI, other hosts) never needs ComfyUI.
        from .nodes import DomainStudioExtension

        return DomainStudioExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
