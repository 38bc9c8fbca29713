"""Every task kind end to end against the local server; recorded-style answers through replay;
reparse, COCO export and render on a real output directory."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image
from pycocotools.coco import COCO

from pipeline import exits
from pipeline.commands.exports.coco import export_coco
from pipeline.commands.render import render
from pipeline.commands.reparse import reparse
from pipeline.gemini import parse_response
from pipeline.output.parts import current_rows
from tests.conftest import REPO, draw_shapes, make_config, read_rows, run

SAMPLES = REPO / "data" / "samples"


@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("detect", {}),
        ("segment", {}),
        ("caption", {}),
        ("classify", {"labels": ["circle", "rectangle", "triangle"]}),
        ("custom", {"prompt": 'Count the shapes. Answer as JSON {"count": n}.'}),
    ],
)
async def test_each_kind_on_the_samples(tmp_path: Path, kind: str, extra: dict) -> None:
    config = make_config(tmp_path, input={"paths": [str(SAMPLES)]}, task={"kind": kind, **extra})
    summary = await run(config)
    assert summary.exit_code == exits.OK, summary.rows
    rows = read_rows(tmp_path / "out")
    truth = json.loads((REPO / "data" / "samples-truth.json").read_text())
    assert sorted(r["image_path"] for r in rows) == sorted(truth)
    for row in rows:
        shapes = truth[row["image_path"]]["shapes"]
        if kind in ("detect", "segment"):
            assert sorted(o["label"] for o in row["objects"]) == sorted(s["label"] for s in shapes)
            assert all((o["mask"] is not None) == (kind == "segment") for o in row["objects"])
        elif kind == "caption":
            assert row["text"] and len(row["text"]) > 10
        elif kind == "classify":
            assert row["labels"] and set(row["labels"]) <= {"circle", "rectangle", "triangle"}
            assert set(row["labels"]) <= {s["shape"] for s in shapes}
        else:
            assert isinstance(json.loads(row["json"]), dict | list)


def _png_b64(width: int, height: int, value: int = 255) -> str:
    buf = io.BytesIO()
    Image.new("L", (width, height), value).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


async def test_recorded_style_answers_through_replay(images_dir: Path, tmp_path: Path) -> None:
    """Answers as real models write them, replayed by the server and parsed by the pipeline."""
    box = [100, 200, 500, 600]
    item = {"box_2d": box, "label": "cat"}
    answers = {
        "fenced": ("```json\n" + json.dumps([item]) + "\n```", "STOP", "ok"),
        "prose": (
            "Here are the boxes:\n" + json.dumps([item]) + "\nHope this helps!",
            "STOP",
            "ok",
        ),
        "truncated": (
            json.dumps([{**item, "mask": "data:image/png;base64," + _png_b64(40, 40)}] * 3)[:-60],
            "MAX_TOKENS",
            "partial",
        ),
        "polygon": (
            json.dumps({"boxes": [{**item, "mask": [[200, 100], [600, 100], [600, 500]]}]}),
            "STOP",
            "ok",
        ),
        "no_prefix_mask": (json.dumps([{**item, "mask": _png_b64(40, 40)}]), "STOP", "ok"),
        "bad_mask": (json.dumps([{**item, "mask": "data:image/png;base64,@@@"}]), "STOP", "ok"),
        "swapped": (json.dumps([{"box_2d": [500, 600, 100, 200], "label": "cat"}]), "STOP", "ok"),
        "empty": ("[]", "STOP", "ok"),
        "safety": ("", "SAFETY", "blocked"),
        "garbage": ("I cannot see any image.", "STOP", "error"),
    }
    replay = []
    for i, (name, (text, finish, _)) in enumerate(answers.items()):
        path = images_dir / f"{name}.png"
        Image.new("RGB", (200, 100), (i, 0, 0)).save(path)
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        replay.append({"sha256": sha, "text": text, "finish_reason": finish})
    replay_file = tmp_path / "replay.jsonl"
    replay_file.write_text("\n".join(json.dumps(r) for r in replay) + "\n")

    config = make_config(tmp_path, local={"replay": str(replay_file)})
    await run(config)
    rows = {r["image_path"].removesuffix(".png"): r for r in read_rows(tmp_path / "out")}
    for name, (text, _, status) in answers.items():
        row = rows[name]
        assert row["status"] == status, (name, row["error"])
        assert parse_response(row["raw_response"]).text == text  # kept, whatever it was
    # box_2d kept exactly as returned; bbox in pixels of the 200x100 image, sorted
    (obj,) = rows["fenced"]["objects"]
    assert obj["box_2d"] == box
    assert obj["bbox"] == pytest.approx([40.0, 10.0, 120.0, 50.0])
    assert rows["swapped"]["objects"][0]["bbox"] == pytest.approx([40.0, 10.0, 120.0, 50.0])
    assert rows["swapped"]["objects"][0]["box_2d"] == [500, 600, 100, 200]
    assert rows["polygon"]["objects"][0]["mask"] is not None
    assert rows["no_prefix_mask"]["objects"][0]["mask"] is not None
    assert rows["bad_mask"]["objects"][0]["mask"] is None
    assert rows["bad_mask"]["error"]  # says why the mask was dropped
    assert rows["empty"]["objects"] == []
    assert 1 <= len(rows["truncated"]["objects"]) < 3


async def test_reparse_export_render_on_a_real_output(images_dir: Path, tmp_path: Path) -> None:
    for i in range(3):
        draw_shapes(320, 240, seed=40 + i)[0].save(images_dir / f"r{i}.png")
    config = make_config(tmp_path)
    first = await run(config)
    assert first.exit_code == exits.OK
    before = {r["image_path"]: r for r in current_rows(tmp_path / "out").to_pylist()}

    report = await asyncio.to_thread(reparse, str(tmp_path / "out"), mask_threshold=254)
    assert report["reparsed"] == 3
    after = {r["image_path"]: r for r in current_rows(tmp_path / "out").to_pylist()}
    assert len(read_rows(tmp_path / "out")) == 3  # appended, the old rows set aside:
    assert len(read_rows(tmp_path / "out" / ".superseded")) == 3  # paid for, so kept
    for path, row in after.items():
        assert row["run_id"] == report["run_id"]
        assert row["key"] == before[path]["key"]
        assert [o["bbox"] for o in row["objects"]] == [o["bbox"] for o in before[path]["objects"]]

    coco_path = tmp_path / "coco.json"
    counts = export_coco(str(tmp_path / "out"), str(coco_path)).counts
    coco = COCO(str(coco_path))
    assert len(coco.getImgIds()) == 3
    assert len(coco.getAnnIds()) == sum(len(r["objects"]) for r in after.values())
    assert counts

    gallery = tmp_path / "gallery"
    render(str(tmp_path / "out"), str(gallery))
    html = (gallery / "index.html").read_text()
    assert "r0.png" in html
    assert len([p for p in gallery.rglob("*") if p.suffix in (".jpg", ".png")]) >= 3
