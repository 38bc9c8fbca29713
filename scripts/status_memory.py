"""Peak memory of `pipeline status` (and of `--config`'s `pending` counts) over a synthetic output.

    PYTHONPATH=. python scripts/status_memory.py build DIR [--rows N]  # files, manifest, rows
    PYTHONPATH=. python scripts/status_memory.py measure DIR  # peak RSS and CPU of `pending`
    PYTHONPATH=. python scripts/status_memory.py status DIR  # peak RSS and CPU of `status`

`build` makes N files (hard links to one small PNG a folder of 1000: no disk blocks; a file
takes at most 65,000 links), a manifest listing them, and an output of N committed rows for
them under the config's settings, in parts of 5,000 as a sink writes them: 18 of 20 ok (done),
1 an error to retry, 1 made under another prompt. It then stores the output's index cache, as
the run that wrote the rows would have. `measure` runs `pending` (what `status --config` adds)
in this process, `status` the report of the output alone: the pipeline imported from the
current directory (PYTHONPATH=.), so the same command in two worktrees compares two commits.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import time
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


def build(base: Path, rows: int) -> None:
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


def measure(base: Path) -> None:
    """The process's peak RSS, imports included (~140 MB at 2,000 rows): compare the slope
    between two sizes, and two commits at one size."""
    from pipeline.commands.status import pending

    config = load_config(base / "c.toml")
    cpu = time.process_time()
    counts = pending(config)
    cpu = time.process_time() - cpu
    print(counts)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
    print(f"peak RSS {peak} MB, CPU of pending {cpu:.2f} s")


def measure_status(base: Path) -> None:
    """`status` of the output (what `pipeline status OUT` computes), as `measure` does."""
    from pipeline.commands.status import status

    cpu = time.process_time()
    report = status(base / "out")
    cpu = time.process_time() - cpu
    print({key: report[key] for key in ("rows", "rows_committed", "by_status", "cost")})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
    print(f"peak RSS {peak} MB, CPU of status {cpu:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["build", "measure", "status"])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--rows", type=int, default=200_000)
    args = parser.parse_args()
    if args.action == "build":
        args.dir.mkdir(parents=True, exist_ok=True)
        build(args.dir.resolve(), args.rows)
    elif args.action == "status":
        measure_status(args.dir.resolve())
    else:
        measure(args.dir.resolve())


if __name__ == "__main__":
    main()
