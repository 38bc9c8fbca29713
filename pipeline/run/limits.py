"""Staying inside the account's quotas: requests/minute, input tokens/minute, requests/day.

The service counts RPM and TPM in fixed calendar-minute windows, so a client that spends a whole
minute's quota in a burst can land twice the limit in one window. The limiter therefore paces:
at most about `burst_seconds` of capacity at once, then a steady flow, and both minute limits are
checked and taken together in one place. Workers queue FIFO on a lock and only the head of the
queue waits on the clock, so hundreds of workers cost no polling.

On a 429 the whole pool slows down (multiplicative decrease of the rate, and a pause for the
server's retryDelay) and climbs back linearly while requests succeed (AIMD).

That policy is written once (`Pacing`) and spent two ways: `RateLimiter` makes the workers of one
process wait their turn; `SlotLedger` hands reservations to a fleet of processes that share one
quota (the Ray engine's quota actor, pipeline/engines/ray/quota.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from asyncio_throttle import Throttler

HEADROOM = 0.985  # aim just under the limit: pacing jitter must not cross a fixed window's edge
DECREASE = 0.7  # multiplicative decrease on a 429
RECOVERY_PER_SECOND = 0.02  # additive increase: from half speed back to full in ~25 s
MIN_FACTOR = 0.05


@dataclass
class LimiterStats:
    throttled: int = 0  # 429s reported
    waited_seconds: float = 0.0  # time the head of the queue spent waiting for capacity
    # time.monotonic() at which the head's current wait ends (0: not waiting). Real time, not
    # the limiter's clock: the wait is a real sleep, and the progress line counts it down.
    wait_ends: float = 0.0

    def waiting(self) -> float:
        """Seconds left of the current wait for the minute's quota (0 when none)."""
        return max(0.0, self.wait_ends - time.monotonic()) if self.wait_ends else 0.0


class Limiter(Protocol):
    """What a Caller needs of a rate limiter (`RateLimiter`; a fleet's `quota.LeasedLimiter`)."""

    stats: LimiterStats

    async def acquire(self, cost: float) -> None: ...
    def correct(self, estimated: float, billed: float) -> None: ...
    def throttled(self, retry_delay: float | None) -> None: ...


class DayCounter(Protocol):
    """What a Caller needs of a daily count (`DailyCount`; a fleet's `quota.LeasedDaily`)."""

    limit: int | None

    def reserve(self) -> bool: ...
    def settle(self, answered: bool) -> None: ...
    def save(self) -> None: ...


class TokenBucket:
    """Input tokens per minute, refilled continuously; may go negative when billing corrects it."""

    def __init__(self, per_minute: int, burst_seconds: float, now: float) -> None:
        self.per_minute = per_minute
        self.burst_seconds = burst_seconds
        self.factor = 1.0
        self.level = self.capacity
        self.stamp = now

    @property
    def rate(self) -> float:
        return self.per_minute * HEADROOM * self.factor / 60.0

    @property
    def capacity(self) -> float:
        return self.per_minute * HEADROOM / 60.0 * self.burst_seconds

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_time(self, cost: float, now: float) -> float:
        """Seconds until `cost` fits; a request larger than the burst may go when it is full."""
        self.refill(now)
        need = min(cost, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, cost: float) -> None:
        self.level -= cost


