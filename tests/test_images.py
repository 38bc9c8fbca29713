"""prepare(), sniff() and read_bytes() on real files written with Pillow and pillow_heif."""

from __future__ import annotations

import hashlib
import io
import os
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from pipeline.inputs.images import (
    SUPPORTED_MIME,
    SourceChangedError,
    header,
    prepare,
    read_bytes,
    sniff,
)
from pipeline.records import SourceFile

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
ORIENTATION_TAG = 0x0112


def source_for(path: Path) -> SourceFile:
    return SourceFile(
        path=str(path), root=str(path.parent), rel_path=path.name, size=path.stat().st_size
    )


def noisy_rgb(width: int, height: int, seed: int) -> Image.Image:
    """Seeded noise: incompressible, so size and decode effects are real."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def save(image: Image.Image, path: Path, fmt: str, **params: object) -> Path:
    image.save(path, fmt, **params)
    return path


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


# ---------------------------------------------------------------- sniff


@pytest.mark.parametrize(
    ("fmt", "params", "mime"),
    [
        ("PNG", {}, "image/png"),
        ("JPEG", {}, "image/jpeg"),
        ("WEBP", {}, "image/webp"),
        ("HEIF", {}, "image/heic"),
        ("AVIF", {}, "image/avif"),
        ("GIF", {}, "image/gif"),
        ("BMP", {}, "image/bmp"),
        ("TIFF", {}, "image/tiff"),
        ("TIFF", {"compression": "tiff_lzw"}, "image/tiff"),
        ("ICO", {}, "image/x-icon"),
        ("PPM", {}, "image/x-portable-anymap"),
        ("JPEG2000", {}, "image/jp2"),
        ("QOI", {}, "image/qoi"),
    ],
)
def test_sniff_reads_the_format_from_the_bytes(fmt: str, params: dict, mime: str) -> None:
    buffer = io.BytesIO()
    noisy_rgb(32, 24, seed=1).save(buffer, fmt, **params)
    assert sniff(buffer.getvalue()[:64]) == mime


def test_sniff_tells_heif_brands_apart() -> None:
    def ftyp(major: bytes, *compatible: bytes) -> bytes:
        body = b"ftyp" + major + b"\0\0\0\0" + b"".join(compatible)
        return struct.pack(">I", len(body) + 4) + body + b"\0\0\0\x08meta"

    assert sniff(ftyp(b"heic", b"mif1", b"heic")) == "image/heic"
    assert sniff(ftyp(b"mif1", b"mif1", b"heic")) == "image/heic"
    assert sniff(ftyp(b"mif1", b"mif1", b"miaf")) == "image/heif"
    assert sniff(ftyp(b"msf1", b"msf1")) == "image/heif"
    assert sniff(ftyp(b"mif1", b"avif")) == "image/avif"
    assert sniff(ftyp(b"isom", b"isom", b"mp41")) is None  # an MP4 video


@pytest.mark.parametrize(
    "head",
    [
        b"hello, this is plain text\n",
        b"",
        b"BM but not a bitmap at all, just text",
        b"%PDF-1.7\n",
        random.Random(7).randbytes(64).replace(b"\x89", b"\x00"),
    ],
)
def test_sniff_returns_none_for_what_is_not_an_image(head: bytes) -> None:
    assert sniff(head) is None


def test_sniff_knows_svg_without_claiming_pillow_reads_it() -> None:
    assert sniff(b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>') == (
        "image/svg+xml"
    )


def test_sniff_ignores_the_extension(tmp_path: Path) -> None:
    path = save(noisy_rgb(16, 16, seed=2), tmp_path / "really_a_png.jpg", "PNG")
    item = prepare(source_for(path))
    assert item.error is None
    assert item.mime_type == "image/png"


# ---------------------------------------------------------------- as they are


@pytest.mark.parametrize(
    ("fmt", "suffix", "mime"),
    [
        ("PNG", "png", "image/png"),
        ("JPEG", "jpg", "image/jpeg"),
        ("WEBP", "webp", "image/webp"),
        ("HEIF", "heic", "image/heic"),
    ],
)
@pytest.mark.parametrize("verify", [True, False])
def test_supported_formats_are_sent_as_they_are(
    tmp_path: Path, fmt: str, suffix: str, mime: str, verify: bool
) -> None:
    path = save(noisy_rgb(48, 32, seed=3), tmp_path / f"image.{suffix}", fmt)
    item = prepare(source_for(path), verify=verify)
    raw = path.read_bytes()
    assert item.error is None
    assert (item.mime_type, item.width, item.height) == (mime, 48, 32)
    assert (item.sent_width, item.sent_height) == (48, 32)
    assert item.data is None
    assert item.send_size == len(raw)
    assert item.sha256 == hashlib.sha256(raw).hexdigest()
    assert read_bytes(item) == raw


def test_max_side_that_fits_changes_nothing(tmp_path: Path) -> None:
    path = save(noisy_rgb(48, 32, seed=4), tmp_path / "a.png", "PNG")
    item = prepare(source_for(path), max_side=48)
    assert item.data is None and item.sent_width == 48


# ---------------------------------------------------------------- EXIF orientation


def displayed_reference() -> np.ndarray:
    """60x40 white image, red block top-left, green block top-right, blue block bottom-left."""
    reference = np.full((40, 60, 3), 255, dtype=np.uint8)
    reference[:12, :16] = RED
    reference[:12, -16:] = GREEN
    reference[-12:, :16] = BLUE
    return reference


def stored_for(displayed: np.ndarray, orientation: int) -> np.ndarray:
    """The stored pixels a camera writes for `displayed` under EXIF `orientation`, from the TIFF
    spec's wording (where row 0 and column 0 of the stored image lie in the displayed one)."""
    return {
        1: displayed,  # row 0 top, column 0 left
        2: displayed[:, ::-1],  # row 0 top, column 0 right
        3: displayed[::-1, ::-1],  # row 0 bottom, column 0 right
        4: displayed[::-1, :],  # row 0 bottom, column 0 left
        5: displayed.transpose(1, 0, 2),  # row 0 left, column 0 top
        6: displayed[:, ::-1].transpose(1, 0, 2),  # row 0 right, column 0 top
        7: displayed[::-1, ::-1].transpose(1, 0, 2),  # row 0 right, column 0 bottom
        8: displayed[::-1, :].transpose(1, 0, 2),  # row 0 left, column 0 bottom
    }[orientation]


