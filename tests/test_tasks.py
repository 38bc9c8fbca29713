"""Task kinds: the requests they build per model family, and how they read answers."""

from __future__ import annotations

import base64
import io
import json
import logging

import numpy as np
import pycocotools.mask as coco
import pytest
from PIL import Image, ImageDraw

from pipeline import masks
from pipeline.records import Parsed
from pipeline.tasks import TASKS, TaskSettings, generation, get_task
from pipeline.tasks.detect import DEFAULT_PROMPT as DETECT_PROMPT

SEED_DETECT_PROMPT = (
    "Detect the all of the prominent items in the image. The box_2d should be "
    "[ymin, xmin, ymax, xmax] normalized to 0-1000."
)


def settings(kind: str, model: str = "gemini-2.5-flash", **values: object) -> TaskSettings:
    return TaskSettings(kind=kind, model=model, **values)  # type: ignore[arg-type]


def parse(kind: str, text: str, finish: str | None = "STOP", size=(640, 480), **values) -> Parsed:
    return get_task(kind).parse(text, finish, size[0], size[1], settings(kind, **values))


def png_mask(width: int, height: int, prefix: bool = True) -> str:
    """An ellipse probability map, as Gemini 2.5 sends it."""
    image = Image.new("L", (width, height), 0)
    ImageDraw.Draw(image).ellipse((0, 0, width - 1, height - 1), fill=255)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    return ("data:image/png;base64," + data) if prefix else data


def decoded(obj: dict) -> np.ndarray:
    """The object's mask as pycocotools reads it."""
    rle = {"size": obj["mask"]["size"], "counts": obj["mask"]["counts"].encode()}
    return coco.decode(rle).astype(bool)


# ---------------------------------------------------------------- registry


def test_every_kind_is_registered_and_unknown_kinds_are_named() -> None:
    assert set(TASKS) == {"detect", "segment", "point", "caption", "classify", "custom"}
    assert all(get_task(kind).kind == kind for kind in TASKS)
    with pytest.raises(ValueError, match="known kinds: detect, segment, caption, classify, custom"):
        get_task("ocr")


# ---------------------------------------------------------------- requests


def test_detect_request_on_2_5_uses_the_seed_prompt_and_the_cookbook_settings() -> None:
    request = get_task("detect").request(settings("detect"))
    assert request.prompt == SEED_DETECT_PROMPT == DETECT_PROMPT
    assert request.images == ()
    assert request.model == "gemini-2.5-flash"
    assert request.response_mime_type == "application/json"
    assert request.thinking_budget == 0 and request.thinking_level is None
    assert request.temperature == 0.5
    assert request.media_resolution is None and request.max_output_tokens is None
    assert "Limit to 25 objects." in request.system_instruction
    assert "Never return masks or code fencing." in request.system_instruction
    schema = request.response_schema
    assert schema["type"] == "ARRAY" and schema["maxItems"] == 25
    assert schema["items"]["required"] == ["box_2d", "label"]
    assert "enum" not in schema["items"]["properties"]["label"]
    assert request.response_json_schema is None


def test_detect_request_on_gemini_3_keeps_temperature_default_and_thinks_minimally() -> None:
    flash = get_task("detect").request(settings("detect", "gemini-3-flash-preview"))
    assert flash.thinking_level == "minimal" and flash.thinking_budget is None
    assert flash.temperature is None  # the service default 1.0: lower values loop on 3
    assert flash.media_resolution is None
    pro = get_task("detect").request(settings("detect", "models/gemini-3.1-pro-preview"))
    assert pro.thinking_level == "low"  # Pro has no "minimal"
    high = get_task("detect").request(
        settings("detect", "gemini-3-flash-preview", media_resolution="medium")
    )
    assert high.media_resolution == "medium"


