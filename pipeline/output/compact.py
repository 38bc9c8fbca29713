"""`pipeline compact OUT`: the current rows rewritten into fresh parts, superseded ones removed,
so that DuckDB, Polars, pandas, Spark or `datasets` reading `OUT/data` get exactly the
current rows (one per image and task) without knowing the "newest row wins" rule.

Crash-safe at every step, the way Delta Lake commits an OPTIMIZE: the new files are written
where no reader looks, then one small commit record, created whole and only if absent, is the
switch; cleaning up after it is idempotent and finished by whoever comes next.

1. The current rows are written, part by part of the old set, into `.compact-<id>/data/part-
   compact-<id>-<n>.parquet` (a hidden folder: no glob and no reader of ours sees it), and the
   superseded rows beside them into `.compact-<id>/.superseded/...`: superseded rows are paid
   answers (the resume index reuses them when settings change back, `status` counts their
   tokens), so they are set aside out of every glob's sight rather than lost — as Delta Lake
   keeps the files an OPTIMIZE removed until a VACUUM.
2. The commit record `.compact-<id>.json` (the old parts, the new parts) is created. Before it
   exists the compaction did not happen: recovery deletes the staging folder. Once it exists it
   did: recovery finishes steps 3 and 4.
3. The old parts are deleted (every one of their rows is in a staged part by now).
4. Each new part is published at the top level (disk: a rename; object store: a server-side
   copy, then the staged object is deleted), then the staging folder and the record go.

Readers of this project (`parts.part_entries`, through `parts.visible_parts`) apply a present record
at every instant: old parts hidden, new parts read wherever they are (staged or published), so
they see exactly the old set before step 2 and exactly the new set from then on, even after a
kill. Old before new (issue 19: the reverse order let a plain glob see both sets, three times
the rows of a busy image, for as long as a killed compaction went unfinished): a plain glob sees
the old set until step 3 starts, then only current rows (at most one per image and task; some
missing until step 4 ends), then the new set. A kill in steps 3-4 is finished by the next
`pipeline` command on the output (a reader does so at once when the killed holder's process is
provably gone: `stores.holder_gone`). Delta Lake's readers go through its log for the same
reason; compact while no plain reader is scanning if a partial view matters.

Every run and reparse ends with `supersede`: the same commit, but only the parts that hold
superseded rows are rewritten (copy-on-write, as Delta Lake's and Iceberg's row-level updates
rewrite only the files holding the rows), so `data/` holds exactly the current rows after every
run without rewriting the whole output. `pipeline compact` is then only needed to merge the
small parts many runs leave.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.output.index_cache import load_facts
from pipeline.output.parts import (
    GROUP,
    RUNS_DIR,
    data_name,
    history_name,
    is_history_part,
    is_part,
    latest_rows,
    output_answer,
    part_entries,
    part_shapes,
    read_parts,
    record_name,
    scan,
    staged_name,
)
from pipeline.output.recovery import Step, finish_compaction, no_step, recover_locked
from pipeline.output.stores import (
    LEASE_SECONDS,
    Store,
    WriterLock,
    open_store,
)
from pipeline.records import ANSWER, ROW_SCHEMA, USAGE_COLUMNS, new_run_id, row_schema

log = logging.getLogger(__name__)

COMPACT_ROWS = 100_000  # rows in a compacted part, about (whole old parts are never split)


def compact(
    output: str | Store,
    *,
    lock: WriterLock | None = None,
    lease_seconds: float = LEASE_SECONDS,
    step: Step = no_step,
) -> dict[str, Any]:
    """Rewrite the output's current rows into fresh parts and set the superseded ones aside.
    Takes the output's lock unless given the holder's (a run compacting at its end); a killed
    writer's lease is waited out (at most its TTL), a live writer's refuses (OutputDirBusy)."""
    return _holding(output, lock, lease_seconds, lambda store, held: _compact(store, held, step))


def set_aside(
    output: str | Store,
    select: Callable[[pa.Table], np.ndarray],
    *,
    lock: WriterLock | None = None,
    lease_seconds: float = LEASE_SECONDS,
    step: Step = no_step,
) -> dict[str, Any]:
    """Move the rows `select` picks (a mask over a table of the GROUP columns of every row in
    `data/`) into `.superseded/`, rewriting only the parts that held them (`pipeline prune`:
    rows of inputs that disappeared, paid for and so kept). The lock as for `compact`."""
    return _holding(
        output, lock, lease_seconds, lambda store, held: _set_aside(store, held, select, step)
    )


def _holding(
    output: str | Store,
    lock: WriterLock | None,
    lease_seconds: float,
    work: Callable[[Store, WriterLock], dict[str, Any]],
) -> dict[str, Any]:
    """`work` under the output's lock: the caller's, or taken (and renewed) here, after
    putting right what a killed writer left."""
    store = open_store(output)
    held = lock or store.lock("compact", ttl=lease_seconds)
    renewing = _Renewal(held) if lock is None else None
    try:
        if lock is None:
            recover_locked(store)
        return work(store, held)
    finally:
        if renewing is not None:
            renewing.stop()
        if lock is None:
            held.release()


class _Renewal:
    """Renews a lease from a thread while a compaction runs (a run's sink renews its own)."""

    def __init__(self, lock: WriterLock) -> None:
        self.lock = lock
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gvp-compact-lease", daemon=True)
        if lock.renew_every is not None:
            self._thread.start()

    def _run(self) -> None:
        assert self.lock.renew_every is not None
        while not self._done.wait(self.lock.renew_every):
            try:
                self.lock.renew()
            except Exception as exc:  # lost, or a hiccup: check() before each commit decides
                log.warning("compaction lease renewal failed: %s", exc)

    def stop(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()


def _compact(store: Store, lock: WriterLock, step: Step) -> dict[str, Any]:
    compaction = new_run_id()
    table, names, _ = scan(store, (*GROUP, "completed_at", *USAGE_COLUMNS))
    current = latest_rows(table)
    report = {
        "run_id": f"{compaction}-compact",
        "compacted": True,
        "parts_before": len(names),
        "rows_before": table.num_rows,
        "rows_after": len(current),
        "removed_tokens": _removed_tokens(table, current),
    }
    if len(current) == table.num_rows and len(names) <= 1:
        report["parts_after"] = len(names)
        return report  # nothing superseded, nothing to merge
    split = _rows_by_part(table, current)
    del table
    new = _write_staged(store, compaction, names, split, output_answer(store), step)
    _commit(store, lock, {"id": compaction, "old": names, "new": new}, step)
    report["parts_after"] = sum(1 for name in new if is_part(name))
    store.replace(f"{RUNS_DIR}/{report['run_id']}.json", json.dumps(report, indent=2).encode())
    step("done")
    log.info("compacted %s: %s", store.url, report)
    return report


def supersede(
    output: str | Store,
    lock: WriterLock,
    *,
    reshape: bool = False,
    answer: pa.Field | None = None,
    step: Step = no_step,
) -> dict[str, Any]:
    """Copy-on-write, at the end of every run and reparse (under the writer's lock): the parts
    holding superseded rows are rewritten without them, those rows set aside in `.superseded/`,
    every other part untouched, committed as a compaction is (module doc). Which rows are
    superseded comes from the resume index's cached facts, so an output of 100k rows where 10
    were answered again reads the facts and rewrites the few parts the 10 old rows sat in.
    `reshape` (the run changed the output's `answer` type: a new response_schema): every part
    of another type than `answer` (the run's; None: the output's newest part's) is rewritten
    too, as that type, so `data/` keeps one schema. (Given, not found from part names: two
    runs that began in the same second order by chance there.)"""
    started = time.monotonic()
    store = open_store(output)
    parts = part_entries(store, history=True)  # all of them: the facts cache covers all
    facts = load_facts(store, parts, suffix=None, write=True)
    names = [entry.name for entry in parts]
    hidden = [is_history_part(name) for name in names]
    split = facts.stale_rows(hidden)
    answer = answer or output_answer(store)
    if reshape and answer is not None:
        _reshaped(store, names, hidden, split, answer)
    report: dict[str, Any] = {"parts_rewritten": len(split), "rows_rewritten": 0}
    report["rows_set_aside"] = 0
    if split:
        compaction = new_run_id()
        new = _write_staged(store, compaction, names, split, answer, step)
        _commit(store, lock, {"id": compaction, "old": [names[p] for p in split], "new": new}, step)
        report["rows_rewritten"] = sum(len(keep) for keep, _ in split.values())
        report["rows_set_aside"] = sum(len(gone) for _, gone in split.values())
    report["seconds"] = round(time.monotonic() - started, 3)
    return report


def _reshaped(
    store: Store,
    names: list[str],
    hidden: list[bool],
    split: dict[int, tuple[np.ndarray, np.ndarray]],
    newest: pa.Field,
) -> None:
    """Add to `split` every visible part whose `answer` type is not `newest` (all its rows
    kept: `_part_writer` rewrites them as that type)."""
    seen = [at for at, aside in enumerate(hidden) if not aside]
    for at, (field, rows) in zip(seen, part_shapes(store, [names[at] for at in seen]), strict=True):
        if at not in split and not field.equals(newest, check_metadata=True):
            split[at] = (np.arange(rows, dtype=np.int64), np.zeros(0, dtype=np.int64))


def _set_aside(
    store: Store, lock: WriterLock, select: Callable[[pa.Table], np.ndarray], step: Step
) -> dict[str, Any]:
    table, names, _ = scan(store, GROUP)
    chosen = np.asarray(select(table), dtype=bool)
    split = {
        part: rows
        for part, rows in _rows_by_part(table, np.flatnonzero(~chosen)).items()
        if len(rows[1])
    }
    if split:
        compaction = new_run_id()
        new = _write_staged(store, compaction, names, split, output_answer(store), step)
        _commit(store, lock, {"id": compaction, "old": [names[p] for p in split], "new": new}, step)
    return {"rows_set_aside": int(chosen.sum()), "parts_rewritten": len(split)}


def _commit(store: Store, lock: WriterLock, record: dict[str, Any], step: Step) -> None:
    """Steps 2-4: the record created (only while the output is certainly ours), then the old
    parts deleted and the new ones published."""
    lock.check()
    store.create_bytes(record_name(record["id"]), json.dumps(record).encode())
    step("recorded")
    finish_compaction(store, record, step)


def _removed_tokens(table: pa.Table, current: np.ndarray) -> dict[str, int]:
    """Billed tokens of the rows a compaction removes (paid for: kept in its report)."""
    superseded = np.ones(table.num_rows, dtype=bool)
    superseded[current] = False
    rows = table.filter(pa.array(superseded))
    return {name: int(pc.sum(rows.column(name)).as_py() or 0) for name in USAGE_COLUMNS}


def _rows_by_part(table: pa.Table, current: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """For each old part: its current rows and its superseded rows (row numbers)."""
    is_current = np.zeros(table.num_rows, dtype=bool)
    is_current[current] = True
    part_of = table.column("_part").to_numpy()
    row_of = table.column("_row").to_numpy()
    split: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for part in np.unique(part_of):
        mine = part_of == part
        split[int(part)] = (row_of[mine & is_current], row_of[mine & ~is_current])
    return split


def _write_staged(
    store: Store,
    compaction: str,
    names: list[str],
    rows: dict[int, tuple[np.ndarray, np.ndarray]],
    answer: pa.Field | None,
    step: Step,
) -> list[str]:
    """Step 1: old part by old part, the current rows into staged parts of ~COMPACT_ROWS rows,
    and the superseded rows beside them into `.superseded/` (paid answers are never lost: the
    resume index still reuses them and `status` still counts their tokens); every row as the
    `answer` type (one schema for the output's parts; older types are conformed to it)."""
    groups: list[list[int]] = [[]]
    count = 0
    for part in sorted(rows):
        if count >= COMPACT_ROWS:
            groups.append([])
            count = 0
        groups[-1].append(part)
        count += len(rows[part][0])
    new = []
    for seq, parts in enumerate(group for group in groups if group):
        name = data_name(f"part-compact-{compaction}-{seq:05d}.parquet")
        for which, final in enumerate((name, history_name(name))):
            if not any(len(rows[part][which]) for part in parts):
                continue
            store.create(
                staged_name(compaction, final),
                _part_writer(
                    store, [names[p] for p in parts], [rows[p][which] for p in parts], answer
                ),
            )
            new.append(final)
            step("staged")
    return new


def _part_writer(
    store: Store, names: list[str], keep: list[np.ndarray], answer: pa.Field | None
) -> Callable[[Any], None]:
    """Writes the `keep` rows of each old part, read one old part at a time, as `answer`."""

    def write(file: Any) -> None:
        schema = row_schema(answer)
        with pq.ParquetWriter(file, schema, compression="zstd") as writer:
            for (_, batches), rows in zip(
                read_parts(store, names, ROW_SCHEMA.names, schema.field(ANSWER)), keep, strict=True
            ):
                table = pa.Table.from_batches(list(batches), schema)
                if len(rows):
                    writer.write_table(table.take(pa.array(rows)))

    return write
