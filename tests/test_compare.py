"""`pipeline compare` and `render --compare`: two outputs written through the real sink from
answers whose matches, IoUs, F1 and kappa are worked out by hand in each test."""

from __future__ import annotations

import itertools
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from pipeline import exits
from pipeline.cli import main
from pipeline.commands.compare import (
    CompareError,
    Report,
    Thresholds,
    compare_outputs,
    format_report,
)
from pipeline.commands.compare.assign import max_weight_pairs
from pipeline.commands.compare.match import label_key, token_f1
from pipeline.commands.compare.scores import cohen_kappa
from pipeline.commands.render import COLUMNS as RENDER_COLUMNS
from pipeline.commands.render import render
from pipeline.masks import rle_encode, rle_iou
from tests.conftest import make_config, result_object, result_row, run, save_scenes, write_rows

ROOT = "/data"


def obj(label: str, box: tuple[float, float, float, float], **extra: Any) -> dict[str, Any]:
    return {**result_object(label, box), **extra}


def point(label: str, x: float, y: float) -> dict[str, Any]:
    return {"label": label, "point_2d": [0, 0], "xy": [x, y]}


async def output(where: Path, rows: list[dict[str, Any]]) -> Path:
    await write_rows(where, "20260101T000000Z-" + where.name, rows)
    return where


async def test_outputs_on_a_bucket_and_on_disk(out: str, tmp_path: Path) -> None:
    rows_a, rows_b = detect_rows()
    await write_rows(out, "20260101T000000Z-a", rows_a)
    b = await output(tmp_path / "b", rows_b)
    report = compare_outputs(out, b)
    assert (report.summary["matched"], report.summary["f1"]) == (3, pytest.approx(6 / 8))
    assert report.unpaired["only_in_a"] == 1


async def pair(
    tmp_path: Path, a: list[dict[str, Any]], b: list[dict[str, Any]]
) -> tuple[Path, Path]:
    return await output(tmp_path / "a", a), await output(tmp_path / "b", b)


def by_path(report: Any) -> dict[str, Any]:
    return {image.image_path: image for image in report.images}


# ---------------------------------------------------------------------- the assignment
def brute_force(weights: np.ndarray) -> float:
    """The best total weight over every way of pairing rows with columns (weights <= 0 unused)."""
    rows, cols = weights.shape
    small, big = (rows, cols) if rows <= cols else (cols, rows)
    w = weights if rows <= cols else weights.T
    best = 0.0
    for chosen in itertools.permutations(range(big), small):
        best = max(best, sum(max(w[i, j], 0.0) for i, j in enumerate(chosen)))
    return best


@settings(max_examples=300, deadline=None)
@given(
    arrays(
        np.float64,
        st.tuples(st.integers(0, 5), st.integers(0, 5)),
        elements=st.floats(-2, 10, allow_nan=False),
    )
)
def test_assignment_is_optimal_against_every_permutation(weights: np.ndarray) -> None:
    pairs = max_weight_pairs(weights)
    assert len({r for r, _ in pairs}) == len(pairs) == len({c for _, c in pairs})
    assert all(weights[r, c] > 0 for r, c in pairs)
    total = sum(weights[r, c] for r, c in pairs)
    assert total == pytest.approx(brute_force(weights), abs=1e-9)


def test_assignment_prefers_two_pairs_to_one_better_pair() -> None:
    # A0-B0 IoU 0.95 alone, or A0-B1 and A1-B0 at 0.6 each: pairing counts first (both
    # pairs), so the weights give each eligible pair n + IoU
    iou = np.array([[0.95, 0.6], [0.6, 0.0]])
    weights = np.where(iou >= 0.5, 4 + iou, 0.0)
    assert max_weight_pairs(weights) == [(0, 1), (1, 0)]


# ---------------------------------------------------------------------- labels, masks, words
@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("car", "cars"),
        ("Box", "boxes"),
        ("bus", "buses"),
        ("glass", "glasses"),
        ("berry", "berries"),
        ("movie", "movies"),
        ("house", "houses"),
        ("Traffic  Light", "traffic-lights"),
        ("dress", "dresses"),
    ],
)
def test_loose_labels_meet_across_case_spacing_and_plurals(a: str, b: str) -> None:
    assert label_key(a, "loose") == label_key(b, "loose")
    assert label_key(a, "strict") != label_key(b, "strict")


