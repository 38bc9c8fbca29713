"""`pipeline compact`: plain readers (DuckDB, Polars, a glob) get exactly the current rows after
it; the resume index is the same before and after; a kill -9 after any step leaves readers
the old or the new set; on a folder and on S3 (the `store` fixture of tests/conftest.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.commands.status import status
from pipeline.output.compact import compact
from pipeline.output.index import load_resume_index
from pipeline.output.parts import current_rows, part_entries
from pipeline.output.recovery import recover
from pipeline.output.sink import ParquetSink
from pipeline.output.stores import LEASE_NAME, Store, open_store
from tests.conftest import REPO, child_env, result_row, write_rows

T0 = datetime(2026, 3, 1, tzinfo=UTC)
IMAGES = 24


def row(n: int, minute: int, *, suffix: str = "s1", text: str = "") -> dict[str, Any]:
    return result_row(
        f"img{n:03d}.png",
        content=f"image {n}",
        settings=suffix,
        root="/photos",
        task="caption",
        file_size=100 + n,
        file_mtime_ns=7,
        text=text or f"first {n}",
        prompt_tokens=10,
        completed_at=T0 + timedelta(minutes=minute),
    )


async def history(store: Store) -> None:
    """Three runs: every image, then a third of them again (a prompt change), then a few again;
    each killed before it set aside the rows it superseded (or written by a release before
    runs did), so a glob sees them all until a compaction."""
    for run_id, rows in (
        ("r1", [row(n, 0) for n in range(IMAGES)]),
        ("r2", [row(n, 1, suffix="s2", text=f"second {n}") for n in range(0, IMAGES, 3)]),
        ("r3", [row(n, 2, suffix="s2", text=f"third {n}") for n in range(0, IMAGES, 6)]),
    ):
        await write_rows(store, run_id, rows, rows_per_part=5, settle=False)


def expected_texts() -> dict[str, str]:
    texts = {f"img{n:03d}.png": f"first {n}" for n in range(IMAGES)}
    texts.update({f"img{n:03d}.png": f"second {n}" for n in range(0, IMAGES, 3)})
    texts.update({f"img{n:03d}.png": f"third {n}" for n in range(0, IMAGES, 6)})
    return texts


def glob_texts(store: Store) -> list[tuple[str, str]]:
    """What a plain reader of OUT/data/*.parquet gets: every row of the parts there."""
    if store.local:
        files = [str(path) for path in Path(store.url).glob("data/*.parquet")]
    else:
        files = store.fs.glob(f"{store.root}/data/*.parquet")
    rows = []
    for path in files:
        with open(path, "rb") if store.local else store.fs.open(path, "rb") as file:
            table = pq.read_table(file, columns=["image_path", "text"])
        paths, texts = table.column("image_path").to_pylist(), table.column("text").to_pylist()
        rows.extend(zip(paths, texts, strict=True))
    return sorted(rows)


def current_texts(store: Store) -> dict[str, str]:
    """What our readers get: the current row's text per image."""
    return dict(zip(*current_rows(store, ["image_path", "text"]).to_pydict().values(), strict=True))


async def test_after_compact_a_glob_reads_exactly_the_current_rows(store: Store) -> None:
    await history(store)
    before = glob_texts(store)
    assert len(before) == IMAGES + 8 + 4  # superseded rows and all: what a glob sees today
    index_before = [
        load_resume_index(store, key_suffix=s, retry_errors=False) for s in ("s1", "s2")
    ]
    report = compact(store)
    assert (report["rows_before"], report["rows_after"]) == (IMAGES + 12, IMAGES)
    assert report["removed_tokens"]["prompt_tokens"] == 12 * 10  # paid: kept in the report
    assert glob_texts(store) == sorted(expected_texts().items())
    assert dict(glob_texts(store)) == current_texts(store)
    # The resume index is the same: superseded answers are set aside, not lost.
    for old, suffix in zip(index_before, ("s1", "s2"), strict=True):
        new = load_resume_index(store, key_suffix=suffix, retry_errors=False)
        assert new.rows_read == old.rows_read == IMAGES + 12
        assert len(new.done) == len(old.done) and len(new.ok_keys) == len(old.ok_keys) == (
            IMAGES if suffix == "s1" else 8
        )
        assert all(
            new.is_done("/photos", f"img{n:03d}.png", 100 + n, 7)
            == old.is_done("/photos", f"img{n:03d}.png", 100 + n, 7)
            for n in range(IMAGES)
        )
    assert status(store)["rows"] == IMAGES and status(store)["rows_committed"] == IMAGES + 12
    assert compact(store)["parts_after"] == 1  # again: nothing to do


async def test_duckdb_and_polars_read_the_compacted_folder_as_it_is(tmp_path: Path) -> None:
    out = tmp_path / "out"
    await history(open_store(out))
    assert (
        duckdb.connect().execute(f"select count(*) from '{out}/data/*.parquet'").fetchone()[0] == 36
    )
    compact(out)
    glob = f"{out}/data/*.parquet"
    count, distinct = (
        duckdb.connect()
        .execute(f"select count(*), count(distinct image_path) from read_parquet('{glob}')")
        .fetchone()
    )
    assert count == distinct == IMAGES
    frame = pl.read_parquet(glob)
    assert dict(zip(frame["image_path"], frame["text"], strict=True)) == expected_texts()
    # What pandas does with each file of the glob (pandas reads Parquet through pyarrow).
    import pyarrow.dataset as ds

    files = sorted(str(path) for path in out.glob("data/*.parquet"))
    assert ds.dataset(files, format="parquet").count_rows() == IMAGES


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from pipeline.output.compact import compact

    def step(name):
        if name == sys.argv[2]:
            os.kill(os.getpid(), signal.SIGKILL)

    if sys.argv[4] == "compact":
        compact(sys.argv[1], lease_seconds=float(sys.argv[3]), step=step)
    else:  # the end of a run: its lock held, only the parts with superseded rows rewritten
        from pipeline.output.compact import supersede
        from pipeline.output.stores import open_store

        store = open_store(sys.argv[1])
        supersede(store, store.lock("run", ttl=float(sys.argv[3])), step=step)
    """
)
STEPS = ("staged", "recorded", "old-deleted", "published", "done")


async def compact_killed(
    where: str, after: str, lease_seconds: float = 1, how: str = "compact"
) -> int:
    """`compact` (or a run's `supersede`) in a child process that kills itself (SIGKILL) after
    step `after`: its exit."""
    killed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", KILLER, where, after, str(lease_seconds), how],
        cwd=REPO,
        env=child_env(),
        check=False,
    )
    return killed.returncode


@pytest.mark.parametrize("killed_after", STEPS)
async def test_compact_killed_after_any_step_leaves_the_old_or_the_new_set(
    tmp_path: Path, killed_after: str
) -> None:
    out = tmp_path / "out"
    store = open_store(out)
    await history(store)
    old = glob_texts(store)
    new = sorted(expected_texts().items())
    assert await compact_killed(str(out), killed_after) == -9
    # Our readers: exactly the current rows at once, whatever step the kill landed after.
    assert current_texts(store) == dict(new)
    seen = glob_texts(store)
    if killed_after in ("staged", "recorded"):
        assert seen == old  # nothing published yet
    elif killed_after == "done":
        assert seen == new
    else:
        assert set(seen) <= set(new)  # mid-switch: current rows only, never an old one
    recover(out)  # what any pipeline command does first
    assert glob_texts(store) == (old if killed_after == "staged" else new)
    assert not [e.name for e in store.list(".compact-")]
    assert len(part_entries(store, history=True)) >= 1
    compact(out)
    assert glob_texts(store) == new


@pytest.mark.parametrize("killed_after", ["staged", "recorded", "old-deleted", "published"])
async def test_a_runs_supersede_killed_after_any_step_is_put_right(
    tmp_path: Path, killed_after: str
) -> None:
    out = tmp_path / "out"
    store = open_store(out)
    await history(store)
    old, new = glob_texts(store), sorted(expected_texts().items())
    assert await compact_killed(str(out), killed_after, how="supersede") == -9
    assert current_texts(store) == dict(new)
    seen = glob_texts(store)
    assert killed_after in ("staged", "recorded") or set(seen) <= set(new)
    recover(out)
    assert glob_texts(store) == (old if killed_after == "staged" else new)
    await write_rows(store, "next", [])  # the next run's end settles whatever is left
    assert glob_texts(store) == new


async def test_compact_killed_on_s3_is_finished_by_the_next_command(bucket: str) -> None:
    store = open_store(f"{bucket}/out")
    await history(store)
    new = sorted(expected_texts().items())
    assert await compact_killed(store.url, "published") == -9
    assert current_texts(store) == dict(new)
    compact(store, lease_seconds=1)  # waits out the killed one's lease, finishes its switch
    assert glob_texts(store) == new
    assert not [e.name for e in store.list(".compact-")]


async def test_a_reader_finishes_a_killed_compaction_on_a_bucket_at_once(bucket: str) -> None:
    """A compaction killed mid-switch, whose lease (60 s) has not expired: a reader on the
    same machine sees its holder's process is gone and finishes the switch at once (it waited
    2 x the lease, 120 s, while a plain glob saw old and new parts together)."""
    store = open_store(f"{bucket}/out")
    await history(store)
    old, new = glob_texts(store), sorted(expected_texts().items())
    assert await compact_killed(store.url, "published", lease_seconds=60) == -9
    seen = glob_texts(store)
    assert len({path for path, _ in seen}) == len(seen)  # never two rows for one image
    assert set(seen) <= set(new) and seen != old
    assert main(["status", store.url]) == 0
    assert glob_texts(store) == new
    assert not [e.name for e in store.list(".compact-")]
    assert store.info(LEASE_NAME) is None  # the reader released what it took over


async def test_a_run_sets_aside_what_it_superseded_rewriting_only_those_parts(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    store = open_store(out)
    await write_rows(store, "r1", [row(n, 0) for n in range(IMAGES)], rows_per_part=6)
    first = [entry.name for entry in part_entries(store)]
    assert len(first) == 4
    # A nightly run answers two images again, both held by r1's first part.
    async with ParquetSink(out, "r2") as sink:
        for n in (1, 4):
            await sink.add(row(n, 1, text=f"second {n}"))
    assert sink.superseded["parts_rewritten"] == 1
    assert (sink.superseded["rows_rewritten"], sink.superseded["rows_set_aside"]) == (4, 2)
    now = [entry.name for entry in part_entries(store)]
    assert set(first[1:]) <= set(now) and first[0] not in now  # three parts untouched
    texts = {f"img{n:03d}.png": f"first {n}" for n in range(IMAGES)}
    texts.update({"img001.png": "second 1", "img004.png": "second 4"})
    assert glob_texts(store) == sorted(texts.items())
    assert pl.scan_parquet(out / "data").collect().height == IMAGES
    aside = pq.read_table(out / ".superseded", columns=["text"]).column("text").to_pylist()
    assert sorted(aside) == ["first 1", "first 4"]  # paid for: kept out of every reader's sight
