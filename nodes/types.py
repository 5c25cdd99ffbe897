"""Socket types shared by our nodes."""

from comfy_api.v0_0_2 import io

# A prepared few-shot set: trainer.imageset.ImageSet (images [N, R, R, 3] in 0..1 + names).
ImageSetType = io.Custom("DS_IMAGE_SET")
CATEGORY = "DomainStudio"


def training_inputs() -> list:
    """The inputs every trainer node starts with: the graph's model, its text encoder and VAE, and
    the training images (a prepared set or a plain IMAGE batch)."""
    return [
        io.Model.Input("model"),
        io.Clip.Input("clip"),
        io.Vae.Input("vae"),
        ImageSetType.Input("image_set", optional=True, tooltip="From Few-Shot Image Set."),
        io.Image.Input("images", optional=True, tooltip="Or a plain IMAGE batch (resized to resolution)."),
    ]