@pytest.mark.parametrize(("a", "b"), [("mouse", "mice"), ("cat", "dog"), ("car light", "car")])
def test_loose_labels_keep_different_words_apart(a: str, b: str) -> None:
    assert label_key(a, "loose") != label_key(b, "loose")


@settings(max_examples=150, deadline=None)
@given(
    arrays(bool, st.tuples(st.integers(1, 9), st.integers(1, 9))),
    st.randoms(use_true_random=False),
)
def test_rle_iou_equals_the_iou_of_the_arrays(a: np.ndarray, rng: Any) -> None:
    b = np.array([rng.random() < 0.5 for _ in range(a.size)]).reshape(a.shape)
    union = (a | b).sum()
    expected = (a & b).sum() / union if union else 0.0
    assert rle_iou(rle_encode(a), rle_encode(b)) == pytest.approx(expected)


def test_rle_iou_refuses_masks_of_two_sizes() -> None:
    with pytest.raises(ValueError, match="different sizes"):
        rle_iou(rle_encode(np.ones((2, 3), bool)), rle_encode(np.ones((3, 2), bool)))


def test_token_f1_counts_shared_words_with_repeats() -> None:
    # A: a red car on the road (6); B: a red car parked on a road (7); shared a, red, car,
    # on, road = 5 -> F1 = 2 * 5 / 13
    assert token_f1("A red car on the road.", "a red car parked on a road") == (10 / 13, 6, 7)
    assert token_f1("", None) == (1.0, 0, 0)


def test_kappa_by_hand() -> None:
    a = ["cat", "cat", "dog", "dog", "bird", "cat"]
    b = ["cat", "dog", "dog", "dog", "bird", "cat"]
    # observed 5/6; chance (3*2 + 2*3 + 1*1) / 36 = 13/36 -> (30 - 13) / (36 - 13)
    assert cohen_kappa(a, b) == pytest.approx(17 / 23)
    assert cohen_kappa(["x", "x"], ["x", "x"]) is None  # chance 1: undefined
    assert cohen_kappa([], []) is None


# ---------------------------------------------------------------------- detect, end to end
def detect_rows() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """a.jpg: cat IoU 0.5 (labelled "Cat" in B), dog IoU 1 ("dogs" in B), a bird only B
    saw; dup.jpg: B found the car twice (IoU 1 and 90/110); empty.jpg: nothing on either
    side; err.jpg: B's call failed; both-err.jpg: both failed; only-a.jpg: B never saw it."""
    a = [
        result_row("a.jpg", objects=[obj("cat", (0, 0, 10, 10)), obj("dog", (20, 20, 30, 30))]),
        result_row("dup.jpg", objects=[obj("car", (0, 0, 10, 10))]),
        result_row("empty.jpg", objects=[]),
        result_row("err.jpg", objects=[obj("cat", (0, 0, 10, 10))]),
        result_row("both-err.jpg", status="error", error="quota"),
        result_row("only-a.jpg", objects=[obj("cat", (0, 0, 10, 10))]),
    ]
    b = [
        result_row(
            "a.jpg",
            objects=[
                obj("Cat", (0, 0, 10, 5)),
                obj("dogs", (20, 20, 30, 30)),
                obj("bird", (50, 50, 60, 60)),
            ],
        ),
        result_row("dup.jpg", objects=[obj("car", (1, 0, 11, 10)), obj("car", (0, 0, 10, 10))]),
        result_row("empty.jpg", objects=[]),
        result_row("err.jpg", status="error", error="the service failed"),
        result_row("both-err.jpg", status="blocked", error="SAFETY"),
    ]
    return a, b


