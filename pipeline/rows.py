"""Rows, built by pure functions: an image and what became of it -> one dict of ROW_SCHEMA.

Every value is checked into its column's range here, when the row is built (a count past int32
becomes null with a reason), so a row never fails to encode later; `records.to_table` still
turns any row that does into an error row keeping its answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pipeline.gemini.types import GenerateResponse, Usage
from pipeline.records import ImageItem, Parsed, int32_or_none, make_key, storable

USAGE_COLUMNS = ("prompt_tokens", "output_tokens", "thoughts_tokens", "total_tokens")


@dataclass(frozen=True, slots=True)
class RunFacts:
    """What every row of a run shares."""

    run_id: str
    task: str
    model: str
    key_suffix: str  # the settings hash


@dataclass(frozen=True, slots=True)
class Outcome:
    """One API answer (or failure) for a key, shared by every path with the same bytes."""

    parsed: Parsed
    response: GenerateResponse | None
    attempts: int
    latency_ms: float
    input_mode: str
    est_image_tokens: int
    est_prompt_tokens: int
    retryable: bool = False  # an error a later run should try again (transient, exhausted)


def base_row(item: ImageItem, key: str | None, facts: RunFacts) -> dict[str, Any]:
    src = item.source
    return {
        "key": key,
        "image_path": storable(src.rel_path),
        "image_root": storable(src.root),
        "image_sha256": item.sha256 or None,
        "file_size": src.size,
        "file_mtime_ns": src.mtime_ns,
        "width": int32_or_none(item.width) or None,
        "height": int32_or_none(item.height) or None,
        "mime_type": item.mime_type or None,
        "task": facts.task,
        "model": facts.model,
        "run_id": facts.run_id,
        "completed_at": datetime.now(UTC),
    }


def error_row(item: ImageItem, reason: str, facts: RunFacts) -> dict[str, Any]:
    """A file that could not be sent. It still gets a key, so a rerun skips it like any row."""
    key = make_key(item.sha256 or "-", facts.key_suffix)
    return {
        **base_row(item, key, facts),
        "status": "error",
        "error": reason,
        "attempts": 0,
        "input_mode": "none",
    }


def answered_row(item: ImageItem, key: str, outcome: Outcome, facts: RunFacts) -> dict[str, Any]:
    """The row of a call this image made (or failed to make)."""
    parsed, response = outcome.parsed, outcome.response
    columns = parsed.columns()
    usage, problems = checked_usage(response.usage if response else None)
    if problems:
        columns["error"] = "; ".join(filter(None, [columns["error"], *problems]))
    return {
        **base_row(item, key, facts),
        **columns,
        "retryable": outcome.retryable if parsed.status == "error" else None,
        "finish_reason": response.finish_reason if response else None,
        "raw_response": response.raw if response else None,
        "est_image_tokens": int32_or_none(outcome.est_image_tokens),
        "est_prompt_tokens": int32_or_none(outcome.est_prompt_tokens),
        **usage,
        "latency_ms": outcome.latency_ms,
        "attempts": min(outcome.attempts, 32767),
        "input_mode": outcome.input_mode,
    }


def copied_row(old: dict[str, Any], item: ImageItem, key: str, facts: RunFacts) -> dict[str, Any]:
    """A new path with bytes already answered: the old answer, no new call, no tokens."""
    row = {**old, **base_row(item, key, facts)}
    for name in USAGE_COLUMNS:
        row[name] = None
    row.update(latency_ms=0.0, attempts=0, input_mode="none")
    return row


def copied_outcome_row(
    item: ImageItem, key: str, outcome: Outcome, facts: RunFacts
) -> dict[str, Any]:
    """The same bytes answered a moment ago in this run: its answer, billed to the first row."""
    row = answered_row(item, key, outcome, facts)
    for name in USAGE_COLUMNS:
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
