"""Vertex batch prediction when things go wrong around the job: the staging store failing (the
double's `storage_fault`), the request-type header kept off the batch-job calls, and jobs that
end FAILED / PARTIALLY_SUCCEEDED / CANCELLED before all their prediction lines are written.

Reuses tests/test_vertex_batch.py's server (its `faults` mark), hand clock and helpers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import sys
from typing import Any

import pytest

from pipeline import exits
from pipeline.engines.batch import jobs as batchjobs
from pipeline.engines.batch import service
from pipeline.gemini import GeminiClient
from pipeline.gemini.backends import Vertex
from pipeline.gemini.types import GenerateRequest
from pipeline.output.state import State
from pipeline.output.stores import filesystem
from pipeline.run.calls import RunStopped
from tests.conftest import (
    UNWRITABLE,
    bounded,
    make_config,
    read_current,
    run,
    save_scenes,
    until,
    unwritable,
)
from tests.test_batch_run import jobs_in
from tests.test_store_failures import tiny_disk
from tests.test_vertex_batch import (  # and that module's fixtures, reused (__all__)
    FAST,
    LOCATION,
    MODEL,
    POLL,
    PROJECT,
    STAGING,
    buckets,
    calls,
    config_file,
    created,
    gcs_double,
    key_file,
    key_path,
    run_through,
    running,
    sdk_client,
    server_clock,
    server_options,
    staging,
    vertex_batch,
    vertex_env,
)

__all__ = [
    "buckets",
    "gcs_double",
    "key_file",
    "key_path",
    "server_clock",
    "server_options",
    "staging",
    "tiny_disk",
    "vertex_env",
]
SECRET_MARKS = ("Bearer", "ya29.", "private_key", "test-key")  # what must never be shown


# ------------------------------------------------------------------------------ staging store
@pytest.mark.faults(storage_fault=("upload=401",))
async def test_a_staging_upload_the_store_refuses_stops_the_run_cleanly(
    server, tmp_path, images_dir, vertex_env, gcs_double
):
    """gcsfs raises its HttpError (not an OSError) for a 401: the run stops with its exit code
    and one message naming the staging URI and the status — no traceback, no credential — and
    no job is made (its images are sent again by the next run)."""
    save_scenes(images_dir, 2, prefix="scene", seed=83)
    config = vertex_batch(tmp_path, server)
    path = config_file(tmp_path, server.base_url, config.input.paths[0], config.output.dir)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline", "run", str(path), "--quiet",
        env={**os.environ}, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await child.communicate()
    stderr = err.decode()
    assert child.returncode == exits.STOPPED, stderr
    assert f"{STAGING}/" in stderr and "HTTP 401 Unauthorized" in stderr
    assert "Traceback" not in stderr and not any(mark in stderr for mark in SECRET_MARKS)
    assert created(server) == 0 and jobs_in(tmp_path / "out") == []


def refused(status: str, shown: str) -> Any:
    marks = pytest.mark.faults(storage_fault=(f"upload={status}",))
    return pytest.param(shown, marks=marks, id=status)


@pytest.mark.parametrize(
    "shown", [refused("403", "HTTP 403 Forbidden"), refused("400", "HTTP 400 Bad Request")]
)
async def test_a_staging_write_the_store_refuses_stops_at_once(
    server, tmp_path, images_dir, vertex_env, gcs_double, shown
):
    """gcsfs answers a 403 with a bare OSError ("Forbidden: ...") and a 400 "invalid" with a
    ValueError ("Bad Request: ..."): each read as the refusal it is, not tried again, and named
    with its status (never a crash)."""
    save_scenes(images_dir, 2, prefix="scene", seed=89)
    summary = await run(vertex_batch(tmp_path, server))
    assert summary.exit_code == exits.STOPPED and shown in summary.stop_reason
    assert f"{STAGING}/" in summary.stop_reason and "batch_staging" in summary.resume_hint
    assert server.stats()["storage"]["faults"] == 1 and created(server) == 0


@pytest.mark.faults(storage_fault=("download=401x1",))
async def test_predictions_the_store_will_not_read_stop_the_run_and_the_next_reattaches(
    server, server_clock, tmp_path, images_dir, vertex_env, gcs_double
):
    """The job was created and answered: a store failure reading its predictions stops the run
    (naming the output folder and the status) with the job kept in flight; the next run
    collects it — one job, each answer bought once."""
    save_scenes(images_dir, 3, prefix="scene", seed=84)
    config = vertex_batch(tmp_path, server)
    stopped = await run_through(config, server, server_clock)
    assert stopped.exit_code == exits.STOPPED and "HTTP 401 Unauthorized" in stopped.stop_reason
    assert f"{STAGING}/" in stopped.stop_reason and "prediction-model-" in stopped.stop_reason
    assert [job.phase for job in jobs_in(tmp_path / "out")] == ["submitted"]
    assert not read_current(tmp_path / "out")

    again = await run(config)
    assert (again.exit_code, dict(again.rows)) == (exits.OK, {"ok": 3})
    assert created(server) == 1 and server.stats()["answers_by_task"] == {"segment": 3}


# ------------------------------------------------------------------------------ request type
async def test_the_request_type_goes_on_generate_calls_only(
    server, server_clock, tmp_path, images_dir, vertex_env, gcs_double
):
    """`[api] vertex_request_type` picks the quota an online model call is served from: a batch
    run's job calls (create, get, list, cancel, delete) never carry it; an interactive run's
    generateContent calls do, and a countTokens call does not."""
    save_scenes(images_dir, 2, prefix="scene", seed=85)
    batch = vertex_batch(tmp_path, server, vertex_request_type="dedicated")
    summary = await run_through(batch, server, server_clock)
    assert dict(summary.rows) == {"ok": 2}
    job_calls = server.stats()["vertex_batches"]["request_types"]
    assert set(job_calls) == {"unset"} and job_calls["unset"] >= 2  # a create and its polls

    live = vertex_batch(
        tmp_path, server, "live", mode="interactive", vertex_request_type="dedicated"
    )
    assert dict((await run(live)).rows) == {"ok": 2}
    assert server.stats()["vertex"]["request_types"] == {"dedicated": 2}
    backend = Vertex(server.base_url, None, LOCATION, request_type="dedicated")
    async with GeminiClient(
        api_key="test-key", backend=backend, allow_insecure_http=True
    ) as client:
        assert await client.count_tokens(GenerateRequest(model=MODEL, prompt="Hi.")) > 0
    assert server.stats()["vertex"]["request_types"] == {"dedicated": 2, "unset": 1}


class Flaky:
    """A memory filesystem whose first `failures` uploads fail as gcsfs fails once its own
    retries are spent (its HttpError, which is not an OSError)."""

    def __init__(self, code: int, failures: int) -> None:
        self.memory = filesystem("memory")
        self.code, self.failures, self.tries = code, failures, 0

    def put_file(self, local: str, remote: str) -> None:
        self.tries += 1
        if self.tries <= self.failures:
            gcs_retry = pytest.importorskip("gcsfs.retry")
            raise gcs_retry.HttpError({"code": self.code, "message": "Backend Error"})
        self.memory.put_file(local, remote)


@pytest.mark.parametrize(
    ("code", "failures", "tries", "stops"),
    [(503, 2, 3, False), (429, 3, 3, True), (408, 1, 2, False), (400, 1, 1, True)],
)
async def test_a_transient_staging_failure_is_tried_again_then_stops_the_run(
    tmp_path, code, failures, tries, stops
):
    """408, 429 and 5xx (the rule object reads follow) are tried again after a pause, up to
    STAGING_ATTEMPTS; a 400, or a transient failure that outlasts them, stops the run."""
    flaky, pauses = Flaky(code, failures), []

    async def pause(seconds: float) -> None:
        pauses.append(seconds)

    backend = Vertex("https://localhost:1", PROJECT, LOCATION)
    client = GeminiClient(api_key="test-key", backend=backend)
    jobs = service.VertexJobs(client.batch_predictions, "gs://b/p", fs=flaky, sleep=pause)
    source = tmp_path / "in.jsonl"
    source.write_text('{"key": "k"}\n')
    state = State(tmp_path / "out")
    job = state.add_batch_job(name := f"t{os.getpid()}-{code}")
    if stops:
        with pytest.raises(RunStopped, match=rf"gs://b/p/{name}/input.jsonl: HTTP {code} "):
            await jobs.put_input(source, name, job, state)
    else:
        assert await jobs.put_input(source, name, job, state) == f"gs://b/p/{name}/input.jsonl"
        assert flaky.memory.cat_file(f"b/p/{name}/input.jsonl") == b'{"key": "k"}\n'
        flaky.memory.rm(f"b/p/{name}", recursive=True)
    assert flaky.tries == tries and pauses == [2.0, 4.0][: tries - 1]
    # recorded before the write: a failed or killed run's next run deletes them
    assert state.batch_files(job) == [f"gs://b/p/{name}/input.jsonl", f"gs://b/p/{name}/output/"]
    state.close()


# --------------------------------------------------- ended short of the lines it answered
HOUR = 3600.0  # the server's clock set back this much: a job that ended an hour ago


def ending(state: str, delay: float) -> Any:
    """A parameter: jobs end `state`, their predictions written `delay` s after the end."""
    marks = pytest.mark.faults(vertex_batch_end=state, batch_output_delay_seconds=delay)
    return pytest.param(state, marks=marks, id=state)


@pytest.mark.parametrize("state", [ending("FAILED", 600), ending("PARTIALLY_SUCCEEDED", 600)])
async def test_a_job_ended_short_of_its_lines_keeps_its_output_until_they_come(
    server, server_clock, tmp_path, images_dir, staging, vertex_env, gcs_double, state
):
    """A job ended FAILED / PARTIALLY_SUCCEEDED whose completionStats count lines its folder
    does not hold yet: nothing is deleted and nothing is ended while its grace lasts (from its
    endTime); the lines written late are collected — one job, each answer bought once."""
    save_scenes(images_dir, 4, prefix="scene", seed=86)
    task = asyncio.create_task(run(vertex_batch(tmp_path, server)))
    await until(lambda: created(server) == 1, exited=running(task), interval=0.02)
    server_clock.now += 61  # ended, its 4 answers counted; its predictions written 600 s later
    polled = calls(server, POLL)
    await until(lambda: calls(server, POLL) >= polled + 3, exited=running(task), interval=0.02)
    (job,) = jobs_in(tmp_path / "out")
    assert (job.phase, job.service_state) == ("submitted", f"JOB_STATE_{state}")
    assert [p.name for p in staging.rglob("input.jsonl")] == ["input.jsonl"]  # nothing deleted
    server_clock.now += 600
    summary = await bounded(task, "the run")
    assert (summary.exit_code, dict(summary.rows)) == (exits.OK, {"ok": 4})
    assert created(server) == 1 and server.stats()["answers_by_task"] == {"segment": 4}
    assert summary.batch["prediction_lines_never_arrived"] == 0


@pytest.mark.parametrize("state", [ending("FAILED", 10**7), ending("PARTIALLY_SUCCEEDED", 10**7)])
async def test_lines_that_never_come_are_waited_for_then_counted_in_the_summary(
    server, server_clock, tmp_path, images_dir, staging, vertex_env, gcs_double, state
):
    """Past [batch] ended_output_grace_seconds after its endTime (an hour ago here), a job whose
    lines never came is ended: the summary says how many never arrived, its images are left
    for the next run (exit 3: it failed), its staged files deleted."""
    server_clock.now -= HOUR
    save_scenes(images_dir, 3, prefix="scene", seed=87)
    summary = await run_through(vertex_batch(tmp_path, server), server, server_clock)
    assert summary.exit_code == exits.STOPPED and not summary.rows
    (ended,) = summary.batch["jobs_ended"]
    assert (ended["state"], ended["requests"], ended["lines_never_arrived"]) == (state, 3, 3)
    assert summary.batch["prediction_lines_never_arrived"] == 3
    assert [job.phase for job in jobs_in(tmp_path / "out")] == ["ended"]
    assert not [p for p in staging.rglob("*") if p.is_file()]


async def test_past_its_grace_a_cancelled_job_gives_the_lines_that_came(
    server, server_clock, tmp_path, images_dir, staging, vertex_env, gcs_double
):
    """A job cancelled an hour ago whose folder holds 3 of the 4 lines it answered: what is
    there is collected (3 rows, none bought again), the fourth counted as never arrived and its
    image left for the next run; a cancel never stops the run."""
    server_clock.now -= HOUR
    save_scenes(images_dir, 4, prefix="scene", seed=88)
    config = vertex_batch(tmp_path, server)
    assert (await run(config, submit_only=True)).batch["jobs_created"] == 1
    await batchjobs.cancel(str(tmp_path / "out"), config)
    (written,) = staging.rglob("predictions.jsonl")
    written.write_bytes(b"".join(written.read_bytes().splitlines(keepends=True)[:3]))
    summary = await run(config)
    assert (summary.exit_code, dict(summary.rows)) == (exits.OK, {"ok": 3})
    (ended,) = summary.batch["jobs_ended"]
    assert (ended["state"], ended["requests"], ended["lines_never_arrived"]) == ("CANCELLED", 1, 1)
    assert summary.batch["prediction_lines_never_arrived"] == 1
    task = asyncio.create_task(run(config))  # the lost one, bought again in a second job
    await until(lambda: created(server) == 2, exited=running(task), interval=0.02)
    server_clock.now += 61
    again = await bounded(task, "the run")
    assert dict(again.rows) == {"ok": 1} and len(read_current(tmp_path / "out")) == 4
    assert server.stats()["answers_by_task"] == {"segment": 4 + 1}


class Refusing:
    """A filesystem whose uploads the store answers with a 400 that gcsfs turns into a
    ValueError (its validate_response, its retry_request), as a real bucket would."""

    def __init__(self, message: str) -> None:
        self.message, self.tries = message, 0

    def put_file(self, local: str, remote: str) -> None:
        self.tries += 1
        gcs_retry = pytest.importorskip("gcsfs.retry")
        body = json.dumps({"error": {"code": 400, "message": self.message}}).encode()

        @gcs_retry.retry_request
        async def upload() -> None:
            gcs_retry.validate_response(400, body, remote)

        asyncio.run(upload())


@pytest.mark.parametrize(
    "message",
    [
        "Invalid argument: the object name is invalid",
        "Bucket is a requester pays bucket but no user project provided.",
    ],
)
async def test_a_staging_400_gcsfs_raises_as_a_value_error_stops_the_run_cleanly(tmp_path, message):
    """A 400 gcsfs raises as a ValueError (a message saying "invalid", a requester-pays
    bucket) is the store's refusal: the run stops naming the URI and the status, tried once —
    not an exception with its traceback."""
    refusing = Refusing(message)
    backend = Vertex("https://localhost:1", PROJECT, LOCATION)
    client = GeminiClient(api_key="test-key", backend=backend)
    jobs = service.VertexJobs(client.batch_predictions, "gs://b/p", fs=refusing)
    source = tmp_path / "in.jsonl"
    source.write_text('{"key": "k"}\n')
    state = State(tmp_path / "out")
    job = state.add_batch_job(name := f"t{os.getpid()}-400")
    with pytest.raises(RunStopped, match=rf"gs://b/p/{name}/input.jsonl: HTTP 400 "):
        await jobs.put_input(source, name, job, state)
    assert refusing.tries == 1
    state.close()


@pytest.mark.faults(vertex_batch_end="FAILED", batch_output_delay_seconds=600)
async def test_output_wait_does_not_cut_an_ended_jobs_grace(
    server, server_clock, tmp_path, images_dir, staging, vertex_env, gcs_double
):
    """[batch] output_wait_seconds is how long a job that says it SUCCEEDED is waited for; a
    job ended FAILED short of its lines is waited for by its own grace: a short output_wait
    does not end the run early saying the job "succeeded but its output was still not
    attached" — its late lines are collected in the same run, each bought once."""
    save_scenes(images_dir, 4, prefix="scene", seed=90)
    base = vertex_batch(tmp_path, server)
    config = make_config(
        tmp_path,
        api={f: getattr(base.api, f) for f in ("backend", "project", "location", "base_url")}
        | {"mode": "batch", "batch_staging": STAGING},
        batch={**FAST, "output_wait_seconds": 0.05},
        output={"dir": str(tmp_path / "out")},
    )
    task = asyncio.create_task(run(config))
    await until(lambda: created(server) == 1, exited=running(task), interval=0.02)
    server_clock.now += 61  # ended FAILED, its 4 answers counted; written 600 s later
    polled = calls(server, POLL)
    await until(lambda: calls(server, POLL) >= polled + 5, exited=running(task), interval=0.02)
    server_clock.now += 600
    summary = await bounded(task, "the run")
    assert (summary.exit_code, dict(summary.rows)) == (exits.OK, {"ok": 4}), summary.stop_reason
    assert summary.batch["jobs_awaiting_output"] == [] and created(server) == 1


