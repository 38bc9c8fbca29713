"""Make a found file ready to send to Gemini: hash it, sniff it, orient it, maybe convert it.

Rules (why in each docstring below):

- The format comes from the bytes (`sniff`), never from the file name.
- PNG, JPEG, WEBP, HEIC and HEIF that need no rotation and no downscale are sent as they are
  (`data` is None, the file streams from disk); everything else Pillow reads (GIF first frame,
  BMP, TIFF, ICO, PPM, AVIF, ...) is converted to PNG.
- EXIF orientation is applied, so `width`/`height` and every coordinate Gemini returns refer to
  the image as displayed. `max_side` downscales what is sent; `width`/`height` stay those of the
  original because coordinates come back normalised to 0-1000.
- Bad input never raises and never loses the row: the item carries `error` with a short reason,
  and `sha256` whenever the bytes could be read.
- A JPEG that is downscaled is decoded once, at the smallest DCT scale still no smaller than the
  target, then resized once and encoded once: near the cost of one entropy decode.
- `Preparation` splits the work where the decode's memory is known (`decode_bytes`), so that a
  caller can admit it against a budget before the pixels exist (pipeline/run/decodes.py).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import stat
import struct
import threading
import warnings
import zlib
from collections.abc import Generator
from dataclasses import dataclass
from typing import IO

import pillow_heif
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

from pipeline.inputs import pngtail, resample
from pipeline.records import ImageItem, SourceFile

SUPPORTED_MIME = ("image/png", "image/jpeg", "image/webp", "image/heic", "image/heif")

JPEG_QUALITY = 95  # re-encoded photos: visually lossless, still far smaller than PNG
PNG_COMPRESS_LEVEL = 1  # zlib level: most of the size win at a fraction of level 6's time
IN_MEMORY_LIMIT = 64 << 20  # files up to this size are read once and decoded from memory
_CHUNK = 1 << 20
_HEAD = 4096  # enough for every signature sniff() knows, SVG prologues included
_MESSAGE_LIMIT = 160

log = logging.getLogger(__name__)

pillow_heif.register_heif_opener()
Image.init()
# Pillow warns (on stderr, at every run) for an image between MAX_IMAGE_PIXELS and twice that; it
# still raises past twice, which stays on. Such an image is decoded under the decode budget and
# logged once (`_note_large`): the raw warning said nothing a user could act on.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# Every reader Pillow has except EPS, which shells out to Ghostscript: not on untrusted files.
_OPEN_FORMATS = tuple(f for f in Image.ID if f != "EPS")

_HEIC_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"}
_HEIF_BRANDS = {b"mif1", b"msf1", b"mif2", b"heif"}
_AVIF_BRANDS = {b"avif", b"avis"}
_BMP_HEADER_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}
_ROTATED = {5, 6, 7, 8}  # orientations that swap width and height
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16"}
_MODE_FOR_PNG = {
    "I": "I;16",
    "I;16B": "I;16",
    "I;16L": "I;16",
    "I;16N": "I;16",
    "F": "I;16",
    "PA": "RGBA",
    "RGBa": "RGBA",
    "RGBX": "RGB",
}
# A JPEG reaches the resize already scaled by its DCT (a clean low-pass to within 2x of the
# target). With the `[photos]` extra OpenCV finishes it (pipeline/inputs/resample.py: a quarter
# of the CPU, about the same quality); without it BICUBIC does, as Image.thumbnail does: on a
# 12-MP photo-like JPEG to 1536 px it is within 44 dB PSNR / 0.989 SSIM of a full-precision
# LANCZOS reference, for 13 ms less than LANCZOS (48.6 dB, 0.997) and 13 ms more than BILINEAR
# (39.5 dB, 0.962, visibly softer). Measured by `scripts/bench.py prepare` (docs/benchmarks.md).
# Other formats keep LANCZOS.
_JPEG_RESIZE = (Image.Resampling.BICUBIC, 2.0)
_OTHER_RESIZE = (Image.Resampling.LANCZOS, 3.0)
# Decode memory, for the budget: Pillow keeps RGB, RGBA, CMYK and 32-bit modes in 4 bytes a
# pixel, and each step (convert, resize, transpose) makes its image beside its input.
_PIXEL_BYTES = 4
_COPIES = 2
_COEFFICIENT_BYTES = 2  # a progressive JPEG holds every DCT coefficient, 16-bit, until its end
_MODE_FOR_RESIZE = {"1": "L"}  # Pillow resizes "1" and "P" with NEAREST whatever you ask
_SAME_COLOURS = {"RGB", "RGBA", "RGBX", "P", "PA"}  # an RGB ICC profile still fits after convert
_NON_IMAGES = (
    (b"%PDF-", "pdf"),
    (b"PK\x03\x04", "zip archive"),
    (b"\x1f\x8b", "gzip data"),
    (b"ID3", "audio"),
    (b"OggS", "audio or video"),
    (b"\x1aE\xdf\xa3", "video"),
)


class SourceChangedError(OSError):
    """The file's bytes differ from those prepare() hashed: its key would describe other bytes."""


