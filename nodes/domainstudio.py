"""DomainStudio Train: few-shot domain adaptation of the MODEL loaded in the graph (DomainStudio,
arXiv 2306.14153), or plain fine-tuning as the baseline (method input)."""

from comfy_api.v0_0_2 import io

from ..trainer import methods
from ..trainer.methods.domainstudio import DomainStudioConfig
from ..trainer.methods.finetune import FinetuneConfig
from . import common, schema
from .types import CATEGORY, training_inputs

NODE = "DomainStudio Train"


class DomainStudioTrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DomainStudio_Train",
            display_name="DomainStudio Train (few-shot domain)",
            category=CATEGORY,
            description="Adapts the loaded model to the domain of ~10 images while keeping the source model's "
            "diversity (DomainStudio, arXiv 2306.14153), or fine-tunes it plainly (method=finetune, the baseline). "
            "Outputs a patched MODEL for KSampler and saves a LoRA/diff file to models/loras.",
            inputs=[
                *training_inputs(),
                io.Combo.Input("method", options=methods.for_node("domain"), default="domainstudio",
                               tooltip="domainstudio: keeps the source model's diversity (relative-distance terms); "
                               "finetune: plain fine-tuning, the baseline it is compared against."),
                *schema.inputs_for(DomainStudioConfig, FinetuneConfig),
                *schema.trainer_tail("domain", "domainstudio", "File name stem in models/loras (numbered, never overwritten). "
                                     "Empty = don't save.",
                                     "Continue a delta this pack saved (e.g. a _partial_ or _step file; its .dsstate "
                                     "sidecar restores the optimizer) up to `steps`. Same method and base model."),
            ],
            outputs=[
                io.Model.Output("adapted_model", display_name="model", tooltip="A patched copy of the input model; the input is untouched."),
                io.LoraModel.Output("delta", display_name="delta", tooltip="The trained weights (kohya keys), for Save LoRA / Load LoRA Model."),
                io.Image.Output("loss_plot", display_name="loss_plot"),
                io.String.Output("saved_path", display_name="saved_path",
                                 tooltip="Saved files, one per line (or why saving failed)."),
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
        return io.NodeOutput(outcome.exported.model, out["delta"], out["plot"], out["saved"], out["report"],
                             out["report_image"], ui=out["ui"])
