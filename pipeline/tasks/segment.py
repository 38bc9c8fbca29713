"""segment: boxes, labels and masks, in both answer shapes Gemini uses.

Mask rules (what `read_mask` does with an item's "mask"):
- a string: a base64 PNG probability map of the box (Gemini 2.5), with or without its
  "data:image/png;base64," prefix -> stretched over the box as given (Pillow bilinear,
  whatever size it came in), read at each pixel's centre, inside where > mask_threshold (127),
  then cropped to the image (a box may leave it);
- a list of 3 or more [x, y] points (0-1000 over the whole image; Gemini 3's
  {"boxes": [...]} shape), or a list of such polygons -> the pixels whose centres the
  polygon(s) enclose;
- any other rectangular 2-D array, such as booleans or 0/1 values (a form models sometimes
  emit instead; pairs of 0/1 values count as such an array, not as a polygon) -> a map of the
  box, treated like a PNG map: all values <= 1 are probabilities (x 255), else 0-255;
- anything else — missing, empty, `<seg_N>` tokens, bad base64, not a PNG, a corrupt PNG,
  ragged or flat arrays, a box or polygon with no pixel area — keeps the object with mask None
  and puts the reason in Parsed.error. The box is trusted even when the mask is not.
Every mask ends as COCO compressed RLE of the full image.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import masks
from pipeline.gemini.types import GenerateRequest
from pipeline.rowtypes import Parsed
from pipeline.tasks.answers import MaskReader, Sizes, never_raises, read_objects
from pipeline.tasks.base import TaskSettings
from pipeline.tasks.generation import SettingError
from pipeline.tasks.objects import object_request, objects_schema

SEED_PROMPT = (
    "Give the segmentation masks for {what}. Output a JSON list of segmentation masks where "
    'each entry contains the 2D bounding box in the key "box_2d", the segmentation mask in '
    'key "mask", and the text label in the key "label". Use descriptive labels.'
)
DEFAULT_PROMPT = SEED_PROMPT.format(what="all of the prominent items in the image")
LABELLED_PROMPT = SEED_PROMPT.format(what="the following items: {labels}")
_SEG_TOKEN = re.compile(r"<seg_\d+>")
# Caps on the work one answer may ask for: beyond them masks are skipped with a reason and the
# objects kept. The budget is in cells, ~10 ns of drawing and encoding each (100 M: about a
# second). A PNG or grid map costs its box's pixels. A polygon costs what drawing it costs: its
# own pixel box (not the item's box_2d, which may be 1 px while the polygon spans the image),
# plus its pixel rows x vertices (the crossing table `masks._fill_polygon` builds), plus a fixed
# POLYGON_CELLS (~50 us of numpy calls however small it is); several polygons in one mask also
# the box they are united in. Charging only box_2d let a 4.8 MB answer of 1,000 far-reaching
# 400-vertex polygons with 1-pixel boxes take 171 s of CPU, and one mask of 100,000 tiny
# polygons 18.5 s; now 2.3 s and 1.0 s (scripts/bench.py hostile-masks).
MAX_VERTICES = 10_000  # per polygon
MASK_PIXELS = 100_000_000  # cells per answer
POLYGON_CELLS = 5_000
LOOK_CELLS = 300  # finding a polygon's box, ~3 us: charged for those of a mask the cap refuses
CAP_REACHED = f"mask pixel cap reached ({MASK_PIXELS:,} pixels for one answer)"

MaskResult = tuple[dict | None, str | None]


@dataclass(slots=True)
class MaskBudget:
    """What one answer's masks may still cost, in cells (see MASK_PIXELS), and what they did."""

    left: int = MASK_PIXELS
    spent: int = 0
    refused: int = 0  # masks skipped for the cap

    def charge(self, cells: int) -> bool:
        """Take `cells` if they are left (True); else count a refusal (False)."""
        if cells > self.left:
            self.refused += 1
            return False
        self.left -= cells
        self.spent += cells
        return True


