"""Domain-driven quality in the miniature SD world (miniworld/): adapt the emoji model, trained on
Google's Noto style, to 10 shots of another emoji style with each method on the pack's core
(trainer.run.run over a ComfyHost), sample it with ComfyUI's stock sampler, and measure what the
DomainStudio paper cares about in EfficientNet-Lite0 feature space (bench/features.py).

    eval "$(bash .ci/setup.sh | tail -2)"
    $DS_VENV/bin/python bench/domain_quality.py                       # 7 recipes x 3 seeds, Twemoji
    $DS_VENV/bin/python bench/domain_quality.py --style openmoji --seeds 0 --recipes base finetune domainstudio

This module is also the library of bench/frontier.py and scripts/demo.py: the target-style world
(`World`: shots, splits, real-image features, the style classifier, scoring), the recipes (`RECIPES`:
a registered method + settings + run options), training with samples at intermediate steps (`Bench.train`)
and batched stock sampling (`Bench.sample`).

Setting: text-conditional with per-image captions, the paper's "a [V] house" vs "a house" for a
domain: each shot is captioned with its emoji's name, the adapted model learns it as
"a sks emoji of <name>" and the frozen source model sees "an emoji of <name>" (both in the
miniature's caption distribution: it was trained on "a <filler> emoji of <name>"; a bare
"a sks emoji" draws shapeless blobs even before adaptation). Every recipe trains with the methods'
own defaults unless it says otherwise (LoRA on the attention layers, rank 8: the pack's RunOptions
defaults), the same steps, batch and seeds. Fixed splits (seed 0) of the 1,391 concepts: 10 shots
and 24 evaluation emoji among the concepts the base model was trained on (so their names mean
something to it), the rest for the style classifier. Each model draws "a sks emoji of <name>" once
per evaluation name (the same noise for every model). Metrics, all on Lite0 features (1280-d,
cosine distance):

* style        mean P(target style) of the samples under a logistic-regression classifier trained on
               the Google vs target renderings of the classifier split (its accuracy on the
               evaluation emoji's real renderings is reported);
* diversity    intra-cluster diversity, the Intra-LPIPS recipe with Lite0 cosine distance: each
               sample is assigned to its nearest shot, mean pairwise distance inside each cluster
               (<= 50 members), averaged over clusters with >= 2 members (copying the shots scores 0);
* shot_dist    mean distance from each sample to its nearest shot (lower = closer to copies);
* content_dist mean distance from each sample to the real target-style rendering of the emoji it
               names (right content in the target style; lower is better);
* kid_target   Kernel Inception Distance (unbiased) of the samples to the real target renderings of
               the classifier split (lower = closer to the target domain). Samples that are neither
               style (garbage) can score a high style probability: KID and content_dist catch that.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import platform
import runpy
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
if "comfyui_domainstudio" not in sys.modules:  # the pack (and its miniworld) under its one name
    runpy.run_path(os.path.join(REPO, "__init__.py"))

from comfyui_domainstudio.trainer.grids import labelled_rows, save_png, tile_rows, to_uint8  # noqa: E402


def bench_module(name: str):
    """A sibling bench/<name>.py, loaded once as `bench_<name>` (every script shares that copy)."""
    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, os.path.join(BENCH, f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[key]
            raise
    return sys.modules[key]


TARGET_PROMPT, SOURCE_PROMPT = "a sks emoji of {caption}", "an emoji of {caption}"
EVAL_TEMPLATE = "a sks emoji of {name}"
CLASS_PROMPT = "an emoji"  # DreamBooth's class prompt for the domain
N_SHOTS, N_EVAL = 10, 24


# ---------------------------------------------------------------------------------------------
# metrics (pure numpy; the distance is pluggable)
# ---------------------------------------------------------------------------------------------

def features(images: np.ndarray) -> np.ndarray:
    """[N, 64, 64, 3] in 0..1 -> [N, 768]: 16x16 area-downsampled RGB (the old pixel features; kept
    as a baseline the Lite0 features are compared with)."""
    n, h, w, c = images.shape
    return images.reshape(n, 16, h // 16, 16, w // 16, c).mean(axis=(2, 4)).reshape(n, -1).astype(np.float32)


def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """RMS distance between every row of a and of b."""
    return np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).mean(-1), 0.0))


def intra_cluster_diversity(samples: np.ndarray, shots: np.ndarray, max_members: int = 50, dist=None) -> float:
    """Assign each sample to its nearest shot; mean pairwise distance inside clusters with >= 2 members.
    `dist(a, b)` -> all-pairs distance matrix, default `distances` (RMS)."""
    dist = dist or distances
    nearest = dist(samples, shots).argmin(1)
    scores = []
    for k in range(len(shots)):
        members = samples[nearest == k][:max_members]
        if len(members) >= 2:
            d = dist(members, members)
            scores.append(d[np.triu_indices(len(members), 1)].mean())
    return float(np.mean(scores)) if scores else 0.0


def memorization(samples: np.ndarray, shots: np.ndarray, dist=None) -> float:
    """Mean distance from each sample to its nearest shot (lower = closer to copies)."""
    return float((dist or distances)(samples, shots).min(1).mean())


class StyleClassifier:
    """Logistic regression on standardised features: P(target style)."""

    def __init__(self, source: np.ndarray, target: np.ndarray, seed: int = 0):
        import torch

        x = np.concatenate([source, target])
        y = np.concatenate([np.zeros(len(source)), np.ones(len(target))]).astype(np.float32)
        self.mu, self.sd = x.mean(0), x.std(0) + 1e-3
        g = torch.Generator().manual_seed(seed)
        xt = torch.from_numpy((x - self.mu) / self.sd)
        yt = torch.from_numpy(y)
        self.w = torch.zeros(x.shape[1], requires_grad=True)
        self.b = torch.zeros((), requires_grad=True)
        opt = torch.optim.Adam([self.w, self.b], lr=0.01)
        for _ in range(400):
            idx = torch.randperm(len(xt), generator=g)[:256]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(xt[idx] @ self.w + self.b, yt[idx])
            loss = loss + 1e-3 * self.w.square().sum()
            opt.zero_grad()
            loss.backward()
            opt.step()

    def prob(self, feats: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            z = torch.from_numpy((np.asarray(feats, np.float32) - self.mu) / self.sd) @ self.w + self.b
        return torch.sigmoid(z).numpy()


def splits(n_concepts: int, train_idx: list[int], seed: int = 0) -> dict:
    """Fixed shot / evaluation / classifier splits. Shots and evaluation emoji are training concepts
    of the base model (so their names mean something to it); the classifier never sees either."""
    rng = np.random.default_rng(seed)
    known = rng.permutation(train_idx)
    shots, evals = sorted(known[:N_SHOTS].tolist()), sorted(known[N_SHOTS:N_SHOTS + N_EVAL].tolist())
    rest = sorted(set(range(n_concepts)) - set(shots) - set(evals))
    return {"shots": shots, "eval": evals, "classifier": rest}


def mean_sd(values) -> tuple[float, float]:
    vals = [float(v) for v in values]
    if not vals or any(math.isnan(v) for v in vals):
        return float("nan"), float("nan")
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


SUMMARY_KEYS = ("style", "diversity", "shot_dist", "content_dist", "kid_target", "train_s")


def summarize(rows: list[dict], recipes: list[str], keys=SUMMARY_KEYS) -> dict:
    """{recipe: {metric: (mean, sd over seeds)}}."""
    return {m: {k: mean_sd([r.get(k, float("nan")) for r in rows if r["recipe"] == m]) for k in keys}
            for m in recipes}


def print_table(rows: list[dict], recipes: list[str], title: str, log=print) -> dict:
    summary = summarize(rows, recipes)
    log(title)
    log(f"{'recipe':26s} {'style ↑':>13s} {'diversity ↑':>15s} {'shot dist ↑':>15s} {'content dist ↓':>15s} "
        f"{'KID→target ↓':>15s} {'train s':>8s}")
    for m in recipes:
        s = summary[m]

        def c(k, p=3):
            mu, sd = s[k]
            return f"{mu:{p + 4}.{p}f}±{sd:<{p + 2}.{p}f}"

        log(f"{m:26s} {c('style')} {c('diversity', 4)} {c('shot_dist', 4)} {c('content_dist', 4)} "
            f"{c('kid_target', 4)} {s['train_s'][0]:8.1f}")
    return summary


# ---------------------------------------------------------------------------------------------
# the world: source and target renderings, shots, real-image features, style classifier
# ---------------------------------------------------------------------------------------------

def cache_dir() -> str:
    from comfyui_domainstudio.miniworld import config

    d = os.path.join(config.cache_dir(), "bench")
    os.makedirs(d, exist_ok=True)
    return d


def cached_features(extract, images: np.ndarray, tag: str) -> np.ndarray:
    """Lite0 features of a real image set, cached on disk by content hash (real sets never change)."""
    arch = getattr(bench_module("features"), "ARCH", "features")
    key = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"features-{arch}-{tag}-{key}.npy")
    if os.path.exists(path):
        return np.load(path, allow_pickle=False)
    f = extract(images)
    np.save(path + ".tmp.npy", f)
    os.replace(path + ".tmp.npy", path)
    return f


class World:
    """The source (Google) and a target style of the same concepts, the fixed splits, the real
    renderings' Lite0 features, the style classifier, and the scoring of generated samples."""

    def __init__(self, style: str, extract, log=print, roundtrip=None):
        """`roundtrip` (uint8 images -> uint8 images through the model's VAE, e.g. Bench.roundtrip)
        adds a second classifier, trained on the round-tripped renderings (`style_rt`): the round
        trip alone takes the real-image classifier's score of real Twemoji from 0.92 to 0.57, so
        only style_rt spans what the miniature can express (bench/style_probe.py)."""
        from comfyui_domainstudio.miniworld import data

        styles = bench_module("emoji_styles")
        self.style, self.extract = style, extract
        self.source = styles.load("google")
        self.target = styles.load(style)
        if self.source["codes"] != self.target["codes"]:
            raise ValueError(f"the {style} set does not list the source's concepts")
        sp = splits(len(self.source["codes"]), data.train_indices(self.source))
        self.splits = sp
        self.names = self.source["names"]
        self.shots = self.target["images"][sp["shots"]]
        self.shot_names = [self.names[i] for i in sp["shots"]]
        self.eval_names = [self.names[i] for i in sp["eval"]]
        self.eval_target = self.target["images"][sp["eval"]]
        self.eval_source = self.source["images"][sp["eval"]]
        f_src = cached_features(extract, self.source["images"], "google")
        f_tgt = cached_features(extract, self.target["images"], style)
        self.f_shots = f_tgt[sp["shots"]]
        self.f_eval_target = f_tgt[sp["eval"]]
        self.prompts = [EVAL_TEMPLATE.format(name=n) for n in self.eval_names]
        self.f_cls_target, self.f_cls_source = f_tgt[sp["classifier"]], f_src[sp["classifier"]]
        self.clf = StyleClassifier(self.f_cls_source, self.f_cls_target)
        ok = np.concatenate([self.clf.prob(f_src[sp["eval"]]) < 0.5, self.clf.prob(f_tgt[sp["eval"]]) >= 0.5])
        self.classifier_accuracy = float(ok.mean())
        self.clf_rt = None
        feats = bench_module("features")
        if roundtrip is not None:
            cls = sp["classifier"]
            self.clf_rt = StyleClassifier(
                cached_features(extract, roundtrip(self.source["images"][cls]), "google-rt"),
                cached_features(extract, roundtrip(self.target["images"][cls]), f"{style}-rt"))
        self.reference = {
            "real_target_eval": self.score_features(self.f_eval_target),
            "real_source_eval": self.score_features(f_src[sp["eval"]]),
            "kid_source_vs_target": feats.kid(self.f_cls_source, self.f_cls_target),
        }
        if roundtrip is not None:
            self.reference["roundtrip_target_eval"] = self.score(roundtrip(self.eval_target))
            self.reference["roundtrip_source_eval"] = self.score(roundtrip(self.eval_source))
        log(f"world: {len(self.names)} concepts, source {self.source['package']} -> target {self.target['package']}; "
            f"shots {', '.join(self.shot_names)}; style classifier accuracy on held-out real renderings "
            f"{self.classifier_accuracy:.2f}")

    def describe(self) -> dict:
        return {"style": self.style, "source": self.source["package"], "target": self.target["package"],
                "shots": self.shot_names, "eval": self.eval_names,
                "classifier_accuracy_real": self.classifier_accuracy, "reference": self.reference}

    def score_features(self, f: np.ndarray) -> dict:
        """Metrics of features of samples drawn from `self.prompts` (one per evaluation emoji, in order)."""
        feats = bench_module("features")
        if len(f) != len(self.f_eval_target):
            raise ValueError(f"{len(f)} samples for {len(self.f_eval_target)} evaluation prompts")
        out = {"style": float(self.clf.prob(f).mean())}
        if self.clf_rt is not None:
            out["style_rt"] = float(self.clf_rt.prob(f).mean())
        return {**out,
                "diversity": intra_cluster_diversity(f, self.f_shots, dist=feats.cosine_distances),
                "shot_dist": memorization(f, self.f_shots, dist=feats.cosine_distances),
                "content_dist": float(np.diag(feats.cosine_distances(f, self.f_eval_target)).mean()),
                "kid_target": feats.kid(f, self.f_cls_target)}

    def score(self, samples: np.ndarray) -> dict:
        """Metrics of samples (uint8 [N, 64, 64, 3]) drawn from `self.prompts`."""
        return self.score_features(self.extract(samples))

    def training_set(self):
        """The shots as the core takes them: an ImageSet whose captions are the emoji names."""
        import torch

        from comfyui_domainstudio.trainer.imageset import ImageSet

        images = torch.from_numpy(self.shots.astype(np.float32) / 255.0)
        return ImageSet(images=images, names=list(self.shot_names), resolution=int(images.shape[1]), flipped=False,
                        warnings=[], captions=list(self.shot_names))


