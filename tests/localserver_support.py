"""Helpers of the local server's tests: images with exact truth, raw HTTP calls.

Images are drawn with Pillow at known coordinates, so every answer has an exact truth: boxes,
masks (PNG probability maps and polygons), labels, captions and token counts. Calls are raw
aiohttp requests over loopback, so the tests see exactly what the wire carries. The `server`
and `http` fixtures, the hand Clock, box_iou and mask_iou are in tests/conftest.py.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import aiohttp
import numpy as np
from PIL import Image, ImageDraw

from pipeline.localserver.server import LocalServer

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
GRANULARITY = 256 * 1024  # X-Goog-Upload-Chunk-Granularity


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


async def interact(
    http: aiohttp.ClientSession,
    server: LocalServer,
    body: dict[str, Any],
    key: str | None = KEY,
    with_headers: bool = False,
) -> Any:
    """(status, body), or (status, body, headers) with `with_headers`."""
    headers = {"x-goog-api-key": key} if key else {}
    async with http.post(f"{server.base_url}/v1beta/interactions", json=body, headers=headers) as r:
        answer = (r.status, await r.json())
        return (*answer, r.headers) if with_headers else answer


def interaction_request(data: bytes, prompt: str = DETECT, **extra: Any) -> dict[str, Any]:
    """An SDK-shaped create body: one user_input step of a text item and an image item."""
    items = [
        {"type": "text", "text": prompt},
        {"type": "image", "data": b64(data), "mime_type": "image/png"},
    ]
    return {
        "model": "gemini-3-flash-preview",
        "input": [{"type": "user_input", "content": items}],
        "store": False,
        **extra,
    }


def answer_text(body: dict[str, Any]) -> str:
    parts = body["candidates"][0]["content"]["parts"]
    return "".join(p["text"] for p in parts if not p.get("thought"))


def error_of(answer: dict[str, Any]) -> tuple[Any, str]:
    """(code or status, message) of an error body of either flavour."""
    error = answer["error"]
    return error.get("status", error["code"]), error["message"]


def pixel_box(box_2d: list[int], width: int, height: int) -> tuple[int, int, int, int]:
    """docs/gemini-api.md § Object detection: value / 1000 x width (x) or height (y); returned
    as x0, y0, x1, y1."""
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


async def start_upload(
    http: aiohttp.ClientSession,
    server: LocalServer,
    size: int,
    mime: str = "image/png",
    body: dict[str, Any] | None = None,
) -> str:
    headers = {
        "x-goog-api-key": KEY,
        "X-Goog-Upload-Protocol": "resumable",
        "X-Goog-Upload-Command": "start",
        "X-Goog-Upload-Header-Content-Length": str(size),
        "X-Goog-Upload-Header-Content-Type": mime,
    }
    url = f"{server.base_url}/upload/v1beta/files"
    start = body if body is not None else {"file": {"display_name": "shapes"}}
    async with http.post(url, json=start, headers=headers) as r:
        assert r.status == 200, await r.text()
        assert r.headers["X-Goog-Upload-Status"] == "active"
        assert r.headers["X-Goog-Upload-Chunk-Granularity"] == str(GRANULARITY)
        return r.headers["X-Goog-Upload-URL"]


async def upload(
    http: aiohttp.ClientSession, server: LocalServer, data: bytes, chunk: int = GRANULARITY
) -> dict[str, Any]:
    """A resumable upload in `chunk`-sized pieces (a multiple of the granularity)."""
    url = await start_upload(http, server, len(data))
    for offset in range(0, len(data), chunk):
        last = offset + chunk >= len(data)
        headers = {  # no key: the upload URL is the credential
            "X-Goog-Upload-Command": "upload, finalize" if last else "upload",
            "X-Goog-Upload-Offset": str(offset),
        }
        async with http.post(url, data=data[offset : offset + chunk], headers=headers) as r:
            assert r.status == 200, await r.text()
            assert r.headers["X-Goog-Upload-Status"] == ("final" if last else "active")
            if last:
                return (await r.json())["file"]
    raise AssertionError("unreachable")
