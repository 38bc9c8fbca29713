"""The local "model": turns what vision.py sees into the answer text a Gemini model would write.

What to answer is read from the prompt and the response settings, as a model would: segmentation
("segmentation mask", or a schema with a `mask` property), detection ("box_2d", "bounding box",
"detect"), points, classification (an `enum` in the schema, `text/x.enum`, or labels listed in the
prompt), any other response schema filled from what is seen, else a one-sentence caption.

A request may carry several images. Those whose caption (the text right before them) calls them
"Reference image N" are examples, as the system instruction says, and never answered about
(`targets`); every other image is looked at. Boxes, masks and points are given for each of them
in order, each object carrying the key "image" (its number, 0 first) when the request asks for
it; a caption describes each image; labels and schemas read what all of them show.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pipeline.localserver.image_input import ImageInput
from pipeline.localserver.vision import Analysis, Region

SHAPE_WORDS = {
    "circle": {"circle", "circles", "round", "ellipse", "ellipses", "oval", "ovals", "disc"},
    "rectangle": {"rectangle", "rectangles", "square", "squares", "box", "boxes", "rect"},
    "triangle": {"triangle", "triangles"},
}
COLOUR_WORDS = "red|green|blue|yellow|orange|purple|pink|magenta|cyan|brown|black|white|gray|grey"
COLOUR_NAMES = frozenset(COLOUR_WORDS.split("|"))
LABEL_HINTS = ("label", "name", "class", "categor", "object")
EMPTY_WORDS = {"empty", "blank", "none", "nothing", "background", "plain"}
SUMMARY_SCHEMA = {
    "type": "object",
    "properties": {
        "description": {"type": "string"},
        "count": {"type": "integer"},
        "objects": {"type": "array", "items": {"type": "string"}},
    },
}

_LIMIT = re.compile(r"\b(?:limit to|at most|up to|no more than|maximum of|max(?:imum)?)\s+(\d+)")
_ONLY_COLOUR = re.compile(rf"\b(?:all|only)\s+(?:the\s+)?({COLOUR_WORDS})\b")
# "one of: a, b", "labels from this list: "a", "b"", "one of [a, b]": a colon within the same
# sentence, or a bracket right after the keyword (so "labels as [ymin, xmin, ...]" is no list)
_LABEL_LIST = re.compile(
    r"\b(?:one of|labels|categories|classes|options|choices)\b"
    r"(?:[^:\n\[.]*:|\s*(?:\w+\s+)?\[)\s*([^\n]+)",
    re.I,
)
_QUOTED_LABEL = re.compile(r'\s*(?:,|\bor\b|\band\b)?\s*"((?:[^"\\]|\\.)*)"')
_LABEL_SPLIT = re.compile(r",|;|\||/|\bor\b")
_LIST_END = re.compile(r"\]|\)|\.(?:\s|$)")
_WORD = re.compile(r"[a-z]+")
_SKETCH = re.compile(r"\{([^{}]*)\}")
_SKETCH_KEY = re.compile(r"[\"']?([A-Za-z_][\w]*)[\"']?\s*:\s*(\[|[^,}]*)")
_COUNT_HINTS = ("count", "number", "total", "num_", "n_")
_REFERENCE = re.compile(r"\s*reference image\s+\d+\b", re.I)
IMAGE_KEY = "image"  # the key naming which image of a request an object is in


@dataclass(frozen=True, slots=True)
class Ask:
    """What a request asks for, independent of the API flavour it came through."""

    prompt: str  # the user's text parts, joined
    system: str = ""  # system instruction text
    response_mime_type: str | None = None
    schema: Any = None  # responseSchema / responseJsonSchema / response_format.schema
    mask_shape: str | None = "png"  # the model's masks (the table's segmentation): png | polygon
    mask_schema: bool = False  # its masks come only when the request's schema asks for "mask"


@dataclass(frozen=True, slots=True)
class Answer:
    """The answer text, and the JSON value behind it (None for prose) for fault injection."""

    text: str
    task: str  # segment | detect | point | classify | schema | caption
    payload: Any = None


def targets(images: Iterable[ImageInput]) -> list[ImageInput]:
    """The images a request asks about: all but those captioned as reference images."""
    return [image for image in images if not _REFERENCE.match(image.caption or "")]


def render(ask: Ask, seen: Sequence[Analysis]) -> Answer:
    """The answer a model would give about the images of a request (`seen`, in order)."""
    words = f"{ask.system}\n{ask.prompt}".lower()
    properties = _schema_property_names(ask.schema)
    json_mime = (ask.response_mime_type or "").lower() == "application/json"
    merged = _merged(seen)
    closed = _schema_enums(ask.schema) or _labels_in_prompt(ask.prompt, ask.system)
    indexed = f'"{IMAGE_KEY}"' in words or IMAGE_KEY in properties
    if "segmentation mask" in words or "mask" in properties:
        form = _mask_form(ask, properties)
        items = _located(words, seen, closed, indexed, lambda a, r, label: _item(a, r, label, form))
        boxed = ask.mask_schema or "boxes" in properties  # the shape the schema asks for
        payload: Any = {"boxes": items} if boxed else items
        return _json_answer("segment", payload, json_mime)
    if "box_2d" in words or "bounding box" in words or "detect" in words or "box_2d" in properties:
        payload = _located(words, seen, closed, indexed, lambda a, r, label: _item(a, r, label))
        return _json_answer("detect", payload, json_mime)
    if '"point"' in words or "point to" in words or "point" in properties:
        payload = _located(words, seen, closed, indexed, _point)
        return _json_answer("point", payload, json_mime)
    regions = merged.regions if merged else []
    if _is_label_array(ask.schema):  # multi-label classification: every label that applies
        payload = [label for label in closed if any(region_score(label, r) for r in regions)]
        return _json_answer("classify", payload[: _max_items(ask.schema)], json_mime)
    top_enum = isinstance(ask.schema, dict) and isinstance(ask.schema.get("enum"), list)
    if closed and (top_enum or not properties):
        label = best_label(closed, merged)
        if json_mime:
            return Answer(json.dumps(label), "classify", label)
        return Answer(label, "classify")
    if isinstance(ask.schema, dict):
        payload = _fill(ask.schema, merged, "", None)
        return _json_answer("schema", payload, json_mime)
    if json_mime:  # JSON mode without a schema: the object the prompt sketches, or a summary
        payload = _fill(_sketched_schema(ask.prompt) or SUMMARY_SCHEMA, merged, "", None)
        return _json_answer("schema", payload, json_mime)
    return Answer(_captions(seen), "caption")


def _mask_form(ask: Ask, properties: set[str]) -> str | None:
    """The masks a segmentation request gets: none from a model that does not segment (the 3.5
    migration guide: boxes only — what it answers instead is assumed), none from a schema model
    whose request sent no "mask" property (the image-understanding page, 2026-09, gets masks by
    sending that schema; without it, boxes only is assumed), else the model's shape."""
    if ask.mask_shape is None or (ask.mask_schema and "mask" not in properties):
        return None
    return ask.mask_shape


