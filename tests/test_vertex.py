"""Gemini on Vertex AI against the local server: the official SDK with `vertexai=True`,
google-auth's real service-account flow (an RSA key made here, its `token_uri` at the double's
/token), a run whose token is refreshed while it goes, gs:// objects read in place, express-mode
keys, and the combinations Vertex does not serve refused by the config.

Nothing is slept on: a token's life is measured on hand clocks (the server's, and the client's
TokenAuth's), or made shorter than the client's refresh margin so that every call refreshes it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google import genai
from google.genai import types
from google.oauth2 import service_account
from PIL import Image

from pipeline.config import ConfigError
from pipeline.gemini import GeminiClient
from pipeline.gemini.adc import SCOPES, application_default
from pipeline.gemini.auth import REFRESH_MARGIN, TokenAuth
from pipeline.gemini.backends import Vertex, vertex_base_url
from pipeline.gemini.types import GenerateRequest, ImagePart
from pipeline.inputs import images
from pipeline.inputs.in_place import sent_as_stored
from pipeline.inputs.references import REFERENCE_INLINE_BYTES, ReferenceParts
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer
from pipeline.output import stores
from pipeline.output.state import State
from pipeline.records import SourceFile, Unit
from pipeline.run.requests import IN_PLACE, RequestMaker
from pipeline.run.uploads import Uploads
from pipeline.tasks import get_task
from tests.conftest import Clock, make_config, read_rows, run, save_scenes, scene_png

PROJECT = "vx-project"
LOCATION = "us-central1"
MODEL = "gemini-2.5-flash"
TOKEN_PREFIX = "ya29.local-"  # every token the double issues starts so: grep for it
SCOPED = f"/v1/projects/{PROJECT}/locations/{LOCATION}/publishers/google/models/{MODEL}"


def write_key_file(path: Path, token_uri: str, *, seed_email: str = "runner") -> Path:
    """A service-account key file as the console downloads it, with a fresh RSA key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    info = {
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": "0123456789abcdef",
        "private_key": pem,
        "client_email": f"{seed_email}@{PROJECT}.iam.gserviceaccount.com",
        "client_id": "1234567890",
        "token_uri": token_uri,
    }
    path.write_text(json.dumps(info))
    return path


def point_token_uri(path: Path, server: LocalServer) -> Path:
    """The key file's token_uri set to the running double's /token."""
    info = json.loads(path.read_text())
    path.write_text(json.dumps({**info, "token_uri": f"{server.base_url}/token"}))
    return path


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return write_key_file(tmp_path / "sa.json", "http://127.0.0.1:1/token")


@pytest.fixture
def buckets(tmp_path: Path) -> Path:
    """The folder the double reads gs://photos/... from."""
    folder = tmp_path / "bucket-photos"
    folder.mkdir()
    return folder


@pytest.fixture
def server_options(key_path: Path, buckets: Path) -> ServerOptions:
    return ServerOptions(
        api_key="test-key",
        service_account=str(key_path),
        token_seconds=200,  # under the client's refresh margin: every call refreshes
        gs_root=(f"photos={buckets}",),
    )


@pytest.fixture
def key_file(key_path: Path, server: LocalServer) -> Path:
    return point_token_uri(key_path, server)


def sdk_client(server: LocalServer, key_file: Path) -> genai.Client:
    credentials = service_account.Credentials.from_service_account_file(
        str(key_file), scopes=list(SCOPES)
    )
    return genai.Client(
        vertexai=True,
        project=PROJECT,
        location=LOCATION,
        credentials=credentials,
        http_options=types.HttpOptions(base_url=server.base_url),
    )


def vertex_stats(server: LocalServer) -> dict[str, Any]:
    return server.stats()["vertex"]


