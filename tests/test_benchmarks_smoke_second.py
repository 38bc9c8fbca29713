"""The second share of the benchmarks at their smoke size, and every other script in scripts/
against the local server on a few generated images (tests/test_benchmarks_smoke.py says why the
smoke runs are spread over modules, and what a smoke run checks); SCRIPTS must name every script
in scripts/."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.localserver.server import LocalServer
from tests import (
    test_benchmarks_smoke,
    test_benchmarks_smoke_cluster,
    test_benchmarks_smoke_third,
)
from tests.conftest import REPO, save_scenes
from tests.test_benchmarks_smoke import (
    KEY,
    SCRIPTS_DIR,
    TIMEOUT_S,
    _docs_state,
    _explain,
    bench_names,
    check_smoke_run,
    smoke_share,
)

pytestmark = pytest.mark.benchmarks


@pytest.mark.parametrize("name", smoke_share(1))
def test_second_share_runs_at_smoke_size(name: str) -> None:
    check_smoke_run(name)


def _parameters(test: Callable[..., None]) -> list[str]:
    """The names a smoke test is parametrized with, as collected."""
    (mark,) = (m for m in test.pytestmark if m.name == "parametrize")  # type: ignore[attr-defined]
    return list(mark.args[1])


def test_the_smoke_modules_run_every_benchmark_once() -> None:
    collected = [
        *_parameters(test_benchmarks_smoke.test_benchmark_runs_at_smoke_size),
        *_parameters(test_second_share_runs_at_smoke_size),
        *_parameters(test_benchmarks_smoke_third.test_third_share_runs_at_smoke_size),
        *_parameters(test_benchmarks_smoke_cluster.test_cluster_benchmark_runs_at_smoke_size),
    ]
    assert sorted(collected) == sorted(bench_names())


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
