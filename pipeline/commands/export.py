"""COCO detection / segmentation JSON from the current rows of an output directory.

Images are those of the current `ok` and `partial` rows that carry objects (detect, segment,
point), one image per (image_root, image_path): a row's image, or each member of a group's row
(its objects go to the member their `image` names); categories are the labels, sorted, numbered
from 1; each object is an annotation with `bbox` as [x, y, w, h] in pixels, `segmentation` the
object's COCO RLE (or the box as a polygon when it has no mask) and `area` the mask's pixel
count (else the box's area). A point is a keypoint annotation: `keypoints` [x, y, 2] (visible)
in pixels, `num_keypoints` 1, a zero-size `bbox` at the point, and its category lists the one
keypoint "point" (COCO's keypoint format).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipeline.masks import rle_area
from pipeline.output.fsutil import atomic_write_bytes
from pipeline.output.parts import current_rows

EXPORTED_STATUSES = ("ok", "partial")
_COLUMNS = ("image_root", "image_path", "width", "height", "task", "status", "objects", "members")
KEYPOINT = "point"


def export_coco(
    output_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    task: str | None = None,
) -> dict[str, int]:
    """Write the COCO file (atomically) and return its counts. `task` keeps one task's rows."""
    rows = current_rows(output_dir, _COLUMNS).to_pylist()
    images: dict[tuple[str, str], dict[str, Any]] = {}
    objects: list[tuple[int, dict[str, Any]]] = []
    skipped_rows = 0
    for row in rows:
        wanted = row["status"] in EXPORTED_STATUSES and (task is None or row["task"] == task)
        placed = _images_of(row) if wanted and row["objects"] is not None else []
        if not placed:
            skipped_rows += 1
            continue
        for where, facts, found in placed:
            image = images.get(where)
            if image is None:
                image = {"id": len(images) + 1, **facts}
                images[where] = image
            objects.extend((image["id"], obj) for obj in found)

    labels = sorted({_label(obj) for _, obj in objects})
    category_id = {label: number for number, label in enumerate(labels, start=1)}
    annotations: list[dict[str, Any]] = []
    skipped_objects = 0
    for image_id, obj in objects:
        annotation = _annotation(obj)
        if annotation is None:
            skipped_objects += 1
            continue
        annotation.update(id=len(annotations) + 1, image_id=image_id)
        annotation["category_id"] = category_id[_label(obj)]
        annotations.append(annotation)

    pointed = {_label(obj) for _, obj in objects if obj.get("xy")}
    coco = {
        "info": {"description": f"exported from {Path(output_dir).name}", "version": "1.0"},
        "licenses": [],
        "images": list(images.values()),
        "annotations": annotations,
        "categories": [_category(category_id[name], name, name in pointed) for name in labels],
    }
    _write_json_atomically(Path(out_path), coco)
    return {
        "images": len(images),
        "annotations": len(annotations),
        "categories": len(labels),
        "rows_skipped": skipped_rows,
        "objects_skipped": skipped_objects,
    }


def _images_of(row: dict[str, Any]) -> list[tuple[tuple[str, str], dict[str, Any], list]]:
    """(where, COCO image facts, objects) of each image a row has objects for: the row's own
    image, or each member of a group's row with the objects placed in it."""
    members = row.get("members")
    if not members:
        found = [((row["image_root"] or "", row["image_path"] or ""), row, row["objects"])]
    else:
        found = [
            (
                (member["image_root"] or "", member["image_path"] or ""),
                member,
                [obj for obj in row["objects"] if obj.get("image") == index],
            )
            for index, member in enumerate(members)
        ]
    return [
        (where, _image_facts(facts), objects)
        for where, facts, objects in found
        if facts["width"] and facts["height"]
    ]


def _image_facts(image: dict[str, Any]) -> dict[str, Any]:
    return {"file_name": image["image_path"], "width": image["width"], "height": image["height"]}


def _category(number: int, name: str, pointed: bool) -> dict[str, Any]:
    category: dict[str, Any] = {"id": number, "name": name}
    if pointed:
        category.update(keypoints=[KEYPOINT], skeleton=[])
    return category


def _label(obj: dict[str, Any]) -> str:
    return obj.get("label") or "unlabelled"


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


def _write_json_atomically(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, ensure_ascii=False, separators=(",", ":"))
    atomic_write_bytes(path, text.encode("utf-8"))
