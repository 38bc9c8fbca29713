"""The local Gemini-compatible server over loopback, with raw aiohttp requests.

Images are drawn here with Pillow at known coordinates, so every answer has an exact truth:
boxes, masks (PNG probability maps and polygons), labels, captions and token counts.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import re
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline.gemini.tokens import text_tokens
from pipeline.localserver import LocalServer, ServerOptions
from pipeline.localserver.faults import FAULT_KINDS, Faults
from pipeline.localserver.vision import analyse, open_image

REPO = Path(__file__).resolve().parent.parent
KEY = "test-key"
DETECT = (
    "Detect the all of the prominent items in the image. "
    "The box_2d should be [ymin, xmin, ymax, xmax] normalized to 0-1000."
)
SEGMENT = (
    "Give the segmentation masks for the items. Output a JSON list of segmentation masks where "
    'each entry contains the 2D bounding box in the key "box_2d", the segmentation mask in key '
    '"mask", and the text label in the key "label". Use descriptive labels.'
)
# (label, kind, (x0, y0, x1, y1) exclusive, colour); distinct areas fix the largest-first order
SHAPES = (
    ("red circle", "ellipse", (40, 40, 200, 180), (220, 40, 40)),
    ("green triangle", "triangle", (60, 220, 300, 350), (40, 170, 70)),
    ("blue rectangle", "rectangle", (230, 50, 350, 140), (40, 80, 220)),
)
START = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC: a minute boundary and midnight Pacific


class Clock:
    """A clock tests move by hand: quota windows and file lifecycles without sleeping."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def draw_scene(
    fmt: str = "PNG", size: tuple[int, int] = (384, 384), shapes: tuple = SHAPES
) -> tuple[bytes, dict[str, tuple[tuple[int, int, int, int], np.ndarray]]]:
    """Image bytes and, per label, the true box and full-image mask of each shape."""
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    truth = {}
    for label, kind, box, colour in shapes:
        mask = Image.new("L", size, 0)
        for target, fill in ((draw, colour), (ImageDraw.Draw(mask), 255)):
            x0, y0, x1, y1 = box
            if kind == "ellipse":
                target.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
            elif kind == "rectangle":
                target.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
            else:
                target.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
        truth[label] = (box, np.asarray(mask) > 127)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buffer.getvalue(), truth


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def inline_request(
    data: bytes,
    prompt: str,
    mime: str = "image/png",
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "contents": [
            {
                "role": "user",
                "parts": [
                    {"inline_data": {"mime_type": mime, "data": b64(data)}},
                    {"text": prompt},
                ],
            }
        ]
    }
    if config is not None:
        body["generationConfig"] = config
    return body


async def generate(
    http: aiohttp.ClientSession,
    server: LocalServer,
    body: dict[str, Any],
    model: str = "gemini-2.5-flash",
    version: str = "v1beta",
    key: str | None = KEY,
) -> tuple[int, dict[str, Any]]:
    headers = {"x-goog-api-key": key} if key else {}
    url = f"{server.base_url}/{version}/models/{model}:generateContent"
    async with http.post(url, json=body, headers=headers) as response:
        return response.status, await response.json()


def answer_text(body: dict[str, Any]) -> str:
    parts = body["candidates"][0]["content"]["parts"]
    return "".join(p["text"] for p in parts if not p.get("thought"))


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def pixel_box(box_2d: list[int], width: int, height: int) -> tuple[int, int, int, int]:
    """The seed's rule: value / 1000 x width (x) or height (y); returned as x0, y0, x1, y1."""
    y0, x0, y1, x1 = box_2d
    return (
        round(x0 / 1000 * width),
        round(y0 / 1000 * height),
        round(x1 / 1000 * width),
        round(y1 / 1000 * height),
    )


def decode_png_mask(item: dict[str, Any], width: int, height: int) -> np.ndarray:
    """A 2.5-style mask placed in the full image: resized to its box, thresholded at 127."""
    x0, y0, x1, y1 = pixel_box(item["box_2d"], width, height)
    prefix = "data:image/png;base64,"
    assert item["mask"].startswith(prefix)
    png = Image.open(io.BytesIO(base64.b64decode(item["mask"][len(prefix) :])))
    assert png.format == "PNG"
    plane = np.asarray(png.convert("L").resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR))
    full = np.zeros((height, width), dtype=bool)
    full[y0:y1, x0:x1] = plane > 127
    return full


def polygon_mask(points: list[list[int]], width: int, height: int) -> np.ndarray:
    canvas = Image.new("L", (width, height), 0)
    xy = [(x / 1000 * width, y / 1000 * height) for x, y in points]
    ImageDraw.Draw(canvas).polygon(xy, fill=255)
    return np.asarray(canvas) > 127


@pytest.fixture
async def server():
    async with LocalServer(ServerOptions()) as running:
        yield running


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


# answers from pixels


