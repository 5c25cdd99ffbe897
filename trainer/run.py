"""The one run entry point: a host, a method with its settings, the images -> trained result and files.

    outcome = run(host, "domainstudio", cfg, image_set, options, saver=..., on_progress=...)

Nodes and dstrain both call this and only translate inputs and outputs. The run, in order:

1. checks everything that can be checked before any training (settings, names, output folders,
   the new token against the vocabulary, the memory the step will need);
2. encodes the training images and every fixed prompt once (conditioning is cached);
3. generates prior-preservation class images with the source model when the method asks;
4. runs each stage of the method through the one loop (trainer/loop.py) inside the host's training
   session, in pieces between which it samples a preview and saves periodic checkpoints;
5. saves the files (trainer/files.py) and asks the host for its result objects (a patched MODEL).

Work is never thrown away: when the user cancels, the last completed step is saved as
`<save_name>_partial_<step>` (unless on_cancel is "discard") before the frontend's exception goes
on; when saving fails the trained result is still returned with a message naming the folder.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import layers, memory, quality, settings
from .errors import SettingError, TrainingError
from .host import Adapter, Exported, Host, SessionNeeds, Token
from .loop import Loop, LoopSpec, Rng, StepReport
from .methods import Method, Prompts, StageInputs, get
from .settings import setting

log = logging.getLogger("DomainStudio")

DELTA_FORMATS = ("auto", "diff", "svd_lora")
SAVE_DTYPES = ("fp16", "bf16", "fp32")
CANCEL_CHOICES = ("keep", "discard")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class RunOptions:
    """Settings every method shares: what is trained, how, and what is written."""

    train_mode: str = setting("lora_attn", "lora_*: LoRA through the host's weight adapters; full_*: a full delta. "
                              "*_attn: attention projections only; *_all: every linear/conv weight.",
                              choices=layers.TRAIN_MODES, advanced=True)
    lora_rank: int = setting(8, "LoRA rank.", min=1, max=256, advanced=True, flag="--rank")
    lora_alpha: float = setting(8.0, "LoRA alpha (scale = alpha / rank).", min=0.01, max=1024.0, step=0.01,
                                advanced=True, flag="--alpha")
    train_seed: int = setting(0, "Seed of noise, timesteps, batches and LoRA init. Deliberately not auto-randomised: "
                              "a new seed retrains on every queue.", min=0, max=0xFFFFFFFF, flag="--seed")
    memory: str = setting("auto", "auto: checkpointing/precision/optimizer chosen from the memory estimate and what is "
                          "free; low: least memory (gradient checkpointing, bf16 on a GPU, Adafactor for full "
                          "deltas); max_speed: no checkpointing.", choices=memory.MODES, advanced=True)
    precision: str = setting("auto", "Compute precision of the frozen weights while training (trainable weights stay "
                             "fp32). auto: bf16 on a GPU that supports it, fp32 on the CPU.", choices=PRECISIONS,
                             advanced=True)
    optimizer: str = setting("auto", "auto: AdamW (fused on CUDA; Adafactor for full deltas in memory=low); adamw; "
                             "adafactor (torch's, factored moments: far less optimizer memory).",
                             choices=("auto", "adamw", "adafactor"), advanced=True)
    max_grad_norm: float = setting(1.0, "Gradient clipping (0 = off).", min=0.0, max=1e6, advanced=True, node=False)
    weight_decay: float = setting(0.0, "AdamW weight decay.", min=0.0, max=10.0, advanced=True, node=False)
    save_format: str = setting("auto", "auto: LoRA for lora_* modes, full differences (.diff) for full_* modes. diff: "
                               "full differences (a LoRA multiplied out). svd_lora: a LoRA of rank svd_rank "
                               "extracted by truncated SVD (its relative error is logged and stored).",
                               choices=DELTA_FORMATS, advanced=True)
    svd_rank: int = setting(32, "Rank of the LoRA that save_format=svd_lora extracts.", min=1, max=1024, advanced=True)
    save_dtype: str = setting("fp16", "Precision of the saved files (the returned model uses the same values).",
                              choices=SAVE_DTYPES, advanced=True)
    preview_every: int = setting(100, "Sample a preview from the current weights every N steps and at the end "
                                 "(0 = off). At 100 steps with 12 sampling steps it costs under a tenth of the "
                                 "training time.", min=0, max=100000, advanced=True)
    preview_steps: int = setting(12, "Sampling steps of a preview.", min=1, max=100, advanced=True, node=False)
    save_every: int = setting(0, "Save a checkpoint (delta + optimizer state, resumable) every N steps (0 = off).",
                              min=0, max=100000, advanced=True)
    on_cancel: str = setting("keep", "On Cancel: keep the last completed step as <save_name>_partial_<step>, or "
                             "discard it.", choices=CANCEL_CHOICES, advanced=True)
    quality_samples: int = setting(0, "After training, sample this many seeds from the source and the adapted model "
                                   "and report diversity, copying, class drift and over-training damage (0 = off).",
                                   min=0, max=64, advanced=True)
    min_timestep: int = setting(0, "Train only on timesteps min_timestep <= t < max_timestep of the 1000-step "
                                "schedule (0 = nearly clean, 999 = pure noise). Raising it trains only the noisier "
                                "steps, where layout and colour are decided; 250 (Personalize's default) leaves the "
                                "nearly clean steps, where a few photos over-train into fragments, to the source "
                                "model.", min=0, max=999, advanced=True)
    max_timestep: int = setting(1000, "Upper end (exclusive) of the trained timesteps. Lower (500: DomainStudio "
                                "Train's default) trains only the cleaner steps, where edges, shading and texture "
                                "are drawn; 1000 trains the whole schedule.", min=1, max=1000, advanced=True)

    @property
    def timesteps(self) -> tuple[int, int]:
        return (self.min_timestep, self.max_timestep)


@dataclass
class Progress:
    """What frontends show. step/total count class images and every stage's steps."""

    stage: str
    step: int
    total: int
    stage_step: int
    stage_total: int
    seconds: float  # since the run started
    losses: dict[str, float] | None = None  # latest values (None between syncs)
    history: dict[str, Any] | None = None  # {"steps": [...], "terms": {name: [...]}} weighted terms, all stages
    preview: Any = None  # IMAGE [1, H, W, 3] when a preview was just sampled
    message: str = ""

    @property
    def seconds_per_step(self) -> float | None:
        return self.seconds / self.step if self.step else None

    @property
    def eta(self) -> float | None:
        s = self.seconds_per_step
        return None if s is None else s * max(0, self.total - self.step)


