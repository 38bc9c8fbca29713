"""A PNG's chunks after its pixels, told from two ranges of its bytes (its head and its tail)
without the whole file: whether an eXIf chunk sits there.

The PNG 1.2 extension let an eXIf chunk follow the IDAT chunks; Pillow reads such a chunk only
when it loads the pixels, and `prepare` finds it when it verifies the file (images._verify_png),
so an object sent in place must have its tail read for it (pipeline/inputs/in_place.py).

The chunks are walked to an IEND ending the file, every chunk after the pixels whole in the
ranges and its CRC checked, from a place known to start one:

- the first IDAT, found by walking the head's chunks from the signature; IDAT chunks are then
  skipped by their lengths (their bodies are the decoder's to check) as long as each next
  chunk header lies in one of the ranges (one IDAT chunk, or all of them in the head);
- else an IDAT chunk header in the tail (the last one first: libpng's and Pillow's pixels come
  in chunks of 8 or 64 KiB; TAIL_STARTS at most): only a walk from it whose every chunk, IDAT
  too, is whole and CRC-right counts, so a stray "IDAT" among compressed bytes is no start.
  Such a walk does not see the chunks before its start: an eXIf chunk between two IDAT chunks,
  which the PNG spec forbids (they are consecutive) and encoders do not write, is missed there
  where `prepare` finds it (an eXIf chunk, an empty IDAT chunk, IEND: turned by `prepare`, not
  in place).

When neither walk can be made (a chunk header between the ranges, a CRC wrong, no IEND at the
end) the ranges do not tell (`NotTold`): a longer tail may (`tail_sizes`), else the whole file
must.

Two readers ask: an object sent in place (pipeline/inputs/in_place.py: ranged GETs) and
`images.measure` (the plan's and `estimate`'s sizes: a file's head and a seek to its tail), so
that both size such a PNG as `prepare` turns it, at the cost of one tail read for a PNG without
one.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Candidate starts tried in a tail: the last IDAT header is the last "IDAT" there but for one in
# a chunk after the pixels (text); a hostile tail of lookalikes, each start a CRC of up to the
# tail, is not told (the whole file is read) rather than cost seconds of the event loop each.
TAIL_STARTS = 8
# Chunks after a PNG's pixels are few and small (IEND, often an eXIf or a tEXt): the last 64 KiB
# hold them and, mostly, the last IDAT chunk's header to walk from; past it, 16 times longer.
TAIL_BYTES = 64 << 10
MAX_TAIL_BYTES = TAIL_BYTES * 16


class NotTold(Exception):
    """The two ranges do not tell the chunks after the pixels."""


def tail_sizes(head: int, size: int) -> Iterator[int]:
    """The tails to read, in turn, of a PNG of `size` bytes whose first `head` are read, until
    one tells (TAIL_BYTES, then MAX_TAIL_BYTES), none longer than what lies past the head (an
    empty one, once, when the head is the whole file)."""
    for tail in (TAIL_BYTES, MAX_TAIL_BYTES):
        yield min(tail, size - head)
        if size - tail <= head:
            return


@dataclass(frozen=True, slots=True)
class _Ranges:
    """The first bytes of a file of `size` bytes and its last ones (b"" when `head` is whole);
    a tail that meets or overlaps the head is joined to it: one range, the chunks across the
    seam readable."""

    head: bytes
    tail: bytes
    size: int

    @classmethod
    def of(cls, head: bytes, tail: bytes, size: int) -> _Ranges:
        seam = size - len(tail)
        if seam <= len(head):
            return cls(head + tail[len(head) - seam :], b"", size)
        return cls(head, tail, size)

    def span(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the file; NotTold when they are not all in one range."""
        if end <= len(self.head):
            return self.head[start:end]
        offset = self.size - len(self.tail)
        if offset <= start and end <= self.size:
            return self.tail[start - offset : end - offset]
        raise NotTold(f"bytes {start}-{end} are not in the ranges read")


def late_exif(head: bytes, tail: bytes, size: int) -> bytes | None:
    """The payload of the eXIf chunks from the first IDAT to IEND (joined, as `prepare` reads
    them), None when there is none; raises NotTold (the module docstring)."""
    ranges = _Ranges.of(head, tail, size)
    for start, strict in _starts(ranges):
        try:
            return _walk(ranges, start, strict=strict)
        except NotTold:
            continue
    raise NotTold("no walk from the pixels to IEND in the ranges read")


def _starts(ranges: _Ranges) -> Iterator[tuple[int, bool]]:
    """Places to walk from, and whether the walk must be strict: the first IDAT (a place
    known to start a chunk), then the candidate IDAT headers in the tail (found by search), the
    last first (the fewest bytes to check), at most TAIL_STARTS of them."""
    first = _first_idat(ranges.head)
    if first is not None:
        yield first, False
    offset, at = ranges.size - len(ranges.tail), ranges.tail.rfind(b"IDAT")
    for _ in range(TAIL_STARTS):
        if at < 4:
            return
        yield offset + at - 4, True
        at = ranges.tail.rfind(b"IDAT", 0, at)


def _first_idat(head: bytes) -> int | None:
    """Where the head's first IDAT chunk starts (the chunks before it are whole in the head:
    Pillow read them to open the image)."""
    return next((at for at, kind in _head_chunks(head) if kind == b"IDAT"), None)


def _head_chunks(head: bytes) -> Iterator[tuple[int, bytes]]:
    """Each chunk's start and type in `head`, from the signature to the first IDAT."""
    at = len(SIGNATURE)
    while at + 8 <= len(head):
        length, kind = struct.unpack(">I4s", head[at : at + 8])
        yield at, kind
        if kind == b"IDAT":
            return
        at += 12 + length


def _walk(ranges: _Ranges, at: int, *, strict: bool) -> bytes | None:
    """The eXIf payload walking chunks from `at` to IEND; `strict`: every chunk must be whole
    in the ranges and CRC-right (a start found by search, not by walking), else IDAT chunks are
    skipped by their length (their bodies are the decoder's to check, and mostly not read)."""
    exif = None
    while True:
        length, kind = struct.unpack(">I4s", ranges.span(at, at + 8))
        end = at + 12 + length
        if kind == b"IDAT" and not strict:
            at = end
            continue
        body = ranges.span(at + 8, end - 4)
        if zlib.crc32(kind + body) != int.from_bytes(ranges.span(end - 4, end), "big"):
            raise NotTold(f"bad CRC in a {kind.decode('latin-1')} chunk")
        if kind == b"eXIf":
            exif = (exif or b"") + body
        if kind == b"IEND":
            if end != ranges.size:
                raise NotTold("bytes after IEND")
            return exif
        at = end
