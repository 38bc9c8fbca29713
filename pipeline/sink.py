"""Rows -> Parquet part files that are whole or absent, written off the event loop.

A part is written under a hidden temporary name (`.part-….parquet.tmp`, which no reader
looks at), fsynced, renamed to `part-<run_id>-<seq>.parquet` and the directory fsynced: after
a kill -9 at any instant a part is either complete or not there, so the committed parts are the
run's state and a rerun redoes only what was in flight. One sink writes an output directory at a
time (an advisory lock says so), which is what makes deleting a killed run's temporary files safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.records import ROW_SCHEMA, storable

log = logging.getLogger(__name__)

LOCK_FILE = ".sink.lock"
TEMP_PREFIX = ".part-"
TEMP_SUFFIX = ".parquet.tmp"
COMPRESSION = "zstd"
_COLUMNS = frozenset(ROW_SCHEMA.names)
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class OutputDirBusy(RuntimeError):
    """Another sink (another run) is writing the same output directory."""


class ParquetSink:
    """Buffers row dicts and commits them as zstd Parquet parts of ROW_SCHEMA.

    A part is written when `rows_per_part` rows are buffered, `flush_seconds` after the oldest
    buffered row arrived, on `flush()` and on `close()`. Writes run in a thread, one at a time;
    while one is running the next part keeps filling, and `add()` waits once that part is full
    too, so memory holds at most about two parts however slow the disk is.

    Rows are dicts keyed by ROW_SCHEMA's column names; missing columns are null, except `run_id`
    (this sink's) and `completed_at` (the time of `add`), which readers need to order rows.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        run_id: str,
        *,
        rows_per_part: int = 5000,
        flush_seconds: float = 30.0,
    ) -> None:
        if not _RUN_ID.fullmatch(run_id):
            raise ValueError(f"run_id {run_id!r} is not usable in a file name")
        if rows_per_part < 1:
            raise ValueError(f"rows_per_part must be >= 1, got {rows_per_part}")
        if not flush_seconds > 0:
            raise ValueError(f"flush_seconds must be > 0, got {flush_seconds}")
        self.output_dir = Path(output_dir)
        self.run_id = run_id
        self.rows_per_part = rows_per_part
        self.flush_seconds = flush_seconds
        self.rows_written = 0
        self.parts_written = 0
        self._buffer: list[dict[str, Any]] = []
        self._write_lock = asyncio.Lock()
        self._committed = asyncio.Condition()
        self._writing: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timed_flush: asyncio.Task[None] | None = None
        self._pending_error: BaseException | None = None
        self._lock_fd: int | None = None
        self._seq = 0
        self._closed = False

    # ----------------------------------------------------------------------------- lifecycle
    async def __aenter__(self) -> ParquetSink:
        await asyncio.to_thread(self._open)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _open(self) -> None:
        """Lock the directory, remove a killed run's temporary parts, find the next sequence."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.output_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputDirBusy(
                f"{self.output_dir} is being written by another run; wait for it to finish"
            ) from None
        self._lock_fd = fd
        taken = re.compile(rf"part-{re.escape(self.run_id)}-(\d+)\.parquet")
        for entry in os.scandir(self.output_dir):
            if entry.name.startswith(TEMP_PREFIX) and entry.name.endswith(TEMP_SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                log.info("removed an unfinished part left by a killed run: %s", entry.name)
            elif match := taken.fullmatch(entry.name):
                # The same run id again (a caller's choice): never overwrite a committed part.
                self._seq = max(self._seq, int(match.group(1)) + 1)

    async def close(self) -> None:
        """Write what is buffered, wait for the write, release the directory. Idempotent."""
        if self._closed:
            return
        try:
            if self._lock_fd is not None:
                await self._write_buffered(full_only=False)
        finally:
            self._closed = True
            self._cancel_timer()
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None
        if self._pending_error is not None:
            error, self._pending_error = self._pending_error, None
            raise error

    # ---------------------------------------------------------------------------------- rows
    async def add(self, row: dict[str, Any]) -> None:
        """Buffer one row; waits only when a full part is already waiting behind a write."""
        self._check_usable()
        unknown = row.keys() - _COLUMNS
        if unknown:
            raise ValueError(f"row has columns not in ROW_SCHEMA: {sorted(unknown)}")
        while len(self._buffer) >= self.rows_per_part:  # back-pressure: the disk is behind
            await self._write_buffered(full_only=True)
        if row.get("run_id") is None or row.get("completed_at") is None:
            row = dict(row)
            row["run_id"] = row.get("run_id") or self.run_id
            row["completed_at"] = row.get("completed_at") or datetime.now(UTC)
        self._buffer.append(row)
        if len(self._buffer) == 1:
            self._timer = asyncio.get_running_loop().call_later(self.flush_seconds, self._on_timer)
        if len(self._buffer) >= self.rows_per_part and not self._write_lock.locked():
            await self._write_buffered(full_only=True)

    @property
    def buffered(self) -> int:
        """Rows added but not yet handed to a write."""
        return len(self._buffer)

    async def wait_written(self, rows: int) -> None:
        """Wait until at least `rows` rows are committed (progress displays, tests)."""
        async with self._committed:
            await self._committed.wait_for(lambda: self.rows_written >= rows)

    async def flush(self) -> None:
        """Commit every buffered row now (one part) and wait until it is on disk."""
        self._check_usable()
        await self._write_buffered(full_only=False)

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("the sink is closed")
        if self._lock_fd is None:
            raise RuntimeError("use the sink as `async with ParquetSink(...)`")
        if self._pending_error is not None:
            error, self._pending_error = self._pending_error, None
            raise error

    # --------------------------------------------------------------------------------- writes
    def _on_timer(self) -> None:
        self._timer = None
        self._timed_flush = asyncio.get_running_loop().create_task(self._flush_on_time())

    async def _flush_on_time(self) -> None:
        try:
            await self._write_buffered(full_only=False)
        except Exception as exc:  # nobody awaits a timer: hand the error to the next caller
            self._pending_error = self._pending_error or exc

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _write_buffered(self, *, full_only: bool) -> None:
        """Take the buffer as one part and write it; one write at a time, in order.

        The write itself is a task of its own: if the caller is cancelled it still completes
        (a half-counted part would be worse), and the next writer waits for it first.
        """
        async with self._write_lock:
            if self._writing is not None:
                await asyncio.wait([self._writing])
                self._settle(self._writing)
            if not self._buffer or (full_only and len(self._buffer) < self.rows_per_part):
                return
            batch, self._buffer = self._buffer, []
            self._cancel_timer()
            writing = asyncio.get_running_loop().create_task(self._commit(batch))
            self._writing = writing
            try:
                await asyncio.shield(writing)
            finally:
                if writing.done():  # else the caller was cancelled: the next writer settles it
                    self._writing = None

    def _settle(self, writing: asyncio.Task[None]) -> None:
        """A write whose caller was cancelled: if it failed, the next caller hears of it."""
        self._writing = None
        if not writing.cancelled() and writing.exception() is not None:
            self._pending_error = self._pending_error or writing.exception()

    async def _commit(self, batch: list[dict[str, Any]]) -> None:
        seq = self._seq
        self._seq += 1
        try:
            table = await asyncio.to_thread(_to_table, batch)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
            # A malformed row would fail every retry: these rows are dropped (never committed,
            # so a rerun redoes them) and the caller learns which column was wrong.
            raise ValueError(f"{len(batch)} rows could not be converted: {exc}") from exc
        try:
            await asyncio.to_thread(self._write_part, table, seq)
        except BaseException:
            self._buffer[:0] = batch  # not committed: keep the rows for the next flush
            if self._buffer and self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(
                    self.flush_seconds, self._on_timer
                )
            raise
        self.rows_written += len(batch)
        self.parts_written += 1
        async with self._committed:
            self._committed.notify_all()

    def _write_part(self, table: pa.Table, seq: int) -> None:
        name = f"part-{self.run_id}-{seq:05d}.parquet"
        final = self.output_dir / name
        temp = self.output_dir / f"{TEMP_PREFIX}{self.run_id}-{seq:05d}{TEMP_SUFFIX}"
        try:
            with open(temp, "wb") as file:
                pq.write_table(table, file, compression=COMPRESSION)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        _fsync_dir(self.output_dir)


def _to_table(batch: list[dict[str, Any]]) -> pa.Table:
    """Row dicts -> a table, column by column (no per-row Arrow objects)."""
    arrays = []
    for field in ROW_SCHEMA:
        values = [row.get(field.name) for row in batch]
        try:
            arrays.append(pa.array(values, type=field.type))
        except UnicodeEncodeError:
            # A lone surrogate (an undecodable file name in an error message, a "\udcff" escape
            # in a model's JSON) must not cost the whole part: store it as \xNN text instead.
            arrays.append(pa.array(_storable_deep(values), type=field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
            raise ValueError(f"column {field.name!r}: {exc}") from None
    return pa.Table.from_arrays(arrays, schema=ROW_SCHEMA)


def _storable_deep(value: Any) -> Any:
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, dict):
        return {key: _storable_deep(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_storable_deep(item) for item in value]
    return value


def _fsync_dir(path: Path) -> None:
    """Make the rename durable. The part itself is already fsynced, so a directory that cannot
    be fsynced (some filesystems refuse) only risks losing the newest part on power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            log.warning("could not fsync directory %s: %s", path, exc)
    finally:
        os.close(fd)
