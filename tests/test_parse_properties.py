"""Properties of answer parsing that must hold for any text a model could send."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.records import Parsed
from pipeline.tasks import TASKS, TaskSettings, get_task

WIDTH, HEIGHT = 640, 480
STATUSES = {"ok", "error", "blocked", "partial"}
FINISH_REASONS = st.sampled_from([None, "STOP", "MAX_TOKENS", "SAFETY", "OTHER", "stop", ""])

# Pieces of the answers models really send, so random joins reach deep into the parser.
TOKENS = [
    "[", "]", "{", "}", ",", ":", " ", "\n", '"box_2d"', '"label"', '"mask"', '"point"',
    '"boxes"', '"a"', '"Cat"', "0", "1", "500", "1000", "-5", "1e400", "12345678901234567890",
    "NaN", "true", "null", '"data:image/png;base64,iVBORw0KGgo="', '"<seg_3>"', "[[0,1],[1,0]]",
    "[[10,10],[900,10],[500,900]]", "[1, 2, 3, 4]", "```json\n", "```", "Here you go: ",
    '"\\ud800"', "[100, 200, 500, 600]",
]  # fmt: skip


def task_settings(kind: str) -> TaskSettings:
    labels = ("cat", "a", "dog") if kind == "classify" else None
    prompt = "Answer in JSON." if kind == "custom" else None
    return TaskSettings(kind=kind, model="gemini-2.5-flash", labels=labels, prompt=prompt)


def run(kind: str, text: str, finish: str | None) -> Parsed:
    return get_task(kind).parse(text, finish, WIDTH, HEIGHT, task_settings(kind))


def check_sane(parsed: Parsed) -> None:
    assert isinstance(parsed, Parsed)
    assert parsed.status in STATUSES
    assert not (parsed.error or "").startswith("internal parse error"), parsed.error
    for obj in parsed.objects:
        assert set(obj) == {"label", "box_2d", "bbox", "mask"}
        assert isinstance(obj["label"], str) and obj["label"]
        obj["label"].encode("utf-8")  # writable to Parquet
        assert len(obj["box_2d"]) == 4 and all(isinstance(v, int) for v in obj["box_2d"])
        assert all(abs(v) < 2**31 for v in obj["box_2d"])
        x0, y0, x1, y1 = obj["bbox"]
        assert 0 <= x0 <= x1 <= WIDTH and 0 <= y0 <= y1 <= HEIGHT
        if obj["mask"] is not None:
            assert obj["mask"]["size"] == [HEIGHT, WIDTH]


KEYS = st.sampled_from(["box_2d", "label", "mask", "point", "boxes", "labels"]) | st.text(
    max_size=4
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=20,
)


@settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    text=st.one_of(
        st.text(),
        st.lists(st.sampled_from(TOKENS), max_size=40).map("".join),
        json_values.map(lambda v: json.dumps(v, allow_nan=True)),
    ),
    finish=FINISH_REASONS,
)
def test_parse_never_raises_on_any_text(text: str, finish: str | None) -> None:
    for kind in TASKS:
        check_sane(run(kind, text, finish))
    for cut in (len(text) // 3, len(text) // 2):  # and on cut-off versions of the same
        check_sane(run("segment", text[:cut], "MAX_TOKENS"))


labels = st.text(min_size=1, max_size=12).filter(lambda s: s.strip())


@st.composite
def boxes(draw: st.DrawFn) -> dict:
    y0, y1 = sorted(draw(st.lists(st.integers(0, 1000), min_size=2, max_size=2, unique=True)))
    x0, x1 = sorted(draw(st.lists(st.integers(0, 1000), min_size=2, max_size=2, unique=True)))
    return {"box_2d": [y0, x0, y1, x1], "label": draw(labels)}


def expected(items: list[dict]) -> list[dict]:
    out = []
    for item in items:
        y0, x0, y1, x1 = item["box_2d"]
        bbox = [x0 / 1000 * WIDTH, y0 / 1000 * HEIGHT, x1 / 1000 * WIDTH, y1 / 1000 * HEIGHT]
        out.append(
            {"label": item["label"].strip(), "box_2d": item["box_2d"], "bbox": bbox, "mask": None}
        )
    return out


prose = st.text(
    alphabet=st.characters(blacklist_characters="[]{}`", blacklist_categories=("Cs",)), max_size=30
)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    items=st.lists(boxes(), max_size=6),
    indent=st.sampled_from([None, 2]),
    wrapper=st.sampled_from(["bare", "fence", "fence-no-tag", "prose", "boxes"]),
    before=prose,
    after=prose,
)
def test_valid_boxes_survive_fences_and_prose_unchanged(
    items: list[dict], indent: int | None, wrapper: str, before: str, after: str
) -> None:
    body = json.dumps({"boxes": items} if wrapper == "boxes" else items, indent=indent)
    text = {
        "bare": body,
        "boxes": body,
        "fence": f"{before}\n```json\n{body}\n```\n{after}",
        "fence-no-tag": f"```\n{body}```{after}",
        "prose": f"{before} {body} {after}",
    }[wrapper]
    parsed = run("detect", text, "STOP")
    assert (parsed.status, parsed.error) == ("ok", None)
    assert parsed.objects == expected(items)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    items=st.lists(boxes(), min_size=1, max_size=4),
    indent=st.sampled_from([None, 1]),
    shape=st.sampled_from(["list", "boxes", "fence"]),
)
def test_a_cut_answer_yields_a_prefix_of_its_objects(
    items: list[dict], indent: int | None, shape: str
) -> None:
    body = json.dumps({"boxes": items} if shape == "boxes" else items, indent=indent)
    text = f"```json\n{body}\n```" if shape == "fence" else body
    want = expected(items)
    for cut in range(len(text) + 1):
        parsed = run("detect", text[:cut], "MAX_TOKENS")
        assert parsed.status in ("partial", "ok"), (text[:cut], parsed)
        assert parsed.objects == want[: len(parsed.objects)], text[:cut]
        if parsed.status == "ok":
            assert parsed.objects == want
    assert run("detect", text, "STOP").objects == want


def covers_pixels(item: dict) -> bool:
    """A box at least two pixels each way: smaller ones rightly get no mask (no pixel area)."""
    y0, x0, y1, x1 = item["box_2d"]
    return (x1 - x0) / 1000 * WIDTH >= 2 and (y1 - y0) / 1000 * HEIGHT >= 2


@settings(max_examples=30, deadline=None, derandomize=True)
@given(items=st.lists(boxes().filter(covers_pixels), min_size=1, max_size=3), data=st.data())
def test_a_cut_segmentation_answer_keeps_whole_objects_with_their_masks(
    items: list[dict], data: st.DataObject
) -> None:
    for item in items:  # Gemini 3 polygons: the item's own box as a polygon
        y0, x0, y1, x1 = item["box_2d"]
        item["mask"] = [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
    text = json.dumps({"boxes": items})
    want = [obj["label"] for obj in expected(items)]
    cuts = data.draw(st.lists(st.integers(0, len(text)), min_size=1, max_size=25))
    for cut in [*cuts, len(text)]:
        parsed = run("segment", text[:cut], "MAX_TOKENS")
        assert parsed.status in ("partial", "ok")
        got = [obj["label"] for obj in parsed.objects]
        assert got == want[: len(got)]
        assert all(obj["mask"] is not None for obj in parsed.objects), parsed.error
