"""trainer/memory.py's estimate: the fit through the probes, computed by hand."""

import pytest

from comfyui_domainstudio.trainer import memory

MiB = 2 ** 20


def test_constant_cost_is_not_charged_to_the_area():
    """A step that adds 1.5 GiB whatever the size plus 1 KiB per latent pixel: the old fit through
    the origin (a·A + b·A²) turned the constant into 16x more at side 64; the intercept keeps it."""
    pts = {s: 1536 * MiB + 1024 * s * s for s in (16, 24, 32)}
    est = memory.fit_points(pts)
    assert est.base == pytest.approx(1536 * MiB, rel=1e-6)
    assert est.a == pytest.approx(1024, rel=1e-6) and est.b == pytest.approx(0, abs=1e-9)
    assert est.at(64) == pytest.approx(1536 * MiB + 1024 * 64 * 64, rel=1e-6)  # 1.504 GiB, not 24


def test_quadratic_term_is_recovered_exactly():
    """base 100 MiB, a = 2000 B/px, b = 3 B/px²: three points solve it exactly; at side 64
    (A = 4096): 104,857,600 + 8,192,000 + 50,331,648 = 163,381,248 bytes."""
    pts = {s: 100 * MiB + 2000 * s * s + 3 * (s * s) ** 2 for s in (16, 24, 32)}
    est = memory.fit_points(pts, fixed=7)
    assert est.at(64) == pytest.approx(163_381_248 + 7, rel=1e-6)
    # the largest side within 163,381,255 bytes is 64 again
    assert est.max_side(163_381_255) == 64


def test_noise_that_bends_down_falls_back_to_a_line():
    """m = 10, 13, 14 MiB at A = 256, 576, 1024: the exact parabola bends down (b < 0), so the
    least-squares line with an intercept is used (slope = cov(A, m) / var(A), through the means
    A 618.67, m 12.33 MiB), and the estimate at a larger size is above every measurement."""
    pts = {16: 10 * MiB, 24: 13 * MiB, 32: 14 * MiB}
    est = memory.fit_points(pts)
    assert est.b == 0
    areas = [256.0, 576.0, 1024.0]
    ms = [10 * MiB, 13 * MiB, 14 * MiB]
    mean_a, mean_m = sum(areas) / 3, sum(ms) / 3
    slope = sum((x - mean_a) * (y - mean_m) for x, y in zip(areas, ms)) / sum((x - mean_a) ** 2 for x in areas)
    assert est.a == pytest.approx(slope) and est.base == pytest.approx(mean_m - slope * mean_a)
    assert est.at(64) > 14 * MiB


def test_fit_measures_each_probe_size_once_and_small_runs_directly():
    seen = []

    def measure(side):
        seen.append(side)
        return 1000 * side * side

    est = memory.fit(measure, 64, fixed=0)
    assert seen == list(memory.PROBE_SIZES) and est.at(64) == pytest.approx(1000 * 64 * 64, rel=1e-6)
    seen.clear()
    est = memory.fit(measure, 20, fixed=5)
    assert seen == [20] and est.at(20) == 1000 * 400 + 5
