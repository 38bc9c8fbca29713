"""Every export format from a real output (runs against the local server over two roots that
hold the same relative path), read back by the tools people label and train with:
pycocotools, supervision (YOLO, Pascal VOC), Hugging Face datasets, Label Studio's brush RLE."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
import supervision as sv
import yaml
from aiohttp import web
from label_studio_brush_rle_rs import decode_rle
from PIL import Image
from pycocotools.coco import COCO

from pipeline import exits
from pipeline.cli import main
from pipeline.commands.exports.coco import export_coco
from pipeline.commands.exports.dataset import RootMap, UnknownRoot, collect
from pipeline.commands.exports.files import MARKER, NotAnExport
from pipeline.commands.exports.hf import BOOKKEEPING, export_hf
from pipeline.commands.exports.labelstudio import export_labelstudio
from pipeline.commands.exports.voc import export_voc
from pipeline.commands.exports.yolo import export_yolo
from pipeline.commands.render import render
from pipeline.masks import rle_decode
from pipeline.output.parts import current_rows
from pipeline.output.stores import MissingExtra
from pipeline.records import ROW_SCHEMA
from tests.conftest import (
    Shape,
    answering,
    draw_shapes,
    make_config,
    mask_iou,
    result_object,
    result_row,
    run,
    write_rows,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SIZE = (160, 120)
CAMERAS = {"cam1": 11, "cam2": 12}  # root -> the seed of its frame.png: different shapes
HOSTILE = [
    'say "hi"\nnames: [pwned]',
    "<script>alert(1)</script> & </name>",
    "../../etc/passwd",
    "tab\there\x07bell",
]


@pytest.fixture
async def made(tmp_path: Path) -> dict[str, Any]:
    """Two roots, each with frame.png, segmented, captioned and classified by real runs."""
    truth: dict[str, list[Shape]] = {}
    for camera, seed in CAMERAS.items():
        (tmp_path / "data" / camera).mkdir(parents=True)
        image, shapes = draw_shapes(*SIZE, seed=seed)
        image.save(tmp_path / "data" / camera / "frame.png")
        truth[f"{camera}/frame.png"] = shapes
    paths = [str(tmp_path / "data" / camera) for camera in CAMERAS]
    for task in ({"kind": "segment"}, {"kind": "caption"}, {"kind": "classify", "labels": LABELS}):
        summary = await run(make_config(tmp_path, input={"paths": paths}, task=task))
        assert summary.exit_code == exits.OK
    return {"out": tmp_path / "out", "truth": truth, "data": tmp_path / "data"}


LABELS = ["circle", "rectangle"]


def rows_by_name(out: Path, task: str) -> dict[str, dict[str, Any]]:
    rows = current_rows(out, ("image_root", "image_path", "task", "objects")).to_pylist()
    return {
        f"{Path(row['image_root']).name}/{row['image_path']}": row
        for row in rows
        if row["task"] == task
    }


def assert_masks_match(found: list[np.ndarray], shapes: list[Shape], floor: float) -> None:
    """Each drawn shape has its mask among `found` (so these are this file's objects)."""
    assert len(found) == len(shapes)
    for shape in shapes:
        assert max(mask_iou(mask, shape.mask) for mask in found) >= floor


# ------------------------------------------------------------------------------------ COCO
async def test_coco_names_each_root_and_writes_captions(made: dict, tmp_path: Path) -> None:
    target = tmp_path / "coco" / "instances.json"
    summary = export_coco(made["out"], target)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(target))
        captions = COCO(str(tmp_path / "coco" / "instances_captions.json"))
    images = {image["file_name"]: image for image in coco.dataset["images"]}
    assert sorted(images) == ["cam1/frame.png", "cam2/frame.png"]
    assert coco.dataset["info"]["images_root"] == str(made["data"])
    assert sorted(coco.dataset["info"]["roots"]) == sorted(
        str(made["data"] / camera) for camera in CAMERAS
    )
    for name, image in images.items():  # each file's objects are that file's shapes
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        masks = [coco.annToMask(ann).astype(bool) for ann in anns]
        assert_masks_match(masks, made["truth"][name], 0.85)
        assert Image.open(made["data"] / name).size == (image["width"], image["height"])
    # captions: COCO's captions format, one per image, the same image ids
    assert {image["id"] for image in captions.dataset["images"]} == set(coco.getImgIds())
    for image in captions.dataset["images"]:
        (caption,) = captions.loadAnns(captions.getAnnIds(imgIds=[image["id"]]))
        assert "shapes" in caption["caption"]
    labels = {
        o["label"] for row in rows_by_name(made["out"], "segment").values() for o in row["objects"]
    }
    assert summary.counts == {
        "images": 2,
        "annotations": 6,
        "categories": len(labels),
        "captions": 2,
    }
    assert summary.skipped == {"classify rows (COCO has no place for them)": 2}
    assert "2 classify rows (COCO has no place for them)" in summary.line()


