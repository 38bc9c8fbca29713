"""Compaction: `pipeline compact OUT` over N committed rows of which a third are superseded
(the same files answered again by a later run), on disk; wall time and peak RSS of the command,
then a plain DuckDB-style check: the parts in `data/` hold exactly one row per file. (Written
straight as parts, the superseded rows stay visible, as a killed run leaves them.)"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from .harness import Benchmark, Ctx, run_measured, table
from .resume import _commit_rows

SUFFIX = "0123456789abcdef"


@dataclass(frozen=True)
class Sizes:
    rows: int  # committed rows in all; a third of them superseded


def run(ctx: Ctx[Sizes]) -> dict[str, Any]:
    total = ctx.sizes.rows
    files = total * 3 // 4  # 75% first answers, then 25% of those again: a third superseded
    out = ctx.work / "compact-out"
    _commit_rows(out, "/photos", SUFFIX, files, [])
    _commit_rows(out, "/photos", SUFFIX, total - files, [], run_id="20260102T000000Z-bench1", day=2)
    parts_before = len(list(out.glob("data/*.parquet")))
    cmd = [sys.executable, "-m", "pipeline", "compact", str(out)]
    proc = run_measured(cmd, ctx.logs, "compact")
    if proc.returncode != 0:
        raise RuntimeError(f"compact exited {proc.returncode}: {proc.stderr[-2000:]}")
    visible = sorted(out.glob("data/*.parquet"))
    rows_after = sum(pq.read_metadata(path).num_rows for path in visible)
    set_aside = sum(pq.read_metadata(p).num_rows for p in (out / ".superseded").glob("*.parquet"))
    assert rows_after == files and set_aside == total - files, (rows_after, set_aside)
    figures = {
        "rows_before": total,
        "parts_before": parts_before,
        "rows_after": rows_after,
        "parts_after": len(visible),
        "rows_set_aside": set_aside,
        "wall_s": round(proc.wall, 2),
        "rows_per_s": round(total / proc.wall),
        "peak_rss_mb": round(proc.peak_rss_mb, 1),
    }
    table(
        f"compact: {total:,} committed rows, {total - files:,} superseded, on disk",
        [
            "rows before",
            "parts before",
            "rows after",
            "parts after",
            "wall s",
            "rows/s",
            "peak RSS MB",
        ],
        [
            [
                figures[k]
                for k in (
                    "rows_before",
                    "parts_before",
                    "rows_after",
                    "parts_after",
                    "wall_s",
                    "rows_per_s",
                    "peak_rss_mb",
                )
            ]
        ],
    )
    return figures


BENCHMARK = Benchmark(
    run,
    quick=Sizes(rows=200_000),
    full=Sizes(rows=1_000_000),
    smoke=Sizes(rows=3_000),
)
