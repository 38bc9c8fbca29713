"""`pipeline status OUT [--config C]`: what an output holds (its current rows by status, the
tokens and cost of every committed row, the latest run, unreadable parts) and, given a config,
what a run of it would still do."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import Config
from pipeline.cost import BillSums, billed_groups
from pipeline.inputs.checks import check_groups
from pipeline.output import journal
from pipeline.output.index_cache import RELEASE_EVERY, cached_groups, group_words
from pipeline.output.memory import release_unused
from pipeline.output.parts import (
    GROUP,
    LEGACY_RUNS_DIR,
    RUNS_DIR,
    Output,
    part_entries,
    read_parts,
)
from pipeline.output.stores import Entry, Store, UnreadablePart, open_store, writer_holds
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
    parts = part_entries(store, history=True)
    tally, unreadable = _tally(store, parts)
    billed = tally.billed
    billed_prompt = billed["prompt_tokens"]
    rows, by_status = tally.current()
    return {
        "output_dir": store.url,
        "parts": len(parts),
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
        "cost": tally.cost(),
        "latest_run": _latest_run_summary(store),
    }


def _tally(store: Store, parts: list[Entry]) -> tuple[Tally, list[UnreadablePart]]:
    """Every readable part folded into one Tally, part by part; a part whose reading fails
    anywhere counts not at all (its batches read before the failure are dropped with it).
    Each row's group digest comes from the resume index's cache where it covers the part (the
    next run stores them), else is computed: a blake2b a row. 1M rows took 1.4 s of CPU all
    cached, 2.1 s none cached, where the whole-table reading took 1.45 s (measured under load,
    `python scripts/bench.py status`)."""
    tally, unreadable = Tally(), []
    cached = cached_groups(store, parts)
    names = [entry.name for entry in parts]
    for at, batches in read_parts(store, names, COLUMNS):
        groups = cached.pop((parts[at].name, parts[at].size), None)
        try:
            folded = [tally.fold(batch, words) for batch, words in _grouped(batches, groups)]
        except UnreadablePart as exc:
            unreadable.append(exc)
            continue
        for batch in folded:
            tally.add(batch)
        if at % RELEASE_EVERY == RELEASE_EVERY - 1:
            release_unused()
    release_unused()  # before the sort: it takes what the reads left free
    return tally, unreadable


def _grouped(
    batches: Iterator[pa.RecordBatch], cached: np.ndarray | None
) -> Iterator[tuple[pa.RecordBatch, np.ndarray]]:
    """Each batch of a part with its rows' group digests: the part's cached ones in row order,
    else computed (`index_cache.group_words`, the function the cache was filled with)."""
    start = 0
    for batch in batches:
        end = start + batch.num_rows
        fits = cached is not None and len(cached) >= end  # a cache of this part's name and size
        yield batch, cached[start:end] if cached is not None and fits else group_words(batch)
        start = end


COLUMNS: tuple[str, ...] = (*GROUP, "completed_at", "status", "run_id", *USAGE_COLUMNS)
COLUMNS += ("est_prompt_tokens", "model", "input_mode")
BILLING = ("model", "input_mode", "completed_at", *USAGE_COLUMNS)  # what `billed_groups` reads
# Billed rows priced together: `billed_groups` (two group-bys and a join) once a batch cost
# 0.7 s of CPU over 1M rows in parts of 5,000; at most ~5 MB of these columns wait to be priced.
BILL_ROWS = 65_536


@dataclass(slots=True)
class Folded:
    """What one batch of a part adds to a Tally: its sums, and 20 bytes a row (`Tally`)."""

    rows: int
    billed: dict[str, int]
    estimate: int
    runs: set[str]
    bill: pa.Table  # the billed rows' BILLING columns
    groups: np.ndarray
    when: np.ndarray
    codes: np.ndarray


class Tally:
    """`status` over every committed row without holding the rows: the sums (tokens, the bill
    by model, mode, day and tier, the run ids) folded batch by batch, and for the current rows'
    counts the 64-bit digest of each row's group (the resume index's: `index_cache.group_words`;
    two of 10M groups share one in about one output in 370,000, n²/2⁶⁵, and a count is then one
    row short), its completed_at and a status code: 20 bytes a row. The table of strings it
    replaces peaked at 800 MB over 1M rows (605 bytes a row from 200k up); this, at 240 MB (49
    bytes a row, the sort's scratch included; measured under load). Which row is current
    is decided as `parts.latest_rows` decides it: the newest completed_at (a null as 0), then
    the later part, then the later row; here, the later row read, as parts are read in name
    order and their rows in order."""

    def __init__(self) -> None:
        self.rows = 0
        self.billed = dict.fromkeys(USAGE_COLUMNS, 0)
        self.estimate = 0
        self.runs: set[str] = set()
        self.statuses: dict[str | None, int] = {}  # status value -> its code
        self._bill = BillSums()
        self._unbilled: list[pa.Table] = []
        # each batch's groups, times and codes, in the order read
        self._pieces: tuple[list[np.ndarray], ...] = ([], [], [])

    def fold(self, batch: pa.RecordBatch, groups: np.ndarray) -> Folded:
        """What `batch` adds, not yet added: its part may still prove unreadable."""
        has_bill = pc.is_valid(batch.column("prompt_tokens"))
        return Folded(
            rows=batch.num_rows,
            billed={name: _sum(batch.column(name)) for name in USAGE_COLUMNS},
            estimate=_sum(pc.filter(batch.column("est_prompt_tokens"), has_bill)),
            runs=set(pc.unique(batch.column("run_id").drop_null()).to_pylist()),
            bill=pa.Table.from_batches([batch.select(list(BILLING)).filter(has_bill)]),
            groups=groups,
            when=_when(batch.column("completed_at")),
            codes=self._codes(batch.column("status")),
        )

    def add(self, folded: Folded) -> None:
        self.rows += folded.rows
        for name, value in folded.billed.items():
            self.billed[name] += value
        self.estimate += folded.estimate
        self.runs |= folded.runs
        self._unbilled.append(folded.bill)
        if sum(table.num_rows for table in self._unbilled) >= BILL_ROWS:
            self._price()
        columns = (folded.groups, folded.when, folded.codes)
        for pieces, piece in zip(self._pieces, columns, strict=True):
            pieces.append(piece)

    def cost(self) -> dict[str, Any]:
        self._price()
        return self._bill.bill()

    def _price(self) -> None:
        if self._unbilled:
            self._bill.add(billed_groups(pa.concat_tables(self._unbilled), None))
            self._unbilled = []

    def current(self) -> tuple[int, dict[str, int]]:
        """The current rows: how many, and their counts by status, sorted by status (a null
        one as "None")."""
        counts = _current_counts(*self._joined(), len(self.statuses))
        values = sorted(self.statuses, key=self.statuses.__getitem__)
        by_status = {str(v): int(n) for v, n in zip(values, counts, strict=True) if n}
        return int(counts.sum()), dict(sorted(by_status.items()))

    def _codes(self, status: pa.Array) -> np.ndarray:
        encoded = pc.dictionary_encode(status, null_encoding="encode")
        values = encoded.dictionary.to_pylist()
        codes = [self.statuses.setdefault(v, len(self.statuses)) for v in values]
        return np.array(codes, dtype=np.uint32)[encoded.indices.to_numpy()]

    def _joined(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The groups, times and codes end to end, each column's pieces dropped once joined
        (the peak is one column twice, not all three)."""
        groups, when, codes = self._pieces
        return _joined(groups, np.uint64), _joined(when, np.int64), _joined(codes, np.uint32)


def _joined(pieces: list[np.ndarray], dtype: type[np.generic]) -> np.ndarray:
    joined = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
    pieces.clear()
    return joined


def _when(completed_at: pa.Array) -> np.ndarray:
    """completed_at as int64, a null as 0 (the epoch), as `parts.latest_rows` orders it."""
    epoch = pa.scalar(0, completed_at.type)
    return pc.fill_null(completed_at, epoch).cast(pa.int64()).to_numpy()


def _current_counts(
    groups: np.ndarray, when: np.ndarray, codes: np.ndarray, statuses: int
) -> np.ndarray:
    """How many current rows have each status code: one stable sort by group then time (rows
    tied on both stay in the order read: the later wins), the last row of each group."""
    if not len(codes):
        return np.zeros(statuses, dtype=np.int64)
    order = np.lexsort((when, groups))
    ordered = groups[order]
    last = np.ones(len(order), dtype=bool)
    last[:-1] = ordered[1:] != ordered[:-1]
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
