"""Who writes the output of a Ray run (pipeline/sink.py): the driver holds it, its workers' sinks
share it, another run cannot get in, and a lost worker's journal is committed alone."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from pipeline import journal
from pipeline.records import make_key
from pipeline.sink import OutputDirBusy, ParquetSink, recover_writer, shared_output
from pipeline.stores import open_store
from tests.conftest import read_rows


def row(n: int) -> dict[str, Any]:
    sha = hashlib.sha256(f"image {n}".encode()).hexdigest()
    return {
        "key": make_key(sha, "settings1"),
        "image_path": f"{n:05d}.png",
        "image_root": "/data",
        "image_sha256": sha,
        "task": "detect",
        "status": "ok",
        "run_id": "run1",
    }


async def test_a_runs_writers_share_the_output_and_keep_others_out(tmp_path: Path) -> None:
    with shared_output(tmp_path) as recovered:
        assert recovered == 0
        async with (
            ParquetSink(tmp_path, "run1.w0", shared=True) as first,
            ParquetSink(tmp_path, "run1.w1", shared=True) as second,
        ):
            await first.add(row(0))
            await second.add(row(1))
            with pytest.raises(OutputDirBusy):  # another run, as the single engine opens it
                async with ParquetSink(tmp_path, "other"):
                    pass
            with pytest.raises(OutputDirBusy), shared_output(tmp_path):  # or another Ray driver
                pass
    names = sorted(p.name for p in tmp_path.glob("*.parquet"))
    assert names == ["part-run1.w0-00000.parquet", "part-run1.w1-00000.parquet"]
    assert {r["run_id"] for r in read_rows(tmp_path)} == {"run1"}  # the run's id, not the name


async def test_a_shared_writer_cannot_start_while_another_run_writes(tmp_path: Path) -> None:
    async with ParquetSink(tmp_path, "single"):
        with pytest.raises(OutputDirBusy):
            async with ParquetSink(tmp_path, "run1.w0", shared=True):
                pass


def test_the_driver_commits_a_killed_runs_journal_before_sharing(tmp_path: Path) -> None:
    segment = journal.Segment(open_store(tmp_path), journal.segment_name("killed.w3", 0))
    segment.append([row(7)])
    segment.close()
    with shared_output(tmp_path) as recovered:
        assert recovered == 1
    assert [r["image_path"] for r in read_rows(tmp_path)] == ["00007.png"]


def test_a_lost_writers_journal_is_committed_alone(tmp_path: Path) -> None:
    for name, n in (("run1.w1", 1), ("run1.w10", 10), ("run1.w2", 2)):
        segment = journal.Segment(open_store(tmp_path), journal.segment_name(name, 0))
        segment.append([row(n)])
        segment.close()
    assert recover_writer(tmp_path, "run1.w1") == 1
    assert [p.name for p in tmp_path.glob("*.parquet")] == ["part-run1.w1-00000.parquet"]
    alive = sorted(journal.segments(open_store(tmp_path)))
    assert alive == [journal.segment_name("run1.w10", 0), journal.segment_name("run1.w2", 0)]
