"""What the local server "sees": flat regions that differ from an image's background.

The local server answers from pixels, not from canned text, so an image of flat shapes on a plain
background has exact known answers and the pipeline's geometry can be checked end to end. All of
it is numpy over whole arrays (a 384-px image takes about a millisecond): runs of foreground
pixels per row, runs joined into regions by a vectorised union-find, masks painted back from runs,
and the share of each edge pixel a region covers read from its colour (the probability map).
"""

from __future__ import annotations

import base64
import io
import math
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import pillow_heif
from PIL import Image

pillow_heif.register_heif_opener()

MAX_PIXELS = 64_000_000  # larger images are refused rather than decoded into gigabytes
MAX_ANALYSIS_SIDE = 1024  # larger images are looked at downscaled; answers are normalised anyway
FOREGROUND_TOLERANCE = 48  # max channel difference from the background: above JPEG noise and
# ringing on flat areas, below half the contrast of any shape worth naming
BACKGROUND_BIN_SHIFT = 4  # border colours quantised to 16 levels per channel to find the mode
MIN_REGION_FRACTION = 2e-4  # regions smaller than this share of the image are specks
MIN_REGION_PIXELS = 12
POLYGON_TOLERANCE_PX = 0.9  # Douglas-Peucker tolerance when tracing a polygon mask, at most
POLYGON_TOLERANCE_SHARE = 0.02  # of the box's shorter side: simplifying cuts inside a convex
# outline, which at 0.9 px shrank 12-15 px shapes by 1% (up to 4%); at 2% of 12 px, by none


class ImageDecodeError(ValueError):
    """The bytes are not an image Pillow can read."""


@dataclass(slots=True)
class Region:
    """One connected region of foreground pixels, in analysis pixels."""

    y0: int
    x0: int
    y1: int  # exclusive
    x1: int  # exclusive
    area: int
    rgb: tuple[int, int, int]
    colour: str
    shape: str
    mask: np.ndarray  # bool, (y1 - y0, x1 - x0): the region's pixels inside its box
    coverage: np.ndarray  # uint8 0-255, same shape: how much of each pixel the region covers
    rendered: dict[str, object] = field(default_factory=dict)  # encoded masks, built on demand

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(slots=True)
class Analysis:
    """Everything an answer can be made of, for one image."""

    width: int  # of the image as sent
    height: int
    analysis_width: int  # of the (possibly downscaled) array the regions are measured in
    analysis_height: int
    background: str  # colour name
    regions: list[Region]  # largest first

    def box_2d(self, region: Region) -> list[int]:
        """[ymin, xmin, ymax, xmax] normalised to 0-1000 and rounded, as the model answers."""
        h, w = self.analysis_height, self.analysis_width
        return [
            round(region.y0 * 1000 / h),
            round(region.x0 * 1000 / w),
            round(region.y1 * 1000 / h),
            round(region.x1 * 1000 / w),
        ]

    def mask_png_data_url(self, region: Region) -> str:
        """A 0-255 probability map the size of the box in image pixels, as Gemini 2.5 sends: how
        much of each pixel the region covers, so > 127 is the pixels more than half covered."""
        cached = region.rendered.get("png")
        if isinstance(cached, str):
            return cached
        plane = self._coverage_plane(region)
        url = "data:image/png;base64," + base64.b64encode(png_gray(plane)).decode("ascii")
        region.rendered["png"] = url
        return url

    def polygon(self, region: Region) -> list[list[int]]:
        """The region's outline as [[x, y], ...] normalised 0-1000 over the whole image."""
        cached = region.rendered.get("polygon")
        if isinstance(cached, list):
            return cached
        points = _outline(self._coverage_plane(region) > 127, region)
        box_side = min(region.y1 - region.y0, region.x1 - region.x0)
        tolerance = min(POLYGON_TOLERANCE_PX, POLYGON_TOLERANCE_SHARE * box_side)
        points = _simplify_closed(points, tolerance)
        scale = np.array([1000 / self.analysis_width, 1000 / self.analysis_height])
        scaled = np.rint(points * scale).astype(np.int64)
        keep = np.ones(len(scaled), dtype=bool)
        keep[1:] = np.any(scaled[1:] != scaled[:-1], axis=1)
        polygon = scaled[keep].tolist()
        region.rendered["polygon"] = polygon
        return polygon

    def _coverage_plane(self, region: Region) -> np.ndarray:
        """The region's coverage over its box, at the image's own size when it was analysed
        downscaled (bilinear: a soft edge that falls between analysis pixels where it should)."""
        sx = self.width / self.analysis_width
        sy = self.height / self.analysis_height
        if sx == 1.0 and sy == 1.0:
            return region.coverage
        size = (
            max(1, round(region.x1 * sx) - round(region.x0 * sx)),
            max(1, round(region.y1 * sy) - round(region.y0 * sy)),
        )
        return np.asarray(Image.fromarray(region.coverage).resize(size, Image.Resampling.BILINEAR))

    def centroid(self, region: Region) -> list[int]:
        """[y, x] of the region's centre of mass, normalised 0-1000 (the model's point format)."""
        ys, xs = np.nonzero(region.mask)
        cy = (region.y0 + ys.mean() + 0.5) * 1000 / self.analysis_height
        cx = (region.x0 + xs.mean() + 0.5) * 1000 / self.analysis_width
        return [round(cy), round(cx)]


