"""DomainStudio loss terms (Zhu et al., "DomainStudio: Fine-Tuning Diffusion Models for
Domain-Driven Image Generation using Limited Data", arXiv 2306.14153).

One paper equation per function:

* ``haar_dwt`` / ``haar_idwt``   one-level 2D Haar wavelet transform and its inverse
* ``high_frequency``             hf(x) = LH + HL + HH
* ``pairwise_similarity_log_probs``  log p_ij, softmax over cosine similarities (j != i)
* ``relative_distance_kl``       L_img  (relative-distance preservation)
* ``high_frequency_kl``          L_hf   (L_img applied to the high-frequency bands)
* ``high_frequency_mse``         L_hfmse (paired high-frequency reconstruction)
* ``denoising_loss_x0``          L_simple, the model's native loss written through x0

Pure torch; everything is differentiable and device-agnostic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "haar_dwt",
    "haar_idwt",
    "high_frequency",
    "pairwise_similarity_log_probs",
    "relative_distance_kl",
    "high_frequency_kl",
    "high_frequency_mse",
    "denoising_loss_x0",
]

_REDUCTIONS = ("mean", "batchmean", "sum")

# Guards the cosine denominator so an all-zero sample gets similarity 0 instead of NaN.
_COS_EPS = 1e-8


def haar_dwt(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One-level 2D Haar DWT (stride 2) of ``x`` [N, C, H, W] -> (LL, LH, HL, HH).

    Filters: low L = [1, 1]/sqrt(2), high H = [-1, 1]/sqrt(2). The first letter of a band
    is the filter applied along the height (rows), the second along the width (columns).
    For every 2x2 block [[a, b], [c, d]]:

        LL = (a + b + c + d) / 2
        LH = ((b - a) + (d - c)) / 2
        HL = ((c - a) + (d - b)) / 2
        HH = (a - b - c + d) / 2

    Each output is [N, C, H/2, W/2] (any leading dims are carried through), same dtype and
    device as ``x``. The transform is orthonormal, so sum of squares is preserved.
    Raises ValueError if H or W is odd.
    """
    if x.ndim < 2:
        raise ValueError(f"haar_dwt expects a tensor [N, C, H, W], got shape {tuple(x.shape)}")
    h, w = x.shape[-2], x.shape[-1]
    if h % 2 or w % 2:
        raise ValueError(
            f"haar_dwt needs even height and width, got shape {tuple(x.shape)} (H={h}, W={w})"
        )
    a = x[..., 0::2, 0::2]
    b = x[..., 0::2, 1::2]
    c = x[..., 1::2, 0::2]
    d = x[..., 1::2, 1::2]
    ll = (a + b + c + d) * 0.5
    lh = (b - a + d - c) * 0.5
    hl = (c - a + d - b) * 0.5
    hh = (a - b - c + d) * 0.5
    return ll, lh, hl, hh


def haar_idwt(ll: Tensor, lh: Tensor, hl: Tensor, hh: Tensor) -> Tensor:
    """Exact inverse of ``haar_dwt``: four [N, C, h, w] bands -> x [N, C, 2h, 2w].

    Per block: a = (LL - LH - HL + HH)/2, b = (LL + LH - HL - HH)/2,
               c = (LL - LH + HL - HH)/2, d = (LL + LH + HL + HH)/2.
    """
    if not (ll.shape == lh.shape == hl.shape == hh.shape):
        raise ValueError(
            "haar_idwt bands must share one shape, got "
            f"{tuple(ll.shape)}, {tuple(lh.shape)}, {tuple(hl.shape)}, {tuple(hh.shape)}"
        )
    a = (ll - lh - hl + hh) * 0.5
    b = (ll + lh - hl - hh) * 0.5
    c = (ll - lh + hl - hh) * 0.5
    d = (ll + lh + hl + hh) * 0.5
    *lead, h, w = ll.shape
    # Interleave columns, then rows; stack+reshape keeps it out-of-place for autograd.
    top = torch.stack((a, b), dim=-1).reshape(*lead, h, 2 * w)
    bottom = torch.stack((c, d), dim=-1).reshape(*lead, h, 2 * w)
    return torch.stack((top, bottom), dim=-2).reshape(*lead, 2 * h, 2 * w)


def high_frequency(x: Tensor) -> Tensor:
    """hf(x) = LH + HL + HH of ``haar_dwt(x)`` (LL dropped): [N, C, H, W] -> [N, C, H/2, W/2]."""
    _, lh, hl, hh = haar_dwt(x)
    return lh + hl + hh


def pairwise_similarity_log_probs(x: Tensor) -> Tensor:
    """Log of the paper's relative-distance distribution.

        p_ij = softmax_{j != i}( cos(x_i, x_j) ),   i, j in {0..N-1}

    ``x`` is [N, ...]; each sample is flattened. No temperature. Returns log p as a
    float32 [N, N-1] tensor, row i holding j = 0..N-1 with j = i removed (ascending j).
    Computed in float32 regardless of input precision. Raises ValueError if N < 2.
    """
    if x.ndim < 1 or x.shape[0] < 2:
        raise ValueError(
            "pairwise similarity terms need a batch of at least 2 samples, got shape "
            f"{tuple(x.shape)}"
        )
    n = x.shape[0]
    # Outside autocast: under bf16 autocast (training precision on a GPU, or precision=bf16) the
    # matmul below would round the cosines to ~4e-3, far above the KL terms' own size (1e-6..1e-3).
    with torch.autocast(device_type=x.device.type, enabled=False):
        flat = x.reshape(n, -1).float()
        unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(_COS_EPS)
        sim = unit @ unit.t()
        off_diag = ~torch.eye(n, dtype=torch.bool, device=sim.device)
        # Boolean indexing is row-major, so this keeps j ascending within each row.
        sim = sim[off_diag].reshape(n, n - 1)
        return torch.log_softmax(sim, dim=1)


