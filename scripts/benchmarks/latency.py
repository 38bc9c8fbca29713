"""Latency: the server answers after a long-tailed 2 s mean; throughput against concurrency,
compared with the ideal concurrency / latency, and the requests actually in flight."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

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

TARGET_FRACTION = 0.90  # of concurrency / latency
MEAN_S = 2.0  # the server's mean latency

COLUMNS = (  # (table header, figure key)
    ("concurrency", "concurrency"),
    ("images", "images"),
    ("wall s", "wall_s"),
    ("end-to-end img/s", "end_to_end_images_per_s"),
    ("steady img/s", "steady_images_per_s"),
    (f"ideal c/{MEAN_S:g}s", "ideal_nominal"),
    ("fraction", "fraction_of_ideal_nominal"),
    ("mean lat s", "mean_latency_s"),
    ("p99 lat s", "p99_latency_s"),
    ("ideal c/mean", "ideal_realised"),
    ("fraction", "fraction_of_ideal_realised"),
    ("in flight", "mean_in_flight"),
    ("of c", "in_flight_fraction"),
)


@dataclass(frozen=True)
class Sizes:
    concurrencies: tuple[int, ...]
    rounds: int  # images per run = concurrency x rounds


def run(ctx: Ctx[Sizes]) -> dict[str, Any]:
    sizes = ctx.sizes
    folders = make_tiny(ctx.images / "tiny", max(sizes.concurrencies) * sizes.rounds)
    runs = []
    with Server(ctx.logs / "latency", seed=SEED, latency_ms=int(MEAN_S * 1000)) as server:
        for conc in sizes.concurrencies:
            n = conc * sizes.rounds
            name = f"latency-{conc}"
            config = write_config(ctx, name, server.url, inputs=folders, concurrency=conc)
            proc, summary = run_pipeline(ctx, config, "--limit", str(n))
            rows = read_rows(ctx.output(name), ["status", "completed_at", "latency_ms"])
            runs.append(
                {
                    "concurrency": conc,
                    "images": n,
                    "ok": summary["rows"].get("ok", 0),
                    "wall_s": round(proc.wall, 2),
                    "end_to_end_images_per_s": round(n / proc.wall, 2),
                    **_steady(rows, conc),
                }
            )
    figures = {
        "server_mean_latency_s": MEAN_S,
        "rounds": sizes.rounds,
        "runs": runs,
        "target_fraction": TARGET_FRACTION,
    }
    table(
        f"latency: server latency mean {MEAN_S:g} s (long tail), tiny images, "
        f"{sizes.rounds} x concurrency images per run; steady = completions between "
        "the 10th and 90th percentile",
        [header for header, _ in COLUMNS],
        [[r[key] for _, key in COLUMNS] for r in runs],
    )
    return figures


def _steady(rows: pa.Table, conc: int) -> dict[str, Any]:
    """Throughput and requests in flight between the 10th and 90th percentile of completions."""
    ends = completed_seconds(rows)
    done = np.sort(ends)
    lat = rows.column("latency_ms").to_numpy(zero_copy_only=False) / 1000
    lo, hi = int(0.1 * len(done)), int(0.9 * len(done))
    steady = (hi - lo) / (done[hi] - done[lo])
    realised = float(np.mean(lat))
    # Requests in flight, averaged over the same window (Little's law, low noise):
    # each row was in flight from completed_at - latency to completed_at.
    overlap = np.clip(np.minimum(ends, done[hi]) - np.maximum(ends - lat, done[lo]), 0, None)
    in_flight = float(overlap.sum() / (done[hi] - done[lo]))
    return {
        "steady_images_per_s": round(steady, 2),
        "mean_latency_s": round(realised, 3),
        "p50_latency_s": round(float(np.percentile(lat, 50)), 3),
        "p99_latency_s": round(float(np.percentile(lat, 99)), 3),
        "max_latency_s": round(float(np.max(lat)), 3),
        "ideal_nominal": round(conc / MEAN_S, 2),
        "ideal_realised": round(conc / realised, 2),
        "fraction_of_ideal_nominal": round(steady / (conc / MEAN_S), 3),
        "fraction_of_ideal_realised": round(steady / (conc / realised), 3),
        "mean_in_flight": round(in_flight, 2),
        "in_flight_fraction": round(in_flight / conc, 3),
    }


BENCHMARK = Benchmark(
    run,
    quick=Sizes(concurrencies=(8, 32, 128), rounds=8),
    full=Sizes(concurrencies=(8, 32, 128), rounds=25),
    smoke=Sizes(concurrencies=(2, 4), rounds=2),
)