# ------------------------------------------------------------------------------ URLs, no server
def test_vertex_paths_follow_the_location_and_the_project():
    regional = Vertex(vertex_base_url("europe-west4"), "p1", "europe-west4")
    assert regional.model_url("gemini-2.5-flash", "generateContent") == (
        "https://europe-west4-aiplatform.googleapis.com/v1/projects/p1/locations/europe-west4"
        "/publishers/google/models/gemini-2.5-flash:generateContent"
    )
    world = Vertex(vertex_base_url("global"), "p1", "global")
    assert world.model_url("models/gemini-2.5-flash", "countTokens") == (
        "https://aiplatform.googleapis.com/v1/projects/p1/locations/global"
        "/publishers/google/models/gemini-2.5-flash:countTokens"
    )
    express = Vertex(vertex_base_url("global"), None)
    assert express.model_url("gemini-2.5-flash", "generateContent") == (
        "https://aiplatform.googleapis.com/v1/publishers/google/models/gemini-2.5-flash"
        ":generateContent"
    )
    with pytest.raises(ValueError, match="invalid model"):
        regional.model_url("../../other", "generateContent")
    # the multi-regions have hosts of their own (the SDK's _MULTI_REGIONAL_LOCATIONS); a
    # "us-aiplatform.googleapis.com" does not resolve
    assert vertex_base_url("us") == "https://aiplatform.us.rep.googleapis.com"
    assert vertex_base_url("eu") == "https://aiplatform.eu.rep.googleapis.com"


# ------------------------------------------------------------------------------- the SDK
async def test_sdk_vertex_client_generates_and_counts_through_a_service_account(server, key_file):
    client = sdk_client(server, key_file)
    red = scene_png(3)
    contents = [types.Part.from_bytes(data=red, mime_type="image/png"), "Describe the image."]
    answer = await asyncio.to_thread(client.models.generate_content, model=MODEL, contents=contents)
    counted = await asyncio.to_thread(client.models.count_tokens, model=MODEL, contents=contents)

    assert answer.text and answer.usage_metadata.prompt_token_count > 258
    assert counted.total_tokens == answer.usage_metadata.prompt_token_count
    stats = server.stats()
    assert stats["requests"][f"POST /v1beta1{SCOPED.removeprefix('/v1')}:generateContent"] == {
        "200": 1
    }
    # google-auth's JWT flow before each call: a 200 s token is within google-auth's own
    # refresh threshold (3 min 45 s), so the SDK refreshes it every time
    assert vertex_stats(server)["tokens_issued"] == 2


async def test_sdk_vertex_gs_uri_is_read_by_the_service_not_sent(server, key_file, buckets):
    (buckets / "cat.png").write_bytes(scene_png(5))
    client = sdk_client(server, key_file)
    part = types.Part.from_uri(file_uri="gs://photos/cat.png", mime_type="image/png")
    answer = await asyncio.to_thread(
        client.models.generate_content, model=MODEL, contents=[part, "Describe the image."]
    )
    assert answer.text
    assert vertex_stats(server)["gs_reads"] == 1
    assert server.stats()["uploads"]["started"] == 0
    missing = types.Part.from_uri(file_uri="gs://other/cat.png", mime_type="image/png")
    with pytest.raises(genai.errors.ClientError, match="INVALID_ARGUMENT"):
        await asyncio.to_thread(
            client.models.generate_content, model=MODEL, contents=[missing, "Describe."]
        )


# ------------------------------------------------------------------------ the double's auth
@pytest.fixture
def server_clock() -> Clock:
    """The double's hand clock, from now: google-auth dates its assertions by the real time."""
    return Clock(time.time())