class Pacing:
    """The pacing policy every limiter shares: rates aimed HEADROOM under the limits, capacity of
    about `burst_seconds` at once, a pause for the server's retryDelay, and AIMD on 429s (with a
    limit discovered from the rate that was too much when none is configured).

    `RateLimiter` spends it in one process (workers wait in turn); `SlotLedger` hands it out as
    reservations to a fleet of processes (pipeline/engines/ray/quota.py).
    """

    def __init__(
        self,
        rpm: int | None,
        tpm: int | None,
        *,
        burst_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rpm = rpm
        self.clock = clock
        self.burst_seconds = burst_seconds
        self.stats = LimiterStats()
        self.factor = 1.0  # AIMD multiplier on the configured (or discovered) rates
        self._pause_until = 0.0
        self._last_decrease = -1e9
        self._last_update = clock()
        self._recent: deque[float] = deque()  # dispatch times over the last 10 s
        self._tokens = TokenBucket(tpm, burst_seconds, clock()) if tpm else None

    @property
    def effective_rpm(self) -> float | None:
        return self.rpm * HEADROOM * self.factor if self.rpm else None

    def correct(self, estimated: float, billed: float) -> None:
        """Charge the difference between what a request was weighed at and what was billed."""
        if self._tokens and billed > 0:
            self._tokens.take(billed - estimated)

    def throttled(self, retry_delay: float | None) -> None:
        """A 429: pause for the server's delay and cut the rate (once per burst window)."""
        now = self.clock()
        self.stats.throttled += 1
        if retry_delay:
            self._pause_until = max(self._pause_until, now + retry_delay)
        if now - self._last_decrease < max(self.burst_seconds, 1.0):
            return
        self._last_decrease = now
        if not self.rpm:
            # No configured limit: adopt the rate that was just too much as a discovered one.
            span = max(now - self._recent[0], self.burst_seconds) if self._recent else 60.0
            self.rpm = max(1, int(len(self._recent) / span * 60.0))
            self.factor = 1.0
        self.factor = max(MIN_FACTOR, self.factor * DECREASE)
        self._apply_factor()

    def _recover(self, now: float) -> None:
        elapsed, self._last_update = now - self._last_update, now
        if self.factor < 1.0 and now - self._last_decrease > max(self.burst_seconds, 1.0):
            self.factor = min(1.0, self.factor + RECOVERY_PER_SECOND * elapsed)
            self._apply_factor()

    def _apply_factor(self) -> None:
        if self._tokens:
            self._tokens.factor = self.factor

    def _dispatched(self, at: float) -> None:
        self._recent.append(at)
        while self._recent and at - self._recent[0] > 10.0:
            self._recent.popleft()


class RateLimiter(Pacing):
    """RPM (through asyncio-throttle) and TPM (a token bucket), taken together, with AIMD."""

    def __init__(
        self,
        rpm: int | None,
        tpm: int | None,
        *,
        burst_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(rpm, tpm, burst_seconds=burst_seconds, clock=clock)
        self._lock = asyncio.Lock()
        self._throttler: Throttler | None = None
        if rpm:
            self._set_rpm(rpm)

    def _set_rpm(self, rpm: float) -> None:
        """Let through `burst` requests per window of `period` s: burst / period = rpm / 60."""
        target = max(rpm * HEADROOM * self.factor, 0.1)
        burst = max(1, round(target / 60.0 * self.burst_seconds))
        period = burst * 60.0 / target
        if self._throttler is None:
            self._throttler = Throttler(rate_limit=burst, period=period, retry_interval=0.005)
        else:
            self._throttler.rate_limit, self._throttler.period = burst, period

    async def acquire(self, cost: float) -> None:
        """Wait for one request's slot and `cost` input tokens, then take both at once."""
        async with self._lock:
            started = self.clock()
            while True:
                now = self.clock()
                if self._pause_until > now:
                    await self._wait(self._pause_until - now)
                    continue
                self._recover(now)
                wait = self._tokens.wait_time(cost, now) if self._tokens else 0.0
                if wait > 0:
                    await self._wait(wait)
                    continue
                if self._throttler is not None:
                    await self._throttler.acquire()
                if self._tokens:
                    self._tokens.refill(self.clock())
                    self._tokens.take(cost)
                break
            now = self.clock()
            self.stats.waited_seconds += now - started
            self._dispatched(now)

    async def _wait(self, seconds: float) -> None:
        """Sleep for capacity, marked in the stats meanwhile (the progress line says so)."""
        self.stats.wait_ends = time.monotonic() + seconds
        try:
            await asyncio.sleep(seconds)
        finally:
            self.stats.wait_ends = 0.0

    def _apply_factor(self) -> None:
        super()._apply_factor()
        if self.rpm:
            self._set_rpm(self.rpm)


class SlotLedger(Pacing):
    """The same pacing handed out as reservations (GCRA): callers in other processes take up to
    a burst's worth of request slots at once and are told when each may be used. It never waits,
    so one ledger serves a fleet with one short call per group of requests.

    GCRA (the generic cell rate algorithm) keeps one "theoretical arrival time": a slot may be used
    at max(asked, TAT - tolerance), after which TAT moves on by one interval at the paced rate. A
    tolerance of one burst less one interval allows about `burst_seconds` of capacity at once after
    a quiet spell and a steady flow otherwise, as `RateLimiter` does. Tokens are weighed per
    group: the group waits until the bucket holds it, and takes it.
    """

    MAX_GROUP = 64  # slots per reservation when nothing limits the size of a group

    def __init__(
        self,
        rpm: int | None,
        tpm: int | None,
        *,
        burst_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(rpm, tpm, burst_seconds=burst_seconds, clock=clock)
        self._tat = clock()  # GCRA: when the next slot is due at the paced rate

    def reserve(self, want: int, tokens_each: float) -> list[float]:
        """Up to `want` slots of `tokens_each` input tokens each (at least one): the delay, in
        seconds from now, after which each may be used."""
        now = self.clock()
        self._recover(now)
        count = self._group(want, tokens_each)
        start = max(now, self._pause_until)
        if self._tokens:
            start = max(start, now + self._tokens.wait_time(count * tokens_each, now))
            self._tokens.take(count * tokens_each)
        times = self._schedule(count, start)
        for at in times:
            self._dispatched(at)
        return [at - now for at in times]

    def _group(self, want: int, tokens_each: float) -> int:
        """At most a burst's worth of the fleet's requests and tokens in one reservation."""
        count = min(max(1, want), self.MAX_GROUP)
        if self.rpm:
            count = min(count, max(1, int(self._rate() * self.burst_seconds)))
        if self._tokens and tokens_each > 0:
            count = min(count, max(1, int(self._tokens.capacity // tokens_each)))
        return count

    def _rate(self) -> float:
        """Requests per second at the paced rate (0: no request limit)."""
        return (self.effective_rpm or 0.0) / 60.0

    def _schedule(self, count: int, start: float) -> list[float]:
        rate = self._rate()
        if not rate:
            return [start] * count
        interval = 1.0 / rate
        tolerance = max(0.0, self.burst_seconds - interval)
        times = []
        for _ in range(count):
            at = max(start, self._tat - tolerance)
            self._tat = max(self._tat, at) + interval
            times.append(at)
        return times


PACIFIC_FALLBACK = timezone(timedelta(hours=-8), "PST")


def _pacific() -> timezone | ZoneInfo:
    try:
        return ZoneInfo("America/Los_Angeles")
    except ZoneInfoNotFoundError:  # no tz database: standard time is close enough for a reset hint
        return PACIFIC_FALLBACK


def quota_day(now: datetime | None = None) -> date:
    """The service's day: requests/day reset at midnight Pacific time."""
    return (now or datetime.now(UTC)).astimezone(_pacific()).date()


def next_quota_reset(now: datetime | None = None) -> datetime:
    """When the daily quota resets (midnight Pacific), in UTC."""
    tz = _pacific()
    local = (now or datetime.now(UTC)).astimezone(tz)
    midnight = datetime.combine(local.date() + timedelta(days=1), datetime.min.time(), tz)
    return midnight.astimezone(UTC)


class DailyCount:
    """Requests per day against `[limits] rpd`, carried over between runs of the same quota day.

    A request is reserved before it is sent (so concurrent calls cannot overshoot the limit)
    and counted only if the service answered it: a call refused before it was processed (a
    wrong key, a 429, a dropped connection) does not use up the day. The count is saved every
    `SAVE_EVERY` requests and at the end, so a kill -9 under-counts at most that many.
    """

    SAVE_EVERY = 100

    def __init__(self, limit: int | None, saved: int, save: Callable[[int], None]) -> None:
        self.limit = limit
        self.day = quota_day()
        self.count = saved  # answered requests today (this run and earlier ones)
        self._reserved = 0
        self._unsaved = 0
        self._save = save  # save(n): add n to today's stored count

    def reserve(self) -> bool:
        """Take a slot for one request; False when the day's limit is reached."""
        if self.limit and self.count + self._reserved >= self.limit:
            return False
        self._reserved += 1
        return True

    def settle(self, answered: bool) -> None:
        """The reserved request ended: counted if the service answered it."""
        self._reserved -= 1
        if answered:
            self.count += 1
            self._unsaved += 1
            if self._unsaved >= self.SAVE_EVERY:
                self.save()

    def save(self) -> None:
        if self._unsaved:
            self._save(self._unsaved)
            self._unsaved = 0
