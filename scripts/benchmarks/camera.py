"""Camera-sized photos (and a few screenshots and HEIC) for `bench.py photos`, cached on disk.

- photos: JPEG at quality 90, 4000x3000 and 4032x3024 in turn (a 12-MP camera's two common
  sizes), drawn from a seed: a 1/f-like luminance texture (octaves of smooth noise, coarse to
  fine) under a slow colour cast, a few flat-coloured objects the local server can find, and
  sensor grain over everything. Not flat colour: the entropy decode, the floor of preparing a
  JPEG, costs by the detail coded (3-4 MB a photo here, as a phone's). Every 4th photo carries
  EXIF orientation 6, as a phone held upright writes it;
- screenshots: PNG, 2560x1440 and 1920x1080: panels, lines of text, a few coloured buttons;
- HEIC: 4032x3024 photos through pillow-heif, when it is importable (else none, said once).

A 12-MP photo costs ~0.4 s of CPU to draw and encode (a HEIC ~3 s), so a set is kept in
TMP/gvp-bench-cache/photos-KEY (KEY: a digest of its parameters and of GENERATOR, which changes
whenever the drawing does). It is drawn in a folder of its own and renamed into place whole, so an
interrupted run never leaves half a set to be measured, and two runs drawing the same set at once
(the smoke test on two workers) both end with one whole set.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFont

from .harness import SEED
from .scenes import chunks, in_pool

GENERATOR = 2  # bump when the drawing changes: old cached sets are then left unused
CACHE = Path(tempfile.gettempdir()) / "gvp-bench-cache"
PHOTO_SIZES = ((4000, 3000), (4032, 3024))
SCREEN_SIZES = ((2560, 1440), (1920, 1080))
HEIC_SIZE = (4032, 3024)
JPEG_QUALITY = 90  # what cameras and phones write by default, about
HEIC_QUALITY = 50  # with the fastest x265 preset: ~3 s a 12-MP photo and ~2.7 MB (at 75 and
# the default preset: 30 s and 6.8 MB, on grain no phone would keep)
HEIC_PRESET = {"preset": "ultrafast"}
ROTATED_EVERY = 4
ORIENTATION_TAG = 0x0112
# Octaves of the luminance texture: (grid cell in pixels of a 4000-px-wide photo, amplitude).
# Amplitudes fall with the cell size, as a natural scene's spectrum does (about 1/f).
OCTAVES = ((600, 7.0), (160, 6.0), (40, 6.0), (12, 6.0), (4, 5.0))
GRAIN = 12  # +- levels of per-pixel sensor noise
TEXTURE_SCALE = 4  # the texture is computed at 1/4 of the side, then upscaled (bilinear)


@dataclass(frozen=True)
class PhotoSet:
    """What to generate: counts by kind; `scale` multiplies every side (the smoke size)."""

    jpegs: int
    pngs: int
    heics: int
    scale: float = 1.0

    @property
    def images(self) -> int:
        return self.jpegs + self.pngs + (self.heics if heic_available() else 0)


def heic_available() -> bool:
    return importlib.util.find_spec("pillow_heif") is not None


def photo_set(spec: PhotoSet) -> Path:
    """The folder holding `spec`'s images (sub-folders jpeg/, png/, heic/), made if not cached."""
    folder = CACHE / f"photos-{_key(spec)}"
    if folder.is_dir():
        print(f"photos: {spec.images} images cached in {folder}")
        return folder
    CACHE.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{folder.name}.drawing-", dir=CACHE))
    try:
        made = _draw_set(spec, staging)
        staging.rename(folder)  # atomic: the set is whole or absent
    except OSError:
        if not folder.is_dir():
            raise
        made = 0  # another run renamed the same set into place first: use that one
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"photos: {f'made {made}' if made else 'another run made the'} images in {folder}")
    return folder


def _draw_set(spec: PhotoSet, folder: Path) -> int:
    if spec.heics and not heic_available():
        print("photos: pillow-heif is not importable, so no HEIC images")
    jobs = [("jpeg", a, b, spec.scale) for a, b in chunks(spec.jpegs, 8)]
    jobs += [("png", a, b, spec.scale) for a, b in chunks(spec.pngs, 4)]
    if heic_available():
        jobs += [("heic", a, b, spec.scale) for a, b in chunks(spec.heics, 1)]
    for kind in ("jpeg", "png", "heic"):
        (folder / kind).mkdir(exist_ok=True)
    return in_pool(_make_chunk, [(str(folder), *job) for job in jobs])


def _key(spec: PhotoSet) -> str:
    described = json.dumps({"generator": GENERATOR, "seed": SEED, **asdict(spec)}, sort_keys=True)
    return hashlib.sha256(described.encode()).hexdigest()[:16]