# What prepare's steps yield: the bytes the decode to come will hold (one pause at most), before
# any pixel is decoded; what they return: the prepared item.
Steps = Generator[int, None, ImageItem]


def sniff(head: bytes) -> str | None:
    """The image MIME type the first bytes announce, or None. Never looks at a file name.

    HEIF-family files are told apart by their `ftyp` brands: HEVC brands are `image/heic`, the
    generic `mif1`/`msf1` ones `image/heif`, AV1 ones `image/avif` (Gemini does not take AVIF).
    """
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[4:8] == b"ftyp":
        return _sniff_ftyp(head)
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "image/tiff"
    if head[:2] == b"BM" and len(head) >= 18 and _le32(head, 14) in _BMP_HEADER_SIZES:
        return "image/bmp"
    if head[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00") and head[4:6] not in (b"", b"\0\0"):
        return "image/x-icon"
    if re.match(rb"P[1-7][ \t\r\n#]", head[:3]):
        return "image/x-portable-anymap"
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "image/jp2"
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")):
        return "image/jxl"
    if head[:4] == b"8BPS":
        return "image/vnd.adobe.photoshop"
    if head[:4] == b"qoif":
        return "image/qoi"
    if head[:4] == b"DDS ":
        return "image/vnd-ms.dds"
    if head[:4] == b"icns":
        return "image/icns"
    if _is_svg(head):
        return "image/svg+xml"
    return None


def _le32(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 4], "little")


def _sniff_ftyp(head: bytes) -> str | None:
    box_size = int.from_bytes(head[:4], "big")
    major = head[8:12]
    compatible = {head[i : i + 4] for i in range(16, min(box_size, len(head)) - 3, 4)}
    if major in _HEIC_BRANDS:
        return "image/heic"
    if major in _AVIF_BRANDS:
        return "image/avif"
    if major in _HEIF_BRANDS:
        if compatible & _HEIC_BRANDS:
            return "image/heic"
        if compatible & _AVIF_BRANDS:
            return "image/avif"
        return "image/heif"
    return None  # mp4, mov, 3gp...: video


def _is_svg(head: bytes) -> bool:
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    return text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text)


def _looks_like_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(head) - 3 and exc.reason == "unexpected end of data"
    return True


def _non_image_kind(head: bytes) -> str:
    for signature, kind in _NON_IMAGES:
        if head.startswith(signature):
            return kind
    if head[4:8] == b"ftyp":
        return "video"
    return "text" if _looks_like_text(head) else "unknown format"


def prepare(
    source: SourceFile,
    *,
    max_side: int | None = None,
    verify: bool = True,
    data: bytes | None = None,
) -> ImageItem:
    """Hash, sniff, orient and, when needed, convert or downscale one file. Never raises for bad
    input (only for a bad `max_side`, a caller's bug): the item carries `error` instead.

    Synchronous on purpose: the runner calls it in a thread (hashlib and Pillow's decoders release
    the GIL). `verify=True` checks every image once, so a truncated or corrupt file becomes an
    error row here instead of a billed request: PNGs by walking their chunks (whole, CRC right,
    through IEND) without inflating the pixels; JPEGs sent as they are by a decode at 1/8 scale
    (it still reads every byte of the entropy-coded data); anything re-encoded by its decode,
    which is the check (no second decode).

    `data`: the bytes of an input that is not a local file (an object, a URL), already fetched;
    they are then what is sent (`item.data`), since there is no file to read again.
    """
    preparation = Preparation(source, max_side=max_side, verify=verify, data=data)
    with preparation:
        preparation.start()
        return preparation.finish()


