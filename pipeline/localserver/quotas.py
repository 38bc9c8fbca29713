"""Per-model request and input-token quotas in fixed windows, as the real service counts them.

Minute windows are calendar minutes (they all reset at :00, so a client bursting a whole minute's
quota at once can land twice the limit within sixty seconds); the day window resets at midnight
Pacific time. Only admitted requests count. A request that breaks several quotas at once gets one
429 listing them all, as the service does (rule quota.exceeded). The clock is injectable so tests
move time instead of sleeping.
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
        """Count the request, or raise one 429 listing every quota it would exceed (per-minute
        ones first, the daily one last), counting nothing."""
        if not self.enabled:
            return
        now = self._clock()
        usage = self._window(model, now)
        hits = self._hits(usage, input_tokens, now)
        if hits:
            raise errors.quota_exceeded(hits, model)
        usage.requests += 1
        usage.tokens += input_tokens
        usage.day_requests += 1

    def _window(self, model: str, now: float) -> _Usage:
        usage = self._usage.setdefault(model, _Usage())
        minute = math.floor(now / self.window)
        if usage.minute != minute:
            usage.minute, usage.requests, usage.tokens = minute, 0, 0
        day = dt.datetime.fromtimestamp(now, PACIFIC).date() if self.rpd else None
        if usage.day != day:
            usage.day, usage.day_requests = day, 0
        return usage

    def _hits(self, usage: _Usage, input_tokens: int, now: float) -> list[errors.QuotaHit]:
        to_next_minute = (usage.minute + 1) * self.window - now
        checks = (
            ("rpm", RPM_QUOTA, self.rpm, usage.requests + 1, to_next_minute, False),
            ("tpm", TPM_QUOTA, self.tpm, usage.tokens + input_tokens, to_next_minute, False),
            ("rpd", RPD_QUOTA, self.rpd, usage.day_requests + 1, _to_pacific_midnight(now), True),
        )
        hits = []
        for kind, (metric, quota_id), limit, wanted, wait, daily in checks:
            if limit and wanted > limit:
                self.rejections[kind] += 1
                hits.append(errors.QuotaHit(metric, quota_id, limit, wait, daily))
        return hits


def _to_pacific_midnight(now: float) -> float:
    local = dt.datetime.fromtimestamp(now, PACIFIC)
    tomorrow = dt.datetime.combine(local.date() + dt.timedelta(days=1), dt.time(), PACIFIC)
    return tomorrow.timestamp() - now
