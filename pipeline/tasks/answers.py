"""Reading model answers: the JSON-finding, salvage, box and label code every task kind shares.

Models do not always answer with clean JSON. The rules here, in the order they are tried:

1. A finish reason that means the answer was withheld (SAFETY, RECITATION, ...) -> "blocked".
2. JSON is looked for in the whole text, then inside a markdown fence (closed or not), then at
   every "[" / "{" in the text (prose before and after is ignored). Strict JSON: NaN and
   Infinity are not numbers here.
3. If no complete list of objects is found (a truncated answer, finish reason MAX_TOKENS, or
   broken JSON), the first list of objects is salvaged element by element: every complete
   element is kept, a broken one is skipped with its reason (reading resumes at the next
   "}, {"), and the rest after a cut is lost. The result is marked "partial" (unless the list
   itself closed cleanly and only a wrapper around it was cut). Scanning never goes past JSON
   that starts but does not parse, so a complete inner object of a cut answer is never taken
   for the whole answer.
4. Each object is checked on its own; an object with a missing or invalid key is skipped and
   the reason is listed in Parsed.error, the others are kept (see `read_list`). In a group's
   answer each object also names the image it is in (pipeline/tasks/multi.py).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline import masks
from pipeline.rowtypes import Parsed
from pipeline.tasks import multi
from pipeline.tasks.finish import finish_status, is_truncated

# Keys under which models wrap their list of objects ({"boxes": [...]} is Gemini 3's shape).
LIST_KEYS = (
    "boxes",
    "objects",
    "items",
    "detections",
    "bounding_boxes",
    "segmentation_masks",
    "masks",
    "results",
    "predictions",
    "points",
)
MAX_REASONS = 8  # reasons listed in Parsed.error before "and N more"
# A hostile answer must not hold a worker (or the event loop) for a minute: beyond this many
# objects the rest are skipped, with a reason (2,000 polygons on a 2000x2000 image once took 66 s).
MAX_OBJECTS = 1000
_MAX_CANDIDATES = 64  # "[" / "{" positions tried in prose; bounds the work on garbage text
_INT32 = 2**31

_FENCE = re.compile(r"```[ \t]*[\w+.-]*[ \t]*\r?\n?(.*?)(?:```|\Z)", re.DOTALL)
_CANDIDATE = re.compile(r"[\[{]")
_LIST_OF_OBJECTS = re.compile(r"\[\s*(?=\{)")
_NEXT_ELEMENT = re.compile(r"\}\s*,?\s*(?=\{)")  # where the next element of a list may start
_AFTER_ELEMENT = re.compile(r"\s*([,\]])?\s*")
_SPACE = re.compile(r"\s*")
_JSON_START = re.compile(r'\{\s*["}]|\[\s*(?:[\[{"\]\d-]|true|false|null)')


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


@dataclass(frozen=True, slots=True)
class Found:
    """JSON found in an answer. `complete` is False when the value was salvaged from a cut."""

    value: Any
    complete: bool = True
    skipped: tuple[str, ...] = ()  # broken elements passed over while salvaging


_BROKEN = object()  # marks "JSON starts here but does not parse" (None is JSON's null)


def _whole(text: str) -> Any:
    """The text as one JSON value (surrounding whitespace allowed), or _BROKEN."""
    try:
        value, end = _DECODER.raw_decode(text.strip())
    except (ValueError, RecursionError):
        return _BROKEN
    return _BROKEN if end != len(text.strip()) else value


def _decode_at(text: str, start: int) -> tuple[Any, int]:
    """(value, end) of the JSON value starting at text[start], or (_BROKEN, start)."""
    try:
        return _DECODER.raw_decode(text, start)
    except (ValueError, RecursionError):
        return _BROKEN, start


def _scan(text: str) -> Iterator[tuple[Any, int]]:
    """Every JSON value the answer holds, in order, as (value, start): whole text, fenced
    blocks, then at each "[" / "{" in prose. A position where JSON starts but does not parse
    is yielded as (_BROKEN, position) so a caller can salvage from there.
    """
    value = _whole(text)
    if value is not _BROKEN:
        yield value, 0
        return
    for fence in _FENCE.finditer(text):
        value = _whole(fence.group(1))
        if value is not _BROKEN:
            yield value, fence.start(1)
    position = 0
    for _ in range(_MAX_CANDIDATES):
        match = _CANDIDATE.search(text, position)
        if match is None:
            return
        value, end = _decode_at(text, match.start())
        yield value, match.start()
        # Do not look inside a value already read; after a broken start, try the next bracket.
        position = end if value is not _BROKEN else match.start() + 1


def find_json(text: str, accept: Callable[[Any], bool] | None = None) -> Found | None:
    """The first JSON value in the answer that `accept` takes (any value when None).

    When values are found but none is accepted, the first one is returned so the caller can
    say what was wrong with it. Scanning stops at JSON that starts but does not parse (a cut
    answer), so a complete inner value of a cut one is never taken for the answer; prose
    brackets such as "[1]" or "[see below]" do not stop it.
    """
    first: Found | None = None
    for value, start in _scan(text):
        if value is _BROKEN:
            if _JSON_START.match(text, start):
                break  # JSON that does not parse: anything found after it may be a fragment
            continue
        if accept is None or accept(value):
            return Found(value)
        if first is None:
            first = Found(value)
    return first


def _match_at(pattern: re.Pattern[str], text: str, position: int) -> re.Match[str]:
    """The match at `position` of a pattern whose every part is optional (_SPACE,
    _AFTER_ELEMENT): it always matches, if only the empty string."""
    match = pattern.match(text, position)
    assert match is not None  # an all-optional pattern cannot fail
    return match


def salvage_list(text: str, start: int) -> Found:
    """The complete elements of the list of objects opening at text[start] ("[") in a cut or
    broken answer. A broken element is skipped when another one follows ("}, {"); at a cut,
    reading stops.
    """
    items: list[Any] = []
    skipped: list[str] = []
    closed = False
    position = _match_at(_SPACE, text, start + 1).end()
    while position < len(text):
        value, end = _decode_at(text, position)
        if value is not _BROKEN:
            items.append(value)
            position = end
            after = _match_at(_AFTER_ELEMENT, text, position)
            if after.group(1) == "]":
                closed = True  # the list is whole; what is broken is around it
                break
            if after.group(1) == "," or text.startswith("{", after.end()):
                position = after.end()
                continue
            if after.end() >= len(text):
                break  # cut off right after an element
        resume = _NEXT_ELEMENT.search(text, position)
        if resume is None:
            break  # cut off: everything from here on is lost
        skipped.append(f"skipped an element that is not valid JSON after item[{len(items) - 1}]")
        position = resume.end()
    return Found(items, complete=closed and not skipped, skipped=tuple(skipped))


def as_items(value: Any) -> list[Any] | None:
    """The list of objects an answer value stands for: a list, {"boxes": [...]}, or one object."""
    if isinstance(value, list):
        return value
    if not isinstance(value, dict):
        return None
    if "box_2d" in value or "point" in value:
        return [value]
    for key in LIST_KEYS:
        if isinstance(value.get(key), list):
            return value[key]
    for inner in value.values():
        if isinstance(inner, list) and inner and isinstance(inner[0], dict):
            return inner
    return None


def _looks_like_items(value: Any) -> bool:
    items = as_items(value)
    return items is not None and all(isinstance(item, dict) for item in items)


def find_items(text: str) -> tuple[list[Any] | None, Found | None]:
    """(the answer's list of objects or None, what was found). Salvages cut answers.

    Scanning stops at the first list of objects that does not parse: what follows is inside
    it, so a complete inner object there must not pass for the whole answer.
    """
    first: Found | None = None
    broken = False
    for value, start in _scan(text):
        if value is _BROKEN:
            if _LIST_OF_OBJECTS.match(text, start):
                salvaged = salvage_list(text, start)
                return salvaged.value, salvaged
            broken = broken or bool(_JSON_START.match(text, start))  # e.g. {"boxes": [ cut
            continue
        if _looks_like_items(value):
            return as_items(value), Found(value)
        if first is None and not broken:
            first = Found(value)
    if first is not None:
        return as_items(first.value), first
    return None, None


def normalise_label(label: str) -> str:
    """The form labels are compared in: case-folded, whitespace collapsed."""
    return " ".join(label.split()).casefold()


def label_index(labels: Sequence[str]) -> dict[str, str]:
    """Normalised label -> the label as configured. ValueError on empty or clashing labels."""
    index: dict[str, str] = {}
    for label in labels:
        key = normalise_label(label)
        if not key:
            raise ValueError("labels must not be empty strings")
        if key in index:
            raise ValueError(f"labels {index[key]!r} and {label!r} are the same label")
        index[key] = label
    return index


def read_number(value: Any) -> float:
    """A finite JSON number (not a bool), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{value!r:.40} is not a number")
    if isinstance(value, int) and abs(value) >= _INT32:
        raise ValueError(f"{str(value)[:12]}... is out of range")  # no float(): it may overflow
    number = float(value)
    # int32 once rounded (box_2d is stored rounded): 2147483647.5 is out, not stored as 2**31
    if not math.isfinite(number) or not -_INT32 <= round(number) < _INT32:
        raise ValueError(f"{value!r:.40} is out of range")
    return number


def pixel_box(values: Sequence[float], width: int, height: int) -> list[float]:
    """[ymin, xmin, ymax, xmax] in 0-1000 -> [x0, y0, x1, y1] in pixel-edge coordinates of the
    image: `masks.box_edges` (docs/gemini-api.md § Object detection: y first; corners sorted)
    clipped to the image, so a mask's pixels are the ones whose centres lie in this box."""
    x0, y0, x1, y1 = masks.box_edges(values, width, height)
    return [
        min(max(x0, 0.0), width),
        min(max(y0, 0.0), height),
        min(max(x1, 0.0), width),
        min(max(y1, 0.0), height),
    ]


def read_box(box: Any, width: int, height: int) -> tuple[list[int], list[float]]:
    """box_2d as returned -> (box_2d to store, [x0, y0, x1, y1] in pixels). ValueError if unusable.

    box_2d is kept exactly as returned (fractional values rounded, since the column is int32);
    the pixel box is `pixel_box`.
    """
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise ValueError("box_2d is not a list of 4 numbers")
    bbox = pixel_box([read_number(v) for v in box], width, height)
    if bbox[2] <= bbox[0] or bbox[3] <= bbox[1]:
        raise ValueError("box_2d is empty once clipped to the image")
    stored = [v if isinstance(v, int) else round(v) for v in box]
    return stored, bbox


def read_point(point: Any, width: int, height: int) -> tuple[list[int], list[float]]:
    """A point [y, x] (0-1000) -> a zero-size box [y, x, y, x] and its pixel box."""
    if not isinstance(point, (list, tuple)) or len(point) != 2:
        raise ValueError("point is not a list of 2 numbers")
    y, x = (read_number(v) for v in point)
    stored = [v if isinstance(v, int) else round(v) for v in point]
    return [stored[0], stored[1], stored[0], stored[1]], pixel_box([y, x, y, x], width, height)


def read_label(item: dict[str, Any]) -> str:
    """The item's label: a non-empty string (a number is taken as its JSON text)."""
    label = item.get("label")
    if isinstance(label, bool) or label is None:
        raise ValueError("no label" if label is None else "label is not a string")
    if isinstance(label, (int, float)):
        label = json.dumps(label)
    if not isinstance(label, str):
        raise ValueError("label is not a string")
    label = utf8_safe(label.strip())
    if not label:
        raise ValueError("label is empty")
    return label


def utf8_safe(text: str) -> str:
    """The text with lone surrogates (which JSON's \\ud800 escapes allow) replaced, so it can be
    written as UTF-8 (Parquet, JSON files) later.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


MaskReader = Callable[[dict[str, Any], list[float], int, int], tuple[dict | None, str | None]]
Sizes = Sequence[tuple[int, int]]
# An object's fields from one answer item ({"box_2d": ..., "bbox": ...}); ValueError when unusable.
Placer = Callable[[dict[str, Any]], dict[str, Any]]
# Adds what is read after the label is accepted (a mask) to an object; returns a reason or None.
Finisher = Callable[[dict[str, Any], dict[str, Any]], str | None]


def located(
    item: dict[str, Any], width: int, height: int, sizes: Sizes | None
) -> tuple[int | None, int, int]:
    """(image index, width, height) of the image an item is in: the lone image when `sizes` is
    None, else the group member its "image" names (multi.image_index; ValueError otherwise)."""
    if sizes is None:
        return None, width, height
    index = multi.image_index(item, sizes)
    return index, *sizes[index]


def read_objects(
    text: str,
    finish_reason: str | None,
    width: int,
    height: int,
    labels: Sequence[str] | None = None,
    read_mask: MaskReader | None = None,
    sizes: Sizes | None = None,
) -> Parsed:
    """Turn a detection / segmentation answer into objects. Never raises on any text.

    Rules (and those of `read_list`): an item without a usable box_2d (or point) is skipped with
    a reason. A point [y, x] becomes a zero-size box. `read_mask(item, box_2d, width, height)`
    -> (rle or None, reason or None) adds masks; a mask it cannot use leaves the object with
    mask None and says why. With `sizes` (a group), each object is placed in the member its
    "image" names and carries that index.
    """

    def place(item: dict[str, Any]) -> dict[str, Any]:
        image, w, h = located(item, width, height, sizes)
        if "box_2d" in item or "point" not in item:
            if "box_2d" not in item:
                raise ValueError("no box_2d")
            box_2d, bbox = read_box(item["box_2d"], w, h)
        else:
            box_2d, bbox = read_point(item["point"], w, h)
        placed = {"box_2d": box_2d, "bbox": bbox, "mask": None}
        return placed if sizes is None else {**placed, "image": image}

    def add_mask(item: dict[str, Any], obj: dict[str, Any]) -> str | None:
        if read_mask is None or "box_2d" not in item:
            return None
        _, w, h = located(item, width, height, sizes)
        obj["mask"], why = read_mask(item, item["box_2d"], w, h)
        return why

    return read_list(text, finish_reason, place, labels, add_mask)


def read_point_2d(point: Any, width: int, height: int) -> tuple[list[int], list[float]]:
    """A point [y, x] in 0-1000 -> (point_2d to store, [x, y] in pixels of the image).

    point_2d is kept as returned (fractions rounded: the column is int32); the pixel point is
    x / 1000 * width, y / 1000 * height, in the pixel-edge coordinates boxes use. A point
    outside 0-1000 is not in the image: ValueError.
    """
    if not isinstance(point, (list, tuple)) or len(point) != 2:
        raise ValueError("point is not a list of 2 numbers [y, x]")
    y, x = (read_number(v) for v in point)
    if not (0 <= y <= 1000 and 0 <= x <= 1000):
        raise ValueError(f"point [{y:g}, {x:g}] is outside 0-1000")
    stored = [v if isinstance(v, int) else round(v) for v in point]
    return stored, [x / 1000 * width, y / 1000 * height]


def read_points(
    text: str,
    finish_reason: str | None,
    width: int,
    height: int,
    labels: Sequence[str] | None = None,
    sizes: Sizes | None = None,
) -> Parsed:
    """Turn a pointing answer ([{"point": [y, x], "label": ...}]) into objects with `point_2d`
    and `xy`. Never raises. Rules as `read_list`; an item without a usable point is skipped."""

    def place(item: dict[str, Any]) -> dict[str, Any]:
        image, w, h = located(item, width, height, sizes)
        if "point" not in item:
            raise ValueError("no point")
        point_2d, xy = read_point_2d(item["point"], w, h)
        placed = {"point_2d": point_2d, "xy": xy}
        return placed if sizes is None else {**placed, "image": image}

    return read_list(text, finish_reason, place, labels)


def read_list(
    text: str,
    finish_reason: str | None,
    place: Placer,
    labels: Sequence[str] | None = None,
    finish: Finisher | None = None,
) -> Parsed:
    """An answer's list of objects, each labelled and placed by `place`. Never raises.

    Rules: an item `place` refuses, or without a label, is skipped with a reason. With a closed
    label list, labels are matched ignoring case and spacing and replaced by the configured
    spelling; other labels are dropped and named in Parsed.error (status stays "ok": the model
    was asked for these labels only). `finish(item, object)` then adds what costs more to read
    (a mask), returning why it could not. Status: "partial" for a salvaged (cut or broken)
    answer, "error" when nothing usable was found, else "ok". An empty list is a valid "ok"
    answer with no objects.
    """
    truncated = is_truncated(finish_reason)
    items, found = find_items(text)
    if items is None:
        if found is not None:
            return Parsed(status="error", error="answer JSON is not a list of objects")
        if truncated:
            return Parsed(status="partial", error="answer cut off (MAX_TOKENS) before any object")
        return Parsed(status="error", error="no JSON list of objects in the answer")
    assert found is not None
    index = label_index(labels) if labels else None
    objects: list[dict[str, Any]] = []
    reasons = list(found.skipped)
    if len(items) > MAX_OBJECTS:
        reasons.append(f"the answer holds {len(items)} objects: only the first {MAX_OBJECTS} read")
        items = items[:MAX_OBJECTS]
    dropped: list[str] = []
    for position, item in enumerate(items):
        where = f"item[{position}]"
        if not isinstance(item, dict):
            reasons.append(f"{where}: not an object")
            continue
        try:
            label = read_label(item)
            placed = place(item)
        except ValueError as exc:
            reasons.append(f"{where}: {exc}")
            continue
        if index is not None:
            canonical = index.get(normalise_label(label))
            if canonical is None:
                dropped.append(label)
                continue
            label = canonical
        obj = {"label": label, **placed}
        why = finish(item, obj) if finish is not None else None
        if why:
            reasons.append(f"{where} ({label[:40]!r}): {why}; kept without mask")
        objects.append(obj)
    if dropped:
        shown = ", ".join(repr(label[:40]) for label in dropped[:MAX_REASONS])
        reasons.append(f"dropped {len(dropped)} object(s) with labels outside the list: {shown}")
    error = summarise(reasons)
    if not found.complete:
        cut = "answer cut off (MAX_TOKENS)" if truncated else "answer JSON broken"
        error = f"{cut}; kept {len(objects)} complete object(s)" + (f"; {error}" if error else "")
        return Parsed(status="partial", objects=objects, error=error)
    if items and not objects and not dropped:
        return Parsed(status="error", error=f"no usable object: {error}")
    return Parsed(status="ok", objects=objects, error=error)


def summarise(reasons: Sequence[str]) -> str | None:
    """Reasons joined for Parsed.error, the list bounded so one bad answer cannot bloat a row."""
    if not reasons:
        return None
    shown = "; ".join(reasons[:MAX_REASONS])
    more = len(reasons) - MAX_REASONS
    return shown + (f"; and {more} more" if more > 0 else "")


def never_raises(parse: Callable[..., Parsed]) -> Callable[..., Parsed]:
    """Wraps every task's parse: a withheld answer is "blocked" whatever the kind, and a parser
    bug becomes an error row, not a crash of a batch job."""

    def guarded(
        task: Any,
        text: str,
        finish_reason: str | None,
        width: int,
        height: int,
        settings: Any,
        sizes: Sizes | None = None,
    ) -> Parsed:
        blocked = finish_status(finish_reason)
        if blocked is not None:
            return blocked
        try:
            return parse(task, text, finish_reason, width, height, settings, sizes)
        except Exception as exc:
            reason = f"internal parse error: {type(exc).__name__}: {exc}"
            return Parsed(status="error", error=reason)

    guarded.__doc__ = parse.__doc__
    guarded.__name__ = parse.__name__
    return guarded
