"""dstrain: the headless frontend of the core (trainer/run.py), like the nodes but on the command line.

Flags are generated from the same setting declarations as the node inputs (trainer/settings.py):
every method's settings and the shared run options, each with its default in --help. A flag the
chosen method does not use is refused (so `--steps` cannot silently do nothing for a two-stage
method), and errors name the flag the user typed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ..trainer import settings
from ..trainer.methods import METHODS
from ..trainer.run import RunOptions

HOSTS = ("comfy", "diffusers")
EPILOG = """examples:
  dstrain --images style_shots/ --target-prompt "a sks house" --source-prompt "a house" --steps 400
  dstrain --method rare_token --images my_dog/ --class-noun dog --checkpoint sd15.safetensors
  dstrain --host diffusers --diffusers sd15_folder/ --images style_shots/ --steps 400

Run it as `python -m dstrain` from the repository, or `python path/to/repo/dstrain` from anywhere
(after `eval "$(bash .ci/setup.sh | tail -2)"`, with $DS_VENV/bin/python).
"""


def _flag_specs() -> dict[str, list[tuple[str, settings.Spec]]]:
    """flag -> [(owner, spec)] for every method config and the run options."""
    out: dict[str, list] = {}
    for name, m in METHODS.items():
        for s in settings.specs(m.config):
            if s.cli:
                out.setdefault(s.cli_flag, []).append((name, s))
    for s in settings.specs(RunOptions):
        if s.cli:
            out.setdefault(s.cli_flag, []).append(("*", s))
    return out


def _arg_type(s: settings.Spec):
    if s.kind == "int":
        return int
    if s.kind == "float":
        return float
    if s.kind == "bool":
        return lambda v: v.lower() in ("1", "true", "yes", "on")
    return str


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dstrain", description=__doc__.split("\n\n")[0],
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    io_ = ap.add_argument_group("inputs and outputs")
    io_.add_argument("--images", required=True, help="folder of training images (a name.txt beside an image is its "
                     "caption)")
    src = io_.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="single-file SD checkpoint (.safetensors / .ckpt); default: the project's "
                     "miniature emoji SD (miniworld/, built into the cache on first use)")
    src.add_argument("--diffusers", help="diffusers-format model folder (unet/, vae/, text_encoder/ ...)")
    io_.add_argument("--host", choices=HOSTS, default="comfy", help="model code: ComfyUI's (any checkpoint ComfyUI "
                     "loads) or diffusers' alone (no ComfyUI import; needs --diffusers) (default: comfy)")
    io_.add_argument("--method", choices=list(METHODS), default="domainstudio", help="(default: domainstudio)")
    io_.add_argument("--out", default="dstrain_output", help="output folder, created (default: dstrain_output)")
    io_.add_argument("--name", default="", help="file name stem of the delta (default: the method)")
    io_.add_argument("--resume", default="", help="continue a delta / embedding / .dsstate this tool or the nodes "
                     "saved, up to the requested steps")
    io_.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR", ""),
                     help="ComfyUI tree used as a library (default: $COMFYUI_DIR)")
    io_.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: auto)")
    io_.add_argument("--resolution", type=int, default=0, help="square training size; default: the model's native "
                     "resolution (the file's modelspec.resolution; 64 for the miniature model; else 512 SD1, "
                     "768 SD2, 1024 SDXL)")
    io_.add_argument("--flip", action="store_true", help="add mirrored copies of the images")

    shared: dict[str, argparse._ArgumentGroup] = {}
    for flag, owners in _flag_specs().items():
        owner, s = owners[0]
        methods = sorted({o for o, _ in owners if o != "*"})
        group_name = "run options (every method)" if owner == "*" else (
            f"{methods[0]}" if len(methods) == 1 else ("personalization" if set(methods) <= {
                n for n, m in METHODS.items() if m.node == "subject"} else "settings of several methods"))
        group = shared.setdefault(group_name, ap.add_argument_group(group_name))
        defaults = sorted({repr(sp.default) for _, sp in owners})
        if owner == "*":  # a run option some methods start from a value of their own
            own = {n: m.option_defaults[s.name] for n, m in METHODS.items() if s.name in m.option_defaults}
            if own:
                by_value = {v: sorted(n for n in own if own[n] == v) for v in own.values()}
                defaults = [f"{v!r} for {', '.join(ns)}" for v, ns in by_value.items()] + [f"{defaults[0]} otherwise"]
        used_by = "" if owner == "*" else f" [{', '.join(methods)}]"
        kw = dict(default=None, dest=s.name, help=f"{s.help}{used_by} (default: {'; '.join(defaults)})")
        if s.kind == "choice":
            kw["choices"] = list(s.choices)
        else:
            kw["type"] = _arg_type(s)
            kw["metavar"] = s.kind.upper() if s.kind in ("int", "float") else "TEXT"
        group.add_argument(flag, **kw)

    sm = ap.add_argument_group("sample grids (before / after)")
    sm.add_argument("--sample-prompts", default="", help="'|'-separated prompts (default: the training prompt)")
    sm.add_argument("--samples", type=int, default=4, help="samples per prompt, seeds 0..n-1; 0 = no grids "
                    "(default: 4)")
    sm.add_argument("--sample-steps", type=int, default=20, help="(default: 20)")
    sm.add_argument("--cfg", type=float, default=6.0, help="(default: 6.0)")
    return ap


class Usage(SystemExit):
    pass


def fail(msg: str):
    raise SystemExit(f"dstrain: {msg}")


def split_settings(args) -> tuple[dict, dict]:
    """(method values, run-option values) the user set; refuses flags the method does not use."""
    m = METHODS[args.method]
    method_names = {s.name for s in settings.specs(m.config)}
    option_names = {s.name for s in settings.specs(RunOptions)}
    flags = {s.name: s.cli_flag for _, owners in _flag_specs().items() for _, s in owners}
    method_values, option_values = {}, {}
    for name, flag in flags.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if name in method_names:
            method_values[name] = value
        elif name in option_names:
            option_values[name] = value
        else:
            users = [n for n, mm in METHODS.items() if name in {s.name for s in settings.specs(mm.config)}]
            hint = ""
            if name == "steps" and args.method in ("rare_token", "textual_inversion", "dreambooth",
                                                  "dreambooth_no_prior"):
                hint = " (this method has --ti-steps and/or --unet-steps)"
            fail(f"{flag} is not used by --method {args.method}{hint}; it belongs to {', '.join(users)}")
    return method_values, option_values


def flag_of(name: str) -> str:
    for flag, owners in _flag_specs().items():
        if any(s.name == name for _, s in owners):
            return flag
    return {"save_name": "--name", "resume_from": "--resume"}.get(name, name)


def flags_in_text(text: str, config) -> str:
    """`text` with the config's setting names (those with an underscore, e.g. unet_learning_rate)
    written as this CLI's flags (--unet-lr)."""
    import dataclasses
    import re

    names = [f.name for f in dataclasses.fields(config) if "_" in f.name]
    if not names:
        return text
    return re.sub(r"\b(" + "|".join(map(re.escape, names)) + r")\b", lambda m: flag_of(m.group(1)), text)


