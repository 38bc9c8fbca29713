"""The benchmarks behind scripts/bench.py: one module per subcommand, on one harness.

    harness.py     Benchmark and Ctx, the local server in its own process, measured child
                   processes, generated configs and `pipeline run`, the record, the tables
    scenes.py      the seeded images: 384-px scenes and 32x32 tiny PNGs
    plots.py       the chart drawn into docs/bench/*.png
    throughput.py  latency.py  rate.py  memory.py  resume.py  profile.py  journal.py
    hanging.py  batch.py     one benchmark each
    duplicates.py  images present twice far apart: parts, calls and time (issue 19)
    hostile_masks.py  the parser's CPU on ~4 MB answers of many small polygons (issue 19)
    masks.py       50 PNG masks on a 12-MP image: CPU per object, peak RSS (issue 22)
    ray_quota.py  ray_overhead.py   the Ray engine: one shared quota; cost and start-up
    bucket_listing.py  bucket_run.py  bucket_resume.py  compaction.py   the same, for buckets
                   and `pipeline compact` (s3server.py: the local S3 they run against)
    supersede.py   a run's end setting aside what it superseded, copy-on-write (issue 20)
    estimate_billed.py  `pipeline estimate` against what the run then bills, per task (issue 21)
    status.py      `pipeline status` (and `--config`) over 1M synthetic committed rows: peak RSS
    prepare.py     images.prepare on a camera JPEG against one entropy decode; quality (issue 22)
    photos.py      detect and segment on 12-MP camera photos vs the SDK script, CPU by stage
                   (issue 22; camera.py: the photos, cached on disk; profiling.py: cProfile in
                   every thread and the stage arithmetic, shared with profile.py)

A benchmark is a module that ends with

    BENCHMARK = Benchmark(run, quick=Sizes(...), full=Sizes(...), smoke=Sizes(...))

where `Sizes` is its own frozen dataclass and `run(ctx: Ctx[Sizes]) -> dict` measures at
`ctx.sizes`, working under `ctx.work` (outputs, `ctx.logs`) and `ctx.images` (tmpfs), prints its
table and returns its figures; the harness adds `bench_seconds` and appends them to
docs/bench-results.jsonl. Adding one: write the module, add its line to BENCHMARKS below (the
order is the order `bench.py all` runs them in).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

# The benchmarks measure with the tests' own image metrics (tests/image_quality.py): the
# repository on the path, whoever imports this package (bench.py, ab_client_cpu.py). Appended:
# a tree given first (ab_client_cpu.py's "before") keeps its own `pipeline`.
if (_root := str(Path(__file__).resolve().parent.parent.parent)) not in sys.path:
    sys.path.append(_root)

from . import (
    batch,
    bucket_listing,
    bucket_resume,
    bucket_run,
    compaction,
    duplicates,
    estimate_billed,
    hanging,
    hostile_masks,
    journal,
    latency,
    masks,
    memory,
    photos,
    prepare,
    profile,
    rate,
    ray_overhead,
    ray_quota,
    resume,
    status,
    supersede,
    throughput,
)
from .harness import Benchmark

BENCHMARKS: dict[str, Benchmark[Any]] = {
    "throughput": throughput.BENCHMARK,
    "latency": latency.BENCHMARK,
    "rate": rate.BENCHMARK,
    "memory": memory.BENCHMARK,
    "resume": resume.BENCHMARK,
    "profile": profile.BENCHMARK,
    "journal": journal.BENCHMARK,
    "hanging": hanging.BENCHMARK,
    "hanging-first-wave": hanging.FIRST_WAVE,
    "batch": batch.BENCHMARK,
    "hostile-masks": hostile_masks.BENCHMARK,
    "masks": masks.BENCHMARK,
    "duplicates": duplicates.BENCHMARK,
    "ray-quota": ray_quota.BENCHMARK,
    "ray-overhead": ray_overhead.BENCHMARK,
    "bucket-listing": bucket_listing.BENCHMARK,
    "bucket-run": bucket_run.BENCHMARK,
    "bucket-resume": bucket_resume.BENCHMARK,
    "compact": compaction.BENCHMARK,
    "supersede": supersede.BENCHMARK,
    "estimate-vs-billed": estimate_billed.BENCHMARK,
    "status": status.BENCHMARK,
    "prepare": prepare.BENCHMARK,
    "photos": photos.BENCHMARK,
}