# ---------------------------------------------------------------------------------------------
# recipes: a registered method, its settings and run options
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """One way to adapt the model. `method` None = the base model, untouched. `config` and `options`
    override the method's defaults (trainer/methods/*) and RunOptions' (trainer/run.py)."""

    method: str | None
    config: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    note: str = ""
    # train on timesteps lo <= t < hi of the 1000-step schedule (higher = noisier) instead of all of
    # them: the run options min_timestep / max_timestep (a bench-only switch until 2026-12-05, drawn the
    # same way, so the frontier's earlier split runs reproduce)
    timesteps: tuple[int, int] | None = None

    def settings(self, steps: int | None = None, seed: int = 0, **extra_options):
        """(method config, RunOptions) for a run; steps None = the method's default."""
        from comfyui_domainstudio.trainer import settings
        from comfyui_domainstudio.trainer.run import RunOptions, default_options, resolve_config

        values = dict(self.config)
        if self.method in ("domainstudio", "finetune"):
            values.setdefault("target_prompt", TARGET_PROMPT)
        if self.method == "domainstudio":
            values.setdefault("source_prompt", SOURCE_PROMPT)
        if steps is not None:
            values["steps"] = int(steps)
        cfg = resolve_config(self.method, values)
        base = default_options(self.method) if self.method else RunOptions()
        span = {} if self.timesteps is None else {"min_timestep": self.timesteps[0], "max_timestep": self.timesteps[1]}
        opts = settings.replace(base, **{"train_seed": int(seed), "preview_every": 0, **span, **self.options,
                                         **extra_options})
        return cfg, opts


