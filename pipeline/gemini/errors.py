"""One typed error for every way a Gemini call can fail, parsed from the service's error bodies.

generateContent and the Files API answer with a `google.rpc.Status` body
(`{"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": ..., "details": [...]}}`);
the Interactions API puts a string in `code` (`{"error": {"code": "invalid_request", ...}}`).
Both become a `GeminiError`, so the pipeline's retry policy reads one shape.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

RETRYABLE_HTTP_CODES = frozenset({408, 429, 500, 502, 503, 504})
# Failures without a usable HTTP answer that a retry can cure: timeouts, dropped connections,
# and (DATA_LOSS) a success answer whose body arrived unreadable.
RETRYABLE_TRANSPORT_STATUSES = frozenset({"DEADLINE_EXCEEDED", "UNAVAILABLE", "DATA_LOSS"})

# google.rpc codes for answers whose body is not a Status (a proxy's HTML page, an empty body).
_STATUS_BY_HTTP_CODE = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
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

    `retry_delay` is the service's RetryInfo hint in seconds; `reason` is ErrorInfo.reason (e.g.
    "API_KEY_INVALID"); `quota` names the exhausted quota from QuotaFailure.
    """

    def __init__(
        self,
        code: int | None,
        status: str,
        message: str,
        *,
        retry_delay: float | None = None,
        reason: str | None = None,
        quota: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.message = message
        self.retry_delay = retry_delay
        self.reason = reason
        self.quota = quota

    @property
    def retryable(self) -> bool:
        """True for overload, rate limits, server faults, timeouts and dropped connections."""
        if self.code is None:
            return self.status in RETRYABLE_TRANSPORT_STATUSES
        return self.code in RETRYABLE_HTTP_CODES

    def __str__(self) -> str:
        where = f"HTTP {self.code}" if self.code is not None else "no HTTP answer"
        text = f"{where} {self.status}: {self.message}"
        if self.reason:
            text += f" (reason {self.reason})"
        if self.quota:
            text += f" (quota {self.quota})"
        if self.retry_delay is not None:
            text += f" (retry in {self.retry_delay:g}s)"
        return text

    def __repr__(self) -> str:
        return (
            f"GeminiError(code={self.code!r}, status={self.status!r}, message={self.message!r}, "
            f"retry_delay={self.retry_delay!r}, reason={self.reason!r}, quota={self.quota!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle through `args`; keep the keyword-only fields too (worker processes).
        rebuild = functools.partial(
            GeminiError, retry_delay=self.retry_delay, reason=self.reason, quota=self.quota
        )
        return (rebuild, (self.code, self.status, self.message))


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


def _retry_after_header(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        return None  # an HTTP date: too rare here to be worth parsing


def error_from_response(
    code: int, body: str, headers: Mapping[str, str] | None = None
) -> GeminiError:
    """Turn an HTTP error answer into a GeminiError, whatever its body looks like."""
    headers = headers or {}
    default_status = _STATUS_BY_HTTP_CODE.get(code, "UNKNOWN")
    try:
        document = json.loads(body) if body else None
    except ValueError:
        document = None
    error = document.get("error") if isinstance(document, dict) else None
    if isinstance(document, list) and document and isinstance(document[0], dict):
        error = document[0].get("error")  # some Google front ends wrap the Status in a list
    if not isinstance(error, dict):
        message = body.strip()[:_MAX_MESSAGE_CHARS] or f"HTTP {code} with an empty body"
        return GeminiError(code, default_status, message, retry_delay=_retry_after_header(headers))

    raw_code = error.get("code")
    if isinstance(raw_code, str) and raw_code:
        status = raw_code  # Interactions API: a string code such as "rate_limit_exceeded"
    else:
        status = str(error.get("status") or default_status)
    message = str(error.get("message") or "")[:_MAX_MESSAGE_CHARS]

    retry_delay = reason = quota = None
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
            if isinstance(violations, list) and violations and isinstance(violations[0], dict):
                first = violations[0]
                quota = first.get("quotaId") or first.get("quotaMetric") or first.get("subject")
    if retry_delay is None:
        retry_delay = _retry_after_header(headers)
    return GeminiError(code, status, message, retry_delay=retry_delay, reason=reason, quota=quota)
