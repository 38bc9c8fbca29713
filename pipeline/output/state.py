"""What an output directory remembers besides its rows: uploaded files, today's request count,
and the Batch Mode jobs in flight.

Kept in SQLite (`.state.sqlite` beside `data/`) because all are small, updated often and
must survive a kill: an upload that still lives is reused instead of paid for again, the daily
request count carries over between runs on the same quota day, and a batch job — whose creation
is not idempotent — is recorded with the files it answers before it is created, and with its
name as soon as it exists, so a rerun re-attaches to it instead of paying for a second one.

Batch tables (pipeline/engines/batch/submit.py and jobs.py write them):

- `batch_jobs`: one row a job; `phase` staged (its JSONL being written) -> creating (the create
  call is out: its display name finds it if the answer was lost) -> submitted (its name known)
  -> collected (its rows committed) | ended (FAILED, CANCELLED, EXPIRED or lost: no rows);
- `batch_requests`: the files a job answers, one row each (several files with the same bytes
  share one request: the first row pays, the others copy), with what a row needs of the file;
- `batch_files`: the Files API files a job uses (its JSONL, its uploaded images), deleted when
  its rows are committed;
- `batch_collected`: the request keys of a job whose rows are durable (in the journal), written
  as a collection goes: one cut short (a stop, a failure, a kill) and made again writes none of
  them twice;
- `batch_retries`: fingerprints of files whose batch answer was a retryable error, for a next
  run set to retry them interactively.

On an object store, which has no append, no fsync and no file locking, SQLite cannot work on the
object itself: the run reads the `.state.sqlite` object into an in-memory database, works on that,
and puts a snapshot back (one whole PUT, under the run's lease) every SNAPSHOT_SECONDS while
something changed (SQLite's `total_changes` says so, whoever wrote through `db`), at `save()`, and
at `close()`. A kill loses at most the last SNAPSHOT_SECONDS
of changes, which costs no money: an upload made in that window is not found for reuse and is
made again (uploads are free), and that window's requests are missing from the daily count (the
service's own 429 then stops the run at the quota). Callers that record something money depends
on call `save()` right after it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.output.fsutil import fsync_dir, temp_name
from pipeline.output.stores import Store, open_store

log = logging.getLogger(__name__)

STATE_FILE = ".state.sqlite"  # hidden: readers of the output's folder skip it (parts.py)
LEGACY_STATE_FILE = "state.sqlite"  # before issue 20: adopted, then removed, on opening
SNAPSHOT_SECONDS = 10.0
IN_FLIGHT = ("creating", "submitted")  # batch job phases whose files are not to be sent again


@dataclass(frozen=True, slots=True)
class Upload:
    name: str
    uri: str
    mime_type: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class BatchJobRecord:
    """A row of `batch_jobs`. `task` is the job's [task] settings as JSON (to parse its answers
    whatever config runs later); `base_url` and `version` are where it was created."""

    id: int
    display_name: str
    phase: str
    name: str | None
    settings_hash: str
    task: str
    model: str
    base_url: str
    version: str
    requests: int
    est_tokens: int
    service_state: str | None
    message: str | None
    created_at: str
    updated_at: str


@dataclass(frozen=True, slots=True)
class BatchRequestRecord:
    """A row of `batch_requests`: one file answered by a job's request `key`."""

    job: int
    key: str
    fingerprint: bytes
    root: str
    path: str
    size: int
    mtime_ns: int
    sha256: str
    mime_type: str
    width: int
    height: int
    est_image_tokens: int
    est_prompt_tokens: int