class Preparation:
    """prepare() in two steps, for a caller that admits each decode's memory first:

        with Preparation(source, ...) as preparation:
            preparation.start()  # read, hash, sniff, header: `decode_bytes` known
            ...                  # wait until `decode_bytes` more may be held
            item = preparation.finish()  # decode, resize, encode (if anything is decoded)

    `start` and `finish` may run in different threads, one after the other; `close` (the `with`)
    releases the file and image when the caller stops in between (a run being stopped).
    """

    def __init__(
        self,
        source: SourceFile,
        *,
        max_side: int | None = None,
        verify: bool = True,
        data: bytes | None = None,
    ) -> None:
        if max_side is not None and max_side < 1:
            raise ValueError(f"max_side must be a positive number of pixels, got {max_side}")
        self._steps = _prepare_steps(source, max_side=max_side, verify=verify, data=data)
        self.item: ImageItem | None = None  # set as soon as the item is ready
        self.decode_bytes = 0  # what the decode `finish` makes will hold; 0: no decode

    def start(self) -> None:
        self._advance()

    def finish(self) -> ImageItem:
        while self.item is None:  # the steps pause once at most: twice through here at most
            self._advance()
        return self.item

    def _advance(self) -> None:
        try:
            self.decode_bytes = next(self._steps)
        except StopIteration as done:
            self.item = done.value
            self.decode_bytes = 0

    def close(self) -> None:
        self._steps.close()

    def __enter__(self) -> Preparation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _prepare_steps(
    source: SourceFile, *, max_side: int | None, verify: bool, data: bytes | None
) -> Steps:
    item = ImageItem(source=source)
    if source.error:
        item.error = source.error
        return item
    if data is not None:
        item.sha256 = hashlib.sha256(data).hexdigest()
        yield from _examine_all(item, io.BytesIO(data), len(data), max_side=max_side, verify=verify)
        if item.data is None and item.error is None:
            item.data = data
        return item
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(source.path, flags)  # O_NONBLOCK: a FIFO cannot hang the worker
    except OSError as exc:
        item.error = f"unreadable file: {_os_reason(exc)}"
        return item
    with open(descriptor, "rb") as file:
        try:
            stats = os.fstat(descriptor)
            if not stat.S_ISREG(stats.st_mode):
                item.error = "not a regular file"
                return item
            data, size = _read_and_hash(file, item, stats.st_size)
        except OSError as exc:
            item.error = f"unreadable file: {_os_reason(exc)}"
            return item
        image_fp: IO[bytes] = io.BytesIO(data) if data is not None else file
        yield from _examine_all(item, image_fp, size, max_side=max_side, verify=verify)
    return item


def _examine_all(
    item: ImageItem, image_fp: IO[bytes], size: int, *, max_side: int | None, verify: bool
) -> Generator[int, None, None]:
    """Everything after the bytes are hashed; never raises for bad input."""
    if size == 0:
        item.error = "empty file"
        return
    image_fp.seek(0)
    head = image_fp.read(_HEAD)
    try:
        yield from _examine(item, image_fp, head, size, max_side=max_side, verify=verify)
    except MemoryError:
        _fail(item, "image too large to decode in memory")
    except Image.DecompressionBombError as exc:
        _fail(item, _too_large(image_fp, head, exc))
    except Exception as exc:  # decoders raise anything on hostile bytes; the row must survive
        _fail(item, _decode_failure(exc))


