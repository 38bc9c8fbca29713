"""A progress line on stderr: done / total, rate, ETA, errors and 429s.

On a terminal it redraws one line a few times a second; in a log (cron, CI) it writes a plain
line every ten seconds, so scheduled jobs leave a readable trail instead of carriage returns.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any, TextIO

TTY_INTERVAL = 0.25
LOG_INTERVAL = 10.0


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Reads the runner's counters; owns nothing but the output line."""

    def __init__(self, runner: Any, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.runner = runner
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.monotonic()

    def line(self) -> str:
        s, producer = self.runner.summary, self.runner.producer
        done = sum(s.rows.values())
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = done / elapsed
        todo = producer.seen - producer.skipped
        total = f"{todo}" if producer.done else f"{todo}+"
        eta = ""
        if producer.done and rate > 0 and todo > done:
            eta = f" eta {_duration((todo - done) / rate)}"
        errors = s.rows.get("error", 0)
        skipped = f" skipped {producer.skipped}" if producer.skipped else ""
        return (
            f"{done}/{total} {rate:.1f}/s{eta} errors {errors} 429s {s.throttled}"
            f"{skipped} [{_duration(elapsed)}]"
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
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self._write()
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()
