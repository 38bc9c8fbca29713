"""generateContent and countTokens over loopback: the wire format, usage, and the strictness
of a double of the real service (every refusal with the service's answer and its rule)."""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import pytest

from pipeline.gemini.tokens import text_tokens
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer
from pipeline.models import ModelTable, default_table
from tests.conftest import Clock
from tests.localserver_support import (
    DETECT,
    KEY,
    SEGMENT,
    answer_text,
    b64,
    draw_scene,
    generate,
    inline_request,
)

MODEL_3 = "gemini-3-flash-preview"
BEFORE_SHUTDOWNS = 1_748_736_000.0  # 2025-06-01 UTC: before the table's first shut-down day

# wire format: spellings, versions, usage


async def test_camel_and_snake_case_and_urlsafe_base64_are_all_accepted(server, http):
    data, _ = draw_scene()
    camel = {
        "contents": [
            {
                "parts": [
                    {"inlineData": {"mimeType": "image/png", "data": b64(data)}},
                    {"text": DETECT},
                ]
            }
        ],
        "generationConfig": {"responseMimeType": "application/json"},
        "systemInstruction": {"parts": [{"text": "Be exact."}]},
    }
    snake = {
        "contents": [
            {
                "parts": [
                    {
                        "inline_data": {
                            "mime_type": "image/png",
                            "data": base64.urlsafe_b64encode(data).decode().rstrip("="),
                        }
                    },
                    {"text": DETECT},
                ]
            }
        ],
        "generation_config": {"response_mime_type": "application/json"},
        "system_instruction": {"parts": [{"text": "Be exact."}]},
    }
    answers = []
    for body, version in ((camel, "v1beta"), (snake, "v1")):
        status, answer = await generate(http, server, body, version=version)
        assert status == 200
        answers.append((answer_text(answer), answer["usageMetadata"]))
    assert answers[0] == answers[1]
    assert json.loads(answers[0][0])[0]["label"] == "red circle"


LOW = {"mediaResolution": "MEDIA_RESOLUTION_LOW"}
MEDIUM_PART = {"media_resolution": {"level": "MEDIA_RESOLUTION_MEDIUM"}}
ULTRA_PART = {"mediaResolution": {"level": "media_resolution_ultra_high"}}  # any case


@pytest.mark.parametrize(
    "model,version,size,config,part_extra,image_tokens",
    [
        ("gemini-2.5-flash", "v1beta", (384, 384), {}, {}, 258),
        ("gemini-2.5-flash", "v1", (960, 540), {}, {}, 1548),  # the guide's example: 6 tiles
        ("gemini-2.5-flash", "v1beta", (960, 540), LOW, {}, 64),  # 2.x global resolution
        ("gemini-3-flash-preview", "v1beta", (384, 384), {}, {}, 1120),  # high by default
        ("gemini-3-flash-preview", "v1beta", (384, 384), LOW, {}, 280),
        ("gemini-3-flash-preview", "v1alpha", (384, 384), LOW, MEDIUM_PART, 560),  # part wins
        ("gemini-3-flash-preview", "v1alpha", (384, 384), {}, ULTRA_PART, 2240),
    ],
)
async def test_usage_follows_the_token_rules(
    server, http, model, version, size, config, part_extra, image_tokens
):
    data, _ = draw_scene(size=size)
    body = inline_request(data, "Describe this image.", config=dict(config))
    body["contents"][0]["parts"][0].update(part_extra)
    body["generationConfig"]["thinkingConfig"] = (
        {"thinkingLevel": "minimal"} if model.startswith("gemini-3") else {"thinkingBudget": 0}
    )
    status, answer = await generate(http, server, body, model=model, version=version)
    assert status == 200
    usage = answer["usageMetadata"]
    prompt_text = text_tokens("Describe this image.")
    assert usage["promptTokensDetails"] == [
        {"modality": "TEXT", "tokenCount": prompt_text},
        {"modality": "IMAGE", "tokenCount": image_tokens},
    ]
    assert usage["promptTokenCount"] == prompt_text + image_tokens
    assert usage["candidatesTokenCount"] == text_tokens(answer_text(answer))
    assert "thoughtsTokenCount" not in usage  # thinking was turned off
    assert usage["totalTokenCount"] == usage["promptTokenCount"] + usage["candidatesTokenCount"]