@dataclass
class StageOutcome:
    name: str
    steps: int  # requested
    steps_done: int
    seconds: float
    history: dict[str, list[float]]
    history_steps: list[int]

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.steps_done if self.steps_done else float("nan")


@dataclass
class Outcome:
    method: str
    config: Any
    options: RunOptions
    family: str
    fingerprint: str
    prompts: Prompts
    stages: list[StageOutcome] = field(default_factory=list)
    delta: dict[str, torch.Tensor] | None = None  # exact (fp32) trained delta, kohya names
    token: Token | None = None  # final token vectors (detached)
    adapter: Adapter | None = None
    exported: Exported = field(default_factory=Exported)
    files: list[str] = field(default_factory=list)
    save_error: str = ""
    warnings: list[str] = field(default_factory=list)
    plan: Any = None  # memory.Plan
    quality: Any = None  # quality.QualityReport when options.quality_samples > 0
    preview_seconds: float = 0.0  # time spent sampling previews (their share of training is logged)
    completed: bool = False
    last_preview: Any = None

    @property
    def steps_done(self) -> int:
        return sum(s.steps_done for s in self.stages)


def default_options(method: str | Method, **values) -> RunOptions:
    """RunOptions at `method`'s defaults (its option_defaults over RunOptions' own), then `values`."""
    m = get(method) if isinstance(method, str) else method
    return settings.replace(RunOptions(), **{**m.option_defaults, **values})


