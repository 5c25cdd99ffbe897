"""A miniature Stable Diffusion 1.5 world trained from scratch on emoji (issue 6).

* ``miniworld.data``     fetch (npm, cached) and prepare the emoji image sets with captions
* ``miniworld.textenc``  the frozen, seeded random CLIP-L (regenerated deterministically, never shipped)
* ``miniworld.train``    reproduce the shipped weights (TAESD-architecture VAE + tiny SD1.5 UNet)
* ``miniworld.build``    assemble a single-file checkpoint that ComfyUI's stock loader reads as SD1.5

The package never imports ComfyUI at import time; ``miniworld.comfyenv`` does it on demand.
The pack's own code (trainer.grids) is imported under the pack's one name, comfyui_domainstudio
(see the repository's __init__.py), which importing this package registers when needed.
"""

import os as _os
import runpy as _runpy
import sys as _sys

if "comfyui_domainstudio" not in _sys.modules:
    _runpy.run_path(_os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "__init__.py"))
