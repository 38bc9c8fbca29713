"""models.get and models.list over loopback: the double answers them as the service does (a Model
resource per entry of the table that is not shut down, aliases naming only themselves unless
told otherwise, pages), the client reads them, the official SDK too; and a shut-down model is
a 404 wherever it is asked for."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime

import pytest
from google import genai
from google.genai import types

from pipeline.gemini import GeminiClient, GeminiError
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer
from pipeline.models import default_table
from tests.conftest import START, Clock
from tests.localserver_support import (
    DETECT,
    KEY,
    draw_scene,
    generate,
    inline_request,
    interact,
    interaction_request,
)

NOT_FOUND = (
    "models/{} is not found for API version v1beta, or is not supported for generateContent. "
    "Call ListModels to see the list of available models and their supported methods."
)
PRO_SHUT_DOWN = datetime(2026, 6, 17, tzinfo=UTC).timestamp()  # gemini-2.5-pro's last day


@pytest.fixture
def server_clock() -> Clock:
    """The `server` fixture's clock: START (2027-01-15), after every shut-down day the table has."""
    return Clock()


async def get(http, server, path: str) -> tuple[int, dict]:
    async with http.get(server.base_url + path, headers={"x-goog-api-key": KEY}) as answer:
        return answer.status, await answer.json()


def served_names(day: float = START) -> list[str]:
    """What models.list answers on `day`: the entries not shut down, then the aliases."""
    on = datetime.fromtimestamp(day, UTC).date()
    table = default_table()
    return [m.name for m in table.models if not m.status.is_shut_down(on)] + sorted(table.aliases)


# ------------------------------------------------------------------------------ models.get
async def test_an_entry_and_an_id_it_matches_answer_their_own_resource(server, http):
    status, resource = await get(
        http, server, "/v1beta/models/gemini-2.5-flash-lite-preview-09-2025"
    )
    assert status == 200, resource
    assert resource["name"] == "models/gemini-2.5-flash-lite-preview-09-2025"
    assert resource["baseModelId"] == "gemini-2.5-flash-lite-preview-09-2025"
    assert (resource["inputTokenLimit"], resource["outputTokenLimit"]) == (1_048_576, 65_536)
    assert (
        resource["thinking"] is True and "generateContent" in resource["supportedGenerationMethods"]
    )
    assert server.stats()["requests"] == {
        "GET /v1beta/models/gemini-2.5-flash-lite-preview-09-2025": {"200": 1}
    }


async def test_an_alias_names_only_itself(server, http):
    """The live service's alias resources do not state their target: the table's stays a guess."""
    status, resource = await get(http, server, "/v1beta/models/gemini-flash-latest")
    assert status == 200
    assert resource["name"] == "models/gemini-flash-latest"
    assert resource["baseModelId"] == "gemini-flash-latest"
    assert resource["version"] not in {m.name for m in default_table().models}


async def test_a_stated_alias_target_is_the_resource_base_model_and_how_it_answers(http):
    options = ServerOptions(alias_target=("gemini-flash-latest=gemini-2.5-flash",))
    async with LocalServer(options) as server:
        status, resource = await get(http, server, "/v1beta/models/gemini-flash-latest")
        assert (status, resource["baseModelId"]) == (200, "gemini-2.5-flash")
        # the alias is now answered as 2.5 Flash: a thinking level (3.x's control) is refused
        data, _ = draw_scene()
        level = inline_request(data, DETECT, config={"thinkingConfig": {"thinkingLevel": "LOW"}})
        status, _ = await generate(http, server, level, model="gemini-flash-latest")
        assert status == 400


@pytest.mark.parametrize("model", ["gemini-9-ultra", "gemini-2.5-pro", "gemini-pro-latestx"])
async def test_unknown_or_shut_down_models_are_not_found(server, http, model):
    status, answer = await get(http, server, f"/v1beta/models/{model}")
    assert status == 404
    assert (answer["error"]["status"], answer["error"]["message"]) == (
        "NOT_FOUND",
        NOT_FOUND.format(model),
    )
    rule = "model.shut-down" if model == "gemini-2.5-pro" else "model.unknown"
    assert server.stats()["refused_by_rule"] == {rule: 1}


