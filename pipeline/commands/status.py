"""`pipeline status OUT [--config C]`: what an output holds (its current rows by status, the
tokens and cost of every committed row, the latest run, unreadable parts) and, given a config,
what a run of it would still do."""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import Config
from pipeline.cost import table_cost
from pipeline.inputs.checks import check_groups
from pipeline.output import journal
from pipeline.output.parts import GROUP, LEGACY_RUNS_DIR, RUNS_DIR, Output, latest_rows, scan
from pipeline.output.stores import Store, open_store, writer_holds
from pipeline.records import USAGE_COLUMNS
from pipeline.run.plan import left


def pending(config: Config, *, retry_errors: bool = False) -> dict[str, Any]:
    """What a run of `config` would still do, counted as its plan counts it (pipeline/run/
    plan.py's `left`: the run's walk and resume index, a job in flight's files not to do; a stat
    a unit, no reads). `files` counts units: groups, when the config groups its files."""
    check_groups(config)
    return {"config": config.source, **left(config, retry_errors=retry_errors).report()}


def status(output_dir: Output) -> dict[str, Any]:
    """Counts by status of the current rows, tokens of every committed row, the latest run.

    Tokens are summed over every committed row, superseded ones too (they were paid for); rows
    copied from another path carry no billed tokens. `est_prompt_tokens` (the estimate of the
    whole input, image included, made before the call) is compared with the billed
    `prompt_tokens` on the rows that have both. `cost` prices those tokens (pipeline/cost.py:
    rows bought in Batch Mode at the batch price, cached prompt tokens at the cached rate, each
    request at its own prompt-size tier).
    """
    columns: tuple[str, ...] = (*GROUP, "completed_at", "status", "run_id", *USAGE_COLUMNS)
    columns += ("est_prompt_tokens", "model", "input_mode")
    store = open_store(output_dir)
    table, names, unreadable = scan(store, columns, skip_unreadable=True, history=True)
    current = table.take(pa.array(latest_rows(table)))
    by_status = Counter(
        {str(k): int(v) for k, v in _value_counts(current.column("status")).items()}
    )
    billed = {name: _sum(table.column(name)) for name in USAGE_COLUMNS}
    has_bill = pc.is_valid(table.column("prompt_tokens"))
    estimate = _sum(pc.filter(table.column("est_prompt_tokens"), has_bill))
    billed_prompt = billed["prompt_tokens"]
    return {
        "output_dir": store.url,
        "parts": len(names),
        "unreadable_parts": [str(exc) for exc in unreadable],
        "damaged_journal": [store.join(name) for name in journal.damaged(store)],
        "writing": _writing(store),
        "rows": current.num_rows,
        "rows_committed": table.num_rows,
        "superseded": table.num_rows - current.num_rows,
        "runs": len(pc.unique(table.column("run_id").drop_null())),
        "by_status": dict(sorted(by_status.items())),
        "tokens": {
            "prompt": billed_prompt,
            "cached": billed["cached_tokens"],  # of the prompt's, billed at the cached rate
            "output": billed["output_tokens"],
            "thoughts": billed["thoughts_tokens"],
            "total": billed["total_tokens"],
            "estimated_prompt": estimate,
            "estimate_error": (estimate - billed_prompt) / billed_prompt if billed_prompt else None,
        },
        "cost": table_cost(table),
        "latest_run": _latest_run_summary(store),
    }


def _writing(store: Store) -> dict[str, int] | None:
    """A run writing the output now, and the answers its journal holds beyond the parts (the
    counts above are of parts: they grow when the run cuts its next one). None when idle."""
    if not writer_holds(store):
        return None
    return {"journal_answers": journal.held_answers(store)}


def _value_counts(column: pa.ChunkedArray) -> dict[str | None, int]:
    counts = pc.value_counts(column.combine_chunks()) if len(column) else []
    return {item["values"].as_py(): item["counts"].as_py() for item in counts}


def _sum(column: pa.Array | pa.ChunkedArray) -> int:
    total = pc.sum(column).as_py() if len(column) else None
    return int(total or 0)