@pytest.mark.parametrize(
    ("model", "lowest"),
    [
        ("gemini-3-flash-preview", "minimal"),
        ("gemini-3.1-flash-lite", "minimal"),
        ("gemini-3.5-flash", "minimal"),  # the thinking page, 2026-09-04
        ("gemini-3.5-flash-lite", "minimal"),
        ("gemini-3.6-flash", "minimal"),
        ("gemini-3-pro-preview", "low"),
        ("gemini-3.1-pro-preview", "low"),
        ("gemini-3.7-flash", "low"),
        ("gemini-3.8-flash", "low"),  # a live 400 for "minimal": "Allowed values are: medium, ..."
        ("gemini-flash-latest", "low"),  # aliases point at 3.x models, not 2.x
    ],
)
def test_gemini_3_thinks_as_little_as_each_model_allows(model: str, lowest: str) -> None:
    request = get_task("detect").request(settings("detect", model))
    assert (request.thinking_budget, request.thinking_level) == (None, lowest)


def test_interactions_never_carries_a_thinking_budget() -> None:
    """The Interactions API has only thinking_level: a 2.5 model through it is sent none."""
    request = get_task("detect").request(settings("detect", flavor="interactions"))
    assert (request.thinking_budget, request.thinking_level) == (None, None)
    with pytest.raises(ValueError, match="no thinking budget"):
        get_task("detect").request(settings("detect", flavor="interactions", thinking_budget=0))


def test_gemini_2_5_pro_gets_its_least_thinking_budget_since_it_cannot_turn_thinking_off() -> None:
    assert get_task("detect").request(settings("detect", "gemini-2.5-pro")).thinking_budget == 128
    lite = get_task("detect").request(settings("detect", "gemini-2.5-flash-lite"))
    assert lite.thinking_budget == 0


@pytest.mark.parametrize("model", ["gemini-1.5-flash", "gemini-2.0-flash"])
def test_models_without_thinking_get_no_thinking_settings(model: str) -> None:
    request = get_task("detect").request(settings("detect", model))
    assert request.thinking_budget is None and request.thinking_level is None
    assert request.temperature == 0.5
    assert request.response_schema is not None and request.response_mime_type == "application/json"


def test_unknown_model_names_get_no_guessed_settings() -> None:
    request = get_task("detect").request(settings("detect", "my-tuned-model"))
    assert request.thinking_budget is None and request.thinking_level is None
    assert request.temperature is None
    assert request.response_schema is not None


