"""The point task: [y, x] in 0-1000 read y first, kept as returned and in pixels; end to end
with exact truth, exported as COCO keypoints, drawn by render."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from pipeline import exits
from pipeline.commands.exports.coco import export_coco
from pipeline.commands.render import _colour, render
from pipeline.tasks import get_task
from pipeline.tasks.base import TaskSettings
from tests.conftest import draw_shapes, make_config, read_rows, run

SETTINGS = TaskSettings(kind="point")


def _parse(answer: object, width: int = 200, height: int = 100):
    return get_task("point").parse(json.dumps(answer), "STOP", width, height, SETTINGS)


def test_points_are_read_y_first_and_kept_as_returned() -> None:
    parsed = _parse([{"point": [250, 750], "label": "a"}, {"point": [0, 999.6], "label": "b"}])
    assert parsed.status == "ok" and parsed.error is None
    a, b = parsed.objects
    assert a == {"label": "a", "point_2d": [250, 750], "xy": [150.0, 25.0]}
    assert b["point_2d"] == [0, 1000] and b["xy"] == pytest.approx([199.92, 0.0])


def test_unusable_points_are_skipped_with_the_reason() -> None:
    parsed = _parse(
        [
            {"point": [500, 500], "label": "ok"},
            {"point": [1200, 10], "label": "out"},
            {"point": [1, 2, 3], "label": "three"},
            {"box_2d": [0, 0, 10, 10], "label": "box"},
            {"point": [5, 5]},
        ]
    )
    assert [o["label"] for o in parsed.objects] == ["ok"]
    assert "item[1]: point [1200, 10] is outside 0-1000" in parsed.error
    assert "item[2]: point is not a list of 2 numbers [y, x]" in parsed.error
    assert "item[3]: no point" in parsed.error and "item[4]: no label" in parsed.error
    assert _parse([{"point": [5, 5], "label": "x"}, {"point": [5, 6], "label": "y"}])
    labelled = get_task("point").parse(
        json.dumps([{"point": [5, 5], "label": "Cat "}, {"point": [5, 6], "label": "dog"}]),
        "STOP",
        10,
        10,
        TaskSettings(kind="point", labels=("cat",)),
    )
    assert [o["label"] for o in labelled.objects] == ["cat"] and "'dog'" in labelled.error


async def test_points_end_to_end_export_and_render(images_dir: Path, tmp_path: Path) -> None:
    truth = {}
    for i, size in enumerate(((200, 150), (120, 180))):
        image, shapes = draw_shapes(*size, seed=70 + i, count=2)
        image.save(images_dir / f"p{i}.png")
        truth[f"p{i}.png"] = shapes
    config = make_config(tmp_path, task={"kind": "point"})
    summary = await run(config)
    assert summary.exit_code == exits.OK
    rows = {row["image_path"]: row for row in read_rows(tmp_path / "out")}
    for name, shapes in truth.items():
        row = rows[name]
        returned = json.loads(
            json.loads(row["raw_response"])["candidates"][0]["content"]["parts"][0]["text"]
        )
        assert [o["point_2d"] for o in row["objects"]] == [item["point"] for item in returned]
        for shape in shapes:  # at the shape's centre of mass, to a pixel and a half
            ys, xs = np.nonzero(shape.mask)
            centre = np.array([xs.mean() + 0.5, ys.mean() + 0.5])
            assert min(np.hypot(*(np.array(o["xy"]) - centre)) for o in row["objects"]) <= 1.5

    summary = export_coco(tmp_path / "out", tmp_path / "coco.json")
    assert (summary.counts["images"], summary.counts["annotations"]) == (2, 4)
    assert not summary.skipped
    coco = COCO(str(tmp_path / "coco.json"))
    assert all(c["keypoints"] == ["point"] for c in coco.dataset["categories"])
    for image in coco.dataset["images"]:
        objects = rows[image["file_name"]]["objects"]
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]])):
            x, y, visible = ann["keypoints"]
            assert visible == 2 and ann["num_keypoints"] == 1
            assert any(abs(x - o["xy"][0]) < 0.01 and abs(y - o["xy"][1]) < 0.01 for o in objects)

    assert render(tmp_path / "out", tmp_path / "gallery")["entries"] == 2
    for number, name in enumerate(sorted(rows), start=1):
        drawn = np.asarray(Image.open(tmp_path / "gallery" / "images" / f"{number:06d}.jpg"))
        source = np.asarray(Image.open(images_dir / name).convert("RGB"))
        for obj in rows[name]["objects"]:  # a dot of the label's colour over the shape's
            x, y = (int(v) for v in obj["xy"])
            colour = np.array(_colour(obj["label"]))
            was, now = source[y, x].astype(int), drawn[y, x].astype(int)
            assert np.abs(now - colour).sum() < np.abs(was - colour).sum() / 2, (now, was, colour)