LAMBDAS_OFF = {"lambda_img": 0.0, "lambda_hf": 0.0, "lambda_hfmse": 0.0}
RECIPES: dict[str, Recipe] = {
    "base": Recipe(None, note="the source model, untouched"),
    "finetune": Recipe("finetune", note="plain fine-tuning (LoRA), the baseline"),
    "finetune_full": Recipe("finetune", {"learning_rate": 1e-5}, {"train_mode": "full_attn"},
                            note="plain fine-tuning of full attention weights"),
    "dreambooth_prior": Recipe("domainstudio", {**LAMBDAS_OFF, "prior_images": 20, "source_prompt": CLASS_PROMPT},
                               note="DreamBooth with prior for a domain: DomainStudio with every DomainStudio "
                                    "term off and 20 class images of 'an emoji' (the source prompt is only the "
                                    "class prompt then; the registry's dreambooth is a subject method: "
                                    "'a photo of sks <class>')"),
    "domainstudio": Recipe("domainstudio", note="DomainStudio, the method's defaults"),
    "domainstudio_no_pairwise": Recipe("domainstudio", {"lambda_img": 0.0}, note="without L_img"),
    "domainstudio_no_hf": Recipe("domainstudio", {"lambda_hf": 0.0, "lambda_hfmse": 0.0}, note="without L_hf, L_hfmse"),
    "domainstudio_pixel": Recipe("domainstudio", {"feature_space": "pixel"}, note="terms on decoded pixels"),
}
DEFAULT_RECIPES = ("base", "finetune", "finetune_full", "dreambooth_prior", "domainstudio",
                   "domainstudio_no_pairwise", "domainstudio_no_hf")


