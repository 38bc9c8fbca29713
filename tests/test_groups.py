"""Image groups end to end: one request and one row per group, objects placed in their member,
against the local server (which looks at every image) with exact truth; limits, resume, reuse,
old parts, reparse, export and render of group rows."""

from __future__ import annotations

import asyncio
import csv
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as cocomask
from pycocotools.coco import COCO

from pipeline import exits
from pipeline.commands.estimate import estimate, format_estimate
from pipeline.commands.exports.coco import export_coco
from pipeline.commands.render import render
from pipeline.commands.reparse import reparse
from pipeline.config import ConfigError, parse_config, settings_hash
from pipeline.gemini.content import build_generate_content_body
from pipeline.gemini.types import GenerateResponse, ImagePart, Usage
from pipeline.inputs.checks import check_groups
from pipeline.inputs.source import folder_groups, walk
from pipeline.output.index import load_resume_index, lookup_rows
from pipeline.output.index_cache import file_digest
from pipeline.output.parts import current_rows
from pipeline.records import (
    OBJECT_TYPE,
    ROW_SCHEMA,
    SourceFile,
    SourceGroup,
    group_sha256,
    make_key,
    work_identity,
)
from pipeline.run.requests import REQUEST_OVERHEAD
from pipeline.tasks import get_task, read_answer
from pipeline.tasks.base import TaskSettings
from tests.conftest import box_iou, draw_shapes, make_config, mask_iou, read_current, read_rows, run


def _draw(folder: Path, name: str, size: tuple[int, int], seed: int) -> list:
    image, shapes = draw_shapes(*size, seed=seed, count=2)
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / name)
    return shapes


def _check_member(objects: list[dict], shapes: list, size: tuple[int, int], kind: str) -> None:
    """The objects of one member are its shapes, in its own pixels."""
    assert len(objects) == len(shapes)
    for shape in shapes:
        if kind == "point":
            ys, xs = np.nonzero(shape.mask)
            centre = (xs.mean() + 0.5, ys.mean() + 0.5)
            best = min(
                objects, key=lambda o: np.hypot(o["xy"][0] - centre[0], o["xy"][1] - centre[1])
            )
            assert np.hypot(best["xy"][0] - centre[0], best["xy"][1] - centre[1]) <= 1.5
            assert best["bbox"] is None and best["box_2d"] is None
            continue
        best = max(objects, key=lambda o: box_iou(tuple(o["bbox"]), shape.box))
        assert box_iou(tuple(best["bbox"]), shape.box) >= 0.9, (best["bbox"], shape.box)
        if kind == "segment":
            rle = {"size": best["mask"]["size"], "counts": best["mask"]["counts"].encode()}
            decoded = cocomask.decode(rle).astype(bool)
            assert decoded.shape == (size[1], size[0])
            assert mask_iou(decoded, shape.mask) >= 0.85


@pytest.mark.parametrize("kind", ["detect", "segment", "point"])
async def test_folder_groups_place_every_object_in_its_image(
    images_dir: Path, tmp_path: Path, kind: str
) -> None:
    """Each folder is one request and one row; its members in name order; every object carries
    the index of the member it is in and that member's pixels (sizes differ on purpose)."""
    sizes = {"g1/a.png": (160, 120), "g1/b.png": (120, 200), "g1/sub/c.png": (150, 150)}
    sizes["top.png"] = (140, 100)
    truth = {
        rel: _draw(images_dir / Path(rel).parent, Path(rel).name, size, seed)
        for seed, (rel, size) in enumerate(sizes.items())
    }
    config = make_config(tmp_path, input={"group_by": "folder"}, task={"kind": kind})
    summary = await run(config)
    assert summary.exit_code == exits.OK, summary
    assert summary.api_calls == 3  # ".", "g1", "g1/sub"
    rows = read_current(tmp_path / "out")
    assert set(rows) == {".", "g1", "g1/sub"}
    group = rows["g1"]
    assert [m["image_path"] for m in group["members"]] == ["g1/a.png", "g1/b.png"]
    assert (group["width"], group["height"], group["mime_type"]) == (None, None, None)
    assert [(m["width"], m["height"]) for m in group["members"]] == [(160, 120), (120, 200)]
    shas = [m["image_sha256"] for m in group["members"]]
    assert group["image_sha256"] == group_sha256(shas)
    assert group["key"] == make_key(group_sha256(shas), group["key"].split(".")[1])
    for row in rows.values():
        assert row["status"] == "ok", row["error"]
        for index, member in enumerate(row["members"]):
            placed = [o for o in row["objects"] if o["image"] == index]
            size = (member["width"], member["height"])
            _check_member(placed, truth[member["image_path"]], size, kind)


