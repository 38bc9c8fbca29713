"""One quota for a fleet: the project's RPM, TPM and RPD held in one place, leased in groups.

    worker ─ LeasedLimiter.acquire ─► lease(want, tokens) ─► FleetQuota (one Ray actor per
                                      ◄─ slot delays ──────       quota shared: `quota_of`)

Every worker of a Ray run (and of every run of the same project and model on the cluster) draws
its requests from one `FleetQuota`: the pacing of `limits.Pacing` (headroom, ~1 s bursts, AIMD,
retryDelay pauses) spent as GCRA reservations by `limits.SlotLedger`. A worker asks for as many
slots as it has requests waiting (at most a burst's worth of the fleet's rate) and is told when
each may go; the actor never waits, so one short call covers a group of requests (the issue's
prototype: 626 calls for 10k requests, where one blocking call per request cost more than the
request itself on a loaded 2-core box). Each slot is weighed at the estimated tokens of the
request that asked; the difference to what the request really weighed, and to what was billed,
rides along with the next call. A 429 seen by any worker pauses and slows the whole fleet once
(the ledger cuts its rate once per burst window, however many workers report the same storm).

The daily count: each slot carries a reservation of the day's requests, given back when its call
was not answered, so concurrent workers cannot overshoot `rpd`. What was answered is persisted
by the driver into the output's `.state.sqlite` (it hears it from the workers' block reports) and
seeds the actor when a run starts; an actor that was restarted (it lost its count) lends nothing
until a driver seeds it again, so workers wait rather than run free. Workers that cannot reach
the actor pause likewise, and retry.

`LeasedLimiter` and `LeasedDaily` are what a worker's `calls.Caller` gets instead of
`RateLimiter` and `DailyCount`: the same interface (`limits.Limiter`, `limits.DayCounter`), so
calls.py knows nothing of leases or Ray. This module imports Ray only in `quota_actor` and
`ActorLink`, so its logic is tested without a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline.gemini.backends import Backend, Vertex
from pipeline.run.limits import LimiterStats, SlotLedger, quota_day

log = logging.getLogger(__name__)

NAMESPACE = "gemini-vision-pipeline"  # the Ray namespace of the named quota actors
UNSEEDED_WAIT = 1.0  # seconds a worker waits when the ledger has no daily count yet
LOST_PAUSE = 1.0  # seconds a worker pauses when the quota actor cannot be reached


@dataclass(frozen=True, slots=True)
class Limits:
    """The project's limits as a run configures them ([limits] rpm, tpm, rpd, burst_seconds)."""

    rpm: int | None
    tpm: int | None
    rpd: int | None
    burst_seconds: float = 1.0

    @classmethod
    def of(cls, limits: Any) -> Limits:
        """From a config's [limits] section (`config.LimitsConfig`)."""
        return cls(limits.rpm, limits.tpm, limits.rpd, limits.burst_seconds)


@dataclass(frozen=True, slots=True)
class Report:
    """What a worker tells the quota with each call: token corrections since the last report,
    and daily reservations it gives back (unanswered), made under ledger `epoch`."""

    corrections: float = 0.0
    released: int = 0
    epoch: str = ""


@dataclass(frozen=True, slots=True)
class Grant:
    """A lease: slots usable after `delays` seconds (from the reply), each weighed at
    `tokens_each`; `daily`: each slot holds a reservation of the day's requests."""

    delays: tuple[float, ...]
    tokens_each: float
    daily: bool
    epoch: str
    exhausted: bool = False  # the daily limit is reached: no slot, the run must stop
    wait: float = 0.0  # no slot yet (the daily count is not seeded): ask again after this


class QuotaUnavailable(Exception):
    """The quota actor cannot be reached now (restarting, lost): pause, then ask again."""


def quota_name(api_key: str, model: str) -> str:
    """The actor's name: a hash of the key (the project; the key itself never leaves the
    process in a name) and the model, whose quotas the service counts separately."""
    digest = hashlib.sha256(b"gemini-vision-pipeline quota\0" + api_key.encode()).hexdigest()
    return f"quota-{digest[:16]}-{model}"


def vertex_quota_name(project: str, location: str, model: str) -> str:
    """The actor's name on Vertex AI: its dynamic shared quota is counted per project, location
    and model (no key is in it; a project id is no secret)."""
    return f"quota-vertex-{project}-{location}-{model}"


def quota_of(backend: Backend, key: str, model: str) -> str:
    """The name of the quota a fleet shares: what the service counts together. Vertex with a
    project (Application Default Credentials) shares the project's, in its location; the
    Developer API and Vertex express mode (no project, the key alone) share the key's."""
    if isinstance(backend, Vertex) and backend.project is not None:
        return vertex_quota_name(backend.project, backend.location, model)
    return quota_name(key, model)


