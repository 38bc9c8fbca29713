"""The third share of the benchmarks at their smoke size (tests/test_benchmarks_smoke.py says why
the smoke runs are spread over modules, and what a smoke run checks)."""

from __future__ import annotations

import pytest

from tests.test_benchmarks_smoke import check_smoke_run, smoke_share

pytestmark = pytest.mark.benchmarks


@pytest.mark.parametrize("name", smoke_share(2))
def test_third_share_runs_at_smoke_size(name: str) -> None:
    check_smoke_run(name)
