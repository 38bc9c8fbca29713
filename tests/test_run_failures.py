"""Failures of the run itself stop the run; they never become rows. Paid answers are kept.

Each case runs the engine against a strict local server over loopback (a real aiohttp server,
the project's own double), provokes one failure the way the real service would answer it, and
checks: the exit code and the message naming the cause, which rows exist (answered ones kept,
none for images not answered), and that a plain rerun with the cause fixed finishes the job.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from pipeline import exits
from pipeline.config import ConfigError
from pipeline.gemini import GeminiClient
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer
from pipeline.output.state import State
from pipeline.run.limits import quota_day
from tests.conftest import answering, draw_shapes, make_config, read_rows, run, save_scenes

KEY = "the-right-key"


shapes = functools.partial(save_scenes, prefix="i", seed=700)  # shapes(folder, count)


def remote(tmp_path: Path, base_url: str, **sections: dict) -> object:
    """A config against a server the test started (not the in-process "local" one)."""
    api = {"base_url": base_url, "timeout": 20, **sections.pop("api", {})}
    return make_config(tmp_path, api=api, **sections)


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.setenv("GOOGLE_API_KEY", KEY)
    return KEY


# ----------------------------------------------------------------------- the run's own fault
async def test_a_wrong_key_stops_the_run_with_no_rows_and_no_quota_used(
    images_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    shapes(images_dir, 12)
    async with LocalServer(ServerOptions(api_key=KEY)) as server:
        monkeypatch.setenv("GOOGLE_API_KEY", "a-wrong-key")
        config = remote(tmp_path, server.base_url, limits={"rpd": 100})
        summary = await run(config)
        assert summary.exit_code == exits.USAGE, summary
        assert "refused the credentials" in summary.stop_reason
        assert "a-wrong-key" not in json.dumps(summary.__dict__, default=str)
        assert read_rows(tmp_path / "out") == []  # no error row for an image: not its fault
        state = State(tmp_path / "out")
        assert state.requests_on(quota_day().isoformat()) == 0  # refused calls are not counted
        state.close()
        monkeypatch.setenv("GOOGLE_API_KEY", KEY)  # fixed: a plain rerun does everything
        again = await run(config)
    assert again.exit_code == exits.OK and sum(again.rows.values()) == 12


async def test_a_wrong_model_or_version_is_a_usage_stop(
    images_dir: Path, tmp_path: Path, key: str
) -> None:
    shapes(images_dir, 4)
    async with LocalServer() as server:
        config = remote(tmp_path, server.base_url + "/nothing-here")
        summary = await run(config)
    assert summary.exit_code == exits.USAGE
    assert summary.stop_reason == (  # the preflight's models.get: no generateContent was sent
        "model gemini-2.5-flash is not found for API version v1beta (the model table has it: "
        "is [api] base_url or version right?)"
    )
    assert read_rows(tmp_path / "out") == []


async def test_an_unreachable_endpoint_is_an_outage_stop_not_error_rows(
    images_dir: Path, tmp_path: Path, key: str
) -> None:
    shapes(images_dir, 10)
    async with LocalServer() as server:
        dead = server.base_url  # nothing listens there once the server is closed
    summary = await run(remote(tmp_path, dead, limits={"concurrency": 4}))
    assert summary.exit_code == exits.STOPPED
    assert "unreachable" in summary.stop_reason
    assert all(row["retryable"] for row in read_rows(tmp_path / "out"))


async def test_credits_running_out_stop_the_run_and_keep_every_paid_answer(
    images_dir: Path, tmp_path: Path
) -> None:
    shapes(images_dir, 30)
    local = {"credit_budget_usd": 0.0015}  # enough for a few answers at 2.5 Flash's price
    config = make_config(tmp_path, local=local, limits={"concurrency": 2})
    summary = await run(config)
    rows = read_rows(tmp_path / "out")
    assert summary.exit_code == exits.STOPPED
    assert "prepaid credits are spent" in summary.stop_reason
    assert 0 < len(rows) < 30 and {row["status"] for row in rows} == {"ok"}
    assert Counter(row["image_path"] for row in rows).most_common(1)[0][1] == 1


@pytest.mark.parametrize("flavor", ["generateContent", "interactions"])
async def test_the_daily_quota_stops_the_run_and_says_when_it_resets(
    images_dir: Path, tmp_path: Path, flavor: str
) -> None:
    """generateContent: a 429 whose violations list a per-day one (not first); Interactions:
    `quota_exceeded`, which has no details at all."""
    shapes(images_dir, 12)
    local = {"rpd": 5, "rpm": 5}  # both limits are hit together: several violations
    config = make_config(tmp_path, local=local, api={"flavor": flavor}, task={"kind": "detect"})
    summary = await run(config)
    rows = read_rows(tmp_path / "out")
    assert summary.exit_code == exits.STOPPED
    assert summary.stop_reason.startswith("daily quota")
    assert "midnight Pacific" in summary.resume_hint
    assert len(rows) == 5 and {row["status"] for row in rows} == {"ok"}


# --------------------------------------------------------------------------- the key stays home
@asynccontextmanager
async def redirecting_to(target: str):
    """An endpoint that answers every request with a 307 to `target`."""

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(target + request.path_qs)

    async with answering(redirect) as url:
        yield url


async def test_a_redirect_is_never_followed_and_stops_the_run(
    images_dir: Path, tmp_path: Path, key: str
) -> None:
    shapes(images_dir, 3)
    async with LocalServer() as elsewhere, redirecting_to(elsewhere.base_url) as endpoint:
        summary = await run(remote(tmp_path, endpoint))
        stats = elsewhere.stats()
    assert summary.exit_code == exits.USAGE and "redirect" in summary.stop_reason
    assert stats["requests_total"] == 0  # neither the key nor the image went to the other host


async def test_plain_http_to_another_host_is_refused_before_anything_is_sent(
    images_dir: Path, tmp_path: Path, key: str
) -> None:
    shapes(images_dir, 1)
    with pytest.raises(ConfigError, match=r"\[api\] base_url.*allow_insecure_http"):
        await run(remote(tmp_path, "http://192.0.2.10:8080"))
    # allowed only when the config says so (here the host does not answer: an outage stop)
    insecure = remote(
        tmp_path, "http://192.0.2.10:8080", api={"allow_insecure_http": True, "timeout": 0.2}
    )
    summary = await run(insecure)
    assert summary.exit_code == exits.STOPPED


# ------------------------------------------------------------------------------- uploads
async def test_an_upload_deleted_behind_our_back_is_uploaded_again(
    images_dir: Path, tmp_path: Path, key: str
) -> None:
    shapes(images_dir, 3)
    async with LocalServer() as server:
        images = {"mode": "upload", "delete_uploads": False}
        first = await run(remote(tmp_path, server.base_url, images=images))
        assert first.uploads == 3
        async with GeminiClient(KEY, base_url=server.base_url) as client:
            for info in await client.list_files():  # gone from the service, not from state
                await client.delete_file(info.name)
        changed = remote(tmp_path, server.base_url, images=images, task={"kind": "detect"})
        second = await run(changed)
    assert second.exit_code == exits.OK, second
    assert second.uploads == 3 and second.retries >= 3  # 403 -> forget -> upload again


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_file_rewritten_before_upload_is_not_filed_under_the_old_hash(
    images_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, streamed: bool
) -> None:
    """The upload path sends exactly the bytes it hashed, or fails that image: small files are
    read once and checked; big ones (here: IN_MEMORY lowered to force the streamed path) are
    checked against the hash the service reports, and the stray upload is deleted."""
    from pipeline.inputs import images
    from pipeline.records import SourceFile
    from pipeline.run import uploads as uploads_module
    from pipeline.run.uploads import Uploads

    if streamed:
        monkeypatch.setattr(uploads_module, "IN_MEMORY", 0)
    shapes(images_dir, 1)
    path = images_dir / "i000.png"
    stat = path.stat()
    src = SourceFile(str(path), str(images_dir), path.name, stat.st_size, stat.st_mtime_ns)
    item = images.prepare(src)
    draw_shapes(96, 80, seed=999, count=3)[0].save(path)  # rewritten after hashing
    async with LocalServer() as server, GeminiClient(KEY, base_url=server.base_url) as client:
        state = State(tmp_path / "state")
        with pytest.raises(images.SourceChangedError):
            await Uploads(client, state).get(item)
        assert state.upload_names() == []  # nothing filed under the old hash
        assert await client.list_files() == []  # and nothing left on the service
        state.close()


async def test_failed_precondition_asks_the_file_before_uploading_again(
    images_dir: Path, tmp_path: Path
) -> None:
    """A 400 FAILED_PRECONDITION is the file (PROCESSING: wait; gone or FAILED: upload again)
    or the project (billing, region: the file is ACTIVE) — never a re-upload loop."""
    from pipeline.inputs import images
    from pipeline.records import SourceFile
    from pipeline.run.uploads import Uploads

    shapes(images_dir, 1)
    path = images_dir / "i000.png"
    stat = path.stat()
    src = SourceFile(str(path), str(images_dir), path.name, stat.st_size, stat.st_mtime_ns)
    item = images.prepare(src)
    options = ServerOptions(file_processing_seconds=0.3)
    async with LocalServer(options) as server, GeminiClient(KEY, base_url=server.base_url) as c:
        state = State(tmp_path / "state")
        uploads = Uploads(c, state)
        upload = await uploads.get(item)  # waits until ACTIVE
        assert await uploads.settle(item) is False  # ACTIVE: the project is the cause
        await c.delete_file(upload.name)
        assert await uploads.settle(item) is True  # gone: forgotten, upload again
        assert state.upload_names() == []
        state.close()