def png_gray(plane: np.ndarray) -> bytes:
    """An 8-bit greyscale PNG of a uint8 array, written directly (a fifth of Pillow's cost)."""
    height, width = plane.shape
    raw = np.zeros((height, width + 1), dtype=np.uint8)  # filter byte 0 ("none") per row
    raw[:, 1:] = plane
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), 1)),
            _png_chunk(b"IEND", b""),
        )
    )


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def open_image(data: bytes) -> Image.Image:
    """The image with only its header read: size for billing now, pixels later if needed."""
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as exc:  # Pillow raises many types for bad data
        raise ImageDecodeError(str(exc)) from exc
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageDecodeError(f"{width}x{height} is too many pixels")
    return image


def analyse(image: Image.Image) -> Analysis:
    """Decode an opened image and find its regions."""
    pixels, width, height = _decode(image)
    return analyse_pixels(pixels, width, height)


def analyse_pixels(pixels: np.ndarray, width: int, height: int) -> Analysis:
    """Find the regions of an RGB uint8 array (possibly a downscaled view of width x height)."""
    ah, aw = pixels.shape[:2]
    background = _background(pixels)
    foreground = _foreground(pixels, background)
    regions = _regions(foreground, pixels, background)
    regions.sort(key=lambda r: (-r.area, r.y0, r.x0))
    return Analysis(
        width=width,
        height=height,
        analysis_width=aw,
        analysis_height=ah,
        background=colour_name(background, background=True),
        regions=regions,
    )


def _decode(image: Image.Image) -> tuple[np.ndarray, int, int]:
    try:
        width, height = image.size
        if max(width, height) > MAX_ANALYSIS_SIDE:
            scale = MAX_ANALYSIS_SIDE / max(width, height)
            target = (max(1, int(width * scale)), max(1, int(height * scale)))
            image.draft("RGB", target)  # JPEG: decode at 1/2, 1/4 or 1/8 directly
            image = image.convert("RGB")
            if max(image.size) > MAX_ANALYSIS_SIDE:
                image = image.resize(target, Image.Resampling.BOX)
        elif image.mode != "RGB":
            image = image.convert("RGB")
        pixels = np.asarray(image)
    except Exception as exc:  # Pillow raises many types for bad data
        raise ImageDecodeError(str(exc)) from exc
    return pixels, width, height


def _background(pixels: np.ndarray) -> tuple[int, int, int]:
    """The dominant colour of the border, averaged over the border pixels in its bin."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]).astype(np.int32)
    bins = border >> BACKGROUND_BIN_SHIFT
    codes = (bins[:, 0] << 8) | (bins[:, 1] << 4) | bins[:, 2]
    mode = np.bincount(codes, minlength=4096).argmax()
    mean = border[codes == mode].mean(axis=0)
    return (round(float(mean[0])), round(float(mean[1])), round(float(mean[2])))


def _foreground(pixels: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """Pixels whose largest channel difference from the background exceeds the tolerance.

    Per channel, "outside [low, high]" is one uint8 subtraction that wraps around and one
    comparison; done on rows of interleaved channels against tiled rows, so numpy's inner loops
    run over whole rows rather than three channels at a time.
    """
    h, w = pixels.shape[:2]
    low = [max(level - FOREGROUND_TOLERANCE, 0) for level in background]
    high = [min(level + FOREGROUND_TOLERANCE, 255) for level in background]
    span = [top - bottom for top, bottom in zip(high, low, strict=True)]
    low_row = np.tile(np.array(low, dtype=np.uint8), w)
    span_row = np.tile(np.array(span, dtype=np.uint8), w)
    far = ((pixels.reshape(h, w * 3) - low_row) > span_row).reshape(h, w, 3)
    return far[:, :, 0] | far[:, :, 1] | far[:, :, 2]


def _runs(foreground: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row, first column and one-past-last column of every horizontal run of foreground."""
    h, w = foreground.shape
    stride = w + 2
    padded = np.zeros((h, stride), dtype=bool)  # a background pixel either side of every row
    padded[:, 1:-1] = foreground
    flat = padded.reshape(-1)
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # alternately run starts and run ends
    first, past = edges[0::2], edges[1::2]
    rows = first // stride
    return rows, first - rows * stride - 1, past - rows * stride - 1