def test_every_setting_can_be_overridden() -> None:
    request = get_task("detect").request(
        settings(
            "detect",
            prompt="Find the cars.",
            system_instruction="Be brief.",
            temperature=0.2,
            thinking_budget=512,
            max_objects=5,
            max_output_tokens=2048,
            media_resolution="low",
        )
    )
    assert request.prompt == "Find the cars."
    assert request.system_instruction == "Be brief.\nLimit to 5 objects."
    assert (request.temperature, request.thinking_budget, request.thinking_level) == (
        0.2,
        512,
        None,
    )
    assert request.max_output_tokens == 2048 and request.media_resolution == "low"
    assert request.response_schema["maxItems"] == 5
    level = get_task("detect").request(
        settings("detect", "gemini-3.8-flash", thinking_level="high")
    )
    assert (level.thinking_budget, level.thinking_level) == (None, "high")
    uncapped = get_task("detect").request(settings("detect", max_objects=0))
    assert "Limit to" not in uncapped.system_instruction
    assert "maxItems" not in uncapped.response_schema
    no_schema = get_task("detect").request(settings("detect", response_schema={}))
    assert no_schema.response_schema is None and no_schema.response_json_schema is None


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"thinking_budget": 0, "thinking_level": "low"}, "not both"),
        ({"thinking_level": "max"}, "thinking_level"),
        ({"thinking_level": "low"}, "'low' is refused by gemini-2.5-flash"),
        ({"thinking_budget": 100_000}, "range \\[1, 24576\\]"),
        ({"media_resolution": "huge"}, "media_resolution"),
        ({"max_objects": -1}, "max_objects"),
        ({"labels": ("cat", " CAT ")}, "same label"),
    ],
)
def test_bad_settings_are_refused_with_the_setting_named(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_task("detect").request(settings("detect", **values))


def test_requests_are_pure_functions_of_the_settings() -> None:
    for kind in TASKS:
        values = {"labels": ("cat", "dog")} if kind == "classify" else {}
        if kind == "custom":
            values = {"prompt": "Count the cats as JSON."}
        first = get_task(kind).request(settings(kind, **values))
        assert first == get_task(kind).request(settings(kind, **values))


def test_detect_with_a_label_list_asks_for_those_labels_only() -> None:
    request = get_task("detect").request(settings("detect", labels=("cat", "dog")))
    assert '"cat", "dog"' in request.prompt and "box_2d" in request.prompt
    assert 'Only report objects that are one of: "cat", "dog".' in request.system_instruction
    assert request.response_schema["items"]["properties"]["label"]["enum"] == ["cat", "dog"]


def test_segment_request_adapts_the_seed_prompt_and_sends_no_schema() -> None:
    request = get_task("segment").request(settings("segment"))
    assert request.prompt.startswith("Give the segmentation masks for all of the prominent items")
    assert 'the segmentation mask in key "mask"' in request.prompt
    assert request.response_mime_type == "application/json"
    assert request.response_schema is None and request.response_json_schema is None
    assert request.thinking_budget == 0 and request.system_instruction == "Limit to 25 objects."
    labelled = get_task("segment").request(settings("segment", labels=("wooden", "glass")))
    assert 'for the following items: "wooden", "glass"' in labelled.prompt
    three = get_task("segment").request(settings("segment", "gemini-3-flash-preview"))
    assert three.thinking_level == "minimal" and three.temperature is None
    own = get_task("segment").request(settings("segment", prompt="Segment the cups."))
    assert own.prompt == "Segment the cups."


def test_caption_request_is_plain_text_with_the_seed_prompt() -> None:
    request = get_task("caption").request(settings("caption"))
    assert request.prompt == "Caption this image."
    assert request.response_mime_type is None and request.response_schema is None
    assert request.system_instruction is None


def test_classify_request_needs_labels_and_constrains_the_answer_to_them() -> None:
    with pytest.raises(ValueError, match="label set"):
        get_task("classify").request(settings("classify"))
    single = get_task("classify").request(settings("classify", labels=("cat", "dog")))
    assert single.response_schema == {"type": "STRING", "enum": ["cat", "dog"]}
    assert single.response_mime_type == "application/json"
    assert '"cat", "dog"' in single.prompt and '"cat", "dog"' in single.system_instruction
    multi = get_task("classify").request(
        settings("classify", labels=("a", "b", "c"), max_objects=2)
    )
    assert multi.response_schema == {
        "type": "ARRAY",
        "items": {"type": "STRING", "enum": ["a", "b", "c"]},
        "maxItems": 2,
    }
    assert "JSON list" in multi.prompt and "at most 2" in multi.system_instruction


def test_custom_request_sends_the_users_schema_in_the_form_the_model_takes() -> None:
    with pytest.raises(ValueError, match="prompt"):
        get_task("custom").request(settings("custom"))
    schema = {"type": "object", "properties": {"count": {"type": "integer"}}}
    new = get_task("custom").request(settings("custom", prompt="Count.", response_schema=schema))
    assert new.prompt == "Count." and new.response_mime_type == "application/json"
    assert new.response_json_schema == schema and new.response_schema is None
    old = get_task("custom").request(
        settings("custom", "gemini-2.0-flash", prompt="Count.", response_schema=schema)
    )
    assert old.response_schema == schema and old.response_json_schema is None
    bare = get_task("custom").request(settings("custom", prompt="Count."))
    assert bare.response_schema is None and bare.response_json_schema is None


# ---------------------------------------------------------------- detect answers

BOXES = [
    {"box_2d": [100, 200, 500, 600], "label": "cat"},
    {"box_2d": [0, 0, 1000, 1000], "label": "sofa"},
]
EXPECTED = [
    {
        "label": "cat",
        "box_2d": [100, 200, 500, 600],
        "bbox": [128.0, 48.0, 384.0, 240.0],
        "mask": None,
    },
    {"label": "sofa", "box_2d": [0, 0, 1000, 1000], "bbox": [0.0, 0.0, 640.0, 480.0], "mask": None},
]


@pytest.mark.parametrize(
    "text",
    [
        json.dumps(BOXES),
        json.dumps(BOXES, indent=2),
        "```json\n" + json.dumps(BOXES, indent=2) + "\n```",
        "```\n" + json.dumps(BOXES) + "```",
        "Here are the boxes:\n```json\n" + json.dumps(BOXES, indent=2) + "\n```\nLet me know!",
        "Sure! " + json.dumps(BOXES) + " These are all [2] items.",
        json.dumps({"boxes": BOXES}),
    ],
    ids=[
        "bare",
        "indented",
        "fenced",
        "fence-no-tag",
        "prose-fenced",
        "prose-bare",
        "boxes-object",
    ],
)
def test_detect_reads_boxes_however_they_are_wrapped(text: str) -> None:
    parsed = parse("detect", text)
    assert (parsed.status, parsed.error) == ("ok", None)
    assert parsed.objects == EXPECTED


def test_detect_box_conversion_follows_the_seed_rule() -> None:
    parsed = parse("detect", '[{"box_2d": [250, 125, 750, 875], "label": "x"}]', size=(800, 600))
    assert parsed.objects[0]["bbox"] == [100.0, 150.0, 700.0, 450.0]  # x / 1000 * w, y / 1000 * h


def test_detect_sorts_swapped_corners_and_clips_out_of_range_boxes_keeping_box_2d() -> None:
    text = json.dumps(
        [
            {"box_2d": [500, 600, 100, 200], "label": "swapped"},
            {"box_2d": [-20, 900, 1100, 1050], "label": "outside"},
            {"box_2d": [100.6, 200, 500, 600.4], "label": "fractional"},
        ]
    )
    parsed = parse("detect", text)
    assert parsed.status == "ok"
    swapped, outside, fractional = parsed.objects
    assert swapped["box_2d"] == [500, 600, 100, 200]
    assert swapped["bbox"] == [128.0, 48.0, 384.0, 240.0]
    assert outside["box_2d"] == [-20, 900, 1100, 1050]
    assert outside["bbox"] == [576.0, 0.0, 640.0, 480.0]
    assert fractional["box_2d"] == [101, 200, 500, 600]
    assert fractional["bbox"][1] == pytest.approx(100.6 / 1000 * 480)


def test_detect_skips_objects_with_missing_or_invalid_keys_and_says_why() -> None:
    text = json.dumps(
        [
            {"box_2d": [1, 2, 300, 400], "label": "good"},
            {"label": "no box"},
            {"box_2d": [1, 2, 300, 400]},
            {"box_2d": [1, 2, 3], "label": "three numbers"},
            {"box_2d": ["1", 2, 3, 4], "label": "a string"},
            {"box_2d": [1, 2, 1, 400], "label": "flat"},
            {"box_2d": [1, 2, 300, 400], "label": "   "},
            "not an object",
            {"box_2d": [1, 2, 300, 400], "label": 7},
        ]
    )
    parsed = parse("detect", text)
    assert parsed.status == "ok"
    assert [o["label"] for o in parsed.objects] == ["good", "7"]
    for reason in (
        "item[1]: no box_2d",
        "item[2]: no label",
        "item[3]: box_2d is not a list of 4 numbers",
        "item[4]: '1' is not a number",
        "item[5]: box_2d is empty once clipped",
        "item[6]: label is empty",
        "item[7]: not an object",
    ):
        assert reason in parsed.error


def test_detect_answer_with_only_unusable_objects_is_an_error() -> None:
    parsed = parse("detect", '[{"label": "a"}, {"box_2d": [1, 2, 3, 4]}]')
    assert parsed.status == "error" and parsed.objects == []
    assert "no usable object" in parsed.error


def test_empty_list_is_a_valid_answer_with_no_objects() -> None:
    for text in ("[]", "```json\n[]\n```", '{"boxes": []}'):
        assert parse("detect", text) == Parsed(status="ok")


def test_truncated_answer_keeps_complete_objects_as_partial() -> None:
    full = json.dumps([*BOXES, {"box_2d": [5, 6, 700, 800], "label": "lamp"}], indent=2)
    cut = "```json\n" + full[: full.index('"lamp"') - 3]
    parsed = parse("detect", cut, "MAX_TOKENS")
    assert parsed.status == "partial"
    assert parsed.objects == EXPECTED
    assert "MAX_TOKENS" in parsed.error and "kept 2 complete object(s)" in parsed.error
    # A cut inside the first object: nothing complete, still partial.
    assert parse("detect", '[{"box_2d": [1, 2', "MAX_TOKENS") == Parsed(
        status="partial", error="answer cut off (MAX_TOKENS); kept 0 complete object(s)"
    )
    assert parse("detect", "", "MAX_TOKENS").status == "partial"


def test_a_cut_single_object_is_not_mistaken_for_its_inner_lists() -> None:
    cut = '{"box_2d": [100, 200, 500, 600], "label": "cat", "mask": "data:image/png;base64,iVB'
    parsed = parse("segment", cut, "MAX_TOKENS")
    assert parsed == Parsed(status="partial", error="answer cut off (MAX_TOKENS) before any object")
    assert parse("segment", cut, None).status == "error"


def test_broken_json_without_a_cut_is_salvaged_around_the_broken_element() -> None:
    text = (
        '[{"box_2d": [100, 200, 500, 600], "label": "cat"},\n'
        ' {"box_2d": [1, 2, 3, 4] "label": "missing comma"},\n'
        ' {"box_2d": [0, 0, 1000, 1000], "label": "sofa"}]'
    )
    parsed = parse("detect", text)
    assert parsed.status == "partial" and parsed.objects == EXPECTED
    assert "answer JSON broken" in parsed.error and "not valid JSON after item[0]" in parsed.error


def test_a_cut_wrapper_object_is_salvaged_from_its_list() -> None:
    text = '{"boxes": [' + json.dumps(BOXES[0]) + ", " + json.dumps(BOXES[1])[:-5]
    parsed = parse("detect", text, "MAX_TOKENS")
    assert parsed.status == "partial" and parsed.objects == EXPECTED[:1]


def test_answers_without_a_list_of_objects_are_errors() -> None:
    assert (
        parse("detect", "I cannot see anything.").error == "no JSON list of objects in the answer"
    )
    assert parse("detect", '{"answer": 42}').error == "answer JSON is not a list of objects"
    assert parse("detect", "").status == "error"
    assert parse("detect", "[NaN]").status == "error"


@pytest.mark.parametrize(
    "reason", ["SAFETY", "PROHIBITED_CONTENT", "RECITATION", "BLOCKLIST", "SPII", "IMAGE_SAFETY"]
)
def test_withheld_answers_are_blocked_for_every_kind(reason: str) -> None:
    for kind in TASKS:
        values = {"labels": ("cat",)} if kind == "classify" else {}
        parsed = parse(kind, json.dumps(BOXES), reason, **values)
        assert parsed.status == "blocked" and reason in parsed.error and parsed.objects == []


def test_closed_label_list_canonicalises_matches_and_drops_the_rest() -> None:
    text = json.dumps(
        [
            {"box_2d": [1, 2, 300, 400], "label": "  Red  Car "},
            {"box_2d": [1, 2, 300, 400], "label": "tree"},
            {"box_2d": [1, 2, 300, 400], "label": "PERSON"},
        ]
    )
    parsed = parse("detect", text, labels=("red car", "Person"))
    assert parsed.status == "ok"
    assert [o["label"] for o in parsed.objects] == ["red car", "Person"]
    assert "dropped 1 object(s) with labels outside the list: 'tree'" in parsed.error
    only_others = parse(
        "detect", '[{"box_2d": [1, 2, 300, 400], "label": "tree"}]', labels=("car",)
    )
    assert only_others.status == "ok" and only_others.objects == []


def test_points_become_zero_size_boxes() -> None:
    parsed = parse("detect", '[{"point": [500, 250], "label": "eye"}]')
    assert parsed.objects == [
        {
            "label": "eye",
            "box_2d": [500, 250, 500, 250],
            "bbox": [160.0, 240.0, 160.0, 240.0],
            "mask": None,
        }
    ]


# ---------------------------------------------------------------- segment answers


def expected_mask(prob_png: str, box_2d: list[int], width: int, height: int) -> np.ndarray:
    prob = masks.decode_png_mask(prob_png)
    inside, (x0, y0, x1, y1) = masks.map_box_mask(prob, box_2d, width, height)
    full = np.zeros((height, width), dtype=bool)
    full[y0:y1, x0:x1] = inside
    return full


def test_segment_reads_gemini_2_5_png_masks_into_full_image_rle() -> None:
    items = [
        {"box_2d": [100, 100, 500, 400], "mask": png_mask(60, 50), "label": "wooden bowl"},
        {"box_2d": [550, 500, 950, 900], "mask": png_mask(32, 32, prefix=False), "label": "glass"},
    ]
    text = "```json\n" + json.dumps(items, indent=2) + "\n```"
    parsed = parse("segment", text, size=(384, 256))
    assert (parsed.status, parsed.error) == ("ok", None)
    for obj, item in zip(parsed.objects, items, strict=True):
        mask = decoded(obj)
        assert obj["mask"]["size"] == [256, 384]
        assert np.array_equal(mask, expected_mask(item["mask"], item["box_2d"], 384, 256))
        x0, y0, x1, y1 = masks.box_to_pixels(item["box_2d"], 384, 256)
        ys, xs = np.nonzero(mask)
        assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
        assert mask.sum() > 0.6 * (x1 - x0) * (y1 - y0)  # an ellipse fills ~pi/4 of its box


def test_segment_reads_gemini_3_polygons_normalised_over_the_image() -> None:
    answer = {
        "boxes": [
            {
                "box_2d": [250, 250, 750, 750],
                "label": "square",
                "mask": [[250, 250], [750, 250], [750, 750], [250, 750]],
            },
            {
                "box_2d": [0, 0, 500, 1000],
                "label": "two parts",
                "mask": [[[0, 0], [100, 0], [100, 100]], [[900, 0], [1000, 0], [1000, 100]]],
            },
        ]
    }
    parsed = parse("segment", json.dumps(answer), size=(100, 80), model="gemini-3-flash-preview")
    assert (parsed.status, parsed.error) == ("ok", None)
    square, parts = (decoded(obj) for obj in parsed.objects)
    assert np.array_equal(square, masks.polygon_to_mask(answer["boxes"][0]["mask"], 100, 80))
    assert square.sum() == 50 * 40  # pixels 25-74 x 20-59: their centres lie in the square
    assert parts[:9, :11].any() and parts[:9, 89:].any() and not parts[:, 20:80].any()


def test_segment_mask_of_another_size_is_resized_to_the_box() -> None:
    small = png_mask(4, 4)
    big = png_mask(400, 300)
    for prob in (small, big):
        parsed = parse(
            "segment",
            json.dumps([{"box_2d": [0, 0, 500, 500], "mask": prob, "label": "a"}]),
            size=(200, 200),
        )
        mask = decoded(parsed.objects[0])
        assert mask[:100, :100].any() and not mask[100:].any() and not mask[:, 100:].any()


BAD_MASKS = [
    ("data:image/png;base64,###", "not valid base64"),
    (base64.b64encode(b"\xff\xd8\xff\xe0 a jpeg").decode(), "not a PNG"),
    (
        "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n\x00\x00broken").decode(),
        "cannot be decoded",
    ),
    ("<seg_12><seg_400><seg_7>", "<seg_N> tokens"),
    ("", "no mask"),
    (None, "no mask"),
    ([1, 0, 1, 1], "flat list"),
    ([[1, 0], [1]], "rows differ"),
    ([["a", "b"], ["c", "d"]], "non-numbers"),
    ({"size": [2, 2], "counts": "abc"}, "JSON dict"),
    ([[0, 0], [1, 1]], None),  # a 0/1 array is a usable box map (see below)
]


