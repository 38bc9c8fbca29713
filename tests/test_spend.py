"""The spending caps, end to end: runs against the local server, real files, real Parquet."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from pipeline import exits
from pipeline.config import ConfigError
from pipeline.cost import table_cost
from pipeline.engines import RunOptions, check_run
from pipeline.output.parts import RUNS_DIR, current_rows
from pipeline.output.state import State
from pipeline.run.spend import Spend
from tests.conftest import make_config, read_rows, run, save_scenes
from tests.test_batch_run import batch_config, jobs_in, tiny_images
from tests.test_cli import pipeline, write_config

IMAGES = 10


def _config(tmp_path: Path, out: str, **limits: Any) -> Any:
    return make_config(
        tmp_path,
        task={"kind": "caption"},
        limits={"concurrency": 2, **limits},
        output={"dir": str(tmp_path / out), "flush_seconds": 1},
    )


def _bill(output: Path) -> tuple[float, float]:
    """(USD billed by every row ever written, the dearest row's USD)."""
    rows = read_rows(output)
    each = [table_cost(pa.Table.from_pylist([row]))["usd"] for row in rows]
    return table_cost(pa.Table.from_pylist(rows))["usd"], max(each)


async def _reference(tmp_path: Path) -> tuple[float, float]:
    """An uncapped run over the same images: (its bill, its dearest request)."""
    summary = await run(_config(tmp_path, "reference"))
    assert summary.exit_code == exits.OK, summary
    return _bill(tmp_path / "reference")


async def test_max_usd_stops_before_the_cap_and_a_rerun_with_a_higher_cap_finishes(
    images_dir: Path, tmp_path: Path
) -> None:
    save_scenes(images_dir, IMAGES, prefix="scene", seed=7)
    total, dearest = await _reference(tmp_path)
    cap = total * 0.4

    stopped = await run(_config(tmp_path, "out", max_usd=cap))

    assert stopped.exit_code == exits.STOPPED
    assert "would pass [limits] max_usd" in (stopped.stop_reason or "")
    assert stopped.resume_hint == "rerun (with a higher cap) to go on"
    billed, _ = _bill(tmp_path / "out")
    assert 0 < billed <= cap + dearest
    done = len(read_rows(tmp_path / "out"))
    assert 0 < done < IMAGES  # what was not done has no row
    assert stopped.spend is not None and stopped.spend["max_usd"] == cap
    assert stopped.spend["spent_usd"] == pytest.approx(billed, abs=1e-6)
    assert (stopped.spend_line() or "").startswith("spend: this run $")

    finished = await run(_config(tmp_path, "out", max_usd=total * 2))

    assert finished.exit_code == exits.OK, finished
    assert finished.skipped == done
    paths = Counter(row["image_path"] for row in read_rows(tmp_path / "out"))
    assert len(paths) == IMAGES and set(paths.values()) == {1}  # no image bought twice
    assert current_rows(tmp_path / "out").num_rows == IMAGES


async def test_max_usd_per_day_counts_the_runs_of_the_same_day(
    images_dir: Path, tmp_path: Path
) -> None:
    save_scenes(images_dir, IMAGES, prefix="scene", seed=11)
    total, dearest = await _reference(tmp_path)
    config = _config(tmp_path, "out", max_usd_per_day=total * 0.75)

    earlier = await run(config, limit=IMAGES // 2)
    assert earlier.exit_code == exits.OK, earlier
    spent_before, _ = _bill(tmp_path / "out")

    later = await run(config)

    assert later.exit_code == exits.STOPPED
    assert "today's spend in this output" in (later.stop_reason or "")
    assert later.spend is not None
    assert later.spend["spent_today_usd"] > later.spend["spent_usd"] > 0  # type: ignore[operator]
    billed, _ = _bill(tmp_path / "out")
    assert spent_before < billed <= total * 0.75 + dearest
    assert len(read_rows(tmp_path / "out")) < IMAGES
    report = json.loads((tmp_path / "out" / RUNS_DIR / f"{later.run_id}.json").read_text())
    assert report["spend"]["max_usd_per_day"] == total * 0.75


def test_in_flight_estimates_count_against_the_cap(tmp_path: Path) -> None:
    """Two requests in flight at their estimate leave no room for a third; the billed cost
    replaces the estimate when the answer comes."""
    config = make_config(tmp_path, task={"kind": "caption"}, limits={"max_usd": 1.0})
    spend = Spend(config)
    assert spend.reserve(0.4) is None and spend.reserve(0.4) is None
    refused = spend.reserve(0.4)
    assert refused is not None and refused.exit_code == exits.STOPPED
    assert "$1.2000 would pass [limits] max_usd = $1" in refused.reason
    spend.settle(0.4, 0.1)
    assert spend.reserve(0.4) is None
    assert spend.run_usd == 0.1 and round(spend.in_flight, 6) == 0.8


def test_the_day_spend_is_kept_in_the_state(tmp_path: Path) -> None:
    state = State(tmp_path / "out")
    state.add_spend("2026-12-06", 0.25)
    state.add_spend("2026-12-06", 0.5)
    assert state.spent_on("2026-12-06") == 0.75 and state.spent_on("2026-12-07") == 0.0
    state.close()


async def test_batch_mode_creates_no_job_past_the_cap(tmp_path: Path) -> None:
    """A job estimated past max_usd (at the batch price) is never created; its files are asked
    by the next run."""
    names = tiny_images(tmp_path / "images", 6)
    capped = batch_config(
        tmp_path, task={"kind": "caption"}, batch={"requests_per_job": 3}, limits={"max_usd": 1e-7}
    )

    stopped = await run(capped)

    assert stopped.exit_code == exits.STOPPED
    assert "would pass [limits] max_usd = $0.0000001" in (stopped.stop_reason or "")
    assert stopped.batch is not None and stopped.batch["jobs_created"] == 0
    assert jobs_in(tmp_path / "out") == [] and read_rows(tmp_path / "out") == []

    done = await run(batch_config(tmp_path, task={"kind": "caption"}, limits={"max_usd": 1.0}))

    assert (done.exit_code, dict(done.rows)) == (exits.OK, {"ok": len(names)})
    assert done.spend is not None and 0 < done.spend["spent_usd"] <= 1.0  # type: ignore[operator]


def test_the_ray_engine_refuses_a_cap_rather_than_ignore_it(
    images_dir: Path, tmp_path: Path
) -> None:
    config = make_config(tmp_path, engine={"kind": "ray"}, limits={"max_usd": 1.0})
    with pytest.raises(ConfigError, match="not kept by the ray engine"):
        check_run(config, RunOptions())


def test_the_command_takes_max_usd_and_says_spend_against_the_cap(
    images_dir: Path, tmp_path: Path
) -> None:
    save_scenes(images_dir, 4, prefix="scene", seed=3)
    config = write_config(tmp_path / "run.toml", images_dir, tmp_path / "out")

    stopped = pipeline("run", str(config), "--quiet", "--max-usd", "0.0000001", check=False)

    assert stopped.returncode == exits.STOPPED, stopped.stderr
    said = stopped.stdout + stopped.stderr
    assert "stopped: the run's spend $" in said
    assert "would pass [limits] max_usd = $0.0000001. rerun (with a higher cap) to go on" in said
    assert "spend: this run $0.0000 of max_usd $0.0000001" in said
    assert read_rows(tmp_path / "out") == []

    done = pipeline("run", str(config), "--quiet", "--max-usd", "1")

    assert done.returncode == exits.OK, done.stderr
    assert "of max_usd $1" in done.stdout + done.stderr
    assert len(read_rows(tmp_path / "out")) == 4
