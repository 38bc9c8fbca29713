"""Files API: uploads at the service's real chunk granularity, and downloads.

The bundled local server may not announce X-Goog-Upload-Chunk-Granularity yet, so a minimal
resumable-upload endpoint (a real aiohttp handler over loopback, not a mock of the client)
announces and enforces it as the real service does: 256 KiB, every non-final chunk a multiple.
"""

from __future__ import annotations

import base64
import hashlib
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from pipeline.gemini import GeminiClient, GeminiError
from pipeline.gemini.files import chunk_size_for
from tests.test_client import GRANULE, KEY, connect, scripted_endpoint, serve


class GranularUploads:
    """A resumable-upload endpoint that announces a granularity and refuses chunks off it."""

    def __init__(self, granule: int | None = GRANULE) -> None:
        self.granule = granule
        self.size = 0
        self.received = bytearray()
        self.chunks: list[tuple[int, int, str]] = []  # (offset, length, command)
        self.chunk_headers: list[dict[str, str]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/upload/v1beta/files", self.start)
        app.router.add_post("/resumable/session-1", self.chunk)
        return app

    async def start(self, request: web.Request) -> web.Response:
        assert request.headers["x-goog-api-key"] == KEY
        self.size = int(request.headers["X-Goog-Upload-Header-Content-Length"])
        headers = {"X-Goog-Upload-URL": f"http://{request.host}/resumable/session-1?upload_id=s1"}
        headers["X-Goog-Upload-Status"] = "active"
        if self.granule:
            headers["X-Goog-Upload-Chunk-Granularity"] = str(self.granule)
        return web.Response(headers=headers)

    async def chunk(self, request: web.Request) -> web.Response:
        self.chunk_headers.append(dict(request.headers))
        body = await request.read()
        offset = int(request.headers["X-Goog-Upload-Offset"])
        command = request.headers["X-Goog-Upload-Command"]
        self.chunks.append((offset, len(body), command))
        final = "finalize" in command
        if self.granule and not final and len(body) % self.granule:
            error = {
                "code": 400,
                "status": "INVALID_ARGUMENT",
                "message": "chunk size not a multiple",
            }
            return web.json_response(
                {"error": error}, status=400, headers={"X-Goog-Upload-Status": "active"}
            )
        self.received += body
        if not final:
            return web.Response(headers={"X-Goog-Upload-Status": "active"})
        resource: dict[str, Any] = {"name": "files/granular", "uri": "u", "state": "ACTIVE"}
        resource |= {"mimeType": "image/png", "sizeBytes": str(len(self.received))}
        return web.json_response({"file": resource}, headers={"X-Goog-Upload-Status": "final"})


@asynccontextmanager
async def upload_endpoint(uploads: GranularUploads) -> AsyncIterator[GeminiClient]:
    async with (
        scripted_endpoint(uploads.app()) as base_url,
        GeminiClient(KEY, base_url=base_url) as client,
    ):
        yield client


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def test_chunk_size_rounds_down_to_the_granularity() -> None:
    assert chunk_size_for(8 * 1024 * 1024, GRANULE) == 8 * 1024 * 1024  # the SDK's default
    assert chunk_size_for(300 * 1024, GRANULE) == GRANULE
    assert chunk_size_for(4096, GRANULE) == GRANULE  # at least one granule
    assert chunk_size_for(3 * GRANULE + 5, GRANULE) == 3 * GRANULE
    assert chunk_size_for(4096, None) == 4096  # nothing announced: as asked
    with pytest.raises(ValueError):
        chunk_size_for(0, GRANULE)


@pytest.mark.parametrize("requested", [300 * 1024, 4096])
async def test_upload_chunks_are_multiples_of_the_announced_granularity(
    tmp_path: Path, requested: int
) -> None:
    data = random_bytes(700 * 1024, seed=5)  # 2.7 granules
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    uploads = GranularUploads()

    async with upload_endpoint(uploads) as client:
        info = await client.upload_file(path, "image/png", chunk_size=requested)

    lengths = [length for _, length, _ in uploads.chunks]
    assert lengths == [GRANULE, GRANULE, 700 * 1024 - 2 * GRANULE]
    assert [offset for offset, _, _ in uploads.chunks] == [0, GRANULE, 2 * GRANULE]
    assert [command for _, _, command in uploads.chunks][-1] == "upload, finalize"
    assert bytes(uploads.received) == data and info.size_bytes == len(data)
    assert all("x-goog-api-key" not in {k.lower() for k in h} for h in uploads.chunk_headers)


async def test_upload_of_an_exact_multiple_finalizes_with_its_last_full_chunk() -> None:
    data = random_bytes(2 * GRANULE, seed=6)
    uploads = GranularUploads()
    async with upload_endpoint(uploads) as client:
        await client.upload_file(data, "image/png", chunk_size=GRANULE)
    assert uploads.chunks == [(0, GRANULE, "upload"), (GRANULE, GRANULE, "upload, finalize")]


async def test_upload_without_announced_granularity_uses_the_requested_size() -> None:
    data = random_bytes(GRANULE + 10, seed=7)
    uploads = GranularUploads(granule=None)
    async with upload_endpoint(uploads) as client:
        await client.upload_file(data, "image/png", chunk_size=GRANULE)
    assert [length for _, length, _ in uploads.chunks] == [GRANULE, 10]


async def test_multi_granule_upload_to_the_local_server_round_trips(tmp_path: Path) -> None:
    data = random_bytes(3 * GRANULE + 1234, seed=8)
    path = tmp_path / "noise.bin"
    path.write_bytes(data)
    async with serve() as server, connect(server) as client:
        uploaded = await client.upload_file(path, "image/png", chunk_size=GRANULE)
        fetched = await client.get_file(uploaded.name)
    assert uploaded.size_bytes == fetched.size_bytes == len(data)
    assert fetched.sha256_hash == uploaded.sha256_hash
    assert uploaded.sha256_hash is not None
    digest = hashlib.sha256(data).hexdigest().encode()
    assert uploaded.sha256_hash == base64.b64encode(digest).decode()


async def test_upload_url_in_clear_text_to_another_host_is_refused() -> None:
    async def start(request: web.Request) -> web.Response:
        return web.Response(headers={"X-Goog-Upload-URL": "http://uploads.example.com/u?id=1"})

    app = web.Application()
    app.router.add_post("/upload/v1beta/files", start)
    async with scripted_endpoint(app) as base_url, GeminiClient(KEY, base_url=base_url) as client:
        with pytest.raises(GeminiError) as caught:
            await client.upload_file(b"bytes", "image/png")
    assert caught.value.kind == "redirect" and "uploads.example.com" in caught.value.message


# ------------------------------------------------------------------------------- download


async def test_download_file_gets_alt_media_with_the_key() -> None:
    results = b'{"key": "a", "response": {}}\n{"key": "b", "error": {"code": 3}}\n'
    seen: list[tuple[str, str, str | None]] = []

    async def download(request: web.Request) -> web.Response:
        seen.append((request.path, request.query_string, request.headers.get("x-goog-api-key")))
        if request.match_info["name"] != "batch-abc:download":
            body = {"error": {"code": 404, "status": "NOT_FOUND", "message": "no such file"}}
            return web.json_response(body, status=404)
        return web.Response(body=results, content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/download/v1beta/files/{name}", download)
    async with scripted_endpoint(app) as base_url, GeminiClient(KEY, base_url=base_url) as client:
        assert await client.download_file("files/batch-abc") == results
        with pytest.raises(GeminiError) as caught:
            await client.download_file("batch-nope")
    assert seen[0] == ("/download/v1beta/files/batch-abc:download", "alt=media", KEY)
    assert caught.value.kind == "not_found" and not caught.value.retryable