async def test_thinking_bills_thought_tokens_and_can_show_a_summary(server, http):
    data, _ = draw_scene()
    config = {"thinkingConfig": {"thinkingBudget": 5, "includeThoughts": True}}
    _, answer = await generate(http, server, inline_request(data, "Describe.", config=config))
    parts = answer["candidates"][0]["content"]["parts"]
    assert parts[0]["thought"] is True and "thought" not in parts[1]
    usage = answer["usageMetadata"]
    assert usage["thoughtsTokenCount"] == 5  # capped by the budget
    assert usage["totalTokenCount"] == (
        usage["promptTokenCount"] + usage["candidatesTokenCount"] + usage["thoughtsTokenCount"]
    )


async def test_max_output_tokens_truncates_with_max_tokens(server, http):
    data, _ = draw_scene()
    config = {"responseMimeType": "application/json", "maxOutputTokens": 10}
    _, answer = await generate(http, server, inline_request(data, SEGMENT, config=config))
    assert answer["candidates"][0]["finishReason"] == "MAX_TOKENS"
    assert answer["usageMetadata"]["candidatesTokenCount"] <= 10
    with pytest.raises(json.JSONDecodeError):
        json.loads(answer_text(answer))


async def test_count_tokens(server, http):
    data, _ = draw_scene()
    url = f"{server.base_url}/v1beta/models/gemini-2.5-flash:countTokens"
    body = inline_request(data, "Describe this image.")
    async with http.post(url, json=body, headers={"x-goog-api-key": KEY}) as response:
        assert response.status == 200
        assert (await response.json())["totalTokens"] == 258 + text_tokens("Describe this image.")


# errors, in the real shapes


async def test_missing_and_wrong_keys(http):
    async with LocalServer(ServerOptions(api_key="right-key")) as server:
        data, _ = draw_scene()
        status, body = await generate(http, server, inline_request(data, "x"), key=None)
        assert status == 403
        assert body["error"]["status"] == "PERMISSION_DENIED"
        assert body["error"]["message"].startswith("Method doesn't allow unregistered callers")
        status, body = await generate(http, server, inline_request(data, "x"), key="wrong-key")
        assert status == 400
        error = body["error"]
        assert error["code"] == 400 and error["status"] == "INVALID_ARGUMENT"
        assert error["message"] == "API key not valid. Please pass a valid API key."
        info = [d for d in error["details"] if d["@type"].endswith("google.rpc.ErrorInfo")]
        assert info[0]["reason"] == "API_KEY_INVALID"
        assert "wrong-key" not in json.dumps(body) and "right-key" not in json.dumps(body)
        url = f"{server.base_url}/v1beta/files?key=right-key"  # the ?key= form works too
        async with http.get(url) as response:
            assert response.status == 200
        assert "right-key" not in repr(server.options)


