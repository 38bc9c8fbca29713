"""`pipeline status OUT [--config C]`: what an output holds (its current rows by status, the
tokens and cost of every committed row, the latest run, unreadable parts) and, given a config,
what a run of it would still do."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import Config
from pipeline.cost import BillSums, billed_groups
from pipeline.inputs.checks import check_groups
from pipeline.output import journal
from pipeline.output.index_cache import group_keys
from pipeline.output.parts import (
    GROUP,
    LEGACY_RUNS_DIR,
    RUNS_DIR,
    Output,
    part_entries,
    read_parts,
)
from pipeline.output.stores import Store, UnreadablePart, open_store, writer_holds
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
    store = open_store(output_dir)
    names = [entry.name for entry in part_entries(store, history=True)]
    tally, unreadable = _tally(store, names)
    billed = tally.billed
    billed_prompt = billed["prompt_tokens"]
    by_status = tally.by_status()
    rows = sum(by_status.values())
    return {
        "output_dir": store.url,
        "parts": len(names),
        "unreadable_parts": [str(exc) for exc in unreadable],
        "damaged_journal": [store.join(name) for name in journal.damaged(store)],
        "writing": _writing(store),
        "rows": rows,
        "rows_committed": tally.rows,
        "superseded": tally.rows - rows,
        "runs": len(tally.runs),
        "by_status": by_status,
        "tokens": {
            "prompt": billed_prompt,
            "cached": billed["cached_tokens"],  # of the prompt's, billed at the cached rate
            "output": billed["output_tokens"],
            "thoughts": billed["thoughts_tokens"],
            "total": billed["total_tokens"],
            "estimated_prompt": tally.estimate,
            "estimate_error": (
                (tally.estimate - billed_prompt) / billed_prompt if billed_prompt else None
            ),
        },
        "cost": tally.bill.bill(),
        "latest_run": _latest_run_summary(store),
    }


def _tally(store: Store, names: list[str]) -> tuple[Tally, list[UnreadablePart]]:
    """Every readable part folded into one Tally, part by part; a part whose reading fails
    anywhere counts not at all (its batches read before the failure are dropped with it)."""
    tally, unreadable = Tally(), []
    for _, batches in read_parts(store, names, COLUMNS):
        try:
            folded = [tally.fold(batch) for batch in batches]
        except UnreadablePart as exc:
            unreadable.append(exc)
            continue
        for batch in folded:
            tally.add(batch)
    return tally, unreadable


COLUMNS: tuple[str, ...] = (*GROUP, "completed_at", "status", "run_id", *USAGE_COLUMNS)
COLUMNS += ("est_prompt_tokens", "model", "input_mode")


@dataclass(slots=True)
class Folded:
    """What one batch of a part adds to a Tally: its sums, and 28 bytes a row (`Tally`)."""

    rows: int
    billed: dict[str, int]
    estimate: int
    runs: set[str]
    bill: list[dict[str, Any]]
    keys: np.ndarray
    when: np.ndarray
    codes: np.ndarray


class Tally:
    """`status` over every committed row without holding the rows: the sums (tokens, the bill
    by model, mode, day and tier, the run ids) folded batch by batch, and for the current rows'
    counts a 16-byte key of each row's group (`index_cache.group_keys`), its completed_at and a
    status code: 28 bytes a row where the table of strings it replaces held ~850 (measured:
    1M rows peaked at ~850 MB), and which row is current is decided as `parts.latest_rows`
    decides it (the newest completed_at, a null as 0, then the later part, then the later row:
    here, the later row read, as parts are read in name order and their rows in order)."""

    def __init__(self) -> None:
        self.rows = 0
        self.billed = dict.fromkeys(USAGE_COLUMNS, 0)
        self.estimate = 0
        self.runs: set[str] = set()
        self.bill = BillSums()
        self.statuses: dict[str | None, int] = {}  # status value -> its code
        # each batch's keys, times and codes, in the order read
        self._pieces: tuple[list[np.ndarray], ...] = ([], [], [])

    def fold(self, batch: pa.RecordBatch) -> Folded:
        """What `batch` adds, not yet added: its part may still prove unreadable."""
        rows = pa.Table.from_batches([batch])
        has_bill = pc.is_valid(batch.column("prompt_tokens"))
        return Folded(
            rows=batch.num_rows,
            billed={name: _sum(batch.column(name)) for name in USAGE_COLUMNS},
            estimate=_sum(pc.filter(batch.column("est_prompt_tokens"), has_bill)),
            runs=set(pc.unique(batch.column("run_id").drop_null()).to_pylist()),
            bill=billed_groups(rows, None),
            keys=group_keys(batch),
            when=_when(batch.column("completed_at")),
            codes=self._codes(batch.column("status")),
        )

    def add(self, folded: Folded) -> None:
        self.rows += folded.rows
        for name, value in folded.billed.items():
            self.billed[name] += value
        self.estimate += folded.estimate
        self.runs |= folded.runs
        self.bill.add(folded.bill)
        for pieces, piece in zip(
            self._pieces, (folded.keys, folded.when, folded.codes), strict=True
        ):
            pieces.append(piece)

    def by_status(self) -> dict[str, int]:
        """The current rows' counts by status, sorted by status (a null one as "None")."""
        counts = _current_counts(*self._joined(), len(self.statuses))
        values = sorted(self.statuses, key=self.statuses.__getitem__)
        by_status = {str(v): int(n) for v, n in zip(values, counts, strict=True) if n}
        return dict(sorted(by_status.items()))

    def _codes(self, status: pa.Array) -> np.ndarray:
        encoded = pc.dictionary_encode(status, null_encoding="encode")
        codes = [
            self.statuses.setdefault(v, len(self.statuses)) for v in encoded.dictionary.to_pylist()
        ]
        return np.array(codes, dtype=np.uint32)[encoded.indices.to_numpy()]

    def _joined(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The keys, times and codes end to end, each column's pieces dropped once joined (the
        peak is one column twice, not all three)."""
        empty = (np.zeros((0, 2), np.uint64), np.zeros(0, np.int64), np.zeros(0, np.uint32))
        keys, when, codes = (_joined(p, e) for p, e in zip(self._pieces, empty, strict=True))
        return keys, when, codes


def _joined(pieces: list[np.ndarray], empty: np.ndarray) -> np.ndarray:
    joined = np.concatenate(pieces) if pieces else empty
    pieces.clear()
    return joined


def _when(completed_at: pa.Array) -> np.ndarray:
    """completed_at as int64, a null as 0 (the epoch), as `parts.latest_rows` orders it."""
    epoch = pa.scalar(0, completed_at.type)
    return pc.fill_null(completed_at, epoch).cast(pa.int64()).to_numpy()


def _current_counts(
    keys: np.ndarray, when: np.ndarray, codes: np.ndarray, statuses: int
) -> np.ndarray:
    """How many current rows have each status code: one stable sort by group key then time
    (rows tied on both stay in the order read: the later wins), the last row of each group."""
    if not len(codes):
        return np.zeros(statuses, dtype=np.int64)
    order = np.lexsort((when, keys[:, 1], keys[:, 0]))
    last = np.zeros(len(order), dtype=bool)
    last[-1] = True
    for word in range(2):  # a word at a time: 8 bytes a row of scratch, not 16
        ordered = keys[order, word]
        last[:-1] |= ordered[1:] != ordered[:-1]
    return np.bincount(codes[order[last]], minlength=statuses)


def _writing(store: Store) -> dict[str, int] | None:
    """A run writing the output now, and the answers its journal holds beyond the parts (the
    counts above are of parts: they grow when the run cuts its next one). None when idle."""
    if not writer_holds(store):
        return None
    return {"journal_answers": journal.held_answers(store)}


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
