"""COCO export from a real output directory, checked with pycocotools (load, decode, evaluate)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.commands.exports.coco import export_coco
from tests.conftest import result_object, result_row, write_rows

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

W, H = 80, 60


def disc(cx: int, cy: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def rect(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def obj(label: str, mask: np.ndarray | None = None, box: tuple[float, ...] = ()) -> dict:
    """An object with `box`, or with `mask` and the box that bounds it."""
    if mask is not None:
        ys, xs = np.nonzero(mask)
        box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return result_object(label, box, mask)


def row(path: str, task: str, status: str, objects: list | None, **extra: Any) -> dict:
    return result_row(
        path,
        settings=task,
        root="/imgs",
        task=task,
        status=status,
        width=W,
        height=H,
        objects=objects,
        **extra,
    )


MASKS = {"ball": disc(20, 20, 9), "brick": rect(40, 30, 70, 50), "coin": disc(60, 15, 5)}


async def write_output(out: Path) -> None:
    rows = [
        row(
            "a.jpg",
            "detect",
            "ok",
            [obj("dog", box=(1.5, 2.0, 30.25, 40.0)), obj("cat", box=(40, 5, 79, 59))],
        ),
        row("b.jpg", "segment", "ok", [obj("ball", MASKS["ball"]), obj("brick", MASKS["brick"])]),
        row("c.jpg", "segment", "partial", [obj("ball", MASKS["coin"])], error="MAX_TOKENS"),
        row("d.jpg", "detect", "error", None, error="500 INTERNAL"),
        row("e.jpg", "caption", "ok", None, text="a photo"),
        row("f.jpg", "detect", "ok", []),
    ]
    await write_rows(out, "r1", rows)


async def test_export_loads_in_pycocotools(tmp_path: Path) -> None:
    await write_output(tmp_path / "out")
    target = tmp_path / "coco" / "dataset.json"
    summary = export_coco(tmp_path / "out", target)
    assert summary.as_dict() == {
        "format": "coco",
        "wrote": [str(target), str(tmp_path / "coco" / "dataset_captions.json")],
        "images": 4,
        "annotations": 5,
        "categories": 4,
        "captions": 1,
        "skipped": {"rows with status error": 1},
        "notes": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(target))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["ball", "brick", "cat", "dog"]
    assert [c["id"] for c in coco.dataset["categories"]] == [1, 2, 3, 4]
    images = {img["file_name"]: img for img in coco.dataset["images"]}
    assert sorted(images) == ["a.jpg", "b.jpg", "c.jpg", "f.jpg"]
    assert images["a.jpg"]["width"] == W and images["a.jpg"]["height"] == H
    assert coco.getAnnIds(imgIds=[images["f.jpg"]["id"]]) == []

    (dog,) = coco.loadAnns(coco.getAnnIds(imgIds=[images["a.jpg"]["id"]], catIds=[4]))
    assert dog["bbox"] == [1.5, 2.0, 28.75, 38.0]
    assert dog["area"] == 28.75 * 38.0 and dog["iscrowd"] == 0
    assert dog["segmentation"] == [[1.5, 2.0, 30.25, 2.0, 30.25, 40.0, 1.5, 40.0]]

    segmented = coco.loadAnns(coco.getAnnIds(imgIds=[images["b.jpg"]["id"], images["c.jpg"]["id"]]))
    for ann, truth in zip(segmented, [MASKS["ball"], MASKS["brick"], MASKS["coin"]], strict=True):
        assert isinstance(ann["segmentation"]["counts"], str)
        assert np.array_equal(coco.annToMask(ann).astype(bool), truth)
        assert (
            ann["area"]
            == truth.sum()
            == mask_utils.area(mask_utils.encode(np.asfortranarray(truth.astype(np.uint8))))
        )
        x, y, w, h = ann["bbox"]
        ys, xs = np.nonzero(truth)
        assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)

    # Round trip: the annotations as detections must score a perfect AP in both modes.
    results = [
        {k: ann[k] for k in ("image_id", "category_id", "bbox", "segmentation")} | {"score": 1.0}
        for ann in coco.dataset["annotations"]
    ]
    for kind in ("bbox", "segm"):
        with contextlib.redirect_stdout(io.StringIO()):
            detections = coco.loadRes(json.loads(json.dumps(results)))
            evaluation = COCOeval(coco, detections, kind)
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        assert evaluation.stats[0] == 1.0, kind


async def test_export_one_task_and_ids_are_stable(tmp_path: Path) -> None:
    await write_output(tmp_path / "out")
    first = export_coco(tmp_path / "out", tmp_path / "one.json", task="segment").counts
    assert first == {"images": 2, "annotations": 3, "categories": 2, "captions": 0}
    export_coco(tmp_path / "out", tmp_path / "again.json", task="segment")
    assert (tmp_path / "one.json").read_bytes() == (tmp_path / "again.json").read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))
