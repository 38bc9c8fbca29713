"""Mask maths: PNG maps, boxes, polygons and COCO RLE, checked against pycocotools."""

from __future__ import annotations

import base64
import io
import json
import random

import numpy as np
import pycocotools.mask as coco
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from pipeline import masks
from pipeline.tasks import TaskSettings, get_task, segment
from pipeline.tasks.answers import MAX_OBJECTS


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def coco_counts(mask: np.ndarray) -> str:
    return coco.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")


@st.composite
def masks_2d(draw: st.DrawFn, max_side: int = 24) -> np.ndarray:
    """Random masks of three kinds: noise, filled rectangles, and all-one / all-zero."""
    height = draw(st.integers(1, max_side))
    width = draw(st.integers(1, max_side))
    kind = draw(st.sampled_from(["noise", "rect", "flat"]))
    if kind == "noise":
        return draw(arrays(np.bool_, (height, width)))
    mask = np.zeros((height, width), dtype=bool)
    if kind == "flat":
        mask[:] = draw(st.booleans())
        return mask
    y0, y1 = sorted(draw(st.lists(st.integers(0, height), min_size=2, max_size=2)))
    x0, x1 = sorted(draw(st.lists(st.integers(0, width), min_size=2, max_size=2)))
    mask[y0:y1, x0:x1] = True
    return mask


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' decode on numpy 2
@settings(max_examples=300, deadline=None, derandomize=True)
@given(masks_2d())
def test_rle_encode_is_byte_identical_to_pycocotools_and_round_trips(mask: np.ndarray) -> None:
    rle = masks.rle_encode(mask)
    assert rle["size"] == list(mask.shape)
    assert rle["counts"] == coco_counts(mask)
    assert np.array_equal(masks.rle_decode(rle), mask)
    assert masks.rle_area(rle) == int(mask.sum())
    # pycocotools reads what we write, and we read what it writes.
    theirs = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    assert np.array_equal(coco.decode(theirs).astype(bool), mask)
    assert np.array_equal(masks.rle_decode(theirs), mask)


def test_rle_encode_long_runs_need_several_characters() -> None:
    # Runs far above 2^15 need four or more 5-bit groups, and differences go negative.
    mask = np.zeros((3000, 4000), dtype=bool)
    mask[1500, 3999] = True
    mask[0:7, 100:2000] = True
    mask[2999, 0] = True
    rle = masks.rle_encode(mask)
    assert rle["counts"] == coco_counts(mask)
    assert masks.rle_area(rle) == int(mask.sum())
    assert np.array_equal(masks.rle_decode(rle), mask)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.data())
def test_rle_encode_box_equals_encoding_the_placed_mask(data: st.DataObject) -> None:
    height = data.draw(st.integers(1, 30))
    width = data.draw(st.integers(1, 30))
    full_height = data.draw(st.booleans())  # runs that continue across column boundaries
    y0, y1 = (
        (0, height)
        if full_height
        else sorted(data.draw(st.lists(st.integers(0, height), min_size=2, max_size=2)))
    )
    x0, x1 = sorted(data.draw(st.lists(st.integers(0, width), min_size=2, max_size=2)))
    inside = data.draw(arrays(np.bool_, (y1 - y0, x1 - x0)))
    full = np.zeros((height, width), dtype=bool)
    full[y0:y1, x0:x1] = inside
    assert masks.rle_encode_box(inside, (x0, y0, x1, y1), width, height) == masks.rle_encode(full)


def test_rle_encode_box_rejects_a_box_that_does_not_fit() -> None:
    with pytest.raises(ValueError, match="does not match"):
        masks.rle_encode_box(np.ones((2, 2), bool), (0, 0, 3, 2), 10, 10)
    with pytest.raises(ValueError, match="outside"):
        masks.rle_encode_box(np.ones((2, 2), bool), (9, 0, 11, 2), 10, 10)


def test_rle_decode_rejects_runs_that_do_not_fill_the_image() -> None:
    with pytest.raises(ValueError, match="add up"):
        masks.rle_decode(
            {"size": [4, 4], "counts": masks.rle_encode(np.ones((3, 4), bool))["counts"]}
        )
    with pytest.raises(ValueError, match="alphabet"):
        masks.rle_decode({"size": [1, 1], "counts": "\x01"})
    assert np.array_equal(
        masks.rle_decode({"size": [2, 2], "counts": [1, 2, 1]}), [[False, True], [True, False]]
    )


