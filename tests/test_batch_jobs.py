"""Batch Mode jobs never forgotten, never contacted elsewhere, never cancelled silently (issue 19,
items 1, 4 and 9): a job list that lags behind creates, a create whose answer is held, an
output whose state.sqlite names another endpoint, a cancel of a job that had answered.

Every test runs the local server over loopback (a hand clock moves its jobs), real files, real
Parquet, a real state.sqlite; the numbers are the server's own counters (batches created,
answers billed), the audit of what was paid for.
"""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from pipeline import exits
from pipeline.cli import main
from pipeline.config import ConfigError
from pipeline.engines.batch import jobs as batchjobs
from pipeline.output.state import LEGACY_STATE_FILE, STATE_FILE, State, peek_batch
from tests.conftest import answering, read_current, run, until
from tests.test_batch_run import (  # the last three: fixtures of that module, used here
    batch_config,
    jobs_in,
    key_in_env,
    run_through,
    server_clock,
    server_options,
    stand_in,
    tiny_images,
)

__all__ = ["key_in_env", "server_clock", "server_options"]  # pytest finds fixtures by name


def answers(server: Any) -> int:
    """Answers the server billed (every one paid for)."""
    return sum(server.stats()["answers_by_task"].values())


def created(server: Any) -> int:
    return server.stats()["batches"]["created"]


# ---------------------------------------------- a job this run created is collected, never dropped
async def test_a_lagging_job_list_loses_no_job_and_a_rerun_pays_nothing(
    clock, tmp_path, key_in_env
):
    """Issue 19's scenario: 400 images in jobs of 10, a job list 3 s behind creates and creates
    answered late. Before the fix a pass that saw a job `creating` adopted it once created, did
    not find it listed, and dropped it: 40 jobs created, 26 collected, 260 rows, exit 0."""
    tiny_images(tmp_path / "images", 400)
    lag = {"batch_list_lag_seconds": 3, "batch_create_delay_seconds": 0.02}
    async with stand_in(clock, **lag) as server:
        config = batch_config(tmp_path, base_url=server.base_url, batch={"requests_per_job": 10})
        summary = await run_through(config, server, clock, 40)
        assert (summary.exit_code, dict(summary.rows)) == (exits.OK, {"ok": 400})
        assert summary.batch["jobs_created"] == summary.batch["jobs_collected"] == 40
        assert summary.batch["jobs_dropped"] == [] and len(read_current(tmp_path / "out")) == 400
        again = await run(config)
        assert (again.skipped, again.api_calls, again.batch["jobs_created"]) == (400, 0, 0)
        assert (created(server), answers(server)) == (40, 400)  # nothing paid twice


async def test_a_create_that_times_out_unlisted_is_not_made_again(clock, tmp_path, key_in_env):
    """A create whose answer comes after the client's deadline (the job made meanwhile) and a
    list that does not show it yet: before, the job was created a second time (paid twice);
    now it stays `creating`, and a later run adopts it once listed."""
    tiny_images(tmp_path / "images", 2)
    slow = {"batch_list_lag_seconds": 30, "batch_create_delay_seconds": 0.5}
    async with stand_in(clock, **slow) as server:
        fast_deadline = {"timeout": 0.2, "min_timeout": 0.1}
        config = batch_config(tmp_path, base_url=server.base_url, api=fast_deadline)
        first = await run(config, submit_only=True)
        assert created(server) == 1 and [j.phase for j in jobs_in(tmp_path / "out")] == ["creating"]
        assert first.batch["jobs_dropped"] == []
        clock.now += 61
        later = await run(batch_config(tmp_path, base_url=server.base_url))
    assert (created(server), answers(server), dict(later.rows)) == (1, 2, {"ok": 2})


def lose_create_answer(output: Path, *, age_s: float = 0) -> Any:
    """As if the run was killed after its create left and before its answer was saved, `age_s`
    seconds ago; the job's record."""
    state = State(output)
    (job,) = state.batch_jobs()
    state.update_batch_job(job.id, phase="creating", name=None)
    state.close()
    then = (datetime.now(UTC) - timedelta(seconds=age_s)).isoformat()
    with sqlite3.connect(output / ".state.sqlite") as db:
        db.execute("UPDATE batch_jobs SET updated_at = ? WHERE id = ?", (then, job.id))
    return job


async def test_a_young_creating_job_not_yet_listed_is_kept_then_adopted(
    clock, tmp_path, key_in_env
):
    tiny_images(tmp_path / "images", 4)
    async with stand_in(clock, batch_list_lag_seconds=30) as server:
        config = batch_config(tmp_path, base_url=server.base_url)
        await run(config, submit_only=True)
        job = lose_create_answer(tmp_path / "out")
        kept = await run(config, submit_only=True)  # not listed yet: kept, not dropped
        assert kept.batch["jobs_dropped"] == [] and kept.batch["jobs_in_flight"] == 1
        assert [j.phase for j in jobs_in(tmp_path / "out")] == ["creating"]
        clock.now += 61  # listed now, and its time is up
        summary = await run(config)
    assert (created(server), answers(server), dict(summary.rows)) == (1, 4, {"ok": 4})
    assert [j.name for j in jobs_in(tmp_path / "out")] == [job.name]


