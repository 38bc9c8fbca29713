"""The Python API (`import pipeline`) as a notebook uses it: called from inside a running event
loop, against the bundled local server started in-process (`base_url = "local"`), its rows read
back through `pipeline.read` and compared with the run's summary."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import pipeline
from pipeline import api
from pipeline.output.journal import PREFIX as JOURNAL_PREFIX
from tests.conftest import REPO, child_env, save_scenes


def config_dict(tmp_path: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A config as a dict shaped like the TOML file: the bundled server, a small fast run."""
    data: dict[str, dict[str, Any]] = {
        "api": {"base_url": "local", "model": "gemini-2.5-flash", "timeout": 20},
        "limits": {"concurrency": 4, "max_attempts": 4},
        "input": {"paths": [str(tmp_path / "images")]},
        "task": {"kind": "detect"},
        "output": {"dir": str(tmp_path / "out"), "flush_seconds": 1},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


def write_toml(path: Path, images: Path, out: Path) -> Path:
    path.write_text(
        f"""
[api]
base_url = "local"
model = "gemini-2.5-flash"
timeout = 20

[input]
paths = ["{images.name}"]

[task]
kind = "detect"

[output]
dir = "{out.name}"
flush_seconds = 1
"""
    )
    return path


def statuses(table: Any) -> Counter[str]:
    return Counter(table.column("status").to_pylist())


async def test_run_from_a_running_loop_reads_back_what_the_summary_says(
    tmp_path: Path, images_dir: Path
) -> None:
    """The notebook case: `pipeline.run` called where asyncio.run() refuses (this test's loop is
    running); a TOML path, keyword overrides by flag name, the rows read back."""
    assert asyncio_loop_running()
    paths = save_scenes(images_dir, 5, prefix="img", seed=10)
    toml = write_toml(tmp_path / "c.toml", images_dir, tmp_path / "out")

    summary = pipeline.run(toml, task="segment", concurrency=2, seed=0)

    assert summary.exit_code == 0, summary.stop_reason
    assert summary.rows == Counter({"ok": 5})
    table = pipeline.read(tmp_path / "out")
    assert table.num_rows == 5
    assert statuses(table) == summary.rows
    assert set(table.column("task").to_pylist()) == {"segment"}  # the override, not the file
    assert set(table.column("run_id").to_pylist()) == {summary.run_id}
    assert sorted(table.column("image_path").to_pylist()) == sorted(p.name for p in paths)
    assert sum(table.column("output_tokens").to_pylist()) == summary.tokens["output_tokens"]


def asyncio_loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def test_arun_with_a_dict_config_and_dotted_overrides_resumes(
    tmp_path: Path, images_dir: Path
) -> None:
    """`await pipeline.arun` in the caller's loop; a dict config; `overrides` keyed
    section.key; a second run skips what the first did; `read` by task and columns."""
    save_scenes(images_dir, 5, prefix="img", seed=20)
    config = config_dict(tmp_path)

    first = await pipeline.arun(config, {"limits.concurrency": 2}, limit=3, seed=0)
    second = await pipeline.arun(config, limits={"concurrency": 3}, seed=0)

    assert (first.rows, second.rows) == (Counter({"ok": 3}), Counter({"ok": 2}))
    assert second.skipped == 3
    table = pipeline.read(tmp_path / "out", columns=["image_path", "status"], task="detect")
    assert table.column_names == ["image_path", "status"]
    assert statuses(table) == first.rows + second.rows
    assert pipeline.read(tmp_path / "out", task="caption").num_rows == 0


async def test_run_off_the_main_thread_keeps_the_callers_signal_handlers(
    tmp_path: Path, images_dir: Path
) -> None:
    """A run in a thread of its own takes no signal (Python gives them to the main thread); one
    on the main thread hands back the handlers the process had (a kernel's), not asyncio's
    defaults."""
    save_scenes(images_dir, 2, prefix="img", seed=30)
    mine = signal.signal(signal.SIGTERM, lambda *_: None)  # what a kernel or framework set
    try:
        installed = signal.getsignal(signal.SIGTERM)
        assert pipeline.run(config_dict(tmp_path), seed=0).exit_code == 0
        assert (await pipeline.arun(config_dict(tmp_path), seed=0)).skipped == 2
        assert signal.getsignal(signal.SIGTERM) is installed
    finally:
        signal.signal(signal.SIGTERM, mine)


async def test_ctrl_c_in_the_caller_drains_the_run_in_its_thread(
    tmp_path: Path, images_dir: Path
) -> None:
    """A notebook's interrupt (SIGINT to the main thread, which waits for the run's thread)
    drains the run as Ctrl-C does on the command line: the calls in flight finish, nothing new
    starts, the summary says so, and a rerun does the rest."""
    save_scenes(images_dir, 40, prefix="img", seed=40)
    out = tmp_path / "out"
    config = config_dict(
        tmp_path,
        limits={"concurrency": 2},
        local={"latency_ms": 150.0},
        output={"journal_rows": 1},
    )
    finished = threading.Event()
    watcher = threading.Thread(target=interrupt_at_first_answer, args=(out, finished))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as a kernel runs a cell
    try:
        watcher.start()
        stopped = pipeline.run(config, seed=0)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the kernel's, back
    finally:
        finished.set()
        watcher.join()
        signal.signal(signal.SIGINT, previous)
    assert stopped.stop_reason == "interrupted" and stopped.exit_code == 3
    done = sum(stopped.rows.values())
    assert 0 < done < 40
    rest = pipeline.run(config, seed=0)
    assert (rest.skipped, sum(rest.rows.values())) == (done, 40 - done)
    assert pipeline.read(out).num_rows == 40


def interrupt_at_first_answer(out: Path, finished: threading.Event) -> None:
    """SIGINT to this process once the run has journaled an answer (it is then at work, taking
    signals): the output is polled, as a user would see it, until the run ends."""
    while not finished.wait(0.02):  # the poll's interval, as conftest.until's
        if any(path.stat().st_size for path in out.rglob(f"{JOURNAL_PREFIX}*")):
            os.kill(os.getpid(), signal.SIGINT)
            return


def test_estimate_reads_the_config_and_the_outputs_history(
    tmp_path: Path, images_dir: Path
) -> None:
    save_scenes(images_dir, 3, prefix="img", seed=50)
    config = config_dict(tmp_path)
    before = pipeline.estimate(config, model="gemini-2.5-flash-lite")
    summary = pipeline.run(config, seed=0)
    after = pipeline.estimate(config)
    assert (before["images"], before["requests"], before["model"]) == (
        3,
        3,
        "gemini-2.5-flash-lite",
    )
    assert before["output_tokens_from"] == "per-task prior"
    assert after["output_tokens_from"] == f"{sum(summary.rows.values())} earlier rows"


def test_load_config_from_a_dict_with_overrides(tmp_path: Path) -> None:
    config = pipeline.load_config(
        config_dict(tmp_path),
        {"limits.rpm": 60},
        model="gemini-2.5-pro",
        output=str(tmp_path / "elsewhere"),
        images={"max_side": 512},
        **{"limits.tpm": 10_000},
    )
    assert config.api.model == config.task.model == "gemini-2.5-pro"
    assert (config.limits.rpm, config.limits.tpm, config.images.max_side) == (60, 10_000, 512)
    assert config.output.dir == str(tmp_path / "elsewhere")
    assert pipeline.load_config(config) is config  # a Config as it is, no override


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda d: pipeline.load_config({**d, "task": {"kind": "classify"}}), "labels is required"),
        (lambda d: pipeline.load_config(d, modle="x"), "unknown keyword modle="),
        (lambda d: pipeline.load_config(d, concurrency=0), "[limits] concurrency must be"),
        (lambda d: pipeline.load_config(d, {"limits.nope": 1}), "unknown key [limits] nope"),
        (lambda d: pipeline.load_config(d, {"nope.rpm": 1}), "'nope.rpm' is not a setting"),
        (lambda d: pipeline.load_config("missing.toml"), "config file not found"),
        (lambda d: pipeline.run(d), "[input] path does not exist"),
        (lambda d: pipeline.read(d["output"]["dir"]), "no such output folder"),
    ],
)
def test_config_problems_are_config_errors(tmp_path: Path, call: Any, message: str) -> None:
    with pytest.raises(pipeline.ConfigError) as raised:
        call(config_dict(tmp_path))
    assert message in str(raised.value)