class FleetQuota:
    """The quota actor's state and rules (made a Ray actor by `quota_actor`)."""

    def __init__(
        self,
        limits: Limits,
        *,
        clock: Callable[[], float] = time.monotonic,
        day: Callable[[], Any] = quota_day,
    ) -> None:
        self.limits = limits
        self.clock = clock
        self.ledger = _ledger(limits, clock)
        self.incarnation = secrets.token_hex(4)  # a restarted actor is another one
        self._day = day
        self.today = str(day())
        self.used = 0  # today's requests answered or reserved (by every worker of the project)
        self.seeded = False  # a driver said how many were answered today before this actor

    @property
    def epoch(self) -> str:
        """Reservations given back are counted only by the ledger (and day) that made them."""
        return f"{self.incarnation}-{self.today}"

    def configure(self, limits: Limits) -> None:
        """The newest run's [limits] apply to the project (a quota raised between runs)."""
        if limits != self.limits:
            self.limits, self.ledger = limits, _ledger(limits, self.clock)

    def seed(self, day: str, answered: int) -> None:
        """A driver's count of requests answered today for its output, before this run."""
        self._roll_day()
        if day == self.today:
            self.used = max(self.used, answered)
            self.seeded = True

    def lease(self, want: int, tokens_each: float, report: Report) -> Grant:
        self._apply(report)
        rpd = self.limits.rpd
        if rpd and not self.seeded:
            return Grant((), tokens_each, True, self.epoch, wait=UNSEEDED_WAIT)
        room = want if not rpd else min(want, rpd - self.used)
        if room <= 0:
            return Grant((), tokens_each, True, self.epoch, exhausted=True)
        delays = self.ledger.reserve(room, tokens_each)
        if rpd:
            self.used += len(delays)
        return Grant(tuple(delays), tokens_each, bool(rpd), self.epoch)

    def throttled(self, retry_delay: float | None, report: Report) -> None:
        self._apply(report)
        self.ledger.throttled(retry_delay)

    def report(self, report: Report) -> None:
        self._apply(report)

    def status(self) -> dict[str, Any]:
        return {
            "incarnation": self.incarnation,
            "day": self.today,
            "used": self.used,
            "seeded": self.seeded,
            "effective_rpm": self.ledger.effective_rpm,
            "throttled": self.ledger.stats.throttled,
        }

    def _apply(self, report: Report) -> None:
        self._roll_day()
        if report.corrections:
            self.ledger.correct(0.0, report.corrections)
        if report.released and report.epoch == self.epoch:
            self.used = max(0, self.used - report.released)

    def _roll_day(self) -> None:
        today = str(self._day())
        if today != self.today:  # the service's day reset at midnight Pacific: nothing used
            self.today, self.used, self.seeded = today, 0, True


def _ledger(limits: Limits, clock: Callable[[], float]) -> SlotLedger:
    return SlotLedger(limits.rpm, limits.tpm, burst_seconds=limits.burst_seconds, clock=clock)


# ------------------------------------------------------------------------------ worker side
class QuotaLink(Protocol):
    """How a worker reaches its quota (`ActorLink` over Ray; a FleetQuota itself in tests)."""

    async def lease(self, want: int, tokens_each: float, report: Report) -> Grant: ...
    def throttled(self, retry_delay: float | None, report: Report) -> None: ...
    def report(self, report: Report) -> None: ...


@dataclass(frozen=True, slots=True)
class _Slot:
    at: float  # monotonic time after which it may be used
    tokens: float
    daily: bool


