"""The read side: what an output holds, what is done, and what readers should see.

The results are exactly the `*.parquet` files under the output, a local folder or an
object-store prefix read through the same `Store` (the sink's unfinished parts end in `.tmp`;
hidden folders — the index cache, a compaction's staging — are never read). A row is superseded
by a newer row for the same (image_root, image_path, task): newer means a later `completed_at`,
then a later part (name order), then a later row in the part. Everything here reads only the
columns it needs, batch by batch, so an output of a million rows stays cheap to resume from.

Resume rule (`load_resume_index`): a file is done, under the settings hash `key_suffix`, when
the latest row for it and its task was made under those settings from the same file (same size
and mtime; for an object or a URL, same size and version stamp: `source.version_stamp`). Any
status counts, except that an error marked `retryable` (transient, or the run's own failure in
rows older than that column) is tried again by the next plain runs, at most RETRY_RUNS times,
and `retry_errors=True` redoes every error. So a changed prompt or model (a new key suffix), a
changed file, or a new file is done again, and a rerun after another config ran restores this
config's answers (copied from `ok_keys`, without an API call) rather than leaving the other
config's rows current.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import threading
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.cost import table_cost
from pipeline.output.index_cache import file_digest
from pipeline.output.memory import release_unused
from pipeline.output.stores import Entry, Store, is_hidden, open_store, store_key
from pipeline.records import ROW_SCHEMA, SCHEMA_VERSION

Output: TypeAlias = "str | os.PathLike[str] | Store"

PART_SUFFIX = ".parquet"
RUNS_DIR = "runs"  # the runner's JSON summary per run: runs/<run_id>.json
HISTORY_DIR = ".superseded"  # rows a compaction set aside: out of every glob, still paid for
VERSION_KEY = b"gemini_vision_pipeline.schema_version"
GROUP = ("image_root", "image_path", "task")
BATCH_ROWS = 65_536
OPEN_TOGETHER = 8  # parts whose footers and columns are fetched together from an object store
_SHA_DIGEST_BYTES = 16  # of a key's sha256: 128 bits tell a million files apart with ease
RETRY_RUNS = 3  # a retryable error is tried again by at most this many later plain runs
_TOKEN_COLUMNS = ("prompt_tokens", "output_tokens", "thoughts_tokens", "total_tokens")


class DigestSet:
    """A read-only set of 16-byte digests as two sorted uint64 arrays: 16 bytes an entry.

    A Python set of bytes would cost ~100 bytes an entry; this supports `in` and `len`, which is
    all a resume check needs.
    """

    __slots__ = ("_high", "_low", "_views")

    def __init__(self, joined: bytes | np.ndarray = b"") -> None:
        """`joined`: the digests end to end (bytes, or any buffer such as a V16 array).

        Sorted with one scratch array beside the result (the order), not four: a million
        digests are built in 0.05 s within ~40 MB (the resume index builds two of them)."""
        halves = np.frombuffer(joined, dtype="<u8").reshape(-1, 2)
        order = np.argsort(halves[:, 0])
        high, low = halves[order, 0], halves[order, 1]
        del order
        same_high = high[1:] == high[:-1]
        if (same_high & (low[1:] != low[:-1])).any():  # a 64-bit tie: rare; argsort is unstable
            order = np.lexsort((low, high))
            high, low = high[order], low[order]
        distinct = np.ones(len(high), dtype=bool)
        distinct[1:] = (high[1:] != high[:-1]) | (low[1:] != low[:-1])
        if not distinct.all():
            high, low = high[distinct], low[distinct]
        self._high, self._low = high, low
        self._views = (memoryview(self._high), memoryview(self._low))

    def __len__(self) -> int:
        return len(self._high)

    def __contains__(self, digest: object) -> bool:
        """A binary search in plain Python over memoryviews: a numpy call per lookup costs
        about four times as much (a producer asks once per file: a million times a run)."""
        if not isinstance(digest, bytes) or len(digest) != 16:
            return False
        high, low = self._views
        wanted_high = int.from_bytes(digest[:8], "little")
        wanted_low = int.from_bytes(digest[8:], "little")
        at = bisect.bisect_left(high, wanted_high)
        while at < len(high) and high[at] == wanted_high:
            if low[at] == wanted_low:
                return True
            at += 1
        return False

    def merged(self, more: Collection[bytes]) -> DigestSet:
        """A new set with `more` added. It sorts the whole: add in batches, not one by one."""
        return DigestSet(self._joined() + b"".join(more))

    def __reduce__(self) -> tuple[type[DigestSet], tuple[bytes]]:
        """Pickled as its digests (the Ray engine hands a run's `ok_keys` to its workers)."""
        return (DigestSet, (self._joined(),))

    def _joined(self) -> bytes:
        pairs = np.empty((len(self._high), 2), dtype="<u8")
        pairs[:, 0], pairs[:, 1] = self._high, self._low
        return pairs.tobytes()


class GrowingDigestSet:
    """A DigestSet that takes additions: new digests wait in a small Python set, merged into the
    compact sorted arrays every `batch` additions, so memory stays ~16 bytes an entry."""

    __slots__ = ("_batch", "_fresh", "_settled")

    def __init__(self, batch: int = 65_536) -> None:
        self._batch = batch
        self._settled = DigestSet()
        self._fresh: set[bytes] = set()

    def add(self, digest: bytes) -> None:
        if digest in self._settled:
            return
        self._fresh.add(digest)
        if len(self._fresh) >= self._batch:
            self._settled, self._fresh = self._settled.merged(self._fresh), set()

    def __contains__(self, digest: object) -> bool:
        return digest in self._fresh or digest in self._settled

    def __len__(self) -> int:
        return len(self._settled) + len(self._fresh)


class KeySet:
    """Keys (`<sha256>.<suffix>`) under one settings suffix, stored as digests of the sha256.

    `key in ok_keys` is True for a committed ok answer for those bytes and settings; a key under
    another suffix is never in it.
    """

    __slots__ = ("_digests", "suffix")

    def __init__(self, suffix: str, joined: bytes | np.ndarray = b"") -> None:
        self.suffix = suffix
        self._digests = DigestSet(joined)

    def __len__(self) -> int:
        return len(self._digests)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        sha, dot, suffix = key.rpartition(".")
        if not dot or suffix != self.suffix or len(sha) != 64:
            return False
        try:
            return bytes.fromhex(sha)[:_SHA_DIGEST_BYTES] in self._digests
        except ValueError:
            return False


@dataclass(frozen=True, slots=True)
class ResumeIndex:
    """What a run with settings hash `key_suffix` can skip, decided with a stat of each file.

    `done` holds `file_digest(image_root, image_path, size, mtime_ns)` of every file that is
    done under `key_suffix` (see the module docstring); `ok_keys` holds every key answered ok
    under these settings at any path, so the same bytes at a new path are copied, not re-paid.
    """

    key_suffix: str
    retry_errors: bool
    done: DigestSet
    ok_keys: KeySet
    rows_read: int
    visible_rows: int = 0  # rows a glob sees (not set aside by a compaction) ...
    superseded_rows: int = 0  # ... and how many of them are superseded (for compact_above)

    def is_done(self, image_root: str, image_path: str, size: int, mtime_ns: int) -> bool:
        return file_digest(image_root, image_path, size, mtime_ns) in self.done


# ------------------------------------------------------------------------------------- parts
def part_entries(output: Output, *, history: bool = False) -> list[Entry]:
    """Every committed part as readers must see it: the `*.parquet` files under the output (no
    hidden folder), in name order, with a killed compaction resolved to exactly the old or the
    new set (`pipeline/output/compact.py`). `history` adds the parts holding the superseded rows a
    compaction set aside (`.superseded/`): paid answers, kept for reuse and accounting."""
    from pipeline.output.compact import visible_parts

    store = open_store(output)
    if store.local and not os.path.isdir(store.url):
        return []
    return visible_parts(store, store.list(), history=history)


def part_files(output: Output) -> list[Path] | list[str]:
    """The committed parts' paths (local folder) or URLs (object store), in name order."""
    store = open_store(output)
    names = [entry.name for entry in part_entries(store)]
    if store.local:
        return [Path(store.join(name)) for name in names]
    return [store.join(name) for name in names]


def is_part(name: str) -> bool:
    return name.endswith(PART_SUFFIX) and not is_hidden(name)


def is_history_part(name: str) -> bool:
    folder, _, rest = name.partition("/")
    return folder == HISTORY_DIR and is_part(rest)


class UnreadablePart(ValueError):
    """A `*.parquet` file in the output that this program cannot read; names it and says what
    to do. (Parts are written whole or not at all, so this is damage from outside: a disk, a
    copy, a hand.)"""

    def __init__(self, path: Path | str, why: str, remedy: str | None = None) -> None:
        remedy = remedy or (
            f"move it aside (e.g. `mv '{path}' '{path}.corrupt'`) and rerun: the files whose "
            "rows it held are then done again"
        )
        super().__init__(f"{path}: {why}; {remedy}")
        self.path = path


def _open_part(where: str | Path | Any, shown: str) -> pq.ParquetFile:
    """Open a part (a path, or a file object from Store.open_parquet), refusing files this
    version cannot read correctly."""
    try:
        part = pq.ParquetFile(where)
    except (pa.ArrowException, OSError) as exc:
        raise UnreadablePart(shown, f"not a readable Parquet file ({_first_line(exc)})") from None
    version = (part.schema_arrow.metadata or {}).get(VERSION_KEY)
    if version is None:
        raise UnreadablePart(shown, "not written by this pipeline (no schema version)")
    if not version.isdigit() or int(version) > int(SCHEMA_VERSION):
        raise UnreadablePart(
            shown,
            f"schema version {version.decode(errors='replace')} is newer than this program's "
            f"{SCHEMA_VERSION}",
            "upgrade the pipeline to read it",
        )
    return part


def part_batches(
    path: Path | str, columns: Sequence[str], *, store: Store | None = None
) -> Iterator[pa.RecordBatch]:
    """The batches of one part (see _batches); damage anywhere in it is an UnreadablePart.
    `path` is a local path, or a part name within `store`."""
    if store is None:
        yield from _part_batches(path, str(path), columns)
        return
    (source,) = store.open_parquet([str(path)], list(columns))
    yield from _part_batches(source, store.join(str(path)), columns)


def _part_batches(source: Any, shown: str, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    """`source`: a path, or a file object (from an object store) closed once read: closing it
    drops the bytes fsspec fetched, which otherwise outlive the read (a third of a 1M-row index
    build's reads were still held when it ended: 28 MB, found with tracemalloc)."""
    try:
        part = _open_part(source, shown)
        yield from _batches(part, columns)
    except (pa.ArrowException, OSError) as exc:
        raise UnreadablePart(shown, f"damaged Parquet data ({_first_line(exc)})") from None
    finally:
        if not isinstance(source, str | Path):
            source.close()


def _parts_batches(
    store: Store, names: Sequence[str], columns: Sequence[str]
) -> Iterator[tuple[int, Iterator[pa.RecordBatch]]]:
    """(index, batches) of each part, opened OPEN_TOGETHER at a time: on an object store fsspec
    fetches their footers and then their column chunks concurrently, a few requests a part."""
    for start in range(0, len(names), OPEN_TOGETHER):
        group = list(names[start : start + OPEN_TOGETHER])
        try:
            sources = store.open_parquet(group, list(columns))
        except (pa.ArrowException, OSError, ValueError):
            sources = [None] * len(group)  # name the bad one below, part by part
        for offset, (name, source) in enumerate(zip(group, sources, strict=True)):
            if source is None:
                (source,) = store.open_parquet([name], list(columns))
            yield start + offset, _part_batches(source, store.join(name), columns)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


def _batches(part: pq.ParquetFile, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    """Batches of `columns` with ROW_SCHEMA's types; a column the part lacks reads as nulls."""
    schema = pa.schema([ROW_SCHEMA.field(name) for name in columns])
    present = [name for name in columns if name in part.schema_arrow.names]
    for batch in part.iter_batches(batch_size=BATCH_ROWS, columns=present):
        arrays = [
            batch.column(name).cast(field.type)
            if name in present
            else pa.nulls(batch.num_rows, field.type)
            for name, field in zip(columns, schema, strict=True)
        ]
        yield pa.RecordBatch.from_arrays(arrays, schema=schema)


def _scan(
    output: Output,
    columns: Sequence[str],
    *,
    skip_unreadable: bool = False,
    history: bool = False,
) -> tuple[pa.Table, list[str], list[UnreadablePart]]:
    """All rows of every part (these columns only) plus where each sits: `_part`, `_row`; the
    part names; with `skip_unreadable`, unreadable parts are left out and returned instead."""
    store = open_store(output)
    names = [entry.name for entry in part_entries(store, history=history)]
    tables = []
    unreadable: list[UnreadablePart] = []
    for part_no, batches in _parts_batches(store, names, columns):
        try:
            read = list(batches)
        except UnreadablePart as exc:
            if not skip_unreadable:
                raise
            unreadable.append(exc)
            continue
        start = 0
        for batch in read:
            tables.append(_with_position(pa.Table.from_batches([batch]), part_no, start))
            start += batch.num_rows
    if not tables:
        empty = pa.schema([ROW_SCHEMA.field(name) for name in columns]).empty_table()
        return _with_position(empty, 0, 0), names, unreadable
    return pa.concat_tables(tables), names, unreadable


def _with_position(table: pa.Table, part_no: int, start: int) -> pa.Table:
    n = table.num_rows
    table = table.append_column("_part", pa.array(np.full(n, part_no, dtype=np.int32)))
    return table.append_column("_row", pa.array(np.arange(start, start + n, dtype=np.int32)))


def _latest(table: pa.Table) -> np.ndarray:
    """Indices of the current rows (the newest per image_root, image_path, task), in that order.

    One multi-key sort puts each group's rows together, oldest first; the last row before the
    group changes wins. (Cheaper in memory than a hash group-by on three string columns.)
    """
    if table.num_rows == 0:
        return np.zeros(0, dtype=np.int64)
    when = pc.fill_null(
        table.column("completed_at"), pa.scalar(0, ROW_SCHEMA.field("completed_at").type)
    )
    keyed = table.select([*GROUP, "_part", "_row"]).append_column("_when", when)
    order = pc.sort_indices(
        keyed, sort_keys=[(name, "ascending") for name in (*GROUP, "_when", "_part", "_row")]
    )
    last = np.zeros(len(order), dtype=bool)
    last[-1] = True
    for name in GROUP:
        ordered = keyed.column(name).take(order)
        last[:-1] |= _differs(ordered[:-1], ordered[1:])
    return order.to_numpy()[last]


def _differs(a: pa.ChunkedArray, b: pa.ChunkedArray) -> np.ndarray:
    """Element-wise a != b where two nulls are equal."""
    both_null = pc.and_(pc.is_null(a), pc.is_null(b))
    differs = pc.and_(pc.fill_null(pc.not_equal(a, b), True), pc.invert(both_null))
    return differs.to_numpy()


# ------------------------------------------------------------------------------------ resume
def load_resume_index(
    output: Output, *, key_suffix: str, retry_errors: bool, write_cache: bool = False
) -> ResumeIndex:
    """Read what is committed into a compact index for a run under settings `key_suffix`.

    The facts each decision needs — ~50 bytes a row, no strings — come from the index cache
    (`pipeline/output/index_cache.py`: committed parts never change, so their facts are computed
    once and kept beside them) or, for parts it does not cover yet, from the parts' own columns.
    `write_cache` (the output's writer only) stores the new facts for the next run. A sort of
    those finds each file's current row.
    """
    from pipeline.output.index_cache import load_facts

    store = open_store(output)
    parts = part_entries(store, history=True)
    facts = load_facts(store, parts, suffix=key_suffix, write=write_cache)
    visible, superseded = facts.superseded([is_history_part(entry.name) for entry in parts])
    done, ok, rows = facts.done(retry_errors, RETRY_RUNS), facts.ok_digests(), facts.rows
    del facts  # before the sorted sets are built: their scratch is the peak otherwise
    done_set = DigestSet(done)
    del done  # each input goes as soon as its set is built: the peak is one set's scratch
    ok_keys = KeySet(key_suffix, ok)
    del ok
    # The scratch memory is free now; hand it back rather than keep it for the whole run.
    release_unused()
    return ResumeIndex(
        key_suffix=key_suffix,
        retry_errors=retry_errors,
        done=done_set,
        ok_keys=ok_keys,
        rows_read=rows,
        visible_rows=visible,
        superseded_rows=superseded,
    )


# ------------------------------------------------------------------------------------ lookup
def lookup_rows(output: Output, keys: Collection[str]) -> dict[str, dict]:
    """The newest ok row for each of `keys` (any path), as dicts: an answer to copy, not re-pay.

    Called once per file whose bytes were already answered, so it must not rescan a million
    rows each time: an index of where ok rows sit is kept per output and extended with new
    parts only (committed parts never change), then only the candidate rows are read.
    """
    wanted = set(keys)
    store = open_store(output)
    parts = part_entries(store, history=True)
    with _LOCATIONS_LOCK:
        home = store_key(store)
        locations = _LOCATIONS.get(home)
        if locations is None or not locations.still_valid(parts):
            while len(_LOCATIONS) >= _LOCATIONS_KEPT:
                del _LOCATIONS[next(iter(_LOCATIONS))]
            locations = _LOCATIONS[home] = _OkRowLocations(store)
        locations.extend(parts)
        candidates = locations.candidates(wanted)
    best: dict[str, tuple[tuple[Any, ...], dict]] = {}
    for name, rows in candidates.items():
        batches = part_batches(name, ROW_SCHEMA.names, store=store)
        part = pa.Table.from_batches(list(batches), ROW_SCHEMA)
        for row_no, row in zip(rows, part.take(pa.array(rows)).to_pylist(), strict=True):
            if row["key"] not in wanted or row["status"] != "ok":
                continue  # same leading sha bytes, another key
            when = row["completed_at"]
            rank = (when is not None, when, name.split("/"), row_no)
            if row["key"] not in best or rank > best[row["key"]][0]:
                best[row["key"]] = (rank, row)
    return {key: row for key, (_, row) in best.items()}


class _OkRowLocations:
    """Where the ok rows are, by the first 8 bytes of their key's sha256 (several keys may share
    them; the caller checks the full key). A part is known by name, size and version: a part
    rewritten under the same name is another part."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.parts: list[Entry] = []
        self._sha = np.zeros(0, dtype=np.uint64)
        self._part = np.zeros(0, dtype=np.int32)
        self._row = np.zeros(0, dtype=np.int32)

    def still_valid(self, parts: list[Entry]) -> bool:
        """False when a part we indexed is gone or was rewritten (a hand-made change)."""
        return set(self.parts) <= set(parts)

    def extend(self, parts: list[Entry]) -> None:
        known = set(self.parts)
        new = [part for part in parts if part not in known]
        if not new:
            return
        sha, part, row = [self._sha], [self._part], [self._row]
        names = [entry.name for entry in new]
        for offset, batches in _parts_batches(self.store, names, ("key", "status")):
            table = pa.Table.from_batches(list(batches))
            keys = table.column("key")
            ok = pc.and_(
                pc.fill_null(pc.equal(table.column("status"), "ok"), False),
                pc.fill_null(pc.match_substring_regex(keys, r"^[0-9a-f]{64}\."), False),
            )
            heads = pc.utf8_slice_codeunits(pc.filter(keys, ok), 0, 16).to_pylist()
            sha.append(np.frombuffer(bytes.fromhex("".join(heads)), dtype=">u8").astype(np.uint64))
            row.append(np.flatnonzero(ok.to_numpy(zero_copy_only=False)).astype(np.int32))
            part.append(np.full(len(heads), len(self.parts), dtype=np.int32))
            self.parts.append(new[offset])
        order = np.argsort(np.concatenate(sha), kind="stable")
        self._sha = np.concatenate(sha)[order]
        self._part = np.concatenate(part)[order]
        self._row = np.concatenate(row)[order]

    def candidates(self, keys: set[str]) -> dict[str, list[int]]:
        """Rows (by part name) that may hold one of `keys`."""
        found: dict[str, list[int]] = {}
        for key in keys:
            if not re.match(r"[0-9a-f]{64}\.", key):
                continue
            head = np.uint64(int(key[:16], 16))
            start = int(np.searchsorted(self._sha, head, side="left"))
            end = int(np.searchsorted(self._sha, head, side="right"))
            for part, row in zip(self._part[start:end], self._row[start:end], strict=True):
                found.setdefault(self.parts[int(part)].name, []).append(int(row))
        return {name: sorted(set(rows)) for name, rows in found.items()}


_LOCATIONS: dict[str, _OkRowLocations] = {}
_LOCATIONS_KEPT = 4  # outputs whose index stays in memory
_LOCATIONS_LOCK = threading.Lock()


# ----------------------------------------------------------------------------------- readers
def current_rows(output_dir: Output, columns: Sequence[str] | None = None) -> pa.Table:
    """The current row per (image_root, image_path, task), sorted by those three.

    Two passes: the first reads only what decides which row is current, the second reads the
    requested columns of those rows part by part, so memory follows the answer, not the history.
    """
    wanted = list(columns) if columns is not None else list(ROW_SCHEMA.names)
    unknown = [name for name in wanted if name not in ROW_SCHEMA.names]
    if unknown:
        raise ValueError(f"unknown columns: {unknown}")
    schema = pa.schema([ROW_SCHEMA.field(name) for name in wanted])
    store = open_store(output_dir)
    table, names, _ = _scan(store, (*GROUP, "completed_at"))
    current = table.take(pa.array(_latest(table)))
    if current.num_rows == 0:
        return schema.empty_table()
    part_of = current.column("_part").to_numpy()
    row_of = current.column("_row").to_numpy()
    pieces, placed = [], []
    used = [names[int(n)] for n in np.unique(part_of)]
    for (_, batches), part_no in zip(
        _parts_batches(store, used, wanted), np.unique(part_of), strict=True
    ):
        at = np.flatnonzero(part_of == part_no)
        part = pa.Table.from_batches(list(batches), schema)
        pieces.append(part.take(pa.array(row_of[at])))
        placed.append(at)
    gathered = pa.concat_tables(pieces)
    return gathered.take(pa.array(np.argsort(np.concatenate(placed), kind="stable")))


def status(output_dir: Output) -> dict[str, Any]:
    """Counts by status of the current rows, tokens of every committed row, the latest run.

    Tokens are summed over every committed row, superseded ones too (they were paid for); rows
    copied from another path carry no billed tokens. `est_prompt_tokens` (the estimate of the
    whole input, image included, made before the call) is compared with the billed
    `prompt_tokens` on the rows that have both. `cost` prices those tokens (pipeline/cost.py:
    rows bought in Batch Mode at the batch price).
    """
    columns = (*GROUP, "completed_at", "status", "run_id", *_TOKEN_COLUMNS, "est_prompt_tokens")
    columns += ("model", "input_mode")
    store = open_store(output_dir)
    table, names, unreadable = _scan(store, columns, skip_unreadable=True, history=True)
    current = table.take(pa.array(_latest(table)))
    by_status = Counter(
        {str(k): int(v) for k, v in _value_counts(current.column("status")).items()}
    )
    billed = {name: _sum(table.column(name)) for name in _TOKEN_COLUMNS}
    has_bill = pc.is_valid(table.column("prompt_tokens"))
    estimate = _sum(pc.filter(table.column("est_prompt_tokens"), has_bill))
    billed_prompt = billed["prompt_tokens"]
    return {
        "output_dir": store.url,
        "parts": len(names),
        "unreadable_parts": [str(exc) for exc in unreadable],
        "rows": current.num_rows,
        "rows_committed": table.num_rows,
        "superseded": table.num_rows - current.num_rows,
        "runs": len(pc.unique(table.column("run_id").drop_null())),
        "by_status": dict(sorted(by_status.items())),
        "tokens": {
            "prompt": billed_prompt,
            "output": billed["output_tokens"],
            "thoughts": billed["thoughts_tokens"],
            "total": billed["total_tokens"],
            "estimated_prompt": estimate,
            "estimate_error": (estimate - billed_prompt) / billed_prompt if billed_prompt else None,
        },
        "cost": table_cost(table),
        "latest_run": _latest_run_summary(store),
    }


def _value_counts(column: pa.ChunkedArray) -> dict[str | None, int]:
    counts = pc.value_counts(column.combine_chunks()) if len(column) else []
    return {item["values"].as_py(): item["counts"].as_py() for item in counts}


def _sum(column: pa.Array | pa.ChunkedArray) -> int:
    total = pc.sum(column).as_py() if len(column) else None
    return int(total or 0)


def _latest_run_summary(store: Store) -> dict[str, Any] | None:
    """The newest readable runs/<run_id>.json of a run (run ids start with their UTC start
    time; reports of other commands, such as compactions, are not runs)."""
    if store.local and not os.path.isdir(store.join(RUNS_DIR)):
        return None
    names = [e.name for e in store.list(RUNS_DIR + "/") if e.name.endswith(".json")]
    for name in sorted(names, reverse=True):
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
        f"output: {report['output_dir']}",
        f"rows: {report['rows']:,} current ({report['rows_committed']:,} committed in "
        f"{_count(report['parts'], 'part')} by {_count(report['runs'], 'run')}; "
        f"{report['superseded']:,} superseded)",
        "status: " + (" · ".join(f"{k} {v:,}" for k, v in by_status.items()) or "no rows yet"),
        f"tokens billed: prompt {tokens['prompt']:,} · output {tokens['output']:,} · "
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
    errors = by_status.get("error", 0)
    if errors:
        lines.append(f"remaining: {errors:,} error rows; rerun with --retry-errors to redo them")
    pending = report.get("pending")
    if pending:
        lines.append(
            f"remaining under {pending['config']}: {pending['remaining']:,} of "
            f"{pending['files']:,} files ({pending['done']:,} done)"
        )
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


def _cost_line(cost: dict[str, Any]) -> str:
    unpriced = cost["unpriced_rows"]
    return (
        f"cost: ${cost['usd']:,.4f} (interactive ${cost['interactive_usd']:,.4f}, Batch Mode "
        f"${cost['batch_usd']:,.4f} at the batch price; pipeline/models.json)"
        + (f"; {unpriced:,} rows of models without a price" if unpriced else "")
    )


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")
