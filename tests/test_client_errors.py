"""One error taxonomy: `GeminiError.kind` for every way the service (or the network) says no.

Error bodies are the service's own shapes (google.rpc.Status for generateContent and Files, a
lowercase string code for Interactions); where the local server can produce an error, it does.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from pipeline.gemini import GeminiError
from pipeline.gemini.errors import RETRYABLE_KINDS, error_from_response, retry_after
from pipeline.gemini.types import GenerateRequest, ImagePart
from pipeline.run.failures import STREAK, Action, Health, judge
from tests.test_client import (
    KEY,
    MODEL_3,
    MODEL_25,
    connect,
    detect_request,
    rectangle_png,
    serve,
)

RPC = "type.googleapis.com/google.rpc."


def status_body(code: int, status: str, message: str, *details: dict[str, Any]) -> str:
    error: dict[str, Any] = {"code": code, "status": status, "message": message}
    if details:
        error["details"] = list(details)
    return json.dumps({"error": error})


def quota_failure(*quota_ids: str) -> dict[str, Any]:
    violations = [
        {"quotaMetric": f"generativelanguage.googleapis.com/{q.lower()}", "quotaId": q}
        for q in quota_ids
    ]
    return {"@type": RPC + "QuotaFailure", "violations": violations}


def error_info(reason: str) -> dict[str, Any]:
    return {"@type": RPC + "ErrorInfo", "reason": reason, "domain": "googleapis.com"}


def interactions_body(code: str, message: str = "m") -> str:
    return json.dumps({"error": {"code": code, "message": message}})


PER_MINUTE = "GenerateRequestsPerMinutePerProjectPerModel"
PER_DAY = "GenerateRequestsPerDayPerProjectPerModel"
TOKENS_PER_MINUTE = "GenerateContentInputTokensPerModelPerMinute"

CASES: list[tuple[int, str, str]] = [
    (429, status_body(429, "RESOURCE_EXHAUSTED", "slow", quota_failure(PER_MINUTE)), "rate_limit"),
    (
        429,
        status_body(429, "RESOURCE_EXHAUSTED", "q", quota_failure(TOKENS_PER_MINUTE, PER_DAY)),
        "daily_quota",  # a per-day violation anywhere in the list, not only the first
    ),
    (
        402,
        status_body(
            402,
            "RESOURCE_EXHAUSTED",
            "Your prepayment credits are depleted. Please add credits. Do not retry.",
        ),
        "credits",
    ),
    (400, status_body(400, "INVALID_ARGUMENT", "bad", error_info("API_KEY_INVALID")), "auth"),
    (400, status_body(400, "INVALID_ARGUMENT", "old", error_info("API_KEY_EXPIRED")), "auth"),
    (401, status_body(401, "UNAUTHENTICATED", "who?"), "auth"),
    (
        403,
        status_body(
            403,
            "PERMISSION_DENIED",
            "Method doesn't allow unregistered callers (callers without established identity).",
        ),
        "auth",
    ),
    (403, status_body(403, "PERMISSION_DENIED", "You do not have permission"), "permission"),
    (404, status_body(404, "NOT_FOUND", "models/x is not found"), "not_found"),
    (
        400,
        status_body(400, "FAILED_PRECONDITION", "The file files/abc is not in an ACTIVE state"),
        "failed_precondition",
    ),
    (
        400,
        status_body(400, "FAILED_PRECONDITION", "User location is not supported for the API use."),
        "failed_precondition",
    ),
    (
        400,
        status_body(400, "INVALID_ARGUMENT", "Request contains an invalid argument."),
        "invalid_request",
    ),
    (409, status_body(409, "ABORTED", "conflict"), "aborted"),
    (500, status_body(500, "INTERNAL", "oops"), "server"),
    (502, "<html>Bad Gateway</html>", "server"),
    (503, status_body(503, "UNAVAILABLE", "The model is overloaded."), "server"),
    (504, status_body(504, "DEADLINE_EXCEEDED", "deadline"), "server"),
    (408, "", "timeout"),
    (302, "", "redirect"),
    (429, interactions_body("rate_limit_exceeded"), "rate_limit"),
    (429, interactions_body("too_many_requests"), "rate_limit"),
    (429, interactions_body("quota_exceeded"), "daily_quota"),
    (402, interactions_body("payment_required"), "credits"),
    (401, interactions_body("authentication"), "auth"),
    (403, interactions_body("permission_denied"), "permission"),
    (404, interactions_body("not_found"), "not_found"),
    (400, interactions_body("failed_precondition"), "failed_precondition"),
    (409, interactions_body("aborted"), "aborted"),
    (409, interactions_body("already_exists"), "already_exists"),
    (409, status_body(409, "ALREADY_EXISTS", "File files/a already exists."), "already_exists"),
    (400, interactions_body("safety"), "blocked"),
    (400, interactions_body("recitation"), "blocked"),
    (400, interactions_body("language"), "blocked"),
    (400, interactions_body("prohibited_content"), "blocked"),
    (400, interactions_body("spii"), "blocked"),
    (400, interactions_body("blocklist"), "blocked"),
    (400, interactions_body("image_safety"), "blocked"),
    (400, interactions_body("content_blocked"), "blocked"),
    (400, interactions_body("invalid_request"), "invalid_request"),
    (400, interactions_body("parameter_unknown"), "invalid_request"),
    (500, interactions_body("api_error"), "server"),
    (503, interactions_body("service_unavailable"), "server"),
]


@pytest.mark.parametrize(("code", "body", "kind"), CASES)
def test_error_kinds(code: int, body: str, kind: str) -> None:
    error = error_from_response(code, body)
    assert error.kind == kind
    assert error.retryable is (kind in RETRYABLE_KINDS)
    assert f"[{kind}]" in str(error)


def test_retryable_kinds_are_the_transient_ones() -> None:
    transient = {"rate_limit", "aborted", "server", "timeout", "transport", "data_loss"}
    assert transient == RETRYABLE_KINDS


def test_already_exists_is_no_conflict_to_retry() -> None:
    """The api-errors page: `already_exists` (409) "the entity you tried to create already
    exists" is not retried (the same request collides again); `aborted` (409) is."""
    for body in (interactions_body("already_exists"), status_body(409, "ALREADY_EXISTS", "x")):
        error = error_from_response(409, body)
        assert (error.kind, error.retryable) == ("already_exists", False)
        assert judge(error, uploaded=False).action is Action.IMAGE  # an error row, not a retry
    assert error_from_response(409, interactions_body("aborted")).retryable


