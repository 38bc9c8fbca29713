"""Hostile answers and the edges a user trips over: clear messages, documented exit codes,
nothing paid lost, the event loop never frozen."""

from __future__ import annotations

import functools
import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import exits
from pipeline.cli import main
from pipeline.gemini.types import Usage
from pipeline.run.rows import checked_usage
from tests.conftest import REPO, draw_shapes, make_config, read_rows, run, save_scenes
from tests.test_cli import ENV, write_config

shapes = functools.partial(save_scenes, prefix="e", seed=900)  # shapes(folder, count): paths


def replay(tmp_path: Path, answers: dict[Path, str]) -> str:
    path = tmp_path / "replay.jsonl"
    lines = [
        json.dumps({"sha256": hashlib.sha256(image.read_bytes()).hexdigest(), "text": text})
        for image, text in answers.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# ------------------------------------------------------------------------- hostile answers
async def test_one_value_past_int32_skips_one_object_and_nothing_else(
    images_dir: Path, tmp_path: Path
) -> None:
    """Once: a box value of 2147483647.5 dropped a whole part of paid rows, and every rerun
    paid again and died again. Now it is one skipped object, with its reason."""
    paths = shapes(images_dir, 20)
    hostile = json.dumps(
        [
            {"box_2d": [2147483647.5, 0, 500, 500], "label": "huge"},
            {"box_2d": [100, 100, 400, 400], "label": "fine"},
            {"box_2d": [10**400, 0, 5, 5], "label": "astronomic"},
        ]
    )
    config = make_config(
        tmp_path, task={"kind": "detect"}, local={"replay": replay(tmp_path, {paths[3]: hostile})}
    )
    summary = await run(config)
    rows = {row["image_path"]: row for row in read_rows(tmp_path / "out")}
    assert len(rows) == 20 and {r["status"] for r in rows.values()} == {"ok"}
    odd = rows["e003.png"]
    assert [o["label"] for o in odd["objects"]] == ["fine"]
    assert "out of range" in odd["error"]
    again = await run(config)  # nothing to redo, nothing paid again
    assert summary.api_calls == 20 and again.api_calls == 0


def test_usage_counts_past_int32_are_stored_as_null_with_a_reason() -> None:
    values, problems = checked_usage(Usage(prompt_tokens=2**31, output_tokens=12))
    assert values["prompt_tokens"] is None and values["output_tokens"] == 12
    assert problems and "out of range" in problems[0]


async def test_a_hostile_answer_does_not_freeze_the_other_calls(
    images_dir: Path, tmp_path: Path
) -> None:
    """2,000 polygons on a 2000x2000 image once took 66 s on the event loop while other calls
    timed out and were paid twice. Now the parse is capped and off the loop: one call each."""
    big = images_dir / "big.png"
    draw_shapes(2000, 2000, seed=1, count=2)[0].save(big)
    others = shapes(images_dir, 30)
    polygon = [[x, y] for x in (0, 999) for y in (0, 999)]
    hostile = json.dumps({"boxes": [{"box_2d": [0, 0, 1000, 1000], "label": "x", "mask": polygon}]
                          * 2000})  # fmt: skip
    config = make_config(
        tmp_path,
        api={"model": "gemini-3.8-flash", "min_timeout": 1},
        local={"replay": replay(tmp_path, {big: hostile}), "latency_ms": 50},
        limits={"concurrency": 8},
    )
    summary = await run(config)
    rows = {row["image_path"]: row for row in read_rows(tmp_path / "out")}
    assert summary.api_calls == len(others) + 1  # nobody paid twice
    assert len(rows["big.png"]["objects"]) == 1000  # the cap on objects, with its reason
    assert "only the first 1000 read" in rows["big.png"]["error"]
    assert "mask pixel cap" in rows["big.png"]["error"]


def test_a_day_long_retry_delay_is_capped_and_ctrl_c_ends_the_wait(tmp_path: Path) -> None:
    """The service may ask for 86400 s: the wait is capped by [api] max_retry_delay, and the
    first Ctrl-C ends it at once (exit 3), whatever is left of it."""
    images = tmp_path / "images"
    images.mkdir()
    shapes(images, 3)
    config = write_config(
        tmp_path / "slow.toml",
        images,
        tmp_path / "out",
        "[local]\nrpm = 1\nquota_window_seconds = 86400\n",
    )
    text = config.read_text().replace("[limits]\n", "[limits]\nmax_attempts = 3\n")
    config.write_text(text.replace("[api]\n", "[api]\nmax_retry_delay = 120\n"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(config), "--quiet"],
        stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO,
    )  # fmt: skip
    out = tmp_path / "out"
    deadline = time.monotonic() + 60
    while not (out.exists() and list(out.glob(".journal-*")) + list(out.glob("data/*.parquet"))):
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)  # poll for the first answer; the others now wait on a 429
    signalled = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == exits.STOPPED, stderr
    assert time.monotonic() - signalled < 10  # not 120 s, let alone a day
    assert "interrupted" in stderr


