"""PNGs whose chunks after the pixels a test chooses (an eXIf chunk after the IDAT chunks, as the
PNG 1.2 extension let it; the pixels in chunks of a given size)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

SIZE = (240, 300)  # noise of this size: ~216 kB, past a head and a tail range of 64 KiB


def png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body)
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def noise_png(
    seed: int,
    orientation: int | None = None,
    *,
    idat: int | None = None,
    after: bytes = b"",
    size: tuple[int, int] = SIZE,
) -> bytes:
    """A PNG of noise (`size`, width x height, as stored) with, after its pixels, an eXIf chunk
    when `orientation` is given, then the chunks `after`; `idat`: its pixels in chunks of that
    size (None: Pillow's, of 64 KiB)."""
    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    data = out.getvalue()
    if idat is not None:
        data = rechunked(data, idat)
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        after = png_chunk(b"eXIf", exif.tobytes()) + after
    iend = data.rindex(b"IEND") - 4
    return data[:iend] + after + data[iend:]


def rechunked(data: bytes, size: int) -> bytes:
    """`data`'s pixels (its IDAT chunks' bodies joined) split again into chunks of `size`."""
    first, last = data.index(b"IDAT") - 4, data.rindex(b"IEND") - 4
    body, at = b"", first
    while at < last:
        length, kind = struct.unpack(">I4s", data[at : at + 8])
        body += data[at + 8 : at + 8 + length] if kind == b"IDAT" else b""
        at += 12 + length
    pieces = [png_chunk(b"IDAT", body[i : i + size]) for i in range(0, len(body), size)]
    return data[:first] + b"".join(pieces) + data[last:]
