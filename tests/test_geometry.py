"""Where masks land, against truth made here and not by the pipeline's own rules.

A shape is defined in continuous image coordinates (x runs from 0 at the image's left edge to W
at its right edge) and rasterised here by area: a pixel belongs to it when more than half of the
pixel lies inside (8 x 8 samples a pixel, numpy). Answers are written as the model writes them:
box_2d is the shape's extent normalised to 0-1000 and rounded, the 2.5 mask is a PNG map of the
shape's share of each cell of that box at some resolution, the 3.x mask a polygon on the outline.
Masks come back through the segment task's parse, a whole run against the local server, or
supervision's Gemini parser, and are decoded with pycocotools; nothing in pipeline.masks makes an
expected value.
"""

from __future__ import annotations

import base64
import io
import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pycocotools import mask as cocomask

from pipeline import exits
from pipeline.tasks import TaskSettings, get_task
from tests.conftest import COLORS, make_config, mask_iou, read_rows, run

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "OpenCV is not installed": its numpy fallback is enough
    import supervision as sv

SUBSAMPLES = 8  # per pixel side, for the area rule
SMALL = (96, 80)  # the image; shapes a dozen pixels wide
SEEDS = range(8)
PNG_MODEL = "gemini-2.5-flash"
POLYGON_MODEL = "gemini-3.8-flash"  # the model table: polygon masks (pipeline/models.json)


@dataclass(frozen=True)
class Shape:
    kind: str  # ellipse | rectangle
    cx: float
    cy: float
    rx: float  # half width
    ry: float  # half height

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        u, v = (x - self.cx) / self.rx, (y - self.cy) / self.ry
        if self.kind == "ellipse":
            return u * u + v * v <= 1
        return (np.abs(u) <= 1) & (np.abs(v) <= 1)

    def extent(self) -> tuple[float, float, float, float]:
        return (self.cx - self.rx, self.cy - self.ry, self.cx + self.rx, self.cy + self.ry)

    def outline(self, points: int = 48) -> list[tuple[float, float]]:
        if self.kind == "rectangle":
            x0, y0, x1, y1 = self.extent()
            return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
        t = np.arange(points) * 2 * np.pi / points
        return list(zip(self.cx + self.rx * np.cos(t), self.cy + self.ry * np.sin(t), strict=True))


def coverage(shape: Shape, area: tuple[float, ...], cols: int, rows: int) -> np.ndarray:
    """The share of each cell of a rows x cols grid laid over `area` (x0, y0, x1, y1) that lies
    inside the shape."""
    x0, y0, x1, y1 = area
    xs = x0 + (np.arange(cols * SUBSAMPLES) + 0.5) * (x1 - x0) / (cols * SUBSAMPLES)
    ys = y0 + (np.arange(rows * SUBSAMPLES) + 0.5) * (y1 - y0) / (rows * SUBSAMPLES)
    inside = shape.contains(xs[None, :], ys[:, None])
    return inside.reshape(rows, SUBSAMPLES, cols, SUBSAMPLES).mean(axis=(1, 3))


def truth(shape: Shape, width: int, height: int) -> np.ndarray:
    """The image's pixels more than half inside the shape (only its extent is sampled)."""
    x0, y0, x1, y1 = shape.extent()
    x0, y0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
    x1, y1 = min(int(np.ceil(x1)), width), min(int(np.ceil(y1)), height)
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = coverage(shape, (x0, y0, x1, y1), x1 - x0, y1 - y0) > 0.5
    return mask


def normalised_box(shape: Shape, width: int, height: int) -> list[int]:
    """box_2d as the model writes it: [ymin, xmin, ymax, xmax] of the extent, 0-1000, rounded."""
    x0, y0, x1, y1 = shape.extent()
    return [round(v * 1000 / s) for v, s in ((y0, height), (x0, width), (y1, height), (x1, width))]