def test_threshold_is_strictly_above_127_on_a_box_sized_map() -> None:
    prob = np.array([[0, 126, 127], [128, 200, 255]], dtype=np.uint8)
    box = (5, 1, 8, 3)  # exactly the map's size: no resampling, the rule alone decides
    full = masks.place_box_mask(prob, box, 10, 4)
    expected = np.zeros((4, 10), dtype=bool)
    expected[1:3, 5:8] = [[False, False, False], [True, True, True]]
    assert np.array_equal(full, expected)
    assert np.array_equal(
        masks.place_box_mask(prob, box, 10, 4, threshold=199)[2, 5:8], [False, True, True]
    )


def test_map_of_another_size_is_resized_to_the_box() -> None:
    prob = np.zeros((10, 10), dtype=np.uint8)
    prob[:, :5] = 255  # left half inside
    full = masks.place_box_mask(prob, (10, 20, 50, 60), 64, 64)
    assert full.shape == (64, 64)
    assert full[20:60, 10:29].all() and not full[20:60, 31:50].any()
    assert not full[:20].any() and not full[60:].any() and not full[:, :10].any()


def test_box_to_pixels_takes_the_pixels_whose_centres_lie_in_the_box() -> None:
    # Edges value / 1000 * size, y first in box_2d; sorted, and clipped to the image.
    assert masks.box_to_pixels([100, 200, 500, 900], 640, 480) == (128, 48, 576, 240)
    assert masks.box_to_pixels([500, 900, 100, 200], 640, 480) == (128, 48, 576, 240)
    assert masks.box_to_pixels([-50, 200, 1200, 1000], 640, 480) == (128, 0, 640, 480)
    # Edges 128.64, 49.92, 575.36, 242.88: rounded to the nearest pixel edge, where int()
    # would have floored the top-left ones to (128, 49).
    assert masks.box_to_pixels([104, 201, 506, 899], 640, 480) == (129, 50, 575, 243)


def test_pixel_span_rounds_both_edges_the_same_way() -> None:
    assert masks.pixel_span(12.5, 20.5, 100) == (12, 20)  # centres 12.5 .. 19.5 lie in [12.5, 20.5)
    assert masks.pixel_span(12.51, 20.49, 100) == (13, 20)
    assert masks.pixel_span(-3.2, 5.0, 4) == (0, 4)
    assert masks.pixel_span(7.0, 7.0, 10) == (7, 7)  # an empty box stays empty


def test_a_box_leaving_the_image_keeps_its_map_unsqueezed() -> None:
    prob = np.zeros((10, 100), dtype=np.uint8)
    prob[:, :75] = 255  # the left three quarters of the box
    # x from -50 to 50 px on a 100 px image: the map's filled part ends at x = 25.
    inside, box_px = masks.map_box_mask(prob, [0, -500, 1000, 500], 100, 40)
    assert box_px == (0, 0, 50, 40)
    assert inside[:, :25].all() and not inside[:, 25:].any()  # not squeezed into 0-50 (to 37.5)


def test_decode_png_mask_accepts_the_forms_models_send() -> None:
    prob = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    raw = png_bytes(prob)
    text = base64.b64encode(raw).decode()
    for form in (
        "data:image/png;base64," + text,
        text,
        text.rstrip("="),
        "\n".join(text[i : i + 10] for i in range(0, len(text), 10)),
        raw,
        text.encode(),
    ):
        assert np.array_equal(masks.decode_png_mask(form), prob)