# ------------------------------------------------------- a job given up on, then ended otherwise
async def test_a_job_given_up_on_then_lost_is_reported_ended_not_owed(
    server, server_clock, tmp_path, images_dir, staging, key_file, vertex_env, gcs_double
):
    """A job that SUCCEEDED short of its predictions (1 of 2 written) is given up on ([batch]
    output_wait_seconds) while the run follows another; then the service forgets it (deleted):
    it is over. The summary says it ended LOST, its images left for the next run (exit 3) —
    and no longer that its answers are still owed, as if it were in flight."""
    save_scenes(images_dir, 2, prefix="first", seed=91)
    config, out = vertex_batch(tmp_path, server), tmp_path / "out"
    batch = dataclasses.replace(config.batch, output_wait_seconds=1e-6)
    config = dataclasses.replace(config, batch=batch)
    assert (await run(config, submit_only=True)).batch["jobs_created"] == 1
    server_clock.now += 61  # SUCCEEDED: its predictions are written when it is next read
    (given_up,) = (await batchjobs.status(str(out), config))["jobs"]
    (written,) = staging.rglob("predictions.jsonl")
    written.write_bytes(written.read_bytes().splitlines(keepends=True)[0])  # 1 of its 2 lines
    save_scenes(images_dir, 3, prefix="second", seed=95)  # the next run's own job
    polled = calls(server, POLL)
    task = asyncio.create_task(run(config))
    await until(lambda: created(server) == 2, exited=running(task), interval=0.02)
    # a pass before the walk polls the first job, each later one both: seen short 4 times
    await until(lambda: calls(server, POLL) >= polled + 7, exited=running(task), interval=0.02)
    await sdk_client(server, key_file).aio.batches.delete(name=given_up["name"])
    phases = lambda: [(job.phase, job.service_state) for job in jobs_in(out)]  # noqa: E731
    await until(lambda: phases()[0][0] == "ended", exited=running(task), interval=0.02)
    server_clock.now += 61  # the second job SUCCEEDED, its predictions all written
    summary = await bounded(task, "the run")
    assert summary.exit_code == exits.STOPPED and "ended LOST" in summary.stop_reason
    assert [job["state"] for job in summary.batch["jobs_ended"]] == ["LOST"]
    assert summary.batch["jobs_awaiting_output"] == [] and summary.batch["jobs_in_flight"] == 0
    assert dict(summary.rows) == {"ok": 3}
    assert phases() == [("ended", "LOST"), ("collected", "JOB_STATE_SUCCEEDED")]


