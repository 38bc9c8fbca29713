"""Answers already bought: the same bytes under the same settings are paid for once.

"The same bytes" is a key's sha256: a file's, or a group's (its members' sha256s in order,
records.group_sha256), so the same images grouped under another name are not paid twice either.

`find(key, sha256)` looks in three tiers, cheapest first; `remember` / `claim` keep them fed:

1. in flight — a call for this key is running now (the twin of a file being answered): wait for
   its outcome instead of calling again (a future per key, `claim` creates it);
2. recent — answered in this run a moment ago: the last RECENT_ANSWERS outcomes, in memory;
3. committed — answered earlier, in this run (a compact digest set says so, 16 bytes an answer)
   or in an earlier one (the resume index's `ok_keys`): the row is read back from the parts,
   after the sink has committed what it holds (so a row still in the journal is found too).

Only tier 3 costs I/O, and only for the rare file whose bytes were seen far apart.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Container
from dataclasses import dataclass
from typing import Any

from pipeline.output.index import GrowingDigestSet, lookup_rows
from pipeline.run.rows import Outcome

RECENT_ANSWERS = 256


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
    ) -> None:
        self.output_dir = output_dir
        self.ok_keys = ok_keys  # committed ok answers of earlier runs, under these settings
        self.commit = commit  # makes every row handed to the sink readable from the parts
        self._inflight: dict[str, asyncio.Future[Outcome]] = {}
        self._recent: OrderedDict[str, Outcome] = OrderedDict()
        self._answered = GrowingDigestSet()  # every key answered ok in this run

    async def find(self, key: str, sha256: str) -> Found | None:
        """A reusable answer for `key`, or None: the caller must call (and `claim` first)."""
        future = self._inflight.get(key)
        if future is not None:
            return Found(outcome=await asyncio.shield(future))
        outcome = self._recent.get(key)
        if outcome is not None:
            return Found(outcome=outcome)
        answered_here = digest(sha256) in self._answered
        if not answered_here and key not in self.ok_keys:
            return None
        if answered_here:
            await self.commit()  # its row may still be in the journal, not yet in a part
        rows = await asyncio.to_thread(lookup_rows, self.output_dir, [key])
        return Found(row=rows[key]) if key in rows else None

    def claim(self, key: str) -> asyncio.Future[Outcome]:
        """Mark `key` in flight; settle the future with `remember` or `release`."""
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        return future

    def remember(self, key: str, sha256: str, outcome: Outcome) -> None:
        future = self._inflight.pop(key, None)
        if future is not None and not future.done():
            future.set_result(outcome)
        if outcome.parsed.status == "ok":
            self._answered.add(digest(sha256))
        self._recent[key] = outcome
        if len(self._recent) > RECENT_ANSWERS:
            self._recent.popitem(last=False)

    def release(self, key: str, error: BaseException) -> None:
        """The call for `key` ended without an outcome: twins waiting on it get `error`."""
        future = self._inflight.pop(key, None)
        if future is not None and not future.done():
            future.set_exception(error)
            future.exception()  # retrieved: each waiter re-raises it itself
