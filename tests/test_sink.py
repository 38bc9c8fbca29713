"""ParquetSink: whole-or-absent parts, flushing by count and by time, back-pressure, kill -9."""

from __future__ import annotations

import asyncio
import functools
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pipeline.commands.status import status
from pipeline.output import journal
from pipeline.output.parts import current_rows, part_files
from pipeline.output.sink import ParquetSink, SinkFailed
from pipeline.output.stores import OutputDirBusy, open_store
from pipeline.records import ROW_SCHEMA, SCHEMA_VERSION
from tests.conftest import REPO, child_env, result_row, until


def row(n: int, **changes: Any) -> dict[str, Any]:
    base = {
        "file_size": 1000 + n,
        "file_mtime_ns": 1_700_000_000_000_000_000 + n,
        "width": 640,
        "height": 480,
        "objects": [{"label": "cat", "box_2d": [1, 2, 3, 4], "bbox": [1.5, 2.5, 3.5, 4.5]}],
        "prompt_tokens": 300,
    }
    return result_row(
        f"img/{n:05d}.jpg", content=f"image {n}", settings="settings1", **(base | changes)
    )


def parquet_names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.glob("data/*.parquet"))


async def test_parts_are_zstd_parquet_with_the_row_schema(tmp_path: Path) -> None:
    async with ParquetSink(tmp_path, "run1", rows_per_part=10, flush_seconds=60) as sink:
        for n in range(25):
            await sink.add(row(n))
    assert sink.rows_written == 25
    assert parquet_names(tmp_path) == [f"part-run1-{seq:05d}.parquet" for seq in range(3)]
    assert [pq.read_metadata(p).num_rows for p in sorted(tmp_path.glob("data/*.parquet"))] == [
        10,
        10,
        5,
    ]
    part = pq.ParquetFile(tmp_path / "data" / "part-run1-00000.parquet")
    assert part.schema_arrow == ROW_SCHEMA
    version = part.schema_arrow.metadata[b"gemini_vision_pipeline.schema_version"]
    assert version.decode() == SCHEMA_VERSION
    assert part.metadata.row_group(0).column(0).compression == "ZSTD"
    table = part.read()
    assert table.column("image_path").to_pylist()[:2] == ["img/00000.jpg", "img/00001.jpg"]
    assert table.column("objects")[0].as_py()[0]["bbox"] == [1.5, 2.5, 3.5, 4.5]
    # Filled in by the sink: readers order rows by these.
    assert set(table.column("run_id").to_pylist()) == {"run1"}
    assert table.column("completed_at").null_count == 0
    assert not list(tmp_path.glob(".part-*"))


wait_until = functools.partial(until, timeout=10.0, interval=0.005)  # the sink's steps are quick


async def test_a_full_segment_becomes_a_part_without_a_flush(tmp_path: Path) -> None:
    async with ParquetSink(
        tmp_path, "run1", rows_per_part=4, flush_seconds=3600, sync_seconds=0.01
    ) as sink:
        for n in range(3):
            await sink.add(row(n))
        await sink.sync()
        assert sink.rows_written == 0 and parquet_names(tmp_path) == []
        assert sink.rows_durable == 3  # in the journal, not yet in a part
        await sink.add(row(3))
        await wait_until(lambda: sink.rows_written == 4)
        assert parquet_names(tmp_path) == ["part-run1-00000.parquet"]
        assert not list(tmp_path.glob(".journal-*"))  # the segment went with its part


