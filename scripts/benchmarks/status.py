"""Status: peak memory and CPU of `pipeline status OUT` and `pipeline status OUT --config C`
over synthetic outputs of N committed rows (`rows` sizes), each command a measured child process.

`_build` makes N files (hard links to one small PNG a folder of 1000: no disk blocks; a file
takes at most 65,000 links), a manifest listing them, and an output of N committed rows for them
under the config's settings, in parts of 5,000 as a sink writes them: 18 of 20 ok (done), 1 an
error to retry, 1 made under another prompt. It then stores the output's index cache, as the
next run after the one that wrote the rows would have. The peak RSS includes the imports
(~140 MB): the figure that matters is the slope between two sizes, in bytes a committed row.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.config import Config, load_config
from pipeline.output.index import load_resume_index
from pipeline.records import ROW_SCHEMA, make_key
from pipeline.run.identity import suffixes_of

from .harness import Benchmark, Ctx, run_measured, table

FOLDER = 1000  # files a folder, each folder's files links to one source
PART_ROWS = 5000
CONFIG = """[api]
base_url = "local"
model = "gemini-2.5-flash"
[input]
paths = []
manifest = "{manifest}"
[task]
kind = "detect"{prompt}
[output]
dir = "{out}"
"""


@dataclass(frozen=True)
class Sizes:
    rows: tuple[int, ...]  # committed rows of each output measured


def run(ctx: Ctx[Sizes]) -> dict[str, Any]:
    figures = [_measure(ctx, rows) for rows in ctx.sizes.rows]
    table(
        "pipeline status over N committed rows (peak RSS includes the imports)",
        ["rows", "status MB", "status CPU s", "--config MB", "--config CPU s"],
        [list(f.values()) for f in figures],
    )
    slopes = _slopes(figures)
    if slopes:
        print(f"bytes a committed row between the sizes: {slopes}")
    return {"sizes": figures, "bytes_per_row": slopes}


def _measure(ctx: Ctx[Sizes], rows: int) -> dict[str, Any]:
    base = ctx.work / f"rows-{rows}"
    base.mkdir()
    _build(base, rows)
    out, config = str(base / "out"), str(base / "c.toml")
    command = [sys.executable, "-m", "pipeline", "status", out, "--json"]
    plain = _checked(run_measured(command, ctx.logs, f"status-{rows}"))
    with_config = _checked(
        run_measured([*command, "--config", config], ctx.logs, f"status-config-{rows}")
    )
    assert json.loads(plain.stdout)["rows"] == rows, plain.stdout[-500:]
    return {
        "rows": rows,
        "status_mb": round(plain.peak_rss_mb),
        "status_cpu_s": round(plain.cpu_seconds, 2),
        "config_mb": round(with_config.peak_rss_mb),
        "config_cpu_s": round(with_config.cpu_seconds, 2),
    }


def _checked(proc: Any) -> Any:
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline status exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def _slopes(figures: list[dict[str, Any]]) -> dict[str, int]:
    """Bytes a row from the first size to the last: the growth, without the imports."""
    if len(figures) < 2 or figures[-1]["rows"] == figures[0]["rows"]:
        return {}
    rows = figures[-1]["rows"] - figures[0]["rows"]
    return {
        name: round((figures[-1][name] - figures[0][name]) * 2**20 / rows)
        for name in ("status_mb", "config_mb")
    }


def _build(base: Path, rows: int) -> None:
    paths = [f"d{i // FOLDER:04d}/img-{i:07d}.png" for i in range(rows)]
    images = base / "images"
    stats = _link_files(base, images, paths)
    manifest = images / "manifest.txt"
    manifest.write_text("".join(f"{path}\n" for path in paths))
    mine = _config(base, manifest, "c.toml", "")
    other = _config(base, manifest, "other.toml", '\nprompt = "Other."')
    suffixes = suffixes_of(mine).as_is, suffixes_of(other).as_is
    sha = hashlib.sha256((base / "one.png").read_bytes()).hexdigest()
    data = Path(mine.output.dir) / "data"
    data.mkdir(parents=True, exist_ok=True)
    for seq, start in enumerate(range(0, rows, PART_ROWS)):
        part = [
            _row(i, paths[i], str(images), sha, suffixes, stats)
            for i in range(start, min(start + PART_ROWS, rows))
        ]
        name = data / f"part-20260101T000000Z-bench0-{seq:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(part, schema=ROW_SCHEMA), name, compression="zstd")
    load_resume_index(
        mine.output.dir, key_suffix=suffixes_of(mine), retry_errors=False, write_cache=True
    )


def _link_files(base: Path, images: Path, paths: list[str]) -> dict[str, os.stat_result]:
    """The files, hard links to one PNG a folder; each folder's source's stat."""
    Image.new("RGB", (64, 48), (200, 30, 30)).save(base / "one.png")
    stats: dict[str, os.stat_result] = {}
    for rel in paths:
        folder = rel.partition("/")[0]
        source = base / "sources" / f"{folder}.png"
        if folder not in stats:
            source.parent.mkdir(exist_ok=True)
            source.write_bytes((base / "one.png").read_bytes())
            stats[folder] = source.stat()
            (images / folder).mkdir(parents=True, exist_ok=True)
        if not (images / rel).exists():
            os.link(source, images / rel)
    return stats


def _config(base: Path, manifest: Path, name: str, prompt: str) -> Config:
    path = base / name
    path.write_text(CONFIG.format(manifest=manifest, prompt=prompt, out=base / "out"))
    return load_config(path)


def _row(
    i: int,
    rel: str,
    root: str,
    sha: str,
    suffixes: tuple[str, str],
    stats: dict[str, os.stat_result],
) -> dict[str, Any]:
    kind = i % 20  # 18 of 20 done, one an error to retry, one made under another prompt
    stat = stats[rel.partition("/")[0]]
    row: dict[str, Any] = {
        "key": make_key(sha, suffixes[1] if kind == 19 else suffixes[0]),
        "image_path": rel,
        "image_root": root,
        "image_sha256": sha,
        "file_size": stat.st_size,
        "file_mtime_ns": stat.st_mtime_ns,
        "width": 64,
        "height": 48,
        "task": "detect",
        "model": "gemini-2.5-flash",
        "status": "ok",
        "run_id": "20260101T000000Z-bench0",
        "completed_at": datetime(2026, 1, 1, tzinfo=UTC),
        "prompt_tokens": 300,
        "output_tokens": 40,
        "total_tokens": 340,
    }
    if kind == 18:
        row.update(status="error", error="503 UNAVAILABLE", retryable=True)
    return row


BENCHMARK = Benchmark(
    run,
    quick=Sizes(rows=(20_000, 200_000)),
    full=Sizes(rows=(200_000, 1_000_000)),
    smoke=Sizes(rows=(100,)),
)