async def test_request_errors_have_the_google_rpc_shape(http):
    limit = 64 * 1024
    async with LocalServer(ServerOptions(inline_limit_bytes=limit)) as server:
        data, _ = draw_scene()
        cases = []
        body = inline_request(data, "x")
        body["contents"][0]["parts"][0]["inline_data"]["data"] = "not*base64!"
        cases.append((body, "gemini-2.5-flash", 400, "INVALID_ARGUMENT", "Base64 decoding failed"))
        cases.append(
            (
                inline_request(b"GIF89a...", "x", "image/gif"),
                "gemini-2.5-flash",
                400,
                "INVALID_ARGUMENT",
                "Unsupported MIME type: image/gif",
            )
        )
        cases.append(
            (
                inline_request(b"definitely not a png", "x"),
                "gemini-2.5-flash",
                400,
                "INVALID_ARGUMENT",
                "Unable to process input image",
            )
        )
        big = inline_request(os.urandom(limit), "x")
        cases.append(
            (big, "gemini-2.5-flash", 400, "INVALID_ARGUMENT", "Request payload size exceeds")
        )
        cases.append(({"contents": []}, "gemini-2.5-flash", 400, "INVALID_ARGUMENT", "contents"))
        cases.append((inline_request(data, "x"), "gpt-4o", 404, "NOT_FOUND", "is not found"))
        file_part = {"contents": [{"parts": [{"fileData": {"file_uri": "files/nope123"}}]}]}
        cases.append(
            (file_part, "gemini-2.5-flash", 403, "PERMISSION_DENIED", "File nope123 or it may")
        )
        for body, model, code, status_name, message in cases:
            status, answer = await generate(http, server, body, model=model)
            assert status == code, answer
            error = answer["error"]
            assert (error["code"], error["status"]) == (code, status_name)
            assert message in error["message"]
        url = f"{server.base_url}/v1beta/models/gemini-2.5-flash:generateContent"
        async with http.post(url, data=b"{not json", headers={"x-goog-api-key": KEY}) as r:
            assert r.status == 400 and (await r.json())["error"]["status"] == "INVALID_ARGUMENT"
        async with http.post(url.replace("v1beta", "v2"), json={}) as r:
            assert r.status == 404


# strictness: what the service refuses, refused with its answer


def detect_body(config: dict[str, Any] | None = None, **part: Any) -> dict[str, Any]:
    body = inline_request(draw_scene()[0], DETECT, config=config)
    body["contents"][0]["parts"][0].update(part)
    return body


def with_top(**fields: Any) -> dict[str, Any]:
    return {**detect_body(), **fields}


def with_blob(**fields: Any) -> dict[str, Any]:
    body = detect_body()
    body["contents"][0]["parts"][0]["inline_data"].update(fields)
    return body


LEVEL = (
    "'minimal' is not a supported thinking level for this model. "
    "Allowed values are: medium, low, high."
)
MEDIA_ENUM = (
    "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerationConfig.MediaResolution"
)

