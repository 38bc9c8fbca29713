"""What the answers cost: billed tokens at the model table's price of the day they were bought.

A row bought in Batch Mode says so (`input_mode` "batch") and is billed at the table's batch
price (half the interactive one by default); every other row with billed tokens at the
interactive price. Output includes thinking, as the service bills it. Rows copied from another
path carry no tokens and cost nothing. A model the table gives no price is counted in
`unpriced_rows` instead of being guessed.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.models import ModelTable, default_table, lookup

BATCH_MODE = "batch"  # the `input_mode` of a row answered in Batch Mode


def row_cost(row: dict[str, Any], table: ModelTable | None = None) -> float | None:
    """USD of one row's billed tokens; 0 without any, None when its model has no price."""
    prompt = row.get("prompt_tokens")
    if prompt is None:
        return 0.0
    output = (row.get("output_tokens") or 0) + (row.get("thoughts_tokens") or 0)
    when = row.get("completed_at")
    day = when.date() if isinstance(when, datetime) else None
    return _cost(
        row.get("model") or "", day, row.get("input_mode") == BATCH_MODE, prompt, output, table
    )


def _cost(
    model: str, day: date | None, batch: bool, prompt: int, output: int, table: ModelTable | None
) -> float | None:
    known = (table or default_table()).is_known(model) if model else False
    price = lookup(model, table).price(day) if known else None
    return None if price is None else price.cost(prompt, output, batch=batch)


def table_cost(rows: pa.Table, table: ModelTable | None = None) -> dict[str, Any]:
    """The bill of every row of `rows` (columns model, input_mode, completed_at and the token
    counts), by mode: {"usd", "interactive_usd", "batch_usd", "unpriced_rows"}."""
    bill = {"usd": 0.0, "interactive_usd": 0.0, "batch_usd": 0.0, "unpriced_rows": 0}
    for group in _billed_groups(rows):
        model, day, batch = group["model"], group["day"], group["batch"]
        usd = _cost(model, day, batch, group["prompt_sum"], group["output_sum"], table)
        if usd is None:
            bill["unpriced_rows"] += group["prompt_count"]
            continue
        bill["batch_usd" if batch else "interactive_usd"] += usd
        bill["usd"] += usd
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in bill.items()}


def _billed_groups(rows: pa.Table) -> list[dict[str, Any]]:
    """Billed tokens summed by model, mode and day (a row without a time: today's price)."""
    billed = rows.filter(pc.is_valid(rows.column("prompt_tokens")))
    output = pc.add(
        pc.fill_null(billed.column("output_tokens"), 0),
        pc.fill_null(billed.column("thoughts_tokens"), 0),
    )
    keyed = pa.table(
        {
            "model": pc.fill_null(billed.column("model"), ""),
            "batch": pc.fill_null(pc.equal(billed.column("input_mode"), BATCH_MODE), False),
            "day": pc.cast(billed.column("completed_at"), pa.date32()),
            "prompt": pc.cast(billed.column("prompt_tokens"), pa.int64()),
            "output": pc.cast(output, pa.int64()),
        }
    )
    sums = [("prompt", "sum"), ("output", "sum"), ("prompt", "count")]
    return keyed.group_by(["model", "batch", "day"]).aggregate(sums).to_pylist()