def measure(
    source: SourceFile,
    *,
    max_side: int | None = None,
    data: bytes | None = None,
    verify: bool = True,
) -> ImageItem:
    """Displayed and sent size from the header and EXIF alone: what `estimate` needs.

    Nothing is hashed, decoded or re-encoded (60 photos with max_side set: 0.13 s, against 9.0 s
    for `prepare`). With `verify`, `prepare` turns a PNG by an eXIf chunk after its pixels, so
    the sizes of a PNG with none before them are told from its last bytes too (`_turned_late`:
    one read of 64 KiB for most PNGs; the whole file only when no tail up to 1 MiB tells).
    `data`: the file's bytes, already read (an object or a URL); else it is opened by its path.
    Never raises for bad input: the item carries `error`.
    """
    item = ImageItem(source=source)
    if source.error:
        item.error = source.error
        return item
    head = b""
    try:
        with io.BytesIO(data) if data is not None else open(source.path, "rb") as file:
            head = file.read(_HEAD)
            found = header(file, head)
            if verify and found.tail_may_turn:
                found = _turned_late(found, file, head)
    except Image.DecompressionBombError as exc:
        item.error = _too_large(io.BytesIO(head), head, exc)
        return item
    except Exception as exc:  # unreadable, not an image, hostile header: the estimate skips it
        item.error = _decode_failure(exc) if not isinstance(exc, OSError) else _os_reason(exc)
        return item
    item.width, item.height = found.width, found.height
    item.sent_width, item.sent_height = _fit(found.width, found.height, max_side) or (
        found.width,
        found.height,
    )
    item.mime_type = found.mime
    return item


def _turned_late(found: Header, file: IO[bytes], head: bytes) -> Header:
    """`found` (a PNG's header) turned as an eXIf chunk after its pixels turns it, told from
    `head` and a tail read after a seek (pngtail.py: the ranges an object in place is read in);
    when no tail tells, from the whole file (rare: a chunk after the pixels past 1 MiB). A file
    whose chunks are broken stays as its header says: `prepare` makes it an error row."""
    size = file.seek(0, io.SEEK_END)
    for tail in dict.fromkeys([*pngtail.tail_sizes(len(head), size), size - len(head)]):
        file.seek(size - tail)
        try:
            return found.turned(exif_orientation(pngtail.late_exif(head, file.read(), size)))
        except pngtail.NotTold:
            continue
    return found


@dataclass(frozen=True, slots=True)
class Header:
    """What an image's header says: its format (sniffed), displayed size, EXIF orientation
    (0: not known from the header), Pillow mode, and whether it is a PNG with no eXIf chunk
    before its pixels, whose orientation (1 here) one after them may still turn (`prepare`
    finds it when it verifies)."""

    mime: str
    width: int
    height: int
    orientation: int
    mode: str
    tail_may_turn: bool = False

    def turned(self, orientation: int) -> Header:
        """This header with the orientation a late eXIf chunk gives (1: as it was)."""
        if orientation == 1:
            return self
        width, height = (self.height, self.width) if orientation in _ROTATED else self.size
        return Header(self.mime, width, height, orientation, self.mode)

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    def as_is(self, max_side: int | None) -> bool:
        """Whether `prepare` would send these bytes as they are (`sent_as_is`)."""
        target = _fit(self.width, self.height, max_side)
        return sent_as_is(self.mime, self.orientation, target, self.mode)


def header(file: IO[bytes], head: bytes) -> Header:
    """The Header of the image in `file` (`head`: its first bytes), from what Pillow reads on
    open; raises what Image.open raises. A WebP cut short (a ranged read) is read from its
    RIFF chunk: Pillow's WebP reader wants the whole file."""
    file.seek(0)
    mime = sniff(head) or ""
    try:
        with Image.open(file, formats=_OPEN_FORMATS) as image:
            orientation, _ = _orientation(image, verify=False)
            width, height, mode = *image.size, image.mode
            late = _exif_may_follow(image)
    except OSError:
        if mime != "image/webp" or (found := _webp_header(head)) is None:
            raise
        return found
    if orientation in _ROTATED:
        width, height = height, width
    return Header(mime, width, height, orientation, mode, late)


