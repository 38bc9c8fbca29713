"""Superseding at the end of a run (issue 20): a nightly run answers 10 files of an output of N
committed rows (parts of 5,000, as a sink writes them) again; its end sets the 10 old rows aside
by rewriting only the parts that held them. Measured as the sink's own report (parts and rows
rewritten, seconds) for 10 files next to each other (one folder changed: the usual night) and
for 10 files drawn at random (the worst spread), and for 10 new files (nothing superseded: what
the step costs every run anyway); each first without the index cache (a sink alone; a run's
start has usually stored the facts already) and then with it; beside `pipeline compact`'s
rewrite of everything, which is what a reader's clean view cost before."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from .harness import SEED, Benchmark, Ctx, table
from .resume import _commit_rows

SUFFIX = "0123456789abcdef"
AGAIN = 10  # files answered again by the night


@dataclass(frozen=True)
class Sizes:
    rows: int  # committed rows before the night


def run(ctx: Ctx[Sizes]) -> dict[str, Any]:
    from pipeline.output.compact import compact

    rng = np.random.default_rng(SEED)
    n = ctx.sizes.rows
    cases = {
        "10 adjacent files": np.arange(n // 2, n // 2 + AGAIN),
        "10 random files": np.sort(rng.choice(n, AGAIN, replace=False)),
        "10 new files": np.arange(-AGAIN, 0),  # nothing superseded: what settling costs anyway
    }
    figures: dict[str, Any] = {"committed_rows": n}
    rows = []
    for name, picked in cases.items():
        out = ctx.work / f"supersede-{name.split()[1]}"
        _commit_rows(out, "/photos", SUFFIX, n, [])
        for night, cache in enumerate(("no index cache", "index cached")):
            report = asyncio.run(_night(out, picked, night))
            figures[f"{name}, {cache}"] = report
            rows.append([name, cache, *(report[k] for k in _KEYS)])
        new_rows = 2 * AGAIN if name == "10 new files" else 0
        assert pq.ParquetDataset(out / "data").read(columns=["key"]).num_rows == n + new_rows
    started = time.perf_counter()
    compact(out)
    figures["compact_all_s"] = round(time.perf_counter() - started, 3)
    table(
        f"supersede at a run's end: {n:,} committed rows, {AGAIN} answered again",
        ["night", "facts", "parts rewritten", "rows rewritten", "rows set aside", "seconds"],
        rows,
    )
    print(f"(pipeline compact, every row rewritten: {figures['compact_all_s']} s)")
    return figures


_KEYS = ("parts_rewritten", "rows_rewritten", "rows_set_aside", "seconds")


async def _night(out: Path, picked: np.ndarray, night: int) -> dict[str, Any]:
    """The night's run: the picked files' rows again (newer), through a sink as a run writes."""
    from pipeline.output.parts import current_rows
    from pipeline.output.sink import ParquetSink

    current = current_rows(out).to_pylist()
    index = {(row["image_path"]): row for row in current}
    paths = sorted(index)
    when = datetime(2026, 2, 1 + night, tzinfo=UTC)
    async with ParquetSink(out, f"20260201T00000{night}Z-night") as sink:
        for at in picked:
            row = {**index[paths[int(at)]], "completed_at": when, "run_id": "night"}
            if at < 0:  # a new file
                row["image_path"] = f"new/{night}/{at}.png"
            await sink.add(row)
    return {key: sink.superseded[key] for key in _KEYS}


BENCHMARK = Benchmark(
    run,
    quick=Sizes(rows=20_000),
    full=Sizes(rows=100_000),
    smoke=Sizes(rows=2_000),
)
