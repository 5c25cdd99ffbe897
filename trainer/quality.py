"""An after-training quality report: did the adaptation keep diversity, copy the training images,
or drift the class? Computed in the run from samples of the source and the adapted model on the
same seeds, in a feature space available without any download.

* diversity: mean pairwise cosine distance between samples (the source model's samples of the
  source prompt vs the adapted model's of the target prompt); the ratio adapted / source says
  whether diversity was kept (DomainStudio's aim) or collapsed (plain fine-tuning's failure); no
  ratio is given when the source's own samples are near-identical (DIVERSITY_FLOOR);
* copying: mean distance from each adapted sample to its nearest training image, next to the same
  for the source model's samples (lower than the source's = closer to copies of the shots);
* drift (personalization): mean paired distance between the source and the adapted model's samples
  of the plain class prompt ("a photo of dog") on the same seeds (language drift; 0 = unchanged);
* fine detail: mean high-pass energy of the decoded samples (pixels, any feature space), the
  signature of over-training: a model pushed too far draws the subject as coloured fragments or
  noise shaped like it. Adapted samples with DETAIL_WARN x the source's detail on the same seeds
  *and* more than the training images themselves have are flagged (see detail_warning).

Feature spaces: a CLIP vision model the user connects (its image embeddings: semantic, the usual
stand-in for perceptual similarity), else the VAE's latent space average-pooled to 8x8 (colour and
layout only: it cannot tell content or style apart, and distances are not comparable between models
with different VAEs). The numbers come from a handful of samples: they flag a collapse or a copy,
they are not a benchmark (bench/ has those).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


# Below this mean pairwise cosine distance (VAE-latent space) the source draws one picture for every
# seed, and a ratio to it measures variation the source never had, not diversity kept: the miniature
# asked for "a photo of tree" (the personalization benchmark's palm tree through dstrain) drew the same
# tree on every seed, 0.001, and the report printed a ratio of 268. bench/diversity_floor.py: 40 of 42
# one-concept prompts of the miniature ("an emoji of kite", "a photo of dog") lie at 0.0005-0.0098
# (median 0.0023), its varied domain prompt "an emoji" at 0.34. Such small values are not noise
# (two disjoint sets of 8 seeds agree within 8 %, median), so the floor is about meaning, not
# precision. In an image encoder's space the same near-identical samples read larger (Lite0, the
# benchmarks' stand-in for a CLIP vision model: 0.014-0.21, median 0.034), so there it rarely applies.
DIVERSITY_FLOOR = 0.01


@dataclass
class QualityReport:
    space: str
    samples: int
    diversity_source: float
    diversity_adapted: float
    copy_source: float
    copy_adapted: float
    drift: float | None = None
    detail_source: float = float("nan")
    detail_adapted: float = float("nan")
    detail_training: float = float("nan")
    grid: torch.Tensor | None = None  # IMAGE [1, H, W, 3]
    prompt_adapted: str | None = None  # what each model was asked for (report_prompts)
    prompt_source: str | None = None

    @property
    def diversity_ratio(self) -> float:
        """adapted / source; NaN when the source's samples are near-identical (see DIVERSITY_FLOOR)."""
        if not self.diversity_source >= DIVERSITY_FLOOR:
            return float("nan")
        return self.diversity_adapted / self.diversity_source

    def as_dict(self) -> dict:
        """The numbers for a JSON record; a value that is not finite (not measured, or a ratio without
        meaning) is None, so the file stays strict JSON."""
        d = {"space": self.space, "samples": self.samples, "diversity_source": self.diversity_source,
             "diversity_adapted": self.diversity_adapted, "diversity_ratio": self.diversity_ratio,
             "copy_source": self.copy_source, "copy_adapted": self.copy_adapted, "drift": self.drift,
             "detail_source": self.detail_source, "detail_adapted": self.detail_adapted,
             "detail_training": self.detail_training, "prompt_adapted": self.prompt_adapted,
             "prompt_source": self.prompt_source}
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in d.items()}

    def diversity_line(self) -> str:
        head = f"  diversity: adapted {self.diversity_adapted:.3f} vs source {self.diversity_source:.3f} "
        if math.isfinite(self.diversity_ratio):
            return head + f"(ratio {self.diversity_ratio:.2f}; < 0.5 suggests a collapse towards the training images)"
        return head + (f"(no ratio: the source's samples are near-identical, below {DIVERSITY_FLOOR}, so a ratio to "
                       "them says nothing; compare the source and adapted rows of the report image)")

    def text(self) -> str:
        lines = [f"quality report ({self.samples} samples per model, {self.space} features):",
                 self.diversity_line(),
                 f"  distance to the nearest training image: adapted {self.copy_adapted:.3f} vs source "
                 f"{self.copy_source:.3f} (much lower than the source suggests copying)"]
        if self.drift is not None:
            lines.append(f"  class-prompt drift: {self.drift:.3f} (0 = the class looks as before; large = the "
                         "class word was overwritten)")
        lines.append(f"  fine detail (pixels): adapted {self.detail_adapted:.4f} vs source {self.detail_source:.4f}, "
                     f"training images {self.detail_training:.4f} (far above both suggests over-training damage)")
        if self.prompt_adapted is not None:
            lines.append(f"  prompts: adapted {self.prompt_adapted!r}, source {self.prompt_source!r}")
        lines.append("  caveat: a few samples in a proxy feature space flag problems, they do not measure quality")
        return "\n".join(lines)