def _latest_run_summary(store: Store) -> dict[str, Any] | None:
    """The newest readable .runs/<run_id>.json of a run (run ids start with their UTC start
    time; reports of other commands, such as compactions, are not runs); `runs/` of an output
    no writer has moved yet too."""
    names = [
        e.name
        for folder in (RUNS_DIR, LEGACY_RUNS_DIR)
        if not store.local or os.path.isdir(store.join(folder))
        for e in store.list(folder + "/")
        if e.name.endswith(".json")
    ]
    for name in sorted(names, key=lambda name: name.rpartition("/")[2], reverse=True):
        try:
            summary = json.loads(store.read(name).decode("utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(summary, dict) and "compacted" in summary:
            continue
        if isinstance(summary, dict):
            return summary
    return None


def format_status(report: dict[str, Any]) -> str:
    """The status report as the few lines a person wants to read after a run."""
    tokens = report["tokens"]
    by_status = report["by_status"]
    lines = [
        f"output: {report['output_dir']}" + _writing_note(report.get("writing")),
        f"rows: {report['rows']:,} current ({report['rows_committed']:,} committed in "
        f"{_count(report['parts'], 'part')} by {_count(report['runs'], 'run')}; "
        f"{report['superseded']:,} superseded)",
        "status: " + (" · ".join(f"{k} {v:,}" for k, v in by_status.items()) or "no rows yet"),
        f"tokens billed: prompt {tokens['prompt']:,}{_cached(tokens)} · output "
        f"{tokens['output']:,} · "
        f"thoughts {tokens['thoughts']:,} · total {tokens['total']:,}",
    ]
    if report.get("cost"):
        lines.append(_cost_line(report["cost"]))
    if tokens["estimate_error"] is not None:
        lines.append(
            f"prompt tokens estimated {tokens['estimated_prompt']:,} vs billed "
            f"{tokens['prompt']:,} ({tokens['estimate_error']:+.1%})"
        )
    for problem in report.get("unreadable_parts", []):
        lines.append(f"UNREADABLE PART (its rows are not counted above): {problem}")
    for chunk in report.get("damaged_journal", []):
        lines.append(f"DAMAGED JOURNAL CHUNK (its rows were not recovered): {chunk}")
    errors = by_status.get("error", 0)
    if errors:
        lines.append(f"remaining: {errors:,} error rows; rerun with --retry-errors to redo them")
    if report.get("pending"):
        lines.append(_pending_line(report["pending"]))
    latest = report.get("latest_run")
    if latest:
        lines.append(
            f"latest run {latest.get('run_id', '?')}: started {latest.get('started_at', '?')}, "
            f"finished {latest.get('finished_at') or '?'}, seen {latest.get('seen', '?')}, "
            f"skipped {latest.get('skipped', '?')}, api calls {latest.get('api_calls', '?')}"
        )
        if latest.get("stop_reason"):
            lines.append(f"stopped: {latest['stop_reason']}")
        if latest.get("resume_hint"):
            lines.append(f"to resume: {latest['resume_hint']}")
    return "\n".join(lines)


def _pending_line(pending: dict[str, Any]) -> str:
    """What a run of the config would still do: the counts of its plan (`run --plan`)."""
    retry = pending["retry"]
    errors = f" ({retry:,} {'an error' if retry == 1 else 'errors'} to retry)" if retry else ""
    in_flight = pending["in_flight"]
    jobs = f", {in_flight:,} in Batch Mode jobs in flight" if in_flight else ""
    return (
        f"remaining under {pending['config']}: {pending['to_do']:,} of {pending['files']:,} "
        f"files to do{errors}, {pending['done']:,} done{jobs}"
    )


def _writing_note(writing: dict[str, int] | None) -> str:
    if writing is None:
        return ""
    held = writing["journal_answers"]
    return f" (a run is writing it now: {held:,} answers in its journal, not yet in the parts)"


def _cached(tokens: dict[str, Any]) -> str:
    """The prompt tokens an implicit cache served, when any (billed at the cached rate)."""
    cached = tokens.get("cached") or 0
    return f" (cached {cached:,}, at the cached rate)" if cached else ""


def _cost_line(cost: dict[str, Any]) -> str:
    unpriced = cost["unpriced_rows"]
    return (
        f"cost: ${cost['usd']:,.4f} (interactive ${cost['interactive_usd']:,.4f}, Batch Mode "
        f"${cost['batch_usd']:,.4f} at the batch price; pipeline/models.json)"
        + (f"; {unpriced:,} rows of models without a price" if unpriced else "")
    )


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")
