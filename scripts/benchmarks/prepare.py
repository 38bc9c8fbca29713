"""Prepare: the CPU of `images.prepare` on a camera JPEG that is downscaled, against the floor of
one entropy decode of the same file, and the quality of what it sends (issue 22, item 1).

One 4000x3000 camera-like JPEG (quality 90, seeded noise over gradients: tests/image_quality.py
`camera`) and one photo-like JPEG of the same size (softened grain), to `max_side` 1536. Every
figure is CPU time in this process (`time.process_time`), the median of `repeats` rounds that
take each way in turn (so a machine that drifts moves all alike):

- floor: Pillow's decode at 1/8 DCT scale (`draft`, then `load`): every byte entropy-decoded;
- before: prepare() before issue 22 (tests/image_quality.py `old_prepare_jpeg`: `draft` at
  twice the target, a full decode here, LANCZOS, JPEG), plus the sha256 prepare takes;
- now: `images.prepare(max_side=1536)` as a run calls it (hash, header, decode, resize, encode);
- filters: the decode at the DCT scale now used, then each resize filter and the encode;
- bounds: that decode alone, with libjpeg's fast flag (JDCT_FASTEST, no fancy upsampling:
  Pillow's `decoderconfig` draft flag), and followed by a crop to the target (a copy in place
  of the resize) and the encode: how near the floor prepare could get with a free resize.

Quality: PSNR and SSIM (tests/image_quality.py, NumPy) of the image sent, and of the resize
before its encoding, against a full-precision LANCZOS reference (the whole file decoded, then
LANCZOS to the target).

Memory (item 2): `pipeline run` (detect, concurrency 64, zero-latency local server) over camera
JPEGs rotated by EXIF and sent without `max_side`, so each is decoded whole (12 MP: 96 MB
admitted), under each `[images] decode_budget_mb` of `budgets_mb`: peak RSS of the run's process.
"""

from __future__ import annotations

import hashlib
import io
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# scripts/bench.py puts the repository first on sys.path: the very metrics the tests use
from tests.image_quality import (
    camera,
    lanczos_reference,
    old_prepare_jpeg,
    photo,
    psnr,
    rgb,
    ssim,
)

from .harness import SEED, Benchmark, Ctx, Server, run_pipeline, table, write_config

FILTERS = ("BILINEAR", "BICUBIC", "LANCZOS")
OPENCV = "OpenCV"  # pipeline/inputs/resample.py: low-pass, then cubic (the [photos] extra)
BOUNDS = ("decode alone", "decode, fast flag", "decode + crop + encode")


@dataclass(frozen=True)
class Sizes:
    width: int
    height: int
    max_side: int
    repeats: int
    photos: int  # the memory part: rotated photos in one run
    budgets_mb: tuple[int, ...]


