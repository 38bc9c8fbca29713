"""The plan of a run (`pipeline estimate`, `run --plan`) and the settings-change guard, end to
end: real runs against the local server, real files, real Parquet."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import pipeline
from pipeline import exits
from pipeline.cli import main
from pipeline.commands.estimate import estimate, format_estimate
from pipeline.commands.status import format_status, pending, status
from pipeline.config import Config
from pipeline.engines import RedoRefused
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer
from pipeline.output.index import RetryRows
from pipeline.output.parts import current_rows
from pipeline.output.sink import ParquetSink
from pipeline.records import make_key
from pipeline.run import plan as plans
from pipeline.run.identity import suffixes_of
from pipeline.run.plan import Hashes
from tests.conftest import REPO, make_config, run, save_scenes, write_rows

KEY = "test-key"
DETECT_PROMPT = "Find every shape. Answer with box_2d and label."
# The priors (pipeline/cost.py) were measured on these samples: the estimate's output tokens
# are within this factor of what the local server bills for them, task by task.
PRIOR_FACTOR = 1.25
TASKS: dict[str, dict[str, Any]] = {
    "detect": {},
    "segment": {},
    "point": {},
    "caption": {},
    "classify": {"labels": ["circle", "rectangle", "triangle"]},
    "custom": {
        "prompt": "Count the shapes in the image and name their colours. Answer as JSON.",
        "response_schema": '{"type": "object", "properties": {"count": {"type": "integer"}, '
        '"colours": {"type": "array", "items": {"type": "string"}}}, '
        '"required": ["count", "colours"]}',
    },
}


@pytest.fixture
def server_options(monkeypatch: pytest.MonkeyPatch) -> ServerOptions:
    """The `server` of this module: it takes KEY (found in the environment, as a user's key
    is), and its Batch Mode jobs stay in flight for a minute."""
    monkeypatch.setenv("GOOGLE_API_KEY", KEY)
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    return ServerOptions(api_key=KEY, batch_seconds=60)


def counts(report: dict[str, Any]) -> dict[str, int]:
    """Requests of each category of the plan that has any."""
    categories = report["plan"]["categories"]
    return {name: entry["requests"] for name, entry in categories.items() if entry["requests"]}


def detect(tmp_path: Path, **task: Any) -> Config:
    return make_config(tmp_path, task={"kind": "detect", **task})


async def test_a_finished_output_has_nothing_to_do(tmp_path: Path, images_dir: Path) -> None:
    save_scenes(images_dir, 4, prefix="a", seed=1)
    config = detect(tmp_path)
    first = estimate(config)
    assert counts(first) == {"new": 4}
    assert first["plan"]["categories"]["new"]["cost_usd"] == first["cost_usd"] > 0
    await run(config)
    report = estimate(config)
    assert report["plan"]["nothing_to_do"]
    assert report["plan"]["done"] == 4
    assert counts(report) == {}
    assert (report["cost_usd"], report["batch_cost_usd"]) == (0, 0)
    assert "plan: nothing to do (4 done), $0" in format_estimate(report)


async def test_past_the_budget_of_whole_reads_new_files_are_an_upper_bound(
    tmp_path: Path, images_dir: Path
) -> None:
    """A large new input is priced from its headers past the budget: its copies are not told
    (counted as bought), and the report says the cost is an upper bound; --exact reads all."""
    save_scenes(images_dir, 2, prefix="a", seed=1)
    config = detect(tmp_path)
    await run(config)
    save_scenes(images_dir, 2, prefix="b", seed=20)
    for name in ("a000.png", "a001.png"):  # copies: free for a run
        shutil.copy(images_dir / name, images_dir / f"twin-{name}")
    exact = estimate(config, exact=True)
    assert counts(exact) == {"new": 2, "copy": 2} and exact["plan"]["not_read_whole"] == 0
    assert counts(estimate(config)) == counts(exact)  # under the default budget: exact
    bounded = estimate(config, hashes=Hashes(0))  # a budget that reads nothing whole
    assert counts(bounded) == {"new": 4} and bounded["plan"]["not_read_whole"] == 4
    assert bounded["cost_usd"] > exact["cost_usd"]  # the safe side of a price
    assert "an upper bound: 4 requests past the first" in format_estimate(bounded)
    summary = await run(config)
    assert (summary.api_calls, summary.copied) == (2, 2)  # what the exact plan said


def test_plans_sharing_their_hashes_read_each_file_whole_once(
    tmp_path: Path, images_dir: Path
) -> None:
    """`pipeline tune` plans each setting over the same inputs: a file is read whole once."""
    save_scenes(images_dir, 3, prefix="a", seed=1)
    shared = Hashes(remember=True)
    first = estimate(detect(tmp_path), hashes=shared)
    read = shared.read
    assert read == sum(path.stat().st_size for path in images_dir.iterdir())
    other = make_config(tmp_path, task={"kind": "detect"}, images={"max_side": 16})
    again = estimate(other, hashes=shared)
    assert shared.read == read  # nothing read whole again
    assert counts(again) == counts(first) == {"new": 3}
    assert counts(again) == counts(estimate(other, exact=True))


def test_a_file_gone_before_it_is_read_whole_does_not_crash_the_plan(
    tmp_path: Path, images_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file measured, then deleted (or made unreadable) before the plan reads it whole, is
    priced as bought (the safe side), not a traceback out of `estimate` / `run --plan`."""
    save_scenes(images_dir, 2, prefix="a", seed=1)
    measure = plans.images.measure

    def measured_then_deleted(source: Any, **options: Any) -> Any:
        item = measure(source, **options)
        Path(source.path).unlink()  # gone between the header and the whole read
        return item

    monkeypatch.setattr(plans.images, "measure", measured_then_deleted)
    report = estimate(detect(tmp_path))
    assert counts(report) == {"new": 2} and report["plan"]["not_read_whole"] == 2


