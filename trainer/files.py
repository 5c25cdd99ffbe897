"""The files a run writes, in one place for every frontend: formats, names, metadata, snapshots.

* Formats are a registry: `lora`, `diff` and `svd_lora` for a UNet delta (models/loras), and
  `embedding` for token vectors (models/embeddings). `save_format=auto` picks lora for LoRA
  modes and diff for full modes.
* Names: a delta is `<save_name>_00001.safetensors` (numbered, never overwritten); an embedding is
  `<trigger>.safetensors`, because the file name is the word ComfyUI (`embedding:<trigger>`) and
  A1111 use (numbered only when taken, with a warning).
* Snapshots: on Cancel `<save_name>_partial_<step>` and every `save_every` steps
  `<save_name>_step<step>`, each with a `.dsstate` sidecar (safetensors: the exact delta, token
  vectors, optimizer moments and generator state, and the run's settings) that `resume_from`
  continues from. ComfyUI lists no `.dsstate` file.
* Metadata (trainer/deltas.build_metadata) carries the run's settings, so a file says how it was
  made; written by `Saver.metadata` alone.

A method that writes two files writes both or reports exactly which exist (`SaveError.saved`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import torch

from . import deltas, embeddings, settings
from .errors import SettingError, TrainingError
from .host import Token

STATE_EXT = ".dsstate"
log = logging.getLogger("DomainStudio")


class SaveError(TrainingError):
    """Saving failed; `saved` lists what was written before the failure."""

    def __init__(self, message: str, saved: list[str] | None = None):
        super().__init__(message)
        self.saved = list(saved or [])


# ---------------------------------------------------------------------------------------------
# formats
# ---------------------------------------------------------------------------------------------

@dataclass
class Written:
    tensors: dict[str, torch.Tensor]
    kind: str
    rank: int | None = None
    alpha: float | None = None
    extra: dict = field(default_factory=dict)


class LoraFormat:
    name = "lora"
    folder = "loras"

    def build(self, delta: dict[str, torch.Tensor], opts) -> Written:
        return Written(delta, "lora", opts.lora_rank, opts.lora_alpha)


class DiffFormat:
    name = "diff"
    folder = "loras"

    def build(self, delta: dict[str, torch.Tensor], opts) -> Written:
        if any(k.endswith(".lora_up.weight") for k in delta):
            delta = deltas.lora_to_diff(delta)
        return Written(delta, "diff")


class SvdLoraFormat:
    name = "svd_lora"
    folder = "loras"

    def build(self, delta: dict[str, torch.Tensor], opts) -> Written:
        tensors, report = deltas.extract_lora_svd(delta, opts.svd_rank)
        extra = {"domainstudio.svd_rank": report.rank, "domainstudio.svd_rel_error": f"{report.rel_error:.6g}",
                 "domainstudio.svd_max_layer_rel_error": f"{report.max_layer_rel_error:.6g}"}
        return Written(tensors, "svd_lora", opts.svd_rank, float(opts.svd_rank), extra)


class EmbeddingFormat:
    name = "embedding"
    folder = "embeddings"


FORMATS = {f.name: f for f in (LoraFormat(), DiffFormat(), SvdLoraFormat(), EmbeddingFormat())}


def delta_format(opts) -> Any:
    """The delta format for `opts.save_format` ('auto' follows the train mode)."""
    name = opts.save_format
    if name == "auto":
        name = "lora" if opts.train_mode.startswith("lora") else "diff"
    return FORMATS[name]


# ---------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------

@dataclass
class Folders:
    """Where files go (ComfyUI: the first models/loras and models/embeddings folders; dstrain: --out)."""

    loras: str
    embeddings: str
    label_loras: str = "models/loras"  # how messages name the folders (never a server path)
    label_embeddings: str = "models/embeddings"

    def of(self, kind: str) -> str:
        return self.loras if kind == "loras" else self.embeddings

    def label(self, kind: str) -> str:
        return self.label_loras if kind == "loras" else self.label_embeddings


class Saver:
    """Writes a run's files. `save_name` '' = write nothing (the result is still returned)."""

    def __init__(self, folders: Folders, save_name: str, *, host: str = "", images: int = 0, resolution: int = 0,
                 what: str = "save_name"):
        self.folders = folders
        self.save_name = (save_name or "").strip()
        if self.save_name:
            deltas.sanitize_name(self.save_name, what)
        self.host, self.images, self.resolution = host, images, resolution
        self.method, self.widths = None, None
        self._embedding_kept = False

    @property
    def enabled(self) -> bool:
        return bool(self.save_name)

    # --- before training -------------------------------------------------------------------------
    def check(self, method, cfg, opts, token_widths: dict[str, int] | None = None) -> None:
        """Everything about the files that can fail, checked before training: names and target
        folders (exist or can be created, writable). The free space is checked by check_space once
        the size of the delta is known (before its stage trains)."""
        self.method, self.widths = method, token_widths
        if not self.enabled:
            return
        if method.uses_token:
            deltas.sanitize_name(method.trigger(cfg), "new_token")
        kinds = (["embeddings"] if method.uses_token else []) + (["loras"] if method.trains_unet else [])
        for kind in kinds:
            self._check_folder(kind)

    def check_space(self, nbytes: int, kind: str = "loras") -> None:
        """Refuse to start a stage whose file cannot fit on the disk (with 10 % margin)."""
        if not self.enabled:
            return
        free = disk_free(self.folders.of(kind))
        if free is not None and free < 1.1 * nbytes:
            raise SaveError(f"the {self.folders.label(kind)} folder has {_size(free)} free but the trained file "
                            f"needs about {_size(nbytes)}: free some space, or set save_name empty to train "
                            "without saving (the stock Save LoRA node can save the delta output elsewhere)")

    def _check_folder(self, kind: str) -> None:
        folder, label = self.folders.of(kind), self.folders.label(kind)
        fix = f"make ComfyUI's {label} folder a writable folder (check permissions and free space), or set save_name " \
              "empty to train without saving"
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise SaveError(f"cannot create the {label} folder ({e.strerror or type(e).__name__}): {fix}") from None
        if not os.path.isdir(folder):
            raise SaveError(f"{label} is not a folder: {fix}")
        probe = None
        try:
            import tempfile

            fd, probe = tempfile.mkstemp(prefix="." + deltas.TEMP_MARK.strip(".-") + "probe" + deltas.TEMP_MARK,
                                         dir=folder)
            os.write(fd, b"0")
            os.close(fd)
        except OSError as e:
            raise SaveError(f"cannot write to the {label} folder ({e.strerror or type(e).__name__}): {fix}") from None
        finally:
            if probe and os.path.exists(probe):
                os.unlink(probe)

    # --- metadata ----------------------------------------------------------------------------------
    def metadata(self, out, *, kind: str, title: str, trigger: str, steps: int, learning_rate: float | None,
                 rank=None, alpha=None, extra: dict | None = None) -> dict[str, str]:
        cfg, opts = out.config, out.options
        training = {"method": out.method, **settings.as_dict(cfg), **settings.as_dict(opts), "host": self.host,
                    "images": self.images, "resolution": self.resolution,
                    "seconds": {s.name: round(s.seconds, 3) for s in out.stages}}
        return deltas.build_metadata(kind=kind, family=out.family, title=title, method=out.method, rank=rank,
                                     alpha=alpha, training=training, trigger=trigger, fingerprint=out.fingerprint,
                                     steps=steps, resolution=self.resolution or None, learning_rate=learning_rate,
                                     dtype=opts.save_dtype,
                                     extra={"ss_min_timestep": opts.min_timestep, "ss_max_timestep": opts.max_timestep,
                                            **(extra or {})})

    # --- final files -----------------------------------------------------------------------------
    def save_final(self, out) -> list[str]:
        """Embedding (token methods) then delta (UNet methods). Raises SaveError naming what exists."""
        if not self.enabled:
            return []
        saved: list[str] = []
        try:
            if out.token is not None and not self._embedding_kept:
                saved.append(self.save_embedding(out.token, out))
            if out.delta is not None:
                saved.append(self._save_delta(out, self.save_name, steps=_stage_steps(out, "unet", "train")))
        except Exception as e:  # noqa: BLE001 - every failure becomes one message naming the folder and the fix
            raise self._failure(e, saved, out) from None
        return saved

    def _failure(self, e: Exception, saved: list[str], out) -> SaveError:
        kind = "embeddings" if (out.token is not None and not saved) else "loras"
        label = self.folders.label(kind)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        what = "the trained model and delta are still returned: save them elsewhere with the stock Save LoRA node, or " \
               "free space / fix permissions and queue again"
        msg = f"saving to ComfyUI's {label} folder failed ({reason}); {what}."
        if saved:
            msg += f" Written before the failure: {', '.join(os.path.basename(p) for p in saved)}."
        return SaveError(msg, saved)

    def save_embedding(self, token: Token, out, *, stem: str | None = None, steps: int | None = None) -> str:
        """`<trigger>.safetensors` (the file name is the prompt word); when that name is taken by
        other vectors, a numbered name (logged: the prompt word is then the numbered name). The same
        vectors already saved there (a resumed run) are not written twice."""
        folder = self.folders.embeddings
        stem = stem or token.trigger
        path = os.path.join(folder, f"{deltas.sanitize_name(stem, 'new_token')}.safetensors")
        if os.path.exists(path):
            if _same_vectors(path, token):
                return path
            path = deltas.unique_path(folder, stem)
            log.warning("DomainStudio: %s.safetensors exists in %s; the embedding is saved as %s, so prompt with "
                        "embedding:%s", stem, self.folders.label("embeddings"), os.path.basename(path),
                        os.path.splitext(os.path.basename(path))[0])
        cfg = out.config
        lr = getattr(cfg, "ti_learning_rate", None)
        md = self.metadata(out, kind="embedding", title=token.trigger, trigger=token.trigger,
                           steps=steps if steps is not None else _stage_steps(out, "token"), learning_rate=lr)
        return embeddings.save_embedding(path, token.vectors, md, dtype=out.options.save_dtype, widths=self.widths)

    def _save_delta(self, out, stem: str, *, steps: int, delta=None, exact_name: bool = False,
                    extra: dict | None = None) -> str:
        opts = out.options
        fmt = delta_format(opts)
        written = fmt.build(delta if delta is not None else out.delta, opts)
        lr = getattr(out.config, "unet_learning_rate", None) or getattr(out.config, "learning_rate", None)
        md = self.metadata(out, kind=written.kind, title=stem, trigger=out.prompts.usage or "", steps=steps,
                           learning_rate=lr, rank=written.rank, alpha=written.alpha,
                           extra={**written.extra, **(extra or {})})
        folder = self.folders.loras
        path = os.path.join(folder, f"{stem}.safetensors") if exact_name else None
        if path is None or os.path.exists(path):
            path = deltas.unique_path(folder, stem)
        return deltas.save_delta(path, written.tensors, md, dtype=opts.save_dtype)

    # --- snapshots (Cancel, periodic) ------------------------------------------------------------
    def save_snapshot(self, out, *, stage_index: int, stage: str, step: int, delta, token: Token | None,
                      loop_state: dict | None, kind: str) -> list[str]:
        """`partial` (Cancel) or `checkpoint` (save_every) of the current stage at `step`, with a
        .dsstate sidecar to resume from. On Cancel a finished token stage is also kept as the
        final embedding (`<trigger>.safetensors`)."""
        if not self.enabled:
            return []
        suffix = f"_partial_{step}" if kind == "partial" else f"_step{step}"
        saved: list[str] = []
        extra = {"domainstudio.stage": stage, "domainstudio.snapshot": kind}
        try:
            if stage == "token":
                main = self.save_embedding(token, out, stem=token.trigger + suffix, steps=step)
                saved.append(main)
            else:
                if token is not None and kind == "partial" and not self._embedding_kept:
                    saved.append(self.save_embedding(token, out))
                    self._embedding_kept = True
                main = self._save_delta(out, self.save_name + suffix, steps=step, delta=delta, exact_name=True,
                                        extra=extra)
                saved.append(main)
            saved.append(self._save_state(main, out, stage_index, stage, step, delta, token, loop_state))
        except Exception as e:  # noqa: BLE001
            raise self._failure(e, saved, out) from None
        return saved

    def _save_state(self, beside: str, out, stage_index: int, stage: str, step: int, delta, token, loop_state) -> str:
        import safetensors.torch

        tensors = {}
        for k, v in (delta or {}).items():
            tensors[f"delta.{k}"] = v.detach().float().cpu().contiguous()
        if token is not None:
            for k, v in token.vectors.items():
                tensors[f"token.{k}"] = v.detach().float().cpu().contiguous()
        header = {"format": 1, "method": out.method, "fingerprint": out.fingerprint, "family": out.family,
                  "stage_index": stage_index, "stage": stage, "step": step,
                  "trigger": token.trigger if token is not None else "",
                  "config": settings.as_dict(out.config), "options": settings.as_dict(out.options)}
        if loop_state is not None:
            for k, v in loop_state["tensors"].items():
                tensors[f"loop.{k}"] = v.detach().cpu().contiguous()
            header["loop"] = loop_state["header"]
        path = os.path.splitext(beside)[0] + STATE_EXT
        md = {"domainstudio.state": json.dumps(header, default=str)}
        return deltas.atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=md),
                                   overwrite=True)