async def test_double_refuses_expired_foreign_and_forged_tokens(
    server, key_file, server_clock, http
):
    fetch, project = await asyncio.to_thread(_adc_from, key_file)
    token, lifetime = await asyncio.to_thread(fetch)
    assert project == PROJECT and token.startswith(TOKEN_PREFIX) and lifetime > 190
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    bearer = {"Authorization": f"Bearer {token}"}

    async with http.post(f"{server.base_url}{SCOPED}:countTokens", json=body, headers=bearer) as r:
        assert r.status == 200
    async with http.post(f"{server.base_url}{SCOPED}:countTokens", json=body) as r:
        assert r.status == 401  # no credential at all
    other = SCOPED.replace(PROJECT, "someone-else")
    async with http.post(f"{server.base_url}{other}:countTokens", json=body, headers=bearer) as r:
        assert r.status == 403
        assert (await r.json())["error"]["status"] == "PERMISSION_DENIED"
    server_clock.now += 201  # the token's 200 s are over on the server's clock
    async with http.post(f"{server.base_url}{SCOPED}:countTokens", json=body, headers=bearer) as r:
        error = (await r.json())["error"]
        assert r.status == 401 and error["code"] == 401 and error["status"] == "UNAUTHENTICATED"
        assert token not in json.dumps(error)

    forged = write_key_file(key_file.parent / "forged.json", f"{server.base_url}/token")
    with pytest.raises(Exception, match="invalid_grant"):  # google-auth's RefreshError
        await asyncio.to_thread(lambda: _adc_from(forged)[0]())
    assert vertex_stats(server) == {
        "tokens_issued": 1,
        "grants_refused": 1,  # the forged key's assertion
        "tokens_refused": 1,  # the expired token
        "gs_reads": 0,
        "request_types": {"unset": 1},  # the one call let in asked for no request type
        "token_uses": [{"countTokens": 2}],  # let in, and shown another project's door
    }


def _adc_from(key_file: Path) -> tuple[Any, str | None]:
    """google-auth's ADC as a run finds it: GOOGLE_APPLICATION_CREDENTIALS."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
        return application_default()


# -------------------------------------------------------------- the client's token refresh
async def test_token_is_refreshed_in_the_background_then_when_due(server, key_file):
    fetch, _ = await asyncio.to_thread(_adc_from, key_file)
    client_clock = Clock(0.0)
    auth = TokenAuth(_lasting(fetch, 3600.0), clock=client_clock)
    first = await auth.headers()
    assert vertex_stats(server)["tokens_issued"] == 1

    client_clock.now = 3600.0 - 1.5 * REFRESH_MARGIN  # early: refreshed behind the request
    assert await auth.headers() == first  # the request goes on with the current token
    await auth.settle()
    assert vertex_stats(server)["tokens_issued"] == 2 and auth.refreshes == 2
    second = await auth.headers()
    assert second != first

    client_clock.now += 3600.0 - REFRESH_MARGIN / 2  # due: the request waits for a fresh one
    third = await auth.headers()
    assert third not in (first, second) and vertex_stats(server)["tokens_issued"] == 3
    await auth.close()


def _lasting(fetch: Any, seconds: float) -> Any:
    """The real fetch, its token's life stated on the client's hand clock."""

    def fetched() -> tuple[str, float]:
        return fetch()[0], seconds

    return fetched


# ----------------------------------------------------------------------------------- runs
@pytest.fixture
def vertex_env(monkeypatch: pytest.MonkeyPatch, key_file: Path) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)


async def test_run_with_a_service_account_refreshes_its_token_and_never_keeps_it(
    server, tmp_path, images_dir, vertex_env, caplog
):
    save_scenes(images_dir, 4, prefix="scene", seed=40)
    api = {"base_url": server.base_url, "backend": "vertex", "project": PROJECT}
    config = make_config(tmp_path, api={**api, "location": LOCATION}, limits={"concurrency": 1})
    with caplog.at_level(logging.DEBUG):
        summary = await run(config)

    rows = read_rows(tmp_path / "out")
    assert summary.rows["ok"] == 4 and {row["status"] for row in rows} == {"ok"}
    calls = server.stats()["requests"][f"POST {SCOPED}:generateContent"]
    assert calls == {"200": 4}
    # each token lives 200 s, under the 300 s margin: every call (and the models.get) refreshed
    assert vertex_stats(server)["tokens_issued"] == 5
    assert vertex_stats(server)["tokens_refused"] == 0
    kept = [caplog.text, json.dumps(rows, default=str)]
    kept += [p.read_bytes().decode("latin-1") for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert not any(TOKEN_PREFIX in text for text in kept)


async def test_rows_bought_on_vertex_are_found_by_the_developer_api(
    server, tmp_path, images_dir, vertex_env, monkeypatch
):
    """The backend is not in the key: a run moved between the two resumes, nothing re-bought."""
    save_scenes(images_dir, 2, prefix="scene", seed=50)
    vertex = {"base_url": server.base_url, "backend": "vertex", "project": PROJECT}
    await run(make_config(tmp_path, api=vertex))
    monkeypatch.setenv("GOOGLE_API_KEY", "test-key")
    summary = await run(make_config(tmp_path, api={"base_url": server.base_url}))
    assert summary.skipped == 2 and summary.api_calls == 0


async def test_express_mode_key_without_a_project(server, tmp_path, images_dir, monkeypatch):
    monkeypatch.setenv("GOOGLE_API_KEY", "test-key")
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    save_scenes(images_dir, 2, prefix="scene", seed=60)
    api = {"backend": "vertex", "base_url": server.base_url}
    summary = await run(make_config(tmp_path, api=api))
    assert summary.rows["ok"] == 2
    path = f"POST /v1/publishers/google/models/{MODEL}:generateContent"
    assert server.stats()["requests"][path] == {"200": 2}
    assert vertex_stats(server)["tokens_issued"] == 0


async def test_a_vertex_run_on_the_bundled_server(tmp_path, images_dir, monkeypatch):
    """`base_url = "local"`: the in-process server takes the run's key on the project path."""
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    save_scenes(images_dir, 2, prefix="scene", seed=70)
    summary = await run(make_config(tmp_path, api={"backend": "vertex", "project": PROJECT}))
    assert summary.rows["ok"] == 2
    assert {row["status"] for row in read_rows(tmp_path / "out")} == {"ok"}