def resolve_config(method: str | Method, values: dict | None = None):
    """The method's settings dataclass from a dict of values (unknown names refused)."""
    m = get(method) if isinstance(method, str) else method
    cfg = m.config()
    return settings.replace(cfg, **(values or {}))


def run(host: Host, method: str | Method, cfg, images, options: RunOptions | None = None, *,
        saver=None, resume=None, on_progress: Callable[[Progress], None] | None = None,
        image_features: Callable | None = None, feature_space: str = "") -> Outcome:
    """Train `method` on `images` (trainer.imageset.ImageSet, or an IMAGE tensor [N, H, W, 3]).

    saver: trainer.files.Saver (None = write nothing). resume: trainer.files.ResumeState.
    on_progress runs after every step and class image; an exception it raises (Cancel) stops the
    run after the current step, keeping the last completed step when options.on_cancel == 'keep'.
    image_features(IMAGE) -> [N, D] (e.g. a connected CLIP vision model) is the quality report's
    feature space; without it the report uses VAE latents.
    Safe to call under torch.inference_mode() (ComfyUI runs nodes in it): training leaves it."""
    with torch.inference_mode(False):
        return _run(host, method, cfg, images, options, saver=saver, resume=resume, on_progress=on_progress,
                    image_features=image_features, feature_space=feature_space)


