"""What makes a scheduled night green or red: entries that can never be images are recorded
once (or passed over), a deliberate cancel is no failure, exit-2 messages say what to fix,
`pipeline status` tells a run is writing, and summaries read as lines (`--json` for machines)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline import exits
from pipeline.cli import main
from pipeline.config import IMAGE_PATTERNS
from pipeline.engines.batch.jobs import JobCounts, report_ended
from pipeline.inputs.source import PassedOver, walk
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer
from pipeline.output import journal
from pipeline.output.parts import current_rows, part_entries, scan
from pipeline.output.stores import filesystem, open_store
from pipeline.run.limits import RateLimiter
from pipeline.run.progress import EngineView, Progress
from pipeline.run.stop import Stop
from tests.conftest import REPO, child_env, make_config, put_images, run, scene_png, until


def _history(out: Path) -> list[tuple[str, str | None]]:
    """(image_path, error) of every committed row, superseded ones too."""
    table, _, _ = scan(str(out), ("image_path", "error"), history=False)
    paths, errors = table.column("image_path").to_pylist(), table.column("error").to_pylist()
    return sorted(zip(paths, errors, strict=True))


async def test_unusable_entries_are_recorded_once(images_dir: Path, tmp_path: Path) -> None:
    """A broken link and a FIFO are error rows of the first run only: the next nights skip them
    (their identity is the entry's own lstat / stat) and end green."""
    (images_dir / "a.png").write_bytes(scene_png(1))
    (images_dir / "gone.png").symlink_to(images_dir / "missing.png")
    os.mkfifo(images_dir / "pipe.png")
    config = make_config(tmp_path)
    first = await run(config)
    assert (first.exit_code, dict(first.rows)) == (exits.ROWS_NOT_OK, {"ok": 1, "error": 2})
    for _ in range(2):
        again = await run(config)
        assert (again.exit_code, again.api_calls, again.skipped) == (exits.OK, 0, 3)
    assert _history(tmp_path / "out") == [
        ("a.png", None),
        ("gone.png", "broken symlink"),
        ("pipe.png", "not a regular file (fifo)"),
    ]


async def test_a_changed_link_is_asked_again(images_dir: Path, tmp_path: Path) -> None:
    """The broken link's stamp is its own: once its target appears, the file is new (the
    target's size and mtime) and is sent without --retry-errors."""
    (images_dir / "gone.png").symlink_to(images_dir / "missing.png")
    config = make_config(tmp_path)
    await run(config)
    (images_dir / "missing.png").write_bytes(scene_png(2))
    fixed = await run(config)
    assert fixed.exit_code == exits.OK and sum(fixed.rows.values()) == 2
    rows = current_rows(str(tmp_path / "out"), ["image_path", "status"]).to_pylist()
    assert {r["image_path"]: r["status"] for r in rows} == {"gone.png": "ok", "missing.png": "ok"}


async def test_default_include_passes_over_non_images(images_dir: Path, tmp_path: Path) -> None:
    """By default only image kinds are taken: a README and notes are counted "ignored", not
    error rows; hidden files are not counted; `include = ["*"]` takes them again."""
    (images_dir / "a.JPG").write_bytes(scene_png(3))
    (images_dir / "README").write_text("photos of the night\n")
    (images_dir / "sub").mkdir()
    (images_dir / "sub" / "notes.txt").write_text("notes\n")
    (images_dir / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    summary = await run(make_config(tmp_path))
    assert (summary.exit_code, dict(summary.rows), summary.ignored) == (exits.OK, {"ok": 1}, 2)

    every = await run(make_config(tmp_path, input={"include": ["*"]}))
    assert dict(every.rows) == {"error": 2} and every.ignored == 0
    rows = current_rows(str(tmp_path / "out"), ["image_path", "error"]).to_pylist()
    assert {r["image_path"]: r["error"] for r in rows} == {
        "a.JPG": None,
        "README": "not an image (text)",
        "sub/notes.txt": "not an image (text)",
    }


def test_a_bucket_walk_counts_what_include_passes_over(bucket: str) -> None:
    """The same rule on an object store: the listing's README is counted, not yielded."""
    names = put_images(f"{bucket}/images", 2)
    filesystem("s3").pipe(f"{bucket}/images/README.txt", b"notes")
    passed = PassedOver()
    found = list(walk([f"{bucket}/images"], include=IMAGE_PATTERNS, passed=passed))
    assert ([src.rel_path for src in found], passed.ignored) == (names, 1)


# ------------------------------------------------------------------ a deliberate batch cancel
@pytest.mark.parametrize(
    ("state", "stopped"), [("CANCELLED", False), ("FAILED", True), ("EXPIRED", True)]
)
def test_a_cancelled_job_is_settled_not_a_stop(state: str, stopped: bool, tmp_path: Path) -> None:
    """A job ended as `_ended` records it, 3 of its 5 requests unanswered: a cancel (only its
    owner cancels a job) leaves the run's exit code alone; a failure or an expiry stops it."""
    counts, stop = JobCounts(), Stop()
    counts.ended.append({"name": "batches/j1", "state": state, "requests": 3, "why": "why"})
    report_ended(stop, counts, tmp_path / "out")
    assert (stop.reason is not None) == stopped
    assert counts.as_dict(0)["jobs_ended"][0]["state"] == state  # still in the summary


# ------------------------------------------------------------------ exit 2 says what to fix
async def test_a_wrong_model_says_did_you_mean_and_no_rerun(
    images_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A typo in [api] model: the model table's warning and the stop both name the closest
    id, and the exit-2 hint says to fix it, not to rerun the same command."""
    (images_dir / "a.png").write_bytes(scene_png(4))
    summary = await run(make_config(tmp_path, api={"model": "gemini-2.5-flahs"}))
    assert summary.exit_code == exits.USAGE
    assert "did you mean gemini-2.5-flash?" in (summary.stop_reason or "")
    assert "did you mean gemini-2.5-flash?" in caplog.text
    assert "rerun the same command" not in f"{summary.stop_reason} {summary.resume_hint}"


async def test_a_wrong_key_is_exit_2_with_a_fix_hint(
    images_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (images_dir / "a.png").write_bytes(scene_png(5))
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.setenv("GEMINI_API_KEY", "a-wrong-key")
    async with LocalServer(ServerOptions(api_key="the-right-key")) as server:
        summary = await run(make_config(tmp_path, api={"base_url": server.base_url}))
    assert summary.exit_code == exits.USAGE and "refused the credentials" in summary.stop_reason
    assert summary.resume_hint and "fix" in summary.resume_hint
    assert "rerun the same command" not in summary.resume_hint


# ------------------------------------------------------------------ pipeline status
def _pipeline(*args: str, stdout: int | None = subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
        cwd=REPO,
        timeout=120,
    )


async def _one_run(images_dir: Path, tmp_path: Path, out: str | None = None) -> str:
    for seed in range(3):
        (images_dir / f"{seed}.png").write_bytes(scene_png(seed))
    out = out or str(tmp_path / "out")
    assert (await run(make_config(tmp_path, output={"dir": out}))).exit_code == exits.OK
    return out


def _status(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """`pipeline status ARGS` in this process, its exit code and stdout: what is under test is
    the report, not a start-up (a process costs ~1.3 s of CPU, mostly imports); a lock or lease
    held here is another writer's to it all the same (a flock is per open file, a lease an
    object). The closed pipe below needs a process of its own."""
    code = main(["status", *args])
    return code, capsys.readouterr().out


async def test_status_says_a_run_is_writing_and_its_journal(
    images_dir: Path, tmp_path: Path, out: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """While a run holds the output (its lock on disk, its lease on a bucket), status says so
    and counts the answers its journal holds beyond the parts; idle, no such line."""
    out = await _one_run(images_dir, tmp_path, out)
    store = open_store(out)
    assert "writing" not in _status(capsys, str(out))[1]
    lock = store.lock("a-run", wait=False)
    try:
        segment = journal.Segment(store, journal.segment_name("20270101T000000Z-abcdef", 1))
        segment.append([{"image_path": "x.png"}, {"image_path": "y.png"}])
        segment.close()
        code, shown = _status(capsys, str(out))
        report = json.loads(_status(capsys, str(out), "--json")[1])
    finally:
        lock.release()
    assert code == exits.OK
    assert "a run is writing it now: 2 answers in its journal" in shown.splitlines()[0]
    assert report["writing"] == {"journal_answers": 2}


async def test_status_exits_2_for_an_unreadable_part(
    images_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = await _one_run(images_dir, tmp_path)
    store = open_store(out)
    (entry,) = part_entries(store)
    store.replace(entry.name, b"PAR1 not parquet at all PAR1")
    code, shown = _status(capsys, str(out))
    assert code == exits.USAGE
    assert "UNREADABLE PART" in shown


@pytest.mark.parametrize("json_flag", [(), ("--json",)])
async def test_status_into_a_closed_pipe_has_no_traceback(
    images_dir: Path, tmp_path: Path, json_flag: tuple[str, ...]
) -> None:
    """`pipeline status OUT | head -1`: the reader is gone before the write (its end of the
    pipe closed first, so the write surely fails): no traceback, the exit of a SIGPIPE."""
    out = await _one_run(images_dir, tmp_path)
    reader, writer = os.pipe()
    os.close(reader)
    try:
        shown = _pipeline("status", str(out), *json_flag, stdout=writer)
    finally:
        os.close(writer)
    assert "Traceback" not in shown.stderr and "BrokenPipe" not in shown.stderr, shown.stderr
    assert shown.returncode in (0, 141)


# ------------------------------------------------------------------ the progress line
@dataclass
class _Walk:
    """A walk's counters as a producer exposes them (the Walk protocol)."""

    seen: int = 4
    skipped: int = 0
    done: bool = False


async def test_the_progress_line_says_it_waits_for_the_quota() -> None:
    """A 429 with a 38 s retryDelay: the next request waits it out in the real limiter, and
    the progress line says why it does not move."""
    limiter = RateLimiter(rpm=None, tpm=None)
    limiter.throttled(retry_delay=38)
    view = EngineView(_Walk(), dict, int, limiter.stats.waiting)
    assert "waiting" not in Progress(view, enabled=False).line()
    waiter = asyncio.create_task(limiter.acquire(100))
    try:
        await until(lambda: limiter.stats.waiting() > 0)
        line = Progress(view, enabled=False).line()
    finally:
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
    assert line.endswith(" waiting 38 s for the minute's quota"), line
    assert limiter.stats.waiting() == 0  # the wait is over (cancelled here): no more note


# ------------------------------------------------------------------ summaries as lines
async def test_run_render_reparse_say_lines_and_print_json(images_dir: Path, tmp_path: Path):
    """run, render and reparse end with a line a person reads (no Python dict on stderr);
    `--json` adds the report on stdout for a machine."""
    for seed in range(2):
        (images_dir / f"{seed}.png").write_bytes(scene_png(seed))
    (images_dir / "notes.txt").write_text("not an image\n")
    config = tmp_path / "night.toml"
    config.write_text(
        f'[api]\nbase_url = "local"\nmodel = "gemini-2.5-flash"\n'
        f'[input]\npaths = ["{images_dir}"]\n[task]\nkind = "detect"\n'
        f'[output]\ndir = "{tmp_path / "out"}"\n'
    )
    done = _pipeline("run", str(config), "--quiet", "--json")
    assert done.returncode == exits.OK, done.stderr
    assert json.loads(done.stdout)["rows"] == {"ok": 2}
    line = done.stderr.splitlines()[-1]
    assert ": 2 rows (2 ok), 0 skipped (already done), 1 ignored (not in [input] include)" in line
    assert "{" not in done.stderr

    shown = _pipeline("render", str(tmp_path / "out"), "--out", str(tmp_path / "html"), "--json")
    assert shown.returncode == exits.OK, shown.stderr
    assert json.loads(shown.stdout)["entries"] == 2
    assert re.search(r"/index\.html: 2 images, \d+ labels$", shown.stderr.strip()), shown.stderr

    again = _pipeline("reparse", str(tmp_path / "out"))
    assert again.returncode == exits.OK, again.stderr
    assert again.stdout == "" and "{" not in again.stderr
    assert ": 2 stored answers parsed again (2 ok -> ok)" in again.stderr