def _regions(
    foreground: np.ndarray, pixels: np.ndarray, background: tuple[int, int, int]
) -> list[Region]:
    h, w = foreground.shape
    rows, starts, ends = _runs(foreground)
    if len(rows) == 0:
        return []
    component = _join_runs(rows, starts, ends, w)
    count = int(component.max()) + 1
    lengths = ends - starts
    area = np.bincount(component, weights=lengths, minlength=count).astype(np.int64)
    min_area = max(MIN_REGION_PIXELS, math.ceil(MIN_REGION_FRACTION * h * w))
    keep = np.nonzero(area >= min_area)[0]
    if len(keep) == 0:
        return []
    order = np.argsort(component, kind="stable")
    bounds = np.searchsorted(component[order], np.arange(count + 1))
    regions = []
    for c in keep.tolist():
        idx = order[bounds[c] : bounds[c + 1]]
        runs = (rows[idx], starts[idx], ends[idx])
        regions.append(_region(*runs, int(area[c]), pixels, background))
    return regions


def _join_runs(rows: np.ndarray, starts: np.ndarray, ends: np.ndarray, width: int) -> np.ndarray:
    """Component index of each run: runs on adjacent rows that overlap (8-connected) join."""
    n = len(rows)
    stride = width + 2
    start_key = rows * stride + starts
    end_key = rows * stride + ends  # both sorted: runs are row-major and disjoint within a row
    below = (rows + 1) * stride
    first = np.searchsorted(end_key, below + starts, side="left")  # first run below with end >= s
    last = np.searchsorted(start_key, below + ends, side="right")  # past the last with start <= e
    counts = np.maximum(last - first, 0)
    total = int(counts.sum())
    parent = np.arange(n)
    if total:
        a = np.repeat(np.arange(n), counts)
        offsets = np.repeat(np.cumsum(counts) - counts, counts)
        b = np.repeat(first, counts) + (np.arange(total) - offsets)
        while True:
            ra, rb = parent[a], parent[b]
            differ = ra != rb
            if not differ.any():
                break
            low = np.minimum(ra[differ], rb[differ])
            high = np.maximum(ra[differ], rb[differ])
            np.minimum.at(parent, high, low)  # hook roots onto the smaller root
            while True:  # shortcut until every run points at its root
                grand = parent[parent]
                if np.array_equal(grand, parent):
                    break
                parent = grand
    _, component = np.unique(parent, return_inverse=True)
    return component.reshape(-1)


def _region(
    rows: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    area: int,
    pixels: np.ndarray,
    background: tuple[int, int, int],
) -> Region:
    y0, y1 = int(rows.min()), int(rows.max()) + 1
    x0, x1 = int(starts.min()), int(ends.max())
    bh, bw = y1 - y0, x1 - x0
    paint = np.zeros((bh, bw + 1), dtype=np.int8)
    paint[rows - y0, starts - x0] = 1
    paint[rows - y0, ends - x0] = -1
    mask = np.cumsum(paint, axis=1, dtype=np.int8)[:, :bw] > 0
    rgb = _region_colour(rows, starts, ends, pixels)
    fill = area / (bh * bw)
    shape = "rectangle" if fill > 0.9 else "circle" if fill > 0.62 else "triangle"
    coverage = _coverage(mask, pixels[y0:y1, x0:x1], background, rgb)
    return Region(y0, x0, y1, x1, area, rgb, colour_name(rgb), shape, mask, coverage)


def _coverage(
    mask: np.ndarray, pixels: np.ndarray, background: tuple[int, int, int], rgb: tuple[int, ...]
) -> np.ndarray:
    """0-255: how much of each pixel of its box the region covers, for the probability map.

    A shape's edge pixel, once the image is downscaled (or anti-aliased, or smeared by JPEG), is a
    mix of its colour and the background's, and the foreground rule takes it whole from about a
    fifth covered (FOREGROUND_TOLERANCE over a full contrast): masks grew by about half a pixel
    a side (area +5% for 24-40 px shapes in a 2000 x 1500 image analysed at 1024 x 768). So on
    the fringe, pixels with a neighbour outside the region, the share is read from the colour,
    along the line from the background's colour to the region's; inner pixels are whole.
    """
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    fringe = mask & ~inner
    base = np.asarray(background, dtype=np.float64)
    direction = np.asarray(rgb, dtype=np.float64) - base
    share = (pixels[fringe] - base) @ direction / max(float(direction @ direction), 1.0)
    coverage = mask.astype(np.uint8) * 255
    coverage[fringe] = np.rint(np.clip(share, 0.0, 1.0) * 255).astype(np.uint8)
    return coverage


