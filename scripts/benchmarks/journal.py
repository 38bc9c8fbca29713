"""Journal: what keeping every answer costs in throughput.

The same tiny-image detect run, alternated: with the journal as shipped (every answer written to
the OS as it arrives, fsynced within `journal_seconds` = 1 s or `journal_rows` = 256 answers) and
with the fsync stretched to once a part (`journal_seconds` = 3600, `journal_rows` = 10^8). The
server answers at once, so the client's CPU is the bottleneck and the journal's cost shows at
its largest. Target: the journal costs <= 5%.

Since issue 19 each answer is one `os.write` (a kill -9 then loses only the calls in flight)
where 256 answers used to be one: `write_cost` measures both ways on the same rows, in this
process (the segment's own code; the grouped way as the old code did it: one encode and one
write per group), to put the difference per answer beside the run's time per image.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.output import journal
from pipeline.output.stores import open_store

from .harness import SEED, Benchmark, Ctx, Server, run_pipeline, table, write_config
from .scenes import make_tiny

TARGET_OVERHEAD = 0.05
MODES = {
    "journal": "",  # as shipped
    "once-a-part": "journal_seconds = 3600\njournal_rows = 100000000\n",
}


@dataclass(frozen=True)
class Sizes:
    images: int
    rounds: int  # each mode runs this many times, alternating, to cancel drift on a shared box
    concurrency: int


def run(ctx: Ctx[Sizes]) -> dict[str, Any]:
    sizes = ctx.sizes
    folders = make_tiny(ctx.images / "tiny", sizes.images)
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    with Server(ctx.logs / "journal", seed=SEED, workers=2) as server:
        for round_no in range(sizes.rounds):
            for mode, extra in MODES.items():
                name = f"journal-{mode}-{round_no}"
                config = write_config(
                    ctx, name, server.url, inputs=folders, concurrency=sizes.concurrency,
                    kind="detect",
                )  # fmt: skip
                config.write_text(config.read_text() + extra)  # [output] is the last section
                proc, summary = run_pipeline(ctx, config)
                assert summary["rows"].get("ok", 0) == sizes.images, summary["rows"]
                runs[mode].append(
                    {
                        "images_per_s": sizes.images / proc.wall,
                        "client_cpu_ms_per_image": proc.cpu_seconds / sizes.images * 1000,
                        "peak_rss_mb": proc.peak_rss_mb,
                    }
                )
    medians = {
        mode: {key: round(statistics.median(r[key] for r in rs), 3) for key in rs[0]}
        for mode, rs in runs.items()
    }
    overhead = 1 - medians["journal"]["images_per_s"] / medians["once-a-part"]["images_per_s"]
    writes = write_cost(sizes.images)
    per_image_us = 1e6 / medians["journal"]["images_per_s"]
    figures = {
        "write_cost": writes,
        "per_answer_write_share": round(writes["extra_us_per_row"] / per_image_us, 4),
        "images": sizes.images,
        "rounds": sizes.rounds,
        "concurrency": sizes.concurrency,
        "medians": medians,
        "runs": runs,
        "journal_overhead": round(overhead, 4),
        "target_overhead": TARGET_OVERHEAD,
    }
    table(
        f"journal: detect, {sizes.images} tiny PNGs, zero-latency server (2 processes), "
        f"concurrency {sizes.concurrency}; median of {sizes.rounds} alternating runs",
        ["mode", "images/s", "client CPU ms/img", "peak RSS MB"],
        [[m, v["images_per_s"], v["client_cpu_ms_per_image"], v["peak_rss_mb"]]
         for m, v in medians.items()],
    )  # fmt: skip
    print(f"journal overhead: {overhead:.1%} of throughput (target <= {TARGET_OVERHEAD:.0%})")
    print(
        f"a write per answer: {writes['per_answer_us_per_row']} us/row against "
        f"{writes['grouped_us_per_row']} grouped by {GROUP}: "
        f"{figures['per_answer_write_share']:.2%} of the run's {per_image_us:.0f} us per image; "
        f"read back for the part: {writes['read_back_us_per_row']} us/row"
    )
    return figures


GROUP = 256  # the old write group (SYNC_ROWS)


def write_cost(rows: int, repeats: int = 5) -> dict[str, float]:
    """Microseconds per row to hand a detect row to the OS: one write per row (the segment's
    `write`, as the sink does now) against one encode and write per 256 rows (as before);
    no fsync in either (both fsync in the same groups); and to read it back for its part.
    Best of `repeats`."""
    sample = _detect_row()
    per_answer, grouped, read_back = [], [], []
    with tempfile.TemporaryDirectory() as folder:
        store = open_store(folder)
        for attempt in range(repeats):
            segment = journal.Segment(store, journal.segment_name(f"a{attempt}", 0))
            started = time.perf_counter()
            for _ in range(rows):
                segment.write([sample])
            per_answer.append((time.perf_counter() - started) / rows * 1e6)
            segment.close()
            started = time.perf_counter()
            assert sum(1 for _ in segment.rows()) == rows
            read_back.append((time.perf_counter() - started) / rows * 1e6)
            path = Path(folder, f"grouped-{attempt}")
            with open(path, "ab", buffering=0) as file:
                started = time.perf_counter()
                for _ in range(0, rows, GROUP):
                    file.write(journal.encode([sample] * GROUP))
                grouped.append((time.perf_counter() - started) / rows * 1e6)
    best_one, best_group = min(per_answer), min(grouped)
    return {
        "per_answer_us_per_row": round(best_one, 2),
        "grouped_us_per_row": round(best_group, 2),
        "extra_us_per_row": round(best_one - best_group, 2),
        # a part is now read back from the journal (the sink keeps no rows): decoded once more
        "read_back_us_per_row": round(min(read_back), 2),
    }


def _detect_row() -> dict[str, Any]:
    """A detect answer's row as the sink receives it (five boxes, the raw answer kept)."""
    objects = [
        {"label": f"shape {n}", "box_2d": [10 * n, 20, 30 + n, 40], "bbox": [1.5, 2.5, 3.5, 4.5]}
        for n in range(5)
    ]
    return {
        "image_root": "/data/images", "image_path": "batch0/img00042.png", "task": "detect",
        "status": "ok", "image_sha256": "ab" * 32, "width": 640, "height": 480,
        "objects": objects, "raw_response": str(objects) * 2, "prompt_tokens": 300,
        "completed_at": "2026-12-06T08:00:00+00:00", "run_id": "bench",
    }  # fmt: skip


BENCHMARK = Benchmark(
    run,
    quick=Sizes(images=3000, rounds=2, concurrency=32),
    full=Sizes(images=10000, rounds=3, concurrency=32),
    smoke=Sizes(images=40, rounds=1, concurrency=4),
)
