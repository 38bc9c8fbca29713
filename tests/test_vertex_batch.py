"""Vertex AI batch prediction end to end: `[api] backend = "vertex"` with `mode = "batch"` against
the local server over loopback — google-auth's real service-account flow (tests/test_vertex.py's
key file), the job's JSONL written to a gs:// staging prefix through gcsfs and the double's
storage API, `batchPredictionJobs` created, polled, re-attached after a real kill -9, and its
`predictions.jsonl` read from the mapped bucket into the same rows an interactive run makes.

The server runs on a hand clock started at the real time (google-auth's assertions carry real
times, which the double checks): a test moves its jobs through time without sleeping.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google import genai
from google.genai import types

from pipeline import exits
from pipeline.config import ConfigError, load_config
from pipeline.engines.batch import jobs as batchjobs
from pipeline.gemini.vertex_batches import parse_vertex_job, read_prediction
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer
from pipeline.output.stores import filesystem as gcsfs_filesystem
from tests.conftest import Clock, bounded, make_config, read_current, run, save_scenes, until
from tests.test_batch_run import jobs_in
from tests.test_vertex import (  # and that module's fixtures, reused (__all__)
    LOCATION,
    MODEL,
    PROJECT,
    buckets,
    gcs_double,
    key_file,
    key_path,
    sdk_client,
    vertex_env,
)

__all__ = ["buckets", "gcs_double", "key_file", "key_path", "vertex_env"]  # fixtures, by name
STAGING = "gs://staging/gvp"
JOBS = f"/v1/projects/{PROJECT}/locations/{LOCATION}/batchPredictionJobs"
POLL = f"GET {JOBS}/{{id}}"
FAST = {"poll_seconds": 0.02, "max_poll_seconds": 0.1}


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    """The folder the double keeps gs://staging/... in."""
    folder = tmp_path / "bucket-staging"
    folder.mkdir()
    return folder


def options(key_path: Path, buckets: Path, staging: Path, **faults: Any) -> ServerOptions:
    return ServerOptions(
        api_key="test-key",
        service_account=str(key_path),
        token_seconds=3600,
        gs_root=(f"photos={buckets}", f"staging={staging}"),
        **{"batch_seconds": 60, **faults},
    )


@pytest.fixture
def server_options(
    request: pytest.FixtureRequest, key_path: Path, buckets: Path, staging: Path
) -> ServerOptions:
    """The server of the module; a test's `faults` mark adds the double's fault options."""
    faults = request.node.get_closest_marker("faults")
    return options(key_path, buckets, staging, **(faults.kwargs if faults else {}))


@pytest.fixture
def server_clock() -> Clock:
    return Clock(time.time())


def vertex_batch(tmp_path: Path, server: LocalServer, out: str = "out", **api: Any):
    settings = {"backend": "vertex", "project": PROJECT, "location": LOCATION}
    settings |= {"base_url": server.base_url, "mode": "batch", "batch_staging": STAGING, **api}
    inputs = {"input": {"paths": [api_input]}} if (api_input := settings.pop("paths", None)) else {}
    output = {"dir": str(tmp_path / out)}
    return make_config(tmp_path, api=settings, batch=FAST, output=output, **inputs)