_JOB_COLUMNS = ", ".join(f.name for f in fields(BatchJobRecord))
_IN_FLIGHT_FILES = (  # the fingerprints of the files of the jobs in flight
    "SELECT r.fingerprint FROM batch_requests r JOIN batch_jobs j ON j.id = r.job"
    f" WHERE j.phase IN ({', '.join('?' * len(IN_FLIGHT))})"
)
_REQUEST_COLUMNS = ", ".join(f.name for f in fields(BatchRequestRecord))
_BATCH_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS batch_jobs (id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " display_name TEXT UNIQUE, phase TEXT, name TEXT, settings_hash TEXT, task TEXT, model TEXT,"
    " base_url TEXT, version TEXT, requests INTEGER, est_tokens INTEGER, service_state TEXT,"
    " message TEXT, created_at TEXT, updated_at TEXT)",
    "CREATE TABLE IF NOT EXISTS batch_requests (job INTEGER, key TEXT, fingerprint BLOB,"
    " root TEXT, path TEXT, size INTEGER, mtime_ns INTEGER, sha256 TEXT, mime_type TEXT,"
    " width INTEGER, height INTEGER, est_image_tokens INTEGER, est_prompt_tokens INTEGER)",
    "CREATE INDEX IF NOT EXISTS batch_requests_by_key ON batch_requests (job, key)",
    "CREATE INDEX IF NOT EXISTS batch_requests_by_request_key ON batch_requests (key)",
    "CREATE TABLE IF NOT EXISTS batch_files (job INTEGER, name TEXT PRIMARY KEY)",
    "CREATE TABLE IF NOT EXISTS batch_retries (fingerprint BLOB PRIMARY KEY)",
    "CREATE TABLE IF NOT EXISTS batch_collected (job INTEGER, key TEXT, PRIMARY KEY (job, key))",
)


def _adopt_legacy(store: Store) -> None:
    """An output's `state.sqlite` of before issue 20 becomes its `.state.sqlite`: copied whole
    first (SQLite's own `VACUUM INTO`, which reads what its WAL holds too; a bucket's object
    copied), only then the old one removed, so a kill in between leaves the old one to be
    adopted again or the new one with a stale twin, never neither (what it holds: the Batch
    Mode jobs in flight, whose answers are paid for)."""
    if store.info(LEGACY_STATE_FILE) is None:
        return
    if store.info(STATE_FILE) is None:
        if store.local:
            _copy_database(Path(store.url))
        else:
            store.replace(STATE_FILE, store.read(LEGACY_STATE_FILE))
    old = LEGACY_STATE_FILE
    store.delete([old, f"{old}-wal", f"{old}-shm"])
    log.info("%s: %s is now %s", store.url, LEGACY_STATE_FILE, STATE_FILE)


def _copy_database(root: Path) -> None:
    temp = temp_name(root / STATE_FILE)
    old = sqlite3.connect(root / LEGACY_STATE_FILE)
    try:
        old.execute("VACUUM INTO ?", (str(temp),))
    finally:
        old.close()
    os.replace(temp, root / STATE_FILE)
    fsync_dir(root)


