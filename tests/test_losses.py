"""Tests for trainer/losses.py against hand-computed cases (pure torch, no ComfyUI)."""

import math

import pytest
import torch

from comfyui_domainstudio.trainer.losses import (
    denoising_loss_x0,
    haar_dwt,
    haar_idwt,
    high_frequency,
    high_frequency_kl,
    high_frequency_mse,
    pairwise_similarity_log_probs,
    relative_distance_kl,
)

R = 1 / math.sqrt(2)  # cosine between [1,0] (or [0,1]) and [1,1]


def t(rows, dtype=torch.float64):
    return torch.tensor(rows, dtype=dtype)


# ---------------------------------------------------------------- Haar DWT


def test_haar_single_block_hand_case():
    # [[a,b],[c,d]] = [[1,2],[3,4]]:
    # LL=(1+2+3+4)/2=5, LH=((2-1)+(4-3))/2=1, HL=((3-1)+(4-2))/2=2, HH=(1-2-3+4)/2=0
    x = t([[[[1.0, 2.0], [3.0, 4.0]]]])
    ll, lh, hl, hh = haar_dwt(x)
    for band, want in ((ll, 5.0), (lh, 1.0), (hl, 2.0), (hh, 0.0)):
        assert band.shape == (1, 1, 1, 1)
        assert band.item() == pytest.approx(want)


def test_haar_two_blocks_keep_position_and_channels():
    # Second block [[5,5],[1,3]]: LL=14/2=7, LH=(0+2)/2=1, HL=((1-5)+(3-5))/2=-3, HH=(5-5-1+3)/2=1
    # Channel 1 is the negation of channel 0, so every band flips sign (no channel mixing).
    c0 = [[1.0, 2.0, 5.0, 5.0], [3.0, 4.0, 1.0, 3.0]]
    x = t([[c0, [[-v for v in row] for row in c0]]])
    ll, lh, hl, hh = haar_dwt(x)
    assert ll.shape == (1, 2, 1, 2)
    want = {"ll": [5.0, 7.0], "lh": [1.0, 1.0], "hl": [2.0, -3.0], "hh": [0.0, 1.0]}
    for name, band in (("ll", ll), ("lh", lh), ("hl", hl), ("hh", hh)):
        assert band[0, 0, 0].tolist() == pytest.approx(want[name]), name
        assert band[0, 1, 0].tolist() == pytest.approx([-v for v in want[name]]), name


def test_haar_vertical_vs_horizontal_edges():
    # Rows differ (horizontal edge): only HL responds. [[0,0],[1,1]] -> HL=(1+1)/2=1.
    ll, lh, hl, hh = haar_dwt(t([[[[0.0, 0.0], [1.0, 1.0]]]]))
    assert (ll.item(), lh.item(), hl.item(), hh.item()) == pytest.approx((1.0, 0.0, 1.0, 0.0))
    # Columns differ (vertical edge): only LH responds. [[0,1],[0,1]] -> LH=(1+1)/2=1.
    ll, lh, hl, hh = haar_dwt(t([[[[0.0, 1.0], [0.0, 1.0]]]]))
    assert (ll.item(), lh.item(), hl.item(), hh.item()) == pytest.approx((1.0, 1.0, 0.0, 0.0))


def test_haar_perfect_reconstruction_and_parseval():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 6, generator=g, dtype=torch.float64)
    bands = haar_dwt(x)
    assert all(b.shape == (2, 3, 4, 3) and b.dtype == torch.float64 for b in bands)
    torch.testing.assert_close(haar_idwt(*bands), x, rtol=0, atol=1e-12)
    energy = sum((b**2).sum() for b in bands)
    torch.testing.assert_close(energy, (x**2).sum(), rtol=1e-12, atol=0)


def test_haar_idwt_hand_case():
    y = haar_idwt(t([[[[5.0]]]]), t([[[[1.0]]]]), t([[[[2.0]]]]), t([[[[0.0]]]]))
    assert y.tolist() == [[[[1.0, 2.0], [3.0, 4.0]]]]


