"""Personalization quality benchmark in the miniature SD world (miniworld/): learn subjects the model
never saw (held-out concepts: neither their names nor their images were trained) from 4 images each
with Textual Inversion, DreamBooth with and without prior preservation and the rare-token method,
through the core's one entry point (trainer.run.run over ComfyHost), and measure fidelity, language
drift, forgetting, prompt fidelity and time. Prints tables (pixel and EfficientNet-Lite0 features),
writes JSON after every run (a stopped run resumes: rerun the same command) and labelled sample grids.

    eval "$(bash .ci/setup.sh | tail -2)"
    $DS_VENV/bin/python bench/personalize_quality.py                          # the benchmark (defaults)
    $DS_VENV/bin/python bench/personalize_quality.py --subjects 5 --seeds 0 --threads 2 \
        --out bench/results/personalize_quality_defaults.json         # default steps, 5 subjects (75 min)
    $DS_VENV/bin/python bench/personalize_quality.py --methods dreambooth_no_prior --subjects 3 \
        --seeds 0 --unet-lr 1e-4 --sweep unet_lr=1e-5,3e-5,1e-4 --out bench/results/personalize_sweep_lr.json
    $DS_VENV/bin/python bench/personalize_quality.py --methods dreambooth_no_prior --subjects 5 \
        --seeds 0 1 2 --sweep min_timestep=0,250 max_timestep=500,1000 \
        --paired-against max_timestep=1000,min_timestep=0 --out PART.json    # which noise levels do the damage

Settings: the method defaults (trainer/methods/personalize.py PersonalizeConfig) and the run defaults
the node shows for the method (trainer/run.py default_options) unless a flag overrides them; previews off (they are not
measured). `--sweep key=v1,v2 ...` runs every combination of the listed values (keys: unet_lr, ti_lr,
rank, alpha (a number, or `r` = the rank), batch, unet_steps, ti_steps, train_mode, init, lambda_prior,
class_images, min_timestep, max_timestep: the run's timestep range) as named variants of one result
file. `--init peft` re-initialises ComfyUI's trainable LoRA the way kohya / PEFT / diffusers (and this
pack's diffusers host) do: `down` random (Kaiming over the layer's input width), `up` zero, instead of
ComfyUI's `up` random (over the rank), `down` zero.

Subjects: held-out concepts with a class noun that the model knows from training names (cat face ->
"cat", ...), each given as 4 images: its Google and Twitter renderings, and both shifted by (3, -2)
pixels on white. Every sample is ComfyUI's own sampler (euler / normal, CFG, empty negative) from the
returned MODEL and CLIP (what a user wires into KSampler); samples of the same prompt and seed are
paired across models. Metrics, per run, in two feature spaces:

* pixel: 16x16 area-downsampled RGB, RMS distance (lower = closer);
* lite0: EfficientNet-Lite0 ImageNet features (bench/features.py), cosine;

* fidelity  instance prompt ("a photo of <trigger> <class>") samples vs the 4 subject images: pixel =
            mean distance to the nearest subject image (lower is better); lite0 = mean cosine
            similarity over all pairs (DreamBooth's DINO-score recipe; higher is better). The `base`
            row scores the untouched model's class-prompt samples (how close the class alone gets);
* pres      the same for the class-prompt ("a photo of <class>") samples (DreamBooth's PRES: a class
            that collapsed onto the subject scores closer than the base row);
* drift     paired distance between the personalized and the base model's class-prompt samples on
            the same seeds (language drift; lower = less drift);
* div       diversity of the instance samples: mean pairwise distance (DreamBooth's DIV);
* forget    paired distance on "an emoji of <name>" for 8 unrelated training concepts (forgetting);
* prompt    prompt fidelity (a CLIP-T stand-in): share of those 8 unrelated prompts whose sample is
            nearest to the prompted concept's real rendering among the 8 (chance 1/8; the miniature
            model cannot compose "<subject> on a beach", so this asks whether the personalized model
            still draws what a prompt names);
* hf        mean absolute high-pass (image minus its 3x3 box blur) of the instance samples, the
            damage the issue reports (high-frequency noise shaped like the subject); real emoji ~ hf_ref;
* delta     relative size of the trained UNet change per layer, ||dW||_F / ||W||_F (median, max);
* time      wall seconds of run() (class-image generation and the memory probes included) and
            the pure loop seconds per stage.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import runpy
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
runpy.run_path(os.path.join(REPO, "__init__.py"))  # registers the one package name, comfyui_domainstudio

METHODS = ("textual_inversion", "dreambooth", "dreambooth_no_prior", "rare_token")
SHORT = {"textual_inversion": "TI", "dreambooth": "DB+prior", "dreambooth_no_prior": "DB", "rare_token": "rare"}
# Held-out concepts (never trained) and a class noun the model knows from training names.
SUBJECTS = (("cat face", "cat"), ("unicorn face", "horse"), ("automobile", "car"), ("palm tree", "tree"),
            ("yellow heart", "heart"), ("open book", "book"), ("high-speed train", "train"), ("monkey", "monkey"))
N_UNRELATED = 8
SWEEP_KEYS = {"unet_lr": float, "ti_lr": float, "rank": int, "alpha": str, "batch": int, "unet_steps": int,
              "ti_steps": int, "train_mode": str, "init": str, "lambda_prior": float, "class_images": int,
              "min_timestep": int, "max_timestep": int}
PIXEL_KEYS = ("fidelity", "pres", "drift", "div", "forget", "prompt", "hf")
LITE0_KEYS = ("fidelity", "pres", "drift", "div", "forget", "prompt")


# --- metrics -------------------------------------------------------------------------------------

def pixel_features(images: np.ndarray) -> np.ndarray:
    """[N, 64, 64, 3] in 0..1 -> [N, 768]: 16x16 area-downsampled RGB."""
    n, h, w, c = images.shape
    return images.reshape(n, 16, h // 16, 16, w // 16, c).mean(axis=(2, 4)).reshape(n, -1).astype(np.float32)


def rms_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """RMS distance between every row of a and of b."""
    return np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).mean(-1), 0.0))


def high_frequency(images: np.ndarray) -> float:
    """Mean |x - box3x3(x)| over pixels and channels (edge-padded), images in 0..1: the fine detail
    the in-graph quality report measures (trainer/quality.py, fine_detail)."""
    import torch

    from comfyui_domainstudio.trainer.quality import fine_detail

    return fine_detail(torch.from_numpy(np.asarray(images, np.float32)))


def subject_images(google: np.ndarray, twitter: np.ndarray) -> np.ndarray:
    """4 views of one concept: both styles, and both shifted by (3, -2) pixels on white."""
    def shift(im):
        out = np.ones_like(im)
        out[3:, :-2] = im[:-3, 2:]
        return out
    return np.stack([google, twitter, shift(google), shift(twitter)])


def _mean_sd(vals) -> tuple[float, float]:
    vals = [float(v) for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan")
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


# --- sampling ------------------------------------------------------------------------------------

class Sampler:
    """ComfyUI's own sampler on a MODEL/CLIP pair, as KSampler runs it (euler / normal, CFG, empty
    negative, 64x64). Sample i of a call uses noise seed 1000 * seed + i, so the same prompt and seed
    give the same noise on every model (paired samples)."""

    def __init__(self, vae, steps: int, cfg: float, batch: int = 8):
        self.vae, self.steps, self.cfg, self.batch = vae, steps, cfg, batch

    @staticmethod
    def encode(clip, text: str):
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))

    def __call__(self, model, clip, prompts: list[str], seed: int) -> np.ndarray:
        import torch

        import comfy.sample

        out = []
        with torch.inference_mode():
            neg = self.encode(clip, "")
            for start in range(0, len(prompts), self.batch):
                chunk = prompts[start:start + self.batch]
                conds = [self.encode(clip, p) for p in chunk]
                if all(p == chunk[0] for p in chunk):
                    pos = conds[0]  # one conditioning broadcasts over the batch
                else:
                    pos = [[torch.cat([c[0][0] for c in conds]), dict(conds[0][0][1])]]
                latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros([len(chunk), 4, 8, 8]))
                noise = torch.cat([comfy.sample.prepare_noise(latent[:1], 1000 * seed + start + i)
                                   for i in range(len(chunk))])
                s = comfy.sample.sample(model, noise, self.steps, self.cfg, "euler", "normal", pos, neg, latent,
                                        disable_pbar=True, seed=1000 * seed + start)
                out.append(self.vae.decode(s).float().clamp(0, 1).reshape(-1, 64, 64, 3).cpu().numpy())
        return np.concatenate(out)


# --- settings ------------------------------------------------------------------------------------

def variant_name(v: dict) -> str:
    return ",".join(f"{k}={v[k]}" for k in sorted(v)) or "defaults"


def parse_sweep(items: list[str]) -> list[dict]:
    axes = []
    for item in items:
        key, _, values = item.partition("=")
        if key not in SWEEP_KEYS or not values:
            raise SystemExit(f"--sweep {item!r}: use key=v1,v2 with key one of {', '.join(SWEEP_KEYS)}")
        axes.append([(key, SWEEP_KEYS[key](v)) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def resolve(args, variant: dict, method: str, seed: int, noun: str):
    """(PersonalizeConfig, RunOptions, init) of one run: core defaults < flags < the variant."""
    from comfyui_domainstudio.trainer import run as core

    s = {"unet_lr": args.unet_lr, "ti_lr": args.ti_lr, "rank": args.rank, "alpha": args.alpha, "batch": args.batch,
         "unet_steps": args.unet_steps, "ti_steps": args.ti_steps, "train_mode": args.train_mode, "init": args.init,
         "lambda_prior": args.lambda_prior, "class_images": args.class_images,
         "min_timestep": args.min_timestep, "max_timestep": args.max_timestep}
    s.update(variant)
    cfg_values = {"class_noun": noun}
    for key, field in (("unet_lr", "unet_learning_rate"), ("ti_lr", "ti_learning_rate"), ("batch", "batch_size"),
                       ("unet_steps", "unet_steps"), ("ti_steps", "ti_steps"), ("lambda_prior", "lambda_prior"),
                       ("class_images", "class_images")):
        if s[key] is not None:
            cfg_values[field] = s[key]
    cfg = core.resolve_config(method, cfg_values)
    opts = core.default_options(method, train_seed=seed, preview_every=0)  # what the node shows for the method
    if s["train_mode"] is not None:
        opts.train_mode = s["train_mode"]
    if s["rank"] is not None:
        opts.lora_rank = int(s["rank"])
    if s["alpha"] is not None:
        opts.lora_alpha = float(opts.lora_rank) if str(s["alpha"]) == "r" else float(s["alpha"])
    for key in ("min_timestep", "max_timestep"):  # the run's timestep range, every stage (RunOptions)
        if s[key] is not None:
            setattr(opts, key, int(s[key]))
    return cfg, opts, (s["init"] or "comfy")


def peft_init_host(host_cls):
    """A ComfyHost whose trainable LoRA starts the kohya / PEFT / diffusers way: down ~ Kaiming
    uniform over the input width (a = sqrt 5), up = 0 (ComfyUI's create_train does the reverse).
    Since 2026-12-02 the pack's ComfyHost itself starts this way (trainer/hosts/comfy.py
    start_like_kohya), so --init comfy and peft now differ only in the random draw; the rows of
    bench/results/personalize_sweep_lr.json were measured before, with ComfyUI's start as "comfy"."""
    import torch

    class PeftInitHost(host_cls):
        def attach(self, mode, rank, alpha, seed):
            adapter = super().attach(mode, rank, alpha, seed)
            g = torch.Generator().manual_seed(int(seed) + 7919)
            with torch.no_grad():
                for d in adapter.layers():
                    if d.up is None:
                        continue
                    down = torch.empty(d.down.shape[0], d.down[0].numel())
                    torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=g)
                    d.down.copy_(down.reshape(d.down.shape))
                    d.up.zero_()
            return adapter

    return PeftInitHost