def save_oriented(path: Path, fmt: str, orientation: int) -> Path:
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    stored = Image.fromarray(np.ascontiguousarray(stored_for(displayed_reference(), orientation)))
    params = {"quality": 95} if fmt == "JPEG" else {}
    return save(stored, path, fmt, exif=exif.tobytes(), **params)


def assert_corners(rgb: np.ndarray, tolerance: int) -> None:
    height, width, _ = rgb.shape
    probes = {
        (4, 4): RED,
        (4, width - 5): GREEN,
        (height - 5, 4): BLUE,
        (height - 5, width - 5): WHITE,
    }
    for (y, x), colour in probes.items():
        difference = np.abs(rgb[y, x].astype(int) - np.array(colour)).max()
        assert difference <= tolerance, f"pixel {(y, x)} is {rgb[y, x]}, expected {colour}"


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize(
    ("fmt", "mime", "tolerance"), [("JPEG", "image/jpeg", 40), ("PNG", "image/png", 0)]
)
def test_exif_orientation_gives_the_displayed_image(
    tmp_path: Path, orientation: int, fmt: str, mime: str, tolerance: int
) -> None:
    path = save_oriented(tmp_path / f"o{orientation}.{fmt.lower()}", fmt, orientation)
    item = prepare(source_for(path))
    assert item.error is None
    assert (item.width, item.height) == (60, 40)
    assert (item.sent_width, item.sent_height) == (60, 40)
    assert item.mime_type == mime
    if orientation == 1:
        assert item.data is None
        return
    assert item.data is not None and item.send_size == len(item.data)
    with Image.open(io.BytesIO(item.data)) as sent:
        assert sent.format == fmt
        assert sent.getexif().get(ORIENTATION_TAG) in (None, 1)  # never rotated twice
    assert_corners(pixels(item.data), tolerance)


