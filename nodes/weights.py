"""Load Weights: apply a saved delta (LoRA / diff) or embedding to MODEL / CLIP with a strength,
refusing files made for another architecture or base model unless told to ignore the mismatch."""

import logging

import folder_paths
from comfy_api.v0_0_2 import io

from ..trainer.deltas import WeightFileError
from ..trainer.hosts import comfy as host
from .types import CATEGORY

log = logging.getLogger("DomainStudio")

LORA_PREFIX = "loras/"
EMBEDDING_PREFIX = "embeddings/"


def weight_file_options() -> list[str]:
    """'loras/<file>' and 'embeddings/<file>' for every file the stock loaders list."""
    out = [LORA_PREFIX + f for f in folder_paths.get_filename_list("loras")]
    out += [EMBEDDING_PREFIX + f for f in folder_paths.get_filename_list("embeddings")]
    return out


def resolve_weight_file(choice: str) -> tuple[str, str]:
    """('loras' | 'embeddings', absolute path) of a combo choice."""
    for prefix in (LORA_PREFIX, EMBEDDING_PREFIX):
        if choice.startswith(prefix):
            folder = prefix[:-1]
            path = folder_paths.get_full_path(folder, choice[len(prefix):])
            if path is None:
                raise ValueError(f"DomainStudio Load Weights: {choice!r} was not found in models/{folder} (refresh the "
                                 "node list after adding files)")
            return folder, path
    raise ValueError(f"DomainStudio Load Weights: file={choice!r} must start with 'loras/' or 'embeddings/'")


class DomainStudioLoadWeights(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DomainStudio_LoadWeights",
            display_name="DomainStudio Load Weights",
            category=CATEGORY,
            description="Applies a LoRA/diff file (models/loras) to MODEL (and CLIP if it has text-encoder weights) or "
            "an embedding (models/embeddings) to CLIP, with a strength. Refuses a file made for another "
            "architecture or trained on another base model (its fingerprint) unless ignore_mismatch is on.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip", optional=True, tooltip="Needed for embeddings and text-encoder deltas."),
                io.Combo.Input("file", options=weight_file_options(),
                               tooltip="loras/...: a delta for the MODEL; embeddings/...: an embedding for the CLIP "
                               "(then write embedding:NAME in the prompt, NAME = file name without extension)."),
                io.Float.Input("strength_model", default=1.0, min=-20.0, max=20.0, step=0.01,
                               tooltip="Scale of a UNet delta."),
                io.Float.Input("strength_clip", default=1.0, min=-20.0, max=20.0, step=0.01,
                               tooltip="Scale of a text-encoder delta, or of the embedding vectors."),
                io.Boolean.Input("ignore_mismatch", default=False,
                                 tooltip="Apply even if the file was made for another architecture or base model."),
            ],
            outputs=[
                io.Model.Output("out_model", display_name="model"),
                io.Clip.Output("out_clip", display_name="clip"),
                io.String.Output("info", display_name="info"),
            ],
        )

    @classmethod
    def execute(cls, model, file, strength_model, strength_clip, ignore_mismatch, clip=None) -> io.NodeOutput:
        folder, path = resolve_weight_file(file)
        try:
            if folder == "embeddings":
                if clip is None:
                    raise ValueError("an embedding needs a CLIP: connect the clip input")
                applied = host.apply_embedding_file(clip, path, strength_clip, model=model, override=ignore_mismatch)
            else:
                applied = host.apply_delta_file(model, clip, path, strength_model, strength_clip,
                                                override=ignore_mismatch)
        except (WeightFileError, ValueError) as e:
            raise ValueError(f"DomainStudio Load Weights: {e}") from None
        if applied.mismatches:
            log.warning("DomainStudio Load Weights: %s", applied.info)
        return io.NodeOutput(applied.model, applied.clip, applied.info)
