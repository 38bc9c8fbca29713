"""The Interactions API over loopback: the SDK's body shape, stored interactions, strict
validation with the API's own error shape (lowercase codes, no details), and
`requires_continuation` hops under a decode limit."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pipeline.gemini.tokens import text_tokens
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer
from tests.localserver_support import (
    DETECT,
    KEY,
    b64,
    draw_scene,
    interact,
    interaction_request,
)


async def test_flat_items_and_sdk_steps_are_the_same_question(server, http):
    data, _ = draw_scene()
    items = [
        {"type": "text", "text": DETECT},
        {"type": "image", "data": b64(data), "mime_type": "image/png", "resolution": "low"},
    ]
    common = {
        "model": "gemini-3-flash-preview",
        "response_format": {"type": "text", "mime_type": "application/json"},
        "store": False,
    }
    seed_style = {**common, "input": items, "generation_config": {"thinking_level": "minimal"}}
    sdk_style = {
        **common,
        "input": [{"type": "user_input", "content": items}],
        "generation_config": {"thinking_level": "minimal"},
    }
    answers = []
    for body in (seed_style, sdk_style):
        status, interaction = await interact(http, server, body)
        assert status == 200
        assert interaction["status"] == "completed"
        last = interaction["steps"][-1]
        assert last["type"] == "model_output" and len(interaction["steps"]) == 1
        usage = interaction["usage"]
        assert usage["total_input_tokens"] == 280 + text_tokens(DETECT)
        assert {"modality": "image", "tokens": 280} in usage["input_tokens_by_modality"]
        assert usage["total_thought_tokens"] == 0
        assert usage["total_tokens"] == usage["total_input_tokens"] + usage["total_output_tokens"]
        answers.append(last["content"][0]["text"])
    assert answers[0] == answers[1]
    assert json.loads(answers[0])[0]["label"] == "red circle"


async def test_store_get_delete_and_thinking(server, http):
    data, _ = draw_scene()
    body = {
        "model": "gemini-3-flash-preview",
        "input": [
            {"type": "text", "text": "Describe this image."},
            {"type": "image", "data": b64(data), "mime_type": "image/png"},
        ],
    }
    status, interaction = await interact(http, server, body)  # stored by default, thinks
    assert status == 200
    assert [s["type"] for s in interaction["steps"]] == ["thought", "model_output"]
    assert interaction["usage"]["total_thought_tokens"] > 0
    url = f"{server.base_url}/v1beta/interactions/{interaction['id']}"
    headers = {"x-goog-api-key": KEY}
    async with http.get(url, headers=headers) as response:
        stored = await response.json()
    assert stored["steps"][0]["type"] == "user_input"
    assert stored["steps"][1:] == interaction["steps"]
    async with http.delete(url, headers=headers) as response:
        assert response.status == 200
    async with http.get(url, headers=headers) as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "not_found"
    status, unstored = await interact(http, server, {**body, "store": False})
    async with http.get(f"{url[: url.rindex('/')]}/{unstored['id']}", headers=headers) as r:
        assert r.status == 404


async def test_errors_carry_lowercase_codes_and_no_details(server, http):
    data, _ = draw_scene()
    good = {
        "model": "gemini-3-flash-preview",
        "input": [{"type": "image", "data": b64(data), "mime_type": "image/png"}],
    }
    status, body = await interact(http, server, good, key=None)
    assert status == 401 and body["error"]["code"] == "authentication"
    svg = {"type": "image", "data": b64(data), "mime_type": "image/svg+xml"}  # not in the SDK's
    status, body = await interact(http, server, {**good, "input": [svg]})
    assert status == 400
    assert body == {
        "error": {"code": "invalid_request", "message": "Unsupported MIME type: image/svg+xml"}
    }
    status, body = await interact(http, server, {**good, "input": [{"type": "audio", "data": ""}]})
    assert status == 400 and body["error"]["code"] == "invalid_request"
    missing = {**good, "input": [{"type": "image", "uri": "files/gone", "mime_type": "image/png"}]}
    status, body = await interact(http, server, missing)
    assert status == 403 and body["error"]["code"] == "permission_denied"


JSON = "application/json"


@pytest.mark.parametrize("kind", ["gif", "bmp", "tiff"])
async def test_the_image_types_the_sdk_lists_are_taken(server, http, kind):
    """The SDK's Interactions ImageContentMimeType (google-genai 3.6,
    `_gaos/types/interactions/imagecontent.py`) lists gif, bmp and tiff besides the five of
    generateContent (rule image.mime)."""
    data, _ = draw_scene(kind.upper())
    body = interaction_request(data, response_format={"type": "text", "mime_type": JSON})
    body["input"][0]["content"][1]["mime_type"] = f"image/{kind}"
    status, interaction = await interact(http, server, body)
    assert status == 200, interaction
    assert json.loads(hop_text(interaction))[0]["label"] == "red circle"


async def test_response_format_schema_is_json_schema(server, http):
    data, _ = draw_scene()
    schema = {"type": "object", "properties": {"count": {"type": "integer"}}}
    body = {
        "model": "gemini-3-flash-preview",
        "input": "How many shapes?",
        "response_format": {"type": "text", "mime_type": "application/json", "schema": schema},
        "store": False,
    }
    body["input"] = [
        {"type": "text", "text": "How many shapes?"},
        {"type": "image", "data": b64(data), "mime_type": "image/png"},
    ]
    status, interaction = await interact(http, server, body)
    assert status == 200
    assert json.loads(interaction["steps"][-1]["content"][0]["text"]) == {"count": 3}


# strictness


def sdk_body(**changes: Any) -> dict[str, Any]:
    body = interaction_request(draw_scene()[0])
    body.update(changes)
    return body


def with_image(**fields: Any) -> dict[str, Any]:
    body = sdk_body()
    body["input"][0]["content"][1].update(fields)
    return body


LEVEL = (
    "'minimal' is not a supported thinking level for this model. "
    "Allowed values are: medium, low, high."
)

# (id, body, HTTP status, code, message)
REFUSALS = [
    (
        "config instead of generation_config",
        sdk_body(config={"thinking_level": "low"}),
        400,
        "parameter_unknown",
        "Unknown parameter: 'config'.",
    ),
    (
        "thinking_budget in generation_config",
        sdk_body(generation_config={"thinking_budget": 0}),
        400,
        "parameter_unknown",
        "Unknown parameter: 'generation_config.thinking_budget'.",
    ),
    (
        "camelCase names",
        sdk_body(systemInstruction="Be exact."),
        400,
        "parameter_unknown",
        "Unknown parameter: 'systemInstruction'.",
    ),
    (
        "an unknown field of an image item",
        with_image(media_resolution="low"),
        400,
        "parameter_unknown",
        "Unknown parameter: 'input[0].content[1].media_resolution'.",
    ),
    (
        "upper-case types in response_format.schema",
        sdk_body(
            response_format={
                "type": "text",
                "mime_type": "application/json",
                "schema": {"type": "ARRAY", "items": {"type": "OBJECT"}},
            }
        ),
        400,
        "invalid_request",
        "Invalid JSON schema at 'response_format.schema.type': 'ARRAY' is not a JSON Schema "
        "type (one of array, boolean, integer, null, number, object, string).",
    ),
    (
        "a response_format.schema the JSON Schema meta-schema refuses",
        sdk_body(
            response_format={
                "type": "text",
                "mime_type": "application/json",
                "schema": {"type": "array", "items": {"type": "string"}, "minItems": -1},
            }
        ),
        400,
        "invalid_request",
        "Invalid JSON schema at 'response_format.schema.minItems': -1 is less than the minimum "
        "of 0.",
    ),
    (
        "an image resolution on a model without per-part resolution",
        {**with_image(resolution="high"), "model": "gemini-2.5-flash"},
        400,
        "invalid_request",
        "Per-part media resolution is not supported for this model.",
    ),
    (
        "minimal on 3.7 Flash (the live answer)",
        sdk_body(model="gemini-3.7-flash", generation_config={"thinking_level": "minimal"}),
        400,
        "invalid_request",
        LEVEL,
    ),
    (
        "an upper-case thinking level",
        sdk_body(generation_config={"thinking_level": "LOW"}),
        400,
        "invalid_request",
        "Invalid value for 'generation_config.thinking_level': \"LOW\" (expected "
        "type.googleapis.com/google.ai.generativelanguage.v1beta.ThinkingLevel).",
    ),
    (
        "a model the Interactions API does not serve",
        sdk_body(model="gemini-2.0-flash"),
        404,
        "model_not_found",
        "models/gemini-2.0-flash is not found for API version v1beta, or is not supported for "
        "interactions. Call ListModels to see the list of available models and their supported "
        "methods.",
    ),
    (
        "a model outside the table",
        sdk_body(model="gemini-9-ultra"),
        404,
        "model_not_found",
        "models/gemini-9-ultra is not found for API version v1beta, or is not supported for "
        "interactions. Call ListModels to see the list of available models and their supported "
        "methods.",
    ),
    (
        "a continuation token the server never issued",
        sdk_body(continuation_token="made-up"),
        400,
        "invalid_request",
        "The continuation_token is invalid or was already used.",
    ),
]


@pytest.mark.parametrize(
    "body,status,code,message", [c[1:] for c in REFUSALS], ids=[c[0] for c in REFUSALS]
)
async def test_the_service_refusals_in_the_interactions_shape(
    server, http, body, status, code, message
):
    got, answer = await interact(http, server, body)
    assert (got, answer) == (status, {"error": {"code": code, "message": message}})


# requires_continuation


def hop_text(interaction: dict[str, Any]) -> str:
    return "".join(
        item["text"]
        for step in interaction["steps"]
        if step["type"] == "model_output"
        for item in step["content"]
    )


async def full_answer(http, body: dict[str, Any]) -> str:
    async with LocalServer(ServerOptions()) as unlimited:
        status, interaction = await interact(http, unlimited, body)
        assert status == 200
        return hop_text(interaction)


async def test_a_long_answer_comes_in_hops_resumed_by_resending_the_body(http):
    body = sdk_body(generation_config={"thinking_level": "minimal"})
    full = await full_answer(http, body)
    assert text_tokens(full) > 40  # three shapes' boxes: three hops of 15 tokens or more
    async with LocalServer(ServerOptions(decode_limit=15)) as server:
        hops, tokens = [], []
        status, interaction = await interact(http, server, body)
        while True:
            assert status == 200
            hops.append(interaction)
            token = interaction.get("continuation_token")
            if token is None:
                break
            tokens.append(token)
            status, interaction = await interact(
                http, server, {**body, "continuation_token": token}
            )
        assert [h["status"] for h in hops] == ["requires_continuation"] * (len(hops) - 1) + [
            "completed"
        ]
        assert "".join(hop_text(h) for h in hops) == full
        prompt = hops[0]["usage"]["total_input_tokens"]
        for hop in hops:  # every hop re-bills the input and bills its own output
            usage = hop["usage"]
            assert usage["total_input_tokens"] == prompt
            assert usage["total_output_tokens"] == text_tokens(hop_text(hop)) <= 15
        assert sum(h["usage"]["total_output_tokens"] for h in hops) == text_tokens(full)
        stats = server.stats()
        assert stats["answers_by_task"] == {"detect": 1}  # one answer, several hops
        assert stats["tokens"]["prompt"] == prompt * len(hops)
        assert stats["continuations"] == {"issued": len(hops) - 1, "waiting": 0}
        status, reused = await interact(http, server, {**body, "continuation_token": tokens[0]})
        assert status == 400 and reused["error"]["code"] == "invalid_request"  # used once


async def test_a_token_belongs_to_its_request_and_survives_a_refused_hop(http):
    body = sdk_body()
    async with LocalServer(ServerOptions(decode_limit=20)) as server:
        _, first = await interact(http, server, body)
        token = first["continuation_token"]
        other = interaction_request(draw_scene()[0], "Describe this image.")
        status, answer = await interact(http, server, {**other, "continuation_token": token})
        assert (status, answer["error"]["message"]) == (
            400,
            "The continuation_token does not belong to this request.",
        )
        status, hop = await interact(http, server, {**body, "continuation_token": token})
        assert status == 200 and hop_text(hop) and "continuation_token" in hop


async def test_stored_interactions_continue_from_the_previous_hop_without_input(http):
    body = sdk_body(store=True)
    async with LocalServer(ServerOptions(decode_limit=30)) as server:
        _, first = await interact(http, server, body)
        resumed = {key: value for key, value in body.items() if key != "input"}
        resumed.update(continuation_token=first["continuation_token"])
        status, _ = await interact(http, server, {**resumed, "previous_interaction_id": "x"})
        assert status == 400  # the token was issued by another interaction
        status, hop = await interact(
            http, server, {**resumed, "previous_interaction_id": first["id"]}
        )
        assert status == 200 and hop_text(hop)
        async with http.get(
            f"{server.base_url}/v1beta/interactions/{first['id']}", headers={"x-goog-api-key": KEY}
        ) as response:
            assert (await response.json())["status"] == "requires_continuation"


async def test_the_old_leniencies_are_gone(server, http):
    """What the previous server took although the service does not."""
    data, _ = draw_scene()
    flat = {
        "model": "gemini-3-flash-preview",
        "input": [{"type": "image", "data": b64(data), "mime_type": "image/png"}],
        "systemInstruction": "x",
    }
    assert (await interact(http, server, flat))[0] == 400
    assert (await interact(http, server, {**flat, "model": "gemma-3"}))[0] == 400
    del flat["systemInstruction"]
    assert (await interact(http, server, flat))[0] == 200
    flat["input"][0]["resolution"] = "MEDIA_RESOLUTION_LOW"
    status, answer = await interact(http, server, flat)
    assert status == 400 and answer["error"]["code"] == "invalid_request"
