"""ComfyUI-DomainStudio: ComfyUI entry point.

ComfyUI imports this package from custom_nodes/. Everything under trainer/ is host-agnostic and
imports without ComfyUI; only nodes/ (and trainer/hosts/comfy.py) touch the host.
"""

WEB_DIRECTORY = "./js"


async def comfy_entrypoint():
    # Imported lazily so that `import trainer` (tests, CLI, other hosts) never needs ComfyUI.
    from .nodes import DomainStudioExtension

    return DomainStudioExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
