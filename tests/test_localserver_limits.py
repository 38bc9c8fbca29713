"""Limits over loopback: RPM / TPM / RPD in the service's windows, one 429 listing every quota
hit at once, the Interactions flavour of 429s (lowercase codes, retry-after-ms), and prepaid
credits running out (402)."""

from __future__ import annotations

import io
import math

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pipeline.localserver.errors import PREPAY_DEPLETED
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer
from tests.conftest import START, Clock
from tests.localserver_support import (
    KEY,
    b64,
    draw_scene,
    generate,
    inline_request,
    interact,
    interaction_request,
    upload,
)


def details_by_type(error: dict) -> dict[str, dict]:
    return {d["@type"].rsplit(".", 1)[-1]: d for d in error["details"]}


async def test_rpm_fixed_calendar_minute_windows(http):
    clock = Clock(START + 45)
    async with LocalServer(ServerOptions(rpm=2), clock=clock) as server:
        data, _ = draw_scene()
        body = inline_request(data, "Describe.")
        assert [(await generate(http, server, body))[0] for _ in range(2)] == [200, 200]
        status, answer = await generate(http, server, body)
        assert status == 429
        error = answer["error"]
        assert error["status"] == "RESOURCE_EXHAUSTED"
        details = details_by_type(error)
        assert details["RetryInfo"]["retryDelay"] == "15s"  # to the next calendar minute
        violation = details["QuotaFailure"]["violations"][0]
        assert violation["quotaId"] == "GenerateRequestsPerMinutePerProjectPerModel"
        assert violation["quotaValue"] == "2"
        status, _ = await generate(http, server, body, model="gemini-2.5-flash-lite")  # per model
        assert status == 200
        clock.now = START + 60  # a new window: two more at once, four within 15 seconds
        assert [(await generate(http, server, body))[0] for _ in range(3)] == [200, 200, 429]
        assert server.stats()["quota_rejections"]["rpm"] == 2


async def test_tpm_counts_input_tokens(http):
    clock = Clock(START + 10)
    async with LocalServer(ServerOptions(tpm=600), clock=clock) as server:
        data, _ = draw_scene()
        body = inline_request(data, "Describe.")  # 258 + 3 tokens
        statuses = [(await generate(http, server, body))[0] for _ in range(3)]
        assert statuses == [200, 200, 429]
        _, answer = await generate(http, server, body)
        violation = answer["error"]["details"][0]["violations"][0]
        assert violation["quotaId"] == "GenerateContentInputTokensPerModelPerMinute"
        assert answer["error"]["details"][-1]["retryDelay"] == "50s"


async def test_rpd_resets_at_midnight_pacific_and_interactions_codes(http):
    clock = Clock(START + 3600)  # 01:00 Pacific
    async with LocalServer(ServerOptions(rpd=1), clock=clock) as server:
        data, _ = draw_scene()
        body = {
            "model": "gemini-3-flash-preview",
            "input": [{"type": "image", "data": b64(data), "mime_type": "image/png"}],
            "store": False,
        }
        assert (await interact(http, server, body))[0] == 200
        status, answer = await interact(http, server, body)
        assert status == 429 and answer["error"]["code"] == "quota_exceeded"
        status, answer = await generate(
            http, server, inline_request(data, "x"), model="gemini-3-flash-preview"
        )
        assert answer["error"]["details"][-1]["retryDelay"] == f"{23 * 3600}s"
        clock.now = START + 24 * 3600
        assert (await interact(http, server, body))[0] == 200
    async with LocalServer(ServerOptions(rpm=1), clock=Clock()) as server:
        await interact(http, server, body)
        status, answer = await interact(http, server, body)
        assert status == 429 and answer["error"]["code"] == "rate_limit_exceeded"


async def test_several_quotas_hit_at_once_are_listed_in_one_429(http):
    clock = Clock(START + 3600 + 45)  # 01:00:45 Pacific
    async with LocalServer(ServerOptions(rpm=2, tpm=10_000, rpd=2), clock=clock) as server:
        data, _ = draw_scene()
        body = inline_request(data, "Describe.")
        assert [(await generate(http, server, body))[0] for _ in range(2)] == [200, 200]
        status, answer = await generate(http, server, body)
        assert status == 429
        error = answer["error"]
        details = details_by_type(error)
        ids = [v["quotaId"] for v in details["QuotaFailure"]["violations"]]
        assert ids == [
            "GenerateRequestsPerMinutePerProjectPerModel",
            "GenerateRequestsPerDayPerProjectPerModel",  # the per-day one is not first
        ]
        assert details["RetryInfo"]["retryDelay"] == f"{23 * 3600 - 45}s"  # the longest wait
        assert error["message"].count("* Quota exceeded for metric:") == 2
        assert server.stats()["quota_rejections"] == {"rpm": 1, "tpm": 0, "rpd": 1}
        status, answer, headers = await interact(
            http, server, interaction_request(data), with_headers=True
        )
        assert status == 200  # another model's quotas
        body = {**interaction_request(data), "model": "gemini-2.5-flash"}
        status, answer, headers = await interact(http, server, body, with_headers=True)
        assert status == 429
        assert answer["error"]["code"] == "quota_exceeded"  # a per-day violation is in the list
        assert set(answer["error"]) == {"code", "message"}  # no details on Interactions
        assert headers["retry-after-ms"] == str((23 * 3600 - 45) * 1000)
        assert headers["Retry-After"] == str(23 * 3600 - 45)


