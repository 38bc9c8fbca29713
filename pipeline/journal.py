"""The answer journal: every row on disk within about a second of its answer, before any part.

An answer the service returned is paid for. Parts are written every few thousand rows (Parquet
wants big files), so between parts the rows live in a journal: one append-only segment per part,
`.journal-<run id>-<seq>.jsonl` beside `part-<run id>-<seq>.parquet`, one JSON row a line,
appended and fsynced in small groups (256 rows or 1 s, whichever comes first). When the part is
committed its segment is deleted; a segment whose part exists is therefore left over by a kill
between the two steps and is simply deleted, and a segment without its part is turned into that
part by the next writer (`recover`), without any API call. A torn last line (the kill landed
mid-write) is the only loss: that row was never acknowledged as durable.

Rows are the sink's dicts: strings (lone surrogates escaped by JSON), numbers, lists, dicts and
`completed_at`, written as ISO 8601 text and read back as a datetime.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

PREFIX = ".journal-"
SUFFIX = ".jsonl"
_NAME = re.compile(rf"{re.escape(PREFIX)}(?P<run>.+)-(?P<seq>\d+){re.escape(SUFFIX)}")


def segment_name(run_id: str, seq: int) -> str:
    return f"{PREFIX}{run_id}-{seq:05d}{SUFFIX}"


def part_name(run_id: str, seq: int) -> str:
    """The part a segment becomes (the same run id and sequence number)."""
    return f"part-{run_id}-{seq:05d}.parquet"


def part_for(segment: Path) -> Path:
    match = _NAME.fullmatch(segment.name)
    if match is None:
        raise ValueError(f"not a journal segment: {segment.name}")
    return segment.with_name(part_name(match["run"], int(match["seq"])))


def segments(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Every journal segment in the folder, oldest name first."""
    found = [Path(e.path) for e in os.scandir(output_dir) if _NAME.fullmatch(e.name)]
    return sorted(found)


def encode(rows: list[dict[str, Any]]) -> bytes:
    """Rows as JSON lines (ensure_ascii: a lone surrogate in a file name survives the trip)."""
    return "".join(json.dumps(row, default=_default) + "\n" for row in rows).encode("ascii")


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class Segment:
    """One open segment: appended to in groups, each group made durable before it returns."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []  # what the part will hold
        self._file: BinaryIO = open(path, "ab")  # noqa: SIM115 - closed by close()

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Write a group and fsync: durable when this returns (called off the event loop)."""
        self._file.write(encode(rows))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.rows.extend(rows)

    def close(self) -> None:
        self._file.close()


def read(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of a segment; a torn or corrupt line ends it (nothing after it was durable
    before it)."""
    with open(path, "rb") as file:
        for number, line in enumerate(file, 1):
            try:
                row = json.loads(line)
            except ValueError:
                log.warning(
                    "%s: line %d is torn (a kill mid-write); the rest is skipped", path, number
                )
                return
            if isinstance(row.get("completed_at"), str):
                row["completed_at"] = datetime.fromisoformat(row["completed_at"])
            yield row
