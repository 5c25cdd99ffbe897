"""Tests for trainer/plot.py (the loss plot) and trainer/grids.py (image grids); pure torch/PIL, no
ComfyUI."""

import math

import numpy as np

import pytest
import torch

from comfyui_domainstudio.trainer.grids import labelled_rows, save_png, tile, tile_rows, to_pil, to_uint8
from comfyui_domainstudio.trainer.plot import SERIES_COLORS, render_loss_plot, smooth


def color_mask(img, color, tol=2 / 255):
    c = torch.tensor(color, dtype=torch.float32) / 255
    return ((img[0] - c).abs() <= tol).all(dim=-1)


def test_shape_dtype_range():
    img = render_loss_plot({"mse": [1.0, 0.8, 0.5, 0.4]}, width=300, height=200)
    assert img.shape == (1, 200, 300, 3)
    assert img.dtype == torch.float32
    assert img.min() >= 0.0 and img.max() <= 1.0
    # Mostly white background, but not entirely.
    white = (img[0] == 1.0).all(dim=-1).float().mean()
    assert 0.5 < white < 1.0


def test_series_drawn_in_its_colour():
    # The second series' colour must appear along a long line, far more than the legend swatch.
    hist = {"a": [1.0] * 8, "b": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]}
    img = render_loss_plot(hist)
    assert color_mask(img, SERIES_COLORS[1]).sum() > 300
    assert color_mask(img, SERIES_COLORS[0]).sum() > 300
    # A colour no series uses is absent.
    assert color_mask(img, SERIES_COLORS[2]).sum() == 0


def test_line_goes_down_for_decreasing_values():
    img = render_loss_plot({"x": [10.0, 8.0, 6.0, 4.0, 2.0]}, width=400, height=300)
    ys, xs = torch.nonzero(color_mask(img, SERIES_COLORS[0]), as_tuple=True)
    left = ys[xs < 120].float().mean()
    right = ys[xs > 300].float().mean()
    assert right > left + 50  # image y grows downwards


@pytest.mark.parametrize("hist", [{}, {"total": []}, {"a": [float("nan"), float("inf")]}, None])
def test_empty_history_no_crash(hist):
    img = render_loss_plot(hist)
    assert img.shape == (1, 320, 512, 3)
    # Only the title and the "no data" notice: no series colour anywhere.
    assert color_mask(img, SERIES_COLORS[0]).sum() == 0
    assert (img < 1.0).any()


def test_single_point():
    img = render_loss_plot({"total": [0.3]})
    assert img.shape == (1, 320, 512, 3)
    assert color_mask(img, SERIES_COLORS[0]).sum() > 0


def test_log_scale_positive_decay():
    vals = [10.0 * math.exp(-0.05 * i) for i in range(200)]  # spans ~20000×
    img = render_loss_plot({"total": vals, "aux": [1e-3 * (i + 1) for i in range(50)]})
    assert img.shape == (1, 320, 512, 3)
    assert torch.isfinite(img).all()
    assert color_mask(img, SERIES_COLORS[0]).sum() > 100


def test_log_scale_makes_exponential_decay_straight():
    # On a log axis exp decay is a straight line: its middle sits halfway between its ends.
    # On a linear axis the middle (value ~0.07 of 10) would hug the bottom.
    vals = [10.0 * math.exp(-0.05 * i) for i in range(201)]
    img = render_loss_plot({"x": vals}, width=512, height=320)
    ys, xs = torch.nonzero(color_mask(img, SERIES_COLORS[0]), as_tuple=True)
    # The line's ends are its extreme rows (the legend swatch lies between them, at the right).
    top, bottom = ys.min().item(), ys.max().item()
    mid_x = (xs[ys == int(top)].float().mean() + xs[ys == int(bottom)].float().mean()) / 2
    mid = ys[(xs - mid_x).abs() <= 1].float().mean().item()
    assert abs(mid - (top + bottom) / 2) < 0.1 * (bottom - top)
    lin = render_loss_plot({"x": [1.0 + 0.001 * math.exp(-0.05 * i) for i in range(201)]})
    assert torch.isfinite(lin).all()  # all > 0 but span < 10x: linear branch


