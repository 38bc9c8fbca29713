"""Every benchmark and every script in scripts/ runs, at a tiny size, so none can rot unseen.

`scripts/bench.py profile` once crashed on an import from a module that had moved, and nothing
ran it until someone wanted its figures (issue 22). Here each `bench.py` subcommand runs as a
user runs it, with `--smoke` (the size convention at the top of scripts/bench.py), in its own
process; the subcommands come from `bench.py --list`, so one added later is run too. Nothing is
timed or compared: a benchmark passes when it exits 0 having written nothing into docs/ (a smoke
run is never recorded and draws its charts in its own temporary folder). The other scripts run
against the local server on a few generated images, in tests/test_benchmarks_smoke_second.py.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPTS_DIR = REPO / "scripts"
DOCS = REPO / "docs"
KEY = "smoke-test-key"
# Deselect with `-m "not benchmarks"` for a quicker local run; CI runs it, so none can rot.
pytestmark = pytest.mark.benchmarks
# Seconds one smoke run may take on a busy 2-core machine before it is called stuck: the Ray
# ones start a cluster (~12 s quiet), the others a few processes of ~1 s each.
TIMEOUT_S = 300


@functools.cache
def bench_names() -> list[str]:
    """What `bench.py --list` names (once a process: each smoke module's collection asks)."""
    listed = subprocess.run(
        [sys.executable, str(SCRIPTS_DIR / "bench.py"), "--list"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    return listed.stdout.split()


def _docs_state() -> dict[str, str]:
    """What a benchmark may write, by sha256: the results record and the charts. A smoke run
    must leave them as they were."""
    written = [DOCS / "bench-results.jsonl", *sorted((DOCS / "bench").glob("*"))]
    return {
        str(path.relative_to(DOCS)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in written
        if path.is_file()
    }


def _run(argv: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GEMINI_API_KEY": KEY}
    return subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, env=env, cwd=cwd, timeout=TIMEOUT_S
    )


def _explain(code: int | None, out: str, err: str) -> str:
    return f"exit {code}\nstdout tail:\n{out[-2000:]}\nstderr tail:\n{err[-4000:]}"


def test_bench_lists_its_subcommands() -> None:
    names = bench_names()
    assert {"throughput", "profile", "masks"} <= set(names)
    assert "all" not in names


def cluster_benchmark(name: str) -> bool:
    """The Ray engine's benchmarks, which start a local cluster (~12 s each on a quiet machine):
    run by tests/test_benchmarks_smoke_cluster.py, a module of their own, so that the suite's
    workers (`--dist loadfile`: one module a worker) run them beside the others."""
    return name.startswith("ray-")


# The other benchmarks are dealt in turn, in `--list` order, between this module (share 0),
# tests/test_benchmarks_smoke_second.py (share 1, with the scripts) and
# tests/test_benchmarks_smoke_third.py (share 2): in one module they were the suite's longest
# file (a fifth of its test time), which one worker ran alone to the end; in two, each was still
# longer than any other file (280 and 262 s of a 2,237 s suite, at 805be94).
SHARES = 3


def smoke_share(share: int) -> list[str]:
    """The benchmarks, cluster ones aside, that smoke module `share` runs."""
    return [n for n in bench_names() if not cluster_benchmark(n)][share::SHARES]


@pytest.mark.parametrize("name", smoke_share(0))
def test_benchmark_runs_at_smoke_size(name: str) -> None:
    check_smoke_run(name)


def check_smoke_run(name: str) -> None:
    """`bench.py NAME --smoke` exits 0, runs to its end and writes nothing into docs/."""
    before = _docs_state()
    done = _run([str(SCRIPTS_DIR / "bench.py"), name, "--smoke"])
    assert done.returncode == 0, _explain(done.returncode, done.stdout, done.stderr)
    assert f"[{name}:" in done.stdout  # the harness's closing line: the benchmark ran to its end
    assert _docs_state() == before, "a --smoke run wrote into docs/"
