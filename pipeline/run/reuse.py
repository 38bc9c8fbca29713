"""Answers already bought: the same bytes under the same settings are paid for once.

"The same bytes" is a key's sha256: a file's, or a group's (its members' sha256s in order,
records.group_sha256), so the same images grouped under another name are not paid twice either;
a gs:// object Vertex reads in place is named by its md5Hash instead (inputs/in_place.py).

`find(key, sha256)` looks in three tiers, cheapest first; `remember` / `claim` keep them fed:

1. in flight — a call for this key is running now (the twin of a file being answered): wait for
   its outcome instead of calling again (a future per key, `claim` creates it);
2. recent — answered in this run not long ago: in memory, at least every answer the sink may
   not have committed yet (`recent_capacity`: two parts' rows and its queues);
3. committed — answered earlier, in this run (a compact digest set says so, 16 bytes an answer)
   or in an earlier one (the resume index's `ok_keys`): the row is read back from the parts.
   Only when it is not there yet (a twin answered in this run whose row the sink still holds,
   which the recent tier makes rare) is the sink asked to commit what it holds first.

Issue 19: with a recent tier of 256 answers, 5,000 images each present twice far apart made
677 parts and took 117 s against ~20 s: every copy forced a commit of whatever the sink held
(a tiny part) to read its twin's row back. Holding the outcomes the sink may still hold costs
little memory: the sink's rows hold the same parsed objects (scripts/bench.py duplicates).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Container
from dataclasses import dataclass
from typing import Any

from pipeline.output.index import GrowingDigestSet, KeySet, lookup_rows
from pipeline.run.rows import Outcome

RECENT_ANSWERS = 256
SINK_BACKLOG = 2048  # rows queued or not yet durable in the sink (its QUEUE_ROWS + SYNC_ROWS x 4)


def recent_capacity(rows_per_part: int) -> int:
    """Outcomes kept in memory: more than the sink may hold uncommitted (the open part's rows,
    the part being written and its queues), so a twin beyond them is in a part already."""
    return RECENT_ANSWERS + 2 * rows_per_part + SINK_BACKLOG


def digest(sha256_hex: str) -> bytes:
    return bytes.fromhex(sha256_hex[:32])  # 128 bits, as the resume index keeps them


@dataclass(frozen=True, slots=True)
class Found:
    """An answer to reuse: an outcome of this run, or a committed row."""

    outcome: Outcome | None = None
    row: dict[str, Any] | None = None


class Bought:
    """The three tiers of answers a run can reuse (see the module docstring)."""

    def __init__(
        self,
        output_dir: str,
        ok_keys: Container[str],
        commit: Callable[[], Awaitable[None]],
        *,
        recent: int = RECENT_ANSWERS,
    ) -> None:
        self.output_dir = output_dir
        self.ok_keys = ok_keys  # committed ok answers of earlier runs, under these settings
        self.commit = commit  # makes every row handed to the sink readable from the parts
        self._inflight: dict[str, asyncio.Future[Outcome]] = {}
        self._recent: OrderedDict[str, Outcome] = OrderedDict()  # ok answers
        self._capacity = recent  # see recent_capacity
        # Failed answers, copied as before only while they are among the last RECENT_ANSWERS
        # (a copy met later is asked again: its twin's failure may have been transient).
        self._failed: OrderedDict[str, Outcome] = OrderedDict()
        self._answered = GrowingDigestSet()  # every key answered ok in this run

    async def find(self, key: str, sha256: str) -> Found | None:
        """A reusable answer for `key`, or None: the caller must call (and `claim` first)."""
        future = self._inflight.get(key)
        if future is not None:
            return Found(outcome=await asyncio.shield(future))
        outcome = self._recent.get(key) or self._failed.get(key)
        if outcome is not None:
            return Found(outcome=outcome)
        answered_here = digest(sha256) in self._answered
        if not answered_here and key not in self.ok_keys:
            return None
        row = await self._committed(key)
        if row is None and answered_here:
            await self.commit()  # its row is still in the sink, not yet in a part: rare
            row = await self._committed(key)
        return Found(row=row) if row is not None else None

    async def _committed(self, key: str) -> dict | None:
        """The committed ok row of `key`, or of the same request under an older key rule."""
        spellings = self.ok_keys.spellings(key) if isinstance(self.ok_keys, KeySet) else [key]
        rows = await asyncio.to_thread(lookup_rows, self.output_dir, spellings)
        return next((rows[each] for each in spellings if each in rows), None)

    def claim(self, key: str) -> asyncio.Future[Outcome]:
        """Mark `key` in flight; settle the future with `remember` or `release`."""
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        return future

    def remember(self, key: str, sha256: str, outcome: Outcome) -> None:
        future = self._inflight.pop(key, None)
        if future is not None and not future.done():
            future.set_result(outcome)
        ok = outcome.parsed.status == "ok"
        if ok:
            self._answered.add(digest(sha256))
        kept, capacity = (self._recent, self._capacity) if ok else (self._failed, RECENT_ANSWERS)
        kept[key] = outcome
        if len(kept) > capacity:
            kept.popitem(last=False)

    def release(self, key: str, error: BaseException) -> None:
        """The call for `key` ended without an outcome: twins waiting on it get `error`."""
        future = self._inflight.pop(key, None)
        if future is not None and not future.done():
            future.set_exception(error)
            future.exception()  # retrieved: each waiter re-raises it itself
