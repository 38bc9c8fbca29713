"""Every reader, every way, sees exactly the current rows (issue 20): DuckDB, Polars
(`read_parquet` and `scan_parquet`, on the folder and on the glob), pandas, pyarrow (`dataset`
and `read_table`) and HF `datasets` (its Parquet loader on the glob, and the folder) read
`OUT/data` after a first run, after a nightly run that answered changed files again, after a
reparse and after a compaction; an output of the old layout (parts at the top level) is read
as it is and moved into `data/` by the next writer, on a folder and on S3."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.commands.reparse import reparse
from pipeline.commands.status import status
from pipeline.output.compact import compact
from pipeline.output.parts import current_rows, part_entries
from pipeline.output.state import LEGACY_STATE_FILE, STATE_FILE, State
from pipeline.output.stores import Store
from tests.conftest import draw_shapes, make_config, result_row, run, save_scenes, write_rows

# datasets reads these when imported: a local folder needs no hub, and a test must not ask one
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
import datasets


def every_reader(data: Path, cache: Path) -> dict[str, list[str]]:
    """The image paths each reader gets from the folder `data` (and its `*.parquet` glob), and
    from the output's own folder where the reader skips dot-names (all but Polars)."""
    glob, out = str(data / "*.parquet"), data.parent

    def hf(*args: str, **kwargs: str) -> list[str]:
        loaded = datasets.load_dataset(*args, cache_dir=str(cache), **kwargs)["train"]
        return list(loaded["image_path"])

    return {
        "duckdb glob": [r[0] for r in duckdb.sql(f"select image_path from '{glob}'").fetchall()],
        "polars read folder": pl.read_parquet(data)["image_path"].to_list(),
        "polars scan folder": pl.scan_parquet(data).collect()["image_path"].to_list(),
        "polars read glob": pl.read_parquet(glob)["image_path"].to_list(),
        "polars scan glob": pl.scan_parquet(glob).collect()["image_path"].to_list(),
        "pandas folder": pd.read_parquet(data)["image_path"].to_list(),
        "pyarrow dataset": ds.dataset(data).to_table().column("image_path").to_pylist(),
        "pyarrow read_table": pq.read_table(data).column("image_path").to_pylist(),
        "datasets glob": hf("parquet", data_files=glob),
        "datasets folder": hf(str(data)),
        "pandas output": pd.read_parquet(out)["image_path"].to_list(),
        "pyarrow dataset output": ds.dataset(out).to_table().column("image_path").to_pylist(),
        "pyarrow read_table output": pq.read_table(out).column("image_path").to_pylist(),
        "datasets output": hf(str(out)),
    }


def assert_readers_see_current_rows(out: Path, cache: Path) -> int:
    current = sorted(current_rows(out, ["image_path"]).column("image_path").to_pylist())
    assert len(set(current)) == len(current)  # one row per image (one task here)
    names = os.listdir(out / "data")
    assert names and all(n.startswith("part-") and n.endswith(".parquet") for n in names)
    for reader, paths in every_reader(out / "data", cache).items():
        assert sorted(paths) == current, reader
    return len(current)


async def test_every_reader_sees_the_current_rows_after_each_step(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    save_scenes(images, 6, prefix="cam", seed=40)
    config = make_config(tmp_path)
    out = tmp_path / "out"
    cache = tmp_path / "hf-cache"

    assert (await run(config)).api_calls == 6
    assert assert_readers_see_current_rows(out, cache / "1") == 6

    # The nightly run: two photos replaced upstream, one new.
    for name, seed in (("cam001.png", 90), ("cam004.png", 91), ("cam100.png", 92)):
        draw_shapes(96, 80, seed=seed, count=2)[0].save(images / name)
    assert (await run(config)).api_calls == 3
    assert assert_readers_see_current_rows(out, cache / "2") == 7
    aside = pq.read_table(out / ".superseded", columns=["image_path"]).column("image_path")
    assert sorted(aside.to_pylist()) == ["cam001.png", "cam004.png"]  # paid: kept, unseen

    await asyncio.to_thread(reparse, str(out))  # a full copy of every row, the old ones set aside
    assert assert_readers_see_current_rows(out, cache / "3") == 7
    compact(out)
    assert assert_readers_see_current_rows(out, cache / "4") == 7
    assert (await run(config)).api_calls == 0  # a night with nothing new


def legacy_row(n: int) -> dict:
    return result_row(f"{n}.jpg", root="/photos", text=f"row {n}", task="caption")


@pytest.mark.parametrize("killed_between_copy_and_delete", [False, True])
async def test_an_old_layout_is_read_then_moved_into_data(
    store: Store, killed_between_copy_and_delete: bool
) -> None:
    await write_rows(store, "r1", [legacy_row(n) for n in range(12)], rows_per_part=5)
    parts = [entry.name for entry in part_entries(store)]
    assert [name.split("/")[0] for name in parts] == ["data"] * 3
    for name in parts:  # as a release before data/ wrote them: at the top level
        _copy(store, name, name.removeprefix("data/"))
        if not killed_between_copy_and_delete:
            store.delete([name])
    store.replace("runs/r1.json", b'{"run_id": "r1", "seen": 12}')  # and its run summaries
    assert len(current_rows(store)) == 12  # read as they are (and never twice)
    assert len(part_entries(store)) == 3
    assert status(store)["latest_run"]["run_id"] == "r1"

    await write_rows(store, "r2", [legacy_row(3)])  # the next writer moves them
    names = [entry.name for entry in store.list() if entry.name.endswith(".parquet")]
    assert names and all(name.startswith(("data/", ".superseded/")) for name in names)
    assert [e.name for e in store.list() if "runs/" in e.name] == [".runs/r1.json"]
    rows = current_rows(store, ["image_path", "text"]).to_pylist()
    assert len(rows) == 12 and {"image_path": "3.jpg", "text": "row 3"} in rows


def test_an_old_state_file_is_adopted_whole(store: Store) -> None:
    """`state.sqlite` (the Batch Mode jobs in flight, uploads, the day's count) becomes the
    hidden `.state.sqlite` when the output's state is next opened, its rows all there."""
    old = State(store)
    old.execute("INSERT INTO daily (day, requests) VALUES ('2026-12-05', 41)")
    old.close()
    _copy(store, STATE_FILE, LEGACY_STATE_FILE)  # where a release before issue 20 kept it
    store.delete([STATE_FILE])
    state = State(store)
    try:
        assert state.execute("SELECT requests FROM daily") == [(41,)]
    finally:
        state.close()
    names = [entry.name for entry in store.list()]
    assert STATE_FILE in names and LEGACY_STATE_FILE not in names


def _copy(store: Store, source: str, target: str) -> None:
    store.create(target, lambda file: file.write(store.read(source)))