async def test_rows_are_durable_within_the_sync_interval(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    async with ParquetSink(tmp_path, "run1", flush_seconds=3600, sync_seconds=0.05) as sink:
        started = loop.time()
        await sink.add(row(0))
        await wait_until(lambda: sink.rows_durable == 1)
        assert loop.time() - started >= 0.05  # grouped, not one fsync per row
        (segment,) = tmp_path.glob(".journal-run1-*.jsonl")
        assert [r["image_path"] for r in journal.read(sink.store, segment.name)] == [
            "img/00000.jpg"
        ]
        for n in range(1, 300):  # a full group is synced at once, without waiting
            await sink.add(row(n))
        await wait_until(lambda: sink.rows_durable >= 257)


async def test_flush_by_time_after_the_oldest_row(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    async with ParquetSink(
        tmp_path, "run1", rows_per_part=1000, flush_seconds=0.05, sync_seconds=0.01
    ) as sink:
        started = loop.time()
        await sink.add(row(0))
        await sink.add(row(1))
        await wait_until(lambda: sink.rows_written == 2)
        assert loop.time() - started >= 0.05
        assert parquet_names(tmp_path) == ["part-run1-00000.parquet"]
        # The timer starts again with the next row, not before.
        await sink.add(row(2))
        await wait_until(lambda: sink.rows_written == 3)
        assert sink.parts_written == 2


async def test_writes_run_off_the_event_loop(tmp_path: Path) -> None:
    """While a big part is written the loop keeps serving other tasks."""
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    big = "x" * 2000
    async with ParquetSink(tmp_path, "run1", rows_per_part=100_000, flush_seconds=3600) as sink:
        for n in range(20_000):
            await sink.add(row(n, raw_response=big + str(n)))
        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        before = ticks
        await sink.flush()
        stop.set()
        await task
    assert sink.rows_written == 20_000
    assert ticks - before > 10


async def test_many_producers_lose_nothing_and_parts_keep_their_size(tmp_path: Path) -> None:
    per_part = 500
    async with ParquetSink(tmp_path, "run1", rows_per_part=per_part, flush_seconds=3600) as sink:

        async def producer(first: int) -> None:
            for n in range(first, first + 200):
                await sink.add(row(n, raw_response="y" * 500))

        await asyncio.gather(*(producer(k * 200) for k in range(40)))
    sizes = [pq.read_metadata(p).num_rows for p in tmp_path.glob("data/*.parquet")]
    assert sum(sizes) == 8000 and max(sizes) == per_part
    paths = current_rows(tmp_path, ["image_path"]).column("image_path").to_pylist()
    assert paths == sorted(f"img/{n:05d}.jpg" for n in range(8000))


async def test_a_cancelled_flush_still_commits_its_part_once(tmp_path: Path) -> None:
    async with ParquetSink(tmp_path, "run1", rows_per_part=10_000, flush_seconds=3600) as sink:
        for n in range(3000):
            await sink.add(row(n, raw_response="w" * 1000))
        flushing = asyncio.create_task(sink.flush())
        await asyncio.sleep(0)  # the write has started in its own task
        flushing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flushing
        await sink.add(row(3000))  # a later write waits for the orphaned one, never overlaps it
    assert sink.rows_written == 3001
    paths = current_rows(tmp_path, ["image_path"]).column("image_path").to_pylist()
    assert len(paths) == len(set(paths)) == 3001  # every row once, whether or not it flushed


async def test_leftover_temp_file_is_ignored_then_cleaned(tmp_path: Path) -> None:
    async with ParquetSink(tmp_path, "run1", rows_per_part=10) as sink:
        await sink.add(row(0))
    leftover = tmp_path / ".part-run0-00007.parquet.tmp"
    leftover.write_bytes(b"PAR1 half a part, the writer was killed here")
    assert [p.name for p in part_files(tmp_path)] == ["part-run1-00000.parquet"]
    assert status(tmp_path)["rows"] == 1
    async with ParquetSink(tmp_path, "run2") as sink:
        assert not leftover.exists()


async def test_rerun_with_the_same_run_id_never_overwrites(tmp_path: Path) -> None:
    for n in range(2):
        async with ParquetSink(tmp_path, "same") as sink:
            await sink.add(row(n))
    assert parquet_names(tmp_path) == ["part-same-00000.parquet", "part-same-00001.parquet"]
    assert status(tmp_path)["rows_committed"] == 2


async def test_one_writer_per_directory(tmp_path: Path) -> None:
    async with ParquetSink(tmp_path, "run1"):
        with pytest.raises(OutputDirBusy, match="another run"):
            async with ParquetSink(tmp_path, "run2"):
                pass
    async with ParquetSink(tmp_path, "run3"):  # released on close
        pass


async def test_bad_names_and_columns_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="file name"):
        ParquetSink(tmp_path, "../escape")
    async with ParquetSink(tmp_path, "run1") as sink:
        with pytest.raises(ValueError, match="stauts"):
            await sink.add(row(0) | {"stauts": "ok"})


async def test_a_row_that_cannot_be_encoded_becomes_an_error_row_and_costs_nothing_else(
    tmp_path: Path,
) -> None:
    """The hostile answer of issue 9: a value past int32 once dropped a whole part of paid rows
    (and every rerun paid again). Now only that row changes: an error row keeping its answer."""
    huge = [{"label": "x", "box_2d": [2147483648, 0, 10, 10], "bbox": [0.0, 0.0, 1.0, 1.0]}]
    async with ParquetSink(tmp_path, "run1") as sink:
        for n in range(20):
            changes = {"objects": huge, "raw_response": '{"answer": 1}'} if n == 7 else {}
            await sink.add(row(n, **changes))
        await sink.add(row(20, width="wide"))
    assert sink.unstorable == 2
    table = current_rows(tmp_path, ["image_path", "status", "error", "raw_response", "key"])
    rows = {r["image_path"]: r for r in table.to_pylist()}
    assert len(rows) == 21
    bad = rows["img/00007.jpg"]
    assert bad["status"] == "error" and "could not be stored" in bad["error"]
    assert bad["raw_response"] == '{"answer": 1}' and bad["key"] == row(7)["key"]
    assert rows["img/00020.jpg"]["status"] == "error"
    assert sum(r["status"] == "ok" for r in rows.values()) == 19


@pytest.mark.parametrize("journaled", [False, True])
async def test_a_writer_that_cannot_write_stops_the_run_with_a_clear_error(
    tmp_path: Path, journaled: bool
) -> None:
    """A full disk or a vanished folder is the run's failure: add/flush/close raise SinkFailed
    (the run stops and says why), never a traceback from a background task; a journaled add
    (a runner's answer) fails with the writer instead of waiting on it forever."""
    out = tmp_path / "out"
    sink = ParquetSink(out, "run1", rows_per_part=10)
    await sink.__aenter__()
    shutil.rmtree(out)
    out.write_text("the output folder became a file")
    with pytest.raises(SinkFailed):
        for n in range(100):
            await asyncio.wait_for(sink.add(row(n), journaled=journaled), 30)
        await sink.flush()
    with pytest.raises(SinkFailed):
        await sink.close()


async def test_undecodable_text_is_stored_not_fatal(tmp_path: Path) -> None:
    hostile = [{"label": "bad \udcff label", "box_2d": [1, 2, 3, 4], "bbox": [1.0, 2.0, 3.0, 4.0]}]
    async with ParquetSink(tmp_path, "run1") as sink:
        await sink.add(row(0, error="cannot open caf\udce9.jpg", objects=hostile))
        await sink.add(row(1))
    table = current_rows(tmp_path, ["error", "objects"])
    assert table.column("error").to_pylist()[0] == "cannot open caf\\xe9.jpg"
    assert table.column("objects").to_pylist()[0][0]["label"] == "bad \\xff label"
    assert table.num_rows == 2


async def test_given_run_id_and_completed_at_are_kept(tmp_path: Path) -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    async with ParquetSink(tmp_path, "run1") as sink:
        await sink.add(row(0, run_id="other", completed_at=when))
    table = current_rows(tmp_path, ["run_id", "completed_at"])
    assert table.to_pylist() == [{"run_id": "other", "completed_at": when}]


# A writer killed with SIGKILL loses nothing durable: tests/test_stores.py, on disk and on S3.


# ------------------------------------------------ issue 19: a kill -9, a torn line, big answers
async def test_each_row_is_in_the_journal_file_as_it_arrives_fsync_grouped(
    tmp_path: Path,
) -> None:
    """In the OS at once (a process crash cannot lose it), durable (fsync) only in groups."""
    async with ParquetSink(tmp_path, "run1", flush_seconds=3600, sync_seconds=3600) as sink:
        await sink.add(row(0))
        await wait_until(lambda: sink.rows_journaled == 1)
        (segment,) = tmp_path.glob(".journal-run1-*.jsonl")
        assert [r["image_path"] for r in journal.read(sink.store, segment.name)] == [
            "img/00000.jpg"
        ]
        assert sink.rows_durable == 0  # not fsynced: that waits for the group


async def test_a_journaled_add_returns_with_the_row_in_the_journal(tmp_path: Path) -> None:
    """What a worker hands over with `journaled=True` is in the journal file (in the OS, safe
    from a kill -9) when `add` returns, before the worker buys again; a plain add only queues
    it (a kill -9 then loses what waits behind a fsync or a part's commit)."""
    async with ParquetSink(tmp_path, "run1", flush_seconds=3600, sync_seconds=3600) as sink:
        await sink.add(row(0))
        assert sink.rows_journaled == 0  # queued: the writer has not had its turn
        for n in (1, 2):
            await sink.add(row(n), journaled=True)
            (segment,) = tmp_path.glob(".journal-run1-*.jsonl")
            paths = [r["image_path"] for r in journal.read(sink.store, segment.name)]
            assert paths == [f"img/{k:05d}.jpg" for k in range(n + 1)]  # in order, at once
        assert sink.rows_durable == 0  # not fsynced: that still waits for the group


CHILD = """
import asyncio, sys
from pipeline.output.sink import ParquetSink
from tests.test_sink import row

async def main(out, count):
    async with ParquetSink(out, "killed", flush_seconds=3600, sync_seconds=3600,
                           lease_seconds=1) as sink:
        for n in range(count):
            await sink.add(row(n))
        while sink.rows_journaled < count:  # the writer's turn, not a guess at timing
            await asyncio.sleep(0.001)
        print("written", sink.rows_durable, flush=True)
        await asyncio.Event().wait()  # until the kill

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def test_kill_9_after_the_rows_were_written_loses_none(out: str) -> None:
    """On disk the segment, on a bucket this machine's spill file: nothing fsynced or sent as a
    chunk (sync_seconds=3600), yet every row survives a kill -9 and is committed once."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, out, "40",
        stdout=asyncio.subprocess.PIPE, env=child_env(), cwd=REPO,
    )  # fmt: skip
    assert child.stdout is not None
    assert (await child.stdout.readline()).split() == [b"written", b"0"]
    child.kill()
    await child.wait()
    async with ParquetSink(out, "next", lease_seconds=1) as sink:  # waits out the lease
        assert sink.rows_recovered == 40
    paths = current_rows(out, ["image_path"]).column("image_path").to_pylist()
    assert sorted(paths) == [f"img/{n:05d}.jpg" for n in range(40)]
    assert not journal.segments(open_store(out))


