"""Vertex AI's quota details and express-mode order (issue 24): `usageMetadata.trafficType` kept
in the row, `[api] vertex_request_type` sent as `X-Vertex-AI-LLM-Request-Type`, Vertex's bare
429 RESOURCE_EXHAUSTED (dynamic shared quota, Provisioned Throughput) taken as a rate limit the
run waits out, and the SDK's precedence between an API key and a project or location.

Runs use the local server's Vertex surface in express mode (the test key, no project), whose
quota simulation answers Vertex's 429 when it runs out.
"""

from __future__ import annotations

import json

import pytest
from google import genai

from pipeline import exits
from pipeline.config import ConfigError
from pipeline.engines.backend import client_backend
from pipeline.gemini import GeminiClient
from pipeline.gemini.auth import KeyAuth, TokenAuth
from pipeline.gemini.backends import DEVELOPER_BASE_URL, REQUEST_TYPE_HEADER, Vertex
from pipeline.gemini.content import parse_generate_content
from pipeline.gemini.errors import GeminiError
from pipeline.gemini.types import GenerateRequest, total_usage
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer
from tests.conftest import make_config, read_rows, run, save_scenes
from tests.test_vertex import PROJECT, write_key_file

MODEL = "gemini-2.5-flash"
EXPRESS = f"POST /v1/publishers/google/models/{MODEL}:generateContent"
SCOPE_VARIABLES = ("GOOGLE_CLOUD_PROJECT", "GOOGLE_CLOUD_LOCATION")


@pytest.fixture
def express(monkeypatch: pytest.MonkeyPatch) -> None:
    """An API key in the environment and no project or location anywhere: express mode."""
    monkeypatch.setenv("GOOGLE_API_KEY", "test-key")
    for name in ("GEMINI_API_KEY", *SCOPE_VARIABLES):
        monkeypatch.delenv(name, raising=False)


def vertex_api(server: LocalServer, **api: str) -> dict[str, str]:
    return {"base_url": server.base_url, "backend": "vertex", **api}


# ------------------------------------------------------------------ trafficType, request type
@pytest.mark.parametrize(
    ("request_type", "traffic", "counted"),
    [("dedicated", "PROVISIONED_THROUGHPUT", "dedicated"), ("", "ON_DEMAND", "unset")],
)
async def test_the_traffic_type_is_kept_and_the_request_type_sent(
    server, tmp_path, images_dir, express, request_type, traffic, counted
):
    save_scenes(images_dir, 2, prefix="scene", seed=11)
    api = vertex_api(server, vertex_request_type=request_type)
    summary = await run(make_config(tmp_path, api=api))

    assert summary.rows["ok"] == 2
    assert {row["traffic_type"] for row in read_rows(tmp_path / "out")} == {traffic}
    assert server.stats()["vertex"]["request_types"] == {counted: 2}


async def test_developer_rows_and_copies_have_no_traffic_type(
    server, tmp_path, images_dir, express
):
    save_scenes(images_dir, 1, prefix="scene", seed=12)
    (images_dir / "twin.png").write_bytes((images_dir / "scene000.png").read_bytes())
    await run(make_config(tmp_path, api=vertex_api(server)))
    by_path = {row["image_path"]: row for row in read_rows(tmp_path / "out")}
    assert by_path["scene000.png"]["traffic_type"] == "ON_DEMAND"
    assert by_path["twin.png"]["traffic_type"] is None  # a copy: nothing was served for it

    developer = make_config(
        tmp_path, api={"base_url": server.base_url}, output={"dir": str(tmp_path / "dev")}
    )
    await run(developer)
    assert {row["traffic_type"] for row in read_rows(tmp_path / "dev")} == {None}


def test_a_request_type_is_vertex_only_and_one_of_three(tmp_path):
    with pytest.raises(ConfigError, match=r"\[api\] vertex_request_type: Provisioned Throughput"):
        make_config(tmp_path, api={"vertex_request_type": "dedicated"})
    with pytest.raises(ConfigError, match=r"\[api\] vertex_request_type"):
        make_config(tmp_path, api={"backend": "vertex", "vertex_request_type": "priority"})
    assert Vertex("https://x", None, request_type="shared").generate_headers == {
        REQUEST_TYPE_HEADER: "shared"
    }
    assert Vertex("https://x", None).generate_headers == {}


