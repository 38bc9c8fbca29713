"""The parts of an output, as every reader of this project sees them: which `*.parquet` files are
committed (a killed compaction resolved to exactly its old or its new set), how a part is
written whole and read back batch by batch, and which rows are current.

Layout of an output (a local folder or an object-store prefix, through `stores.Store`):
`data/part-<run id>-<seq>.parquet` (the current rows, and nothing else: `data/` is the folder
every reader is pointed at, because Polars walks a folder recursively and fails on any file
below it that is not Parquet, dot- and underscore-names included), `.superseded/` (superseded
rows set aside: paid answers, out of every reader's sight), `.runs/<run id>.json` (summaries),
`.journal-*` (answers not yet in a part: `journal.py`), `.index/` (the resume index's cache:
`index_cache.py`), `.compact-<id>/` and `.compact-<id>.json` (a compaction's staging and its
commit record: `compact.py`), `.state.sqlite` (`state.py`). Every sidecar's name starts with a
dot, so pandas, pyarrow and `datasets` pointed at the output itself find `data/` alone (Polars
must be pointed at `data/`). Outputs written before `data/` existed hold their parts at the top
level (and `runs/`, `state.sqlite`): read as they are, moved by the next writer
(`recovery.migrate_layout`, `state.State`).

A row is superseded by a newer row for the same (image_root, image_path, task): newer means a
later `completed_at`, then a later part (name order), then a later row in the part
(`latest_rows`). Everything here reads only the columns it needs, batch by batch, so an output
of a million rows stays cheap to read.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.output.stores import Entry, Store, UnreadablePart, is_hidden, open_store
from pipeline.records import (
    ANSWER,
    ROW_SCHEMA,
    SCHEMA_VERSION,
    answer_field,
    conform_array,
    row_schema,
    to_table,
)

Output: TypeAlias = "str | os.PathLike[str] | Store"
PART_SUFFIX = ".parquet"
DATA_DIR = "data"  # the parts and nothing else: what DuckDB, Polars, pandas, datasets... read
# The runner's JSON summary per run: .runs/<run_id>.json. Hidden, as every sidecar is, so that
# pandas, pyarrow and `datasets` reading the output's own folder skip it and find `data/`
# (`runs/` before issue 20: moved by the next writer, `recovery.migrate_layout`).
RUNS_DIR = ".runs"
LEGACY_RUNS_DIR = "runs"
HISTORY_DIR = ".superseded"  # rows a compaction set aside: out of every glob, still paid for
VERSION_KEY = b"gemini_vision_pipeline.schema_version"
GROUP = ("image_root", "image_path", "task")
READ_ROWS = 65_536
OPEN_TOGETHER = 8  # parts whose footers and columns are fetched together from an object store


def part_entries(output: Output, *, history: bool = False) -> list[Entry]:
    """Every committed part as readers must see it: the `*.parquet` files under the output (no
    hidden folder), in name order, with a killed compaction resolved to exactly the old or the
    new set (`pipeline/output/compact.py`). `history` adds the parts holding the superseded rows a
    compaction set aside (`.superseded/`): paid answers, kept for reuse and accounting."""
    store = open_store(output)
    if store.local and not os.path.isdir(store.url):
        return []
    return visible_parts(store, store.list(), history=history)


def data_name(base: str) -> str:
    """The name of a part called `base` (`part-<run id>-<seq>.parquet`) in the output."""
    return f"{DATA_DIR}/{base}"


def part_files(output: Output) -> list[Path] | list[str]:
    """The committed parts' paths (local folder) or URLs (object store), in name order."""
    store = open_store(output)
    names = [entry.name for entry in part_entries(store)]
    if store.local:
        return [Path(store.join(name)) for name in names]
    return [store.join(name) for name in names]


def is_part(name: str) -> bool:
    """A part readers see: `data/<name>.parquet` (or, in an output written before `data/`
    existed, `<name>.parquet` at the top level: `is_legacy_part`)."""
    folder, _, base = name.rpartition("/")
    return folder in (DATA_DIR, "") and _is_parquet(base)


def is_legacy_part(name: str) -> bool:
    return "/" not in name and _is_parquet(name)


def is_history_part(name: str) -> bool:
    folder, _, base = name.rpartition("/")
    return folder == HISTORY_DIR and _is_parquet(base)


def history_name(name: str) -> str:
    """Where a part's superseded rows are set aside (flat under `.superseded/`)."""
    return f"{HISTORY_DIR}/{name.rpartition('/')[2]}"


def _is_parquet(base: str) -> bool:
    return base.endswith(PART_SUFFIX) and not is_hidden(base)


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


def read_part(
    path: Path | str,
    columns: Sequence[str],
    *,
    store: Store | None = None,
    answer: pa.Field | None = None,
) -> Iterator[pa.RecordBatch]:
    """The batches of one part (see _record_batches); damage anywhere in it is an UnreadablePart.
    `path` is a local path, or a part name within `store`."""
    if store is None:
        yield from _read_source(path, str(path), columns, answer)
        return
    source = _open_alone(store, str(path), columns)
    yield from _read_source(source, store.join(str(path)), columns, answer)


