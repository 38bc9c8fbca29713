"""Journal: what making every answer durable within a second costs in throughput.

The same tiny-image detect run, alternated: with the journal as shipped (every answer fsynced
within `journal_seconds` = 1 s or `journal_rows` = 256 answers) and with the journal stretched to
once a part (`journal_seconds` = 3600, `journal_rows` = 10^8: rows wait in memory for their part,
as the engine did before the journal). The server answers at once, so the client's CPU is the
bottleneck and the journal's cost shows at its largest. Target: the journal costs <= 5%.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

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
    figures = {
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
    return figures


BENCHMARK = Benchmark(
    run,
    quick=Sizes(images=3000, rounds=2, concurrency=32),
    full=Sizes(images=10000, rounds=3, concurrency=32),
)
