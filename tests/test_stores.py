"""One Store contract, the same tests on a local folder and on a real S3 (moto's server), plus
the lease's takeover rules with a hand clock and the sink's kill -9 on both. The `store`
fixture (tests/conftest.py) is one, then the other."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from pipeline.output import journal
from pipeline.output.fsutil import AlreadyExists
from pipeline.output.parts import current_rows, part_files
from pipeline.output.sink import ParquetSink
from pipeline.output.stores import (
    LEASE_NAME,
    LeaseLost,
    ObjectStore,
    OutputDirBusy,
    Store,
)
from tests.conftest import REPO, child_env


def test_create_is_whole_and_never_over_an_existing_name(store: Store) -> None:
    store.ensure()
    store.create_bytes("a/part-1.parquet", b"first")
    with pytest.raises(AlreadyExists):
        store.create_bytes("a/part-1.parquet", b"second")
    assert store.read("a/part-1.parquet") == b"first"
    store.replace("state.sqlite", b"one")
    store.replace("state.sqlite", b"two")
    assert store.read("state.sqlite") == b"two"
    entries = store.list()
    assert [e.name for e in entries] == ["a/part-1.parquet", "state.sqlite"]
    assert [e.size for e in entries] == [5, 3]
    assert store.info("missing") is None and store.info("a/part-1.parquet").size == 5
    store.delete(["a/part-1.parquet", "never-there"])
    assert [e.name for e in store.list()] == ["state.sqlite"]


def test_appends_are_read_back_in_order(store: Store) -> None:
    store.ensure()
    log = store.appender(".journal-r-00000.jsonl")
    for n in range(12):
        log.append(f"{n}\n".encode())
    log.close()
    assert store.appended(".journal-") == [".journal-r-00000.jsonl"]
    assert store.read_appended(".journal-r-00000.jsonl").split() == [
        str(n).encode() for n in range(12)
    ]
    store.delete_appended(".journal-r-00000.jsonl")
    assert store.appended(".journal-") == []


def test_one_writer_at_a_time(store: Store) -> None:
    store.ensure()
    first = store.lock("run-1", ttl=30)
    with pytest.raises(OutputDirBusy, match="is being written by"):
        store.lock("run-2", wait=False, ttl=30)
    first.release()
    store.lock("run-2", wait=False, ttl=30).release()


class HandClock:
    """Monotonic and wall time moved by hand; `sleep` moves them and runs what happens meanwhile."""

    def __init__(self) -> None:
        self.now = 1_000.0
        self.meanwhile: list[Any] = []

    def clock(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        for action in self.meanwhile:
            action()


def lease(store: ObjectStore, owner: str, hand: HandClock, ttl: float = 60.0) -> Any:
    from pipeline.output.stores import Lease

    return Lease(store, owner, ttl, clock=hand.clock, wall=hand.wall, sleep=hand.sleep)


def test_a_crashed_runs_lease_is_taken_over_after_one_ttl_and_the_old_holder_loses_it(
    bucket: str,
) -> None:
    store = ObjectStore(bucket + "/out")
    hand = HandClock()
    crashed = lease(store, "crashed", hand)
    crashed.acquire()  # ... and never renews again: killed
    hand.now += 5
    successor = lease(store, "successor", hand)
    started = hand.now
    successor.acquire(wait=True)
    assert hand.now - started >= 60.0  # watched one whole TTL without a renewal
    assert b"successor" in store.read(LEASE_NAME)
    with pytest.raises(LeaseLost):  # the old holder, had it only paused, must stop
        crashed.renew()
    successor.release()
    assert store.info(LEASE_NAME) is None


def test_a_live_lease_is_refused_as_soon_as_it_is_renewed(bucket: str) -> None:
    store = ObjectStore(bucket + "/out")
    hand = HandClock()
    alive = lease(store, "alive", hand)
    alive.acquire()
    hand.meanwhile.append(alive.renew)  # the holder keeps renewing while we watch
    with pytest.raises(OutputDirBusy, match="run alive"):
        lease(store, "second", hand).acquire(wait=True)
    assert b"alive" in store.read(LEASE_NAME)


def test_a_lease_released_while_watched_is_taken_at_once(bucket: str) -> None:
    """The holder finished (released the lease) while another run watched it: that run takes
    the output then, instead of calling it busy (`pipeline compact` during a short run)."""
    store = ObjectStore(bucket + "/out")
    hand = HandClock()
    finishing = lease(store, "finishing", hand)
    finishing.acquire()
    hand.meanwhile.append(finishing.release)  # it ends while we watch
    started = hand.now
    waiting = lease(store, "next", hand)
    waiting.acquire(wait=True)
    assert hand.now - started < 60.0  # not a whole TTL: taken once it was released
    assert b"next" in store.read(LEASE_NAME)


def test_a_lease_not_renewed_in_time_stops_its_holder(bucket: str) -> None:
    store = ObjectStore(bucket + "/out")
    hand = HandClock()
    held = lease(store, "slow", hand, ttl=10)
    held.acquire()
    held.check()
    hand.now += 9.5
    with pytest.raises(LeaseLost):
        held.check()


def test_a_lease_left_long_ago_is_taken_without_waiting(bucket: str) -> None:
    store = ObjectStore(bucket + "/out")
    hand = HandClock()
    lease(store, "ancient", hand, ttl=10).acquire()
    hand.now += 3600  # by its own timestamp, dead for an hour
    started = hand.now
    lease(store, "new", hand, ttl=10).acquire(wait=False)
    assert hand.now == started


WRITER = textwrap.dedent(
    """
    import asyncio, hashlib, sys
    from pipeline.output.sink import ParquetSink

    async def main():
        async with ParquetSink(sys.argv[1], "victim", rows_per_part=50, sync_seconds=0.02,
                               lease_seconds=1.0) as sink:
            n, told = 0, 0
            while True:
                await sink.add({"key": hashlib.sha256(str(n).encode()).hexdigest() + ".s",
                                "image_path": f"{n:06d}.jpg", "image_root": "/r", "task": "detect",
                                "status": "ok", "raw_response": "z" * 4000})
                n += 1
                if sink.rows_durable != told:
                    told = sink.rows_durable
                    print(told, flush=True)

    asyncio.run(main())
    """
)


def test_kill_9_loses_nothing_that_was_durable_on_either_store(store: Store) -> None:
    """Parts are whole or absent, and every row acknowledged as durable before the kill is in
    the dataset once the next writer (after the killed run's lease expired) recovered the
    journal — once, in order, no gaps."""
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, store.url],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    durable = 0
    try:
        for line in child.stdout:  # parts committed, more in the journal, more in flight
            durable = int(line)
            if durable >= 230:
                break
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=30)
        child.stdout.close()
    for path in part_files(store):
        import pyarrow.parquet as pq

        with store_file(store, path) as source:
            assert pq.read_metadata(source).num_rows == 50  # whole

    async def reopen() -> None:
        async with ParquetSink(store, "next", lease_seconds=1.0):
            pass

    asyncio.run(reopen())
    assert not journal.segments(store)
    if store.local:  # and no temporary file of a part left behind
        assert not list(store.root.glob(".part-*"))
    paths = current_rows(store, ["image_path"]).column("image_path").to_pylist()
    assert len(paths) >= durable
    assert paths == [f"{n:06d}.jpg" for n in range(len(paths))]  # once each, no gaps


def store_file(store: Store, path: Any) -> Any:
    if store.local:
        return open(path, "rb")
    return store.fs.open(path, "rb")