async def test_manifest_groups_follow_the_stated_order(images_dir: Path, tmp_path: Path) -> None:
    """A CSV or Parquet manifest's `group` column: members in the manifest's order ("Image 0"
    is the first listed), the key from their hashes in that order; the same images under
    another group name are copied, not paid again; another order is another question."""
    truth = {n: _draw(images_dir, f"{n}.png", (128, 96), seed) for seed, n in enumerate("abc")}
    listed = [("images/b.png", "pair"), ("images/a.png", "pair"), ("images/c.png", "single")]
    with open(tmp_path / "groups.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["group", "path"])  # any column order: the header names them
        writer.writerows((group, path) for path, group in listed)
    config = make_config(
        tmp_path,
        input={"paths": [], "manifest": "groups.csv", "group_by": "manifest"},
        task={"kind": "detect"},
    )
    first = await run(config)
    assert (first.api_calls, first.exit_code) == (2, exits.OK)
    rows = read_current(tmp_path / "out")
    pair = rows["pair"]
    assert pair["image_root"] == str(tmp_path)
    assert [m["image_path"] for m in pair["members"]] == ["images/b.png", "images/a.png"]
    for index, name in enumerate("ba"):
        _check_member(
            [o for o in pair["objects"] if o["image"] == index], truth[name], (128, 96), "detect"
        )

    # Parquet, the same pair under another name (copied), and the pair reversed (a new call)
    table = pa.table(
        {
            "path": ["images/b.png", "images/a.png", "images/a.png", "images/b.png"],
            "group": ["again", "again", "reversed", "reversed"],
        }
    )
    pq.write_table(table, tmp_path / "groups.parquet")
    second = await run(
        make_config(
            tmp_path,
            input={"paths": [], "manifest": "groups.parquet", "group_by": "manifest"},
            task={"kind": "detect"},
        )
    )
    assert (second.api_calls, second.copied) == (1, 1)
    rows = read_current(tmp_path / "out")
    assert rows["again"]["key"] == pair["key"] and rows["again"]["objects"] == pair["objects"]
    assert rows["reversed"]["key"] != pair["key"]
    flipped = {(o["label"], 1 - o["image"]) for o in rows["reversed"]["objects"]}
    assert flipped == {(o["label"], o["image"]) for o in pair["objects"]}


def test_a_split_manifest_group_is_refused_before_the_run(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "m.csv").write_text("path,group\na.png,x\nb.png,y\nc.png,x\n")
    config = make_config(tmp_path, input={"paths": [], "manifest": "m.csv", "group_by": "manifest"})
    with pytest.raises(
        ConfigError, match=r"\[input\] manifest: .*'x' are not listed together.*row 3"
    ):
        check_groups(config)
    with pytest.raises(ConfigError, match="not listed together"):  # a run checks first
        asyncio.run(run(config))
    assert not (tmp_path / "out").exists()
    (tmp_path / "m.csv").write_text("path,group\na.png,x\nb.png,\n")
    with pytest.raises(ConfigError, match="row 2 has no group"):
        check_groups(config)
    (tmp_path / "m.csv").write_text("path\na.png\n")
    with pytest.raises(ConfigError, match="path and group columns"):
        check_groups(config)
    with pytest.raises(ConfigError, match='group_by = "manifest" groups the rows'):
        make_config(tmp_path, input={"group_by": "manifest"})
    with pytest.raises(ConfigError, match='use group_by = "manifest"'):
        make_config(tmp_path, input={"manifest": "m.csv", "group_by": "folder"})


async def test_bad_members_and_limits_are_error_rows_without_a_call(
    images_dir: Path, tmp_path: Path
) -> None:
    """A member that is no image makes its group an error row naming it; a walk's broken entry
    is a row of its own; a request over the images/tokens/inline limits is an error row saying
    which limit, and nothing is sent."""
    _draw(images_dir / "bad", "a.png", (96, 96), 1)
    (images_dir / "bad" / "notes.png").write_text("not an image")
    (images_dir / "bad" / "gone.png").symlink_to(images_dir / "missing.png")
    for i in range(3):
        _draw(images_dir / "big", f"{i}.png", (400, 400), 10 + i)
    config = make_config(
        tmp_path, input={"group_by": "folder"}, task={"kind": "detect"}, limits={"tpm": 3000}
    )
    summary = await run(config)
    assert summary.api_calls == 0 and summary.exit_code == exits.ROWS_NOT_OK
    rows = read_current(tmp_path / "out")
    assert rows["bad"]["status"] == "error" and rows["bad"]["error"].startswith("bad/notes.png: ")
    assert rows["bad"]["members"][0]["image_sha256"]  # read before the bad one
    assert (
        rows["bad/gone.png"]["error"] == "broken symlink"
        and rows["bad/gone.png"]["members"] is None
    )
    assert "over [limits] tpm of 3,000" in rows["big"]["error"]
    assert rows["big"]["input_mode"] == "none" and rows["big"]["est_image_tokens"] == 3 * 1032

    inline = make_config(
        tmp_path,
        input={"group_by": "folder", "include": ["big/*"]},
        task={"kind": "detect"},
        images={"mode": "inline"},
        api={"inline_limit_mb": 0.005},
        output={"dir": str(tmp_path / "o2")},
    )
    summary = await run(inline)
    assert summary.api_calls == 0
    (row,) = read_rows(tmp_path / "o2")
    assert "exceed the inline limit of 0.005 MB" in row["error"] and row["input_mode"] == "inline"

    # more images than a request takes: only the count is kept while walking
    files = list(walk([images_dir / "big"]))
    (group,) = folder_groups(files, max_images=2)
    assert len(group.members) == 2 and "holds 3 images; a request takes at most 2" in group.error


async def test_auto_mode_inlines_what_fits_and_uploads_the_rest(
    images_dir: Path, tmp_path: Path
) -> None:
    truth = {}
    for i in range(3):
        truth[f"g/{i}.png"] = _draw(images_dir / "g", f"{i}.png", (200, 150), 20 + i)
    inline = [((images_dir / "g" / f"{i}.png").stat().st_size + 2) // 3 * 4 for i in range(3)]
    grouped = make_config(tmp_path, input={"group_by": "folder"}, task={"kind": "detect"})
    request = get_task("detect").request(grouped.task)
    text = (request.system_instruction or "") + request.prompt
    overhead = REQUEST_OVERHEAD + len(text.encode()) + len(json.dumps(request.response_schema))
    room = overhead + inline[0] + inline[1] + inline[2] // 2  # the first two fit, not the third
    config = make_config(
        tmp_path,
        input={"group_by": "folder"},
        task={"kind": "detect"},
        api={"inline_limit_mb": room / 2**20},
    )
    summary = await run(config)
    assert summary.exit_code == exits.OK and summary.uploads == 1
    (row,) = read_rows(tmp_path / "out")
    assert row["input_mode"] == "mixed"
    for index, member in enumerate(row["members"]):
        placed = [o for o in row["objects"] if o["image"] == index]
        _check_member(placed, truth[member["image_path"]], (200, 150), "detect")


async def test_resume_is_per_group(images_dir: Path, tmp_path: Path) -> None:
    for seed, group in enumerate(("g1", "g2")):
        for i in range(2):
            _draw(images_dir / group, f"{i}.png", (96, 96), 10 * seed + i)
    config = make_config(tmp_path, input={"group_by": "folder"}, task={"kind": "detect"})
    assert (await run(config)).api_calls == 2
    again = await run(config)
    assert (again.api_calls, again.skipped) == (0, 2)
    os.utime(images_dir / "g1" / "1.png", ns=(1, 1))  # touched: the group is not the same
    touched = await run(config)
    assert (touched.api_calls, touched.skipped) == (0, 1)  # same bytes: copied, no call
    assert touched.copied == 1
    _draw(images_dir / "g2", "2.png", (96, 96), 77)  # a new member: another question
    grown = await run(config)
    assert (grown.api_calls, grown.skipped) == (1, 1)
    rows = read_current(tmp_path / "out")
    assert len(rows["g2"]["members"]) == 3


def test_work_identity_is_what_the_row_holds() -> None:
    members = (SourceFile("/r/g/a", "/r", "g/a", 10, 5), SourceFile("/r/g/b", "/r", "g/b", 20, 6))
    root, path, size, stamp = work_identity(SourceGroup("g", "/r", members))
    assert (root, path, size) == ("/r", "g", 30)
    swapped = work_identity(SourceGroup("g", "/r", members[::-1]))
    assert swapped[3] != stamp and 0 <= stamp < 2**63
    lone = SourceFile("/r/a", "/r", "a", 10, 5)
    assert work_identity(lone) == ("/r", "a", 10, 5)


def test_the_parser_checks_each_objects_image() -> None:
    settings = TaskSettings(kind="detect")
    answer = json.dumps(
        [
            {"box_2d": [0, 0, 500, 500], "label": "a", "image": 0},
            {"box_2d": [0, 0, 500, 500], "label": "b", "image": 1},
            {"box_2d": [0, 0, 500, 500], "label": "c", "image": 1.0},
            {"box_2d": [0, 0, 500, 500], "label": "d"},
            {"box_2d": [0, 0, 500, 500], "label": "e", "image": 2},
            {"box_2d": [0, 0, 500, 500], "label": "f", "image": True},
            {"box_2d": [0, 0, 500, 500], "label": "g", "image": "1"},
        ]
    )
    response = GenerateResponse(answer, "STOP", None, Usage(), answer)
    parsed = read_answer(response, 0, 0, settings, [(100, 50), (40, 80)])
    assert parsed.status == "ok"
    assert [(o["label"], o["image"], o["bbox"]) for o in parsed.objects] == [
        ("a", 0, [0.0, 0.0, 50.0, 25.0]),
        ("b", 1, [0.0, 0.0, 20.0, 40.0]),
        ("c", 1, [0.0, 0.0, 20.0, 40.0]),
    ]
    for reason in (
        'item[3]: no "image" index (the request had 2 images)',
        'item[4]: "image" 2 is not one of the images 0-1',
        'item[5]: "image" True is not an image number',
        "item[6]: \"image\" '1' is not an image number",
    ):
        assert reason in parsed.error
    alone = read_answer(response, 0, 0, settings, [(100, 50)])  # a group of one may omit it
    assert [o["label"] for o in alone.objects] == ["a", "d"]
    single = read_answer(response, 100, 50, settings)  # no group: no index at all
    assert len(single.objects) == 7 and all("image" not in o for o in single.objects)


async def test_group_rows_reparse_export_and_render(images_dir: Path, tmp_path: Path) -> None:
    truth = {
        f"g/{n}.png": _draw(images_dir / "g", f"{n}.png", (120, 90), seed)
        for seed, n in enumerate("ab")
    }
    config = make_config(tmp_path, input={"group_by": "folder"}, task={"kind": "segment"})
    assert (await run(config)).exit_code == exits.OK
    out = tmp_path / "out"
    (before,) = read_rows(out)
    report = await asyncio.to_thread(reparse, str(out))  # a command: its own event loop
    assert report["status_changes"] == {"ok->ok": 1}
    after = current_rows(out).to_pylist()[0]
    assert after["objects"] == before["objects"] and after["members"] == before["members"]

    counts = export_coco(out, tmp_path / "coco.json").counts
    assert counts["images"] == 2 and counts["annotations"] == 4
    coco = COCO(str(tmp_path / "coco.json"))
    for image in coco.dataset["images"]:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        shapes = truth[image["file_name"]]
        assert len(anns) == len(shapes)
        for shape in shapes:
            best = max(anns, key=lambda a: mask_iou(coco.annToMask(a).astype(bool), shape.mask))
            assert mask_iou(coco.annToMask(best).astype(bool), shape.mask) >= 0.85

    report = render(out, tmp_path / "gallery")
    assert report["entries"] == 2 and report["missing_sources"] == 0
    page = (tmp_path / "gallery" / "index.html").read_text()
    assert "group g: image 0 of 2" in page and "group g: image 1 of 2" in page
    assert "g/a.png" in page and "g/b.png" in page


def test_parts_of_schema_2_are_read_as_single_image_rows(tmp_path: Path) -> None:
    """Schema 3 only added columns: a part written before reads them as null."""
    old_object = pa.struct([OBJECT_TYPE.field(n) for n in ("label", "box_2d", "bbox", "mask")])
    fields = [
        pa.field("objects", pa.list_(old_object)) if f.name == "objects" else f
        for f in ROW_SCHEMA
        if f.name != "members"
    ]
    schema = pa.schema(fields, metadata={"gemini_vision_pipeline.schema_version": "2"})
    key = make_key("a" * 64, "s1")
    row = {
        "key": key,
        "image_path": "a.png",
        "image_root": "/r",
        "file_size": 3,
        "file_mtime_ns": 4,
        "task": "detect",
        "status": "ok",
        "width": 10,
        "height": 10,
        "objects": [{"label": "x", "box_2d": [0, 0, 10, 10], "bbox": [0, 0, 1, 1], "mask": None}],
    }
    pq.write_table(pa.Table.from_pylist([row], schema=schema), tmp_path / "part-old.parquet")
    (current,) = current_rows(tmp_path).to_pylist()
    assert current["members"] is None
    assert current["objects"][0]["image"] is None and current["objects"][0]["xy"] is None
    index = load_resume_index(tmp_path, key_suffix="s1", retry_errors=False)
    assert index.is_done("/r", "a.png", 3, 4) and key in index.ok_keys
    assert file_digest("/r", "a.png", 3, 4) in index.done
    assert lookup_rows(tmp_path, [key])[key]["objects"][0]["point_2d"] is None


def test_a_lone_image_request_is_unchanged() -> None:
    """Without groups or references a request has no caption, no group wording, no "image"
    key: the same request (and so the same key) as before groups existed."""
    config = parse_config({"task": {"kind": "detect"}}, "x.toml")
    request = get_task("detect").request(config.task)
    assert "Image 0" not in request.prompt and "image" not in str(request.response_schema)
    assert settings_hash(config, request) == settings_hash(config, request, [])
    body = build_generate_content_body(replace(request, images=(ImagePart("image/png", b"x"),)))
    assert [list(part) for part in body["contents"][0]["parts"]] == [["inline_data"], ["text"]]


async def test_the_estimate_counts_tokens_per_group_as_the_server_bills(
    images_dir: Path, tmp_path: Path
) -> None:
    for i, size in enumerate(((100, 80), (500, 300), (90, 90))):
        _draw(images_dir / ("pair" if i < 2 else "one"), f"{i}.png", size, 30 + i)
    config = make_config(tmp_path, input={"group_by": "folder"}, task={"kind": "detect"})
    report = estimate(config)
    assert (report["images"], report["requests"]) == (3, 2)
    assert report["image_tokens"] == 258 + 258 * 3 * 2 + 258  # 500x300: unit 200, 3 x 2 tiles
    await run(config)
    billed = {row["image_path"]: row["prompt_tokens"] for row in read_rows(tmp_path / "out")}
    assert abs(report["input_tokens"] - sum(billed.values())) <= 4
    assert report["input_tokens_per_request"] == pytest.approx(report["input_tokens"] / 2)
    text = format_estimate(report)
    assert "in 2 requests (groups of 1.5 images on average)" in text and "tokens a request" in text
    tight = make_config(  # a fresh output: the estimate prices what a run would do now
        tmp_path,
        input={"group_by": "folder"},
        task={"kind": "detect"},
        limits={"tpm": billed["pair"] - 10},
        output={"dir": str(tmp_path / "fresh")},
    )
    assert estimate(tight)["requests_over_limits"] == 1


def test_the_shipped_group_config_makes_a_group_per_folder() -> None:
    from pipeline.config import load_config
    from pipeline.inputs.source import work_units

    config = load_config(Path(__file__).resolve().parent.parent / "configs" / "groups.toml")
    groups = list(work_units(config.input))
    assert [g.name for g in groups] == ["more", "."]
    assert all(isinstance(g, SourceGroup) and g.error is None for g in groups)