# (id, model, version, body, rule, message: exact text of the error)
REFUSALS = [
    (
        "unknown top-level field",
        "gemini-2.5-flash",
        "v1beta",
        with_top(foo=1),
        "fields.unknown",
        'Invalid JSON payload received. Unknown name "foo": Cannot find field.',
    ),
    (
        "unknown generation_config field",
        "gemini-2.5-flash",
        "v1beta",
        detect_body({"foo": 1}),
        "fields.unknown",
        'Invalid JSON payload received. Unknown name "foo" at '
        "'generation_config': Cannot find field.",
    ),
    (
        "unknown field deep inside a part, camelCase",
        "gemini-2.5-flash",
        "v1",
        with_blob(displayName="x"),
        "fields.unknown",
        'Invalid JSON payload received. Unknown name "displayName" at '
        "'contents[0].parts[0].inline_data': Cannot find field.",
    ),
    (
        "unknown thinking_config field",
        "gemini-2.5-flash",
        "v1beta",
        detect_body({"thinkingConfig": {"thinking_budgett": 0}}),
        "fields.unknown",
        'Invalid JSON payload received. Unknown name "thinking_budgett" at '
        "'generation_config.thinking_config': Cannot find field.",
    ),
    (
        "an OpenAPI-foreign key in responseSchema",
        "gemini-2.5-flash",
        "v1beta",
        detect_body({"responseSchema": {"type": "OBJECT", "additionalProperties": False}}),
        "fields.unknown",
        'Invalid JSON payload received. Unknown name "additionalProperties" at '
        "'generation_config.response_schema': Cannot find field.",
    ),
    (
        "a string for an int32",
        "gemini-2.5-flash",
        "v1beta",
        detect_body({"maxOutputTokens": "many"}),
        "fields.value",
        "Invalid value at 'generation_config.max_output_tokens' (TYPE_INT32), \"many\"",
    ),
    (
        "a list for a single field",
        "gemini-2.5-flash",
        "v1beta",
        detect_body({"temperature": [1]}),
        "fields.value",
        "Invalid JSON payload received. Unknown name \"temperature\" at 'generation_config': "
        "Proto field is not repeating, cannot start list.",
    ),
    (
        "ULTRA_HIGH as the global media resolution",
        "gemini-3-flash-preview",
        "v1beta",
        detect_body({"mediaResolution": "MEDIA_RESOLUTION_ULTRA_HIGH"}),
        "media.global-value",
        f"Invalid value at 'generation_config.media_resolution' ({MEDIA_ENUM}), "
        '"MEDIA_RESOLUTION_ULTRA_HIGH"',
    ),
    (
        "a global media resolution the model does not take",
        "gemini-1.5-flash",
        "v1beta",
        detect_body({"mediaResolution": "MEDIA_RESOLUTION_LOW"}),
        "media.global-model",
        "Media resolution MEDIA_RESOLUTION_LOW is not supported for this model.",
    ),
    (
        "a per-part media resolution on a 2.x model",
        "gemini-2.5-flash",
        "v1alpha",
        detect_body(media_resolution={"level": "MEDIA_RESOLUTION_LOW"}),
        "media.part-model",
        "Per-part media resolution is not supported for this model.",
    ),
    (
        "thinking budget with thinking level",
        "gemini-3-flash-preview",
        "v1beta",
        detect_body({"thinkingConfig": {"thinkingBudget": 0, "thinkingLevel": "LOW"}}),
        "thinking.both",
        "thinking_budget and thinking_level cannot be set together.",
    ),
    (
        "minimal on 3.8 Flash",
        "gemini-3.8-flash",
        "v1beta",
        detect_body({"thinkingConfig": {"thinkingLevel": "MINIMAL"}}),
        "thinking.level-value",
        LEVEL,
    ),
    (
        "minimal on an alias of 3.8 Flash",
        "gemini-flash-latest",
        "v1beta",
        detect_body({"thinkingConfig": {"thinkingLevel": "minimal"}}),
        "thinking.level-value",
        LEVEL,
    ),
    (
        "a thinking level on 2.5",
        "gemini-2.5-flash",
        "v1beta",
        detect_body({"thinkingConfig": {"thinkingLevel": "LOW"}}),
        "thinking.level-unsupported",
        "Thinking level is not supported for this model.",
    ),
    (
        "budget 0 on 2.5 Pro",
        "gemini-2.5-pro",
        "v1beta",
        detect_body({"thinkingConfig": {"thinkingBudget": 0}}),
        "thinking.budget-range",
        "The thinking budget 0 is invalid. This model only supports thinking budgets in the "
        "range [128, 32768] (-1 for dynamic).",
    ),
    (
        "a thinking config on a model without thinking",
        "gemini-2.0-flash",
        "v1beta",
        detect_body({"thinkingConfig": {"includeThoughts": False}}),
        "thinking.unsupported",
        "thinking_config is not supported.",
    ),
    (
        "responseSchema with responseJsonSchema",
        "gemini-2.5-flash",
        "v1beta",
        detect_body({"responseSchema": {"type": "ARRAY"}, "responseJsonSchema": {"type": "array"}}),
        "schema.both",
        "response_schema and response_json_schema cannot be set together: set one of them.",
    ),
    (
        "a misspelt type name in responseSchema (types.Type has no STRIN)",
        "gemini-2.5-flash",
        "v1beta",
        detect_body({"responseSchema": {"type": "ARRAY", "items": {"type": "strin"}}}),
        "fields.value",
        "Invalid value at 'generation_config.response_schema.items.type' "
        '(type.googleapis.com/google.ai.generativelanguage.v1beta.Type), "strin"',
    ),
    (
        "a responseJsonSchema the JSON Schema meta-schema refuses",
        "gemini-2.5-flash",
        "v1beta",
        detect_body({"responseJsonSchema": {"type": "array", "items": {"type": "strin"}}}),
        "schema.json-invalid",
        "Request contains an invalid argument.",
    ),
    (
        "responseJsonSchema on a model without it",
        "gemini-2.0-flash",
        "v1beta",
        detect_body({"responseJsonSchema": {"type": "array"}}),
        "schema.json-unsupported",
        "response_json_schema is not supported for this model; use response_schema.",
    ),
]