# ---------------------------------------------------------------------------------------------
# training and sampling on the core
# ---------------------------------------------------------------------------------------------

def bf16_supported() -> bool:
    """bf16 autocast is fast here: a CUDA GPU with bf16, or a CPU with AMX / AVX512-BF16."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


class Bench:
    """The miniworld checkpoint loaded once (ComfyUI on the CPU) behind the pack's ComfyHost."""

    def __init__(self, checkpoint: str | None = None, bf16: bool | None = None, sample_steps: int = 20,
                 cfg: float = 5.0, batch: int = 24):
        from comfyui_domainstudio.miniworld import build
        from comfyui_domainstudio.miniworld.comfyenv import comfy

        comfy()
        import comfy.sd
        import torch

        from comfyui_domainstudio.trainer.hosts.comfy import ComfyHost

        class _Host(ComfyHost):
            """ComfyHost that remembers the adapter a run trains (to sample it between steps)."""

            adapter = None

            def attach(self, *a, **k):
                self.adapter = super().attach(*a, **k)
                return self.adapter

        self.checkpoint = checkpoint or build.ensure()
        with torch.inference_mode():
            model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(self.checkpoint)
        self.model, self.clip, self.vae = model, clip, vae
        self.host = _Host(model, clip, vae)
        self.bf16 = bf16_supported() if bf16 is None else bf16
        self.sample_steps, self.cfg, self.batch = sample_steps, cfg, batch
        self._conds: dict = {}

    def describe(self) -> dict:
        import torch

        return {"checkpoint": os.path.basename(self.checkpoint), "sampler": "euler/normal",
                "sample_steps": self.sample_steps, "cfg": self.cfg, "negative": "",
                "compute": "bf16 autocast" if self.bf16 else "fp32", "torch": torch.__version__,
                "threads": torch.get_num_threads(), "platform": platform.platform()}

    def _cond(self, prompt: str):
        if prompt not in self._conds:
            self._conds[prompt] = self.host.conditioning(prompt)
        return self._conds[prompt]

    def roundtrip(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] through the checkpoint's VAE (ComfyUI's encode, decode), uint8 back: what
        the model could draw at best."""
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(images), 256):
                x = torch.from_numpy(images[i:i + 256, ..., :3].astype(np.float32) / 255.0)
                img = self.vae.decode(self.vae.encode(x))
                out.append(to_uint8(img.reshape(-1, *img.shape[-3:]).float().clamp(0, 1)))
        return np.concatenate(out)

    def patched(self, delta) -> object:
        """A MODEL with `delta` (kohya names) applied by ComfyUI's stock LoRA loader; None = base."""
        return self.model if not delta else self.host.export(delta, None).model

    def sample(self, model, prompts, n: int | None = None, seed: int = 0, progress=None) -> np.ndarray:
        """Stock ComfyUI sampling (euler/normal, CFG, empty negative) of one 64x64 image per prompt
        (`prompts` a list, or one prompt repeated `n` times), in batches of `self.batch`; batch b
        draws its noise from seed `seed + 1000 * b`, so every model gets the same noise. uint8
        [N, 64, 64, 3]. progress(steps_done) is called after every sampling step."""
        import comfy.sample
        import torch

        if isinstance(prompts, str):
            prompts = [prompts] * int(n)
        out, done = [], [0]
        neg = self._cond("")
        for b, i in enumerate(range(0, len(prompts), self.batch)):
            chunk = prompts[i:i + self.batch]
            conds = [self._cond(p) for p in chunk]
            if all(p == chunk[0] for p in chunk):
                pos = conds[0]
            else:
                pos = [[torch.cat([c[0][0] for c in conds]), dict(conds[0][0][1])]]
            latent = torch.zeros([len(chunk), 4, 8, 8])
            latent = comfy.sample.fix_empty_latent_channels(model, latent)
            noise = comfy.sample.prepare_noise(latent, seed + 1000 * b)

            def cb(step, x0, x, total, _done=done):
                _done[0] += 1
                if progress:
                    progress(_done[0])

            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                s = comfy.sample.sample(model, noise, self.sample_steps, self.cfg, "euler", "normal", pos, neg, latent,
                                        disable_pbar=True, seed=seed + 1000 * b, callback=cb)
            with torch.inference_mode():
                img = self.vae.decode(s.float())
            out.append(to_uint8(img.reshape(-1, *img.shape[-3:]).float().clamp(0, 1)))
        return np.concatenate(out)

    def train(self, recipe: Recipe, images, *, seed: int, steps: int | None = None,
              checkpoints=(), on_checkpoint=None, on_progress=None, precision: str | None = None) -> dict:
        """Train `recipe` on `images` (an ImageSet with captions, e.g. World.training_set()) with the
        core's run(); calls
        on_checkpoint(step, MODEL) at every step of `checkpoints` below `steps` (the live delta
        through the stock LoRA loader, between two pieces of the loop) and at the end (the run's
        exact delta). Returns {"train_s", "steps", "delta", "losses", "seconds_per_step"}."""
        import torch

        from comfyui_domainstudio.trainer import run as core

        steps_cfg, _ = recipe.settings(steps, seed)
        total = steps_cfg.steps
        stops = sorted({int(c) for c in checkpoints if 0 < int(c) < total})
        every = math.gcd(*stops) if stops else 0
        cfg, opts = recipe.settings(steps, seed, preview_every=every, preview_steps=1,
                                    precision=precision or ("bf16" if self.bf16 else "auto"))
        pending = set(stops)

        def progress(p):
            if on_progress is not None:
                on_progress(p)
            if p.message == "preview" and p.stage_step in pending and on_checkpoint is not None:
                pending.discard(p.stage_step)
                on_checkpoint(p.stage_step, self.patched(self.host.adapter.state_dict()))

        out = core.run(self.host, recipe.method, cfg, images, opts, on_progress=progress)
        stage = out.stages[-1]
        if on_checkpoint is not None:
            on_checkpoint(total, self.patched(out.delta))
        hist = core.weighted_history(out, stage)
        losses = {k: [round(float(np.nanmean(v[:50])), 6), round(float(np.nanmean(v[-50:])), 6)]
                  for k, v in hist.items() if v}
        # the mean of every weighted term over the 50 steps before each checkpoint: a run whose
        # denoising loss climbs while its samples change is breaking down, not adapting
        loss_at = {str(c): {k: round(float(np.nanmean(v[max(0, c - 50):c])), 6) for k, v in hist.items() if v}
                   for c in sorted({*stops, total})}
        return {"train_s": round(stage.seconds, 2), "steps": total, "delta": out.delta, "losses": losses,
                "loss_at": loss_at, "seconds_per_step": round(stage.seconds_per_step, 4)}