def test_png_orientation_without_verify_still_applies_when_exif_precedes_pixels(
    tmp_path: Path,
) -> None:
    path = save_oriented(tmp_path / "o6.png", "PNG", 6)
    item = prepare(source_for(path), verify=False)
    assert (item.width, item.height) == (60, 40)
    assert_corners(pixels(item.data), 0)


@pytest.mark.parametrize("where", ["before the pixels", "after the pixels"])
def test_an_exif_chunk_holding_no_exif_costs_a_png_nothing(tmp_path: Path, where: str) -> None:
    """Unreadable EXIF is no orientation (`_orientation`: bad metadata must not cost the image),
    wherever the PNG's eXIf chunk sits; the header an object sent in place is measured from says
    the same (pipeline/inputs/in_place.py)."""
    data = encoded("PNG")
    at = data.index(b"IDAT") - 4 if where == "before the pixels" else data.rindex(b"IEND") - 4
    junk = b"garbage!garbage!"  # no TIFF header: Pillow's Exif.load raises SyntaxError
    chunk = (
        struct.pack(">I", len(junk))
        + b"eXIf"
        + junk
        + struct.pack(">I", zlib.crc32(b"eXIf" + junk))
    )
    data = data[:at] + chunk + data[at:]
    item = prepare(source_for(write(tmp_path / "junk-exif.png", data)))
    assert item.error is None
    assert (item.mime_type, item.data) == ("image/png", None)  # sent as it is, unturned
    found = header(io.BytesIO(data), data)
    assert (found.orientation, found.as_is(None)) == (1, True)


def test_rotated_and_downscaled_jpeg_keeps_original_displayed_size(tmp_path: Path) -> None:
    path = save_oriented(tmp_path / "o8.jpg", "JPEG", 8)
    item = prepare(source_for(path), max_side=30)
    assert (item.width, item.height) == (60, 40)
    assert (item.sent_width, item.sent_height) == (30, 20)
    assert item.mime_type == "image/jpeg"
    rgb = pixels(item.data)
    assert rgb.shape == (20, 30, 3)
    assert np.abs(rgb[2, 2].astype(int) - RED).max() <= 60
    assert np.abs(rgb[-3, 2].astype(int) - BLUE).max() <= 60


def test_heic_rotation_is_applied_by_the_container(tmp_path: Path) -> None:
    """pillow_heif turns EXIF orientation into HEIF's irot/imir, which every reader applies:
    the file goes as it is and its size is already the displayed one."""
    path = save_oriented(tmp_path / "o6.heic", "HEIF", 6)
    item = prepare(source_for(path))
    assert item.error is None
    assert (item.mime_type, item.width, item.height) == ("image/heic", 60, 40)
    assert item.data is None


def test_rotation_keeps_the_colour_profile(tmp_path: Path) -> None:
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 3
    path = save(
        noisy_rgb(16, 8, seed=16),
        tmp_path / "p.jpg",
        "JPEG",
        exif=exif.tobytes(),
        icc_profile=profile,
    )
    item = prepare(source_for(path))
    with Image.open(io.BytesIO(item.data)) as sent:
        assert sent.info.get("icc_profile") == profile


def test_sixteen_bit_png_rotates_without_losing_depth(tmp_path: Path) -> None:
    stored = np.zeros((8, 16), dtype=np.uint16)
    stored[:3, :4] = 60000  # top-left when stored; orientation 6 turns it clockwise
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 6
    path = save(Image.fromarray(stored), tmp_path / "deep.png", "PNG", exif=exif.tobytes())
    item = prepare(source_for(path))
    assert (item.width, item.height) == (8, 16)
    with Image.open(io.BytesIO(item.data)) as sent:
        assert sent.mode == "I;16"
        displayed = np.asarray(sent)
    assert (displayed[:4, -3:] == 60000).all() and displayed.sum() == 12 * 60000


