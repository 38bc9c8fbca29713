"""A small line (or bar) chart drawn with Pillow, for the PNGs under docs/bench/.

Drawn with Pillow, which the pipeline already depends on: the `bench` extra holds only the two
baselines' libraries. A benchmark's own figure (its series, labels, reference lines) stays in its
module and calls `line_chart`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

Colour = tuple[int, int, int]
PALETTE = {"blue": (40, 90, 200), "red": (210, 50, 50), "grey": (120, 120, 120)}
SERIES_COLOURS = [(40, 90, 200), (230, 120, 30), (40, 160, 80), (150, 60, 170)]


def line_chart(
    path: Path,
    title: str,
    series: Sequence[tuple[str, Sequence[float], Sequence[float], Colour]],
    *,
    xlabel: str,
    ylabel: str,
    hlines: Sequence[tuple[float, str, Colour]] = (),
    vlines: Sequence[float] = (),
    bars: bool = False,
    size: tuple[int, int] = (1100, 520),
) -> None:
    """A small line (or bar) chart drawn with Pillow: axes, ticks, legend, reference lines."""
    width, height = size
    left, right, top, bottom = 80, 30, 64, 60
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(16), _font(13)
    xs_all = [x for _, xs, _, _ in series for x in xs] or [0.0, 1.0]
    ys_all = [y for _, _, ys, _ in series for y in ys] + [y for y, _, _ in hlines] or [1.0]
    x0, x1 = min(xs_all), max(xs_all)
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = max(ys_all) * 1.12 or 1.0

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def py(y: float) -> float:
        return height - bottom - y / y1 * (height - top - bottom)

    draw.text((left, 12), title, fill="black", font=font)
    for y in _nice_ticks(0, y1):
        draw.line((left, py(y), width - right, py(y)), fill=(230, 230, 230))
        draw.text((left - 8, py(y)), f"{y:g}", fill="black", font=small, anchor="rm")
    for x in _nice_ticks(x0, x1, 10):
        draw.line((px(x), height - bottom, px(x), height - bottom + 5), fill="black")
        draw.text((px(x), height - bottom + 8), f"{x:g}", fill="black", font=small, anchor="mt")
    for x in vlines:
        if x0 <= x <= x1:
            draw.line((px(x), top, px(x), height - bottom), fill=(200, 200, 200), width=1)
    draw.line((left, top, left, height - bottom, width - right, height - bottom), fill="black")
    draw.text((width / 2, height - 22), xlabel, fill="black", font=font, anchor="mm")
    draw.text((12, top - 22), ylabel, fill="black", font=small)
    for y, label, colour in hlines:
        draw.line((left, py(y), width - right, py(y)), fill=colour, width=2)
        draw.text((width - right - 4, py(y) - 4), label, fill=colour, font=small, anchor="rb")
    bar_width = max(1.0, (width - left - right) / max(len(xs_all), 1) * 0.8)
    for _name, xs, ys, colour in series:
        if bars:
            for x, y in zip(xs, ys, strict=True):
                if y > 0:
                    draw.rectangle((px(x), py(y), px(x) + bar_width, py(0)), fill=colour)
        elif len(xs) > 1:
            draw.line([(px(x), py(y)) for x, y in zip(xs, ys, strict=True)], fill=colour, width=2)
    lx = left + 12
    for i, (name, _, _, colour) in enumerate(series):
        y = top + 8 + i * 20
        draw.rectangle((lx, y, lx + 14, y + 12), fill=colour)
        draw.text((lx + 20, y - 2), name, fill="black", font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    span = max(hi - lo, 1e-9)
    raw = span / count
    step = 10 ** math.floor(math.log10(raw))
    for mult in (1, 2, 5, 10):
        if raw <= step * mult:
            step *= mult
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]