async def test_detect_strict_by_hand(tmp_path: Path) -> None:
    a, b = await pair(tmp_path, *detect_rows())
    report = compare_outputs(a, b)
    s = report.summary
    assert report.task == "detect"
    # in A 2 + 1 + 0, in B 3 + 2 + 0; matched cat, dog, car; IoUs 0.5, 1, 1
    assert (s["in_a"], s["in_b"], s["matched"], s["only_in_a"], s["only_in_b"]) == (3, 5, 3, 0, 2)
    assert s["mean_iou"] == pytest.approx(2.5 / 3)
    assert (s["precision"], s["recall"], s["f1"]) == pytest.approx((3 / 5, 1.0, 6 / 8))
    # strict: "Cat" and "dogs" are slips; only the car agrees
    assert s["label_agreement"] == pytest.approx(1 / 3)
    assert report.agreement == pytest.approx(2 / 8)
    assert report.unpaired == {
        "only_in_a": 1,
        "only_in_b": 0,
        "no_answer_in_a": 0,
        "no_answer_in_b": 1,
        "no_answer_in_both": 1,
    }
    assert [i.image_path for i in report.images] == ["a.jpg", "dup.jpg", "empty.jpg"]
    images = by_path(report)
    assert images["a.jpg"].score == 0.0
    assert images["a.jpg"].detail["label_slips"] == [["cat", "Cat"], ["dog", "dogs"]]
    assert images["dup.jpg"].score == pytest.approx(2 / 3)
    assert images["dup.jpg"].detail["mean_iou"] == 1.0  # the exact copy, not the 0.82 one
    assert images["empty.jpg"].score == 1.0


async def test_detect_loose_labels_and_a_stricter_iou(tmp_path: Path) -> None:
    a, b = await pair(tmp_path, *detect_rows())
    loose = compare_outputs(a, b, labels="loose")
    assert loose.summary["label_agreement"] == 1.0
    assert loose.agreement == pytest.approx(6 / 8)
    assert by_path(loose)["a.jpg"].score == pytest.approx(4 / 5)
    # at IoU 0.6 the half-covered cat no longer pairs: matched dog and car
    strict_iou = compare_outputs(a, b, iou=0.6, labels="loose")
    assert strict_iou.summary["matched"] == 2
    assert strict_iou.summary["recall"] == pytest.approx(2 / 3)


async def test_groups_pair_objects_only_within_the_same_member(tmp_path: Path) -> None:
    # the same box in image 0 of A and image 1 of B is two objects, not one
    a = [result_row("g", objects=[obj("cat", (0, 0, 10, 10), image=0)])]
    b = [result_row("g", objects=[obj("cat", (0, 0, 10, 10), image=1)])]
    report = compare_outputs(*await pair(tmp_path, a, b))
    assert report.summary["matched"] == 0


# ---------------------------------------------------------------------- masks
async def test_segment_uses_mask_iou_when_both_have_masks(tmp_path: Path) -> None:
    square = np.zeros((10, 10), bool)
    square[0:5, 0:5] = True  # 25 px
    ell = square.copy()
    ell[2:5, 2:5] = False  # 16 px, the same box
    a = [result_row("m.png", task="segment", objects=[result_object("cat", (0, 0, 5, 5), square)])]
    b = [result_row("m.png", task="segment", objects=[result_object("cat", (0, 0, 5, 5), ell)])]
    a_out, b_out = await pair(tmp_path, a, b)
    report = compare_outputs(a_out, b_out)
    image = report.images[0]
    assert image.detail["measure"] == "mask"
    assert report.summary["mean_iou"] == pytest.approx(16 / 25)  # the boxes' IoU is 1
    assert compare_outputs(a_out, b_out, iou=0.7).summary["matched"] == 0


# ---------------------------------------------------------------------- other tasks
def classify_rows(labels: list[str]) -> list[dict[str, Any]]:
    return [
        result_row(f"{i}.jpg", task="classify", labels=[label], text=label)
        for i, label in enumerate(labels)
    ]