def _region_colour(
    rows: np.ndarray, starts: np.ndarray, ends: np.ndarray, pixels: np.ndarray
) -> tuple[int, int, int]:
    """Mean colour of the middle half of the region's runs on three inner rows.

    Edges are anti-aliased or smeared by JPEG; the middle of a run well inside the region is not.
    """
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    inner = {y0 + (y1 - y0) // 3, y0 + (y1 - y0) // 2, y0 + 2 * (y1 - y0) // 3}
    samples = []
    for i in np.nonzero(np.isin(rows, list(inner)))[0].tolist():
        s, e = int(starts[i]), int(ends[i])
        quarter = (e - s) // 4
        samples.append(pixels[int(rows[i]), s + quarter : max(e - quarter, s + quarter + 1)])
    mean = np.concatenate(samples).mean(axis=0)
    return (round(float(mean[0])), round(float(mean[1])), round(float(mean[2])))


def colour_name(rgb: tuple[int, int, int], *, background: bool = False) -> str:
    """A plain English colour word for an RGB value (hue bins, with grey/white/black by value)."""
    r, g, b = (c / 255 for c in rgb)
    high, low = max(r, g, b), min(r, g, b)
    chroma = high - low
    saturation = chroma / high if high else 0.0
    if saturation < 0.12 or chroma < 0.08:
        if high > 0.82:
            return "white"
        return "black" if high < 0.22 else "gray"
    if high == r:
        hue = (60 * (g - b) / chroma) % 360
    elif high == g:
        hue = 60 * (b - r) / chroma + 120
    else:
        hue = 60 * (r - g) / chroma + 240
    if hue < 15 or hue >= 340:
        name = "pink" if saturation < 0.45 and high > 0.8 else "red"
        if name == "red" and high < 0.7 and saturation < 0.85:
            name = "brown"
    elif hue < 42:
        name = "brown" if high < 0.6 else "orange"
    elif hue < 70:
        name = "yellow"
    elif hue < 170:
        name = "green"
    elif hue < 200:
        name = "cyan"
    elif hue < 260:
        name = "blue"
    elif hue < 290:
        name = "purple"
    else:
        name = "purple" if high < 0.6 else "magenta"
    if background and saturation < 0.35 and high > 0.8:
        return f"light {name}"
    return name


def _outline(mask: np.ndarray, region: Region) -> np.ndarray:
    """Closed outline (analysis pixels) of a mask laid over the region's box, at any resolution:
    the top edge of its first row, each row's run ends on the row's centre line, the bottom edge
    of its last row.

    A rasteriser that takes the pixels whose centres a polygon encloses gets every row back
    exactly, and the line through the run ends is smooth: the staircase of pixel edges used
    before kept its outer corners when simplified and grew 12-15 px shapes by up to 12%.
    """
    if not mask.any():
        mask = region.mask
    rows = np.nonzero(mask.any(axis=1))[0]
    width = mask.shape[1]
    left = mask[rows].argmax(axis=1).astype(np.float64)
    right = (width - mask[rows, ::-1].argmax(axis=1)).astype(np.float64)
    ys = np.concatenate([[rows[0]], rows + 0.5, [rows[-1] + 1]])
    down = np.column_stack([np.concatenate([left[:1], left, left[-1:]]), ys])
    up = np.column_stack([np.concatenate([right[:1], right, right[-1:]]), ys])[::-1]
    cell = np.array([(region.x1 - region.x0) / width, (region.y1 - region.y0) / mask.shape[0]])
    return np.concatenate([down, up]) * cell + [region.x0, region.y0]


def _simplify_closed(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker on a closed outline, split at the point farthest from the first."""
    if len(points) <= 4:
        return points
    far = int(np.argmax(((points - points[0]) ** 2).sum(axis=1)))
    first = _simplify_open(points[: far + 1], tolerance)
    second = _simplify_open(np.concatenate([points[far:], points[:1]]), tolerance)
    return np.concatenate([first[:-1], second[:-1]])


def _simplify_open(points: np.ndarray, tolerance: float) -> np.ndarray:
    keep = np.zeros(len(points), dtype=bool)
    keep[0] = keep[-1] = True
    stack = [(0, len(points) - 1)]
    while stack:
        i, j = stack.pop()
        if j - i < 2:
            continue
        a, b = points[i], points[j]
        segment = points[i + 1 : j]
        direction = b - a
        length = math.hypot(direction[0], direction[1])
        if length == 0:
            distance = np.hypot(segment[:, 0] - a[0], segment[:, 1] - a[1])
        else:
            distance = (
                np.abs(
                    direction[0] * (segment[:, 1] - a[1]) - direction[1] * (segment[:, 0] - a[0])
                )
                / length
            )
        k = int(np.argmax(distance))
        if distance[k] > tolerance:
            split = i + 1 + k
            keep[split] = True
            stack.append((i, split))
            stack.append((split, j))
    return points[keep]
