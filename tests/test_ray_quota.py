"""One quota for a fleet, without a cluster: the ledger's reservations on a virtual clock, and
workers' limiters leasing from a real FleetQuota in this process (the link is the only stand-in:
it calls the quota directly where Ray would carry the call)."""

from __future__ import annotations

import asyncio
import selectors
import time
from collections import Counter
from typing import Any

import pytest

from pipeline.engines.ray.quota import (
    FleetQuota,
    Grant,
    LeasedDaily,
    LeasedLimiter,
    Limits,
    QuotaUnavailable,
    Report,
    quota_name,
    quota_of,
)
from pipeline.gemini.backends import Developer, Vertex
from pipeline.run.limits import DECREASE, HEADROOM, SlotLedger
from tests.conftest import Clock


class Link:
    """QuotaLink in-process; `up = False` makes the quota unreachable, as a lost actor is."""

    def __init__(self, quota: FleetQuota) -> None:
        self.quota = quota
        self.up = True
        self.calls = 0

    async def lease(self, want: int, tokens_each: float, report: Report) -> Grant:
        self.calls += 1
        await asyncio.sleep(0)  # a call: other workers run meanwhile
        if not self.up:
            raise QuotaUnavailable("down")
        return self.quota.lease(want, tokens_each, report)

    def throttled(self, retry_delay: float | None, report: Report) -> None:
        self.quota.throttled(retry_delay, report)

    def report(self, report: Report) -> None:
        self.quota.report(report)


def test_the_ledger_hands_out_a_burst_then_paces() -> None:
    clock = Clock(1000.0)
    ledger = SlotLedger(600, None, burst_seconds=1.0, clock=clock)  # 9.85 requests/s paced
    interval = 60 / (600 * HEADROOM)
    first = ledger.reserve(50, 100.0)
    assert len(first) == 9  # a burst's worth of the fleet's rate, however many are wanted
    assert first[:9] == pytest.approx([0.0] * 9, abs=interval)  # about a second's capacity now
    second = ledger.reserve(9, 100.0)  # then one every interval, a burst ahead of the rate
    tolerance = 1.0 - interval
    assert second == pytest.approx([(9 + i) * interval - tolerance for i in range(9)])
    clock.now += 100  # a quiet spell banks one burst, never more
    third = ledger.reserve(9, 100.0)
    assert max(third) < 1.0


def test_the_ledger_weighs_tokens_per_group_and_corrects_from_billing() -> None:
    clock = Clock(1000.0)
    ledger = SlotLedger(None, 60_000, burst_seconds=1.0, clock=clock)  # ~985 tokens/s
    group = ledger.reserve(64, 100.0)
    assert len(group) == 9  # 9 x 100 tokens fit a burst of 985
    assert max(group) == 0.0
    ledger.correct(0.0, 985.0)  # billed much more than weighed: the next group waits for it
    later = ledger.reserve(1, 100.0)
    assert later[0] == pytest.approx((900 + 985 + 100 - 985) / 985, rel=0.01)


def test_a_429_pauses_the_ledger_and_cuts_its_rate_once() -> None:
    clock = Clock(1000.0)
    quota = FleetQuota(Limits(600, None, None), clock=clock)
    quota.lease(9, 1.0, Report())
    quota.throttled(5.0, Report())
    quota.throttled(5.0, Report())  # the same storm seen by another worker
    assert quota.ledger.factor == pytest.approx(DECREASE)
    assert min(quota.lease(1, 1.0, Report()).delays) >= 5.0


def test_the_day_is_reserved_per_slot_and_given_back_when_unanswered() -> None:
    clock = Clock(1000.0)
    quota = FleetQuota(Limits(6000, None, 10), clock=clock, day=lambda: "2026-11-29")
    assert quota.lease(5, 1.0, Report()).wait > 0  # no count for today yet: nothing lent
    quota.seed("2026-11-29", 4)  # what the output's state says was answered today
    grant = quota.lease(50, 1.0, Report())
    assert len(grant.delays) == 6 and grant.daily
    assert quota.lease(1, 1.0, Report()).exhausted
    quota.report(Report(released=2, epoch=grant.epoch))  # two calls were not answered
    assert len(quota.lease(5, 1.0, Report()).delays) == 2
    quota.report(Report(released=3, epoch="an-earlier-actor"))  # not this ledger's: ignored
    assert quota.lease(1, 1.0, Report()).exhausted


