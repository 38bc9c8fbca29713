"""The Gemini REST client against the project's local Gemini-compatible server over loopback.

Every test speaks real HTTP to `pipeline.localserver.LocalServer` started in-process on a free
port; images are real PNGs drawn with Pillow; files are real files under tmp_path. The wire
mapping and parsers are also checked directly on hand-written bodies.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import pickle
import random
import socket
import traceback
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from PIL import Image, ImageDraw

from pipeline.gemini import (
    DEFAULT_BASE_URL,
    GeminiClient,
    GeminiError,
    api_key_from_env,
    parse_generate_content,
    parse_interaction,
    parse_response,
)
from pipeline.gemini.client import _warn_both_keys_set, build_generate_content_body
from pipeline.gemini.errors import error_from_response
from pipeline.gemini.interactions import build_interaction_body
from pipeline.gemini.tokens import image_tokens
from pipeline.gemini.types import GenerateRequest, ImagePart
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer

KEY = "AIzaTEST-client-secret-7f3c91d2"  # distinctive, so a leak is easy to find
MODEL_25 = "gemini-2.5-flash"
MODEL_3 = "gemini-3-flash-preview"
DETECT_PROMPT = (
    "Detect the all of the prominent items in the image. "
    "The box_2d should be [ymin, xmin, ymax, xmax] normalized to 0-1000."
)
# A 400x300 white canvas with one red rectangle at x 100..299, y 60..209 (pixels, inclusive):
# in Gemini's [ymin, xmin, ymax, xmax] / 1000 that is [200, 250, 700, 750].
WIDTH, HEIGHT = 400, 300
EXPECTED_BOX = [200, 250, 700, 750]
BOX_TOLERANCE = 15  # of 1000: the server finds the shape from pixels, edges may round
GRANULE = 256 * 1024  # the real service's X-Goog-Upload-Chunk-Granularity


def rectangle_png() -> bytes:
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    ImageDraw.Draw(image).rectangle([100, 60, 299, 209], fill=(220, 30, 30))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def noise_png(side: int, seed: int) -> bytes:
    """An incompressible PNG, so a small image still spans several upload chunks."""
    rng = random.Random(seed)
    image = Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def free_port() -> int:
    """A port nobody listens on (bound then released), for connection-refused errors."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@asynccontextmanager
async def serve(**options: Any) -> AsyncIterator[LocalServer]:
    settings = {"port": 0, "api_key": KEY, "latency_ms": 0, "fault_rate": 0.0, "seed": 0}
    settings.update(options)
    async with LocalServer(ServerOptions(**settings)) as server:
        yield server


@asynccontextmanager
async def connect(
    server: LocalServer, api_key: str | None = KEY, **kwargs: Any
) -> AsyncIterator[GeminiClient]:
    async with GeminiClient(api_key, base_url=server.base_url, **kwargs) as client:
        yield client


@asynccontextmanager
async def scripted_endpoint(app: web.Application) -> AsyncIterator[str]:
    """A few fixed answers over loopback, for protocol cases the local server cannot produce."""
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.fixture
def server_options() -> ServerOptions:
    """The options of the `server` fixture (tests/conftest.py) in this module."""
    return ServerOptions(api_key=KEY)  # as serve() starts it: its other settings are defaults


@pytest.fixture
async def client(server: LocalServer) -> AsyncIterator[GeminiClient]:
    async with connect(server) as connected:
        yield connected


def detect_request(image: ImagePart, model: str = MODEL_25, **settings: Any) -> GenerateRequest:
    return GenerateRequest(
        model=model,
        prompt=DETECT_PROMPT,
        images=(image,),
        response_mime_type="application/json",
        **settings,
    )


def only_box(text: str) -> list[int]:
    items = json.loads(text)
    if isinstance(items, dict):  # 3.x models answer {"boxes": [...]}
        items = items["boxes"]
    assert len(items) == 1, items
    return items[0]["box_2d"]


def assert_box(box: list[int]) -> None:
    assert all(abs(a - b) <= BOX_TOLERANCE for a, b in zip(box, EXPECTED_BOX, strict=True)), box


def sha256_matches(reported: str | None, data: bytes) -> bool:
    """The Files API's sha256Hash is the hex digest, base64-encoded once more (a bytes field)."""
    return reported == base64.b64encode(hashlib.sha256(data).hexdigest().encode()).decode()


def assert_key_absent(error: GeminiError, client: GeminiClient, key: str) -> None:
    formatted = "".join(traceback.format_exception(error))
    for text in (str(error), repr(error), repr(client), formatted):
        assert key not in text


# ------------------------------------------------------------------------------ generateContent


