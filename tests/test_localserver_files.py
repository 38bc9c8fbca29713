"""The Files API over loopback: the resumable protocol as the SDK speaks it (chunks in multiples
of the announced granularity), files.get / list / delete, and the files' lifecycle (PROCESSING,
ACTIVE, expired: 403)."""

from __future__ import annotations

import base64
import hashlib
import io
import json

from PIL import Image

from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer
from tests.conftest import Clock
from tests.localserver_support import (
    DETECT,
    GRANULARITY,
    KEY,
    answer_text,
    draw_scene,
    generate,
    start_upload,
    upload,
)


def big_png() -> bytes:
    """The shapes as an uncompressed PNG: about 443 KB, so two chunks of the granularity."""
    image = Image.open(io.BytesIO(draw_scene()[0]))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=0)
    return buffer.getvalue()


def chunk_headers(command: str, offset: int) -> dict[str, str]:
    return {"X-Goog-Upload-Command": command, "X-Goog-Upload-Offset": str(offset)}


async def test_resumable_upload_in_chunks_then_get_use_delete(server, http):
    data = big_png()
    assert GRANULARITY < len(data) < 2 * GRANULARITY
    file = await upload(http, server, data)  # one full chunk, then the finalizing rest
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
    assert server.stats()["requests"]["POST /upload/v1beta/files"] == {"200": 3}


async def test_a_non_final_chunk_off_the_granularity_is_refused_and_the_session_lives(server, http):
    data = big_png()
    url = await start_upload(http, server, len(data))
    async with http.post(url, data=data[:4096], headers=chunk_headers("upload", 0)) as r:
        assert r.status == 400
        assert r.headers["X-Goog-Upload-Status"] == "active"
        error = (await r.json())["error"]
        assert (error["code"], error["status"]) == (400, "INVALID_ARGUMENT")
        assert error["message"] == (
            "Invalid request. The number of bytes uploaded is required to be a multiple of "
            "262144, except for the final request. The received request contained 4096 bytes, "
            "which does not meet this requirement."
        )
    async with http.post(url, headers={"X-Goog-Upload-Command": "query"}) as r:
        assert r.headers["X-Goog-Upload-Size-Received"] == "0"  # nothing was kept
    async with http.post(
        url, data=data[: 2 * GRANULARITY - 1], headers=chunk_headers("upload", 0)
    ) as r:
        assert r.status == 400  # more than one granule but not a multiple either
    async with http.post(url, data=data, headers=chunk_headers("upload, finalize", 0)) as r:
        assert r.status == 200  # the final chunk may have any size
        assert (await r.json())["file"]["sizeBytes"] == str(len(data))
    assert server.stats()["refused_by_rule"] == {"upload.chunk-granularity": 2}


async def test_upload_protocol_errors(server, http):
    url = await start_upload(http, server, 10)
    async with http.post(url, data=b"abc", headers=chunk_headers("upload", 5)) as r:
        assert r.status == 400 and r.headers["X-Goog-Upload-Status"] == "active"
    async with http.post(url, headers={"X-Goog-Upload-Command": "query"}) as r:
        assert r.headers["X-Goog-Upload-Size-Received"] == "0"
    finalize = chunk_headers("upload, finalize", 0)
    async with http.post(url, data=b"short", headers=finalize) as r:
        assert r.status == 400 and r.headers["X-Goog-Upload-Status"] == "final"
    async with http.post(url, data=b"0123456789", headers=finalize) as r:
        assert r.status == 404  # the session ended with the failed finalize
    headers = {"x-goog-api-key": KEY, "X-Goog-Upload-Protocol": "multipart"}
    async with http.post(f"{server.base_url}/upload/v1beta/files", headers=headers) as r:
        assert r.status == 400


async def test_the_start_body_is_a_file_resource(server, http):
    headers = {
        "x-goog-api-key": KEY,
        "X-Goog-Upload-Protocol": "resumable",
        "X-Goog-Upload-Command": "start",
        "X-Goog-Upload-Header-Content-Length": "10",
    }
    url = f"{server.base_url}/upload/v1beta/files"
    async with http.post(
        url, json={"file": {"displayName": "x", "colour": "red"}}, headers=headers
    ) as r:
        assert r.status == 400
        assert (await r.json())["error"]["message"] == (
            "Invalid JSON payload received. Unknown name \"colour\" at 'file': Cannot find field."
        )
    named = {"file": {"name": "files/my-shapes", "mime_type": "image/png", "size_bytes": 10}}
    await start_upload(http, server, 10, body=named)


async def test_file_lifecycle_processing_active_expired(http):
    clock = Clock()
    options = ServerOptions(file_processing_seconds=30, file_ttl_seconds=3600)
    async with LocalServer(options, clock=clock) as server:
        data, _ = draw_scene()
        file = await upload(http, server, data)
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
        clock.now += 3600  # expired: the service answers 403 PERMISSION_DENIED from now on
        async with http.get(f"{server.base_url}/v1beta/{file['name']}", headers=headers) as r:
            assert r.status == 403
            assert (await r.json())["error"]["status"] == "PERMISSION_DENIED"
        status, answer = await generate(http, server, body)
        assert status == 403
        assert answer["error"]["message"] == (
            f"You do not have permission to access the File {file['name'][6:]} or it may not exist."
        )
        assert server.stats()["files"] == {"stored": 0, "deleted": 0, "expired": 1}


async def test_list_files_pages_newest_first(http):
    clock = Clock()
    async with LocalServer(ServerOptions(), clock=clock) as server:
        names = []
        for i in range(5):
            clock.now += 1
            names.append((await upload(http, server, bytes([i]) * 10))["name"])
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