async def test_classify_agreement_and_kappa_by_hand(tmp_path: Path) -> None:
    a = classify_rows(["cat", "cat", "dog", "dog", "bird", "cat"])
    b = classify_rows(["cat", "dog", "dog", "dog", "bird", "Cat"])
    a_out, b_out = await pair(tmp_path, a, b)
    strict = compare_outputs(a_out, b_out)
    # observed 4/6; A cat 3 dog 2 bird 1, B cat 1 dog 3 bird 1 Cat 1: chance 10/36
    assert strict.summary["agreement"] == pytest.approx(4 / 6)
    assert strict.summary["kappa"] == pytest.approx(14 / 26)
    assert [i.image_path for i in strict.images[:2]] == ["1.jpg", "5.jpg"]
    loose = compare_outputs(a_out, b_out, labels="loose")
    assert loose.summary["agreement"] == pytest.approx(5 / 6)
    assert loose.summary["kappa"] == pytest.approx(17 / 23)


async def test_caption_token_f1_and_length_ratio(tmp_path: Path) -> None:
    a = [
        result_row("1.jpg", task="caption", text="A red car on the road."),
        result_row("2.jpg", task="caption", text="Two dogs"),
    ]
    b = [
        result_row("1.jpg", task="caption", text="a red car parked on a road"),
        result_row("2.jpg", task="caption", text=""),
    ]
    report = compare_outputs(*await pair(tmp_path, a, b))
    assert report.summary["token_f1"] == pytest.approx((10 / 13 + 0) / 2)
    assert report.summary["length_ratio"] == pytest.approx(7 / 8)
    assert by_path(report)["1.jpg"].detail["length_ratio"] == pytest.approx(7 / 6)
    assert report.images[0].image_path == "2.jpg"


async def test_points_pair_within_the_radius(tmp_path: Path) -> None:
    a = [result_row("p.jpg", task="point", objects=[point("cup", 10, 10), point("cup", 100, 100)])]
    b = [result_row("p.jpg", task="point", objects=[point("cup", 13, 14), point("mug", 300, 300)])]
    a_out, b_out = await pair(tmp_path, a, b)
    report = compare_outputs(a_out, b_out)
    assert (report.summary["matched"], report.summary["mean_distance"]) == (1, pytest.approx(5.0))
    assert report.summary["f1"] == pytest.approx(2 / 4)
    assert compare_outputs(a_out, b_out, radius=4).summary["matched"] == 0
    assert "matched 1 within 20 px, mean distance 5.0 px" in format_report(report)


async def test_multi_label_classify_and_custom_answers(tmp_path: Path) -> None:
    # {cat, dog} vs {cat}: Jaccard 1/2; {bird} vs {bird}: 1 -> mean 3/4, one image in two agrees
    a = [
        result_row("1.jpg", task="classify", labels=["cat", "dog"]),
        result_row("2.jpg", task="classify", labels=["bird"]),
    ]
    b = [
        result_row("1.jpg", task="classify", labels=["cat"]),
        result_row("2.jpg", task="classify", labels=["bird"]),
    ]
    report = compare_outputs(*await pair(tmp_path, a, b))
    assert (report.summary["agreement"], report.summary["mean_jaccard"]) == (0.5, 0.75)
    assert report.images[0].detail["labels_b"] == ["cat"]
    # the same JSON value whatever its key order and spacing; another value differs
    a = [
        result_row("1.jpg", task="custom", json='{"a": 1, "b": [2]}'),
        result_row("2.jpg", task="custom", json='{"a": 1}'),
    ]
    b = [
        result_row("1.jpg", task="custom", json='{"b":[2],"a":1}'),
        result_row("2.jpg", task="custom", json='{"a": 2}'),
    ]
    custom = compare_outputs(*await pair(tmp_path / "custom", a, b))
    assert custom.summary["agreement"] == 0.5
    assert [i.image_path for i in custom.images] == ["2.jpg", "1.jpg"]


async def test_outputs_of_different_tasks_are_refused(tmp_path: Path) -> None:
    a_out, b_out = await pair(
        tmp_path,
        [result_row("1.jpg", task="detect", objects=[])],
        [result_row("1.jpg", task="caption", text="x")],
    )
    with pytest.raises(CompareError, match=r"holds rows of detect.*of caption"):
        compare_outputs(a_out, b_out)