@pytest.mark.parametrize(
    "model,version,body,rule,message", [case[1:] for case in REFUSALS], ids=[c[0] for c in REFUSALS]
)
async def test_the_service_refusals_with_its_answers(http, model, version, body, rule, message):
    # on a day every model of the table was served (1.5, 2.0 and 2.5 Pro are shut down since)
    async with LocalServer(ServerOptions(), clock=Clock(BEFORE_SHUTDOWNS)) as server:
        status, answer = await generate(http, server, body, model=model, version=version)
        assert status == 400, answer
        error = answer["error"]
        assert (error["code"], error["status"], error["message"]) == (
            400,
            "INVALID_ARGUMENT",
            message,
        )
        assert server.stats()["refused_by_rule"] == {rule: 1}
        assert server.stats()["tokens"]["total"] == 0  # nothing was answered or billed


async def test_every_unknown_field_is_listed_with_its_path(server, http):
    body = detect_body({"foo": 1, "thinkingConfig": {"bar": 2}})
    body["contents"][0]["parts"][1]["baz"] = 3
    status, answer = await generate(http, server, body)
    assert status == 400
    error = answer["error"]
    violations = error["details"][0]["fieldViolations"]
    assert error["details"][0]["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    assert [v["field"] for v in violations] == [
        "contents[0].parts[1]",
        "generation_config",
        "generation_config.thinking_config",
    ]
    assert error["message"] == "\n".join(v["description"] for v in violations)
    assert "Unknown name \"baz\" at 'contents[0].parts[1]'" in violations[0]["description"]


async def test_models_outside_the_table_are_not_found(server, http):
    for model in ("gemini-9-ultra", "gemma-3-27b-it", "gpt-4o"):
        status, answer = await generate(http, server, detect_body(), model=model)
        assert status == 404
        assert answer["error"]["message"] == (
            f"models/{model} is not found for API version v1beta, or is not supported for "
            "generateContent. Call ListModels to see the list of available models and their "
            "supported methods."
        )
    model = "gemini-2.5-flash-lite-preview-09-2025"  # a longer id of a table entry
    assert (await generate(http, server, detect_body(), model=model))[0] == 200


async def test_what_the_service_takes_is_taken(server, http):
    """Every spelling the SDK and the guides use: enum names in any case, int64 as strings,
    null as the default, the SDK's fields (store, labels, safety settings, tools)."""
    config = {
        "response_mime_type": "application/json",
        "responseSchema": {
            "type": "array",
            "items": {"type": "OBJECT", "properties": {"label": {"type": "STRING"}}},
            "maxItems": "5",
        },
        "thinking_config": {"thinking_level": "low", "include_thoughts": None},
        "mediaResolution": "media_resolution_medium",
        "candidateCount": 1,
        "topK": 40.0,
    }
    body = detect_body(config)
    body.update(
        safetySettings=[{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}],
        labels={"team": "vision"},
        store=False,
        tools=[{"codeExecution": {}}],
    )
    status, answer = await generate(http, server, body, model="gemini-3-flash-preview")
    assert status == 200, answer
    assert answer["usageMetadata"]["promptTokensDetails"][1]["tokenCount"] == 560


