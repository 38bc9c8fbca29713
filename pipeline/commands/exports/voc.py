"""Pascal VOC from the current rows: `OUT/JPEGImages/` the images (symlinks or copies, one flat
folder, whatever their format: the folder's name is VOC's), `OUT/Annotations/<stem>.xml` one
annotation per image.

Boxes are VOC's 1-based inclusive pixel indices (xmin = x0 + 1, xmax = x1 for a box whose
edges are x0 and x1). An object with a mask also gets a `<polygon>` (x1, y1, x2, ... as 1-based
pixel indices, the outline of the mask's largest part), the extension supervision and CVAT
read; readers that do not know it see the box. Points have no VOC form and are skipped. The XML
is built with ElementTree, so model text (labels) is always escaped; characters XML cannot
hold at all (most control characters) are dropped from it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element, ElementTree, SubElement, indent

from pipeline.commands.exports.dataset import (
    ExportImage,
    RootMap,
    Summary,
    collect,
    label_of,
    with_objects,
)
from pipeline.commands.exports.files import place_images, staged_folder, xml_safe
from pipeline.commands.exports.shapes import mask_of, outline, pixel_box
from pipeline.output.parts import Output

IMAGES_DIR = "JPEGImages"
ANNOTATIONS_DIR = "Annotations"


def export_voc(
    output_dir: Output,
    out_dir: str | os.PathLike[str],
    *,
    task: str | None = None,
    roots: RootMap | None = None,
    copy: bool = False,
    allow_hosts: tuple[str, ...] = (),
) -> Summary:
    """Write the VOC folder (whole: staged, then swapped in for `out_dir`)."""
    exported = collect(output_dir, task=task, roots=roots)
    summary = Summary("voc", [str(out_dir)], {}, exported.skipped)
    images = with_objects(exported, "VOC")
    with staged_folder(out_dir, "voc") as stage:
        placed, missing = place_images(
            images, stage / IMAGES_DIR, copy=copy, allow_hosts=allow_hosts
        )
        summary.skipped.update(missing)
        (stage / ANNOTATIONS_DIR).mkdir()
        written = sum(_write(image, stage / ANNOTATIONS_DIR, summary) for image in placed)
    summary.counts.update(images=len(placed), objects=written)
    return summary


def _write(image: ExportImage, folder: Path, summary: Summary) -> int:
    root = Element("annotation")
    _text(root, "folder", IMAGES_DIR)
    _text(root, "filename", image.file)
    _text(root, "path", image.name)
    size = SubElement(root, "size")
    for tag, value in (("width", image.width), ("height", image.height), ("depth", 3)):
        _text(size, tag, str(value))
    _text(root, "segmented", "0")
    count = 0
    for obj in image.objects or ():
        if _object(root, obj, image):
            count += 1
        else:
            summary.skipped[_why_not(obj)] += 1
    indent(root)
    ElementTree(root).write(folder / f"{Path(image.file).stem}.xml", encoding="utf-8")
    return count


def _why_not(obj: dict[str, Any]) -> str:
    return "points (VOC has no points)" if obj.get("xy") else "objects without a box inside"


def _object(root: Element, obj: dict[str, Any], image: ExportImage) -> bool:
    box = pixel_box(obj, image)
    if obj.get("xy") or box is None:
        return False
    element = SubElement(root, "object")
    _text(element, "name", label_of(obj))
    for tag in ("pose", "truncated", "difficult", "occluded"):
        _text(element, tag, "Unspecified" if tag == "pose" else "0")
    x0, y0, x1, y1 = box
    xmin, ymin = round(x0) + 1, round(y0) + 1
    corners = (xmin, ymin, max(round(x1), xmin), max(round(y1), ymin))
    bndbox = SubElement(element, "bndbox")
    for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), corners, strict=True):
        _text(bndbox, tag, str(value))
    mask = mask_of(obj, image)
    points = outline(mask) if mask is not None else None
    if points is not None:
        polygon = SubElement(element, "polygon")
        for number, (x, y) in enumerate(points.tolist(), start=1):
            _text(polygon, f"x{number}", str(x + 1))
            _text(polygon, f"y{number}", str(y + 1))
    return True


def _text(parent: Element, tag: str, text: str) -> None:
    SubElement(parent, tag).text = xml_safe(text)