def read_mask(
    item: dict[str, Any],
    box_2d: Any,
    width: int,
    height: int,
    threshold: int,
    budget: MaskBudget | None = None,
) -> MaskResult:
    """(COCO RLE of the item's full-image mask, None) or (None, why it is unusable). `budget`:
    the answer's (an unlimited one's own when None)."""
    value = item.get("mask")
    budget = budget if budget is not None else MaskBudget(left=2**62)
    if value is None or (isinstance(value, (str, list)) and not value):
        return None, "no mask"
    try:
        if isinstance(value, str):
            if _SEG_TOKEN.search(value):
                return None, "mask given as <seg_N> tokens, which cannot be decoded"
            if not budget.charge(_box_cost(box_2d, width, height)):
                return None, CAP_REACHED
            return _box_mask_rle(masks.decode_png_mask(value), box_2d, width, height, threshold)
        if isinstance(value, list):
            return _list_mask(value, box_2d, width, height, threshold, budget)
    except (ValueError, OverflowError) as exc:  # OverflowError: integers beyond float range
        return None, str(exc)
    return None, f"mask is a JSON {type(value).__name__}, not a PNG string or a list"


def _box_mask_rle(
    prob: np.ndarray, box_2d: Any, width: int, height: int, threshold: int
) -> MaskResult:
    inside, box_px = masks.map_box_mask(prob, box_2d, width, height, threshold)
    if inside.size == 0:
        return None, "box has no pixel area for its mask"
    return masks.rle_encode_box(inside, box_px, width, height), None


def _is_point(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(not isinstance(v, bool) and isinstance(v, (int, float)) for v in value)
    )


def _list_mask(
    value: list, box_2d: Any, width: int, height: int, threshold: int, budget: MaskBudget
) -> MaskResult:
    """A polygon, a list of polygons, or a 2-D array of the box."""
    if all(isinstance(row, list) and row and all(_is_point(p) for p in row) for row in value):
        polygons = value  # several polygons
    elif len(value) >= 3 and all(_is_point(p) for p in value) and not _is_binary(value):
        polygons = [value]
    else:
        if not budget.charge(_box_cost(box_2d, width, height)):
            return None, CAP_REACHED
        return _grid_mask(value, box_2d, width, height, threshold)
    if any(len(polygon) > MAX_VERTICES for polygon in polygons):
        return None, f"polygon has more than {MAX_VERTICES:,} vertices (the cap)"
    boxes = _charge_polygons(polygons, width, height, budget)
    if boxes is None:
        return None, CAP_REACHED
    if len(polygons) == 1:
        shape, box_px = masks.polygon_box_mask(polygons[0], width, height)
        if shape.size == 0:
            return None, "polygon has no pixel area in the image"
        return masks.rle_encode_box(shape, box_px, width, height), None
    return _polygon_union(polygons, boxes, width, height), None


def _charge_polygons(
    polygons: list, width: int, height: int, budget: MaskBudget
) -> list[tuple[int, int, int, int]] | None:
    """Each polygon's pixel box, once the budget has taken what drawing them all costs (see
    MASK_PIXELS); None when it has not enough left. Charged as it goes, polygon by polygon, so a
    mask of 100,000 polygons stops being looked at where the budget ends."""
    boxes, cells = [], 0
    for polygon in polygons:
        box = masks.polygon_pixel_box(polygon, width, height)
        rows = max(box[3] - box[1], 1)
        cells += _area(box) + rows * len(polygon) + POLYGON_CELLS
        if cells > budget.left:
            break
        boxes.append(box)
    if len(polygons) > 1 and len(boxes) == len(polygons):
        cells += _area(_enclosing(boxes))  # the union's own box, drawn and encoded once more
    if len(boxes) == len(polygons) and budget.charge(cells):
        return boxes
    budget.refused += len(boxes) < len(polygons)  # (charge counted its own refusal)
    budget.left -= min(budget.left, LOOK_CELLS * (len(boxes) + 1))  # the looking was work
    return None


def _polygon_union(
    polygons: list, boxes: list[tuple[int, int, int, int]], width: int, height: int
) -> dict:
    """Several polygons as one mask, drawn over the box that encloses them (not the image)."""
    ux0, uy0, ux1, uy1 = _enclosing(boxes)
    union = np.zeros((uy1 - uy0, ux1 - ux0), dtype=bool)
    for polygon in polygons:
        shape, (x0, y0, x1, y1) = masks.polygon_box_mask(polygon, width, height)
        union[y0 - uy0 : y1 - uy0, x0 - ux0 : x1 - ux0] |= shape
    return masks.rle_encode_box(union, (ux0, uy0, ux1, uy1), width, height)