@pytest.mark.parametrize("shape", [(1, 1, 3, 4), (1, 1, 4, 5), (2, 3, 5, 5)])
def test_haar_odd_size_raises(shape):
    with pytest.raises(ValueError, match=r"\(" + ", ".join(map(str, shape)) + r"\)"):
        haar_dwt(torch.zeros(shape))


def test_haar_is_differentiable():
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: haar_dwt(v), (x,))
    assert torch.autograd.gradcheck(lambda v: high_frequency(v), (x,))


# ------------------------------------------------------------ high_frequency


def test_high_frequency_hand_case():
    # LH + HL + HH = 1 + 2 + 0 = 3 (block 1);  1 + (-3) + 1 = -1 (block 2)
    x = t([[[[1.0, 2.0, 5.0, 5.0], [3.0, 4.0, 1.0, 3.0]]]])
    hf = high_frequency(x)
    assert hf.shape == (1, 1, 1, 2)
    assert hf.flatten().tolist() == pytest.approx([3.0, -1.0])


def test_high_frequency_of_constant_is_zero():
    x = torch.full((2, 4, 8, 8), 3.7)
    hf = high_frequency(x)
    assert hf.shape == (2, 4, 4, 4)
    assert torch.count_nonzero(hf) == 0


# ------------------------------------------------- pairwise similarity probs