async def test_a_big_reference_image_goes_inline_on_vertex(
    server, tmp_path, images_dir, vertex_env
):
    """No Files API on Vertex: a reference too big to inline on the Developer API (where it is
    uploaded once) is sent inline with every request instead."""
    save_scenes(images_dir, 2, prefix="scene", seed=80)
    noise = np.random.default_rng(7).integers(0, 256, size=(360, 360, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "big.png")
    assert (tmp_path / "big.png").stat().st_size > REFERENCE_INLINE_BYTES
    api = {"base_url": server.base_url, "backend": "vertex", "project": PROJECT}
    task = {"kind": "detect", "reference_images": ["big.png"]}
    summary = await run(make_config(tmp_path, api=api, task=task))
    assert summary.rows["ok"] == 2 and summary.uploads == 0
    assert server.stats()["uploads"]["started"] == 0


def test_what_vertex_does_not_serve_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r'\[api\] flavor = "interactions".*not on Vertex'):
        make_config(
            tmp_path,
            api={"backend": "vertex", "flavor": "interactions", "model": "gemini-3-flash-preview"},
        )
    with pytest.raises(ConfigError, match=r'\[images\] mode = "upload".*no Files API'):
        make_config(tmp_path, api={"backend": "vertex"}, images={"mode": "upload"})
    with pytest.raises(ConfigError, match=r"\[api\] project must be"):
        make_config(tmp_path, api={"backend": "vertex", "project": "../x"})
    with pytest.raises(ConfigError, match=r'context_cache = "on".*not on Vertex AI'):
        make_config(tmp_path, api={"backend": "vertex", "context_cache": "on"})


# ----------------------------------------------------------------------------- gs:// in place
async def test_gs_inputs_go_in_place_and_changed_ones_inline(server, tmp_path, key_file, buckets):
    """A gs:// object sent as stored is a fileData part the double reads from its bucket; the
    same object shrunk by max_side goes inline. The request carries no bytes of the first."""
    data = scene_png(7, size=(640, 480))
    (buckets / "a.png").write_bytes(data)
    source = SourceFile("gs://photos/a.png", "gs://photos", "a.png", size=len(data))
    config = make_config(
        tmp_path, api={"backend": "vertex", "project": PROJECT}, task={"kind": "caption"}
    )
    as_stored = images.prepare(source, data=data)
    as_stored.in_place = sent_as_stored(config, as_stored, data)  # as the runner does
    shrunk = images.prepare(source, data=data, max_side=320)
    async with _vertex_client(server, key_file) as client:
        refs = _no_references()
        maker = RequestMaker(config, get_task("caption").request(config.task), refs)
        in_place = maker.plan(Unit.lone(as_stored))
        inline = maker.plan(Unit.lone(shrunk))
        assert in_place.modes == (IN_PLACE,) and inline.modes == ("inline",)
        uploads = Uploads(client, State(tmp_path / "out"))
        request = await maker.make(Unit.lone(as_stored), in_place, uploads, refs)
        assert request.images == (ImagePart("image/png", file_uri="gs://photos/a.png"),)
        answer = await client.generate(request)
        counted = await client.count_tokens(request)
    assert answer.text and counted == answer.usage.prompt_tokens
    assert vertex_stats(server)["gs_reads"] == 2  # the server read it, for each of the two calls
    assert server.stats()["uploads"]["started"] == 0