@pytest.mark.parametrize("fmt,size", [("PNG", (384, 384)), ("JPEG", (512, 384))])
async def test_detection_boxes_match_drawn_shapes(server, http, fmt, size):
    data, truth = draw_scene(fmt, size)
    mime = "image/png" if fmt == "PNG" else "image/jpeg"
    config = {"responseMimeType": "application/json", "thinkingConfig": {"thinkingBudget": 0}}
    status, body = await generate(http, server, inline_request(data, DETECT, mime, config))
    assert status == 200
    assert body["candidates"][0]["finishReason"] == "STOP"
    items = json.loads(answer_text(body))
    assert [item["label"] for item in items] == [label for label, *_ in SHAPES]
    for item in items:
        assert all(isinstance(v, int) and 0 <= v <= 1000 for v in item["box_2d"])
        assert box_iou(pixel_box(item["box_2d"], *size), truth[item["label"]][0]) >= 0.95


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
async def test_png_masks_decode_to_the_drawn_shapes(server, http, fmt):
    data, truth = draw_scene(fmt)
    mime = "image/png" if fmt == "PNG" else "image/jpeg"
    config = {"responseMimeType": "application/json"}
    status, body = await generate(http, server, inline_request(data, SEGMENT, mime, config))
    assert status == 200
    items = json.loads(answer_text(body))
    assert sorted(item["label"] for item in items) == sorted(truth)
    for item in items:
        assert list(item) == ["box_2d", "mask", "label"]  # the order the guide shows
        box, true_mask = truth[item["label"]]
        assert box_iou(pixel_box(item["box_2d"], 384, 384), box) >= 0.95
        assert mask_iou(decode_png_mask(item, 384, 384), true_mask) >= 0.9


async def test_newer_models_answer_polygon_masks(server, http):
    data, truth = draw_scene("JPEG", (512, 384))
    config = {"responseMimeType": "application/json"}
    status, body = await generate(
        http, server, inline_request(data, SEGMENT, "image/jpeg", config), model="gemini-3.8-flash"
    )
    assert status == 200
    boxes = json.loads(answer_text(body))["boxes"]
    assert sorted(item["label"] for item in boxes) == sorted(truth)
    for item in boxes:
        box, true_mask = truth[item["label"]]
        assert box_iou(pixel_box(item["box_2d"], 512, 384), box) >= 0.95
        assert all(0 <= x <= 1000 and 0 <= y <= 1000 for x, y in item["mask"])
        assert mask_iou(polygon_mask(item["mask"], 512, 384), true_mask) >= 0.9


async def test_without_json_mode_json_comes_in_a_markdown_fence(server, http):
    data, _ = draw_scene()
    status, body = await generate(http, server, inline_request(data, DETECT))
    assert status == 200
    text = answer_text(body)
    assert text.startswith("```json\n") and text.endswith("\n```")
    assert len(json.loads(text[len("```json\n") : -len("\n```")])) == 3


async def test_caption_names_the_shapes_and_background(server, http):
    data, _ = draw_scene()
    status, body = await generate(http, server, inline_request(data, "Describe this image."))
    assert status == 200
    assert answer_text(body) == (
        "An image of 3 shapes on a white background: "
        "a red circle, a green triangle and a blue rectangle."
    )


async def test_classification_from_schema_enum_and_from_prompt(server, http):
    single = (("blue rectangle", "rectangle", (100, 120, 300, 260), (40, 80, 220)),)
    data, _ = draw_scene(shapes=single)
    schema = {"type": "STRING", "enum": ["circle", "rectangle", "triangle"]}
    config = {"responseMimeType": "application/json", "responseSchema": schema}
    status, body = await generate(
        http, server, inline_request(data, "What shape is this?", config=config)
    )
    assert status == 200 and json.loads(answer_text(body)) == "rectangle"
    config = {"responseMimeType": "text/x.enum", "responseSchema": schema}
    _, body = await generate(http, server, inline_request(data, "Classify.", config=config))
    assert answer_text(body) == "rectangle"
    prompt = "Classify the image. Answer with exactly one of these labels: red things, blue things."
    _, body = await generate(http, server, inline_request(data, prompt))
    assert answer_text(body) == "blue things"


async def test_closed_label_sets_for_detection_and_multi_label_classification(server, http):
    data, truth = draw_scene()
    config = {
        "responseMimeType": "application/json",
        "responseSchema": {
            "type": "ARRAY",
            "items": {
                "type": "OBJECT",
                "properties": {
                    "box_2d": {"type": "ARRAY", "items": {"type": "INTEGER"}},
                    "label": {"type": "STRING", "enum": ["circle", "triangle"]},
                },
            },
        },
    }
    status, body = await generate(http, server, inline_request(data, DETECT, config=config))
    assert status == 200
    items = json.loads(answer_text(body))  # the rectangle fits no label: left out
    assert [item["label"] for item in items] == ["circle", "triangle"]
    assert box_iou(pixel_box(items[1]["box_2d"], 384, 384), truth["green triangle"][0]) >= 0.95
    body = inline_request(data, "Detect all of the following items in the image. box_2d")
    body["systemInstruction"] = {
        "parts": [{"text": 'Only report objects that are one of: "red things", "green things".'}]
    }
    _, answer = await generate(http, server, body)
    assert answer_text(answer).count("things") == 2 and "blue" not in answer_text(answer)
    labels_schema = {
        "type": "ARRAY",
        "items": {"type": "STRING", "enum": ["square", "oval", "star"]},
    }
    config = {"responseMimeType": "application/json", "responseSchema": labels_schema}
    prompt = "Classify this image. Answer with a JSON list of every label that applies."
    _, answer = await generate(http, server, inline_request(data, prompt, config=config))
    assert json.loads(answer_text(answer)) == ["square", "oval"]


