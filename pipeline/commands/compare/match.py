"""One image's answers against another's: objects paired by optimal assignment, labels
compared by a stated rule, captions by their words (no I/O: rows in, numbers out).

Pairing. Objects of A and B are paired so that the number of pairs at or above the IoU
threshold is as large as it can be and, among such pairings, their summed IoU is largest (each
eligible pair weighs `len + IoU`, which makes one more pair always worth more than any IoU
gain). IoU is of the masks when every object of both answers has one, else of the pixel boxes.
Points pair when they lie within `radius` pixels, nearer points preferred the same way. Only
objects of the same image of a group can pair. Labels do not steer the pairing: a box both
answers drew is found once, then its labels are compared.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from pipeline.commands.compare.assign import max_weight_pairs
from pipeline.masks import intervals_iou, rle_intervals

LabelRule = Literal["strict", "loose"]
Measure = Literal["box", "mask", "point"]
_SEPARATORS = re.compile(r"[\s_\-]+")
_WORD = re.compile(r"\w+")


# ----------------------------------------------------------------------------------- labels
def label_key(label: str | None, rule: LabelRule) -> str:
    """The form two labels are compared in. strict: the label exactly as stored. loose:
    case-folded, `-`, `_` and runs of whitespace as one space, ends trimmed, and the last word
    made singular: one trailing "s" dropped unless the word ends in "ss" or "us", then one
    trailing "e" dropped, then a trailing "i" read as "y" (cars/car, boxes/box, buses/bus,
    glasses/glass, berries/berry, movies/movie, houses/house all meet; irregular plurals such
    as mice or people do not)."""
    text = label or ""
    if rule == "strict":
        return text
    words = _SEPARATORS.sub(" ", text.casefold()).strip().split(" ")
    words[-1] = _singular(words[-1])
    return " ".join(words)


def _singular(word: str) -> str:
    if word.endswith("s") and not word.endswith(("ss", "us")):
        word = word[:-1]
    word = word.removesuffix("e")
    return word[:-1] + "y" if word.endswith("i") else word


# ---------------------------------------------------------------------------------- objects
@dataclass(frozen=True, slots=True)
class ObjectMatch:
    """How one image's objects in A and in B pair up."""

    in_a: int
    in_b: int
    matched: int
    agreed: int  # pairs whose labels agree under the rule
    closeness: float  # summed IoU of the pairs (points: summed distance in pixels)
    measure: Measure
    label_slips: tuple[tuple[str, str], ...] = ()  # (A's label, B's label) of pairs that differ

    @property
    def score(self) -> float:
        """The image's agreement: F1 of the pairs that also agree on their label (1.0 when
        neither answer holds an object: both say there is nothing)."""
        total = self.in_a + self.in_b
        return 2 * self.agreed / total if total else 1.0


def match_objects(
    a: Sequence[dict[str, Any]],
    b: Sequence[dict[str, Any]],
    *,
    iou: float,
    labels: LabelRule,
) -> ObjectMatch:
    """Pair boxes or masks (module doc) image of a group by image; IoU >= `iou` to pair."""
    measure: Measure = "mask" if _all_masked(a) and _all_masked(b) else "box"
    pairs = _pairs_by_image(a, b, lambda x, y: _closeness(x, y, measure), iou)
    return _tally(a, b, pairs, measure, labels)


def match_points(
    a: Sequence[dict[str, Any]],
    b: Sequence[dict[str, Any]],
    *,
    radius: float,
    labels: LabelRule,
) -> ObjectMatch:
    """Pair points within `radius` pixels (nearest preferred), image of a group by image."""
    # nearness as a weight in [0, 1]: 1 on the spot, 0 at the radius (still a match)
    pairs = _pairs_by_image(a, b, lambda x, y: _nearness(x, y, radius), 0.0)
    return _tally(a, b, pairs, "point", labels, radius)


def _pairs_by_image(
    a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], closeness: Any, floor: float
) -> list[tuple[int, int, float]]:
    """(index in a, index in b, closeness) of the optimal pairs, within each group member."""
    found: list[tuple[int, int, float]] = []
    for member in sorted({_member(o) for o in a} & {_member(o) for o in b}):
        rows = [i for i, o in enumerate(a) if _member(o) == member]
        cols = [j for j, o in enumerate(b) if _member(o) == member]
        close = closeness([a[i] for i in rows], [b[j] for j in cols])
        weights = np.where(close >= floor, len(rows) + len(cols) + close, 0.0)
        found += [(rows[r], cols[c], float(close[r, c])) for r, c in max_weight_pairs(weights)]
    return found


def _member(obj: dict[str, Any]) -> int:
    return int(obj.get("image") or 0)