async def test_interactions_429s_per_minute_carry_retry_after_ms(http):
    clock = Clock(START + 59.5)
    async with LocalServer(ServerOptions(rpm=1), clock=clock) as server:
        body = interaction_request(draw_scene()[0])
        assert (await interact(http, server, body))[0] == 200
        status, answer, headers = await interact(http, server, body, with_headers=True)
        assert (status, answer["error"]["code"]) == (429, "rate_limit_exceeded")
        assert headers["retry-after-ms"] == "500"  # to the next calendar minute
        status, answer = await generate(http, server, inline_request(draw_scene()[0], "x"))
        assert status == 200 and "retry-after-ms" not in answer


def flash_cost(usage: dict) -> float:
    """USD of one answer of gemini-2.5-flash: $0.30 / $2.50 per 1M (models.json); output
    includes thinking."""
    output = usage["candidatesTokenCount"] + usage.get("thoughtsTokenCount", 0)
    return (usage["promptTokenCount"] * 0.30 + output * 2.50) / 1e6


@pytest.mark.parametrize("budget", [0.0, 0.001])
async def test_spent_credits_answer_402_and_uploads_stay_free(http, budget):
    async with LocalServer(ServerOptions(credit_budget_usd=budget)) as server:
        data, _ = draw_scene()
        body = inline_request(data, "Describe.")
        answers = []
        while (answer := await generate(http, server, body))[0] == 200:
            answers.append(answer[1])
            assert len(answers) < 100
        if budget:  # answered while the balance lasted: the last one overdraws it
            cost = flash_cost(answers[0]["usageMetadata"])
            assert len(answers) == math.ceil(budget / cost)
        else:
            assert answers == []
        status, answer = await generate(http, server, body)
        assert answer == {
            "error": {"code": 402, "message": PREPAY_DEPLETED, "status": "RESOURCE_EXHAUSTED"}
        }
        status, answer = await interact(http, server, interaction_request(data))
        assert (status, answer["error"]["code"]) == (402, "payment_required")
        assert answer["error"]["message"].startswith("Your prepayment credits are depleted.")
        await upload(http, server, data)  # the Files API is free of charge
        stats = server.stats()
        assert stats["credits"]["spent_usd"] >= budget
        assert stats["refused_by_rule"]["credits.depleted"] == 3
        assert stats["requests"]["POST /v1beta/interactions"] == {"402": 1}


async def test_credits_are_spent_at_the_model_tables_price(http):
    async with LocalServer(ServerOptions(credit_budget_usd=1.0)) as server:
        data, _ = draw_scene()
        _, answer = await generate(http, server, inline_request(data, "Describe."))
        expected = flash_cost(answer["usageMetadata"])
        assert server.stats()["credits"]["spent_usd"] == pytest.approx(expected, abs=1e-9)


# the request-size limits: the live service's interactive one, Batch Mode's own

MIB = 1 << 20


def padded_png(extra: int) -> bytes:
    """A small scene whose PNG carries `extra` bytes of text chunk: a big body, a cheap image."""
    image = Image.open(io.BytesIO(draw_scene()[0]))
    padding = PngInfo()
    padding.add_text("pad", "x" * extra)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", pnginfo=padding)
    return buffer.getvalue()


def test_the_default_limits_are_the_live_services():
    """100 MB interactive since 2026-01, 20 MB for Batch Mode's inline requests
    (docs/gemini-api.md § Sending images)."""
    assert ServerOptions().inline_limit_bytes == 100 * MIB
    assert ServerOptions().batch_inline_limit_bytes == 20 * MIB


async def test_a_body_over_20_mib_is_taken_interactively_and_refused_inline_in_batch(http):
    data = padded_png(16 * MIB)  # base64: a body of about 21.4 MiB
    async with LocalServer(ServerOptions()) as server:
        body = inline_request(data, "Describe.")
        status, _ = await generate(http, server, body)
        assert status == 200
        status, _ = await interact(http, server, interaction_request(data))
        assert status == 200
        job = {"request": body, "metadata": {"key": "big"}}
        create = {"batch": {"inputConfig": {"requests": {"requests": [job]}}}}
        url = f"{server.base_url}/v1beta/models/gemini-2.5-flash:batchGenerateContent"
        async with http.post(url, json=create, headers={"x-goog-api-key": KEY}) as answer:
            assert answer.status == 400
            error = (await answer.json())["error"]
        assert error["message"] == f"Request payload size exceeds the limit: {20 * MIB} bytes."
        assert server.stats()["refused_by_rule"] == {"body.too-large": 1}


async def test_a_batch_create_is_held_to_the_smaller_limit(http):
    """A server configured smaller than Batch Mode's 20 MiB holds batch creates to it too."""
    options = ServerOptions(inline_limit_bytes=64 * 1024, batch_inline_limit_bytes=128 * 1024)
    assert options.inline_limit_bytes == 64 * 1024
    async with LocalServer(options) as server:
        job = {"request": inline_request(padded_png(80 * 1024), "x"), "metadata": {"key": "a"}}
        create = {"batch": {"inputConfig": {"requests": {"requests": [job]}}}}
        url = f"{server.base_url}/v1beta/models/gemini-2.5-flash:batchGenerateContent"
        async with http.post(url, json=create, headers={"x-goog-api-key": KEY}) as answer:
            assert answer.status == 400
            assert "65536 bytes" in (await answer.json())["error"]["message"]