def test_estimate_and_run_plan_take_exact(tmp_path: Path, images_dir: Path) -> None:
    save_scenes(images_dir, 2, prefix="a", seed=1)
    toml = write_toml(tmp_path, None, base_url="local")
    assert main(["estimate", "--exact", "--json", str(toml)]) == exits.OK
    assert main(["run", "--plan", "--exact", str(toml)]) == exits.OK
    assert pipeline.estimate(toml, exact=True)["plan"]["not_read_whole"] == 0


async def test_after_adding_files_only_the_new_ones(tmp_path: Path, images_dir: Path) -> None:
    save_scenes(images_dir, 3, prefix="a", seed=1)
    config = detect(tmp_path)
    await run(config)
    save_scenes(images_dir, 2, prefix="b", seed=20)
    shutil.copy(images_dir / "a000.png", images_dir / "twin.png")  # the same bytes: a copy
    report = estimate(config)
    assert counts(report) == {"new": 2, "copy": 1}
    assert report["plan"]["samples"]["new"] == ["b000.png", "b001.png"]
    assert report["plan"]["categories"]["copy"]["cost_usd"] == 0
    assert report["cost_usd"] == report["plan"]["categories"]["new"]["cost_usd"]
    summary = await run(config)
    assert (summary.api_calls, summary.copied) == (2, 1)


async def test_a_changed_file_and_a_prompt_change(tmp_path: Path, images_dir: Path) -> None:
    save_scenes(images_dir, 4, prefix="a", seed=1)
    config = detect(tmp_path)
    await run(config)
    save_scenes(images_dir, 1, prefix="a", seed=90)  # a000.png: other bytes
    assert counts(estimate(config)) == {"changed": 1}
    changed = detect(tmp_path, prompt=DETECT_PROMPT)
    report = estimate(changed)
    assert counts(report) == {"changed": 1, "settings": 3}
    assert report["plan"]["committed_rows"] == 4
    (source,) = report["plan"]["settings_sources"]
    assert source["rows"] == 3
    assert "the request differs" in source["why"]
    text = format_estimate(report)
    assert "settings changed (rows redone): 3 requests" in text
    other = make_config(tmp_path, api={"model": "gemini-2.5-flash-lite"}, task={"kind": "detect"})
    report = estimate(other)
    assert counts(report) == {"changed": 1, "settings": 3}
    (source,) = report["plan"]["settings_sources"]
    assert source["why"] == "model gemini-2.5-flash -> gemini-2.5-flash-lite"
    assert report["output_tokens_from"] == "per-task prior"  # no rows of that model yet


async def test_the_guard_refuses_a_mass_redo_without_yes(tmp_path: Path, images_dir: Path) -> None:
    save_scenes(images_dir, 5, prefix="a", seed=1)
    await run(detect(tmp_path))
    changed = detect(tmp_path, prompt=DETECT_PROMPT)
    with pytest.raises(RedoRefused) as refused:
        await run(changed, ask_before_redo=True)
    message = str(refused.value)
    assert "would redo 5 of the 5 committed detect rows" in message
    assert "--yes" in message
    assert refused.value.exit_code == exits.CONFIRM == 4
    toml = write_toml(tmp_path, DETECT_PROMPT)
    assert await asyncio.to_thread(main, ["run", "--quiet", str(toml)]) == exits.CONFIRM
    rows = current_rows(str(tmp_path / "out"), ["key"]).num_rows
    assert rows == 5  # nothing was redone
    assert await asyncio.to_thread(main, ["run", "--quiet", "--yes", str(toml)]) == exits.OK
    assert counts(estimate(changed)) == {}