def _run(host, method, cfg, images, options, *, saver, resume, on_progress, image_features=None,
         feature_space="") -> Outcome:
    m = get(method) if isinstance(method, str) else method
    opts = options or default_options(m)
    tensor = images if isinstance(images, torch.Tensor) else images.images
    captions = list(getattr(images, "captions", None) or [None] * int(tensor.shape[0]))
    n = int(tensor.shape[0])
    resolution = int(tensor.shape[1])

    # 1. everything checkable before training ----------------------------------------------------
    warnings = list(m.validate(cfg, n))
    settings.check(opts)
    check_options(m, cfg, opts)
    prompts = m.prompts(cfg, captions)
    trigger = m.trigger(cfg)
    if m.uses_token and host.knows_word(trigger):
        raise SettingError("new_token", trigger, "it is already a word of CLIP's vocabulary; prompts using it would "
                           "lose its usual meaning. Choose a made-up word such as 'ds_subject' or 'zwx_dog'")
    if saver is not None:
        saver.check(m, cfg, opts, token_widths=host.encoder_widths() if m.uses_token else None)
    stages = m.stages(cfg)
    n_prior = m.class_images(cfg)
    plan = make_plan(host, m, cfg, opts, stages, prompts, resolution=resolution, prior=n_prior > 0)
    for line in plan.describe():
        log.info("DomainStudio memory plan: %s", line)

    out = Outcome(method=m.name, config=cfg, options=opts, family=host.family, fingerprint=host.fingerprint(),
                  prompts=prompts, warnings=warnings, plan=plan)
    total = n_prior + sum(s.steps for s in stages)
    t_run = time.perf_counter()
    done_before = [0]  # steps of finished stages (and class images)
    live_history: dict[str, Any] = {"steps": [], "terms": {}}

    def report(stage: str, stage_step: int, stage_total: int, losses=None, preview=None, message=""):
        if on_progress is not None:
            on_progress(Progress(stage, done_before[0] + stage_step, total, stage_step, stage_total,
                                 time.perf_counter() - t_run, losses, live_history, preview, message))

    # 2. inputs, encoded once --------------------------------------------------------------------
    with torch.no_grad():
        x0 = host.encode_images(tensor.detach().clone().float())
        feats = (tensor.detach().clone().float().movedim(-1, 1) * 2 - 1).to(x0.device) \
            if any(s.decode for s in stages) else None

    # 3. prior-preservation class images from the source model -----------------------------------
    prior_x0 = None
    if n_prior:
        log.info("DomainStudio: generating %d class images from %r", n_prior, prompts.class_prompt)
        prior_x0 = class_latents(host, prompts.class_prompt, n_prior, resolution, opts.train_seed,
                                 progress=lambda i: report("class images", i, n_prior))
        done_before[0] += n_prior

    # 4. stages ----------------------------------------------------------------------------------
    token: Token | None = None
    adapter: Adapter | None = None
    resume_stage = resume.stage_index if resume is not None else -1
    for index, stage in enumerate(stages):
        if index < resume_stage:  # finished before the resumed checkpoint
            if stage.trains == "token":
                token = resume.token
                out.token = token
            done_before[0] += stage.steps
            out.stages.append(StageOutcome(stage.name, stage.steps, stage.steps, 0.0, {}, []))
            continue
        if stage.trains == "token":
            init = host.token_init(m.init_word(cfg), m.num_vectors(cfg))
            token = Token(trigger, {k: torch.nn.Parameter(v) for k, v in init.items()})
            params = list(token.vectors.values())
            encode = _live_encoder(host, token)
        else:
            frozen = token.detached() if token is not None else None
            cache = _encode_all(host, prompts, frozen, with_class=prior_x0 is not None)
            adapter = host.attach(opts.train_mode, opts.lora_rank, opts.lora_alpha, opts.train_seed)
            params = adapter.parameters()
            encode = cache.__getitem__
            if saver is not None:  # the delta's file must fit on the disk before its stage trains
                try:
                    saver.check_space(sum(p.numel() for p in params) * _dtype(opts.save_dtype).itemsize)
                except TrainingError as e:  # a finished token stage is kept, as on any other stop
                    _keep_finished_token(saver, out, stage, token, opts, e)
                    raise
        inputs = StageInputs(host, x0, feats, prior_x0, encode, prompts, opts.timesteps)
        spec = LoopSpec(stage.name, stage.steps, stage.learning_rate, opts.train_seed + stage.seed_offset,
                        optimizer=plan.optimizer, weight_decay=opts.weight_decay, max_grad_norm=opts.max_grad_norm,
                        device=plan.device, sync_every=plan.sync_every)
        needs = SessionNeeds(adapter=adapter if stage.trains == "unet" else None,
                             token=token if stage.trains == "token" else None, decode=stage.decode,
                             checkpointing=plan.checkpointing, dtype=plan.dtype,
                             batch_shape=(_batch(cfg), *x0.shape[1:]))
        outcome = StageOutcome(stage.name, stage.steps, 0, 0.0, {}, [])
        out.stages.append(outcome)
        runner = _StageRunner(host, stage, inputs, params, spec, needs, resume if index == resume_stage else None,
                              adapter, token)

        def on_step(r: StepReport):
            if r.losses is not None:
                _record(live_history, done_before[0] + r.step, r.losses, m, cfg)
            report(stage.name, r.step, r.steps, r.losses)

        try:
            while True:
                runner.run_piece(_next_stop(runner.step, stage.steps, opts), on_step)
                _update(outcome, runner.loop)
                if runner.loop.done:
                    break
                step = runner.loop.step
                if opts.save_every and step % opts.save_every == 0 and saver is not None:
                    files = _snapshot(saver, out, index, runner, adapter, token, stage, "checkpoint")
                    report(stage.name, step, stage.steps, message="saved " + ", ".join(map(_base, files)))
                if opts.preview_every and step % opts.preview_every == 0:
                    t_preview = time.perf_counter()
                    out.last_preview = _preview(host, prompts, opts, resolution, adapter, token)
                    out.preview_seconds += time.perf_counter() - t_preview
                    report(stage.name, step, stage.steps, preview=out.last_preview, message="preview")
        except TrainingError as e:
            # A diverged or non-finite stage keeps nothing of itself; a finished token stage is kept.
            if runner.loop is not None:
                _update(outcome, runner.loop)
            _keep_finished_token(saver, out, stage, token, opts, e)
            raise
        except BaseException:
            # Cancel (or any interruption from the frontend): keep the last completed step.
            if runner.loop is not None:
                _update(outcome, runner.loop)
            if saver is not None and opts.on_cancel == "keep" and runner.loop is not None and runner.loop.step > 0:
                try:
                    files = _snapshot(saver, out, index, runner, adapter, token, stage, "partial")
                    log.warning("DomainStudio: cancelled at %s step %d; kept %s", stage.name, runner.loop.step,
                                ", ".join(map(_base, files)))
                    report(stage.name, runner.loop.step, stage.steps,
                           message="kept " + ", ".join(_base(f) for f in files if not f.endswith(".dsstate")))
                except Exception as e:  # noqa: BLE001 - never hide the cancel behind a save problem
                    log.error("DomainStudio: could not keep the partial result: %s", e)
            raise
        done_before[0] += stage.steps
        if stage.trains == "token":
            token = token.detached()
            out.token = token
        else:
            for p in adapter.parameters():
                p.requires_grad_(False)

    out.completed = True
    for stage, outcome in zip(stages, out.stages):
        w = quality.rise_warning(stage.name, outcome.history, stage.lr_setting)
        if w:
            out.warnings.append(w)
    out.token = token
    out.adapter = adapter
    if adapter is not None:
        out.delta = {k: v.detach().clone() for k, v in adapter.state_dict().items()}
        with torch.no_grad():  # the adapted model now holds exactly the saved file's values
            for p in adapter.parameters():
                p.copy_(p.to(_dtype(opts.save_dtype)).to(p.dtype))

    # 5. files and the host's result objects -----------------------------------------------------
    file_delta = None
    if out.delta is not None:
        file_delta = {k: v.detach().to(_dtype(opts.save_dtype)).clone() for k, v in out.delta.items()}
    if saver is not None:
        try:
            out.files = saver.save_final(out) + out.files
        except Exception as e:  # noqa: BLE001 - every save failure is reported, the result is kept
            out.save_error = str(e)
            out.files = list(getattr(e, "saved", []) or []) + out.files
            log.error("DomainStudio: %s", out.save_error)
    if opts.preview_every:
        try:
            out.last_preview = _preview(host, prompts, opts, resolution, adapter, token)
        except Exception as e:  # noqa: BLE001 - a preview is a convenience; never lose the run for it
            log.warning("DomainStudio: final preview failed: %s", e)
    if out.preview_seconds:
        trained = sum(st.seconds for st in out.stages)
        log.info("DomainStudio: previews took %.1f s, %.0f %% of the %.1f s of training (preview_every=%d, "
                 "preview_steps=%d)", out.preview_seconds, 100 * out.preview_seconds / max(trained, 1e-9), trained,
                 opts.preview_every, opts.preview_steps)
    if opts.quality_samples:
        report("quality report", 0, 1, message="sampling the quality report")
        with torch.no_grad():
            out.quality = quality.report(host, prompts, x0, samples=opts.quality_samples, resolution=resolution,
                                         seed=opts.train_seed, adapter=adapter, token=token,
                                         class_prompt=prompts.class_prompt if m.node == "subject" else None,
                                         image_features=image_features, space=feature_space,
                                         training_images=tensor.detach().float())
        log.info("DomainStudio %s", out.quality.text())
        last = next((s for s in reversed(stages) if s.trains == "unet"), stages[-1])
        w = quality.detail_warning(out.quality.detail_source, out.quality.detail_adapted,
                                   out.quality.detail_training, last.lr_setting, last.steps_setting)
        if w:
            out.warnings.append(w)
    out.exported = host.export(file_delta, token)
    return out