async def test_generate_content_inline_image_answers_box_and_usage(client: GeminiClient) -> None:
    response = await client.generate_content(
        detect_request(ImagePart("image/png", rectangle_png()))
    )

    assert response.finish_reason == "STOP"
    assert response.block_reason is None
    assert_box(only_box(response.text))
    image_cost = image_tokens(MODEL_25, WIDTH, HEIGHT)
    assert response.usage.prompt_by_modality["IMAGE"] == image_cost
    assert response.usage.prompt_tokens >= image_cost
    assert response.usage.output_tokens > 0
    assert response.usage.total_tokens == (
        response.usage.prompt_tokens + response.usage.output_tokens + response.usage.thoughts_tokens
    )
    assert json.loads(response.raw)["candidates"][0]["finishReason"] == "STOP"


async def test_generate_with_uploaded_file_part(client: GeminiClient) -> None:
    uploaded = await client.upload_file(rectangle_png(), "image/png", display_name="rect")
    active = await client.wait_until_active(uploaded.name, poll_interval=0.02)
    request = detect_request(ImagePart("image/png", file_uri=active.uri))

    response = await client.generate(request, flavor="generateContent")

    assert response.finish_reason == "STOP"
    assert_box(only_box(response.text))
    assert response.usage.prompt_by_modality["IMAGE"] == image_tokens(MODEL_25, WIDTH, HEIGHT)


async def test_generate_content_per_call_timeout_overrides_default() -> None:
    async with serve(latency_ms=3000, seed=1) as server, connect(server, timeout=60.0) as client:
        with pytest.raises(GeminiError) as caught:
            await client.generate_content(
                detect_request(ImagePart("image/png", rectangle_png())), timeout=0.05
            )
    assert caught.value.code is None
    assert caught.value.status == "DEADLINE_EXCEEDED"
    assert caught.value.retryable


# --------------------------------------------------------------------------------- Interactions


async def test_interaction_inline_image(client: GeminiClient) -> None:
    request = detect_request(
        ImagePart("image/png", rectangle_png()), model=MODEL_3, thinking_level="minimal"
    )

    response = await client.interact(request)

    assert response.finish_reason == "STOP"
    assert_box(only_box(response.text))
    assert response.usage.prompt_by_modality["IMAGE"] == image_tokens(MODEL_3, WIDTH, HEIGHT)
    assert response.usage.total_tokens >= response.usage.prompt_tokens > 0
    assert json.loads(response.raw)["status"] == "completed"


async def test_interaction_with_file_uri_and_low_resolution(client: GeminiClient) -> None:
    uploaded = await client.upload_file(rectangle_png(), "image/png")
    await client.wait_until_active(uploaded.name, poll_interval=0.02)
    image = ImagePart("image/png", file_uri=uploaded.uri, resolution="low")

    response = await client.generate(detect_request(image, model=MODEL_3), flavor="interactions")

    assert response.finish_reason == "STOP"
    assert_box(only_box(response.text))
    assert response.usage.prompt_by_modality["IMAGE"] == image_tokens(MODEL_3, WIDTH, HEIGHT, "low")


async def test_interaction_thinking_step_is_skipped_and_not_stored(
    server: LocalServer, client: GeminiClient
) -> None:
    request = detect_request(
        ImagePart("image/png", rectangle_png()), model=MODEL_3, thinking_level="high"
    )

    response = await client.interact(request)

    steps = json.loads(response.raw)["steps"]
    assert [step["type"] for step in steps] == ["thought", "model_output"]
    assert_box(only_box(response.text))
    usage = response.usage
    assert usage.thoughts_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.output_tokens + usage.thoughts_tokens
    # Sent with store: false, so the service kept nothing to fetch back.
    url = f"{server.base_url}/v1beta/interactions/{json.loads(response.raw)['id']}"
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers={"x-goog-api-key": KEY}) as answer,
    ):
        assert answer.status == 404


async def test_cut_answers_finish_with_max_tokens_in_both_flavors(client: GeminiClient) -> None:
    image = ImagePart("image/png", rectangle_png())
    for flavor, model in (("generateContent", MODEL_25), ("interactions", MODEL_3)):
        request = detect_request(image, model=model, max_output_tokens=3)
        response = await client.generate(request, flavor=flavor)
        assert response.finish_reason == "MAX_TOKENS", flavor
        assert 0 < len(response.text) <= 12
        assert response.usage.output_tokens <= 3


async def test_generate_content_thinking_and_media_resolution_settings(
    client: GeminiClient, server: LocalServer
) -> None:
    png = rectangle_png()
    thinking = await client.generate_content(detect_request(ImagePart("image/png", png)))
    no_thinking = await client.generate_content(
        detect_request(ImagePart("image/png", png), thinking_budget=0)
    )
    assert thinking.usage.thoughts_tokens > 0
    assert no_thinking.usage.thoughts_tokens == 0

    async with connect(server, version="v1alpha") as alpha:  # per-part: v1alpha and v1beta
        low_part = await alpha.generate_content(
            detect_request(ImagePart("image/png", png, resolution="low"), model=MODEL_3)
        )
    beta_part = await client.generate_content(  # v1beta: the media-resolution page, 2026-09-19
        detect_request(ImagePart("image/png", png, resolution="low"), model=MODEL_3)
    )
    assert beta_part.usage.prompt_by_modality["IMAGE"] == 280
    with pytest.raises(GeminiError, match="Per-part media resolution is not supported"):
        await client.generate_content(  # 2.x takes none (its table entry lists no version)
            detect_request(ImagePart("image/png", png, resolution="low"), model=MODEL_25)
        )
    medium_request = await client.generate_content(
        detect_request(
            ImagePart("image/png", png),
            model=MODEL_3,
            media_resolution="medium",
            thinking_level="minimal",
            response_json_schema={"type": "array", "items": {"type": "object"}},
        )
    )
    assert low_part.usage.prompt_by_modality["IMAGE"] == 280
    assert medium_request.usage.prompt_by_modality["IMAGE"] == 560
    assert medium_request.usage.thoughts_tokens == 0
    assert_box(only_box(medium_request.text))


