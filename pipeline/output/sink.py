"""Rows -> the journal at once (durable within about a second) -> whole-or-absent Parquet parts.

One writer task owns the output: `add()` puts a row on a queue bounded by rows and bytes
(back-pressure when the store is behind) and the writer writes each row it takes to the journal
(`pipeline/output/journal.py`) at once — in the OS, safe from a kill -9 — and makes them durable
in small groups (fsync, or a chunk in a bucket) — at most `sync_rows` rows or `sync_seconds` after
the oldest undurable row — then commits each journal segment as one zstd part of ROW_SCHEMA
(`rows_per_part` rows or `part_bytes` of journal, or `flush_seconds` after the segment's first
row, or on `flush()`), read back from the journal a batch at a time, and deletes the segment.
The sink keeps no row once it is written. Parts are
created whole under a unique name that is never written over (`Store.create`: on disk a fsynced
temporary linked into place, on S3 / GCS one conditional PUT), so after a kill -9 at any instant a
part is whole or absent and every acknowledged row is in a part or in a segment that the next
writer turns into its part (`recover`) without a call.

One sink writes an output at a time (`Store.lock`: a flock on disk, a renewed lease on an object
store), which is what makes recovering segments and deleting a killed run's leftovers safe. On an
object store the lease is renewed in the background every third of its TTL and checked before
each write: a sink that lost it stops (`SinkFailed`) rather than write beside another run.

A run spread over several processes (the Ray engine, on a folder every node sees or a bucket)
is still one writer: its driver takes the lock as a sink does and recovers what a killed run left
(`shared_output`), then shares the lock with the run's own sinks, made with `shared=True`: each
writes only its own parts and journal, under its own name (`<run id>.<suffix>`), and recovers
nothing at opening (the others' journals are alive). A sink of another run, which needs the lock
exclusively, cannot start while any of them writes, nor can they while it does. On a bucket the
driver keeps renewing the lease for them and each checks it is still the run's
(`stores.RunLease`). `recover_writer` commits the journal of one of them known to be gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import pyarrow as pa

from pipeline.output import journal
from pipeline.output.compact import supersede
from pipeline.output.memory import release_unused, return_big_buffers
from pipeline.output.parts import data_name, output_answer
from pipeline.output.recovery import recover_locked
from pipeline.output.stores import (
    LEASE_SECONDS,
    LeaseLost,
    Store,
    WriterLock,
    open_store,
    timeout_text,
)
from pipeline.records import ROW_SCHEMA

log = logging.getLogger(__name__)

SYNC_ROWS = 256  # an answer is durable (fsynced) after at most this many others ...
SYNC_SECONDS = 1.0  # ... or this long, whichever comes first (it is in the OS at once)
QUEUE_ROWS = 1024  # rows waiting for the writer before add() waits (back-pressure) ...
QUEUE_BYTES = 32 << 20  # ... or this many bytes of them (one 20 MB answer waits, not a thousand)
# A part is cut at this many bytes of journal too (besides rows_per_part): 5000 answers of 20 MB
# would otherwise be a 100 GB part. 256 MB of JSON rows makes parts of tens of MB after zstd,
# big enough for Parquet's reads; the sink holds a batch of rows, not the part, while writing it.
PART_BYTES = 256 << 20
_COLUMNS = frozenset(ROW_SCHEMA.names)
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class SinkFailed(RuntimeError):
    """The sink could not make rows durable (a full disk, a read-only folder): the run must stop.
    Rows already in the journal are safe; the next run commits them."""


@dataclass(slots=True)
class _Row:
    """A row whose `add()` waits until it is in the journal: `written` is set then (or fails
    with the writer)."""

    row: dict[str, Any]
    written: asyncio.Future[None]


@dataclass(slots=True)
class _Flush:
    """A request to the writer: make the journal durable now; with `part`, commit a part too."""

    done: asyncio.Future[None]
    part: bool


class ParquetSink:
    """The output's single writer. Use as `async with ParquetSink(dir, run_id) as sink`.

    Rows are dicts keyed by ROW_SCHEMA's column names; missing columns are null, except `run_id`
    (this sink's) and `completed_at` (the time of `add`), which readers need to order rows.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str] | Store,
        run_id: str,
        *,
        rows_per_part: int = 5000,
        flush_seconds: float = 30.0,
        sync_rows: int = SYNC_ROWS,
        sync_seconds: float = SYNC_SECONDS,
        part_bytes: int = PART_BYTES,
        lease_seconds: float = LEASE_SECONDS,
        shared: bool = False,
        answer: pa.Field | None = None,
    ) -> None:
        if not _RUN_ID.fullmatch(run_id):
            raise ValueError(f"run_id {run_id!r} is not usable in a file name")
        if rows_per_part < 1 or sync_rows < 1 or part_bytes < 1:
            raise ValueError("rows_per_part, sync_rows and part_bytes must be >= 1")
        if not flush_seconds > 0 or not sync_seconds > 0:
            raise ValueError("flush_seconds and sync_seconds must be > 0")
        self.store = open_store(output_dir)
        self.output_dir = self.store.url
        self.lease_seconds = lease_seconds
        self.shared = shared  # one of a run's several writers (see the module docstring)
        # the `answer` column's field: the run's (a custom task's response_schema), else, found
        # on opening, the output's own, so that every part of an output has one schema
        self.answer = answer
        self.run_id = run_id
        self.rows_per_part = rows_per_part
        self.flush_seconds = flush_seconds
        self.sync_rows = sync_rows
        self.sync_seconds = sync_seconds
        self.part_bytes = part_bytes
        self.rows_written = 0  # in committed parts
        self.rows_journaled = 0  # handed to the OS (a kill -9 cannot lose them)
        self.rows_durable = 0  # fsynced in the journal (a machine crash cannot lose them)
        self.parts_written = 0
        self.unstorable = 0  # rows replaced by an error row because they could not be encoded
        self.rows_recovered = 0  # rows of a killed run's journal committed on opening
        self.superseded: dict[str, Any] = {}  # what the end of the run set aside (supersede)
        self._reshape = False  # this run changes the output's `answer` type (`reshaping`)
        self._queue: asyncio.Queue[dict[str, Any] | _Row | _Flush | None] = asyncio.Queue(
            QUEUE_ROWS
        )
        self._queued_bytes = 0  # journal.row_bytes of the rows in the queue
        self._room = asyncio.Event()  # set when the writer took rows off the queue
        self._segment: journal.Segment | None = None
        self._segment_started = 0.0
        self._undurable_since = 0.0  # when the oldest written but unsynced row was written
        self._committing: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._lock: WriterLock | None = None
        self._renewing: asyncio.Task[None] | None = None
        self._seq = 0

    # ----------------------------------------------------------------------------- lifecycle
    async def __aenter__(self) -> ParquetSink:
        return_big_buffers()  # big answers' memory returns to the system once written
        await asyncio.to_thread(self.store.ensure)
        self._lock = await asyncio.to_thread(
            self.store.lock, self.run_id, ttl=self.lease_seconds, shared=self.shared
        )
        try:
            if not self.shared:
                self.rows_recovered = await asyncio.to_thread(recover_locked, self.store)
            self._seq = await asyncio.to_thread(_next_seq, self.store, self.run_id)
            before = await asyncio.to_thread(output_answer, self.store)
            if self.answer is None:
                self.answer = before
            elif not self.shared:
                self._reshape = await asyncio.to_thread(reshaping, self.store, self.answer, before)
        except BaseException:
            self._release()
            raise
        if self._lock.renew_every is not None:
            self._renewing = asyncio.create_task(self._keep_lock(), name="gvp-sink-lease")
        self._writer = asyncio.create_task(self._run(), name="gvp-sink-writer")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close(settle=exc is None)

    async def close(self, *, settle: bool = True) -> None:
        """Commit everything received, then (`settle`, and this sink the output's only writer)
        set aside the rows they superseded (`compact.supersede`), stop the writer, release the
        directory. Idempotent."""
        if self._writer is None:
            return
        writer, self._writer = self._writer, None
        try:
            if not writer.done():
                await self._queue.put(None)
            await asyncio.shield(writer)
            if settle and self._failure is None and not self.shared:
                await self._supersede()
        finally:
            await self._stop_renewing()
            await asyncio.to_thread(self._release)
        self._raise_failure()

    async def _supersede(self) -> None:
        assert self._lock is not None
        self.superseded = await asyncio.to_thread(
            settle, self.store, self._lock, self._reshape, self.answer
        )

    def _release(self) -> None:
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.release()

    async def _keep_lock(self) -> None:
        """Renew the lease every third of its TTL; a failed renewal is retried at the next
        tick, and `check()` before each write stops the sink once the lease may have lapsed."""
        lock = self._lock
        assert lock is not None and lock.renew_every is not None
        while True:
            await asyncio.sleep(lock.renew_every)
            try:
                await asyncio.to_thread(lock.renew)
            except Exception as exc:  # lost for good, or a store hiccup: check() decides
                log.warning("%s: lease renewal failed: %s", self.output_dir, exc)

    async def _stop_renewing(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewing
            self._renewing = None

    def _check_lock(self) -> None:
        if self._lock is not None:
            self._lock.check()

    # ---------------------------------------------------------------------------------- rows
    async def add(self, row: dict[str, Any], *, journaled: bool = False) -> None:
        """Hand one row to the writer; waits only when the writer is a queue's length behind.

        `journaled`: return only once the row is in the journal (handed to the OS), for an
        answer just bought: its worker then moves on to the next call knowing a kill -9 cannot
        lose it, so a kill loses at most the workers' own (one each: in flight or being
        written), as README promises. Queued only, a fsync or a part's commit in progress let
        answered rows pile up behind the writer while the workers bought more (a kill -9 at
        load ~15 re-paid 9 answers of a concurrency of 8: tests/test_paid_answers.py). A Batch
        job's results or a reparse need no wait: they can be read again."""
        self._check_usable()
        unknown = row.keys() - _COLUMNS
        if unknown:
            raise ValueError(f"row has columns not in ROW_SCHEMA: {sorted(unknown)}")
        if row.get("run_id") is None or row.get("completed_at") is None:
            row = {**row, "run_id": row.get("run_id") or self.run_id}
            row["completed_at"] = row.get("completed_at") or datetime.now(UTC)
        await self._wait_room(journal.row_bytes(row))
        if not journaled:
            await self._put(row)
            return
        written = asyncio.get_running_loop().create_future()
        await self._put(_Row(row, written))
        await written

    async def _wait_room(self, size: int) -> None:
        """Back-pressure by bytes: wait while the queue holds QUEUE_BYTES (one row always fits),
        so twenty 20 MB answers do not wait in memory for a slow disk or bucket."""
        while True:
            self._room.clear()
            if not self._queued_bytes or self._queued_bytes + size <= QUEUE_BYTES:
                break
            writer = self._writer
            assert writer is not None
            room = asyncio.ensure_future(self._room.wait())
            await asyncio.wait([room, writer], return_when=asyncio.FIRST_COMPLETED)
            room.cancel()
            self._raise_failure()
            if writer.done():
                raise RuntimeError("the sink was closed while a row waited for room")
        self._queued_bytes += size

    async def sync(self) -> None:
        """Make every row added so far durable (in the journal) now."""
        await self._request(part=False)

    async def flush(self) -> None:
        """Make every row added so far durable and committed in a part now."""
        await self._request(part=True)

    async def _request(self, *, part: bool) -> None:
        self._check_usable()
        done = asyncio.get_running_loop().create_future()
        await self._put(_Flush(done, part))
        writer = self._writer
        assert writer is not None
        await asyncio.wait([done, writer], return_when=asyncio.FIRST_COMPLETED)
        if not done.done():  # the writer stopped before it got to this request
            self._raise_failure()
        done.result()

    async def _put(self, item: dict[str, Any] | _Row | _Flush) -> None:
        if not self._queue.full():
            self._queue.put_nowait(item)
            return
        writer = self._writer
        assert writer is not None
        putting = asyncio.ensure_future(self._queue.put(item))
        await asyncio.wait([putting, writer], return_when=asyncio.FIRST_COMPLETED)
        if not putting.done():  # the writer died while we waited for room
            putting.cancel()
            self._raise_failure()

    def _check_usable(self) -> None:
        if self._writer is None:
            raise RuntimeError("use the sink as `async with ParquetSink(...)`, before close()")
        self._raise_failure()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise SinkFailed(_why(self._failure)) from self._failure

    # -------------------------------------------------------------------------------- writer
    async def _run(self) -> None:
        try:
            while await self._serve_once():
                pass
            await self._sync()
            await self._commit_segment()
            await self._wait_committed()
        except BaseException as exc:
            self._failure = self._failure or exc
            self._fail_waiters()
            self._room.set()
            if not isinstance(exc, Exception):
                raise

    async def _serve_once(self) -> bool:
        """Take what is queued (waiting at most until a deadline): write its rows to the
        journal at once, sync or commit what is due; False at close."""
        items = await self._take(self._deadline())
        flushes = [item for item in items if isinstance(item, _Flush)]
        closing = None in items
        rows = [item.row if isinstance(item, _Row) else item for item in items if _is_row(item)]
        waiting = [item.written for item in items if isinstance(item, _Row)]
        if rows:
            try:
                await self._write(rows)
            except BaseException as exc:
                _settle(waiting, SinkFailed(_why(exc)))
                raise
            _settle(waiting)
        now = time.monotonic()
        segment = self._segment
        if (
            segment is not None
            and segment.undurable_rows
            and (
                flushes
                or closing
                or segment.undurable_rows >= self.sync_rows
                or segment.undurable_bytes >= journal.SYNC_BYTES
                or now - self._undurable_since >= self.sync_seconds
            )
        ):
            await self._sync()
        if self._segment is not None and (
            any(f.part for f in flushes) or now - self._segment_started >= self.flush_seconds
        ):
            await self._commit_segment()
        if any(f.part for f in flushes):
            await self._wait_committed()
        for flush in flushes:
            if not flush.done.done():
                flush.done.set_result(None)
        return not closing

    async def _take(self, deadline: float | None) -> list[Any]:
        """Everything queued now, or wait for one item until `deadline` (monotonic)."""
        items: list[Any] = []
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        if items:
            return items
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        with contextlib.suppress(TimeoutError):
            items.append(await asyncio.wait_for(self._queue.get(), timeout))
        return items

    def _deadline(self) -> float | None:
        segment = self._segment
        if segment is None:
            return None
        deadlines = [self._segment_started + self.flush_seconds]
        if segment.undurable_rows:
            deadlines.append(self._undurable_since + self.sync_seconds)
        return min(deadlines)

    async def _write(self, rows: list[dict[str, Any]]) -> None:
        """Hand the rows to the OS now (a kill -9 then loses none of them); a segment full by
        rows or bytes is committed as a part, so a part holds at most `rows_per_part` rows and
        about `part_bytes` (one row more at most)."""
        while rows:
            segment = await self._open_segment()
            group, rows = self._fitting(segment, rows)
            self._check_lock()
            if not segment.undurable_rows:
                self._undurable_since = time.monotonic()
            await asyncio.to_thread(segment.write, group)
            self.rows_journaled += len(group)
            self._queued_bytes -= sum(journal.row_bytes(row) for row in group)
            self._room.set()
            if segment.counts.rows >= self.rows_per_part or segment.counts.bytes >= self.part_bytes:
                await self._commit_segment()

    def _fitting(
        self, segment: journal.Segment, rows: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The first rows that fit in the segment (by rows and by bytes; at least one), the rest."""
        room_rows = self.rows_per_part - segment.counts.rows
        room_bytes = self.part_bytes - segment.counts.bytes
        taken = 0
        for row in rows[:room_rows]:
            room_bytes -= journal.row_bytes(row)
            taken += 1
            if room_bytes <= 0:
                break
        return rows[:taken], rows[taken:]

    async def _open_segment(self) -> journal.Segment:
        if self._segment is None:
            name = journal.segment_name(self.run_id, self._seq)
            self._segment = await asyncio.to_thread(journal.Segment, self.store, name, self.answer)
            self._segment_started = time.monotonic()
        return self._segment

    async def _sync(self) -> None:
        """Make the open segment's written rows durable (one fsync, or one chunk in a bucket)."""
        if self._segment is not None and self._segment.undurable_rows:
            self._check_lock()
            self.rows_durable += await asyncio.to_thread(self._segment.sync)

    async def _commit_segment(self) -> None:
        """Close the open segment and write its part in the background (one write at a time:
        a second waits for the first; each reads its rows back from the journal a batch at a
        time, so memory holds a batch, not a part)."""
        await self._sync()
        segment, self._segment = self._segment, None
        if segment is None:
            return
        await self._wait_committed()
        seq = self._seq
        self._seq += 1
        self._committing = asyncio.create_task(self._commit(segment, seq))
        # its failure is raised where it is awaited (_wait_committed); when the writer fails
        # first (the journal's write on a full disk) it never is, and asyncio would print the
        # commit's traceback at exit ("never retrieved"); its rows stay in the journal
        self._committing.add_done_callback(_retrieved)

    async def _commit(self, segment: journal.Segment, seq: int) -> None:
        segment.close()
        final = journal.part_name(self.run_id, seq)
        self._check_lock()
        reasons = await asyncio.to_thread(
            journal.write_part, self.store, final, segment.rows(), self.answer
        )
        await asyncio.to_thread(journal.discard, self.store, segment.name)
        await asyncio.to_thread(release_unused)  # the part's buffers, back to the system
        self.unstorable += len(reasons)
        for reason in reasons:
            log.warning("%s: %s", final, reason)
        self.rows_written += segment.counts.rows
        self.parts_written += 1

    async def _wait_committed(self) -> None:
        if self._committing is not None:
            committing, self._committing = self._committing, None
            await committing  # a failure propagates: _run records it and stops the writer

    def _fail_waiters(self) -> None:
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, _Flush):
                _settle([item.done], SinkFailed(_why(self._failure)))
            elif isinstance(item, _Row):
                _settle([item.written], SinkFailed(_why(self._failure)))


def _why(exc: BaseException | None) -> str:
    """A write's failure in words: a store request that timed out says so, and which bound it
    met (aiohttp's own words do not); any other as it is."""
    return (timeout_text(exc) if exc is not None else None) or str(exc)


def _is_row(item: object) -> bool:
    return isinstance(item, dict | _Row)


def _settle(waiting: list[asyncio.Future[None]], failure: BaseException | None = None) -> None:
    """Wake the waiters (with `failure`, marked seen: a cancelled waiter never reads it)."""
    for future in waiting:
        if future.done():
            continue
        if failure is None:
            future.set_result(None)
        else:
            future.set_exception(failure)
            future.exception()


def _retrieved(task: asyncio.Task[None]) -> None:
    """Mark a finished task's exception seen (awaiting it still raises it)."""
    if not task.cancelled():
        task.exception()


def _next_seq(store: Store, run_id: str) -> int:
    """The next free part number of `run_id` (the same run id again must not overwrite)."""
    taken = re.compile(rf"{re.escape(data_name('part-'))}{re.escape(run_id)}-(\d+)\.parquet")
    names = (e.name for e in store.list(data_name("part-")))
    numbers = [int(m.group(1)) for name in names if (m := taken.fullmatch(name))]
    return max(numbers, default=-1) + 1


@contextlib.contextmanager
def shared_output(
    output_dir: str | os.PathLike[str] | Store,
    run_id: str,
    *,
    lease_seconds: float = LEASE_SECONDS,
    answer: pa.Field | None = None,
) -> Iterator[int]:
    """The output of run `run_id`, whose rows several `shared=True` sinks write (named
    `<run_id>.<suffix>`): taken as one sink takes it (the lock, exclusively; a killed run's
    journal committed, its leftovers removed), then held shared with those sinks until the end
    (a lease renewed meanwhile), then settled (`settle`; `answer`: the run's `answer` type).
    Yields the rows recovered."""
    store = open_store(output_dir)
    store.ensure()
    lock = store.lock(run_id, ttl=lease_seconds, shared=False)
    try:
        recovered = recover_locked(store)
        lock.share()  # not atomic (flock(2)): another run taking it in between fails this one
        reshape = reshaping(store, answer, output_answer(store))
        with _kept(lock, store):
            yield recovered
            settle(store, lock, reshape, answer)  # (not reached when the run failed)
    finally:
        lock.release()


def settle(
    store: Store, lock: WriterLock, reshape: bool, answer: pa.Field | None
) -> dict[str, Any]:
    """The end of a run's writing: the rows it superseded set aside (`compact.supersede`),
    and with `reshape` (the run wrote another `answer` type than the output had) every part
    made the run's type (`answer`), so readers of `data/` see only current rows under one
    schema. A failure leaves the output as it was (our readers still pick the current rows,
    conformed; the next run's end tries again): a warning, not the run's failure. Returns
    what was done ({} when it failed)."""
    try:
        report = supersede(store, lock, reshape=reshape, answer=answer)
        if reshape:
            store.delete([RESHAPE_MARK])
    except (OSError, ValueError, RuntimeError) as exc:
        log.warning("setting superseded rows aside failed (the output is intact): %s", exc)
        return {}
    if report["parts_rewritten"]:
        log.info("set superseded rows aside: %s", report)
    return report


# Left while a run that changes the output's `answer` type (a new response_schema) is under way:
# its end rewrites every part as the new type and removes it; a run killed before that leaves it,
# and the next run's end does the rewrite (a plain reader meanwhile sees two schemas in `data/`).
RESHAPE_MARK = ".reshape-pending"


def reshaping(store: Store, answer: pa.Field | None, before: pa.Field | None) -> bool:
    """Whether this run's end must make every part one `answer` type: it writes another type
    than the output's newest part has (marked first, so a kill does not lose the need), or an
    earlier such run was killed before its end."""
    if answer is not None and before is not None and not answer.equals(before, True):
        store.replace(RESHAPE_MARK, b"")
        return True
    return store.info(RESHAPE_MARK) is not None


@contextlib.contextmanager
def _kept(lock: WriterLock, store: Store) -> Iterator[None]:
    """Renew `lock` every `renew_every` s in a thread while the block runs (a flock needs
    nothing). The run's writers check the lease themselves: a renewal that fails for good is
    logged here and stops them there."""
    if lock.renew_every is None:
        yield
        return
    every = lock.renew_every
    done = threading.Event()

    def renew() -> None:
        while not done.wait(every):
            try:
                lock.renew()
            except LeaseLost as exc:
                log.error("%s: %s; the run's writers stop", store.url, exc)
                return
            except Exception as exc:  # a store hiccup: the next tick tries again
                log.warning("%s: lease renewal failed: %s", store.url, exc)

    thread = threading.Thread(target=renew, name="gvp-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
