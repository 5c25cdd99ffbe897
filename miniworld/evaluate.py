"""Draw with the shipped miniworld model through ComfyUI's stock nodes, and a quick pixel-space check.

    python -m miniworld.evaluate [--n 64] [--cfg 5.0] [--steps 20] [--grid PATH]

CheckpointLoaderSimple -> CLIPTextEncode -> EmptyLatentImage 64x64 -> KSampler (euler/normal) ->
VAEDecode. :func:`generate` is what the tests, bench/miniworld_quality.py (the full measurement with
EfficientNet-Lite0 features: KID, diversity, caption accuracy on training and held-out captions) and
miniworld.sample use. The CLI here needs no extra packages and reports
* VAE PSNR over the shipped training images (VAEEncode/VAEDecode round trip),
* nearest-neighbour caption accuracy in pixel space: the fraction of "an emoji of <name>" samples
  for ``--n`` evenly spread training concepts whose nearest training image (pixel MSE on 16x16
  area-downsampled images, all training concepts as candidates) is their own caption's.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from . import build, config, data
from .comfyenv import comfy


def small(a: np.ndarray) -> np.ndarray:
    return a.reshape(len(a), 16, 4, 16, 4, 3).mean(axis=(2, 4)).reshape(len(a), -1)


def _distances(gen: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Squared 16x16-pixel distances [len(gen), len(refs)]."""
    a, b = small(gen), small(refs)
    return (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T


def nn_accuracy(gen: np.ndarray, ids: np.ndarray, refs: np.ndarray) -> tuple[float, np.ndarray]:
    """Pixel-space (16x16) nearest-neighbour accuracy of ``gen`` [N,64,64,3] in 0..1 against ``refs``."""
    nn = _distances(gen, refs).argmin(1)
    return float((nn == ids).mean()), nn


def own_rank(gen: np.ndarray, ids: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """For each of ``gen``: how many of ``refs`` are nearer (16x16 pixels) than its own ``refs[ids]``
    (0 = the nearest; chance: half of ``refs``)."""
    d = _distances(gen, refs)
    own = d[np.arange(len(gen)), ids]
    return (d < own[:, None]).sum(1)


def load_nodes(path: str | None = None):
    """(ComfyUI's ``nodes`` module, (MODEL, CLIP, VAE)) through the stock CheckpointLoaderSimple."""
    comfy()
    import folder_paths
    import nodes

    path = path or build.ensure()
    folder_paths.add_model_folder_path("checkpoints", os.path.dirname(path))
    return nodes, nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(path))[:3]


def generate(nodes, mw, prompts, seed=0, steps=20, cfg=5.0, batch: int = 1, negative: str = "",
             sampler: str = "euler", scheduler: str = "normal") -> np.ndarray:
    """Stock-node samples, one per prompt, float [N,64,64,3] in 0..1. ``batch`` > 1 draws that many
    prompts in one KSampler call (their CLIPTextEncode outputs stacked on the batch axis, one
    EmptyLatentImage batch, seed ``seed + first index``); 1 = one call per prompt with seed ``seed + i``.
    ``sampler``/``scheduler``: KSampler's sampler_name and scheduler."""
    model, clip, vae = mw
    out = []
    with torch.inference_mode():
        (neg,) = nodes.CLIPTextEncode().encode(clip, negative)
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            conds = [nodes.CLIPTextEncode().encode(clip, p)[0] for p in chunk]
            pos = [[torch.cat([c[0][0] for c in conds]), dict(conds[0][0][1])]]
            if "pooled_output" in pos[0][1] and pos[0][1]["pooled_output"] is not None:
                pos[0][1]["pooled_output"] = torch.cat([c[0][1]["pooled_output"] for c in conds])
            (latent,) = nodes.EmptyLatentImage().generate(64, 64, len(chunk))
            (s,) = nodes.KSampler().sample(model, seed + i, steps, cfg, sampler, scheduler, pos, neg, latent,
                                            denoise=1.0)
            out.append(nodes.VAEDecode().decode(vae, s)[0].float().numpy())
    return np.concatenate(out)


def vae_roundtrip(vae, images01: np.ndarray) -> np.ndarray:
    """VAEEncode/VAEDecode of float images [N,64,64,3] in 0..1 through the checkpoint's VAE."""
    with torch.inference_mode():
        x = torch.from_numpy(images01)
        return np.concatenate([vae.decode(vae.encode(x[i:i + 64])).float().clamp(0, 1).numpy()
                               for i in range(0, len(x), 64)])


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--cfg", type=float, nargs="+", default=[5.0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--template", type=int, default=1)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--grid", default=None)
    a = p.parse_args(argv)
    nodes, mw = load_nodes()
    ref = data.reference()
    refs = ref["images"].astype(np.float32) / 255.0
    rec = vae_roundtrip(mw[2], refs)
    mse = ((rec - refs) ** 2).mean(axis=(1, 2, 3))
    q = {"vae_psnr_db": round(float((10 * np.log10(1 / mse)).mean()), 2),
         "vae_nn_accuracy_pixel": nn_accuracy(rec, np.arange(len(refs)), refs)[0],
         "n_train_concepts": len(refs), "chance": round(1 / len(refs), 5), "sampler": "euler/normal",
         "steps": a.steps, "template": config.CAPTION_TEMPLATES[a.template], "runs": []}
    ids = np.linspace(0, len(refs) - 1, min(a.n, len(refs))).round().astype(int)
    prompts = [ref["captions"][i][a.template] for i in ids]
    for cfg in a.cfg:
        t0 = time.time()
        gen = generate(nodes, mw, prompts, steps=a.steps, cfg=cfg, batch=a.batch)
        acc, nn = nn_accuracy(gen, ids, refs)
        q["runs"].append({"cfg": cfg, "n": len(ids), "nn_accuracy_pixel": round(acc, 3), "seconds": round(time.time() - t0, 1)})
        print(f"cfg {cfg}: pixel nearest-neighbour accuracy {acc:.3f} over {len(ids)} captions "
              f"(chance {1 / len(refs):.4f}) in {time.time() - t0:.0f}s", flush=True)
        if a.grid and cfg == a.cfg[0]:
            from .train import save_grid

            k = min(16, len(ids))
            sel = np.linspace(0, len(ids) - 1, k).round().astype(int)
            save_grid([torch.from_numpy(refs[ids[sel]]).permute(0, 3, 1, 2),
                       torch.from_numpy(gen[sel]).permute(0, 3, 1, 2)], a.grid)
    print(json.dumps(q, indent=1))


if __name__ == "__main__":
    main()