def _merged(seen: Sequence[Analysis]) -> Analysis | None:
    """One analysis holding every image's regions (largest first), for answers about them all."""
    if len(seen) <= 1:
        return seen[0] if seen else None
    regions = sorted((r for a in seen for r in a.regions), key=lambda r: -r.area)
    return replace(seen[0], regions=regions)


def _captions(seen: Sequence[Analysis]) -> str:
    if len(seen) <= 1:
        return caption(seen[0] if seen else None)
    return " ".join(f"Image {index}: {caption(a)}" for index, a in enumerate(seen))


Maker = Callable[[Analysis, Region, str], dict[str, Any]]


def _located(
    words: str, seen: Sequence[Analysis], closed: list[str], indexed: bool, make: Maker
) -> list[dict[str, Any]]:
    """The objects asked about in every image, in order; "limit to N" caps the whole answer."""
    found = []
    for index, analysis in enumerate(seen):
        for region, label in _select(words, analysis, closed):
            item = make(analysis, region, label)
            found.append({**item, IMAGE_KEY: index} if indexed else item)
    limit = _LIMIT.search(words)
    return found[: int(limit.group(1))] if limit else found


def _point(analysis: Analysis, region: Region, label: str) -> dict[str, Any]:
    return {"point": analysis.centroid(region), "label": label}


