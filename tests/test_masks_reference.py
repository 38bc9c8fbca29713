"""The mask path made cheaper in issue 22 against the implementation it replaced, kept here as
the reference (pipeline/masks.py at 805be94: Pillow's PNG plugin for every map, `fromarray` /
`asarray` around the resize, the COCO string written with whole-array numpy). Seeded random
maps, boxes and PNGs, so a failure reproduces; every result must be byte-identical.
"""

from __future__ import annotations

import base64
import io
import itertools
import math
import random
import struct
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import pytest
from PIL import Image

from pipeline import masks
from pipeline.tasks import segment

# --- The reference: the code these tests hold the new path to, as it was. ---------------------

_GROUP_INDEX = np.arange(12, dtype=np.int64)
_FITS_BELOW = np.int64(1) << (_GROUP_INDEX[1:] * 5 - 1)


def reference_decode(raw: bytes) -> np.ndarray:
    """The PNG bytes through Pillow alone, with the old error wrapping."""
    try:
        with Image.open(io.BytesIO(raw), formats=["PNG"]) as image:
            image.load()
            return masks._probability_map(image)
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"mask PNG cannot be decoded ({type(exc).__name__}: {exc})") from None


def reference_box_mask(
    prob: np.ndarray, box_px: Sequence[int], threshold: int, edges: Sequence[float]
) -> np.ndarray:
    x0, y0, x1, y1 = box_px
    box_w, box_h = x1 - x0, y1 - y0
    if box_w <= 0 or box_h <= 0:
        return np.zeros((max(box_h, 0), max(box_w, 0)), dtype=bool)
    prob = np.ascontiguousarray(prob, dtype=np.uint8)
    ex0, ey0, ex1, ey1 = edges
    scale_x, scale_y = prob.shape[1] / (ex1 - ex0), prob.shape[0] / (ey1 - ey0)
    source = (
        (x0 - ex0) * scale_x,
        (y0 - ey0) * scale_y,
        (x1 - ex0) * scale_x,
        (y1 - ey0) * scale_y,
    )
    if prob.shape != (box_h, box_w) or source != (0, 0, box_w, box_h):
        map_h, map_w = prob.shape
        reach = max(0.0, -source[0], -source[1], source[2] - map_w, source[3] - map_h)
        pad = math.ceil(reach)
        if pad:
            prob = np.pad(prob, pad, mode="edge")
            source = tuple(v + pad for v in source)
        image = Image.fromarray(prob)
        prob = np.asarray(image.resize((box_w, box_h), Image.Resampling.BILINEAR, box=source))
    return prob > threshold


def reference_rle_box(inside: np.ndarray, box_px: Sequence[int], width: int, height: int) -> dict:
    x0, y0, _, _ = box_px
    box_h, box_w = inside.shape
    columns = np.zeros((box_w, box_h + 2), dtype=bool)
    columns[:, 1:-1] = inside.T
    flat = columns.reshape(-1)
    at = np.flatnonzero(flat[1:] != flat[:-1])
    col, row = np.divmod(at, box_h + 2)
    changes = (x0 + col) * height + y0 + row
    if changes.size > 1:
        same = changes[1:] == changes[:-1]
        if same.any():
            drop = np.zeros(changes.size, dtype=bool)
            drop[1:] |= same
            drop[:-1] |= same
            changes = changes[~drop]
    counts = np.diff(np.concatenate(([0], changes, [width * height])).astype(np.int64))
    if counts.size > 1 and counts[-1] == 0:
        counts = counts[:-1]
    return {"size": [height, width], "counts": reference_encode_counts(counts)}


def reference_encode_counts(counts: np.ndarray) -> str:
    if counts.size == 0:
        return ""
    deltas = counts.astype(np.int64)
    if deltas.size > 3:
        deltas[3:] = counts[3:] - counts[1:-2]
    magnitude = np.where(deltas < 0, ~deltas, deltas)
    n_chars = np.searchsorted(_FITS_BELOW, magnitude, side="right") + 1
    index = _GROUP_INDEX[: int(n_chars.max())]
    groups = (deltas[:, None] >> (index * 5)) & 0x1F
    cont = (index < (n_chars - 1)[:, None]) << 5
    chars = (groups | cont) + 48
    return chars[index < n_chars[:, None]].astype(np.uint8).tobytes().decode("ascii")


def reference_read(
    prob: np.ndarray, box_2d: list[float], width: int, height: int, threshold: int
) -> tuple[np.ndarray, dict | None]:
    edges = masks.box_edges(box_2d, width, height)
    box_px = masks._pixel_box(edges, width, height)
    inside = reference_box_mask(prob, box_px, threshold, edges)
    rle = reference_rle_box(inside, box_px, width, height) if inside.size else None
    return inside, rle


# --- Seeded inputs. ------------------------------------------------------------------------


