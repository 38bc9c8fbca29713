"""How much decoded image memory a run holds at once: a budget of bytes, not a count of images.

`[limits] concurrency` bounds requests in flight, not pixels: 64 requests over 50-MP photos
would otherwise decode gigabytes at once. Every decode is admitted here first, with the bytes
its header says it will hold (`images.Preparation.decode_bytes`, known before any pixel is
decoded), and gives them back when its image is encoded. Admission is first come, first served,
so a big image waiting is not overtaken forever by small ones; one larger than the whole budget
is admitted when nothing else is held, and goes alone.

The budget lives on the event loop (the runner's coroutines wait here, never a thread), one per
engine process: the runners of one process share it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path

MB = 1 << 20
# Of the memory the process may use, the share decodes may hold by default: the rest is for the
# Parquet parts being filled (`[output] part_mb`), the answers in flight and the interpreter.
MEMORY_SHARE = 4
# ... and at most this much a core: the cores decode only a few images at a time, so a bigger
# budget would only hold more decoded pixels waiting, not go faster.
PER_CORE = 512 * MB
_CGROUP_LIMITS = (
    Path("/sys/fs/cgroup/memory.max"),  # cgroup v2: "max" when unlimited
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),  # v1: a huge number when unlimited
)


class DecodeBudget:
    """Bytes of decoded pixels in flight, at most `limit` (but always one decode at least)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a decode budget must be positive, got {limit}")
        self.limit = limit
        self.held = 0
        self.peak = 0  # the most ever held at once (what the tests and benchmarks read)
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    @contextlib.asynccontextmanager
    async def admitted(self, size: int) -> AsyncIterator[None]:
        """Hold `size` bytes for the body: wait until they fit (or nothing else is held)."""
        await self._acquire(size)
        try:
            yield
        finally:
            self._release(size)

    async def _acquire(self, size: int) -> None:
        if not self._waiting and self._fits(size):
            self._take(size)
            return
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((size, future))
        try:
            await future
        except BaseException:
            self._abandon(size, future)
            raise

    def _abandon(self, size: int, future: asyncio.Future[None]) -> None:
        """A waiter cancelled: give back what was granted meanwhile, else leave the queue (its
        place may have held back the ones behind it)."""
        if future.done() and not future.cancelled():
            self._release(size)
            return
        with contextlib.suppress(ValueError):
            self._waiting.remove((size, future))
        self._wake()

    def _fits(self, size: int) -> bool:
        return self.held == 0 or self.held + size <= self.limit

    def _take(self, size: int) -> None:
        self.held += size
        self.peak = max(self.peak, self.held)

    def _release(self, size: int) -> None:
        self.held -= size
        self._wake()

    def _wake(self) -> None:
        """Admit waiters in their order while the first one fits."""
        while self._waiting and self._fits(self._waiting[0][0]):
            size, future = self._waiting.popleft()
            if future.done():  # cancelled: it never held anything
                continue
            self._take(size)
            future.set_result(None)


def budget_bytes(decode_budget_mb: int | None) -> int:
    """`[images] decode_budget_mb` in bytes; when unset, a quarter of the memory this process
    may use (its cgroup's limit in a container), at most 512 MB a core."""
    if decode_budget_mb:
        return decode_budget_mb * MB
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(MB, min(usable_memory() // MEMORY_SHARE, PER_CORE * (cores or 1)))


def usable_memory() -> int:
    """The machine's physical memory, or less when a cgroup (a container) limits this process:
    the kernel's OOM killer acts on the cgroup's limit, not on the machine's."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min([physical, *(limit for path in _CGROUP_LIMITS if (limit := _read_limit(path)))])


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