class _StageRunner:
    """One stage's loop, run in pieces inside the host's training session."""

    def __init__(self, host, stage, inputs, params, spec, needs, resume, adapter, token):
        self.host, self.stage, self.inputs, self.params = host, stage, inputs, params
        self.spec, self.needs, self.resume, self.adapter, self.token = spec, needs, resume, adapter, token
        self.loop: Loop | None = None

    @property
    def step(self) -> int:
        if self.loop is not None:
            return self.loop.step
        return self.resume.step if self.resume is not None else 0

    def _start(self) -> None:
        self.loop = Loop(self.stage.objective(self.inputs), self.params, self.spec)
        r = self.resume
        if r is None:
            return
        with torch.no_grad():
            if r.delta is not None and self.adapter is not None:
                unknown = self.adapter.load_state_dict(r.delta)
                if unknown:
                    raise SettingError("resume_from", r.source, f"its layers do not match this model and train mode "
                                       f"({len(unknown)} mismatched, first: {unknown[0]})")
            if r.token is not None and self.token is not None and self.stage.trains == "token":
                for k, v in self.token.vectors.items():
                    v.copy_(r.token.vectors[k].to(v))
        if r.loop_state is not None:
            self.loop.load_state_dict(r.loop_state)
        else:
            self.loop.step = r.step
        log.info("DomainStudio: resuming %s at step %d of %d (%s)", self.stage.name, self.loop.step, self.stage.steps,
                 r.source)

    def run_piece(self, until: int, on_step) -> None:
        def piece():
            if self.loop is None:
                self._start()
            self.loop.run(until=until, on_step=on_step)

        self.host.session(piece, self.needs)


