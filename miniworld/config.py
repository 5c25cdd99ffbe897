"""Everything that pins the miniature SD world (data version, subset, seeds, architectures).

Change a value here and the shipped weights no longer match: retrain with ``python -m miniworld.train``.
"""

from __future__ import annotations

import os

# --- data (npm packages; the same emoji codes exist in both styles) -------------------------------
EMOJI_VERSION = "16.0.0"            # emoji-datasource-google / -twitter, pinned here only
SOURCE_STYLE = "google"             # Noto Color Emoji (Apache-2.0): the source domain we train on
TARGET_STYLES = ("twitter",)        # Twemoji (CC-BY 4.0): target domain, never seen in training
CATEGORIES = ("Animals & Nature", "Food & Drink")
IMAGE_SIZE = 64                     # img/<style>/64/*.png, composited on white
CAPTION_TEMPLATES = ("{name}", "an emoji of {name}")
TRAIN_STRIDE = 3                    # the UNet trains on every 3rd emoji of the subset (sized to a 2-core CPU)
DATA_VERSION = "1"                  # bump when the subset/caption recipe changes (cache key)

# --- training (defaults of `python -m miniworld.train`; the record in weights/training.json wins) --
VAE_STEPS = 500
DECODER_STEPS = 400
UNET_STEPS = 1200
CAPTION_DROPOUT = 0.1
MIN_SNR_GAMMA = 5.0

# --- seeds ---------------------------------------------------------------------------------------
SEED = 1234
CLIP_SEED = 777                     # the frozen random CLIP-L (regenerated, never shipped)

# --- models --------------------------------------------------------------------------------------
# A UNet ComfyUI detects as SD1.5 (model_channels 320, context 768, conv proj, no adm): one level at
# the 8x8 latent resolution, one res-block + transformer in, two out, no middle block
# (transformer_depth_middle -2 = no middle_block keys, which detection maps back to -2); the first
# output block has no transformer ([1, 0] is popped from the end) so UNet + VAE stay <= 40 MB in fp16.
UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 8, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [1], "transformer_depth": [1], "transformer_depth_output": [1, 0],
    "channel_mult": [1], "transformer_depth_middle": -2, "use_linear_in_transformer": False,
    "context_dim": 768, "num_head_channels": 64, "num_heads": -1,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
SD15_LATENT_SCALE = 0.18215         # comfy.latent_formats.SD15.scale_factor
LATENT_CHANNELS = 4

# --- files ---------------------------------------------------------------------------------------
HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS_DIR = os.path.join(HERE, "weights")
UNET_FILE = os.path.join(WEIGHTS_DIR, "unet_fp16.safetensors")
VAE_FILE = os.path.join(WEIGHTS_DIR, "taesd_fp16.safetensors")
RECORD_FILE = os.path.join(WEIGHTS_DIR, "training.json")
REFERENCE_PNG = os.path.join(WEIGHTS_DIR, "train_images.png")   # the UNet's training images (tests use them)
REFERENCE_JSON = os.path.join(WEIGHTS_DIR, "train_images.json")
CHECKPOINT_NAME = "miniworld_sd15.safetensors"


def cache_dir() -> str:
    d = os.environ.get("DS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "comfyui-domainstudio")
    os.makedirs(d, exist_ok=True)
    return d


def comfy_dir() -> str:
    d = os.environ.get("COMFYUI_DIR", "")
    if d and os.path.isfile(os.path.join(d, "main.py")):
        return d
    import glob

    found = sorted(glob.glob(os.path.join(cache_dir(), "comfyui-*", "main.py")))
    if not found:
        raise SystemExit("No ComfyUI tree: set COMFYUI_DIR or run `bash .ci/setup.sh` first.")
    return os.path.dirname(found[-1])
