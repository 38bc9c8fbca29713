"""Errors as the real service writes them; each names the rule (rules.py) that refused.

generateContent and the Files API answer a `google.rpc.Status` body
`{"error": {"code": 400, "message": ..., "status": "INVALID_ARGUMENT", "details": [...]}}`;
the Interactions API answers `{"error": {"code": "invalid_request", "message": ...}}` with a
lowercase string code and no details (https://ai.google.dev/gemini-api/docs/api-errors), and
429s there carry `retry-after-ms` / `Retry-After` headers instead of RetryInfo. One exception
type carries both renderings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.localserver.rules import rule as _known_rule

TYPE_PREFIX = "type.googleapis.com/google.rpc."
RATE_LIMIT_DOCS = "https://ai.google.dev/gemini-api/docs/rate-limits"
TROUBLESHOOTING = "https://developers.generativeai.google/guide/troubleshooting"
PREPAY_DEPLETED = (
    "Your prepayment credits are depleted. Please go to AI Studio at https://ai.studio/projects "
    "to manage your project and billing. Learn more at "
    "https://ai.google.dev/gemini-api/docs/billing#prepay."
)

# google.rpc status -> the Interactions API's code, where an error does not name its own
INTERACTIONS_CODES = {
    "INVALID_ARGUMENT": "invalid_request",
    "FAILED_PRECONDITION": "failed_precondition",
    "UNAUTHENTICATED": "authentication",
    "PERMISSION_DENIED": "permission_denied",
    "NOT_FOUND": "not_found",
    "ALREADY_EXISTS": "already_exists",  # 409: ai.google.dev/gemini-api/docs/api-errors
    "RESOURCE_EXHAUSTED": "rate_limit_exceeded",
    "INTERNAL": "api_error",
    "UNAVAILABLE": "service_unavailable",
    "DEADLINE_EXCEEDED": "deadline_exceeded",
}


class ApiError(Exception):
    """An error answer; renders itself in either wire flavour. `rule` is a rules.RULES id."""

    def __init__(
        self,
        http_status: int,
        status: str,
        message: str,
        details: list[dict[str, Any]] | None = None,
        *,
        rule: str,
        interactions_code: str | None = None,
        interactions_http_status: int | None = None,
        headers: dict[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        _known_rule(rule)  # a refusal always cites a registered rule
        self.http_status = http_status
        self.status = status
        self.message = message
        self.details = details or []
        self.rule = rule
        self.interactions_code = interactions_code or INTERACTIONS_CODES.get(status, "api_error")
        self.interactions_http_status = interactions_http_status or http_status
        self.headers = headers or {}
        self.retry_after = retry_after  # seconds; Interactions answers put it in headers

    def google_body(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "code": self.http_status,
            "message": self.message,
            "status": self.status,
        }
        if self.details:
            error["details"] = self.details
        return {"error": error}

    def interactions_body(self) -> dict[str, Any]:
        return {"error": {"code": self.interactions_code, "message": self.message}}

    def interactions_headers(self) -> dict[str, str]:
        """The headers plus retry-after-ms / Retry-After when a wait is known (the SDK honours
        retry-after-ms: _gaos/utils/retries.py)."""
        headers = dict(self.headers)
        if self.retry_after is not None:
            headers["retry-after-ms"] = str(max(1, math.ceil(self.retry_after * 1000)))
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return headers


# ---------------------------------------------------------------------------- auth and bodies


def missing_key() -> ApiError:
    return ApiError(
        403,
        "PERMISSION_DENIED",
        "Method doesn't allow unregistered callers (callers without established identity). "
        "Please use API Key or other form of API consumer identity to call this API.",
        rule="auth.missing-key",
        interactions_code="authentication",
        interactions_http_status=401,
    )


def unauthenticated() -> ApiError:
    """Vertex AI: no bearer token (or API key), or one that expired or was never issued."""
    return ApiError(
        401,
        "UNAUTHENTICATED",
        "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
        "cookie or other valid authentication credential. See "
        "https://developers.google.com/identity/sign-in/web/devconsole-project.",
        [{"@type": TYPE_PREFIX + "ErrorInfo", "reason": "ACCESS_TOKEN_EXPIRED"}],
        rule="auth.vertex-unauthenticated",
    )


def vertex_permission_denied(project: str) -> ApiError:
    """Vertex AI: a token for another project than the one in the path."""
    return ApiError(
        403,
        "PERMISSION_DENIED",
        f"Permission 'aiplatform.endpoints.predict' denied on resource "
        f"'//aiplatform.googleapis.com/projects/{project}' (or it may not exist).",
        [{"@type": TYPE_PREFIX + "ErrorInfo", "reason": "IAM_PERMISSION_DENIED"}],
        rule="auth.vertex-permission",
    )


def gs_object_unreadable(uri: str) -> ApiError:
    return ApiError(
        400,
        "INVALID_ARGUMENT",
        f"Cannot fetch content from the provided URL {uri}: the object does not exist, or the "
        "service agent may not read it.",
        rule="vertex.gs-object",
    )


def invalid_key() -> ApiError:
    message = "API key not valid. Please pass a valid API key."
    return ApiError(
        400,
        "INVALID_ARGUMENT",
        message,
        [
            {
                "@type": TYPE_PREFIX + "ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"},
            },
            {"@type": TYPE_PREFIX + "LocalizedMessage", "locale": "en-US", "message": message},
        ],
        rule="auth.invalid-key",
        interactions_code="authentication",
        interactions_http_status=401,
    )


def payload_too_large(limit: int) -> ApiError:
    message = f"Request payload size exceeds the limit: {limit} bytes."
    return ApiError(400, "INVALID_ARGUMENT", message, rule="body.too-large")


@dataclass(frozen=True, slots=True)
class Violation:
    """One field violation: where (a proto path like 'contents[0].parts[1]'; None: the top)
    and what, in the service's words."""

    field: str | None
    description: str

    def detail(self) -> dict[str, str]:
        """A BadRequest.fieldViolations entry."""
        if self.field is None:
            return {"description": self.description}
        return {"field": self.field, "description": self.description}