# ---------------------------------------------------------------------------------------------
# the benchmark: recipes x seeds at one setting
# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES), choices=list(RECIPES))
    ap.add_argument("--style", default="twitter", help="target style: twitter or openmoji (bench/emoji_styles.py)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: each method's default)")
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "domain_quality.json"))
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    feats = bench_module("features")
    extract = feats.Lite0Features()
    world = World(args.style, extract)
    bench = Bench(sample_steps=args.sample_steps, cfg=args.cfg)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    stem = args.out[:-5] if args.out.endswith(".json") else args.out
    rows, saved = [], {}

    def save(complete: bool) -> dict:
        done = [m for m in args.recipes if any(r["recipe"] == m for r in rows)]
        result = {"complete": complete, "setting": {
                      "target_prompt": TARGET_PROMPT, "source_prompt": SOURCE_PROMPT, "steps": args.steps,
                      "prompts": world.prompts, "seeds": args.seeds, **bench.describe(), **world.describe()},
                  "recipes": {m: {"method": RECIPES[m].method, "config": RECIPES[m].config,
                                  "options": RECIPES[m].options, "note": RECIPES[m].note} for m in args.recipes},
                  "rows": rows, "summary": summarize(rows, done), "samples_npz": os.path.basename(stem) + "_samples.npz",
                  "wall_s": round(time.perf_counter() - t_start, 1)}
        np.savez_compressed(stem + "_samples.tmp.npz", shots=world.shots, eval_target=world.eval_target,
                            eval_source=world.eval_source, **saved)
        os.replace(stem + "_samples.tmp.npz", stem + "_samples.npz")
        with open(args.out + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(args.out + ".tmp", args.out)
        return result

    for name in args.recipes:
        recipe = RECIPES[name]
        for seed in args.seeds:
            t0 = time.perf_counter()
            info = {"train_s": 0.0, "losses": {}}
            model = bench.model
            if recipe.method is not None:
                got = {}
                info = bench.train(recipe, world.training_set(), seed=seed, steps=args.steps,
                                   on_checkpoint=lambda step, m: got.update(model=m))
                model = got["model"]
            samples = bench.sample(model, world.prompts, seed=seed)
            row = {"recipe": name, "seed": seed, **world.score(samples), "train_s": info["train_s"],
                   "losses": info["losses"], "wall_s": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            saved[f"{name}/{seed}/samples"] = samples
            print(f"{name:26s} seed {seed}: style {row['style']:.3f} diversity {row['diversity']:.4f} shot dist "
                  f"{row['shot_dist']:.4f} content {row['content_dist']:.4f} KID {row['kid_target']:.4f} "
                  f"({row['wall_s']:.0f} s)", flush=True)
            save(complete=False)

    print_table(rows, args.recipes, f"\nDomain adaptation to {args.style} from {N_SHOTS} shots (miniworld, Lite0 "
                f"features, seeds {args.seeds}); mean ± sd over seeds")
    seed0 = args.seeds[0]
    shown = [m for m in args.recipes if f"{m}/{seed0}/samples" in saved]
    k = 12
    grid = labelled_rows([(world.shots, "shots"), (world.eval_target[:k], f"{args.style} (real)"),
                          (world.eval_source[:k], "google (real)")]
                         + [(saved[f"{m}/{seed0}/samples"][:k], m) for m in shown], label_width=170)
    save_png(to_uint8(grid)[0], stem + "_samples.png")
    result = save(complete=True)
    print(f"saved {args.out}, {os.path.basename(stem)}_samples.npz and _samples.png "
          f"({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
