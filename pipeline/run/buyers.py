"""How an answer is bought, the one step of a unit's way to its row that depends on the engine.

`ImageRunner` (runner.py) prepares a unit, keys it and looks for an answer to reuse; only when
there is none does it ask its buyer. A buyer either has the answer now — an `Outcome`, made into
the row at once — or takes the unit's request to buy later and returns None: its row is made
when the answer comes (Batch Mode: when the job is collected, engines/batch/jobs.py). A failure
before any request is made (a limit, an unreadable file, an upload refused) is an Outcome with
a parsed error for every buyer (`requests.Plan.failed`), so such rows do not depend on how the
answer would have been bought.
"""

from __future__ import annotations

from typing import Protocol

from pipeline.records import Unit
from pipeline.run.calls import Caller
from pipeline.run.reuse import Bought
from pipeline.run.rows import Outcome


class Buyer(Protocol):
    async def buy(self, unit: Unit, key: str) -> Outcome | None:
        """The outcome of asking about `unit` (its key `key`), or None when its row comes
        later. Raises Stopped / RunStopped when the run stops before there is one."""
        ...


class InteractiveBuyer:
    """Buys with an interactive call now (`Caller.call`). The key is marked in flight while the
    call runs, so a twin (the same bytes at another path) waits for this answer instead of
    paying again (reuse.Bought)."""

    def __init__(self, caller: Caller, bought: Bought) -> None:
        self.caller = caller
        self.bought = bought

    async def buy(self, unit: Unit, key: str) -> Outcome:
        self.bought.claim(key)
        try:
            outcome = await self.caller.call(unit)
        except BaseException as exc:
            self.bought.release(key, exc)
            raise
        self.bought.remember(key, unit.sha256, outcome)
        return outcome
