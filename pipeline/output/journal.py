"""The answer journal: every row on disk within about a second of its answer, before any part.

An answer the service returned is paid for. Parts are written every few thousand rows (Parquet
wants big files), so between parts the rows live in a journal: one append-only segment per part,
`.journal-<run id>-<seq>.jsonl` beside `part-<run id>-<seq>.parquet`, one JSON row a line,
appended durably in small groups (256 rows or 1 s, whichever comes first) through the output's
store (`pipeline/output/stores.py`): on disk an fsynced append to one file; on an object store,
which cannot append, each group is one small immutable object `<segment>.<n>` read back in order (so
there a torn line cannot happen: a chunk is whole or absent). When the part is
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
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from pipeline.output.stores import Store

log = logging.getLogger(__name__)

PREFIX = ".journal-"
SUFFIX = ".jsonl"
_NAME = re.compile(rf"{re.escape(PREFIX)}(?P<run>.+)-(?P<seq>\d+){re.escape(SUFFIX)}")


def segment_name(run_id: str, seq: int) -> str:
    return f"{PREFIX}{run_id}-{seq:05d}{SUFFIX}"


def part_name(run_id: str, seq: int) -> str:
    """The part a segment becomes (the same run id and sequence number)."""
    return f"part-{run_id}-{seq:05d}.parquet"


def part_for(segment: str) -> str:
    """The part name a segment name becomes."""
    match = _NAME.fullmatch(segment)
    if match is None:
        raise ValueError(f"not a journal segment: {segment}")
    return part_name(match["run"], int(match["seq"]))


def segments(store: Store) -> list[str]:
    """Every journal segment in the output, oldest name first."""
    return sorted(name for name in store.appended(PREFIX) if _NAME.fullmatch(name))


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

    def __init__(self, store: Store, name: str) -> None:
        self.name = name
        self.rows: list[dict[str, Any]] = []  # what the part will hold
        self._log = store.appender(name)

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Write a group durably: durable when this returns (called off the event loop)."""
        self._log.append(encode(rows))
        self.rows.extend(rows)

    def close(self) -> None:
        self._log.close()


def read(store: Store, name: str) -> Iterator[dict[str, Any]]:
    """The rows of a segment; a torn or corrupt line ends it (nothing after it was durable
    before it)."""
    for number, line in enumerate(store.read_appended(name).splitlines(keepends=True), 1):
        try:
            row = json.loads(line)
        except ValueError:
            log.warning("%s: line %d is torn (a kill mid-write); the rest is skipped", name, number)
            return
        if isinstance(row.get("completed_at"), str):
            row["completed_at"] = datetime.fromisoformat(row["completed_at"])
        yield row