# ---------------------------------------------------------------------- the command
async def test_cli_json_and_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = await pair(tmp_path, *detect_rows())
    assert main(["compare", str(a), str(b), "--labels", "loose", "--json"]) == exits.OK
    report = json.loads(capsys.readouterr().out)
    assert report["summary"]["agreement"] == pytest.approx(6 / 8)
    assert report["thresholds"] == {"iou": 0.5, "labels": "loose", "radius": 20.0}
    assert [i["image_path"] for i in report["images"]] == ["dup.jpg", "a.jpg", "empty.jpg"]
    assert main(["compare", str(a), str(b)]) == exits.OK
    text = capsys.readouterr().out
    assert "matched 3 at IoU >= 0.5, mean IoU 0.833" in text
    assert "precision 0.600, recall 1.000, F1 0.750" in text
    assert "'cat' vs 'Cat'" in text


async def test_cli_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = await pair(tmp_path, *detect_rows())
    assert main(["compare", str(a), str(tmp_path / "nope")]) == exits.USAGE
    assert "no such output folder" in capsys.readouterr().err
    assert main(["compare", str(a), str(b), "--iou", "0"]) == exits.USAGE
    assert main(["compare", str(a), str(b), "--task", "caption"]) == exits.USAGE


# ---------------------------------------------------------------------- real runs
async def test_two_real_runs_on_the_local_server(tmp_path: Path, images_dir: Path) -> None:
    """The same scenes run three times through the engine and the local server: at full size
    twice (the server is deterministic: the runs agree exactly), and shrunk to 24 pixels."""
    save_scenes(images_dir, 6, prefix="scene", seed=3)
    full, again, small = (tmp_path / name for name in ("full", "again", "small"))
    await run(make_config(tmp_path, output={"dir": str(full)}))
    await run(make_config(tmp_path, output={"dir": str(again)}))
    await run(make_config(tmp_path, output={"dir": str(small)}, images={"max_side": 24}))
    same = compare_outputs(full, again)
    assert (same.task, same.summary["images"], same.agreement) == ("segment", 6, 1.0)
    assert same.summary["mean_iou"] == 1.0
    assert {image.detail["measure"] for image in same.images} == {"mask"}
    shrunk = compare_outputs(full, small)
    assert shrunk.summary["images"] == 6
    assert (shrunk.summary["mean_iou"] or 0.0) < 1.0  # coarser masks from a 24-pixel image


# ---------------------------------------------------------------------- the gallery
HOSTILE = '<script>document.body.dataset.pwned = "1"</script>'


