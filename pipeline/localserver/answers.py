"""The local "model": turns what vision.py sees into the answer text a Gemini model would write.

What to answer is read from the prompt and the response settings, as a model would: segmentation
("segmentation mask", or a schema with a `mask` property), detection ("box_2d", "bounding box",
"detect"), points, classification (an `enum` in the schema, `text/x.enum`, or labels listed in the
prompt), any other response schema filled from what is seen, else a one-sentence caption.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pipeline.localserver.vision import Analysis, Region

SHAPE_WORDS = {
    "circle": {"circle", "circles", "round", "ellipse", "ellipses", "oval", "ovals", "disc"},
    "rectangle": {"rectangle", "rectangles", "square", "squares", "box", "boxes", "rect"},
    "triangle": {"triangle", "triangles"},
}
COLOUR_WORDS = "red|green|blue|yellow|orange|purple|pink|magenta|cyan|brown|black|white|gray|grey"
LABEL_HINTS = ("label", "name", "class", "categor", "object")
EMPTY_WORDS = {"empty", "blank", "none", "nothing", "background", "plain"}

_LIMIT = re.compile(r"\b(?:limit to|at most|up to|no more than|maximum of|max(?:imum)?)\s+(\d+)")
_ONLY_COLOUR = re.compile(rf"\b(?:all|only)\s+(?:the\s+)?({COLOUR_WORDS})\b")
_LABEL_LIST = re.compile(
    r"\b(?:one of|labels|categories|classes|options|choices)\b[^:\n\[]*[:\[]\s*([^\n]+)", re.I
)
_LABEL_SPLIT = re.compile(r",|;|\||/|\bor\b")
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True, slots=True)
class Ask:
    """What a request asks for, independent of the API flavour it came through."""

    prompt: str  # the user's text parts, joined
    system: str = ""  # system instruction text
    response_mime_type: str | None = None
    schema: Any = None  # responseSchema / responseJsonSchema / response_format.schema
    polygon_masks: bool = False  # the model family answers {"boxes": [...]} with polygons


@dataclass(frozen=True, slots=True)
class Answer:
    """The answer text, and the JSON value behind it (None for prose) for fault injection."""

    text: str
    task: str  # segment | detect | point | classify | schema | caption
    payload: Any = None


def render(ask: Ask, analysis: Analysis | None) -> Answer:
    """The answer a model would give about the (first) image of a request."""
    words = f"{ask.system}\n{ask.prompt}".lower()
    properties = _schema_property_names(ask.schema)
    json_mime = (ask.response_mime_type or "").lower() == "application/json"
    if "segmentation mask" in words or "mask" in properties:
        regions = _select(words, analysis)
        if ask.polygon_masks:
            payload: Any = {"boxes": [_item(analysis, r, "polygon") for r in regions]}
        else:
            payload = [_item(analysis, r, "png") for r in regions]
        return _json_answer("segment", payload, json_mime)
    if "box_2d" in words or "bounding box" in words or "detect" in words or "box_2d" in properties:
        payload = [_item(analysis, r, None) for r in _select(words, analysis)]
        return _json_answer("detect", payload, json_mime)
    if '"point"' in words or "point to" in words or "point" in properties:
        payload = [
            {"point": analysis.centroid(r), "label": r.label}
            for r in _select(words, analysis)
            if analysis is not None
        ]
        return _json_answer("point", payload, json_mime)
    enum = _schema_enum(ask.schema)
    labels = enum or _labels_in_prompt(ask.prompt) or _labels_in_prompt(ask.system)
    if labels and (enum or not isinstance(ask.schema, dict) or not properties):
        label = best_label(labels, analysis)
        if json_mime:
            return Answer(json.dumps(label), "classify", label)
        return Answer(label, "classify")
    if isinstance(ask.schema, dict):
        payload = _fill(ask.schema, analysis, "", None)
        return _json_answer("schema", payload, json_mime)
    text = caption(analysis)
    if json_mime:
        return Answer(json.dumps(text), "caption", text)
    return Answer(text, "caption")


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


def best_label(labels: list[str], analysis: Analysis | None) -> str:
    """The label whose colour and shape words best match what is seen; the first on a tie."""
    regions = analysis.regions if analysis else []

    def score(label: str) -> float:
        words = set(_WORD.findall(label.lower()))
        if not regions:
            return 1.0 if words & EMPTY_WORDS else 0.0
        total = 0.0
        for rank, region in enumerate(regions):
            weight = 2.0 if rank == 0 else 0.5
            total += weight * (region.colour in words)
            total += weight * bool(SHAPE_WORDS.get(region.shape, set()) & words)
        return total

    return max(labels, key=score)  # max keeps the first of equal scores


def _json_answer(task: str, payload: Any, json_mime: bool) -> Answer:
    text = json.dumps(payload)
    if not json_mime:  # without JSON mode, models wrap JSON in a markdown fence
        text = f"```json\n{text}\n```"
    return Answer(text, task, payload)


def _item(analysis: Analysis | None, region: Region, mask: str | None) -> dict[str, Any]:
    assert analysis is not None  # only called for regions of an analysis
    item: dict[str, Any] = {"box_2d": analysis.box_2d(region)}
    if mask == "png":
        item["mask"] = analysis.mask_png_data_url(region)
        item["label"] = region.label
    elif mask == "polygon":
        item["label"] = region.label
        item["mask"] = analysis.polygon(region)
    else:
        item["label"] = region.label
    return item


def _select(words: str, analysis: Analysis | None) -> list[Region]:
    """The regions the prompt asks about: "all/only the <colour> ..." filters, "limit to N" caps."""
    if analysis is None:
        return []
    regions = analysis.regions
    wanted = {m.group(1).replace("grey", "gray") for m in _ONLY_COLOUR.finditer(words)}
    if wanted:
        regions = [r for r in regions if r.colour in wanted]
    limit = _LIMIT.search(words)
    if limit:
        regions = regions[: int(limit.group(1))]
    return regions


def _labels_in_prompt(text: str) -> list[str]:
    match = _LABEL_LIST.search(text)
    if not match:
        return []
    labels = []
    for piece in _LABEL_SPLIT.split(match.group(1)):
        label = piece.strip().strip("[](){}\"'`*").rstrip(".").strip().strip("\"'`")
        if label and len(label) <= 60:
            labels.append(label)
    return labels if len(labels) >= 2 else []


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


def _schema_enum(schema: Any) -> list[str]:
    """The enum of a string schema at the top (classification), else []."""
    if isinstance(schema, dict) and isinstance(schema.get("enum"), list):
        return [str(v) for v in schema["enum"]]
    return []


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
