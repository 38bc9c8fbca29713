"""`pipeline reparse`: read the stored raw answers again with new parse settings, no API call.

Every row keeps the response body exactly as received, so a better parser, a different mask
threshold or a closed label list can be applied to a paid-for dataset for free. New rows are
appended with the same key and supersede the old ones for readers and for `status`.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from pipeline.config import check_setting, load_config
from pipeline.gemini import parse_response
from pipeline.output.parts import current_rows
from pipeline.output.sink import ParquetSink
from pipeline.records import ANSWER, Parsed, new_run_id
from pipeline.run.summary import write_report
from pipeline.tasks import read_answer
from pipeline.tasks.base import TaskSettings
from pipeline.tasks.typed import answer_field, with_answer


def _settings(
    row: dict[str, Any], base: TaskSettings | None, threshold: int | None
) -> TaskSettings:
    settings = base or TaskSettings(kind=row["task"], model=row["model"])
    if settings.kind != row["task"]:  # a config for another task does not apply to this row
        settings = TaskSettings(kind=row["task"], model=row["model"])
    return replace(settings, mask_threshold=threshold) if threshold is not None else settings


def reparse_row(
    row: dict[str, Any], settings: TaskSettings, stored: pa.Field | None = None
) -> Parsed:
    """The row's stored answer read again. A custom row is typed by the settings' schema, else
    by `stored`, the output's `answer` field (which carries the schema it was derived from), so
    a reparse without the config keeps the typed column."""
    response = parse_response(row["raw_response"])
    members = row.get("members")  # a group's row: its objects are placed in its members
    sizes = [(m["width"], m["height"]) for m in members] if members else None
    parsed = read_answer(response, row["width"], row["height"], settings, sizes)
    if settings.kind == "custom" and answer_field(settings) is None:
        return with_answer(parsed, stored)
    return parsed


async def _write(
    output_dir: str, run_id: str, rows: list[dict[str, Any]], answer: pa.Field | None
) -> None:
    async with ParquetSink(output_dir, run_id, answer=answer) as sink:
        for row in rows:
            await sink.add(row)


def reparse(
    output_dir: str, *, config_path: str | None = None, mask_threshold: int | None = None
) -> dict[str, Any]:
    """Re-parse the current row of every image that has a stored answer."""
    if mask_threshold is not None:  # checked by [task] mask_threshold's declaration
        mask_threshold = check_setting(
            "task", "mask_threshold", mask_threshold, "command line", "--mask-threshold"
        )
    base = load_config(config_path).task if config_path else None
    table = current_rows(output_dir)
    stored = table.schema.field(ANSWER)
    run_id = new_run_id("reparse")
    changes: Counter[str] = Counter()
    new_rows: list[dict[str, Any]] = []
    for row in table.to_pylist():
        if not row.get("raw_response"):
            continue
        parsed = reparse_row(row, _settings(row, base, mask_threshold), stored)
        changes[f"{row['status']}->{parsed.status}"] += 1
        new_rows.append(
            {
                **row,
                **parsed.columns(),
                "run_id": run_id,
                "completed_at": datetime.now(UTC),
            }
        )
    if new_rows:
        answer = answer_field(base) if base is not None else None
        asyncio.run(_write(output_dir, run_id, new_rows, stored if answer is None else answer))
    report = {"run_id": run_id, "reparsed": len(new_rows), "status_changes": dict(changes)}
    write_report(output_dir, run_id, report)
    return report
