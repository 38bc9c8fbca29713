"""COCO JSON from the current rows: instances (detect, segment, point) and captions.

Instances (`--out FILE.json`): the images of the exported rows that hold objects, a row's own
image or each member of a group's row; `file_name` is the image's path relative to the common
parent of the roots (`info.images_root`; `info.roots` maps each root of the rows to where its
images are), so two roots with the same relative path give two images. Categories are the
labels, sorted, numbered from 1; each object is an annotation with `bbox` as [x, y, w, h] in
pixels, `segmentation` the object's COCO RLE (or the box as a polygon when it has no mask) and
`area` the mask's pixel count (else the box's area). A point is a keypoint annotation:
`keypoints` [x, y, 2] (visible) in pixels, `num_keypoints` 1, a zero-size `bbox` at the point,
and its category lists the one keypoint "point" (COCO's keypoint format).

Captions (caption rows' text) go to a second file in COCO's captions format (`annotations`
of `{id, image_id, caption}`, no categories), `FILE_captions.json` beside FILE.json: an
instances file with caption annotations would not load in pycocotools (every annotation there
needs a category). An image has the same id in both files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.commands.exports.dataset import (
    Exported,
    ExportImage,
    RootMap,
    Summary,
    collect,
    count_unused,
    has_objects,
    is_caption,
    label_of,
)
from pipeline.commands.exports.files import write_json
from pipeline.masks import rle_area
from pipeline.output.parts import Output

KEYPOINT = "point"


def export_coco(
    output_dir: Output,
    out_path: str | os.PathLike[str],
    *,
    task: str | None = None,
    roots: RootMap | None = None,
    captions_path: str | os.PathLike[str] | None = None,
) -> Summary:
    """Write the instances file (and the captions file when there are captions), atomically.
    `task` keeps one task's rows; `roots` says where moved roots are now."""
    exported = collect(output_dir, task=task, roots=roots)
    ids = {image.source: number for number, image in enumerate(exported.images, start=1)}
    located = [image for image in exported.images if image.objects is not None]
    summary = Summary("coco", [str(out_path)], {}, exported.skipped)
    instances = _instances(exported, located, ids, summary)
    write_json(out_path, instances)
    captioned = [image for image in exported.images if image.captions]
    summary.counts["captions"] = sum(len(image.captions) for image in captioned)
    if captioned:
        path = captions_path or _captions_beside(Path(out_path))
        write_json(path, _captions(exported, captioned, ids))
        summary.wrote.append(str(path))
    count_unused(exported, lambda row: has_objects(row) or is_caption(row), "COCO")
    return summary


def _captions_beside(out: Path) -> Path:
    return out.with_name(f"{out.stem}_captions.json")


def _info(exported: Exported) -> dict[str, Any]:
    return {
        "description": "exported by gemini-vision-pipeline",
        "version": "1.0",
        "images_root": exported.parent,
        "roots": exported.roots,
    }


def _image(image: ExportImage, ids: dict[str, int]) -> dict[str, Any]:
    return {
        "id": ids[image.source],
        "file_name": image.name,
        "width": image.width,
        "height": image.height,
    }


def _instances(
    exported: Exported, images: list[ExportImage], ids: dict[str, int], summary: Summary
) -> dict[str, Any]:
    objects = [(ids[image.source], obj) for image in images for obj in image.objects or ()]
    labels = sorted({label_of(obj) for _, obj in objects})
    category_id = {label: number for number, label in enumerate(labels, start=1)}
    annotations: list[dict[str, Any]] = []
    for image_id, obj in objects:
        annotation = _annotation(obj)
        if annotation is None:
            summary.skipped["objects without a usable box or point"] += 1
            continue
        annotation.update(id=len(annotations) + 1, image_id=image_id)
        annotation["category_id"] = category_id[label_of(obj)]
        annotations.append(annotation)
    pointed = {label_of(obj) for _, obj in objects if obj.get("xy")}
    summary.counts.update(images=len(images), annotations=len(annotations), categories=len(labels))
    return {
        "info": _info(exported),
        "licenses": [],
        "images": [_image(image, ids) for image in images],
        "annotations": annotations,
        "categories": [_category(category_id[name], name, name in pointed) for name in labels],
    }


def _captions(exported: Exported, images: list[ExportImage], ids: dict[str, int]) -> dict[str, Any]:
    annotations = [
        {"image_id": ids[image.source], "caption": caption}
        for image in images
        for caption in image.captions
    ]
    for number, annotation in enumerate(annotations, start=1):
        annotation["id"] = number
    return {
        "info": _info(exported),
        "licenses": [],
        "images": [_image(image, ids) for image in images],
        "annotations": annotations,
    }


def _category(number: int, name: str, pointed: bool) -> dict[str, Any]:
    category: dict[str, Any] = {"id": number, "name": name}
    if pointed:
        category.update(keypoints=[KEYPOINT], skeleton=[])
    return category


def _annotation(obj: dict[str, Any]) -> dict[str, Any] | None:
    """One object -> the geometry part of an annotation; None when it has no usable box."""
    if obj.get("xy"):
        return _keypoint(obj)
    bbox = obj.get("bbox")
    if not bbox or len(bbox) != 4:
        return None
    x0, y0, x1, y1 = (float(v) for v in bbox)
    w, h = max(x1 - x0, 0.0), max(y1 - y0, 0.0)
    x0, y0, x1, y1, w, h = (round(v, 2) for v in (x0, y0, x1, y1, w, h))
    segmentation: Any = [[x0, y0, x1, y0, x1, y1, x0, y1]]
    area = w * h
    mask = obj.get("mask")
    if mask and mask.get("counts") is not None and mask.get("size"):
        try:
            area = float(rle_area(mask))
        except ValueError:  # a corrupt mask string: keep the object with its box
            pass
        else:
            segmentation = {"size": [int(v) for v in mask["size"]], "counts": mask["counts"]}
    return {"bbox": [x0, y0, w, h], "area": area, "segmentation": segmentation, "iscrowd": 0}


def _keypoint(obj: dict[str, Any]) -> dict[str, Any] | None:
    """A point -> a keypoint annotation of one visible keypoint; None when it is unusable."""
    xy = obj["xy"]
    if len(xy) != 2:
        return None
    x, y = (round(float(v), 2) for v in xy)
    return {
        "keypoints": [x, y, 2],
        "num_keypoints": 1,
        "bbox": [x, y, 0.0, 0.0],
        "area": 0.0,
        "iscrowd": 0,
    }
