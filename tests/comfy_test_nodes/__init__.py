"""Test-only ComfyUI nodes, loaded only by the end-to-end server tests.

The stock CLIP loaders detect CLIP-G by the presence of layer 30 (comfy/sd.py detect_te_model),
so a tiny SDXL text encoder cannot come from a file: this node builds the same seeded 3-layer
CLIP-L/G pair that the in-process tests use (testing/tiny_models.py)."""

import os
import runpy

# The pack's one package (registered by its __init__.py, found through the symlink), whichever of
# the two packs the server loads first.
runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))),
                            "__init__.py"))

from comfyui_domainstudio.testing import tiny_models  # noqa: E402

from .fake_trainer import FakeTrainer  # noqa: E402


class TinySDXLClip:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 3, "min": 0, "max": 1000})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, seed):
        return (tiny_models.tiny_sdxl_clip(seed),)


# A V3 node registered through NODE_CLASS_MAPPINGS (ComfyUI reads only that when a module has it).
NODE_CLASS_MAPPINGS = {"DSTest_TinySDXLClip": TinySDXLClip, "DomainStudio_TestFakeTrainer": FakeTrainer}
NODE_DISPLAY_NAME_MAPPINGS = {"DomainStudio_TestFakeTrainer": "DomainStudio Test Fake Trainer"}
