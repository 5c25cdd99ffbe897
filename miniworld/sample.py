"""Draw prompts with the miniworld checkpoint through ComfyUI's stock nodes (in-process, CPU).

    python -m miniworld.sample "an emoji of tangerine" "an emoji of penguin" --out samples.png

CheckpointLoaderSimple -> CLIPTextEncode (negative: empty) -> EmptyLatentImage 64x64 -> KSampler
(euler/normal) -> VAEDecode; one PNG strip, prompts left to right.
"""

from __future__ import annotations

import argparse

import torch

from .evaluate import generate, load_nodes
from .train import save_grid


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("prompts", nargs="+")
    p.add_argument("--out", default="miniworld_samples.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=5.0)
    a = p.parse_args(argv)
    nodes, mw = load_nodes()
    imgs = generate(nodes, mw, a.prompts, seed=a.seed, steps=a.steps, cfg=a.cfg)
    save_grid([torch.from_numpy(imgs).permute(0, 3, 1, 2)], a.out)
    print(a.out)


if __name__ == "__main__":
    main()