def test_decode_png_mask_reads_colour_and_16_bit_pngs_as_grey() -> None:
    grey = np.array([[0, 255], [128, 64]], dtype=np.uint8)
    for mode in ("RGB", "RGBA", "LA", "P", "1"):
        decoded = masks.decode_png_mask(png_bytes(grey, mode))
        assert decoded.shape == (2, 2) and decoded.dtype == np.uint8
        assert decoded[0, 1] > 127 and decoded[0, 0] <= 127
    wide = np.array([[0, 65535], [32768, 0]], dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, format="PNG")
    assert np.array_equal(masks.decode_png_mask(buffer.getvalue()), [[0, 255], [128, 0]])


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ("data:image/png;base64,@@not*base64!!", "base64"),
        ("", "empty"),
        (base64.b64encode(b"GIF89a not a png").decode(), "not a PNG"),
        (base64.b64encode(b"\x89PNG\r\n\x1a\n truncated").decode(), "cannot be decoded"),
    ],
)
def test_decode_png_mask_says_why_a_mask_is_unusable(data: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        masks.decode_png_mask(data)


def test_polygon_to_mask_fills_the_polygon_over_the_whole_image() -> None:
    square = [[250, 250], [750, 250], [750, 750], [250, 750]]  # [x, y], 0-1000
    mask = masks.polygon_to_mask(square, 100, 80)
    ys, xs = np.nonzero(mask)
    # Edges x 25-75, y 20-60: the pixels whose centres lie inside (not the outline's too).
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (25, 74, 20, 59)
    assert mask[20:60, 25:75].all() and mask.sum() == 50 * 40
    shape, box = masks.polygon_box_mask(square, 100, 80)
    assert masks.rle_encode_box(shape, box, 100, 80) == masks.rle_encode(mask)
    with pytest.raises(ValueError, match="3"):
        masks.polygon_to_mask([[0, 0], [10, 10]], 100, 80)


def centres_inside(points: list[list[int]], width: int, height: int) -> np.ndarray:
    """Pixel by pixel, in plain Python: is the centre inside? Even-odd, counting the edges that
    cross the centre's row line (one end at or above it, the other below) at or left of it."""
    poly = [(x / 1000 * width, y / 1000 * height) for x, y in points]
    mask = np.zeros((height, width), dtype=bool)
    for row in range(height):
        cy = row + 0.5
        for col in range(width):
            cx, inside = col + 0.5, False
            for (xa, ya), (xb, yb) in zip(poly, poly[1:] + poly[:1], strict=True):
                if (ya <= cy) != (yb <= cy) and xa + (cy - ya) * (xb - xa) / (yb - ya) <= cx:
                    inside = not inside
            mask[row, col] = inside
    return mask


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(st.lists(st.integers(-200, 1200), min_size=2, max_size=2), min_size=3, max_size=9))
def test_polygon_takes_exactly_the_pixels_whose_centres_it_encloses(points: list) -> None:
    # Vertices beyond the image, on pixel centre lines (y = 25 -> 0.5 px) and self-crossings too.
    mask = masks.polygon_to_mask(points, 24, 20)
    assert np.array_equal(mask, centres_inside(points, 24, 20))


# ------------------------------------------------- the mask budget of one answer (issue 19, 7)
def _ring(rng: random.Random, vertices: int) -> list[list[int]]:
    return [[rng.randint(0, 1000), rng.randint(0, 1000)] for _ in range(vertices)]


def test_polygons_are_charged_what_drawing_them_costs_not_their_box_2d() -> None:
    """1x1 px boxes whose 400-vertex polygons span a 4000x4000 image: each is charged its own
    pixel box plus rows x vertices, so the cap stops them after a few (before, each was charged
    its 1-pixel box_2d and all were drawn: 45 s of CPU for a 1.2 MB answer)."""
    rng = random.Random(7)
    budget = segment.MaskBudget()
    read = segment._reader(127, budget)
    results = [read({"mask": _ring(rng, 400)}, [0, 0, 1, 1], 4000, 4000) for _ in range(40)]
    drawn = [rle for rle, _ in results if rle is not None]
    each = 4000 * 4000  # about: the polygon's box is the whole image
    assert 0 < len(drawn) <= segment.MASK_PIXELS // each
    assert budget.spent <= segment.MASK_PIXELS and budget.refused == 40 - len(drawn)
    assert {why for rle, why in results if rle is None} == {segment.CAP_REACHED}