@pytest.mark.parametrize(("mask", "reason"), BAD_MASKS)
def test_unusable_masks_keep_the_object_without_mask_and_say_why(
    mask: object, reason: str | None
) -> None:
    item = {"box_2d": [100, 100, 500, 500], "label": "thing"}
    if mask is not None:
        item["mask"] = mask
    parsed = parse(
        "segment",
        json.dumps([item, {"box_2d": [0, 0, 10, 10], "label": "other", "mask": png_mask(4, 4)}]),
    )
    assert parsed.status == "ok" and len(parsed.objects) == 2
    assert parsed.objects[0]["bbox"] == [64.0, 48.0, 320.0, 240.0]
    assert parsed.objects[1]["mask"] is not None
    if reason is None:
        assert parsed.objects[0]["mask"] is not None and parsed.error is None
    else:
        assert parsed.objects[0]["mask"] is None
        assert "item[0] ('thing')" in parsed.error and reason in parsed.error
        assert "kept without mask" in parsed.error


def test_boolean_and_binary_arrays_are_resized_to_the_box() -> None:
    grid = [[False, True], [True, True]]
    for form in (
        grid,
        [[int(v) for v in row] for row in grid],
        [[255 * v for v in row] for row in grid],
    ):
        text = json.dumps([{"box_2d": [0, 0, 500, 500], "label": "a", "mask": form}])
        mask = decoded(parse("segment", text, size=(100, 100)).objects[0])
        assert mask.shape == (100, 100)
        assert mask[40:50, 40:50].all() and not mask[0:5, 0:5].any()  # top-left cell is off
        assert not mask[50:].any() and not mask[:, 50:].any()


