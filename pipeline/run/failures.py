"""Whose fault is a failed call: this image's, nobody's (try again), or the run's.

An error must not become data it is not. The three answers, and what the engine does:

- the image's fault (`IMAGE`): a 400 about this request's content (an image the service cannot
  process, a body over the limit), a 409 `already_exists` (the same request would collide
  again) -> an `error` row; `BLOCKED` -> a `blocked` row.
- nobody's (`RETRY`): rate limits, overload, server faults, timeouts, dropped connections, 409
  aborted -> retried within the run (backoff, `retryDelay`, up to `[limits] max_attempts`); when
  the attempts run out the row is an error marked `retryable`, which the next plain runs try
  again, three runs at most (`RETRY_RUNS` in pipeline/output/index.py: a constant, not a
  setting); `--retry-errors` redoes it, as every error, whenever it is given.
- the run's (`RUN`): a wrong or expired key, 401 / 403 on the method, a 404 on the method
  (wrong model, base URL or version), a redirect, 402 (prepaid credits spent), the daily quota
  -> the run stops at once, exit 3 (2 when the config must change), with a message naming the
  cause; no row is written for the images not yet tried, and the image whose call found it
  writes none either (nothing was paid: the next run redoes it).

Some failures are only the run's when they repeat: the same 400 on every request (a setting the
model refuses) or an outage (every attempt failing to connect). `Health` watches the stream of
attempts and calls it the run's fault after `STREAK` identical failures with no success between:
an outage at any time, any other failure only while nothing of the run has been answered (once
answers came back, the same 400 again is that image's, and 429s in a row a quota being found).

An uploaded file that expired or was deleted answers 403 / 404 (`REUPLOAD`): upload again. A
400 FAILED_PRECONDITION on a request with an uploaded file (`CHECK_FILE`) may be the file (not
ACTIVE yet, or FAILED) or the project ("enable billing", "not available in your region"): the
file's own state decides — wait for it, upload it again, or stop the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from pipeline import exits
from pipeline.gemini import GeminiError
from pipeline.run.limits import next_quota_reset


class Action(Enum):
    IMAGE = "image"
    BLOCKED = "blocked"
    RETRY = "retry"
    REUPLOAD = "reupload"
    CHECK_FILE = "check_file"
    RUN = "run"


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    reason: str
    exit_code: int = exits.STOPPED  # for RUN: 2 when the config must change, else 3
    hint: str | None = None  # for RUN: how to resume


def daily_quota(why: str) -> Verdict:
    """The day's requests are spent: stop, and say when the quota resets."""
    reset = next_quota_reset()
    hint = (
        f"the daily quota resets at {reset:%Y-%m-%d %H:%M} UTC (midnight Pacific); "
        "rerun the same command then to resume"
    )
    return Verdict(Action.RUN, f"daily quota: {why}", exits.STOPPED, hint)


STREAK = 8  # identical failed attempts in a row, no success between: the run's fault
_CONFIG = exits.USAGE
# kinds that stop the run at once, and whether fixing them means changing the config
_RUN_KINDS = {
    "auth": (
        "the service refused the credentials (the API key, or a Vertex access token)",
        _CONFIG,
    ),
    "credits": ("the project's prepaid credits are spent", exits.STOPPED),
    "redirect": ("the endpoint answered with a redirect (is [api] base_url right?)", _CONFIG),
}
_RETRY_KINDS = {"rate_limit", "server", "timeout", "transport", "aborted", "data_loss"}
_OUTAGE_KINDS = {"server", "timeout", "transport"}  # every attempt failing: an outage


def judge(error: GeminiError, *, uploaded: bool) -> Verdict:
    """What to do about one failed call (`uploaded`: the request carried an uploaded file)."""
    kind, text = error.kind, describe(error)
    if kind == "daily_quota":
        return daily_quota(f"the service reports the daily request quota is spent ({text})")
    if kind in _RUN_KINDS:
        why, code = _RUN_KINDS[kind]
        return Verdict(Action.RUN, f"{why}: {text}", code)
    if kind in ("permission", "not_found") and uploaded:
        return Verdict(Action.REUPLOAD, text)
    if kind == "failed_precondition" and uploaded:
        return Verdict(Action.CHECK_FILE, text)
    if kind in ("permission", "not_found"):
        why = "the key may not call this method" if kind == "permission" else "no such method"
        return Verdict(Action.RUN, f"{why} ([api] model, version, base_url?): {text}", _CONFIG)
    if kind == "failed_precondition":
        return project_refused(error)
    if kind == "blocked":
        return Verdict(Action.BLOCKED, f"answer blocked ({error.status}): {error.message}")
    if kind in _RETRY_KINDS:
        return Verdict(Action.RETRY, text)
    return Verdict(Action.IMAGE, text)


class Health:
    """Watches attempts; says when identical failures with no success mean the run's fault."""

    def __init__(self, streak: int = STREAK) -> None:
        self.streak = streak
        self.successes = 0
        self._signature: tuple[str, ...] | None = None
        self._count = 0

    def success(self) -> None:
        self.successes += 1
        self._signature, self._count = None, 0

    def exhausted(self, error: GeminiError, verdict: Verdict) -> Verdict | None:
        """An image ran out of attempts: with no success in the whole run and an outage-kind
        failure, that is the run's fault too (a one-image run never reaches a streak)."""
        if self.successes or error.kind not in _OUTAGE_KINDS:
            return None
        why = "the service is unreachable or failing (no request of this run was answered)"
        return Verdict(Action.RUN, f"{why}: {verdict.reason}", exits.STOPPED)

    def failure(self, error: GeminiError, verdict: Verdict) -> Verdict | None:
        """A RUN verdict when this failure completes a streak, else None."""
        if verdict.action not in (Action.IMAGE, Action.RETRY):
            return None
        outage = error.kind in _OUTAGE_KINDS
        signature = ("outage",) if outage else (error.kind, error.status, error.message[:200])
        if not outage and self.successes:
            # once answers came back, the same refusal again is that image's (IMAGE) or a tight
            # quota the pool is still finding (a 429 storm under load had 8 in a row and was
            # stopped as the config's fault): only an outage mid-run is the run's
            return None
        self._count = self._count + 1 if signature == self._signature else 1
        self._signature = signature
        if self._count < self.streak:
            return None
        if outage:
            why = f"the service is unreachable or failing ({self.streak} attempts in a row)"
            return Verdict(Action.RUN, f"{why}: {verdict.reason}", exits.STOPPED)
        why = f"every request is refused the same way ({self.streak} in a row, none answered)"
        return Verdict(Action.RUN, f"{why}: {verdict.reason}", _CONFIG)


def project_refused(error: GeminiError) -> Verdict:
    """FAILED_PRECONDITION while the file is fine: the project is the cause."""
    why = "the service refuses this project (billing, region?)"
    return Verdict(Action.RUN, f"{why}: {describe(error)}", _CONFIG)


def describe(error: GeminiError) -> str:
    code = f"{error.code} " if error.code else ""
    return f"{code}{error.status}: {error.message}"