async def gallery_outputs(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("good.png", "half.png", "bad.png", "lone.png"):
        Image.new("RGB", (64, 48), (40, 40, 40)).save(images / name)

    def at(path: str, objects: list[dict[str, Any]]) -> dict[str, Any]:
        return result_row(path, root=str(images), objects=objects, width=64, height=48)

    box = (4, 4, 30, 30)
    a = [
        at("good.png", [obj("cat", box)]),
        at("half.png", [obj("cat", box), obj("dog", (34, 4, 60, 30))]),
        at("bad.png", [obj("cat", box)]),
        at("lone.png", [obj("cat", box)]),
    ]
    b = [
        at("good.png", [obj("cat", box)]),
        at("half.png", [obj("cat", box)]),
        at("bad.png", [obj(HOSTILE, box)]),  # paired, but labelled otherwise
    ]
    return await pair(tmp_path, a, b)


def figures(index: Path) -> list[tuple[str, str, str]]:
    """(class, data-score, image path) of each figure, in page order."""
    page = index.read_text()
    found = re.findall(r'<figure([^>]*) id="e\d+">.*?<b>([^<]*)</b>', page)
    out = []
    for attributes, path in found:
        kind = re.search(r'class="([^"]*)"', attributes)
        score = re.search(r'data-score="([^"]*)"', attributes)
        out.append((kind.group(1) if kind else "", score.group(1) if score else "", path))
    return out


async def test_render_compare_marks_and_sorts_worst_first(tmp_path: Path) -> None:
    a, b = await gallery_outputs(tmp_path)
    assert main(["render", str(a), "--out", str(tmp_path / "gallery"), "--compare", str(b)]) == 0
    index = tmp_path / "gallery" / "index.html"
    # bad 0 (paired, another label), half 2*1/3, good 1; lone.png is not in B: after them, unmarked
    assert figures(index) == [
        ("disagree", "0.0000", "bad.png"),
        ("disagree", "0.6667", "half.png"),
        ("agree", "1.0000", "good.png"),
        ("", "", "lone.png"),
    ]
    page = index.read_text()
    assert HOSTILE not in page and "&lt;script&gt;" in page
    assert 'id="comparison"' in page
    # each compared image is A's overlay beside B's: wider than one overlay
    assert Image.open(tmp_path / "gallery/images/000001.jpg").size == (64 * 2 + 8, 48)
    assert Image.open(tmp_path / "gallery/images/000004.jpg").size == (64, 48)


async def test_compare_out_shows_only_the_disagreeing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = await gallery_outputs(tmp_path)
    out = tmp_path / "disagree"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == exits.OK
    assert [path for _, _, path in figures(out / "index.html")] == ["bad.png", "half.png"]
    assert "2 images that disagree" in capsys.readouterr().err


async def test_the_gallery_draws_the_rows_the_comparison_read(tmp_path: Path) -> None:
    """`compare --out` and `render --compare` read each output once: a Report made with the
    gallery's columns draws it with neither output there any more."""
    a, b = await gallery_outputs(tmp_path)
    report = compare_outputs(a, b, columns=RENDER_COLUMNS)
    for output in (a, b):
        shutil.rmtree(output)
    index = Path(render(a, tmp_path / "gallery", compare=report)["index"])
    assert [path for _, _, path in figures(index)] == ["bad.png", "half.png"]
    assert Image.open(tmp_path / "gallery/images/000001.jpg").size == (64 * 2 + 8, 48)


async def test_a_report_is_rendered_from_its_own_output_a_only(tmp_path: Path) -> None:
    """A Report holds A's rows: asked to draw another output beside it, render refuses rather
    than draw A's rows under that output's name."""
    a, b = await gallery_outputs(tmp_path)
    report = compare_outputs(a, b, columns=RENDER_COLUMNS)
    with pytest.raises(ValueError, match=r"a comparison of .* render it from"):
        render(b, tmp_path / "gallery", compare=report)
    assert not (tmp_path / "gallery").exists()


def test_format_report_of_nothing_compared() -> None:
    report = Report(
        "A",
        "B",
        "classify",
        Thresholds(),
        [],
        {"images": 0, "images_agreeing": 0, "agreement": None, "kappa": None, "mean_jaccard": None},
        {
            k: 0
            for k in (
                "only_in_a",
                "only_in_b",
                "no_answer_in_a",
                "no_answer_in_b",
                "no_answer_in_both",
            )
        },
    )
    assert "Cohen's kappa n/a" in format_report(report)


async def test_group_members_side_by_side(tmp_path: Path) -> None:
    """A group's row is one figure per member, A's member beside B's; each figure's image is
    its own overlay file (not the group's name)."""
    images = tmp_path / "images"
    images.mkdir()
    members = []
    for name in ("g/0.png", "g/1.png"):
        (images / "g").mkdir(exist_ok=True)
        Image.new("RGB", (32, 32), (40, 40, 40)).save(images / name)
        members.append({"image_path": name, "image_root": str(images), "width": 32, "height": 32})

    def group(objects: list[dict[str, Any]]) -> dict[str, Any]:
        return result_row("g", root=str(images), objects=objects, members=members)

    a = [group([obj("cat", (2, 2, 20, 20), image=0), obj("dog", (2, 2, 20, 20), image=1)])]
    b = [group([obj("cat", (2, 2, 20, 20), image=0)])]
    a_out, b_out = await pair(tmp_path, a, b)
    index = Path(render(a_out, tmp_path / "gallery", compare=b_out)["index"])
    page = index.read_text()
    assert [path for _, _, path in figures(index)] == ["g/0.png", "g/1.png"]
    assert 'src="images/000001.jpg"' in page and 'src="images/000002.jpg"' in page
    assert Image.open(tmp_path / "gallery/images/000002.jpg").size == (32 * 2 + 8, 32)
