"""The answer journal: every row handed to the OS as it arrives, made durable in small groups.

An answer the service returned is paid for. Parts are written every few thousand rows (Parquet
wants big files), so between parts the rows live in a journal: one append-only segment per part,
`.journal-<run id>-<seq>.jsonl` at the top level (never in `data/`), for the part
`data/part-<run id>-<seq>.parquet`, one JSON row a line.

Two guards, against two different failures:

* A process crash (kill -9, an OOM kill, a segfault): each row is written to a local file with
  one `os.write` as the writer receives it (about 10 µs for a 2 KB row). What the OS has, a
  dead process cannot lose: the next writer on this machine reads it back. Only the answers in
  flight (not yet handed to the sink) are lost, and re-paid.
* A machine crash (power, kernel panic, a lost VM): rows are made durable in groups, at most
  `sync_rows` rows, SYNC_BYTES or `sync_seconds` after the oldest undurable row (the sink's
  defaults: 256 rows or 1 s) — on disk one fsync of the segment; on an object store, which
  cannot append, one small immutable object `<segment>.<n:06d>` per group, read back in order.
  A machine crash costs at most that group; an fsync per answer would cost a disk flush per
  answer (milliseconds on most disks) for no gain against the common failure, a process kill.

On an object store the per-answer file is a spill file on the local disk (`spill_dir`), read
back by recovery on the same machine; another machine sees only the chunks in the bucket.

A segment is turned into its part by reading it back line by line (so the sink holds no row
once it is written), then deleted. A segment whose part exists was left by a kill between the
two steps and is simply deleted; one without its part is turned into that part by the next
writer (`recovery.py`), without any API call. A torn last line (a kill mid-write, or a machine
crash before the fsync) is skipped: that row was never durable. A chunk in a bucket that does
not decode (damage from outside: chunks are whole or absent) is set aside under DAMAGED and
named in a warning and in `status`; the chunks after it are read as usual.

Rows are the sink's dicts: strings (lone surrogates escaped by JSON), numbers, lists, dicts and
`completed_at`, written as ISO 8601 text and read back as a datetime. A segment of a run with a
typed `answer` column begins with a header line naming that column's Arrow field (HEADER_KEY),
so the part a killed run's segment becomes has the run's column type, not a guess.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.output.parts import data_name
from pipeline.output.stores import Store
from pipeline.records import row_schema, to_table

log = logging.getLogger(__name__)

PREFIX = ".journal-"
SUFFIX = ".jsonl"
DAMAGED = ".damaged-journal/"  # bucket chunks that did not decode, kept for a human
SYNC_BYTES = 16 << 20  # a group also ends here: bounds a bucket chunk (one PUT) and its read
PART_BATCH_BYTES = 16 << 20  # rows decoded at a time when a segment becomes a part
_NAME = re.compile(rf"{re.escape(PREFIX)}(?P<run>.+)-(?P<seq>\d+){re.escape(SUFFIX)}")
_CHUNK = re.compile(r"\.\d{6}")
HEADER_KEY = "_answer_field"  # the first line of a segment: its `answer` field (Arrow IPC)


def segment_name(run_id: str, seq: int) -> str:
    return f"{PREFIX}{run_id}-{seq:05d}{SUFFIX}"


def part_name(run_id: str, seq: int) -> str:
    """The part a segment becomes (the same run id and sequence number)."""
    return data_name(f"part-{run_id}-{seq:05d}.parquet")


def part_for(segment: str) -> str:
    """The part name a segment name becomes."""
    match = _NAME.fullmatch(segment)
    if match is None:
        raise ValueError(f"not a journal segment: {segment}")
    return part_name(match["run"], int(match["seq"]))


def spill_dir(store: Store) -> Path:
    """Where an object-store output's spill files live on this machine: $GVP_SPILL_DIR, else
    the user's cache folder; one folder per output URL."""
    root = os.environ.get("GVP_SPILL_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
        "gemini-vision-pipeline",
        "spill",
    )
    return Path(root, hashlib.sha256(store.url.encode()).hexdigest()[:16])


def _spilled(store: Store) -> list[str]:
    folder = spill_dir(store)
    if store.local or not folder.is_dir():
        return []
    return [entry.name for entry in os.scandir(folder) if _NAME.fullmatch(entry.name)]


def segments(store: Store) -> list[str]:
    """Every journal segment of the output (in the store, or spilled on this machine)."""
    names = {name for name in store.appended(PREFIX) if _NAME.fullmatch(name)}
    return sorted(names | set(_spilled(store)))