# ------------------------------------------------------------------------------- error classes


async def test_bad_base64_is_invalid_argument(server: LocalServer) -> None:
    # The client always encodes correctly, so send the broken body by hand and read the
    # server's real error body through the client's parser.
    body = {
        "contents": [
            {"parts": [{"inline_data": {"mime_type": "image/png", "data": "@@not base64@@"}}]}
        ]
    }
    url = f"{server.base_url}/v1beta/models/{MODEL_25}:generateContent"
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers={"x-goog-api-key": KEY}) as answer,
    ):
        error = error_from_response(answer.status, await answer.text(), answer.headers)
    assert error.code == 400
    assert error.status == "INVALID_ARGUMENT"
    assert not error.retryable


async def test_unsupported_mime_type_is_invalid_argument(client: GeminiClient) -> None:
    with pytest.raises(GeminiError) as caught:
        await client.generate_content(detect_request(ImagePart("image/gif", rectangle_png())))
    assert (caught.value.code, caught.value.status) == (400, "INVALID_ARGUMENT")
    assert not caught.value.retryable


async def test_request_over_inline_limit_is_rejected() -> None:
    image = noise_png(96, seed=3)  # ~27 KB of PNG, ~37 KB once base64-encoded
    async with serve(inline_limit_bytes=16 * 1024) as server, connect(server) as client:
        with pytest.raises(GeminiError) as caught:
            await client.generate_content(detect_request(ImagePart("image/png", image)))
    assert (caught.value.code, caught.value.status) == (400, "INVALID_ARGUMENT")
    assert not caught.value.retryable


async def test_bad_key_is_api_key_invalid(server: LocalServer) -> None:
    async with connect(server, api_key="AIzaWRONG-key-55aa") as client:
        with pytest.raises(GeminiError) as caught:
            await client.generate_content(detect_request(ImagePart("image/png", rectangle_png())))
    assert (caught.value.code, caught.value.status) == (400, "INVALID_ARGUMENT")
    assert caught.value.reason == "API_KEY_INVALID"
    assert not caught.value.retryable


