"""Load Weights: apply a saved delta (LoRA / diff) or embedding to MODEL / CLIP with a strength,
refusing files made for another architecture or base model unless told to ignore the mismatch."""

import logging

from comfy_api.v0_0_2 import io

from ..trainer.deltas import WeightFileError
from ..trainer.hosts import comfy_compat as compat
from ..trainer.hosts import comfy_files
from . import common
from .types import CATEGORY

log = logging.getLogger("DomainStudio")

NODE = "DomainStudio Load Weights"


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
                io.Combo.Input("file", options=common.weight_file_options(),
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
        compat.require(NODE)
        folder, path = common.resolve_weight_file(NODE, file)
        try:
            if folder == "embeddings":
                if clip is None:
                    raise ValueError("an embedding needs a CLIP: connect the clip input")
                applied = comfy_files.apply_embedding_file(clip, path, strength_clip, model=model,
                                                           override=ignore_mismatch, name=file)
            else:
                applied = comfy_files.apply_delta_file(model, clip, path, strength_model, strength_clip,
                                                       override=ignore_mismatch, name=file)
        except (WeightFileError, ValueError) as e:
            raise ValueError(f"{NODE}: {e}") from None
        if applied.mismatches:
            log.warning("%s: %s", NODE, applied.info)
        return io.NodeOutput(applied.model, applied.clip, applied.info)