def header(answer: pa.Field) -> dict[str, Any]:
    """The header line of a segment whose rows' `answer` column is `answer`."""
    data = pa.schema([answer]).serialize().to_pybytes()
    return {HEADER_KEY: base64.b64encode(data).decode("ascii")}


def split_header(
    rows: Iterable[dict[str, Any]],
) -> tuple[pa.Field | None, Iterator[dict[str, Any]]]:
    """(the answer field a leading header names, or None; the rows after it)."""
    rows = iter(rows)
    first = next(rows, None)
    if first is None:
        return None, rows
    if set(first) != {HEADER_KEY}:
        return None, itertools.chain([first], rows)
    schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(first[HEADER_KEY])))
    return schema.field(0), rows


def pending_rows(store: Store) -> list[dict[str, Any]]:
    """The rows of every segment not yet turned into its part (what recovery would commit, and
    a live run's answers since its last part), for a look at the output that takes no lock:
    the plan of a run (pipeline/run/plan.py)."""
    rows: list[dict[str, Any]] = []
    for name in segments(store):
        if store.info(part_for(name)) is None:
            rows.extend(recovered(store, name).rows)
    return rows


def held_answers(store: Store) -> int:
    """Answers in the output's journal, not yet in parts: one line each (a line still being
    written is not counted). What a live run has received since its last part; on a bucket,
    what it made durable there."""
    names = [name for name in store.appended(PREFIX) if _NAME.fullmatch(name)]
    return sum(_answers_in(store.read_appended(name)) for name in names)


def _answers_in(data: bytes) -> int:
    """Complete lines, less the header line a segment may begin with (`header`)."""
    return data.count(b"\n") - data.startswith(b'{"' + HEADER_KEY.encode() + b'"')


def encode(rows: Iterable[dict[str, Any]]) -> bytes:
    """Rows as JSON lines (ensure_ascii: a lone surrogate in a file name survives the trip)."""
    return "".join(json.dumps(row, default=_default) + "\n" for row in rows).encode("ascii")


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class _LocalLog:
    """An append-only local file: `write` hands bytes to the OS, `sync` makes them durable."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


@dataclass(slots=True)
class _Counts:
    rows: int = 0  # written to the OS
    bytes: int = 0
    durable_rows: int = 0  # fsynced, or in a chunk in the bucket
    durable_bytes: int = 0


class Segment:
    """One open segment: `write` per answer (to the OS), `sync` per group (durable). It keeps
    no rows: a part is read back from the local file (`rows`). With `answer`, its first line
    is the header naming the rows' answer field (made durable with the first rows)."""

    def __init__(self, store: Store, name: str, answer: pa.Field | None = None) -> None:
        self.name = name
        self.store = store
        self.counts = _Counts()
        if store.local:
            self.path = Path(store.join(name))
            self._chunks = None
        else:
            spill_dir(store).mkdir(parents=True, exist_ok=True)
            self.path = spill_dir(store) / name
            self._chunks = store.appender(name)
        self._file = _LocalLog(self.path)
        if answer is not None:
            data = encode([header(answer)])
            self._file.write(data)
            self.counts.bytes += len(data)

    def write(self, rows: list[dict[str, Any]]) -> int:
        """Hand rows to the OS, one write each (not one joined buffer: with 20 MB answers that
        would be a copy of them all); returns their bytes."""
        size = 0
        for row in rows:
            data = encode([row])
            self._file.write(data)
            size += len(data)
            self.counts.rows += 1
            self.counts.bytes += len(data)
        return size

    @property
    def undurable_rows(self) -> int:
        return self.counts.rows - self.counts.durable_rows

    @property
    def undurable_bytes(self) -> int:
        return self.counts.bytes - self.counts.durable_bytes

    def sync(self) -> int:
        """Make what was written durable (fsync, or one chunk to the bucket); returns rows."""
        newly = self.undurable_rows
        if not newly:
            return 0
        if self._chunks is None:
            self._file.sync()
        else:
            with open(self.path, "rb") as spill:
                spill.seek(self.counts.durable_bytes)
                self._chunks.append(spill.read(self.undurable_bytes))
        self.counts.durable_rows, self.counts.durable_bytes = self.counts.rows, self.counts.bytes
        return newly

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Write and make durable at once (a writer that has nothing to group)."""
        self.write(rows)
        self.sync()

    def rows(self) -> Iterator[dict[str, Any]]:
        return _decode_lines(self.path, self.name)

    def close(self) -> None:
        self._file.close()
        if self._chunks is not None:
            self._chunks.close()


def discard(store: Store, name: str) -> None:
    """Delete a segment everywhere it lives (store and spill) once its part exists."""
    store.delete_appended(name)
    if not store.local:
        (spill_dir(store) / name).unlink(missing_ok=True)


def _decode(line: bytes) -> dict[str, Any]:
    row = json.loads(line)
    if not isinstance(row, dict):
        raise ValueError("not a row")
    if isinstance(row.get("completed_at"), str):
        row["completed_at"] = datetime.fromisoformat(row["completed_at"])
    return row


def _decode_lines(path: Path, shown: str) -> Iterator[dict[str, Any]]:
    """The rows of a local journal file, streamed; a line that does not decode (torn by a kill
    mid-write or a machine crash) is skipped and named."""
    with open(path, "rb") as file:
        for number, line in enumerate(file, 1):
            try:
                yield _decode(line)
            except ValueError:
                log.warning("%s: line %d is torn (a crash mid-write); skipped", shown, number)


@dataclass(slots=True)
class Recovered:
    """What reading a left-over segment found: its rows, and the chunks set aside."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    answer: pa.Field | None = None  # the rows' answer field, as the segment's header names it

    def without_header(self) -> Recovered:
        answer, rows = split_header(self.rows)
        self.answer, self.rows = answer, list(rows)
        return self


