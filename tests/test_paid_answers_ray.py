"""Money is data on the Ray engine: a kill -9 of a Ray run re-pays at most the answers in flight
(tests/test_paid_answers.py says how the audit works: the local server in its own process logs
every answer it delivers). A module of its own so that xdist runs it beside that one: each case
starts Ray in the killed run's process."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import REPO, child_env
from tests.test_cli import wait_for
from tests.test_paid_answers import (
    CONCURRENCY,
    IMAGES,
    SEED,
    answered,
    answers,
    audited_server,
    job,
    re_paid,
    read_rows,
    rerun,
)

if os.name != "posix":  # signals and /proc: Linux only, like the pipeline's own tests
    pytestmark = pytest.mark.skip("POSIX only")

RAY_WORKERS, RAY_CONCURRENCY = 2, 4  # 8 calls in flight, as CONCURRENCY


def session(sid: int) -> list[int]:
    """The processes of a session (the killed driver's: the Ray it started and its workers,
    which Ray puts in process groups of their own)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":  # after "(comm)": state ppid pgrp sid
                pids.append(int(stat.parent.name))
    return pids


# Two cases, not four: each starts Ray (~25 s); 18 trials were run by hand (docs, issue 19).
@pytest.mark.parametrize(
    ("instant", "whole"), [(0, False), (1, True)], ids=["driver-group", "every-process"]
)
def test_kill_9_of_a_ray_run_re_pays_at_most_the_answers_in_flight(
    tmp_path: Path, instant: int, whole: bool
) -> None:
    """The Ray engine on disk: each worker journals its own answers, so a kill -9 costs only
    the calls in flight of every worker. Killed: the driver's process group (the driver and
    the Ray it started; the workers die with their raylet, no `ray stop`), or every process of
    the run at once (a container's OOM kill: the workers mid-call). The rerun (the single
    engine) recovers the workers' journals and buys only what was not answered."""
    rng = random.Random(SEED + 100 + instant)
    log = tmp_path / "answers.jsonl"
    in_flight = RAY_WORKERS * RAY_CONCURRENCY
    with audited_server(log) as url:
        config, out = job(tmp_path, url)
        single = config.read_text()
        config.write_text(
            single.replace(f"concurrency = {CONCURRENCY}", f"concurrency = {RAY_CONCURRENCY}")
            + f'[engine]\nkind = "ray"\nworkers = {RAY_WORKERS}\n'
        )
        target = rng.randint(IMAGES // 4, IMAGES * 3 // 5)  # answers delivered before the kill
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", str(config), "--quiet"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env=child_env(GEMINI_API_KEY="audit-key"), cwd=REPO, start_new_session=True,
        )  # fmt: skip
        try:
            journaled = lambda: any(p.stat().st_size for p in Path(out).glob(".journal-*"))  # noqa: E731
            while not (journaled() and answered(log) >= target):
                assert proc.poll() is None, "the run ended before the kill"
                time.sleep(0.001)
            killed_at = time.time()
            os.killpg(proc.pid, signal.SIGKILL)  # the driver, its gcs_server and raylet
            for pid in session(proc.pid) if whole else ():  # and the workers, own groups
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            at_kill = len(answers(log))
            proc.wait(timeout=30)
            wait_for(lambda: not session(proc.pid))  # the workers die with their raylet
        finally:
            for pid in session(proc.pid):  # only if the assertion above failed
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.stderr.close()
        after = len(answers(log))
        assert after < IMAGES, "the run finished before the kill: nothing tested"
        config.write_text(single)  # the rerun: one process
        result = rerun(config)
        assert result.returncode == 0, result.stderr
        rows = Counter(row["image_path"] for row in read_rows(out))
        assert len(rows) == IMAGES and set(rows.values()) == {1}, rows
        calls = Counter(sha for entry in answers(log) for sha in entry["sha256"])
        twice, when = re_paid(log, killed_at)
        assert len(twice) <= in_flight, (
            f"{len(twice)} re-paid, {in_flight} in flight; killed at {at_kill} answers, "
            f"{after} once Ray was gone; {when}"
        )
        assert all(n <= 2 for n in calls.values())
