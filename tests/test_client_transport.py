"""The key stays home: no redirects followed, no clear text off the machine, no echo kept.

Redirect targets are real loopback endpoints that count what reaches them: a followed redirect
would show up there, with the key.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp import web

from pipeline.gemini import GeminiClient, GeminiError
from pipeline.gemini.transport import is_loopback
from pipeline.gemini.types import GenerateRequest
from tests.test_client import KEY, MODEL_25, assert_key_absent, scripted_endpoint


class Elsewhere:
    """Another host's endpoint: records every request that reaches it."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(dict(request.headers))
        return web.json_response({"files": []})


def redirecting(target: str, status: int) -> web.Application:
    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": f"{target}{request.path_qs}"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    return app


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirects_are_never_followed(status: int) -> None:
    elsewhere = Elsewhere()
    async with scripted_endpoint(elsewhere.app()) as other:
        target = other.replace("127.0.0.1", "localhost")
        async with (
            scripted_endpoint(redirecting(target, status)) as base_url,
            GeminiClient(KEY, base_url=base_url) as client,
        ):
            calls = [
                client.generate_content(GenerateRequest(model=MODEL_25, prompt="hi")),
                client.list_files(),
                client.upload_file(b"12345", "image/png"),
                client.download_file("files/batch-1"),
            ]
            for call in calls:
                with pytest.raises(GeminiError) as caught:
                    await call
                error = caught.value
                assert (error.code, error.kind, error.retryable) == (status, "redirect", False)
                assert "localhost" in error.message  # names the host, nothing more
                assert_key_absent(error, client, KEY)
    assert elsewhere.requests == []


def test_clear_text_http_is_refused_off_loopback() -> None:
    for url in ("http://example.com", "http://10.0.0.5:8080", "http://[2001:db8::1]/"):
        with pytest.raises(ValueError, match="allow_insecure_http"):
            GeminiClient(KEY, base_url=url)
        GeminiClient(KEY, base_url=url, allow_insecure_http=True)  # the caller's explicit call
    for url in ("http://127.0.0.1:1", "http://127.8.9.10", "http://[::1]:9", "http://localhost:80"):
        GeminiClient(KEY, base_url=url)
    GeminiClient(KEY, base_url="https://generativelanguage.googleapis.com")
    for url in ("ftp://host/", "generativelanguage.googleapis.com", "https://"):
        with pytest.raises(ValueError):
            GeminiClient(KEY, base_url=url)
    assert is_loopback("127.255.0.1") and is_loopback("::1") and is_loopback("LOCALHOST")
    assert not is_loopback("localhost.example.com") and not is_loopback("128.0.0.1")


async def test_key_echoed_by_the_model_is_redacted_from_raw_and_text() -> None:
    seen: list[dict[str, str]] = []

    async def echo(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        text = f"your key is {request.headers['x-goog-api-key']}"
        body = {"candidates": [{"content": {"parts": [{"text": text}]}, "finishReason": "STOP"}]}
        return web.json_response(body)

    app = web.Application()
    app.router.add_post("/v1beta/models/{action}", echo)
    async with (
        scripted_endpoint(app) as base_url,
        GeminiClient(KEY, base_url=base_url, timeout=7.2) as client,
    ):
        response = await client.generate_content(GenerateRequest(model=MODEL_25, prompt="hi"))
        await client.generate_content(GenerateRequest(model=MODEL_25, prompt="hi"), timeout=2.5)

    assert KEY not in response.raw and KEY not in response.text and KEY not in repr(response)
    assert response.text == "your key is [redacted]"
    assert json.loads(response.raw)["candidates"][0]["finishReason"] == "STOP"  # still JSON
    # X-Server-Timeout: the ceiling of each request's deadline in seconds (the SDK's rule).
    assert [headers["X-Server-Timeout"] for headers in seen] == ["8", "3"]


async def test_key_in_an_error_body_is_redacted() -> None:
    async def refuse(request: web.Request) -> web.Response:
        key = request.headers["x-goog-api-key"]
        body: dict[str, Any] = {"code": 400, "status": "INVALID_ARGUMENT"}
        body["message"] = f"API key {key} not valid."
        return web.json_response({"error": body}, status=400)

    app = web.Application()
    app.router.add_post("/v1beta/models/{action}", refuse)
    async with scripted_endpoint(app) as base_url, GeminiClient(KEY, base_url=base_url) as client:
        with pytest.raises(GeminiError) as caught:
            await client.generate_content(GenerateRequest(model=MODEL_25, prompt="hi"))
        assert_key_absent(caught.value, client, KEY)
    assert "[redacted]" in caught.value.message