def _tally(
    a: Sequence[dict[str, Any]],
    b: Sequence[dict[str, Any]],
    pairs: list[tuple[int, int, float]],
    measure: Measure,
    rule: LabelRule,
    radius: float = 0.0,
) -> ObjectMatch:
    slips = tuple(
        (a[i].get("label") or "", b[j].get("label") or "")
        for i, j, _ in pairs
        if label_key(a[i].get("label"), rule) != label_key(b[j].get("label"), rule)
    )
    # points: the weight was nearness; the report wants the distance in pixels
    closeness = sum(radius * (1 - w) if measure == "point" else w for _, _, w in pairs)
    return ObjectMatch(
        len(a), len(b), len(pairs), len(pairs) - len(slips), closeness, measure, slips
    )


def _all_masked(objects: Sequence[dict[str, Any]]) -> bool:
    return all((o.get("mask") or {}).get("counts") is not None for o in objects)


def _closeness(
    a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], measure: Measure
) -> np.ndarray:
    boxes = box_ious(_boxes(a), _boxes(b))
    if measure == "box":
        return boxes
    return _mask_ious(a, b, boxes)


def _boxes(objects: Sequence[dict[str, Any]]) -> np.ndarray:
    """Pixel boxes (x0, y0, x1, y1); an object without a usable box is an empty box."""
    rows = [o.get("bbox") if len(o.get("bbox") or ()) == 4 else (0, 0, 0, 0) for o in objects]
    return np.asarray(rows, dtype=np.float64).reshape(-1, 4)


def box_ious(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of `a` with every box of `b` (N x 4 and M x 4 -> N x M); 0 where the
    union is empty."""
    a, b = a[:, None, :], b[None, :, :]
    width = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    height = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    overlap = width * height
    union = _area(a) + _area(b) - overlap
    return np.divide(overlap, union, out=np.zeros_like(overlap), where=union > 0)


def _area(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[..., 2] - boxes[..., 0], 0, None) * np.clip(
        boxes[..., 3] - boxes[..., 1], 0, None
    )


def _mask_ious(
    a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], boxes: np.ndarray
) -> np.ndarray:
    """Mask IoU from the runs; only pairs whose boxes meet are measured (a mask lies inside its
    box, so the others are 0). A mask that cannot be read, or of another size, counts 0."""
    runs_a, runs_b = [_runs(o) for o in a], [_runs(o) for o in b]
    out = np.zeros(boxes.shape)
    for i, j in zip(*np.nonzero(boxes > 0), strict=True):
        out[i, j] = _runs_iou(runs_a[i], runs_b[j])
    return out


_Runs = tuple[tuple[int, ...], tuple[np.ndarray, np.ndarray]]


def _runs_iou(a: _Runs | None, b: _Runs | None) -> float:
    if a is None or b is None or a[0] != b[0]:
        return 0.0
    return intervals_iou(a[1], b[1])


def _runs(obj: dict[str, Any]) -> _Runs | None:
    mask = obj["mask"]
    try:
        return tuple(int(v) for v in mask["size"]), rle_intervals(mask)
    except (ValueError, KeyError, TypeError):
        return None


def _nearness(
    a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], radius: float
) -> np.ndarray:
    """1 - distance / radius for every pair of points; below 0 beyond the radius (and for an
    object without a point)."""
    pa, pb = _points(a), _points(b)
    distance = np.hypot(pa[:, None, 0] - pb[None, :, 0], pa[:, None, 1] - pb[None, :, 1])
    near = 1 - distance / radius if radius > 0 else np.where(distance == 0, 1.0, -1.0)
    return np.nan_to_num(near, nan=-1.0)


def _points(objects: Sequence[dict[str, Any]]) -> np.ndarray:
    rows = [o.get("xy") if len(o.get("xy") or ()) == 2 else (np.nan, np.nan) for o in objects]
    return np.asarray(rows, dtype=np.float64).reshape(-1, 2)


# ------------------------------------------------------------------------ labels and text
def label_set(labels: Sequence[str] | None, rule: LabelRule) -> frozenset[str]:
    return frozenset(label_key(label, rule) for label in labels or ())


def token_f1(a: str | None, b: str | None) -> tuple[float, int, int]:
    """(F1 of the words the two texts share, counted with repeats; words in A; words in B).
    Words are runs of letters and digits, case-folded. Two empty texts agree (1.0)."""
    words_a, words_b = _words(a), _words(b)
    shared = sum((Counter(words_a) & Counter(words_b)).values())
    total = len(words_a) + len(words_b)
    return (2 * shared / total if total else 1.0), len(words_a), len(words_b)


def _words(text: str | None) -> list[str]:
    return _WORD.findall((text or "").casefold())


def same_json(a: str | None, b: str | None) -> bool:
    """Whether two custom answers hold the same JSON value (key order and spacing aside)."""
    return _canonical(a) == _canonical(b)


def _canonical(text: str | None) -> str | None:
    try:
        return json.dumps(json.loads(text), sort_keys=True) if text is not None else None
    except ValueError:
        return text
