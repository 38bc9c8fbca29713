"""Memory: peak RSS (VmHWM of the process tree) of `pipeline run` over growing folders of tiny
images, zero-latency server; RSS over time plotted to docs/bench/memory[-quick].png."""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .harness import SEED, Benchmark, Ctx, Server, run_pipeline, shown, table, write_config
from .plots import PALETTE, SERIES_COLOURS, line_chart
from .scenes import make_tiny

TARGET_PEAK_MB = 300.0  # at 300k images

COLUMNS = (  # (table header, figure key)
    ("images", "images"),
    ("ok", "ok"),
    ("wall s", "wall_s"),
    ("img/s", "images_per_s"),
    ("peak RSS MB", "peak_rss_mb"),
    ("RSS@10% MB", "rss_at_10pct_mb"),
    ("RSS@90% MB", "rss_at_90pct_mb"),
    ("x first", "growth_vs_first"),
)


@dataclass(frozen=True)
class Sizes:
    counts: tuple[int, ...]
    concurrency: int


def run(ctx: Ctx[Sizes]) -> dict[str, Any]:
    sizes = ctx.sizes
    t0 = time.perf_counter()
    folders = make_tiny(ctx.images / "tiny", max(sizes.counts))
    print(f"made {max(sizes.counts)} tiny images in {time.perf_counter() - t0:.1f} s")
    runs = []
    series = []
    with Server(ctx.logs / "memory", seed=SEED) as server:
        for count in sizes.counts:
            name, inputs = f"memory-{count}", folders[: math.ceil(count / 1000)]
            config = write_config(
                ctx, name, server.url, inputs=inputs, concurrency=sizes.concurrency
            )
            proc, summary = run_pipeline(ctx, config)
            rss = [mb for _, mb in proc.rss_samples]
            runs.append(
                {
                    "images": count,
                    "ok": summary["rows"].get("ok", 0),
                    "wall_s": round(proc.wall, 1),
                    "images_per_s": round(count / proc.wall, 1),
                    "peak_rss_mb": round(proc.peak_rss_mb, 1),
                    "rss_at_10pct_mb": round(rss[len(rss) // 10], 1) if rss else None,
                    "rss_at_90pct_mb": round(rss[len(rss) * 9 // 10], 1) if rss else None,
                }
            )
            series.append((f"{count:,} images", proc.rss_samples))
            shutil.rmtree(ctx.output(name))
    base = runs[0]["peak_rss_mb"]
    for r in runs:
        r["growth_vs_first"] = round(r["peak_rss_mb"] / base, 3)
    plot = ctx.plot("memory")
    _plot(plot, series)
    figures = {
        "runs": runs,
        "plot": shown(plot),
        "target_peak_mb_at_300k": TARGET_PEAK_MB,
    }
    table(
        "memory: peak RSS of `pipeline run` (VmHWM), 32x32 PNGs, zero-latency server",
        [header for header, _ in COLUMNS],
        [[r[key] for _, key in COLUMNS] for r in runs],
    )
    print(f"plot: {shown(plot)}")
    return figures


def _plot(path: Path, series: Sequence[tuple[str, list[tuple[float, float]]]]) -> None:
    line_chart(
        path,
        "RSS of `pipeline run` over time (process tree, sampled every 0.25 s)",
        [
            (name, [t for t, _ in s], [mb for _, mb in s], SERIES_COLOURS[i % 4])
            for i, (name, s) in enumerate(series)
        ],
        xlabel="seconds since start",
        ylabel="RSS MB",
        hlines=[(TARGET_PEAK_MB, f"{TARGET_PEAK_MB:g} MB target", PALETTE["red"])],
    )


BENCHMARK = Benchmark(
    run,
    quick=Sizes(counts=(10_000, 30_000), concurrency=32),
    full=Sizes(counts=(10_000, 100_000, 300_000), concurrency=32),
    smoke=Sizes(counts=(30, 60), concurrency=4),
)
