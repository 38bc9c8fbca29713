"""Estimate vs billed: what `pipeline estimate` says a run will cost, then what the run bills.

Issue 21: the estimate priced the whole input and guessed 2,500 output tokens an image for every
task ($2.05 estimated, $0.60 paid). For each task, on the bundled samples (data/samples) and on
generated tiny images (one shape each), `python -m pipeline estimate CONFIG --json` on a fresh
output (no history: the per-task prior, pipeline/cost.py), then `pipeline run`, against the
local server: the estimate's interactive cost, the run's `cost_usd` (its billed tokens priced)
and their ratio, and the same for output tokens alone (the part the priors decide). Then, on the
generated images again, the output's own history: a first run of a tenth (`--limit`), the
estimate of the rest (its output tokens from those rows), and the run of the rest.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from .harness import ROOT, SEED, Benchmark, Ctx, Server, read_rows, run_pipeline, table
from .harness import write_config as harness_config
from .scenes import make_tiny

# Each task's settings beyond its kind (the bundled configs' own: configs/*.toml)
TASK_LINES = {
    "detect": [],
    "segment": [],
    "point": [],
    "caption": [],
    "classify": ['labels = ["circle", "rectangle", "triangle"]'],
    "custom": [
        'prompt = "Count the shapes in the image and name their colours. Answer as JSON."',
        'response_schema = \'{"type": "object", "properties": {"count": {"type": '
        '"integer"}, "colours": {"type": "array", "items": {"type": "string"}}}, '
        '"required": ["count", "colours"]}\'',
    ],
}


BILLED_OUTPUT = ("output_tokens", "thoughts_tokens")  # the service bills both as output


@dataclass(frozen=True)
class Sizes:
    images: int
    concurrency: int
    tasks: tuple[str, ...] = tuple(TASK_LINES)  # the smoke run: one task is every step


def run(ctx: Ctx[Sizes]) -> dict[str, Any]:
    sizes = ctx.sizes
    sets = {
        "samples": [ROOT / "data" / "samples"],
        f"{sizes.images} tiny": make_tiny(ctx.images / "tiny", sizes.images),
    }
    learn = sizes.images // 10
    cases = [(name, inputs, 0) for name, inputs in sets.items()]
    history = f"{sizes.images - learn} tiny, history of {learn}"
    cases.append((history, sets[f"{sizes.images} tiny"], learn))
    figures: dict[str, Any] = {"images": sizes.images}
    rows = []
    with Server(ctx.logs / "estimate", seed=SEED, workers=2) as server:
        for number, (set_name, inputs, first) in enumerate(cases):
            for kind in sizes.tasks:
                name = f"est-{kind}-{number}"
                config = _config(ctx, name, server.url, inputs, kind, sizes.concurrency)
                if first:  # the output's own history: its first tenth answered
                    run_pipeline(ctx, config, "--limit", str(first))
                got = _compare(ctx, config)
                figures.setdefault(set_name, {})[kind] = got
                rows.append([set_name, kind, *got.values()])
    table(
        "estimate vs billed: the estimate (a fresh output: the per-task prior), then the run",
        ["images", "task", "est $", "billed $", "ratio", "est out tok", "billed out tok", "ratio"],
        rows,
    )
    return figures


def _config(
    ctx: Ctx[Sizes], name: str, url: str, inputs: list[Path], kind: str, concurrency: int
) -> Path:
    """The harness's config of `kind`, with the task's own settings."""
    path = harness_config(ctx, name, url, inputs=inputs, concurrency=concurrency, kind=kind)
    kind_line = f"kind = {json.dumps(kind)}"
    text = path.read_text().replace(kind_line, "\n".join([kind_line, *TASK_LINES[kind]]))
    path.write_text(text)
    return path


def _compare(ctx: Ctx[Sizes], config: Path) -> dict[str, Any]:
    """The estimate, then the run: their costs and output tokens, and the ratios."""
    cmd = [sys.executable, "-m", "pipeline", "estimate", str(config), "--json"]
    report = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    _, summary = run_pipeline(ctx, config)
    rows = read_rows(Path(ctx.output(config.stem)), ["run_id", *BILLED_OUTPUT])
    mine = rows.filter(pc.equal(rows["run_id"], summary["run_id"]))  # this run's rows
    out = sum(value or 0 for name in BILLED_OUTPUT for value in mine[name].to_pylist())
    billed = summary["cost_usd"]
    return {
        "estimated_usd": report["cost_usd"],
        "billed_usd": billed,
        "usd_ratio": round(report["cost_usd"] / billed, 3) if billed else None,
        "estimated_output_tokens": report["output_tokens"],
        "billed_output_tokens": out,
        "output_ratio": round(report["output_tokens"] / out, 3) if out else None,
    }


BENCHMARK = Benchmark(
    run,
    quick=Sizes(images=200, concurrency=32),
    full=Sizes(images=1000, concurrency=32),
    smoke=Sizes(images=10, concurrency=4, tasks=("segment",)),
)