# ---------------------------------------------------------------- conversion


@pytest.mark.parametrize(
    ("fmt", "suffix"),
    [("BMP", "bmp"), ("TIFF", "tif"), ("PPM", "ppm"), ("QOI", "qoi"), ("AVIF", "avif")],
)
def test_other_formats_become_png(tmp_path: Path, fmt: str, suffix: str) -> None:
    original = noisy_rgb(40, 30, seed=5)
    path = save(original, tmp_path / f"image.{suffix}", fmt)
    item = prepare(source_for(path))
    assert item.error is None
    assert item.mime_type == "image/png"
    assert (item.width, item.height, item.sent_width, item.sent_height) == (40, 30, 40, 30)
    assert item.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    if fmt != "AVIF":  # lossless sources: the PNG holds the very same pixels
        assert np.array_equal(pixels(item.data), np.asarray(original))


def test_gif_first_frame_becomes_png_keeping_transparency(tmp_path: Path) -> None:
    first = Image.new("P", (20, 10), 0)
    first.putpalette([*RED, *GREEN, *BLUE] + [0] * (256 * 3 - 9))
    first.paste(1, (10, 0, 20, 10))
    second = Image.new("P", (20, 10), 2)
    second.putpalette(first.getpalette())
    path = tmp_path / "anim.gif"
    first.save(path, save_all=True, append_images=[second], transparency=1, duration=50)
    item = prepare(source_for(path))
    assert item.error is None and item.mime_type == "image/png"
    with Image.open(io.BytesIO(item.data)) as sent:
        rgba = np.asarray(sent.convert("RGBA"))
    assert tuple(rgba[5, 2]) == (*RED, 255)
    assert rgba[5, 15, 3] == 0  # the transparent index stays transparent


def test_ico_becomes_png(tmp_path: Path) -> None:
    path = save(noisy_rgb(32, 32, seed=6), tmp_path / "favicon.ico", "ICO", sizes=[(32, 32)])
    item = prepare(source_for(path))
    assert (item.error, item.mime_type, item.width) == (None, "image/png", 32)


@pytest.mark.parametrize(
    ("mode", "expected_mode"),
    [("CMYK", "RGB"), ("I;16", "I;16"), ("LA", "LA"), ("F", "I;16"), ("1", "1"), ("LAB", "RGB")],
)
def test_tiff_modes_become_png_modes(tmp_path: Path, mode: str, expected_mode: str) -> None:
    image = Image.new(mode, (16, 8), 3 if mode in ("I;16", "F") else None)
    if mode == "CMYK":
        image = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # pure red in print inks
    path = save(image, tmp_path / "mode.tif", "TIFF")
    item = prepare(source_for(path))
    assert item.error is None and item.mime_type == "image/png"
    with Image.open(io.BytesIO(item.data)) as sent:
        assert sent.mode == expected_mode
        if mode == "CMYK":
            assert sent.getpixel((0, 0)) == RED


def test_cmyk_jpeg_is_sent_as_rgb_jpeg(tmp_path: Path) -> None:
    path = save(Image.new("CMYK", (32, 16), (0, 255, 255, 0)), tmp_path / "print.jpg", "JPEG")
    item = prepare(source_for(path))
    assert item.error is None and item.mime_type == "image/jpeg"
    with Image.open(io.BytesIO(item.data)) as sent:
        assert sent.mode == "RGB"
        assert np.abs(np.array(sent.getpixel((8, 8))) - RED).max() <= 8


def test_sixteen_bit_png_goes_as_it_is(tmp_path: Path) -> None:
    path = save(Image.new("I;16", (16, 8), 40000), tmp_path / "deep.png", "PNG")
    item = prepare(source_for(path))
    assert (item.error, item.mime_type, item.data) == (None, "image/png", None)


# ---------------------------------------------------------------- downscale