def test_every_quota_violation_is_kept_in_order() -> None:
    body = status_body(
        429,
        "RESOURCE_EXHAUSTED",
        "You exceeded your current quota.",
        quota_failure(PER_MINUTE, TOKENS_PER_MINUTE),
        quota_failure(PER_DAY),
        {"@type": RPC + "RetryInfo", "retryDelay": "17s"},
    )
    error = error_from_response(429, body)
    assert error.quotas == (PER_MINUTE, TOKENS_PER_MINUTE, PER_DAY)
    assert error.quota == PER_DAY  # the one that matters: today is over
    assert (error.kind, error.retry_delay, error.retryable) == ("daily_quota", 17.0, False)
    metric_only = {
        "@type": RPC + "QuotaFailure",
        "violations": [{"quotaMetric": "x/requests_per_day"}],
    }
    assert error_from_response(
        429, status_body(429, "RESOURCE_EXHAUSTED", "q", metric_only)
    ).kind == ("daily_quota")


def test_retry_after_headers_follow_the_interactions_sdk() -> None:
    body = interactions_body("rate_limit_exceeded")
    both = error_from_response(429, body, {"retry-after-ms": "1500", "Retry-After": "9"})
    assert both.retry_delay == 1.5  # retry-after-ms wins
    assert error_from_response(429, body, {"Retry-After": "3"}).retry_delay == 3.0
    assert (
        error_from_response(429, body, {"retry-after-ms": "-5", "Retry-After": "2"}).retry_delay
        == 2
    )
    assert error_from_response(429, body, {"Retry-After": "soon"}).retry_delay is None
    now = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after({"Retry-After": "Sun, 01 Mar 2026 12:00:30 GMT"}, now) == 30.0
    assert retry_after({"Retry-After": "Sun, 01 Mar 2026 11:00:00 GMT"}, now) == 0.0
    # RetryInfo in the body is the service's own word and comes first.
    with_info = status_body(
        429, "RESOURCE_EXHAUSTED", "q", {"@type": RPC + "RetryInfo", "retryDelay": "0.5s"}
    )
    assert error_from_response(429, with_info, {"retry-after-ms": "9000"}).retry_delay == 0.5


