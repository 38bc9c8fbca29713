"""The Ray engine on a local cluster gives the rows of one process: the same answers, keys and
figures, spread over workers (the cluster: tests/conftest.py's `cluster`, one per pytest process;
the fleet's kills and signals are in tests/test_ray_kills.py, its limits in
tests/test_ray_limits.py, its output on buckets in tests/test_ray_output.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline import exits
from tests.conftest import draw_shapes, make_config, read_rows, run
from tests.ray_support import (
    ANSWER,
    by_path,
    on_ray,
)


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
    ray_config = on_ray(make_config(tmp_path, output={"dir": str(tmp_path / "ray")}), workers=4)
    spread = await run(ray_config)

    assert (spread.exit_code, single.exit_code) == (exits.ROWS_NOT_OK, exits.ROWS_NOT_OK)
    for name in ("seen", "skipped", "rows", "api_calls", "copied", "tokens", "retries"):
        assert getattr(spread, name) == getattr(single, name), name
    one, many = by_path(read_rows(tmp_path / "single")), by_path(read_rows(tmp_path / "ray"))
    assert sorted(one) == sorted(many)
    twins = {"s00.png", "twin-a.png", "twin-b.png"}  # which twin paid is a race in both
    for path in sorted(set(one) - twins):
        assert many[path] == one[path], path
    assert sum(many[p]["attempts"] for p in twins) == sum(one[p]["attempts"] for p in twins) == 1
    for path in twins:  # the same answer (and key) at every path of the same bytes
        assert {k: many[path][k] for k in ANSWER} == {k: one["s00.png"][k] for k in ANSWER}
    # the parts are the workers': one writer's name each, the run's id in every row
    names = {p.name.rsplit("-", 1)[0] for p in (tmp_path / "ray").glob("data/part-*.parquet")}
    assert names <= {f"part-{spread.run_id}.w{i}" for i in range(4)}
    assert {r["run_id"] for r in read_rows(tmp_path / "ray")} == {spread.run_id}
    again = await run(ray_config)  # resume: everything is done
    assert (again.api_calls, again.skipped, again.exit_code) == (0, 43, exits.OK)


async def test_groups_spread_over_workers_give_the_rows_of_one_process(
    cluster: Any, images_dir: Path, tmp_path: Path
) -> None:
    """A group is one unit of work for a worker as for the single engine: one request, one row
    with its members, the same answer."""
    for g in range(6):
        folder = images_dir / f"view{g}"
        folder.mkdir()
        for i in range(2 + g % 2):
            draw_shapes(96, 96, seed=40 * g + i, count=1)[0].save(folder / f"{i}.png")
    grouped = {"group_by": "folder"}
    single = await run(make_config(tmp_path, input=grouped, output={"dir": str(tmp_path / "one")}))
    config = make_config(tmp_path, input=grouped, output={"dir": str(tmp_path / "many")})
    spread = await run(on_ray(config, workers=2))
    assert (spread.api_calls, spread.rows) == (single.api_calls, single.rows) == (6, {"ok": 6})
    one, many = by_path(read_rows(tmp_path / "one")), by_path(read_rows(tmp_path / "many"))
    assert sorted(many) == [f"view{g}" for g in range(6)]
    for name in one:
        assert many[name] == one[name], name
    again = await run(on_ray(config, workers=2))
    assert (again.api_calls, again.skipped) == (0, 6)


async def test_the_ray_summary_bills_what_status_bills(
    cluster: Any, images_dir: Path, tmp_path: Path
) -> None:
    """Issue 19, item 9: the Ray run's summary billed $0 while `status` billed its rows."""
    from pipeline.commands.status import status

    for i in range(8):
        draw_shapes(96, 96, seed=1900 + i, count=1)[0].save(images_dir / f"c{i}.png")
    summary = await run(on_ray(make_config(tmp_path), workers=2))
    assert summary.exit_code == exits.OK
    bill = status(tmp_path / "out")["cost"]["usd"]
    written = json.loads((tmp_path / "out" / ".runs" / f"{summary.run_id}.json").read_text())
    assert bill > 0
    assert summary.cost_usd == pytest.approx(bill, abs=1e-6)
    assert written["cost_usd"] == pytest.approx(bill, abs=1e-6)
    assert written["abandoned"] == 0