def png_url(prob: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(prob).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def png_item(shape: Shape, width: int, height: int, map_size: int | str) -> dict:
    """A Gemini 2.5 item: the box, and the map of the region that box names at `map_size`
    cells a side ("box": about one cell a pixel)."""
    box = normalised_box(shape, width, height)
    ymin, xmin, ymax, xmax = box
    area = (xmin / 1000 * width, ymin / 1000 * height, xmax / 1000 * width, ymax / 1000 * height)
    if map_size == "box":
        cols, rows = max(1, round(area[2] - area[0])), max(1, round(area[3] - area[1]))
    else:
        cols = rows = int(map_size)
    prob = np.round(coverage(shape, area, cols, rows) * 255).astype(np.uint8)
    return {"box_2d": box, "mask": png_url(prob), "label": shape.kind}


def polygon_item(shape: Shape, width: int, height: int) -> dict:
    """A Gemini 3.x item: the outline as [x, y] points normalised over the whole image."""
    points = [[round(x * 1000 / width), round(y * 1000 / height)] for x, y in shape.outline()]
    return {"box_2d": normalised_box(shape, width, height), "label": shape.kind, "mask": points}


def decode(rle: dict) -> np.ndarray:
    return cocomask.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def parsed_masks(text: str, width: int, height: int, model: str = PNG_MODEL) -> list[np.ndarray]:
    settings = TaskSettings(kind="segment", model=model)
    parsed = get_task("segment").parse(text, "STOP", width, height, settings)
    assert (parsed.status, parsed.error) == ("ok", None)
    return [decode(obj["mask"]) for obj in parsed.objects]


def centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def small_shape(kind: str, seed: int, width: int = SMALL[0], height: int = SMALL[1]) -> Shape:
    """12 to 15 pixels wide and high, anywhere well inside the image, at fractional positions."""
    rng = np.random.default_rng(seed)
    rx, ry = rng.uniform(6, 7.5, size=2)
    return Shape(kind, rng.uniform(10, width - 10), rng.uniform(10, height - 10), rx, ry)


def outside_shape(kind: str, seed: int, width: int, height: int) -> Shape:
    """A large shape whose box leaves the image over one or two sides."""
    rng = np.random.default_rng(1000 + seed)
    rx, ry = rng.uniform(0.2, 0.3) * width, rng.uniform(0.2, 0.3) * height
    sides = [(-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (1, -1), (-1, 1), (1, 1)]
    side_x, side_y = sides[seed % len(sides)]

    def centre(side: int, size: float, radius: float) -> float:
        if side == 0:
            return rng.uniform(radius, size - radius)
        return (0 if side < 0 else size) + rng.uniform(-0.5, 0.5) * radius

    return Shape(kind, centre(side_x, width, rx), centre(side_y, height, ry), rx, ry)


# ---------------------------------------------------------------- the parser alone


@pytest.mark.parametrize("map_size", ["box", 32, 64, 256])
@pytest.mark.parametrize("kind", ["ellipse", "rectangle"])
def test_small_png_masks_land_on_the_shape(kind: str, map_size: int | str) -> None:
    width, height = SMALL
    ious, shifts = [], []
    for seed in SEEDS:
        shape = small_shape(kind, seed)
        expected = truth(shape, width, height)
        text = json.dumps([png_item(shape, width, height, map_size)])
        (mask,) = parsed_masks(text, width, height)
        ious.append(mask_iou(mask, expected))
        shifts.append(centroid(mask) - centroid(expected))
    assert min(ious) >= 0.9, [round(v, 3) for v in ious]
    # Unbiased: over the seeds the masks sit where the shapes are, not up-left of them.
    assert np.abs(np.mean(shifts, axis=0)).max() < 0.15, np.mean(shifts, axis=0)


@pytest.mark.parametrize("kind", ["ellipse", "rectangle"])
def test_small_polygon_masks_land_on_the_shape(kind: str) -> None:
    width, height = SMALL
    ious, shifts = [], []
    for seed in SEEDS:
        shape = small_shape(kind, seed)
        expected = truth(shape, width, height)
        text = json.dumps({"boxes": [polygon_item(shape, width, height)]})
        (mask,) = parsed_masks(text, width, height, model=POLYGON_MODEL)
        ious.append(mask_iou(mask, expected))
        shifts.append(centroid(mask) - centroid(expected))
    assert min(ious) >= 0.9, [round(v, 3) for v in ious]
    assert np.abs(np.mean(shifts, axis=0)).max() < 0.15, np.mean(shifts, axis=0)


@pytest.mark.parametrize("map_size", ["box", 64, 256])
@pytest.mark.parametrize("kind", ["ellipse", "rectangle"])
def test_boxes_partly_outside_the_image_match_supervision(kind: str, map_size: int | str) -> None:
    """The map is stretched over the box as given, then cropped to the image. Large shapes:
    supervision truncates box edges to whole pixels (towards zero), a pixel off ours."""
    width, height = 640, 480
    for seed in SEEDS:
        shape = outside_shape(kind, seed, width, height)
        item = png_item(shape, width, height, map_size)
        assert min(item["box_2d"]) < 0 or max(item["box_2d"]) > 1000, item["box_2d"]
        text = "```json\n" + json.dumps([item]) + "\n```"
        (mask,) = parsed_masks(text, width, height)
        theirs = sv.Detections.from_vlm(
            sv.VLM.GOOGLE_GEMINI_2_5, text, resolution_wh=(width, height)
        )
        assert mask_iou(mask, theirs.mask[0]) >= 0.97, (seed, item["box_2d"])
        assert mask_iou(mask, truth(shape, width, height)) >= 0.97, (seed, item["box_2d"])


def test_polygons_partly_outside_the_image_keep_their_shape() -> None:
    width, height = 320, 240
    for seed in SEEDS:
        shape = outside_shape("ellipse", seed, width, height)
        text = json.dumps({"boxes": [polygon_item(shape, width, height)]})
        (mask,) = parsed_masks(text, width, height, model=POLYGON_MODEL)
        assert mask_iou(mask, truth(shape, width, height)) >= 0.97, seed


def test_the_pixel_box_holds_the_mask() -> None:
    """The bbox column (pixel-edge coordinates) and the mask agree: every mask pixel's centre lies
    inside the box, and a rectangle's mask reaches to within a pixel of each side."""
    width, height = SMALL
    settings = TaskSettings(kind="segment", model=PNG_MODEL)
    for seed in SEEDS:
        shape = small_shape("rectangle", seed)
        text = json.dumps([png_item(shape, width, height, 64)])
        (obj,) = get_task("segment").parse(text, "STOP", width, height, settings).objects
        ys, xs = np.nonzero(decode(obj["mask"]))
        x0, y0, x1, y1 = obj["bbox"]
        first = np.array([xs.min(), ys.min()]) + 0.5  # pixel centres
        last = np.array([xs.max(), ys.max()]) + 0.5
        assert (first >= [x0, y0]).all() and (last <= [x1, y1]).all(), (seed, obj["bbox"])
        assert (first - [x0, y0] < 1).all() and ([x1, y1] - last < 1).all(), (seed, obj["bbox"])


# ---------------------------------------------------------------- end to end, local server


def draw_small_shapes(
    width: int, height: int, seed: int, sides: tuple[int, int], count: int = 2
) -> tuple[Image.Image, list[np.ndarray]]:
    """Apart, non-touching circles and rectangles `sides` pixels wide on white, with their masks
    (drawn with PIL, no anti-aliasing: the drawn pixels are the truth)."""
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), (255, 255, 255))
    placed: list[tuple[int, int, int, int]] = []
    truths = []
    while len(placed) < count:
        w, h = rng.randint(*sides), rng.randint(*sides)
        x0, y0 = rng.randint(4, width - w - 4), rng.randint(4, height - h - 4)
        box = (x0, y0, x0 + w, y0 + h)
        gap = max(sides) // 2
        if any(
            box[0] < b[2] + gap
            and b[0] < box[2] + gap
            and box[1] < b[3] + gap
            and b[1] < box[3] + gap
            for b in placed
        ):
            continue
        layer = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(layer)
        xy = (x0, y0, x0 + w - 1, y0 + h - 1)
        (draw.ellipse if len(placed) % 2 == 0 else draw.rectangle)(xy, fill=255)
        image.paste(COLORS[len(placed) % len(COLORS)], mask=layer)
        placed.append(box)
        truths.append(np.asarray(layer) > 127)
    return image, truths


