"""One typed error for every way a Gemini call can fail, parsed from the service's error bodies.

generateContent and the Files API answer with a `google.rpc.Status` body
(`{"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": ..., "details": [...]}}`);
the Interactions API puts a lowercase string in `code` and sends no details
(`{"error": {"code": "rate_limit_exceeded", "message": ...}}`). Both become a `GeminiError` whose
`kind` says what the caller can do about it, so the engine never parses strings:

    kind                 meaning                                                   retryable
    rate_limit           429 per-minute quota (Interactions rate_limit_exceeded,      yes
                         too_many_requests)
    daily_quota          429 with a per-day QuotaFailure violation anywhere in the    no
                         list (Interactions quota_exceeded): today is over
    credits              402 prepayment credits depleted (payment_required)           no
    auth                 bad, expired or missing key: ErrorInfo.reason API_KEY_* and  no
                         friends, 401, "unregistered callers" 403 (authentication)
    permission           other 403 PERMISSION_DENIED; an expired or deleted upload    no
                         answers this too (the engine decides with context)
    not_found            404
    failed_precondition  400 FAILED_PRECONDITION: a file not ACTIVE, or "enable      no
                         billing" / "not available in your region"
    blocked              Interactions blocked-generation codes (safety, recitation,   no
                         language, prohibited_content, spii, blocklist, image_*,
                         content_blocked)
    invalid_request      any other 4xx (and 501)                                      no
    already_exists       409 ALREADY_EXISTS (Interactions already_exists): what it     no
                         creates exists, so the same request collides again
    aborted              409 ABORTED (Interactions aborted): a conflict, retry         yes
    server               500, 502, 503, 504 (and other 5xx, 499)                      yes
    timeout              no answer within the deadline, or 408                        yes
    transport            connection refused or reset, DNS failure, body cut mid-read  yes
    redirect             any 3xx: never followed, the key stays home                  no
    data_loss            a 2xx answer whose body does not parse                       yes
    too_large            an answer over the client's size cap (32 MB): not read       no

`retry_delay` is the service's hint in seconds: RetryInfo.retryDelay when the body has one, else
the `retry-after-ms` header, else `Retry-After` (seconds or an HTTP date). That header order is
the Interactions SDK's (`google/genai/_gaos/utils/retries.py`: `_parse_retry_after_header`, then
`_parse_retry_after_ms_header` overriding it inside `retry_with_backoff`); the generateContent
client (`_api_client.py`) reads neither header nor RetryInfo.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from pipeline.gemini.types import GenerateResponse

RETRYABLE_KINDS = frozenset(
    {"rate_limit", "aborted", "server", "timeout", "transport", "data_loss"}
)
# HTTP codes whose answer may be retried as it stands (used for upload chunks, whose answer is
# judged before any error body is parsed).
RETRYABLE_HTTP_CODES = frozenset({408, 409, 429, 500, 502, 503, 504})

# Interactions API string codes -> kind. Codes not listed (invalid_request, parameter_unknown,
# api_error, ...) take the kind of their HTTP code.
_KIND_BY_INTERACTIONS_CODE = {
    "rate_limit_exceeded": "rate_limit",
    "too_many_requests": "rate_limit",
    "quota_exceeded": "daily_quota",
    "payment_required": "credits",
    "authentication": "auth",
    "unauthenticated": "auth",
    "permission_denied": "permission",
    "not_found": "not_found",
    "model_not_found": "not_found",
    "failed_precondition": "failed_precondition",
    "aborted": "aborted",
    # 409 both: the api-errors page says retry `aborted` "at a higher application level" and
    # for `already_exists` "check whether the resource already exists before re-creating it"
    "already_exists": "already_exists",
}
# Blocked generations (Interactions): these codes, and every code starting with "image_".
BLOCKED_CODES = frozenset(
    {"safety", "recitation", "language", "prohibited_content", "spii", "blocklist"}
    | {"content_blocked"}
)
# ErrorInfo.reason values that mean the credential itself is refused (400 or 403).
_AUTH_REASONS = frozenset(
    {
        "API_KEY_INVALID",
        "API_KEY_EXPIRED",
        "API_KEY_SERVICE_BLOCKED",
        "API_KEY_HTTP_REFERRER_BLOCKED",
        "API_KEY_IP_ADDRESS_BLOCKED",
        "API_KEY_ANDROID_APP_BLOCKED",
        "API_KEY_IOS_APP_BLOCKED",
        "ACCESS_TOKEN_EXPIRED",
        "CREDENTIALS_MISSING",
        "CONSUMER_SUSPENDED",
    }
)
# The 403 the service gives a request without any key (it carries no ErrorInfo).
_NO_KEY_MESSAGE = "unregistered callers"
_KIND_BY_HTTP_CODE = {
    400: "invalid_request",
    401: "auth",
    402: "credits",
    403: "permission",
    404: "not_found",
    408: "timeout",
    409: "aborted",
    499: "server",
    500: "server",
    501: "invalid_request",
    502: "server",
    503: "server",
    504: "server",
}

# google.rpc codes for answers whose body is not a Status (a proxy's HTML page, an empty body).
_STATUS_BY_HTTP_CODE = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    402: "RESOURCE_EXHAUSTED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_MAX_MESSAGE_CHARS = 2000  # an error line, not a dump of a whole HTML page


class GeminiError(Exception):
    """A failed Gemini call: HTTP code (None without an answer), status, message and hints.

    `kind` is one of the kinds in the module docstring; `retryable` follows from it.
    `retry_delay` is the service's hint in seconds; `reason` is ErrorInfo.reason (e.g.
    "API_KEY_INVALID"); `quotas` names every violated quota of a QuotaFailure, in order.
    `partial` is set when a continued answer failed after some of its hops were answered (and
    paid for): those hops merged, with the continuation still to do (see
    `GeminiClient.interact(resume_from=...)`).
    """

    def __init__(
        self,
        code: int | None,
        status: str,
        message: str,
        *,
        kind: str | None = None,
        retry_delay: float | None = None,
        reason: str | None = None,
        quotas: tuple[str, ...] = (),
        partial: GenerateResponse | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.message = message
        self.kind = kind or classify(code, status, reason, quotas, message)
        self.retry_delay = retry_delay
        self.reason = reason
        self.quotas = tuple(quotas)
        self.partial = partial

    @property
    def retryable(self) -> bool:
        """True for rate limits, conflicts, server faults, timeouts and dropped connections."""
        return self.kind in RETRYABLE_KINDS

    @property
    def quota(self) -> str | None:
        """The one quota to name: the per-day violation if there is one, else the first."""
        daily = [quota for quota in self.quotas if is_daily_quota(quota)]
        named = daily or self.quotas
        return named[0] if named else None

    def with_partial(self, partial: GenerateResponse, hops: int) -> GeminiError:
        """This error, carrying the `hops` answered hops of a continuation it interrupted."""
        message = f"{self.message} (continuation interrupted: {hops} answered hop(s) in .partial)"
        return GeminiError(
            self.code,
            self.status,
            message,
            kind=self.kind,
            retry_delay=self.retry_delay,
            reason=self.reason,
            quotas=self.quotas,
            partial=partial,
        )

    def __str__(self) -> str:
        where = f"HTTP {self.code}" if self.code is not None else "no HTTP answer"
        text = f"{where} {self.status} [{self.kind}]: {self.message}"
        if self.reason:
            text += f" (reason {self.reason})"
        if self.quotas:
            text += f" (quota {', '.join(self.quotas)})"
        if self.retry_delay is not None:
            text += f" (retry in {self.retry_delay:g}s)"
        return text

    def __repr__(self) -> str:
        return (
            f"GeminiError(code={self.code!r}, status={self.status!r}, kind={self.kind!r}, "
            f"message={self.message!r}, retry_delay={self.retry_delay!r}, "
            f"reason={self.reason!r}, quotas={self.quotas!r}, partial={self.partial is not None})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle through `args`; keep the keyword-only fields too (worker processes).
        rebuild = functools.partial(
            GeminiError,
            kind=self.kind,
            retry_delay=self.retry_delay,
            reason=self.reason,
            quotas=self.quotas,
            partial=self.partial,
        )
        return (rebuild, (self.code, self.status, self.message))


def is_daily_quota(quota: str) -> bool:
    """A per-day quota id or metric ("...PerDayPerProject...", ".../requests_per_day")."""
    return "perday" in quota.lower().replace("_", "")


def is_blocked_code(code: str) -> bool:
    """An Interactions error code that means the generation was blocked."""
    return code in BLOCKED_CODES or code.startswith("image_")


def classify(
    code: int | None,
    status: str,
    reason: str | None = None,
    quotas: tuple[str, ...] = (),
    message: str = "",
) -> str:
    """The kind of an error answer (see the module docstring); the only place the rules live."""
    if code is None:
        return {"DEADLINE_EXCEEDED": "timeout", "DATA_LOSS": "data_loss"}.get(status, "transport")
    if 300 <= code < 400:
        return "redirect"
    if status in _KIND_BY_INTERACTIONS_CODE:
        return _KIND_BY_INTERACTIONS_CODE[status]
    if status.islower() and is_blocked_code(status):
        return "blocked"
    if reason in _AUTH_REASONS or (code == 403 and _NO_KEY_MESSAGE in message.lower()):
        return "auth"
    if code == 429:
        return "daily_quota" if any(is_daily_quota(quota) for quota in quotas) else "rate_limit"
    if code == 400 and status == "FAILED_PRECONDITION":
        return "failed_precondition"
    if status == "ALREADY_EXISTS":  # a 409 that retrying cannot cure (not ABORTED)
        return "already_exists"
    if code in _KIND_BY_HTTP_CODE:
        return _KIND_BY_HTTP_CODE[code]
    return "server" if code >= 500 else "invalid_request"


def parse_duration(value: Any) -> float | None:
    """Seconds from a protobuf Duration in JSON ("17s", "0.5s") or object form."""
    if isinstance(value, str) and value.endswith("s"):
        try:
            return float(value[:-1])
        except ValueError:
            return None
    if isinstance(value, Mapping):
        try:
            return float(value.get("seconds", 0)) + float(value.get("nanos", 0)) / 1e9
        except (TypeError, ValueError):
            return None
    return None


def retry_after(headers: Mapping[str, str], now: datetime | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms`, else `Retry-After` (seconds or an HTTP date).

    The Interactions SDK's rule (`_gaos/utils/retries.py`): the ms header wins when both are
    present; a negative or unreadable value counts as absent; a past date is 0.
    """
    millis = _number(headers.get("retry-after-ms"))
    if millis is not None and millis >= 0:
        return millis / 1000
    value = headers.get("Retry-After")
    if not value:
        return None
    seconds = _number(value)
    if seconds is not None:
        return max(seconds, 0.0)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - (now or datetime.now(UTC))).total_seconds(), 0.0)