def test_a_new_quota_day_starts_from_nothing() -> None:
    days = iter(["2026-11-29", "2026-11-29", "2026-11-30"])
    quota = FleetQuota(Limits(6000, None, 3), clock=Clock(1000.0), day=lambda: next(days))
    quota.seed("2026-11-29", 3)
    assert quota.lease(1, 1.0, Report()).delays == (0.0,)  # midnight Pacific passed meanwhile


def test_the_quota_name_hides_the_key() -> None:
    name = quota_name("AIzaSy-secret-key", "gemini-2.5-flash")
    assert "secret" not in name and name.endswith("-gemini-2.5-flash")
    assert name == quota_name("AIzaSy-secret-key", "gemini-2.5-flash")
    assert name != quota_name("AIzaSy-other-key", "gemini-2.5-flash")


def test_a_vertex_projects_quota_is_named_by_project_location_and_model_not_a_key() -> None:
    """Vertex's dynamic shared quota is counted per project, location and model: every fleet
    of the project there shares one actor, whoever's credentials; express mode (no project)
    and the Developer API share the key's."""
    here = Vertex("https://x", "p1", "us-central1")
    name = quota_of(here, "", "gemini-2.5-flash")
    assert name == "quota-vertex-p1-us-central1-gemini-2.5-flash"
    assert quota_of(here, "AIzaSy-secret-key", "gemini-2.5-flash") == name
    assert quota_of(Vertex("https://x", "p1", "europe-west4"), "", "gemini-2.5-flash") != name
    express = quota_of(Vertex("https://x", None), "AIzaSy-secret-key", "gemini-2.5-flash")
    developer = quota_of(Developer("https://y", "v1beta"), "AIzaSy-secret-key", "gemini-2.5-flash")
    assert express == developer == quota_name("AIzaSy-secret-key", "gemini-2.5-flash")


async def test_workers_share_the_rate_in_groups() -> None:
    """Three workers, twelve requests each in flight, one quota of 3,000 RPM: the fleet's
    requests go at the fleet's rate, not three times it, with a call per group of requests."""
    quota = FleetQuota(Limits(3000, None, None, burst_seconds=0.2))
    links = [Link(quota) for _ in range(3)]
    limiters = [LeasedLimiter(link, burst_seconds=0.2) for link in links]
    sent: list[float] = []

    async def request(limiter: LeasedLimiter) -> None:
        await limiter.acquire(100.0)
        sent.append(time.monotonic())

    started = time.monotonic()
    await asyncio.gather(*(request(lim) for lim in limiters for _ in range(40)))
    rate = 3000 * HEADROOM / 60
    burst = int(rate * 0.2)
    assert sent[-1] - started >= (120 - burst - 1) / rate * 0.95
    assert sum(link.calls for link in links) <= 120 / burst * 2


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on a virtual clock: where it would wait for its next timer, with nothing
    else to do, its clock jumps there instead. Pacing is then exact whatever the machine's load
    (a sleep ends at the very time it was due); `now` starts at any instant."""

    def __init__(self, now: float) -> None:
        super().__init__()
        self.now = now
        # what counts as "due now": coarser than a float's step at the epoch's seconds (0.24 µs),
        # or a timer due exactly now would never be seen as due, nor waited for
        self._clock_resolution = 1e-6
        self._selector = _JumpingSelector(self._selector, self)

    def time(self) -> float:
        return self.now


class _JumpingSelector:
    """The loop's selector, polled without blocking: a wait for a timer moves the clock."""

    def __init__(self, selector: selectors.BaseSelector, loop: VirtualTimeLoop) -> None:
        self.selector = selector
        self.loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        events = self.selector.select(0)
        if not events and timeout:
            self.loop.now += timeout
        return events

    def __getattr__(self, name: str) -> Any:
        return getattr(self.selector, name)


