"""A progress line on stderr: done / total, rate, ETA, errors and 429s.

On a terminal it redraws one line a few times a second; in a log (cron, CI) it writes a plain
line every ten seconds, so scheduled jobs leave a readable trail instead of carriage returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable, Mapping
from typing import Protocol, TextIO

TTY_INTERVAL = 0.25
LOG_INTERVAL = 10.0


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class ProgressSource(Protocol):
    """The counters a progress line reads (an engine's view of its run)."""

    @property
    def done(self) -> int: ...  # rows written
    @property
    def errors(self) -> int: ...
    @property
    def throttled(self) -> int: ...  # 429s
    @property
    def seen(self) -> int: ...  # files walked
    @property
    def skipped(self) -> int: ...  # files already done
    @property
    def walked(self) -> bool: ...  # the walk is over: the total is known
    @property
    def waiting(self) -> float: ...  # seconds left of a wait for the minute's quota (0: none)


class Walk(Protocol):
    """What a producer tells about its walk."""

    @property
    def seen(self) -> int: ...
    @property
    def skipped(self) -> int: ...
    @property
    def done(self) -> bool: ...


class EngineView:
    """A ProgressSource from an engine's parts: the producer's walk, the rows written by kind
    and the count of 429s (callables, since engines replace their counters as reports arrive).
    """

    def __init__(
        self,
        walk: Walk,
        rows: Callable[[], Mapping[str, int]],
        throttled: Callable[[], int],
        waiting: Callable[[], float] = float,  # float() is 0.0: an engine that never waits
    ) -> None:
        self._walk, self._rows, self._throttled = walk, rows, throttled
        self._waiting = waiting

    @property
    def done(self) -> int:
        return sum(self._rows().values())

    @property
    def errors(self) -> int:
        return self._rows().get("error", 0)

    @property
    def throttled(self) -> int:
        return self._throttled()

    @property
    def seen(self) -> int:
        return self._walk.seen

    @property
    def skipped(self) -> int:
        return self._walk.skipped

    @property
    def walked(self) -> bool:
        return self._walk.done

    @property
    def waiting(self) -> float:
        return self._waiting()


def _waiting(seconds: float) -> str:
    """A wait of a second or more is said: a stalled-looking line is then no mystery."""
    return f" waiting {seconds:.0f} s for the minute's quota" if seconds >= 1 else ""


class Progress:
    """Reads an engine's counters; owns nothing but the output line."""

    def __init__(
        self, source: ProgressSource, *, enabled: bool = True, stream: TextIO | None = None
    ) -> None:
        self.source = source
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream is not None  # None: started with fd 2 closed
        self.tty = self.enabled and _isatty(self.stream)
        self.started = time.monotonic()

    def line(self) -> str:
        s = self.source
        done = s.done
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = done / elapsed
        todo = s.seen - s.skipped
        total = f"{todo}" if s.walked else f"{todo}+"
        eta = ""
        if s.walked and rate > 0 and todo > done:
            eta = f" eta {_duration((todo - done) / rate)}"
        skipped = f" skipped {s.skipped}" if s.skipped else ""
        return (
            f"{done}/{total} {rate:.1f}/s{eta} errors {s.errors} 429s {s.throttled}"
            f"{skipped} [{_duration(elapsed)}]{_waiting(s.waiting)}"
        )

    async def run(self) -> None:
        if not self.enabled:
            return
        interval = TTY_INTERVAL if self.tty else LOG_INTERVAL
        while True:
            await asyncio.sleep(interval)
            self._write()

    def _write(self) -> None:
        text = self.line()
        try:
            self.stream.write("\r\x1b[2K" + text if self.tty else text + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            self.enabled = False  # a closed stderr must not turn a finished run into a failure

    def finish(self) -> None:
        if self.enabled:
            self._write()
            if self.tty and self.enabled:
                with contextlib.suppress(OSError, ValueError):
                    self.stream.write("\n")
                    self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError):
        return False
