"""`compare_outputs(a, b)`: how far two outputs' answers about the same images agree.

Rows are read through `current_rows` (the current answer per image and task) and joined on the
image's identity: its `image_root` and `image_path` (a group's row: the group's name), so two
runs over the same inputs meet image by image whatever their settings. Only answers are
compared: a row whose status is not `ok` or `partial` (an error, a blocked answer) on either
side is counted apart, not as a disagreement, as are the images only one output holds. Nothing
is called; the outputs are only read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.commands.compare.match import (
    LabelRule,
    ObjectMatch,
    label_set,
    match_objects,
    match_points,
    same_json,
    token_f1,
)
from pipeline.commands.compare.scores import cohen_kappa, jaccard, ratio
from pipeline.commands.outputs import require_output
from pipeline.config import ConfigError
from pipeline.output.parts import Output, current_rows

ANSWERED = ("ok", "partial")
DEFAULT_IOU = 0.5
DEFAULT_RADIUS = 20.0  # pixels: a point a model puts on a small object moves by about this much
COLUMNS = ("image_root", "image_path", "task", "status", "objects", "text", "labels", "json")
Row = dict[str, Any]
Identity = tuple[str, str]


class CompareError(ConfigError):
    """Two outputs that cannot be compared as asked (no common task, a bad threshold): a usage
    error, as a missing output is (the command exits 2 with the message)."""


@dataclass(frozen=True, slots=True)
class Thresholds:
    """What counts as agreeing: IoU to pair objects, the label rule, the radius of points."""

    iou: float = DEFAULT_IOU
    labels: LabelRule = "strict"
    radius: float = DEFAULT_RADIUS

    def check(self) -> None:
        if not 0 < self.iou <= 1:
            raise CompareError(f"--iou must be above 0 and at most 1, got {self.iou}")
        if self.labels not in ("strict", "loose"):
            raise CompareError(f"--labels must be strict or loose, got {self.labels!r}")
        if not self.radius > 0:
            raise CompareError(f"--radius must be above 0 pixels, got {self.radius}")


@dataclass(slots=True)
class ImageResult:
    """One image both outputs answered: its agreement (0 to 1) and the task's details."""

    image_root: str
    image_path: str
    score: float
    detail: dict[str, Any]
    misses: int = 0  # objects one side has and the other lacks or labels otherwise

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class Report:
    """The comparison of B against A: per image (worst first) and overall."""

    a: str
    b: str
    task: str
    thresholds: Thresholds
    images: list[ImageResult]
    summary: dict[str, Any]
    unpaired: dict[str, int] = field(default_factory=dict)
    # the current rows of A and B it was made from, with the columns read (COLUMNS and those
    # asked): the gallery draws them (`render --compare`) without reading either output again
    read: tuple[list[Row], list[Row]] = field(default=([], []), repr=False)
    columns: tuple[str, ...] = ()

    def holds(self, columns: Iterable[str]) -> bool:
        """Whether its rows were read with every one of `columns`."""
        return set(columns) <= set(self.columns)

    @property
    def agreement(self) -> float | None:
        """The headline number (README, "Comparing two runs"): per task, 0 to 1."""
        return self.summary.get("agreement")

    def as_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "task": self.task,
            "thresholds": asdict(self.thresholds),
            "summary": self.summary,
            "unpaired": self.unpaired,
            "images": [image.as_dict() for image in self.images],
        }


def compare_outputs(
    a: Output,
    b: Output,
    *,
    iou: float = DEFAULT_IOU,
    labels: LabelRule = "strict",
    radius: float = DEFAULT_RADIUS,
    task: str | None = None,
    columns: Sequence[str] = (),
) -> Report:
    """Compare output B's answers with output A's (A is the reference: precision and recall
    are B's against A). `task` picks one when both outputs hold several. Each output is read
    once, with `columns` besides the comparison's (the Report keeps the rows: `Report.read`)."""
    thresholds = Thresholds(iou, labels, radius)
    thresholds.check()
    require_output(a)
    require_output(b)
    wanted = tuple(dict.fromkeys((*COLUMNS, *columns)))
    rows_a, rows_b = _rows(a, wanted), _rows(b, wanted)
    chosen = _common_task(rows_a, rows_b, task, (str(a), str(b)))
    by_a, by_b = _answers(rows_a, chosen), _answers(rows_b, chosen)
    both = sorted(by_a.keys() & by_b.keys())
    answered = [key for key in both if _answered(by_a[key]) and _answered(by_b[key])]
    results = [_compare_row(chosen, by_a[k], by_b[k], thresholds) for k in answered]
    results.sort(key=lambda r: (r.score, -r.misses, r.image_root, r.image_path))
    return Report(
        str(a),
        str(b),
        chosen,
        thresholds,
        results,
        SUMMARIES[_kind(chosen)](results),
        _unpaired(by_a, by_b, both),
        (rows_a, rows_b),
        wanted,
    )


