"""The Ray engine's benchmarks at their smoke size (tests/test_benchmarks_smoke.py says why
they are a module of their own, and what a smoke run checks)."""

from __future__ import annotations

import pytest

from tests.test_benchmarks_smoke import bench_names, check_smoke_run, cluster_benchmark

pytestmark = pytest.mark.benchmarks


@pytest.mark.parametrize("name", [n for n in bench_names() if cluster_benchmark(n)])
def test_cluster_benchmark_runs_at_smoke_size(name: str) -> None:
    check_smoke_run(name)


def test_the_cluster_benchmarks_are_found() -> None:
    assert {"ray-quota", "ray-overhead"} <= {n for n in bench_names() if cluster_benchmark(n)}
