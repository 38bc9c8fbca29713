"""How close two images are (PSNR, SSIM, in NumPy), and what prepare() sent before issue 22,
computed here from Pillow directly: what a changed resize is measured against. Also used by
scripts/benchmarks/prepare.py, so the figures in docs/benchmarks.md are these very numbers."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

# prepare() before issue 22: `draft` asked for twice the target (for a 12-MP photo to 1536 px no
# DCT scale meets it: the full image was decoded), then LANCZOS with reducing_gap 3, then the EXIF
# rotation, then JPEG at quality 95.
TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
RED, GREEN, BLUE = (230, 30, 30), (30, 200, 40), (30, 40, 230)
LUMA = np.array([0.299, 0.587, 0.114])
WINDOW = 7  # SSIM's window side (scikit-image's default, uniform)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of 8-bit images, in dB (inf when equal)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity of the luma of two 8-bit RGB (or grey) images."""
    x, y = _luma(a), _luma(b)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _mean(x), _mean(y)
    vx, vy, cov = _mean(x * x) - mx * mx, _mean(y * y) - my * my, _mean(x * y) - mx * my
    num = (2 * mx * my + c1) * (2 * cov + c2)
    return float(np.mean(num / ((mx * mx + my * my + c1) * (vx + vy + c2))))


def _luma(image: np.ndarray) -> np.ndarray:
    image = image.astype(np.float64)
    return image @ LUMA if image.ndim == 3 else image


def _mean(x: np.ndarray) -> np.ndarray:
    """Mean over every WINDOW x WINDOW window (a summed-area table)."""
    table = np.pad(x, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    k = WINDOW
    return (table[k:, k:] - table[:-k, k:] - table[k:, :-k] + table[:-k, :-k]) / (k * k)


def camera(width: int, height: int, seed: int) -> np.ndarray:
    """Camera-like pixels as issue 22 measured them: gradients under strong seeded noise (at
    quality 90, a 4000x3000 one is a 5.5 MB file): the worst case for a decoder and a resize."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / 16 % 256, y / 12 % 256, (x + y) / 28 % 256], axis=-1)
    return np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)


def photo(width: int, height: int, seed: int) -> np.ndarray:
    """Photo-like pixels: smooth gradients, softened seeded grain, and three marked corners
    (red top-left, green top-right, blue bottom-left, as displayed)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 200 / width + 20, y * 200 / height + 20, (x + y) * 100 / (width + height)])
    grain = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
    soft = np.asarray(grain.filter(ImageFilter.GaussianBlur(1.2)), dtype=np.float64) - 128
    pixels = np.clip(base.transpose(1, 2, 0) + soft[..., None] * 0.6, 0, 255).astype(np.uint8)
    side = max(8, min(width, height) // 6)
    pixels[:side, :side], pixels[:side, -side:], pixels[-side:, :side] = RED, GREEN, BLUE
    return pixels


def rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def old_prepare_jpeg(path: Path, max_side: int) -> bytes:
    """The JPEG prepare() sent for a downscaled JPEG before issue 22."""
    with Image.open(path) as image:
        orientation = image.getexif().get(0x0112, 1)
        # the stored size's target is the displayed one's, sides swapped: one scale for both
        width, height = image.size
        scale = max_side / max(width, height)
        target = max(1, round(width * scale)), max(1, round(height * scale))
        image.draft(image.mode, (target[0] * 2, target[1] * 2))
        image.load()
        frame = image.convert("RGB") if image.mode not in ("L", "RGB") else image
        icc = None if frame is not image else image.info.get("icc_profile")
        frame = frame.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
        if orientation in TRANSPOSE:
            frame = frame.transpose(TRANSPOSE[orientation])
        out = io.BytesIO()
        frame.save(out, "JPEG", quality=95, icc_profile=icc)
    return out.getvalue()


def lanczos_reference(path: Path, max_side: int) -> np.ndarray:
    """The image decoded at full precision and size, then LANCZOS to the target: the best a
    downscale can do, before any encoding."""
    with Image.open(path) as image:
        image.load()
        scale = max_side / max(image.size)
        target = max(1, round(image.width * scale)), max(1, round(image.height * scale))
        return np.asarray(image.convert("RGB").resize(target, Image.Resampling.LANCZOS))