async def test_cli_export_json_and_unknown_root(
    made: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pipeline export` through the CLI's `main` in this process: its arguments, messages and
    exit codes are under test, not a start-up (three processes took ~29 s of a busy machine)."""

    def export(*args: str) -> tuple[int, str, str]:
        code = main(["export", *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    code, _, err = export(
        "yolo", str(made["out"]), "--out", str(tmp_path / "y"), "--task", "segment"
    )
    assert code == 0, err
    assert "export yolo: wrote" in err and "2 images, 6 objects" in err
    code, out, err = export("coco", str(made["out"]), "--out", str(tmp_path / "c.json"), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["images"] == 2 and report["captions"] == 2
    assert report["wrote"] == [str(tmp_path / "c.json"), str(tmp_path / "c_captions.json")]
    code, _, err = export(
        "voc", str(made["out"]), "--out", str(tmp_path / "v"), "--images-root", "/no=/x"
    )
    assert code == exits.USAGE and "/no" in err
    assert not (tmp_path / "v").exists()


async def test_images_root_moves_one_root(made: dict, tmp_path: Path) -> None:
    cam2 = made["data"] / "cam2"
    moved = tmp_path / "elsewhere" / "second"
    moved.parent.mkdir()
    cam2.rename(moved)
    roots = RootMap.parse([f"{cam2}={moved}"])
    summary = export_yolo(made["out"], tmp_path / "yolo", task="segment", roots=roots)
    assert summary.counts["images"] == 2 and not summary.skipped
    # named where the images are now: relative to the common parent of cam1 and the new place
    linked = {p.name: p.resolve() for p in (tmp_path / "yolo" / "images").iterdir()}
    assert linked == {
        "data__cam1__frame.png": made["data"] / "cam1" / "frame.png",
        "elsewhere__second__frame.png": moved / "frame.png",
    }
    assert render(made["out"], tmp_path / "gallery", roots=roots)["missing_sources"] == 0
    assert render(made["out"], tmp_path / "gallery")["missing_sources"] > 0  # not moved back
    with pytest.raises(UnknownRoot, match="/not/a/root"):
        export_coco(made["out"], tmp_path / "c.json", roots=RootMap.parse(["/not/a/root=/x"]))


# ------------------------------------------------------------------------------------ YOLO
async def test_yolo_segment_loads_in_supervision(made: dict, tmp_path: Path) -> None:
    out = tmp_path / "yolo"
    summary = export_yolo(made["out"], out, task="segment")
    assert summary.notes == ["segmentation polygons"]
    dataset = sv.DetectionDataset.from_yolo(
        str(out / "images"), str(out / "labels"), str(out / "data.yaml")
    )
    rows = rows_by_name(made["out"], "segment")
    labels = sorted({obj["label"] for row in rows.values() for obj in row["objects"]})
    assert dataset.classes == labels
    assert len(dataset) == 2
    for path, _, detections in dataset:
        name = Path(path).name.replace("__", "/")
        assert Path(path).is_symlink()
        assert_masks_match(list(detections.mask), made["truth"][name], 0.8)
        found = sorted(dataset.classes[i] for i in detections.class_id)
        assert found == sorted(obj["label"] for obj in rows[name]["objects"])


async def test_yolo_boxes_copies_and_replaces_its_own_folder(made: dict, tmp_path: Path) -> None:
    out = tmp_path / "yolo"
    export_yolo(made["out"], out)  # an earlier export: the next one replaces it whole
    summary = export_yolo(made["out"], out, task="segment", copy=True)
    assert summary.counts["images"] == 2
    images = sorted((out / "images").iterdir())
    assert [p.name for p in images] == ["cam1__frame.png", "cam2__frame.png"]
    assert not any(p.is_symlink() for p in images)
    assert (out / "images" / "cam1__frame.png").read_bytes() == (
        made["data"] / "cam1" / "frame.png"
    ).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(NotAnExport):
        export_voc(made["out"], user)
    assert (user / "notes.txt").read_text() == "keep me" and not (user / MARKER).exists()


async def test_hostile_labels_stay_text(tmp_path: Path) -> None:
    """Model text in data.yaml, VOC XML and the Label Studio config is data, never syntax."""
    (tmp_path / "r").mkdir()
    Image.new("RGB", (40, 30), (9, 9, 9)).save(tmp_path / "r" / "a.png")
    objects = [result_object(label, (2 + i, 3, 20 + i, 25)) for i, label in enumerate(HOSTILE)]
    rows = [
        result_row("a.png", root=str(tmp_path / "r"), width=40, height=30, objects=objects),
    ]
    await write_rows(tmp_path / "out", "r1", rows)
    export_yolo(tmp_path / "out", tmp_path / "yolo")
    data = yaml.safe_load((tmp_path / "yolo" / "data.yaml").read_text())
    assert data["names"] == sorted(HOSTILE) and set(data) == {"train", "val", "nc", "names"}

    export_voc(tmp_path / "out", tmp_path / "voc")
    (xml,) = (tmp_path / "voc" / "Annotations").iterdir()
    names = [element.text for element in ET.parse(xml).getroot().iter("name")]
    assert names == [label.replace("\x07", "") for label in HOSTILE]

    export_labelstudio(tmp_path / "out", tmp_path / "ls.json")
    config = ET.parse(tmp_path / "ls.xml").getroot()
    values = [label.get("value") for label in config.iter("Label")]
    assert values == sorted(label.replace("\x07", "") for label in HOSTILE)
    assert [p.name for p in (tmp_path / "yolo" / "images").iterdir()] == ["a.png"]


# ------------------------------------------------------------------------------------- VOC
async def test_voc_loads_in_supervision(made: dict, tmp_path: Path) -> None:
    out = tmp_path / "voc"
    summary = export_voc(made["out"], out, task="segment")
    assert summary.counts == {"images": 2, "objects": 6}
    dataset = sv.DetectionDataset.from_pascal_voc(
        str(out / "JPEGImages"), str(out / "Annotations"), force_masks=True
    )
    rows = rows_by_name(made["out"], "segment")
    for path, _, detections in dataset:
        name = Path(path).name.replace("__", "/")
        boxes = sorted(tuple(obj["bbox"]) for obj in rows[name]["objects"])
        assert np.allclose(sorted(map(tuple, detections.xyxy)), boxes, atol=1.0)
        assert_masks_match(list(detections.mask), made["truth"][name], 0.8)


# -------------------------------------------------------------------------------------- HF
async def test_hf_loads_with_datasets(made: dict, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    summary = export_hf(made["out"], out)
    assert summary.counts == {"images": 2, "objects": 6, "captions": 2}
    loaded = datasets.load_dataset(
        "imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "cache")
    )
    assert isinstance(loaded.features["image"], datasets.Image)
    kept = {f.name for f in ROW_SCHEMA if f.name not in BOOKKEEPING} - {"task", "status"}
    assert kept - {"text", "members"} <= set(loaded.column_names)
    assert loaded.features["objects"].feature["mask"]["counts"] == datasets.Value("string")
    rows = rows_by_name(made["out"], "segment")
    for record in loaded:
        assert record["image"].size == SIZE
        assert record["tasks"] == ["caption", "classify", "segment"]
        assert len(record["captions"]) == 1 and set(record["labels"]) <= set(LABELS)
        masks = [rle_decode(obj["mask"]) for obj in record["objects"]]
        assert_masks_match(masks, made["truth"][record["name"]], 0.85)
        assert record["objects"] == rows[record["name"]]["objects"]


# ---------------------------------------------------------------------------- Label Studio
async def test_labelstudio_tasks_and_config(made: dict, tmp_path: Path) -> None:
    summary = export_labelstudio(made["out"], tmp_path / "ls.json")
    assert summary.wrote == [str(tmp_path / "ls.json"), str(tmp_path / "ls.xml")]
    assert f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={made['data']}" in summary.line()
    tasks = json.loads((tmp_path / "ls.json").read_text())
    config = ET.parse(tmp_path / "ls.xml").getroot()
    controls = {c.get("name"): c for c in config if c.get("toName") == "image"}
    assert config.find("Image").get("value") == "$image"
    assert [task["data"]["image"] for task in tasks] == [
        "/data/local-files/?d=cam1/frame.png",
        "/data/local-files/?d=cam2/frame.png",
    ]
    for task in tasks:
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == "gemini-2.5-flash"
        results = prediction["result"]
        kinds = sorted(result["type"] for result in results)
        assert kinds == ["brushlabels"] * 3 + ["choices", "textarea"]
        for result in results:  # every result names a control of the config, and its labels
            control = controls[result["from_name"]]
            assert control.tag.lower() == result["type"]
            listed = {child.get("value") for child in control}
            assert set(result["value"].get(result["type"], ())) <= listed
        masks = [
            decode_rle(r["value"]["rle"], False).reshape(SIZE[1], SIZE[0], 4)[:, :, 3] == 255
            for r in results
            if r["type"] == "brushlabels"
        ]
        assert_masks_match(masks, made["truth"][task["data"]["name"]], 0.85)


async def test_labelstudio_boxes_are_percent(tmp_path: Path) -> None:
    rows = [
        result_row(
            "a.png",
            root="/r",
            width=200,
            height=100,
            objects=[result_object("cat", (20, 10, 120, 60))],
        ),
        result_row("a.png", root="/r", task="custom", width=200, height=100, json="{}"),
    ]
    await write_rows(tmp_path / "out", "r1", rows)
    summary = export_labelstudio(tmp_path / "out", tmp_path / "ls.json", image_prefix="http://h/")
    assert summary.skipped == {"custom rows (Label Studio has no place for them)": 1}
    assert summary.notes == []  # no local-files hint: the images are served elsewhere
    (task,) = json.loads((tmp_path / "ls.json").read_text())
    assert task["data"]["image"] == "http://h/a.png"
    (result,) = task["predictions"][0]["result"]
    assert result["type"] == "rectanglelabels"
    assert result["value"] == {
        "x": 10.0,
        "y": 10.0,
        "width": 50.0,
        "height": 50.0,
        "rotation": 0,
        "rectanglelabels": ["cat"],
    }


# ---------------------------------------------------------------------------------- naming
async def test_flat_names_never_collide(tmp_path: Path) -> None:
    paths = ["a/b.png", "a__b.png", "A/B.jpg", "x/.hidden.png", "deep/er/b.png"]
    rows = [result_row(p, root="/r", width=4, height=4, objects=[]) for p in paths]
    rows.append(result_row("b.png", root="/s", width=4, height=4, objects=[]))
    await write_rows(tmp_path / "out", "r1", rows)
    images = collect(tmp_path / "out").images
    names = {image.name for image in images}
    assert names == {f"r/{p}" for p in paths} | {"s/b.png"}
    stems = [Path(image.file).stem.casefold() for image in images]
    assert len(set(stems)) == len(stems)
    assert all("/" not in image.file and not image.file.startswith(".") for image in images)


# ------------------------------------------------------------- groups, URLs, EXIF-turned
async def test_group_rows_export_each_member(images_dir: Path, tmp_path: Path) -> None:
    truth = {}
    (images_dir / "g").mkdir()
    for seed, name in enumerate(("a.png", "b.png")):
        image, truth[f"g/{name}"] = draw_shapes(*SIZE, seed=30 + seed)
        image.save(images_dir / "g" / name)
    config = make_config(tmp_path, input={"group_by": "folder"}, task={"kind": "segment"})
    assert (await run(config)).exit_code == exits.OK
    out = tmp_path / "yolo"
    assert export_yolo(tmp_path / "out", out).counts["images"] == 2
    dataset = sv.DetectionDataset.from_yolo(
        str(out / "images"), str(out / "labels"), str(out / "data.yaml")
    )
    for path, _, detections in dataset:  # each member with the objects placed in it
        assert_masks_match(list(detections.mask), truth[Path(path).name.replace("__", "/")], 0.8)
    assert export_hf(tmp_path / "out", tmp_path / "hf").counts["images"] == 2


async def test_url_inputs_are_downloaded(tmp_path: Path) -> None:
    """Two URLs ending in the same file name: two images, read through the Fetcher."""
    scenes = {
        f"/{folder}/frame.png": draw_shapes(*SIZE, seed=n)[0] for n, folder in enumerate("ab")
    }

    async def serve(request: web.Request) -> web.Response:
        buffer = io.BytesIO()
        scenes[request.path].save(buffer, "PNG")
        return web.Response(body=buffer.getvalue(), content_type="image/png")

    async with answering(serve) as site:
        manifest = tmp_path / "urls.txt"
        manifest.write_text("".join(f"{site}{path}\n" for path in scenes))
        inputs = {"paths": [], "manifest": str(manifest), "allow_hosts": ["127.0.0.1"]}
        config = make_config(tmp_path, input=inputs, task={"kind": "detect"})
        assert (await run(config)).exit_code == exits.OK
        summary = await asyncio.to_thread(
            export_voc, tmp_path / "out", tmp_path / "voc", copy=True, allow_hosts=("127.0.0.1",)
        )
    assert summary.counts["images"] == 2 and not summary.skipped
    placed = sorted((tmp_path / "voc" / "JPEGImages").iterdir())
    assert [p.name for p in placed] == ["a__frame.png", "b__frame.png"]
    for path, folder in zip(placed, "ab", strict=True):
        drawn = np.asarray(scenes[f"/{folder}/frame.png"].convert("RGB"))
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), drawn)


async def test_exif_turned_images_are_written_upright(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    stored = Image.new("RGB", (60, 40), (200, 30, 30))
    stored.paste((30, 30, 200), (0, 0, 10, 10))  # a blue corner to follow
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape 60x40, displayed portrait 40x60
    stored.save(tmp_path / "r" / "turned.jpg", exif=exif, quality=95)
    Image.new("RGB", (40, 60)).save(tmp_path / "r" / "plain.png")
    objects = [result_object("corner", (30, 0, 40, 10))]
    rows = [
        result_row(name, root=str(tmp_path / "r"), width=40, height=60, objects=objects)
        for name in ("turned.jpg", "plain.png")
    ]
    await write_rows(tmp_path / "out", "r1", rows)
    export_yolo(tmp_path / "out", tmp_path / "yolo")
    turned = tmp_path / "yolo" / "images" / "turned.jpg"
    assert not turned.is_symlink() and (tmp_path / "yolo" / "images" / "plain.png").is_symlink()
    with Image.open(turned) as upright:
        assert upright.size == (40, 60) and upright.getexif().get(0x0112, 1) == 1
        red, _, blue = upright.convert("RGB").getpixel((35, 5))  # the box, as displayed
        assert blue > 150 and red < 100


async def test_mask_outlines_without_opencv_say_what_to_install(
    made: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)  # as if the [exports] extra were not there
    with pytest.raises(MissingExtra, match=r"gemini-vision-pipeline\[exports\]"):
        export_yolo(made["out"], tmp_path / "yolo", task="segment")
    assert not list(tmp_path.glob("*yolo*"))  # nothing half-written, no staging left
    assert export_hf(made["out"], tmp_path / "hf").counts["images"] == 2  # needs no OpenCV
