"""The Files API surface: the resumable upload protocol and files.get / list / delete.

Upload, as the SDK does it (files.upload, _api_client.upload_file): `POST /upload/{v}/files`
with `X-Goog-Upload-Protocol: resumable`, `X-Goog-Upload-Command: start` and the size announces
the file; the answer gives `X-Goog-Upload-URL` (the credential for the chunks: no key needed) and
`X-Goog-Upload-Chunk-Granularity: 262144`. Chunks go to that URL with `upload` (every non-final
chunk a multiple of the granularity, rule upload.chunk-granularity) and `upload, finalize` on the
last; every chunk's answer says `X-Goog-Upload-Status: active` or `final`, errors included. The
store and the files' lifecycle (PROCESSING, ACTIVE, expiry) are files.py.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from pipeline.localserver import errors
from pipeline.localserver.core import Core
from pipeline.localserver.errors import ApiError
from pipeline.localserver.fields import CREATE_FILE_REQUEST
from pipeline.localserver.files import MAX_FILE_BYTES, UploadSession, file_name_id
from pipeline.localserver.spec import check, get

# X-Goog-Upload-Chunk-Granularity (docs/gemini-api.md § Files API)
CHUNK_GRANULARITY = 256 * 1024
READ_BLOCK = 1 << 20  # how much of a chunk is read from the socket at a time


class FilesSurface:
    """Routes of the Files API over the server's FileStore."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.files = core.files

    def routes(self, app: web.Application, version: str) -> None:
        app.router.add_post(f"/upload/{version}/files", self.upload)
        app.router.add_get(f"/{version}/files", self.list)
        app.router.add_get(f"/{version}/files/{{id}}", self.get)
        app.router.add_delete(f"/{version}/files/{{id}}", self.delete)

    async def upload(self, request: web.Request) -> web.Response:
        upload_id = request.query.get("upload_id")
        try:
            if upload_id is None:
                return await self._start(request, request.match_info["version"])
            session = self.files.upload(upload_id)
            if session is None:
                raise errors.not_found(
                    "The upload session was not found or has ended.", rule="upload.session"
                )
            return await self._chunk(request, session)
        except ApiError as exc:
            alive = upload_id is not None and self.files.upload(upload_id) is not None
            exc.headers.setdefault("X-Goog-Upload-Status", "active" if alive else "final")
            raise

    async def get(self, request: web.Request) -> web.Response:
        self.core.check_key(request)
        file_id = request.match_info["id"]
        stored = self.files.get(file_id)
        if stored is None:
            raise errors.file_not_found(file_id)
        return web.json_response(self.files.resource(stored))

    async def list(self, request: web.Request) -> web.Response:
        self.core.check_key(request)
        size = request.query.get("pageSize") or request.query.get("page_size") or "0"
        token = request.query.get("pageToken") or request.query.get("page_token")
        try:
            files, next_token = self.files.page(int(size), token)
        except ValueError as exc:
            raise errors.invalid_argument(
                str(exc), rule="upload.protocol", field="page_token"
            ) from None
        body: dict[str, Any] = {}
        if files:
            body["files"] = [self.files.resource(f) for f in files]
        if next_token:
            body["nextPageToken"] = next_token
        return web.json_response(body)

    async def delete(self, request: web.Request) -> web.Response:
        self.core.check_key(request)
        file_id = request.match_info["id"]
        if not self.files.delete(file_id):
            raise errors.file_not_found(file_id)
        return web.json_response({})

    # ------------------------------------------------------------------------------ upload

    async def _start(self, request: web.Request, version: str) -> web.Response:
        self.core.check_key(request)
        headers = request.headers
        protocol = headers.get("X-Goog-Upload-Protocol", "").lower()
        command = headers.get("X-Goog-Upload-Command", "").lower()
        if protocol != "resumable" or command != "start":
            raise _protocol_error(
                "The local server takes resumable uploads only: send X-Goog-Upload-Protocol: "
                "resumable and X-Goog-Upload-Command: start."
            )
        body = await self.core.body(request, required=False)
        check(body, CREATE_FILE_REQUEST, version=version)
        file = get(body, "file", {})
        size = _declared_size(headers.get("X-Goog-Upload-Header-Content-Length"), file)
        mime = headers.get("X-Goog-Upload-Header-Content-Type") or get(file, "mime_type")
        base = f"{request.scheme}://{request.host}"
        session = self.files.start_upload(
            size,
            str(mime or "application/octet-stream"),
            get(file, "display_name"),
            self._requested_id(get(file, "name")),
            f"{base}/{version}",
        )
        url = f"{base}/upload/{version}/files?upload_id={session.id}&upload_protocol=resumable"
        return web.Response(
            headers={
                "X-Goog-Upload-URL": url,
                "X-Goog-Upload-Status": "active",
                "X-Goog-Upload-Control-URL": url,
                "X-Goog-Upload-Chunk-Granularity": str(CHUNK_GRANULARITY),
            }
        )

    def _requested_id(self, name: str | None) -> str | None:
        if not name:
            return None
        file_id = file_name_id(name)
        if file_id is None:
            raise _protocol_error(
                "A file name must be 'files/' then up to 40 lowercase letters, digits or dashes."
            )
        if self.files.get(file_id) is not None:
            raise ApiError(
                409,
                "ALREADY_EXISTS",
                f"File files/{file_id} already exists.",
                rule="upload.protocol",
            )
        return file_id

    async def _chunk(self, request: web.Request, session: UploadSession) -> web.Response:
        header = request.headers.get("X-Goog-Upload-Command", "")
        commands = {c.strip().lower() for c in header.split(",")}
        if "cancel" in commands:
            self.files.cancel_upload(session)
            return web.Response(headers={"X-Goog-Upload-Status": "cancelled"})
        if "query" in commands:
            return _active(session)
        if not commands & {"upload", "finalize"}:
            raise _protocol_error(
                "X-Goog-Upload-Command must be upload, 'upload, finalize', query or cancel."
            )
        if "upload" in commands:
            _check_offset(request.headers.get("X-Goog-Upload-Offset"), session)
            data = await self._read_chunk(request, session)
            if "finalize" not in commands:
                _check_granularity(len(data))
            self.files.add_chunk(session, data)
        if "finalize" not in commands:
            return _active(session)
        return self._finalize(session)

    async def _read_chunk(self, request: web.Request, session: UploadSession) -> bytes:
        """The chunk's bytes; more than the size declared at the start ends the session."""
        room = session.size - len(session.received)
        data = bytearray()
        async for block in request.content.iter_chunked(READ_BLOCK):
            data += block
            if len(data) > room:
                self.files.cancel_upload(session)
                raise errors.invalid_argument(
                    f"More bytes than the {session.size} declared at the start of the upload.",
                    rule="upload.offset",
                )
        return bytes(data)

    def _finalize(self, session: UploadSession) -> web.Response:
        if len(session.received) != session.size:
            self.files.cancel_upload(session)
            raise errors.invalid_argument(
                f"The upload ended after {len(session.received)} bytes; {session.size} were "
                "declared.",
                rule="upload.offset",
            )
        stored = self.files.finish_upload(session)
        return web.json_response(
            {"file": self.files.resource(stored)}, headers={"X-Goog-Upload-Status": "final"}
        )


