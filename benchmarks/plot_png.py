"""Dependency-free PNG line plots for benchmark results (stdlib only: math, struct, zlib).

    line_plot_png(path, series, title=..., x_label=..., y_label=..., hlines=[...])

draws each series as a polyline (optionally dashed, with filled circle markers), dashed horizontal reference
lines, "nice" 1/2/5 x 10^k ticks with a light grid, axis labels, a title and a legend (lower right, inside the
plot), with a built-in 5x7 bitmap font, and writes an 8-bit RGB PNG. x / y may be lists or numpy arrays;
points whose x or y is None / NaN / inf are skipped (the line is broken there).
"""

import math
import struct
import zlib

# 5x7 font (+1 descender row for g j p q y) for printable ASCII 32..126: 5 hex bytes per glyph, one byte
# per column, bit 0 = top row; glyphs separated by spaces.
_FONT_HEX = (
    "0000000000 00005f0000 0007000700 147f147f14 242a7f2a12 2313086462 3649562050 0005030000 "  # sp ! " # $ % & '
    "001c224100 0041221c00 14083e0814 08083e0808 0050300000 0808080808 0060600000 2010080402 "  # ( ) * + , - . /
    "3e5149453e 00427f4000 4261514946 2141454b31 1814127f10 2745454539 3c4a494930 0171090503 "  # 0-7
    "3649494936 064949291e 0036360000 0056360000 0814224100 1414141414 0041221408 0201510906 "  # 8 9 : ; < = > ?
    "324979413e 7e1111117e 7f49494936 3e41414122 7f4141221c 7f49494941 7f09090901 3e4149497a "  # @ A-G
    "7f0808087f 00417f4100 2040413f01 7f08142241 7f40404040 7f020c027f 7f0408107f 3e4141413e "  # H-O
    "7f09090906 3e4151215e 7f09192946 4649494931 01017f0101 3f4040403f 1f2040201f 3f4038403f "  # P-W
    "6314081463 0708700807 6151494543 007f414100 0204081020 0041417f00 0402010204 4040404040 "  # X Y Z [ \ ] ^ _
    "0001020400 2054545478 7f48444438 3844444420 384444487f 3854545418 087e090102 18a4a4a47c "  # ` a-g
    "7f08040478 00447d4000 0080847d00 7f10284400 00417f4000 7c04180478 7c08040478 3844444438 "  # h-o
    "fc24242418 18242424fc 7c08040408 4854545420 043f444020 3c4040207c 1c2040201c 3c4030403c "  # p-w
    "4428102844 1ca0a0a07c 4464544c44 0008364100 00007f0000 0041360800 0804081008 "  # x y z { | } ~
)
_FONT = {chr(32 + i): bytes.fromhex(g) for i, g in enumerate(_FONT_HEX.split())}
SCALE = 2  # font scale: glyphs are 10x14 px, 12 px advance

BLACK, GRID, FRAME_GRAY = (0, 0, 0), (228, 228, 228), (120, 120, 120)
PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