def describe_error(e: Exception) -> str:
    from ..trainer.errors import SettingError

    if isinstance(e, SettingError):
        text = e.labelled(flag_of(e.name))
        for config in (RunOptions, *(m.config for m in METHODS.values())):  # names in the fix, as flags too
            text = flags_in_text(text, config)
        return text
    return str(e)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    method_values, option_values = split_settings(args)

    # Everything that does not need the model is checked before ComfyUI or diffusers is imported.
    from ..trainer import files, imageset, run as core
    from ..trainer.errors import TrainingError

    m = METHODS[args.method]
    try:
        cfg = core.resolve_config(m, method_values)
        opts = core.default_options(m, **option_values)
        settings.check(cfg)
        settings.check(opts)
        core.check_options(m, cfg, opts)
    except (TrainingError, ValueError) as e:
        fail(describe_error(e))
    try:
        n_found = imageset.count_images(args.images, roots=imageset.ANY_FOLDER)  # your own files
    except imageset.ImageSetError as e:
        fail(f"--images: {e}")
    if n_found < m.min_images:
        fail(f"--images: {m.title} needs at least {m.min_images} images, the folder has {n_found}; add images")
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        fail(f"--checkpoint {args.checkpoint!r} is not a file")
    if args.diffusers and not os.path.isdir(os.path.join(args.diffusers, "unet")):
        fail(f"--diffusers {args.diffusers!r} is not a diffusers model folder (no unet/)")
    if args.host == "diffusers" and not args.diffusers:
        fail("--host diffusers needs --diffusers DIR (a diffusers SD1.x/SD2.x model folder)")
    name = args.name or args.method
    try:
        saver = files.Saver(files.Folders(args.out, args.out, "--out", "--out"), name, host=args.host, what="--name")
    except (TrainingError, ValueError) as e:
        fail(describe_error(e))

    from . import hosts

    t_load = time.perf_counter()
    host = hosts.load(args)
    print(f"loaded {host.describe} ({host.family}) in {time.perf_counter() - t_load:.1f} s", flush=True)
    resolution = (args.resolution or hosts.checkpoint_resolution(args.checkpoint if args.host == "comfy" else "")
                  or host.native_resolution() or 512)
    try:
        image_set = imageset.prepare_image_set(None, args.images, resolution, args.flip, min_images=m.min_images,
                                               roots=imageset.ANY_FOLDER)
    except imageset.ImageSetError as e:
        fail(f"--images: {e}")
    print(image_set.describe(), flush=True)
    for w in image_set.warnings:
        print(f"warning: {w}", file=sys.stderr)
    saver.images, saver.resolution = len(image_set), image_set.resolution
    resume = None
    if args.resume:
        try:
            resume = files.load_resume(args.resume, method=m, cfg=cfg, opts=opts, fingerprint=host.fingerprint(),
                                       label="--resume")
        except (TrainingError, ValueError) as e:
            fail(describe_error(e))

    prompts = [p for p in args.sample_prompts.split("|") if p.strip()]
    os.makedirs(args.out, exist_ok=True)
    grids = Grids(host, args, image_set.resolution)
    before = grids.sample("before", prompts or [m.prompts(cfg, image_set.captions).usage], None, None)
    from .progress import Bar

    bar = Bar(preview_dir=args.out)
    try:
        outcome = core.run(host, m, cfg, image_set, opts, saver=saver, resume=resume, on_progress=bar)
    except TrainingError as e:
        bar.close()
        fail(describe_error(e))
    except KeyboardInterrupt:
        bar.close()
        kept = [p for p in saver_files(args.out) if "_partial_" in p]
        fail("interrupted" + (f"; kept {', '.join(kept)}" if kept and opts.on_cancel == "keep" else "; nothing was written"))
    bar.close()
    for w in outcome.warnings:
        print(f"warning: {flags_in_text(w, outcome.config)}", file=sys.stderr)
    if outcome.last_preview is not None:
        from ..trainer.grids import save_png, to_uint8

        save_png(to_uint8(outcome.last_preview)[0], os.path.join(args.out, "preview_final.png"))
    if outcome.quality is not None:
        print(outcome.quality.text())
        from ..trainer.grids import save_png, to_uint8

        save_png(to_uint8(outcome.quality.grid)[0], os.path.join(args.out, "quality_report.png"))
    after = grids.sample("after", prompts or [outcome.prompts.usage], outcome.adapter, outcome.token)
    run_json = {"method": m.name, "host": args.host, "model": host.describe, "family": host.family,
                "images": len(image_set), "resolution": image_set.resolution,
                "train_seconds": {s.name: round(s.seconds, 3) for s in outcome.stages}, "files": outcome.files,
                "save_error": outcome.save_error, "settings": settings.as_dict(cfg), "options": settings.as_dict(opts),
                "memory": outcome.plan.describe() if outcome.plan else [],
                "quality": outcome.quality.as_dict() if outcome.quality is not None else None,
                "prompts": prompts or [outcome.prompts.usage], "args": vars(args)}
    run_json["grids"] = grids.write(before, after)
    tmp = os.path.join(args.out, "run.json.tmp")
    with open(tmp, "w") as f:
        json.dump(run_json, f, indent=1, default=str)
    os.replace(tmp, os.path.join(args.out, "run.json"))
    host.release()
    for p in outcome.files:
        print(f"saved {p}")
    if outcome.save_error:
        print(f"dstrain: {outcome.save_error}", file=sys.stderr)
    print(f"wrote {os.path.join(args.out, 'run.json')}")
    return 1 if outcome.save_error else 0


