"""A miniature Stable Diffusion 1.5 world trained from scratch on emoji (issue 6).

* ``miniworld.data``     fetch (npm, cached) and prepare the emoji image sets with captions
* ``miniworld.textenc``  the frozen, seeded random CLIP-L (regenerated deterministically, never shipped)
* ``miniworld.train``    reproduce the shipped weights (TAESD-architecture VAE + tiny SD1.5 UNet)
* ``miniworld.build``    assemble a single-file checkpoint that ComfyUI's stock loader reads as SD1.5

The package never imports ComfyUI at import time; ``miniworld.comfyenv`` does it on demand.
"""
