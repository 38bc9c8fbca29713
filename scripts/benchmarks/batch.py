"""Batch Mode: `pipeline run --batch` over tiny images against the local server on a short time
scale (`--batch-seconds`): the run's peak RSS (VmHWM of the process tree), the time from `run`
to the first job created, the JSONL building rate (from the engine's start to the last job
created: walk, hash, base64, lines, uploads, creates) and the collecting rate (results
downloaded, joined, parsed, committed)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from .harness import SEED, Benchmark, Ctx, Server, run_pipeline, table, write_config
from .scenes import make_tiny

TARGET_PEAK_MB = 300.0
BATCH_SECONDS = 5.0  # the server's time scale: a job succeeds 5 s after its creation
POLL = (0.5, 2.0)  # [batch] poll_seconds, max_poll_seconds

COLUMNS = (  # (table header, figure key)
    ("images", "images"),
    ("ok", "ok"),
    ("jobs", "jobs"),
    ("wall s", "wall_s"),
    ("1st job s", "first_job_s"),
    ("build img/s", "build_images_per_s"),
    ("collect img/s", "collect_images_per_s"),
    ("JSONL MB", "jsonl_mb"),
    ("CPU s", "cpu_s"),
    ("peak RSS MB", "peak_rss_mb"),
)


@dataclass(frozen=True)
class Sizes:
    images: int
    requests_per_job: int


def run(ctx: Ctx[Sizes]) -> dict[str, Any]:
    sizes = ctx.sizes
    t0 = time.perf_counter()
    folders = make_tiny(ctx.images / "tiny", sizes.images)
    print(f"made {sizes.images} tiny images in {time.perf_counter() - t0:.1f} s")
    with Server(ctx.logs / "batch", seed=SEED, batch_seconds=BATCH_SECONDS) as server:
        config = write_config(ctx, "batch", server.url, inputs=folders, concurrency=16)
        with config.open("a") as toml:
            toml.write(
                f"[batch]\nrequests_per_job = {sizes.requests_per_job}\n"
                f"poll_seconds = {POLL[0]}\nmax_poll_seconds = {POLL[1]}\n"
            )
        watcher = FirstJob(server)
        try:
            proc, summary = run_pipeline(ctx, config, "--batch", on_start=watcher.start)
        finally:
            watcher.done.set()
    batch = summary["batch"]
    figures = {
        "images": sizes.images,
        "ok": summary["rows"].get("ok", 0),
        "jobs": batch["jobs_created"],
        "requests_per_job": sizes.requests_per_job,
        "wall_s": round(proc.wall, 1),
        "first_job_s": watcher.seconds,  # from Popen to the server's first create
        "first_job_in_engine_s": batch["first_job_created_s"],  # from the engine's start
        "build_images_per_s": round(batch["requests_submitted"] / batch["all_submitted_s"], 1),
        "collect_images_per_s": round(batch["result_lines"] / batch["collect_s"], 1),
        "jsonl_mb": round(batch["jsonl_bytes"] / 2**20, 1),
        "cpu_s": round(proc.cpu_seconds, 1),
        "peak_rss_mb": round(proc.peak_rss_mb, 1),
        "batch_seconds": BATCH_SECONDS,
        "target_peak_mb": TARGET_PEAK_MB,
    }
    table(
        f"batch: `pipeline run --batch`, 32x32 PNGs, segment, --batch-seconds {BATCH_SECONDS:g}",
        [header for header, _ in COLUMNS],
        [[figures[key] for _, key in COLUMNS]],
    )
    met = "met" if figures["peak_rss_mb"] < TARGET_PEAK_MB else "MISSED"
    print(f"peak RSS {figures['peak_rss_mb']} MB: target < {TARGET_PEAK_MB:g} MB {met}")
    return figures


class FirstJob:
    """Watches the server's counters from the moment the run starts: the time to its first
    batch job (polled every 20 ms, so within 20 ms)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.seconds: float | None = None
        self.done = threading.Event()

    def start(self, started: float) -> None:
        threading.Thread(target=self._watch, args=(started,), daemon=True).start()

    def _watch(self, started: float) -> None:
        while not self.done.is_set():
            if self.server.stats().get("batches", {}).get("created", 0) >= 1:
                self.seconds = round(time.perf_counter() - started, 3)
                return
            self.done.wait(0.02)


BENCHMARK = Benchmark(
    run,
    quick=Sizes(images=10_000, requests_per_job=2_500),
    full=Sizes(images=100_000, requests_per_job=10_000),
    smoke=Sizes(images=40, requests_per_job=20),
)
