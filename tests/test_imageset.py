"""Tests for trainer/imageset.py (pure torch/PIL, no ComfyUI)."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.imageset import (
    SUPPORTED_EXTENSIONS,
    ImageSet,
    ImageSetError,
    load_folder,
    prepare_image_set,
)


def save(path, arr, mode=None, **kw):
    img = Image.fromarray(arr, mode) if mode else Image.fromarray(arr)
    img.save(path, **kw)
    return path


def rgb(h, w, color):
    a = np.zeros((h, w, 3), np.uint8)
    a[:] = color
    return a


def loaded(folder):
    return dict(load_folder(str(folder)))


# ---------------------------------------------------------------- load_folder: modes


def test_rgba_transparent_pixels_become_white(tmp_path):
    a = np.zeros((8, 8, 4), np.uint8)
    a[..., 0] = 255  # red everywhere
    a[:, :4, 3] = 0  # left half fully transparent
    a[:, 4:, 3] = 255
    save(tmp_path / "a.png", a, "RGBA")
    t = loaded(tmp_path)["a.png"]
    assert t.shape == (8, 8, 3) and t.dtype == torch.float32
    assert torch.allclose(t[:, :4], torch.ones(8, 4, 3))
    assert torch.allclose(t[:, 4:], torch.tensor([1.0, 0.0, 0.0]).expand(8, 4, 3))


def test_grayscale_l_becomes_rgb(tmp_path):
    a = np.full((5, 7), 51, np.uint8)
    save(tmp_path / "g.png", a, "L")
    t = loaded(tmp_path)["g.png"]
    assert t.shape == (5, 7, 3)
    assert torch.allclose(t, torch.full((5, 7, 3), 51 / 255))


def test_16bit_scaled_by_65535_not_clipped(tmp_path):
    a = np.array([[65535, 32768], [0, 1000]], np.uint16)
    img = Image.fromarray(a)
    assert img.mode.startswith("I;16")
    img.save(tmp_path / "d.png")
    t = loaded(tmp_path)["d.png"]
    assert t.shape == (2, 2, 3)
    assert t[0, 0, 0].item() == pytest.approx(1.0)
    assert t[0, 1, 0].item() == pytest.approx(0.5, abs=1e-4)
    assert t[1, 0, 0].item() == 0.0
    assert t[1, 1, 0].item() == pytest.approx(1000 / 65535, rel=1e-4)
    assert torch.equal(t[..., 0], t[..., 2])


def test_palette_with_and_without_transparency(tmp_path):
    pal = Image.new("P", (4, 4))
    pal.putpalette([0, 0, 255] + [0, 255, 0] + [0] * (254 * 3))
    pal.putdata([0] * 8 + [1] * 8)
    pal.save(tmp_path / "p.png")
    pal.save(tmp_path / "pt.png", transparency=0)  # palette index 0 transparent
    got = loaded(tmp_path)
    p, pt = got["p.png"], got["pt.png"]
    assert torch.allclose(p[0, 0], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(p[3, 0], torch.tensor([0.0, 1.0, 0.0]))
    assert torch.allclose(pt[0, 0], torch.ones(3))  # transparent -> white
    assert torch.allclose(pt[3, 0], torch.tensor([0.0, 1.0, 0.0]))


def test_cmyk_converted_to_rgb(tmp_path):
    img = Image.new("CMYK", (6, 6), (0, 255, 255, 0))  # no cyan, full magenta+yellow -> red
    img.save(tmp_path / "c.tif")
    t = loaded(tmp_path)["c.tif"]
    assert t.shape == (6, 6, 3)
    assert torch.allclose(t[0, 0], torch.tensor([1.0, 0.0, 0.0]), atol=0.02)


def test_exif_orientation_applied(tmp_path):
    a = rgb(20, 40, (0, 0, 0))  # stored 40 wide × 20 high
    a[:, :20] = (255, 0, 0)  # left half red
    img = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° CW to display"
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    t = loaded(tmp_path)["r.jpg"]
    assert t.shape == (40, 20, 3)  # displayed portrait
    # After a CW rotation the former left half is on top.
    assert t[5, 10, 0] > 0.8 and t[35, 10, 0] < 0.2


def test_order_extensions_and_hidden_files(tmp_path):
    save(tmp_path / "b.PNG", rgb(4, 4, (1, 2, 3)))
    save(tmp_path / "A.jpg", rgb(4, 4, (1, 2, 3)))
    save(tmp_path / "c.bmp", rgb(4, 4, (1, 2, 3)))
    save(tmp_path / ".hidden.png", rgb(4, 4, (1, 2, 3)))
    save(tmp_path / "._b.png", rgb(4, 4, (1, 2, 3)))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    save(tmp_path / "sub" / "deep.png", rgb(4, 4, (1, 2, 3)))
    names = [n for n, _ in load_folder(str(tmp_path))]
    assert names == ["A.jpg", "b.PNG", "c.bmp"]


# ---------------------------------------------------------------- load_folder: errors


def test_corrupt_files_all_listed(tmp_path):
    save(tmp_path / "good.png", rgb(4, 4, (10, 20, 30)))
    (tmp_path / "bad.png").write_bytes(b"this is not a png at all" * 10)
    buf = tmp_path / "full.jpg"
    save(buf, rgb(64, 64, (200, 10, 10)))
    data = buf.read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    buf.unlink()
    with pytest.raises(ImageSetError) as e:
        load_folder(str(tmp_path))
    msg = str(e.value)
    assert "bad.png" in msg and "trunc.jpg" in msg
    assert "good.png" not in msg
    assert "2 files" in msg


def test_folder_errors(tmp_path):
    with pytest.raises(ImageSetError, match="folder is empty"):
        load_folder("  ")
    missing = tmp_path / "nope"
    with pytest.raises(ImageSetError) as e:
        load_folder(str(missing))
    assert "nope" in str(e.value) and "does not exist" in str(e.value)
    f = tmp_path / "file.png"
    save(f, rgb(4, 4, (0, 0, 0)))
    with pytest.raises(ImageSetError, match="not a directory"):
        load_folder(str(f))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(ImageSetError) as e:
        load_folder(str(empty))
    assert ".png" in str(e.value) and ".webp" in str(e.value)


def test_quoted_path_accepted(tmp_path):
    save(tmp_path / "x.png", rgb(4, 4, (0, 0, 0)))
    assert [n for n, _ in load_folder(f'"{tmp_path}"')] == ["x.png"]


# ---------------------------------------------------------------- prepare_image_set


def test_center_crop_keeps_middle(tmp_path):
    a = rgb(64, 128, (0, 0, 255))
    a[:, :32] = (255, 0, 0)
    a[:, 96:] = (255, 0, 0)
    save(tmp_path / "wide.png", a)
    s = prepare_image_set(None, str(tmp_path), 64, False, min_images=1)
    assert s.images.shape == (1, 64, 64, 3)
    assert torch.equal(s.images[0], torch.tensor([0.0, 0.0, 1.0]).expand(64, 64, 3))
    assert s.warnings == []


def test_resize_short_side_then_crop_tall():
    # 200 high × 100 wide, top/bottom quarters red, middle half green. Resolution 64:
    # resized to 128×64, the centered 64×64 crop is (away from the edge band) all green.
    t = torch.zeros(200, 100, 3)
    t[:, :, 1] = 1.0
    t[:50] = torch.tensor([1.0, 0.0, 0.0])
    t[150:] = torch.tensor([1.0, 0.0, 0.0])
    s = prepare_image_set(t.unsqueeze(0), None, 64, False, min_images=1)
    assert s.images.shape == (1, 64, 64, 3)
    inner = s.images[0, 4:60]
    assert torch.allclose(inner, torch.tensor([0.0, 1.0, 0.0]).expand_as(inner), atol=1e-4)
    assert 0.0 <= s.images.min() and s.images.max() <= 1.0


def test_small_image_upscaled_with_warning(tmp_path):
    save(tmp_path / "x.png", rgb(30, 40, (9, 9, 9)))
    s = prepare_image_set(None, str(tmp_path), 64, False, min_images=1)
    assert s.images.shape == (1, 64, 64, 3)
    assert s.warnings == ["image 'x.png' is 40×30, upscaled to 64"]


def test_batch_then_folder_and_mixed_sizes(tmp_path):
    save(tmp_path / "f1.png", rgb(64, 80, (255, 0, 0)))
    save(tmp_path / "f2.png", rgb(96, 64, (0, 255, 0)))
    batch = torch.zeros(2, 64, 64, 3)
    batch[..., 2] = 1.0
    single = torch.full((1, 70, 100, 1), 0.25)  # gray, different size, [1,H,W,C]
    s = prepare_image_set([batch, single], str(tmp_path), 64, False)
    assert isinstance(s, ImageSet)
    assert len(s) == 5 and s.images.shape == (5, 64, 64, 3) and s.images.dtype == torch.float32
    assert s.names == ["input[0]", "input[1]", "input[2]", "f1.png", "f2.png"]
    assert torch.allclose(s.images[0, 10, 10], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(s.images[2], torch.full((64, 64, 3), 0.25), atol=1e-5)
    assert torch.allclose(s.images[3, 10, 10], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(s.images[4, 10, 10], torch.tensor([0.0, 1.0, 0.0]))
    assert s.sources == {"images input": 3, "folder": 2}
    d = s.describe()
    assert "5 images" in d and "64×64" in d and "folder: 2" in d and "images input: 3" in d


def test_rgba_batch_composited_and_names():
    t = torch.zeros(2, 64, 64, 4)
    t[..., 0] = 1.0
    t[0, ..., 3] = 1.0  # opaque red
    t[1, ..., 3] = 0.0  # fully transparent -> white
    s = prepare_image_set(t, "", 64, False, names=["a", "b"])
    assert s.names == ["a", "b"]
    assert torch.allclose(s.images[0, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(s.images[1], torch.ones(64, 64, 3))
    with pytest.raises(ImageSetError, match="names"):
        prepare_image_set(t, None, 64, False, names=["only one"])


def test_flip_doubles_and_mirrors():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(3, 64, 64, 3, generator=g)
    s = prepare_image_set(t, None, 64, True)
    assert len(s) == 6 and s.flipped
    assert torch.equal(s.images[:3], t)
    for i in range(3):
        assert torch.equal(s.images[3 + i, :, 0], t[i, :, 63])
        assert torch.equal(s.images[3 + i], t[i].flip(1))
    assert not torch.equal(s.images[3], s.images[0])
    assert s.names[3] == "input[0] (flipped)"
    assert "flipped" in s.describe()
    assert len(prepare_image_set(t, None, 64, False)) == 3


def test_deterministic():
    t = torch.rand(2, 90, 130, 3, generator=torch.Generator().manual_seed(1))
    a = prepare_image_set(t, None, 64, False).images
    b = prepare_image_set(t.clone(), None, 64, False).images
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad, suggestions", [(100, ["96", "104"]), (30, ["64"]),
                                                (5000, ["4096"]), (70, ["72"]), (0, ["64"])])
def test_bad_resolution(bad, suggestions):
    t = torch.rand(2, 64, 64, 3)
    with pytest.raises(ImageSetError) as e:
        prepare_image_set(t, None, bad, False)
    msg = str(e.value)
    assert "resolution" in msg
    for s in suggestions:
        assert s in msg


def test_valid_resolution_edges():
    t = torch.rand(2, 64, 64, 3)
    assert prepare_image_set(t, None, 64, False).resolution == 64
    assert prepare_image_set(t, None, 72, False).images.shape[1] == 72


def test_too_few_and_too_many(tmp_path):
    with pytest.raises(ImageSetError) as e:
        prepare_image_set(torch.rand(1, 64, 64, 3), None, 64, False, min_images=2)
    msg = str(e.value)
    assert "found 1" in msg and "at least 2" in msg
    with pytest.raises(ImageSetError, match="at most 3"):
        prepare_image_set(torch.rand(4, 64, 64, 3), None, 64, False, max_images=3)
    with pytest.raises(ImageSetError, match="no images"):
        prepare_image_set(None, "", 64, False)


def test_nan_names_image_index():
    t = torch.rand(3, 64, 64, 3)
    t[2, 5, 5, 1] = float("nan")
    with pytest.raises(ImageSetError) as e:
        prepare_image_set(t, None, 64, False)
    assert "image 2" in str(e.value) and "NaN" in str(e.value)
    t[2, 5, 5, 1] = float("inf")
    with pytest.raises(ImageSetError, match="image 2"):
        prepare_image_set(t, None, 64, False)


def test_out_of_range_clamped():
    t = torch.full((2, 64, 64, 3), 0.5)
    t[0, 0, 0, 0] = 1.001  # tiny overshoot: clamp silently
    t[1, 0, 0, 0] = 3.0  # real excursion: clamp and warn
    t[1, 0, 1, 0] = -0.5
    s = prepare_image_set(t, None, 64, False)
    assert s.images.max() == 1.0 and s.images.min() == 0.0
    assert len(s.warnings) == 1 and "input[1]" in s.warnings[0]


def test_bad_channel_count():
    with pytest.raises(ImageSetError, match="channels"):
        prepare_image_set(torch.rand(2, 64, 64, 5), None, 64, False)


def test_supported_extensions_constant():
    assert SUPPORTED_EXTENSIONS == (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