async def test_a_torn_line_is_skipped_and_the_rows_around_it_kept(tmp_path: Path) -> None:
    """A kill mid-write tears the last line; a machine crash before the fsync can leave
    garbage where unsynced lines were: each bad line is skipped, never the rest."""
    name = journal.segment_name("killed", 0)
    good = journal.encode([row(0)]) + b'{"image_path": "img/torn' + b"\n"
    (tmp_path / name).write_bytes(good + journal.encode([row(2)]) + b'{"image_pa')
    async with ParquetSink(tmp_path, "next") as sink:
        assert sink.rows_recovered == 2
    paths = current_rows(tmp_path, ["image_path"]).column("image_path").to_pylist()
    assert paths == ["img/00000.jpg", "img/00002.jpg"]


async def test_a_corrupt_chunk_in_a_bucket_is_set_aside_and_the_later_ones_recovered(
    bucket: str,
) -> None:
    """Seen from another machine (no spill file): the chunk that does not decode is skipped,
    named in a warning and in `status`, kept under .damaged-journal/; every later chunk is
    committed, no row twice."""
    out = bucket + "/out"
    store = open_store(out)
    name = journal.segment_name("killed", 0)
    segment = journal.Segment(store, name)
    for n in range(4):
        segment.append([row(2 * n), row(2 * n + 1)])  # one chunk each
    segment.close()
    shutil.rmtree(journal.spill_dir(store))  # another machine's recovery
    store.replace(f"{name}.000001", b'{"image_path": "img/000\x00\x00garbage\n')
    async with ParquetSink(out, "next") as sink:
        assert sink.rows_recovered == 6
    paths = current_rows(out, ["image_path"]).column("image_path").to_pylist()
    assert paths == [f"img/{n:05d}.jpg" for n in (0, 1, 4, 5, 6, 7)]
    assert journal.damaged(store) == [f"{journal.DAMAGED}{name}.000001"]
    assert status(out)["damaged_journal"] == [store.join(f"{journal.DAMAGED}{name}.000001")]