async def test_the_python_api_takes_yes(tmp_path: Path, images_dir: Path) -> None:
    save_scenes(images_dir, 3, prefix="a", seed=1)
    toml = write_toml(tmp_path, None)
    await asyncio.to_thread(pipeline.run, str(toml), seed=0)
    changed = write_toml(tmp_path, DETECT_PROMPT)
    with pytest.raises(pipeline.RedoRefused):
        await asyncio.to_thread(pipeline.run, str(changed), seed=0)
    summary = await asyncio.to_thread(pipeline.run, str(changed), seed=0, yes=True)
    assert summary.api_calls == 3


async def test_a_raised_max_redo_lets_a_small_redo_go(tmp_path: Path, images_dir: Path) -> None:
    """Below the share, no question: max_side shrinking 1 image in 10 is a 10% redo."""
    save_scenes(images_dir, 9, prefix="a", seed=1)
    save_scenes(images_dir, 1, prefix="big", seed=5, size=(400, 300))
    await run(detect(tmp_path))
    shrunk = make_config(tmp_path, task={"kind": "detect"}, images={"max_side": 200})
    report = estimate(shrunk)
    assert counts(report) == {"settings": 1}
    (source,) = report["plan"]["settings_sources"]
    assert "max_side = 200 now shrinks" in source["why"]
    above = make_config(tmp_path, task={"kind": "detect"}, images={"max_side": 4096})
    assert estimate(above)["plan"]["nothing_to_do"]  # larger than every image: no redo
    summary = await run(shrunk, ask_before_redo=True)  # 1 of 10 is not more than 10%
    assert summary.api_calls == 1
    summary = await run(above, ask_before_redo=True)
    assert summary.api_calls == 0


async def test_jobs_in_flight_in_batch_mode(
    tmp_path: Path, images_dir: Path, server: LocalServer
) -> None:
    """Files in a submitted job are bought already: a run skips them in either mode (an
    interactive run used to buy them again), and the plan shows the job at the batch price."""
    save_scenes(images_dir, 3, prefix="a", seed=1)
    api = {"base_url": server.base_url, "mode": "batch"}
    config = make_config(tmp_path, api=api, task={"kind": "detect"})
    submitted = await run(config, submit_only=True)
    assert submitted.batch is not None and submitted.batch["jobs_in_flight"] == 1
    save_scenes(images_dir, 1, prefix="b", seed=40)
    report = estimate(config)
    assert counts(report) == {"new": 1, "in_flight": 3}
    job = report["plan"]["categories"]["in_flight"]
    assert (job["jobs"], job["files"], job["cost_usd"]) == (1, 3, None)
    assert job["batch_cost_usd"] > 0
    assert "in flight in Batch Mode: 1 job (3 requests)" in format_estimate(report)
    interactive = make_config(tmp_path, api={"base_url": server.base_url}, task={"kind": "detect"})
    assert counts(estimate(interactive)) == {"new": 1, "in_flight": 3}