def test_segment_truncated_mid_mask_keeps_the_complete_objects() -> None:
    items = [
        {"box_2d": [100, 100, 500, 400], "mask": png_mask(20, 20), "label": f"o{i}"}
        for i in range(3)
    ]
    full = json.dumps(items)
    cut = full[: full.rindex("base64,") + 30]
    parsed = parse("segment", cut, "MAX_TOKENS")
    assert parsed.status == "partial" and [o["label"] for o in parsed.objects] == ["o0", "o1"]
    assert all(o["mask"] is not None for o in parsed.objects)


def test_mask_threshold_setting_is_used() -> None:
    grid = [[100, 200]]
    text = json.dumps([{"box_2d": [0, 0, 1000, 1000], "label": "a", "mask": grid}])
    default = decoded(parse("segment", text, size=(2, 1)).objects[0])
    low = decoded(parse("segment", text, size=(2, 1), mask_threshold=99).objects[0])
    assert default.tolist() == [[False, True]] and low.tolist() == [[True, True]]


# ---------------------------------------------------------------- caption, classify, custom


def test_caption_answers() -> None:
    assert parse("caption", "  A cat on a sofa.\n") == Parsed(status="ok", text="A cat on a sofa.")
    assert parse("caption", " ").status == "error"
    cut = parse("caption", "A cat on a", "MAX_TOKENS")
    assert (cut.status, cut.text) == ("partial", "A cat on a")


