"""Everything that pins the miniature SD world (data version, splits, captions, seeds, architectures).

Change a value here and the shipped weights no longer match: retrain with ``python -m miniworld.train``.
"""

from __future__ import annotations

import os

# --- data (npm packages; the same emoji codes exist in both styles) -------------------------------
EMOJI_VERSION = "16.0.0"            # emoji-datasource-google / -twitter, pinned here only
SOURCE_STYLE = "google"             # Noto Color Emoji (Apache-2.0): the source domain we train on
TARGET_STYLES = ("twitter",)        # Twemoji (CC-BY 4.0): target domain, never seen in training
EXCLUDED_CATEGORIES = ("Flags", "Component")   # plus ZWJ sequences; skin tones are not separate entries
IMAGE_SIZE = 64                     # img/<style>/64/*.png, composited on white
HELDOUT_EVERY, HELDOUT_OFFSET = 10, 9   # concepts i with i % 10 == 9 (sort order) are held out: 139 of 1,391
DATA_VERSION = "2"                  # bump when the concept set/split/caption recipe changes (cache key)

# --- captions ---------------------------------------------------------------------------------------
# Named captions of a training concept (index 1 is what tests and benchmarks prompt), plus
# FILLER_TEMPLATE with N_FILLER_PER_NAME filler words per concept: an unknown word in the identifier
# slot ("a <w> emoji of <name>") must not change the content, so "a sks emoji of <name>" (the
# DomainStudio / DreamBooth prompt) is in distribution while "sks" itself stays unbound. Domain
# captions carry no name. Fillers: FILLER_COUNT whole-word tokens of ComfyUI's CLIP vocabulary
# (seeded draw), never "sks" and never a word of any emoji name.
CAPTION_TEMPLATES = ("{name}", "an emoji of {name}")
FILLER_TEMPLATE = "a {filler} emoji of {name}"
N_FILLER_PER_NAME = 2
DOMAIN_CAPTIONS = ("an emoji",)
DOMAIN_FILLER_TEMPLATE = "a {filler} emoji"
FILLER_COUNT = 256
FILLER_SEED = 99
RESERVED_WORDS = ("sks",)           # identifiers the adaptation benchmarks bind: never a filler
# Per training example: P(empty caption) (classifier-free guidance), P(domain caption), else one of the
# 2 + N_FILLER_PER_NAME named captions uniformly.
CAPTION_DROPOUT = 0.1
DOMAIN_CAPTION_P = 0.1

# --- training (defaults of `python -m miniworld.train`; the record in weights/training.json wins) --
VAE_CROP_STEPS, VAE_CROP_BATCH, VAE_CROP = 800, 32, 32
VAE_FULL_STEPS, VAE_FULL_BATCH = 200, 16
DECODER_STEPS, DECODER_BATCH = 2500, 16
DECODER_ADV, DECODER_ADV_START = 0.0, 500   # optional hinge-GAN weight of the decoder stage
UNET_STEPS, UNET_BATCH = 4200, 32
UNET_CYCLES = (2000, 3000)          # cosine cycles ending at 2000, 3000, then UNET_STEPS (see train.cycle_end)
UNET_LR = 6e-4
EMA_DECAY = 0.999
MIN_SNR_GAMMA = 5.0

# --- seeds ---------------------------------------------------------------------------------------
SEED = 1234
CLIP_SEED = 777                     # the frozen random CLIP-L (regenerated, never shipped)

# --- models --------------------------------------------------------------------------------------
# A two-level UNet ComfyUI detects as SD1.5 (model_channels 320, context 768, conv proj-in, no adm):
# 8x8 and 4x4 latents, one res-block + transformer per level going down, two per level coming up,
# a res-block / transformer / res-block middle at 4x4. Trained and shipped as low-rank factors
# (miniworld/factor.py, ranks UNET_RANKS); miniworld.build multiplies them out into this layout.
UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 8, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [1, 1], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
    "channel_mult": [1, 1], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_head_channels": 64, "num_heads": -1,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
UNET_RANKS = {"conv": 128, "attn": 96, "ff": 96, "emb": 64}
SD15_LATENT_SCALE = 0.18215         # comfy.latent_formats.SD15.scale_factor
LATENT_CHANNELS = 4

# --- files ---------------------------------------------------------------------------------------
HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS_DIR = os.path.join(HERE, "weights")
UNET_FILE = os.path.join(WEIGHTS_DIR, "unet_factors_fp16.safetensors")
VAE_FILE = os.path.join(WEIGHTS_DIR, "taesd_fp16.safetensors")
RECORD_FILE = os.path.join(WEIGHTS_DIR, "training.json")
REFERENCE_PNG = os.path.join(WEIGHTS_DIR, "train_images.png")   # the UNet's training images (tests use them)
REFERENCE_JSON = os.path.join(WEIGHTS_DIR, "train_images.json")
CHECKPOINT_NAME = "miniworld_sd15.safetensors"
SHIPPED_BUDGET_BYTES = 40 * 1024 * 1024   # everything under weights/


def cache_dir() -> str:
    d = os.environ.get("DS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "comfyui-domainstudio")
    os.makedirs(d, exist_ok=True)
    return d


def work_dir() -> str:
    """Where `python -m miniworld.train` keeps resumable checkpoints and its outputs until `install`."""
    d = os.path.join(cache_dir(), f"miniworld-train-v{DATA_VERSION}")
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
