"""Import a real ComfyUI in-process on the CPU (COMFYUI_DIR, else the tree .ci/setup.sh unpacked)."""

from __future__ import annotations

import sys

from . import config


def comfy():
    """Return the ``comfy`` package of a real ComfyUI tree, imported for the CPU."""
    root = config.comfy_dir()
    if root not in sys.path:
        sys.path.insert(0, root)
    import comfy.cli_args

    if "comfy.model_management" not in sys.modules:
        comfy.cli_args.args.cpu = True  # must precede comfy.model_management (it probes CUDA)
    import comfy.model_management  # noqa: F401
    import comfy.sd  # noqa: F401
    import comfy.sd1_clip  # noqa: F401
    import comfy.supported_models  # noqa: F401
    import comfy.supported_models_base  # noqa: F401
    import comfy.taesd.taesd  # noqa: F401
    import comfy.utils  # noqa: F401

    return comfy
