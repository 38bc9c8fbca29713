"""A Cloud Storage JSON API over the `--gs-root` folders: what gcsfs asks of a bucket when the
pipeline walks and reads gs:// inputs, and writes and deletes a batch job's staged objects (set
`STORAGE_EMULATOR_HOST` to the server's URL, as for Google's own emulators).

- `GET /storage/v1/b/{bucket}` — the bucket;
- `GET /storage/v1/b/{bucket}/o?prefix=&delimiter=/` — one folder's objects and sub-prefixes;
- `GET /storage/v1/b/{bucket}/o/{object}` — an object's metadata;
- `GET /download/storage/v1/b/{bucket}/o/{object}?alt=media` — its bytes, or with a `Range:
  bytes=a-b` header those bytes (206), counted apart in /local/stats (`storage.object_gets`:
  whole objects, `storage.range_gets`, `storage.range_bytes`): a test can tell what the pipeline
  downloaded, and what it only read the header of, from what the Vertex surface read in place
  (`vertex.gs_reads`);
- `POST /upload/storage/v1/b/{bucket}/o?uploadType=media&name=` (the body is the object),
  `=multipart` (a JSON part naming it, then its bytes: gcsfs's `simple_upload`) and `=resumable`
  (a session URL in `Location`, then the bytes in `Content-Range` chunks POSTed or PUT to it:
  gcsfs's `initiate_upload` / `upload_chunk`), counted (`storage.object_puts`); an object is
  written whole (a temporary file renamed) when its last byte came;
- `DELETE /storage/v1/b/{bucket}/o/{object}` (gcsfs's `_rm_file`);
- `ifGenerationMatch` on a media or multipart upload and on a delete: 412 unless the object's
  generation is that one (`0`: no such object), what the project's gs:// outputs create and
  compare-and-swap by (pipeline/output/stores.py `_GcsWrites`).

`--storage-fault OP=STATUS[xN]` makes the first N uploads, downloads, listings or deletes (all of
them without xN) answer that HTTP status with a JSON API error body, counted
(`storage.faults`): what a staging prefix whose store refuses or fails looks like to gcsfs.

`--storage-stall OP[xN]` makes the first N such requests (all of them without xN) stall, counted
(`storage.stalls`): an upload's body is taken and no answer sent, a download's headers and half
its bytes are sent and then nothing, a listing or delete is never answered — until the client
gives up (closing the connection ends the handler) or the server stops: what a connection that
hangs looks like to gcsfs.

No auth (the double's buckets are test folders); the object resource carries what gcsfs turns
into `size`, `mtime` and `generation`, and the object's `md5Hash` (base64, as the JSON API
writes it). No composite objects (which have a `crc32c` and no md5Hash) are made here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from pipeline.localserver.core import Core

STORAGE = "/storage/v1/b/{bucket}"
UPLOAD = "/upload/storage/v1/b/{bucket}/o"
_RANGE = re.compile(r"bytes (?:(?P<first>\d+)-(?P<last>\d+)|\*)/(?P<total>\d+|\*)")


class StorageSurface:
    """The Cloud Storage routes (see the module docstring)."""

    def __init__(self, core: Core) -> None:
        self.roots = {bucket: Path(root).resolve() for bucket, root in core.options.gs_root}
        self.object_gets = 0
        self.range_gets = 0
        self.range_bytes = 0
        self.object_puts = 0
        self.lists = 0
        self.sessions: dict[str, tuple[str, str, bytearray]] = {}  # resumable: bucket, name, data
        # --storage-fault: operation -> (status, failures left; None: every request)
        self.failing = {op: (status, n or None) for op, status, n in core.options.storage_fault}
        self.faults = 0
        # --storage-stall: operation -> stalls left (None: every request)
        self.stalling = {op: n or None for op, n in core.options.storage_stall}
        self.stalls = 0
        self.closing = core.answerer.closing  # set when the server stops: a stall ends

    def routes(self, app: web.Application, _versions: str) -> None:
        app.router.add_get(STORAGE, self.bucket)
        app.router.add_get(f"{STORAGE}/o", self.list_objects)
        app.router.add_get(f"{STORAGE}/o/{{name:.+}}", self.get_object)
        app.router.add_get(f"/download{STORAGE}/o/{{name:.+}}", self.download)
        app.router.add_post(UPLOAD, self.upload)
        app.router.add_put(UPLOAD, self.upload)
        app.router.add_delete(f"{STORAGE}/o/{{name:.+}}", self.delete)

    def snapshot(self) -> dict[str, Any]:
        counts: tuple[str, ...] = ("object_gets", "range_gets", "range_bytes", "object_puts")
        counts += ("lists", "faults", "stalls")
        return {"storage": {name: getattr(self, name) for name in counts}}

    async def upload(self, request: web.Request) -> web.Response:
        """media, multipart, a resumable session's start, or one of its chunks."""
        bucket, query = request.match_info["bucket"], request.query
        if (failed := self._failed("upload")) is not None:
            return failed
        if self._stalled("upload"):
            await request.read()  # the whole body taken, then no answer
            return await self._silence()
        self._root(bucket)
        if "upload_id" in query:
            return await self._chunk(request, query["upload_id"])
        kind = query.get("uploadType", "media")
        if kind == "resumable":
            return await self._start(request, bucket)
        data = await request.read()
        name = query.get("name", "")
        if kind == "multipart":
            name, data = _multipart(request.headers, data)
        self._precondition(bucket, name, query)
        return self._put(bucket, name, data)

    async def _start(self, request: web.Request, bucket: str) -> web.Response:
        body = await request.read()
        meta = json.loads(body) if body else {}
        name = request.query.get("name") or meta.get("name", "")
        upload_id = secrets.token_hex(8)
        self.sessions[upload_id] = (bucket, name, bytearray())
        where = request.url.with_query({"uploadType": "resumable", "upload_id": upload_id})
        return web.Response(headers={"Location": str(where)})

    async def _chunk(self, request: web.Request, upload_id: str) -> web.Response:
        """A chunk at its offset; 308 with the Range held until the last byte came."""
        bucket, name, data = self.sessions[upload_id]
        found = _RANGE.fullmatch(request.headers.get("Content-Range", ""))
        chunk = await request.read()
        if found and found["first"] is not None:
            data[int(found["first"]) :] = chunk
        total = found["total"] if found else "*"
        if total == "*" or len(data) < int(total):
            return web.Response(status=308, headers={"Range": f"bytes=0-{len(data) - 1}"})
        del self.sessions[upload_id]
        return self._put(bucket, name, bytes(data))

    def _put(self, bucket: str, name: str, data: bytes) -> web.Response:
        root = self._root(bucket)
        path = (root / name).resolve()
        if not name or not path.is_relative_to(root) or path == root:
            raise web.HTTPBadRequest(text='{"error": {"code": 400, "message": "Bad name"}}')
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
        partial.write_bytes(data)
        os.replace(partial, path)
        self.object_puts += 1
        return web.json_response(_resource(bucket, root, path))

    async def delete(self, request: web.Request) -> web.Response:
        if (failed := self._failed("delete")) is not None:
            return failed
        if self._stalled("delete"):
            return await self._silence()
        bucket, name = request.match_info["bucket"], request.match_info["name"]
        path = self._object(bucket, name)
        self._precondition(bucket, name, request.query)
        path.unlink()
        return web.Response(status=204)

    async def bucket(self, request: web.Request) -> web.Response:
        bucket = request.match_info["bucket"]
        self._root(bucket)
        return web.json_response({"kind": "storage#bucket", "name": bucket, "id": bucket})

    async def list_objects(self, request: web.Request) -> web.Response:
        """One level under `prefix` (gcsfs lists a folder at a time, delimiter "/"), or every
        object whose name starts with it (no delimiter: gcsfs's `find`)."""
        bucket = request.match_info["bucket"]
        if (failed := self._failed("list")) is not None:
            return failed
        if self._stalled("list"):
            return await self._silence()
        root, prefix = self._root(bucket), request.query.get("prefix", "")
        self.lists += 1
        if not request.query.get("delimiter"):
            found = sorted(p for p in root.rglob("*") if p.is_file())
            items = [_resource(bucket, root, p) for p in found]
            items = [item for item in items if item["name"].startswith(prefix)]
            return web.json_response({"kind": "storage#objects", "items": items})
        folder = (root / prefix).resolve()
        inside = folder.is_relative_to(root) and folder.is_dir()
        entries = sorted(folder.iterdir()) if inside else []
        items = [_resource(bucket, root, p) for p in entries if p.is_file()]
        prefixes = [f"{p.relative_to(root).as_posix()}/" for p in entries if p.is_dir()]
        return web.json_response({"kind": "storage#objects", "items": items, "prefixes": prefixes})

    async def get_object(self, request: web.Request) -> web.Response:
        bucket = request.match_info["bucket"]
        path = self._object(bucket, request.match_info["name"])
        return web.json_response(_resource(bucket, self._root(bucket), path))

    async def download(self, request: web.Request) -> web.StreamResponse:
        if (failed := self._failed("download")) is not None:
            return failed
        path = self._object(request.match_info["bucket"], request.match_info["name"])
        data = path.read_bytes()
        if self._stalled("download"):
            return await self._cut_short(request, data)
        span = _byte_range(request.headers.get("Range", ""), len(data))
        if span is None:
            self.object_gets += 1
            return web.Response(body=data, content_type="application/octet-stream")
        start, end = span
        self.range_gets += 1
        self.range_bytes += end - start
        headers = {"Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}
        return web.Response(
            status=206,
            body=data[start:end],
            headers=headers,
            content_type="application/octet-stream",
        )

    def _failed(self, operation: str) -> web.Response | None:
        """The injected answer of `operation`, while its failures last (--storage-fault)."""
        status, left = self.failing.get(operation, (0, 0))
        if left == 0:
            return None
        self.failing[operation] = (status, None if left is None else left - 1)
        self.faults += 1
        message = f"Injected storage fault ({operation})"
        if status == 400:  # as GCS words a bad request (gcsfs raises a ValueError for it)
            message += ": invalid argument"
        body = {"error": {"code": status, "message": message}}
        return web.json_response(body, status=status)

    def _stalled(self, operation: str) -> bool:
        """Whether this request of `operation` stalls (--storage-stall), counted."""
        if operation not in self.stalling or self.stalling[operation] == 0:
            return False
        left = self.stalling[operation]
        self.stalling[operation] = None if left is None else left - 1
        self.stalls += 1
        return True

    async def _silence(self) -> web.Response:
        """No answer until the server stops (a client that gives up first closes the
        connection, which ends this handler: the server runs with handler_cancellation)."""
        await self.closing.wait()
        raise web.HTTPServiceUnavailable()

    async def _cut_short(self, request: web.Request, data: bytes) -> web.StreamResponse:
        """The headers of the whole object and half of its bytes, then nothing more."""
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = len(data)
        await response.prepare(request)
        await response.write(data[: len(data) // 2])
        await self.closing.wait()
        return response

    def _precondition(self, bucket: str, name: str, query: Any) -> None:
        """`ifGenerationMatch`: 412 unless the object's generation is that one ("0": absent),
        checked and acted on with no await between (one request at a time)."""
        wanted = query.get("ifGenerationMatch")
        if wanted is None:
            return
        path = self._root(bucket) / name
        generation = str(path.stat().st_mtime_ns) if path.is_file() else "0"
        if generation != wanted:
            body = '{"error": {"code": 412, "message": "Precondition Failed"}}'
            raise web.HTTPPreconditionFailed(text=body, content_type="application/json")

    def _root(self, bucket: str) -> Path:
        root = self.roots.get(bucket)
        if root is None:
            raise web.HTTPNotFound(text='{"error": {"code": 404, "message": "No such bucket"}}')
        return root

    def _object(self, bucket: str, name: str) -> Path:
        root = self._root(bucket)
        path = (root / name).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise web.HTTPNotFound(text='{"error": {"code": 404, "message": "No such object"}}')
        return path


def _byte_range(header: str, size: int) -> tuple[int, int] | None:
    """[start, end) of a `Range: bytes=a-b` (or `bytes=a-`) header within `size` bytes; None
    for no header, one the double does not read, or `bytes=0-` (the whole object)."""
    found = re.fullmatch(r"bytes=(\d+)-(\d*)", header.strip())
    if found is None or found[0] == "bytes=0-":
        return None
    start = int(found[1])
    end = min(size, int(found[2]) + 1) if found[2] else size
    return min(start, end), end


def _multipart(headers: Any, data: bytes) -> tuple[str, bytes]:
    """(name, bytes) of a multipart/related upload: its JSON part, then the object's part."""
    boundary = headers.get("Content-Type", "").partition("boundary=")[2].strip('"') or "==0=="
    marker = f"--{boundary}".encode()
    parts = [p for p in data.split(marker) if p.strip() not in (b"", b"--")]
    if len(parts) < 2:
        raise web.HTTPBadRequest(text='{"error": {"code": 400, "message": "Bad multipart"}}')
    meta = json.loads(_part_body(parts[0]))
    return str(meta.get("name", "")), _part_body(parts[1])


def _part_body(part: bytes) -> bytes:
    """A part without its headers and the line break before the next boundary."""
    body = re.split(rb"\r?\n\r?\n", part.lstrip(b"\r\n"), maxsplit=1)[-1]
    return body[:-2] if body.endswith(b"\r\n") else body[:-1] if body.endswith(b"\n") else body


def _resource(bucket: str, root: Path, path: Path) -> dict[str, Any]:
    """The object resource: its name, size, update time and MD5 as the JSON API writes them."""
    stat = path.stat()
    md5 = base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()
    updated = datetime.fromtimestamp(stat.st_mtime, UTC).isoformat().replace("+00:00", "Z")
    return {
        "kind": "storage#object",
        "bucket": bucket,
        "name": path.relative_to(root).as_posix(),
        "size": str(stat.st_size),
        "updated": updated,
        "timeCreated": updated,
        "generation": str(stat.st_mtime_ns),
        "metageneration": "1",
        "contentType": "application/octet-stream",
        "md5Hash": md5,
    }