def caption(analysis: Analysis | None) -> str:
    """One sentence naming the shapes, e.g. "An image of 2 shapes on a white background: ..."."""
    if analysis is None:
        return "There is no image in this request."
    background = f"{analysis.background} background"
    regions = analysis.regions
    if not regions:
        return f"An image of a plain {background}."
    if len(regions) == 1:
        return f"An image of {_article(regions[0].label)} on {_article(background)}."
    names = [_article(r.label) for r in regions]
    listed = ", ".join(names[:-1]) + " and " + names[-1]
    return f"An image of {len(regions)} shapes on {_article(background)}: {listed}."


def region_score(label: str, region: Region) -> int:
    """How many of the label's colour and shape words fit the region; 0 if any contradicts."""
    words = {"gray" if w == "grey" else w for w in _WORD.findall(label.lower())}
    colours = words & COLOUR_NAMES
    shapes = {shape for shape, synonyms in SHAPE_WORDS.items() if synonyms & words}
    if (colours and region.colour not in colours) or (shapes and region.shape not in shapes):
        return 0
    return (region.colour in colours) + (region.shape in shapes)


def best_label(labels: list[str], analysis: Analysis | None) -> str:
    """The label that best fits what is seen (the largest region counts most); first on a tie."""
    regions = analysis.regions if analysis else []

    def score(label: str) -> float:
        if not regions:
            return float(bool(set(_WORD.findall(label.lower())) & EMPTY_WORDS))
        return 2.0 * region_score(label, regions[0]) + 0.5 * sum(
            region_score(label, r) for r in regions[1:]
        )

    return max(labels, key=score)  # max keeps the first of equal scores


def _json_answer(task: str, payload: Any, json_mime: bool) -> Answer:
    text = json.dumps(payload)
    if not json_mime:  # without JSON mode, models wrap JSON in a markdown fence
        text = f"```json\n{text}\n```"
    return Answer(text, task, payload)


def _item(
    analysis: Analysis, region: Region, label: str, mask: str | None = None
) -> dict[str, Any]:
    item: dict[str, Any] = {"box_2d": analysis.box_2d(region)}
    if mask == "png":
        item["mask"] = analysis.mask_png_data_url(region)
    item["label"] = label
    if mask == "polygon":
        item["mask"] = analysis.polygon(region)
    return item


def _select(words: str, analysis: Analysis | None, closed: list[str]) -> list[tuple[Region, str]]:
    """The regions the prompt asks about, each with its label.

    "all/only the <colour> ..." filters; with a closed label set each region takes the label that
    fits it best and regions no label fits are left out; "limit to N" caps the count.
    """
    if analysis is None:
        return []
    regions = analysis.regions
    wanted = {m.group(1).replace("grey", "gray") for m in _ONLY_COLOUR.finditer(words)}
    if wanted:
        regions = [r for r in regions if r.colour in wanted]
    chosen = []
    for region in regions:
        if not closed:
            chosen.append((region, region.label))
            continue
        label = max(closed, key=lambda candidate: region_score(candidate, region))
        if region_score(label, region):
            chosen.append((region, label))
    limit = _LIMIT.search(words)
    if limit:
        chosen = chosen[: int(limit.group(1))]
    return chosen


def _labels_in_prompt(*texts: str) -> list[str]:
    """A closed label list written in the prompt or system instruction (two labels or more)."""
    for text in texts:
        for match in _LABEL_LIST.finditer(text):
            labels = _split_labels(match.group(1))
            if len(labels) >= 2:
                return labels
    return []


def _split_labels(listed: str) -> list[str]:
    labels: list[str] = []
    position = 0
    while quoted := _QUOTED_LABEL.match(listed, position):  # "a", "b" (JSON-quoted)
        labels.append(json.loads(f'"{quoted.group(1)}"'))
        position = quoted.end()
    if labels:
        return labels
    end = _LIST_END.search(listed)
    for piece in _LABEL_SPLIT.split(listed[: end.start()] if end else listed):
        label = piece.strip().strip("[](){}\"'`*").strip()
        if label and len(label) <= 60:
            labels.append(label)
    return labels


