"""Tests for trainer/imageset.py (pure torch/PIL, no ComfyUI)."""

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_domainstudio.trainer.imageset import (
    MAX_CAPTION_CHARS,
    REDUCING_GAP,
    ROOTS_ENV,
    SUPPORTED_EXTENSIONS,
    FolderRefused,
    ANY_FOLDER,
    ImageSet,
    ImageSetError,
    decode_image,
    image_roots,
    load_folder,
    prepare_image_set,
    refusal_message,
    resize_and_center_crop,
    resolve_image_folder,
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
    return dict(load_folder(str(folder), roots=ANY_FOLDER))


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
    names = [n for n, _ in load_folder(str(tmp_path), roots=ANY_FOLDER)]
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
        load_folder(str(tmp_path), roots=ANY_FOLDER)
    msg = str(e.value)
    assert "bad.png" in msg and "trunc.jpg" in msg
    assert "good.png" not in msg
    assert "2 files" in msg


def test_folder_errors(tmp_path):
    with pytest.raises(ImageSetError, match="folder is empty"):
        load_folder("  ", roots=ANY_FOLDER)
    missing = tmp_path / "nope"
    with pytest.raises(ImageSetError) as e:
        load_folder(str(missing), roots=ANY_FOLDER)
    assert "nope" in str(e.value) and "does not exist" in str(e.value)
    f = tmp_path / "file.png"
    save(f, rgb(4, 4, (0, 0, 0)))
    with pytest.raises(ImageSetError, match="not a directory"):
        load_folder(str(f), roots=ANY_FOLDER)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(ImageSetError) as e:
        load_folder(str(empty), roots=ANY_FOLDER)
    assert ".png" in str(e.value) and ".webp" in str(e.value)


def test_quoted_path_accepted(tmp_path):
    save(tmp_path / "x.png", rgb(4, 4, (0, 0, 0)))
    assert [n for n, _ in load_folder(f'"{tmp_path}"', roots=ANY_FOLDER)] == ["x.png"]


# ---------------------------------------------------------------- prepare_image_set


def test_center_crop_keeps_middle(tmp_path):
    a = rgb(64, 128, (0, 0, 255))
    a[:, :32] = (255, 0, 0)
    a[:, 96:] = (255, 0, 0)
    save(tmp_path / "wide.png", a)
    s = prepare_image_set(None, str(tmp_path), 64, False, min_images=1, roots=ANY_FOLDER)
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
    s = prepare_image_set(None, str(tmp_path), 64, False, min_images=1, roots=ANY_FOLDER)
    assert s.images.shape == (1, 64, 64, 3)
    assert s.warnings == ["image 'x.png' is 40×30, upscaled to 64"]


def test_batch_then_folder_and_mixed_sizes(tmp_path):
    save(tmp_path / "f1.png", rgb(64, 80, (255, 0, 0)))
    save(tmp_path / "f2.png", rgb(96, 64, (0, 255, 0)))
    batch = torch.zeros(2, 64, 64, 3)
    batch[..., 2] = 1.0
    single = torch.full((1, 70, 100, 1), 0.25)  # gray, different size, [1,H,W,C]
    s = prepare_image_set([batch, single], str(tmp_path), 64, False, roots=ANY_FOLDER)
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


# ---------------------------------------------------------------- folder confinement (roots)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tree(tmp_path):
    """input/ (the root) with a set, a file and links; outside/ with real images; extra/ (a 2nd root)."""
    inp, outside, extra = tmp_path / "input", tmp_path / "outside", tmp_path / "extra"
    for d in (inp / "set", outside, extra / "more"):
        d.mkdir(parents=True)
    save(inp / "set" / "a.png", rgb(64, 64, (255, 0, 0)))
    save(inp / "set" / "b.png", rgb(64, 64, (0, 255, 0)))
    save(inp / "file.png", rgb(8, 8, (0, 0, 0)))
    save(outside / "o.png", rgb(64, 64, (0, 0, 255)))
    (outside / "o.txt").write_text("secret")
    save(extra / "more" / "e.png", rgb(64, 64, (9, 9, 9)))
    os.symlink(outside, inp / "escape")
    os.symlink(extra / "more", inp / "to_extra")
    return {"input": str(inp), "outside": str(outside), "extra": str(extra), "tmp": str(tmp_path)}


def test_resolve_relative_and_absolute_inside_roots(tree):
    roots = [tree["input"], tree["extra"]]
    real_set = os.path.realpath(os.path.join(tree["input"], "set"))
    assert resolve_image_folder("set", roots) == real_set
    assert resolve_image_folder(os.path.join(tree["input"], "set"), roots) == real_set
    assert resolve_image_folder("set/../set", roots) == real_set  # `..` that stays inside is fine
    assert resolve_image_folder(".", roots) == os.path.realpath(tree["input"])
    # Quotes and stray spaces from a pasted path go before anything else looks at the string.
    for pasted in ('"set"', "'set'", '  " set "  ', f'"{tree["input"]}/set"'):
        assert resolve_image_folder(pasted, roots) == real_set, pasted
    more = os.path.join(tree["extra"], "more")
    assert resolve_image_folder(more, roots) == os.path.realpath(more)
    assert resolve_image_folder("to_extra", roots) == os.path.realpath(more)  # link to another root


@pytest.mark.parametrize("folder", [
    "{outside}", "/usr/share", "/", "/etc/shadow", "/etc", "/root/.ssh", "..", "../outside",
    "set/../../outside", "../" * 30 + "{outside_rel}", "{input}/..", "~", "~root", "~/.ssh", "~root/.ssh",
    "escape", "escape/o.png", "file.png", "nope", "{input}/nope", "'{outside}'", ' "{outside}" ',
    "set\x00x", "x" * 5000, "{extra}/../outside",
])
def test_resolve_refuses_everything_else_with_one_message(tree, folder):
    folder = folder.format(outside=tree["outside"], outside_rel=tree["outside"].lstrip("/"),
                           input=tree["input"], extra=tree["extra"])
    with pytest.raises(FolderRefused) as e:
        resolve_image_folder(folder, [tree["input"], tree["extra"]])
    msg = str(e.value)
    cleaned = folder.strip().strip('"').strip("'").strip()
    assert msg == refusal_message(cleaned)
    generic = refusal_message("X")
    assert msg.replace(msg[len("folder '"):msg.index("' is not")], "X") == generic
    # Nothing the user did not type: no resolved path, no reason.
    rest = msg.replace(cleaned[:200], "")
    for secret in (tree["tmp"], "/usr", "/etc", "/root", "exist", "a file", "not a directory"):
        assert secret not in rest, (secret, msg)


def test_refusal_message_names_input_and_fix():
    msg = refusal_message("my style")
    assert msg.startswith("folder 'my style' is not a folder of images inside ComfyUI's input directory")
    assert "subfolder of ComfyUI's input folder" in msg and ROOTS_ENV in msg
    assert "\n" not in refusal_message("a\nb") and "a\\nb" in refusal_message("a\nb")
    assert len(refusal_message("y" * 10000)) < 600


def test_confined_listing_skips_files_linking_out_and_names_files_relatively(tree):
    inp = tree["input"]
    os.symlink(os.path.join(tree["outside"], "o.png"), os.path.join(inp, "set", "c.png"))
    os.symlink(os.path.join(tree["outside"], "o.txt"), os.path.join(inp, "set", "a.txt"))
    s = prepare_image_set(None, "set", 64, False, min_images=1, roots=[inp])
    assert s.names == ["a.png", "b.png"]
    assert s.captions == [None, None]  # a.txt links out: not read
    assert any("skipped 'c.png'" in w for w in s.warnings)
    assert any("ignored caption file 'a.txt'" in w for w in s.warnings)
    assert not any(tree["tmp"] in w for w in s.warnings)
    # Unconfined (command line) the same links are followed.
    s = prepare_image_set(None, os.path.join(inp, "set"), 64, False, min_images=1, roots=ANY_FOLDER)
    assert s.names == ["a.png", "b.png", "c.png"] and s.captions[0] == "secret"

    with open(os.path.join(inp, "set", "broken.png"), "wb") as f:
        f.write(b"junk" * 10)
    with pytest.raises(ImageSetError) as e:
        prepare_image_set(None, "set", 64, False, roots=[inp])
    assert "'broken.png'" in str(e.value) and "folder 'set'" in str(e.value)
    assert tree["tmp"] not in str(e.value)
    os.makedirs(os.path.join(inp, "empty"))
    with pytest.raises(ImageSetError, match="folder 'empty' contains no supported images") as e:
        prepare_image_set(None, "empty", 64, False, roots=[inp])
    assert tree["tmp"] not in str(e.value)


def test_os_error_text_does_not_name_server_paths(tree, monkeypatch):
    import comfyui_domainstudio.trainer.imageset as m

    real_open = Image.open
    secret = os.path.join(tree["input"], "set", "a.png")

    def failing_open(path, *a, **k):
        if str(path).endswith("a.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(m.Image, "open", failing_open)
    with pytest.raises(ImageSetError) as e:
        prepare_image_set(None, "set", 64, False, roots=[tree["input"]])
    assert "'a.png': PermissionError: Permission denied" in str(e.value)
    assert secret not in str(e.value) and tree["tmp"] not in str(e.value)


def test_unconfined_keeps_tilde_and_helpful_messages(tree, monkeypatch):
    monkeypatch.setenv("HOME", tree["input"])
    assert resolve_image_folder("~/set", roots=ANY_FOLDER) == os.path.join(tree["input"], "set")
    with pytest.raises(ImageSetError, match="does not exist"):
        resolve_image_folder(os.path.join(tree["tmp"], "nope"), roots=ANY_FOLDER)
    with pytest.raises(ImageSetError, match="not a directory"):
        resolve_image_folder(os.path.join(tree["input"], "file.png"), roots=ANY_FOLDER)
    # ... and with roots the same strings are refused generically, without expansion.
    with pytest.raises(FolderRefused):
        resolve_image_folder("~/set", [tree["input"]])


def test_image_roots_from_environment(tree):
    env = {ROOTS_ENV: os.pathsep.join([tree["extra"], "relative/ignored", "", "  "])}
    assert image_roots(tree["input"], env) == [tree["input"], tree["extra"]]
    assert image_roots(tree["input"], {}) == [tree["input"]]


# ---------------------------------------------------------------- captions


def _captioned_folder(tmp_path):
    for n in ("a", "b", "c"):
        save(tmp_path / f"{n}.png", rgb(64, 64, (1, 2, 3)))
    (tmp_path / "a.txt").write_bytes("\ufeff  a photo of\n a  house \n\n".encode("utf-8"))  # BOM, lines
    (tmp_path / "C.TXT").write_text("upper-case caption file", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("belongs to no image")
    return str(tmp_path)


def test_folder_captions_from_txt_files(tmp_path):
    s = prepare_image_set(None, _captioned_folder(tmp_path), 64, True, min_images=1, roots=ANY_FOLDER)
    assert s.names[:3] == ["a.png", "b.png", "c.png"]
    assert s.captions == ["a photo of a house", None, "upper-case caption file"] * 2  # flips share
    assert len(s.captions) == len(s.images) == len(s.names)
    assert "captions for 4 of 6" in s.describe()


def test_caption_lines_fill_input_images_then_uncaptioned_folder_images(tmp_path):
    folder = _captioned_folder(tmp_path)
    batch = torch.rand(2, 64, 64, 3)
    s = prepare_image_set(batch, folder, 64, False, captions="cap in0\n\n  cap  for b \n\n\n", roots=ANY_FOLDER)
    assert s.names == ["input[0]", "input[1]", "a.png", "b.png", "c.png"]
    assert s.captions == ["cap in0", None, "a photo of a house", "cap for b", "upper-case caption file"]
    assert s.warnings == []
    s = prepare_image_set(batch, folder, 64, False, captions=["x"], roots=ANY_FOLDER)
    assert s.captions[:2] == ["x", None] and s.captions[3] is None
    assert any("captions has 1 lines for 3 images" in w for w in s.warnings)
    with pytest.raises(ImageSetError) as e:
        prepare_image_set(batch, folder, 64, False, captions="1\n2\n3\n4", roots=ANY_FOLDER)
    assert "captions has 4 lines but only 3 images take a caption" in str(e.value)
    assert "2 from the images input, 1 folder images without a .txt" in str(e.value)
    s = prepare_image_set(batch, None, 64, False, captions="")
    assert s.captions == [None, None] and "no captions" in s.describe()


def test_caption_limits_and_encoding_name_the_file(tmp_path):
    save(tmp_path / "a.png", rgb(64, 64, (1, 2, 3)))
    (tmp_path / "a.txt").write_text("w" * MAX_CAPTION_CHARS, encoding="utf-8")
    assert prepare_image_set(None, str(tmp_path), 64, False, min_images=1, roots=ANY_FOLDER).captions == ["w" * MAX_CAPTION_CHARS]
    (tmp_path / "a.txt").write_text("é" * (MAX_CAPTION_CHARS + 1), encoding="utf-8")
    with pytest.raises(ImageSetError, match=f"caption file 'a.txt' .*at most {MAX_CAPTION_CHARS}"):
        prepare_image_set(None, str(tmp_path), 64, False, min_images=1, roots=ANY_FOLDER)
    (tmp_path / "a.txt").write_bytes(b"x" * 10_000_000)  # read only as far as needed
    with pytest.raises(ImageSetError, match="caption file 'a.txt' in folder .* is longer than"):
        prepare_image_set(None, str(tmp_path), 64, False, min_images=1, roots=ANY_FOLDER)
    (tmp_path / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ImageSetError, match="caption file 'a.txt' .*not UTF-8"):
        prepare_image_set(None, str(tmp_path), 64, False, min_images=1, roots=ANY_FOLDER)
    with pytest.raises(ImageSetError, match="captions: line 2 is 2001 characters"):
        prepare_image_set(torch.rand(2, 64, 64, 3), None, 64, False, captions="ok\n" + "z" * 2001)


def test_image_set_captions_field_is_compatible():
    s = ImageSet(torch.zeros(2, 64, 64, 3), ["a", "b"], 64, False, [])
    assert s.captions == [None, None] and "no captions" in s.describe()
    with pytest.raises(ValueError):
        ImageSet(torch.zeros(2, 64, 64, 3), ["a", "b"], 64, False, [], captions=["x"])


# ---------------------------------------------------------------- decoding big images near the target size


def _photo(h, w, seed=0):
    """Smooth colour fields plus fine detail, like a photo (JPEG-friendly, not noise)."""
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    a = np.stack([np.sin(x * 31 + y * 7 + seed) * 0.5 + 0.5, np.broadcast_to(y, (h, w)),
                  np.cos(x * y * 50) * 0.5 + 0.5], -1)
    a = (a * 255).astype(np.uint8)
    a[::9, ::6] = 255
    return a


def _psnr(a, b):
    return float(10 * torch.log10(1.0 / ((a - b) ** 2).mean().clamp_min(1e-12)))


@pytest.mark.parametrize("fmt, mode", [("jpg", "RGB"), ("png", "RGB"), ("png", "P+trns"), ("png", "I;16"),
                                       ("jpg", "CMYK"), ("webp", "RGBA")])
def test_reduced_decode_matches_full_decode(tmp_path, fmt, mode):
    h, w, res = 1200, 1600, 128
    a = _photo(h, w)
    img = Image.fromarray(a)
    kw = {"quality": 92} if fmt in ("jpg", "webp") else {}
    if mode == "P+trns":
        img = img.quantize(64)
        kw["transparency"] = 3
    elif mode == "I;16":
        img = Image.fromarray(a[..., 0].astype(np.uint16) * 257)
    elif mode == "CMYK":
        img = img.convert("CMYK")
    elif mode == "RGBA":
        img = img.convert("RGBA")
        img.putalpha(Image.fromarray(a[..., 1]))
    path = str(tmp_path / f"x.{fmt}")
    img.save(path, **kw)
    small = decode_image(path, res)
    full = decode_image(path)
    assert full.shape[:2] == (h, w)
    assert res * REDUCING_GAP <= min(small.shape[:2]) < 2 * res * REDUCING_GAP, small.shape
    assert small.shape[1] > small.shape[0]  # aspect kept
    got, want = resize_and_center_crop(small, res), resize_and_center_crop(full, res)
    assert got.shape == want.shape == (res, res, 3)
    assert _psnr(got, want) > 40, _psnr(got, want)


def test_reduced_decode_applies_exif_orientation(tmp_path):
    a = np.zeros((1000, 1500, 3), np.uint8)  # stored landscape, left part red
    a[:, :500] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° CW to display
    Image.fromarray(a).save(tmp_path / "r.jpg", exif=exif, quality=95)
    Image.fromarray(a).save(tmp_path / "r.png", exif=exif)
    for name in ("r.jpg", "r.png"):
        t = decode_image(str(tmp_path / name), 64)
        assert t.shape[0] > t.shape[1]  # displayed portrait
        assert t[5, t.shape[1] // 2, 0] > 0.8 and t[-5, t.shape[1] // 2, 0] < 0.2  # red on top
    s = prepare_image_set(None, str(tmp_path), 64, False, min_images=1, roots=ANY_FOLDER)
    assert s.warnings == [] and s.images.shape == (2, 64, 64, 3)
    for img in s.images:  # the crop keeps the middle of the upright image: red at its top only
        assert img[2, 32, 0] > 0.95 and img[2, 32, 1] < 0.05 and img[-3, 32, 0] < 0.05


def test_small_images_are_not_reduced(tmp_path):
    save(tmp_path / "s.png", _photo(200, 300))
    assert decode_image(str(tmp_path / "s.png"), 128).shape == (200, 300, 3)  # < 2x target: as is


_PEAK_SCRIPT = textwrap.dedent("""
    import os, runpy, sys, tempfile
    import numpy as np
    from PIL import Image
    runpy.run_path(os.path.join(os.environ["DS_REPO"], "__init__.py"))
    from comfyui_domainstudio.trainer.imageset import ANY_FOLDER, prepare_image_set

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    warm = tempfile.mkdtemp()
    Image.fromarray(np.zeros((300, 400, 3), np.uint8)).save(os.path.join(warm, "w.png"))
    prepare_image_set(None, warm, 64, False, min_images=1, roots=ANY_FOLDER)  # libraries and allocator warmed up
    for folder in sys.argv[1:]:
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
            f.write("5")
        before = status("VmRSS:")
        s = prepare_image_set(None, folder, 256, False, min_images=1, roots=ANY_FOLDER)
        assert s.images.shape == (len(os.listdir(folder)), 256, 256, 3)
        print(os.path.basename(folder), (status("VmHWM:") - before) / 2**20, flush=True)
""")


def test_peak_memory_of_a_24_megapixel_photo_is_bounded(tmp_path):
    """A 6000x4000 photo at resolution 256: decoding it whole in float32 (the old way) raised the
    process's peak resident memory by ~730 MiB here (six of them: several GiB); decoded near the target size it must stay far
    below. Measured in a fresh process with the kernel's peak-RSS counter (Linux /proc), not timed."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.fail("this test needs Linux's /proc/self/clear_refs to reset the peak RSS counter")
    a = _photo(4000, 6000)
    (tmp_path / "jpg").mkdir()
    (tmp_path / "png").mkdir()
    Image.fromarray(a).save(tmp_path / "jpg" / "big.jpg", quality=90)
    Image.fromarray(a).save(tmp_path / "png" / "big.png", compress_level=1)
    del a
    (tmp_path / "jpg6").mkdir()  # six photos: only one is decoded at a time
    for i in range(6):
        shutil.copy(tmp_path / "jpg" / "big.jpg", tmp_path / "jpg6" / f"big{i}.jpg")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_REPO": REPO}
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, *(str(tmp_path / d) for d in ("jpg", "png", "jpg6"))],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    peaks = {line.split()[0]: float(line.split()[1]) for line in out.stdout.split("\n") if line.strip()}
    # JPEG: DCT-scaled decode (1500x1000): ~40 MiB measured. PNG: the decoder must produce the
    # full 6000x4000 image once (96 MiB in Pillow), reduced before any float copy: ~105 MiB measured.
    # Six photos cost what one does: each is decoded, resized and dropped before the next.
    assert peaks["jpg"] < 120, peaks
    assert peaks["png"] < 200, peaks
    assert peaks["jpg6"] < 120, peaks


def test_reading_a_folder_needs_roots_said_by_name(tmp_path):
    """Unconfined reading is opt-in: a caller that forgets `roots` gets an error, not any path."""
    save(tmp_path / "x.png", np.zeros((8, 8, 3), np.uint8))
    for call in (lambda: prepare_image_set(None, str(tmp_path), 64, False, min_images=1),
                 lambda: resolve_image_folder(str(tmp_path)), lambda: load_folder(str(tmp_path))):
        with pytest.raises(ValueError, match="roots=ANY_FOLDER"):
            call()
    assert resolve_image_folder(str(tmp_path), roots=ANY_FOLDER) == str(tmp_path)
