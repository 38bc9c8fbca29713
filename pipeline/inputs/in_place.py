"""gs:// objects Vertex AI reads in place: identified and measured without being downloaded.

On Vertex AI (`[api] backend = "vertex"`, `[images] mode = "auto"`) a gs:// object goes as
`fileData {fileUri: "gs://..."}` when it can be sent as it is stored, and then nothing of it is
downloaded by the pipeline:

- whether it can is decided from its first bytes, one ranged GET of HEAD_BYTES (more, up to
  MAX_HEAD_BYTES, only when its header runs past them), by `prepare`'s own rule for sending a
  file as it is (`images.sent_as_is`: a format Gemini takes, no EXIF rotation, no `max_side`
  shrink, not CMYK), and by Vertex's size limit for an object (IN_PLACE_LIMIT);
- its key is made from what the listing said of its bytes (`stores.content_id`: the md5Hash,
  or a composite object's crc32c, size and generation) where a file's is the sha256 of its
  bytes (`content_sha256`);
- its width and height (the token estimate, the coordinates) are its header's;
- the engine's read-ahead passes it by (`ImageRunner.prefetch`), and `run --plan` / `estimate`
  measure it the same way (pipeline/run/plan.py), so they key it as the run does.

Anything else (a shrink, a conversion, a rotation, a format Vertex does not take, a listing
that gave no content id) is downloaded and prepared as anywhere, keyed by the sha256 of its
bytes; if the prepared bytes are the object's own it still goes in place (`sent_as_stored`).

Not downloaded also means not verified: a file corrupt past its header is Vertex's to refuse
(its 400 becomes the row's error), where a downloaded one is checked by `prepare` first. Nor is
a PNG's eXIf chunk seen when it sits after the pixels (the header holds only those before them):
such a PNG goes in place unrotated, where `prepare` with `[images] verify` finds the chunk and
turns the image (as `images.measure`, which counts it as unrotated too).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Awaitable, Callable

from pipeline.config import Config
from pipeline.inputs import images
from pipeline.inputs.fetch import FetchError
from pipeline.locations import scheme_of
from pipeline.records import ImageItem, SourceFile

# JPEG's EXIF and ICC segments, PNG's IHDR, HEIF's meta box and WebP's first chunk all sit within
# the first 64 KiB of nearly every file; a header past it (a big ICC profile, a HEIF whose meta
# box follows its pixels) is read again 16 times longer, and past MAX_HEAD_BYTES downloaded.
HEAD_BYTES = 64 << 10
MAX_HEAD_BYTES = HEAD_BYTES * 16
# Vertex reads an image of at most 30 MB from Cloud Storage (the image-understanding page's
# "Maximum file size per file from Google Cloud Storage"); counted in decimal MB, to be safe.
IN_PLACE_LIMIT = 30_000_000
# Tags an object's content id before it is hashed, so an object's identity is never a file's.
_TAG = b"gemini-vision-pipeline gs object\0"

ReadHead = Callable[[SourceFile, int], Awaitable[bytes]]


def wanted(config: Config, src: SourceFile) -> bool:
    """Whether `src` goes in place if it is sent as stored: a gs:// object on Vertex AI, with
    `[images] mode = "auto"` (where "inline" is asked for, its bytes are sent)."""
    vertex = config.api.backend == "vertex" and config.images.mode == "auto"
    return vertex and scheme_of(src.path) == "gs" and not src.error


def by_metadata(config: Config, src: SourceFile) -> bool:
    """Whether `src` is measured from its header and keyed by its metadata (`measured`): it may
    go in place, and its listing said what its bytes are."""
    return wanted(config, src) and bool(src.content_id) and 0 < src.size <= IN_PLACE_LIMIT


def content_sha256(content_id: str) -> str:
    """The identity of an object sent in place, where a file's is the sha256 of its bytes: a
    64-hex digest as the key, the resume index and the reuse tiers expect."""
    return hashlib.sha256(_TAG + content_id.encode()).hexdigest()


def sent_as_stored(config: Config, item: ImageItem, data: bytes | None) -> bool:
    """Whether a downloaded object, prepared, still goes in place: `prepare` sent its bytes as
    they were read (`data`, the very object), and Vertex may read it."""
    if data is None or item.data is not data or item.error:
        return False
    return wanted(config, item.source) and len(data) <= IN_PLACE_LIMIT


async def measured(read_head: ReadHead, src: SourceFile, max_side: int | None) -> ImageItem | None:
    """The item of an object that goes in place, from its header alone (`in_place` set, keyed
    by its content id); an item carrying `error` when its header cannot be read; None when it
    must be downloaded and prepared (it changes when sent, or its header is too long)."""
    found = await _header(read_head, src)
    if not isinstance(found, images.Header):
        return found
    return _item(src, found) if found.as_is(max_side) else None


async def _header(read_head: ReadHead, src: SourceFile) -> images.Header | ImageItem | None:
    """The object's Header from the fewest bytes that hold it; an error item when the object
    cannot be read or is no image `header` reads; None past MAX_HEAD_BYTES."""
    size = HEAD_BYTES
    while True:
        try:
            head = await read_head(src, size)
        except FetchError as exc:
            return ImageItem(source=src, error=str(exc), retryable=exc.retryable)
        try:
            return images.header(io.BytesIO(head), head)
        except Exception as exc:  # decoders raise anything on hostile bytes; the row survives
            whole = len(head) >= src.size or len(head) < size
            if whole or images.sniff(head) is None:
                return ImageItem(source=src, error=images.header_failure(head, exc))
            if size >= MAX_HEAD_BYTES:
                return None  # a header this long is rare: the whole file says what it is
            size *= 16


def _item(src: SourceFile, found: images.Header) -> ImageItem:
    width, height = found.width, found.height
    return ImageItem(
        source=src,
        sha256=content_sha256(src.content_id),
        mime_type=found.mime,
        width=width,
        height=height,
        sent_width=width,
        sent_height=height,
        send_size=src.size,
        in_place=True,
    )
