"""What answers cost (pipeline/cost.py): Batch Mode rows at the batch price, in `status` and in a
run's summary; rows without billed tokens free; models without a price counted, not guessed;
cached prompt tokens at the cached rate; each request at its own prompt-size tier; each row at
the price of its day (across 2026-12-31 -> 2027-01-01); parts from before `cached_tokens`."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.commands.status import format_status, status
from pipeline.cost import row_cost, table_cost
from pipeline.models import lookup
from pipeline.output.compact import compact
from pipeline.output.parts import current_rows
from pipeline.records import ROW_SCHEMA
from tests.conftest import read_rows, result_row, write_rows

MILLION = 1_000_000


def rows(*specs: tuple[str | None, str | None, int | None, datetime | None]) -> pa.Table:
    """(model, input_mode, prompt = output tokens, completed_at) rows of ROW_SCHEMA's types."""
    columns = ("model", "input_mode", "prompt_tokens", "output_tokens", "thoughts_tokens")
    schema = pa.schema([ROW_SCHEMA.field(name) for name in (*columns, "completed_at")])
    data = [
        {
            "model": model,
            "input_mode": mode,
            "prompt_tokens": tokens,
            "output_tokens": tokens,
            "thoughts_tokens": None,
            "completed_at": when,
        }
        for model, mode, tokens, when in specs
    ]
    return pa.Table.from_pylist(data, schema=schema)


def test_batch_rows_cost_the_batch_price_and_the_others_the_interactive_one():
    now = datetime.now(UTC)
    price = lookup("gemini-2.5-flash").price(now.date())
    bill = table_cost(
        rows(
            ("gemini-2.5-flash", "inline", MILLION, now),
            ("gemini-2.5-flash", "batch", MILLION, now),
            ("gemini-2.5-flash", "none", None, now),  # copied: no tokens, no cost
        )
    )
    assert bill["interactive_usd"] == pytest.approx(price.input + price.output)
    assert bill["batch_usd"] == pytest.approx(price.batch_input + price.batch_output)
    assert bill["batch_usd"] == pytest.approx(bill["interactive_usd"] / 2)
    assert bill["usd"] == pytest.approx(bill["interactive_usd"] + bill["batch_usd"])


def test_rows_of_unknown_models_are_counted_not_priced_and_a_missing_time_is_today():
    bill = table_cost(
        rows(
            ("no-such-model", "batch", 10, None),
            (None, "inline", 10, None),
            ("gemini-2.5-flash", "batch", MILLION, None),
        )
    )
    assert bill["unpriced_rows"] == 2 and bill["batch_usd"] > 0
    assert table_cost(rows())["usd"] == 0


def test_one_rows_cost_follows_its_day_and_mode():
    row = {
        "model": "gemini-2.5-flash",
        "input_mode": "batch",
        "prompt_tokens": MILLION,
        "output_tokens": 0,
        "thoughts_tokens": MILLION,  # thinking is billed as output
        "completed_at": datetime(2026, 6, 1, tzinfo=UTC),
    }
    price = lookup("gemini-2.5-flash").price(date(2026, 6, 1))
    assert row_cost(row) == pytest.approx(price.batch_input + price.batch_output)
    assert row_cost({**row, "prompt_tokens": None}) == 0


def test_status_prints_the_bill():
    report = {
        "output_dir": "out",
        "parts": 1,
        "runs": 1,
        "rows": 2,
        "rows_committed": 2,
        "superseded": 0,
        "by_status": {"ok": 2},
        "tokens": {"prompt": 1, "output": 1, "thoughts": 0, "total": 2, "estimate_error": None},
        "cost": {"usd": 1.5, "interactive_usd": 1.0, "batch_usd": 0.5, "unpriced_rows": 0},
    }
    assert "cost: $1.5000 (interactive $1.0000, Batch Mode $0.5000" in format_status(report)


BILLED = ("model", "input_mode", "prompt_tokens", "cached_tokens", "output_tokens")
BILLED += ("thoughts_tokens", "completed_at")
NOW = datetime(2026, 12, 6, 12, tzinfo=UTC)


def billed(**row: Any) -> dict[str, Any]:
    """A billed row: interactive 2.5 Flash bought today unless given, nothing cached."""
    defaults = {"model": "gemini-2.5-flash", "input_mode": "inline", "completed_at": NOW}
    return {"cached_tokens": 0, "output_tokens": 0, "thoughts_tokens": None, **defaults, **row}


def table_of(*rows: dict[str, Any]) -> pa.Table:
    schema = pa.schema([ROW_SCHEMA.field(name) for name in BILLED])
    return pa.Table.from_pylist([{k: r.get(k) for k in BILLED} for r in rows], schema=schema)


def test_cached_prompt_tokens_cost_the_cached_rate():
    """cachedContentTokenCount is a part of the prompt: (prompt - cached) at the input rate,
    cached at the cached rate (2.5 Flash: 0.30 and 0.03 per 1M), output at its own."""
    row = billed(prompt_tokens=MILLION, cached_tokens=600_000, output_tokens=100_000)
    usd = (400_000 * 0.30 + 600_000 * 0.03 + 100_000 * 2.50) / MILLION
    assert row_cost(row) == pytest.approx(usd)
    assert row_cost({**row, "cached_tokens": None}) == pytest.approx(
        (MILLION * 0.30 + 100_000 * 2.50) / MILLION
    )
    batch = billed(input_mode="batch", prompt_tokens=MILLION, cached_tokens=MILLION)
    batch_usd = MILLION * lookup("gemini-2.5-flash").price(NOW.date()).cached_rate(batch=True)
    bill = table_cost(table_of(row, batch, billed(prompt_tokens=None)))
    assert bill["interactive_usd"] == pytest.approx(usd)
    assert bill["batch_usd"] == pytest.approx(batch_usd / MILLION)
    assert bill["usd"] == pytest.approx(usd + batch_usd / MILLION)