# ---------------------------------------------------------------------------------- 429s
@pytest.fixture
def server_options() -> ServerOptions:
    return ServerOptions(api_key="test-key", rpm=2, quota_window_seconds=1.0)


async def test_vertex_429_is_the_bare_status_and_a_rate_limit(server, express):
    backend = Vertex(server.base_url, None)
    request = GenerateRequest(model=MODEL, prompt="Say hi.")
    async with GeminiClient(backend=backend, api_key="test-key") as client:
        for _ in range(2):
            await client.generate(request)
        with pytest.raises(GeminiError) as refused:
            await client.generate(request)
    error = refused.value
    assert (error.code, error.status, error.kind) == (429, "RESOURCE_EXHAUSTED", "rate_limit")
    assert error.quotas == () and error.retry_delay is None and error.retryable
    assert "error-code-429" in str(error)


async def test_a_run_waits_out_vertex_429s(server, tmp_path, images_dir, express):
    """The limiter slows down on them and the health check does not stop the run: a 429
    without QuotaFailure is a per-minute limit, never "today's quota is spent"."""
    save_scenes(images_dir, 8, prefix="scene", seed=13)
    limits = {"concurrency": 4, "max_attempts": 10}
    summary = await run(make_config(tmp_path, api=vertex_api(server), limits=limits))

    assert summary.exit_code == exits.OK and summary.rows["ok"] == 8
    assert summary.throttled > 0
    assert server.stats()["requests"][EXPRESS]["429"] == summary.throttled


# ------------------------------------------------------------------- express-mode order
@pytest.mark.parametrize(
    ("configured", "environment"),
    [
        ({}, {}),
        ({}, {"GOOGLE_CLOUD_LOCATION": "us-central1"}),
        ({}, {"GOOGLE_CLOUD_PROJECT": PROJECT}),
        ({"location": "europe-west4"}, {}),
        ({"project": PROJECT}, {}),
    ],
)
def test_a_key_from_the_environment_yields_to_a_project_or_location_as_in_the_sdk(
    tmp_path, monkeypatch, configured, environment
):
    """Express mode exactly when the SDK's `BaseApiClient.__init__` keeps the key: the
    SDK itself (project/location passed as the config sets them) is the oracle."""
    monkeypatch.setenv("GOOGLE_API_KEY", "test-key")
    key_file = write_key_file(tmp_path / "sa.json", "http://127.0.0.1:1/token")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
    for name in ("GEMINI_API_KEY", *SCOPE_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    base_url = DEVELOPER_BASE_URL  # the default: not the bundled server ("local")
    config = make_config(tmp_path, api={"backend": "vertex", "base_url": base_url, **configured})
    backend, auth = client_backend(config, base_url, "test-key", "v1beta")

    sdk = genai.Client(vertexai=True, **configured)._api_client
    assert isinstance(auth, KeyAuth) is (sdk.api_key is not None)
    if isinstance(auth, TokenAuth):  # ADC: the project the credentials name, when none is set
        assert isinstance(backend, Vertex) and backend.project == PROJECT
        assert sdk.project == PROJECT


def test_a_continued_answer_names_each_traffic_type_once_and_hostile_ones_none():
    hops = [
        parse_generate_content(json.dumps({"usageMetadata": {"trafficType": kind}}))
        for kind in ("PROVISIONED_THROUGHPUT", "ON_DEMAND", "ON_DEMAND", 7, "x" * 65)
    ]
    assert [hop.usage.traffic_type for hop in hops[2:]] == ["ON_DEMAND", "", ""]
    merged = total_usage(hop.usage for hop in hops)
    assert merged.traffic_type == "PROVISIONED_THROUGHPUT,ON_DEMAND"