def _number(value: str | None) -> float | None:
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


def _status_body(body: str) -> dict[str, Any] | None:
    """The `error` object of an error body, or None when the body is not a Status."""
    try:
        document = json.loads(body) if body else None
    except ValueError:
        return None
    if isinstance(document, list) and document and isinstance(document[0], dict):
        document = document[0]  # some Google front ends wrap the Status in a list
    error = document.get("error") if isinstance(document, dict) else None
    return error if isinstance(error, dict) else None


def _details(error: Mapping[str, Any]) -> tuple[float | None, str | None, tuple[str, ...]]:
    """(RetryInfo delay, ErrorInfo reason, every QuotaFailure violation) of a Status."""
    retry_delay = reason = None
    quotas: list[str] = []
    details = error.get("details")
    for detail in details if isinstance(details, list) else ():
        if not isinstance(detail, dict):
            continue
        kind = str(detail.get("@type", ""))
        if kind.endswith("google.rpc.RetryInfo"):
            retry_delay = parse_duration(detail.get("retryDelay", detail.get("retry_delay")))
        elif kind.endswith("google.rpc.ErrorInfo"):
            reason = detail.get("reason") or reason
        elif kind.endswith("google.rpc.QuotaFailure"):
            violations = detail.get("violations")
            for violation in violations if isinstance(violations, list) else ():
                if isinstance(violation, dict):
                    name = violation.get("quotaId") or violation.get("quotaMetric")
                    name = name or violation.get("subject") or violation.get("description")
                    if name:
                        quotas.append(str(name))
    return retry_delay, reason, tuple(quotas)


def error_from_response(
    code: int, body: str, headers: Mapping[str, str] | None = None
) -> GeminiError:
    """Turn an HTTP error answer into a GeminiError, whatever its body looks like."""
    headers = headers or {}
    default_status = _STATUS_BY_HTTP_CODE.get(code, "UNKNOWN")
    error = _status_body(body)
    if error is None:
        message = body.strip()[:_MAX_MESSAGE_CHARS] or f"HTTP {code} with an empty body"
        return GeminiError(code, default_status, message, retry_delay=retry_after(headers))

    raw_code = error.get("code")
    if isinstance(raw_code, str) and raw_code:
        status = raw_code  # Interactions API: a string code such as "rate_limit_exceeded"
    else:
        status = str(error.get("status") or default_status)
    message = str(error.get("message") or "")[:_MAX_MESSAGE_CHARS]
    retry_delay, reason, quotas = _details(error)
    if retry_delay is None:
        retry_delay = retry_after(headers)
    return GeminiError(code, status, message, retry_delay=retry_delay, reason=reason, quotas=quotas)
