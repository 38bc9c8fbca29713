"""The preflight: one models.get before a run's first paid call, in every engine.

Runs go against the strict local server over loopback; what reached it is read from its stats,
so "no call" means no request of any kind arrived.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web

from pipeline import exits
from pipeline.config import Config
from pipeline.gemini import GeminiError, ModelInfo
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer
from pipeline.run import preflight
from pipeline.run.failures import Action
from pipeline.run.identity import key_suffix
from tests.conftest import REPO, answering, child_env, make_config, read_rows, run, save_scenes

KEY = "preflight-key"
GUESS = (  # what the run summary says of gemini-flash-latest when the service names no target
    "gemini-flash-latest → gemini-3.8-flash (the table's guess: assumed: no page states alias "
    "targets (read 2026-10); a preflight's models.get may say otherwise)"
)


@pytest.fixture(autouse=True)
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    return KEY


@pytest.fixture
def server_options() -> ServerOptions:
    return ServerOptions(batch_seconds=0.1)  # a Batch Mode job ends at once


def remote(tmp_path: Path, base_url: str, mode: str = "interactive", **sections: Any) -> Config:
    """A detect run against the server the test started."""
    api = {"base_url": base_url, "mode": mode, **sections.pop("api", {})}
    batch = {"poll_seconds": 0.02, "max_poll_seconds": 0.1}
    return make_config(tmp_path, api=api, task={"kind": "detect"}, batch=batch, **sections)


KEPT_HEADERS = {"content-type", "x-goog-upload-url", "x-goog-upload-status"}
KEPT_HEADERS |= {"x-goog-upload-chunk-granularity"}


def calls(server: LocalServer) -> dict[str, dict[str, int]]:
    return server.stats()["requests"]


# ------------------------------------------------------------------------------ a wrong model
@pytest.mark.parametrize("mode", ["interactive", "batch"])
async def test_a_model_the_service_does_not_know_stops_the_run_before_any_call(
    server: LocalServer, images_dir: Path, tmp_path: Path, mode: str
) -> None:
    save_scenes(images_dir, 3, prefix="a", seed=1)
    config = remote(tmp_path, server.base_url, mode, api={"model": "gemini-2.5-flsh"})
    summary = await run(config)
    assert summary.exit_code == exits.USAGE
    assert summary.stop_reason == (
        "model gemini-2.5-flsh is not found for API version v1beta (did you mean gemini-2.5-flash?)"
    )
    assert "pipeline models" in summary.resume_hint
    assert calls(server) == {"GET /v1beta/models/gemini-2.5-flsh": {"404": 1}}  # nothing else
    assert (summary.api_calls, read_rows(tmp_path / "out")) == (0, [])


async def test_a_model_the_table_still_serves_but_the_service_shut_down_stops_the_run(
    server: LocalServer, images_dir: Path, tmp_path: Path
) -> None:
    """The table says 2.5 Pro is served (a config's entry), the service (the double, past its
    shut-down day) answers 404: the preflight believes the service."""
    save_scenes(images_dir, 2, prefix="a", seed=1)
    served = {"gemini-2.5-pro": {"status": {}}}
    config = remote(tmp_path, server.base_url, api={"model": "gemini-2.5-pro"}, models=served)
    summary = await run(config)
    assert summary.exit_code == exits.USAGE
    assert summary.stop_reason.startswith("model gemini-2.5-pro is not found for API version")
    assert list(calls(server)) == ["GET /v1beta/models/gemini-2.5-pro"]
    assert server.stats()["refused_by_rule"] == {"model.shut-down": 1}


def test_the_suggestion_for_a_model_the_table_marks_shut_down_is_its_replacement(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path)
    pro = dataclasses.replace(config, api=dataclasses.replace(config.api, model="gemini-2.5-pro"))
    assert preflight.not_found(pro).reason == (
        "model gemini-2.5-pro is not found for API version v1beta (shut down 2026-06-17: did "
        "you mean gemini-3.1-pro-preview?)"
    )


def pipeline_run(tmp_path: Path, images: Path, model: str) -> subprocess.CompletedProcess:
    """`pipeline run` against the in-process server (base_url "local"), as a user runs it."""
    config = tmp_path / f"{model}.toml"
    config.write_text(
        f'[api]\nbase_url = "local"\nmodel = "{model}"\n[input]\npaths = ["{images}"]\n'
        f'[task]\nkind = "detect"\n[output]\ndir = "{tmp_path / model}"\n'
    )
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(config), "--quiet"],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=REPO,
        timeout=120,
    )


def test_pipeline_run_says_not_found_and_exits_2(images_dir: Path, tmp_path: Path) -> None:
    save_scenes(images_dir, 1, prefix="a", seed=1)
    result = pipeline_run(tmp_path, images_dir, "gemini-2.5-flsh")
    assert result.returncode == exits.USAGE, result.stderr
    assert (
        "stopped: model gemini-2.5-flsh is not found for API version v1beta (did you mean "
        "gemini-2.5-flash?)" in result.stderr
    )
    alias = pipeline_run(tmp_path, images_dir, "gemini-flash-latest")
    assert alias.returncode == exits.OK, alias.stderr
    assert f"model {GUESS}" in alias.stderr.splitlines()


# ------------------------------------------------------------------------------ nothing to do
@pytest.mark.parametrize("mode", ["interactive", "batch"])
async def test_a_rerun_with_nothing_to_do_makes_no_call_at_all(
    server: LocalServer, images_dir: Path, tmp_path: Path, mode: str
) -> None:
    save_scenes(images_dir, 3, prefix="a", seed=1)
    config = remote(tmp_path, server.base_url, mode)
    first = await run(config)
    assert first.exit_code == exits.OK, first
    assert calls(server)["GET /v1beta/models/gemini-2.5-flash"] == {"200": 1}  # one, not 3
    before = server.stats()["requests_total"]
    again = await run(config)
    assert (again.exit_code, again.skipped, again.api_calls) == (exits.OK, 3, 0)
    assert server.stats()["requests_total"] == before  # not even models.get


# ------------------------------------------------------------------------------ passing trouble
@pytest.fixture
async def flaky_models(server: LocalServer) -> AsyncIterator[str]:
    """An endpoint whose models.get answers 503, and which passes every other request to the
    local server: a passing failure on the preflight alone."""
    async with ClientSession() as session:

        async def forward(request: web.Request) -> web.Response:
            if request.method == "GET" and "/models/" in request.path:
                error = {"code": 503, "status": "UNAVAILABLE", "message": "overloaded"}
                return web.json_response({"error": error}, status=503)
            async with session.request(
                request.method,
                server.base_url + request.path_qs,
                headers={k: v for k, v in request.headers.items() if k.lower() != "host"},
                data=await request.read(),
            ) as answer:
                kept = {k: v for k, v in answer.headers.items() if k.lower() in KEPT_HEADERS}
                return web.Response(body=await answer.read(), status=answer.status, headers=kept)

        async with answering(forward) as url:
            yield url


async def test_a_passing_failure_of_the_preflight_does_not_stop_the_run(
    server: LocalServer, flaky_models: str, images_dir: Path, tmp_path: Path
) -> None:
    save_scenes(images_dir, 2, prefix="a", seed=1)
    summary = await run(remote(tmp_path, flaky_models))
    assert summary.exit_code == exits.OK, summary
    assert summary.api_calls == 2 and len(read_rows(tmp_path / "out")) == 2


@pytest.mark.parametrize(
    "code,status,stops",
    [
        (503, "UNAVAILABLE", False),
        (429, "RESOURCE_EXHAUSTED", False),
        (500, "INTERNAL", False),
        (403, "PERMISSION_DENIED", True),
        (404, "NOT_FOUND", True),
        (307, "REDIRECT", True),
    ],
)
def test_which_failures_of_the_preflight_stop_the_run(
    tmp_path: Path, code: int, status: str, stops: bool
) -> None:
    verdict = preflight.verdict(GeminiError(code, status, "..."), make_config(tmp_path))
    assert (verdict is not None) == stops
    if verdict is not None:
        assert (verdict.action, verdict.exit_code) == (Action.RUN, exits.USAGE)


# ------------------------------------------------------------------------------ an alias
async def test_an_alias_the_service_names_no_target_for_runs_on_the_tables_guess(
    server: LocalServer, images_dir: Path, tmp_path: Path
) -> None:
    save_scenes(images_dir, 2, prefix="a", seed=1)
    config = remote(tmp_path, server.base_url, api={"model": "gemini-flash-latest"})
    summary = await run(config)
    assert summary.exit_code == exits.OK, summary
    assert summary.model_resolution == GUESS
    assert summary.settings_hash == key_suffix(config)  # what it was before the preflight
    assert calls(server)["GET /v1beta/models/gemini-flash-latest"] == {"200": 1}


async def test_a_target_the_service_states_is_the_entry_the_run_uses(
    images_dir: Path, tmp_path: Path
) -> None:
    """The double answers the alias as 2.5 Flash (budget thinking, no level): a run on the
    table's guess (3.8 Flash, thinkingLevel LOW) would be refused on every request."""
    save_scenes(images_dir, 2, prefix="a", seed=1)
    stated = ServerOptions(alias_target=("gemini-flash-latest=gemini-2.5-flash",))
    async with LocalServer(stated) as server:
        config = remote(tmp_path, server.base_url, api={"model": "gemini-flash-latest"})
        summary = await run(config)
        assert summary.exit_code == exits.OK, summary
        assert summary.model_resolution == (
            "gemini-flash-latest → gemini-2.5-flash (the service's answer)"
        )
        assert summary.settings_hash != key_suffix(config)  # 2.5 Flash's settings
        requests = calls(server)
        assert requests["GET /v1beta/models/gemini-flash-latest"] == {"200": 1}  # asked once
        assert requests["POST /v1beta/models/gemini-flash-latest:generateContent"] == {"200": 2}
        rows = read_rows(tmp_path / "out")
        assert {r["status"] for r in rows} == {"ok"} and {r["model"] for r in rows} == {
            "gemini-flash-latest"
        }
        # the rerun walks on the table's guess, finds its rows under the stated entry's settings
        # only after asking again: one models.get, no generation
        again = await run(config)
        assert (again.exit_code, again.api_calls, again.skipped) == (exits.OK, 0, 2)
        assert calls(server)["GET /v1beta/models/gemini-flash-latest"] == {"200": 2}