def _base(path: str) -> str:
    import os

    return os.path.basename(path)


def _keep_finished_token(saver, out: Outcome, stage, token, opts, error: Exception) -> None:
    if saver is None or token is None or stage.trains == "token" or opts.on_cancel != "keep" or not saver.enabled:
        return
    try:
        kept = saver.save_embedding(token.detached(), out)
        out.files.append(kept)
        error.args = (f"{error.args[0]} The finished token stage was kept: {_base(kept)}.",)
    except Exception as save_error:  # noqa: BLE001
        log.error("DomainStudio: could not keep the finished token stage: %s", save_error)


# ---------------------------------------------------------------------------------------------
# memory plan: measured probes of each stage's step (trainer/memory.py)
# ---------------------------------------------------------------------------------------------

_PROBES: dict = {}


def make_plan(host: Host, m: Method, cfg, opts: RunOptions, stages, prompts: Prompts, *, resolution: int,
              prior: bool) -> memory.Plan:
    """The memory plan for this run: measured step memory of every stage (the largest counts)
    against the host's free memory; refuses a run that cannot fit."""
    device = memory.device_of(host)
    channels, scale = host.latent_format()
    side = resolution // scale
    batch = _batch(cfg)
    full = opts.train_mode.startswith("full")
    available = memory.env_available_override() or host.free_memory()
    dtype = memory.compute_dtype(opts.precision, device)
    # What changes a step's memory (not its length, learning rate or wording): part of the probe key.
    shape_of_step = tuple(sorted((k, repr(v)) for k, v in settings.as_dict(cfg).items()
                                 if not any(w in k for w in ("steps", "learning_rate", "prompt", "token", "word",
                                                             "identifier", "class_noun"))))

    def estimate(checkpointing: bool, optimizer: str):
        if available is None:  # nothing to decide against: skip the probes
            return None
        worst = None
        for index, stage in enumerate(stages):
            key = (host.name, host.fingerprint(), m.name, index, stage.decode, batch, side, checkpointing,
                   str(dtype), opts.train_mode, opts.lora_rank, channels, prior, shape_of_step)
            est = _PROBES.get(key)
            if est is None and key not in _PROBES:
                counted: dict = {}
                est = memory.fit(lambda s: _probe(host, m, cfg, opts, stage, prompts, side=s, channels=channels,
                                                  scale=scale, batch=batch, prior=prior, checkpointing=checkpointing,
                                                  dtype=dtype, counted=counted),
                                 side, fixed=0)
                if est is not None:
                    est.n_params = counted.get("n_params", 0)
                _PROBES[key] = est
            if est is None:
                continue
            total_bytes = est.at(side) + memory.optimizer_bytes(est.n_params, optimizer)
            if worst is None or total_bytes > worst[0]:
                worst = (total_bytes, est)
        if worst is None:
            return None
        estimate.last = worst[1]
        return worst[0]

    return memory.choose(opts, device=device, full=full, estimate=estimate, available=available, side=side,
                         batch=batch, scale=scale)


