"""The read side on real output directories written through ParquetSink."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.commands.status import format_status, status
from pipeline.output.index import DigestSet, load_resume_index, lookup_rows
from pipeline.output.index_cache import file_digest
from pipeline.output.parts import current_rows
from pipeline.records import ROW_SCHEMA, make_key
from tests.conftest import result_row, write_rows

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
ROOT = "/photos"


def sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def row(path: str, minute: int, *, suffix: str = "s1", **changes: Any) -> dict[str, Any]:
    """A row for image `path` committed `minute` minutes after T0 under settings `suffix`."""
    base = {
        "file_size": 100,
        "file_mtime_ns": 5_000,
        "width": 64,
        "height": 48,
        "objects": [],
        "completed_at": T0 + timedelta(minutes=minute),
    }
    return result_row(path, settings=suffix, root=ROOT, **(base | changes))


# ------------------------------------------------------------------------------ supersede
async def test_newest_row_per_image_and_task_is_current(tmp_path: Path) -> None:
    await write_rows(
        tmp_path,
        "r1",
        [
            row("a.jpg", 5, status="error", error="503"),
            row("b.jpg", 1),
            row("a.jpg", 1, task="caption", text="a cat"),
        ],
    )
    # A later part with an older completed_at does not win; the newer one does.
    await write_rows(tmp_path, "r2", [row("a.jpg", 9), row("b.jpg", 0, status="error")])
    table = current_rows(tmp_path, ["image_path", "task", "status", "run_id"])
    assert table.to_pylist() == [
        {"image_path": "a.jpg", "task": "caption", "status": "ok", "run_id": "r1"},
        {"image_path": "a.jpg", "task": "detect", "status": "ok", "run_id": "r2"},
        {"image_path": "b.jpg", "task": "detect", "status": "ok", "run_id": "r1"},
    ]
    assert current_rows(tmp_path).schema == ROW_SCHEMA.remove_metadata()


async def test_same_time_later_part_then_later_row_wins(tmp_path: Path) -> None:
    await write_rows(
        tmp_path, "r1", [row("a.jpg", 0, text="first"), row("a.jpg", 0, text="second")]
    )
    assert current_rows(tmp_path, ["text"]).column("text").to_pylist() == ["second"]
    await write_rows(tmp_path, "r2", [row("a.jpg", 0, text="third")])
    assert current_rows(tmp_path, ["text"]).column("text").to_pylist() == ["third"]


def test_empty_directory_reads_as_empty(tmp_path: Path) -> None:
    assert current_rows(tmp_path, ["key"]).num_rows == 0
    assert len(load_resume_index(tmp_path, key_suffix="s1", retry_errors=False).done) == 0
    assert lookup_rows(tmp_path, ["x.s1"]) == {}
    report = status(tmp_path)
    assert report["rows"] == 0 and report["parts"] == 0 and report["by_status"] == {}
    assert "no rows yet" in format_status(report)


def test_parts_from_elsewhere_are_refused(tmp_path: Path) -> None:
    pq.write_table(pa.table({"a": [1]}), tmp_path / "foreign.parquet")
    with pytest.raises(ValueError, match="no schema version"):
        current_rows(tmp_path)
    newer = ROW_SCHEMA.with_metadata({"gemini_vision_pipeline.schema_version": "99"})
    (tmp_path / "foreign.parquet").unlink()
    pq.write_table(newer.empty_table(), tmp_path / "part-future.parquet")
    with pytest.raises(ValueError, match="newer than this program"):
        current_rows(tmp_path)
    # status reads what it can and names what it cannot, with what to do about it
    (tmp_path / "part-broken.parquet").write_bytes(b"PAR1 garbage PAR1")
    report = status(tmp_path)
    problems = report["unreadable_parts"]
    assert len(problems) == 2 and all("part-" in p for p in problems)
    assert any("newer than this program" in p for p in problems)
    assert any("mv " in p and "part-broken.parquet" in p for p in problems)
    assert "UNREADABLE PART" in format_status(report)


# --------------------------------------------------------------------------------- resume
async def test_resume_index_semantics(tmp_path: Path) -> None:
    await write_rows(
        tmp_path,
        "r1",
        [
            row("ok.jpg", 0),
            row("err.jpg", 0, status="error", error="400 INVALID_ARGUMENT"),
            row("fixed.jpg", 0, status="error", error="503"),
            row("fixed.jpg", 1),
            row("blocked.jpg", 0, status="blocked", error="SAFETY"),
            row("partial.jpg", 0, status="partial", error="MAX_TOKENS"),
            row("other.jpg", 0, suffix="s2"),
            row("moved.jpg", 0),
            row("moved.jpg", 2, suffix="s2"),  # another config ran on it since
        ],
    )
    keep = load_resume_index(tmp_path, key_suffix="s1", retry_errors=False)
    retry = load_resume_index(tmp_path, key_suffix="s1", retry_errors=True)
    assert keep.rows_read == retry.rows_read == 9

    def done(index: Any, path: str, size: int = 100, mtime: int = 5_000) -> bool:
        fp = file_digest(ROOT, path, size, mtime)
        assert (fp in index.done) == index.is_done(ROOT, path, size, mtime)
        return fp in index.done

    assert done(keep, "ok.jpg") and done(retry, "ok.jpg")
    assert done(keep, "err.jpg") and not done(retry, "err.jpg")
    assert done(keep, "fixed.jpg") and done(retry, "fixed.jpg")
    assert done(retry, "blocked.jpg") and done(retry, "partial.jpg")
    assert not done(keep, "ok.jpg", size=101)  # the file changed
    assert not done(keep, "ok.jpg", mtime=5_001)
    assert not done(keep, "new.jpg")
    assert not done(keep, "other.jpg")  # answered under other settings only
    assert not done(keep, "moved.jpg")  # s2 is current: running s1 again restores s1
    assert not keep.is_done("/elsewhere", "ok.jpg", 100, 5_000)  # another root: another file
    s2 = load_resume_index(tmp_path, key_suffix="s2", retry_errors=False)
    assert done(s2, "other.jpg") and done(s2, "moved.jpg") and not done(s2, "ok.jpg")

    # ok_keys: every ok answer under these settings, whatever its path, so it can be copied.
    assert make_key(sha("ok.jpg"), "s1") in keep.ok_keys
    assert make_key(sha("moved.jpg"), "s1") in keep.ok_keys
    assert make_key(sha("fixed.jpg"), "s1") in keep.ok_keys
    assert make_key(sha("err.jpg"), "s1") not in keep.ok_keys
    assert make_key(sha("blocked.jpg"), "s1") not in keep.ok_keys
    assert make_key(sha("ok.jpg"), "s2") not in keep.ok_keys
    assert make_key(sha("other.jpg"), "s1") not in keep.ok_keys
    assert "not-a-key" not in keep.ok_keys and len(keep.ok_keys) == 3


async def test_the_index_cache_gives_the_same_index_and_follows_new_parts(tmp_path: Path) -> None:
    """The facts cached under .index/ answer exactly as the parts do; a new part is added to
    them, a part that vanished (compacted away) makes its cache file unused."""
    await write_rows(tmp_path, "r1", [row(f"{n}.jpg", n) for n in range(30)], rows_per_part=10)
    await write_rows(  # (settle=False: the superseded rows stay where they are, as a kill
        # leaves them: this is about the cache following the parts, whichever they are)
        tmp_path,
        "r2",
        [row("3.jpg", 40, status="error", error="500", retryable=True)],
        settle=False,
    )

    def both(suffix: str = "s1") -> tuple[Any, Any]:
        fresh = load_resume_index(tmp_path, key_suffix=suffix, retry_errors=False)
        cached = load_resume_index(
            tmp_path, key_suffix=suffix, retry_errors=False, write_cache=True
        )
        return fresh, cached

    fresh, cached = both()
    files = len(list((tmp_path / ".index").glob("facts-*.arrow")))
    assert files  # (r1's end stored its parts' facts already: it superseded from them)
    again = load_resume_index(tmp_path, key_suffix="s1", retry_errors=False)  # from the cache
    for index in (cached, again):
        assert index.rows_read == fresh.rows_read == 31
        assert len(index.done) == len(fresh.done) == 29  # 3.jpg is a retryable error now
        assert all(index.is_done(ROOT, f"{n}.jpg", 100, 5_000) == (n != 3) for n in range(30))
        assert len(index.ok_keys) == len(fresh.ok_keys) == 30
    await write_rows(tmp_path, "r3", [row("3.jpg", 50)], settle=False)
    fresh, cached = both()
    assert len(cached.done) == len(fresh.done) == 30
    assert len(list((tmp_path / ".index").glob("facts-*.arrow"))) == files + 1  # r3's part
    (tmp_path / "data" / "part-r1-00000.parquet").unlink()  # as a compaction would
    fresh, cached = both()
    assert cached.rows_read == fresh.rows_read == 22 and len(cached.done) == len(fresh.done) == 21


async def test_retried_error_superseded_for_index_and_status(tmp_path: Path) -> None:
    await write_rows(tmp_path, "r1", [row("a.jpg", 0, status="error", error="500")])
    assert status(tmp_path)["by_status"] == {"error": 1}
    await write_rows(tmp_path, "r2", [row("a.jpg", 1)])
    assert status(tmp_path)["by_status"] == {"ok": 1}
    assert load_resume_index(tmp_path, key_suffix="s1", retry_errors=True).is_done(
        ROOT, "a.jpg", 100, 5_000
    )


def test_digest_set() -> None:
    digests = [hashlib.blake2b(str(n).encode(), digest_size=16).digest() for n in range(1000)]
    shared_head = [b"\x01" * 8 + b"\x02" * 8, b"\x01" * 8 + b"\x03" * 8]  # same first 8 bytes
    found = DigestSet(b"".join(digests + digests[:10] + shared_head))
    assert len(found) == 1002
    assert all(d in found for d in digests + shared_head)
    assert b"\x01" * 8 + b"\x04" * 8 not in found
    assert hashlib.blake2b(b"x", digest_size=16).digest() not in found
    assert "text" not in found and b"short" not in found
    as_array = np.frombuffer(b"".join(digests + shared_head), dtype="V16")  # what the index hands
    assert DigestSet(as_array)._joined() == found._joined()


# --------------------------------------------------------------------------------- lookup
async def test_lookup_rows_gives_the_newest_ok_row_per_key(tmp_path: Path) -> None:
    cat = [{"label": "cat", "box_2d": [0, 0, 500, 500], "bbox": [0.0, 0.0, 32.0, 24.0]}]
    await write_rows(
        tmp_path,
        "r1",
        [
            row("one.jpg", 0, content="same bytes", objects=cat, text="old"),
            row("two.jpg", 3, content="same bytes", objects=cat, text="new"),
            row("three.jpg", 5, content="same bytes", status="error", error="later error"),
            row("bad.jpg", 0, status="error", error="nope"),
        ],
    )
    same, bad = make_key(sha("same bytes"), "s1"), make_key(sha("bad.jpg"), "s1")
    found = lookup_rows(tmp_path, [same, bad, "missing.s1"])
    assert list(found) == [same]
    assert found[same]["text"] == "new" and found[same]["image_path"] == "two.jpg"
    unset = {"mask": None, "point_2d": None, "xy": None, "image": None}  # schema 3 added 3
    assert found[same]["objects"] == [{**cat[0], **unset}]
    assert set(found[same]) == set(ROW_SCHEMA.names)
    assert lookup_rows(tmp_path, []) == {}

    # Later parts are seen by later lookups (the index of where ok rows are grows with them).
    await write_rows(tmp_path, "r2", [row("four.jpg", 9, content="same bytes", text="newest")])
    assert lookup_rows(tmp_path, [same])[same]["text"] == "newest"
    await write_rows(tmp_path, "r3", [row("bad.jpg", 10, text="fixed")], settle=False)
    assert lookup_rows(tmp_path, [bad])[bad]["text"] == "fixed"
    for part in tmp_path.glob("data/part-r[23]-*.parquet"):
        part.unlink()  # parts removed by hand: the index starts again
    assert lookup_rows(tmp_path, [same, bad]) == {same: found[same]}


# --------------------------------------------------------------------------------- status
async def test_status_numbers(tmp_path: Path) -> None:
    billed = {"prompt_tokens": 1000, "output_tokens": 50, "thoughts_tokens": 5}
    billed |= {"total_tokens": 1055, "est_image_tokens": 900, "est_prompt_tokens": 950}
    await write_rows(
        tmp_path,
        "r1",
        [
            row("a.jpg", 0, status="error", error="503", **billed),
            row("b.jpg", 0, **billed),
            row("c.jpg", 0, status="blocked", **billed),
        ],
        rows_per_part=2,
    )
    copied = {"est_image_tokens": 900, "est_prompt_tokens": 950, "attempts": 0}
    rows = [row("a.jpg", 1, **billed), row("d.jpg", 1, **copied)]
    await write_rows(tmp_path, "r2", rows, settle=False)  # a.jpg's error row still in a part
    runs = tmp_path / ".runs"
    runs.mkdir()
    (runs / "r1.json").write_text(json.dumps({"run_id": "r1", "seen": 3}))
    (runs / "r2.json").write_text(
        json.dumps({"run_id": "r2", "seen": 9, "stop_reason": "daily quota", "resume_hint": "x"})
    )
    report = status(tmp_path)
    assert report["parts"] == 3 and report["runs"] == 2
    assert report["rows"] == 4 and report["rows_committed"] == 5 and report["superseded"] == 1
    assert report["by_status"] == {"blocked": 1, "ok": 3}
    assert report["tokens"] == {
        "prompt": 4000,  # the superseded error row was paid for too; the copy was not
        "cached": 0,  # none of the prompt came from an implicit cache
        "output": 200,
        "thoughts": 20,
        "total": 4220,
        "estimated_prompt": 3800,
        "estimate_error": -0.05,
    }
    assert report["latest_run"]["run_id"] == "r2"
    text = format_status(report)
    assert "rows: 4 current (5 committed in 3 parts by 2 runs; 1 superseded)" in text
    assert "status: blocked 1 · ok 3" in text
    assert "estimated 3,800 vs billed 4,000 (-5.0%)" in text
    assert "latest run r2" in text and "stopped: daily quota" in text


def test_growing_digest_set_merges_batches_and_keeps_every_entry() -> None:
    import hashlib

    from pipeline.output.index import GrowingDigestSet

    digests = [hashlib.blake2b(str(i).encode(), digest_size=16).digest() for i in range(1000)]
    grown = GrowingDigestSet(batch=64)
    for digest in digests[:700]:
        grown.add(digest)
    grown.add(digests[0])  # again: still one entry
    assert len(grown) == 700
    assert all(d in grown for d in digests[:700])
    assert not any(d in grown for d in digests[700:])
    assert b"short" not in grown


def test_a_merge_inserts_the_new_digests_where_a_whole_sort_puts_them() -> None:
    """`merged` inserts the sorted batch into the held arrays: the same set, entry for entry,
    as sorting everything again; a digest held already, or one sharing its first 64 bits with
    one held, is kept once (the whole sort)."""
    import hashlib

    digests = [hashlib.blake2b(str(i).encode(), digest_size=16).digest() for i in range(3000)]
    held = DigestSet(b"".join(digests[:2000]))
    twin = digests[5][:8] + bytes(8)  # the first half of one held, another second half
    for more in (digests[2000:], [*digests[1990:2100], twin], [digests[0]]):
        merged = held.merged(more)
        assert merged._joined() == DigestSet(held._joined() + b"".join(more))._joined()
        assert all(d in merged for d in more) and len(merged) == len(set(digests[:2000] + more))
