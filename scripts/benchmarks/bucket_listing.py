"""Bucket listing: `pipeline.inputs.source.walk` over N objects in a local S3 (moto's server in its
own process), objects/s and peak RSS, against s3fs's `find` (the whole listing in memory at once,
what a plain fsspec script does). The local S3's own per-page cost (moto sorts every key of the
bucket on each page) bounds both; the comparison is the client's memory, and its speed against
the same server."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from .harness import ROOT, Benchmark, Ctx, run_measured, table
from .s3server import S3Server

PREFIX = "list-bench/objects"
WALK = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from pipeline.inputs.source import walk
started = time.perf_counter()
count = sum(1 for _ in walk(["s3://{PREFIX}"]))
print(count, time.perf_counter() - started)
"""
FIND = f"""
import time, s3fs
fs = s3fs.S3FileSystem()
started = time.perf_counter()
count = len(fs.find("{PREFIX}"))
print(count, time.perf_counter() - started)
"""
IMPORTS = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import s3fs, pipeline.inputs.source
print(0, 0.0)
"""
CLIENTS = {
    "pipeline walk (pages of 1000)": WALK,
    "s3fs find (all at once)": FIND,
    "imports only (baseline)": IMPORTS,
}


@dataclass(frozen=True)
class Sizes:
    objects: int


def run(ctx: Ctx[Sizes]) -> dict[str, Any]:
    n = ctx.sizes.objects
    figures: dict[str, Any] = {"objects": n}
    with S3Server(ctx.logs / "s3", synthetic={PREFIX: n}) as s3:
        for name, code in CLIENTS.items():
            proc = run_measured([sys.executable, "-c", code], ctx.logs, name.split()[0], env=s3.env)
            count, seconds = proc.stdout.split()
            figures[name] = {
                "listed": int(count),
                "listing_s": round(float(seconds), 2),
                "objects_per_s": round(int(count) / float(seconds)) if float(seconds) else None,
                "peak_rss_mb": round(proc.peak_rss_mb, 1),
            }
    keys = ("listed", "listing_s", "objects_per_s", "peak_rss_mb")
    table(
        f"bucket listing: {n:,} objects in one prefix (1,000 a folder), local S3 (moto)",
        ["client", "listed", "listing s", "objects/s", "peak RSS MB"],
        [[name, *(figures[name][k] for k in keys)] for name in CLIENTS],
    )
    return figures


BENCHMARK = Benchmark(
    run,
    quick=Sizes(objects=20_000),
    full=Sizes(objects=100_000),
    smoke=Sizes(objects=50),
)