def _probe(host: Host, m: Method, cfg, opts: RunOptions, stage, prompts: Prompts, *, side: int, channels: int,
           batch: int, prior: bool, checkpointing: bool, dtype, counted: dict, scale: int = 8) -> int | None:
    """Peak memory one forward + backward of `stage` adds at latent side `side` (random inputs of the
    training shapes, a throw-away generator; nothing is trained or kept)."""
    device = memory.device_of(host)
    g = torch.Generator().manual_seed(1234)
    x0 = torch.randn(batch, channels, side, side, generator=g).to(device)
    feats = torch.randn(batch, 3, side * scale, side * scale, generator=g).to(device) if stage.decode else None
    prior_x0 = torch.randn(batch, channels, side, side, generator=g).to(device) if prior else None
    adapter = token = None
    if stage.trains == "token" or m.uses_token:
        init = host.token_init(m.init_word(cfg), m.num_vectors(cfg))
        token = Token(m.trigger(cfg), {k: torch.nn.Parameter(v) for k, v in init.items()})
    if stage.trains == "token":
        params = list(token.vectors.values())
        encode = _live_encoder(host, token)
    else:
        cache = _encode_all(host, prompts, token.detached() if token is not None else None, with_class=prior)
        adapter = host.attach(opts.train_mode, opts.lora_rank, opts.lora_alpha, opts.train_seed)
        params = adapter.parameters()
        encode = cache.__getitem__
    counted["n_params"] = sum(p.numel() for p in params)
    inputs = StageInputs(host, x0, feats, prior_x0, encode, prompts, opts.timesteps)
    needs = SessionNeeds(adapter=adapter, token=token if stage.trains == "token" else None, decode=stage.decode,
                         checkpointing=checkpointing, dtype=dtype, batch_shape=(batch, channels, side, side))
    result: dict = {}

    def fn():
        objective = stage.objective(inputs)
        rng = Rng.seeded(4321, device)
        with memory.PeakMeter(device) as meter:
            total, _ = objective(rng)
            total.backward()
        for p in params:
            p.grad = None
        result["added"] = meter.added

    try:
        host.session(fn, needs)
    finally:
        if adapter is not None:
            adapter.detach()
        del inputs, params
        memory.release_free_heap()  # the probe's activations must not stay in the process's heap
    added = result.get("added")
    if added is None:
        return None
    return int(added)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def check_options(m: Method, cfg, opts: RunOptions) -> None:
    """Cross-setting rules that settings.check cannot express."""
    if m.trains_unet and opts.save_format == "svd_lora" and opts.svd_rank < 1:
        raise SettingError("svd_rank", opts.svd_rank, "use 1 or more")
    if opts.min_timestep >= opts.max_timestep:
        raise SettingError("max_timestep", opts.max_timestep, f"it must be above min_timestep ({opts.min_timestep}); "
                           f"raise max_timestep or lower min_timestep (0 and 1000 train on the whole schedule)")


