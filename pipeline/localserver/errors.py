"""Errors as the real service writes them.

generateContent and the Files API answer a `google.rpc.Status` body
`{"error": {"code": 400, "message": ..., "status": "INVALID_ARGUMENT", "details": [...]}}`;
the Interactions API answers `{"error": {"code": "invalid_request", "message": ...}}` with a
string code (https://ai.google.dev/gemini-api/docs/api-errors). One exception type carries both.
"""

from __future__ import annotations

from typing import Any

TYPE_PREFIX = "type.googleapis.com/google.rpc."
RATE_LIMIT_DOCS = "https://ai.google.dev/gemini-api/docs/rate-limits"
TROUBLESHOOTING = "https://developers.generativeai.google/guide/troubleshooting"

# google.rpc status -> (HTTP status, Interactions API code) where the Interactions API differs
INTERACTIONS_CODES = {
    "INVALID_ARGUMENT": "invalid_request",
    "FAILED_PRECONDITION": "failed_precondition",
    "UNAUTHENTICATED": "authentication",
    "PERMISSION_DENIED": "permission_denied",
    "NOT_FOUND": "not_found",
    "RESOURCE_EXHAUSTED": "rate_limit_exceeded",
    "INTERNAL": "api_error",
    "UNAVAILABLE": "service_unavailable",
    "DEADLINE_EXCEEDED": "deadline_exceeded",
}


class ApiError(Exception):
    """An error answer; renders itself in either wire flavour."""

    def __init__(
        self,
        http_status: int,
        status: str,
        message: str,
        details: list[dict[str, Any]] | None = None,
        *,
        interactions_code: str | None = None,
        interactions_http_status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.status = status
        self.message = message
        self.details = details or []
        self.interactions_code = interactions_code or INTERACTIONS_CODES.get(status, "api_error")
        self.interactions_http_status = interactions_http_status or http_status
        self.headers = headers or {}

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


def missing_key() -> ApiError:
    return ApiError(
        403,
        "PERMISSION_DENIED",
        "Method doesn't allow unregistered callers (callers without established identity). "
        "Please use API Key or other form of API consumer identity to call this API.",
        interactions_code="authentication",
        interactions_http_status=401,
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
        interactions_code="authentication",
        interactions_http_status=401,
    )


def invalid_argument(message: str, field: str | None = None) -> ApiError:
    details = None
    if field:
        details = [
            {
                "@type": TYPE_PREFIX + "BadRequest",
                "fieldViolations": [{"field": field, "description": message}],
            }
        ]
    return ApiError(400, "INVALID_ARGUMENT", message, details)


def bad_base64(field: str) -> ApiError:
    return invalid_argument(
        f"Invalid value at '{field}' (TYPE_BYTES), Base64 decoding failed.", field
    )


def payload_too_large(limit: int) -> ApiError:
    message = f"Request payload size exceeds the limit: {limit} bytes."
    return ApiError(400, "INVALID_ARGUMENT", message)


def unsupported_mime(mime_type: str) -> ApiError:
    return ApiError(400, "INVALID_ARGUMENT", f"Unsupported MIME type: {mime_type}")


def undecodable_image() -> ApiError:
    return ApiError(
        400,
        "INVALID_ARGUMENT",
        f"Unable to process input image. Please retry or report in {TROUBLESHOOTING}",
    )


def file_not_found(file_id: str) -> ApiError:
    # The real service does not tell "missing" from "not yours": both are this 403.
    return ApiError(
        403,
        "PERMISSION_DENIED",
        f"You do not have permission to access the File {file_id} or it may not exist.",
    )


def file_not_active(file_id: str) -> ApiError:
    return ApiError(
        400,
        "FAILED_PRECONDITION",
        f"The File {file_id} is not in an ACTIVE state and usage is not allowed.",
    )


def model_not_found(model: str, version: str, method: str) -> ApiError:
    return ApiError(
        404,
        "NOT_FOUND",
        f"models/{model} is not found for API version {version}, or is not supported for "
        f"{method}. Call ListModels to see the list of available models and their supported "
        "methods.",
        interactions_code="model_not_found",
    )


def not_found(message: str) -> ApiError:
    return ApiError(404, "NOT_FOUND", message)


def quota_exceeded(
    *,
    metric: str,
    quota_id: str,
    limit: int,
    model: str,
    retry_seconds: float,
    daily: bool,
) -> ApiError:
    """429 RESOURCE_EXHAUSTED naming the quota, with RetryInfo until the next window opens."""
    delay = max(1, int(retry_seconds + 0.999))
    message = (
        "You exceeded your current quota, please check your plan and billing details. For more "
        f"information on this error, head to: {RATE_LIMIT_DOCS}.\n"
        f"* Quota exceeded for metric: {metric}, limit: {limit}, model: {model}\n"
        f"Please retry in {retry_seconds:.1f}s."
    )
    details = [
        {
            "@type": TYPE_PREFIX + "QuotaFailure",
            "violations": [
                {
                    "quotaMetric": metric,
                    "quotaId": quota_id,
                    "quotaDimensions": {"location": "global", "model": model},
                    "quotaValue": str(limit),
                }
            ],
        },
        {
            "@type": TYPE_PREFIX + "Help",
            "links": [
                {"description": "Learn more about Gemini API quotas", "url": RATE_LIMIT_DOCS}
            ],
        },
        {"@type": TYPE_PREFIX + "RetryInfo", "retryDelay": f"{delay}s"},
    ]
    return ApiError(
        429,
        "RESOURCE_EXHAUSTED",
        message,
        details,
        interactions_code="quota_exceeded" if daily else "rate_limit_exceeded",
    )


def internal() -> ApiError:
    return ApiError(
        500,
        "INTERNAL",
        f"An internal error has occurred. Please retry or report in {TROUBLESHOOTING}",
    )


def unavailable() -> ApiError:
    return ApiError(503, "UNAVAILABLE", "The model is overloaded. Please try again later.")


def deadline_exceeded() -> ApiError:
    return ApiError(504, "DEADLINE_EXCEEDED", "The request timed out. Please try again.")