def invalid_argument(
    message: str,
    *,
    rule: str,
    field: str | None = None,
    interactions_code: str | None = None,
) -> ApiError:
    """400 INVALID_ARGUMENT, with a BadRequest field violation when the field is known."""
    violations = [Violation(field, message)] if field else []
    return bad_request(message, violations, rule=rule, interactions_code=interactions_code)


def bad_request(
    message: str,
    violations: Sequence[Violation],
    *,
    rule: str,
    interactions_code: str | None = None,
) -> ApiError:
    details = []
    if violations:
        entries = [violation.detail() for violation in violations]
        details = [{"@type": TYPE_PREFIX + "BadRequest", "fieldViolations": entries}]
    return ApiError(
        400, "INVALID_ARGUMENT", message, details, rule=rule, interactions_code=interactions_code
    )


def field_violations(violations: Sequence[Violation], *, rule: str, interactions: bool) -> ApiError:
    """Every violation of a body at once, one line each, as the service lists them."""
    message = "\n".join(v.description for v in violations)
    code = "parameter_unknown" if rule == "fields.unknown" and interactions else None
    return bad_request(message, violations, rule=rule, interactions_code=code)


# ---------------------------------------------------------------------------- images and files


def bad_base64(field: str) -> ApiError:
    return invalid_argument(
        f"Invalid value at '{field}' (TYPE_BYTES), Base64 decoding failed.",
        rule="image.base64",
        field=field,
    )


def unsupported_mime(mime_type: str) -> ApiError:
    return ApiError(
        400, "INVALID_ARGUMENT", f"Unsupported MIME type: {mime_type}", rule="image.mime"
    )


def undecodable_image() -> ApiError:
    return ApiError(
        400,
        "INVALID_ARGUMENT",
        f"Unable to process input image. Please retry or report in {TROUBLESHOOTING}",
        rule="image.undecodable",
    )


def file_not_found(file_id: str) -> ApiError:
    # The real service does not tell "missing" from "not yours" or "expired": all are this 403.
    return ApiError(
        403,
        "PERMISSION_DENIED",
        f"You do not have permission to access the File {file_id} or it may not exist.",
        rule="file.not-found",
    )


def file_not_active(file_id: str) -> ApiError:
    return ApiError(
        400,
        "FAILED_PRECONDITION",
        f"The File {file_id} is not in an ACTIVE state and usage is not allowed.",
        rule="file.not-active",
    )


# ---------------------------------------------------------------------------- resources


def model_not_found(
    model: str, version: str, method: str, *, rule: str = "model.unknown"
) -> ApiError:
    return ApiError(
        404,
        "NOT_FOUND",
        f"models/{model} is not found for API version {version}, or is not supported for "
        f"{method}. Call ListModels to see the list of available models and their supported "
        "methods.",
        rule=rule,
        interactions_code="model_not_found",
    )


def not_found(message: str, *, rule: str) -> ApiError:
    return ApiError(404, "NOT_FOUND", message, rule=rule)


def unsupported_here(message: str) -> ApiError:
    """What the service takes but this double cannot answer (rule double.unsupported)."""
    return invalid_argument(
        f"{message} (not supported by the local server)", rule="double.unsupported"
    )


# ---------------------------------------------------------------------------- limits and money


@dataclass(frozen=True, slots=True)
class QuotaHit:
    """One exhausted quota: its metric and id, its limit, the wait until it reopens."""

    metric: str
    quota_id: str
    limit: int
    retry_seconds: float
    daily: bool