def test_each_request_is_billed_at_its_own_prompt_tier():
    """3.1 Pro in one table: a row above 200k prompt tokens at 4.00 / 18.00 (cached 0.40), one
    below at 2.00 / 12.00; 2.5 Pro above at 2.50 / 15.00. Their sum is no one request's size."""
    long = billed(
        model="gemini-3.1-pro-preview",
        prompt_tokens=250_000,
        cached_tokens=50_000,
        output_tokens=10_000,
        thoughts_tokens=10_000,
    )
    short = billed(model="gemini-3.1-pro-preview", prompt_tokens=150_000, output_tokens=10_000)
    pro_25 = billed(model="gemini-2.5-pro", prompt_tokens=300_000, output_tokens=20_000)
    expected = {
        "long": (200_000 * 4.00 + 50_000 * 0.40 + 20_000 * 18.00) / MILLION,
        "short": (150_000 * 2.00 + 10_000 * 12.00) / MILLION,
        "pro_25": (300_000 * 2.50 + 20_000 * 15.00) / MILLION,
    }
    for name, row in (("long", long), ("short", short), ("pro_25", pro_25)):
        assert row_cost(row) == pytest.approx(expected[name]), name
    bill = table_cost(table_of(long, short, pro_25, short))
    assert bill["usd"] == pytest.approx(sum(expected.values()) + expected["short"])
    exactly = billed(model="gemini-3.1-pro-preview", prompt_tokens=200_000)  # "> 200k" only
    assert table_cost(table_of(exactly))["usd"] == pytest.approx(200_000 * 2.00 / MILLION)


BEFORE = datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC)
AFTER = datetime(2027, 1, 1, 0, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize("model", ["gemini-3.6-flash", "gemini-3.7-flash", "gemini-3.8-flash"])
def test_rows_on_either_side_of_a_price_change_pay_their_own_days_price(model: str):
    """0.75 / 3.75 through 2026-12-31 (UTC), 1.50 / 7.50 from 2027-01-01; Batch Mode half."""
    rows = {
        (when, mode): billed(
            model=model,
            input_mode=mode,
            prompt_tokens=MILLION,
            output_tokens=MILLION,
            completed_at=when,
        )
        for when in (BEFORE, AFTER)
        for mode in ("inline", "batch")
    }
    expected = {
        (BEFORE, "inline"): 0.75 + 3.75,
        (AFTER, "inline"): 1.50 + 7.50,
        (BEFORE, "batch"): (0.75 + 3.75) / 2,
        (AFTER, "batch"): (1.50 + 7.50) / 2,
    }
    for key, row in rows.items():
        assert row_cost(row) == pytest.approx(expected[key]), key
    bill = table_cost(table_of(*rows.values()))
    assert bill["interactive_usd"] == pytest.approx(4.50 + 9.00)
    assert bill["batch_usd"] == pytest.approx(2.25 + 4.50)
    assert bill["usd"] == pytest.approx(sum(expected.values()))


async def test_parts_written_before_cached_tokens_read_it_as_null(tmp_path: Path):
    """A part of schema 3 has no `cached_tokens`: readers see nulls (nothing cached), `status`
    bills its rows at the input rate beside a new part's cached tokens, and a compaction
    rewrites both with the column (the old row's null)."""
    out = tmp_path / "out"
    out.mkdir()
    old_schema = pa.schema(
        [f for f in ROW_SCHEMA if f.name != "cached_tokens"],
        metadata={"gemini_vision_pipeline.schema_version": "3"},
    )
    old = result_row("old.png", prompt_tokens=MILLION, output_tokens=0, run_id="r0")
    old.update(model="gemini-2.5-flash", input_mode="inline", completed_at=NOW)
    pq.write_table(pa.Table.from_pylist([old], schema=old_schema), out / "part-r0-0.parquet")
    new = result_row("new.png", prompt_tokens=MILLION, cached_tokens=MILLION, output_tokens=0)
    new.update(model="gemini-2.5-flash", input_mode="inline", completed_at=NOW)
    await write_rows(out, "r1", [new])
    cached = current_rows(out, ["image_path", "cached_tokens"]).to_pylist()
    assert {r["image_path"]: r["cached_tokens"] for r in cached} == {
        "old.png": None,
        "new.png": MILLION,
    }
    report = status(out)
    assert report["tokens"]["prompt"] == 2 * MILLION and report["tokens"]["cached"] == MILLION
    assert report["cost"]["usd"] == pytest.approx(0.30 + 0.03)
    assert "prompt 2,000,000 (cached 1,000,000, at the cached rate)" in format_status(report)
    compact(out)
    rows = {row["image_path"]: row for row in read_rows(out)}
    assert rows["old.png"]["cached_tokens"] is None and rows["new.png"]["cached_tokens"] == MILLION
    assert status(out)["cost"]["usd"] == pytest.approx(0.30 + 0.03)