def _webp_header(head: bytes) -> Header | None:
    """Size of a WebP from its first chunk (the WebP container spec): VP8X's canvas (its EXIF
    flag, bit 3, leaves the orientation unknown: 0), VP8L's or VP8's frame; None if cut."""
    kind, body = head[12:16], head[20:30]
    if kind == b"VP8X" and len(body) >= 10:
        orientation = 0 if body[0] & 0x08 else 1
        width, height = (
            1 + int.from_bytes(body[4:7], "little"),
            1 + int.from_bytes(body[7:10], "little"),
        )
        return Header("image/webp", width, height, orientation, "RGB")
    if kind == b"VP8L" and len(body) >= 5 and body[0] == 0x2F:
        bits = int.from_bytes(body[1:5], "little")
        return Header("image/webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, 1, "RGB")
    if kind == b"VP8 " and len(body) >= 10 and body[3:6] == b"\x9d\x01\x2a":
        width, height = _le16(body, 6) & 0x3FFF, _le16(body, 8) & 0x3FFF
        return Header("image/webp", width, height, 1, "RGB")
    return None


def _le16(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 2], "little")


def sent_as_is(
    mime: str | None, orientation: int, target: tuple[int, int] | None, mode: str
) -> bool:
    """Bytes `prepare` sends as they are: a format Gemini takes, no EXIF rotation, no downscale,
    not CMYK (many decoders invert Adobe CMYK JPEGs: send RGB instead)."""
    return mime in SUPPORTED_MIME and orientation == 1 and target is None and mode != "CMYK"


def _read_and_hash(file: IO[bytes], item: ImageItem, expected: int) -> tuple[bytes | None, int]:
    """sha256 of the bytes as stored. Small files stay in memory so they are read only once.

    `expected`: the size fstat gave. The first read asks for that, not for IN_MEMORY_LIMIT: a
    read of 64 MB reserves it all and copies the bytes again as it shrinks (~2.5 ms of CPU for a
    5 MB photo). A file that grew since is read on, up to the limit."""
    data = file.read(min(expected, IN_MEMORY_LIMIT) + 1)
    if len(data) > expected:
        data += file.read(IN_MEMORY_LIMIT + 1 - len(data))
    digest = hashlib.sha256(data)
    size = len(data)
    if size > IN_MEMORY_LIMIT:
        data = b""
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    item.sha256 = digest.hexdigest()
    return (data if size <= IN_MEMORY_LIMIT else None), size


def _examine(
    item: ImageItem,
    image_fp: IO[bytes],
    head: bytes,
    size: int,
    *,
    max_side: int | None,
    verify: bool,
) -> Generator[int, None, None]:
    mime = sniff(head)
    try:
        image = Image.open(image_fp, formats=_OPEN_FORMATS)
    except UnidentifiedImageError:
        item.error = _unidentified(head, mime)
        return
    with image:
        _note_large(image)
        orientation, verified = _orientation(image, verify=verify)
        width, height = image.size
        if orientation in _ROTATED:
            width, height = height, width
        item.width, item.height = width, height
        target = _fit(width, height, max_side)
        fed_whole = _feed_whole(image, image_fp, size)
        if sent_as_is(mime, orientation, target, image.mode):
            if verify and not verified:
                yield _scale_for_verify(image) + fed_whole
                image.load()
            item.mime_type = mime or ""
            item.sent_width, item.sent_height = width, height
            item.send_size = size
            return
        stored_target = _stored(target, orientation)
        yield _scale_for_decode(image, stored_target) + fed_whole
        item.data, item.mime_type, (item.sent_width, item.sent_height) = _reencode(
            image, orientation, stored_target, keep_jpeg=mime == "image/jpeg"
        )
        item.send_size = len(item.data)


def _unidentified(head: bytes, mime: str | None) -> str:
    """Why no reader of Pillow's takes bytes that begin with `head` (sniffed as `mime`)."""
    if mime is None:
        return f"not an image ({_non_image_kind(head)})"
    if mime in SUPPORTED_MIME or mime in {"image/gif", "image/bmp", "image/tiff"}:
        return f"corrupt or truncated image: unreadable {mime} header"
    return f"unsupported image format: {mime}"


def header_failure(head: bytes, exc: Exception) -> str:
    """The row's error of an image whose header `header` could not read (`head`: the bytes it
    was given), worded as `prepare` words it."""
    if isinstance(exc, UnidentifiedImageError):
        return _unidentified(head, sniff(head))
    if isinstance(exc, Image.DecompressionBombError):
        return _too_large(io.BytesIO(head), head, exc)
    if isinstance(exc, MemoryError):
        return "image too large to decode in memory"
    return _decode_failure(exc)