def test_non_finite_skipped():
    clean = {"x": [1.0, 2.0, 3.0, 4.0]}
    dirty = {"x": [1.0, float("nan"), 2.0, float("inf"), 3.0, 4.0, float("-inf")]}
    a = render_loss_plot(clean)
    b = render_loss_plot(dirty)
    assert torch.isfinite(b).all()
    assert color_mask(b, SERIES_COLORS[0]).sum() > 300
    # Non-finite values must not stretch the y axis: the polyline stays within the same
    # vertical band as the clean plot's.
    ya = torch.nonzero(color_mask(a, SERIES_COLORS[0]), as_tuple=True)[0]
    yb = torch.nonzero(color_mask(b, SERIES_COLORS[0]), as_tuple=True)[0]
    assert abs(int(ya.min()) - int(yb.min())) <= 2 and abs(int(ya.max()) - int(yb.max())) <= 2


def test_total_gets_faint_raw_line_and_smoothed_line():
    vals = [1.0 if i % 2 else 0.0 for i in range(100)]
    img = render_loss_plot({"total": vals})
    strong = color_mask(img, SERIES_COLORS[0]).sum()
    # Faint raw line: lighter tint of the same hue, i.e. pixels that are blue-ish but not white.
    px = img[0]
    faint = ((px[..., 2] > px[..., 0] + 0.1) & (px[..., 0] > 0.5)).sum()
    assert strong > 100 and faint > 100


def test_smooth():
    assert smooth([]) == []
    assert smooth([2.0, 2.0, 2.0]) == [2.0, 2.0, 2.0]
    out = smooth([0.0, 10.0], alpha=0.9)
    assert out == pytest.approx([0.0, 1.0])
    out = smooth([float("nan"), 4.0, float("inf"), 0.0], alpha=0.5)
    assert math.isnan(out[0])
    assert out[1:] == pytest.approx([4.0, 4.0, 2.0])
    with pytest.raises(ValueError):
        smooth([1.0], alpha=1.0)


def test_too_small_rejected():
    with pytest.raises(ValueError):
        render_loss_plot({"x": [1.0, 2.0]}, width=10, height=10)


def test_tile_rows_places_images_with_gaps_and_white_padding(tmp_path):
    a = np.zeros((2, 2, 3, 3), np.uint8)          # row 0: two black 2x3 images
    b = np.full((1, 2, 3, 3), 0.5, np.float32)     # row 1: one mid-grey image, floats in 0..1
    canvas = tile_rows([a, b], gap=1)
    assert canvas.shape == (2 + 1 + 2, 6, 3) and canvas.dtype == np.uint8
    assert (canvas[:2] == 0).all()                  # row 0 fully black
    assert (canvas[2] == 255).all()                 # the gap is white
    assert (canvas[3:, :3] == 128).all()            # 0.5 * 255 rounds to 128
    assert (canvas[3:, 3:] == 255).all()            # short row padded with white
    grid = tile(np.arange(5 * 1 * 1 * 3, dtype=np.uint8).reshape(5, 1, 1, 3), cols=2)
    assert grid.shape == (3, 2, 3) and (grid[2, 1] == 255).all() and (grid[2, 0] == [12, 13, 14]).all()
    path = tmp_path / "g.png"
    save_png(canvas, str(path), scale=2)
    from PIL import Image

    back = np.asarray(Image.open(path))
    assert back.shape == (10, 12, 3) and (back[::2, ::2] == canvas).all()
    assert not list(tmp_path.glob("*.tmp*"))


def test_to_uint8_and_to_pil():
    img = torch.tensor([[[[0.0, 0.5, 1.2]]]])  # IMAGE [1, 1, 1, 3]; out-of-range values are clipped
    assert to_uint8(img).tolist() == [[[[0, 128, 255]]]] and to_uint8(img).dtype == np.uint8
    u = np.full((2, 2, 3), 7, np.uint8)
    assert to_uint8(u) is u
    pil = to_pil(torch.zeros(2, 3, 4, 3))
    assert pil.size == (4, 3) and pil.mode == "RGB"


def test_labelled_rows_puts_each_row_after_its_label():
    red = torch.zeros(2, 8, 8, 3)
    red[..., 0] = 1.0
    blue = torch.zeros(1, 16, 16, 3)  # another size: resized to the first row's
    blue[..., 2] = 1.0
    out = labelled_rows([(red, "source"), (blue, "adapted")], label_width=40)
    # 8 px samples are enlarged 8x so the grid stays readable: rows of 64 px, 2 columns
    assert out.shape == (1, 128, 40 + 2 * 64, 3) and out.dtype == torch.float32
    assert torch.equal(out[0, 10, 40 + 70], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(out[0, 100, 40 + 10], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.equal(out[0, 100, 40 + 100], torch.ones(3))  # the short row is padded with white
    assert (out[0, :64, :40] < 1.0).any() and (out[0, 64:, :40] < 1.0).any()  # both labels were written