def diagnose(host, host_peft, images, noun: str, out_path: str) -> dict:
    """Checks for defects behind a damaged personalization, on the loaded model; writes JSON.

    1. noise levels: the timesteps of host.sample_sigmas (mapped back through the model sampling)
       against uniform over 0..999 (10 bins, chi-square);
    2. loss weighting: host.denoising_loss against the eps-MSE computed from the model's own eps
       (x_t - x0_pred) / sigma on the same draw;
    3. LoRA step size: ||dW||_F after 1 and 10 Adam steps of dreambooth_no_prior (lr 1e-4, rank 8,
       alpha 8, lora_attn) with ComfyUI's LoRA start and the kohya / PEFT one, against the
       prediction for sign-like Adam steps: ComfyUI (up random U(+-1/sqrt r), down 0): per element
       ~ (alpha/r) lr / sqrt 3, i.e. ||dW||_F ~ (alpha/r) lr sqrt(out*in/3) per step; PEFT (down
       random U(+-1/sqrt in), up 0): ||dW||_F ~ (alpha/r) lr sqrt(out*r/3) per step; ratio sqrt(in/r);
    4. token stage: the norm of the init word's vector against the vocabulary's token vectors, and
       what ti_learning_rate x ti_steps allows."""
    import torch

    from comfyui_domainstudio.trainer import run as core
    from comfyui_domainstudio.trainer.host import SessionNeeds
    from comfyui_domainstudio.trainer.hosts import comfy_compat
    from comfyui_domainstudio.trainer.methods.personalize import PersonalizeConfig

    report: dict = {}
    # 1 + 2 ----------------------------------------------------------------------------------------
    with torch.inference_mode(False), torch.no_grad():
        x0 = host.encode_images(torch.from_numpy(images))
        cond = host.encode_prompt(f"a photo of {noun}")

        def fn():
            g = torch.Generator().manual_seed(0)
            sig = host.sample_sigmas(20000, g)
            ms = host.model.model.model_sampling
            t = ms.timestep(sig).float()
            hist = torch.histc(t, bins=10, min=0, max=999)
            expected = len(t) / 10
            chi2 = float(((hist - expected) ** 2 / expected).sum())
            rows = []
            for _ in range(8):
                sigma = host.sample_sigmas(x0.shape[0], g)
                noise = torch.randn(x0.shape, generator=g)
                xt = host.add_noise(x0, noise, sigma)
                pred = host.predict_x0(xt, sigma, cond)
                s = sigma.view(-1, 1, 1, 1)
                eps = (xt - pred) / s
                rows.append((float(host.denoising_loss(pred, x0, sigma)), float(((eps - noise) ** 2).mean())))
            return {"timestep_hist_10_bins": hist.tolist(), "chi2_9dof": chi2, "chi2_p_0.001": 27.88,
                    "sigma_min": float(sig.min()), "sigma_max": float(sig.max()),
                    "loss_vs_eps_mse": rows,
                    "max_rel_diff": max(abs(a - b) / max(abs(b), 1e-12) for a, b in rows)}

        report["noise_and_loss"] = host.session(fn, SessionNeeds(batch_shape=tuple(x0.shape)))
    # 3 -------------------------------------------------------------------------------------------
    steps_report = {}
    for init, h in (("comfy", host), ("peft", host_peft)):
        for steps in (1, 10):
            cfg = core.resolve_config("dreambooth_no_prior", {"class_noun": noun, "unet_steps": steps,
                                                              "unet_learning_rate": 1e-4})
            opts = core.RunOptions(lora_rank=8, lora_alpha=8.0, train_mode="lora_attn", train_seed=0, preview_every=0)
            with torch.inference_mode():
                out = core.run(h, "dreambooth_no_prior", cfg, torch.from_numpy(images), opts)
            dm = h.model.model.diffusion_model
            per = []
            for d in out.adapter.layers():
                w = dm.get_submodule(d.name).weight.detach().float().reshape(d.weight_shape[0], -1)
                r = d.up.shape[1]
                dw = (d.alpha / r) * (d.up.detach().float() @ d.down.detach().float().reshape(r, -1))
                o, i = w.shape
                pred = (d.alpha / r) * 1e-4 * steps * math.sqrt(o * (i if init == "comfy" else r) / 3)
                per.append({"layer": d.name, "in": i, "out": o, "dW_fro": float(dw.norm()), "pred_fro": pred,
                            "W_fro": float(w.norm()), "rel": float(dw.norm() / w.norm()),
                            "rel_spec": float(torch.linalg.matrix_norm(dw, 2) / torch.linalg.matrix_norm(w, 2))})
            steps_report[f"{init}/{steps}"] = {
                "rel_median": float(np.median([p["rel"] for p in per])),
                "rel_spec_max": float(np.max([p["rel_spec"] for p in per])),
                "measured_over_predicted_median": float(np.median([p["dW_fro"] / p["pred_fro"] for p in per])),
                "layers": per}
    c1, p1 = steps_report["comfy/1"]["rel_median"], steps_report["peft/1"]["rel_median"]
    steps_report["comfy_over_peft_step1"] = c1 / p1 if p1 else float("nan")
    report["lora_step"] = steps_report
    # 4 -------------------------------------------------------------------------------------------
    table = comfy_compat.input_embedding_table(host.clip, "clip_l").detach().float()
    norms = table.norm(dim=1)
    d = PersonalizeConfig()
    init_v = host.token_init(d.init_word, 1)["clip_l"]
    report["token"] = {"vocab_norm_median": float(norms.median()), "vocab_norm_p99": float(norms.quantile(0.99)),
                       "vocab_rms_per_element": float(table.pow(2).mean().sqrt()),
                       "init_word": d.init_word, "init_norm": float(init_v.norm()),
                       "ti_learning_rate": d.ti_learning_rate, "ti_steps": d.ti_steps,
                       "max_move_per_element_adam": d.ti_learning_rate * d.ti_steps}
    with open(out_path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(out_path + ".tmp", out_path)
    nl, ls, tk = report["noise_and_loss"], report["lora_step"], report["token"]
    print(f"noise levels: timestep histogram {[int(x) for x in nl['timestep_hist_10_bins']]} chi2 {nl['chi2_9dof']:.1f} "
          f"(uniform if < 27.9); loss vs eps-MSE max relative difference {nl['max_rel_diff']:.2e}")
    for k in ("comfy/1", "peft/1", "comfy/10", "peft/10"):
        print(f"LoRA {k} step(s), lr 1e-4 r8 a8: median ||dW||/||W|| {ls[k]['rel_median']:.2e}, max spectral "
              f"{ls[k]['rel_spec_max']:.2e}, measured/predicted {ls[k]['measured_over_predicted_median']:.2f}")
    print(f"ComfyUI start / PEFT start, first step: {ls['comfy_over_peft_step1']:.1f}x")
    print(f"token: vocabulary vector norm median {tk['vocab_norm_median']:.3f} (init {tk['init_norm']:.3f}); "
          f"ti lr {tk['ti_learning_rate']} x {tk['ti_steps']} steps allows {tk['max_move_per_element_adam']:.2f} "
          f"per element ({tk['max_move_per_element_adam'] * math.sqrt(table.shape[1]):.1f} in norm)")
    print(f"saved {out_path}")
    return report


def delta_stats(host, adapter) -> dict:
    """||dW||_F / ||W||_F per trained layer (median, max) and the largest relative spectral norm."""
    import torch

    rel, spec = [], []
    dm = host.model.model.diffusion_model
    with torch.no_grad():
        for d in adapter.layers():
            w = dm.get_submodule(d.name).weight.detach().float().reshape(d.weight_shape[0], -1)
            if d.diff is not None:
                dw = d.diff.detach().float().reshape(w.shape)
            else:
                dw = (float(d.alpha) / d.up.shape[1]) * (d.up.detach().float() @ d.down.detach().float()
                                                          .reshape(d.down.shape[0], -1))
            rel.append(float(dw.norm() / w.norm().clamp(min=1e-12)))
            spec.append(float(torch.linalg.matrix_norm(dw, 2) / torch.linalg.matrix_norm(w, 2).clamp(min=1e-12)))
    return {"rel_median": float(np.median(rel)), "rel_max": float(np.max(rel)), "spec_max": float(np.max(spec)),
            "layers": len(rel)}


# --- the benchmark -------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--subjects", type=int, default=6, help=f"the first N of {len(SUBJECTS)} fixed held-out subjects")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    for flag, kind in (("--unet-lr", float), ("--ti-lr", float), ("--rank", int), ("--alpha", str), ("--batch", int),
                       ("--unet-steps", int), ("--ti-steps", int), ("--train-mode", str), ("--lambda-prior", float),
                       ("--class-images", int), ("--min-timestep", int), ("--max-timestep", int)):
        ap.add_argument(flag, type=kind, default=None, help="override the core default")
    ap.add_argument("--init", choices=["comfy", "peft"], default=None, help="LoRA start (default: ComfyUI's)")
    ap.add_argument("--sweep", nargs="*", default=[], help="key=v1,v2 ... (see above)")
    ap.add_argument("--samples", type=int, default=8, help="instance and class samples per run")
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--no-lite0", action="store_true", help="pixel metrics only")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--grid-seed", type=int, default=None, help="seed shown in the grids (default: the first)")
    ap.add_argument("--diagnose", action="store_true", help="run the defect checks on the first subject instead "
                    "(writes bench/results/personalize_diagnose.json unless --out says otherwise)")
    ap.add_argument("--paired-against", default="", metavar="VARIANT",
                    help="also compare every other variant with this one, run by run (same subject, method and seed): "
                         "mean difference, how many runs moved which way, sign-flip p")
    ap.add_argument("--paired-from", default="", metavar="RESULT.json",
                    help="take the --paired-against runs from this earlier result instead (same checkpoint and "
                         "sampling; its flags may differ, e.g. a sweep whose variant named the same settings), "
                         "with this result's own runs of that variant")
    ap.add_argument("--paired-from-variant", default="", metavar="NAME",
                    help="the variant of --paired-from that ran the --paired-against settings, when it is named "
                         "otherwise (e.g. 'defaults' of a result made before the setting had its own name)")
    ap.add_argument("--out", default="")
    ap.add_argument("--merge", nargs="*", default=[], metavar="PART.json",
                    help="first take the rows and samples of these results of the same settings (e.g. seeds run as "
                         "separate processes, each with its own --out) -- only the methods, seeds and variants this "
                         "command names --, then run what is still missing")
    ap.add_argument("--merge-only", action="store_true",
                    help="with --merge: train nothing, only combine the parts (a part's missing runs stay missing)")
    args = ap.parse_args(argv)
    args.out = args.out or os.path.join(REPO, "bench", "results", "personalize_diagnose.json" if args.diagnose
                                        else "personalize_quality.json")
    variants = parse_sweep(args.sweep)
    out_json = os.path.abspath(args.out)
    base = out_json[:-5] if out_json.endswith(".json") else out_json
    samples_npz = base + "_samples.npz"
    os.makedirs(os.path.dirname(out_json), exist_ok=True)

    from comfyui_domainstudio.miniworld import build, data
    from comfyui_domainstudio.miniworld.comfyenv import comfy

    comfy()
    import torch

    torch.set_num_threads(max(1, args.threads))
    import comfy.model_management
    import comfy.sd

    from comfyui_domainstudio.trainer import grids
    from comfyui_domainstudio.trainer import run as core
    from comfyui_domainstudio.trainer.hosts.comfy import ComfyHost

    t_start = time.perf_counter()
    ckpt = build.ensure()
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(ckpt)
    google, twitter = data.load("google"), data.load("twitter")
    names = google["names"]
    heldout = set(data.heldout_indices(google))
    known = data.train_indices(google)
    subj = []
    for name, noun in SUBJECTS[:args.subjects]:
        i = names.index(name)
        assert i in heldout, f"{name} must be a held-out concept"
        subj.append((i, noun))
    rng = np.random.default_rng(0)
    unrelated_idx = sorted(rng.choice(known, size=N_UNRELATED, replace=False).tolist())
    unrelated_prompts = [f"an emoji of {names[i]}" for i in unrelated_idx]
    g_img = google["images"].astype(np.float32) / 255
    t_img = twitter["images"].astype(np.float32) / 255
    if args.diagnose:
        si, noun = subj[0]
        diagnose(ComfyHost(model, clip, vae), peft_init_host(ComfyHost)(model, clip, vae),
                 subject_images(g_img[si], t_img[si]), noun, out_json)
        return 0
    extract, cosine = None, None
    if not args.no_lite0:
        import importlib.util

        spec = importlib.util.spec_from_file_location("bench_features", os.path.join(REPO, "bench", "features.py"))
        features = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(features)
        extract, cosine = features.Lite0Features(batch_size=8), features.cosine_distances
    sampler = Sampler(vae, args.sample_steps, args.cfg)

    setting = {"checkpoint": os.path.basename(os.path.dirname(os.path.dirname(ckpt))), "samples": args.samples,
               "sample_steps": args.sample_steps, "cfg": args.cfg, "unrelated": [names[i] for i in unrelated_idx],
               "overrides": {k: getattr(args, k) for k in ("unet_lr", "ti_lr", "rank", "alpha", "batch", "unet_steps",
                                                           "ti_steps", "train_mode", "lambda_prior", "class_images",
                                                           "init")}}
    for key in ("min_timestep", "max_timestep"):  # named only when given: older results keep their resume key
        if getattr(args, key) is not None:
            setting["overrides"][key] = getattr(args, key)
    rows, saved = [], {}
    if os.path.exists(out_json) and os.path.exists(samples_npz):
        with open(out_json) as f:
            old = json.load(f)
        if old.get("setting", {}).get("resume_key") == _resume_key(setting):
            rows = old["rows"]
            with np.load(samples_npz, allow_pickle=False) as z:
                saved = {k: z[k] for k in z.files}
            print(f"resuming {os.path.basename(out_json)}: {len(rows)} rows done")
        else:
            print(f"{os.path.basename(out_json)} has other settings: starting over")
    setting["resume_key"] = _resume_key(setting)
    have = {(r["variant"], r["subject"], r["method"], r["seed"]) for r in rows}
    for part in args.merge:
        with open(part) as f:
            other = json.load(f)
        if other.get("setting", {}).get("resume_key") != setting["resume_key"]:
            raise SystemExit(f"--merge {part}: made with other settings (checkpoint, sampling or overrides differ)")
        new_rows = part_rows(other["rows"], have, args.seeds, args.methods, [variant_name(v) for v in variants])
        with np.load(os.path.splitext(part)[0] + "_samples.npz", allow_pickle=False) as z:
            for k in z.files:
                if _merged_sample(k, new_rows, args.seeds):
                    saved.setdefault(k, z[k])
        rows.extend(new_rows)
        have.update((r["variant"], r["subject"], r["method"], r["seed"]) for r in new_rows)
        print(f"merged {len(new_rows)} rows from {os.path.basename(part)}")
    setting["hf_ref_real_emoji"] = high_frequency(g_img[known][:256])
    saved["prompt_google"] = google["images"][unrelated_idx]
    # bench/rescore.py's personalization branch reads these two (its prompt metric: nearest of all training concepts)
    saved["known_google"] = google["images"][known]
    saved["prompt_target"] = np.array([known.index(i) for i in unrelated_idx])
    done = {(r["variant"], r["subject"], r["method"], r["seed"]) for r in rows}
    reference_rows = rows
    if args.paired_from:
        with open(args.paired_from) as f:
            other = json.load(f)
        same = ("checkpoint", "samples", "sample_steps", "cfg", "unrelated")
        if any(other["setting"].get(k) != setting[k] for k in same):
            raise SystemExit(f"--paired-from {args.paired_from}: another checkpoint or sampling ({', '.join(same)} "
                             "must match)")
        reference_rows = other["rows"]
    known = {r["variant"] for r in reference_rows} - {"base"}
    if not args.paired_from:
        known |= {variant_name(v) for v in variants}
    if args.paired_from_variant and not args.paired_from:
        raise SystemExit("--paired-from-variant names a variant of --paired-from: give --paired-from RESULT.json too")
    theirs_name = args.paired_from_variant or args.paired_against
    if args.paired_against and theirs_name not in known:  # before any training
        raise SystemExit(f"--paired-{'from-variant' if args.paired_from_variant else 'against'} {theirs_name!r}: no "
                         f"such variant {'in ' + args.paired_from if args.paired_from else 'here'} "
                         f"(have: {', '.join(sorted(known))})")
    reference = reference_runs(reference_rows, theirs_name, args.paired_against)
    scorer = Scorer(saved, extract, cosine)

    def save(complete: bool):
        for r in rows:  # metrics always from the saved samples (a resumed run is scored the same way)
            if not r.get("error"):
                r.update(scorer.score(r))
        result = {"complete": complete, "setting": setting, "variants": [variant_name(v) for v in variants],
                  "methods": list(args.methods), "seeds": list(args.seeds),
                  "subjects": [names[i] for i, _ in subj], "subject_index": {str(i): names[i] for i, _ in subj},
                  "class_nouns": {names[i]: n for i, n in subj}, "rows": rows,
                  "summary": summarize(rows), "samples_npz": os.path.basename(samples_npz),
                  "platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "load_average_at_save": os.getloadavg(), "wall_s": round(time.perf_counter() - t_start, 1)}
        if args.paired_against:
            result["paired_against"] = args.paired_against
            if args.paired_from:
                result["paired_from"] = os.path.basename(args.paired_from)
                if args.paired_from_variant:
                    result["paired_from_variant"] = args.paired_from_variant
            theirs = reference if args.paired_from else []
            result["paired"] = paired(rows + theirs, args.paired_against)
        np.savez_compressed(samples_npz + ".tmp.npz", **saved)
        os.replace(samples_npz + ".tmp.npz", samples_npz)
        with open(out_json + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(out_json + ".tmp", out_json)
        return result

    host_plain = ComfyHost(model, clip, vae)
    host_peft = peft_init_host(ComfyHost)(model, clip, vae)
    for si, noun in subj:
        name = names[si]
        imgs = subject_images(g_img[si], t_img[si])
        saved[f"{si}/subject"] = grids.to_uint8(imgs)
        for seed in args.seeds:
            k_cls, k_unrel = f"{si}/base/{seed}/class", f"{si}/base/{seed}/unrelated"
            if args.merge_only and k_cls not in saved:
                continue
            if k_cls not in saved:
                saved[k_cls] = grids.to_uint8(sampler(model, clip, [f"a photo of {noun}"] * args.samples, seed))
            if k_unrel not in saved:
                shared = f"base/{seed}/unrelated"  # the same for every subject
                if shared not in saved:
                    saved[shared] = grids.to_uint8(sampler(model, clip, unrelated_prompts, seed))
                saved[k_unrel] = saved[shared]
            if ("base", name, "base", seed) not in done:
                rows.append({"variant": "base", "subject": name, "si": si, "class_noun": noun, "method": "base",
                             "seed": seed})
                done.add(("base", name, "base", seed))
        for variant in variants:
            vname = variant_name(variant)
            for method in args.methods:
                for seed in args.seeds:
                    if (vname, name, method, seed) in done or args.merge_only:
                        continue
                    cfg, opts, init = resolve(args, variant, method, seed, noun)
                    host = host_peft if init == "peft" else host_plain
                    t0 = time.perf_counter()
                    err, out = "", None
                    try:
                        with torch.inference_mode():
                            out = core.run(host, method, cfg, torch.from_numpy(imgs), opts)
                    except Exception as e:  # noqa: BLE001 - a diverged run is a result too
                        err = str(e)
                    train_s = time.perf_counter() - t0
                    row = {"variant": vname, "subject": name, "si": si, "class_noun": noun, "method": method,
                           "seed": seed, "key": _key(vname, method),
                           "settings": {"unet_lr": cfg.unet_learning_rate, "ti_lr": cfg.ti_learning_rate,
                                        "unet_steps": cfg.unet_steps, "ti_steps": cfg.ti_steps,
                                        "batch": cfg.batch_size, "rank": opts.lora_rank, "alpha": opts.lora_alpha,
                                        "train_mode": opts.train_mode, "init": init,
                                        "lambda_prior": cfg.lambda_prior, "class_images": cfg.class_images},
                           "time_s": round(train_s, 2), "error": err, "load_average": os.getloadavg()[0]}
                    if out is None:
                        print(f"{name:18s} {method:20s} {vname} seed {seed}: FAILED {err}", flush=True)
                    else:
                        row["stage_s"] = {s.name: round(s.seconds, 2) for s in out.stages}
                        row["loss_first_last20"] = {s.name: [float(np.mean(s.history["total"][:20])),
                                                             float(np.mean(s.history["total"][-20:]))]
                                                    for s in out.stages if s.history.get("total")}
                        if out.adapter is not None:
                            row["delta"] = delta_stats(host, out.adapter)
                        if out.token is not None:
                            init_v = host.token_init(core.get(method).init_word(cfg), cfg.num_vectors)["clip_l"]
                            row["token_norm"] = [float(init_v.norm(dim=-1).mean()),
                                                 float(out.token.vectors["clip_l"].norm(dim=-1).mean())]
                        m_out, c_out = out.exported.model, out.exported.clip
                        for kind, prompts in (("instance", [out.prompts.usage] * args.samples),
                                              ("class", [out.prompts.class_prompt] * args.samples),
                                              ("unrelated", unrelated_prompts)):
                            saved[f"{si}/{row['key']}/{seed}/{kind}"] = grids.to_uint8(sampler(m_out, c_out, prompts,
                                                                                              seed))
                        del out, m_out, c_out
                        comfy.model_management.unload_all_models()
                        comfy.model_management.soft_empty_cache()
                        row.update(scorer.score(row))
                        l0 = row.get("lite0", {})
                        print(f"{name:18s} {method:20s} {vname} seed {seed}: fid {row['fidelity']:.4f}/"
                              f"{l0.get('fidelity', float('nan')):.3f} drift {row['drift']:.4f}/"
                              f"{l0.get('drift', float('nan')):.3f} pres {l0.get('pres', float('nan')):.3f} "
                              f"forget {row['forget']:.4f} prompt {row['prompt']:.2f}/{l0.get('prompt', 0):.2f} "
                              f"hf {row['hf']:.4f} dW {row.get('delta', {}).get('rel_median', 0):.3f} "
                              f"({train_s:.0f} s)", flush=True)
                    rows.append(row)
                    done.add((vname, name, method, seed))
                    save(False)

    result = save(True)
    print_tables(result)
    if args.paired_against:
        print_paired(result["paired"], args.paired_against)
    write_grids(result, saved, os.path.dirname(out_json), os.path.basename(base),
                args.grid_seed if args.grid_seed is not None else args.seeds[0])
    print(f"saved {out_json} and {os.path.basename(samples_npz)} ({result['wall_s']:.0f} s)")
    return 0


class Scorer:
    """The metrics of one row from the saved samples (uint8 arrays in `saved`), pixel and Lite0;
    features are cached per array."""

    def __init__(self, saved: dict, extract=None, cosine=None):
        self.saved, self.extract, self.cosine = saved, extract, cosine
        self._px: dict = {}
        self._l0: dict = {}

    def px(self, key):
        if key not in self._px:
            self._px[key] = pixel_features(self.saved[key].astype(np.float32) / 255.0)
        return self._px[key]

    def l0(self, key):
        if key not in self._l0:
            self._l0[key] = self.extract(self.saved[key])
        return self._l0[key]

    def score(self, row: dict) -> dict:
        si, seed = row["si"], row["seed"]
        subj, prompt_ref = f"{si}/subject", "prompt_google"
        b_cls, b_unrel = f"{si}/base/{seed}/class", f"{si}/base/{seed}/unrelated"
        if row["method"] == "base":
            inst, cls, unrel = b_cls, b_cls, b_unrel  # fidelity of the base row: what the class alone gets
        else:
            k = f"{si}/{row['key']}/{seed}"
            inst, cls, unrel = f"{k}/instance", f"{k}/class", f"{k}/unrelated"
        want = np.arange(len(self.saved[prompt_ref]))
        out = {"fidelity": float(rms_distances(self.px(inst), self.px(subj)).min(1).mean()),
               "pres": float(rms_distances(self.px(cls), self.px(subj)).min(1).mean()),
               "drift": float(np.sqrt(((self.px(cls) - self.px(b_cls)) ** 2).mean(1)).mean()),
               "div": _mean_offdiag(rms_distances(self.px(inst), self.px(inst))),
               "forget": float(np.sqrt(((self.px(unrel) - self.px(b_unrel)) ** 2).mean(1)).mean()),
               "prompt": float((rms_distances(self.px(unrel), self.px(prompt_ref)).argmin(1) == want).mean()),
               "hf": high_frequency(self.saved[inst] / 255.0)}
        if self.extract is not None:
            cosd = self.cosine
            out["lite0"] = {"fidelity": float(1 - cosd(self.l0(inst), self.l0(subj)).mean()),
                            "pres": float(1 - cosd(self.l0(cls), self.l0(subj)).mean()),
                            "drift": float(np.diag(cosd(self.l0(cls), self.l0(b_cls))).mean()),
                            "div": _mean_offdiag(cosd(self.l0(inst), self.l0(inst))),
                            "forget": float(np.diag(cosd(self.l0(unrel), self.l0(b_unrel))).mean()),
                            "prompt": float((cosd(self.l0(unrel), self.l0(prompt_ref)).argmin(1) == want).mean())}
        return out


def _mean_offdiag(d: np.ndarray) -> float:
    n = len(d)
    return float((d.sum() - np.trace(d)) / (n * (n - 1))) if n > 1 else float("nan")


def _resume_key(setting: dict) -> str:
    return json.dumps({k: setting[k] for k in ("checkpoint", "samples", "sample_steps", "cfg", "unrelated",
                                               "overrides")}, sort_keys=True)


def part_rows(rows: list[dict], have: set, seeds, methods, variants) -> list[dict]:
    """The rows a --merge part adds: runs of the methods, seeds and variants this command names (and
    their base rows) that are not here yet (`have`: (variant, subject, method, seed))."""
    return [r for r in rows if (r["variant"], r["subject"], r["method"], r["seed"]) not in have
            and r["seed"] in seeds and r["method"] in (*methods, "base") and r["variant"] in (*variants, "base")]


def reference_runs(rows: list[dict], named: str, against: str) -> list[dict]:
    """The runs of variant `named` (e.g. an earlier result's 'defaults') as runs of `against`, the
    --paired-against variant (copies; the earlier result is not changed)."""
    return [dict(r, variant=against) for r in rows if r["variant"] == named]


def _merged_sample(key: str, rows: list[dict], seeds) -> bool:
    """Whether a sample array of a --merge part belongs to the rows taken from it: a subject's images,
    the base model's samples of a kept seed, a kept run's samples (keys as the run loop writes them)."""
    parts = key.split("/")
    if len(parts) == 2:  # "<si>/subject"
        return True
    if len(parts) == 3 and parts[0] == "base":  # "base/<seed>/unrelated"
        return int(parts[1]) in seeds
    if len(parts) != 4:
        return False
    si, run_key, seed = parts[0], parts[1], int(parts[2])  # "<si>/base/<seed>/<kind>", "<si>/<run key>/<seed>/<kind>"
    if run_key == "base":
        return seed in seeds
    return any(r.get("key") == run_key and str(r["si"]) == si and r["seed"] == seed for r in rows)


def _key(vname: str, method: str) -> str:
    """Sample-array key of a (variant, method); the plain method name for the defaults (what
    bench/rescore.py reads)."""
    return method if vname == "defaults" else f"{method}@{vname}"


def summarize(rows: list[dict]) -> dict:
    """{variant: {method: {metric: (mean, sd) over subjects and seeds}}}; lite0 metrics as lite0_<k>."""
    out: dict = {}
    for r in rows:
        out.setdefault(r.get("variant", "defaults"), {}).setdefault(r["method"], []).append(r)
    summary = {}
    for v, by_m in out.items():
        summary[v] = {}
        for m, rs in by_m.items():
            ok = [r for r in rs if not r.get("error")]
            s = {k: _mean_sd([r.get(k) for r in ok]) for k in PIXEL_KEYS}
            s.update({f"lite0_{k}": _mean_sd([r["lite0"][k] for r in ok if "lite0" in r]) for k in LITE0_KEYS})
            s["time_s"] = _mean_sd([r.get("time_s", 0.0) for r in ok])
            for stage in ("token", "unet"):
                s[f"{stage}_s"] = _mean_sd([r["stage_s"][stage] for r in ok if stage in r.get("stage_s", {})])
            s["delta_rel_median"] = _mean_sd([r["delta"]["rel_median"] for r in ok if "delta" in r])
            s["n"] = len(ok)
            s["failed"] = len(rs) - len(ok)
            summary[v][m] = s
    return summary


PAIRED_KEYS = (("fidelity", "pixel fidelity (lower = closer)"), ("lite0.fidelity", "Lite0 fidelity (higher = closer)"),
               ("drift", "class drift, pixel"), ("forget", "forgetting, pixel"), ("hf", "fine detail"))


def _bench_frontier():
    """bench/frontier.py under the one name every bench script and test shares (bench_frontier)."""
    if "bench_frontier" not in sys.modules:
        import importlib.util

        spec = importlib.util.spec_from_file_location("bench_frontier", os.path.join(REPO, "bench", "frontier.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules["bench_frontier"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["bench_frontier"]


def paired(rows: list[dict], against: str) -> dict:
    """{variant: {method: {metric: {mean_diff, sd_diff, n, higher, p}}}}: each run of a variant minus
    the run of `against` with the same subject, method and seed (runs without a partner are left out);
    `higher` counts the runs whose value went up, p is the two-sided sign-flip p (bench/frontier.py)."""
    sign_flip_p = _bench_frontier().sign_flip_p

    def value(r, key):
        space, _, k = key.rpartition(".")
        return (r.get(space) or {}).get(k) if space else r.get(key)

    ok = [r for r in rows if not r.get("error") and r["method"] != "base"]
    ref = {(r["subject"], r["method"], r["seed"]): r for r in ok if r.get("variant") == against}
    out: dict = {}
    for r in ok:
        partner = ref.get((r["subject"], r["method"], r["seed"]))
        if r.get("variant") == against or partner is None:
            continue
        by_key = out.setdefault(r["variant"], {}).setdefault(r["method"], {})
        for key, _ in PAIRED_KEYS:
            a, b = value(r, key), value(partner, key)
            if a is not None and b is not None:
                by_key.setdefault(key, []).append(a - b)
    for v in out.values():
        for m, by_key in v.items():
            v[m] = {k: {"mean_diff": statistics.fmean(d), "sd_diff": statistics.stdev(d) if len(d) > 1 else 0.0,
                        "n": len(d), "higher": sum(x > 0 for x in d), "p": sign_flip_p(d)} for k, d in by_key.items()}
    return out


def print_paired(pairs: dict, against: str) -> None:
    print(f"\npaired against {against} (same subject, method, seed): mean difference ± sd, runs higher / n, p")
    for v, by_m in pairs.items():
        for m, by_key in by_m.items():
            print(f"{v[:34]:34s} {SHORT.get(m, m):8s} " + "  ".join(
                f"{label.split(' (')[0]} {s['mean_diff']:+.4f}±{s['sd_diff']:.4f} {s['higher']}/{s['n']} p {s['p']:.3f}"
                for key, label in PAIRED_KEYS if (s := by_key.get(key))))


def print_tables(result: dict) -> None:
    summary = result["summary"]
    print(f"\nPersonalization of {len(result['subjects'])} held-out miniworld concepts from 4 images, seeds "
          f"{result['seeds']}; mean ± sd over subjects x seeds. Real emoji hf "
          f"{result['setting']['hf_ref_real_emoji']:.4f}.")

    def c(s, k, prec=3):
        mu, sd = s.get(k, (float("nan"), float("nan")))
        return f"{mu:.{prec}f}±{sd:.{prec}f}"

    cols = (("fidelity", "fid"), ("pres", "pres"), ("drift", "drift"), ("div", "div"), ("forget", "forget"),
            ("prompt", "prompt"))
    for space, prefix, note in (("pixel", "", "16x16 RGB RMS distance (fid, pres: to the nearest subject image, "
                                               "lower = closer)"),
                                ("lite0", "lite0_", "EfficientNet-Lite0 cosine (fid, pres: similarity to the subject, "
                                                    "higher = closer; drift, div, forget: distance)")):
        if not any(f"{prefix}fidelity" in s and not math.isnan(s[f"{prefix}fidelity"][0])
                   for by_m in summary.values() for s in by_m.values()):
            continue
        print(f"\n{space}: {note}")
        print(f"{'variant':36s} {'method':20s} " + " ".join(f"{h:>13s}" for _, h in cols)
              + (f" {'hf':>7s} {'dW/W':>6s} {'time s':>9s}" if space == "pixel" else ""))
        for v, by_m in summary.items():
            for m, s in by_m.items():
                line = f"{v[:36]:36s} {m:20s} " + " ".join(f"{c(s, prefix + k):>13s}" for k, _ in cols)
                if space == "pixel":
                    line += f" {s['hf'][0]:7.4f} {s['delta_rel_median'][0]:6.3f} {c(s, 'time_s', 0):>9s}"
                print(line + (f"  ({s['failed']} failed)" if s.get("failed") else ""))


def write_grids(result: dict, saved: dict, out_dir: str, stem: str, seed: int) -> None:
    """<stem>_samples.png: per subject its 4 images, the base model's class-prompt samples, then the
    instance-prompt samples of every (variant, method); <stem>_drift.png: per subject the class-prompt
    samples of the base model and of every (variant, method). Labelled rows (trainer/grids)."""
    import torch

    from comfyui_domainstudio.trainer import grids

    index = {name: si for si, name in result["subject_index"].items()}
    variants = [v for v in result["variants"]]
    pairs = [(v, m) for v in variants for m in result["methods"]]

    def label(v, m):
        return SHORT.get(m, m) if len(variants) == 1 else f"{SHORT.get(m, m)} {v}"

    for kind, fname in (("instance", f"{stem}_samples.png"), ("class", f"{stem}_drift.png")):
        rows = []
        for name in result["subjects"]:
            si = index[name]
            noun = result["class_nouns"][name]
            if kind == "instance":
                rows.append((torch.from_numpy(saved[f"{si}/subject"] / 255.0), f"{name} (4 images)"))
            if f"{si}/base/{seed}/class" in saved:
                rows.append((torch.from_numpy(saved[f"{si}/base/{seed}/class"] / 255.0), f"base: {noun}"))
            for v, m in pairs:
                k = f"{si}/{_key(v, m)}/{seed}/{kind}"
                if k in saved:
                    rows.append((torch.from_numpy(saved[k] / 255.0), label(v, m)))
        if rows:
            width = max(120, 7 * max(len(lbl) for _, lbl in rows) + 8)
            grids.save_png(grids.to_uint8(grids.labelled_rows(rows, label_width=width)[0]), os.path.join(out_dir, fname))


if __name__ == "__main__":
    sys.exit(main())
