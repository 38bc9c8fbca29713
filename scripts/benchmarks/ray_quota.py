"""The Ray engine under one shared quota: 1, 2, 4 and 8 workers against one RPM the server
enforces in calendar-minute windows, the pipeline given the same limit (issue 12's table).

Each configuration runs `python -m pipeline run CONFIG --engine ray --workers K` (Ray started
locally by the run) against a fresh server, on its own tiny images, long enough for `windows`
whole windows. Counted as the service counts: requests per whole window (from the rows' send
times, `completed_at - latency_ms`) and the server's 429 answers. `--quick` shortens the server's
"minute" (`serve-local --quota-window-seconds`) and scales the configured RPM and burst to match.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from .harness import (
    SEED,
    Benchmark,
    Ctx,
    Server,
    completed_seconds,
    read_rows,
    run_pipeline,
    table,
    write_config,
)
from .scenes import make_tiny

TARGET_FRACTION = 0.97  # of the limit, in every whole window
TARGET_429_FRACTION = 0.005  # of all requests, at most
CONCURRENCY = 16  # per worker


@dataclass(frozen=True)
class Sizes:
    workers: tuple[int, ...]
    limit: int  # requests the server admits per window
    window: float  # the server's "minute" in seconds (60: as the service counts)
    windows: int  # whole windows each configuration should span


def run(ctx: Ctx[Sizes]) -> dict[str, Any]:
    sizes = ctx.sizes
    rows = [_one(ctx, workers) for workers in sizes.workers]
    _print(sizes, rows)
    targets = {"fraction": TARGET_FRACTION, "max_429_fraction": TARGET_429_FRACTION}
    return {"limit": sizes.limit, "window_s": sizes.window, "runs": rows, "targets": targets}


def _one(ctx: Ctx[Sizes], workers: int) -> dict[str, Any]:
    sizes = ctx.sizes
    n = int(sizes.limit * (sizes.windows + 1.5))  # whole windows, plus the first and the last
    name = f"ray-quota-{workers}"
    folders = make_tiny(ctx.images / name, n)
    limits = {"rpm": sizes.limit, "quota_window_seconds": sizes.window}
    with Server(ctx.logs / name, seed=SEED, **limits) as s:
        config = _config(ctx, name, s.url, folders, workers)
        proc, summary = run_pipeline(ctx, config, "--engine", "ray", "--workers", str(workers))
        counts = s.generate_counts()
    sent = _sent_seconds(ctx.output(name))
    windows = Counter((sent // sizes.window).astype(int).tolist())
    full = [windows[w] for w in range(min(windows) + 1, max(windows))]
    refused, requests = counts.get("429", 0), sum(counts.values())
    return {
        "workers": workers,
        "rows": len(sent),
        "requests": requests,
        "throttled": refused,
        "throttled_fraction": round(refused / max(requests, 1), 5),
        "full_windows": full,
        "min_fraction": round(min(full) / sizes.limit, 4) if full else None,
        "max_fraction": round(max(full) / sizes.limit, 4) if full else None,
        "wall_s": round(proc.wall, 1),
        "waited_for_limits_s": summary.get("waited_for_limits_s"),
    }


def _config(ctx: Ctx[Sizes], name: str, url: str, folders: Any, workers: int) -> Any:
    sizes = ctx.sizes
    config = write_config(
        ctx, name, url, inputs=folders, concurrency=CONCURRENCY, rpm=_rpm(sizes), kind="detect"
    )
    burst = f"[limits]\nburst_seconds = {_burst(sizes)}\n"
    # 8 one-CPU workers do not fit 2 cores: each reserves its share (they mostly wait on I/O)
    engine = f"[engine]\nworker_cpus = {min(1.0, 2 / workers):g}\n"
    config.write_text(config.read_text().replace("[limits]\n", burst) + engine)
    return config


def _rpm(sizes: Sizes) -> int:
    """The configured limit: the server's, per 60 s."""
    return round(sizes.limit * 60 / sizes.window)


def _burst(sizes: Sizes) -> float:
    """About a second of a 60-second minute, scaled with the window."""
    return round(sizes.window / 60, 4)


def _sent_seconds(output: Any) -> np.ndarray:
    rows = read_rows(output, ["completed_at", "latency_ms"])
    latency = rows.column("latency_ms").to_numpy(zero_copy_only=False) / 1000
    return np.sort(completed_seconds(rows) - latency)


def _print(sizes: Sizes, runs: list[dict[str, Any]]) -> None:
    table(
        f"ray quota: one enforced limit of {sizes.limit:,} requests per {sizes.window:g} s window "
        f"(configured rpm {_rpm(sizes):,}), {CONCURRENCY} requests in flight per worker",
        ["workers", "requests", "429s", "429 %", "whole windows (requests)", "of limit", "wall s"],
        [
            [
                r["workers"],
                r["requests"],
                r["throttled"],
                f"{r['throttled_fraction'] * 100:.2f}",
                " ".join(str(c) for c in r["full_windows"]) or "-",
                f"{r['min_fraction']}–{r['max_fraction']}",
                r["wall_s"],
            ]
            for r in runs
        ],
    )


BENCHMARK = Benchmark(
    run,
    quick=Sizes(workers=(1, 4), limit=200, window=10.0, windows=2),
    full=Sizes(workers=(1, 2, 4, 8), limit=1200, window=60.0, windows=2),
    smoke=Sizes(workers=(1,), limit=20, window=2.0, windows=1),
)
