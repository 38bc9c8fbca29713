"""What an output remembers besides its rows: uploaded files and today's request count.

Kept in SQLite (`state.sqlite` beside the Parquet parts) because both are small, updated often and
must survive a kill: an upload that still lives is reused instead of paid for again, and the daily
request count carries over between runs on the same quota day.

On an object store, which has no append, no fsync and no file locking, SQLite cannot work on the
object itself: the run reads the `state.sqlite` object into an in-memory database, works on that,
and puts a snapshot back (one whole PUT, under the run's lease) every SNAPSHOT_SECONDS while
something changed (SQLite's `total_changes` says so, whoever wrote through `db`), at `save()`, and
at `close()`. A kill loses at most the last SNAPSHOT_SECONDS
of changes, which costs no money: an upload made in that window is not found for reuse and is
made again (uploads are free), and that window's requests are missing from the daily count (the
service's own 429 then stops the run at the quota). Callers that record something money depends
on call `save()` right after it.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.stores import Store, open_store

log = logging.getLogger(__name__)

STATE_FILE = "state.sqlite"
SNAPSHOT_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class Upload:
    name: str
    uri: str
    mime_type: str
    expires_at: datetime


class State:
    """The output's small mutable state. One writer: the run that owns the output."""

    def __init__(self, output_dir: str | Path | Store) -> None:
        store = open_store(output_dir)
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
