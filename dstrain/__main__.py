"""Headless trainer: `python -m dstrain` (run from the repository root).

Trains DomainStudio or a personalization method on a folder of images against a Stable Diffusion
checkpoint (single-file .safetensors/.ckpt, or a diffusers folder) and writes the same weight files
as the ComfyUI nodes, a before/after sample grid and a run.json. No ComfyUI server or UI: ComfyUI's
model code is used as a library (the tree .ci/setup.sh installs; --comfyui or $COMFYUI_DIR), so
model detection (SD1.x/SD2.x/SDXL, eps/v) and the saved files are exactly the nodes'.

    eval "$(bash .ci/setup.sh | tail -2)"
    $DS_VENV/bin/python -m dstrain --images my_style/ --checkpoint sd15.safetensors --steps 400
    $DS_VENV/bin/python -m dstrain --method rare_token --images my_dog/ --class-noun dog --checkpoint ...

`--host diffusers --diffusers DIR` runs the same core over diffusers models alone and never imports
ComfyUI (trainer/hosts/diffusers.py; SD1.x/SD2.x folders, eps or v_prediction, every method); its
LoRA keys are kohya names of the diffusers module paths, which ComfyUI, A1111 and diffusers all load:

    $DS_VENV/bin/python -m dstrain --host diffusers --diffusers sd15_folder/ --images my_style/ --steps 400

Ctrl-C stops training; nothing is written until training has finished (files are written to a
temporary name and renamed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("domainstudio", "rare_token", "textual_inversion", "dreambooth", "dreambooth_no_prior")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m dstrain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True, help="folder of training images")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="single-file SD checkpoint (.safetensors / .ckpt); default: the "
                     "project's miniature emoji SD1.5 (miniworld/, built into the cache on first use)")
    src.add_argument("--diffusers", help="diffusers-format model folder (unet/, vae/, text_encoder/ ...)")
    ap.add_argument("--host", choices=["comfy", "diffusers"], default="comfy",
                    help="model code: ComfyUI's (default; any checkpoint ComfyUI loads) or diffusers' alone "
                         "(no ComfyUI import; needs --diffusers DIR of an SD1.x/SD2.x pipeline)")
    ap.add_argument("--method", choices=METHODS, default="domainstudio")
    ap.add_argument("--out", default="dstrain_output", help="output folder (created)")
    ap.add_argument("--name", default="", help="file name stem of the delta (default: the method)")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR", ""), help="ComfyUI tree (default $COMFYUI_DIR)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--flip", action="store_true", help="add mirrored copies of the images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=None, help="default: 4 (domainstudio) / 1 (personalization)")
    ap.add_argument("--train-mode", default="lora_attn", choices=["lora_attn", "lora_all", "full_attn", "full_all"])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=8.0)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ds = ap.add_argument_group("domainstudio")
    ds.add_argument("--steps", type=int, default=200)
    ds.add_argument("--lr", type=float, default=1e-4)
    ds.add_argument("--target-prompt", default="")
    ds.add_argument("--source-prompt", default="")
    ds.add_argument("--lambda-img", type=float, default=100.0)
    ds.add_argument("--lambda-hf", type=float, default=100.0)
    ds.add_argument("--lambda-hfmse", type=float, default=0.1)
    ds.add_argument("--feature-space", choices=["latent", "pixel"], default="latent")
    pz = ap.add_argument_group("personalization")
    pz.add_argument("--class-noun", default="dog")
    pz.add_argument("--token", default="ds_subject", help="new token (rare_token / textual_inversion)")
    pz.add_argument("--identifier", default="sks", help="DreamBooth identifier")
    pz.add_argument("--init-word", default="quaint")
    pz.add_argument("--num-vectors", type=int, default=1)
    pz.add_argument("--ti-steps", type=int, default=500)
    pz.add_argument("--ti-lr", type=float, default=5e-3)
    pz.add_argument("--unet-steps", type=int, default=400)
    pz.add_argument("--unet-lr", type=float, default=1e-4)
    ap.add_argument("--class-images", type=int, default=0,
                    help="prior-preservation class images (dreambooth: default 100; domainstudio: default 0 = off)")
    ap.add_argument("--lambda-prior", type=float, default=1.0)
    sm = ap.add_argument_group("samples")
    sm.add_argument("--sample-prompts", default="", help="'|'-separated prompts for the grid (default: the training prompt)")
    sm.add_argument("--samples", type=int, default=4, help="samples per prompt (seeds 0..n-1)")
    sm.add_argument("--sample-steps", type=int, default=20)
    sm.add_argument("--cfg", type=float, default=6.0)
    return ap.parse_args(argv)


def import_comfy(comfy_dir: str, device: str):
    if not comfy_dir or not os.path.isfile(os.path.join(comfy_dir, "comfy", "sd.py")):
        sys.exit("dstrain: ComfyUI's code is needed as a library: pass --comfyui DIR or set COMFYUI_DIR "
                 "(`eval \"$(bash .ci/setup.sh | tail -2)\"` installs the pinned tree)")
    sys.path.insert(0, comfy_dir)
    import torch

    import comfy.cli_args

    comfy.cli_args.args.cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    import comfy.sd  # noqa: F401  (model_management reads the args on import)


def load_model(args):
    import comfy.diffusers_load
    import comfy.sd

    if not args.checkpoint and not args.diffusers:
        from miniworld import build

        args.checkpoint = build.ensure()
    if args.checkpoint:
        if not os.path.isfile(args.checkpoint):
            sys.exit(f"dstrain: --checkpoint {args.checkpoint!r} is not a file")
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(args.checkpoint)
    else:
        if not os.path.isdir(os.path.join(args.diffusers, "unet")):
            sys.exit(f"dstrain: --diffusers {args.diffusers!r} is not a diffusers model folder (no unet/)")
        model, clip, vae = comfy.diffusers_load.load_diffusers(args.diffusers)
    if model is None or clip is None or vae is None:
        sys.exit("dstrain: the checkpoint lacks a UNet, text encoder or VAE")
    return model, clip, vae


class Progress:
    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)

    def __call__(self, label: str, loss: float):
        self.bar.set_postfix_str(f"{label} loss {loss:.4f}")
        self.bar.update(1)

    def close(self):
        self.bar.close()


def sample_grid(model, clip, vae, prompts: list[str], n: int, resolution: int, steps: int, cfg: float):
    """[len(prompts) * n, H, W, 3] images, row per prompt, seeds 0..n-1 (the same for every model)."""
    import torch

    import comfy.sample

    from trainer.hosts.comfy import encode_prompt

    rows = []
    with torch.inference_mode():
        neg = encode_prompt(clip, "")
        for p in prompts:
            pos = encode_prompt(clip, p)
            for seed in range(n):
                latent = torch.zeros([1, 4, resolution // 8, resolution // 8])
                latent = comfy.sample.fix_empty_latent_channels(model, latent)
                noise = comfy.sample.prepare_noise(latent, seed)
                out = comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", pos, neg, latent,
                                          disable_pbar=True, seed=seed)
                img = vae.decode(out)
                rows.append(img.reshape(-1, *img.shape[-3:])[:1].clamp(0, 1))
    return torch.cat(rows)


def save_grid(images, cols: int, path: str):
    from trainer.plot import save_png, tile

    save_png(tile(images, cols), path)


class Job:
    """What both hosts need from the arguments: the image set, the method's config, prompts and the
    class-image count, validated before any model is loaded."""

    def __init__(self, args):
        from trainer import deltas
        from trainer.domainstudio import DomainStudioConfig, TrainingError
        from trainer.imageset import ImageSetError, prepare_image_set
        from trainer.personalize import PersonalizeConfig, trains_unet, uses_token

        self.personal = personal = args.method != "domainstudio"
        try:
            self.image_set = prepare_image_set(None, args.images, args.resolution, args.flip,
                                               min_images=1 if personal else 2)
        except ImageSetError as e:
            sys.exit(f"dstrain: --images: {e}")
        try:
            self.name = deltas.sanitize_name(args.name or args.method, "--name")
        except ValueError as e:
            sys.exit(f"dstrain: {e}")
        self.resolution = self.image_set.resolution
        batch = args.batch_size or (1 if personal else 4)
        n_prior = args.class_images if args.method in ("dreambooth", "domainstudio") else 0
        if args.method == "dreambooth" and not args.class_images:
            n_prior = 100
        self.n_prior = n_prior = n_prior if args.lambda_prior > 0 else 0
        if personal:
            self.cfg = cfg = PersonalizeConfig(
                method=args.method, class_noun=args.class_noun,
                trigger=args.token if uses_token(args.method) else args.identifier, init_word=args.init_word,
                num_vectors=args.num_vectors, ti_steps=args.ti_steps, ti_learning_rate=args.ti_lr,
                unet_steps=args.unet_steps, unet_learning_rate=args.unet_lr, batch_size=batch,
                lambda_prior=args.lambda_prior, seed=args.seed)
            self.prompt, self.source_prompt = cfg.instance_prompt(), cfg.class_prompt()
            self.total = ((args.ti_steps if uses_token(args.method) else 0)
                          + (args.unet_steps if trains_unet(args.method) else 0))
        else:
            self.cfg = cfg = DomainStudioConfig(
                steps=args.steps, learning_rate=args.lr, batch_size=batch, lambda_img=args.lambda_img,
                lambda_hf=args.lambda_hf, lambda_hfmse=args.lambda_hfmse,
                lambda_prior=args.lambda_prior if n_prior else 0.0, seed=args.seed)
            self.prompt, self.source_prompt, self.total = args.target_prompt, args.source_prompt, args.steps
        try:
            warnings = cfg.validate(len(self.image_set)) if personal else cfg.validate(len(self.image_set), n_prior)
        except TrainingError as e:
            sys.exit(f"dstrain: {e}")
        for w in (warnings or []) + self.image_set.warnings:
            print(f"warning: {w}", file=sys.stderr)
        self.prompts = [p for p in args.sample_prompts.split("|") if p.strip()] or [self.prompt]

    def write(self, args, *, model_name: str, family: str, fingerprint: str, save_dtype, delta, vectors,
              seconds: dict, before, after) -> int:
        """The nodes' files (embedding, delta), the grids and run.json; prints what was written."""
        import torch

        from trainer import deltas, embeddings

        common = dict(family=family, method=args.method, fingerprint=fingerprint, resolution=self.resolution,
                      dtype=save_dtype, training=dict(vars(args)))
        files = []
        if vectors is not None:
            trigger = self.cfg.trigger
            meta = deltas.build_metadata(kind="embedding", title=trigger, trigger=trigger, steps=args.ti_steps,
                                         learning_rate=args.ti_lr, **common)
            path = os.path.join(args.out, f"{trigger}.safetensors")  # A1111's trigger word is the file name
            files.append(embeddings.save_embedding(
                deltas.unique_path(args.out, trigger) if os.path.exists(path) else path, vectors, meta))
        if delta is not None:
            is_lora = args.train_mode.startswith("lora")
            meta = deltas.build_metadata(kind="lora" if is_lora else "diff", title=self.name,
                                         rank=args.rank if is_lora else None, alpha=args.alpha if is_lora else None,
                                         trigger=self.prompt, steps=args.unet_steps if self.personal else args.steps,
                                         learning_rate=args.unet_lr if self.personal else args.lr, **common)
            files.append(deltas.save_delta(deltas.unique_path(args.out, self.name), delta, meta, dtype=save_dtype))
        run = {"method": args.method, "host": args.host, "model": model_name, "family": family,
               "images": len(self.image_set), "resolution": self.resolution, "train_seconds": seconds, "files": files,
               "prompts": self.prompts, "args": vars(args)}
        if before is not None and after is not None:
            grids = {"samples_before.png": before, "samples_after.png": after,
                     "samples_before_after.png": torch.cat([before, after])}
            for fname, images in grids.items():
                save_grid(images, args.samples, os.path.join(args.out, fname))
            run["grids"] = list(grids)
        with open(os.path.join(args.out, "run.json.tmp"), "w") as f:
            json.dump(run, f, indent=1, default=str)
        os.replace(os.path.join(args.out, "run.json.tmp"), os.path.join(args.out, "run.json"))
        for path in files:
            print(f"saved {path}")
        print(f"wrote {os.path.join(args.out, 'run.json')}")
        return 0


