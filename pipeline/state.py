"""What an output directory remembers besides its rows: uploaded files, today's request count,
and the Batch Mode jobs in flight.

Kept in SQLite (`state.sqlite` beside the Parquet parts) because all are small, updated often and
must survive a kill: an upload that still lives is reused instead of paid for again, the daily
request count carries over between runs on the same quota day, and a batch job — whose creation
is not idempotent — is recorded with the files it answers before it is created, and with its
name as soon as it exists, so a rerun re-attaches to it instead of paying for a second one.

Batch tables (pipeline/engines/batch.py writes them):

- `batch_jobs`: one row a job; `phase` staged (its JSONL being written) -> creating (the create
  call is out: its display name finds it if the answer was lost) -> submitted (its name known)
  -> collected (its rows committed) | ended (FAILED, CANCELLED, EXPIRED or lost: no rows);
- `batch_requests`: the files a job answers, one row each (several files with the same bytes
  share one request: the first row pays, the others copy), with what a row needs of the file;
- `batch_files`: the Files API files a job uses (its JSONL, its uploaded images), deleted when
  its rows are committed;
- `batch_retries`: fingerprints of files whose batch answer was a retryable error, for a next
  run set to retry them interactively.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

STATE_FILE = "state.sqlite"
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
)


class State:
    """The output directory's small mutable state. One writer: the run that owns the directory."""

    def __init__(self, output_dir: str | Path) -> None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(Path(output_dir) / STATE_FILE, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS uploads"
            " (sha256 TEXT, mime_type TEXT, name TEXT PRIMARY KEY, uri TEXT, expires_at TEXT)"
        )
        self.db.execute("CREATE TABLE IF NOT EXISTS daily (day TEXT PRIMARY KEY, requests INTEGER)")
        for statement in _BATCH_SCHEMA:
            self.db.execute(statement)

    def close(self) -> None:
        self.db.close()

    def find_upload(self, sha256: str, mime_type: str, valid_until: datetime) -> Upload | None:
        """A stored upload of these bytes that still lives at `valid_until`."""
        row = self.db.execute(
            "SELECT name, uri, mime_type, expires_at FROM uploads"
            " WHERE sha256 = ? AND mime_type = ? AND expires_at > ?"
            " ORDER BY expires_at DESC LIMIT 1",
            (sha256, mime_type, valid_until.astimezone(UTC).isoformat()),
        ).fetchone()
        if row is None:
            return None
        return Upload(row[0], row[1], row[2], datetime.fromisoformat(row[3]))

    def add_upload(self, sha256: str, upload: Upload) -> None:
        self.db.execute(
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
        self.db.execute("DELETE FROM uploads WHERE name = ?", (name,))

    def upload_names(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM uploads ORDER BY name")]

    def requests_on(self, day: str) -> int:
        row = self.db.execute("SELECT requests FROM daily WHERE day = ?", (day,)).fetchone()
        return row[0] if row else 0

    def add_requests(self, day: str, count: int) -> None:
        self.db.execute(
            "INSERT INTO daily VALUES (?, ?) ON CONFLICT(day) DO UPDATE SET"
            " requests = requests + excluded.requests",
            (day, count),
        )

    # ------------------------------------------------------------------------------ batch jobs
    def add_batch_job(self, display_name: str, **values: Any) -> int:
        """A new job in phase `staged`; its id. `values`: the other BatchJobRecord columns."""
        now = _now()
        row = {"phase": "staged", "requests": 0, "est_tokens": 0, **values}
        row.update(display_name=display_name, created_at=now, updated_at=now)
        names = ", ".join(row)
        cursor = self.db.execute(
            f"INSERT INTO batch_jobs ({names}) VALUES ({', '.join('?' * len(row))})",
            tuple(row.values()),
        )
        return int(cursor.lastrowid or 0)

    def update_batch_job(self, job: int, **values: Any) -> None:
        """Set columns of a job (committed, and so durable, when this returns)."""
        values["updated_at"] = _now()
        assignments = ", ".join(f"{name} = ?" for name in values)
        self.db.execute(
            f"UPDATE batch_jobs SET {assignments} WHERE id = ?", (*values.values(), job)
        )

    def batch_jobs(self, phases: Iterable[str] | None = None) -> list[BatchJobRecord]:
        """Jobs in these phases (all when None), oldest first."""
        query = f"SELECT {_JOB_COLUMNS} FROM batch_jobs"
        wanted = tuple(phases) if phases is not None else ()
        if phases is not None:
            query += f" WHERE phase IN ({', '.join('?' * len(wanted))})"
        rows = self.db.execute(query + " ORDER BY id", wanted)
        return [BatchJobRecord(*row) for row in rows]

    def forget_batch_job(self, job: int) -> None:
        """Drop a job that was never created (staged): its files are sent again by a run."""
        with self._transaction():
            for table, column in (("batch_requests", "job"), ("batch_jobs", "id")):
                self.db.execute(f"DELETE FROM {table} WHERE {column} = ?", (job,))

    def add_batch_requests(self, records: Iterable[BatchRequestRecord]) -> None:
        """Record files of a job, in one transaction (one commit for many rows)."""
        rows = [tuple(getattr(r, f.name) for f in fields(BatchRequestRecord)) for r in records]
        if not rows:
            return
        marks = ", ".join("?" * len(fields(BatchRequestRecord)))
        with self._transaction():
            self.db.executemany(
                f"INSERT INTO batch_requests ({_REQUEST_COLUMNS}) VALUES ({marks})", rows
            )

    def batch_requests(self, job: int, key: str | None = None) -> list[BatchRequestRecord]:
        """The files of a job (of one of its requests when `key` is given), in the order added."""
        query = f"SELECT {_REQUEST_COLUMNS} FROM batch_requests WHERE job = ?"
        args: tuple[Any, ...] = (job,)
        if key is not None:
            query, args = query + " AND key = ?", (job, key)
        return [
            BatchRequestRecord(*row) for row in self.db.execute(query + " ORDER BY rowid", args)
        ]

    def batch_request_keys(self, job: int) -> Iterator[str]:
        """The distinct request keys of a job."""
        rows = self.db.execute("SELECT DISTINCT key FROM batch_requests WHERE job = ?", (job,))
        return (row[0] for row in rows)

    def in_flight_job_of(self, key: str) -> int | None:
        """The job in flight (creating or submitted) that asks for `key` already, if any."""
        row = self.db.execute(
            "SELECT r.job FROM batch_requests r JOIN batch_jobs j ON j.id = r.job"
            f" WHERE r.key = ? AND j.phase IN ({', '.join('?' * len(IN_FLIGHT))}) LIMIT 1",
            (key, *IN_FLIGHT),
        ).fetchone()
        return None if row is None else int(row[0])

    def in_flight_fingerprints(self) -> bytes:
        """The fingerprints of every file a job in flight answers, joined (16 bytes each)."""
        rows = self.db.execute(
            "SELECT r.fingerprint FROM batch_requests r JOIN batch_jobs j ON j.id = r.job"
            f" WHERE j.phase IN ({', '.join('?' * len(IN_FLIGHT))})",
            IN_FLIGHT,
        )
        return b"".join(row[0] for row in rows)

    def add_batch_file(self, job: int, name: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO batch_files VALUES (?, ?)", (job, name))

    def batch_files(self, job: int) -> list[str]:
        rows = self.db.execute("SELECT name FROM batch_files WHERE job = ? ORDER BY name", (job,))
        return [row[0] for row in rows]

    def forget_batch_file(self, name: str) -> None:
        self.db.execute("DELETE FROM batch_files WHERE name = ?", (name,))

    def add_batch_retries(self, fingerprints: Iterable[bytes]) -> None:
        with self._transaction():
            self.db.executemany(
                "INSERT OR IGNORE INTO batch_retries VALUES (?)", ((f,) for f in fingerprints)
            )

    def batch_retries(self) -> bytes:
        return b"".join(row[0] for row in self.db.execute("SELECT fingerprint FROM batch_retries"))

    def forget_batch_retry(self, fingerprint: bytes) -> None:
        self.db.execute("DELETE FROM batch_retries WHERE fingerprint = ?", (fingerprint,))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")


def _now() -> str:
    return datetime.now(UTC).isoformat()
