"""Batch Mode end to end: `pipeline run --batch` against the local server over loopback, real
files, real Parquet, a real state.sqlite — and a real kill -9.

Runs against `base_url = "local"` use a short `[local] batch_seconds`; runs that must outlive a
process, or whose jobs a test moves through time, use a LocalServer in the test's event loop with
a hand clock (tests/conftest.Clock).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pipeline import exits
from pipeline.cli import main
from pipeline.commands import status as status_command
from pipeline.config import ConfigError
from pipeline.engines.batch import jobs as batchjobs
from pipeline.gemini import GeminiClient
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer
from pipeline.output.parts import current_rows
from pipeline.output.state import State
from pipeline.output.stores import open_store
from tests.conftest import (
    UNWRITABLE,
    Clock,
    bounded,
    draw_shapes,
    make_config,
    put_images,
    read_current,
    read_rows,
    run,
    until,
    unwritable,
)
from tests.test_store_failures import tiny_disk  # noqa: F401 (a fixture `unwritable` asks for)

FAST = {"poll_seconds": 0.02, "max_poll_seconds": 0.1}  # [batch]: tests poll often
KEY = "batch-test-key"


def tiny_images(folder: Path, count: int, start: int = 0) -> list[str]:
    """`count` distinct 32x32 PNGs, one flat shape each (exact answers, cheap to analyse); a
    text chunk with its number keeps every file's bytes apart (a few seeds draw alike)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(start, start + count):
        image, _ = draw_shapes(32, 32, seed=i, count=1)
        number = PngInfo()
        number.add_text("n", str(i))
        image.save(folder / f"{i:04d}.png", compress_level=1, pnginfo=number)
        names.append(f"{i:04d}.png")
    return names


def batch_config(tmp_path: Path, base_url: str = "local", **sections: dict[str, Any]):
    sections = {name: dict(values) for name, values in sections.items()}
    sections.setdefault("api", {}).update(base_url=base_url, mode="batch")
    sections.setdefault("batch", {}).update({**FAST, **sections.get("batch", {})})
    if base_url == "local":
        sections.setdefault("local", {}).setdefault("batch_seconds", 0.1)
    return make_config(tmp_path, **sections)


def jobs_in(output: Path) -> list[Any]:
    state = State(output)
    try:
        return state.batch_jobs()
    finally:
        state.close()


@pytest.fixture
def key_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs against a server of the test find its key in the environment, as a user's would."""
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)


@pytest.fixture
def server_options(key_in_env: None) -> ServerOptions:
    """The options of the `server` fixture (tests/conftest.py) in this module: a server that
    outlives the runs."""
    return ServerOptions(api_key=KEY, batch_seconds=60)


def stand_in(clock: Clock, **options: Any) -> LocalServer:
    """A server like `server`'s, with other options (a Batch Mode fault), on the hand clock."""
    return LocalServer(ServerOptions(api_key=KEY, batch_seconds=60, **options), clock=clock)


@pytest.fixture
def server_clock(clock: Clock) -> Clock:
    return clock  # the test moves the server's jobs through time


# ------------------------------------------------------------------ the same rows, half the price
async def test_a_640_image_segment_job_gives_the_interactive_runs_objects_and_masks(tmp_path):
    # 640, not 2,000: the same three jobs, the last one short, at a third of the CPU (11.8 s);
    # at 640 the half price is exact to the micro-dollar, as at 2,000 (not at 400, 800, 1,000)
    names = tiny_images(tmp_path / "images", 640)
    interactive = make_config(tmp_path, output={"dir": str(tmp_path / "interactive")})
    batch = batch_config(
        tmp_path, batch={"requests_per_job": 224}, output={"dir": str(tmp_path / "batch")}
    )
    first = await run(interactive)
    summary = await run(batch)

    assert (summary.exit_code, dict(summary.rows)) == (exits.OK, {"ok": 640})
    assert summary.batch["jobs_created"] == summary.batch["jobs_collected"] == 3  # 224+224+192
    assert summary.batch["requests_submitted"] == 640 and summary.batch["jobs_in_flight"] == 0
    live, bought = read_current(tmp_path / "interactive"), read_current(tmp_path / "batch")
    assert sorted(live) == sorted(bought) == names
    for name in names:
        assert bought[name]["key"] == live[name]["key"]
        assert bought[name]["objects"] == live[name]["objects"], name  # boxes, labels, masks RLE
        assert bought[name]["input_mode"] == "batch" and live[name]["input_mode"] == "inline"
    assert sum(1 for row in bought.values() if row["objects"][0]["mask"]) == 640

    # the same tokens, billed at half the price: in the summary and in `pipeline status`
    assert summary.tokens == first.tokens
    assert summary.cost_usd == pytest.approx(first.cost_usd / 2, rel=1e-6)
    cost = status_command.status(tmp_path / "batch")["cost"]
    assert cost["interactive_usd"] == 0 and cost["batch_usd"] == pytest.approx(summary.cost_usd)
    assert not list((tmp_path / "batch" / ".batch").iterdir())  # no JSONL or results left