def test_pairwise_log_probs_hand_case():
    # x = [[1,0],[0,1],[1,1]]: cos01 = 0, cos02 = cos12 = 1/sqrt(2) = R.
    # row 0 (j=1,2): [0, R]   -> [-log(1+e^R), R - log(1+e^R)] ~ [-1.10794, -0.40083]
    # row 1 (j=0,2): [0, R]   -> same as row 0
    # row 2 (j=0,1): [R, R]   -> [log 1/2, log 1/2]
    lse = math.log(1 + math.exp(R))
    want = [[-lse, R - lse], [-lse, R - lse], [math.log(0.5), math.log(0.5)]]
    assert want[0] == pytest.approx([-1.1079403, -0.4008335], abs=1e-6)
    lp = pairwise_similarity_log_probs(t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    assert lp.shape == (3, 2) and lp.dtype == torch.float32
    torch.testing.assert_close(lp, torch.tensor(want, dtype=torch.float32), rtol=0, atol=1e-6)
    torch.testing.assert_close(lp.exp().sum(dim=1), torch.ones(3), rtol=0, atol=1e-6)


def test_pairwise_log_probs_keep_j_order():
    # x = [[1,0],[-1,0],[0,1]]: row 0 (j=1,2) sims [-1, 0] -> p = [1/(1+e), e/(1+e)].
    # Swapped order would give [e/(1+e), 1/(1+e)].
    e = math.e
    lp = pairwise_similarity_log_probs(t([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]))
    assert lp[0].exp().tolist() == pytest.approx([1 / (1 + e), e / (1 + e)], abs=1e-6)


def test_pairwise_log_probs_flatten_and_rows_sum_to_one():
    x = torch.randn(5, 3, 4, 4)
    lp = pairwise_similarity_log_probs(x)
    assert lp.shape == (5, 4)
    torch.testing.assert_close(lp.exp().sum(dim=1), torch.ones(5), rtol=0, atol=1e-6)


def test_pairwise_log_probs_zero_sample_is_finite():
    # All-zero sample: cosine 0 to everyone (eps), so row 0 sims [0, 0] -> [1/2, 1/2].
    lp = pairwise_similarity_log_probs(t([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    assert torch.isfinite(lp).all()
    assert lp[0].exp().tolist() == pytest.approx([0.5, 0.5], abs=1e-6)


def test_pairwise_log_probs_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        pairwise_similarity_log_probs(torch.randn(1, 4, 8, 8))


# ----------------------------------------------------- relative_distance_kl

# Hand case, 3 samples:
#   source  [[1,0],[0,1],[1,1]]   p rows: [1/(1+e^R), e^R/(1+e^R)] x2, [1/2, 1/2]
#   adapted [[1,0],[0,1],[-1,0]]  sims: cos01=0, cos02=-1, cos12=0
#                                  q rows: [e/(1+e), 1/(1+e)], [1/2, 1/2], [1/(1+e), e/(1+e)]
#   row KLs  sum_j p log(p/q) = 0.3486759, 0.0587998, 0.1201145   (sum = 0.5275902)
SRC = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
ADA = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]
KL_SUM = 0.5275901757


def _hand_kl_rows():
    e, eR = math.e, math.exp(R)
    p = [[1 / (1 + eR), eR / (1 + eR)]] * 2 + [[0.5, 0.5]]
    q = [[e / (1 + e), 1 / (1 + e)], [0.5, 0.5], [1 / (1 + e), e / (1 + e)]]
    return [sum(pi * math.log(pi / qi) for pi, qi in zip(pr, qr)) for pr, qr in zip(p, q)]


def test_hand_kl_literals_agree():
    rows = _hand_kl_rows()
    assert rows == pytest.approx([0.3486759, 0.0587998, 0.1201145], abs=1e-6)
    assert sum(rows) == pytest.approx(KL_SUM, abs=1e-9)


@pytest.mark.parametrize(
    "reduction,want",
    [
        ("sum", KL_SUM),  # paper's equation
        ("batchmean", KL_SUM / 3),  # 0.1758634
        ("mean", KL_SUM / 6),  # N(N-1) = 6 terms -> 0.0879317
    ],
)
def test_relative_distance_kl_hand_case(reduction, want):
    loss = relative_distance_kl(t(ADA), t(SRC), reduction=reduction)
    assert loss.shape == () and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(want, abs=1e-6)


def test_relative_distance_kl_direction_is_source_to_adapted():
    # Reverse direction KL(q||p) differs on the hand case; make sure we are not computing it.
    e, eR = math.e, math.exp(R)
    p = [[1 / (1 + eR), eR / (1 + eR)]] * 2 + [[0.5, 0.5]]
    q = [[e / (1 + e), 1 / (1 + e)], [0.5, 0.5], [1 / (1 + e), e / (1 + e)]]
    reverse = sum(qi * math.log(qi / pi) for pr, qr in zip(p, q) for pi, qi in zip(pr, qr))
    assert abs(reverse - KL_SUM) > 1e-2
    assert relative_distance_kl(t(ADA), t(SRC), "sum").item() == pytest.approx(KL_SUM, abs=1e-6)


def test_relative_distance_kl_zero_when_equal():
    x = torch.randn(4, 4, 8, 8)
    for reduction in ("mean", "batchmean", "sum"):
        assert relative_distance_kl(x.clone(), x, reduction).item() == 0.0


def test_relative_distance_kl_positive_when_different():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, 4, 8, 8, generator=g)
    s = torch.randn(4, 4, 8, 8, generator=g)
    assert relative_distance_kl(a, s).item() > 0


def test_relative_distance_kl_batch_of_two_is_zero():
    # With N=2 each row has one entry (p=1), so the relative distances carry no signal.
    a, s = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert relative_distance_kl(a, s, "sum").item() == 0.0


def test_relative_distance_kl_gradient_to_adapted_only():
    adapted = t(ADA, torch.float32).requires_grad_(True)
    source = t(SRC, torch.float32).requires_grad_(True)
    relative_distance_kl(adapted, source).backward()
    assert source.grad is None
    assert adapted.grad is not None
    assert torch.isfinite(adapted.grad).all() and adapted.grad.abs().sum() > 0


def test_relative_distance_kl_invariant_to_positive_scaling():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(4, 3, 4, 4, generator=g)
    s = torch.randn(4, 3, 4, 4, generator=g)
    scale = torch.tensor([0.1, 3.0, 7.5, 0.02]).view(4, 1, 1, 1)
    torch.testing.assert_close(
        pairwise_similarity_log_probs(a * scale), pairwise_similarity_log_probs(a)
    )
    base = relative_distance_kl(a, s)
    torch.testing.assert_close(relative_distance_kl(a * scale, s), base)
    torch.testing.assert_close(relative_distance_kl(a, s * scale.flip(0)), base)


def test_relative_distance_kl_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(3, 4\)"):
        relative_distance_kl(torch.randn(3, 2), torch.randn(3, 4))


def test_relative_distance_kl_unknown_reduction():
    with pytest.raises(ValueError, match="reduction"):
        relative_distance_kl(torch.randn(3, 2), torch.randn(3, 2), reduction="none")


# -------------------------------------------------------- high_frequency_kl


def test_high_frequency_kl_matches_definition_and_ignores_ll():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, 2, 4, 4, generator=g)
    s = torch.randn(3, 2, 4, 4, generator=g)
    want = relative_distance_kl(high_frequency(a), high_frequency(s), "sum")
    got = high_frequency_kl(a, s, "sum")
    torch.testing.assert_close(got, want)
    assert got.item() > 0
    # A per-sample constant offset only moves LL, so L_hf is unchanged (L_img is not).
    offset = torch.tensor([5.0, -2.0, 9.0]).view(3, 1, 1, 1)
    torch.testing.assert_close(high_frequency_kl(a + offset, s, "sum"), got)
    assert not torch.allclose(relative_distance_kl(a + offset, s), relative_distance_kl(a, s))


def test_high_frequency_kl_hand_case():
    # Build each image from its bands (LL=HL=HH=0, LH=v) so hf(image) == v exactly and
    # L_hf reduces to the L_img hand case above.
    def from_hf(vecs):
        hf = t(vecs).view(3, 1, 1, 2)
        z = torch.zeros_like(hf)
        return haar_idwt(z, hf, z, z)

    loss = high_frequency_kl(from_hf(ADA), from_hf(SRC), "sum")
    assert loss.item() == pytest.approx(KL_SUM, abs=1e-6)


# ------------------------------------------------------- high_frequency_mse


def test_high_frequency_mse_hand_case():
    # hf(adapted) = [3, -1] (see test_high_frequency_hand_case); target is constant 7 -> hf 0.
    # MSE = (3^2 + (-1)^2) / 2 = 5.  LL differs (5,7 vs 14,14) but must not count.
    adapted = t([[[[1.0, 2.0, 5.0, 5.0], [3.0, 4.0, 1.0, 3.0]]]])
    target = torch.full_like(adapted, 7.0)
    loss = high_frequency_mse(adapted, target)
    assert loss.shape == () and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(5.0)


def test_high_frequency_mse_zero_when_equal_and_grad_finite():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=g)
    assert high_frequency_mse(x.clone(), x).item() == 0.0
    adapted = torch.randn(2, 4, 8, 8, generator=g, requires_grad=True)
    target = x.clone().requires_grad_(True)
    high_frequency_mse(adapted, target).backward()
    assert target.grad is None
    assert torch.isfinite(adapted.grad).all() and adapted.grad.abs().sum() > 0