MEMORY_CHILD = """
import asyncio, random, resource, sys
from pipeline.output.sink import ParquetSink
from tests.test_sink import row

def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

async def main(out, count, size, part_bytes):
    answer = random.Random(19).randbytes(size // 2).hex()  # 20 MB of text, incompressible
    before = rss_mb()
    async with ParquetSink(out, "big", flush_seconds=3600, part_bytes=part_bytes) as sink:
        for n in range(count):
            await sink.add(row(n, raw_response=answer[n:] + answer[:n]))
    print(round(before), round(rss_mb()), sink.parts_written, flush=True)

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
"""


async def test_memory_stays_bounded_with_20_mb_answers(tmp_path: Path) -> None:
    """30 answers of 20 MB (600 MB), parts cut at 128 MB of journal: the sink keeps no written
    row and cuts parts by bytes, so the peak RSS grows by a few hundred MB, not by what was
    written (60 answers with 256 MB parts reached 7.36 GB before; that size took 40 s here)."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", MEMORY_CHILD, str(tmp_path), "30", str(20 << 20), str(128 << 20),
        stdout=asyncio.subprocess.PIPE, env=child_env(), cwd=REPO,
    )  # fmt: skip
    output, _ = await child.communicate()
    before, peak, parts = map(int, output.split())
    assert parts == 5  # 128 MB of journal a part: 7 answers, 7, 7, 7, 2
    assert peak - before < 400, f"peak RSS {peak} MB, {before} MB before the sink"
