"""The resume index's facts, cached beside the parts: committed parts never change.

For each committed row, what the resume rule (`pipeline/dataset.py`) needs and nothing more —
53 bytes, no strings: a digest of its (image_root, image_path, task) group, the file digest a
rerun compares with a stat or a listing, the leading 16 bytes of its key's sha256, its settings
suffix (dictionary-encoded), its time, and three flags (ok, error, retryable).

Computing them means reading five string columns of every part and hashing in Python (~2 s for
a million rows, and on an object store a transfer of those columns); reading them back from the
cache is one Arrow IPC file per few thousand parts, zero-copy. Layout: `.index/facts-<digest>.arrow`
under the output (a hidden folder no reader globs), each file covering a list of parts
(name, size, rows: in its schema metadata) with their rows in that order. Loading takes the
largest files that cover only parts still present, computes the facts of the parts none covers
and — for the output's writer only — stores those as one more file; once more than
CHECKPOINT_FILES files are in use it writes one covering everything and deletes the rest, the
way Delta Lake writes a checkpoint every 10 commits so a reader never replays a long log. A
file naming a part that is gone (compacted away) is ignored, and deleted by the writer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.stores import Entry, Store

log = logging.getLogger(__name__)

FACTS_DIR = ".index"
CHECKPOINT_FILES = 10  # Delta Lake's checkpointInterval
OK, ERROR, RETRYABLE = 1, 2, 4
COLUMNS = (
    "image_root",
    "image_path",
    "task",
    "completed_at",
    "file_size",
    "file_mtime_ns",
    "key",
    "status",
    "retryable",
    "error",
)
SCHEMA = pa.schema(
    [
        ("group", pa.uint64()),
        ("file", pa.binary(16)),
        ("sha", pa.binary(16)),
        ("suffix", pa.dictionary(pa.int32(), pa.string())),
        ("when", pa.int64()),
        ("flags", pa.uint8()),
    ]
)
_COVERS = b"gemini_vision_pipeline.covers"
_OLDEST = np.iinfo(np.int64).min  # a row without completed_at loses to any row with one
# Error rows written before the `retryable` column (schema 1) that were transient or the run's
# own failure (a key, an outage, a quota), recognised by their error text: retried like new ones.
_OLD_RETRYABLE = (
    r"^(?:\d{3} )?(?:DEADLINE_EXCEEDED|UNAVAILABLE|DATA_LOSS|INTERNAL|RESOURCE_EXHAUSTED"
    r"|UNAUTHENTICATED|PERMISSION_DENIED|NOT_FOUND|ABORTED|UNKNOWN)\b"
    r"|API key not valid|API_KEY_INVALID|stopped before an answer"
)
_ZERO_SHA = "0" * 32


class Facts:
    """The facts of every committed row, in part order (rows of a part in their order)."""

    def __init__(self, tables: list[pa.Table], part_numbers: list[np.ndarray]) -> None:
        self.rows = sum(table.num_rows for table in tables)
        self._tables = tables
        self.group = _concat([t.column("group").to_numpy() for t in tables], np.uint64)
        self.when = _concat([t.column("when").to_numpy() for t in tables], np.int64)
        self.flags = _concat([t.column("flags").to_numpy() for t in tables], np.uint8)
        # position: part number then row number, one int64 (parts hold < 2**32 rows)
        rows = [np.arange(t.num_rows, dtype=np.int64) for t in tables]
        place = [(p.astype(np.int64) << 32) | r for p, r in zip(part_numbers, rows, strict=True)]
        self.place = _concat(place, np.int64)

    def mine(self, suffix: str) -> np.ndarray:
        """Which rows were made under the settings `suffix`."""
        pieces = []
        for table in self._tables:
            for chunk in table.column("suffix").chunks:
                same = pc.equal(chunk.dictionary, suffix).to_numpy(zero_copy_only=False)
                indices = chunk.indices.fill_null(-1).to_numpy()
                pieces.append(np.where(indices >= 0, same[np.maximum(indices, 0)], False))
        return _concat(pieces, np.bool_)

    def done(self, suffix: str, retry_errors: bool, retry_runs: int) -> bytes:
        """File digests of the files whose current row says: skip (see dataset's rule)."""
        if not self.rows:
            return b""
        order = np.lexsort((self.place, self.when, self.group))
        newest = np.ones(len(order), dtype=bool)
        newest[:-1] = self.group[order][1:] != self.group[order][:-1]
        current = order[newest]
        del order, newest
        mine = self.mine(suffix)
        current = current[mine[current]]
        error = (self.flags & ERROR) != 0
        if retry_errors:
            current = current[~error[current]]
        else:
            retryable = ((self.flags & RETRYABLE) != 0) & mine
            current = current[~_retry_now(current, self.group, retryable, retry_runs)]
        return self._fixed("file", np.sort(current))

    def ok_digests(self, suffix: str) -> bytes:
        """sha heads of every row answered ok under `suffix` (any path, current or not)."""
        wanted = self.mine(suffix) & ((self.flags & OK) != 0)
        return self._fixed("sha", np.flatnonzero(wanted))

    def _fixed(self, column: str, rows: np.ndarray) -> bytes:
        values = _concat([_binary16(t.column(column)) for t in self._tables], "V16")
        return values[rows].tobytes()


def _retry_now(
    current: np.ndarray, group: np.ndarray, retryable: np.ndarray, retry_runs: int
) -> np.ndarray:
    """For each current row: a retryable error tried fewer than 1 + retry_runs times."""
    retry = np.zeros(len(current), dtype=bool)
    candidates = retryable[current]
    if candidates.any():
        groups, tries = np.unique(group[retryable], return_counts=True)
        at = np.searchsorted(groups, group[current[candidates]])
        retry[candidates] = tries[at] <= retry_runs
    return retry


def _concat(pieces: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def _binary16(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed_size_binary(16) column as a numpy V16 array (no copy per value)."""
    pieces = []
    for chunk in column.chunks:
        data = chunk.buffers()[1]
        pieces.append(np.frombuffer(data, dtype="V16", count=len(chunk), offset=chunk.offset * 16))
    return _concat(pieces, "V16")


# ------------------------------------------------------------------------------- loading
def load_facts(store: Store, parts: list[Entry], *, write: bool) -> Facts:
    """The facts of `parts` (in this order), from the cache where it covers them."""
    number = {(entry.name, entry.size): at for at, entry in enumerate(parts)}
    used, stale = _usable_cache(store, number)
    covered = {part for _, covers, _ in used for part in covers}
    missing = [entry for entry in parts if (entry.name, entry.size) not in covered]
    if missing:
        computed = _compute(store, missing)
        used.append(("", [(e.name, e.size) for e in missing], computed))
        if write:
            _store_facts(store, [(e.name, e.size) for e in missing], computed)
    if write:
        _tidy(store, used, stale, parts)
    tables = [table for _, _, table in used]
    numbers = [_part_numbers(covers, table, number) for _, covers, table in used]
    return Facts(tables, numbers)


def _part_numbers(
    covers: list[tuple[str, int]], table: pa.Table, number: dict[tuple[str, int], int]
) -> np.ndarray:
    counts = json.loads(table.schema.metadata[_COVERS])["rows"]
    return np.repeat(np.array([number[part] for part in covers], dtype=np.int64), counts)


def _usable_cache(
    store: Store, number: dict[tuple[str, int], int]
) -> tuple[list[tuple[str, list[tuple[str, int]], pa.Table]], list[str]]:
    """The cache files to use (largest first, covering only present parts, disjoint), and the
    names of those that name a part no longer there."""
    found = []
    stale = []
    for entry in store.list(FACTS_DIR + "/"):
        table = _read(store, entry.name)
        if table is None:
            continue
        covers = [tuple(part) for part in json.loads(table.schema.metadata[_COVERS])["parts"]]
        if all(part in number for part in covers):
            found.append((entry.name, covers, table))
        else:
            stale.append(entry.name)
    found.sort(key=lambda item: len(item[1]), reverse=True)
    used, taken = [], set()
    for name, covers, table in found:
        if taken.isdisjoint(covers):
            used.append((name, covers, table))
            taken.update(covers)
    return used, stale


def _read(store: Store, name: str) -> pa.Table | None:
    """A cache file, or None when it is unreadable or gone (then it is simply not used)."""
    try:
        data = store.read(name)
        table = pa.ipc.open_file(pa.py_buffer(data)).read_all()
    except (FileNotFoundError, pa.ArrowException, OSError) as exc:
        log.info("index cache %s not used: %s", name, exc)
        return None
    if table.schema.metadata is None or _COVERS not in table.schema.metadata:
        return None
    if table.schema.remove_metadata() != SCHEMA:
        return None
    return table


def _tidy(store: Store, used: list, stale: list[str], parts: list[Entry]) -> None:
    """Delete stale cache files; past CHECKPOINT_FILES files, write one covering everything."""
    names = [name for name, _, _ in used if name]
    if len(used) > CHECKPOINT_FILES and parts:
        order = sorted(range(len(used)), key=lambda at: min(_first_part(used[at][1], parts)))
        covers = [part for at in order for part in used[at][1]]
        table = pa.concat_tables([used[at][2].replace_schema_metadata(None) for at in order])
        rows = [n for at in order for n in json.loads(used[at][2].schema.metadata[_COVERS])["rows"]]
        if _store_facts(store, covers, table, rows):
            stale = [*stale, *names]
    with contextlib.suppress(OSError):
        store.delete(stale)


def _first_part(covers: list[tuple[str, int]], parts: list[Entry]) -> list[str]:
    return [name for name, _ in covers] or [""]


def _store_facts(
    store: Store,
    covers: list[tuple[str, int]],
    table: pa.Table,
    rows: list[int] | None = None,
) -> bool:
    """Write one cache file (whole, content-named: a twin written by another loader is the
    same file). A failure only costs the next run the time to compute them again."""
    if rows is None:
        rows = json.loads(table.schema.metadata[_COVERS])["rows"]
    covering = json.dumps({"parts": covers, "rows": rows}).encode()
    name = f"{FACTS_DIR}/facts-{hashlib.blake2b(covering, digest_size=12).hexdigest()}.arrow"
    schema = SCHEMA.with_metadata({_COVERS: covering})
    # One dictionary for the whole file: the IPC file format takes no dictionary replacement.
    table = table.replace_schema_metadata(None).unify_dictionaries().combine_chunks()

    def write(file: Any) -> None:
        with pa.ipc.new_file(file, schema) as writer:
            writer.write_table(table)

    try:
        store.create(name, write)
    except FileExistsError:
        return True
    except OSError as exc:
        log.warning("index cache not written (%s); the next run computes it again", exc)
        return False
    return True


# ----------------------------------------------------------------------------- computing
def _compute(store: Store, parts: Sequence[Entry]) -> pa.Table:
    """The facts of these parts, read from their own columns (batch by batch)."""
    from pipeline.dataset import _parts_batches

    batches, rows = [], []
    for _, part in _parts_batches(store, [entry.name for entry in parts], COLUMNS):
        count = 0
        for batch in part:
            batches.append(facts_of(batch))
            count += batch.num_rows
        rows.append(count)
    covering = json.dumps({"parts": [(e.name, e.size) for e in parts], "rows": rows}).encode()
    table = pa.Table.from_batches(batches, SCHEMA) if batches else SCHEMA.empty_table()
    return table.replace_schema_metadata({_COVERS: covering})


def facts_of(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The facts of one batch of COLUMNS."""
    from pipeline.dataset import file_digest

    roots = batch.column("image_root").to_pylist()
    paths = batch.column("image_path").to_pylist()
    groups = b"".join(_groups(roots, paths, batch.column("task").to_pylist()))
    files = zip(
        roots,
        paths,
        batch.column("file_size").to_pylist(),
        batch.column("file_mtime_ns").to_pylist(),
        strict=True,
    )
    digests = b"".join(file_digest(*facts) for facts in files)
    keys = batch.column("key")
    arrays = [
        pa.array(np.frombuffer(groups, dtype="<u8"), pa.uint64()),
        pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(16), batch.num_rows, [None, pa.py_buffer(digests)]
        ),
        _sha_heads(keys),
        _suffixes(keys),
        pc.fill_null(batch.column("completed_at").cast(pa.int64()), _OLDEST),
        _flags(batch),
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=SCHEMA)


def _groups(roots: list, paths: list, tasks: list) -> Iterator[bytes]:
    for root, path, task in zip(roots, paths, tasks, strict=True):
        text = f"{root}\0{path}\0{task}".encode("utf-8", "surrogatepass")
        yield hashlib.blake2b(text, digest_size=8).digest()


def _sha_heads(keys: pa.Array) -> pa.Array:
    """The leading 16 bytes of each key's sha256 (zeros when the key is not `<sha>.<suffix>`)."""
    shaped = pc.fill_null(pc.match_substring_regex(keys, r"^[0-9a-f]{64}\."), False)
    heads = pc.if_else(shaped, pc.utf8_slice_codeunits(keys, 0, 32), _ZERO_SHA)
    raw = bytes.fromhex("".join(pc.fill_null(heads, _ZERO_SHA).to_pylist()))
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(keys), [None, pa.py_buffer(raw)])


def _suffixes(keys: pa.Array) -> pa.Array:
    """The settings suffix of each key (after its last dot), dictionary-encoded."""
    found = pc.extract_regex(keys, r"\.(?P<suffix>[^.]*)$").field("suffix")
    return pc.dictionary_encode(found).cast(pa.dictionary(pa.int32(), pa.string()))


def _flags(batch: pa.RecordBatch) -> pa.Array:
    status = batch.column("status")
    ok = pc.fill_null(pc.equal(status, "ok"), False).to_numpy(zero_copy_only=False)
    error = pc.fill_null(pc.equal(status, "error"), True)
    old = pc.fill_null(pc.match_substring_regex(batch.column("error"), _OLD_RETRYABLE), False)
    retryable = pc.and_(error, pc.fill_null(batch.column("retryable"), old))
    flags = (
        ok.astype(np.uint8) * OK
        + error.to_numpy(zero_copy_only=False).astype(np.uint8) * ERROR
        + retryable.to_numpy(zero_copy_only=False).astype(np.uint8) * RETRYABLE
    )
    return pa.array(flags, pa.uint8())
