"""The limiter's arithmetic on a virtual clock, and the quota day."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from pipeline.run.limits import (
    DECREASE,
    HEADROOM,
    RateLimiter,
    TokenBucket,
    next_quota_reset,
    quota_day,
)
from tests.conftest import Clock


def test_token_bucket_allows_about_a_second_then_paces() -> None:
    bucket = TokenBucket(per_minute=60_000, burst_seconds=1.0, now=0.0)
    per_second = 60_000 * HEADROOM / 60
    assert bucket.wait_time(per_second, 0.0) == 0.0  # one second of capacity at once
    bucket.take(per_second)
    assert bucket.wait_time(500, 0.0) == pytest.approx(500 / per_second)
    assert bucket.wait_time(500, 0.6) == 0.0  # refilled meanwhile


def test_token_bucket_never_stalls_on_an_oversized_request() -> None:
    bucket = TokenBucket(per_minute=600, burst_seconds=1.0, now=0.0)  # capacity ~10 tokens
    assert bucket.wait_time(5000, 0.0) == 0.0  # full: it may go, and pays it back later
    bucket.take(5000)
    assert bucket.wait_time(1, 0.0) > 400  # ... for about 500 s


def test_billing_correction_charges_the_difference() -> None:
    clock = Clock(1000.0)
    limiter = RateLimiter(None, 60_000, clock=clock)
    bucket = limiter._tokens
    level = bucket.level
    limiter.correct(estimated=258, billed=1258)
    assert bucket.level == pytest.approx(level - 1000)


def test_aimd_cuts_once_per_window_then_recovers() -> None:
    clock = Clock(1000.0)
    limiter = RateLimiter(600, 100_000, clock=clock)
    full = limiter.effective_rpm
    limiter.throttled(retry_delay=2.0)
    limiter.throttled(retry_delay=2.0)  # a burst of 429s from one window cuts once
    assert limiter.factor == pytest.approx(DECREASE)
    assert limiter.effective_rpm == pytest.approx(full * DECREASE)
    assert limiter._tokens.factor == pytest.approx(DECREASE)
    assert limiter.stats.throttled == 2
    clock.now += 5
    limiter._recover(clock.now)
    assert DECREASE < limiter.factor < 1.0
    clock.now += 60
    limiter._recover(clock.now)
    assert limiter.factor == 1.0


def test_unknown_limit_is_discovered_from_the_rate_that_was_too_much() -> None:
    clock = Clock(1000.0)
    limiter = RateLimiter(None, None, clock=clock)
    limiter._recent.extend(clock.now - 4.9 + i * 0.1 for i in range(50))  # 50 requests in 5 s
    limiter.throttled(retry_delay=None)
    assert limiter.rpm == 612  # 50 requests in 4.9 s
    assert limiter.effective_rpm == pytest.approx(612 * HEADROOM * DECREASE)


def test_a_burst_at_start_is_not_mistaken_for_a_slow_rate() -> None:
    clock = Clock(1000.0)
    limiter = RateLimiter(None, None, clock=clock)
    limiter._recent.extend([clock.now] * 8)  # 8 requests sent at once, then a 429
    limiter.throttled(retry_delay=1.0)
    assert limiter.rpm == 480  # 8 within the one-second burst window, not 8 per 10 s


async def test_acquire_takes_both_limits_without_waiting_when_there_is_room() -> None:
    limiter = RateLimiter(6000, 600_000)
    for _ in range(10):
        await limiter.acquire(258)
    assert limiter.stats.waited_seconds < 0.5
    assert limiter._tokens.level < limiter._tokens.capacity


def test_quota_day_is_pacific() -> None:
    late_utc = datetime(2026, 11, 24, 6, 30, tzinfo=UTC)  # 22:30 on the 23rd in California
    assert quota_day(late_utc).isoformat() == "2026-11-23"
    reset = next_quota_reset(late_utc)
    assert reset == datetime(2026, 11, 24, 8, 0, tzinfo=UTC)
