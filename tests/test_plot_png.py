"""benchmarks/plot_png.py: valid PNG bytes, series drawn where the layout says, degenerate inputs, nice ticks."""

import importlib.util
import math
import os
import random
import struct
import zlib

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("plot_png", os.path.join(ROOT, "benchmarks", "plot_png.py"))
plot_png = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plot_png)

BLUE, RED, GRAY = (31, 119, 180), (214, 39, 40), (120, 120, 120)


def read_png(path):
    """Check the PNG structure (signature, CRCs, IHDR, IDAT size, filter bytes) and return (w, h, pixel fn)."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF, tag
        chunks.append((tag, body))
        pos += 12 + n
    assert pos == len(data)
    assert [t for t, _ in chunks][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    w, h, depth, ctype, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, ctype, comp, filt, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for tag, body in chunks if tag == b"IDAT"))
    assert len(raw) == h * (1 + 3 * w)
    assert all(raw[y * (1 + 3 * w)] == 0 for y in range(h))  # filter type 0 on every row

    def pixel(x, y):
        i = y * (1 + 3 * w) + 1 + 3 * x
        return tuple(raw[i:i + 3])

    return w, h, pixel


def near(pixel, px, py, color, r=2):
    """The colour occurs within r pixels of (px, py)."""
    return any(pixel(px + dx, py + dy) == color for dx in range(-r, r + 1) for dy in range(-r, r + 1))


def test_valid_png_and_series_drawn(tmp_path):
    path = tmp_path / "p.png"
    t = [0, 600, 1200, 1800, 2400, 3000]
    series = [{"label": "MAE", "x": t, "y": [0.1, 0.31, 0.44, 0.52, 0.57, 0.6], "color": BLUE, "marker": True},
              {"label": "data2vec 2.0", "x": t, "y": [0.1, 0.42, 0.55, 0.61, 0.645, 0.66], "color": RED,
               "marker": True, "dashed": True}]
    info = plot_png.line_plot_png(str(path), series, title="acc vs time", x_label="seconds", y_label="top-1",
                                  width=700, height=400, hlines=[{"y": 0.25, "label": "floor", "color": GRAY}])
    w, h, pixel = read_png(path)
    assert (w, h) == (700, 400)
    assert pixel(0, 0) == (255, 255, 255)
    for t_ in info["x_ticks"] + info["y_ticks"]:
        assert math.isfinite(t_)
    assert 5 <= len(info["y_ticks"]) <= 8 and 5 <= len(info["x_ticks"]) <= 8
    to_px = info["to_px"]
    for s in series:  # markers at the data points (the second point of MAE is below the red line: not covered)
        for x, y in zip(s["x"][1:], s["y"][1:]):
            assert pixel(*to_px(x, y)) == s["color"], (s["label"], x, y)
    # The solid MAE line passes through the midpoint of a segment; the reference line is at its y.
    (xa, ya), (xb, yb) = to_px(1200, 0.44), to_px(1800, 0.52)
    assert near(pixel, (xa + xb) // 2, (ya + yb) // 2, BLUE)
    py = to_px(0, 0.25)[1]
    assert sum(pixel(x, py) == GRAY for x in range(info["box"][0] + 2, info["box"][2] - 2)) > 100
    # Legend in the lower-right quadrant of the plot holds both series colours.
    left, top, right, bottom = info["box"]
    quad = [pixel(x, y) for x in range((left + right) // 2, right) for y in range((top + bottom) // 2, bottom)]
    assert BLUE in quad and RED in quad and GRAY in quad


@pytest.mark.parametrize("series", [[], [{"label": "empty", "x": [], "y": [], "color": RED}],
                                   [{"label": "all nan", "x": [1, 2], "y": [None, float("nan")], "color": RED}]])
def test_empty_inputs(tmp_path, series):
    info = plot_png.line_plot_png(tmp_path / "e.png", series, width=320, height=240)
    assert read_png(tmp_path / "e.png")[:2] == (320, 240)
    assert info["x_range"][0] < info["x_range"][1] and info["y_range"][0] < info["y_range"][1]


def test_single_point(tmp_path):
    info = plot_png.line_plot_png(tmp_path / "s.png", [{"label": "one", "x": [5.0], "y": [0.5], "color": RED}])
    _, _, pixel = read_png(tmp_path / "s.png")
    assert pixel(*info["to_px"](5.0, 0.5)) == RED


def test_nan_and_none_are_skipped(tmp_path):
    y = [0.0, None, 2.0, float("nan"), 4.0, 5.0]
    info = plot_png.line_plot_png(tmp_path / "n.png", [{"x": list(range(6)), "y": y, "color": BLUE}],
                                  width=600, height=400)
    _, _, pixel = read_png(tmp_path / "n.png")
    to_px = info["to_px"]
    for x, v in enumerate(y):
        if v is not None and not math.isnan(v):
            assert pixel(*to_px(x, v)) == BLUE
    # The line breaks at the gaps: nothing between points 0 and 2, a line between 4 and 5.
    assert not near(pixel, *to_px(1.0, 1.0), BLUE, r=1)
    assert near(pixel, *to_px(4.5, 4.5), BLUE)


def test_numpy_input_fixed_ranges_and_far_points(tmp_path):
    x = np.array([0.0, 5.0, 1e12])  # the far point is clipped away, not rasterised
    info = plot_png.line_plot_png(tmp_path / "r.png", [{"label": "np", "x": x, "y": np.array([0.0, 5.0, -3e9]),
                                                        "color": RED, "marker": False}],
                                  x_range=(0, 10), y_range=(0, 10))
    assert info["x_range"] == (0, 10) and info["x_ticks"] == [0, 2, 4, 6, 8, 10]
    _, _, pixel = read_png(tmp_path / "r.png")
    assert near(pixel, *info["to_px"](2.5, 2.5), RED)
    with pytest.raises(ValueError):
        plot_png.line_plot_png(tmp_path / "bad.png", [{"x": [1, 2], "y": [1]}])
    with pytest.raises(ValueError):
        plot_png.line_plot_png(tmp_path / "bad.png", [], x_range=(1, 1))


def test_nice_ticks():
    for lo, hi in [(0, 1), (0, 0.7), (0, 4326), (0.08, 0.69), (-3, 17), (1e-4, 3e-4), (100, 100)]:
        a, b, ticks, step = plot_png.nice_ticks(lo, hi, expand=True)
        assert a <= lo and b >= hi and 5 <= len(ticks) <= 8, (lo, hi, ticks)
        mant = step / 10 ** math.floor(math.log10(step) + 1e-9)
        assert min(abs(mant - m) for m in (1, 2, 5)) < 1e-9
    rng = random.Random(0)
    ok = 0
    for _ in range(2000):
        lo = rng.uniform(-1000, 1000) * 10 ** rng.randint(-5, 5)
        ok += 5 <= len(plot_png.nice_ticks(lo, lo + rng.uniform(1e-3, 10) * 10 ** rng.randint(-5, 5), True)[2]) <= 8
    assert ok >= 0.98 * 2000
    assert plot_png._fmt(0.30000000000000004, 0.1) == "0.3" and plot_png._fmt(2000.0, 500) == "2000"