@pytest.mark.parametrize("start", [1_800_000_000.0, 1_800_000_003.7, 1_800_000_009.95])
def test_four_workers_use_one_quota_to_the_limit_in_every_whole_window(start: float) -> None:
    """tests/test_ray_limits.py's fleet on a virtual clock: four workers, eight requests each in
    flight (50 ms each), one quota of 300 requests per 10-s window with a burst of a scaled
    second, 960 requests. Every whole window gets >= 97 % of the limit and never more, wherever
    the run starts in a window: the lower bound the cluster test cannot hold on a starved box
    (a late sender is the machine's, not the quota's), proven here for the quota's logic."""
    window, per_window, n = 10.0, 300, 960
    loop = VirtualTimeLoop(start)
    limits = Limits(int(per_window * 60 / window), None, None, burst_seconds=window / 60)
    quota = FleetQuota(limits, clock=loop.time)
    limiters = [
        LeasedLimiter(Link(quota), burst_seconds=window / 60, clock=loop.time) for _ in range(4)
    ]
    sent: list[float] = []
    todo = iter(range(n))

    async def caller(limiter: LeasedLimiter) -> None:
        for _ in todo:
            await limiter.acquire(100.0)
            sent.append(loop.time())
            await asyncio.sleep(0.05)  # the request's latency

    async def fleet() -> None:
        await asyncio.gather(*(caller(lim) for lim in limiters for _ in range(8)))

    try:
        loop.run_until_complete(fleet())
    finally:
        loop.close()
    windows = Counter(int(t // window) for t in sent)
    full = [windows[w] for w in range(min(windows) + 1, max(windows))]
    assert len(sent) == n and len(full) >= 2, windows
    assert min(full) >= 0.97 * per_window and max(windows.values()) <= per_window, windows


async def test_a_lost_quota_pauses_the_workers_until_it_is_back() -> None:
    quota = FleetQuota(Limits(None, None, None))
    link = Link(quota)
    limiter = LeasedLimiter(link)
    link.up = False
    waiting = asyncio.ensure_future(limiter.acquire(1.0))
    deadline = time.monotonic() + 10  # only bounds a failing test
    while link.calls < 2:  # asked, found it gone, paused, asked again
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert not waiting.done()  # paused, not running free
    link.up = True
    await asyncio.wait_for(waiting, 5)
    assert limiter.paused_seconds > 0


async def test_the_daily_limit_stops_a_worker_through_its_count() -> None:
    quota = FleetQuota(Limits(None, None, 3))
    quota.seed(quota.today, 0)
    limiter = LeasedLimiter(Link(quota))
    daily = LeasedDaily(limiter, 3)
    answered = []
    for answer in (True, False, True, True, True):
        await limiter.acquire(1.0)
        if not daily.reserve():
            break
        daily.settle(answer)
        answered.append(answer)
    assert answered == [True, False, True, True]  # the unanswered one gave its slot back
    assert daily.count == 3
    daily.save()
    assert quota.used == 3


async def test_a_429_gives_back_the_slots_held_and_tells_the_fleet() -> None:
    quota = FleetQuota(Limits(6000, None, 100))
    quota.seed(quota.today, 0)
    limiter = LeasedLimiter(Link(quota))
    limiter._waiting = 10  # as if ten requests queued behind: the lease is for them all
    await limiter.acquire(1.0)
    limiter._waiting = 0
    held: Any = len(limiter._slots)
    assert held > 0
    limiter.throttled(2.0)
    assert not limiter._slots
    assert quota.used == 1 and quota.ledger.stats.throttled == 1


def test_ray_is_imported_only_by_a_ray_run() -> None:
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, pipeline.cli, pipeline.engines, pipeline.engines.ray.driver, "
        "pipeline.engines.ray.quota; print('ray' in sys.modules)"
    )
    root = Path(__file__).resolve().parent.parent
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True
    )
    assert found.stdout.strip() == "False"
