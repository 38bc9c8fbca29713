"""Answers as the real service gives them: continued over several hops, read the SDK's way.

Continuation hops come from a small service stand-in (real aiohttp handlers over loopback) that
cuts an answer at a "decode limit" and hands out a continuation token, checking that each hop
re-sends the original body plus the token, as the real service requires with `store: false`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from google.genai import types as sdk_types

from pipeline.gemini import GeminiClient, GeminiError, parse_interaction, parse_response
from pipeline.gemini.content import parse_generate_content
from pipeline.gemini.interactions import build_interaction_body
from pipeline.gemini.schema import json_schema
from pipeline.gemini.types import GenerateRequest, ImagePart
from pipeline.tasks import TaskSettings, get_task
from pipeline.tasks.detect import detection_schema
from tests.conftest import until
from tests.test_client import (
    KEY,
    MODEL_3,
    MODEL_25,
    assert_box,
    connect,
    detect_request,
    only_box,
    rectangle_png,
    scripted_endpoint,
    serve,
)

ANSWER = '[{"box_2d": [200, 250, 700, 750], "label": "red rectangle"}]'
PIECES = (ANSWER[:17], ANSWER[17:40], ANSWER[40:])  # the answer as three hops cut it


def interaction_hop(index: int, pieces: tuple[str, ...], token: str | None) -> dict[str, Any]:
    """Hop `index` of a cut answer: a thought, then the next piece of text."""
    last = index == len(pieces) - 1
    hop: dict[str, Any] = {
        "id": f"hop-{index}",
        "status": "completed" if last else "requires_continuation",
        "steps": [
            {"type": "thought", "signature": f"sig{index}"},
            {"type": "model_output", "content": [{"type": "text", "text": pieces[index]}]},
        ],
        "usage": {
            "total_input_tokens": 1000 + 10 * index,
            "total_output_tokens": 7,
            "total_thought_tokens": 3,
            "total_tokens": 1010 + 10 * index,
            "input_tokens_by_modality": [
                {"modality": "text", "tokens": 10 + 10 * index},
                {"modality": "image", "tokens": 990},
            ],
        },
    }
    if index:
        hop["steps"].insert(0, {"type": "user_input", "content": [{"type": "text", "text": "x"}]})
    if token:
        hop["continuation_token"] = token
    return hop


def content_hop(index: int, pieces: tuple[str, ...], token: str | None) -> dict[str, Any]:
    last = index == len(pieces) - 1
    candidate: dict[str, Any] = {
        "content": {"role": "model", "parts": [{"text": pieces[index]}]},
        "finishReason": "STOP" if last else "CONTINUATION",
    }
    if token:
        candidate["continuationToken"] = token
    usage = {"promptTokenCount": 1000, "candidatesTokenCount": 7, "totalTokenCount": 1007}
    usage["promptTokensDetails"] = [{"modality": "IMAGE", "tokenCount": 990}]
    return {"candidates": [candidate], "usageMetadata": usage}


class CuttingService:
    """Answers every request in `len(pieces)` hops; records what each hop was sent.

    `token_key` is where the request carries the token; `fail_at` answers that hop (by count of
    requests) with a 503 once; `stall_at` never answers that hop; `same_token` hands back the
    token it was sent with instead of a new one.
    """

    def __init__(
        self,
        hop: Callable[[int, tuple[str, ...], str | None], dict[str, Any]],
        token_key: str,
        pieces: tuple[str, ...] = PIECES,
        *,
        fail_at: int | None = None,
        stall_at: int | None = None,
        same_token: bool = False,
    ) -> None:
        self.hop, self.token_key, self.pieces = hop, token_key, pieces
        self.fail_at, self.stall_at, self.same_token = fail_at, stall_at, same_token
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.sent: list[str] = []  # each answer's body exactly as written
        self.never = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        if len(self.bodies) == self.fail_at:
            error = {"code": 503, "status": "UNAVAILABLE", "message": "overloaded"}
            return web.json_response({"error": error}, status=503)
        if len(self.bodies) == self.stall_at:
            await self.never.wait()  # the client's deadline ends this request
        token = body.get(self.token_key)
        index = 0 if token is None else int(token.removeprefix("tok-"))
        if self.same_token and token:
            next_token: str | None = token
        else:
            next_token = f"tok-{index + 1}" if index + 1 < len(self.pieces) else None
        text = json.dumps(self.hop(index, self.pieces, next_token), indent=1)  # odd spacing
        self.sent.append(text)
        return web.Response(text=text, content_type="application/json")


@asynccontextmanager
async def cutting(service: CuttingService, **kwargs: Any) -> AsyncIterator[GeminiClient]:
    app = web.Application()
    app.router.add_post("/v1beta/interactions", service.handle)
    app.router.add_post("/v1beta/models/{action}", service.handle)
    async with (
        scripted_endpoint(app) as base_url,
        GeminiClient(KEY, base_url=base_url, **kwargs) as client,
    ):
        yield client


def request_3() -> GenerateRequest:
    return detect_request(ImagePart("image/png", b"\x89PNG..."), model=MODEL_3)


# ---------------------------------------------------------------------------- continuation


async def test_interaction_is_continued_until_complete() -> None:
    service = CuttingService(interaction_hop, "continuation_token")
    async with cutting(service) as client:
        response = await client.interact(request_3())

    assert response.text == ANSWER
    assert response.finish_reason == "STOP"
    usage = response.usage
    assert (usage.prompt_tokens, usage.output_tokens, usage.thoughts_tokens) == (3030, 21, 9)
    assert usage.total_tokens == 3060
    assert usage.prompt_by_modality == {"TEXT": 60, "IMAGE": 2970}
    # Every hop re-sends the original body (store: false), later ones with the last token.
    first = service.bodies[0]
    assert "continuation_token" not in first and first["store"] is False
    assert service.bodies[1] == {**first, "continuation_token": "tok-1"}
    assert service.bodies[2] == {**first, "continuation_token": "tok-2"}
    # The raw answer is the hops exactly as received, and reads back the same without a call.
    assert response.raw == "[" + ",".join(service.sent) + "]"
    assert [hop["id"] for hop in json.loads(response.raw)] == ["hop-0", "hop-1", "hop-2"]
    assert parse_response(response.raw) == response == parse_interaction(response.raw)


async def test_generate_content_is_continued_until_stop() -> None:
    service = CuttingService(content_hop, "continuationToken")
    async with cutting(service) as client:
        response = await client.generate_content(
            detect_request(ImagePart("image/png", b"png"), model=MODEL_25)
        )
    assert (response.text, response.finish_reason) == (ANSWER, "STOP")
    assert (response.usage.prompt_tokens, response.usage.output_tokens) == (3000, 21)
    assert response.usage.prompt_by_modality == {"IMAGE": 2970}
    assert service.bodies[1] == {**service.bodies[0], "continuationToken": "tok-1"}
    assert response.raw == "[" + ",".join(service.sent) + "]"
    assert parse_response(response.raw) == response == parse_generate_content(response.raw)


async def test_single_hop_answers_stay_a_plain_object() -> None:
    service = CuttingService(interaction_hop, "continuation_token", pieces=(ANSWER,))
    async with cutting(service) as client:
        response = await client.interact(request_3())
    assert response.raw == service.sent[0]
    assert (response.text, response.finish_reason) == (ANSWER, "STOP")


async def test_continuation_stops_at_max_hops_and_on_a_repeated_token() -> None:
    many = tuple(f"p{i}" for i in range(10))
    capped = CuttingService(interaction_hop, "continuation_token", pieces=many)
    async with cutting(capped, max_hops=3) as client:
        response = await client.interact(request_3())
    assert len(capped.bodies) == 3
    assert (response.text, response.finish_reason) == ("p0p1p2", "CONTINUATION")

    stuck = CuttingService(interaction_hop, "continuation_token", same_token=True)
    async with cutting(stuck) as client:
        response = await client.interact(request_3())
    # Hop 2 handed back the token it was sent with: no progress, so no third hop.
    assert len(stuck.bodies) == 2
    assert response.finish_reason == "CONTINUATION"


async def test_failed_hop_keeps_the_paid_hops_and_resumes_without_buying_them_again() -> None:
    service = CuttingService(interaction_hop, "continuation_token", fail_at=2)
    async with cutting(service) as client:
        with pytest.raises(GeminiError) as caught:
            await client.interact(request_3())
        error = caught.value
        assert (error.code, error.kind, error.retryable) == (503, "server", True)
        assert error.partial is not None
        assert error.partial.raw == service.sent[0]  # the one answered hop, as received
        assert (error.partial.text, error.partial.finish_reason) == (PIECES[0], "CONTINUATION")

        response = await client.interact(request_3(), resume_from=error.partial)

    assert [body.get("continuation_token") for body in service.bodies] == [
        None,
        "tok-1",  # failed with 503
        "tok-1",  # resumed from the partial's token: the first hop is not bought twice
        "tok-2",
    ]
    assert (response.text, response.finish_reason) == (ANSWER, "STOP")
    assert response.raw == "[" + ",".join(service.sent) + "]"
    assert response.usage.prompt_tokens == 3030


async def test_a_cancelled_continuation_hands_back_its_paid_hops() -> None:
    """A caller that cuts a call in flight (the run's tightening deadline cancels it) keeps the
    hops already answered through `hops=`, and resumes from them instead of buying them again."""
    service = CuttingService(interaction_hop, "continuation_token", stall_at=2)
    async with cutting(service) as client:
        hops: list[str] = []
        call = asyncio.ensure_future(client.interact(request_3(), hops=hops))
        await until(lambda: len(service.bodies) == 2)  # hop 1 answered, hop 2 stalled
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        partial = client.answer_of(hops, "interactions")
        assert partial.raw == service.sent[0]  # the one answered hop, as received
        response = await client.interact(request_3(), resume_from=partial)
        service.never.set()  # the cut hop's handler ends: the endpoint shuts down at once (60 s)
    tokens = [body.get("continuation_token") for body in service.bodies]
    assert tokens == [None, "tok-1", "tok-1", "tok-2"]  # hop 1 bought once
    assert (response.text, response.finish_reason) == (ANSWER, "STOP")


async def test_call_timeout_bounds_every_hop_together() -> None:
    """The SDK's CallDeadline: a per-call timeout is the budget of all hops, not of each."""
    service = CuttingService(interaction_hop, "continuation_token", stall_at=2)
    async with cutting(service, timeout=60.0) as client:
        with pytest.raises(GeminiError) as caught:
            # wait_for only bounds a broken client (60 s per hop); the call's own 0.5 s ends it
            await asyncio.wait_for(client.interact(request_3(), timeout=0.5), 20)
        service.never.set()  # let the stalled handler end, so the endpoint shuts down at once
    assert caught.value.kind == "timeout" and caught.value.partial is not None
    assert caught.value.partial.text == PIECES[0]
    assert service.headers[0]["X-Server-Timeout"] == "1"  # ceil(0.5): the SDK's rule
    assert service.headers[1]["X-Server-Timeout"] == "1"


async def test_local_server_answers_read_the_same_live_and_stored() -> None:
    async with serve() as server, connect(server) as client:
        for flavor, model in (("generateContent", MODEL_25), ("interactions", MODEL_3)):
            request = detect_request(ImagePart("image/png", rectangle_png()), model=model)
            live = await client.generate(request, flavor=flavor)
            assert parse_response(live.raw) == live, flavor
            assert_box(only_box(live.text))


# ------------------------------------------------------------------------ reading answers


def interaction(steps: list[Any], status: str = "completed", **extra: Any) -> str:
    return json.dumps({"status": status, "steps": steps, **extra})


def text_step(*texts: str, **extra: Any) -> dict[str, Any]:
    content = [{"type": "text", "text": text} for text in texts]
    return {"type": "model_output", "content": content, **extra}


def test_answer_text_is_every_trailing_model_output_like_the_sdk() -> None:
    thought = {"type": "thought", "signature": "s"}
    call = {"type": "function_call", "name": "f", "arguments": {}}
    user = {"type": "user_input", "content": [{"type": "text", "text": "prompt"}]}
    image = {"type": "image", "data": "AAAA", "mime_type": "image/png"}
    mixed = {"type": "model_output", "content": [{"type": "text", "text": "x"}, image]}
    cases = {
        "ab": [text_step("a"), thought, text_step("b")],
        "b": [text_step("a"), call, text_step("b")],  # a tool step ends the trailing run
        "c": [text_step("a"), user, thought, text_step("c")],  # so does the turn's input
        "yz": [mixed, text_step("y", "z")],  # a non-text item ends it inside a step too
        "q": [text_step("q"), call],  # a trailing tool step before any text is passed over
        "": [user, thought],
    }
    for expected, steps in cases.items():
        assert parse_interaction(interaction(steps)).text == expected, steps


def test_legacy_outputs_read_as_one_model_output_step() -> None:
    legacy = json.dumps(
        {
            "status": "completed",
            "outputs": [{"type": "thought", "signature": "s"}, {"type": "text", "text": "[]"}],
            "usage": {"total_input_tokens": 5, "total_tokens": 6, "total_output_tokens": 1},
        }
    )
    response = parse_response(legacy)
    assert (response.text, response.finish_reason, response.usage.prompt_tokens) == (
        "[]",
        "STOP",
        5,
    )


def test_step_and_interaction_errors_are_surfaced() -> None:
    failed = parse_interaction(
        interaction(
            [text_step("[{", error={"code": 13, "message": "Internal error while decoding"})],
            status="failed",
        )
    )
    assert (failed.text, failed.finish_reason) == ("[{", "OTHER")
    assert failed.finish_message == "13: Internal error while decoding"

    blocked = parse_interaction(
        interaction([], status="failed", errors=[{"code": "safety", "message": "blocked"}])
    )
    assert (blocked.finish_reason, blocked.finish_message) == ("SAFETY", "safety: blocked")
    image = parse_interaction(interaction([], status="failed", errors=[{"code": "image_safety"}]))
    assert image.finish_reason == "IMAGE_SAFETY"
    assert parse_interaction(interaction([text_step("ok")])).finish_message is None


def test_generate_content_finish_reasons_are_carried_through_unchanged() -> None:
    for reason in ("LANGUAGE", "NO_IMAGE", "IMAGE_OTHER", "MALFORMED_RESPONSE", "SOMETHING_NEW"):
        body = {"candidates": [{"content": {"parts": [{"text": "x"}]}, "finishReason": reason}]}
        body["candidates"][0]["finishMessage"] = f"because {reason}"
        response = parse_generate_content(json.dumps(body))
        assert (response.finish_reason, response.finish_message) == (reason, f"because {reason}")


def test_answers_that_are_not_answers_raise_value_error() -> None:
    for body in ("[]", "[1, 2]", '"text"', "{"):
        with pytest.raises(ValueError):
            parse_interaction(body)
        with pytest.raises(ValueError):
            parse_generate_content(body)


# ----------------------------------------------------------------------- request schema


def builtin_schemas() -> list[dict[str, Any]]:
    """The OpenAPI-subset schemas the pipeline's tasks send."""
    schemas = []
    for kind, extra in (("detect", {}), ("classify", {}), ("classify", {"max_objects": 3})):
        settings = TaskSettings(kind=kind, labels=("cat", "dog"), **extra)
        schema = get_task(kind).request(settings).response_schema
        assert schema is not None
        schemas.append(schema)
    return schemas


def test_builtin_schemas_become_json_schema_like_the_sdk_converts_them() -> None:
    settings = TaskSettings(kind="detect", labels=("cat", "dog"), max_objects=25)
    for schema in [detection_schema(settings), *builtin_schemas()]:
        sdk = sdk_types.Schema.model_validate(schema).json_schema
        assert json_schema(schema) == sdk.model_dump(exclude_none=True, by_alias=True, mode="json")
    converted = json_schema(detection_schema(settings))
    assert converted["type"] == "array" and converted["maxItems"] == 25
    assert converted["items"]["properties"]["box_2d"] == {
        "type": "array",
        "items": {"type": "integer"},
        "minItems": 4,
        "maxItems": 4,
    }
    assert converted["items"]["properties"]["label"] == {"type": "string", "enum": ["cat", "dog"]}


def test_schema_conversion_of_nullable_counts_and_sdk_spellings() -> None:
    schema = {
        "type": "OBJECT",
        "properties": {
            "name": {"type": "STRING", "nullable": True, "example": "x"},
            "tags": {"type": "ARRAY", "items": {"type": "STRING"}, "min_items": "1"},
            "either": {"anyOf": [{"type": "STRING"}, {"type": "NUMBER"}], "nullable": True},
            "unknown": {"type": "TYPE_UNSPECIFIED", "nullable": True},
        },
        "propertyOrdering": ["name", "tags"],
        "required": ["name"],
    }
    assert json_schema(schema) == {
        "type": "object",
        "properties": {
            "name": {"type": ["string", "null"]},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "either": {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "null"}]},
            "unknown": {"type": "null"},
        },
        "required": ["name"],
    }
    already = {"type": ["string", "null"], "enum": ["a"]}
    assert json_schema(already) == already


def test_interactions_body_sends_the_task_schema_as_json_schema() -> None:
    settings = TaskSettings(kind="detect", model=MODEL_3, flavor="interactions")
    request = get_task("detect").request(settings)
    assert request.response_schema is not None  # the task's OpenAPI-subset schema
    body = build_interaction_body(request)
    assert body["response_format"]["schema"] == json_schema(request.response_schema)
    assert body["response_format"]["schema"]["type"] == "array"
    assert "thinking_budget" not in json.dumps(body)
    assert set(body["generation_config"]) <= {"temperature", "max_output_tokens", "thinking_level"}