def _read_source(
    source: Any, shown: str, columns: Sequence[str], answer: pa.Field | None = None
) -> Iterator[pa.RecordBatch]:
    """`source`: a path, or a file object (from an object store) closed once read: closing it
    drops the bytes fsspec fetched, which otherwise outlive the read (a third of a 1M-row index
    build's reads were still held when it ended: 28 MB, found with tracemalloc)."""
    try:
        part = _open_part(source, shown)
        yield from _record_batches(part, columns, answer)
    except (pa.ArrowException, OSError) as exc:
        raise UnreadablePart(shown, f"damaged Parquet data ({_first_line(exc)})") from None
    finally:
        if not isinstance(source, str | Path):
            source.close()


def read_parts(
    store: Store, names: Sequence[str], columns: Sequence[str], answer: pa.Field | None = None
) -> Iterator[tuple[int, Iterator[pa.RecordBatch]]]:
    """(index, batches) of each part, opened OPEN_TOGETHER at a time: on an object store fsspec
    fetches their footers and then their column chunks concurrently, a few requests a part.
    `answer`: the type every part's `answer` column is read as (None: each part's own)."""
    for start in range(0, len(names), OPEN_TOGETHER):
        group = list(names[start : start + OPEN_TOGETHER])
        try:
            sources = store.open_parquet(group, list(columns))
        except (pa.ArrowException, OSError, ValueError):
            sources = [None] * len(group)  # name the bad one below, part by part
        for offset, (name, source) in enumerate(zip(group, sources, strict=True)):
            if source is None:
                yield start + offset, _read_alone(store, name, columns, answer)
                continue
            yield start + offset, _read_source(source, store.join(name), columns, answer)


def _read_alone(
    store: Store, name: str, columns: Sequence[str], answer: pa.Field | None
) -> Iterator[pa.RecordBatch]:
    """A part of a group that failed to open, opened when its batches are read: a damaged part
    then fails where the caller reads it, as on disk (`scan` skipping unreadable parts caught
    it only there, so one unreadable part on an object store failed `pipeline status`)."""
    source = _open_alone(store, name, columns)
    yield from _read_source(source, store.join(name), columns, answer)


def _open_alone(store: Store, name: str, columns: Sequence[str]) -> Any:
    """One part opened by itself, after its group failed: fsspec reads the footer while opening
    on an object store, so a damaged part fails here, and must be named as one."""
    try:
        (source,) = store.open_parquet([name], list(columns))
    except (pa.ArrowException, ValueError) as exc:
        why = f"not a readable Parquet file ({_first_line(exc)})"
        raise UnreadablePart(store.join(name), why) from None
    return source


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


def _record_batches(
    part: pq.ParquetFile, columns: Sequence[str], answer: pa.Field | None = None
) -> Iterator[pa.RecordBatch]:
    """Batches of `columns` with the row schema's types; a column the part lacks reads as nulls.
    `answer` is conformed to `answer` (records.conform_array), or kept as the part has it."""
    schema = columns_schema(columns, answer_field(part.schema_arrow) if answer is None else answer)
    present = [name for name in columns if name in part.schema_arrow.names]
    for batch in part.iter_batches(batch_size=READ_ROWS, columns=present):
        arrays = [
            _as_field(batch.column(name), field)
            if name in present
            else pa.nulls(batch.num_rows, field.type)
            for name, field in zip(columns, schema, strict=True)
        ]
        yield pa.RecordBatch.from_arrays(arrays, schema=schema)


def _as_field(column: pa.Array, field: pa.Field) -> pa.Array:
    # the fixed columns only ever widen across versions (a plain cast); `answer` changes with
    # the response_schema, so a value the newer type cannot hold becomes null instead of failing
    if field.name == ANSWER:
        return conform_array(column, field.type)
    return column.cast(field.type)


def columns_schema(columns: Sequence[str], answer: pa.Field | None = None) -> pa.Schema:
    """The schema of these columns of an output whose answer field is `answer`."""
    full = row_schema(answer)
    return pa.schema([full.field(name) for name in columns])


def newest_answer(store: Store, names: Sequence[str]) -> pa.Field | None:
    """The `answer` field of the newest of these parts (by `written_at`), which the others are
    read as; None without parts. One footer read."""
    if not names:
        return None
    ((answer, _),) = part_shapes(store, [max(names, key=written_at)])
    return answer


def part_shapes(store: Store, names: Sequence[str]) -> list[tuple[pa.Field, int]]:
    """(the `answer` field, the row count) of each of these parts, from their footers."""
    shapes = []
    for name in names:
        source = _open_alone(store, name, [ANSWER])
        try:
            part = _open_part(source, store.join(name))
            shapes.append((answer_field(part.schema_arrow), part.metadata.num_rows))
        finally:
            if not isinstance(source, str | Path):
                source.close()
    return shapes