# ----------------------------------------------------------------- a shut-down model everywhere
async def test_a_shut_down_model_is_not_found_from_its_shut_down_day_on(http):
    data, _ = draw_scene()
    clock = Clock(PRO_SHUT_DOWN - 1)  # its last second of service
    async with LocalServer(ServerOptions(), clock=clock) as server:
        body = inline_request(data, DETECT, config={"thinkingConfig": {"thinkingBudget": 128}})
        assert (await get(http, server, "/v1beta/models/gemini-2.5-pro"))[0] == 200
        assert (await generate(http, server, body, model="gemini-2.5-pro"))[0] == 200
        clock.now = PRO_SHUT_DOWN
        status, answer = await get(http, server, "/v1beta/models/gemini-2.5-pro")
        assert (status, answer["error"]["message"]) == (404, NOT_FOUND.format("gemini-2.5-pro"))
        status, answer = await generate(http, server, body, model="gemini-2.5-pro")
        assert (status, answer["error"]["message"]) == (404, NOT_FOUND.format("gemini-2.5-pro"))
        assert "gemini-2.5-pro" not in [m.model_id for m in await _listed(server)]
        assert server.stats()["refused_by_rule"] == {"model.shut-down": 2}


async def test_interactions_and_batch_create_refuse_a_shut_down_model(server, http):
    status, answer = await interact(
        http, server, interaction_request(draw_scene()[0], model="gemini-2.0-flash")
    )
    assert (status, answer["error"]["code"]) == (404, "model_not_found")
    url = f"{server.base_url}/v1beta/models/gemini-2.5-pro:batchGenerateContent"
    body = {"batch": {"inputConfig": {"requests": {"requests": [{"request": {}}]}}}}
    async with http.post(url, json=body, headers={"x-goog-api-key": KEY}) as created:
        error = (await created.json())["error"]
    assert (created.status, error["status"]) == (404, "NOT_FOUND")
    assert server.stats()["refused_by_rule"] == {"model.shut-down": 2}


# ------------------------------------------------------------------------------ models.list
async def _listed(server: LocalServer, page_size: int = 50) -> list:
    async with GeminiClient(KEY, base_url=server.base_url) as client:
        return await client.list_models(page_size=page_size)


async def test_models_list_pages_through_every_model_served(server):
    models = await _listed(server, page_size=3)
    names = served_names()
    assert [m.model_id for m in models] == names
    pages = math.ceil(len(names) / 3)
    assert server.stats()["requests"] == {"GET /v1beta/models": {"200": pages}}
    assert all(m.input_token_limit == 1_048_576 and m.thinking for m in models)


async def test_a_page_token_the_server_did_not_issue_is_refused(server, http):
    status, answer = await get(http, server, "/v1beta/models?pageToken=made-up")
    assert (status, answer["error"]["status"]) == (400, "INVALID_ARGUMENT")
    status, answer = await get(http, server, "/v1beta/models?pageSize=many")
    assert (status, answer["error"]["status"]) == (400, "INVALID_ARGUMENT")
    assert server.stats()["refused_by_rule"] == {"models.list": 2}


# ------------------------------------------------------------------------------ the client
async def test_the_client_reads_a_model_and_types_a_404(server):
    async with GeminiClient(KEY, base_url=server.base_url) as client:
        info = await client.get_model("models/gemini-3.8-flash")
        with pytest.raises(GeminiError) as missing:
            await client.get_model("gemini-2.5-flsh")
        with pytest.raises(ValueError, match="invalid model"):
            await client.get_model("gemini-2.5-flash?alt=sse")
    assert (info.name, info.model_id, info.base_model_id) == (
        "models/gemini-3.8-flash",
        "gemini-3.8-flash",
        "gemini-3.8-flash",
    )
    assert (info.version, info.display_name, info.output_token_limit) == (
        "3.8",
        "Gemini 3.8 Flash",
        65_536,
    )
    assert info.supported_generation_methods[0] == "generateContent"
    assert (info.temperature, info.max_temperature, info.top_p, info.top_k) == (1.0, 2.0, 0.95, 64)
    assert (missing.value.code, missing.value.kind, missing.value.retryable) == (
        404,
        "not_found",
        False,
    )


# ------------------------------------------------------------------------------ the SDK
async def test_the_sdk_reads_models_get_and_pages_models_list(server):
    sdk = genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=server.base_url))
    model = await asyncio.to_thread(sdk.models.get, model="gemini-flash-latest")
    assert (model.name, model.display_name, model.thinking) == (
        "models/gemini-flash-latest",
        "Gemini Flash Latest",
        True,
    )
    assert "generateContent" in model.supported_actions
    listed = await asyncio.to_thread(
        lambda: [m.name for m in sdk.models.list(config={"page_size": 4})]
    )
    assert listed == [f"models/{name}" for name in served_names()]
