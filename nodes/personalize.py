"""Personalize: learn one subject from 3-5 images (rare-token method, Textual Inversion, DreamBooth).

One node with a method choice rather than one node per method: the four methods share their inputs
(images, class noun, steps, UNet settings) and outputs, so comparing them is switching one combo in
the same graph."""

from comfy_api.v0_0_2 import io

from ..trainer import methods
from ..trainer.methods.personalize import PersonalizeConfig
from . import common, schema
from .types import CATEGORY, training_inputs

NODE = "Personalize"


class PersonalizeTrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DomainStudio_Personalize",
            display_name="Personalize (rare-token / TI / DreamBooth)",
            category=CATEGORY,
            description="Learns one subject from 3-5 photos: the rare-token two-stage method (arXiv 2407.05312), "
            "Textual Inversion or DreamBooth. Outputs a patched MODEL, a CLIP that understands the new word in a "
            "stock CLIP Text Encode, and saves the embedding / LoRA.",
            inputs=[
                *training_inputs(),
                io.Combo.Input("method", options=methods.for_node("subject"), default="rare_token",
                               tooltip="rare_token: token then UNet (no prior). textual_inversion: token only. "
                               "dreambooth: UNet with prior preservation on class images. dreambooth_no_prior."),
                *schema.inputs_for(PersonalizeConfig),
                *schema.trainer_tail("subject", "subject", "UNet delta file stem in models/loras (numbered, never overwritten); "
                                     "the embedding is saved as models/embeddings/<new_token>.safetensors. Empty = "
                                     "don't save.",
                                     "Continue a run this pack saved: pick its _partial_ or _step file (the .dsstate "
                                     "sidecar beside it holds the token and optimizer state)."),
            ],
            outputs=[
                io.Model.Output("personal_model", display_name="model",
                                tooltip="Patched copy of the input (unchanged for textual_inversion)."),
                io.Clip.Output("personal_clip", display_name="clip",
                               tooltip="Copy of the input CLIP whose prompts understand the new token."),
                io.String.Output("prompt", display_name="prompt", tooltip="The instance prompt, e.g. 'a photo of ds_subject dog'."),
                io.LoraModel.Output("delta", display_name="delta", tooltip="UNet delta (kohya keys); empty for textual_inversion."),
                io.Image.Output("loss_plot", display_name="loss_plot"),
                io.String.Output("saved", display_name="saved", tooltip="Saved file paths, one per line (or why saving failed)."),
                io.String.Output("report", display_name="report",
                                 tooltip="Quality report (quality_samples > 0): diversity, copying, class drift, and a warning "
                                 "when the samples break into fragments (over-training)."),
                io.Image.Output("report_image", display_name="report_image",
                                tooltip="Training images, source and adapted samples on the same seeds."),
            ],
        )

    @classmethod
    def execute(cls, **inputs) -> io.NodeOutput:
        outcome, out = common.run_trainer(cls, NODE, inputs)
        return io.NodeOutput(outcome.exported.model, outcome.exported.clip, outcome.prompts.usage, out["delta"],
                             out["plot"], out["saved"], out["report"], out["report_image"], ui=out["ui"])