def _make_chunk(args: tuple[str, str, int, int, float]) -> int:
    """Write images [start, stop) of one kind (a process-pool job)."""
    folder, kind, start, stop, scale = args
    for i in range(start, stop):
        rng = np.random.default_rng([SEED, GENERATOR, ("jpeg", "png", "heic").index(kind), i])
        if kind == "jpeg":
            image = draw_photo(rng, _scaled(PHOTO_SIZES[i % 2], scale))
            orientation = 6 if i % ROTATED_EVERY == ROTATED_EVERY - 1 else 1
            _save_jpeg(image, Path(folder) / kind / f"photo-{i:05d}.jpg", orientation)
        elif kind == "png":
            image = draw_screenshot(rng, _scaled(SCREEN_SIZES[i % 2], scale))
            image.save(Path(folder) / kind / f"screen-{i:05d}.png", "PNG")
        else:
            image = draw_photo(rng, _scaled(HEIC_SIZE, scale))
            _save_heic(image, Path(folder) / kind / f"photo-{i:05d}.heic")
    return stop - start


def _scaled(size: tuple[int, int], scale: float) -> tuple[int, int]:
    return max(16, round(size[0] * scale)), max(16, round(size[1] * scale))


# ---------------------------------------------------------------------------------- drawing
def draw_photo(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A seeded camera-like RGB photo: texture, objects, grain."""
    image = _texture(rng, size)
    _draw_objects(image, rng)
    return _add_grain(image, rng)


def _texture(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Octaves of smooth noise in luminance plus a slow colour cast, computed at 1/4 of the side
    (numpy at full size costs seconds a photo) and upscaled once."""
    width, height = size
    low = (max(4, width // TEXTURE_SCALE), max(4, height // TEXTURE_SCALE))
    unit = width / 4000  # octave cells are given for a 4000-px-wide photo
    luminance = np.zeros((low[1], low[0]), np.float32)
    for cell, amplitude in OCTAVES:
        cells = max(1.0, cell * unit / TEXTURE_SCALE)
        luminance += _smooth_noise(rng, low, cells) * amplitude
    tint = rng.uniform(70, 170, 3)
    channels = [luminance + _smooth_noise(rng, low, low[0] / 6) * 6 + t for t in tint]
    pixels = np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR)


def _smooth_noise(rng: np.random.Generator, size: tuple[int, int], cell: float) -> np.ndarray:
    """Unit Gaussian noise on a grid of `cell`-pixel cells, interpolated (bicubic) to `size`."""
    if cell <= 1:
        return rng.standard_normal((size[1], size[0]), dtype=np.float32)
    grid = (max(2, round(size[1] / cell) + 1), max(2, round(size[0] / cell) + 1))
    noise = rng.standard_normal(grid, dtype=np.float32)
    return np.asarray(Image.fromarray(noise, "F").resize(size, Image.Resampling.BICUBIC))


def _draw_objects(image: Image.Image, rng: np.random.Generator) -> None:
    """3-6 flat-coloured ellipses and rectangles, each a tenth to a fifth of the width across."""
    width, height = image.size
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 7))):
        w = int(rng.integers(width // 10, width // 5))
        h = int(w * rng.uniform(0.6, 1.2))
        x, y = int(rng.integers(0, width - w)), int(rng.integers(0, max(1, height - h)))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x, y, x + w, y + h), fill=colour)


def _add_grain(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Per-pixel noise of +-GRAIN levels, the same on the three channels (luminance grain).

    Drawn as raw bytes and mapped through a lookup table in Pillow: numpy's integer draws and
    arithmetic over 36 M values cost half a second a photo."""
    width, height = image.size
    raw = np.frombuffer(rng.bytes(width * height), np.uint8).reshape(height, width)
    grain = Image.fromarray(raw).point([128 + (v - 128) * GRAIN // 128 for v in range(256)])
    return ImageChops.add(image, grain.convert("RGB"), 1.0, -128)


def draw_screenshot(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A flat UI: a title bar, a side panel, lines of text and a few coloured buttons."""
    width, height = size
    dark = rng.random() < 0.5
    image = Image.new("RGB", size, (32, 33, 36) if dark else (250, 250, 250))
    draw = ImageDraw.Draw(image)
    ink = (220, 220, 220) if dark else (40, 40, 40)
    bar = max(4, height // 24)
    draw.rectangle((0, 0, width, bar), fill=(60, 64, 72) if dark else (225, 228, 235))
    draw.rectangle((0, bar, width // 6, height), fill=(45, 47, 52) if dark else (240, 242, 246))
    font = ImageFont.load_default(size=max(6, bar // 2))
    for line in range(bar * 2, height - bar, bar):
        words = " ".join(["lorem", "ipsum", "dolor", "sit", "amet"][: int(rng.integers(2, 6))] * 3)
        draw.text((width // 6 + bar, line), words, fill=ink, font=font)
    for _ in range(int(rng.integers(2, 5))):
        x, y = int(rng.integers(width // 5, width - width // 8)), int(rng.integers(bar, height))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.rectangle((x, y, x + width // 10, y + bar * 2), fill=colour)
    return image


def _save_jpeg(image: Image.Image, path: Path, orientation: int) -> None:
    exif = Image.Exif()
    if orientation != 1:
        exif[ORIENTATION_TAG] = orientation
    image.save(path, "JPEG", quality=JPEG_QUALITY, exif=exif.tobytes())


def _save_heic(image: Image.Image, path: Path) -> None:
    import pillow_heif  # optional: only when HEIC images are asked for and it is importable

    out = io.BytesIO()
    pillow_heif.from_pillow(image).save(out, quality=HEIC_QUALITY, enc_params=HEIC_PRESET)
    path.write_bytes(out.getvalue())