async def test_custom_schema_is_filled_from_what_is_seen(server, http):
    data, _ = draw_scene()
    schema = {
        "type": "object",
        "properties": {
            "count": {"type": "integer"},
            "colours": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["count", "colours"],
    }
    config = {"responseMimeType": "application/json", "responseJsonSchema": schema}
    prompt = "Count the shapes in the image and name their colours. Answer as JSON."
    status, body = await generate(http, server, inline_request(data, prompt, config=config))
    assert status == 200
    assert json.loads(answer_text(body)) == {"count": 3, "colours": ["red", "green", "blue"]}
    # JSON mode without a schema: the shape sketched in the prompt, else a summary object
    config = {"responseMimeType": "application/json"}
    prompt = 'Count the shapes. Answer as JSON {"count": n, "shapes": [...]}.'
    _, body = await generate(http, server, inline_request(data, prompt, config=config))
    assert json.loads(answer_text(body)) == {
        "count": 3,
        "shapes": ["circle", "triangle", "rectangle"],
    }
    _, body = await generate(http, server, inline_request(data, "Describe it.", config=config))
    assert json.loads(answer_text(body))["objects"] == [label for label, *_ in SHAPES]


async def test_object_limit_and_colour_filter_follow_the_prompt(server, http):
    data, _ = draw_scene()
    config = {"responseMimeType": "application/json"}
    _, body = await generate(
        http, server, inline_request(data, DETECT + " Limit to 2 objects.", config=config)
    )
    assert [i["label"] for i in json.loads(answer_text(body))] == ["red circle", "green triangle"]
    _, body = await generate(
        http, server, inline_request(data, "Detect all green objects. box_2d", config=config)
    )
    assert [i["label"] for i in json.loads(answer_text(body))] == ["green triangle"]


async def test_points_are_centres_y_first(server, http):
    data, truth = draw_scene()
    prompt = (
        'Point to the items. Answer [{"point": [y, x], "label": <label>}] normalized to 0-1000.'
    )
    _, body = await generate(
        http, server, inline_request(data, prompt, config={"responseMimeType": "application/json"})
    )
    for item in json.loads(answer_text(body)):
        ys, xs = np.nonzero(truth[item["label"]][1])
        y, x = item["point"]
        assert abs(y - ys.mean() / 384 * 1000) <= 5 and abs(x - xs.mean() / 384 * 1000) <= 5


async def test_webp_and_heic_are_read(server, http):
    import pillow_heif

    pillow_heif.register_heif_opener()
    image = Image.open(io.BytesIO(draw_scene()[0]))
    for fmt, mime in (("WEBP", "image/webp"), ("HEIF", "image/heic")):
        buffer = io.BytesIO()
        image.save(buffer, fmt, quality=90)
        config = {"responseMimeType": "application/json"}
        status, body = await generate(
            http, server, inline_request(buffer.getvalue(), DETECT, mime, config)
        )
        assert status == 200
        assert len(json.loads(answer_text(body))) == 3


def test_vision_is_vectorised_fast():
    data, _ = draw_scene()
    timings = []
    for _ in range(20):
        started = time.perf_counter()
        analysis = analyse(open_image(data))
        for region in analysis.regions:
            analysis.mask_png_data_url(region)
        timings.append(time.perf_counter() - started)
    # about 2 ms (decode included) on one core; a per-pixel Python loop would take ~100x longer
    assert statistics.median(timings) < 0.03


# wire format: spellings, versions, usage


async def test_camel_and_snake_case_and_urlsafe_base64_are_all_accepted(server, http):
    data, _ = draw_scene()
    camel = {
        "contents": [
            {
                "parts": [
                    {"inlineData": {"mimeType": "image/png", "data": b64(data)}},
                    {"text": DETECT},
                ]
            }
        ],
        "generationConfig": {"responseMimeType": "application/json"},
        "systemInstruction": {"parts": [{"text": "Be exact."}]},
    }
    snake = {
        "contents": [
            {
                "parts": [
                    {
                        "inline_data": {
                            "mime_type": "image/png",
                            "data": base64.urlsafe_b64encode(data).decode().rstrip("="),
                        }
                    },
                    {"text": DETECT},
                ]
            }
        ],
        "generation_config": {"response_mime_type": "application/json"},
        "system_instruction": {"parts": [{"text": "Be exact."}]},
    }
    answers = []
    for body, version in ((camel, "v1beta"), (snake, "v1")):
        status, answer = await generate(http, server, body, version=version)
        assert status == 200
        answers.append((answer_text(answer), answer["usageMetadata"]))
    assert answers[0] == answers[1]
    assert json.loads(answers[0][0])[0]["label"] == "red circle"


@pytest.mark.parametrize(
    "model,size,config,part_extra,image_tokens",
    [
        ("gemini-2.5-flash", (384, 384), {}, {}, 258),
        ("gemini-2.5-flash", (960, 540), {}, {}, 1548),  # the guide's worked example: 6 tiles
        ("gemini-3-flash-preview", (384, 384), {}, {}, 1120),  # high by default
        (
            "gemini-3-flash-preview",
            (384, 384),
            {"mediaResolution": "MEDIA_RESOLUTION_LOW"},
            {},
            280,
        ),
        (
            "gemini-3-flash-preview",
            (384, 384),
            {"mediaResolution": "MEDIA_RESOLUTION_LOW"},
            {"media_resolution": {"level": "MEDIA_RESOLUTION_MEDIUM"}},  # per part wins
            560,
        ),
    ],
)
async def test_usage_follows_the_token_rules(
    server, http, model, size, config, part_extra, image_tokens
):
    data, _ = draw_scene(size=size)
    body = inline_request(data, "Describe this image.", config={**config, "thinkingConfig": {}})
    body["contents"][0]["parts"][0].update(part_extra)
    body["generationConfig"]["thinkingConfig"] = (
        {"thinkingLevel": "minimal"} if model.startswith("gemini-3") else {"thinkingBudget": 0}
    )
    status, answer = await generate(http, server, body, model=model)
    assert status == 200
    usage = answer["usageMetadata"]
    prompt_text = text_tokens("Describe this image.")
    assert usage["promptTokensDetails"] == [
        {"modality": "TEXT", "tokenCount": prompt_text},
        {"modality": "IMAGE", "tokenCount": image_tokens},
    ]
    assert usage["promptTokenCount"] == prompt_text + image_tokens
    assert usage["candidatesTokenCount"] == text_tokens(answer_text(answer))
    assert "thoughtsTokenCount" not in usage  # thinking was turned off
    assert usage["totalTokenCount"] == usage["promptTokenCount"] + usage["candidatesTokenCount"]


async def test_thinking_bills_thought_tokens_and_can_show_a_summary(server, http):
    data, _ = draw_scene()
    config = {"thinkingConfig": {"thinkingBudget": 5, "includeThoughts": True}}
    _, answer = await generate(http, server, inline_request(data, "Describe.", config=config))
    parts = answer["candidates"][0]["content"]["parts"]
    assert parts[0]["thought"] is True and "thought" not in parts[1]
    usage = answer["usageMetadata"]
    assert usage["thoughtsTokenCount"] == 5  # capped by the budget
    assert usage["totalTokenCount"] == (
        usage["promptTokenCount"] + usage["candidatesTokenCount"] + usage["thoughtsTokenCount"]
    )


async def test_max_output_tokens_truncates_with_max_tokens(server, http):
    data, _ = draw_scene()
    config = {"responseMimeType": "application/json", "maxOutputTokens": 10}
    _, answer = await generate(http, server, inline_request(data, SEGMENT, config=config))
    assert answer["candidates"][0]["finishReason"] == "MAX_TOKENS"
    assert answer["usageMetadata"]["candidatesTokenCount"] <= 10
    with pytest.raises(json.JSONDecodeError):
        json.loads(answer_text(answer))


async def test_count_tokens(server, http):
    data, _ = draw_scene()
    url = f"{server.base_url}/v1beta/models/gemini-2.5-flash:countTokens"
    body = inline_request(data, "Describe this image.")
    async with http.post(url, json=body, headers={"x-goog-api-key": KEY}) as response:
        assert response.status == 200
        assert (await response.json())["totalTokens"] == 258 + text_tokens("Describe this image.")


# errors, in the real shapes


async def test_missing_and_wrong_keys(http):
    async with LocalServer(ServerOptions(api_key="right-key")) as server:
        data, _ = draw_scene()
        status, body = await generate(http, server, inline_request(data, "x"), key=None)
        assert status == 403
        assert body["error"]["status"] == "PERMISSION_DENIED"
        assert body["error"]["message"].startswith("Method doesn't allow unregistered callers")
        status, body = await generate(http, server, inline_request(data, "x"), key="wrong-key")
        assert status == 400
        error = body["error"]
        assert error["code"] == 400 and error["status"] == "INVALID_ARGUMENT"
        assert error["message"] == "API key not valid. Please pass a valid API key."
        info = [d for d in error["details"] if d["@type"].endswith("google.rpc.ErrorInfo")]
        assert info[0]["reason"] == "API_KEY_INVALID"
        assert "wrong-key" not in json.dumps(body) and "right-key" not in json.dumps(body)
        url = f"{server.base_url}/v1beta/files?key=right-key"  # the ?key= form works too
        async with http.get(url) as response:
            assert response.status == 200
        assert "right-key" not in repr(server.options)


async def test_request_errors_have_the_google_rpc_shape(http):
    limit = 64 * 1024
    async with LocalServer(ServerOptions(inline_limit_bytes=limit)) as server:
        data, _ = draw_scene()
        cases = []
        body = inline_request(data, "x")
        body["contents"][0]["parts"][0]["inline_data"]["data"] = "not*base64!"
        cases.append((body, "gemini-2.5-flash", 400, "INVALID_ARGUMENT", "Base64 decoding failed"))
        cases.append(
            (
                inline_request(b"GIF89a...", "x", "image/gif"),
                "gemini-2.5-flash",
                400,
                "INVALID_ARGUMENT",
                "Unsupported MIME type: image/gif",
            )
        )
        cases.append(
            (
                inline_request(b"definitely not a png", "x"),
                "gemini-2.5-flash",
                400,
                "INVALID_ARGUMENT",
                "Unable to process input image",
            )
        )
        big = inline_request(os.urandom(limit), "x")
        cases.append(
            (big, "gemini-2.5-flash", 400, "INVALID_ARGUMENT", "Request payload size exceeds")
        )
        cases.append(({"contents": []}, "gemini-2.5-flash", 400, "INVALID_ARGUMENT", "contents"))
        cases.append((inline_request(data, "x"), "gpt-4o", 404, "NOT_FOUND", "is not found"))
        file_part = {"contents": [{"parts": [{"fileData": {"file_uri": "files/nope123"}}]}]}
        cases.append(
            (file_part, "gemini-2.5-flash", 403, "PERMISSION_DENIED", "File nope123 or it may")
        )
        for body, model, code, status_name, message in cases:
            status, answer = await generate(http, server, body, model=model)
            assert status == code, answer
            error = answer["error"]
            assert (error["code"], error["status"]) == (code, status_name)
            assert message in error["message"]
        url = f"{server.base_url}/v1beta/models/gemini-2.5-flash:generateContent"
        async with http.post(url, data=b"{not json", headers={"x-goog-api-key": KEY}) as r:
            assert r.status == 400 and (await r.json())["error"]["status"] == "INVALID_ARGUMENT"
        async with http.post(url.replace("v1beta", "v2"), json={}) as r:
            assert r.status == 404


# Interactions API


async def interact(
    http: aiohttp.ClientSession, server: LocalServer, body: dict[str, Any], key: str | None = KEY
) -> tuple[int, dict[str, Any]]:
    headers = {"x-goog-api-key": key} if key else {}
    async with http.post(f"{server.base_url}/v1beta/interactions", json=body, headers=headers) as r:
        return r.status, await r.json()


async def test_interactions_take_flat_items_and_sdk_steps(server, http):
    data, _ = draw_scene()
    items = [
        {"type": "text", "text": DETECT},
        {"type": "image", "data": b64(data), "mime_type": "image/png", "resolution": "low"},
    ]
    common = {
        "model": "gemini-3-flash-preview",
        "response_format": {"type": "text", "mime_type": "application/json"},
        "store": False,
    }
    seed_style = {**common, "input": items, "config": {"thinking_level": "minimal"}}
    sdk_style = {
        **common,
        "input": [{"type": "user_input", "content": items}],
        "generation_config": {"thinking_level": "minimal"},
    }
    answers = []
    for body in (seed_style, sdk_style):
        status, interaction = await interact(http, server, body)
        assert status == 200
        assert interaction["status"] == "completed"
        last = interaction["steps"][-1]
        assert last["type"] == "model_output" and len(interaction["steps"]) == 1
        usage = interaction["usage"]
        assert usage["total_input_tokens"] == 280 + text_tokens(DETECT)
        assert {"modality": "image", "tokens": 280} in usage["input_tokens_by_modality"]
        assert usage["total_thought_tokens"] == 0
        assert usage["total_tokens"] == usage["total_input_tokens"] + usage["total_output_tokens"]
        answers.append(last["content"][0]["text"])
    assert answers[0] == answers[1]
    assert json.loads(answers[0])[0]["label"] == "red circle"


async def test_interactions_store_get_delete_and_thinking(server, http):
    data, _ = draw_scene()
    body = {
        "model": "gemini-3-flash-preview",
        "input": [
            {"type": "text", "text": "Describe this image."},
            {"type": "image", "data": b64(data), "mime_type": "image/png"},
        ],
    }
    status, interaction = await interact(http, server, body)  # stored by default, thinks
    assert status == 200
    assert [s["type"] for s in interaction["steps"]] == ["thought", "model_output"]
    assert interaction["usage"]["total_thought_tokens"] > 0
    url = f"{server.base_url}/v1beta/interactions/{interaction['id']}"
    headers = {"x-goog-api-key": KEY}
    async with http.get(url, headers=headers) as response:
        stored = await response.json()
    assert stored["steps"][0]["type"] == "user_input"
    assert stored["steps"][1:] == interaction["steps"]
    async with http.delete(url, headers=headers) as response:
        assert response.status == 200
    async with http.get(url, headers=headers) as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "not_found"
    status, unstored = await interact(http, server, {**body, "store": False})
    async with http.get(f"{url[: url.rindex('/')]}/{unstored['id']}", headers=headers) as r:
        assert r.status == 404


async def test_interactions_errors_carry_string_codes(server, http):
    data, _ = draw_scene()
    good = {
        "model": "gemini-3-flash-preview",
        "input": [{"type": "image", "data": b64(data), "mime_type": "image/png"}],
    }
    status, body = await interact(http, server, good, key=None)
    assert status == 401 and body["error"]["code"] == "authentication"
    bad_mime = {**good, "input": [{"type": "image", "data": b64(data), "mime_type": "image/bmp"}]}
    status, body = await interact(http, server, bad_mime)
    assert status == 400
    assert body == {
        "error": {"code": "invalid_request", "message": "Unsupported MIME type: image/bmp"}
    }
    status, body = await interact(http, server, {**good, "input": [{"type": "audio", "data": ""}]})
    assert status == 400 and body["error"]["code"] == "invalid_request"
    missing = {**good, "input": [{"type": "image", "uri": "files/gone", "mime_type": "image/png"}]}
    status, body = await interact(http, server, missing)
    assert status == 403 and body["error"]["code"] == "permission_denied"


async def test_interactions_response_format_schema(server, http):
    data, _ = draw_scene()
    schema = {"type": "object", "properties": {"count": {"type": "integer"}}}
    body = {
        "model": "gemini-3-flash-preview",
        "input": "How many shapes?",
        "response_format": {"type": "text", "mime_type": "application/json", "schema": schema},
        "store": False,
    }
    body["input"] = [
        {"type": "text", "text": "How many shapes?"},
        {"type": "image", "data": b64(data), "mime_type": "image/png"},
    ]
    status, interaction = await interact(http, server, body)
    assert status == 200
    assert json.loads(interaction["steps"][-1]["content"][0]["text"]) == {"count": 3}


# Files API


async def start_upload(
    http: aiohttp.ClientSession, server: LocalServer, size: int, mime: str = "image/png"
) -> str:
    headers = {
        "x-goog-api-key": KEY,
        "X-Goog-Upload-Protocol": "resumable",
        "X-Goog-Upload-Command": "start",
        "X-Goog-Upload-Header-Content-Length": str(size),
        "X-Goog-Upload-Header-Content-Type": mime,
    }
    url = f"{server.base_url}/upload/v1beta/files"
    async with http.post(url, json={"file": {"display_name": "shapes"}}, headers=headers) as r:
        assert r.status == 200
        assert r.headers["X-Goog-Upload-Status"] == "active"
        return r.headers["X-Goog-Upload-URL"]


async def upload(http: aiohttp.ClientSession, server: LocalServer, data: bytes, chunk: int) -> dict:
    url = await start_upload(http, server, len(data))
    for offset in range(0, len(data), chunk):
        last = offset + chunk >= len(data)
        headers = {  # no key: the upload URL is the credential
            "X-Goog-Upload-Command": "upload, finalize" if last else "upload",
            "X-Goog-Upload-Offset": str(offset),
        }
        async with http.post(url, data=data[offset : offset + chunk], headers=headers) as r:
            assert r.status == 200
            assert r.headers["X-Goog-Upload-Status"] == ("final" if last else "active")
            if last:
                return (await r.json())["file"]
    raise AssertionError("unreachable")


async def test_resumable_upload_in_chunks_then_get_use_delete(server, http):
    data, _ = draw_scene()
    file = await upload(http, server, data, chunk=4096)
    assert file["state"] == "ACTIVE" and file["mimeType"] == "image/png"
    assert file["sizeBytes"] == str(len(data)) and file["displayName"] == "shapes"
    assert file["name"].startswith("files/") and file["uri"].endswith(file["name"])
    assert base64.b64decode(file["sha256Hash"]).decode() == hashlib.sha256(data).hexdigest()
    headers = {"x-goog-api-key": KEY}
    async with http.get(f"{server.base_url}/v1beta/{file['name']}", headers=headers) as r:
        assert (await r.json()) == file
    sdk_part = {"fileData": {"file_uri": file["uri"], "mime_type": "image/png"}}  # as the SDK
    body = {"contents": [{"parts": [sdk_part, {"text": DETECT}]}]}
    body["generationConfig"] = {"responseMimeType": "application/json"}
    status, answer = await generate(http, server, body)
    assert status == 200 and len(json.loads(answer_text(answer))) == 3
    async with http.delete(f"{server.base_url}/v1/{file['name']}", headers=headers) as r:
        assert r.status == 200 and await r.json() == {}
    async with http.get(f"{server.base_url}/v1beta/{file['name']}", headers=headers) as r:
        assert r.status == 403
    status, answer = await generate(http, server, body)
    assert status == 403 and answer["error"]["status"] == "PERMISSION_DENIED"


async def test_upload_protocol_errors(server, http):
    url = await start_upload(http, server, 10)
    async with http.post(
        url, data=b"abc", headers={"X-Goog-Upload-Command": "upload", "X-Goog-Upload-Offset": "5"}
    ) as r:
        assert r.status == 400 and r.headers["X-Goog-Upload-Status"] == "active"
    async with http.post(url, headers={"X-Goog-Upload-Command": "query"}) as r:
        assert r.headers["X-Goog-Upload-Size-Received"] == "0"
    finalize = {"X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "0"}
    async with http.post(url, data=b"short", headers=finalize) as r:
        assert r.status == 400 and r.headers["X-Goog-Upload-Status"] == "final"
    async with http.post(url, data=b"0123456789", headers=finalize) as r:
        assert r.status == 404  # the session ended with the failed finalize
    headers = {"x-goog-api-key": KEY, "X-Goog-Upload-Protocol": "multipart"}
    async with http.post(f"{server.base_url}/upload/v1beta/files", headers=headers) as r:
        assert r.status == 400


async def test_file_lifecycle_processing_active_expired(http):
    clock = Clock()
    options = ServerOptions(file_processing_seconds=30, file_ttl_seconds=3600)
    async with LocalServer(options, clock=clock) as server:
        data, _ = draw_scene()
        file = await upload(http, server, data, chunk=len(data))
        assert file["state"] == "PROCESSING"
        assert file["expirationTime"] == "2027-01-15T09:00:00.000000Z"
        body = {"contents": [{"parts": [{"file_data": {"file_uri": file["uri"]}}, {"text": "x"}]}]}
        status, answer = await generate(http, server, body)
        assert status == 400 and answer["error"]["status"] == "FAILED_PRECONDITION"
        clock.now += 30
        headers = {"x-goog-api-key": KEY}
        async with http.get(f"{server.base_url}/v1beta/{file['name']}", headers=headers) as r:
            assert (await r.json())["state"] == "ACTIVE"
        status, _ = await generate(http, server, body)
        assert status == 200
        clock.now += 3600
        async with http.get(f"{server.base_url}/v1beta/{file['name']}", headers=headers) as r:
            assert r.status == 403
        status, _ = await generate(http, server, body)
        assert status == 403


async def test_list_files_pages_newest_first(http):
    clock = Clock()
    async with LocalServer(ServerOptions(), clock=clock) as server:
        names = []
        for i in range(5):
            clock.now += 1
            names.append((await upload(http, server, bytes([i]) * 10, chunk=10))["name"])
        seen, token = [], None
        headers = {"x-goog-api-key": KEY}
        while True:
            query = "pageSize=2" + (f"&pageToken={token}" if token else "")
            async with http.get(f"{server.base_url}/v1beta/files?{query}", headers=headers) as r:
                page = await r.json()
            assert len(page["files"]) <= 2
            seen += [f["name"] for f in page["files"]]
            token = page.get("nextPageToken")
            if not token:
                break
        assert seen == names[::-1]
        async with http.get(
            f"{server.base_url}/v1beta/files?pageToken=bogus", headers=headers
        ) as r:
            assert r.status == 400


# quotas


async def test_rpm_fixed_calendar_minute_windows(http):
    clock = Clock(START + 45)
    async with LocalServer(ServerOptions(rpm=2), clock=clock) as server:
        data, _ = draw_scene()
        body = inline_request(data, "Describe.")
        assert [(await generate(http, server, body))[0] for _ in range(2)] == [200, 200]
        status, answer = await generate(http, server, body)
        assert status == 429
        error = answer["error"]
        assert error["status"] == "RESOURCE_EXHAUSTED"
        details = {d["@type"].rsplit(".", 1)[-1]: d for d in error["details"]}
        assert details["RetryInfo"]["retryDelay"] == "15s"  # to the next calendar minute
        violation = details["QuotaFailure"]["violations"][0]
        assert violation["quotaId"] == "GenerateRequestsPerMinutePerProjectPerModel"
        assert violation["quotaValue"] == "2"
        status, _ = await generate(http, server, body, model="gemini-2.5-pro")  # per model
        assert status == 200
        clock.now = START + 60  # a new window: two more at once, four within 15 seconds
        assert [(await generate(http, server, body))[0] for _ in range(3)] == [200, 200, 429]
        assert server.stats()["quota_rejections"]["rpm"] == 2


async def test_tpm_counts_input_tokens(http):
    clock = Clock(START + 10)
    async with LocalServer(ServerOptions(tpm=600), clock=clock) as server:
        data, _ = draw_scene()
        body = inline_request(data, "Describe.")  # 258 + 3 tokens
        statuses = [(await generate(http, server, body))[0] for _ in range(3)]
        assert statuses == [200, 200, 429]
        _, answer = await generate(http, server, body)
        violation = answer["error"]["details"][0]["violations"][0]
        assert violation["quotaId"] == "GenerateContentInputTokensPerModelPerMinute"
        assert answer["error"]["details"][-1]["retryDelay"] == "50s"


async def test_rpd_resets_at_midnight_pacific_and_interactions_codes(http):
    clock = Clock(START + 3600)  # 01:00 Pacific
    async with LocalServer(ServerOptions(rpd=1), clock=clock) as server:
        data, _ = draw_scene()
        body = {
            "model": "gemini-3-flash-preview",
            "input": [{"type": "image", "data": b64(data), "mime_type": "image/png"}],
            "store": False,
        }
        assert (await interact(http, server, body))[0] == 200
        status, answer = await interact(http, server, body)
        assert status == 429 and answer["error"]["code"] == "quota_exceeded"
        status, answer = await generate(
            http, server, inline_request(data, "x"), model="gemini-3-flash-preview"
        )
        assert answer["error"]["details"][-1]["retryDelay"] == f"{23 * 3600}s"
        clock.now = START + 24 * 3600
        assert (await interact(http, server, body))[0] == 200
    async with LocalServer(ServerOptions(rpm=1), clock=Clock()) as server:
        await interact(http, server, body)
        status, answer = await interact(http, server, body)
        assert status == 429 and answer["error"]["code"] == "rate_limit_exceeded"


# faults, latency, replay


async def fault_outcomes(http: aiohttp.ClientSession, options: ServerOptions, n: int) -> list:
    outcomes = []
    async with LocalServer(options) as server:
        data, _ = draw_scene()
        config = {"responseMimeType": "application/json"}
        for i in range(n):
            body = inline_request(data, f"{SEGMENT} (request {i})", config=config)
            status, answer = await generate(http, server, body)
            if status != 200:
                outcomes.append((status, answer["error"]["status"]))
            else:
                candidate = answer["candidates"][0]
                outcomes.append((status, candidate["finishReason"], answer_text(answer)))
        injected = server.stats()["faults"]
    return [outcomes, injected]


def fault_kind(outcome: tuple) -> str | None:
    if outcome[0] != 200:
        return {500: "http_500", 503: "http_503", 504: "hang"}[outcome[0]]
    if outcome[1] == "MAX_TOKENS":
        return "max_tokens"
    text = outcome[2]
    if text.startswith("```"):
        return "fenced_json"
    items = json.loads(text)
    if any(max(item["box_2d"]) > 1000 for item in items):
        return "box_out_of_range"
    if any(not item["mask"].startswith("data:") for item in items):
        return "mask_without_prefix"
    return None


async def test_faults_are_seeded_and_cover_the_mix(http):
    options = ServerOptions(fault_rate=1.0, seed=11, hang_seconds=0.01)
    outcomes, injected = await fault_outcomes(http, options, 60)
    kinds = [fault_kind(o) for o in outcomes]
    assert None not in kinds
    assert set(kinds) == set(FAULT_KINDS)
    assert injected == {k: kinds.count(k) for k in FAULT_KINDS}
    mixed = ServerOptions(fault_rate=0.3, seed=5, hang_seconds=0.01)
    first = await fault_outcomes(http, mixed, 30)
    assert first == await fault_outcomes(http, mixed, 30)  # same seed, same story
    reseeded = ServerOptions(fault_rate=0.3, seed=6, hang_seconds=0.01)
    assert first != await fault_outcomes(http, reseeded, 30)
    faulty = sum(fault_kind(o) is not None for o in first[0])
    assert 3 <= faulty <= 18


async def test_a_retried_request_draws_afresh(http):
    async with LocalServer(ServerOptions(fault_rate=0.5, seed=1, hang_seconds=0.01)) as server:
        data, _ = draw_scene()
        body = inline_request(data, DETECT, config={"responseMimeType": "application/json"})
        statuses = {(await generate(http, server, body))[0] for _ in range(12)}
        assert 200 in statuses and len(statuses) > 1


def test_latency_is_lognormal_with_the_requested_mean():
    faults = Faults(rate=0.0, seed=3, latency_ms=200)
    draws = [faults.draw(i.to_bytes(4, "big")).latency_seconds for i in range(4000)]
    assert statistics.fmean(draws) == pytest.approx(0.2, rel=0.05)
    assert statistics.median(draws) < 0.2 < max(draws) / 2  # long right tail
    again = Faults(rate=0.0, seed=3, latency_ms=200)
    assert [again.draw(i.to_bytes(4, "big")).latency_seconds for i in range(10)] == draws[:10]


async def test_latency_delays_answers(http):
    async with LocalServer(ServerOptions(latency_ms=40, seed=2)) as server:
        data, _ = draw_scene()
        started = time.perf_counter()
        await asyncio.gather(*(generate(http, server, inline_request(data, "x")) for _ in range(8)))
        assert time.perf_counter() - started >= 0.01


async def test_replay_serves_recorded_answers_by_image_hash(http, tmp_path):
    data, _ = draw_scene()
    other, _ = draw_scene("JPEG")
    replay = tmp_path / "replay.jsonl"
    records = [
        {
            "sha256": hashlib.sha256(data).hexdigest(),
            "text": '[{"box_2d": [1, 2',
            "finish_reason": "MAX_TOKENS",
        },
        {"sha256": hashlib.sha256(data).hexdigest(), "text": "[]", "finish_reason": "STOP"},
        {"sha256": "*", "text": "anything else"},
    ]
    replay.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    async with LocalServer(ServerOptions(replay=str(replay))) as server:
        answers = []
        for image, mime in ((data, "image/png"), (data, "image/png"), (other, "image/jpeg")):
            _, body = await generate(http, server, inline_request(image, DETECT, mime))
            answers.append((answer_text(body), body["candidates"][0]["finishReason"]))
        assert answers == [
            ('[{"box_2d": [1, 2', "MAX_TOKENS"),
            ("[]", "STOP"),
            ("anything else", "STOP"),
        ]
        assert server.stats()["replayed"] == 3
    replay.write_text('{"text": "no hash"}\n')
    with pytest.raises(ValueError, match=r"replay\.jsonl:1"):
        LocalServer(ServerOptions(replay=str(replay)))


# stats and the command line


async def test_local_stats_counts_requests_tokens_and_uploads(server, http):
    data, _ = draw_scene()
    _, ok = await generate(http, server, inline_request(data, "Describe."))
    await generate(http, server, inline_request(data, "Describe."), key=None)
    await upload(http, server, data, chunk=len(data))
    async with http.get(f"{server.base_url}/local/stats") as response:
        stats = await response.json()
    assert stats == server.stats()
    assert stats["requests"]["POST /v1beta/models/gemini-2.5-flash:generateContent"] == {
        "200": 1,
        "403": 1,
    }
    assert stats["requests"]["POST /upload/v1beta/files"] == {"200": 2}
    assert stats["uploads"] == {"started": 1, "completed": 1, "bytes": len(data)}
    usage = ok["usageMetadata"]
    assert stats["tokens"]["prompt"] == usage["promptTokenCount"]
    assert stats["tokens"]["total"] == usage["totalTokenCount"]
    assert stats["tokens"]["prompt_by_modality"]["IMAGE"] == 258
    assert stats["images"] == 1 and stats["answers_by_task"] == {"caption": 1}


async def test_cli_prints_its_url_first_and_stops_on_sigterm(http):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pipeline.localserver",
        "--port",
        "0",
        "--api-key",
        "cli-secret",
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert match, line
        base = match.group(0)
        async with http.get(f"{base}/v1beta/files", headers={"x-goog-api-key": "cli-secret"}) as r:
            assert r.status == 200
        async with http.get(f"{base}/v1beta/files", headers={"x-goog-api-key": "other"}) as r:
            assert r.status == 400
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
        rest = (await process.stdout.read() + await process.stderr.read()).decode()
        assert "cli-secret" not in line + rest
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