@pytest.fixture
def gcs_double(server: LocalServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """gs:// through gcsfs to the double's storage API; the process's gs filesystem (cached
    by the store layer and by fsspec, with this server's address) forgotten afterwards."""
    # gcsfs (2026.10) asks a gRPC storage-control API for each bucket's type unless told not
    # to before it is imported; an emulator (this double, Google's own) serves JSON only
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    gcsfs = pytest.importorskip("gcsfs")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.base_url)
    yield
    stores.filesystem.cache_clear()
    gcsfs.GCSFileSystem.clear_instance_cache()


async def test_a_run_over_a_bucket_sends_its_objects_in_place(
    server, tmp_path, buckets, vertex_env, gcs_double
):
    """gs:// inputs walked through gcsfs (the double's storage API): each object's header is
    read (a range), never the object, which the service reads for the call; rows say in_place
    (tests/test_vertex_inplace.py has the rest). With max_side the shrunk copies go inline."""
    (buckets / "day1").mkdir()
    save_scenes(buckets / "day1", 3, prefix="scene", seed=90, size=(400, 300))
    api = {"base_url": server.base_url, "backend": "vertex", "project": PROJECT}
    config = make_config(tmp_path, api=api, input={"paths": ["gs://photos/day1"]})
    summary = await run(config)

    rows = read_rows(tmp_path / "out")
    assert summary.rows["ok"] == 3 and {row["input_mode"] for row in rows} == {"in_place"}
    assert server.stats()["storage"]["object_gets"] == 0  # the pipeline: a header range each
    assert server.stats()["storage"]["range_gets"] == 3
    assert vertex_stats(server)["gs_reads"] == 3  # the service: the bytes of the calls

    shrunk = make_config(
        tmp_path,
        api=api,
        input={"paths": ["gs://photos/day1"]},
        images={"max_side": 200},
        output={"dir": str(tmp_path / "shrunk")},
    )
    assert (await run(shrunk)).rows["ok"] == 3
    assert {row["input_mode"] for row in read_rows(tmp_path / "shrunk")} == {"inline"}
    assert vertex_stats(server)["gs_reads"] == 3  # none more: sent inline


def _vertex_client(server: LocalServer, key_file: Path) -> GeminiClient:
    fetch, _ = _adc_from(key_file)
    backend = Vertex(server.base_url, PROJECT, LOCATION)
    return GeminiClient(backend=backend, auth=TokenAuth(fetch))


def _no_references() -> ReferenceParts:
    """A run without reference images: nothing of them is ever uploaded."""
    return ReferenceParts((), "auto", uploads=None)  # type: ignore[arg-type]


async def test_count_tokens_on_the_developer_api_matches_the_bill(server):
    """The same client method on the other backend: the body wrapped in generateContentRequest."""
    request = GenerateRequest(
        model=MODEL,
        prompt="Describe.",
        system_instruction="Be short.",
        images=(ImagePart("image/png", data=scene_png(1)),),
    )
    async with GeminiClient("test-key", base_url=server.base_url) as client:
        counted = await client.count_tokens(request)
        answer = await client.generate(request)
    assert counted == answer.usage.prompt_tokens > 258


async def test_plain_http_to_another_host_is_refused_for_tokens_too(key_file):
    fetch, _ = _adc_from(key_file)
    with pytest.raises(ValueError, match="refusing http://"):
        GeminiClient(backend=Vertex("http://vertex.example.com", PROJECT), auth=TokenAuth(fetch))
