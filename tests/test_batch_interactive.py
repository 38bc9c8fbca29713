"""An interactive run over an output with Batch Mode jobs in flight never buys their files again
(issue 24's leftovers): it collects the jobs that have ended, skips the files of those still
running and says how many, and a later run collects them without a call.

The local server over loopback holds its jobs RUNNING on a hand clock; real files, real Parquet,
a real state.sqlite; what was paid for is the server's own count of answers billed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from pipeline import exits
from pipeline.cli import main
from pipeline.output.state import State
from pipeline.run.plan import IN_FLIGHT, plan
from tests.conftest import make_config, read_current, run
from tests.test_batch_jobs import answers, until_answered
from tests.test_batch_run import (  # the last three: fixtures of that module, used here
    KEY,
    batch_config,
    key_in_env,
    server_clock,
    server_options,
    stand_in,
    tiny_images,
)

__all__ = ["key_in_env", "server_clock", "server_options"]  # pytest finds fixtures by name


def interactive(tmp_path: Path, server: Any):
    """The same output, inputs and settings as `batch_config`'s, bought interactively."""
    return make_config(tmp_path, api={"base_url": server.base_url})


async def test_an_interactive_run_skips_the_files_of_a_job_in_flight_then_collects_it(
    server, clock, tmp_path, capsys
):
    """Before the fix the interactive run bought the 5 files of the RUNNING job again: 7 calls,
    and 12 answers billed for 7 files once the job ended."""
    tiny_images(tmp_path / "images", 5)
    await run(batch_config(tmp_path, base_url=server.base_url), submit_only=True)
    await until_answered(server, 5)  # the job has answered (billed), still RUNNING
    tiny_images(tmp_path / "images", 2, start=5)  # new files arrive
    config = interactive(tmp_path, server)
    assert plan(config).count(IN_FLIGHT) == 5  # what the run will do, the plan says first
    summary = await run(config)
    assert (summary.exit_code, dict(summary.rows), summary.api_calls) == (exits.OK, {"ok": 2}, 2)
    assert (summary.in_batch_jobs, summary.skipped) == (5, 5)
    assert "pipeline batch cancel" in (summary.resume_hint or "")
    clock.now += 61  # the job ends
    later = await run(config)  # collects it: rows without a call
    assert (dict(later.rows), later.api_calls, later.in_batch_jobs) == ({"ok": 5}, 0, 0)
    assert len(read_current(tmp_path / "out")) == 7
    assert answers(server) == 7  # each file paid for once


async def test_a_job_ended_before_the_run_is_collected_first(server, clock, tmp_path):
    tiny_images(tmp_path / "images", 4)
    await run(batch_config(tmp_path, base_url=server.base_url), submit_only=True)
    clock.now += 61
    summary = await run(interactive(tmp_path, server))
    assert (dict(summary.rows), summary.api_calls, summary.in_batch_jobs) == ({"ok": 4}, 0, 0)
    assert (summary.batch["jobs_collected"], summary.batch["jobs_in_flight"]) == (1, 0)
    again = await run(interactive(tmp_path, server))
    assert (again.skipped, again.api_calls, dict(again.rows)) == (4, 0, {})
    assert answers(server) == 4


async def test_the_cli_says_how_many_files_a_job_in_flight_holds(server, clock, tmp_path, capsys):
    tiny_images(tmp_path / "images", 3)
    await run(batch_config(tmp_path, base_url=server.base_url), submit_only=True)
    path = tmp_path / "interactive.toml"
    path.write_text(
        f'[api]\nbase_url = "{server.base_url}"\nmodel = "gemini-2.5-flash"\n'
        f'[input]\npaths = ["{tmp_path / "images"}"]\n[task]\nkind = "segment"\n'
        f'[output]\ndir = "{tmp_path / "out"}"\n'
    )
    assert await asyncio.to_thread(main, ["run", str(path), "--quiet"]) == exits.OK
    err = capsys.readouterr().err
    assert "3 skipped (0 already done, 3 in a Batch Mode job in flight)" in err
    assert "pipeline batch cancel" in err
    assert (
        "batch: 0 jobs created (0 requests), 0 collected, 0 ended without results, 1 in flight"
        in err
    )


async def test_a_batch_mode_rerun_counts_the_files_in_flight_apart(server, clock, tmp_path):
    """Batch Mode's walk is the same: the files of a job still running are in flight, those of
    a job its first pass collected are done (their rows came after the index was read)."""
    tiny_images(tmp_path / "images", 3)
    config = batch_config(tmp_path, base_url=server.base_url)
    await run(config, submit_only=True)
    again = await run(config, submit_only=True)
    assert (again.skipped, again.in_batch_jobs, again.batch["jobs_created"]) == (3, 3, 0)
    clock.now += 61
    collected = await run(config, submit_only=True)
    assert dict(collected.rows) == {"ok": 3}
    assert (collected.skipped, collected.in_batch_jobs, collected.batch["jobs_created"]) == (
        3,
        0,
        0,
    )
    assert answers(server) == 3


async def test_a_job_that_expired_leaves_its_files_to_the_next_run_which_buys_them(
    clock, tmp_path, key_in_env
):
    """A job that ends without results during the first pass: its files were in flight when
    the run read its index, so this run leaves them and says so (exit 3); the next buys them."""
    tiny_images(tmp_path / "images", 3)
    async with stand_in(clock, batch_expiry_seconds=5) as server:
        await run(batch_config(tmp_path, base_url=server.base_url), submit_only=True)
        clock.now += 6  # EXPIRED (not done in 60 s), no results
        summary = await run(interactive(tmp_path, server))
        assert (summary.exit_code, summary.api_calls, summary.in_batch_jobs) == (
            exits.STOPPED,
            0,
            0,
        )
        assert "left for the next run" in (summary.stop_reason or "")
        assert summary.batch["jobs_ended"][0]["state"] == "EXPIRED"
        after = await run(interactive(tmp_path, server))
        assert (after.exit_code, dict(after.rows), after.api_calls) == (exits.OK, {"ok": 3}, 3)


async def test_a_vertex_run_over_a_job_of_another_endpoint_skips_its_files(
    server, clock, tmp_path, monkeypatch
):
    """A Developer API job in flight, then an interactive run on Vertex AI (express mode: no
    project, no [api] batch_staging) over the same output: that job is not this endpoint's to
    collect, so the run needs no batch prediction settings; it skips the job's files and buys
    the new ones."""
    tiny_images(tmp_path / "images", 3)
    await run(batch_config(tmp_path, base_url=server.base_url), submit_only=True)
    state = State(tmp_path / "out")
    try:
        for job in state.batch_jobs():
            state.update_batch_job(job.id, base_url="https://generativelanguage.example")
        state.save()
    finally:
        state.close()
    tiny_images(tmp_path / "images", 2, start=3)
    monkeypatch.setenv("GOOGLE_API_KEY", KEY)
    for name in ("GOOGLE_CLOUD_PROJECT", "GOOGLE_CLOUD_LOCATION"):
        monkeypatch.delenv(name, raising=False)
    config = make_config(tmp_path, api={"base_url": server.base_url, "backend": "vertex"})
    summary = await run(config)
    assert (summary.exit_code, dict(summary.rows), summary.api_calls) == (exits.OK, {"ok": 2}, 2)
    assert (summary.in_batch_jobs, summary.skipped) == (3, 3)