def _newest_row_answer(store: Store, table: pa.Table, names: list[str]) -> pa.Field | None:
    if table.num_rows == 0:
        return None
    when = pc.fill_null(table.column("completed_at"), pa.scalar(0, table["completed_at"].type))
    newest = int(table.column("_part")[pc.index(when, pc.max(when)).as_py()].as_py())
    return newest_answer(store, [names[newest]])


def written_at(name: str) -> str:
    """A part name's sort key in time: what follows `part-` (and a compaction's `compact-`) is a
    run or compaction id, which begins with its UTC start (records.new_run_id)."""
    base = name.rpartition("/")[2].removeprefix("part-")
    return base.removeprefix("compact-")


def output_answer(output: Output) -> pa.Field | None:
    """The `answer` field of an output as it stands (its newest part's), None when it has none:
    what a run without a schema of its own writes, so the output keeps one schema."""
    store = open_store(output)
    return newest_answer(store, [entry.name for entry in part_entries(store)])


def scan(
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
    for part_no, batches in read_parts(store, names, columns):
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


def latest_rows(table: pa.Table) -> np.ndarray:
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
    store = open_store(output_dir)
    table, names, _ = scan(store, (*GROUP, "completed_at"))
    # parts written under another response_schema are read as the answer type of the part
    # holding the newest row (by completed_at: a compaction's part sorts last by name)
    answer = _newest_row_answer(store, table, names) if ANSWER in wanted else None
    schema = columns_schema(wanted, answer)
    current = table.take(pa.array(latest_rows(table)))
    if current.num_rows == 0:
        return schema.empty_table()
    part_of = current.column("_part").to_numpy()
    row_of = current.column("_row").to_numpy()
    pieces, placed = [], []
    used = [names[int(n)] for n in np.unique(part_of)]
    for (_, batches), part_no in zip(
        read_parts(store, used, wanted, answer), np.unique(part_of), strict=True
    ):
        at = np.flatnonzero(part_of == part_no)
        part = pa.Table.from_batches(list(batches), schema)
        pieces.append(part.take(pa.array(row_of[at])))
        placed.append(at)
    gathered = pa.concat_tables(pieces)
    return gathered.take(pa.array(np.argsort(np.concatenate(placed), kind="stable")))


# ------------------------------------------------------------- a compaction's commit record
COMPACTION_RECORD = re.compile(r"\.compact-(?P<id>[0-9A-Za-z_-]+)\.json")
COMPACTION_STAGED = re.compile(r"\.compact-(?P<id>[0-9A-Za-z_-]+)/(?P<name>.+)")


# ------------------------------------------------------------------------------- readers
def visible_parts(store: Store, entries: list[Entry], *, history: bool = False) -> list[Entry]:
    """The parts a reader must see in a listing, a committed compaction applied (module doc);
    with `history`, the set-aside superseded rows' parts too."""
    wanted = (lambda name: is_part(name) or is_history_part(name)) if history else is_part
    parts = _migrated_once([entry for entry in entries if wanted(entry.name)])
    records = [entry.name for entry in entries if COMPACTION_RECORD.fullmatch(entry.name)]
    if not records:
        return parts
    by_name = {entry.name: entry for entry in entries}
    for name in records:
        record = read_record(store, name)
        if record is None:
            continue
        old = set(record["old"])
        parts = [entry for entry in parts if entry.name not in old]
        published = {entry.name for entry in parts}
        for new in record["new"]:
            staged = by_name.get(staged_name(record["id"], new))
            if new not in published and staged is not None and wanted(new):
                parts.append(staged)
    return sorted(parts, key=lambda entry: entry.name)


def _migrated_once(parts: list[Entry]) -> list[Entry]:
    """A legacy top-level part whose copy in `data/` exists already is the same part, caught
    between a bucket's copy and delete (`recovery.migrate_layout`): read once, from `data/`."""
    moved = {entry.name for entry in parts if entry.name.startswith(DATA_DIR + "/")}
    return [entry for entry in parts if data_name(entry.name) not in moved]


def pending_compaction(store: Store) -> bool:
    """Whether a killed compaction left anything behind (staging or a record)."""
    return any(name.startswith(".compact-") for name in (e.name for e in store.list(".compact-")))


def read_record(store: Store, name: str) -> dict[str, Any] | None:
    try:
        record = json.loads(store.read(name))
    except FileNotFoundError:
        return None  # finished by another process meanwhile
    return record if isinstance(record, dict) else None


def staged_name(compaction: str, name: str) -> str:
    return f".compact-{compaction}/{name}"


def record_name(compaction: str) -> str:
    return f".compact-{compaction}.json"


# ----------------------------------------------------------------------------- writing
COMPRESSION = "zstd"


# ----------------------------------------------------------------------------- store side
def write_part(
    store: Store,
    name: str,
    rows: list[dict[str, Any]],
    segment: str | None,
    answer: pa.Field | None = None,
) -> list[str]:
    """Commit `rows` as the part `name`, then delete the journal segment they came from."""
    table, reasons = to_table(rows, answer)
    store.create(name, lambda file: pq.write_table(table, file, compression=COMPRESSION))
    if segment is not None:
        store.delete_appended(segment)
    return reasons
