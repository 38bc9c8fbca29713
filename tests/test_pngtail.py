"""A PNG's chunks after its pixels told from its head and tail ranges (pipeline/inputs/pngtail.py):
the eXIf chunk `prepare` finds there when it verifies the whole file, or "not told"."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

from pipeline.commands.estimate import estimate
from pipeline.gemini.tokens import image_tokens
from pipeline.inputs import images, pngtail
from pipeline.output.index_cache import NEW
from pipeline.records import ImageItem, SourceFile
from pipeline.run.plan import plan
from tests.conftest import make_config, read_rows, run
from tests.png_support import noise_png, png_chunk

RANGE = 64 << 10


def told(data: bytes, tail: int = RANGE) -> bytes | None:
    """What the walk tells from the first RANGE bytes and the last `tail` ones."""
    return pngtail.late_exif(data[:RANGE], data[-tail:], len(data))


def header_of(data: bytes) -> images.Header:
    return images.header(io.BytesIO(data[:RANGE]), data[:RANGE])


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
    assert not header_of(data).tail_may_turn
    assert header_of(noise_png(6, 6)).tail_may_turn
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


# ------------------------------------------------ images.measure: the plan's and estimate's size
def bytes_read() -> int:
    """What this process has read so far through read(2) and the like (Linux's rchar)."""
    counters = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(counters["rchar"])


def measured_and_prepared(path: Path, **options: Any) -> tuple[ImageItem, ImageItem]:
    """The item `measure` makes of a file (by its path) and the one `prepare` makes."""
    source = SourceFile(str(path), str(path.parent), path.name, size=path.stat().st_size)
    return images.measure(source, **options), images.prepare(source, **options)


@pytest.mark.parametrize("max_side", [None, 400])
@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("idat", [None, 8192], ids=["pillow", "libpng"])
@pytest.mark.parametrize("given", ["path", "bytes"])
def test_measure_sizes_a_late_exif_png_as_prepare_sends_it(
    tmp_path: Path, given: str, idat: int | None, verify: bool, max_side: int | None
):
    """An eXIf chunk after the pixels (orientation 6) turns a PNG in `prepare` when it verifies:
    `measure` counted it unturned (its displayed and sent sizes swapped), from a file and from an
    object's bytes alike."""
    path = tmp_path / "late.png"
    path.write_bytes(noise_png(7, 6, idat=idat, size=(900, 500)))
    options: dict[str, Any] = {"max_side": max_side, "verify": verify}
    if given == "bytes":
        options["data"] = path.read_bytes()
    measured, prepared = measured_and_prepared(path, **options)
    assert prepared.error is None and measured.error is None
    turned = (500, 900) if verify else (900, 500)
    assert (prepared.width, prepared.height) == (measured.width, measured.height) == turned
    sent = (measured.sent_width, measured.sent_height)
    assert sent == (prepared.sent_width, prepared.sent_height)
    assert max(sent) == (max_side or 900)


@pytest.mark.parametrize("orientation", [None, 6], ids=["ordinary", "late-exif"])
def test_measure_reads_a_png_s_head_and_one_tail_not_the_whole_file(
    tmp_path: Path, orientation: int | None
):
    """A PNG of 1.4 MB: its head, then its last 64 KiB (an eXIf chunk after the pixels would be
    there): ~70 KiB read, where `prepare` reads every byte; without `verify` the head alone."""
    path = tmp_path / "photo.png"
    path.write_bytes(noise_png(8, orientation, size=(900, 520)))
    source = SourceFile(str(path), str(tmp_path), path.name, size=path.stat().st_size)
    assert source.size > 1_300_000
    before = bytes_read()
    item = images.measure(source)
    read = bytes_read() - before
    assert item.width == (900 if orientation is None else 520)
    assert pngtail.TAIL_BYTES < read < pngtail.TAIL_BYTES + 32_768
    before = bytes_read()
    images.measure(source, verify=False)
    assert bytes_read() - before < 32_768


def test_measure_reads_a_whole_png_only_when_no_tail_tells(tmp_path: Path):
    """An eXIf chunk followed by 2 MB of text: no tail up to 1 MiB holds it or a pixel chunk's
    header to walk from, so the whole file is walked (as `prepare` does), and it is turned."""
    path = tmp_path / "long-text.png"
    path.write_bytes(noise_png(9, 6, after=png_chunk(b"tEXt", b"note\0" + b"x" * 2_000_000)))
    measured, prepared = measured_and_prepared(path)
    assert (measured.width, measured.height) == (prepared.width, prepared.height) == (300, 240)


async def test_the_estimate_of_a_late_exif_png_is_what_the_run_sends_and_is_billed(
    tmp_path: Path,
):
    """A portrait photo stored landscape, turned by an eXIf chunk after its pixels: the plan
    sizes it as the run sends it (its row's size), and the estimate's image and prompt tokens
    are what the local server bills for it."""
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    (images_dir / "portrait.png").write_bytes(noise_png(10, 6, idat=8192, size=(900, 500)))
    config = make_config(tmp_path, task={"kind": "detect"})
    assert plan(config).units[NEW] == [[(500, 900)]]
    report = estimate(config)
    summary = await run(config)
    assert summary.rows == {"ok": 1}
    (row,) = read_rows(tmp_path / "out")
    assert (row["width"], row["height"]) == (500, 900)
    assert (
        report["image_tokens"]
        == row["est_image_tokens"]
        == image_tokens(config.api.model, 500, 900)
    )
    assert report["input_tokens"] == row["est_prompt_tokens"] == row["prompt_tokens"]
