"""Measure the shipped miniworld model through ComfyUI's stock nodes and record the numbers.

    python -m miniworld.evaluate [--n 97] [--cfg 5.0] [--steps 20] [--grid PATH]

CheckpointLoaderSimple -> CLIPTextEncode -> EmptyLatentImage 64x64 -> KSampler (euler/normal) ->
VAEDecode, for the first caption template of ``--n`` training emoji (evenly spread). Reports
* VAE PSNR over the training images (VAEEncode/VAEDecode round trip),
* nearest-neighbour accuracy: the fraction of generated images whose nearest training image
  (pixel MSE on 16x16 area-downsampled images, all training emoji as candidates) is their own
  caption's (chance = 1 / number of training emoji), and the same for the VAE round trip (ceiling),
and writes them under ``quality`` in miniworld/weights/training.json plus a PNG grid (top row:
training images, bottom row: generated) when --grid is given.
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


def nn_accuracy(gen: np.ndarray, ids: np.ndarray, refs: np.ndarray) -> tuple[float, np.ndarray]:
    d = ((small(gen)[:, None, :] - small(refs)[None, :, :]) ** 2).mean(-1)
    nn = d.argmin(1)
    return float((nn == ids).mean()), nn


def load_nodes():
    comfy()
    import folder_paths
    import nodes

    path = build.ensure()
    folder_paths.add_model_folder_path("checkpoints", os.path.dirname(path))
    return nodes, nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(path))[:3]


def generate(nodes, mw, prompts, seed=0, steps=20, cfg=5.0) -> np.ndarray:
    model, clip, vae = mw
    out = []
    with torch.inference_mode():
        (neg,) = nodes.CLIPTextEncode().encode(clip, "")
        (latent,) = nodes.EmptyLatentImage().generate(64, 64, 1)
        for i, p in enumerate(prompts):
            (pos,) = nodes.CLIPTextEncode().encode(clip, p)
            (s,) = nodes.KSampler().sample(model, seed + i, steps, cfg, "euler", "normal", pos, neg, latent, denoise=1.0)
            out.append(nodes.VAEDecode().decode(vae, s)[0][0].float().numpy())
    return np.stack(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=97)
    p.add_argument("--cfg", type=float, nargs="+", default=[5.0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--template", type=int, default=1)
    p.add_argument("--grid", default=None)
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args(argv)
    nodes, mw = load_nodes()
    ref = data.reference()
    refs = ref["images"].astype(np.float32) / 255.0
    x = torch.from_numpy(refs)
    with torch.inference_mode():
        rec = mw[2].decode(mw[2].encode(x)).float().clamp(0, 1).numpy()
    mse = ((rec - refs) ** 2).mean(axis=(1, 2, 3))
    q = {"vae_psnr_db": round(float((10 * np.log10(1 / mse)).mean()), 2),
         "vae_nn_accuracy": nn_accuracy(rec, np.arange(len(refs)), refs)[0],
         "n_train_emoji": len(refs), "chance": round(1 / len(refs), 4), "sampler": "euler/normal",
         "steps": a.steps, "template": config.CAPTION_TEMPLATES[a.template], "runs": []}
    ids = np.linspace(0, len(refs) - 1, min(a.n, len(refs))).round().astype(int)
    prompts = [ref["captions"][i][a.template] for i in ids]
    for cfg in a.cfg:
        t0 = time.time()
        gen = generate(nodes, mw, prompts, steps=a.steps, cfg=cfg)
        acc, nn = nn_accuracy(gen, ids, refs)
        q["runs"].append({"cfg": cfg, "n": len(ids), "nn_accuracy": round(acc, 3), "seconds": round(time.time() - t0, 1)})
        print(f"cfg {cfg}: nearest-neighbour accuracy {acc:.3f} over {len(ids)} captions "
              f"(chance {1 / len(refs):.3f}) in {time.time() - t0:.0f}s", flush=True)
        if a.grid and cfg == a.cfg[0]:
            from .train import save_grid

            k = min(16, len(ids))
            sel = np.linspace(0, len(ids) - 1, k).round().astype(int)
            save_grid([torch.from_numpy(refs[ids[sel]]).permute(0, 3, 1, 2),
                       torch.from_numpy(gen[sel]).permute(0, 3, 1, 2)], a.grid)
    print(json.dumps(q, indent=1))
    if not a.no_record and os.path.exists(config.RECORD_FILE):
        with open(config.RECORD_FILE) as f:
            rec_json = json.load(f)
        q["command"] = "python -m miniworld.evaluate " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
        rec_json["quality"] = q
        with open(config.RECORD_FILE + ".tmp", "w") as f:
            json.dump(rec_json, f, indent=1)
        os.replace(config.RECORD_FILE + ".tmp", config.RECORD_FILE)


if __name__ == "__main__":
    main()
