"""Masks on big images (issue 22, item 3): one segment answer of many PNG masks on a 12-MP image,
CPU per object and peak RSS of parsing it.

A seeded answer of `objects` boxes (edges 2-40 % of the image's, so some masks are a few hundred
pixels and some several megapixels) with a PNG probability map each (an ellipse, 256 px on its
long side, as Gemini 2.5 sends maps smaller than big boxes), parsed in a fresh process so its
peak RSS is the parse's: `segment`'s own parse (each map stretched over its box and RLE-encoded
from the box region), then, for contrast, the full-array method it replaced (each mask placed in a
full-image bool array, `masks.place_box_mask`, then `masks.rle_encode`). Both give the same RLE
(tests/test_masks.py checks it against a numpy reference); the figures are the CPU and memory.
"""

from __future__ import annotations

import base64
import io
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from .harness import ROOT, SEED, Benchmark, Ctx, run_measured, table

WIDTH, HEIGHT = 4000, 3000  # 12 MP, a camera photo's size
MAP_SIDE = 256

# The child process: import, note the RSS, parse the answer one way, print CPU and RSS as JSON.
CHILD = """
import json, resource, sys, time
from pathlib import Path
from pipeline import masks
from pipeline.tasks import TaskSettings, get_task

def rss_mb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024

method, path, width, height = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
text = Path(path).read_text()
settings = TaskSettings(kind="segment")
before = rss_mb("VmRSS:")
start = time.process_time()
if method == "box":
    parsed = get_task("segment").parse(text, "STOP", width, height, settings)
    rles = [o["mask"] for o in parsed.objects]
else:
    rles = []
    for item in json.loads(text):
        box = masks.box_to_pixels(item["box_2d"], width, height)
        full = masks.place_box_mask(masks.decode_png_mask(item["mask"]), box, width, height)
        rles.append(masks.rle_encode(full))
cpu = time.process_time() - start
print(json.dumps({"cpu_s": cpu, "rss_before_mb": before, "hwm_mb": rss_mb("VmHWM:"),
                  "masks": sum(r is not None for r in rles)}))
"""


@dataclass(frozen=True)
class Sizes:
    objects: int


def seeded_answer(objects: int, seed: int = SEED) -> list[dict[str, Any]]:
    """A segment answer of `objects` boxes with an ellipse map each (JSON-able, as Gemini's)."""
    rng = random.Random(seed)
    items = []
    for i in range(objects):
        h, w = rng.randint(20, 400), rng.randint(20, 400)  # 0-1000 units: 2-40 % of the image
        y0, x0 = rng.randint(0, 1000 - h), rng.randint(0, 1000 - w)
        box = [y0, x0, y0 + h, x0 + w]
        items.append({"box_2d": box, "label": f"object {i}", "mask": _ellipse_map(h, w)})
    return items


def _ellipse_map(h: int, w: int) -> str:
    """A data-URL PNG of a soft-edged ellipse filling a map of the box's aspect."""
    scale = MAP_SIDE / max(h * HEIGHT, w * WIDTH)
    size = (max(int(w * WIDTH * scale), 2), max(int(h * HEIGHT * scale), 2))
    image = Image.new("L", size, 0)
    ImageDraw.Draw(image).ellipse((1, 1, size[0] - 2, size[1] - 2), fill=230)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def run(ctx: Ctx[Sizes]) -> dict[str, Any]:
    answer = ctx.work / "answer.json"
    answer.write_text(json.dumps(seeded_answer(ctx.sizes.objects)))
    figures: dict[str, Any] = {"width": WIDTH, "height": HEIGHT, "objects": ctx.sizes.objects}
    rows = []
    for method in ("box", "full-array"):
        measured = _child(ctx, method, answer)
        per_object = measured["cpu_s"] / ctx.sizes.objects * 1000
        growth = measured["hwm_mb"] - measured["rss_before_mb"]
        figures[method] = {**measured, "cpu_ms_per_object": round(per_object, 3)}
        rows.append([method, measured["masks"], per_object, measured["hwm_mb"], growth])
    table(
        f"masks: one segment answer of {ctx.sizes.objects} PNG masks on a {WIDTH}x{HEIGHT} "
        "image, parsed in a fresh process",
        ["method", "masks", "CPU ms / object", "peak RSS MB", "peak over imports MB"],
        rows,
    )
    return figures


def _child(ctx: Ctx[Sizes], method: str, answer: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-c", CHILD, method, str(answer), str(WIDTH), str(HEIGHT)]
    proc = run_measured(cmd, ctx.logs, f"masks-{method}", env={"PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise RuntimeError(f"masks {method} exited {proc.returncode}: {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


BENCHMARK = Benchmark(
    run,
    quick=Sizes(objects=50),
    full=Sizes(objects=50),
    smoke=Sizes(objects=3),
)