@pytest.mark.parametrize(
    "cut",
    [{"requests_per_job": 5}, {"max_job_mb": 4000 / 2**20}, {"max_job_tokens": 1000}],
    ids=["requests", "bytes", "tokens"],
)
async def test_a_job_is_cut_by_requests_bytes_or_tokens(tmp_path, cut):
    tiny_images(tmp_path / "images", 12)
    summary = await run(batch_config(tmp_path, batch=cut))
    assert dict(summary.rows) == {"ok": 12}
    jobs = jobs_in(tmp_path / "out")
    assert len(jobs) == summary.batch["jobs_created"] == summary.batch["jobs_collected"] > 1
    assert sum(job.requests for job in jobs) == 12 and all(job.requests for job in jobs)
    if "requests_per_job" in cut:
        assert [job.requests for job in jobs] == [5, 5, 2]
    if "max_job_mb" in cut:  # no job holds more than the limit (or else one request)
        assert len(jobs) >= summary.batch["jsonl_bytes"] / 4000
    if "max_job_tokens" in cut:
        assert all(job.est_tokens <= 1000 or job.requests == 1 for job in jobs)
        assert len(jobs) >= sum(job.est_tokens for job in jobs) / 1000


async def test_the_same_bytes_at_two_paths_are_asked_once(tmp_path):
    tiny_images(tmp_path / "images", 3)
    shutil.copy(tmp_path / "images" / "0000.png", tmp_path / "images" / "twin.png")
    summary = await run(batch_config(tmp_path))
    rows = read_current(tmp_path / "out")
    assert summary.batch["requests_submitted"] == 3 and len(rows) == 4
    assert rows["twin.png"]["objects"] == rows["0000.png"]["objects"]
    billed = [rows[name]["prompt_tokens"] for name in ("0000.png", "twin.png")]
    assert sorted(billed, key=lambda v: v is None)[1] is None  # paid once


