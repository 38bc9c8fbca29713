"""A PNG's chunks after its pixels told from its head and tail ranges (pipeline/inputs/pngtail.py):
the eXIf chunk `prepare` finds there when it verifies the whole file, or "not told"."""

from __future__ import annotations

import io
import struct
import zlib
from types import SimpleNamespace

import pytest
from PIL import Image

from pipeline.inputs import images, pngtail
from pipeline.records import SourceFile
from tests.png_support import noise_png, png_chunk

RANGE = 64 << 10


def told(data: bytes, tail: int = RANGE) -> bytes | None:
    """What the walk tells from the first RANGE bytes and the last `tail` ones."""
    return pngtail.late_exif(data[:RANGE], data[-tail:], len(data))


def prepared_orientation(data: bytes) -> int:
    """The orientation `prepare` reads in the whole file (its displayed size is turned)."""
    item = images.prepare(SourceFile("x.png", "", "x.png", size=len(data)), data=data)
    assert item.error is None
    return 6 if (item.width, item.height) == (300, 240) else 1


@pytest.mark.parametrize("idat", [None, 8192, 1 << 20], ids=["pillow", "libpng", "one-chunk"])
@pytest.mark.parametrize("orientation", [None, 1, 6])
def test_the_ranges_tell_what_the_whole_file_does(idat: int | None, orientation: int | None):
    data = noise_png(3, orientation, idat=idat)
    assert len(data) > 3 * RANGE
    late = told(data)
    assert (late is None) is (orientation is None)
    assert images.exif_orientation(late) == prepared_orientation(data) == (orientation or 1)


def test_a_whole_head_needs_no_tail():
    small = io.BytesIO()
    Image.new("RGB", (8, 8)).save(small, "PNG")
    data = small.getvalue()
    iend = data.rindex(b"IEND") - 4
    exif = Image.Exif()
    exif[0x0112] = 8
    data = data[:iend] + png_chunk(b"eXIf", exif.tobytes()) + data[iend:]
    assert images.exif_orientation(pngtail.late_exif(data, b"", len(data))) == 8


def test_chunks_after_the_pixels_longer_than_the_tail_are_told_by_a_longer_one():
    """An eXIf chunk, then 100 kB of text: the last 64 KiB hold neither it nor an IDAT header."""
    data = noise_png(4, 6, after=png_chunk(b"tEXt", b"note\0" + b"x" * 100_000))
    with pytest.raises(pngtail.NotTold):
        told(data)
    assert images.exif_orientation(told(data, tail=16 * RANGE)) == 6


@pytest.mark.parametrize(
    "damage",
    ["exif-crc", "no-iend", "bytes-after-iend"],
)
def test_a_damaged_tail_is_not_told(damage: str):
    """The whole file is then read and prepared: `prepare` says what a verify says of it."""
    data = bytearray(noise_png(5, 6))
    if damage == "exif-crc":
        at = data.rindex(b"eXIf")
        data[at + 6] ^= 0xFF
    elif damage == "no-iend":
        data = data[:-12]
    else:
        data += b"\0" * 16
    with pytest.raises(pngtail.NotTold):
        told(bytes(data))


def test_an_exif_chunk_before_the_pixels_is_the_one_prepare_reads():
    """Pillow reads an eXIf chunk before the pixels on open and `prepare` takes it alone: the
    in-place decision then reads no tail (a later chunk's "turn" is not the local file's)."""
    early = Image.Exif()
    early[0x0112] = 1
    data = noise_png(6, 6)
    at = data.index(b"IDAT") - 4
    data = data[:at] + png_chunk(b"eXIf", early.tobytes()) + data[at:]
    assert pngtail.exif_before_pixels(data[:RANGE])
    assert not pngtail.exif_before_pixels(noise_png(6, 6)[:RANGE])
    assert images.exif_orientation(told(data)) == 6  # there, but not what prepare reads:
    assert prepared_orientation(data) == 1


def test_a_tail_full_of_idat_lookalikes_costs_a_bounded_walk(monkeypatch: pytest.MonkeyPatch):
    """A hostile PNG whose last MiB is "IDAT" headers each claiming 512 KiB (inside a text chunk:
    the file well-formed) had every one tried as a start, a CRC of 512 KiB each: ~35 s of CPU
    on the event loop for one object. A few starts are tried, then the ranges do not tell (the
    whole file is read and prepared)."""
    lookalike = struct.pack(">I", 1 << 19) + b"IDAT"
    data = noise_png(11, after=png_chunk(b"tEXt", b"note\0" + lookalike * (1 << 17)))
    checked = 0

    def crc32(data: bytes, value: int = 0) -> int:
        nonlocal checked
        checked += len(data)
        assert checked <= 64 << 20, "more than 64 MiB CRC-checked for a tail of 1 MiB"
        return zlib.crc32(data, value)

    monkeypatch.setattr(pngtail, "zlib", SimpleNamespace(crc32=crc32))
    with pytest.raises(pngtail.NotTold):
        told(data, tail=16 * RANGE)