class _Canvas:
    """RGB raster in a bytearray; every draw call is clipped to self.clip (inclusive x0, y0, x1, y1)."""

    def __init__(self, w, h):
        self.w, self.h = w, h
        self.buf = bytearray(b"\xff" * (w * h * 3))
        self.clip = (0, 0, w - 1, h - 1)

    def rect(self, x0, y0, x1, y1, color):
        cx0, cy0, cx1, cy1 = self.clip
        x0, y0, x1, y1 = max(x0, cx0), max(y0, cy0), min(x1, cx1), min(y1, cy1)
        if x0 > x1 or y0 > y1:
            return
        row = bytes(color) * (x1 - x0 + 1)
        for y in range(y0, y1 + 1):
            i = (y * self.w + x0) * 3
            self.buf[i:i + len(row)] = row

    def line(self, x0, y0, x1, y1, color, width=2, dash=None, phase=0):
        """Bresenham line stamped with a width x width square; dash = (on, off) pixels. Returns the dash phase."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err, lo = dx + dy, -(width // 2)
        while True:
            if dash is None or phase % (dash[0] + dash[1]) < dash[0]:
                self.rect(x0 + lo, y0 + lo, x0 + lo + width - 1, y0 + lo + width - 1, color)
            if x0 == x1 and y0 == y1:
                return phase
            phase, e2 = phase + 1, 2 * err
            if e2 >= dy:
                err, x0 = err + dy, x0 + sx
            if e2 <= dx:
                err, y0 = err + dx, y0 + sy

    def outline(self, x0, y0, x1, y1, color):
        for r in ((x0, y0, x1, y0), (x0, y1, x1, y1), (x0, y0, x0, y1), (x1, y0, x1, y1)):
            self.rect(*r, color)

    def disc(self, cx, cy, r, color):
        for dy in range(-r, r + 1):
            half = int(math.sqrt(r * r - dy * dy) + 0.5)
            self.rect(cx - half, cy + dy, cx + half, cy + dy, color)

    def text(self, x, y, s, color=BLACK, scale=SCALE):
        for ch in s:
            for cx, bits in enumerate(_FONT.get(ch, _FONT["?"])):
                for cy in range(8):
                    if bits >> cy & 1:
                        px, py = x + cx * scale, y + cy * scale
                        self.rect(px, py, px + scale - 1, py + scale - 1, color)
            x += 6 * scale


def text_size(s, scale=SCALE):
    """(width, height) in pixels of a one-line string."""
    return (max(len(s) * 6 - 1, 0) * scale, 7 * scale)


def write_png(path, width, height, rgb):
    """Write rows of 8-bit RGB bytes (len == width * height * 3) as a PNG (filter 0, one IDAT)."""
    mv, stride = memoryview(rgb), width * 3
    raw = b"".join(b"\x00" + mv[y * stride:(y + 1) * stride] for y in range(height))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def nice_ticks(lo, hi, expand=False):
    """Ticks at multiples of a 1/2/5 x 10^k step, 5-8 of them where possible. expand=True widens (lo, hi)
    to whole steps (automatic ranges). Returns (lo, hi, ticks, step)."""
    if not hi > lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    k0, best = math.floor(math.log10(hi - lo)), None
    for k in range(k0 - 2, k0 + 2):
        for m in (1, 2, 5):
            step = m * 10.0 ** k
            if expand:
                a, b = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
            else:
                a, b = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
            n = b - a + 1
            # Prefer 5-8 ticks, then the tightest expanded range, then fewer ticks; else closest to 6 ticks.
            key = (0, (b - a) * step if expand else 0, n) if 5 <= n <= 8 else (1, abs(n - 6), 0)
            if best is None or key < best[0]:
                best = (key, a, b, step)
    _, a, b, step = best
    if expand:
        lo, hi = a * step, b * step
    return lo, hi, [float(f"{i * step:.12g}") for i in range(a, b + 1)], step


def _fmt(v, step):
    if abs(v) < step * 1e-6:
        v = 0.0
    if step < 1e-3 or step >= 1e6:
        return f"{v:.3g}"
    return f"{v:.{max(0, -math.floor(math.log10(step) + 1e-9))}f}"


def _finite(v):
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _clip_segment(x0, y0, x1, y1, left, top, right, bottom):
    """Liang-Barsky: the part of a float segment inside the box, or None."""
    t0, t1, dx, dy = 0.0, 1.0, x1 - x0, y1 - y0
    for p, q in ((-dx, x0 - left), (dx, right - x0), (-dy, y0 - top), (dy, bottom - y0)):
        if p == 0:
            if q < 0:
                return None
        elif p < 0:
            t0 = max(t0, q / p)
        else:
            t1 = min(t1, q / p)
    return None if t0 > t1 else (x0 + t0 * dx, y0 + t0 * dy, x0 + t1 * dx, y0 + t1 * dy)


def line_plot_png(path, series, *, title="", x_label="", y_label="", width=900, height=560, x_range=None,
                  y_range=None, hlines=()):
    """Draw `series` ([{"label", "x", "y", "color": (r, g, b), "marker": True, "dashed": False}]) and dashed
    `hlines` ([{"y", "label", "color"}]) and write the PNG to `path`. Returns the layout: x_range, y_range,
    box (left, top, right, bottom pixels of the plot frame), x_ticks, y_ticks and to_px(x, y) -> (px, py)."""
    # Finite points per series (None / NaN / inf break the line: each run is drawn separately).
    runs_per_series = []
    for s in series:
        xs, ys = list(s.get("x", [])), list(s.get("y", []))
        if len(xs) != len(ys):
            raise ValueError(f"series {s.get('label')!r}: {len(xs)} x values but {len(ys)} y values")
        runs, run = [], []
        for x, y in zip(xs, ys):
            if _finite(x) and _finite(y):
                run.append((float(x), float(y)))
            elif run:
                runs, run = runs + [run], []
        runs_per_series.append(runs + [run] if run else runs)
    pts = [p for runs in runs_per_series for run in runs for p in run]

    def auto(vals, given, pad_frac):
        if given is not None:
            if not float(given[1]) > float(given[0]):
                raise ValueError(f"range {given} must be (lo, hi) with lo < hi")
            return nice_ticks(float(given[0]), float(given[1]))
        lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
        pad = (hi - lo) * pad_frac
        return nice_ticks(0.0 if 0 <= lo < pad else lo - pad, hi + pad, expand=True)  # don't pad below 0

    x0, x1, x_ticks, x_step = auto([p[0] for p in pts], x_range, 0.0)  # a 3% margin on y only
    y0, y1, y_ticks, y_step = auto([p[1] for p in pts] + [float(h["y"]) for h in hlines if _finite(h["y"])],
                                   y_range, 0.03)
    x_labels, y_labels = [_fmt(v, x_step) for v in x_ticks], [_fmt(v, y_step) for v in y_ticks]

    # Layout: title, then the y label (horizontal, above the axis), plot, tick labels, x label.
    th = text_size("0")[1]
    top = 12 + (th + 12 if title else 0) + (th + 18 if y_label else 0) + (0 if title or y_label else 8)
    y_label_w = max([text_size(s)[0] for s in y_labels] + [0])
    left = 16 + y_label_w + 12
    right = width - 1 - max(24, text_size((x_labels or [""])[-1])[0] // 2 + 8)
    bottom = height - 1 - (12 + th + 10 + (th + 10 if x_label else 0))
    if right - left < 20 or bottom - top < 20:
        raise ValueError(f"{width}x{height} is too small for the plot")

    def to_px(x, y):
        return (round(left + (x - x0) / (x1 - x0) * (right - left)),
                round(bottom - (y - y0) / (y1 - y0) * (bottom - top)))

    cv = _Canvas(width, height)
    for v in x_ticks:  # grid, tick marks and tick labels
        px = to_px(v, y0)[0]
        cv.rect(px, top, px, bottom, GRID)
        cv.rect(px, bottom, px, bottom + 5, FRAME_GRAY)
    for v in y_ticks:
        py = to_px(x0, v)[1]
        cv.rect(left, py, right, py, GRID)
        cv.rect(left - 5, py, left, py, FRAME_GRAY)
    for v, s in zip(x_ticks, x_labels):
        cv.text(to_px(v, y0)[0] - text_size(s)[0] // 2, bottom + 12, s)
    for v, s in zip(y_ticks, y_labels):
        w_, h_ = text_size(s)
        cv.text(left - 10 - w_, to_px(x0, v)[1] - h_ // 2, s)
    if title:
        cv.text((width - text_size(title)[0]) // 2, 12, title)
    if y_label:
        cv.text(left - 10 - y_label_w, top - th - 18, y_label)
    if x_label:
        cv.text((left + right - text_size(x_label)[0]) // 2, bottom + 12 + th + 10, x_label)

    cv.outline(left, top, right, bottom, FRAME_GRAY)  # frame

    # Data: reference lines and series lines clipped to the plot interior, then markers (may overlap the frame).
    cv.clip = (left + 1, top + 1, right - 1, bottom - 1)
    for h in hlines:
        if _finite(h["y"]):
            py = to_px(x0, float(h["y"]))[1]
            cv.line(left, py, right, py, h.get("color", FRAME_GRAY), width=2, dash=(10, 6))
    for i, (s, runs) in enumerate(zip(series, runs_per_series)):
        color, dash = s.get("color") or PALETTE[i % len(PALETTE)], (10, 6) if s.get("dashed") else None
        for run in runs:
            phase = 0
            for (xa, ya), (xb, yb) in zip(run, run[1:]):
                seg = _clip_segment(*to_px(xa, ya), *to_px(xb, yb), left - 2, top - 2, right + 2, bottom + 2)
                if seg:
                    phase = cv.line(*(round(c) for c in seg), color, width=3, dash=dash, phase=phase)
        if s.get("marker", True):
            cv.clip = (left - 4, top - 4, right + 4, bottom + 4)
            for x, y in (p for run in runs for p in run):
                px, py = to_px(x, y)
                if left - 6 <= px <= right + 6 and top - 6 <= py <= bottom + 6:
                    cv.disc(px, py, 4, color)
            cv.clip = (left + 1, top + 1, right - 1, bottom - 1)
    cv.clip = (0, 0, width - 1, height - 1)

    # Legend: lower right inside the plot, one row per labelled series / reference line.
    entries = [(s["label"], s.get("color") or PALETTE[i % len(PALETTE)], s.get("marker", True), s.get("dashed"))
               for i, s in enumerate(series) if s.get("label")]
    entries += [(h["label"], h.get("color", FRAME_GRAY), False, True) for h in hlines if h.get("label")]
    if entries:
        row_h, sw = th + 10, 30
        bw = 10 + sw + 8 + max(text_size(e[0])[0] for e in entries) + 10
        bh = 8 + row_h * len(entries)
        bx, by = right - 12 - bw, bottom - 12 - bh
        cv.rect(bx, by, bx + bw, by + bh, (255, 255, 255))
        cv.outline(bx, by, bx + bw, by + bh, FRAME_GRAY)
        for k, (label, color, marker, dashed) in enumerate(entries):
            cy = by + 4 + row_h * k + row_h // 2
            cv.line(bx + 10, cy, bx + 10 + sw, cy, color, width=3, dash=(6, 4) if dashed else None)
            if marker:
                cv.disc(bx + 10 + sw // 2, cy, 4, color)
            cv.text(bx + 10 + sw + 8, cy - th // 2, label)

    write_png(path, width, height, cv.buf)
    return {"x_range": (x0, x1), "y_range": (y0, y1), "box": (left, top, right, bottom), "x_ticks": x_ticks,
            "y_ticks": y_ticks, "to_px": to_px}
