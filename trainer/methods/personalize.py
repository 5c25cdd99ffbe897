"""Subject personalization from 3-5 images: the rare-token two-stage method (Zeng, Suganuma,
Okatani, arXiv 2407.05312) and its baselines, Textual Inversion (Gal et al.) and DreamBooth (Ruiz
et al.), with and without prior preservation.

  rare_token          stage 1: textual inversion of a new token whose vectors start from a rare
                      adjective's embedding, prompts "a photo of <token> <class>" (several
                      templates); stage 2: fine-tune the UNet on the instance prompt with the text
                      encoder and the learned vectors frozen, no prior preservation.
  textual_inversion   stage 1 only, prompts "a photo of <token>", vectors start from the class noun.
  dreambooth          UNet fine-tune on "a photo of sks <class>" plus the prior-preservation loss
                      on class images the source model made from "a photo of <class>".
  dreambooth_no_prior the same without the prior term.

Every stage is the plain denoising objective (methods/denoising.py); what differs is what is
trained (token vectors or the UNet delta), the prompts, and the prior term.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import SettingError, TrainingError
from ..settings import setting
from .base import Method, Prompts, Stage
from .denoising import DenoisingObjective

# A rare adjective that is one token in CLIP's vocabulary (BPE id 45976 of 49408: a late, rarely
# merged word), so it brings little prior meaning while reading as a modifier of the class noun.
DEFAULT_INIT_WORD = "quaint"
DEFAULT_TOKEN = "ds_subject"
DREAMBOOTH_IDENTIFIER = "sks"  # the identifier of the diffusers DreamBooth recipe

# Stage-1 prompt templates; "{}" is the subject phrase ("<token> <class>" or "<token>").
TEMPLATES = (
    "a photo of {}",
    "a photo of the {}",
    "a close-up photo of {}",
    "a bright photo of the {}",
    "a cropped photo of the {}",
    "a good photo of {}",
    "a rendering of {}",
    "a photo of one {}",
)
INSTANCE_TEMPLATE = TEMPLATES[0]

_WORD = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")


@dataclass
class PersonalizeConfig:
    class_noun: str = setting("dog", "What the subject is, e.g. 'dog', 'backpack'.")
    new_token: str = setting(DEFAULT_TOKEN, "rare_token / textual_inversion: the new word to learn; also the "
                             "embedding's file name. Must not be a word CLIP already knows.", flag="--token")
    ti_steps: int = setting(500, "Token (stage 1) steps.", min=1, max=100000)
    unet_steps: int = setting(400, "UNet steps (DreamBooth quality falls when over-trained: 200-800).",
                              min=1, max=100000)
    ti_learning_rate: float = setting(5e-3, "Learning rate of the token vectors.", min=1e-8, max=10.0, step=1e-5,
                                      advanced=True, flag="--ti-lr")
    unet_learning_rate: float = setting(1e-4, "UNet learning rate: 1e-4 suits LoRA; full fine-tuning wants ~5e-6.",
                                        min=1e-8, max=1.0, step=1e-7, flag="--unet-lr")
    init_word: str = setting(DEFAULT_INIT_WORD, "rare_token: the rare adjective the token's vectors start from.",
                             advanced=True)
    num_vectors: int = setting(1, "Vectors per token (1-4 typical).", min=1, max=16, advanced=True)
    dreambooth_identifier: str = setting(DREAMBOOTH_IDENTIFIER, "dreambooth: the existing rare word that names the "
                                         "subject.", advanced=True, flag="--identifier")
    class_images: int = setting(100, "dreambooth: class images the source model generates from 'a photo of "
                                "<class>' (cached while the inputs stay the same).", min=1, max=2000, advanced=True)
    lambda_prior: float = setting(1.0, "dreambooth: weight of the prior-preservation loss.", min=0.0, max=1e6,
                                  step=0.01, advanced=True)
    batch_size: int = setting(1, "Images per step.", min=1, max=64, advanced=True)


def subject_phrase(trigger: str, class_noun: str, token_only: bool) -> str:
    t, c = trigger.strip(), class_noun.strip()
    return t if token_only or not c else f"{t} {c}"


class _Personalize(Method):
    node = "subject"
    config = PersonalizeConfig
    min_images = 1
    # The nearly clean quarter of the schedule (t < 250) stays the source model's: trained on 3-5 photos,
    # those steps learn the photos' fine detail, which subjects unlike anything the model draws come out
    # of as coloured fragments (README, Personalize: "Which noise levels ...").
    option_defaults = {"min_timestep": 250}
    token_only_prompts = False  # textual inversion names the token alone

    def trigger(self, cfg: PersonalizeConfig) -> str:
        return (cfg.new_token if self.uses_token else cfg.dreambooth_identifier).strip()

    def num_vectors(self, cfg: PersonalizeConfig) -> int:
        return cfg.num_vectors

    def validate(self, cfg: PersonalizeConfig, n_images: int) -> list[str]:
        if n_images < 1:
            raise TrainingError("no training images: connect 3-5 photos of the subject")
        super().validate(cfg, n_images)
        if cfg.batch_size > n_images:
            raise SettingError("batch_size", cfg.batch_size, f"only {n_images} image(s); use at most {n_images}")
        trigger = self.trigger(cfg)
        name = "new_token" if self.uses_token else "dreambooth_identifier"
        if not trigger:
            raise SettingError(name, trigger, f"give a word to call the subject by, e.g. {DEFAULT_TOKEN!r} (or "
                               f"{DREAMBOOTH_IDENTIFIER!r} for DreamBooth)")
        if self.uses_token and not _WORD.match(trigger):
            raise SettingError(name, trigger, "use one word of letters, digits, '_' or '-', starting with a letter (it "
                               "becomes the embedding's file name and the word you type in prompts)")
        if self.uses_token and trigger.lower().startswith("embedding"):
            raise SettingError(name, trigger, "it must not start with 'embedding' (ComfyUI's prompt syntax)")
        warnings = []
        if n_images == 1:
            warnings.append("only 1 training image: the subject will be learned from a single view and the model will "
                            "tend to copy that photo; 3-5 photos with varied backgrounds work better")
        return warnings

    def prompts(self, cfg: PersonalizeConfig, captions) -> Prompts:
        subject = subject_phrase(self.trigger(cfg), cfg.class_noun, self.token_only_prompts)
        instance = INSTANCE_TEMPLATE.format(subject)
        return Prompts(target=[instance], source=[], class_prompt=INSTANCE_TEMPLATE.format(cfg.class_noun.strip()),
                       templates=[t.format(subject) for t in TEMPLATES], usage=instance)

    def token_stage(self, cfg: PersonalizeConfig) -> Stage:
        return Stage("token", "token", cfg.ti_steps, cfg.ti_learning_rate, 0,
                     lambda inputs: DenoisingObjective(inputs, inputs.prompts.templates, cfg.batch_size),
                     lr_setting="ti_learning_rate", steps_setting="ti_steps")

    def unet_stage(self, cfg: PersonalizeConfig, lambda_prior: float = 0.0) -> Stage:
        def objective(inputs):
            return DenoisingObjective(inputs, inputs.prompts.target[:1], cfg.batch_size, lambda_prior=lambda_prior,
                                      prior_prompt=inputs.prompts.class_prompt)
        return Stage("unet", "unet", cfg.unet_steps, cfg.unet_learning_rate, 1, objective,
                     lr_setting="unet_learning_rate", steps_setting="unet_steps")


class RareToken(_Personalize):
    name = "rare_token"
    title = "Rare-token personalization"
    uses_token = True

    def validate(self, cfg: PersonalizeConfig, n_images: int) -> list[str]:
        warnings = super().validate(cfg, n_images)
        if not cfg.class_noun.strip():
            raise SettingError("class_noun", cfg.class_noun, "the rare-token method prompts '<token> <class>'; name the "
                               "class, e.g. 'dog'")
        if not _WORD.match(cfg.init_word.strip() or "-"):
            raise SettingError("init_word", cfg.init_word, f"give one word the vectors start from, e.g. "
                               f"{DEFAULT_INIT_WORD!r}")
        return warnings

    def init_word(self, cfg: PersonalizeConfig) -> str:
        return cfg.init_word.strip()

    def stages(self, cfg: PersonalizeConfig) -> list[Stage]:
        return [self.token_stage(cfg), self.unet_stage(cfg)]


class TextualInversion(_Personalize):
    name = "textual_inversion"
    title = "Textual Inversion"
    uses_token = True
    trains_unet = False
    token_only_prompts = True

    def init_word(self, cfg: PersonalizeConfig) -> str:
        """Gal et al. start from a coarse descriptor of the concept: the class noun (else the adjective)."""
        return cfg.class_noun.strip() or cfg.init_word.strip()

    def stages(self, cfg: PersonalizeConfig) -> list[Stage]:
        return [self.token_stage(cfg)]


class DreamBooth(_Personalize):
    name = "dreambooth"
    title = "DreamBooth with prior preservation"

    def validate(self, cfg: PersonalizeConfig, n_images: int) -> list[str]:
        warnings = super().validate(cfg, n_images)
        if cfg.lambda_prior > 0 and not cfg.class_noun.strip():
            raise SettingError("class_noun", cfg.class_noun, "DreamBooth with prior preservation needs the class noun "
                               "(e.g. 'dog') to make the class prompt 'a photo of dog'; or choose dreambooth_no_prior")
        return warnings

    def class_images(self, cfg: PersonalizeConfig) -> int:
        return cfg.class_images if cfg.lambda_prior > 0 else 0

    def stages(self, cfg: PersonalizeConfig) -> list[Stage]:
        return [self.unet_stage(cfg, lambda_prior=cfg.lambda_prior)]


class DreamBoothNoPrior(_Personalize):
    name = "dreambooth_no_prior"
    title = "DreamBooth without prior preservation"

    def stages(self, cfg: PersonalizeConfig) -> list[Stage]:
        return [self.unet_stage(cfg)]
