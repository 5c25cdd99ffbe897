"""Test-only ComfyUI nodes, loaded only by the end-to-end server tests.

The stock CLIP loaders detect CLIP-G by the presence of layer 30 (comfy/sd.py detect_te_model),
so a tiny SDXL text encoder cannot come from a file: this node builds the same seeded 3-layer
CLIP-L/G pair that the in-process tests use (tests/tiny_models.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))  # tests/, through the symlink

import tiny_models  # noqa: E402


class TinySDXLClip:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 3, "min": 0, "max": 1000})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, seed):
        return (tiny_models.tiny_sdxl_clip(seed),)


NODE_CLASS_MAPPINGS = {"DSTest_TinySDXLClip": TinySDXLClip}