@pytest.mark.parametrize(
    "text", ['"cat"', "cat", " Cat.\n", '```json\n"CAT"\n```', '{"label": "cat"}', '["cat"]']
)
def test_classify_single_label_matches_the_set_loosely_and_stores_its_spelling(text: str) -> None:
    parsed = parse("classify", text, labels=("Cat", "Dog"))
    assert parsed == Parsed(status="ok", labels=["Cat"], text="Cat")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('"bird"', "'bird' is not one of the labels"),
        ('["cat", "dog"]', "expected exactly one label, got 2"),
        ("[]", "expected exactly one label, got 0"),
        ("The image shows a cat.", "is not one of the labels"),
        ("", "empty answer"),
        ("42", "not a label"),
        ("[1]", "1 is not a label"),
    ],
)
def test_classify_answers_outside_the_set_are_errors(text: str, reason: str) -> None:
    parsed = parse("classify", text, labels=("cat", "dog"))
    assert parsed.status == "error" and reason in parsed.error and parsed.labels is None


def test_classify_multi_label_and_missing_labels() -> None:
    multi = parse("classify", '["dog", "CAT", "dog"]', labels=("cat", "dog", "fish"), max_objects=3)
    assert multi == Parsed(status="ok", labels=["dog", "cat"], text="dog, cat")
    assert parse("classify", "[]", labels=("cat",), max_objects=0) == Parsed(
        status="ok", labels=[], text=""
    )
    bare = parse("classify", "cat, fish", labels=("cat", "dog", "fish"), max_objects=0)
    assert bare.labels == ["cat", "fish"]
    cut = parse("classify", '["cat", "do', "MAX_TOKENS", labels=("cat", "dog"), max_objects=2)
    assert cut.status == "error" and "MAX_TOKENS" in cut.error
    assert "label set" in parse("classify", '"cat"').error


