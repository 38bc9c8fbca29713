"""The last steps of a downscaled JPEG, resize and EXIF rotation, through OpenCV when the
`[photos]` extra installs it; None otherwise, and prepare keeps Pillow's resize.

Why OpenCV: after the decode at the DCT scale (2000x1500 for a 12-MP photo to 1536 px), Pillow's
resize is the largest step left: plain C, 35-45 ms for BICUBIC, as much as half the decode.
OpenCV's cubic interpolation is SIMD (~5 ms), but it samples without widening its kernel for a
downscale, which aliases fine detail. So a low-pass runs first, a Lanczos-windowed sinc cut off at
the new Nyquist (`_low_pass`, separable, 5 taps at 2000 -> 1536: ~10 ms), as an antialiased
resize's widened kernel would. Measured by `scripts/bench.py prepare` against a full-precision
LANCZOS reference (docs/benchmarks.md): Pillow's BICUBIC quality or better, at half its CPU or
less. The pixels reach OpenCV without a copy (`_pixels`), and the rotation runs in OpenCV too
(SIMD), on the small image.

OpenCV's own decoder is not used: Pillow's decode at the same scale costs the same, and it raises
on a truncated file, where libjpeg through OpenCV prints a warning and fills the rest with grey.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

# The low-pass: sinc(n / scale), cut off at the downscaled image's Nyquist, under a Lanczos
# window, over LOBES * scale taps a side (a Lanczos-2 kernel widened by the scale). Against the
# LANCZOS reference this scored as Pillow's BICUBIC or better on grainy and smooth images alike,
# where a Gaussian blur either aliased grain or softened smooth photos (docs/benchmarks.md).
LOBES = 2
_configured = threading.Event()

# EXIF orientation -> the OpenCV call that displays the stored image (what images._TRANSPOSE
# does with Pillow; tests/test_prepare_jpeg.py checks that the two agree pixel for pixel).
_ORIENT: dict[int, Callable[[Any, np.ndarray], np.ndarray]] = {
    2: lambda cv2, pixels: cv2.flip(pixels, 1),
    3: lambda cv2, pixels: cv2.rotate(pixels, cv2.ROTATE_180),
    4: lambda cv2, pixels: cv2.flip(pixels, 0),
    5: lambda cv2, pixels: cv2.transpose(pixels),
    6: lambda cv2, pixels: cv2.rotate(pixels, cv2.ROTATE_90_CLOCKWISE),
    7: lambda cv2, pixels: cv2.rotate(cv2.transpose(pixels), cv2.ROTATE_180),
    8: lambda cv2, pixels: cv2.rotate(pixels, cv2.ROTATE_90_COUNTERCLOCKWISE),
}


def opencv() -> ModuleType | None:
    """OpenCV, or None when the optional extra is not installed."""
    try:
        import cv2  # an optional extra: imported only when a JPEG is downscaled
    except ImportError:
        return None
    if not _configured.is_set():
        # The runner already prepares images in parallel threads: OpenCV's own pool on top
        # only adds threads that contend for the same cores.
        cv2.setNumThreads(1)
        _configured.set()
    return cv2


def downscale(frame: Image.Image, size: tuple[int, int], orientation: int) -> Image.Image | None:
    """`frame` (mode L or RGB) resized to `size` (before rotation) and rotated as displayed; None
    when OpenCV is not installed (the caller then resizes with Pillow).

    An RGB frame comes back in mode RGBX, Pillow's own layout of RGB, mapped onto OpenCV's
    array without a copy; the JPEG encoder takes it as it takes RGB."""
    cv2 = opencv()
    if cv2 is None:
        return None
    pixels = _pixels(frame)
    across, down = _low_pass(frame.width / size[0]), _low_pass(frame.height / size[1])
    pixels = cv2.sepFilter2D(pixels, -1, across, down, borderType=cv2.BORDER_REFLECT)
    pixels = orient(cv2, cv2.resize(pixels, size, interpolation=cv2.INTER_CUBIC), orientation)
    height, width = pixels.shape[:2]
    mode = "RGBX" if frame.mode == "RGB" else "L"  # what _pixels exported
    return Image.frombuffer(mode, (width, height), pixels, "raw", mode, 0, 1)


def _low_pass(scale: float) -> np.ndarray:
    """The separable low-pass taps for a downscale by `scale` (> 1), summing to 1."""
    radius = max(1, math.floor(LOBES * scale))
    n = np.arange(-radius, radius + 1)
    taps = np.sinc(n / scale) * np.sinc(n / (radius + 1))  # the window's first zero past the ends
    return (taps / taps.sum()).astype(np.float32)


def _pixels(frame: Image.Image) -> np.ndarray:
    """The decoded pixels as an array, without a copy where Pillow allows it: its Arrow export
    shares the image's memory (RGB as RGBX, 4 bytes a pixel), where `np.asarray` packs a copy
    through `tobytes` (~5 ms for 2000x1500 on a quiet machine, 15 under load). An image larger
    than one of Pillow's memory blocks (16 MB) cannot be shared: it is copied, as RGBX too."""
    if not hasattr(frame, "__arrow_c_array__"):  # Pillow before 11.2 exports no Arrow
        return _copied(frame)
    try:
        exported = pa.array(frame)
    except ValueError:  # "Image rows are not contiguous in memory": several blocks
        return _copied(frame)
    values = exported.values if pa.types.is_fixed_size_list(exported.type) else exported
    return np.frombuffer(values.buffers()[1], np.uint8).reshape(frame.height, frame.width, -1)


def _copied(frame: Image.Image) -> np.ndarray:
    """The pixels copied out, in the layout `_pixels` shares (RGBX for RGB)."""
    raw = frame.tobytes("raw", "RGBX") if frame.mode == "RGB" else frame.tobytes()
    return np.frombuffer(raw, np.uint8).reshape(frame.height, frame.width, -1)


def orient(cv2: ModuleType, pixels: np.ndarray, orientation: int) -> np.ndarray:
    """`pixels` as displayed for an EXIF orientation 1-8."""
    turn = _ORIENT.get(orientation)
    return pixels if turn is None else turn(cv2, pixels)