async def test_run_plan_makes_no_call_and_needs_no_key(
    tmp_path: Path, images_dir: Path, server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_scenes(images_dir, 3, prefix="a", seed=1)
    config = make_config(tmp_path, api={"base_url": server.base_url}, task={"kind": "detect"})
    await run(config)
    save_scenes(images_dir, 2, prefix="b", seed=30)
    before = server.stats()["requests_total"]
    monkeypatch.delenv("GOOGLE_API_KEY")
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    toml = write_toml(tmp_path, None, base_url=server.base_url)
    code = await asyncio.to_thread(main, ["run", "--plan", "--json", str(toml)])
    assert code == exits.OK
    assert server.stats()["requests_total"] == before
    assert current_rows(str(tmp_path / "out"), ["key"]).num_rows == 3


@pytest.mark.parametrize("kind", TASKS)
async def test_priors_are_close_to_what_the_local_server_bills(tmp_path: Path, kind: str) -> None:
    """Before any row: the estimate's output tokens (the per-task prior) against the billed
    output tokens of the run, on the bundled samples."""
    config = make_config(
        tmp_path,
        input={"paths": [str(REPO / "data" / "samples")]},
        task={"kind": kind, **TASKS[kind]},
    )
    report = estimate(config)
    assert report["output_tokens_from"] == "per-task prior"
    await run(config)
    rows = current_rows(
        str(tmp_path / "out"), ["prompt_tokens", "output_tokens", "thoughts_tokens"]
    )
    billed = sum(
        (row["output_tokens"] or 0) + (row["thoughts_tokens"] or 0)
        for row in rows.to_pylist()
        if row["prompt_tokens"] is not None
    )
    assert 1 / PRIOR_FACTOR <= report["output_tokens"] / billed <= PRIOR_FACTOR


def write_toml(tmp_path: Path, prompt: str | None, *, base_url: str = "local") -> Path:
    """A config file like a user's: detect over `images/` into `out/`."""
    line = f'prompt = "{prompt}"\n' if prompt else ""
    path = tmp_path / ("changed.toml" if prompt else "config.toml")
    path.write_text(
        f'[api]\nbase_url = "{base_url}"\nmodel = "gemini-2.5-flash"\n'
        '[input]\npaths = ["images"]\n'
        f'[task]\nkind = "detect"\n{line}'
        '[output]\ndir = "out"\nflush_seconds = 1\n'
    )
    return path


async def test_answers_in_a_journal_are_done(tmp_path: Path, images_dir: Path) -> None:
    """Answers a running (or killed) run holds in its journal, not yet in a part, are done:
    a run commits them before it walks. The plan reads them without taking the output."""
    save_scenes(images_dir, 2, prefix="a", seed=1)
    config = detect(tmp_path)
    await run(config)
    answered = save_scenes(images_dir, 3, prefix="b", seed=10)
    suffix = suffixes_of(config).as_is
    sink = await ParquetSink(tmp_path / "out", "running").__aenter__()
    try:
        for path in answered[:2]:
            await sink.add(row_of(path, suffix))
        await sink.sync()  # in the journal, not in a part
        report = estimate(config)
    finally:
        await sink.close()
    assert counts(report) == {"new": 1}
    assert report["plan"]["done"] == 4


async def test_retryable_errors_are_retried_and_others_are_done(
    tmp_path: Path, images_dir: Path
) -> None:
    """An error row the next run tries again is in the plan as such; one it does not (not
    retryable) is done, unless the run retries every error."""
    save_scenes(images_dir, 3, prefix="a", seed=1)
    config = detect(tmp_path)
    await run(config)
    failed = save_scenes(images_dir, 2, prefix="b", seed=10)  # never answered ok (no copy)
    suffix = suffixes_of(config).as_is
    errors = [row_of(failed[0], suffix, retryable=True), row_of(failed[1], suffix, retryable=False)]
    await write_rows(tmp_path / "out", "errors", errors)
    report = estimate(config)
    assert counts(report) == {"retry": 1}
    assert report["plan"]["samples"]["retry"] == ["b000.png"]
    assert counts(estimate(config, retry_errors=True)) == {"retry": 2}
    assert (await run(config)).api_calls == 1  # the plan's one retry


def row_of(path: Path, suffix: str, *, retryable: bool | None = None) -> dict[str, Any]:
    """A row of `path` under the run's key suffix, as a run commits one: ok, or (`retryable`
    given) an error."""
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    stat = path.stat()
    row = {
        "key": make_key(sha, suffix),
        "image_path": path.name,
        "image_root": str(path.parent),
        "image_sha256": sha,
        "file_size": stat.st_size,
        "file_mtime_ns": stat.st_mtime_ns,
        "task": "detect",
        "status": "ok",
        "completed_at": datetime.now(UTC),
    }
    if retryable is not None:
        error = "503 UNAVAILABLE" if retryable else "400 INVALID_ARGUMENT: this image"
        row.update(status="error", error=error, retryable=retryable)
    return row


# ------------------------------------------------------------ status --config: the plan's counts
async def test_status_does_not_count_the_files_of_a_job_in_flight_as_to_do(
    tmp_path: Path, images_dir: Path, server: LocalServer
) -> None:
    """A run skips the files a Batch Mode job in flight is buying; `status --config` counted
    them as remaining (its own walk, not the run's)."""
    save_scenes(images_dir, 3, prefix="a", seed=1)
    config = make_config(tmp_path, api={"base_url": server.base_url, "mode": "batch"})
    await run(config, submit_only=True)
    save_scenes(images_dir, 1, prefix="b", seed=40)
    left = {"files": 4, "done": 0, "to_do": 1, "retry": 0, "in_flight": 3}
    assert pending(config) == {"config": config.source, **left}
    assert estimate(config)["plan"]["left"] == left


async def test_status_and_the_plan_count_a_mixed_output_alike(
    tmp_path: Path, images_dir: Path, server: LocalServer
) -> None:
    """Done, to do (a changed file, an error to retry, a new file, a file that is no image), in
    a Batch Mode job in flight: the same numbers from `status --config` and the plan."""
    save_scenes(images_dir, 2, prefix="d", seed=60)
    api = {"base_url": server.base_url}
    await run(
        make_config(tmp_path, api={**api, "mode": "batch"}, task={"kind": "detect"}),
        submit_only=True,
    )
    config = make_config(tmp_path, api=api, task={"kind": "detect"})
    save_scenes(images_dir, 3, prefix="a", seed=1)
    assert (await run(config)).api_calls == 3  # the job's two files are skipped
    failed = save_scenes(images_dir, 2, prefix="b", seed=10)
    suffix = suffixes_of(config).as_is
    errors = [row_of(failed[0], suffix, retryable=True), row_of(failed[1], suffix, retryable=False)]
    await write_rows(tmp_path / "out", "errors", errors)
    save_scenes(images_dir, 1, prefix="a", seed=30)  # a000.png, changed
    save_scenes(images_dir, 1, prefix="c", seed=50)
    (images_dir / "notes.png").write_text("not an image")

    left = {"files": 9, "done": 3, "to_do": 4, "retry": 1, "in_flight": 2}
    shown = pending(config)
    assert shown == {"config": config.source, **left}
    report = estimate(config)
    assert report["plan"]["left"] == left
    assert counts(report) == {"new": 1, "changed": 1, "retry": 1, "in_flight": 2}
    assert report["unusable_files"] == 1
    assert "plan of a run now: 3 done (skipped, $0), 4 to do" in format_estimate(report)
    line = f"remaining under {config.source}: 4 of 9 files to do (1 an error to retry), 3 done, "
    assert line + "2 in Batch Mode jobs in flight" in format_status(
        {**status(tmp_path / "out"), "pending": shown}
    )
    summary = await run(config)  # the four: three calls and notes.png's error row
    assert (summary.api_calls, summary.rows) == (3, {"ok": 3, "error": 1})
    after = {"files": 9, "done": 7, "to_do": 0, "retry": 0, "in_flight": 2}
    assert pending(config) == {"config": config.source, **after}


async def test_status_counts_a_manifest_mix_as_the_plan_does_keeping_only_rows_to_retry(
    tmp_path: Path, images_dir: Path
) -> None:
    """A manifest of files done, failed (an error to retry, one not), made under another prompt,
    new, and missing (one deleted after its answer, one never there): `status --config` counts
    them as the plan does with every current row's verdict, while its index keeps the digest of
    the one row to retry and no other verdict, and no ok key (it copies nothing)."""
    config = detect(tmp_path)
    done = save_scenes(images_dir, 3, prefix="a", seed=1)
    deleted = save_scenes(images_dir, 1, prefix="gone", seed=5)
    await run(config)
    failed = save_scenes(images_dir, 2, prefix="b", seed=10)
    reprompted = save_scenes(images_dir, 2, prefix="p", seed=20)
    suffix, other = suffixes_of(config).as_is, suffixes_of(detect(tmp_path, prompt="Other.")).as_is
    rows = [row_of(failed[0], suffix, retryable=True), row_of(failed[1], suffix, retryable=False)]
    await write_rows(tmp_path / "out", "mix", [*rows, *(row_of(p, other) for p in reprompted)])
    new = save_scenes(images_dir, 2, prefix="c", seed=30)
    deleted[0].unlink()
    listed = [*done, *failed, *reprompted, *new, *deleted, images_dir / "never.png"]
    manifest = images_dir / "manifest.txt"  # its entries rooted as the folder run rooted them
    manifest.write_text("".join(f"{path}\n" for path in listed))
    config = make_config(
        tmp_path, task={"kind": "detect"}, input={"paths": [], "manifest": str(manifest)}
    )

    left = {"files": 11, "done": 4, "to_do": 7, "retry": 1, "in_flight": 0}
    assert pending(config) == {"config": config.source, **left}
    assert estimate(config)["plan"]["left"] == left
    index = plans._index(config, False, RetryRows, copies=False)
    assert isinstance(index.current, RetryRows) and len(index.current.files) == 1
    assert len(index.ok_keys) == 0
    assert len(index.done) == 5  # the run's own done set: the deleted file's row is one