def _note_large(image: ImageFile.ImageFile) -> None:
    """Log, once a process, an image past Pillow's MAX_IMAGE_PIXELS (Pillow's own warning is off:
    see the top of this module); past twice that, Image.open has raised already."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or image.size[0] * image.size[1] <= limit or _noted_large.is_set():
        return
    _noted_large.set()
    log.warning(
        "an image of %dx%d pixels is past Pillow's MAX_IMAGE_PIXELS (%d): decoded all the same, "
        "under [images] decode_budget_mb (images past twice that become rows 'image too large')",
        *image.size,
        limit,
    )


_noted_large = threading.Event()  # set once _note_large has logged


def _stored(target: tuple[int, int] | None, orientation: int) -> tuple[int, int] | None:
    """The target as stored in the file, before the EXIF rotation that swaps its sides."""
    if target is None or orientation not in _ROTATED:
        return target
    return target[1], target[0]


def _feed_whole(image: ImageFile.ImageFile, image_fp: IO[bytes], size: int) -> int:
    """Have Pillow hand a JPEG held in memory to libjpeg in one piece; returns the bytes that
    takes (Pillow reads the piece out of the BytesIO: a copy of the file, while it decodes).

    Pillow feeds a decoder 64 KB at a time (`decodermaxblock`, ImageFile.load): each piece is
    copied onto what the last left over, and libjpeg-turbo leaves its fast Huffman path near the
    end of each. In one piece a 12-MP JPEG decodes in 2-4% fewer instructions, pixel for pixel
    the same (callgrind: docs/benchmarks.md). A file past IN_MEMORY_LIMIT is read from disk in
    Pillow's pieces, as before."""
    if image.format not in ("JPEG", "MPO") or not isinstance(image_fp, io.BytesIO):
        return 0
    image.decodermaxblock = size
    return size


def _scale_for_verify(image: ImageFile.ImageFile) -> int:
    """Set up the cheapest decode that still reads every byte (1/8 scale for JPEG); its bytes."""
    if image.format in ("JPEG", "MPO"):
        width, height = image.size
        image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
    return _decode_bytes(image, copies=1)


def _scale_for_decode(image: ImageFile.ImageFile, stored_target: tuple[int, int] | None) -> int:
    """For a JPEG that is downscaled, the smallest DCT scale (1/2, 1/4, 1/8) whose image is
    still no smaller than the target: libjpeg then computes only those pixels, in one decode
    that is also the verification. Returns the bytes the decode and its next step hold."""
    if stored_target is not None and image.format in ("JPEG", "MPO"):
        image.draft(image.mode, stored_target)
    return _decode_bytes(image, copies=_COPIES)


def _decode_bytes(image: ImageFile.ImageFile, *, copies: int) -> int:
    """The memory a decode of `image` at its (drafted) size holds, an estimate from above."""
    width, height = image.size
    held = width * height * _PIXEL_BYTES * copies
    if image.format in ("JPEG", "MPO") and image.info.get("progressive"):
        full_width, full_height = _full_size(image)
        held += full_width * full_height * len(image.getbands()) * _COEFFICIENT_BYTES
    return held


def _full_size(image: ImageFile.ImageFile) -> tuple[int, int]:
    """The stored size before any draft (`draft` makes `size` the scaled one)."""
    scale = image.decoderconfig[0] if image.decoderconfig else 1
    width, height = image.size
    return width * scale, height * scale


def _orientation(image: ImageFile.ImageFile, *, verify: bool) -> tuple[int, bool]:
    """EXIF orientation 1-8 (1 when absent or unreadable: bad metadata must not cost the image),
    and whether the image was verified on the way.

    A PNG's eXIf chunk may sit after the pixels: the PNG check that walks every chunk to verify
    it finds it there, so it is read only when verifying (and the check is not repeated).
    pillow_heif already applies HEIF's own rotation and resets EXIF orientation to 1.
    """
    if _exif_may_follow(image):
        if not verify:
            return 1, False
        # (OSError, SyntaxError: a broken PNG, which the caller turns into an error row)
        return exif_orientation(_verify_png(image)), True
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except OSError:
        raise  # a file cut short (a ranged read's head is read further): the caller's to judge
    except Exception:  # corrupt EXIF raises assorted errors (SyntaxError: no TIFF header): 1
        return 1, False
    return _valid(value), False