def _rows(output: Output, columns: Sequence[str]) -> list[Row]:
    return current_rows(output, columns).to_pylist()


def _common_task(a: list[Row], b: list[Row], task: str | None, names: tuple[str, str]) -> str:
    """The one task both outputs answered (or `task`, which both must hold)."""
    tasks_a, tasks_b = {r["task"] for r in a}, {r["task"] for r in b}
    common = tasks_a & tasks_b
    if task is not None and task not in common:
        raise CompareError(
            f"--task {task}: {names[0]} holds {_listed(tasks_a)}, {names[1]} {_listed(tasks_b)}"
        )
    if task is not None:
        return task
    if len(common) == 1:
        return next(iter(common))
    if not common:
        raise CompareError(
            f"no task to compare: {names[0]} holds rows of {_listed(tasks_a)}, {names[1]} of "
            f"{_listed(tasks_b)}; compare needs two outputs of the same task"
        )
    raise CompareError(f"both outputs hold {_listed(common)}: choose one with --task")


def _listed(tasks: set[str]) -> str:
    return ", ".join(sorted(tasks)) if tasks else "no rows"


def _answers(rows: list[Row], task: str) -> dict[Identity, Row]:
    return {(r["image_root"] or "", r["image_path"] or ""): r for r in rows if r["task"] == task}


def _answered(row: Row) -> bool:
    return row["status"] in ANSWERED


def _unpaired(by_a: dict[Identity, Row], by_b: dict[Identity, Row], both: list[Identity]) -> dict:
    """Images not compared: held by one output only, or without an answer on a side."""
    missing_a = [k for k in both if not _answered(by_a[k])]
    missing_b = [k for k in both if not _answered(by_b[k])]
    return {
        "only_in_a": len(by_a.keys() - by_b.keys()),
        "only_in_b": len(by_b.keys() - by_a.keys()),
        "no_answer_in_a": len(set(missing_a) - set(missing_b)),
        "no_answer_in_b": len(set(missing_b) - set(missing_a)),
        "no_answer_in_both": len(set(missing_a) & set(missing_b)),
    }


# ------------------------------------------------------------------------- one image, by task
def _kind(task: str) -> str:
    """Tasks compared alike: boxes and masks as objects; the rest by their own measure."""
    return "objects" if task in ("detect", "segment") else task


def _compare_row(task: str, a: Row, b: Row, thresholds: Thresholds) -> ImageResult:
    score, detail, misses = COMPARERS[_kind(task)](a, b, thresholds)
    return ImageResult(a["image_root"] or "", a["image_path"] or "", score, detail, misses)


Compared = tuple[float, dict[str, Any], int]


def _objects(a: Row, b: Row, thresholds: Thresholds) -> Compared:
    found = match_objects(
        a["objects"] or [], b["objects"] or [], iou=thresholds.iou, labels=thresholds.labels
    )
    return _object_result(found, "mean_iou", ratio(found.closeness, found.matched))


def _points(a: Row, b: Row, thresholds: Thresholds) -> Compared:
    found = match_points(
        a["objects"] or [], b["objects"] or [], radius=thresholds.radius, labels=thresholds.labels
    )
    return _object_result(found, "mean_distance", ratio(found.closeness, found.matched))


def _object_result(found: ObjectMatch, name: str, closeness: float | None) -> Compared:
    detail = {
        "measure": found.measure,
        "in_a": found.in_a,
        "in_b": found.in_b,
        "matched": found.matched,
        "only_in_a": found.in_a - found.matched,
        "only_in_b": found.in_b - found.matched,
        "labels_agree": found.agreed,
        "closeness": found.closeness,
        name: closeness,
        "label_slips": [list(pair) for pair in found.label_slips],
    }
    return found.score, detail, found.in_a + found.in_b - 2 * found.agreed


def _classify(a: Row, b: Row, thresholds: Thresholds) -> Compared:
    set_a, set_b = (
        label_set(a["labels"], thresholds.labels),
        label_set(b["labels"], thresholds.labels),
    )
    detail = {"labels_a": a["labels"] or [], "labels_b": b["labels"] or [], "same": set_a == set_b}
    detail["keys"] = [sorted(set_a), sorted(set_b)]
    return jaccard(set_a, set_b), detail, len(set_a ^ set_b)


def _caption(a: Row, b: Row, thresholds: Thresholds) -> Compared:
    f1, words_a, words_b = token_f1(a["text"], b["text"])
    detail = {
        "token_f1": f1,
        "words_a": words_a,
        "words_b": words_b,
        "length_ratio": ratio(words_b, words_a),
    }
    return f1, detail, 0


def _custom(a: Row, b: Row, thresholds: Thresholds) -> Compared:
    same = same_json(a["json"], b["json"])
    return float(same), {"same": same}, int(not same)


COMPARERS: dict[str, Callable[[Row, Row, Thresholds], Compared]] = {
    "objects": _objects,
    "point": _points,
    "classify": _classify,
    "caption": _caption,
    "custom": _custom,
}


# ------------------------------------------------------------------------------- overall
def _total(results: list[ImageResult], name: str) -> float:
    return sum(r.detail[name] for r in results)


def _objects_summary(results: list[ImageResult]) -> dict[str, Any]:
    """Summed over images (every object weighs the same, whichever image it is in)."""
    in_a, in_b = _total(results, "in_a"), _total(results, "in_b")
    matched, agreed = _total(results, "matched"), _total(results, "labels_agree")
    closeness = "mean_distance" if results and "mean_distance" in results[0].detail else "mean_iou"
    return {
        "images": len(results),
        "images_agreeing": sum(r.score == 1 for r in results),
        "in_a": int(in_a),
        "in_b": int(in_b),
        "matched": int(matched),
        "only_in_a": int(in_a - matched),
        "only_in_b": int(in_b - matched),
        closeness: ratio(_total(results, "closeness"), matched),
        "precision": ratio(matched, in_b),
        "recall": ratio(matched, in_a),
        "f1": ratio(2 * matched, in_a + in_b),
        "label_agreement": ratio(agreed, matched),
        "agreement": ratio(2 * agreed, in_a + in_b) if in_a + in_b else _all_empty(results),
    }


def _all_empty(results: list[ImageResult]) -> float | None:
    """Images compared but no object on either side: they all agree there is nothing."""
    return 1.0 if results else None


def _classify_summary(results: list[ImageResult]) -> dict[str, Any]:
    keys_a = [tuple(r.detail["keys"][0]) for r in results]
    keys_b = [tuple(r.detail["keys"][1]) for r in results]
    return {
        "images": len(results),
        "images_agreeing": sum(r.detail["same"] for r in results),
        "agreement": ratio(sum(r.detail["same"] for r in results), len(results)),
        "kappa": cohen_kappa(keys_a, keys_b),
        "mean_jaccard": ratio(sum(r.score for r in results), len(results)),
    }


def _caption_summary(results: list[ImageResult]) -> dict[str, Any]:
    return {
        "images": len(results),
        "agreement": ratio(sum(r.score for r in results), len(results)),
        "token_f1": ratio(sum(r.score for r in results), len(results)),
        "words_a": int(_total(results, "words_a")),
        "words_b": int(_total(results, "words_b")),
        "length_ratio": ratio(_total(results, "words_b"), _total(results, "words_a")),
    }


def _custom_summary(results: list[ImageResult]) -> dict[str, Any]:
    same = sum(r.detail["same"] for r in results)
    return {"images": len(results), "images_agreeing": same, "agreement": ratio(same, len(results))}


SUMMARIES: dict[str, Callable[[list[ImageResult]], dict[str, Any]]] = {
    "objects": _objects_summary,
    "point": _objects_summary,
    "classify": _classify_summary,
    "caption": _caption_summary,
    "custom": _custom_summary,
}