def run(ctx: Ctx[Sizes]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for name, make in (("camera", camera), ("photo", photo)):
        path = ctx.images / f"{name}.jpg"
        Image.fromarray(make(ctx.sizes.width, ctx.sizes.height, SEED)).save(path, quality=90)
        figures[name] = _measure(path, ctx.sizes)
        _print(name, path, figures[name], ctx.sizes)
    figures["memory"] = _memory(ctx)
    return figures


def _measure(path: Path, sizes: Sizes) -> dict[str, Any]:
    from pipeline.inputs import images, resample  # the tree measured (a "before" may lack it)
    from pipeline.records import SourceFile

    data, side = path.read_bytes(), sizes.max_side
    source = SourceFile(str(path), str(path.parent), path.name, len(data))
    ways: dict[str, Callable[[], object]] = {
        "floor": lambda: _floor(data),
        "before": lambda: (hashlib.sha256(data).digest(), old_prepare_jpeg(path, side)),
        "now": lambda: images.prepare(source, max_side=side),
    }
    filters = (*FILTERS, *((OPENCV,) if resample.opencv() else ()))
    ways.update({name: _drafted_way(data, side, name) for name in filters})
    ways.update(_bounds(data, side))
    ms = _median_cpu_ms(ways, sizes.repeats)
    reference = lanczos_reference(path, side)
    now = images.prepare(source, max_side=side)
    assert now.data is not None, now.error
    quality = {
        "before": _quality(rgb(old_prepare_jpeg(path, side)), reference),
        "now": _quality(rgb(now.data), reference),
    }
    for name in filters:
        quality[f"{name} resized"] = _quality(np.asarray(_drafted(data, side, name)), reference)
    return {"file_mb": round(len(data) / 1e6, 2), "cpu_ms": ms, "quality": quality}


def _memory(ctx: Ctx[Sizes]) -> list[dict[str, Any]]:
    folder = ctx.images / "rotated"
    folder.mkdir()
    pixels = Image.fromarray(camera(ctx.sizes.width, ctx.sizes.height, SEED))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: decoded whole even without max_side
    for i in range(ctx.sizes.photos):  # a comment each: no two files share their bytes
        pixels.save(folder / f"r{i}.jpg", quality=90, exif=exif, comment=f"photo {i}")
    figures = []
    with Server(ctx.logs / "prepare", seed=SEED) as server:
        for budget in ctx.sizes.budgets_mb:
            name = f"budget-{budget}"
            config = write_config(
                ctx, name, server.url, inputs=[folder], concurrency=64, kind="detect"
            )
            config.write_text(config.read_text() + f"[images]\ndecode_budget_mb = {budget}\n")
            proc, summary = run_pipeline(ctx, config)
            figures.append(
                {
                    "decode_budget_mb": budget,
                    "rows_ok": summary.get("rows", {}).get("ok"),
                    "peak_rss_mb": round(proc.peak_rss_mb),
                    "cpu_ms_per_image": round(proc.cpu_seconds / ctx.sizes.photos * 1000),
                    "wall_s": round(proc.wall, 1),
                }
            )
    _print_memory(figures, ctx.sizes)
    return figures


def _print_memory(figures: list[dict[str, Any]], sizes: Sizes) -> None:
    table(
        f"memory: {sizes.photos} rotated {sizes.width}x{sizes.height} JPEGs, concurrency 64",
        ["decode_budget_mb", "rows ok", "peak RSS MB", "CPU ms/image", "wall s"],
        [list(f.values()) for f in figures],
    )


def _floor(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as image:
        image.draft(image.mode, (image.width // 8, image.height // 8))
        image.load()


def _drafted(data: bytes, side: int, name: str) -> Image.Image:
    """Decoded at the smallest DCT scale not below the target, then resized with `name` (a
    Pillow filter, or OPENCV: what prepare does with the [photos] extra)."""
    with Image.open(io.BytesIO(data)) as image:
        scale = side / max(image.size)
        target = round(image.width * scale), round(image.height * scale)
        image.draft(image.mode, target)
        image.load()
        if name == OPENCV:
            from pipeline.inputs import resample  # only where _measure found it

            resized = resample.downscale(image, target, orientation=1)
            assert resized is not None, "OpenCV is not installed (the [photos] extra)"
            return resized.convert("RGB")  # RGBX, shared with OpenCV: as the other ways give
        return image.resize(target, Image.Resampling[name], reducing_gap=2.0)


def _decoded(data: bytes, side: int, *, fast: bool = False, encode: bool = False) -> object:
    """Decoded at the smallest DCT scale not below the target, then (`encode`) cropped to the
    target, a plain copy in place of the resize, and encoded as prepare encodes. `fast`:
    libjpeg's fast IDCT and plain upsampling (the draft flag of Pillow's JPEG decoder, the second
    of its `decoderconfig`)."""
    with Image.open(io.BytesIO(data)) as image:
        scale = side / max(image.size)
        target = round(image.width * scale), round(image.height * scale)
        image.draft(image.mode, target)
        if fast:
            image.decoderconfig = (image.decoderconfig[0], 1)
        image.load()
        out = io.BytesIO()
        if encode:
            image.crop((0, 0, *target)).save(out, "JPEG", quality=95)
        return out


def _bounds(data: bytes, side: int) -> dict[str, Callable[[], object]]:
    return {
        BOUNDS[0]: lambda: _decoded(data, side),
        BOUNDS[1]: lambda: _decoded(data, side, fast=True),
        BOUNDS[2]: lambda: _decoded(data, side, encode=True),
    }


def _drafted_way(data: bytes, side: int, name: str) -> Callable[[], object]:
    def way() -> object:
        out = io.BytesIO()
        _drafted(data, side, name).save(out, "JPEG", quality=95)
        return out

    return way


def _median_cpu_ms(ways: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    for way in ways.values():
        way()  # warm: imports, first allocations
    samples: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeats):
        for name, way in ways.items():
            started = time.process_time()
            way()
            samples[name].append((time.process_time() - started) * 1000)
    return {name: round(statistics.median(times), 1) for name, times in samples.items()}


def _quality(sent: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    return {"psnr_db": round(psnr(sent, reference), 2), "ssim": round(ssim(sent, reference), 4)}


def _print(name: str, path: Path, f: dict[str, Any], sizes: Sizes) -> None:
    ms, quality, floor = f["cpu_ms"], f["quality"], f["cpu_ms"]["floor"]
    rows = [[way, ms[way], round(ms[way] / floor, 2)] for way in ("floor", "before", "now")]
    filters = [n for n in ms if n not in ("floor", "before", "now", *BOUNDS)]
    rows += [[f"decode + {n} + encode", ms[n], round(ms[n] / floor, 2)] for n in filters]
    rows += [[f"bound: {n}", ms[n], round(ms[n] / floor, 2)] for n in BOUNDS]
    title = f"prepare: {name} {sizes.width}x{sizes.height} JPEG ({f['file_mb']} MB)"
    table(f"{title} to max_side {sizes.max_side}", ["way", "CPU ms", "x floor"], rows)
    table(
        "quality against a full-precision LANCZOS reference",
        ["image", "PSNR dB", "SSIM"],
        [[way, q["psnr_db"], q["ssim"]] for way, q in quality.items()],
    )


BENCHMARK = Benchmark(
    run,
    quick=Sizes(width=2000, height=1500, max_side=768, repeats=3, photos=4, budgets_mb=(32, 2048)),
    full=Sizes(
        width=4000, height=3000, max_side=1536, repeats=15, photos=12, budgets_mb=(128, 2048)
    ),
    smoke=Sizes(width=400, height=300, max_side=160, repeats=1, photos=2, budgets_mb=(1, 64)),
)
