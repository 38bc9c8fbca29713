"""Hostile masks: the parser's CPU on ~4 MB segment answers made of many small polygons.

Issue 19 (item 7): such an answer once cost 45 s of CPU for one image, although each mask's
box_2d was tiny: the cap charged the box, not the polygon actually drawn, and nothing charged
the vertices (filling a polygon costs its pixel rows x its vertices). Three seeded answers on a
4000x4000 image, each parsed once in this process (CPU from `time.process_time`):

- far-polygons: 1000 objects (the object cap), box_2d 1x1 px, each a 400-vertex polygon that
  spans the image;
- many-polygons: one object whose mask is 100,000 small polygons;
- tiny-objects: 50,000 objects with a 3-point polygon each (all but 1000 skipped by the object
  cap).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from typing import Any

from pipeline.tasks import TaskSettings, get_task

from .harness import SEED, Benchmark, Ctx, table

SIDE = 4000


@dataclass(frozen=True)
class Sizes:
    scale: float  # share of each answer's full size (1.0: ~4 MB)


def _far_polygons(rng: random.Random, scale: float) -> list[dict[str, Any]]:
    objects = []
    for _ in range(int(1000 * scale)):
        ring = [[rng.randint(0, 1000), rng.randint(0, 1000)] for _ in range(400)]
        objects.append({"box_2d": [0, 0, 1, 1], "label": "x", "mask": ring})
    return objects


def _many_polygons(rng: random.Random, scale: float) -> list[dict[str, Any]]:
    polygons = []
    for _ in range(int(100_000 * scale)):
        x, y = rng.randint(0, 990), rng.randint(0, 990)
        polygons.append([[x, y], [x + 5, y], [x, y + 5]])
    return [{"box_2d": [0, 0, 1000, 1000], "label": "x", "mask": polygons}]


def _tiny_objects(rng: random.Random, scale: float) -> list[dict[str, Any]]:
    objects = []
    for _ in range(int(50_000 * scale)):
        x, y = rng.randint(0, 990), rng.randint(0, 990)
        ring = [[x, y], [x + 5, y], [x, y + 5]]
        objects.append({"box_2d": [y, x, y + 5, x + 5], "label": "x", "mask": ring})
    return objects


ANSWERS = {
    "far-polygons": _far_polygons,
    "many-polygons": _many_polygons,
    "tiny-objects": _tiny_objects,
}


def run(ctx: Ctx[Any]) -> dict[str, Any]:
    settings = TaskSettings(kind="segment", model="gemini-3.8-flash")  # type: ignore[arg-type]
    task = get_task("segment")
    figures: dict[str, Any] = {}
    rows: list[list[Any]] = []
    for name, make in ANSWERS.items():
        text = json.dumps({"boxes": make(random.Random(SEED), ctx.sizes.scale)})
        start = time.process_time()
        parsed = task.parse(text, "STOP", SIDE, SIDE, settings)
        cpu = time.process_time() - start
        drawn = sum(1 for obj in parsed.objects or () if obj.get("mask") is not None)
        figures[name] = {"answer_mb": len(text) / 1e6, "cpu_seconds": cpu, "masks_drawn": drawn}
        rows.append([name, len(text) / 1e6, cpu, drawn])
    table("hostile segment answers, 4000x4000 image", ["answer", "MB", "CPU s", "drawn"], rows)
    return figures


BENCHMARK = Benchmark(
    run,
    quick=Sizes(scale=0.25),
    full=Sizes(scale=1.0),
    smoke=Sizes(scale=0.01),
)
