"""Label Studio tasks with the model's answers as pre-annotations, and the labelling config
that shows them.

`--out FILE.json` is a list of tasks in Label Studio's import format, one per image:
`data.image` is where Label Studio reads the image (the image's name under `image_prefix`,
by default Label Studio's local-files URL, or the object's URL for an image in a bucket), and
`predictions` holds one prediction per image with the objects and answers as results:
a box as a `rectanglelabels` region (percent of the image, as Label Studio stores them), a
mask as a `brushlabels` region in Label Studio's brush RLE (exact to the pixel, no polygon
approximation), a point as a `keypointlabels` region, classify labels as `choices`, a caption
as a `textarea`. `FILE.xml` (or `config_path`) is the labelling config with exactly the
controls those results name and every label listed, built with ElementTree: model text in it
is always escaped.

Brush RLE (Label Studio's `converter.brush.encode_rle`, from thi-ng's rle-pack): the mask as
RGBA bytes, row by row, 255 inside; a 32-bit value count, 5 bits of word size - 1 (7), four
4-bit run-length sizes - 1 (3, 4, 8, 16); then each run as a 1 bit (a repeated value), 2
bits choosing a size, the run length - 1 in that many bits, and the 8-bit value; zero bits
to a whole byte. Runs are found per mask run with numpy, never per pixel.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.etree.ElementTree import Element, SubElement, indent, tostring

import numpy as np

from pipeline.commands.exports.dataset import (
    ExportImage,
    RootMap,
    Summary,
    collect,
    count_unused,
    has_objects,
    is_caption,
    label_of,
)
from pipeline.commands.exports.files import write_json, write_text, xml_safe
from pipeline.commands.exports.shapes import mask_of, pixel_box
from pipeline.locations import is_url
from pipeline.output.parts import Output

LOCAL_FILES = "/data/local-files/?d="  # Label Studio serving files under its document root
IMAGE = "image"
# result type -> (control name, control tag, value key)
CONTROLS = {
    "rectanglelabels": ("box", "RectangleLabels", "rectanglelabels"),
    "brushlabels": ("mask", "BrushLabels", "brushlabels"),
    "keypointlabels": ("point", "KeyPointLabels", "keypointlabels"),
    "choices": ("labels", "Choices", "choices"),
    "textarea": ("caption", "TextArea", "text"),
}
RUN_SIZES = (3, 4, 8, 16)  # bits of a run length, by the 2-bit size index
POINT_WIDTH = 0.5  # a keypoint's drawn size, percent of the image width


def export_labelstudio(
    output_dir: Output,
    out_path: str | os.PathLike[str],
    *,
    task: str | None = None,
    roots: RootMap | None = None,
    config_path: str | os.PathLike[str] | None = None,
    image_prefix: str = LOCAL_FILES,
) -> Summary:
    """Write the tasks file and the labelling config (each atomically)."""
    exported = collect(output_dir, task=task, roots=roots, columns=("model",))
    summary = Summary("labelstudio", [str(out_path)], {}, exported.skipped)
    count_unused(exported, _shown, "Label Studio")
    tasks = [_task(image, image_prefix, summary) for image in exported.images]
    config = config_path or Path(out_path).with_suffix(".xml")
    write_json(out_path, tasks)
    write_text(config, _config(tasks))
    summary.wrote.append(str(config))
    results = [result for task in tasks for result in task["predictions"][0]["result"]]
    summary.counts.update(tasks=len(tasks), results=len(results))
    if image_prefix == LOCAL_FILES and exported.parent:
        summary.notes.append(
            f"serve the images with LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={exported.parent}"
        )
    return summary


def _shown(row: dict[str, Any]) -> bool:
    return (
        has_objects(row) or is_caption(row) or (row["task"] == "classify" and bool(row["labels"]))
    )


def _task(image: ExportImage, prefix: str, summary: Summary) -> dict[str, Any]:
    where = image.source if is_url(image.source) else prefix + quote(image.name, safe="/")
    results = [r for obj in image.objects or () if (r := _region(obj, image, summary))]
    choices = [xml_safe(label) for label in image.labels]
    results += [_result(image, "choices", choices)] if choices else []
    results += [_result(image, "textarea", [text]) for text in image.captions]
    for number, result in enumerate(results, start=1):
        result["id"] = f"r{number}"
    models = sorted({row["model"] for row in image.rows if row.get("model")})
    prediction = {"model_version": ", ".join(models) or "gemini-vision-pipeline", "result": results}
    return {"data": {IMAGE: where, "name": image.name}, "predictions": [prediction]}


def _result(image: ExportImage, kind: str, value: Any, **geometry: Any) -> dict[str, Any]:
    name, _, key = CONTROLS[kind]
    return {
        "from_name": name,
        "to_name": IMAGE,
        "type": kind,
        "original_width": image.width,
        "original_height": image.height,
        "image_rotation": 0,
        "value": {**geometry, key: value},
    }


def _region(obj: dict[str, Any], image: ExportImage, summary: Summary) -> dict[str, Any] | None:
    """An object as one region: its mask as brush strokes, else its box, or its point."""
    label = [xml_safe(label_of(obj))]
    if obj.get("xy") and len(obj["xy"]) == 2:
        x, y = (float(v) for v in obj["xy"])
        at = {"x": _percent(x, image.width), "y": _percent(y, image.height), "width": POINT_WIDTH}
        return _result(image, "keypointlabels", label, **at)
    mask = mask_of(obj, image)
    if mask is not None:
        return _result(image, "brushlabels", label, format="rle", rle=brush_rle(mask))
    box = pixel_box(obj, image)
    if box is None:
        summary.skipped["objects without a box inside the image"] += 1
        return None
    x0, y0, x1, y1 = box
    at = {
        "x": _percent(x0, image.width),
        "y": _percent(y0, image.height),
        "width": _percent(x1 - x0, image.width),
        "height": _percent(y1 - y0, image.height),
        "rotation": 0,
    }
    return _result(image, "rectanglelabels", label, **at)


def _percent(value: float, side: int) -> float:
    return round(value / side * 100, 4)


def _config(tasks: list[dict[str, Any]]) -> str:
    """The labelling config: the image, and one control per kind of result, listing every
    label, choice used."""
    used: dict[str, set[str]] = {}
    for task in tasks:
        for result in task["predictions"][0]["result"]:
            values = result["value"][CONTROLS[result["type"]][2]]
            used.setdefault(result["type"], set()).update(values)
    view = Element("View")
    SubElement(view, "Image", name=IMAGE, value=f"${IMAGE}", zoom="true")
    for kind, values in sorted(used.items()):
        _control(view, kind, sorted(values))
    indent(view)
    return tostring(view, encoding="unicode") + "\n"


def _control(view: Element, kind: str, values: list[str]) -> None:
    name, tag, _ = CONTROLS[kind]
    if kind == "textarea":
        SubElement(view, tag, name=name, toName=IMAGE, editable="true")
        return
    control = SubElement(view, tag, name=name, toName=IMAGE)
    if kind == "choices":
        control.set("choice", "multiple")
    child = "Choice" if kind == "choices" else "Label"
    for value in values:
        SubElement(control, child, value=value)


# ----------------------------------------------------------------------------- brush RLE
def brush_rle(mask: np.ndarray) -> list[int]:
    """A 2-D bool mask -> Label Studio's brush RLE bytes (see the module docstring)."""
    flat = np.ascontiguousarray(mask, dtype=bool).reshape(-1)
    starts = np.concatenate(([0], np.flatnonzero(flat[1:] != flat[:-1]) + 1))
    lengths = np.diff(np.append(starts, flat.size)) * 4  # each pixel is 4 bytes: R, G, B, A
    values = np.where(flat[starts], 255, 0)
    sizes = "".join(f"{size - 1:04b}" for size in RUN_SIZES)
    bits = [f"{flat.size * 4:032b}", f"{8 - 1:05b}", sizes]
    for length, value in zip(lengths.tolist(), values.tolist(), strict=True):
        bits += _runs(length, value)
    stream = "".join(bits)
    stream += "0" * (-len(stream) % 8)
    return list(int(stream, 2).to_bytes(len(stream) // 8, "big"))


def _runs(length: int, value: int) -> list[str]:
    """One run of `value` as run records, each at most 2**16 long."""
    records = []
    while length > 0:
        chunk = min(length, 1 << RUN_SIZES[-1])
        index = next(i for i, size in enumerate(RUN_SIZES) if chunk <= 1 << size)
        records.append(f"1{index:02b}{chunk - 1:0{RUN_SIZES[index]}b}{value:08b}")
        length -= chunk
    return records
