"""A YOLO dataset (Ultralytics layout) from the current rows' boxes and masks.

`OUT/images/` holds the images (symlinks to the sources, or copies with `copy`), one flat
folder (what YOLO readers list); `OUT/labels/` one `.txt` per image with the image's stem
(an image without objects gets an empty one: a true negative); `OUT/data.yaml` the class
names, indexed from 0 in sorted order, and `train`/`val` both pointing at `images` (the split
is the user's to make). A line is `class x_centre y_centre width height`, normalised to the
image's size, or, when every exported object has a mask, `class x1 y1 x2 y2 ...`: the outline
of the mask's largest part, normalised. One file mixing the two kinds would be read as
segmentation by some tools and have its polygons dropped by others, so a dataset is one kind.
Points (point tasks) have no YOLO detect/segment form and are counted as skipped.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.commands.exports.dataset import (
    ExportImage,
    RootMap,
    Summary,
    collect,
    label_of,
    with_objects,
)
from pipeline.commands.exports.files import place_images, staged_folder
from pipeline.commands.exports.shapes import mask_of, outline, pixel_box
from pipeline.output.parts import Output

DIGITS = 6  # normalised coordinates: a millionth of the side, finer than any pixel
# What YAML (1.1, PyYAML) takes as it is inside a double-quoted string; anything else
# (control characters, line breaks, quotes, backslashes) is written as an escape.
_YAML_PLAIN = re.compile(r"[\x20-\x7e\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def export_yolo(
    output_dir: Output,
    out_dir: str | os.PathLike[str],
    *,
    task: str | None = None,
    roots: RootMap | None = None,
    copy: bool = False,
    allow_hosts: tuple[str, ...] = (),
) -> Summary:
    """Write the dataset folder (whole: staged, then swapped in for `out_dir`)."""
    exported = collect(output_dir, task=task, roots=roots)
    summary = Summary("yolo", [str(out_dir)], {}, exported.skipped)
    images = with_objects(exported, "YOLO")
    objects = [obj for image in images for obj in image.objects or ()]
    names = sorted({label_of(obj) for obj in objects if not obj.get("xy")})
    segment = _all_masked(objects)
    with staged_folder(out_dir, "yolo") as stage:
        placed, missing = place_images(images, stage / "images", copy=copy, allow_hosts=allow_hosts)
        summary.skipped.update(missing)
        labels = stage / "labels"
        labels.mkdir()
        classes = {name: number for number, name in enumerate(names)}
        written = sum(_write_labels(image, labels, classes, segment, summary) for image in placed)
        (stage / "data.yaml").write_text(_data_yaml(names), encoding="utf-8")
    summary.counts.update(images=len(placed), objects=written, classes=len(names))
    summary.notes.append("segmentation polygons" if segment else "boxes")
    return summary


def _all_masked(objects: list[dict[str, Any]]) -> bool:
    """Whether the dataset is segmentation: every object with a box has a mask."""
    boxed = [obj for obj in objects if obj.get("bbox") and not obj.get("xy")]
    return bool(boxed) and all(obj.get("mask") for obj in boxed)


def _write_labels(
    image: ExportImage, folder: Path, classes: dict[str, int], segment: bool, summary: Summary
) -> int:
    lines = []
    for obj in image.objects or ():
        line = _line(obj, image, classes, segment)
        if line is None:
            summary.skipped[_why_not(obj)] += 1
        else:
            lines.append(line)
    text = "".join(f"{line}\n" for line in lines)
    (folder / f"{Path(image.file).stem}.txt").write_text(text, encoding="ascii")
    return len(lines)


def _why_not(obj: dict[str, Any]) -> str:
    if obj.get("xy"):
        return "points (YOLO detect/segment has no points)"
    return "objects without a box inside the image"


def _line(
    obj: dict[str, Any], image: ExportImage, classes: dict[str, int], segment: bool
) -> str | None:
    box = None if obj.get("xy") else pixel_box(obj, image)
    if box is None:
        return None
    values = _outline_values(obj, image, box) if segment else _centred(box)
    scale = [image.width, image.height] * (len(values) // 2)
    numbers = (_number(value / side) for value, side in zip(values, scale, strict=True))
    return " ".join([str(classes[label_of(obj)]), *numbers])


def _centred(box: tuple[float, float, float, float]) -> list[float]:
    x0, y0, x1, y1 = box
    return [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]


def _outline_values(
    obj: dict[str, Any], image: ExportImage, box: tuple[float, float, float, float]
) -> list[float]:
    """The mask's outline as x, y, x, y, ...; a mask too small to outline (or unreadable) gives
    its box's corners, so every line stays of the dataset's kind."""
    mask = mask_of(obj, image)
    points = outline(mask) if mask is not None else None
    if points is None:
        x0, y0, x1, y1 = box
        return [x0, y0, x1, y0, x1, y1, x0, y1]
    return points.astype(np.float64).reshape(-1).tolist()


def _number(value: float) -> str:
    return f"{min(max(value, 0.0), 1.0):.{DIGITS}f}"


def _data_yaml(names: list[str]) -> str:
    """data.yaml with no `path`: readers then take the folder it is in. Labels are model text:
    each is one quoted, escaped YAML string, so none can end the list or add a key."""
    listed = ", ".join(_yaml_string(name) for name in names)
    return (
        "# written by `pipeline export yolo`\n"
        "train: images\n"
        "val: images\n"
        f"nc: {len(names)}\n"
        f"names: [{listed}]\n"
    )


def _yaml_string(text: str) -> str:
    escaped = (
        char if _YAML_PLAIN.fullmatch(char) and char not in '"\\' else _escape(char)
        for char in text
    )
    return '"' + "".join(escaped) + '"'


def _escape(char: str) -> str:
    return {'"': '\\"', "\\": "\\\\"}.get(char) or f"\\U{ord(char):08x}"