class LeasedLimiter:
    """A worker's limiter (`limits.Limiter`): requests wait in turn, as in `RateLimiter`, for
    slots leased from the fleet's quota. Only the head of the queue asks, for as many slots as
    requests are waiting; a slot left unused a burst after its time is given back (its capacity
    is past), and so is every held slot on a 429 (the fleet pauses)."""

    def __init__(
        self,
        link: QuotaLink,
        *,
        burst_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.link = link
        self.clock = clock
        self.grace = max(1.0, burst_seconds)
        self.stats = LimiterStats()
        self.exhausted = False  # the fleet's daily limit is reached
        self.daily_ready = 0  # reservations of slots taken, not yet claimed by LeasedDaily
        self.leases = 0  # calls to the quota
        self.paused_seconds = 0.0  # time the quota could not be reached
        self._slots: deque[_Slot] = deque()
        self._waiting = 0
        self._lock = asyncio.Lock()
        self._leasing: asyncio.Task[None] | None = None
        self._corrections = 0.0
        self._released = 0
        self._epoch = ""

    async def acquire(self, cost: float) -> None:
        """Wait for a leased slot (or return at once when the day's quota is spent: the daily
        count then refuses the request)."""
        self._waiting += 1
        try:
            async with self._lock:
                started = self.clock()
                await self._take(cost)
                self.stats.waited_seconds += self.clock() - started
        finally:
            self._waiting -= 1

    def correct(self, estimated: float, billed: float) -> None:
        if billed > 0:
            self._corrections += billed - estimated

    def throttled(self, retry_delay: float | None) -> None:
        """A 429: held slots would meet the same wall; give them back and tell the fleet."""
        self.stats.throttled += 1
        while self._slots:
            self._give_back(self._slots.popleft())
        with contextlib.suppress(QuotaUnavailable):
            self.link.throttled(retry_delay, self._report())

    def release_daily(self) -> None:
        self._released += 1

    def flush(self) -> None:
        """Give back every held slot and send what the quota has not heard yet."""
        while self._slots:
            self._give_back(self._slots.popleft())
        if self._corrections or self._released:
            with contextlib.suppress(QuotaUnavailable):
                self.link.report(self._report())

    async def _take(self, cost: float) -> None:
        while True:
            now = self.clock()
            while self._slots and self._slots[0].at + self.grace < now:
                self._give_back(self._slots.popleft())
            if self._slots:
                await self._use(self._slots.popleft(), cost, now)
                return
            if self.exhausted:
                return
            await asyncio.shield(self._lease_for(cost))

    async def _use(self, slot: _Slot, cost: float, now: float) -> None:
        self._corrections += cost - slot.tokens
        if self._waiting > len(self._slots) + 1:
            self._lease_for(cost)  # ask ahead for those queued behind this one
        try:
            if slot.at > now:
                await asyncio.sleep(slot.at - now)
        except asyncio.CancelledError:
            self._give_back(slot)
            raise
        self.daily_ready += slot.daily

    def _lease_for(self, cost: float) -> asyncio.Task[None]:
        """The lease in flight, or a new one for the requests waiting beyond the held slots."""
        if self._leasing is None or self._leasing.done():
            want = max(1, self._waiting - len(self._slots))
            self._leasing = asyncio.ensure_future(self._lease(want, cost))
        return self._leasing

    async def _lease(self, want: int, cost: float) -> None:
        report = self._report()
        try:
            self.leases += 1
            grant = await self.link.lease(want, cost, report)
        except QuotaUnavailable:
            self._corrections += report.corrections  # told with the next call instead
            self._released += report.released
            await self._pause()
            return
        received = self.clock()
        self._epoch = grant.epoch
        self.exhausted = grant.exhausted
        for delay in grant.delays:
            self._slots.append(_Slot(received + delay, grant.tokens_each, grant.daily))
        if grant.wait:
            await asyncio.sleep(grant.wait)

    async def _pause(self) -> None:
        if not self.paused_seconds:
            log.warning("the quota actor cannot be reached: pausing until it is back")
        started = self.clock()
        await asyncio.sleep(LOST_PAUSE)
        self.paused_seconds += self.clock() - started

    def _give_back(self, slot: _Slot) -> None:
        self._released += slot.daily

    def _report(self) -> Report:
        report = Report(self._corrections, self._released, self._epoch)
        self._corrections, self._released = 0.0, 0
        return report


class LeasedDaily:
    """A worker's daily count (`limits.DayCounter`): each request spends the reservation its
    leased slot carried; an unanswered one is given back. `count`: answered by this worker."""

    def __init__(self, limiter: LeasedLimiter, limit: int | None) -> None:
        self.limiter = limiter
        self.limit = limit
        self.count = 0

    def reserve(self) -> bool:
        if not self.limit:
            return True
        if self.limiter.daily_ready <= 0:
            return False  # acquire came back without a slot: the fleet's day is spent
        self.limiter.daily_ready -= 1
        return True

    def settle(self, answered: bool) -> None:
        if answered:
            self.count += 1
        elif self.limit:
            self.limiter.release_daily()

    def save(self) -> None:
        """The driver persists the count (from block reports); the quota hears the rest now."""
        self.limiter.flush()


# ------------------------------------------------------------------------------------ Ray
def quota_actor(name: str, limits: Limits) -> Any:
    """The project's named quota actor, made if it does not exist: detached (runs of the same
    project share it and it outlives each), restarted when lost, and reserving no CPU (an I/O
    actor holding a CPU can deadlock a small local cluster)."""
    import ray

    actor_class = ray.remote(FleetQuota)
    return actor_class.options(
        name=name,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_restarts=-1,
        max_task_retries=-1,
    ).remote(limits)


class ActorLink:
    """`QuotaLink` over Ray: calls to the named actor; a failed call raises QuotaUnavailable
    (the limiter pauses) and the next one looks the actor up again, making it if it is gone."""

    def __init__(self, name: str, limits: Limits, *, timeout: float = 30.0) -> None:
        self.name = name
        self.limits = limits
        self.timeout = timeout
        self._handle: Any = None

    async def lease(self, want: int, tokens_each: float, report: Report) -> Grant:
        try:
            call = self._actor().lease.remote(want, tokens_each, report)
            return await asyncio.wait_for(call, self.timeout)
        except Exception as exc:  # RayActorError, ActorUnavailableError, a timeout: all mean lost
            self._handle = None
            raise QuotaUnavailable(str(exc)) from None

    def throttled(self, retry_delay: float | None, report: Report) -> None:
        self._send("throttled", retry_delay, report)

    def report(self, report: Report) -> None:
        self._send("report", report)

    def _send(self, method: str, *args: Any) -> None:
        try:
            getattr(self._actor(), method).remote(*args)  # fire and forget: the order holds
        except Exception as exc:
            self._handle = None
            raise QuotaUnavailable(str(exc)) from None

    def _actor(self) -> Any:
        if self._handle is None:
            self._handle = quota_actor(self.name, self.limits)
        return self._handle