def saver_files(folder: str) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except OSError:
        return []


class Grids:
    """Before/after sample grids (one row per prompt, seeds 0..n-1), with a progress bar."""

    def __init__(self, host, args, resolution: int):
        self.host, self.args, self.resolution = host, args, resolution

    def sample(self, label: str, prompts: list[str], adapter, token):
        import torch
        from tqdm import tqdm

        n = self.args.samples
        if n <= 0:
            return None
        rows = []
        with tqdm(total=n * len(prompts), desc=f"{label} grid", unit="img", dynamic_ncols=True) as bar:
            for p in prompts:
                for seed in range(n):
                    lat = self.host.sample(p, [seed], resolution=self.resolution, steps=self.args.sample_steps,
                                           cfg=self.args.cfg, adapter=adapter, token=token)
                    rows.append(self.host.decode_images(lat)[:1])
                    bar.update(1)
        return torch.cat(rows)

    def write(self, before, after) -> list[str]:
        if before is None or after is None:
            return []
        import torch

        from ..trainer.grids import save_png, tile

        out = {"samples_before.png": before, "samples_after.png": after,
               "samples_before_after.png": torch.cat([before, after])}
        for fname, images in out.items():
            save_png(tile(images, self.args.samples), os.path.join(self.args.out, fname))
        return list(out)