def read(store: Store, name: str) -> Iterator[dict[str, Any]]:
    """The rows of a left-over segment (see `recovered`)."""
    return iter(recovered(store, name).rows)


def recovered(store: Store, name: str) -> Recovered:
    """The rows of a left-over segment. On an object store: this machine's spill file when it
    holds at least as many rows as the bucket's chunks (it is written first), else the chunks,
    each decoded whole or set aside (DAMAGED) without losing the chunks after it."""
    if store.local:
        path = Path(store.join(name))
        return Recovered(list(_decode_lines(path, name)) if path.exists() else []).without_header()
    found = _read_chunks(store, name)
    spill = spill_dir(store) / name
    if spill.exists():
        spilled = list(_decode_lines(spill, str(spill)))
        if len(spilled) >= len(found.rows):
            found.rows = spilled
    return found.without_header()


def _read_chunks(store: Store, name: str) -> Recovered:
    found = Recovered()
    chunks = [e.name for e in store.list(name + ".") if _CHUNK.fullmatch(e.name[len(name) :])]
    for chunk in sorted(chunks):
        data = store.read(chunk)
        try:
            found.rows.extend(_decode(line) for line in data.splitlines())
        except ValueError:
            found.damaged.append(chunk)
            store.create_bytes(DAMAGED + chunk, data)
            log.warning(
                "%s: journal chunk does not decode (damaged outside this program); set aside "
                "as %s, its rows are not recovered, the chunks after it are",
                store.join(chunk),
                store.join(DAMAGED + chunk),
            )
    return found


def damaged(store: Store) -> list[str]:
    """The journal chunks recovery set aside (for `status`)."""
    return [entry.name for entry in store.list(DAMAGED)]


def write_part(
    store: Store, part: str, rows: Iterable[dict[str, Any]], answer: pa.Field | None = None
) -> list[str]:
    """Commit `rows` as the part, decoded and encoded PART_BATCH_BYTES at a time (one row
    group each) so memory holds one batch, not the part. Returns the unstorable rows' reasons.
    The `answer` column is of the field a leading header names, else of `answer`."""
    reasons: list[str] = []
    named, rows = split_header(rows)
    answer = answer if named is None else named

    def write(file: Any) -> None:
        with pq.ParquetWriter(file, row_schema(answer), compression="zstd") as writer:
            for batch in _batches(rows):
                table, why = to_table(batch, answer)
                reasons.extend(why)
                writer.write_table(table)

    store.create(part, write)
    return reasons


def _batches(rows: Iterable[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    size, yielded = 0, False
    for row in rows:
        batch.append(row)
        size += row_bytes(row)
        if size >= PART_BATCH_BYTES:
            yield batch
            batch, size, yielded = [], 0, True
    if batch or not yielded:  # an empty segment still becomes a (valid, empty) part
        yield batch


def row_bytes(row: dict[str, Any]) -> int:
    """A cheap estimate of a row's size: its strings (the raw answer dominates). A plain loop:
    the sink asks this of every row three times, and a generator over `str | bytes` cost ~5.5 us
    a row against ~1.9 here."""
    size = 64
    for value in row.values():
        if isinstance(value, (str, bytes)):
            size += len(value)
    return size
