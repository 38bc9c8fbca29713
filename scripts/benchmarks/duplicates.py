"""Duplicates: images present twice, far apart, against the same images once.

Issue 19 (item 12): 5,000 tiny images walked, then a second folder holding a copy of each
(walked later: each copy's twin was answered long before). A copy must cost a stat, a hash and a
row — no call, no extra part. Before the fix each copy waited for its twin's row to be committed
(`Bought.find` forced a sink flush: one tiny part a copy) and read it back from the parts.
Figures: wall time, API calls and parts, for the distinct images alone and with their copies.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .harness import SEED, Benchmark, Ctx, Server, run_pipeline, table, write_config
from .scenes import make_tiny


@dataclass(frozen=True)
class Sizes:
    images: int
    concurrency: int


def run(ctx: Ctx[Sizes]) -> dict[str, Any]:
    sizes = ctx.sizes
    folders = make_tiny(ctx.images / "tiny", sizes.images)
    copies = ctx.images / "zz-copies"  # walked after every original
    shutil.copytree(ctx.images / "tiny", copies)
    cases = {"distinct": folders, "twice": [*folders, copies]}
    figures: dict[str, Any] = {"images": sizes.images}
    rows = []
    with Server(ctx.logs / "duplicates", seed=SEED, workers=2) as server:
        for name, inputs in cases.items():
            config = write_config(
                ctx, f"dup-{name}", server.url, inputs=inputs, concurrency=sizes.concurrency,
                kind="detect",
            )  # fmt: skip
            proc, summary = run_pipeline(ctx, config)
            parts = len(list(Path(ctx.output(f"dup-{name}")).glob("data/*.parquet")))
            got = sum(summary["rows"].values())
            figures[name] = {
                "wall_seconds": round(proc.wall, 2),
                "client_cpu_seconds": round(proc.cpu_seconds, 2),
                "api_calls": summary.get("api_calls"),
                "rows": got,
                "parts": parts,
            }
            rows.append([name, got, summary.get("api_calls"), parts, proc.wall, proc.cpu_seconds])
    table(
        f"duplicates: detect, {sizes.images} tiny PNGs, alone and each present twice far apart",
        ["case", "rows", "API calls", "parts", "wall s", "client CPU s"],
        rows,
    )
    return figures


BENCHMARK = Benchmark(
    run,
    quick=Sizes(images=2000, concurrency=32),
    full=Sizes(images=5000, concurrency=32),
    smoke=Sizes(images=20, concurrency=4),
)