async def test_missing_key_is_refused(server: LocalServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    async with connect(server, api_key=None) as client:
        assert "api_key=missing" in repr(client)
        with pytest.raises(GeminiError) as caught:
            await client.list_files()
    assert caught.value.code in (401, 403)
    assert caught.value.status in ("UNAUTHENTICATED", "PERMISSION_DENIED")
    assert not caught.value.retryable


async def test_unknown_file_is_permission_denied(client: GeminiClient) -> None:
    # The real service does not tell "missing" from "not yours": both are a 403.
    with pytest.raises(GeminiError) as caught:
        await client.get_file("files/no-such-file")
    assert (caught.value.code, caught.value.status) == (403, "PERMISSION_DENIED")
    assert not caught.value.retryable
    with pytest.raises(GeminiError) as caught:
        await client.generate_content(
            detect_request(ImagePart("image/png", file_uri=f"{client.base_url}/v1beta/files/nope"))
        )
    assert (caught.value.code, caught.value.status) == (403, "PERMISSION_DENIED")


async def test_unknown_model_is_not_found(client: GeminiClient) -> None:
    request = detect_request(ImagePart("image/png", rectangle_png()), model="no-such-model")
    for flavor in ("generateContent", "interactions"):
        with pytest.raises(GeminiError) as caught:
            await client.generate(request, flavor=flavor)
        assert caught.value.code == 404
        assert caught.value.status in ("NOT_FOUND", "model_not_found")
        assert not caught.value.retryable


async def test_generate_with_processing_file_is_failed_precondition() -> None:
    async with serve(file_processing_seconds=300.0) as server, connect(server) as client:
        uploaded = await client.upload_file(rectangle_png(), "image/png")
        assert uploaded.state == "PROCESSING"
        with pytest.raises(GeminiError) as caught:
            await client.generate_content(
                detect_request(ImagePart("image/png", file_uri=uploaded.uri))
            )
    assert (caught.value.code, caught.value.status) == (400, "FAILED_PRECONDITION")
    assert not caught.value.retryable


async def test_rate_limit_is_429_with_retry_delay() -> None:
    request = detect_request(ImagePart("image/png", rectangle_png()))
    async with serve(rpm=1) as server, connect(server) as client:
        # One request a calendar minute: of three quick calls at most two land in different
        # minutes, so one is refused whenever the test happens to run.
        with pytest.raises(GeminiError) as caught:
            for _ in range(3):
                await client.generate_content(request)
    error = caught.value
    assert (error.code, error.status) == (429, "RESOURCE_EXHAUSTED")
    assert error.retryable
    assert error.retry_delay is not None and 0 < error.retry_delay <= 60
    assert error.quota


async def test_injected_server_faults_are_retryable_5xx() -> None:
    """With every request faulted, the 5xx ones arrive as retryable errors."""
    request = detect_request(ImagePart("image/png", rectangle_png()))
    seen: list[GeminiError] = []
    async with serve(fault_rate=1.0, seed=7) as server, connect(server, timeout=2.0) as client:
        for _ in range(40):
            try:
                await client.generate_content(request, timeout=0.5)
            except GeminiError as error:
                seen.append(error)
            if any(error.code in (500, 503) for error in seen):
                break
    server_faults = [error for error in seen if error.code in (500, 503)]
    assert server_faults, seen
    assert all(error.retryable for error in server_faults)
    assert {error.status for error in server_faults} <= {"INTERNAL", "UNAVAILABLE"}


async def test_connection_refused_is_unavailable_and_retryable() -> None:
    async with GeminiClient(KEY, base_url=f"http://127.0.0.1:{free_port()}") as client:
        with pytest.raises(GeminiError) as caught:
            await client.list_files()
    assert caught.value.code is None
    assert (caught.value.status, caught.value.kind) == ("UNAVAILABLE", "transport")
    assert caught.value.retryable


async def test_api_key_never_leaks_into_errors(server: LocalServer) -> None:
    """Bad key, 5xx, timeout, connection refused: the key is in no str, repr or traceback."""
    request = detect_request(ImagePart("image/png", rectangle_png()))
    wrong_key = "AIzaLEAK-check-9e8d7c6b5a"
    errors: list[tuple[GeminiError, GeminiClient, str]] = []

    async with connect(server, api_key=wrong_key) as client:
        with pytest.raises(GeminiError) as caught:
            await client.generate_content(request)
        errors.append((caught.value, client, wrong_key))

    async with serve(fault_rate=1.0, seed=7) as faulty, connect(faulty) as client:
        faults: list[GeminiError] = []
        for _ in range(40):  # until both a 5xx and a hang (client timeout) have happened
            try:
                await client.generate_content(request, timeout=0.2)
            except GeminiError as error:
                faults.append(error)
            if {error.code for error in faults} & {500, 503} and any(
                error.status == "DEADLINE_EXCEEDED" for error in faults
            ):
                break
        errors.extend((error, client, KEY) for error in faults)

    async with serve(latency_ms=3000, seed=1) as slow, connect(slow) as client:
        with pytest.raises(GeminiError) as caught:
            await client.generate_content(request, timeout=0.05)
        errors.append((caught.value, client, KEY))

    async with GeminiClient(KEY, base_url=f"http://127.0.0.1:{free_port()}") as client:
        with pytest.raises(GeminiError) as caught:
            await client.generate_content(request)
        errors.append((caught.value, client, KEY))

    statuses = {error.status for error, _, _ in errors}
    assert {"INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "UNAVAILABLE"} <= statuses
    assert any(error.code in (500, 503) for error, _, _ in errors)
    for error, owner, key in errors:
        assert_key_absent(error, owner, key)


# ------------------------------------------------------------------------------------ Files API


async def test_multi_chunk_upload_from_disk_round_trips_bytes(
    client: GeminiClient, tmp_path: Path
) -> None:
    data = noise_png(600, seed=11)  # ~1 MB: four chunks of the real 256 KiB granularity
    path = tmp_path / "noise.png"
    path.write_bytes(data)

    uploaded = await client.upload_file(path, "image/png", display_name="noise", chunk_size=GRANULE)

    assert len(data) > 3 * GRANULE and len(data) % GRANULE
    assert uploaded.name.startswith("files/")
    assert uploaded.size_bytes == len(data)
    assert uploaded.mime_type == "image/png"
    assert uploaded.display_name == "noise"
    assert uploaded.expiration_time
    assert sha256_matches(uploaded.sha256_hash, data), uploaded.sha256_hash
    fetched = await client.get_file(uploaded.name)
    assert (fetched.name, fetched.uri, fetched.size_bytes) == (
        uploaded.name,
        uploaded.uri,
        len(data),
    )
    assert fetched.sha256_hash == uploaded.sha256_hash


async def test_upload_in_a_single_chunk(client: GeminiClient) -> None:
    data = rectangle_png()
    single = await client.upload_file(data, "image/png")
    assert single.size_bytes == len(data)
    assert sha256_matches(single.sha256_hash, data)


async def test_get_list_and_delete_files(client: GeminiClient) -> None:
    names = [
        (await client.upload_file(noise_png(8, seed), "image/png", display_name=f"n{seed}")).name
        for seed in range(3)
    ]

    listed = await client.list_files(page_size=2)  # three files: two pages
    assert set(names) <= {info.name for info in listed}

    await client.delete_file(names[0])
    with pytest.raises(GeminiError) as caught:
        await client.get_file(names[0])
    assert caught.value.status == "PERMISSION_DENIED"  # gone: as for any unknown file
    remaining = {info.name for info in await client.list_files(page_size=2)}
    assert names[0] not in remaining
    assert set(names[1:]) <= remaining


async def test_wait_until_active_polls_through_processing() -> None:
    async with serve(file_processing_seconds=0.3) as server, connect(server) as client:
        uploaded = await client.upload_file(rectangle_png(), "image/png")
        assert uploaded.state == "PROCESSING"
        active = await client.wait_until_active(uploaded.name, timeout=10.0, poll_interval=0.02)
    assert active.state == "ACTIVE"
    assert active.name == uploaded.name


async def test_wait_until_active_gives_up_at_timeout() -> None:
    async with serve(file_processing_seconds=300.0) as server, connect(server) as client:
        uploaded = await client.upload_file(rectangle_png(), "image/png")
        with pytest.raises(GeminiError) as caught:
            await client.wait_until_active(uploaded.name, timeout=0.1, poll_interval=0.02)
    assert caught.value.status == "DEADLINE_EXCEEDED"


async def test_upload_protocol_resends_chunk_without_status_and_never_sends_key(
    tmp_path: Path,
) -> None:
    """The resumable-upload conversation itself, recorded by a minimal upload endpoint.

    The local server always answers with X-Goog-Upload-Status, so this endpoint stands in for
    a service that once forgets it: the SDK re-sends such a chunk, and so must the client.
    """
    data = bytes(range(256)) * (GRANULE * 5 // 2 // 256)  # 2.5 granules: two chunks and a half
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    received: list[tuple[dict[str, str], bytes]] = []
    answered_without_status = False

    async def start(request: web.Request) -> web.Response:
        received.append((dict(request.headers), await request.read()))
        upload_url = f"http://{request.host}/resumable/upload-123?upload_id=abc"
        granularity = {"X-Goog-Upload-Chunk-Granularity": str(GRANULE)}
        return web.Response(headers={"X-Goog-Upload-URL": upload_url} | granularity)

    async def chunk(request: web.Request) -> web.Response:
        nonlocal answered_without_status
        body = await request.read()
        received.append((dict(request.headers), body))
        if not answered_without_status and request.headers["X-Goog-Upload-Offset"] == str(GRANULE):
            answered_without_status = True
            return web.Response(status=200)  # no X-Goog-Upload-Status: the client re-sends
        if "finalize" in request.headers["X-Goog-Upload-Command"]:
            resource = {"name": "files/abc", "uri": "u", "mimeType": "application/octet-stream"}
            resource |= {"sizeBytes": str(len(data)), "state": "ACTIVE"}
            return web.json_response({"file": resource}, headers={"X-Goog-Upload-Status": "final"})
        return web.Response(headers={"X-Goog-Upload-Status": "active"})

    app = web.Application()
    app.router.add_post("/upload/v1beta/files", start)
    app.router.add_post("/resumable/upload-123", chunk)
    async with scripted_endpoint(app) as base_url, GeminiClient(KEY, base_url=base_url) as client:
        info = await client.upload_file(
            path, "application/octet-stream", display_name="blob", chunk_size=GRANULE
        )

    assert info.size_bytes == len(data)
    start_headers, start_body = received[0]
    assert start_headers["x-goog-api-key"] == KEY
    assert start_headers["X-Goog-Upload-Protocol"] == "resumable"
    assert start_headers["X-Goog-Upload-Command"] == "start"
    assert start_headers["X-Goog-Upload-Header-Content-Length"] == str(len(data))
    assert start_headers["X-Goog-Upload-Header-Content-Type"] == "application/octet-stream"
    assert json.loads(start_body) == {"file": {"display_name": "blob"}}
    chunks = received[1:]
    assert [(h["X-Goog-Upload-Offset"], h["X-Goog-Upload-Command"]) for h, _ in chunks] == [
        ("0", "upload"),
        (str(GRANULE), "upload"),
        (str(GRANULE), "upload"),  # re-sent after the answer without a status
        (str(2 * GRANULE), "upload, finalize"),
    ]
    assert all("x-goog-api-key" not in {k.lower() for k in h} for h, _ in chunks)
    assert chunks[0][1] + chunks[2][1] + chunks[3][1] == data


async def test_answers_the_local_server_never_gives(tmp_path: Path) -> None:
    """A FAILED file, a 200 with a cut body, an upload refused mid-way (scripted endpoint)."""

    async def failed_file(request: web.Request) -> web.Response:
        resource = {"name": "files/bad", "uri": "u", "mimeType": "image/png", "sizeBytes": "3"}
        resource |= {"state": "FAILED", "error": {"code": 3, "message": "cannot decode image"}}
        return web.json_response(resource)

    async def cut_body(request: web.Request) -> web.Response:
        return web.Response(text='{"candidates": [{"content": {"parts": [{"te', status=200)

    async def start(request: web.Request) -> web.Response:
        headers = {"X-Goog-Upload-URL": f"http://{request.host}/chunks"}
        return web.Response(headers=headers | {"X-Goog-Upload-Chunk-Granularity": str(GRANULE)})

    async def refuse_chunk(request: web.Request) -> web.Response:
        body = {"error": {"code": 400, "message": "offset mismatch", "status": "INVALID_ARGUMENT"}}
        return web.json_response(body, status=400, headers={"X-Goog-Upload-Status": "active"})

    app = web.Application()
    app.router.add_get("/v1beta/files/bad", failed_file)
    app.router.add_post("/v1beta/models/{action}", cut_body)
    app.router.add_post("/upload/v1beta/files", start)
    app.router.add_post("/chunks", refuse_chunk)
    async with scripted_endpoint(app) as base_url, GeminiClient(KEY, base_url=base_url) as client:
        with pytest.raises(GeminiError) as failed:
            await client.wait_until_active("files/bad", poll_interval=0.01)
        with pytest.raises(GeminiError) as cut:
            await client.generate_content(GenerateRequest(model=MODEL_25, prompt="hi"))
        with pytest.raises(GeminiError) as refused:
            await client.upload_file(bytes(GRANULE + 10), "image/png")

    assert (failed.value.code, failed.value.status) == (None, "FAILED_PRECONDITION")
    assert "cannot decode image" in failed.value.message and not failed.value.retryable
    assert (cut.value.code, cut.value.status, cut.value.retryable) == (None, "DATA_LOSS", True)
    assert (refused.value.code, refused.value.message) == (400, "offset mismatch")


# -------------------------------------------------------------------------------- client basics


def test_api_key_from_env_prefers_google_key_and_warns_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The SDK's get_env_api_key: GOOGLE_API_KEY first, a warning when both are set."""
    _warn_both_keys_set.cache_clear()
    monkeypatch.setenv("GOOGLE_API_KEY", "google-key")
    monkeypatch.setenv("GEMINI_API_KEY", "gemini-key")
    with caplog.at_level(logging.WARNING, logger="pipeline.gemini.client"):
        assert api_key_from_env() == "google-key"
        assert api_key_from_env() == "google-key"
    warnings = [r.getMessage() for r in caplog.records if "GOOGLE_API_KEY" in r.getMessage()]
    assert warnings == ["Both GOOGLE_API_KEY and GEMINI_API_KEY are set. Using GOOGLE_API_KEY."]
    assert "google-key" not in caplog.text and "gemini-key" not in caplog.text
    monkeypatch.delenv("GOOGLE_API_KEY")
    assert api_key_from_env() == "gemini-key"
    monkeypatch.delenv("GEMINI_API_KEY")
    assert api_key_from_env() is None


def test_client_repr_hides_key_and_defaults_to_real_endpoint() -> None:
    client = GeminiClient(KEY)
    assert client.base_url == DEFAULT_BASE_URL == "https://generativelanguage.googleapis.com"
    assert KEY not in repr(client) and KEY not in str(client)
    assert "api_key=set" in repr(client)


async def test_connection_pool_is_sized_to_max_connections(server: LocalServer) -> None:
    async with connect(server, max_connections=8) as client:
        assert client._transport.session().connector.limit == 8  # the shared session's pool


# ------------------------------------------------------------------------ wire mapping (pure)


def test_generate_content_body_puts_images_before_text_and_maps_settings() -> None:
    request = GenerateRequest(
        model="models/gemini-2.5-flash",
        prompt="find things",
        images=(
            ImagePart("image/jpeg", b"\xff\xd8jpeg"),
            ImagePart("image/png", file_uri="https://host/v1beta/files/abc", resolution="low"),
        ),
        system_instruction="Return JSON only.",
        response_mime_type="application/json",
        response_json_schema={"type": "array"},
        temperature=0.5,
        max_output_tokens=512,
        thinking_budget=0,
        media_resolution="medium",
    )
    body = build_generate_content_body(request)
    assert body["contents"] == [
        {
            "role": "user",
            "parts": [
                {"inline_data": {"mime_type": "image/jpeg", "data": "/9hqcGVn"}},
                {
                    "file_data": {
                        "mime_type": "image/png",
                        "file_uri": "https://host/v1beta/files/abc",
                    },
                    "mediaResolution": {"level": "MEDIA_RESOLUTION_LOW"},
                },
                {"text": "find things"},
            ],
        }
    ]
    assert body["systemInstruction"] == {"parts": [{"text": "Return JSON only."}]}
    assert body["generationConfig"] == {
        "responseMimeType": "application/json",
        "responseJsonSchema": {"type": "array"},
        "temperature": 0.5,
        "maxOutputTokens": 512,
        "thinkingConfig": {"thinkingBudget": 0},
        "mediaResolution": "MEDIA_RESOLUTION_MEDIUM",
    }
    level_body = build_generate_content_body(
        GenerateRequest(model=MODEL_3, prompt="p", thinking_level="minimal")
    )
    assert level_body["generationConfig"] == {"thinkingConfig": {"thinkingLevel": "MINIMAL"}}


def test_interaction_body_text_first_store_false_and_response_format() -> None:
    request = GenerateRequest(
        model=MODEL_3,
        prompt="find things",
        images=(
            ImagePart("image/png", b"png!"),
            ImagePart("image/webp", file_uri="https://host/files/x", resolution="ultra_high"),
        ),
        system_instruction="Be brief.",
        response_mime_type="application/json",
        response_schema={"type": "ARRAY", "items": {"type": "STRING"}},
        temperature=1.0,
        max_output_tokens=100,
        thinking_level="minimal",
        media_resolution="medium",
    )
    assert build_interaction_body(request) == {
        "model": MODEL_3,
        "input": [
            {
                "type": "user_input",
                "content": [
                    {"type": "text", "text": "find things"},
                    {
                        "type": "image",
                        "mime_type": "image/png",
                        "data": "cG5nIQ==",
                        "resolution": "medium",
                    },
                    {
                        "type": "image",
                        "mime_type": "image/webp",
                        "uri": "https://host/files/x",
                        "resolution": "ultra_high",
                    },
                ],
            }
        ],
        "store": False,
        "system_instruction": "Be brief.",
        "response_format": {
            "type": "text",
            "mime_type": "application/json",
            "schema": {"type": "array", "items": {"type": "string"}},  # JSON Schema
        },
        "generation_config": {
            "temperature": 1.0,
            "max_output_tokens": 100,
            "thinking_level": "minimal",
        },
    }
    plain = build_interaction_body(GenerateRequest(model=MODEL_3, prompt="hi"))
    assert plain["store"] is False
    assert "response_format" not in plain and "generation_config" not in plain
    # Interactions has no thinking budget: refused, never silently dropped.
    with pytest.raises(ValueError, match="thinking_budget"):
        build_interaction_body(replace(request, thinking_level=None, thinking_budget=0))


def test_parse_generate_content_skips_thoughts_and_reads_usage() -> None:
    body = json.dumps(
        {
            "candidates": [
                {
                    "content": {
                        "role": "model",
                        "parts": [
                            {"text": "Let me look at the image...", "thought": True},
                            {"text": '[{"box_2d": [1, 2, 3, 4],'},
                            {"text": ' "label": "cat"}]'},
                        ],
                    },
                    "finishReason": "STOP",
                }
            ],
            "usageMetadata": {
                "promptTokenCount": 1300,
                "candidatesTokenCount": 20,
                "thoughtsTokenCount": 55,
                "totalTokenCount": 1375,
                "promptTokensDetails": [
                    {"modality": "TEXT", "tokenCount": 10},
                    {"modality": "IMAGE", "tokenCount": 1290},
                ],
            },
        }
    )
    response = parse_generate_content(body)
    assert response.text == '[{"box_2d": [1, 2, 3, 4], "label": "cat"}]'
    assert response.finish_reason == "STOP"
    assert response.block_reason is None
    assert response.usage.prompt_tokens == 1300
    assert response.usage.output_tokens == 20
    assert response.usage.thoughts_tokens == 55
    assert response.usage.total_tokens == 1375
    assert response.usage.prompt_by_modality == {"TEXT": 10, "IMAGE": 1290}
    assert response.raw == body


def test_parse_generate_content_blocked_prompt_and_cut_answer() -> None:
    blocked = parse_generate_content(
        '{"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 7}}'
    )
    assert (blocked.text, blocked.finish_reason, blocked.block_reason) == ("", None, "SAFETY")
    assert blocked.usage.prompt_tokens == 7 and blocked.usage.total_tokens == 0
    cut = parse_generate_content(
        '{"candidates": [{"content": {"parts": [{"text": "[{\\"box_2d\\": [1,"}]},'
        ' "finishReason": "MAX_TOKENS"}]}'
    )
    assert (cut.text, cut.finish_reason) == ('[{"box_2d": [1,', "MAX_TOKENS")
    with pytest.raises(ValueError):
        parse_generate_content("[]")


def test_parse_interaction_joins_trailing_model_outputs_and_maps_status() -> None:
    body = json.dumps(
        {
            "id": "v1_abc",
            "status": "completed",
            "steps": [
                {"type": "user_input", "content": [{"type": "text", "text": "hi"}]},
                {"type": "thought", "summary": [{"type": "text", "text": "thinking..."}]},
                {"type": "model_output", "content": [{"type": "text", "text": "draft"}]},
                {"type": "thought", "signature": "c2ln"},
                {
                    "type": "model_output",
                    "content": [{"type": "text", "text": "[]"}, {"type": "text", "text": " "}],
                },
            ],
            "usage": {
                "total_input_tokens": 1130,
                "total_output_tokens": 3,
                "total_thought_tokens": 40,
                "total_tokens": 1173,
                "input_tokens_by_modality": [
                    {"modality": "text", "tokens": 10},
                    {"modality": "image", "tokens": 1120},
                ],
            },
        }
    )
    response = parse_interaction(body)
    assert response.text == "draft[] "  # every trailing model_output step, thoughts skipped
    assert response.finish_reason == "STOP"
    assert response.usage.prompt_tokens == 1130
    assert response.usage.output_tokens == 3
    assert response.usage.thoughts_tokens == 40
    assert response.usage.total_tokens == 1173
    assert response.usage.prompt_by_modality == {"TEXT": 10, "IMAGE": 1120}
    assert response.raw == body

    expected = {
        "incomplete": "MAX_TOKENS",
        "budget_exceeded": "MAX_TOKENS",
        "requires_continuation": "CONTINUATION",  # only when not continued to the end
        "failed": "OTHER",
        "cancelled": "OTHER",
        "in_progress": None,
    }
    for status, finish_reason in expected.items():
        parsed = parse_interaction(json.dumps({"status": status, "steps": []}))
        assert (parsed.text, parsed.finish_reason) == ("", finish_reason)


async def test_parse_response_rereads_stored_answers_of_both_flavors(client: GeminiClient) -> None:
    png = ImagePart("image/png", rectangle_png())
    for flavor, model in (("generateContent", MODEL_25), ("interactions", MODEL_3)):
        live = await client.generate(detect_request(png, model=model), flavor=flavor)
        assert parse_response(live.raw) == live, flavor


def test_error_parsing_reads_retry_info_quota_and_reason() -> None:
    body = json.dumps(
        {
            "error": {
                "code": 429,
                "message": "You exceeded your current quota.",
                "status": "RESOURCE_EXHAUSTED",
                "details": [
                    {
                        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                        "violations": [
                            {
                                "quotaMetric": "generativelanguage.googleapis.com/requests",
                                "quotaId": "GenerateRequestsPerMinutePerProjectPerModel",
                            }
                        ],
                    },
                    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "17s"},
                ],
            }
        }
    )
    error = error_from_response(429, body)
    assert (error.code, error.status, error.retry_delay) == (429, "RESOURCE_EXHAUSTED", 17.0)
    assert error.quota == "GenerateRequestsPerMinutePerProjectPerModel"
    assert error.retryable
    assert "retry in 17s" in str(error)

    key_error = error_from_response(
        400,
        '{"error": {"code": 400, "message": "API key not valid.", "status": "INVALID_ARGUMENT",'
        ' "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",'
        ' "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]}}',
    )
    assert (key_error.status, key_error.reason, key_error.retryable) == (
        "INVALID_ARGUMENT",
        "API_KEY_INVALID",
        False,
    )

    half = error_from_response(
        503,
        '{"error": {"code": 503, "status": "UNAVAILABLE", "message": "overloaded", "details":'
        ' [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "0.5s"}]}}',
    )
    assert (half.retry_delay, half.retryable) == (0.5, True)


def test_error_parsing_interactions_codes_and_non_json_bodies() -> None:
    interactions = error_from_response(
        429,
        '{"error": {"code": "rate_limit_exceeded", "message": "slow down"}}',
        {"Retry-After": "3"},
    )
    assert (interactions.status, interactions.message) == ("rate_limit_exceeded", "slow down")
    assert (interactions.retry_delay, interactions.retryable) == (3.0, True)

    html = error_from_response(502, "<html><body>Bad Gateway</body></html>")
    assert (html.status, html.retryable) == ("UNAVAILABLE", True)
    assert "Bad Gateway" in html.message
    empty = error_from_response(404, "")
    assert (empty.status, empty.retryable) == ("NOT_FOUND", False)
    for code, retryable in [(400, False), (401, False), (403, False), (408, True), (500, True)]:
        assert error_from_response(code, "{}").retryable is retryable


def test_gemini_error_pickles_with_all_fields() -> None:
    partial = parse_interaction('{"status": "requires_continuation", "steps": []}')
    error = GeminiError(
        429,
        "RESOURCE_EXHAUSTED",
        "slow",
        retry_delay=2.5,
        reason="R",
        quotas=("PerMinute", "GenerateRequestsPerDayPerProjectPerModel"),
        partial=partial,
    )
    copy = pickle.loads(pickle.dumps(error))
    assert repr(copy) == repr(error)
    assert (copy.kind, copy.quotas, copy.partial) == (error.kind, error.quotas, partial)
    assert copy.kind == "daily_quota" and not copy.retryable
    transport = GeminiError(None, "UNAVAILABLE", "reset")
    assert transport.kind == "transport"
    assert transport.retryable and "no HTTP answer" in str(transport)
    failed = GeminiError(None, "FAILED_PRECONDITION", "file FAILED", kind="failed_precondition")
    assert not failed.retryable