def test_run_is_the_function_though_the_run_stage_is_a_subpackage() -> None:
    """pipeline/run/ is imported by every run (this test session's conftest too), and would
    shadow a plain module attribute."""
    from pipeline.run import summary

    assert pipeline.run is api.run
    assert summary.RunSummary is pipeline.RunSummary
    assert {"run", "arun", "estimate", "read", "load_config"} <= set(dir(pipeline))


def test_import_pipeline_loads_no_api() -> None:
    """Every entry point imports the package: the API and what it brings load on first use."""
    code = (
        "import sys, pipeline; print(sorted(m for m in ('pipeline.api', 'pipeline.engines', "
        "'aiohttp', 'pyarrow') if m in sys.modules)); pipeline.read; print('pipeline.api' in "
        "sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), cwd=REPO
    )
    assert result.stdout.split("\n")[:2] == ["[]", "True"], result.stderr


def test_the_stub_names_what_the_package_loads() -> None:
    """pipeline/__init__.pyi (for type checkers) and the names __init__.py loads on use agree."""
    stub = (REPO / "pipeline" / "__init__.pyi").read_text()
    declared = set(re.findall(r"^from \S+ import (\w+) as \1$", stub, re.M)) | {"__version__"}
    assert declared == set(pipeline.__all__)
    assert all(getattr(pipeline, name) is not None for name in pipeline.__all__)


async def test_ctrl_c_before_the_run_takes_signals_cancels_it() -> None:
    """Before its work starts (the config, the preflight) a run takes no signal yet: a Ctrl-C
    there cancels it, as asyncio.run does at a Ctrl-C, and the caller gets KeyboardInterrupt."""
    started, ended = threading.Event(), threading.Event()

    async def before_work() -> None:
        started.set()
        try:
            await asyncio.Event().wait()  # never set: only the cancel ends it
        finally:
            ended.set()

    def interrupt_once_started() -> None:
        if started.wait(60):
            os.kill(os.getpid(), signal.SIGINT)

    watcher = threading.Thread(target=interrupt_once_started)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        watcher.start()
        with pytest.raises(KeyboardInterrupt):
            api.OwnLoop(before_work).result()  # what pipeline.run does from a running loop
    finally:
        watcher.join()
        signal.signal(signal.SIGINT, previous)
    assert ended.is_set()  # cancelled, its cleanup run, its thread joined