# ------------------------------------------------------------------ from the local server


async def test_kinds_of_the_local_servers_errors() -> None:
    png = ImagePart("image/png", rectangle_png())
    async with serve(rpm=1) as server:
        async with connect(server, api_key="AIzaWRONG-key-1234") as client:
            for flavor, model in (("generateContent", MODEL_25), ("interactions", MODEL_3)):
                with pytest.raises(GeminiError) as bad_key:
                    await client.generate(detect_request(png, model=model), flavor=flavor)
                assert bad_key.value.kind == "auth", flavor
        async with connect(server) as client:
            with pytest.raises(GeminiError) as gone:
                await client.get_file("files/no-such-file")
            with pytest.raises(GeminiError) as model:
                await client.generate(detect_request(png, model="no-such-model"))
            with pytest.raises(GeminiError) as limited:
                for _ in range(3):
                    await client.generate_content(detect_request(png))
    assert (gone.value.kind, model.value.kind) == ("permission", "not_found")
    assert (limited.value.kind, limited.value.retryable) == ("rate_limit", True)


async def test_missing_key_is_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    async with serve() as server, connect(server, api_key=None) as client:
        with pytest.raises(GeminiError) as caught:
            await client.list_files()
    assert caught.value.kind == "auth" and not caught.value.retryable


async def test_daily_quota_from_the_local_server_is_not_retryable() -> None:
    request = detect_request(ImagePart("image/png", rectangle_png()))
    async with serve(rpd=1) as server, connect(server) as client:
        await client.generate_content(request)
        with pytest.raises(GeminiError) as caught:
            await client.generate_content(request)
    error = caught.value
    assert (error.code, error.kind, error.retryable) == (429, "daily_quota", False)
    assert error.quota and "PerDay" in error.quota


async def test_processing_file_is_failed_precondition_and_transport_kinds() -> None:
    async with serve(file_processing_seconds=300.0) as server, connect(server) as client:
        uploaded = await client.upload_file(rectangle_png(), "image/png")
        with pytest.raises(GeminiError) as caught:
            await client.generate_content(
                detect_request(ImagePart("image/png", file_uri=uploaded.uri))
            )
    assert caught.value.kind == "failed_precondition"
    async with serve(latency_ms=3000, seed=1) as slow, connect(slow) as client:
        with pytest.raises(GeminiError) as late:
            await client.generate_content(
                GenerateRequest(model=MODEL_25, prompt="hi"), timeout=0.05
            )
    assert (late.value.kind, late.value.retryable) == ("timeout", True)
    assert KEY not in repr(late.value)


def test_a_streak_of_429s_after_answers_is_a_tight_quota_not_the_runs_fault() -> None:
    """Eight 429s in a row once answers have come back are a quota the pool is still finding
    (the 429-storm run stopped with exit 2, "refused the same way", under CI's load); the same
    streak with nothing ever answered is the run's (a quota of 0 for this model, say)."""
    storm = GeminiError(429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (rpm).")
    verdict = judge(storm, uploaded=False)
    assert verdict.action == Action.RETRY
    answered = Health()
    answered.success()
    assert all(answered.failure(storm, verdict) is None for _ in range(3 * STREAK))
    never = Health()
    found = [never.failure(storm, verdict) for _ in range(STREAK)]
    assert found[:-1] == [None] * (STREAK - 1)
    assert found[-1] is not None and found[-1].action == Action.RUN
    assert "none answered" in found[-1].reason