def _dtype(name: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def _batch(cfg) -> int:
    return int(getattr(cfg, "batch_size", 1))


def _next_stop(step: int, steps: int, opts: RunOptions) -> int:
    """Where the current piece of the loop pauses: the next preview or checkpoint step."""
    stops = [steps]
    for every in (opts.preview_every, opts.save_every):
        if every:
            stops.append((step // every + 1) * every)
    return min(stops)


def _live_encoder(host: Host, token: Token) -> Callable[[str], Any]:
    return lambda prompt: host.encode_prompt(prompt, token)


def _encode_all(host: Host, prompts: Prompts, token: Token | None, with_class: bool) -> dict[str, Any]:
    """Conditioning of every fixed prompt, encoded once (the text encoder and token are frozen)."""
    wanted = list(dict.fromkeys(prompts.target + prompts.source + ([prompts.class_prompt] if with_class else [])))
    with torch.inference_mode(False), torch.no_grad():
        return {p: host.encode_prompt(p, token) for p in wanted}


_CLASS_CACHE: dict = {}


def class_latents(host: Host, prompt: str, count: int, resolution: int, seed: int, progress=None,
                  steps: int = 20, cfg: float = 6.0) -> torch.Tensor:
    """Prior-preservation images sampled by the *source* model from `prompt` (seeds seed..seed+count-1).
    Cached in memory per (base model, prompt, count, size, seed, steps, cfg)."""
    key = (host.name, host.fingerprint(), getattr(host, "cache_key", lambda: None)(), prompt, count, resolution, seed,
           steps, cfg)
    if key in _CLASS_CACHE:
        if progress:
            progress(count)
        return _CLASS_CACHE[key]
    out = []
    for i in range(count):
        out.append(host.sample(prompt, [seed + i], resolution=resolution, steps=steps, cfg=cfg))
        if progress:
            progress(i + 1)
    lat = torch.cat(out).float()
    if len(_CLASS_CACHE) > 4:
        _CLASS_CACHE.pop(next(iter(_CLASS_CACHE)))
    _CLASS_CACHE[key] = lat
    return lat


def weighted_terms(m: Method, cfg, losses: dict[str, float]) -> dict[str, float]:
    """Each loss term as it enters the objective (lambda * L), so plots show what drives training."""
    weights = {}
    for term in ("img", "hf", "hfmse", "prior"):
        w = getattr(cfg, f"lambda_{term}", None)
        if w is not None:
            weights[term] = w
    out = {}
    for k, v in losses.items():
        if k in weights:
            if weights[k] > 0 and (v != 0 or k != "prior"):
                out[f"{weights[k]:g}×{k}"] = weights[k] * v
        elif k == "prior" and v == 0:
            continue
        else:
            out[k] = v
    return out


def weighted_history(out: Outcome, stage: StageOutcome) -> dict[str, list[float]]:
    """A stage's loss history as the terms enter the objective (lambda * L); unused terms dropped."""
    m = get(out.method)
    names = list(stage.history)
    rows = [dict(zip(names, vals)) for vals in zip(*[stage.history[k] for k in names])]
    out_hist: dict[str, list[float]] = {}
    for i, row in enumerate(rows):
        for k, v in weighted_terms(m, out.config, row).items():
            series = out_hist.setdefault(k, [])
            series.extend([math.nan] * (i - len(series)))
            series.append(v)
    return out_hist


def _record(history: dict, step: int, losses: dict[str, float], m: Method, cfg) -> None:
    history["steps"].append(step)
    terms = history["terms"]
    for k, v in weighted_terms(m, cfg, losses).items():
        series = terms.setdefault(k, [])
        series.extend([math.nan] * (len(history["steps"]) - 1 - len(series)))
        series.append(v)


def _update(outcome: StageOutcome, loop: Loop) -> None:
    outcome.steps_done = loop.step
    outcome.seconds = loop.seconds
    outcome.history = {k: list(v) for k, v in loop.history.values.items()}
    outcome.history_steps = list(loop.history.steps)


def _preview(host: Host, prompts: Prompts, opts: RunOptions, resolution: int, adapter, token) -> torch.Tensor:
    prompt = prompts.usage or (prompts.target[0] if prompts.target else "")
    with torch.inference_mode(False), torch.no_grad():
        tok = token.detached() if token is not None else None
        lat = host.sample(prompt, [opts.train_seed], resolution=resolution, steps=opts.preview_steps, cfg=5.0,
                          adapter=adapter, token=tok)
        return host.decode_images(lat)[:1]


def _snapshot(saver, out: Outcome, index: int, runner: _StageRunner, adapter, token, stage, kind: str) -> list[str]:
    """A resumable snapshot of the current stage (periodic 'checkpoint' or cancel 'partial')."""
    loop = runner.loop
    delta = adapter.state_dict() if (adapter is not None and stage.trains == "unet") else None
    tok = token.detached() if token is not None else None
    return saver.save_snapshot(out, stage_index=index, stage=stage.name, step=loop.step, delta=delta, token=tok,
                               loop_state=loop.state_dict(), kind=kind)