# The health check on the loss history (no sampling needed). The denoising term of a healthy run
# stays near its start or falls (noisy: every step draws new noise levels); in the miniature
# benchmark (bench/frontier.py) every run whose samples "changed style" at lr 1e-3 had its
# denoising loss 7-9x above its first 50 steps: the model was breaking down, not adapting.
DENOISING_TERMS = ("simple", "instance")
RISE_WINDOW = 50  # recorded steps averaged at each end
RISE_WARN = 3.0


def denoising_rise(history: dict[str, list[float]]) -> float | None:
    """Mean of the denoising term over the last RISE_WINDOW recorded steps divided by its mean over
    the first RISE_WINDOW; None when the stage has no denoising term or too few steps."""
    term = next((k for k in DENOISING_TERMS if k in history), None)
    vals = [v for v in history.get(term, ()) if math.isfinite(v)] if term else []
    if len(vals) < 2 * RISE_WINDOW:
        return None
    first = sum(vals[:RISE_WINDOW]) / RISE_WINDOW
    last = sum(vals[-RISE_WINDOW:]) / RISE_WINDOW
    return last / first if first > 0 else None


def rise_warning(stage_name: str, history: dict[str, list[float]], lr_setting: str) -> str | None:
    """A warning for a stage whose denoising loss rose RISE_WARN times or more, naming the setting."""
    rise = denoising_rise(history)
    if rise is None or rise < RISE_WARN:
        return None
    return (f"{stage_name}: the denoising loss of the last {RISE_WINDOW} steps is {rise:.1f}x that of the first "
            f"{RISE_WINDOW}: the model is likely breaking down rather than adapting (what looks changed may be "
            f"damage). Lower {lr_setting} (e.g. by 3x) or the steps.")


# The damage check on the samples. In the personalization runs on the miniature (bench/damage_check.py
# over bench/results/personalize_sweep_lr_gpu.json and personalize_quality_gpu.json) the subjects
# that came out as coloured fragments had 1.4-2.1x the source's fine detail on the same seeds; no
# run at a UNet lr <= 3e-5 and no textual inversion passed 1.31x. 1.5 flags only lr-1e-4 runs there.
DETAIL_WARN = 1.5


def fine_detail(images: torch.Tensor) -> float:
    """Mean |x - box3x3(x)| over pixels and channels (edge-padded) of IMAGE [N, H, W, C] in 0..1."""
    x = images.float().movedim(-1, 1)
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return float((x - blur).abs().mean())


def detail_warning(source: float, adapted: float, training: float, lr_setting: str, steps_setting: str) -> str | None:
    """A warning when the adapted samples carry DETAIL_WARN x the source's fine detail and more than
    the training images: sharper than both the model before and everything it was shown is damage,
    not adaptation (a style that is really crisper than the source's raises the training images'
    detail too)."""
    if not (math.isfinite(source) and math.isfinite(adapted) and source > 0):
        return None
    if adapted < DETAIL_WARN * source or (math.isfinite(training) and adapted <= training):
        return None
    return (f"the adapted samples carry {adapted / source:.1f}x the fine detail of the source's on the same seeds "
            f"({adapted:.4f} vs {source:.4f}; training images {training:.4f}): the subject or style is likely "
            f"breaking into fragments or noise (over-training). Look at the report image; if so, lower "
            f"{lr_setting} (e.g. 3x) or {steps_setting}.")


