"""Socket types shared by our nodes."""

from comfy_api.v0_0_2 import io

# A prepared few-shot set: trainer.imageset.ImageSet (images [N, R, R, 3] in 0..1 + names).
ImageSetType = io.Custom("DS_IMAGE_SET")
CATEGORY = "DomainStudio"