def _sketched_schema(prompt: str) -> dict[str, Any] | None:
    """A schema from a JSON shape written in the prompt, e.g. 'Answer as JSON {"count": n}'."""
    match = _SKETCH.search(prompt)
    if not match:
        return None
    properties: dict[str, Any] = {}
    for key, value in _SKETCH_KEY.findall(match.group(1)):
        value = value.strip().strip("\"'").lower()
        name = key.lower()
        if value == "[" or (name.endswith("s") and not name.endswith("ss")):
            properties[key] = {"type": "array", "items": {"type": "string"}}
        elif (
            value in ("n", "int", "integer", "number")
            or value.isdigit()
            or name.startswith(_COUNT_HINTS)
        ):
            properties[key] = {"type": "integer"}
        elif value in ("true", "false", "bool", "boolean"):
            properties[key] = {"type": "boolean"}
        else:
            properties[key] = {"type": "string"}
    return {"type": "object", "properties": properties} if properties else None


def _schema_property_names(schema: Any) -> set[str]:
    names: set[str] = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            properties = node.get("properties")
            if isinstance(properties, dict):
                names.update(properties)
                stack.extend(properties.values())
            stack.extend(v for k, v in node.items() if k != "properties")
        elif isinstance(node, list):
            stack.extend(node)
    return names


def _schema_enums(schema: Any) -> list[str]:
    """The first enum anywhere in the schema (a closed label set), else []."""
    stack = [schema]
    while stack:
        node = stack.pop(0)
        if isinstance(node, dict):
            if isinstance(node.get("enum"), list) and node["enum"]:
                return [str(v) for v in node["enum"]]
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return []


def _is_label_array(schema: Any) -> bool:
    """An array of enum strings: "every label that applies"."""
    if not isinstance(schema, dict) or _schema_type(schema) != "array":
        return False
    items = schema.get("items")
    return isinstance(items, dict) and isinstance(items.get("enum"), list)


def _max_items(schema: dict[str, Any]) -> int | None:
    value = schema.get("maxItems", schema.get("max_items"))
    return int(value) if isinstance(value, int | str) and str(value).isdigit() else None


def _schema_type(schema: dict[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):  # JSON Schema ["string", "null"]
        kind = next((k for k in kind if str(k).lower() != "null"), None)
    if kind is None:
        for key in ("anyOf", "any_of", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list):
                for option in options:
                    if isinstance(option, dict) and str(option.get("type", "")).lower() != "null":
                        return _schema_type(option)
        if "properties" in schema:
            return "object"
        if "items" in schema:
            return "array"
        return "string"
    return str(kind).lower()


def _fill(schema: Any, analysis: Analysis | None, name: str, region: Region | None) -> Any:
    """A value following `schema`, taken from what is seen; property names say which fact."""
    if not isinstance(schema, dict):
        return None
    regions = analysis.regions if analysis else []
    hint = name.lower()
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return best_label([str(v) for v in schema["enum"]], analysis)
    kind = _schema_type(schema)
    if kind == "object":
        properties = schema.get("properties") or {}
        return {key: _fill(sub, analysis, key, region) for key, sub in properties.items()}
    if kind == "array":
        items = schema.get("items") if isinstance(schema.get("items"), dict) else {}
        if analysis and region and any(w in hint for w in ("box", "bbox")):
            return analysis.box_2d(region)
        if analysis and region and "point" in hint:
            return analysis.centroid(region)
        item_kind = _schema_type(items) if items else "string"
        if item_kind == "object":
            return [_fill(items, analysis, "", r) for r in regions]
        if item_kind in ("integer", "number"):
            return [r.area for r in regions]
        if "colo" in hint:
            return list(dict.fromkeys(r.colour for r in regions))
        if "shape" in hint:
            return list(dict.fromkeys(r.shape for r in regions))
        return [r.label for r in regions]
    if kind in ("integer", "number"):
        if region is not None and "area" in hint:
            return region.area
        return len(regions)
    if kind == "boolean":
        return bool(regions)
    if kind == "null":
        return None
    subject = region or (regions[0] if regions else None)
    if "background" in hint and analysis:
        return analysis.background
    if subject is not None and "colo" in hint:
        return subject.colour
    if subject is not None and "shape" in hint:
        return subject.shape
    if subject is not None and any(w in hint for w in LABEL_HINTS):
        return subject.label
    if region is not None:
        return region.label
    return caption(analysis)


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase
