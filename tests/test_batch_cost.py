"""What answers cost (pipeline/cost.py): Batch Mode rows at the batch price, in `status` and in a
run's summary; rows without billed tokens free; models without a price counted, not guessed."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pyarrow as pa
import pytest

from pipeline.commands.status import format_status
from pipeline.cost import row_cost, table_cost
from pipeline.models import lookup
from pipeline.records import ROW_SCHEMA

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
