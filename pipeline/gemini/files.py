"""Files API pieces that need no connection: resource JSON -> FileInfo, and upload chunking.

Chunks come from disk through aiofiles in fixed sizes, so an upload never holds more than one
chunk of the file in memory whatever the file's size. The size is the caller's (8 MiB, the SDK's
CHUNK_SIZE, by default) rounded down to the granularity the upload start answer announces.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import aiofiles
import aiofiles.os

from pipeline.gemini.types import FileInfo
from pipeline.gemini.wire import field

DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024  # the SDK's chunk size


def parse_file_info(obj: Any) -> FileInfo:
    """A File resource (`{"name": "files/abc", "uri": ..., ...}`) as FileInfo."""
    if not isinstance(obj, dict) or not obj.get("name"):
        raise ValueError("a File resource needs a name")
    size = field(obj, "sizeBytes", "size_bytes")  # int64: a JSON string on the wire
    return FileInfo(
        name=str(obj["name"]),
        uri=str(obj.get("uri") or ""),
        mime_type=str(field(obj, "mimeType", "mime_type") or ""),
        size_bytes=int(size) if size is not None else 0,
        state=str(obj.get("state") or "STATE_UNSPECIFIED"),
        expiration_time=field(obj, "expirationTime", "expiration_time"),
        sha256_hash=field(obj, "sha256Hash", "sha256_hash"),
        display_name=field(obj, "displayName", "display_name"),
    )


def parse_json_object(body: str) -> dict[str, Any]:
    document = json.loads(body)
    if not isinstance(document, dict):
        raise ValueError("expected a JSON object")
    return document


def parse_upload_answer(body: str) -> FileInfo:
    """The finalize answer: `{"file": {...}}` (a bare File resource is taken too)."""
    document = parse_json_object(body)
    return parse_file_info(document.get("file", document))


def parse_file_page(body: str) -> tuple[list[FileInfo], str | None]:
    """One page of files.list: its files and the next page's token (None on the last page)."""
    document = parse_json_object(body)
    files = document.get("files") or []
    if not isinstance(files, list):
        raise ValueError("'files' must be a list")
    token = document.get("nextPageToken") or document.get("next_page_token")
    return [parse_file_info(item) for item in files], str(token) if token else None


def file_id(name: str) -> str:
    """ "files/abc" or "abc" (or a full file URI) -> "abc", for building resource paths."""
    return name.rstrip("/").rsplit("/", 1)[-1]


async def source_size(source: str | os.PathLike[str] | bytes) -> int:
    if isinstance(source, bytes | bytearray | memoryview):
        return len(source)
    return (await aiofiles.os.stat(source)).st_size


async def read_chunks(
    source: str | os.PathLike[str] | bytes, chunk_size: int
) -> AsyncGenerator[bytes, None]:
    """The source's bytes in chunks of `chunk_size` (the last may be shorter)."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if isinstance(source, bytes | bytearray | memoryview):
        view = memoryview(source)
        for start in range(0, len(view), chunk_size):
            yield bytes(view[start : start + chunk_size])
        return
    async with aiofiles.open(source, "rb") as handle:
        while chunk := await handle.read(chunk_size):
            yield chunk


def chunk_size_for(requested: int, granularity: int | None) -> int:
    """The chunk size to send: `requested` rounded down to a multiple of the service's
    X-Goog-Upload-Chunk-Granularity (256 KiB on the real service), at least one granule, since
    every chunk but the last must be such a multiple."""
    if requested <= 0:
        raise ValueError(f"chunk_size must be positive, got {requested}")
    if not granularity or granularity <= 0:
        return requested
    return max(granularity, requested // granularity * granularity)


def granularity(headers: Mapping[str, str]) -> int | None:
    """X-Goog-Upload-Chunk-Granularity of an upload start answer; None when absent or unreadable."""
    try:
        value = int(headers.get("X-Goog-Upload-Chunk-Granularity", ""))
    except ValueError:
        return None
    return value if value > 0 else None