def test_custom_keeps_the_answers_json_re_serialised() -> None:
    text = 'Here you go:\n```json\n{"count": 3, "names": ["a", "ü"]}\n```'
    assert parse("custom", text, prompt="Count.") == Parsed(
        status="ok", json='{"count":3,"names":["a","ü"]}'
    )
    assert parse("custom", "[1, 2]", prompt="x").json == "[1,2]"
    assert parse("custom", "7", prompt="x").json == "7"
    for bad in ("no json here", '{"count": NaN}', '{"a": {"b": 1}, "c": '):
        assert parse("custom", bad, prompt="x").status == "error"
    assert "MAX_TOKENS" in parse("custom", '{"a": [1, ', "MAX_TOKENS", prompt="x").error
    lone = parse("custom", '["\\ud800"]', prompt="x")
    assert lone.json == '["\\ud800"]'
    lone.json.encode("utf-8")


@pytest.mark.parametrize(
    ("kind", "field", "length"), [("detect", "box_2d", 4), ("point", "point", 2)]
)
def test_object_schemas_cap_the_list_and_close_the_labels(
    kind: str, field: str, length: int
) -> None:
    """The object cap asked in words is also the schema's maxItems, for points as for boxes."""
    request = get_task(kind).request(settings(kind, labels=("cat", "dog"), max_objects=7))
    schema = request.response_schema
    assert schema["maxItems"] == 7
    item = schema["items"]["properties"]
    assert item["label"]["enum"] == ["cat", "dog"]
    assert (item[field]["minItems"], item[field]["maxItems"]) == (length, length)
    assert "Limit to 7 objects." in request.system_instruction
    assert request.prompt.count('"cat"') == 1


