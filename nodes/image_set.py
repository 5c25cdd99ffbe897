"""Few-Shot Image Set: validate and prepare a handful of training images."""

import logging
import os

import folder_paths
from comfy_api.v0_0_2 import io

from ..trainer.imageset import ImageSetError, prepare_image_set
from .types import CATEGORY, ImageSetType

log = logging.getLogger("DomainStudio")


class FewShotImageSet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DomainStudio_FewShotImageSet",
            display_name="Few-Shot Image Set",
            category=CATEGORY,
            description="Collects a handful of training images (an IMAGE batch and/or a folder), checks them "
            "and resizes/center-crops them to one square resolution for the DomainStudio trainers.",
            inputs=[
                io.Image.Input("images", optional=True, tooltip="Images from the graph (e.g. Load Image)."),
                io.String.Input("folder", default="", tooltip="A folder of images; absolute, or relative to "
                                "ComfyUI's input folder. Empty = only the connected images."),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=8,
                             tooltip="Side of the square training images (multiple of 8)."),
                io.Boolean.Input("flip", default=False, tooltip="Add horizontally mirrored copies (augmentation)."),
            ],
            outputs=[
                ImageSetType.Output("image_set", display_name="image_set"),
                io.Image.Output("prepared_images", display_name="images", tooltip="The prepared images, for preview."),
                io.String.Output("summary", display_name="summary"),
            ],
        )

    @classmethod
    def execute(cls, resolution, flip, folder="", images=None) -> io.NodeOutput:
        folder = (folder or "").strip()
        if folder and not os.path.isabs(os.path.expanduser(folder)):
            folder = os.path.join(folder_paths.get_input_directory(), folder)
        try:
            image_set = prepare_image_set(images, folder or None, resolution, flip, min_images=1)  # trainers check their own minimum
        except ImageSetError as e:
            raise ValueError(f"Few-Shot Image Set: {e}") from None
        for w in image_set.warnings:
            log.warning("Few-Shot Image Set: %s", w)
        return io.NodeOutput(image_set, image_set.images, image_set.describe())

