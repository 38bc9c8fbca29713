"""cProfile in every thread of an in-process run, and the questions the benchmarks ask of it.

- `thread_profile(target)`: one profiler per thread (threads started meanwhile included), on the
  thread CPU clock: the runner prepares images in worker threads, and their decodes and hashes
  (C code with the GIL released) are that thread's CPU, not the event loop's.
- `Calls`: cumulative time of named functions, of one function called from another (or from any
  function of a file) and own time by a predicate: what a stage table is computed from.
"""

from __future__ import annotations

import contextlib
import cProfile
import pstats
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

Key = tuple[str, int, str]  # pstats' (file, line, function); file "~" for built-ins

HTTP_LIBS = ("/aiohttp/", "/yarl/", "/multidict/", "/aiohappyeyeballs/", "/propcache/")
HTTP_BUILTINS = ("aiohttp", "_socket", "multidict", "yarl", "_ssl")
LOOP_BUILTINS = ("epoll", "_thread.lock", "_asyncio", "_contextvars", "_queue")
LOOP_FILES = ("/asyncio/", "/concurrent/futures/", "/threading.py", "/queue.py", "/selectors.py")


def thread_profile(target: Callable[[], Any]) -> pstats.Stats:
    """Run target with one cProfile per thread (threads started meanwhile included)."""
    profilers: list[cProfile.Profile] = []
    lock = threading.Lock()

    def new_profiler() -> cProfile.Profile:
        profiler = cProfile.Profile(time.thread_time_ns, 1e-9)
        with lock:
            profilers.append(profiler)
        return profiler

    def bootstrap(frame: Any, event: str, arg: Any) -> None:
        sys.setprofile(None)
        new_profiler().enable()

    threading.setprofile(bootstrap)
    main = new_profiler()
    main.enable()
    try:
        target()
    finally:
        main.disable()
        threading.setprofile(None)
    stats = pstats.Stats(main)
    for profiler in (p for p in profilers if p is not main):
        with contextlib.suppress(TypeError):  # a thread that never ran profiled code
            stats.add(profiler)
    return stats


class Calls:
    """Seconds out of a pstats table; functions are named by a file suffix and a name."""

    def __init__(self, stats: pstats.Stats) -> None:
        self.table: dict[Key, Any] = stats.stats  # type: ignore[attr-defined]
        self.total = sum(v[2] for v in self.table.values())

    def cum(self, file_suffix: str, *names: str) -> float:
        """Cumulative seconds of the functions `names` of the file (none of them nests another:
        a function that calls a listed one would count it twice)."""
        return sum(
            v[3] for k, v in self.table.items() if k[0].endswith(file_suffix) and k[2] in names
        )

    def edge(
        self, callee_file: str, callee: str, caller_in: str, caller: str | None = None
    ) -> float:
        """Cumulative seconds of `callee` when called from `caller` of a file whose path holds
        `caller_in` (a file suffix, or a folder such as "pipeline/inputs/"); from any function
        of those files when `caller` is None."""
        found = 0.0
        for key, value in self.table.items():
            if key[0].endswith(callee_file) and key[2] == callee:
                for ckey, cval in value[4].items():
                    if caller_in in ckey[0] and caller in (None, ckey[2]):
                        found += cval[3]
        return found

    def own(self, match: Callable[[Key], bool]) -> float:
        """Own (exclusive) seconds of every function `match` accepts."""
        return sum(v[2] for k, v in self.table.items() if match(k))

    def event_loop(self) -> float:
        """Own seconds of asyncio, the thread pools and their locks and queues."""
        return self.own(lambda k: any(f in k[0] for f in LOOP_FILES)) + self.own(
            lambda k: k[0] == "~" and any(name in k[2] for name in LOOP_BUILTINS)
        )