@pytest.mark.parametrize(
    ("model", "size", "sides"),
    [
        (PNG_MODEL, SMALL, (12, 15)),
        (POLYGON_MODEL, SMALL, (12, 15)),
        # Analysed downscaled by the server (to 1024 x 768, where regions under 158 px are
        # specks): shapes 24-30 px wide there. One box_2d unit is 2 px of this image.
        (PNG_MODEL, (2000, 1500), (48, 60)),
        (POLYGON_MODEL, (2000, 1500), (48, 60)),
    ],
)
async def test_small_masks_end_to_end(
    images_dir: Path, tmp_path: Path, model: str, size: tuple[int, int], sides: tuple[int, int]
) -> None:
    width, height = size
    truths = {}
    for seed in range(6):
        image, masks = draw_small_shapes(width, height, seed, sides)
        image.save(images_dir / f"s{seed}.png")
        truths[f"s{seed}.png"] = masks
    config = make_config(tmp_path, api={"model": model})
    summary = await run(config)
    assert summary.exit_code == exits.OK, summary.rows
    rows = {row["image_path"]: row for row in read_rows(tmp_path / "out")}
    ious, areas = [], []
    for name, masks in truths.items():
        row = rows[name]
        assert len(row["objects"]) == len(masks), (name, row["objects"])
        found = [decode(obj["mask"]) for obj in row["objects"]]
        for expected in masks:
            best = max(found, key=lambda mask: mask_iou(mask, expected))
            ious.append(mask_iou(best, expected))
            areas.append(best.sum() / expected.sum())
    assert min(ious) >= 0.9, [round(v, 3) for v in ious]
    assert abs(np.mean(areas) - 1) < 0.025, areas  # neither grown nor shrunk on average
