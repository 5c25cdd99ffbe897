"""Low-rank training parameterisation of ComfyUI's UNet, expanded to ordinary weights for shipping.

ComfyUI detects an SD1.5 UNet only with ``model_channels`` 320 (tests/tiny_models.py), so every
convolution of a multi-level UNet is at least 320 -> 320 wide: at full rank even the smallest
two-level layout (6 res-blocks, no attention) has ~22 M parameters, 44 MB in fp16, and most of
that width is wasted on 8x8 latents. Here the big layers are trained as products of small factors:

* a k x k convolution ``Cin -> Cout`` becomes 1x1 ``Cin -> r`` -> k x k ``r -> r`` (stride and
  padding of the original) -> 1x1 ``r -> Cout`` (+ bias): a ResNet bottleneck without the
  nonlinearities, i.e. a rank-r convolution;
* a linear layer ``in -> out`` becomes ``in -> r -> out`` (+ bias).

There is no nonlinearity between the factors, so each product is *exactly* one ordinary layer:
:func:`expanded_state_dict` multiplies the factors out into the UNet's own keys
(``input_blocks.1.0.in_layers.2.weight`` ...) and the checkpoint ComfyUI loads is a standard
full-width SD1.5-layout UNet. Only the factors ship (``weights/unet_factors_fp16.safetensors``);
``miniworld.build`` expands them. A layer is factorised only when that at least halves its size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FactorConv2d(nn.Module):
    """Rank-``rank`` k x k convolution: ``up(core(down(x))) + bias`` (all linear)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, padding: int, rank: int, bias: bool):
        super().__init__()
        self.stride, self.padding, self.kernel = stride, padding, kernel
        self.down = nn.Parameter(torch.empty(rank, cin, 1, 1))
        self.core = nn.Parameter(torch.empty(rank, rank, kernel, kernel)) if kernel > 1 else None
        self.up = nn.Parameter(torch.empty(cout, rank, 1, 1))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None

    def forward(self, x):
        h = F.conv2d(x, self.down.to(x.dtype))
        if self.core is not None:
            h = F.conv2d(h, self.core.to(x.dtype), stride=self.stride, padding=self.padding)
        elif self.stride != 1:
            h = h[..., ::self.stride, ::self.stride]
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(h, self.up.to(x.dtype), b)

    def full_weight(self) -> torch.Tensor:
        up, down = self.up[:, :, 0, 0], self.down[:, :, 0, 0]
        if self.core is None:
            return (up @ down)[:, :, None, None]
        return torch.einsum("ob,bakl,ai->oikl", up, self.core, down)


class FactorLinear(nn.Module):
    """Rank-``rank`` linear layer: ``up(down(x)) + bias``."""

    def __init__(self, fin: int, fout: int, rank: int, bias: bool):
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, fin))
        self.up = nn.Parameter(torch.empty(fout, rank))
        self.bias = nn.Parameter(torch.zeros(fout)) if bias else None

    def forward(self, x):
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype), b)

    def full_weight(self) -> torch.Tensor:
        return self.up @ self.down


def _full_params(m: nn.Module) -> int:
    return m.weight.numel()


def _factor_params(m: nn.Module, rank: int) -> int:
    if isinstance(m, nn.Conv2d):
        k = m.kernel_size[0]
        return rank * m.in_channels + (rank * rank * k * k if k > 1 else 0) + m.out_channels * rank
    return rank * m.in_features + m.out_features * rank


def _init(f: nn.Module, zero: bool, gen: torch.Generator) -> None:
    """Each factor variance-preserving (N(0, 1/fan_in)); the product scaled by 1/sqrt(3), the output
    variance of PyTorch's default init. ``zero``: the original layer was zero-initialised (residual
    outputs), so ``up`` and ``bias`` start at 0 (LoRA-style) and the product is exactly 0."""
    with torch.no_grad():
        f.down.copy_(torch.randn(f.down.shape, generator=gen) / math.sqrt(f.down[0].numel()))
        if getattr(f, "core", None) is not None:
            f.core.copy_(torch.randn(f.core.shape, generator=gen) / math.sqrt(f.core[0].numel()))
        if zero:
            f.up.zero_()
        else:
            f.up.copy_(torch.randn(f.up.shape, generator=gen) / math.sqrt(3 * f.up[0].numel()))
        if f.bias is not None:
            f.bias.zero_()


def rank_for(ranks: dict, name: str) -> int:
    """The rank of layer ``name`` from ``ranks`` ({"conv", "attn", "ff", "emb"}: int; 0 = full rank)."""
    leaf = name.rsplit(".", 2)
    if "emb_layers" in name or name.startswith("time_embed"):
        return ranks["emb"]
    if ".ff." in name:
        return ranks["ff"]
    if ".attn1." in name or ".attn2." in name or leaf[-1] in ("proj_in", "proj_out"):
        return ranks["attn"]
    return ranks["conv"]


def factorize(unet: nn.Module, ranks: dict, seed: int, min_saving: float = 0.75,
              skip=("input_blocks.0.0", "out.2")) -> dict:
    """Replace every Conv2d / Linear of ``unet`` whose factorisation at its rank (:func:`rank_for`)
    has at most ``min_saving`` of its parameters by a Factor module (in place; fresh seeded init,
    zero-initialised layers stay zero). Returns {module path: (full params, factor params)}."""
    gen = torch.Generator().manual_seed(seed)
    done = {}
    for name, m in list(unet.named_modules()):
        if name in skip or not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        rank = rank_for(ranks, name)
        if not rank or _factor_params(m, rank) > min_saving * _full_params(m):
            continue
        zero = bool((m.weight == 0).all())
        if isinstance(m, nn.Conv2d):
            if m.groups != 1 or m.dilation != (1, 1) or m.kernel_size[0] != m.kernel_size[1]:
                continue
            f = FactorConv2d(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0], rank,
                             m.bias is not None)
        else:
            f = FactorLinear(m.in_features, m.out_features, rank, m.bias is not None)
        _init(f, zero, gen)
        parent_name, _, leaf = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        setattr(parent, leaf, f)
        done[name] = (_full_params(m), _factor_params(m, rank))
    return done


def expanded_state_dict(unet: nn.Module) -> dict:
    """The factorised UNet's state dict with every Factor module multiplied out: the keys and shapes
    of the ordinary ComfyUI UNet (``<path>.weight``, ``<path>.bias``)."""
    sd = {}
    factors = {n: m for n, m in unet.named_modules() if isinstance(m, (FactorConv2d, FactorLinear))}
    with torch.no_grad():
        for k, v in unet.state_dict().items():
            owner = k.rpartition(".")[0]
            if owner in factors:
                continue
            sd[k] = v.detach().clone()
        for n, m in factors.items():
            sd[f"{n}.weight"] = m.full_weight().detach().float().clone()
            if m.bias is not None:
                sd[f"{n}.bias"] = m.bias.detach().float().clone()
    return sd