def _area(box: tuple[int, int, int, int]) -> int:
    return max(box[2] - box[0], 0) * max(box[3] - box[1], 0)


def _enclosing(boxes: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def _is_binary(rows: list) -> bool:
    """A list of pairs whose values are all 0/1 or booleans: a 2-column array, not a polygon."""
    return all(v in (0, 1) for row in rows for v in row)


def _grid_mask(value: list, box_2d: Any, width: int, height: int, threshold: int) -> MaskResult:
    if not all(isinstance(row, list) for row in value):
        return None, "mask is a flat list, not a 2-D array or a polygon"
    lengths = {len(row) for row in value}
    if len(lengths) != 1 or 0 in lengths:
        return None, "mask rows differ in length"
    if not all(isinstance(v, (bool, int, float)) for row in value for v in row):
        return None, "mask array holds non-numbers"
    grid = np.asarray(value, dtype=np.float64)
    if not np.isfinite(grid).all():
        return None, "mask array holds non-finite numbers"
    scale = 255.0 if grid.max(initial=0) <= 1 else 1.0
    prob = np.clip(grid * scale, 0, 255).round().astype(np.uint8)
    return _box_mask_rle(prob, box_2d, width, height, threshold)


def _reader(threshold: int, budget: MaskBudget | None = None) -> MaskReader:
    """A mask reader for one answer, holding that answer's budget (`budget`: a test's)."""
    spend = budget if budget is not None else MaskBudget()

    def read(item: dict[str, Any], box_2d: Any, width: int, height: int) -> MaskResult:
        return read_mask(item, box_2d, width, height, threshold, spend)

    return read


def _box_cost(box_2d: Any, width: int, height: int) -> int:
    """Cells a map mask will be drawn over: its box's pixels (at least one)."""
    try:
        x0, y0, x1, y1 = masks.box_edges(box_2d, width, height)
    except (TypeError, ValueError, OverflowError):
        return 0
    box_w, box_h = min(max(x1 - x0, 0.0), width), min(max(y1 - y0, 0.0), height)
    return int(box_w * box_h) + 1


def boxes_schema(settings: TaskSettings) -> dict[str, Any]:
    """The response schema the image-understanding page (3.8 Flash sample, 2026-09) sends to
    get masks from Gemini 3.6+: {"boxes": [{box_2d, label, mask: [[x, y], ...]}]}, the polygon
    in 0-1000 of the whole image (supervision 0.31's from_google_gemini_3_6 reads it so)."""
    listed = objects_schema(settings, "box_2d", 4)
    item = listed["items"]
    point = {"type": "ARRAY", "items": {"type": "INTEGER"}, "minItems": 2, "maxItems": 2}
    item["properties"]["mask"] = {"type": "ARRAY", "items": point}
    item["required"].append("mask")
    return {"type": "OBJECT", "properties": {"boxes": listed}, "required": ["boxes"]}


class SegmentTask:
    """Boxes, labels and masks (labels as in detect). The table says how a model gives masks:
    2.5 (and 3 Flash preview) answer a list with PNG strings when asked in words, and no schema
    is sent, since one would force a mask form on them; the 3.6+ models give polygons only for
    the {"boxes": [...]} schema, which is sent (`mask_schema`). The parser reads both shapes.
    """

    kind = "segment"

    def request(self, settings: TaskSettings) -> GenerateRequest:
        if settings.spec.segmentation is None:
            raise SettingError(
                "kind", f"{settings.spec.name} does not return segmentation masks; use detect"
            )
        schema = boxes_schema(settings) if settings.spec.mask_schema else None
        return object_request(settings, (DEFAULT_PROMPT, LABELLED_PROMPT), schema=schema)

    @never_raises
    def parse(
        self,
        text: str,
        finish_reason: str | None,
        width: int,
        height: int,
        settings: TaskSettings,
        sizes: Sizes | None = None,
    ) -> Parsed:
        return read_objects(
            text,
            finish_reason,
            width,
            height,
            labels=settings.labels,
            read_mask=_reader(settings.mask_threshold),
            sizes=sizes,
        )
