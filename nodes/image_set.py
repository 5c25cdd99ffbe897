"""Few-Shot Image Set: validate and prepare a handful of training images.

The folder input is confined: it must name a folder inside ComfyUI's input directory (or inside a
folder the server owner allows with the DOMAINSTUDIO_IMAGE_ROOTS environment variable), because a
prompt can come from anyone who reaches the server. See trainer/imageset.py.
"""

import logging

import folder_paths
from comfy_api.v0_0_2 import io

from ..trainer.imageset import (MAX_CAPTION_CHARS, ROOTS_ENV, ImageSetError, image_roots,
                                prepare_image_set)
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
                io.String.Input("folder", default="", tooltip="Name of a subfolder of ComfyUI's input folder "
                                "that holds the images (e.g. 'my_style'), or an absolute path inside a folder the "
                                f"server owner allowed with the {ROOTS_ENV} environment variable. A 'name.txt' "
                                "beside 'name.png' is that image's caption (UTF-8). Empty = only the connected "
                                "images."),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=8,
                             tooltip="Side of the square training images (multiple of 8)."),
                io.Boolean.Input("flip", default=False, tooltip="Add horizontally mirrored copies (augmentation)."),
                io.String.Input("captions", default="", multiline=True, optional=True,
                                tooltip="Optional captions, one per line, given in this order: first the images "
                                "of the images input, then the folder's images that have no 'name.txt' caption "
                                "file (in file-name order). An empty line leaves that image without a caption; "
                                "more lines than such images is an error. At most "
                                f"{MAX_CAPTION_CHARS} characters per caption."),
            ],
            outputs=[
                ImageSetType.Output("image_set", display_name="image_set"),
                io.Image.Output("prepared_images", display_name="images", tooltip="The prepared images, for preview."),
                io.String.Output("summary", display_name="summary"),
            ],
        )

    @classmethod
    def execute(cls, resolution, flip, folder="", images=None, captions="") -> io.NodeOutput:
        # Relative names are taken from the input directory; nothing outside the roots is read.
        roots = image_roots(folder_paths.get_input_directory())
        try:
            image_set = prepare_image_set(images, folder or None, resolution, flip, min_images=1,  # trainers check their own minimum
                                          roots=roots, captions=captions or None)
        except ImageSetError as e:
            raise ValueError(f"Few-Shot Image Set: {e}") from None
        for w in image_set.warnings:
            log.warning("Few-Shot Image Set: %s", w)
        return io.NodeOutput(image_set, image_set.images, image_set.describe())
