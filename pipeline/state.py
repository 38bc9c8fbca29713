"""What an output directory remembers besides its rows: uploaded files and today's request count.

Kept in SQLite (`state.sqlite` beside the Parquet parts) because both are small, updated often and
must survive a kill: an upload that still lives is reused instead of paid for again, and the daily
request count carries over between runs on the same quota day.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

STATE_FILE = "state.sqlite"


@dataclass(frozen=True, slots=True)
class Upload:
    name: str
    uri: str
    mime_type: str
    expires_at: datetime


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
