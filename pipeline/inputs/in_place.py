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

A PNG may carry its eXIf chunk after its pixels (the PNG 1.2 extension let it), where its
header does not: `prepare` with `[images] verify` finds it there and turns the image. So with
`verify`, a PNG with no eXIf chunk before its pixels (`prepare` reads that one alone) has its
chunks after the pixels walked (pipeline/inputs/pngtail.py, each one's CRC checked): in the
first range when that holds the whole object, else in a second one read from its end
(pngtail.TAIL_BYTES; up to MAX_TAIL_BYTES when that does not tell them). One turned by such a
chunk, or whose ranges do not tell, is downloaded and prepared like a file, so the same image
gets the same answer read in place or from a local copy (but for an eXIf chunk between IDAT
chunks, which the PNG spec forbids: pngtail.py). `images.measure` (the plan's, the estimate's)
reads the same ranges of a file, so it sizes such a PNG turned too.

Not downloaded also means not verified: a file corrupt past its header is Vertex's to refuse
(its 400 becomes the row's error), where a downloaded one is checked by `prepare` first.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Awaitable, Callable

from pipeline.config import Config, ImagesConfig
from pipeline.inputs import images, pngtail
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

ReadRange = Callable[[SourceFile, int, int], Awaitable[bytes]]  # bytes [start, end) of an object


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


async def measured(read: ReadRange, src: SourceFile, options: ImagesConfig) -> ImageItem | None:
    """The item of an object that goes in place, from its header (and a PNG's tail) alone
    (`in_place` set, keyed by its content id); an item carrying `error` when its header cannot
    be read; None when it must be downloaded and prepared (it changes when sent, or its header
    is too long, or its chunks after the pixels are not told by a range)."""
    found = await _header(read, src)
    if not isinstance(found, tuple):
        return found
    header, head = found
    if not header.as_is(options.max_side):
        return None
    if options.verify and header.tail_may_turn:
        return await _unturned_png(read, src, header, head)
    return _item(src, header)


async def _header(
    read: ReadRange, src: SourceFile
) -> tuple[images.Header, bytes] | ImageItem | None:
    """The object's Header and the fewest first bytes that hold it; an error item when the
    object cannot be read or is no image `header` reads; None past MAX_HEAD_BYTES."""
    size = HEAD_BYTES
    while True:
        try:
            head = await read(src, 0, size)
        except FetchError as exc:
            return _unread(src, exc)
        try:
            return images.header(io.BytesIO(head), head), head
        except Exception as exc:  # decoders raise anything on hostile bytes; the row survives
            whole = len(head) >= src.size or len(head) < size
            if whole or images.sniff(head) is None:
                return ImageItem(source=src, error=images.header_failure(head, exc))
            if size >= MAX_HEAD_BYTES:
                return None  # a header this long is rare: the whole file says what it is
            size *= 16


async def _unturned_png(
    read: ReadRange, src: SourceFile, header: images.Header, head: bytes
) -> ImageItem | None:
    """A PNG's item when no eXIf chunk after its pixels turns it; None when one does, or its
    ranges do not tell (a longer tail is read first: pngtail.tail_sizes)."""
    for size in pngtail.tail_sizes(len(head), src.size):
        try:
            return _item(src, header) if await _upright(read, src, head, size) else None
        except FetchError as exc:
            return _unread(src, exc)
        except pngtail.NotTold:
            continue
    return None  # rare: the whole file, prepared, says what it is


async def _upright(read: ReadRange, src: SourceFile, head: bytes, size: int) -> bool:
    """Whether no eXIf chunk after the PNG's pixels turns it, told from `head` and its last
    `size` bytes (none read when `head` is the whole object); raises NotTold, FetchError."""
    tail = await read(src, src.size - size, src.size) if size else b""
    return images.exif_orientation(pngtail.late_exif(head, tail, src.size)) == 1


def _unread(src: SourceFile, exc: FetchError) -> ImageItem:
    return ImageItem(source=src, error=str(exc), retryable=exc.retryable)


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