def relative_distance_kl(adapted: Tensor, source: Tensor, reduction: str = "mean") -> Tensor:
    """Relative-distance preservation loss L_img (and L_hf when fed high-frequency bands).

        L = D_KL(p_sou || p_ada) = sum_i sum_{j != i} p_sou,ij (log p_sou,ij - log p_ada,ij)

    with p from ``pairwise_similarity_log_probs``. ``adapted`` and ``source`` are [N, ...]
    with the same shape and N >= 2; ``source`` is detached (fixed target).

    Direction: the paper writes KL(p_ada || p_sou), but the official code computes
    KL(p_sou || p_ada). We follow the code: the source model is the fixed teacher, so this is
    cross-entropy to a fixed target minus a constant and its gradient on the adapted logits is
    simply p_ada - p_sou, well-behaved even when p_ada has tiny entries; and the paper's
    lambda defaults were tuned with the official code.

    reduction:
      "mean"      mean over all N*(N-1) pointwise terms (official code via KLDivLoss's default;
                  what the paper's lambda_img = lambda_hf = 100 assume)
      "batchmean" sum over j, mean over i
      "sum"       sum over everything (the paper's equation)

    Note: with N = 2 each row has a single entry, so p = 1 and the loss is identically 0.
    Returns a float32 scalar; exactly 0 when adapted == source.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {_REDUCTIONS}")
    if adapted.shape != source.shape:
        raise ValueError(
            "relative_distance_kl needs matching shapes, got adapted "
            f"{tuple(adapted.shape)} and source {tuple(source.shape)}"
        )
    log_q = pairwise_similarity_log_probs(adapted)
    log_p = pairwise_similarity_log_probs(source.detach())
    # Cosines lie in [-1, 1], so p >= e^-2/(N-1) never underflows and no xlogy is needed.
    terms = log_p.exp() * (log_p - log_q)
    if reduction == "mean":
        return terms.mean()
    if reduction == "batchmean":
        return terms.sum() / terms.shape[0]
    return terms.sum()


def high_frequency_kl(adapted: Tensor, source: Tensor, reduction: str = "mean") -> Tensor:
    """L_hf = relative_distance_kl(hf(adapted), hf(source), reduction); inputs [N, C, H, W].

    See ``relative_distance_kl`` for direction and reductions. Float32 scalar.
    """
    if adapted.shape != source.shape:
        raise ValueError(
            "high_frequency_kl needs matching shapes, got adapted "
            f"{tuple(adapted.shape)} and source {tuple(source.shape)}"
        )
    return relative_distance_kl(
        high_frequency(adapted), high_frequency(source.detach()), reduction
    )


def high_frequency_mse(adapted_x0: Tensor, target_x0: Tensor) -> Tensor:
    """L_hfmse = mean over all elements of (hf(adapted_x0) - hf(target_x0))^2.

    Paired: ``target_x0`` [N, C, H, W] is the training image that was noised for each sample,
    ``adapted_x0`` the adapted model's x0 prediction of the same shape. Target is detached.
    Computed and returned in float32 (scalar).
    """
    if adapted_x0.shape != target_x0.shape:
        raise ValueError(
            "high_frequency_mse needs matching shapes, got adapted "
            f"{tuple(adapted_x0.shape)} and target {tuple(target_x0.shape)}"
        )
    hf_a = high_frequency(adapted_x0.float())
    hf_t = high_frequency(target_x0.detach().float())
    return F.mse_loss(hf_a, hf_t, reduction="mean")


def denoising_loss_x0(x0_pred: Tensor, x0: Tensor, sigma: Tensor, prediction: str = "eps",
                      sigma_data: float = 1.0) -> Tensor:
    """The model's own training loss (L_simple), written through its x0 prediction.

    A diffusion model predicts F (eps, or v) and the host turns it into x0 = c_skip·x_t + c_out·F.
    With the target F* that gives the true x0, ``||F - F*||² = ||x0_pred - x0||² / c_out²``, so
    the native loss can be computed from x0 alone, whatever the parameterisation:

    * eps (and rectified flow):  c_out = -sigma                       -> divide by sigma²
    * v-prediction:              c_out = sigma·sd / sqrt(sigma² + sd²)  -> divide by c_out²

    ``sigma`` is [N] (one noise level per sample), ``sd`` the model's sigma_data (1 for SD's
    discrete schedules). Mean over all elements, in float32."""
    if prediction not in ("eps", "v"):
        raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    s = sigma.float().to(x0_pred.device).view(-1, *([1] * (x0.ndim - 1)))
    if prediction == "v":
        sd = float(sigma_data)
        c_out2 = (s * sd) ** 2 / (s**2 + sd**2)
    else:
        c_out2 = s**2
    return (((x0_pred.float() - x0.float()) ** 2) / c_out2).mean()