def train_guarded(bar, fn):
    """Run the training call; a refused setting or Ctrl-C exits with a message and writes nothing."""
    from trainer.domainstudio import TrainingError

    try:
        return fn()
    except TrainingError as e:
        sys.exit(f"dstrain: {e}")
    except KeyboardInterrupt:
        sys.exit("dstrain: interrupted; nothing was written")
    finally:
        bar.close()


def main_diffusers(args) -> int:
    """`--host diffusers`: the same core over diffusers models (trainer/hosts/diffusers.py); never
    imports ComfyUI."""
    sys.path.insert(0, REPO)
    import torch

    from trainer.domainstudio import TrainingError
    from trainer.hosts import diffusers as host

    if not args.diffusers:
        sys.exit("dstrain: --host diffusers needs --diffusers DIR (a diffusers SD1.x/SD2.x model folder)")
    if not os.path.isdir(args.diffusers):
        sys.exit(f"dstrain: --diffusers {args.diffusers!r} is not a folder")
    if args.precision != "fp32" and args.method != "domainstudio":
        sys.exit("dstrain: --host diffusers trains personalization methods in fp32 only; drop --precision")
    job = Job(args)
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    t_load = time.perf_counter()
    try:
        models = host.load_diffusers_folder(args.diffusers, device)
    except TrainingError as e:
        sys.exit(f"dstrain: --diffusers: {e}")
    res = job.resolution
    print(f"loaded {args.diffusers} (diffusers, {models.family}, {models.schedule.prediction_type}) in "
          f"{time.perf_counter() - t_load:.1f} s; {job.image_set.describe()}")
    grid = dict(n=args.samples, resolution=res, steps=args.sample_steps, cfg=args.cfg)
    before = host.sample_images(models, None, job.prompts, **grid, adapted=False) if args.samples else None
    prior = None
    if job.n_prior:
        print(f"generating {job.n_prior} class images from {job.source_prompt!r}")
        prior = host.sample_latents(models, None, job.source_prompt, range(args.seed, args.seed + job.n_prior), res,
                                    cfg=args.cfg)
    os.makedirs(args.out, exist_ok=True)
    bar = Progress(job.total)
    if job.personal:
        out = train_guarded(bar, lambda: host.train_personalization_diffusers(
            models, job.image_set.images, job.cfg, train_mode=args.train_mode, rank=args.rank, alpha=args.alpha,
            prior_latents=prior, on_step=lambda stage, step, loss: bar(stage, loss)))
        seconds = {s.name: s.seconds for s in out.stages}
    else:
        out = train_guarded(bar, lambda: host.train_domainstudio_diffusers(
            models, job.image_set.images, job.cfg, target_prompt=job.prompt, source_prompt=job.source_prompt,
            train_mode=args.train_mode, rank=args.rank, alpha=args.alpha, feature_space=args.feature_space,
            prior_latents=prior, precision=args.precision, on_step=lambda step, parts: bar("", parts.total)))
        seconds = {"domainstudio": out.result.seconds}
    after = None
    if args.samples:
        token = getattr(out, "token", None)
        after_prompts = ([host.expand_trigger(p, token.trigger, job.cfg.num_vectors) for p in job.prompts]
                         if token else job.prompts)
        after = host.sample_images(models, out.attached, after_prompts, **grid, adapted=True)
    return job.write(args, model_name=args.diffusers, family=models.family, fingerprint=host.fingerprint(models.unet),
                     save_dtype=host.SAVE_DTYPE, delta=out.delta, vectors=getattr(out, "vectors", None),
                     seconds=seconds, before=before, after=after)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.host == "diffusers":
        return main_diffusers(args)
    import_comfy(args.comfyui, args.device)
    sys.path.insert(0, REPO)
    import torch

    from trainer.hosts import comfy as host
    from trainer.hosts import comfy_personalize as phost

    job = Job(args)
    os.makedirs(args.out, exist_ok=True)
    t_load = time.perf_counter()
    model, clip, vae = load_model(args)
    print(f"loaded {args.checkpoint or args.diffusers} ({host.model_family(model)}) in {time.perf_counter() - t_load:.1f} s; "
          f"{job.image_set.describe()}")
    res = job.resolution
    before = (sample_grid(model, clip, vae, job.prompts, args.samples, res, args.sample_steps, args.cfg)
              if args.samples else None)
    prior = None
    if job.n_prior:
        print(f"generating {job.n_prior} class images from {job.source_prompt!r}")
        with torch.inference_mode():
            prior = host.generate_class_latents(model, clip, job.source_prompt, job.n_prior, res, args.seed)
    bar = Progress(job.total)

    def train():
        with torch.inference_mode():
            if job.personal:
                return phost.train_personalization_comfy(
                    model, clip, vae, job.image_set.images, job.cfg, train_mode=args.train_mode, rank=args.rank,
                    alpha=args.alpha, prior_latents=prior, precision=args.precision,
                    on_step=lambda stage, step, loss: bar(stage, loss))
            return host.train_domainstudio_comfy(
                model, clip, vae, job.image_set.images, job.cfg, target_prompt=job.prompt,
                source_prompt=job.source_prompt, train_mode=args.train_mode, rank=args.rank, alpha=args.alpha,
                feature_space=args.feature_space, prior_latents=prior, precision=args.precision,
                on_step=lambda step, parts: bar("", parts.total))

    out = train_guarded(bar, train)
    if job.personal:
        new_model, new_clip, vectors = out.model, out.clip, out.vectors
        seconds = {s.name: s.seconds for s in out.stages}
    else:
        new_model, new_clip, vectors = out.model, clip, None
        seconds = {"domainstudio": out.result.seconds}
    after = (sample_grid(new_model, new_clip, vae, job.prompts, args.samples, res, args.sample_steps, args.cfg)
             if args.samples else None)
    return job.write(args, model_name=args.checkpoint or args.diffusers, family=host.model_family(model),
                     fingerprint=host.fingerprint(model), save_dtype=host.SAVE_DTYPE, delta=out.delta, vectors=vectors,
                     seconds=seconds, before=before, after=after)


if __name__ == "__main__":
    sys.exit(main())