def _declared_size(header: str | None, file: dict[str, Any]) -> int:
    try:
        size = int(header or get(file, "size_bytes", ""))
    except ValueError:
        size = -1
    if size < 0:
        raise _protocol_error(
            "X-Goog-Upload-Header-Content-Length must give the file's size in bytes."
        )
    if size > MAX_FILE_BYTES:
        raise _protocol_error(f"The file is larger than {MAX_FILE_BYTES} bytes.")
    return size


def _check_offset(header: str | None, session: UploadSession) -> None:
    received = len(session.received)
    try:
        offset = int(header or "")
    except ValueError:
        raise _protocol_error("X-Goog-Upload-Offset is required.") from None
    if offset != received:
        raise ApiError(
            400,
            "INVALID_ARGUMENT",
            f"X-Goog-Upload-Offset {offset} does not match the {received} bytes received.",
            rule="upload.offset",
            headers={"X-Goog-Upload-Size-Received": str(received)},
        )


def _check_granularity(size: int) -> None:
    if size % CHUNK_GRANULARITY:
        raise errors.invalid_argument(
            f"Invalid request. The number of bytes uploaded is required to be a multiple of "
            f"{CHUNK_GRANULARITY}, except for the final request. The received request "
            f"contained {size} bytes, which does not meet this requirement.",
            rule="upload.chunk-granularity",
        )


def _active(session: UploadSession) -> web.Response:
    return web.Response(
        headers={
            "X-Goog-Upload-Status": "active",
            "X-Goog-Upload-Size-Received": str(len(session.received)),
        }
    )


def _protocol_error(message: str) -> ApiError:
    return errors.invalid_argument(message, rule="upload.protocol")
