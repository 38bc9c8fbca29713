"""Every benchmark and every script in scripts/ runs, at a tiny size, so none can rot unseen.

`scripts/bench.py profile` once crashed on an import from a module that had moved, and nothing
ran it until someone wanted its figures (issue 22). Here each `bench.py` subcommand runs as a
user runs it, with `--smoke` (the size convention at the top of scripts/bench.py), in its own
process; the subcommands come from `bench.py --list`, so one added later is run too. Nothing is
timed or compared: a benchmark passes when it exits 0 having written nothing into docs/ (a smoke
run is never recorded and draws its charts in its own temporary folder). The other scripts run
against the local server on a few generated images; SCRIPTS must name every script in scripts/.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.localserver.server import LocalServer
from tests.conftest import REPO, save_scenes

SCRIPTS_DIR = REPO / "scripts"
DOCS = REPO / "docs"
KEY = "smoke-test-key"
# Deselect with `-m "not benchmarks"` for a quicker local run; CI runs it, so none can rot.
pytestmark = pytest.mark.benchmarks
# Seconds one smoke run may take on a busy 2-core machine before it is called stuck: the Ray
# ones start a cluster (~12 s quiet), the others a few processes of ~1 s each.
TIMEOUT_S = 300


def bench_names() -> list[str]:
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


@pytest.mark.parametrize("name", [n for n in bench_names() if not cluster_benchmark(n)])
def test_benchmark_runs_at_smoke_size(name: str) -> None:
    check_smoke_run(name)


def check_smoke_run(name: str) -> None:
    """`bench.py NAME --smoke` exits 0, runs to its end and writes nothing into docs/."""
    before = _docs_state()
    done = _run([str(SCRIPTS_DIR / "bench.py"), name, "--smoke"])
    assert done.returncode == 0, _explain(done.returncode, done.stdout, done.stderr)
    assert f"[{name}:" in done.stdout  # the harness's closing line: the benchmark ran to its end
    assert _docs_state() == before, "a --smoke run wrote into docs/"


def _ab_client_cpu(url: str, images: Path, work: Path) -> list[str]:
    # both sides this checkout: what is under test is that the script runs, not a difference
    return [
        str(SCRIPTS_DIR / "ab_client_cpu.py"),
        str(REPO),
        str(REPO),
        "--images",
        "4",
        "--pairs",
        "1",
    ]


def _baseline(script: str) -> Callable[[str, Path, Path], list[str]]:
    def argv(url: str, images: Path, work: Path) -> list[str]:
        out = work / f"{script}.parquet"
        return [
            str(SCRIPTS_DIR / script),
            "--base-url",
            url,
            "--input",
            str(images),
            "--output",
            str(out),
        ]

    return argv


def _make_samples(url: str, images: Path, work: Path) -> list[str]:
    return [str(SCRIPTS_DIR / "make_samples.py"), "--out", str(work / "samples")]


# Every script in scripts/ (bench.py aside, run above) and its tiny invocation.
SCRIPTS: dict[str, Callable[[str, Path, Path], list[str]]] = {
    "ab_client_cpu.py": _ab_client_cpu,
    "baseline_sdk.py": _baseline("baseline_sdk.py"),
    "baseline_seed.py": _baseline("baseline_seed.py"),
    "make_samples.py": _make_samples,
}


def test_every_script_has_a_smoke_run() -> None:
    present = {path.name for path in SCRIPTS_DIR.glob("*.py")} - {"bench.py"}
    assert present == set(SCRIPTS), "declare each script's tiny run in SCRIPTS"


@pytest.mark.parametrize("script", sorted(SCRIPTS))
async def test_script_runs_at_smoke_size(script: str, server: LocalServer, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    save_scenes(images, 3, prefix="scene", seed=1)
    before = _docs_state()
    argv = SCRIPTS[script](server.base_url, images, tmp_path)
    # the server answers on this test's event loop: the script runs beside it, not blocking it
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        *argv,
        cwd=tmp_path,
        env={**os.environ, "GEMINI_API_KEY": KEY},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(child.communicate(), TIMEOUT_S)
    assert child.returncode == 0, _explain(child.returncode, out.decode(), err.decode())
    assert _docs_state() == before, f"{script} wrote into docs/"