def _exif_may_follow(image: ImageFile.ImageFile) -> bool:
    """A PNG with no eXIf chunk before its pixels (Pillow reads one there on open): one after
    them is the orientation `prepare` applies."""
    return image.format == "PNG" and "exif" not in image.info


def exif_orientation(payload: bytes | None) -> int:
    """The orientation an EXIF payload (a PNG's eXIf chunk) gives: 1 when it has none, or none
    is readable (bad metadata must not cost the image)."""
    if payload is None:
        return 1
    exif = Image.Exif()
    try:
        exif.load(payload)
        return _valid(exif.get(ExifTags.Base.Orientation, 1))
    except Exception:  # corrupt EXIF raises assorted errors; treat as "no orientation"
        return 1


def _valid(value: object) -> int:
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _verify_png(image: ImageFile.ImageFile) -> bytes | None:
    """Check every chunk from the first IDAT to IEND: present, whole, CRC right. Returns a late
    eXIf chunk's payload, if any.

    Pillow checked the chunks before the pixels on open. This catches truncated and corrupted
    files without inflating the pixels, which costs twenty times as much for a small PNG.
    """
    fp = image.fp
    assert fp is not None  # an open image, its pixels not loaded: Pillow still holds its file
    fp.seek(image.tile[0][2] - 8)
    exif = None
    while True:
        header = fp.read(8)
        if len(header) < 8:
            raise OSError("truncated PNG file (no IEND chunk)")
        length, kind = struct.unpack(">I4s", header)
        crc = zlib.crc32(kind)
        body = b"" if kind != b"eXIf" else None
        remaining = length
        while remaining:
            piece = fp.read(min(remaining, _CHUNK))
            if not piece:
                raise OSError(f"truncated PNG file (inside a {kind.decode('latin-1')} chunk)")
            crc = zlib.crc32(piece, crc)
            if body is None:
                exif = (exif or b"") + piece
            remaining -= len(piece)
        stored = fp.read(4)
        if len(stored) < 4 or struct.unpack(">I", stored)[0] != crc:
            raise SyntaxError(f"broken PNG file (bad CRC in a {kind.decode('latin-1')} chunk)")
        if kind == b"IEND":
            return exif


def _fit(width: int, height: int, max_side: int | None) -> tuple[int, int] | None:
    """The downscaled size keeping the aspect ratio, or None when no downscale is needed."""
    if max_side is None or max(width, height) <= max_side:
        return None
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _reencode(
    image: ImageFile.ImageFile,
    orientation: int,
    stored_target: tuple[int, int] | None,
    *,
    keep_jpeg: bool,
) -> tuple[bytes, str, tuple[int, int]]:
    """Decode (at the scale `_scale_for_decode` set), convert, downscale to `stored_target` (the
    target before rotation), rotate, and encode what Gemini accepts.

    A JPEG stays JPEG (quality 95, no EXIF, so no reader can rotate it twice): PNG would make a
    photo several times larger for no gain. Everything else becomes PNG: lossless, and it holds
    every mode that matters (palette, alpha, 16-bit grey). The decoded pixels are released as
    soon as the next step has its own copy; the rotation runs on the small image.
    """
    resize = _JPEG_RESIZE if image.format in ("JPEG", "MPO") else _OTHER_RESIZE
    image.load()
    frame, icc_profile = _convert(image, keep_jpeg=keep_jpeg)
    if stored_target is not None and frame.size != stored_target:
        frame, orientation = _downscale_oriented(frame, stored_target, orientation, resize)
    if orientation in _TRANSPOSE:
        frame = _replace(frame, frame.transpose(_TRANSPOSE[orientation]))
    out = io.BytesIO()
    if keep_jpeg:
        frame.save(out, "JPEG", quality=JPEG_QUALITY, icc_profile=icc_profile)
        mime = "image/jpeg"
    else:
        frame.save(out, "PNG", compress_level=PNG_COMPRESS_LEVEL, icc_profile=icc_profile)
        mime = "image/png"
    sent_size = frame.size
    frame.close()
    return out.getvalue(), mime, sent_size