def latent_features(latents: torch.Tensor) -> torch.Tensor:
    """Model-space latents [N, C, h, w] -> [N, C*64] (average-pooled to 8x8)."""
    return F.adaptive_avg_pool2d(latents.float(), 8).flatten(1)


def cosine_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = F.normalize(a.float().flatten(1), dim=1)
    b = F.normalize(b.float().flatten(1), dim=1)
    return (1 - a @ b.T).clamp(min=0)


def mean_pairwise(f: torch.Tensor) -> float:
    n = f.shape[0]
    if n < 2:
        return float("nan")
    d = cosine_distances(f, f)
    return float(d.sum() / (n * (n - 1)))


def report_prompts(prompts) -> tuple[str, str]:
    """(adapted, source) prompts of the report: what the user types afterwards, and the source
    model's counterpart. With per-image captions both are the templates without '{caption}' ("a sks
    emoji of" / "an emoji of"), so the two models draw the same kind of prompt: the source's prompt
    of the first image alone would compare one emoji's near-identical samples with a varied set.
    Personalization compares the instance prompt with the class prompt; plain fine-tuning (no
    source prompt) asks the source model for the adapted model's prompt."""
    target = prompts.usage or (prompts.target[0] if prompts.target else "")
    if prompts.class_prompt or len(set(prompts.source)) > 1:
        return target, prompts.class_prompt
    return target, prompts.source[0] if prompts.source else target


def report(host, prompts, x0: torch.Tensor, *, samples: int, resolution: int, seed: int, adapter=None, token=None,
           class_prompt: str | None = None, image_features: Callable | None = None, space: str = "",
           steps: int = 12, cfg: float = 5.0, training_images: torch.Tensor | None = None) -> QualityReport:
    """Sample `samples` seeds from the source (source prompt) and the adapted model (target prompt)
    and compare them. image_features(IMAGE) -> [N, D] replaces the latent features when given."""
    seeds = [seed + i for i in range(samples)]
    target, source = report_prompts(prompts)
    src = host.sample(source, seeds, resolution=resolution, steps=steps, cfg=cfg)
    ada = host.sample(target, seeds, resolution=resolution, steps=steps, cfg=cfg, adapter=adapter, token=token)
    drift_pair = None
    if class_prompt:
        before = host.sample(class_prompt, seeds, resolution=resolution, steps=steps, cfg=cfg)
        after = host.sample(class_prompt, seeds, resolution=resolution, steps=steps, cfg=cfg, adapter=adapter,
                            token=token)
        drift_pair = (before, after)
    # each drift sample decoded once: the adapted one is shown in the grid, the source one only
    # needed when the features are an image encoder's
    drift_img = None if drift_pair is None else (
        host.decode_images(drift_pair[0]) if image_features is not None else None, host.decode_images(drift_pair[1]))
    src_img, ada_img = host.decode_images(src), host.decode_images(ada)
    train_img = training_images if training_images is not None else host.decode_images(x0)
    if image_features is not None:
        feats = image_features
        f_train = feats(train_img)
        f_src, f_ada = feats(src_img), feats(ada_img)
        label = space or "image-encoder"
    else:
        f_train, f_src, f_ada = latent_features(x0), latent_features(src), latent_features(ada)
        label = "VAE-latent"
    drift = None
    if drift_pair is not None:
        if image_features is not None:
            fb, fa = image_features(drift_img[0]), image_features(drift_img[1])
        else:
            fb, fa = latent_features(drift_pair[0]), latent_features(drift_pair[1])
        drift = float(cosine_distances(fb, fa).diagonal().mean())
    rep = QualityReport(
        space=label, samples=samples,
        diversity_source=mean_pairwise(f_src), diversity_adapted=mean_pairwise(f_ada),
        copy_source=float(cosine_distances(f_src, f_train).min(dim=1).values.mean()),
        copy_adapted=float(cosine_distances(f_ada, f_train).min(dim=1).values.mean()),
        drift=drift, detail_source=fine_detail(src_img), detail_adapted=fine_detail(ada_img),
        detail_training=fine_detail(train_img), prompt_adapted=target, prompt_source=source)
    from .grids import labelled_rows

    rows = [(train_img[:samples], "training"), (src_img, "source"), (ada_img, "adapted")]
    if drift_pair is not None:
        rows.append((drift_img[1], "class, adapted"))
    rep.grid = labelled_rows(rows)
    return rep
