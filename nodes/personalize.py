"""Personalize node: learn one subject from 3-5 images (rare-token method, Textual Inversion, DreamBooth).

One node with a method choice rather than one node per method: the four methods share their inputs
(images, class noun, steps, UNet settings) and outputs, so comparing them is switching one combo in
the same graph."""

import logging
import os

import comfy.utils
import folder_paths
from comfy_api.v0_0_2 import io

from ..trainer import deltas, embeddings
from ..trainer.domainstudio import TrainingError
from ..trainer.hosts import comfy as host
from ..trainer.hosts import comfy_personalize as phost
from ..trainer.personalize import (DEFAULT_INIT_WORD, DEFAULT_METHOD, DEFAULT_TRIGGER, DREAMBOOTH_IDENTIFIER, METHODS,
                                   PersonalizeConfig, trains_unet, uses_token)
from ..trainer.plot import render_loss_plot
from .domainstudio import PREVIEW_EVERY, _resolve_images, _to_pil
from .types import CATEGORY, training_inputs

log = logging.getLogger("DomainStudio")

NODE = "Personalize"


class PersonalizeTrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DomainStudio_Personalize",
            display_name="Personalize (rare token / TI / DreamBooth)",
            category=CATEGORY,
            description="Learns one subject from 3-5 photos. rare_token (default, arXiv 2407.05312): textual "
            "inversion of a new token started from a rare adjective, then a UNet fine-tune without prior "
            "preservation. textual_inversion and dreambooth(_no_prior) are the baselines. Use the token in a "
            "stock CLIP Text Encode: 'a photo of ds_subject dog' or 'embedding:ds_subject'.",
            inputs=[
                *training_inputs(),
                io.Combo.Input("method", options=list(METHODS), default=DEFAULT_METHOD,
                               tooltip="rare_token: token then UNet (no prior). textual_inversion: token only. "
                               "dreambooth: UNet with prior preservation on class images. dreambooth_no_prior."),
                io.String.Input("class_noun", default="dog", tooltip="What the subject is, e.g. 'dog', 'backpack'."),
                io.String.Input("new_token", default=DEFAULT_TRIGGER,
                                tooltip="rare_token / textual_inversion: the new word to learn; also the embedding "
                                "file name. Must not be a word CLIP already knows."),
                io.String.Input("init_word", default=DEFAULT_INIT_WORD,
                                tooltip="rare_token: the rare adjective the token's vectors start from."),
                io.Int.Input("num_vectors", default=1, min=1, max=16, tooltip="Vectors per token (1-4 typical)."),
                io.String.Input("dreambooth_identifier", default=DREAMBOOTH_IDENTIFIER,
                                tooltip="dreambooth: the existing rare word that names the subject."),
                io.Int.Input("ti_steps", default=500, min=1, max=100000, tooltip="Token (stage 1) steps."),
                io.Float.Input("ti_learning_rate", default=5e-3, min=0.0, max=10.0, step=1e-5),
                io.Int.Input("unet_steps", default=400, min=1, max=100000,
                             tooltip="UNet steps (DreamBooth quality falls when over-trained: 200-800)."),
                io.Float.Input("unet_learning_rate", default=1e-4, min=0.0, max=1.0, step=1e-7,
                               tooltip="1e-4 suits LoRA; full fine-tuning wants ~5e-6."),
                io.Combo.Input("train_mode", options=list(host.TRAIN_MODES), default="lora_attn"),
                io.Int.Input("lora_rank", default=8, min=1, max=256),
                io.Float.Input("lora_alpha", default=8.0, min=0.01, max=1024.0, step=0.01),
                io.Int.Input("class_images", default=100, min=1, max=2000,
                             tooltip="dreambooth: class images the source model generates from 'a photo of "
                             "<class>' (cached while inputs stay the same)."),
                io.Float.Input("lambda_prior", default=1.0, min=0.0, max=1e6, step=0.01),
                io.Int.Input("batch_size", default=1, min=1, max=64),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=8,
                             tooltip="Used only for a plain IMAGE input; an image set keeps its own."),
                io.Int.Input("train_seed", default=0, min=0, max=0xFFFFFFFF,
                             tooltip="Deliberately not auto-randomised: a new seed retrains on every queue."),
                io.Combo.Input("precision", options=["fp32", "bf16"], default="fp32"),
                io.String.Input("save_name", default="subject",
                                tooltip="UNet delta file stem in models/loras (numbered, never overwritten); the "
                                "embedding is saved as models/embeddings/<new_token>.safetensors. Empty = don't save."),
            ],
            outputs=[
                io.Model.Output("personal_model", display_name="model",
                                tooltip="Patched copy of the input (unchanged for textual_inversion)."),
                io.Clip.Output("personal_clip", display_name="clip",
                               tooltip="Copy of the input CLIP whose prompts understand the new token."),
                io.String.Output("prompt", display_name="prompt", tooltip="The instance prompt, e.g. 'a photo of ds_subject dog'."),
                io.LoraModel.Output("delta", display_name="delta", tooltip="UNet delta (kohya keys); empty for textual_inversion."),
                io.Image.Output("loss_plot", display_name="loss_plot"),
                io.String.Output("saved", display_name="saved", tooltip="Saved file paths, one per line."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, method, class_noun, new_token, init_word, num_vectors, dreambooth_identifier,
                ti_steps, ti_learning_rate, unet_steps, unet_learning_rate, train_mode, lora_rank, lora_alpha,
                class_images, lambda_prior, batch_size, resolution, train_seed, precision, save_name,
                image_set=None, images=None) -> io.NodeOutput:
        image_set = _resolve_images(image_set, images, resolution, NODE, min_images=1)
        cfg = PersonalizeConfig(
            method=method, class_noun=class_noun,
            trigger=new_token if uses_token(method) else dreambooth_identifier,
            init_word=init_word, num_vectors=num_vectors, ti_steps=ti_steps, ti_learning_rate=ti_learning_rate,
            unet_steps=unet_steps, unet_learning_rate=unet_learning_rate, batch_size=batch_size,
            lambda_prior=lambda_prior, seed=train_seed)
        try:
            for w in cfg.validate(len(image_set)):
                log.warning("Personalize: %s", w)
            phost.check_trigger(clip, cfg)
        except TrainingError as e:
            raise ValueError(f"{NODE}: {e}") from None

        n_prior = class_images if method == "dreambooth" and lambda_prior > 0 else 0
        total = n_prior + (ti_steps if uses_token(method) else 0) + (unet_steps if trains_unet(method) else 0)
        pbar = comfy.utils.ProgressBar(total)
        prior = None
        if n_prior:
            log.info("Personalize: generating %d class images from %r", n_prior, cfg.class_prompt())
            prior = host.generate_class_latents(model, clip, cfg.class_prompt(), n_prior, image_set.resolution,
                                                train_seed, progress=lambda i: pbar.update_absolute(i))

        history: dict[str, list[float]] = {}
        done = [n_prior]

        def on_step(stage, step, loss):
            series = history.setdefault(f"{stage} loss", [])
            series.append(loss)
            done[0] += 1
            preview = None
            if step % PREVIEW_EVERY == 0:
                preview = ("JPEG", _to_pil(render_loss_plot(history, title=f"{method}: {stage} step {step}")), 512)
            pbar.update_absolute(done[0], total, preview)  # raises if the user pressed Cancel
            if step == 1 or step % 50 == 0:
                log.info("Personalize %s step %d: loss %.4f", stage, step, loss)

        try:
            out = phost.train_personalization_comfy(
                model, clip, vae, image_set.images, cfg, train_mode=train_mode, rank=lora_rank, alpha=lora_alpha,
                prior_latents=prior, precision=precision, on_step=on_step)
        except TrainingError as e:
            raise ValueError(f"{NODE}: {e}") from None
        for s in out.stages:
            log.info("Personalize %s: %d steps in %.1f s (%.3f s/step)", s.name, s.steps_done, s.seconds,
                     s.seconds_per_step)

        saved = []
        if save_name.strip():
            family = host.model_family(model)
            training = {**cfg.__dict__, "train_mode": train_mode, "lora_rank": lora_rank, "lora_alpha": lora_alpha,
                        "class_images": n_prior, "precision": precision, "images": len(image_set),
                        "resolution": image_set.resolution,
                        "seconds": {s.name: round(s.seconds, 3) for s in out.stages}}
            common = dict(family=family, method=method, training=training, fingerprint=host.fingerprint(model),
                          resolution=image_set.resolution, dtype=host.SAVE_DTYPE)
            try:
                if out.vectors is not None:
                    meta = deltas.build_metadata(kind="embedding", title=cfg.trigger.strip(), trigger=cfg.trigger.strip(),
                                                 steps=cfg.ti_steps, learning_rate=ti_learning_rate, **common)
                    saved.append(_save_embedding(out.vectors, cfg.trigger.strip(), meta))
                if out.delta is not None:
                    is_lora = train_mode.startswith("lora")
                    meta = deltas.build_metadata(
                        kind="lora" if is_lora else "diff", title=save_name.strip(), rank=lora_rank if is_lora else None,
                        alpha=lora_alpha if is_lora else None, trigger=cfg.instance_prompt(), steps=cfg.unet_steps,
                        learning_rate=unet_learning_rate, **common)
                    folder = folder_paths.get_folder_paths("loras")[0]
                    saved.append(deltas.save_delta(deltas.unique_path(folder, save_name.strip()), out.delta, meta))
            except deltas.WeightFileError as e:
                raise ValueError(f"{NODE}: saving failed ({e}); files listed as saved before it: {saved}") from None
            for p in saved:
                log.info("Personalize: saved %s", p)
        plot = render_loss_plot({f"{s.name} loss": s.history["loss"] for s in out.stages} or {"loss": []},
                                title=f"{method} loss")
        return io.NodeOutput(out.model, out.clip, cfg.instance_prompt(), out.delta or {}, plot, "\n".join(saved))


def _save_embedding(vectors, token: str, meta: dict) -> str:
    """models/embeddings/<token>.safetensors (the file name is the trigger word in A1111 and the
    NAME of ComfyUI's embedding:NAME); numbered instead if that name is taken."""
    folder = folder_paths.get_folder_paths("embeddings")[0]
    path = os.path.join(folder, f"{token}.safetensors")
    if os.path.exists(path):
        path = deltas.unique_path(folder, token)
        log.warning("Personalize: embeddings/%s.safetensors exists; saved as %s (prompt with embedding:%s)",
                    token, os.path.basename(path), os.path.splitext(os.path.basename(path))[0])
    return embeddings.save_embedding(path, vectors, meta)