def _size(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


def _same_vectors(path: str, token: Token) -> bool:
    try:
        vec = embeddings.load_embedding(path)
    except Exception:  # noqa: BLE001 - an unreadable file is simply not the same
        return False
    mine = {k: v.detach().float().cpu() for k, v in token.vectors.items()}
    return set(vec) == set(mine) and all(v.shape == mine[k].shape and torch.allclose(v, mine[k], atol=1e-2, rtol=1e-2)
                                         for k, v in vec.items())


def _stage_steps(out, *names: str) -> int:
    return sum(s.steps_done for s in out.stages if s.name in names)


# ---------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------

@dataclass
class ResumeState:
    stage_index: int
    step: int
    delta: dict[str, torch.Tensor] | None
    token: Token | None
    loop_state: dict | None
    source: str  # file name (for messages)


def load_resume(path: str, *, method, cfg, opts, fingerprint: str, label: str = "resume_from") -> ResumeState:
    """What `resume_from` continues: a .dsstate sidecar (exact: optimizer and generator too), or a
    delta / embedding file we wrote (its values, with a fresh optimizer). Refuses another method,
    another base model, another layout, or a file that already has the requested steps."""
    name = os.path.basename(path)
    state_path = path if path.endswith(STATE_EXT) else os.path.splitext(path)[0] + STATE_EXT
    stages = method.stages(cfg)
    if os.path.isfile(state_path):
        tensors, md = deltas.read_weight_file_any(state_path)
        try:
            header = json.loads(md.get("domainstudio.state", ""))
        except ValueError:
            raise SettingError(label, name, "its .dsstate file is not one this pack wrote") from None
        _same_run(header.get("method"), header.get("fingerprint"), header.get("options", {}), method, opts,
                  fingerprint, label, name)
        stage_index, step = int(header["stage_index"]), int(header["step"])
        delta = {k[len("delta."):]: v for k, v in tensors.items() if k.startswith("delta.")} or None
        vec = {k[len("token."):]: v for k, v in tensors.items() if k.startswith("token.")}
        token = Token(header.get("trigger") or method.trigger(cfg), vec) if vec else None
        loop_state = None
        if "loop" in header:
            saved_opt = header["loop"].get("optimizer")
            if opts.optimizer != "auto" and saved_opt and saved_opt != opts.optimizer:
                raise SettingError(label, name, f"its optimizer state is {saved_opt}'s; set optimizer={saved_opt} (or "
                                   "auto) to continue it")
            loop_state = {"header": header["loop"],
                          "tensors": {k[len("loop."):]: v for k, v in tensors.items() if k.startswith("loop.")}}
    else:
        if path.endswith(STATE_EXT):
            raise SettingError(label, name, "no such checkpoint")
        tensors, md = deltas.read_weight_file(path)
        kind = md.get("domainstudio.kind", "")
        if not kind:
            raise SettingError(label, name, "it was not written by this pack (no domainstudio metadata); resume only "
                               "continues files this pack saved")
        training = json.loads(md.get("domainstudio.training", "{}") or "{}")
        _same_run(md.get("domainstudio.method"), md.get("domainstudio.base_fingerprint"), training, method, opts,
                  fingerprint, label, name)
        step = int(md.get("domainstudio.steps", "0") or 0)
        if kind == "embedding":
            if method.trains_unet:
                raise SettingError(label, name, f"it is an embedding; {method.name} also trains the UNet and resumes "
                                   "from its .dsstate checkpoint (save_every or a kept Cancel writes one)")
            token = Token(method.trigger(cfg), embeddings.vectors_from_data(tensors, name))
            stage_index, delta = 0, None
        else:
            if method.uses_token:
                raise SettingError(label, name, f"{method.name} resumes from its .dsstate checkpoint (written beside "
                                   "the file by save_every or a kept Cancel), which holds the token too")
            stage_index, delta, token = len(stages) - 1, dict(tensors), None
        loop_state = None
    if stage_index >= len(stages):
        raise SettingError(label, name, "it is from a method with more stages than this one")
    wanted = stages[stage_index].steps
    if step >= wanted:
        setting_name = {"token": "ti_steps", "unet": "unet_steps"}.get(stages[stage_index].name, "steps")
        raise SettingError(label, name, f"it already has {step} {stages[stage_index].name} steps; set {setting_name} "
                           f"above {step} to continue training it")
    return ResumeState(stage_index, step, delta, token, loop_state, name)


def _same_run(file_method, file_fp, file_opts: dict, method, opts, fingerprint: str, label: str, name: str) -> None:
    if file_method != method.name:
        raise SettingError(label, name, f"it was trained with method {file_method!r}, this run is {method.name!r}; "
                           "resume with the same method")
    if file_fp and fingerprint and file_fp != fingerprint:
        raise SettingError(label, name, "it was trained on another base model (fingerprint "
                           f"{file_fp} vs {fingerprint}); load the model it was trained on")
    for key in ("train_mode", "lora_rank", "lora_alpha"):
        if key in file_opts and file_opts[key] != getattr(opts, key):
            raise SettingError(label, name, f"it was trained with {key}={file_opts[key]!r}, this run has "
                               f"{getattr(opts, key)!r}; use the same {key} to continue it")


def disk_free(folder: str) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None
