"""The Ray engine on a local Ray cluster, one for every test here (a start costs seconds).

The cluster listens on the loopback only (the switch below is read when Ray is imported) and
gets more logical CPUs than the machine has, so four one-CPU workers fit on a 2-core CI box.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import ray  # noqa: E402

from pipeline import exits  # noqa: E402
from pipeline.engines.quota import NAMESPACE  # noqa: E402
from pipeline.localserver import LocalServer, ServerOptions  # noqa: E402
from pipeline.runner import RunOptions, run_async  # noqa: E402
from tests.conftest import draw_shapes, make_config, read_rows  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
OPTS = RunOptions(progress=False, seed=0)
# What may differ between two runs of the same images: when, by which run, how fast.
RUN_COLUMNS = {"run_id", "completed_at", "latency_ms"}
ANSWER = ("key", "image_sha256", "status", "objects", "raw_response", "width", "height")


@pytest.fixture(scope="module")
def cluster() -> Any:
    """A local Ray cluster for this module; this process is its driver (so in-process runs use
    it), and subprocess drivers join it with --address."""
    ray.init(
        num_cpus=8,
        include_dashboard=False,
        namespace=NAMESPACE,
        logging_level="WARNING",
        log_to_driver=False,
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


async def run(config: Any, **options: Any) -> Any:
    return await run_async(config, RunOptions(**{**OPTS.__dict__, **options}))


def _ray(config: Any, **engine: Any) -> Any:
    from dataclasses import replace

    return replace(config, engine=replace(config.engine, kind="ray", **engine))


def _by_path(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One row per image (a second is a duplicate), without what differs between runs (the
    service's responseId is a fresh random id per answer)."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        assert row["image_path"] not in out, f"two rows for {row['image_path']}"
        if row["raw_response"]:
            answer = json.loads(row["raw_response"])
            answer.pop("responseId", None)
            row["raw_response"] = answer
        out[row["image_path"]] = {k: v for k, v in row.items() if k not in RUN_COLUMNS}
    return out


async def test_four_workers_give_the_rows_of_one_process(
    cluster: Any, images_dir: Path, tmp_path: Path
) -> None:
    for i in range(40):
        draw_shapes(160, 160, seed=900 + i, count=2)[0].save(images_dir / f"s{i:02d}.png")
    twin = (images_dir / "s00.png").read_bytes()
    (images_dir / "twin-a.png").write_bytes(twin)  # same bytes: one call, two rows
    (images_dir / "twin-b.png").write_bytes(twin)
    (images_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    single_config = make_config(tmp_path, output={"dir": str(tmp_path / "single")})
    single = await run(single_config)
    ray_config = _ray(make_config(tmp_path, output={"dir": str(tmp_path / "ray")}), workers=4)
    spread = await run(ray_config)

    assert (spread.exit_code, single.exit_code) == (exits.ROWS_NOT_OK, exits.ROWS_NOT_OK)
    for name in ("seen", "skipped", "rows", "api_calls", "copied", "tokens", "retries"):
        assert getattr(spread, name) == getattr(single, name), name
    one, many = _by_path(read_rows(tmp_path / "single")), _by_path(read_rows(tmp_path / "ray"))
    assert sorted(one) == sorted(many)
    twins = {"s00.png", "twin-a.png", "twin-b.png"}  # which twin paid is a race in both
    for path in sorted(set(one) - twins):
        assert many[path] == one[path], path
    assert sum(many[p]["attempts"] for p in twins) == sum(one[p]["attempts"] for p in twins) == 1
    for path in twins:  # the same answer (and key) at every path of the same bytes
        assert {k: many[path][k] for k in ANSWER} == {k: one["s00.png"][k] for k in ANSWER}
    # the parts are the workers': one writer's name each, the run's id in every row
    names = {p.name.rsplit("-", 1)[0] for p in (tmp_path / "ray").glob("part-*.parquet")}
    assert names <= {f"part-{spread.run_id}.w{i}" for i in range(4)}
    assert {r["run_id"] for r in read_rows(tmp_path / "ray")} == {spread.run_id}
    again = await run(ray_config)  # resume: everything is done
    assert (again.api_calls, again.skipped, again.exit_code) == (0, 43, exits.OK)
