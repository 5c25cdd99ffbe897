"""Loss-history plot rendered with PIL.ImageDraw (no matplotlib dependency), returned as a
ComfyUI IMAGE tensor [1, H, W, 3] float32 in 0..1."""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# Distinct, colour-blind-friendly-ish colours (Okabe-Ito order), assigned in history order.
SERIES_COLORS = [
    (0, 114, 178),
    (213, 94, 0),
    (0, 158, 115),
    (204, 121, 167),
    (230, 159, 0),
    (86, 180, 233),
    (120, 60, 20),
    (90, 90, 90),
]
BACKGROUND = (255, 255, 255)
AXIS_COLOR = (0, 0, 0)
GRID_COLOR = (225, 225, 225)
TEXT_COLOR = (30, 30, 30)

# Log scale only pays off when the data spans more than this factor.
_LOG_SPAN = 10.0


def smooth(values: Iterable[float], alpha: float = 0.9) -> list[float]:
    """Exponential moving average: s = alpha * s + (1 - alpha) * v, started at the first finite
    value. Non-finite inputs are ignored (that position repeats the previous smoothed value, or
    is nan before any finite value), so the output has the same length as the input."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    out: list[float] = []
    s = None
    for v in values:
        v = float(v)
        if math.isfinite(v):
            s = v if s is None else alpha * s + (1.0 - alpha) * v
        out.append(float("nan") if s is None else s)
    return out


def _font():
    try:
        return ImageFont.load_default()
    except Exception:  # pragma: no cover - very old Pillow without a bundled font
        return None


def _text(draw: ImageDraw.ImageDraw, xy, text: str, font, fill=TEXT_COLOR) -> None:
    try:
        draw.text(xy, text, fill=fill, font=font)
    except (UnicodeError, ValueError):
        # The bitmap fallback font is latin-1 only; keep the label readable rather than crash.
        draw.text(xy, text.encode("ascii", "replace").decode("ascii"), fill=fill, font=font)


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    try:
        box = draw.textbbox((0, 0), text, font=font)
    except (UnicodeError, ValueError):
        box = draw.textbbox((0, 0), text.encode("ascii", "replace").decode("ascii"), font=font)
    return box[2] - box[0], box[3] - box[1]


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _faint(color: tuple[int, int, int], strength: float = 0.3) -> tuple[int, int, int]:
    return tuple(int(round(255 - (255 - c) * strength)) for c in color)


def render_loss_plot(
    history: dict[str, list[float]],
    width: int = 512,
    height: int = 320,
    title: str = "loss",
) -> torch.Tensor:
    """Draw each series of `history` (x = index in its list, i.e. the logged step) as a polyline.

    The y axis is log10 when every finite value is > 0 and max/min > 10, linear otherwise.
    Non-finite values are skipped. A series named "total" is drawn as a faint raw line under an
    EMA-smoothed line. Empty history (or no finite values) renders a "no data" notice."""
    width, height = int(width), int(height)
    if width < 64 or height < 64:
        raise ValueError(f"plot size {width}×{height} is too small; use at least 64×64")
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = _font()

    # Keep (index, value) pairs so skipped non-finite values don't shift later points.
    series: list[tuple[str, list[tuple[int, float]], tuple[int, int, int]]] = []
    for k, (name, values) in enumerate((history or {}).items()):
        pts = []
        for i, v in enumerate(values or []):
            try:
                v = float(v)
            except (TypeError, ValueError):
                continue
            if math.isfinite(v):
                pts.append((i, v))
        series.append((str(name), pts, SERIES_COLORS[k % len(SERIES_COLORS)]))

    tw, th = _text_size(draw, title, font)
    _text(draw, ((width - tw) // 2, 4), title, font)

    all_vals = [v for _, pts, _ in series for _, v in pts]
    if not all_vals:
        msg = "no data"
        mw, mh = _text_size(draw, msg, font)
        _text(draw, ((width - mw) // 2, (height - mh) // 2), msg, font)
        return _to_tensor(img)

    use_log = min(all_vals) > 0 and max(all_vals) / min(all_vals) > _LOG_SPAN
    fy = (lambda v: math.log10(v)) if use_log else (lambda v: v)
    y_lo, y_hi = fy(min(all_vals)), fy(max(all_vals))
    if y_hi - y_lo < 1e-12:  # flat data (or a single point): give it some height
        pad = 0.5 if use_log else max(abs(y_lo) * 0.1, 1e-3)
        y_lo, y_hi = y_lo - pad, y_hi + pad
    x_max = max(i for _, pts, _ in series for i, _ in pts)
    x_min = min(i for _, pts, _ in series for i, _ in pts)
    if x_max == x_min:
        x_min, x_max = x_min - 1, x_max + 1

    # Plot area: room on the left for y labels, below for x labels, above for the title.
    label_w = max(_text_size(draw, _fmt(v), font)[0] for v in (min(all_vals), max(all_vals)))
    left, right = label_w + 10, width - 10
    top, bottom = th + 12, height - (th + 12)

    def px(i: float) -> float:
        return left + (i - x_min) / (x_max - x_min) * (right - left)

    def py(v: float) -> float:
        return bottom - (fy(v) - y_lo) / (y_hi - y_lo) * (bottom - top)

    # Grid at the data min/max, then axes.
    vmin, vmax = min(all_vals), max(all_vals)
    for v in (vmin, vmax):
        y = py(v)
        draw.line([(left, y), (right, y)], fill=GRID_COLOR)
        lw, lh = _text_size(draw, _fmt(v), font)
        _text(draw, (left - lw - 5, y - lh / 2 - 1), _fmt(v), font)
    draw.line([(left, top), (left, bottom)], fill=AXIS_COLOR)
    draw.line([(left, bottom), (right, bottom)], fill=AXIS_COLOR)
    for i in (x_min, x_max):
        s = str(int(i))
        sw, _ = _text_size(draw, s, font)
        x = min(max(px(i) - sw / 2, 0), width - sw)
        _text(draw, (x, bottom + 4), s, font)
    if use_log:
        _text(draw, (left + 4, bottom - th - 6), "log scale", font, fill=(120, 120, 120))

    def polyline(pts: list[tuple[int, float]], color) -> None:
        xy = [(px(i), py(v)) for i, v in pts]
        if len(xy) == 1:
            x, y = xy[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        else:
            draw.line(xy, fill=color, width=2, joint="curve")

    for name, pts, color in series:
        if not pts:
            continue
        if name == "total" and len(pts) > 2:
            polyline(pts, _faint(color))
            sm = smooth([v for _, v in pts])
            polyline([(i, s) for (i, _), s in zip(pts, sm)], color)
        else:
            polyline(pts, color)

    # Legend, top-right inside the plot area, on a white box so lines don't hide it.
    entries = [
        (f"{name}: {_fmt(pts[-1][1]) if pts else 'n/a'}", color) for name, pts, color in series
    ]
    line_h = th + 4
    box_w = max(_text_size(draw, t, font)[0] for t, _ in entries) + 26
    box_h = line_h * len(entries) + 6
    bx0 = max(left + 2, right - box_w - 4)
    by0 = top + 4
    draw.rectangle([bx0, by0, bx0 + box_w, by0 + box_h], fill=BACKGROUND, outline=GRID_COLOR)
    for k, (label, color) in enumerate(entries):
        y = by0 + 4 + k * line_h
        draw.line([(bx0 + 4, y + th / 2 + 1), (bx0 + 18, y + th / 2 + 1)], fill=color, width=2)
        _text(draw, (bx0 + 22, y), label, font)

    return _to_tensor(img)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(arr)).unsqueeze(0)
