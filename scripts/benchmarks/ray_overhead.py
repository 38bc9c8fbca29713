"""The Ray engine's cost when nothing limits: images/s against the single-process engine on the
same images and server, the start-up time of each, and the CPU to prepare a camera-sized image
(the figure behind the 10M-image projection in docs/benchmarks.md).

- overhead: detect on tiny images against a zero-latency server (two server processes), no
  limit configured; `pipeline run` with the default engine, then `--engine ray --workers 2` (Ray
  started by the run). images/s over the whole wall time, and in-run (the summary's
  started_at–finished_at, so Ray's start-up is left out);
- start-up: one image, so the wall time is the fixed cost: the single engine; Ray started by the
  run; Ray joined at `--address` (a cluster this benchmark started beforehand);
- prepare: `images.prepare` (sniff, verify, EXIF, decode, downscale to 1,536 px) of a 12-MP
  camera-like JPEG, CPU per image in this process.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image

from tests.image_quality import camera

from .harness import SEED, Benchmark, Ctx, Server, run_pipeline, table, write_config
from .scenes import make_tiny

SERVER_PROCESSES = 2
PREPARE_SIDE = 1536  # a max_side a bulk job would choose: 4 tiles of 2.5 Flash's 768 px


@dataclass(frozen=True)
class Sizes:
    images: int
    concurrency: int
    prepare_repeats: int
    # Whether start-up times a Ray started by the run apart (one image). The smoke size doesn't:
    # the overhead's Ray run starts Ray that same way, and each start costs ~10 s of CPU.
    time_started_ray: bool = True


def run(ctx: Ctx[Sizes]) -> dict[str, Any]:
    sizes = ctx.sizes
    folders = make_tiny(ctx.images / "tiny", sizes.images)
    single = _throughput(ctx, "overhead-single", folders)
    spread = _throughput(ctx, "overhead-ray", folders, "--engine", "ray", "--workers", "2")
    startup = _startup(ctx, folders[0], sizes.time_started_ray)
    figures = {
        "images": sizes.images,
        "single": single,
        "ray": spread,
        "ratio_images_per_s": round(spread["images_per_s"] / single["images_per_s"], 3),
        "ratio_in_run_images_per_s": round(
            spread["in_run_images_per_s"] / single["in_run_images_per_s"], 3
        ),
        "startup_s": startup,
        "prepare_12mp_cpu_ms": _prepare_cost(ctx, sizes.prepare_repeats),
    }
    _print(figures)
    return figures


def _throughput(ctx: Ctx[Sizes], name: str, folders: list[Path], *extra: str) -> dict[str, Any]:
    with Server(ctx.logs / name, seed=SEED, workers=SERVER_PROCESSES) as s:
        config = write_config(
            ctx, name, s.url, inputs=folders, concurrency=ctx.sizes.concurrency, kind="detect"
        )
        proc, summary = run_pipeline(ctx, config, *extra)
    rows = sum(summary["rows"].values())
    in_run = _seconds(summary["started_at"], summary["finished_at"])
    return {
        "rows": rows,
        "wall_s": round(proc.wall, 2),
        "images_per_s": round(rows / proc.wall, 1),
        "in_run_s": round(in_run, 2),
        "in_run_images_per_s": round(rows / in_run, 1),
    }


def _startup(ctx: Ctx[Sizes], folder: Path, started_ray: bool) -> dict[str, float]:
    one = ctx.images / "one"
    one.mkdir()
    first = sorted(folder.iterdir())[0]
    (one / first.name).write_bytes(first.read_bytes())
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
    import ray

    walls = {}
    with Server(ctx.logs / "startup", seed=SEED) as s:
        started = [("ray_started_by_the_run", ("--engine", "ray"))] if started_ray else []
        for label, extra in [("single", ()), *started]:
            config = write_config(ctx, f"startup-{label}", s.url, inputs=[one], concurrency=4)
            walls[label] = round(run_pipeline(ctx, config, *extra, "--workers", "2")[0].wall, 2)
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
        try:
            address = ray.get_runtime_context().gcs_address
            config = write_config(ctx, "startup-ray-joined", s.url, inputs=[one], concurrency=4)
            extra = ("--engine", "ray", "--workers", "2", "--address", address)
            walls["ray_joining_a_cluster"] = round(run_pipeline(ctx, config, *extra)[0].wall, 2)
        finally:
            ray.shutdown()
    return walls


def _prepare_cost(ctx: Ctx[Sizes], repeats: int) -> float:
    """CPU ms of images.prepare for a 4000x3000 JPEG with camera-like detail (seeded noise over
    gradients, quality 90: 5.5 MB; the image `bench.py prepare` measures)."""
    from pipeline.inputs import images
    from pipeline.records import SourceFile

    path = ctx.images / "camera.jpg"
    Image.fromarray(camera(4000, 3000, SEED)).save(path, "JPEG", quality=90)
    stat = path.stat()
    src = SourceFile(str(path), str(path.parent), path.name, stat.st_size, stat.st_mtime_ns)
    started = time.process_time()
    for _ in range(repeats):
        item = images.prepare(src, max_side=PREPARE_SIDE, verify=True)
        assert item.error is None, item.error
    return round((time.process_time() - started) / repeats * 1000, 1)


def _seconds(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def _print(f: dict[str, Any]) -> None:
    table(
        f"ray overhead: detect, {f['images']:,} tiny images, zero-latency server, no limit",
        ["engine", "rows", "wall s", "images/s", "in-run s", "in-run images/s"],
        [
            [
                name,
                r["rows"],
                r["wall_s"],
                r["images_per_s"],
                r["in_run_s"],
                r["in_run_images_per_s"],
            ]
            for name, r in (("single process", f["single"]), ("ray, 2 workers", f["ray"]))
        ],
    )
    print(
        f"ratio ray / single: {f['ratio_images_per_s']} (wall), "
        f"{f['ratio_in_run_images_per_s']} (in-run)"
    )
    table(
        "start-up: one image, wall time of `pipeline run`",
        ["how", "wall s"],
        [[k.replace("_", " "), v] for k, v in f["startup_s"].items()],
    )
    print(
        f"prepare a 12-MP JPEG (verify, downscale to {PREPARE_SIDE}): "
        f"{f['prepare_12mp_cpu_ms']} ms CPU"
    )


BENCHMARK = Benchmark(
    run,
    quick=Sizes(images=2000, concurrency=32, prepare_repeats=3),
    full=Sizes(images=10000, concurrency=32, prepare_repeats=10),
    smoke=Sizes(images=20, concurrency=4, prepare_repeats=1, time_started_ray=False),
)
