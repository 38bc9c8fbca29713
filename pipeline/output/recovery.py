"""What a killed writer leaves, put right by the next one to hold the output's lock (a run, a
compaction, or a reader finding nobody writing): journal segments turned into their parts
without a call, a compaction finished (its record exists) or undone (it does not), unfinished
temporary files removed. Every step is idempotent: a kill during recovery is recovered again.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from typing import Any

from pipeline.output import journal
from pipeline.output.fsutil import fsync_dir, is_temp
from pipeline.output.parts import (
    COMPACTION_RECORD,
    COMPACTION_STAGED,
    LEGACY_RUNS_DIR,
    RUNS_DIR,
    data_name,
    is_legacy_part,
    output_answer,
    pending_compaction,
    read_record,
    record_name,
    staged_name,
)
from pipeline.output.stores import ObjectStore, OutputDirBusy, Store, open_store

log = logging.getLogger(__name__)


def recover_locked(store: Store) -> int:
    """Turn journal segments left by a killed run into their parts; finish or undo a killed
    compaction; remove unfinished temporary files. The caller holds the output's lock.
    Returns how many rows were recovered."""
    recover_compaction(store)
    migrate_layout(store)  # before the journal: a segment's part may be a legacy one
    recovered = sum(_recover_segment(store, segment) for segment in journal.segments(store))
    if store.local:
        temps = [e.name for e in store.list() if is_temp(e.name.rpartition("/")[2])]
        store.delete(temps)
        for name in temps:
            log.info("removed an unfinished file left by a killed run: %s", name)
    return recovered


def migrate_layout(store: Store) -> int:
    """Move the run summaries of an output written before issue 20 into `.runs/`, and its
    parts into `data/` (one rename each on disk; a copy then a delete on a bucket, where a kill
    in between leaves two copies that readers count once: `parts.visible_parts`). Returns how
    many parts moved."""
    summaries = [entry.name for entry in store.list(LEGACY_RUNS_DIR + "/")]
    for name in summaries:  # (a copy and a delete each on a bucket: a kill leaves both, alike)
        _publish(store, name, RUNS_DIR + name.removeprefix(LEGACY_RUNS_DIR), already=False)
    legacy = [entry.name for entry in store.list("part-") if is_legacy_part(entry.name)]
    if not legacy:
        return 0  # (one listing of a prefix nothing has been written under since)
    present = {entry.name for entry in store.list(data_name("part-"))}
    for name in legacy:
        _publish(store, name, data_name(name), already=data_name(name) in present)
    log.info(
        "moved %d parts into %s (the folder readers are pointed at)",
        len(legacy),
        store.join(data_name("")),
    )
    return len(legacy)


def _recover_segment(store: Store, segment: str) -> int:
    """A left-over journal segment: turned into its part unless that part exists (then its
    rows are there already: never twice); removed from the store and this machine's spill."""
    part = journal.part_for(segment)
    found = (
        journal.Recovered() if store.info(part) is not None else journal.recovered(store, segment)
    )
    rows = found.rows
    if rows:
        # a segment without a header (no typed answer) takes the output's answer column, so
        # the output keeps one schema
        answer = output_answer(store) if found.answer is None else found.answer
        for reason in journal.write_part(store, part, rows, answer):
            log.warning("%s: %s", part, reason)
        log.info("recovered %d answered rows of a killed run into %s", len(rows), part)
    journal.discard(store, segment)
    return len(rows)


def recover_writer(output_dir: str | os.PathLike[str] | Store, run_id: str) -> int:
    """Commit the journal of one `shared=True` writer known to be gone (its process died) into
    its parts, leaving the other writers' journals alone. Returns the rows recovered."""
    store = open_store(output_dir)
    mine = re.compile(rf"{re.escape(journal.PREFIX + run_id)}-\d+{re.escape(journal.SUFFIX)}")
    return sum(
        _recover_segment(store, segment)
        for segment in journal.segments(store)
        if mine.fullmatch(segment.rpartition("/")[2])
    )


def recover(output_dir: str | os.PathLike[str] | Store) -> int:
    """Readers' entry (`status`, `export`, `render`): recover a killed run's journal (and a
    killed compaction) if no run is writing the output now (a live run's journal is its own).
    Returns rows."""
    store = open_store(output_dir)
    if store.local and not os.path.isdir(store.url):
        return 0
    if not journal.segments(store) and not pending_compaction(store):
        return 0
    try:
        lock = store.lock("reader", wait=False)
    except OutputDirBusy:
        return 0
    try:
        return recover_locked(store)
    finally:
        lock.release()


# ------------------------------------------------------------------------- compactions
Step = Callable[[str], None]


def no_step(step: str) -> None:
    """Tests pass a hook here to kill the process after a given step."""


# ------------------------------------------------------------------------------ recovery
def recover_compaction(store: Store) -> None:
    """Finish a committed compaction, or undo one killed before its record (caller holds the
    output's lock)."""
    entries = store.list(".compact-")
    committed = set()
    for entry in entries:
        if (match := COMPACTION_RECORD.fullmatch(entry.name)) is not None:
            record = read_record(store, entry.name)
            if record is not None:
                finish_compaction(store, record, no_step)
            committed.add(match["id"])
    abandoned = [
        entry.name
        for entry in entries
        if (match := COMPACTION_STAGED.fullmatch(entry.name)) is not None
        and match["id"] not in committed
    ]
    if abandoned:
        store.delete(abandoned)
        log.info("removed %d parts of a compaction killed before its commit", len(abandoned))


def finish_compaction(store: Store, record: dict[str, Any], step: Step) -> None:
    """Steps 3 and 4: delete the old parts, then publish the new ones, then delete the record
    (each step idempotent: a rerun after a kill anywhere here ends the same). Old before new,
    so that a plain glob never sees both sets at once (three times the rows of a busy image,
    for as long as a killed compaction stays unfinished): it sees the old set, then only
    current rows (fewer while the new parts are being published), then the new set. Every
    old row is already in a staged part (current or superseded), which our readers read."""
    compaction = record["id"]
    present = {entry.name for entry in store.list()}
    store.delete([name for name in record["old"] if name in present])
    step("old-deleted")
    for name in record["new"]:
        staged = staged_name(compaction, name)
        if staged in present:
            _publish(store, staged, name, already=name in present)
            step("published")
    store.delete([record_name(compaction)])


def _publish(store: Store, staged: str, final: str, *, already: bool) -> None:
    """Move a part (staged, or of the old layout) to its final name: a rename on disk, a copy
    then a delete on an object store (whose copy of a whole object is all or nothing)."""
    if store.local:
        os.makedirs(os.path.dirname(store.join(final)), exist_ok=True)
        os.replace(store.join(staged), store.join(final))
        for folder in {os.path.dirname(store.join(staged)), os.path.dirname(store.join(final))}:
            fsync_dir(folder)  # a rename between folders is durable once both are
        return
    assert isinstance(store, ObjectStore)  # the one Store that is not local (and can copy)
    if not already:
        store.copy(staged, final)
    store.delete([staged])