async def test_an_old_creating_job_the_service_does_not_know_is_dropped_and_said(
    server, clock, tmp_path
):
    tiny_images(tmp_path / "images", 3)
    config = batch_config(tmp_path, base_url=server.base_url)
    await run(config, submit_only=True)
    job = lose_create_answer(tmp_path / "out", age_s=batchjobs.CREATE_SETTLES_S + 1)
    with sqlite3.connect(tmp_path / "out" / ".state.sqlite") as db:  # a name never created
        db.execute("UPDATE batch_jobs SET display_name = 'gvp-never' WHERE id = ?", (job.id,))
    summary = await run(config, submit_only=True)
    (dropped,) = summary.batch["jobs_dropped"]
    assert dropped["display_name"] == "gvp-never" and "not found" in dropped["why"]
    assert summary.exit_code == exits.STOPPED and "gvp-never" in summary.stop_reason
    assert jobs_in(tmp_path / "out") == []  # its images: the next run's


# ------------------------------------------------------- endpoints from the config, never the file
def foreign_state(output: Path, base_url: str) -> None:
    state = State(output)
    for job in state.batch_jobs():
        state.update_batch_job(job.id, base_url=base_url)
    state.close()


@pytest.mark.parametrize("command", ["status", "wait", "cancel"])
async def test_a_recorded_endpoint_other_than_the_configured_one_is_never_contacted(
    server, clock, tmp_path, command, capsys
):
    tiny_images(tmp_path / "images", 2)
    await run(batch_config(tmp_path, base_url=server.base_url), submit_only=True)
    heard: list[str] = []

    async def catch_all(request: web.Request) -> web.Response:
        heard.append(f"{request.method} {request.path} {request.headers.get('x-goog-api-key')}")
        return web.json_response({})

    async with answering(catch_all) as elsewhere:
        foreign_state(tmp_path / "out", elsewhere)
        out = str(tmp_path / "out")
        with pytest.raises(ConfigError) as refused:
            await getattr(batchjobs, command)(out, base_url=server.base_url)
        code = await _cli(["batch", command, out, "--base-url", server.base_url])
    assert heard == []  # not one request: the key never left for it
    assert elsewhere in str(refused.value) and server.base_url in str(refused.value)
    assert code == exits.USAGE and elsewhere in capsys.readouterr().err


async def _cli(argv: list[str]) -> int:
    """`main` in a thread: it runs its own event loop (asyncio.run)."""
    return await asyncio.to_thread(main, argv)


async def test_a_run_follows_only_the_jobs_of_its_own_endpoint(server, clock, tmp_path):
    tiny_images(tmp_path / "images", 2)
    config = batch_config(tmp_path, base_url=server.base_url)
    await run(config, submit_only=True)
    heard: list[str] = []

    async def catch_all(request: web.Request) -> web.Response:
        heard.append(request.path)
        return web.json_response({})

    async with answering(catch_all) as elsewhere:
        foreign_state(tmp_path / "out", elsewhere)
        summary = await run(config, submit_only=True)
    assert heard == [] and summary.batch["jobs_at_other_endpoints"] == 1


# ------------------------------------------------------------ a cancel says what it throws away
async def test_cancel_warns_of_billed_answers_and_wait_collects_them_once(
    server, clock, tmp_path, capsys
):
    tiny_images(tmp_path / "images", 5)
    config = batch_config(tmp_path, base_url=server.base_url)
    await run(config, submit_only=True)
    out = str(tmp_path / "out")
    await until_answered(server, 5)
    clock.now += 10  # RUNNING: its batchStats count what it answered
    (cancelled,) = await batchjobs.cancel(out, base_url=server.base_url)
    assert cancelled["state"] == "JOB_STATE_CANCELLED" and cancelled["answered"] == 5
    assert "billed, and lost unless collected" in capsys.readouterr().err
    waited = await batchjobs.wait(out, base_url=server.base_url, progress=False)
    assert (waited.exit_code, dict(waited.rows)) == (exits.OK, {"ok": 5})
    again = await run(config)
    assert (again.skipped, again.batch["jobs_created"]) == (5, 0)
    assert (created(server), answers(server)) == (1, 5)  # nothing bought twice


async def until_answered(server: Any, count: int) -> None:
    await until(lambda: answers(server) >= count)


def test_the_plan_sees_the_jobs_in_flight_of_a_state_file_under_its_old_name(
    tmp_path: Path,
) -> None:
    """An output from before issue 20 keeps `state.sqlite` until a writer adopts it; the plan
    (`estimate`, `run --plan`), which writes nothing, must still see its jobs in flight, or it
    prices their files as new purchases."""
    out = tmp_path / "out"
    state = State(out)
    job = state.add_batch_job(
        "gvp-old-0001", settings_hash="x", task="{}", model="m", base_url="b", version="v1beta"
    )
    state.update_batch_job(job, phase="submitted")
    state.close()
    (out / STATE_FILE).rename(out / LEGACY_STATE_FILE)
    jobs, _ = peek_batch(out)
    assert [record.id for record in jobs] == [job]
    assert not (out / STATE_FILE).exists()  # looked at, not adopted
