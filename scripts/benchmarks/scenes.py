"""The seeded images the benchmarks send, generated in a process pool into a temporary folder.

- scenes: 384x384 PNGs with 2-4 flat shapes, drawn by scripts/make_samples.py's `draw_scene`
  with a seed per image (~1.9 kB each); the local server finds the shapes and renders their masks;
- tiny: 32x32 PNGs with one rectangle and a text chunk holding their number, so that every file's
  bytes differ (no image is answered from the dedupe shortcut); 1000 per sub-folder.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from make_samples import draw_scene
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from .harness import SEED


def make_scenes(folder: Path, count: int, side: int = 384) -> int:
    """`count` PNG scenes of 2-4 shapes each (seeded); returns the number of shapes drawn."""
    folder.mkdir(parents=True, exist_ok=True)
    return in_pool(_scene_chunk, [(str(folder), a, b, side) for a, b in chunks(count, 500)])


def _scene_chunk(args: tuple[str, int, int, int]) -> int:
    """Write 384-px flat-shape scenes [start, stop) (a process-pool job)."""
    folder, start, stop, side = args
    objects = 0
    for i in range(start, stop):
        image, shapes = draw_scene(random.Random(SEED * 1_000_003 + i), side, side)
        image.save(Path(folder) / f"scene-{i:06d}.png", "PNG")
        objects += len(shapes)
    return objects


def make_tiny(folder: Path, count: int) -> list[Path]:
    """`count` tiny PNGs in sub-folders of 1000; returns the sub-folders in walk order."""
    folder.mkdir(parents=True, exist_ok=True)
    in_pool(_tiny_chunk, [(str(folder), a, b) for a, b in chunks(count, 1000)])
    return sorted(p for p in folder.iterdir() if p.is_dir())


def _tiny_chunk(args: tuple[str, int, int]) -> int:
    """Write tiny 32x32 images [start, stop): one shape each, 1000 per folder."""
    folder, start, stop = args
    for i in range(start, stop):
        rng = random.Random(SEED * 7 + i)
        background = rng.choice([(255, 255, 255), (30, 30, 30), (245, 240, 230)])
        image = Image.new("RGB", (32, 32), background)
        w, h = rng.randint(8, 16), rng.randint(8, 16)
        x, y = rng.randint(2, 30 - w), rng.randint(2, 30 - h)
        colour = rng.choice([(220, 40, 40), (40, 170, 70), (40, 80, 220), (235, 200, 40)])
        ImageDraw.Draw(image).rectangle((x, y, x + w - 1, y + h - 1), fill=colour)
        info = PngInfo()
        info.add_text("n", str(i))  # distinct bytes for every image: no dedupe shortcut
        sub = Path(folder) / f"d{i // 1000:04d}"
        sub.mkdir(exist_ok=True)
        image.save(sub / f"tiny-{i:07d}.png", "PNG", pnginfo=info)
    return stop - start


def chunks(count: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of at most `size` covering range(count): one process-pool job each."""
    return [(a, min(a + size, count)) for a in range(0, count, size)]


def in_pool(job: Callable[[Any], int], jobs: list[Any]) -> int:
    """Run `job` over `jobs` on every core this process may use; the sum of what they return."""
    with ProcessPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
        return sum(pool.map(job, jobs))
