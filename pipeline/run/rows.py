"""Rows, built by pure functions: a unit of work and what became of it -> one dict of ROW_SCHEMA.

A lone image's row names the image (`members` null); a group's row names the group — its path
is the group's name, its sha256 the group's (`records.group_sha256`), its size and mtime the
members' stamp (`records.group_stamp`), no width/height/mime of its own — and lists the members
in order, each with the columns a lone image's row holds.

Every value is checked into its column's range here, when the row is built (a count past int32
becomes null with a reason), so a row never fails to encode later; `records.to_table` still
turns any row that does into an error row keeping its answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pipeline.gemini.types import GenerateResponse, Usage
from pipeline.records import (
    USAGE_COLUMNS,
    ImageItem,
    Parsed,
    Unit,
    group_stamp,
    int32_or_none,
    make_key,
    storable,
)
from pipeline.run.identity import RunIdentity

# What a copy of an answer was not billed: its token counts and the quota that served them.
UNPAID = (*USAGE_COLUMNS, "traffic_type")


@dataclass(frozen=True, slots=True)
class Outcome:
    """One API answer (or failure) for a key, shared by every path with the same bytes."""

    parsed: Parsed
    response: GenerateResponse | None
    attempts: int
    latency_ms: float
    input_mode: str  # inline, upload, mixed (a group sent partly each way), or none
    est_image_tokens: int  # every image the request carries, reference images included
    est_prompt_tokens: int
    retryable: bool = False  # an error a later run should try again (transient, exhausted)


def base_row(unit: Unit, key: str | None, identity: RunIdentity) -> dict[str, Any]:
    """Who the row is about (see the module docstring) and when, by which run."""
    where = image_columns(unit.items[0]) if unit.group is None else group_columns(unit)
    return {
        "key": key,
        **where,
        "task": identity.task,
        "model": identity.model,
        "run_id": identity.run_id,
        "completed_at": datetime.now(UTC),
    }


def image_columns(item: ImageItem) -> dict[str, Any]:
    """An image's identity columns (a lone image's row, a group row's member)."""
    src = item.source
    return {
        "image_path": storable(src.rel_path),
        "image_root": storable(src.root),
        "image_sha256": item.sha256 or None,
        "file_size": src.size,
        "file_mtime_ns": src.mtime_ns,
        "width": int32_or_none(item.width) or None,
        "height": int32_or_none(item.height) or None,
        "mime_type": item.mime_type or None,
    }


def group_columns(unit: Unit) -> dict[str, Any]:
    group = unit.group
    assert group is not None
    size, stamp = group_stamp(group.members)
    return {
        "image_path": storable(group.name),
        "image_root": storable(group.root),
        "image_sha256": unit.sha256 or None,
        "file_size": size,
        "file_mtime_ns": stamp,
        "members": [image_columns(item) for item in unit.items],
    }


def error_row(unit: Unit, reason: str, identity: RunIdentity) -> dict[str, Any]:
    """Work that could not be sent. It still gets a key, so a rerun skips it like any row."""
    key = make_key(unit.sha256 or "-", identity.key_suffix)
    return {
        **base_row(unit, key, identity),
        "status": "error",
        "error": reason,
        "retryable": any(item.retryable for item in unit.items) or None,
        "attempts": 0,
        "input_mode": "none",
    }


def answered_row(unit: Unit, key: str, outcome: Outcome, identity: RunIdentity) -> dict[str, Any]:
    """The row of a call this unit made (or failed to make)."""
    parsed, response = outcome.parsed, outcome.response
    columns = parsed.columns()
    usage, problems = checked_usage(response.usage if response else None)
    if problems:
        columns["error"] = "; ".join(filter(None, [columns["error"], *problems]))
    return {
        **base_row(unit, key, identity),
        **columns,
        "retryable": outcome.retryable if parsed.status == "error" else None,
        "finish_reason": response.finish_reason if response else None,
        "raw_response": response.raw if response else None,
        "est_image_tokens": int32_or_none(outcome.est_image_tokens),
        "est_prompt_tokens": int32_or_none(outcome.est_prompt_tokens),
        **usage,
        "traffic_type": (response.usage.traffic_type or None) if response else None,
        "latency_ms": outcome.latency_ms,
        "attempts": min(outcome.attempts, 32767),
        "input_mode": outcome.input_mode,
    }


def copied_row(old: dict[str, Any], unit: Unit, key: str, identity: RunIdentity) -> dict[str, Any]:
    """A new path with bytes already answered: the old answer, no new call, no tokens."""
    row = {**old, **base_row(unit, key, identity)}
    for name in UNPAID:
        row[name] = None
    row.update(latency_ms=0.0, attempts=0, input_mode="none")
    return row


def copied_outcome_row(
    unit: Unit, key: str, outcome: Outcome, identity: RunIdentity
) -> dict[str, Any]:
    """The same bytes answered a moment ago in this run: its answer, billed to the first row."""
    row = answered_row(unit, key, outcome, identity)
    for name in UNPAID:
        row[name] = None
    row.update(latency_ms=0.0, attempts=0, input_mode="none")
    return row


def checked_usage(usage: Usage | None) -> tuple[dict[str, int | None], list[str]]:
    """Billed counts for the int32 columns; a count that does not fit is null, with a reason."""
    if usage is None:
        return dict.fromkeys(USAGE_COLUMNS), []
    values: dict[str, int | None] = {}
    problems = []
    for name in USAGE_COLUMNS:
        raw = getattr(usage, name)
        values[name] = int32_or_none(raw)
        if values[name] is None:
            problems.append(f"usageMetadata {name} {raw} is out of range; stored as null")
    return values, problems
