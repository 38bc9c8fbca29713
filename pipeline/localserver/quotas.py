"""Per-model request and input-token quotas in fixed windows, as the real service counts them.

Minute windows are calendar minutes (they all reset at :00, so a client bursting a whole minute's
quota at once can land twice the limit within sixty seconds); the day window resets at midnight
Pacific time. Only admitted requests count. The clock is injectable so tests move time instead
of sleeping.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from pipeline.localserver import errors

MINUTE = 60.0
PACIFIC = ZoneInfo("America/Los_Angeles")

RPM_QUOTA = (
    "generativelanguage.googleapis.com/generate_content_paid_tier_requests",
    "GenerateRequestsPerMinutePerProjectPerModel",
)
TPM_QUOTA = (
    "generativelanguage.googleapis.com/generate_content_paid_tier_input_token_count",
    "GenerateContentInputTokensPerModelPerMinute",
)
RPD_QUOTA = (
    "generativelanguage.googleapis.com/generate_requests_per_model_per_day",
    "GenerateRequestsPerDayPerProjectPerModel",
)


@dataclass(slots=True)
class _Usage:
    minute: int = -1
    requests: int = 0
    tokens: int = 0
    day: dt.date | None = None
    day_requests: int = 0


class Quotas:
    """Admits or refuses each request against RPM, TPM (input tokens) and RPD, per model."""

    def __init__(
        self,
        rpm: int | None,
        tpm: int | None,
        rpd: int | None,
        clock: Callable[[], float],
        window: float = MINUTE,
    ) -> None:
        self.rpm, self.tpm, self.rpd = rpm, tpm, rpd
        self.window = window  # the "minute": shorter only to test storms without waiting
        self._clock = clock
        self._usage: dict[str, _Usage] = {}
        self.rejections: dict[str, int] = {"rpm": 0, "tpm": 0, "rpd": 0}

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm or self.rpd)

    def admit(self, model: str, input_tokens: int) -> None:
        """Count the request, or raise a 429 ApiError without counting it."""
        if not self.enabled:
            return
        now = self._clock()
        usage = self._usage.setdefault(model, _Usage())
        minute = math.floor(now / self.window)
        if usage.minute != minute:
            usage.minute, usage.requests, usage.tokens = minute, 0, 0
        day = dt.datetime.fromtimestamp(now, PACIFIC).date() if self.rpd else None
        if usage.day != day:
            usage.day, usage.day_requests = day, 0
        to_next_minute = (minute + 1) * self.window - now
        if self.rpd and usage.day_requests + 1 > self.rpd:
            self._refuse("rpd", RPD_QUOTA, self.rpd, model, _to_pacific_midnight(now), daily=True)
        if self.rpm and usage.requests + 1 > self.rpm:
            self._refuse("rpm", RPM_QUOTA, self.rpm, model, to_next_minute, daily=False)
        if self.tpm and usage.tokens + input_tokens > self.tpm:
            self._refuse("tpm", TPM_QUOTA, self.tpm, model, to_next_minute, daily=False)
        usage.requests += 1
        usage.tokens += input_tokens
        usage.day_requests += 1

    def _refuse(
        self,
        kind: str,
        quota: tuple[str, str],
        limit: int,
        model: str,
        retry_seconds: float,
        *,
        daily: bool,
    ) -> None:
        self.rejections[kind] += 1
        raise errors.quota_exceeded(
            metric=quota[0],
            quota_id=quota[1],
            limit=limit,
            model=model,
            retry_seconds=retry_seconds,
            daily=daily,
        )


def _to_pacific_midnight(now: float) -> float:
    local = dt.datetime.fromtimestamp(now, PACIFIC)
    tomorrow = dt.datetime.combine(local.date() + dt.timedelta(days=1), dt.time(), PACIFIC)
    return tomorrow.timestamp() - now