async def test_count_tokens_is_as_strict(server, http):
    url = f"{server.base_url}/v1beta/models/gemini-2.5-flash:countTokens"
    headers = {"x-goog-api-key": KEY}
    nested = {"generateContentRequest": {"model": "models/gemini-2.5-flash", **detect_body()}}
    async with http.post(url, json=nested, headers=headers) as response:
        assert response.status == 200
        assert (await response.json())["totalTokens"] == 258 + text_tokens(DETECT)
    async with http.post(url, json={**detect_body(), "generationConfig": {}}, headers=headers) as r:
        assert r.status == 400  # countTokens takes contents, not a generation config
        assert (
            'Unknown name "generationConfig": Cannot find field.'
            in (await r.json())["error"]["message"]
        )


# relaxed: what the service documents as taken is taken


def _part_table(versions: list[str]) -> ModelTable:
    """The shipped table with gemini-3-flash-preview taking per-part resolution on `versions`
    (a `[models]` entry, as a config gives one), so the server's reading of the table is tested
    whatever the shipped models.json lists today."""
    return default_table().with_entries({MODEL_3: {"part_media_resolution": versions}})


@pytest.mark.parametrize(
    ("listed", "version", "taken"),
    [
        (["v1alpha"], "v1alpha", True),
        (["v1alpha"], "v1beta", False),
        (["v1alpha"], "v1", False),
        (["v1alpha", "v1beta"], "v1beta", True),  # media-resolution page, 2026-09-19
        (["v1alpha", "v1beta"], "v1", True),  # assumed: v1 follows v1beta (rule media.part-v1)
    ],
)
async def test_per_part_resolution_follows_the_versions_the_model_table_lists(
    http, listed, version, taken
):
    body = detect_body({"thinkingConfig": {"thinkingLevel": "minimal"}})
    body["contents"][0]["parts"][0]["mediaResolution"] = {"level": "MEDIA_RESOLUTION_LOW"}
    async with LocalServer(ServerOptions(), models=_part_table(listed)) as server:
        status, answer = await generate(http, server, body, model=MODEL_3, version=version)
        if taken:
            assert status == 200, answer
            assert answer["usageMetadata"]["promptTokensDetails"][1]["tokenCount"] == 280
            return
        assert status == 400
        assert answer["error"]["message"] == (
            'Invalid JSON payload received. Unknown name "mediaResolution" at '
            "'contents[0].parts[0]': Cannot find field."
        )
        assert server.stats()["refused_by_rule"] == {"media.part-version": 1}


async def test_a_model_added_by_a_config_is_served(http):
    """A `[models]` entry reaches the server: the model is known, and its settings apply."""
    table = default_table().with_entries({"gemini-3.9-flash": {"like": "gemini-3.8-flash"}})
    async with LocalServer(ServerOptions(), models=table) as server:
        body = detect_body({"thinkingConfig": {"thinkingLevel": "low"}})
        assert (await generate(http, server, body, model="gemini-3.9-flash"))[0] == 200
        body = detect_body({"thinkingConfig": {"thinkingLevel": "minimal"}})  # as 3.8 Flash
        assert (await generate(http, server, body, model="gemini-3.9-flash"))[0] == 400


async def test_a_budget_on_a_level_model_is_taken_not_refused(server, http):
    """The thinking page (2026-09-04): a numeric thinkingBudget on 3.x is "no longer
    recommended", not refused (rule thinking.budget-on-level); with a level it stays a 400."""
    body = detect_body({"thinkingConfig": {"thinkingBudget": 1024}})
    status, answer = await generate(http, server, body, model=MODEL_3)
    assert status == 200, answer
    assert answer["usageMetadata"]["thoughtsTokenCount"] > 0
    both = detect_body({"thinkingConfig": {"thinkingBudget": 1024, "thinkingLevel": "LOW"}})
    assert (await generate(http, server, both, model=MODEL_3))[0] == 400
    assert server.stats()["refused_by_rule"] == {"thinking.both": 1}