def test_a_mask_of_100000_small_polygons_is_refused_once_its_cost_passes_the_cap() -> None:
    rng = random.Random(8)
    polygons = []
    for _ in range(100_000):
        x, y = rng.randint(0, 990), rng.randint(0, 990)
        polygons.append([[x, y], [x + 5, y], [x, y + 5]])
    budget = segment.MaskBudget()
    read = segment._reader(127, budget)
    assert read({"mask": polygons}, [0, 0, 1000, 1000], 2000, 2000) == (None, segment.CAP_REACHED)
    looked = segment.MASK_PIXELS // segment.POLYGON_CELLS + 1  # polygons looked at, at most
    assert budget.spent == 0 and budget.refused == 1
    assert budget.left >= segment.MASK_PIXELS - segment.LOOK_CELLS * (looked + 1)
    # The answer's next masks still have their budget; a few polygons in one mask are drawn
    # over the box that encloses them, and charged it.
    few = polygons[:3]
    rle, why = read({"mask": few}, [0, 0, 1000, 1000], 2000, 2000)
    assert why is None and rle is not None
    union = np.zeros((2000, 2000), dtype=bool)
    for polygon in few:
        union |= masks.polygon_to_mask(polygon, 2000, 2000)
    assert np.array_equal(masks.rle_decode(rle), union)
    assert budget.spent > 3 * segment.POLYGON_CELLS


def test_many_objects_with_tiny_polygons_are_bounded_by_the_object_cap() -> None:
    rng = random.Random(9)
    items = []
    for _ in range(50_000):
        x, y = rng.randint(0, 990), rng.randint(0, 990)
        ring = [[x, y], [x + 5, y], [x, y + 5]]
        items.append({"box_2d": [y, x, y + 5, x + 5], "label": "dot", "mask": ring})
    parsed = get_task("segment").parse(
        json.dumps({"boxes": items}),
        "STOP",
        1000,
        1000,
        TaskSettings(kind="segment", model="gemini-3.8-flash"),  # type: ignore[arg-type]
    )
    assert len(parsed.objects) == MAX_OBJECTS  # the rest skipped, with the reason
    assert parsed.error is not None and f"only the first {MAX_OBJECTS}" in parsed.error
    assert all(obj["mask"] is not None for obj in parsed.objects)  # 1000 x ~5,000 cells: fits


def reference_counts(full: np.ndarray) -> str:
    """COCO compressed counts of a full mask, straight from its definition with numpy and a
    plain loop (no code of pipeline.masks): column-major runs starting with zeros, each run from
    the fourth on as the difference to the run two before, 5-bit groups + 48."""
    flat = full.ravel(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate(([0], changes, [flat.size]))).tolist()
    if flat.size and flat[0]:
        runs.insert(0, 0)
    text = []
    for i, run in enumerate(runs):
        value = run - runs[i - 2] if i > 2 else run
        more = True
        while more:
            group = value & 0x1F
            value >>= 5
            more = not ((value == 0 and not group & 0x10) or (value == -1 and group & 0x10))
            text.append(chr(group + 48 + (0x20 if more else 0)))
    return "".join(text)


def test_masks_on_a_12_mp_image_encode_as_the_full_array_would() -> None:
    """Issue 22, item 3: each mask is RLE-encoded from its box region; the result equals encoding
    the mask placed in a full 4000x3000 array (the old method), computed here with numpy alone.
    Boxes of every size, some leaving the image and some spanning its whole height (where a run
    crosses from one column into the next)."""
    width, height = 4000, 3000
    rng = random.Random(22)
    boxes = [[rng.randint(-50, 900), rng.randint(-50, 900)] for _ in range(10)]
    boxes = [[y, x, y + rng.randint(5, 400), x + rng.randint(5, 400)] for y, x in boxes]
    boxes += [[0, 100, 1000, 300], [-20, 700, 1030, 1000], [0, 0, 1000, 1000]]
    items = []
    for box in boxes:
        prob = np.array(Image.new("L", (rng.randint(8, 256), rng.randint(8, 256)), 0))
        h, w = prob.shape
        yy, xx = np.mgrid[0:h, 0:w]
        prob[((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2 < 0.9] = 220
        data = base64.b64encode(png_bytes(prob)).decode()
        items.append({"box_2d": box, "label": "thing", "mask": data})
    parsed = get_task("segment").parse(
        json.dumps(items), "STOP", width, height, TaskSettings(kind="segment")
    )
    assert parsed.objects is not None and len(parsed.objects) == len(items)
    for item, obj in zip(items, parsed.objects, strict=True):
        inside, (x0, y0, x1, y1) = masks.map_box_mask(
            masks.decode_png_mask(item["mask"]), item["box_2d"], width, height
        )
        full = np.zeros((height, width), dtype=bool)
        full[y0:y1, x0:x1] = inside
        assert obj["mask"] == {"size": [height, width], "counts": reference_counts(full)}
        assert obj["mask"]["counts"] == coco_counts(full)