def test_segment_sends_the_boxes_schema_only_to_models_that_need_it() -> None:
    """3.6+ give polygon masks for the {"boxes": [...]} schema (the image-understanding page,
    2026-09); 2.5 answers PNG masks when asked in words, and a schema would force a form."""
    polygon = get_task("segment").request(settings("segment", "gemini-3.8-flash"))
    boxes = polygon.response_schema["properties"]["boxes"]
    assert boxes["items"]["required"] == ["box_2d", "label", "mask"]
    assert boxes["items"]["properties"]["mask"]["items"]["maxItems"] == 2  # [x, y] points
    assert (
        get_task("segment").request(settings("segment", "gemini-2.5-flash")).response_schema is None
    )


def test_segment_refuses_models_whose_guide_says_they_do_not_segment() -> None:
    """The 3.5 migration checklist: no segmentation on 3.x (3.5 Flash has no mask source)."""
    with pytest.raises(ValueError, match=r"gemini-3\.5-flash does not return segmentation masks"):
        get_task("segment").request(settings("segment", "gemini-3.5-flash"))


def test_interactions_gets_no_default_temperature_only_the_users() -> None:
    """google-genai 3.6 marks Interactions' generation_config.temperature deprecated: the
    table's 0.5 for 2.5 goes through generateContent only; a user's own is still sent."""
    default = get_task("detect").request(settings("detect", flavor="interactions"))
    assert default.temperature is None
    own = get_task("detect").request(settings("detect", flavor="interactions", temperature=0.3))
    assert own.temperature == 0.3
    assert get_task("detect").request(settings("detect")).temperature == 0.5


def test_a_thinking_budget_on_a_level_model_is_sent_with_a_warning(caplog, monkeypatch) -> None:
    """The thinking page (2026-09-04): a budget on 3.x is "no longer recommended", not refused.
    The warning is said once a process: another test of this worker may have said it already."""
    monkeypatch.setattr(generation, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="pipeline.tasks.generation"):
        request = get_task("detect").request(
            settings("detect", "gemini-3.8-flash", thinking_budget=512)
        )
    assert (request.thinking_budget, request.thinking_level) == (512, None)
    assert any("no longer recommended" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="not both"):
        get_task("detect").request(
            settings("detect", "gemini-3.8-flash", thinking_budget=512, thinking_level="low")
        )