def test_high_frequency_mse_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(1, 1, 2, 2\).*\(1, 1, 4, 4\)"):
        high_frequency_mse(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 4, 4))


# ----------------------------------------------------------- low precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_return_float32(dtype):
    g = torch.Generator().manual_seed(5)
    a = torch.randn(3, 4, 8, 8, generator=g).to(dtype)
    s = torch.randn(3, 4, 8, 8, generator=g).to(dtype)
    assert haar_dwt(a)[0].dtype == dtype  # the transform itself preserves dtype
    lp = pairwise_similarity_log_probs(a)
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all()
    for loss in (
        relative_distance_kl(a, s),
        high_frequency_kl(a, s),
        high_frequency_mse(a, s),
    ):
        assert loss.dtype == torch.float32 and loss.shape == ()
        assert torch.isfinite(loss) and loss.item() > 0
    # Float32 computation: matches the float32 result on the same (rounded) values.
    torch.testing.assert_close(
        relative_distance_kl(a, s), relative_distance_kl(a.float(), s.float())
    )


# ------------------------------------------------------ denoising_loss_x0


def test_denoising_loss_x0_eps_hand_case():
    # eps: ||eps - eps*||^2 = ||x0_pred - x0||^2 / sigma^2, mean over all elements.
    # sample 0: errors (2, 0), sigma 2   -> (4 + 0) / 4    = 1, 0
    # sample 1: errors (1, -1), sigma 0.5 -> (1, 1) / 0.25 = 4, 4     mean of (1, 0, 4, 4) = 2.25
    x0 = t([[0.0, 0.0], [1.0, 1.0]])
    pred = t([[2.0, 0.0], [2.0, 0.0]])
    loss = denoising_loss_x0(pred, x0, t([2.0, 0.5]), "eps")
    assert loss.shape == () and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(2.25)


