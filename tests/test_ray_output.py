"""Who writes the output of a Ray run (pipeline/output/sink.py): the driver holds it, its
workers' sinks share it, another run cannot get in, and a lost worker's journal is committed
alone — on a folder and on a bucket (moto's S3 server), where the workers check the driver's
lease. `out` (tests/conftest.py) is a folder, then a bucket prefix. Last, a whole run on a local
Ray cluster (tests/conftest.py's `cluster`) with its inputs and output in buckets."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from pipeline import exits
from pipeline.cost import row_cost
from pipeline.engines.ray.worker import rows_of_writer
from pipeline.output import journal
from pipeline.output.parts import current_rows
from pipeline.output.recovery import recover_writer
from pipeline.output.sink import ParquetSink, shared_output
from pipeline.output.stores import (
    LEASE_NAME,
    Lease,
    LeaseLost,
    OutputDirBusy,
    RunLease,
    Store,
    open_store,
)
from tests.conftest import Clock, make_config, put_images, result_row, run, write_rows
from tests.ray_support import on_ray


def parts(out: str) -> list[str]:
    return sorted(e.name for e in open_store(out).list() if e.name.endswith(".parquet"))


def row(n: int) -> dict[str, Any]:
    return result_row(f"{n:05d}.png", content=f"image {n}", settings="settings1", run_id="run1")


async def test_a_runs_writers_share_the_output_and_keep_others_out(out: str) -> None:
    with shared_output(out, "run1", lease_seconds=1.0) as recovered:  # renewed every 1/3 s
        assert recovered == 0
        async with (
            ParquetSink(out, "run1.w0", shared=True) as first,
            ParquetSink(out, "run1.w1", shared=True) as second,
        ):
            await first.add(row(0))
            await second.add(row(1))
            with pytest.raises(OutputDirBusy):  # another run, as the single engine opens it
                async with ParquetSink(out, "other"):  # (on a bucket: watched 1 s, renewed)
                    pass
            if not open_store(out).local:  # a bucket tells runs apart (a shared flock cannot)
                with pytest.raises(OutputDirBusy):
                    async with ParquetSink(out, "run2.w0", shared=True):
                        pass
            with pytest.raises(OutputDirBusy), shared_output(out, "run2"):  # or another driver
                pass
    assert parts(out) == ["data/part-run1.w0-00000.parquet", "data/part-run1.w1-00000.parquet"]
    table = current_rows(out, ["run_id"])  # the run's id in the rows, not the writer's name
    assert table.column("run_id").to_pylist() == ["run1", "run1"]


async def test_a_shared_writer_cannot_start_while_another_run_writes(out: str) -> None:
    async with ParquetSink(out, "single"):
        with pytest.raises(OutputDirBusy):
            async with ParquetSink(out, "run1.w0", shared=True):
                pass
    if not open_store(out).local:  # nor, on a bucket, where no driver holds the lease
        with pytest.raises(OutputDirBusy):
            async with ParquetSink(out, "run1.w0", shared=True):
                pass


def test_the_driver_commits_a_killed_runs_journal_before_sharing(out: str) -> None:
    store = open_store(out)
    store.ensure()
    segment = journal.Segment(store, journal.segment_name("killed.w3", 0))
    segment.append([row(7)])
    segment.close()
    with shared_output(out, "run1") as recovered:
        assert recovered == 1
    assert current_rows(out, ["image_path"]).column("image_path").to_pylist() == ["00007.png"]


def test_a_lost_writers_journal_is_committed_alone(out: str) -> None:
    """What a restarted worker does first, on a folder or a bucket: its predecessor's journal
    committed (not its neighbours'), then that predecessor's rows read back by file."""
    store = open_store(out)
    store.ensure()
    for name, n in (("run1.w1", 1), ("run1.w10", 10), ("run1.w2", 2)):
        segment = journal.Segment(store, journal.segment_name(name, 0))
        segment.append([row(n)])
        segment.close()
    assert recover_writer(out, "run1.w1") == 1
    assert parts(out) == ["data/part-run1.w1-00000.parquet"]
    alive = sorted(journal.segments(store))
    assert alive == [journal.segment_name("run1.w10", 0), journal.segment_name("run1.w2", 0)]
    prior = rows_of_writer(store, "run1.w1")  # not w10's, whose name starts the same
    assert (
        list(prior) == [("/data", "00001.png")] and prior[("/data", "00001.png")]["status"] == "ok"
    )


def test_a_bucket_writer_stops_when_its_run_loses_the_lease(bucket: str) -> None:
    """A worker's RunLease follows the driver's Lease: confirmed while it names the run; when
    another run took it over (the driver died), the next renewal says so; when it could not be
    confirmed for most of a TTL, check() stops the writer all the same."""
    store: Store = open_store(bucket + "/out")
    driver = Lease(store, "run1", ttl=30)
    driver.acquire(wait=False)
    clock = Clock(0.0)
    worker = RunLease(store, "run1.w0", ttl=30, clock=clock)
    worker.renew()
    clock.now = 20
    worker.check()  # confirmed 20 s ago, TTL 30: still writing
    driver.renew()
    worker.renew()
    clock.now = 46
    worker.check()  # 26 s since the last confirmation: within 0.9 TTL
    clock.now = 48  # 28 s: more than 0.9 TTL without a word from the store: stop
    with pytest.raises(LeaseLost):
        worker.check()
    store.put_if_version(LEASE_NAME, b'{"owner": "run2", "ttl": 30}', driver.version)
    with pytest.raises(LeaseLost, match="run2"):  # taken over by another run
        worker.renew()


async def test_a_predecessors_rows_are_read_with_what_prices_them(tmp_path: Path) -> None:
    """A restarted worker counts its predecessor's rows into the run's summary (RowCounts): it
    reads what prices them — model, mode, day and cached tokens — so they cost what they cost."""
    billed = {
        **row(3),
        "model": "gemini-2.5-flash",
        "input_mode": "inline",
        "completed_at": datetime(2026, 12, 6, tzinfo=UTC),
        "prompt_tokens": 1_000_000,
        "cached_tokens": 1_000_000,  # all at the cached rate, 0.03 per 1M
        "output_tokens": 0,
        "raw_response": "{}",
    }
    await write_rows(tmp_path, "run1.w1", [billed])
    prior = rows_of_writer(open_store(str(tmp_path)), "run1.w1")[("/data", "00003.png")]
    assert row_cost(prior) == row_cost(billed) == pytest.approx(0.03)


async def test_workers_read_a_bucket_and_write_another(
    cluster: Any, tmp_path: Path, bucket: str
) -> None:
    """What a cluster without a shared folder uses: inputs and output in buckets. Each worker
    writes its own parts under the driver's lease; a rerun reads everything from the bucket."""
    inputs, out = f"{bucket}/images", f"{bucket}/dataset"
    names = put_images(inputs, 12)
    config = make_config(tmp_path, input={"paths": [inputs]}, output={"dir": out})
    config = on_ray(config, workers=2)
    first = await run(config)
    assert (first.exit_code, first.api_calls, first.rows) == (exits.OK, 12, {"ok": 12})
    store = open_store(out)
    parts = {e.name.rsplit("-", 1)[0] for e in store.list("data/part-")}
    assert parts and parts <= {f"data/part-{first.run_id}.w{i}" for i in range(2)}
    assert store.info(LEASE_NAME) is None  # released at the end
    rows = current_rows(out, ["image_path", "status"]).to_pylist()
    assert rows == [{"image_path": name, "status": "ok"} for name in names]
    again = await run(config)
    assert (again.exit_code, again.api_calls, again.skipped) == (exits.OK, 0, 12)