async def test_a_stated_target_that_is_the_guess_changes_no_setting(
    images_dir: Path, tmp_path: Path
) -> None:
    save_scenes(images_dir, 2, prefix="a", seed=1)
    stated = ServerOptions(alias_target=("gemini-flash-latest=gemini-3.8-flash",))
    async with LocalServer(stated) as server:
        config = remote(tmp_path, server.base_url, api={"model": "gemini-flash-latest"})
        summary = await run(config)
        again = await run(config)
        total = server.stats()["requests_total"]
    assert summary.exit_code == exits.OK, summary
    assert summary.model_resolution.endswith("gemini-3.8-flash (the service's answer)")
    assert summary.settings_hash == key_suffix(config)
    assert (again.api_calls, again.skipped, total) == (0, 2, 1 + 2)  # models.get, 2 answers


@pytest.mark.parametrize(
    "base,version,stated",
    [
        ("gemini-flash-latest", "latest", None),  # names only itself
        ("gemini-3.7-flash", "latest", "gemini-3.7-flash"),
        (None, "gemini-3.6-flash-preview-10-2026", "gemini-3.6-flash-preview-10-2026"),
        ("gemini-pro-latest", "2.5", None),  # another alias, a version that is no model
        ("gemini-9-ultra", None, None),  # a model the table does not know
    ],
)
def test_what_counts_as_the_service_stating_a_target(
    tmp_path: Path, base: str | None, version: str | None, stated: str | None
) -> None:
    config = make_config(tmp_path, api={"model": "gemini-flash-latest"})
    info = ModelInfo("models/gemini-flash-latest", base_model_id=base, version=version)
    assert preflight.stated_target(info, config) == stated
    plain = make_config(tmp_path, api={"model": "gemini-2.5-flash"})
    assert preflight.stated_target(info, plain) is None  # no alias: nothing to resolve