@pytest.mark.parametrize(
    ("fmt", "mime"),
    [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/png"), ("BMP", "image/png")],
)
def test_downscale_keeps_original_width_and_height(tmp_path: Path, fmt: str, mime: str) -> None:
    path = save(noisy_rgb(400, 300, seed=8), tmp_path / f"big.{fmt.lower()}", fmt)
    item = prepare(source_for(path), max_side=100)
    assert item.error is None
    assert (item.width, item.height) == (400, 300)
    assert (item.sent_width, item.sent_height) == (100, 75)
    assert item.mime_type == mime
    with Image.open(io.BytesIO(item.data)) as sent:
        assert sent.size == (100, 75)
    assert item.send_size == len(item.data)


def test_downscale_of_a_palette_image_uses_real_colours(tmp_path: Path) -> None:
    """Resizing palette indices would invent colours; the image is made RGB(A) first."""
    image = Image.new("P", (200, 100), 0)
    image.putpalette([*RED, *BLUE] + [0] * (254 * 3))
    for x in range(0, 200, 2):
        image.paste(1, (x, 0, x + 1, 100))
    path = save(image, tmp_path / "stripes.png", "PNG")
    item = prepare(source_for(path), max_side=50)
    rgb = pixels(item.data)
    assert rgb.shape == (25, 50, 3)
    assert 100 < rgb[10, 20, 0] < 160 and 100 < rgb[10, 20, 2] < 160  # red+blue averaged


# ---------------------------------------------------------------- bad input


def png_with_size(width: int, height: int) -> bytes:
    """A valid PNG whose header claims width x height: tiny on disk, huge when decoded."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def encoded(fmt: str, seed: int = 9) -> bytes:
    buffer = io.BytesIO()
    noisy_rgb(64, 48, seed).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("empty.jpg", b"", "empty file"),
        ("notes.jpg", b"these are my notes, not a photo\n" * 10, "not an image (text)"),
        (
            "blob.png",
            random.Random(3).randbytes(500).replace(b"\x89", b"\x00"),
            "not an image (unknown format)",
        ),
        ("doc.png", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n" + b"0" * 100, "not an image (pdf)"),
        (
            "vector.png",
            b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
            "unsupported image format: image/svg+xml",
        ),
        ("half.png", encoded("PNG")[: len(encoded("PNG")) // 2], "truncated image: "),
        ("half.jpg", encoded("JPEG")[: len(encoded("JPEG")) // 2], "truncated image: "),
        ("half.gif", encoded("GIF")[: len(encoded("GIF")) // 2], "truncated image: "),
        ("half.heic", encoded("HEIF")[: len(encoded("HEIF")) // 2], "truncated image: "),
        ("half.tif", encoded("TIFF")[: len(encoded("TIFF")) // 2], "truncated image: "),
        (
            "head.png",
            encoded("PNG")[:20],
            "truncated image: ",
        ),
        (
            "no_ihdr.png",
            b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"XXXX" + bytes(17),
            "corrupt or truncated image: unreadable image/png header",
        ),
        (
            "bomb.png",
            png_with_size(30000, 30000),
            "image too large: 30000x30000 pixels exceeds the decompression-bomb limit",
        ),
    ],
)
def test_bad_files_become_error_items_with_a_reason(
    tmp_path: Path, name: str, data: bytes, reason: str
) -> None:
    path = write(tmp_path / name, data)
    item = prepare(source_for(path))
    assert item.error is not None and item.error.startswith(reason), item.error
    assert len(item.error) < 200
    assert item.sha256 == hashlib.sha256(data).hexdigest()
    assert item.data is None and item.send_size == 0
    with pytest.raises(ValueError):
        read_bytes(item)


def png_with_corrupt_pixels() -> bytes:
    """A PNG whose compressed pixels are garbage under a valid CRC: only a decode notices."""
    data = bytearray(encoded("PNG", seed=10))
    at = data.index(b"IDAT")
    length = struct.unpack(">I", data[at - 4 : at])[0]
    body = bytearray(data[at + 4 : at + 4 + length])
    body[2:10] = b"\xff" * 8
    data[at + 4 : at + 4 + length] = body
    data[at + 4 + length : at + 8 + length] = struct.pack(">I", zlib.crc32(b"IDAT" + body))
    return bytes(data)


def test_png_verify_checks_every_chunk_without_inflating(tmp_path: Path) -> None:
    """verify walks the PNG's chunks (whole, CRC right, through IEND) instead of inflating the
    pixels, twenty times cheaper: a flipped bit or a cut file is caught; garbage that a broken
    encoder wrote under a valid CRC is not (documented), and goes to the model as it is."""
    flipped = bytearray(encoded("PNG", seed=10))
    at = flipped.index(b"IDAT")
    flipped[at + 10] ^= 0xFF
    path = write(tmp_path / "flipped.png", bytes(flipped))
    assert prepare(source_for(path), verify=True).error == (
        "corrupt image: broken PNG file (bad CRC in a IDAT chunk)"
    )
    cut = write(tmp_path / "cut.png", encoded("PNG", seed=10)[:-20])
    assert "truncated" in prepare(source_for(cut), verify=True).error
    garbled = write(tmp_path / "garbled.png", png_with_corrupt_pixels())
    assert prepare(source_for(garbled), verify=True).error is None
    unverified = prepare(source_for(path), verify=False)
    assert unverified.error is None and unverified.data is None


def test_decompression_bomb_guard_stays_global(tmp_path: Path) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    prepare(source_for(write(tmp_path / "bomb.png", png_with_size(30000, 30000))))
    assert limit == Image.MAX_IMAGE_PIXELS


def test_source_errors_pass_through(tmp_path: Path) -> None:
    source = SourceFile(
        path=str(tmp_path / "gone"), root=str(tmp_path), rel_path="gone", error="broken symlink"
    )
    item = prepare(source)
    assert (item.error, item.sha256, item.source) == ("broken symlink", "", source)


def test_missing_file_is_an_error_item(tmp_path: Path) -> None:
    item = prepare(SourceFile(path=str(tmp_path / "x.png"), root=str(tmp_path), rel_path="x.png"))
    assert item.error == "unreadable file: no such file or directory"


def test_fifo_does_not_hang(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")
    item = prepare(source_for(tmp_path / "pipe.jpg"))
    assert item.error == "not a regular file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_an_error_item(tmp_path: Path) -> None:
    path = save(noisy_rgb(8, 8, seed=11), tmp_path / "locked.png", "PNG")
    path.chmod(0)
    try:
        item = prepare(source_for(path))
    finally:
        path.chmod(0o644)
    assert item.error == "unreadable file: permission denied"
    assert item.sha256 == ""


def test_bad_max_side_is_a_caller_error(tmp_path: Path) -> None:
    path = save(noisy_rgb(8, 8, seed=12), tmp_path / "a.png", "PNG")
    with pytest.raises(ValueError, match="max_side"):
        prepare(source_for(path), max_side=0)


# ---------------------------------------------------------------- read_bytes


def test_read_bytes_refuses_a_file_changed_since_prepare(tmp_path: Path) -> None:
    path = save(noisy_rgb(16, 16, seed=13), tmp_path / "a.png", "PNG")
    item = prepare(source_for(path))
    save(noisy_rgb(16, 16, seed=14), path, "PNG")
    with pytest.raises(SourceChangedError):
        read_bytes(item)


def test_read_bytes_gives_converted_data(tmp_path: Path) -> None:
    path = save(noisy_rgb(16, 16, seed=15), tmp_path / "a.bmp", "BMP")
    item = prepare(source_for(path))
    assert read_bytes(item) == item.data
    assert read_bytes(item).startswith(b"\x89PNG")


def test_supported_mime_is_what_gemini_takes() -> None:
    assert SUPPORTED_MIME == ("image/png", "image/jpeg", "image/webp", "image/heic", "image/heif")
