"""`pipeline status` folds every committed row part by part (commands/status.py `Tally`): its
report is the one the whole-table reading gave (kept here as the reference: every committed row's
columns in one table, `parts.latest_rows`, `cost.table_cost`), on a mix of what outputs hold —
times tied across parts and rows, rows without a time, superseded rows set aside and left in
place, a compaction, copied rows without billed tokens, Batch Mode rows, unpriced models, an
unreadable part."""

from __future__ import annotations

import json
import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.commands.status import format_status, status
from pipeline.cost import table_cost
from pipeline.output.compact import compact
from pipeline.output.index import load_resume_index
from pipeline.output.parts import GROUP, latest_rows, scan
from pipeline.output.stores import Store
from pipeline.records import ROW_SCHEMA, USAGE_COLUMNS
from tests.conftest import result_row, write_rows

T0 = datetime(2026, 3, 1, tzinfo=UTC)
TIMES = [T0, T0, T0 + timedelta(minutes=1)]  # ties across parts and rows
RAW = "20260301T000005Z-raw"
MODELS = ["gemini-2.5-flash", "gemini-2.5-pro", "no-such-model"]


def reference(store: Store) -> dict[str, Any]:
    """The fields `status` computes from the rows, as it computed them from one table."""
    columns: tuple[str, ...] = (*GROUP, "completed_at", "status", "run_id", *USAGE_COLUMNS)
    columns += ("est_prompt_tokens", "model", "input_mode")
    table, _, _ = scan(store, columns, skip_unreadable=True, history=True)
    current = table.take(pa.array(latest_rows(table)))
    counts = pc.value_counts(current.column("status").combine_chunks()) if len(current) else []
    by_status = Counter({str(c["values"].as_py()): c["counts"].as_py() for c in counts})
    billed = {name: _sum(table.column(name)) for name in USAGE_COLUMNS}
    has_bill = pc.is_valid(table.column("prompt_tokens"))
    estimate = _sum(pc.filter(table.column("est_prompt_tokens"), has_bill))
    prompt = billed["prompt_tokens"]
    return {
        "rows": current.num_rows,
        "rows_committed": table.num_rows,
        "superseded": table.num_rows - current.num_rows,
        "runs": len(pc.unique(table.column("run_id").drop_null())),
        "by_status": dict(sorted(by_status.items())),
        "tokens": {
            "prompt": prompt,
            "cached": billed["cached_tokens"],
            "output": billed["output_tokens"],
            "thoughts": billed["thoughts_tokens"],
            "total": billed["total_tokens"],
            "estimated_prompt": estimate,
            "estimate_error": (estimate - prompt) / prompt if prompt else None,
        },
        "cost": table_cost(table),
    }


def _sum(column: pa.ChunkedArray) -> int:
    return int((pc.sum(column).as_py() if len(column) else None) or 0)


def mixed_row(rng: random.Random, times: list[datetime | None] = TIMES) -> dict[str, Any]:
    """A row of one of 24 groups (3 paths x 2 roots x 2 tasks, plus a path of 'None' text);
    a quarter copied (no billed tokens), a third bought in Batch Mode."""
    path = rng.choice(["a.png", "b.png", "c.png", "None"])
    row = result_row(
        path,
        root=rng.choice(["/r1", "/r2"]),
        task=rng.choice(["detect", "caption"]),
        status=rng.choice(["ok", "ok", "ok", "error", "blocked"]),
        completed_at=rng.choice(times),  # a run's sink stamps a null one now
        model=rng.choice(MODELS),
        input_mode=rng.choice(["batch", "interactive", None]),
    )
    if rng.random() < 0.75:
        prompt = rng.randrange(100, 300_000)  # the Pro model's long tier too
        output, thoughts = rng.randrange(1, 500), rng.choice([None, 40])
        row.update(prompt_tokens=prompt, output_tokens=output, thoughts_tokens=thoughts)
        row.update(total_tokens=prompt + output + (thoughts or 0))
        row.update(cached_tokens=rng.choice([None, 0, prompt // 2]))
        row.update(est_prompt_tokens=rng.choice([None, prompt + rng.randrange(-50, 50)]))
    return row


def assert_same(store: Store) -> dict[str, Any]:
    report = status(store)
    expected = {**report, **reference(store)}
    assert report == expected
    assert format_status(report) == format_status(expected)
    assert json.dumps(report, default=str) == json.dumps(expected, default=str)
    return report


async def test_status_folded_part_by_part_equals_the_whole_table_reading(store: Store) -> None:
    rng = random.Random(31)
    for run in range(4):  # settled and not: superseded rows set aside, and left in the parts
        if run == 2:  # the resume index's cache covers the parts so far, not the later ones
            load_resume_index(store, key_suffix="s1", retry_errors=False, write_cache=True)
        rows = [mixed_row(rng) for _ in range(rng.randrange(30, 60))]
        run_id = f"20260301T00000{run}Z-r{run}"
        await write_rows(store, run_id, rows, rows_per_part=7, settle=run % 2 == 1)
    # a part written by hand, its times left null too
    raw = pa.Table.from_pylist([mixed_row(rng, [None, *TIMES]) for _ in range(60)], ROW_SCHEMA)
    store.create(f"data/part-{RAW}-00000.parquet", lambda f: pq.write_table(raw, f))
    before = assert_same(store)
    assert before["superseded"] > 0 and before["cost"]["batch_usd"] > 0
    assert before["cost"]["unpriced_rows"] > 0
    assert set(before["by_status"]) == {"ok", "error", "blocked"}
    compact(store)
    assert assert_same(store)["rows"] == before["rows"]
    load_resume_index(store, key_suffix="s1", retry_errors=False, write_cache=True)
    await write_rows(store, "20260301T000009Z-r9", [mixed_row(rng) for _ in range(20)])
    store.create("data/part-20260301T000010Z-bad-00000.parquet", lambda f: f.write(b"PAR1junk"))
    assert len(assert_same(store)["unreadable_parts"]) == 1


async def test_ties_in_time_go_to_the_later_part_then_the_later_row(store: Store) -> None:
    first = [result_row("a.png", status="error", completed_at=T0)]
    second = [result_row("a.png", status=s, completed_at=T0) for s in ("error", "ok")]
    await write_rows(store, "20260301T000000Z-r1", first, settle=False)
    await write_rows(store, "20260301T000001Z-r2", second, rows_per_part=5, settle=False)
    assert assert_same(store)["by_status"] == {"ok": 1}


def test_an_output_without_parts(tmp_path: Path) -> None:
    report = status(tmp_path / "out")
    assert (report["rows"], report["rows_committed"], report["by_status"]) == (0, 0, {})
    assert report["cost"] == {
        "usd": 0.0,
        "interactive_usd": 0.0,
        "batch_usd": 0.0,
        "unpriced_rows": 0,
    }
