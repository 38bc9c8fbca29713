"""What makes a scheduled night green or red: entries that can never be images are recorded
once (or passed over), a deliberate cancel is no failure, exit-2 messages say what to fix,
`pipeline status` tells a run is writing, and summaries read as lines (`--json` for machines)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline import exits
from pipeline.engines.batch.jobs import JobCounts, report_ended
from pipeline.output.parts import current_rows, scan
from pipeline.run.stop import Stop
from tests.conftest import make_config, run, scene_png


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