async def test_a_request_refused_before_sending_is_the_interactive_runs_row(tmp_path):
    """A request over a limit is refused by the same plan in both modes (run/requests.py), so
    its error row is the interactive run's: the same error, input mode, estimates and attempts
    (Batch Mode's row used to say input_mode "none", without estimates)."""
    names = tiny_images(tmp_path / "images", 3)
    noise = np.random.default_rng(3).integers(0, 256, (160, 160, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "images" / "big.png")  # ~77 kB: over the inline room
    refusing = {"images": {"mode": "inline"}, "api": {"inline_limit_mb": 0.05}}
    await run(make_config(tmp_path, output={"dir": str(tmp_path / "interactive")}, **refusing))
    bought = await run(batch_config(tmp_path, output={"dir": str(tmp_path / "batch")}, **refusing))

    live, batch = read_current(tmp_path / "interactive"), read_current(tmp_path / "batch")
    assert live["big.png"]["status"] == "error" and "inline limit" in live["big.png"]["error"]
    same = ("key", "status", "error", "retryable", "attempts", "input_mode", "prompt_tokens")
    estimated = ("est_image_tokens", "est_prompt_tokens")
    for column in (*same, *estimated):
        assert batch["big.png"][column] == live["big.png"][column], column
    assert batch["big.png"]["input_mode"] == "inline" and batch["big.png"]["est_prompt_tokens"]
    assert bought.batch["requests_submitted"] == 3  # the others went in a job
    assert {batch[name]["status"] for name in names} == {"ok"}


# ------------------------------------------------------------------------- resumable, paid once
async def test_kill_9_while_polling_then_rerun_creates_no_second_job(server, clock, tmp_path):
    tiny_images(tmp_path / "images", 30)
    config = batch_config(tmp_path, base_url=server.base_url)
    path = tmp_path / "batch.toml"
    path.write_text(
        "\n".join(
            [
                "[api]",
                f'base_url = "{server.base_url}"',
                'mode = "batch"',
                "[input]",
                f'paths = ["{tmp_path / "images"}"]',
                "[task]",
                'kind = "segment"',
                "[output]",
                f'dir = "{tmp_path / "out"}"',
                "[batch]",
                "poll_seconds = 0.02",
                "max_poll_seconds = 0.05",
            ]
        )
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline", "run", str(path), "--quiet", env={**os.environ}
    )
    polled = "GET /v1beta/batches/{id}"
    try:  # created, and then polled at least once (still PENDING: the clock has not moved)
        await until(
            lambda: server.stats()["requests"].get(polled),
            exited=lambda: child.returncode,
            interval=0.02,
        )
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    assert child.returncode == -signal.SIGKILL
    assert server.stats()["batches"]["created"] == 1 and not read_rows(tmp_path / "out")

    clock.now += 61  # the job's time is up; the rerun re-attaches to it
    summary = await run(config)
    assert server.stats()["batches"]["created"] == 1  # no second job: nothing paid twice
    assert summary.batch["jobs_created"] == 0 and summary.batch["jobs_collected"] == 1
    assert dict(summary.rows) == {"ok": 30} and len(read_current(tmp_path / "out")) == 30
    assert [job.phase for job in jobs_in(tmp_path / "out")] == ["collected"]


def running(task: asyncio.Task) -> Any:
    return lambda: task.result() if task.done() else None


async def run_through(config, server: LocalServer, clock: Clock, created: int):
    """A run against `server` whose jobs end once `created` jobs exist: the clock moves past
    their time when the run has created them."""
    task = asyncio.create_task(run(config))
    await until(
        lambda: server.stats()["batches"]["created"] >= created, exited=running(task), interval=0.02
    )
    clock.now += 61
    return await task


async def test_submit_only_then_a_later_run_collects_and_submits_what_is_new(
    server, clock, tmp_path
):
    tiny_images(tmp_path / "images", 6)
    config = batch_config(tmp_path, base_url=server.base_url)
    submitted = await run(config, submit_only=True)  # tonight's cron run
    assert submitted.exit_code == exits.OK and not submitted.rows
    assert submitted.batch["jobs_in_flight"] == 1 and "batch wait" in submitted.resume_hint
    again = await run(config, submit_only=True)  # a second cron run before the job is done
    assert again.batch["jobs_created"] == 0 and again.skipped == 6

    tiny_images(tmp_path / "images", 2, start=6)  # new files arrive
    clock.now += 61
    next_night = await run(config, submit_only=True)  # collect the first job, send the new
    assert dict(next_night.rows) == {"ok": 6}
    assert next_night.batch["jobs_collected"] == 1 and next_night.batch["requests_submitted"] == 2
    clock.now += 61
    last = await run(config)  # without --submit-only: waits for the rest
    assert dict(last.rows) == {"ok": 2} and last.batch["jobs_in_flight"] == 0
    assert len(read_current(tmp_path / "out")) == 8 and server.stats()["batches"]["created"] == 2


@pytest.mark.parametrize(
    ("ours", "services", "refusals"),
    [(1, 100, 0), (100, 1, 1)],
    ids=["our-cap-waits", "the-services-429-waits"],
)
async def test_a_new_job_waits_for_room_under_either_cap(
    tmp_path, monkeypatch, ours, services, refusals
):
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    tiny_images(tmp_path / "images", 4)
    options = ServerOptions(batch_seconds=0.2, batch_max_jobs=services)
    async with LocalServer(options) as server:
        config = batch_config(
            tmp_path,
            base_url=server.base_url,
            batch={"requests_per_job": 2, "max_jobs": ours, "poll_seconds": 0.05},
        )
        summary = await run(config)
        refused = server.stats()["refused_by_rule"].get("batch.limit", 0)
    assert dict(summary.rows) == {"ok": 4} and summary.batch["jobs_created"] == 2
    assert (refused >= 1) == bool(refusals)  # the second create waited for the first job


async def test_a_lost_create_answer_is_found_by_its_display_name(server, clock, tmp_path):
    tiny_images(tmp_path / "images", 4)
    config = batch_config(tmp_path, base_url=server.base_url)
    await run(config, submit_only=True)
    state = State(tmp_path / "out")
    (job,) = state.batch_jobs()
    # as if killed after the create call left and before its answer was saved
    state.update_batch_job(job.id, phase="creating", name=None)
    state.close()
    clock.now += 61
    summary = await run(config)
    assert server.stats()["batches"]["created"] == 1  # adopted, not created again
    assert dict(summary.rows) == {"ok": 4}
    assert [j.name for j in jobs_in(tmp_path / "out")] == [job.name]


async def test_a_job_staged_by_a_killed_run_is_dropped_and_its_files_sent(server, clock, tmp_path):
    tiny_images(tmp_path / "images", 3)
    async with GeminiClient(KEY, base_url=server.base_url) as client:
        orphan = await client.upload_file(b"{}\n", "jsonl")
    state = State(tmp_path / "out")
    staged = state.add_batch_job(
        "gvp-killed-0001",
        settings_hash="x",
        task="{}",
        model="m",
        base_url=server.base_url,
        version="v1beta",
    )
    state.add_batch_file(staged, orphan.name)
    state.close()
    summary = await run_through(batch_config(tmp_path, base_url=server.base_url), server, clock, 1)
    assert dict(summary.rows) == {"ok": 3}
    assert "gvp-killed-0001" not in [job.display_name for job in jobs_in(tmp_path / "out")]
    async with GeminiClient(KEY, base_url=server.base_url) as client:
        assert orphan.name not in {f.name for f in await client.list_files()}


async def test_cancel_then_wait_collects_what_it_answered_and_the_next_run_sends_the_rest(
    server, clock, tmp_path
):
    """A job cancelled while PENDING whose lines the double had answered already: the
    cancelled job's output carries them (rule batch.cancel-partial), `batch wait` collects
    them, the next run buys nothing again. (The cancel's warning: tests/test_batch_jobs.py.)"""
    tiny_images(tmp_path / "images", 5)
    config = batch_config(tmp_path, base_url=server.base_url)
    await run(config, submit_only=True)
    cancelled = await batchjobs.cancel(str(tmp_path / "out"), base_url=server.base_url)
    assert [job["state"] for job in cancelled] == ["JOB_STATE_CANCELLED"]
    waited = await batchjobs.wait(str(tmp_path / "out"), base_url=server.base_url, progress=False)
    assert waited.exit_code == exits.OK and dict(waited.rows) == {"ok": 5}
    redone = await run(config)
    assert redone.skipped == 5 and server.stats()["batches"]["created"] == 1


async def test_a_cron_job_on_a_bucket_submits_then_collects(server, clock, tmp_path, bucket):
    """Batch Mode with the inputs and the output in a bucket: the images read through the
    fetcher, the job's record in the bucket's state, the JSONL and results only in a scratch
    folder on this machine; `batch status` and `batch wait` take the bucket's URL; a later run
    finds everything done."""
    names = put_images(f"{bucket}/images", 4)
    out = f"{bucket}/dataset"
    config = batch_config(
        tmp_path,
        base_url=server.base_url,
        input={"paths": [f"{bucket}/images"]},
        output={"dir": out},
    )
    submitted = await run(config, submit_only=True)
    assert (submitted.exit_code, submitted.batch["jobs_created"]) == (exits.OK, 1)
    stored = [entry.name for entry in open_store(out).list()]
    assert ".state.sqlite" in stored and not [n for n in stored if n.startswith(".batch")]
    (job,) = (await batchjobs.status(out, base_url=server.base_url))["jobs"]
    assert (job["phase"], job["live"]["state"]) == ("submitted", "JOB_STATE_PENDING")
    clock.now += 61
    waited = await batchjobs.wait(out, base_url=server.base_url, progress=False)
    assert (waited.exit_code, dict(waited.rows)) == (exits.OK, {"ok": 4})
    rows = current_rows(out, ["image_path", "status"]).to_pylist()
    assert rows == [{"image_path": name, "status": "ok"} for name in names]
    again = await run(config)
    assert (again.skipped, again.api_calls, server.stats()["batches"]["created"]) == (4, 0, 1)


async def test_wait_collects_the_jobs_of_an_output_without_its_config(server, clock, tmp_path):
    tiny_images(tmp_path / "images", 4)
    await run(
        batch_config(tmp_path, base_url=server.base_url, task={"kind": "detect"}), submit_only=True
    )
    report = await batchjobs.status(str(tmp_path / "out"), base_url=server.base_url)
    (job,) = report["jobs"]
    assert (job["phase"], job["live"]["state"], job["live"]["requests"]) == (
        "submitted",
        "JOB_STATE_PENDING",
        4,
    )
    clock.now += 61
    waited = await batchjobs.wait(str(tmp_path / "out"), base_url=server.base_url, progress=False)
    rows = read_current(tmp_path / "out")
    assert waited.exit_code == exits.OK and len(rows) == 4
    assert {row["task"] for row in rows.values()} == {"detect"}  # parsed as the job's task
    assert all(row["objects"] and row["objects"][0]["mask"] is None for row in rows.values())
    assert "collected" in batchjobs.format_status(
        await batchjobs.status(str(tmp_path / "out"), base_url=server.base_url)
    )


# ---------------------------------------------------- a paid answer is collected once, never lost
POLL = "GET /v1beta/batches/{id}"
DOWNLOAD = "GET /download/v1beta/files/{name}:download"


def calls(server: LocalServer, route: str) -> int:
    return sum(server.stats()["requests"].get(route, {}).values())


def files_of(output: Path, job: int) -> list[str]:
    state = State(output)
    try:
        return state.batch_files(job)
    finally:
        state.close()


async def test_a_job_that_succeeds_before_its_output_is_attached_is_collected_once_it_is(
    tmp_path, clock, key_in_env
):
    """Seen live (tidyverse/ellmer#926): SUCCEEDED and done, no responsesFile yet. The job is
    still finishing: polled on, its files kept, its requests never counted unanswered; collected
    when the output comes. One job, every row, nothing bought twice."""
    tiny_images(tmp_path / "images", 30)
    out = tmp_path / "out"
    async with stand_in(clock, batch_output_delay_seconds=600) as server:
        task = asyncio.create_task(run(batch_config(tmp_path, base_url=server.base_url)))
        await until(
            lambda: server.stats()["batches"]["created"] == 1, exited=running(task), interval=0.02
        )
        clock.now += 61  # SUCCEEDED and done; the output comes 600 s later
        polled = calls(server, POLL)
        await until(lambda: calls(server, POLL) >= polled + 3, exited=running(task), interval=0.02)
        (job,) = jobs_in(out)
        assert (job.phase, job.service_state) == ("submitted", "JOB_STATE_SUCCEEDED")
        assert files_of(out, job.id) and server.stats()["files"]["deleted"] == 0
        assert not read_rows(out) and calls(server, DOWNLOAD) == 0
        clock.now += 600  # the output is attached
        summary = await task
        stats = server.stats()
    assert (summary.exit_code, dict(summary.rows)) == (exits.OK, {"ok": 30})
    assert stats["batches"]["created"] == 1 and stats["answers_by_task"] == {"segment": 30}
    assert summary.batch["requests_without_result"] == 0 and calls(server, DOWNLOAD) == 1
    assert len(read_rows(out)) == 30 and [j.phase for j in jobs_in(out)] == ["collected"]


async def test_a_job_whose_output_does_not_come_in_time_is_left_in_flight_not_bought_again(
    tmp_path, clock, key_in_env
):
    """Past `[batch] output_wait_seconds` the run gives the job up for now: exit 3 saying its
    answers are owed, nothing deleted, nothing marked unanswered; a rerun creates no job for its
    files, and `pipeline batch wait` collects it once its output is attached."""
    tiny_images(tmp_path / "images", 30)
    out = tmp_path / "out"
    async with stand_in(clock, batch_output_delay_seconds=3600) as server:
        config = batch_config(
            tmp_path, base_url=server.base_url, batch={"output_wait_seconds": 0.3}
        )
        first = await run_through(config, server, clock, 1)
        assert (first.exit_code, first.rows) == (exits.STOPPED, {})
        assert "output" in first.stop_reason and "30 answers" in first.stop_reason
        assert "batch wait" in first.resume_hint
        assert first.batch["requests_without_result"] == 0
        assert len(first.batch["jobs_awaiting_output"]) == 1
        (job,) = jobs_in(out)
        assert job.phase == "submitted" and files_of(out, job.id)
        assert server.stats()["files"]["deleted"] == 0
        report = batchjobs.format_status(await batchjobs.status(str(out), base_url=server.base_url))
        assert "JOB_STATE_SUCCEEDED, 30/30 done, output not attached yet" in report

        again = await run(config)  # the next cron run: its files are the job's, still owed
        assert (again.exit_code, again.skipped, again.batch["jobs_created"]) == (3, 30, 0)

        clock.now += 3600  # the output is attached
        waited = await batchjobs.wait(str(out), base_url=server.base_url, progress=False)
        stats = server.stats()
    assert (waited.exit_code, dict(waited.rows)) == (exits.OK, {"ok": 30})
    assert stats["batches"]["created"] == 1 and stats["answers_by_task"] == {"segment": 30}
    assert len(read_rows(out)) == 30 and calls(server, DOWNLOAD) == 1
    assert [j.phase for j in jobs_in(out)] == ["collected"] and not files_of(out, job.id)


async def test_a_collection_cut_short_is_finished_without_a_second_download_or_row(
    server, clock, tmp_path
):
    """As a run killed while collecting leaves it: the results file downloaded (kept in the
    scratch folder) and two keys' rows durable (recorded in state). The next collection reads
    the kept file, without downloading it again, and writes the other keys' rows only."""
    tiny_images(tmp_path / "images", 6)
    out = tmp_path / "out"
    await run(batch_config(tmp_path, base_url=server.base_url), submit_only=True)
    clock.now += 61
    (job,) = jobs_in(out)
    async with GeminiClient(KEY, base_url=server.base_url) as client:
        remote = await client.batches.get(job.name or "")
        kept = out / ".batch" / f"{job.display_name}.results.jsonl"
        await client.batches.download(remote.responses_file or "", kept)
    state = State(out)
    durable = sorted(state.batch_request_keys(job.id))[:2]
    state.add_batch_collected(job.id, durable)
    state.close()

    waited = await batchjobs.wait(str(out), base_url=server.base_url, progress=False)
    rows = read_rows(out)
    assert calls(server, DOWNLOAD) == 1  # the test's own
    assert (waited.exit_code, dict(waited.rows)) == (exits.OK, {"ok": 4})
    assert len(rows) == 4 and not {row["key"] for row in rows} & set(durable)
    assert waited.batch["requests_without_result"] == 0 and not kept.exists()


@pytest.mark.parametrize(("how", "said"), UNWRITABLE)
async def test_a_results_file_that_cannot_be_written_here_stops_naming_the_local_file(
    request, server, clock, tmp_path, how, said
):
    """Writing a job's downloaded results file on this machine fails (a full disk, a read-only
    folder): the machine's failure, not the service's — it was read as a dropped connection
    (retryable) and the job polled and downloaded again for as long as the disk stayed full.
    The run stops (exit 3) naming the local file and the OS error, the job kept in flight with
    its results: once the disk is mended, `batch wait` collects it, none bought again. (40
    images: a results file larger than a write buffer, so the disk fails inside the download.)"""
    tiny_images(tmp_path / "images", 40)
    out = tmp_path / "out"
    await run(batch_config(tmp_path, base_url=server.base_url), submit_only=True)
    mend = unwritable(out / ".batch", how, request)
    clock.now += 61
    wait = batchjobs.wait(str(out), base_url=server.base_url, progress=False)
    stopped = await bounded(wait, "wait", seconds=60)
    assert stopped.exit_code == exits.STOPPED and said in stopped.stop_reason
    assert f"{out / '.batch'}/" in stopped.stop_reason and ".part" in stopped.stop_reason
    assert "cannot be written on this machine" in stopped.stop_reason
    downloads = calls(server, DOWNLOAD)  # (none when the file could not even be made)
    assert downloads <= 1 and [job.phase for job in jobs_in(out)] == ["submitted"]
    mend()
    wait = batchjobs.wait(str(out), base_url=server.base_url, progress=False)
    again = await bounded(wait, "wait", seconds=60)
    assert (again.exit_code, dict(again.rows)) == (exits.OK, {"ok": 40})
    assert server.stats()["batches"]["created"] == 1 and calls(server, DOWNLOAD) == downloads + 1


def test_a_run_says_a_job_is_waiting_for_its_output(tmp_path, capsys):
    tiny_images(tmp_path / "images", 2)
    config = tmp_path / "c.toml"
    config.write_text(
        '[api]\nbase_url = "local"\n[input]\npaths = ["images"]\n[output]\ndir = "out"\n'
        "[local]\nbatch_seconds = 0.05\nbatch_output_delay_seconds = 0.3\n"
        "[batch]\npoll_seconds = 0.02\n"
    )
    assert main(["run", str(config), "--batch"]) == exits.OK
    said = capsys.readouterr().err
    assert "JOB_STATE_SUCCEEDED: 2/2 requests answered, output not attached yet (0 min)" in said


async def test_an_unreadable_results_line_is_its_keys_retryable_error_row_once(
    tmp_path, clock, key_in_env
):
    """A results line cut short: that key's retryable error row, the other 29 rows ok, the file
    downloaded once and no row written twice; the next run buys that one key again."""
    tiny_images(tmp_path / "images", 30)
    out = tmp_path / "out"
    async with stand_in(clock, batch_corrupt_line=3) as server:
        config = batch_config(tmp_path, base_url=server.base_url)
        first = await asyncio.wait_for(run_through(config, server, clock, 1), 30)
        assert calls(server, DOWNLOAD) == 1
        rows = read_rows(out)
        second = await run_through(config, server, clock, 2)
        stats = server.stats()
    assert (first.exit_code, dict(first.rows)) == (exits.ROWS_NOT_OK, {"ok": 29, "error": 1})
    assert len(rows) == 30 and len({row["image_path"] for row in rows}) == 30
    (bad,) = [row for row in rows if row["status"] != "ok"]
    assert bad["retryable"] and bad["error"].startswith("batch result line unreadable: ")
    assert first.batch["result_lines_unreadable"] == 1
    assert first.batch["requests_without_result"] == 0

    assert second.batch["requests_submitted"] == 1 and dict(second.rows) == {"ok": 1}
    assert stats["batches"]["created"] == 2 and stats["answers_by_task"] == {"segment": 31}
    assert {row["status"] for row in read_current(out).values()} == {"ok"}


async def test_a_results_line_without_its_key_is_counted_and_its_request_sent_again_once(
    tmp_path, clock, key_in_env
):
    """Every line a 503 (short lines: the cut falls inside the key): the line's key is lost. It
    is counted and reported, its request ends without a result once (the next run sends it
    again), and the job is downloaded once."""
    tiny_images(tmp_path / "images", 10)
    out = tmp_path / "out"
    faults = {"fault_rate": 1.0, "fault_kinds": ("http_503",), "batch_corrupt_line": 2}
    async with stand_in(clock, **faults) as server:
        config = batch_config(tmp_path, base_url=server.base_url)
        first = await asyncio.wait_for(run_through(config, server, clock, 1), 30)
        assert calls(server, DOWNLOAD) == 1
        rows = read_rows(out)
        second = await run_through(config, server, clock, 2)
    assert first.batch["result_lines_unreadable"] == 1
    assert first.batch["requests_without_result"] == 1 and dict(first.rows) == {"error": 9}
    assert len(rows) == 9 and all(row["retryable"] for row in rows)
    assert jobs_in(out)[0].phase == "collected"
    assert second.batch["requests_submitted"] == 10  # 9 retryable errors and the one left


# ------------------------------------------------------------------------------- what went wrong
async def test_per_request_errors_become_rows_and_the_next_run_retries_them_in_a_batch(tmp_path):
    tiny_images(tmp_path / "images", 40)
    faulty = batch_config(tmp_path, local={"fault_rate": 0.3, "seed": 11})
    first = await run(faulty)
    rows = read_current(tmp_path / "out")
    failed = {name for name, row in rows.items() if row["retryable"]}  # 500, 503, deadline
    assert first.exit_code == exits.ROWS_NOT_OK and failed and len(rows) == 40
    assert {rows[name]["status"] for name in failed} == {"error"}
    assert all(rows[name]["input_mode"] == "batch" for name in failed)
    assert all(rows[name]["prompt_tokens"] is None for name in failed)  # errors are not billed

    second = await run(batch_config(tmp_path))  # the fault is gone
    assert second.batch["requests_submitted"] == len(failed) and second.api_calls == 0
    after = read_current(tmp_path / "out")
    assert all(after[name]["status"] == "ok" for name in failed)


async def test_retryable_errors_retried_interactively_when_so_configured(tmp_path):
    tiny_images(tmp_path / "images", 40)
    interactive_retry = {"retry": "interactive"}
    await run(
        batch_config(tmp_path, batch=interactive_retry, local={"fault_rate": 0.3, "seed": 11})
    )
    failed = {name for name, row in read_current(tmp_path / "out").items() if row["retryable"]}
    assert failed

    second = await run(batch_config(tmp_path, batch=interactive_retry))
    assert second.batch["requests_submitted"] == 0 and second.api_calls == len(failed)
    after = read_current(tmp_path / "out")
    assert {after[name]["input_mode"] for name in failed} == {"inline"}
    assert all(after[name]["status"] == "ok" for name in failed)


async def test_an_expired_job_is_reported_and_its_images_left_for_the_next_run(tmp_path):
    tiny_images(tmp_path / "images", 5)
    expiring = batch_config(tmp_path, local={"batch_seconds": 30, "batch_expiry_seconds": 0.1})
    summary = await run(expiring)
    assert summary.exit_code == exits.STOPPED and "EXPIRED" in summary.stop_reason
    assert summary.batch["jobs_ended"][0]["state"] == "EXPIRED" and not summary.rows
    assert not read_rows(tmp_path / "out")
    assert [job.phase for job in jobs_in(tmp_path / "out")] == ["ended"]

    again = await run(batch_config(tmp_path))
    assert dict(again.rows) == {"ok": 5}


async def test_a_job_whose_every_line_is_refused_alike_is_the_runs_failure(
    tmp_path, clock, key_in_env
):
    tiny_images(tmp_path / "images", 10)
    # A config's model entry claiming a thinking level the model does not take, sent to a
    # service whose own table says otherwise (a server of its own: the bundled one would read
    # the config's table): every line is refused the same way. The run's fault, not the
    # images': no rows.
    minimal = {"thinking": {"control": "level", "levels": ["minimal", "low"]}}
    async with stand_in(clock) as server:
        refused = batch_config(
            tmp_path,
            base_url=server.base_url,
            api={"model": "gemini-3.8-flash"},
            task={"kind": "detect"},
            models={"gemini-3.8-flash": minimal},
        )
        task = asyncio.create_task(run(refused))
        await until(
            lambda: server.stats()["batches"]["created"] == 1, exited=running(task), interval=0.02
        )
        clock.now += 61  # the job ends, every line refused
        summary = await task
    assert summary.exit_code == exits.USAGE and not summary.rows
    assert "failed the same way" in summary.stop_reason
    assert "not a supported thinking level" in summary.stop_reason
    assert not read_rows(tmp_path / "out")  # the files are sent again once the config is fixed


async def test_a_job_the_service_no_longer_knows_is_reported_and_sent_again(tmp_path):
    tiny_images(tmp_path / "images", 3)
    slow = batch_config(tmp_path, local={"batch_seconds": 60})
    await run(slow, submit_only=True)  # its in-process server, and the job, end with the run
    lost = await run(batch_config(tmp_path))  # a new server: it never heard of the job
    assert lost.exit_code == exits.STOPPED and lost.batch["jobs_ended"][0]["state"] == "LOST"
    assert not lost.rows  # its files were in flight when this run walked: the next run sends
    again = await run(batch_config(tmp_path))
    assert dict(again.rows) == {"ok": 3}


async def test_wait_reports_the_jobs_of_a_gone_in_process_server(tmp_path):
    tiny_images(tmp_path / "images", 2)
    await run(batch_config(tmp_path, local={"batch_seconds": 60}), submit_only=True)
    waited = await batchjobs.wait(str(tmp_path / "out"), progress=False)
    assert waited.exit_code == exits.STOPPED
    assert waited.batch["jobs_ended"][0]["why"] == batchjobs.LOCAL_GONE
    assert dict((await run(batch_config(tmp_path))).rows) == {"ok": 2}


async def test_big_images_are_uploaded_before_the_job_and_deleted_with_its_jsonl(
    server, clock, tmp_path
):
    tiny_images(tmp_path / "images", 3)
    config = batch_config(tmp_path, base_url=server.base_url, images={"mode": "upload"})
    task = asyncio.create_task(run(config))
    await until(
        lambda: server.stats()["batches"]["created"] == 1, exited=running(task), interval=0.02
    )
    assert server.stats()["uploads"]["completed"] == 4  # three images, then the JSONL
    clock.now += 61
    summary = await task
    assert dict(summary.rows) == {"ok": 3}
    files = server.stats()["files"]
    assert files["deleted"] == 4 and files["stored"] == 1  # only the results file is left


def test_batch_mode_needs_generate_content(tmp_path):
    with pytest.raises(ConfigError, match=r"\[api\] mode"):
        make_config(
            tmp_path,
            api={"mode": "batch", "flavor": "interactions", "model": "gemini-3-flash-preview"},
        )


def test_the_commands(tmp_path, capsys, monkeypatch):
    tiny_images(tmp_path / "images", 3)
    config = tmp_path / "c.toml"
    config.write_text(
        '[api]\nbase_url = "local"\n[input]\npaths = ["images"]\n[output]\ndir = "out"\n'
        "[local]\nbatch_seconds = 0.05\n[batch]\npoll_seconds = 0.02\n"
    )
    assert main(["run", str(config), "--batch", "--quiet"]) == exits.OK
    assert "batch: 1 jobs created" in capsys.readouterr().err
    assert main(["batch", "status", str(tmp_path / "out"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [job["phase"] for job in report["jobs"]] == ["collected"]
    assert main(["run", str(config), "--submit-only"]) == exits.USAGE  # needs --batch
    # the in-process server's jobs end with the run: nothing could collect them later
    assert main(["run", str(config), "--batch", "--submit-only"]) == exits.USAGE
    assert "serve-local" in capsys.readouterr().err
    assert main(["batch", "status", str(tmp_path / "nowhere")]) == exits.USAGE


def test_a_run_says_how_its_jobs_progress(tmp_path, capsys):
    """A run that waits for its jobs says each state change and each new count of answered
    requests (one line a poll at most): a Batch Mode run may wait for hours."""
    tiny_images(tmp_path / "images", 3)
    config = tmp_path / "c.toml"
    config.write_text(
        '[api]\nbase_url = "local"\n[input]\npaths = ["images"]\n[output]\ndir = "out"\n'
        "[local]\nbatch_seconds = 0.3\n[batch]\npoll_seconds = 0.02\n"
    )
    assert main(["run", str(config), "--batch"]) == exits.OK
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("batch job")]
    progress = [line.split(" ", 3)[3] for line in said if line.endswith("requests answered")]
    assert progress[0].startswith(("JOB_STATE_PENDING: ", "JOB_STATE_RUNNING: "))
    assert progress[-1] == "JOB_STATE_SUCCEEDED: 3/3 requests answered"
    assert len(progress) == len(set(progress))  # a line only when something changed


async def test_reference_images_go_with_every_request_of_a_job(tmp_path):
    """The same requests as the interactive run: the small reference inline in each line, the
    big one uploaded for the job (and deleted with it); same keys, same answers, and the same
    billed input tokens, which count the references."""
    tiny_images(tmp_path / "images", 4)
    small, big = tmp_path / "small.png", tmp_path / "big.png"
    draw_shapes(32, 32, seed=90, count=1)[0].save(small)
    noise = np.random.default_rng(7).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    Image.fromarray(noise).save(big)  # ~480 kB: over the inline size of a reference
    references = [
        {"image": str(small), "caption": "a small example"},
        {"image": str(big), "caption": "a big example"},
    ]
    task = {"kind": "detect", "reference_images": references}
    one = await run(make_config(tmp_path, task=task, output={"dir": str(tmp_path / "one")}))
    many = await run(batch_config(tmp_path, task=task, output={"dir": str(tmp_path / "many")}))
    assert (many.exit_code, many.rows, many.batch["jobs_collected"]) == (exits.OK, {"ok": 4}, 1)
    assert many.tokens["prompt_tokens"] == one.tokens["prompt_tokens"]
    interactive, batch = read_current(tmp_path / "one"), read_current(tmp_path / "many")
    for path, row in interactive.items():
        assert (batch[path]["key"], batch[path]["objects"]) == (row["key"], row["objects"])
        estimated = ("est_image_tokens", "est_prompt_tokens")  # one estimate for both paths
        assert [batch[path][k] for k in estimated] == [row[k] for k in estimated]
    assert {row["input_mode"] for row in batch.values()} == {"batch"}
    (job,) = jobs_in(tmp_path / "many")
    state = State(tmp_path / "many")
    try:
        assert state.batch_files(job.id) == []  # the JSONL and the big reference: deleted
    finally:
        state.close()


async def test_a_model_added_in_the_config_is_served_in_batch_mode_too(tmp_path):
    """The bundled server reads the run's table ([models] entries too) on every surface: Batch
    Mode's create once looked models up in the bundled table only and answered 404."""
    tiny_images(tmp_path / "images", 2)
    added = batch_config(
        tmp_path,
        api={"model": "gemini-9-flash"},
        task={"kind": "detect"},
        models={"gemini-9-flash": {"like": "gemini-2.5-flash"}},
    )
    summary = await run(added)
    assert summary.exit_code == exits.OK and dict(summary.rows) == {"ok": 2}