# ------------------------------------------------ predictions that cannot be written here
@pytest.mark.parametrize(("how", "said"), UNWRITABLE)
async def test_predictions_that_cannot_be_written_here_stop_naming_the_local_file(
    request,
    server,
    server_clock,
    tmp_path,
    images_dir,
    staging,
    vertex_env,
    gcs_double,
    caplog,
    how,
    said,
):
    """Writing a job's downloaded predictions on this machine fails (a full disk, a folder this
    user may not write): the machine's failure, not the store's — not tried again, and the run
    stops (exit 3) naming the local file and the OS error, not the bucket. The job stays in
    flight with its output: once the disk is mended, `batch wait` collects it, none bought
    again."""
    save_scenes(images_dir, 3, prefix="scene", seed=93)
    config, out = vertex_batch(tmp_path, server), tmp_path / "out"
    assert (await run(config, submit_only=True)).batch["jobs_created"] == 1
    mend = unwritable(out / ".batch", how, request)
    server_clock.now += 61
    with caplog.at_level(logging.INFO, logger=service.__name__):
        stopped = await bounded(batchjobs.wait(str(out), config, progress=False), "wait")
    assert stopped.exit_code == exits.STOPPED and f"{said}" in stopped.stop_reason
    assert f"{out / '.batch'}/" in stopped.stop_reason and ".part" in stopped.stop_reason
    assert "gs://" not in stopped.stop_reason and "batch_staging" not in stopped.resume_hint
    assert "trying again" not in caplog.text  # (as the store's passing failures are)
    assert [job.phase for job in jobs_in(out)] == ["submitted"]
    assert len(list(staging.rglob("predictions.jsonl"))) == 1  # nothing deleted
    mend()
    again = await bounded(batchjobs.wait(str(out), config, progress=False), "wait")
    assert (again.exit_code, dict(again.rows)) == (exits.OK, {"ok": 3})
    assert created(server) == 1 and server.stats()["answers_by_task"] == {"segment": 3}