def _convert(image: Image.Image, *, keep_jpeg: bool) -> tuple[Image.Image, bytes | None]:
    """The decoded image in a mode its encoder takes, and the ICC profile that still fits it."""
    icc_profile = image.info.get("icc_profile")
    if keep_jpeg and image.mode not in ("L", "RGB"):
        return _replace(image, image.convert("RGB")), None
    if not keep_jpeg and image.mode not in _PNG_MODES:
        png_mode = _MODE_FOR_PNG.get(image.mode) or (
            "RGBA" if image.has_transparency_data else "RGB"
        )
        if image.mode not in _SAME_COLOURS:
            icc_profile = None
        return _replace(image, image.convert(png_mode)), icc_profile
    return image, icc_profile


def _downscale_oriented(
    frame: Image.Image,
    size: tuple[int, int],
    orientation: int,
    resize: tuple[Image.Resampling, float],
) -> tuple[Image.Image, int]:
    """`frame` downscaled to `size`, and the orientation still to apply: through OpenCV (resized
    and already rotated, orientation 1) for a JPEG when the `[photos]` extra is installed, else
    through Pillow (rotated by the caller)."""
    if resize is _JPEG_RESIZE and frame.mode in ("L", "RGB"):
        done = resample.downscale(frame, size, orientation)
        if done is not None:
            return _replace(frame, done), 1
    return _downscale(frame, size, resize), orientation


def _downscale(
    frame: Image.Image, size: tuple[int, int], resize: tuple[Image.Resampling, float]
) -> Image.Image:
    if frame.mode == "P":
        has_alpha = "transparency" in frame.info
        frame = _replace(frame, frame.convert("RGBA" if has_alpha else "RGB"))
    elif frame.mode in _MODE_FOR_RESIZE:
        frame = _replace(frame, frame.convert(_MODE_FOR_RESIZE[frame.mode]))
    resample, gap = resize
    return _replace(frame, frame.resize(size, resample, reducing_gap=gap))


def _replace(old: Image.Image, new: Image.Image) -> Image.Image:
    """Free the previous step's pixels now rather than when the function returns."""
    if new is not old:
        old.close()
    return new


def _fail(item: ImageItem, reason: str) -> None:
    item.error = reason
    item.data = None
    item.mime_type = ""
    item.sent_width = item.sent_height = item.send_size = 0


def _os_reason(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()


def _decode_failure(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    message = (lines[0] if lines else type(exc).__name__)[:_MESSAGE_LIMIT]
    lowered = message.lower()
    if "truncated" in lowered or "end of file" in lowered or "premature end" in lowered:
        return f"truncated image: {message}"
    return f"corrupt image: {message}"


def _too_large(image_fp: IO[bytes], head: bytes, exc: Image.DecompressionBombError) -> str:
    """Name the dimensions: read them with the format's header parser, which (unlike
    Image.open) does not apply the bomb check. The guard itself stays on."""
    for name in _OPEN_FORMATS:
        factory, accept = Image.OPEN[name]
        accepted = accept is None or accept(head[:16])
        if not accepted or isinstance(accepted, str):  # a str is Pillow's "almost" warning
            continue
        try:
            image_fp.seek(0)
            with factory(image_fp, "") as header:
                width, height = header.size
        except Exception:  # not this format after all: try the next one Pillow would try
            continue
        return f"image too large: {width}x{height} pixels exceeds the decompression-bomb limit"
    pixels = re.search(r"\((\d+) pixels\)", str(exc))
    count = f"{pixels.group(1)} pixels" if pixels else "size"
    return f"image too large: {count} exceeds the decompression-bomb limit"


def read_bytes(item: ImageItem) -> bytes:
    """The bytes to send: the converted data, or the file read now.

    Raises SourceChangedError (an OSError) when the file no longer has the bytes prepare()
    hashed: sending them would file an answer under a key that describes other bytes.
    """
    if item.error:
        raise ValueError(f"{item.source.rel_path}: cannot send an item with an error")
    if item.data is not None:
        return item.data
    with open(item.source.path, "rb") as file:
        data = file.read()
    if hashlib.sha256(data).hexdigest() != item.sha256:
        raise SourceChangedError(f"{item.source.rel_path}: file changed since it was prepared")
    return data


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes as they are now, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
