"""How a run stops: one object, three states, a reason.

    running ──drain(reason)──► draining ──abandon()──► abandoning

- running: work flows.
- draining (the first Ctrl-C, SIGTERM or SIGHUP; the daily quota; the run's own failure such as a
  wrong key): nothing new starts — no new file, no new attempt, every wait (backoff, rate
  limiter, retryDelay) ends at once — while the calls already sent finish and are committed.
- abandoning (a second signal): the calls in flight are cancelled; they were sent, so the
  service may bill them, and a rerun buys their images again (the summary counts them:
  `abandoned`, with their estimated cost).

The first reason wins (a quota stop is not renamed "interrupted" by a later Ctrl-C). Workers ask
`stop.running`; waits go through `stop.sleep` / `stop.until`, calls through `stop.call`.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Literal, TypeVar

from pipeline import exits

T = TypeVar("T")
Phase = Literal["running", "draining", "abandoning"]
# What stops a run from outside: Ctrl-C, a service manager's stop, a closed terminal.
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(Exception):
    """Raised out of a wait or a call that the stop cut short; the item writes no row."""


class Stop:
    """The run's stop state. Create inside the running event loop."""

    def __init__(self) -> None:
        self.state: Phase = "running"
        self.reason: str | None = None
        self.hint: str | None = None  # how to resume, for the summary
        self.exit_code = exits.STOPPED
        self._changed = asyncio.Event()
        self._calls: set[asyncio.Task[object]] = set()
        # The tasks waiting in `until` (how many waits each: they may nest), and those a drain
        # cancelled, whose CancelledError `until` turns into Stopped.
        self._waiting: dict[asyncio.Task[Any], int] = {}
        self._cut: set[asyncio.Task[Any]] = set()

    @property
    def running(self) -> bool:
        return self.state == "running"

    def drain(self, reason: str, hint: str | None = None, exit_code: int = exits.STOPPED) -> None:
        """Start nothing new; let the calls in flight finish."""
        if self.reason is None:
            self.reason, self.hint, self.exit_code = reason, hint, exit_code
        if self.state == "running":
            self.state = "draining"
            self._changed.set()
            here = _running_task()
            for task in self._waiting:
                if task is not here:  # a wait that drains the run ends as it would have
                    self._cut.add(task)
                    task.cancel()

    def lost_output(self, reason: str, hint: str) -> None:
        """The output's lease was lost (the run was paused past it, and another run may have
        taken it): that explains whatever else failed meanwhile (calls whose deadlines passed
        while the process was stopped look like an outage), so it replaces an earlier reason."""
        self.reason, self.hint, self.exit_code = reason, hint, exits.STOPPED
        self.drain(reason, hint)

    def abandon(self) -> None:
        """Cancel the calls in flight too (a second signal)."""
        self.drain("interrupted")
        self.state = "abandoning"
        for task in list(self._calls):
            task.cancel()

    def signal(self) -> None:
        """A Ctrl-C, SIGTERM or SIGHUP: the first drains, the next abandons."""
        if self.running:
            self.drain("interrupted")
        else:
            self.abandon()

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds`, or raise Stopped as soon as the run stops."""
        await self.until(asyncio.sleep(seconds))

    async def until(self, waiting: Awaitable[T]) -> T:
        """Await `waiting` (a wait, not a call: it is cancelled when the run stops).

        The waiting task itself is what a drain cancels (`drain`), so a wait costs no task of
        its own: each image waits here twice (its request made, the limiter's admission), and a
        task for the wait plus one for the stop event, joined by `asyncio.wait`, cost ~0.1 ms
        of CPU an image (issue 22)."""
        if not self.running:
            _close(waiting)
            raise Stopped
        task = asyncio.current_task()
        assert task is not None, "Stop.until runs in a task"
        self._waiting[task] = self._waiting.get(task, 0) + 1
        try:
            value = await waiting
            # A wait stays a point where the other tasks run, as it was when it was a task of
            # its own: answers that came back meanwhile are read before this task sends (the
            # health check counts them; without it a 429 storm read as 8 refusals in a row).
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            if task not in self._cut:
                raise
            self._uncut(task)
            raise Stopped from None
        finally:
            left = self._waiting.pop(task) - 1
            if left:
                self._waiting[task] = left
        if task in self._cut:  # the wait swallowed the drain's cancellation: still stopped
            self._uncut(task)
            raise Stopped
        return value

    def _uncut(self, task: asyncio.Task[Any]) -> None:
        """Take back the drain's cancellation of `task` (it ends in Stopped instead)."""
        self._cut.discard(task)
        task.uncancel()

    async def call(self, calling: Awaitable[T]) -> T:
        """Await an API call: it survives draining and is cancelled only when abandoning."""
        if self.state == "abandoning":
            _close(calling)
            raise Stopped
        task = asyncio.ensure_future(calling)
        self._calls.add(task)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled() and self.state == "abandoning":
                raise Stopped from None
            task.cancel()
            raise
        finally:
            self._calls.discard(task)


def _running_task() -> asyncio.Task[Any] | None:
    """The task running now, if any (a signal's callback runs on the loop outside any task)."""
    try:
        return asyncio.current_task()
    except RuntimeError:  # no event loop in this thread
        return None


def _close(awaitable: Awaitable[object]) -> None:
    close = getattr(awaitable, "close", None)  # a coroutine never awaited: no warning
    if close is not None:
        close()


@contextlib.contextmanager
def on_signals(loop: asyncio.AbstractEventLoop, handle: Callable[[], None]) -> Iterator[None]:
    """`handle` runs on the loop at each of SIGNALS while the block runs.

    Python delivers signals to the main thread only, so a loop in another thread (a run that
    `pipeline.run()` started from a notebook's running loop) takes none: its handle is
    registered for `interrupt(loop)` instead, which the thread that started the run calls when
    a Ctrl-C reaches it. On the main thread the handlers the process had before (a notebook
    kernel's, a framework's) are put back at the end: asyncio's own removal would leave the
    defaults in their place."""
    if threading.current_thread() is not threading.main_thread():
        with _forwarded(loop, handle):
            yield
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    installed = []
    for sig in SIGNALS:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not on Windows
            loop.add_signal_handler(sig, handle)
            installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
            _restore(sig, previous[sig])


def _restore(sig: signal.Signals, handler: Any) -> None:
    """A handler installed from Python is put back; None (one set outside Python) cannot be."""
    if handler is not None:
        signal.signal(sig, handler)


# The handles of the loops running off the main thread, while their run takes signals.
_OFF_MAIN: dict[asyncio.AbstractEventLoop, Callable[[], None]] = {}


@contextlib.contextmanager
def _forwarded(loop: asyncio.AbstractEventLoop, handle: Callable[[], None]) -> Iterator[None]:
    _OFF_MAIN[loop] = handle
    try:
        yield
    finally:
        _OFF_MAIN.pop(loop, None)


def interrupt(loop: asyncio.AbstractEventLoop) -> bool:
    """A signal for the run on `loop` (in another thread), as a Ctrl-C is for a run on the main
    thread: the first drains it, the next abandons its calls. False when the run takes no
    signal now (it has not started its work, or has ended): the caller then cancels it."""
    handle = _OFF_MAIN.get(loop)
    if handle is None:
        return False
    try:
        loop.call_soon_threadsafe(handle)
    except RuntimeError:  # the loop closed meanwhile: the run is over
        return False
    return True