# ---------------------------------------------------------------------- usage edges, exit 2
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("missing-manifest", "does not exist"),
        ("missing-input", "[input] path does not exist"),
        ("output-is-a-file", "[output] dir"),
        ("corrupt-state", "state.sqlite cannot be read"),
        ("corrupt-part", "move it aside"),
        ("ftp-base-url", "[api] base_url must be"),
        ("timeout-inf", "[api] timeout must be a positive finite number"),
    ],
)
def test_usage_edges_exit_2_naming_the_problem(
    tmp_path: Path, change: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI in this process (`main`): what is under test is the exit code and the message,
    not a start-up (~1.3 s of CPU a process, eight here); an uncaught error would raise here."""
    images = tmp_path / "images"
    images.mkdir()
    shapes(images, 2)
    out = tmp_path / "out"
    config = write_config(tmp_path / "job.toml", images, out)
    text = config.read_text()
    if change == "missing-manifest":
        text = text.replace("[input]\n", f'[input]\nmanifest = "{tmp_path / "nope.txt"}"\n')
    elif change == "missing-input":
        text = text.replace(str(images), str(tmp_path / "gone"))
    elif change == "output-is-a-file":
        out.write_text("not a folder")
    elif change == "corrupt-state":
        out.mkdir()
        (out / ".state.sqlite").write_bytes(b"this is not a database" * 100)
    elif change == "corrupt-part":
        out.mkdir()
        (out / "part-old-00000.parquet").write_bytes(b"PAR1 garbage PAR1")
    elif change == "ftp-base-url":
        text = text.replace('base_url = "local"', 'base_url = "ftp://x"')
    elif change == "timeout-inf":
        text = text.replace("[api]\n", "[api]\ntimeout = inf\n")
    config.write_text(text)
    code = main(["run", str(config), "--quiet"])
    stderr = capsys.readouterr().err
    assert code == exits.USAGE, stderr
    assert message in stderr and "Traceback" not in stderr
    if change == "corrupt-part":
        status = main(["status", str(out)])
        assert status == exits.USAGE  # a cron check sees it
        stdout = capsys.readouterr().out
        assert "UNREADABLE PART" in stdout and "part-old-00000.parquet" in stdout


def test_a_closed_stderr_leaves_the_exit_code_alone(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    shapes(images, 2)
    config = write_config(tmp_path / "job.toml", images, tmp_path / "out")
    result = subprocess.run(
        f"exec {sys.executable} -m pipeline run {config} 2>&-",
        shell=True, env=ENV, cwd=REPO, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == exits.OK
    assert len(read_rows(tmp_path / "out")) == 2


async def test_a_pipeline_output_used_as_a_manifest_finds_its_images(
    images_dir: Path, tmp_path: Path
) -> None:
    shapes(images_dir, 3)
    await run(make_config(tmp_path, task={"kind": "detect"}))
    part = next((tmp_path / "out").glob("data/*.parquet"))
    manifest = tmp_path / "again.parquet"
    pq.write_table(pq.read_table(part), manifest)
    config = make_config(
        tmp_path,
        input={"paths": [], "manifest": str(manifest)},
        output={"dir": str(tmp_path / "out2")},
        task={"kind": "caption"},
    )
    summary = await run(config)
    rows = read_rows(tmp_path / "out2")
    assert summary.exit_code == exits.OK and {r["status"] for r in rows} == {"ok"}
    assert sorted(r["image_path"] for r in rows) == ["e000.png", "e001.png", "e002.png"]