def quota_exceeded(hits: Sequence[QuotaHit], model: str) -> ApiError:
    """429 RESOURCE_EXHAUSTED listing every exhausted quota (one QuotaFailure violation each),
    with RetryInfo for the longest wait: nothing succeeds before every window reopens."""
    wait = max(hit.retry_seconds for hit in hits)
    lines = "".join(
        f"* Quota exceeded for metric: {hit.metric}, limit: {hit.limit}, model: {model}\n"
        for hit in hits
    )
    message = (
        "You exceeded your current quota, please check your plan and billing details. For more "
        f"information on this error, head to: {RATE_LIMIT_DOCS}.\n{lines}"
        f"Please retry in {wait:.1f}s."
    )
    violations = [
        {
            "quotaMetric": hit.metric,
            "quotaId": hit.quota_id,
            "quotaDimensions": {"location": "global", "model": model},
            "quotaValue": str(hit.limit),
        }
        for hit in hits
    ]
    details: list[dict[str, Any]] = [
        {"@type": TYPE_PREFIX + "QuotaFailure", "violations": violations},
        {
            "@type": TYPE_PREFIX + "Help",
            "links": [
                {"description": "Learn more about Gemini API quotas", "url": RATE_LIMIT_DOCS}
            ],
        },
        {"@type": TYPE_PREFIX + "RetryInfo", "retryDelay": f"{max(1, math.ceil(wait))}s"},
    ]
    daily = any(hit.daily for hit in hits)
    return ApiError(
        429,
        "RESOURCE_EXHAUSTED",
        message,
        details,
        rule="quota.exceeded",
        interactions_code="quota_exceeded" if daily else "rate_limit_exceeded",
        retry_after=wait,
    )


VERTEX_429_DOCS = "https://cloud.google.com/vertex-ai/generative-ai/docs/error-code-429"


def vertex_resource_exhausted(quota: ApiError) -> ApiError:
    """Vertex AI's 429 for `quota` (a `quota_exceeded` of this server's quotas): the bare
    Status its dynamic shared quota and Provisioned Throughput answer with, no QuotaFailure and
    no RetryInfo (the message as the SDK's users quote it: python-genai issue 2001)."""
    message = (
        "Resource exhausted. Please try again later. Please refer to "
        f"{VERTEX_429_DOCS} for more details."
    )
    return ApiError(429, "RESOURCE_EXHAUSTED", message, rule=quota.rule)


def credits_depleted() -> ApiError:
    """402: the prepaid balance is spent; the service says not to retry."""
    return ApiError(
        402,
        "RESOURCE_EXHAUSTED",
        PREPAY_DEPLETED,
        rule="credits.depleted",
        interactions_code="payment_required",
    )


# ---------------------------------------------------------------------------- injected faults


def internal() -> ApiError:
    return ApiError(
        500,
        "INTERNAL",
        f"An internal error has occurred. Please retry or report in {TROUBLESHOOTING}",
        rule="faults.injected",
    )


def unavailable() -> ApiError:
    return ApiError(
        503,
        "UNAVAILABLE",
        "The model is overloaded. Please try again later.",
        rule="faults.injected",
    )


def deadline_exceeded() -> ApiError:
    return ApiError(
        504, "DEADLINE_EXCEEDED", "The request timed out. Please try again.", rule="faults.injected"
    )


# ---------------------------------------------------------------------------- Batch Mode

BATCH_QUOTA_MESSAGE = (
    "You exceeded your current quota, please check your plan and billing details. For more "
    f"information on this error, head to: {RATE_LIMIT_DOCS}. To monitor your current usage, head "
    "to: https://ai.dev/rate-limit. "
)


def batch_limit() -> ApiError:
    """429 without QuotaFailure or RetryInfo: the batch answer seen in public reports."""
    help_link = {"description": "Learn more about Gemini API quotas", "url": RATE_LIMIT_DOCS}
    return ApiError(
        429,
        "RESOURCE_EXHAUSTED",
        BATCH_QUOTA_MESSAGE,
        [{"@type": TYPE_PREFIX + "Help", "links": [help_link]}],
        rule="batch.limit",
    )


def batch_not_found(batch_id: str) -> ApiError:
    return not_found(f"Batch batches/{batch_id} not found.", rule="batch.not-found")


def batch_ended(batch_id: str, state: str) -> ApiError:
    return ApiError(
        400,
        "FAILED_PRECONDITION",
        f"Batch batches/{batch_id} is in state {state}; only pending or running batches can be "
        "cancelled.",
        rule="batch.state",
    )


def download_refused(file_id: str) -> ApiError:
    return invalid_argument(
        f"File files/{file_id} cannot be downloaded: only generated files can be downloaded "
        "(with alt=media), uploaded files can't be downloaded.",
        rule="file.download",
    )