def test_denoising_loss_x0_v_hand_case():
    # v, sigma_data 1: c_out^2 = sigma^2 / (sigma^2 + 1)
    # sample 0: sigma 1 -> c_out^2 = 1/2; error 1 -> 1 / (1/2) = 2
    # sample 1: sigma 2 -> c_out^2 = 4/5; error 2 -> 4 / (4/5) = 5             mean = 3.5
    loss = denoising_loss_x0(t([[1.0], [2.0]]), t([[0.0], [0.0]]), t([1.0, 2.0]), "v")
    assert loss.item() == pytest.approx(3.5)
    # sigma_data 0.5: c_out^2 = 0.25 sigma^2 / (sigma^2 + 0.25); sigma 1 -> 0.2; error 1 -> 5
    assert denoising_loss_x0(t([[1.0]]), t([[0.0]]), t([1.0]), "v", sigma_data=0.5).item() == pytest.approx(5.0)


def test_denoising_loss_x0_equals_the_native_eps_and_v_losses():
    # x0 = x_t - sigma * eps (eps models); x0 = x_t / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1) (v models,
    # sigma_data = 1): the loss through x0 is exactly the MSE of the model's own output.
    g = torch.Generator().manual_seed(0)
    sigma = torch.tensor([0.03, 0.7, 2.0, 14.6], dtype=torch.float64)
    s = sigma.view(-1, 1, 1, 1)
    xt = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    out, out_hat = torch.randn(2, 4, 4, 8, 8, generator=g, dtype=torch.float64)
    want = ((out_hat - out) ** 2).mean().item()
    eps_x0, eps_pred = xt - s * out, xt - s * out_hat
    assert denoising_loss_x0(eps_pred, eps_x0, sigma, "eps").item() == pytest.approx(want, rel=1e-5)
    v_x0 = xt / (s**2 + 1) - out * s / (s**2 + 1).sqrt()
    v_pred = xt / (s**2 + 1) - out_hat * s / (s**2 + 1).sqrt()
    assert denoising_loss_x0(v_pred, v_x0, sigma, "v").item() == pytest.approx(want, rel=1e-5)


def test_denoising_loss_x0_gradient_and_low_precision():
    pred = torch.zeros(2, 3, requires_grad=True)
    x0 = torch.ones(2, 3)
    denoising_loss_x0(pred, x0, torch.tensor([1.0, 2.0])).backward()
    # d/dpred mean((pred - x0)^2 / s^2) = 2 (pred - x0) / (s^2 * 6)
    want = torch.tensor([[-2 / 6] * 3, [-2 / 24] * 3])
    torch.testing.assert_close(pred.grad, want)
    half = denoising_loss_x0(torch.zeros(2, 3, dtype=torch.bfloat16), x0.bfloat16(), torch.tensor([1.0, 2.0]))
    assert half.dtype == torch.float32 and half.item() == pytest.approx((3 * 1 + 3 * 0.25) / 6)


def test_denoising_loss_x0_unknown_prediction():
    with pytest.raises(ValueError, match="'x0'"):
        denoising_loss_x0(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1), "x0")