def config_file(tmp_path: Path, base_url: str, images: str, out: str, *extra: str) -> Path:
    """A Vertex batch run's config as a file, for a `pipeline run` process (`extra`: lines of
    further sections)."""
    path = tmp_path / "batch.toml"
    lines = [
        "[api]",
        f'base_url = "{base_url}"',
        'backend = "vertex"',
        f'project = "{PROJECT}"',
        f'location = "{LOCATION}"',
        'mode = "batch"',
        f'batch_staging = "{STAGING}"',
        "[input]",
        f'paths = ["{images}"]',
        "[task]",
        'kind = "detect"',
        "[output]",
        f'dir = "{out}"',
        *extra,
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def created(server: LocalServer) -> int:
    return server.stats()["vertex_batches"]["created"]


def calls(server: LocalServer, route: str) -> int:
    return sum(server.stats()["requests"].get(route, {}).values())


def running(task: asyncio.Task) -> Any:
    return lambda: task.result() if task.done() else None


async def run_through(config, server: LocalServer, clock: Clock):
    """A run whose job's time is up once it was created (the clock moved past it)."""
    task = asyncio.create_task(run(config))
    await until(lambda: created(server) >= 1, exited=running(task), interval=0.02)
    clock.now += 61
    return await bounded(task, "the run")


# ---------------------------------------------------------------------------- the same rows
async def test_batch_prediction_gives_the_interactive_runs_rows_at_half_the_price(
    server, server_clock, tmp_path, images_dir, staging, vertex_env, gcs_double
):
    save_scenes(images_dir, 6, prefix="scene", seed=11)
    interactive = vertex_batch(tmp_path, server, "live", mode="interactive")
    first = await run(interactive)
    summary = await run_through(vertex_batch(tmp_path, server), server, server_clock)

    assert (summary.exit_code, dict(summary.rows)) == (exits.OK, {"ok": 6})
    assert summary.batch["jobs_created"] == summary.batch["jobs_collected"] == 1
    live, bought = read_current(tmp_path / "live"), read_current(tmp_path / "out")
    assert sorted(live) == sorted(bought) and len(bought) == 6
    for name, row in bought.items():
        assert row["key"] == live[name]["key"] and row["objects"] == live[name]["objects"]
        assert row["input_mode"] == "batch"
    assert summary.tokens == first.tokens  # the table's batch price: half the interactive one
    assert summary.cost_usd == pytest.approx(first.cost_usd / 2, abs=1e-6)  # (6 decimals)
    assert calls(server, f"POST {JOBS}") == 1
    # the staged input and the predictions are deleted once collected
    assert not [p for p in staging.rglob("*") if p.is_file()]
    assert [job.phase for job in jobs_in(tmp_path / "out")] == ["collected"]


async def test_gs_inputs_go_in_place_in_the_job_and_are_never_downloaded(
    server, server_clock, tmp_path, buckets, staging, vertex_env, gcs_double
):
    """A job over gs:// inputs: its lines carry each object's URI (fileData), which the service
    reads; the pipeline reads a header range of each and never the object, as interactively."""
    (buckets / "day1").mkdir()
    save_scenes(buckets / "day1", 3, prefix="scene", seed=12, size=(300, 200))
    config = vertex_batch(tmp_path, server, paths="gs://photos/day1")
    summary = await run_through(config, server, server_clock)

    assert (summary.exit_code, dict(summary.rows)) == (exits.OK, {"ok": 3})
    rows = read_current(tmp_path / "out")
    assert {row["input_mode"] for row in rows.values()} == {"batch"}
    # the pipeline read a header range of each image and never a whole one (gcsfs reads the
    # predictions file by ranges too: range_gets is not the images' alone)
    assert server.stats()["storage"]["object_gets"] == 0
    assert server.stats()["storage"]["range_gets"] >= 3
    assert server.stats()["vertex"]["gs_reads"] == 3 + 1  # the service: the images, the JSONL


# ------------------------------------------------------------------------ resumable, paid once
async def test_kill_9_while_polling_then_rerun_reattaches_to_the_same_job(
    server, server_clock, tmp_path, images_dir, vertex_env, gcs_double
):
    save_scenes(images_dir, 8, prefix="scene", seed=21)
    path = config_file(
        tmp_path, server.base_url, str(images_dir), str(tmp_path / "out"),
        "[batch]", "poll_seconds = 0.02", "max_poll_seconds = 0.05",
    )  # fmt: skip
    child = await asyncio.create_subprocess_exec(  # (vertex_env's credentials, gcs_double's)
        sys.executable, "-m", "pipeline", "run", str(path), "--quiet", env={**os.environ}
    )
    try:  # created, then polled at least once (PENDING: the clock has not moved)
        await until(lambda: calls(server, POLL), exited=lambda: child.returncode, interval=0.02)
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    assert child.returncode == -signal.SIGKILL
    assert created(server) == 1 and not read_current(tmp_path / "out")

    server_clock.now += 61  # the job's time is up; the rerun re-attaches to it
    summary = await run(load_config(path))
    assert created(server) == 1  # no second job: nothing paid twice
    assert server.stats()["answers_by_task"] == {"detect": 8}  # each answer bought once
    assert summary.batch["jobs_created"] == 0 and summary.batch["jobs_collected"] == 1
    assert dict(summary.rows) == {"ok": 8} and len(read_current(tmp_path / "out")) == 8


async def test_submit_only_then_batch_status_and_wait_collect_on_vertex(
    server, server_clock, tmp_path, images_dir, vertex_env, gcs_double
):
    """A cron run submits and exits; `pipeline batch status` and `wait` with the Vertex config
    (service-account credentials, no API key) read and collect the job: no second job."""
    save_scenes(images_dir, 4, prefix="scene", seed=51)
    config = vertex_batch(tmp_path, server)
    submitted = await bounded(run(config, submit_only=True), "the --submit-only run")
    assert submitted.batch["jobs_created"] == 1 and not read_current(tmp_path / "out")
    report = await bounded(batchjobs.status(str(tmp_path / "out"), config), "batch status")
    (job,) = report["jobs"]
    assert job["live"]["state"] == "JOB_STATE_PENDING" and job["live"]["requests"] == 4
    server_clock.now += 61
    waited = await bounded(batchjobs.wait(str(tmp_path / "out"), config, progress=False), "wait")
    assert waited.rows == {"ok": 4} and waited.batch["jobs_collected"] == 1
    assert created(server) == 1 and len(read_current(tmp_path / "out")) == 4


@pytest.mark.faults(batch_output_delay_seconds=600)
async def test_a_job_whose_predictions_come_late_is_polled_then_collected(
    server, server_clock, tmp_path, images_dir, staging, vertex_env, gcs_double
):
    """SUCCEEDED with its output folder named, predictions.jsonl not there yet: polled on (not
    read as empty, nothing bought again), collected once the file is written."""
    save_scenes(images_dir, 5, prefix="scene", seed=31)
    task = asyncio.create_task(run(vertex_batch(tmp_path, server)))
    await until(lambda: created(server) == 1, exited=running(task), interval=0.02)
    server_clock.now += 61  # SUCCEEDED; its predictions are written 600 s later
    polled = calls(server, POLL)
    await until(lambda: calls(server, POLL) >= polled + 3, exited=running(task), interval=0.02)
    (job,) = jobs_in(tmp_path / "out")
    assert (job.phase, job.service_state) == ("submitted", "JOB_STATE_SUCCEEDED")
    assert not read_current(tmp_path / "out") and not list(staging.rglob("predictions.jsonl"))
    server_clock.now += 600
    summary = await bounded(task, "the run")
    stats = server.stats()
    assert (summary.exit_code, dict(summary.rows)) == (exits.OK, {"ok": 5})
    assert stats["vertex_batches"]["created"] == 1 and stats["answers_by_task"] == {"segment": 5}
    assert summary.batch["requests_without_result"] == 0


# ------------------------------------------------------------------------------ what went wrong
@pytest.mark.faults(fault_rate=0.3, seed=11)
async def test_lines_that_failed_become_rows_naming_the_reason(
    server, server_clock, tmp_path, images_dir, vertex_env, gcs_double
):
    save_scenes(images_dir, 30, prefix="scene", seed=41)
    summary = await run_through(vertex_batch(tmp_path, server), server, server_clock)
    rows = read_current(tmp_path / "out")
    failed = {name for name, row in rows.items() if row["status"] != "ok"}
    assert summary.exit_code == exits.ROWS_NOT_OK and failed and len(rows) == 30
    assert all(rows[name]["retryable"] and rows[name]["error"] for name in failed)
    assert all(rows[name]["input_mode"] == "batch" for name in failed)


@pytest.mark.faults(batch_corrupt_line=2)
async def test_a_cut_prediction_line_is_its_keys_retryable_row_the_rest_ok(
    server, server_clock, tmp_path, images_dir, vertex_env, gcs_double
):
    save_scenes(images_dir, 6, prefix="scene", seed=61)
    summary = await run_through(vertex_batch(tmp_path, server), server, server_clock)
    assert (summary.exit_code, dict(summary.rows)) == (exits.ROWS_NOT_OK, {"ok": 5, "error": 1})
    (bad,) = [row for row in read_current(tmp_path / "out").values() if row["status"] != "ok"]
    assert bad["retryable"] and bad["error"].startswith("batch result line unreadable: ")
    assert summary.batch["requests_without_result"] == 0


@pytest.mark.faults(batch_seconds=30, batch_expiry_seconds=10)
async def test_an_expired_job_is_reported_and_its_images_left_for_the_next_run(
    server, server_clock, tmp_path, images_dir, vertex_env, gcs_double
):
    """EXPIRED with its output folder named but empty: ended, no rows, its images sent again."""
    save_scenes(images_dir, 3, prefix="scene", seed=71)
    summary = await run_through(vertex_batch(tmp_path, server), server, server_clock)
    assert summary.exit_code == exits.STOPPED and "EXPIRED" in summary.stop_reason
    assert not summary.rows and [j.phase for j in jobs_in(tmp_path / "out")] == ["ended"]


async def test_a_staging_bucket_that_cannot_be_written_stops_the_run_naming_the_key(
    server, tmp_path, images_dir, vertex_env, gcs_double
):
    save_scenes(images_dir, 2, prefix="scene", seed=81)
    summary = await run(vertex_batch(tmp_path, server, batch_staging="gs://nosuch/gvp"))
    assert summary.exit_code == exits.STOPPED and "batch_staging" in summary.resume_hint
    assert "gs://nosuch/gvp/" in summary.stop_reason and created(server) == 0
    assert not summary.rows and jobs_in(tmp_path / "out") == []  # dropped: sent again next time


def test_vertex_batch_without_a_staging_prefix_names_the_key(tmp_path):
    api = {"backend": "vertex", "project": PROJECT, "mode": "batch"}
    with pytest.raises(ConfigError, match=r"\[api\] batch_staging: required"):
        make_config(tmp_path, api=api)
    with pytest.raises(ConfigError, match=r"\[api\] batch_staging must be"):
        make_config(tmp_path, api={**api, "batch_staging": "s3://bucket/x"})


# ----------------------------------------------------------------------------- the official SDK
async def test_the_sdks_vertex_batches_create_get_list_cancel_and_delete(
    server, server_clock, key_file, staging
):
    line = {"request": {"contents": [{"role": "user", "parts": [{"text": "Describe a cat."}]}]}}
    (staging / "in.jsonl").write_text(json.dumps({"key": "k1", **line}) + "\n")
    client = sdk_client(server, key_file)
    job = await client.aio.batches.create(
        model=MODEL,
        src="gs://staging/in.jsonl",
        config=types.CreateBatchJobConfig(dest="gs://staging/out", display_name="sdk-job"),
    )
    assert job.state == types.JobState.JOB_STATE_PENDING and job.display_name == "sdk-job"
    server_clock.now += 61
    done = await client.aio.batches.get(name=job.name)
    assert done.state == types.JobState.JOB_STATE_SUCCEEDED
    folder = done.output_info.gcs_output_directory.removeprefix("gs://staging/")
    (prediction,) = [json.loads(x) for x in (staging / folder / "predictions.jsonl").open()]
    assert prediction["key"] == "k1" and prediction["response"]["candidates"]
    listed = [j.name async for j in await client.aio.batches.list()]
    assert listed == [job.name]
    await client.aio.batches.delete(name=job.name)
    assert isinstance(client, genai.Client)

    second = await client.aio.batches.create(model=MODEL, src="gs://staging/in.jsonl")
    await client.aio.batches.cancel(name=second.name)
    cancelled = await client.aio.batches.get(name=second.name)
    assert cancelled.state == types.JobState.JOB_STATE_CANCELLED
    assert server.stats()["vertex_batches"]["created"] == 2


# ------------------------------------------------------------------------- the wire, no server
def test_a_prediction_line_is_its_answer_or_the_error_its_status_names():
    answer = {"candidates": [{"content": {"role": "model", "parts": [{"text": "[]"}]}}]}
    ok = read_prediction(json.dumps({"key": "k1", "request": {}, "response": answer}), 1)
    assert ok.key == "k1" and ok.response is not None and ok.response.text == "[]"
    error = {
        "error": {"code": 400, "message": "Please use a valid role", "status": "INVALID_ARGUMENT"}
    }
    refused = read_prediction(
        json.dumps({"key": "k2", "status": f"Bad Request: {json.dumps(error)}"}), 2
    )
    assert refused.key == "k2" and refused.error is not None
    assert (refused.error.code, refused.error.retryable) == (400, False)
    busy = read_prediction(json.dumps({"key": "k3", "status": {"code": 14, "message": "busy"}}), 3)
    assert busy.error is not None and (busy.error.code, busy.error.retryable) == (503, True)
    unknown = read_prediction(json.dumps({"key": "k4", "status": "Internal error occurred"}), 4)
    assert unknown.error is not None and unknown.error.code == 500
    cut = read_prediction('{"key": "k5", "request": {"contents": [', 5)
    assert cut.key == "k5" and cut.unreadable is not None and cut.unreadable.number == 5


def test_a_batch_prediction_job_reads_as_a_batch_job():
    job = parse_vertex_job(
        {
            "name": f"projects/{PROJECT}/locations/{LOCATION}/batchPredictionJobs/123",
            "displayName": "gvp-x-0001",
            "state": "JOB_STATE_SUCCEEDED",
            "completionStats": {"successfulCount": "7", "failedCount": "2"},
            "outputInfo": {"gcsOutputDirectory": "gs://b/p/prediction-model-1/"},
        }
    )
    assert (job.done, job.ended, job.has_output) == (True, True, True)
    assert job.output_dir == "gs://b/p/prediction-model-1" and job.display_name == "gvp-x-0001"
    assert (job.stats.succeeded, job.stats.failed, job.stats.pending) == (7, 2, 0)
    running = parse_vertex_job({"name": "n", "state": "JOB_STATE_RUNNING"})
    assert (running.done, running.has_output) == (False, False)


async def test_the_storage_double_takes_gcsfs_uploads_and_deletes(server, staging, gcs_double):
    """What the staging prefix needs of the double: gcsfs's multipart upload (small), its
    resumable upload (5 MB and more), its listing and its single DELETE. (gcsfs blocks on its
    own loop: called from a thread, as the pipeline calls it, while the server runs here.)"""
    fs = gcsfs_filesystem("gs")  # the store layer's, as the staging writes use it
    await asyncio.to_thread(fs.pipe_file, "staging/a/small.jsonl", b'{"key": "1"}\n')
    big = np.random.default_rng(3).integers(0, 256, size=6 * 2**20, dtype=np.uint8).tobytes()
    (staging / "local.bin").write_bytes(big)
    await asyncio.to_thread(fs.put_file, str(staging / "local.bin"), "staging/a/b/big.bin")
    assert (staging / "a" / "small.jsonl").read_bytes() == b'{"key": "1"}\n'
    assert (staging / "a" / "b" / "big.bin").read_bytes() == big
    found = await asyncio.to_thread(fs.find, "staging/a/")
    assert sorted(found) == ["staging/a/b/big.bin", "staging/a/small.jsonl"]
    await asyncio.to_thread(fs.rm_file, "staging/a/b/big.bin")
    assert not (staging / "a" / "b" / "big.bin").exists()
    assert server.stats()["storage"]["object_puts"] == 2


async def test_batch_wait_with_a_vertex_config_without_staging_names_the_config_file(
    server, tmp_path, images_dir, vertex_env, gcs_double
):
    """`pipeline batch wait --config` with a Vertex config that has no batch_staging (an
    interactive run's) refuses naming the key and the config file, as status and cancel do."""
    save_scenes(images_dir, 2, prefix="scene", seed=53)
    submitted = await run(vertex_batch(tmp_path, server), submit_only=True)
    assert submitted.batch["jobs_created"] == 1
    api = {"backend": "vertex", "project": PROJECT, "location": LOCATION}
    api |= {"base_url": server.base_url, "mode": "interactive"}
    interactive = make_config(tmp_path, api=api, output={"dir": str(tmp_path / "out")})
    with pytest.raises(ConfigError, match=r"^test-config\.toml: \[api\] batch_staging"):
        await batchjobs.wait(str(tmp_path / "out"), interactive, progress=False)


def test_a_blank_line_in_a_predictions_file_is_not_counted_as_a_prediction(tmp_path):
    """The copy counts the predictions written (the non-blank lines the reader reads): a blank
    line does not stand in for one still to come, so the job is not collected short of it."""
    from pipeline.engines.batch.service import VertexJobs
    from pipeline.gemini.batches import BatchJob, BatchStats

    jobs = VertexJobs.__new__(VertexJobs)
    jobs.fs = gcsfs_filesystem("memory")
    folder = f"/t{os.getpid()}-{time.monotonic_ns()}/output/prediction-model-1"
    jobs.fs.pipe(f"{folder}/predictions_0001.jsonl", b'{"key":"a"}\n\n{"key":"b"}\n')
    stats = BatchStats(requests=3, succeeded=3)
    remote = BatchJob("j", "JOB_STATE_SUCCEEDED", True, stats=stats, output_dir=f"memory:/{folder}")
    destination = tmp_path / "results.jsonl.part"
    assert jobs._copy(remote, destination) is False  # two of three written so far
    assert not destination.exists()
    jobs.fs.pipe(f"{folder}/predictions_0002.jsonl", b'{"key":"c"}')  # the third, unterminated
    try:
        assert jobs._copy(remote, destination) is True
        assert destination.read_bytes().split(b"\n") == [
            b'{"key":"a"}',
            b"",
            b'{"key":"b"}',
            b'{"key":"c"}',
            b"",
        ]
    finally:
        jobs.fs.rm(folder.rsplit("/output", 1)[0], recursive=True)


async def test_a_cancelled_job_short_of_the_predictions_it_answered_is_not_dropped(
    server, tmp_path, images_dir, staging, vertex_env, gcs_double
):
    """A job ended CANCELLED whose folder holds fewer lines than its completionStats say it
    answered (still being written): its paid answers are waited for, never deleted with its
    output and bought again — past [batch] ended_output_grace_seconds, the lines there are
    collected. ([batch] output_wait_seconds, a succeeded job's, does not bound that wait.)"""
    import dataclasses

    save_scenes(images_dir, 4, prefix="scene", seed=57)
    config = vertex_batch(tmp_path, server)
    batch = dataclasses.replace(
        config.batch, output_wait_seconds=0.05, ended_output_grace_seconds=1.0
    )
    config = dataclasses.replace(config, batch=batch)
    assert (await run(config, submit_only=True)).batch["jobs_created"] == 1
    (_cancelled,) = await batchjobs.cancel(str(tmp_path / "out"), config)
    (written,) = staging.rglob("predictions.jsonl")
    lines = written.read_bytes().splitlines(keepends=True)
    assert len(lines) == 4
    written.write_bytes(b"".join(lines[:3]))  # the fourth not written yet
    summary = await bounded(batchjobs.wait(str(tmp_path / "out"), config, progress=False), "wait")
    (job,) = jobs_in(tmp_path / "out")
    assert job.phase == "collected" and dict(summary.rows) == {"ok": 3}
    assert summary.batch["prediction_lines_never_arrived"] == 1