def random_map(rng: random.Random) -> np.ndarray:
    """A probability map as models send them (a soft blob), or noise, flat, or near the
    threshold everywhere (where rounding in the resize decides)."""
    height, width = rng.randint(1, 130), rng.randint(1, 130)
    kind = rng.choice(["blob", "blob", "noise", "flat", "edge"])
    seed = np.random.default_rng(rng.randrange(2**32))
    if kind == "noise":
        return seed.integers(0, 256, (height, width), dtype=np.uint8)
    if kind == "flat":
        return np.full((height, width), rng.choice([0, 127, 128, 255]), dtype=np.uint8)
    if kind == "edge":
        return seed.integers(120, 136, (height, width), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    r = np.hypot((yy - cy) / max(height / 2, 1), (xx - cx) / max(width / 2, 1))
    return np.clip(255 * (1.2 - r), 0, 255).astype(np.uint8)


def random_box(rng: random.Random) -> list[float]:
    """box_2d with sub-pixel edges, some reaching past the image, some spanning its height."""
    y0, x0 = rng.uniform(-200, 990), rng.uniform(-200, 990)
    box = [y0, x0, y0 + rng.uniform(0.5, 700), x0 + rng.uniform(0.5, 700)]
    if rng.random() < 0.15:
        box[0], box[2] = rng.choice([0, -30.5]), rng.choice([1000, 1012.25])
    if rng.random() < 0.2:
        box = [round(v) for v in box]
    return box


def paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def filtered_rows(prob: np.ndarray, filters: Sequence[int]) -> bytes:
    """The PNG scanlines of an 8-bit grey image, row y filtered with filters[y] (PNG spec 9.2:
    each predictor reads the original bytes, so filtering needs no loop over pixels)."""
    out, above = [], np.zeros(prob.shape[1], dtype=np.int64)
    for row, kind in zip(prob.astype(np.int64), filters, strict=True):
        left = np.concatenate(([0], row[:-1]))
        upper_left = np.concatenate(([0], above[:-1]))
        predictor = [0, left, above, (left + above) // 2, paeth(left, above, upper_left)][kind]
        out.append(bytes([kind]) + ((row - predictor) % 256).astype(np.uint8).tobytes())
        above = row
    return b"".join(out)


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def grey_png(prob: np.ndarray, filters: Sequence[int], idat_parts: int = 1) -> bytes:
    height, width = prob.shape
    stream = zlib.compress(filtered_rows(prob, filters), 6)
    cut = sorted({0, len(stream), *(len(stream) * i // idat_parts for i in range(idat_parts))})
    idats = [chunk(b"IDAT", stream[a:b]) for a, b in itertools.pairwise(cut)]
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return masks.PNG_SIGNATURE + header + b"".join(idats) + chunk(b"IEND", b"")


def outcome(decode: Callable[[bytes], np.ndarray], raw: bytes) -> tuple[str, object]:
    """What decoding gives: the pixels, or the reason it refused."""
    try:
        return "pixels", decode(raw).tobytes()
    except ValueError as exc:
        return "error", str(exc)


# --- The tests. --------------------------------------------------------------------------


def test_pngs_of_every_row_filter_decode_as_pillow_decodes_them() -> None:
    """Rows filtered None, Sub and Up decode without Pillow; Average and Paeth go to Pillow.
    Either way the pixels are Pillow's, for maps of every shape and IDATs split in parts."""
    rng = random.Random(2201)
    plain = 0
    for case in range(250):
        prob = random_map(rng)
        allowed = [[0], [0, 1, 2], [0, 1, 2, 3, 4], [2], [1]][case % 5]
        filters = [rng.choice(allowed) for _ in range(prob.shape[0])]
        raw = grey_png(prob, filters, idat_parts=rng.randint(1, 3))
        decoded = masks.decode_png_mask(raw)
        assert np.array_equal(decoded, reference_decode(raw)) and np.array_equal(decoded, prob)
        fast = masks._plain_grey_png(raw) is not None
        assert fast == (max(filters) <= 2)
        plain += fast
    assert plain >= 150  # the path under test was taken, not only Pillow's


def damaged(raw: bytes, rng: random.Random) -> bytes:
    """A PNG cut short, with a byte changed, with bytes after IEND, or with an unusual but valid
    chunk or zlib stream."""
    body = raw[8:-12]  # between the signature and IEND
    kind = rng.choice(["cut", "flip", "trailing", "text", "extra-zlib", "short-zlib", "adler"])
    if kind == "cut":
        return raw[: rng.randint(9, len(raw) - 1)]
    if kind == "flip":
        at = rng.randrange(8, len(raw))
        return raw[:at] + bytes([raw[at] ^ (1 << rng.randrange(8))]) + raw[at + 1 :]
    if kind == "trailing":
        return raw + b"\x00" * rng.randint(1, 5)
    if kind == "text":
        return raw[:8] + body[:25] + chunk(b"tEXt", b"k\x00v") + body[25:] + raw[-12:]
    ihdr = raw[8:33]
    (width,) = struct.unpack(">I", raw[16:20])
    rows = zlib.decompress(b"".join(_idat_data(raw)))
    if kind == "extra-zlib":
        rows += b"\x00" * rng.randint(1, width + 1)
    elif kind == "short-zlib":
        rows = rows[: -rng.randint(1, len(rows))]
    stream = zlib.compress(rows)
    if kind == "adler":
        stream = stream[:-1] + bytes([stream[-1] ^ 1])
    return raw[:8] + ihdr + chunk(b"IDAT", stream) + raw[-12:]


def _idat_data(raw: bytes) -> list[bytes]:
    found, at = [], 8
    while at < len(raw):
        length, kind = struct.unpack(">I4s", raw[at : at + 8])
        if kind == b"IDAT":
            found.append(raw[at + 8 : at + 8 + length])
        at += 12 + length
    return found


def test_damaged_and_unusual_pngs_give_what_pillow_gives() -> None:
    """Anything the direct decoder is not sure of goes to Pillow, so a cut file, a bad CRC, a
    zlib stream too long or short, bytes after IEND or an extra chunk give the same pixels or
    the same reason as before."""
    rng = random.Random(2202)
    for _ in range(200):
        prob = random_map(rng)
        filters = [rng.choice([0, 1, 2]) for _ in range(prob.shape[0])]
        raw = damaged(grey_png(prob, filters), rng)
        assert outcome(masks.decode_png_mask, raw) == outcome(reference_decode, raw)


def test_other_png_forms_still_go_through_pillow() -> None:
    """16-bit, colour, palette and interlaced-free grey with alpha: Pillow's result as before."""
    rng = np.random.default_rng(2203)
    grey = rng.integers(0, 256, (9, 7), dtype=np.uint8)
    for mode in ("LA", "RGB", "P", "1", "I;16"):
        buffer = io.BytesIO()
        Image.fromarray(grey).convert(mode).save(buffer, format="PNG")
        raw = buffer.getvalue()
        assert masks._plain_grey_png(raw) is None
        assert outcome(masks.decode_png_mask, raw) == outcome(reference_decode, raw)


def test_maps_stretched_over_boxes_give_the_reference_masks_and_rle() -> None:
    """map_box_mask and rle_encode_box, and segment's whole read of a PNG mask, against the
    reference: boxes with sub-pixel edges, reaching past the image, spanning its height."""
    rng = random.Random(2204)
    for _ in range(400):
        prob = random_map(rng)
        width, height = rng.randint(1, 400), rng.randint(1, 400)
        box, threshold = random_box(rng), rng.choice([0, 127, 127, 200, 254])
        inside, box_px = masks.map_box_mask(prob, box, width, height, threshold)
        expected, rle = reference_read(prob, box, width, height, threshold)
        assert np.array_equal(inside, expected) and box_px == masks.box_to_pixels(
            box, width, height
        )
        if rle is not None:
            assert masks.rle_encode_box(inside, box_px, width, height) == rle
        png = base64.b64encode(grey_png(prob, [0] * prob.shape[0])).decode()
        read = segment.read_mask(
            {"mask": "data:image/png;base64," + png}, box, width, height, threshold
        )
        assert read[0] == rle


def test_counts_strings_equal_the_reference_for_short_and_long_values() -> None:
    """The table-and-loop writer against the whole-array one: run lengths of every size (up to
    2^40, several characters each) and differences of both signs."""
    rng = np.random.default_rng(2205)
    for size in [0, 1, 2, 3, 4, 5, *rng.integers(6, 3000, 60).tolist()]:
        scale = int(rng.choice([8, 600, 20_000, 2**40]))
        counts = rng.integers(0, scale, size, dtype=np.int64)
        assert masks._encode_counts(counts) == reference_encode_counts(counts)


@pytest.mark.parametrize("form", ["data-url", "bare", "unpadded", "lines", "url-safe"])
def test_base64_forms_decode_as_before(form: str) -> None:
    """The well-formed string takes the direct base64 decode; the others the lenient one."""
    prob = random_map(random.Random(2206))
    raw = grey_png(prob, [1] * prob.shape[0])
    text = base64.b64encode(raw).decode()
    written = {
        "data-url": "data:image/png;base64," + text,
        "bare": text,
        "unpadded": text.rstrip("="),
        "lines": "\n".join(text[i : i + 76] for i in range(0, len(text), 76)),
        "url-safe": base64.urlsafe_b64encode(raw).decode(),
    }[form]
    assert np.array_equal(masks.decode_png_mask(written), prob)