class State:
    """The output's small mutable state. One writer: the run that owns the output."""

    def __init__(self, output_dir: str | Path | Store) -> None:
        store = open_store(output_dir)
        _adopt_legacy(store)
        self._mutex = threading.RLock()  # the snapshot thread reads the database too
        self._snapshots: _Snapshots | None = None
        if store.local:
            Path(store.url).mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(Path(store.url) / STATE_FILE, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
        else:
            self.db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            snapshot = store.read(STATE_FILE) if store.info(STATE_FILE) else b""
            if snapshot:
                self.db.deserialize(snapshot)
            self._snapshots = _Snapshots(store, self)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS uploads"
            " (sha256 TEXT, mime_type TEXT, name TEXT PRIMARY KEY, uri TEXT, expires_at TEXT)"
        )
        self.db.execute("CREATE TABLE IF NOT EXISTS daily (day TEXT PRIMARY KEY, requests INTEGER)")
        # USD billed per quota day, for `[limits] max_usd_per_day` across the runs of one day
        self.db.execute("CREATE TABLE IF NOT EXISTS spend (day TEXT PRIMARY KEY, usd REAL)")
        for statement in _BATCH_SCHEMA:
            self.db.execute(statement)

    def close(self) -> None:
        if self._snapshots is not None:
            self._snapshots.stop()
        self.db.close()

    def save(self) -> None:
        """Make every change so far durable now (a snapshot on an object store; on disk SQLite
        already has)."""
        if self._snapshots is not None:
            self._snapshots.save()

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """One statement and its rows (the mutex keeps the snapshot thread out). Writes through
        `self.db` directly are snapshotted too: the snapshot follows `total_changes`."""
        with self._mutex:
            return self.db.execute(sql, params).fetchall()

    def serialize(self) -> tuple[bytes, int]:
        """The database as bytes, and the change count it holds."""
        with self._mutex:
            return self.db.serialize(), self.db.total_changes

    def changes(self) -> int:
        with self._mutex:
            return self.db.total_changes

    def find_upload(self, sha256: str, mime_type: str, valid_until: datetime) -> Upload | None:
        """A stored upload of these bytes that still lives at `valid_until`."""
        rows = self.execute(
            "SELECT name, uri, mime_type, expires_at FROM uploads"
            " WHERE sha256 = ? AND mime_type = ? AND expires_at > ?"
            " ORDER BY expires_at DESC LIMIT 1",
            (sha256, mime_type, valid_until.astimezone(UTC).isoformat()),
        )
        if not rows:
            return None
        row = rows[0]
        return Upload(row[0], row[1], row[2], datetime.fromisoformat(row[3]))

    def add_upload(self, sha256: str, upload: Upload) -> None:
        self.execute(
            "INSERT OR REPLACE INTO uploads VALUES (?, ?, ?, ?, ?)",
            (
                sha256,
                upload.mime_type,
                upload.name,
                upload.uri,
                upload.expires_at.astimezone(UTC).isoformat(),
            ),
        )

    def forget_upload(self, name: str) -> None:
        self.execute("DELETE FROM uploads WHERE name = ?", (name,))

    def upload_names(self) -> list[str]:
        return [r[0] for r in self.execute("SELECT name FROM uploads ORDER BY name")]

    def requests_on(self, day: str) -> int:
        rows = self.execute("SELECT requests FROM daily WHERE day = ?", (day,))
        return rows[0][0] if rows else 0

    def add_requests(self, day: str, count: int) -> None:
        self.execute(
            "INSERT INTO daily VALUES (?, ?) ON CONFLICT(day) DO UPDATE SET"
            " requests = requests + excluded.requests",
            (day, count),
        )

    def spent_on(self, day: str) -> float:
        rows = self.execute("SELECT usd FROM spend WHERE day = ?", (day,))
        return float(rows[0][0]) if rows else 0.0

    def add_spend(self, day: str, usd: float) -> None:
        self.execute(
            "INSERT INTO spend VALUES (?, ?) ON CONFLICT(day) DO UPDATE SET"
            " usd = usd + excluded.usd",
            (day, usd),
        )

    # ------------------------------------------------------------------------------ batch jobs
    def add_batch_job(self, display_name: str, **values: Any) -> int:
        """A new job in phase `staged`; its id. `values`: the other BatchJobRecord columns."""
        now = _now()
        row = {"phase": "staged", "requests": 0, "est_tokens": 0, **values}
        row.update(display_name=display_name, created_at=now, updated_at=now)
        names = ", ".join(row)
        job = self._insert(
            f"INSERT INTO batch_jobs ({names}) VALUES ({', '.join('?' * len(row))})",
            tuple(row.values()),
        )
        self.save()  # a job's record must be durable before the job can exist
        return job

    def update_batch_job(self, job: int, **values: Any) -> None:
        """Set columns of a job (committed, and so durable, when this returns)."""
        values["updated_at"] = _now()
        assignments = ", ".join(f"{name} = ?" for name in values)
        self._write(f"UPDATE batch_jobs SET {assignments} WHERE id = ?", (*values.values(), job))
        self.save()  # its phase and name are what stops a second create

    def batch_jobs(self, phases: Iterable[str] | None = None) -> list[BatchJobRecord]:
        """Jobs in these phases (all when None), oldest first."""
        query = f"SELECT {_JOB_COLUMNS} FROM batch_jobs"
        wanted = tuple(phases) if phases is not None else ()
        if phases is not None:
            query += f" WHERE phase IN ({', '.join('?' * len(wanted))})"
        rows = self._write(query + " ORDER BY id", wanted)
        return [BatchJobRecord(*row) for row in rows]

    def forget_batch_job(self, job: int) -> None:
        """Drop a job that was never created (staged): its files are sent again by a run."""
        with self._transaction():
            for table, column in (("batch_requests", "job"), ("batch_jobs", "id")):
                self._write(f"DELETE FROM {table} WHERE {column} = ?", (job,))

    def add_batch_requests(self, records: Iterable[BatchRequestRecord]) -> None:
        """Record files of a job, in one transaction (one commit for many rows)."""
        rows = [tuple(getattr(r, f.name) for f in fields(BatchRequestRecord)) for r in records]
        if not rows:
            return
        marks = ", ".join("?" * len(fields(BatchRequestRecord)))
        with self._transaction():
            self._many(f"INSERT INTO batch_requests ({_REQUEST_COLUMNS}) VALUES ({marks})", rows)

    def batch_requests(self, job: int, key: str | None = None) -> list[BatchRequestRecord]:
        """The files of a job (of one of its requests when `key` is given), in the order added."""
        query = f"SELECT {_REQUEST_COLUMNS} FROM batch_requests WHERE job = ?"
        args: tuple[Any, ...] = (job,)
        if key is not None:
            query, args = query + " AND key = ?", (job, key)
        return [BatchRequestRecord(*row) for row in self._write(query + " ORDER BY rowid", args)]

    def batch_request_keys(self, job: int) -> Iterator[str]:
        """The distinct request keys of a job."""
        rows = self._write("SELECT DISTINCT key FROM batch_requests WHERE job = ?", (job,))
        return (row[0] for row in rows)

    def in_flight_job_of(self, key: str) -> int | None:
        """The job in flight (creating or submitted) that asks for `key` already, if any."""
        rows = self._write(
            "SELECT r.job FROM batch_requests r JOIN batch_jobs j ON j.id = r.job"
            f" WHERE r.key = ? AND j.phase IN ({', '.join('?' * len(IN_FLIGHT))}) LIMIT 1",
            (key, *IN_FLIGHT),
        )
        return int(rows[0][0]) if rows else None

    def in_flight_fingerprints(self) -> bytes:
        """The fingerprints of every file a job in flight answers, joined (16 bytes each)."""
        return b"".join(row[0] for row in self._write(_IN_FLIGHT_FILES, IN_FLIGHT))

    def add_batch_file(self, job: int, name: str) -> None:
        self._write("INSERT OR REPLACE INTO batch_files VALUES (?, ?)", (job, name))

    def batch_files(self, job: int) -> list[str]:
        rows = self._write("SELECT name FROM batch_files WHERE job = ? ORDER BY name", (job,))
        return [row[0] for row in rows]

    def forget_batch_file(self, name: str) -> None:
        self._write("DELETE FROM batch_files WHERE name = ?", (name,))

    def add_batch_collected(self, job: int, keys: Iterable[str]) -> None:
        """Keys of a job whose rows are durable now, in one transaction. On an object store
        the next snapshot takes them, not a PUT of its own: a mark lost to a kill writes a
        row again, which costs no money (and a big job marks keys hundreds at a time)."""
        with self._transaction(save=False):
            self._many(
                "INSERT OR IGNORE INTO batch_collected VALUES (?, ?)", ((job, k) for k in keys)
            )

    def batch_collected(self, job: int) -> set[str]:
        """The keys of a job whose rows an earlier collection made durable."""
        rows = self._write("SELECT key FROM batch_collected WHERE job = ?", (job,))
        return {row[0] for row in rows}

    def add_batch_retries(self, fingerprints: Iterable[bytes]) -> None:
        with self._transaction():
            self._many(
                "INSERT OR IGNORE INTO batch_retries VALUES (?)", ((f,) for f in fingerprints)
            )

    def batch_retries(self) -> bytes:
        return b"".join(row[0] for row in self._write("SELECT fingerprint FROM batch_retries"))

    def forget_batch_retry(self, fingerprint: bytes) -> None:
        self._write("DELETE FROM batch_retries WHERE fingerprint = ?", (fingerprint,))

    @contextlib.contextmanager
    def _transaction(self, *, save: bool = True) -> Iterator[None]:
        with self._mutex:
            self.db.execute("BEGIN")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        if save:
            self.save()

    def _write(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        """One statement under the mutex (the snapshot thread reads the database too): its
        rows, fetched at once."""
        return self.execute(sql, tuple(params))

    def _insert(self, sql: str, params: Iterable[Any]) -> int:
        """One INSERT under the mutex: the id of its row."""
        with self._mutex:
            return int(self.db.execute(sql, tuple(params)).lastrowid or 0)

    def _many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self._mutex:
            self.db.executemany(sql, rows)


def peek_batch(output_dir: str | Path | Store) -> tuple[list[BatchJobRecord], bytes]:
    """The Batch Mode jobs in flight of an output and their files' fingerprints (joined, 16
    bytes each), read without taking the output: `pipeline estimate` looks while a run may own
    it, and creates nothing (no state file where there was none)."""
    store = open_store(output_dir)
    # an output from before issue 20 keeps it under the old name until a writer adopts it
    name = next((n for n in (STATE_FILE, LEGACY_STATE_FILE) if store.info(n) is not None), None)
    if name is None:
        return [], b""
    if store.local:
        uri = (Path(store.url) / name).resolve().as_uri() + "?mode=ro"
        db = sqlite3.connect(uri, uri=True)
    else:
        db = sqlite3.connect(":memory:")
        db.deserialize(store.read(name))
    try:
        return _in_flight(db)
    except sqlite3.OperationalError:  # a state file of an output that never used Batch Mode
        return [], b""
    finally:
        db.close()


def _in_flight(db: sqlite3.Connection) -> tuple[list[BatchJobRecord], bytes]:
    phases = ", ".join("?" * len(IN_FLIGHT))
    jobs = db.execute(
        f"SELECT {_JOB_COLUMNS} FROM batch_jobs WHERE phase IN ({phases}) ORDER BY id", IN_FLIGHT
    ).fetchall()
    files = db.execute(_IN_FLIGHT_FILES, IN_FLIGHT).fetchall()
    return [BatchJobRecord(*row) for row in jobs], b"".join(row[0] for row in files)


def _now() -> str:
    return datetime.now(UTC).isoformat()


class _Snapshots:
    """Puts the in-memory database back to the object store while it changes (module doc)."""

    def __init__(self, store: Store, state: State) -> None:
        self.store = store
        self.state = state
        self.saved = state.db.total_changes  # what the object holds (loading is no change)
        self._done = threading.Event()
        self._saving = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="gvp-state", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(SNAPSHOT_SECONDS):
            try:
                self.save()
            except OSError as exc:  # tried again at the next tick, and at close
                log.warning("%s: state snapshot failed: %s", self.store.url, exc)

    def save(self) -> None:
        with self._saving:
            if self.state.changes() == self.saved:
                return
            data, changes = self.state.serialize()
            self.store.replace(STATE_FILE, data)
            self.saved = changes

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
        self.save()
