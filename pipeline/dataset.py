"""The read side: what an output directory holds, what is done, and what readers should see.

The results are exactly the `*.parquet` files under the output directory (the sink's unfinished
parts end in `.tmp` and are never read). A row is superseded by a newer row for the same
(image_root, image_path, task): newer means a later `completed_at`, then a later part (path
order), then a later row in the part. Everything here reads only the columns it needs, batch by
batch, so a directory of a million rows stays cheap to resume from.

Resume rule (`load_resume_index`): a file is done, under the settings hash `key_suffix`, when
the latest row for it and its task was made under those settings from the same file (same size
and mtime). Any status counts, except that an error marked `retryable` (transient, or the
run's own failure in rows older than that column) is tried again by the next plain runs, at
most RETRY_RUNS times, and `retry_errors=True` redoes every error. So a changed prompt or model
(a new key suffix), a changed file, or a new file is done again, and a rerun after another
config ran restores this config's answers (copied from `ok_keys`, without an API call) rather
than leaving the other config's rows current.
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
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.cost import table_cost
from pipeline.records import ROW_SCHEMA, SCHEMA_VERSION, fingerprint

PART_SUFFIX = ".parquet"
RUNS_DIR = "runs"  # the runner's JSON summary per run: runs/<run_id>.json
VERSION_KEY = b"gemini_vision_pipeline.schema_version"
GROUP = ("image_root", "image_path", "task")
BATCH_ROWS = 65_536
_SHA_DIGEST_BYTES = 16  # of a key's sha256: 128 bits tell a million files apart with ease
_INDEX_COLUMNS = (
    *GROUP,
    "completed_at",
    "file_size",
    "file_mtime_ns",
    "key",
    "status",
    "retryable",
    "error",
)
RETRY_RUNS = 3  # a retryable error is tried again by at most this many later plain runs
# Error rows written before the `retryable` column (schema 1) that were transient or the run's
# own failure (a key, an outage, a quota), recognised by their error text: retried like new ones.
_OLD_RETRYABLE = (
    r"^(?:\d{3} )?(?:DEADLINE_EXCEEDED|UNAVAILABLE|DATA_LOSS|INTERNAL|RESOURCE_EXHAUSTED"
    r"|UNAUTHENTICATED|PERMISSION_DENIED|NOT_FOUND|ABORTED|UNKNOWN)\b"
    r"|API key not valid|API_KEY_INVALID|stopped before an answer"
)
_OLDEST = np.iinfo(np.int64).min  # a row without completed_at loses to any row with one
_TOKEN_COLUMNS = ("prompt_tokens", "output_tokens", "thoughts_tokens", "total_tokens")


class DigestSet:
    """A read-only set of 16-byte digests as two sorted uint64 arrays: 16 bytes an entry.

    A Python set of bytes would cost ~100 bytes an entry; this supports `in` and `len`, which is
    all a resume check needs.
    """

    __slots__ = ("_high", "_low", "_views")

    def __init__(self, joined: bytes = b"") -> None:
        halves = np.frombuffer(joined, dtype="<u8").reshape(-1, 2)
        high, low = halves[:, 0].copy(), halves[:, 1].copy()
        order = np.argsort(high)
        same_high = high[order][1:] == high[order][:-1]
        if (same_high & (low[order][1:] != low[order][:-1])).any():  # 64-bit tie: rare
            order = np.lexsort((low, high))
        high, low = high[order], low[order]
        distinct = np.ones(len(order), dtype=bool)
        distinct[1:] = (high[1:] != high[:-1]) | (low[1:] != low[:-1])
        self._high, self._low = high[distinct], low[distinct]
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

    def __init__(self, suffix: str, joined: bytes = b"") -> None:
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

    `done` holds `records.fingerprint(image_root, image_path, size, mtime_ns, key_suffix)` of
    every file that is done (see the module docstring); `ok_keys` holds every key answered ok
    under these settings at any path, so the same bytes at a new path are copied, not re-paid.
    """

    key_suffix: str
    retry_errors: bool
    done: DigestSet
    ok_keys: KeySet
    rows_read: int

    def is_done(self, image_root: str, image_path: str, size: int, mtime_ns: int) -> bool:
        return fingerprint(image_root, image_path, size, mtime_ns, self.key_suffix) in self.done


# ------------------------------------------------------------------------------------- parts
def part_files(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Every committed part: the `*.parquet` files under output_dir, in path order."""
    root = Path(output_dir)
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        found.extend(Path(folder, name) for name in files if name.endswith(PART_SUFFIX))
    return sorted(found, key=lambda path: path.relative_to(root).parts)


class UnreadablePart(ValueError):
    """A `*.parquet` file in the output that this program cannot read; names it and says what
    to do. (Parts are written whole or not at all, so this is damage from outside: a disk, a
    copy, a hand.)"""

    def __init__(self, path: Path, why: str, remedy: str | None = None) -> None:
        remedy = remedy or (
            f"move it aside (e.g. `mv '{path}' '{path}.corrupt'`) and rerun: the files whose "
            "rows it held are then done again"
        )
        super().__init__(f"{path}: {why}; {remedy}")
        self.path = path


def _open_part(path: Path) -> pq.ParquetFile:
    """Open a part, refusing files this version cannot read correctly."""
    try:
        part = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise UnreadablePart(path, f"not a readable Parquet file ({_first_line(exc)})") from None
    version = (part.schema_arrow.metadata or {}).get(VERSION_KEY)
    if version is None:
        raise UnreadablePart(path, "not written by this pipeline (no schema version)")
    if not version.isdigit() or int(version) > int(SCHEMA_VERSION):
        raise UnreadablePart(
            path,
            f"schema version {version.decode(errors='replace')} is newer than this program's "
            f"{SCHEMA_VERSION}",
            "upgrade the pipeline to read it",
        )
    return part


def part_batches(path: Path, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    """The batches of one part (see _batches); damage anywhere in it is an UnreadablePart."""
    part = _open_part(path)
    try:
        yield from _batches(part, columns)
    except (pa.ArrowException, OSError) as exc:
        raise UnreadablePart(path, f"damaged Parquet data ({_first_line(exc)})") from None


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
    output_dir: str | os.PathLike[str], columns: Sequence[str], *, skip_unreadable: bool = False
) -> tuple[pa.Table, int, list[UnreadablePart]]:
    """All rows of every part (these columns only) plus where each sits: `_part`, `_row`.
    With `skip_unreadable`, unreadable parts are left out and returned instead of raised."""
    tables = []
    unreadable: list[UnreadablePart] = []
    paths = part_files(output_dir)
    for part_no, path in enumerate(paths):
        try:
            batches = list(part_batches(path, columns))
        except UnreadablePart as exc:
            if not skip_unreadable:
                raise
            unreadable.append(exc)
            continue
        start = 0
        for batch in batches:
            tables.append(_with_position(pa.Table.from_batches([batch]), part_no, start))
            start += batch.num_rows
    if not tables:
        empty = pa.schema([ROW_SCHEMA.field(name) for name in columns]).empty_table()
        return _with_position(empty, 0, 0), len(paths), unreadable
    return pa.concat_tables(tables), len(paths), unreadable


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
    output_dir: str | os.PathLike[str], *, key_suffix: str, retry_errors: bool
) -> ResumeIndex:
    """Read what is committed into a compact index for a run under settings `key_suffix`.

    One pass, batch by batch, keeps ~40 bytes a row (no strings): a hash of the row's
    (image_root, image_path, task), its fingerprint, time and position. A sort of those finds
    each file's current row. (Python's 64-bit hash is enough within one process: two files whose
    hashes collided would only look superseded and be redone; neither can look done wrongly.)
    """
    scan = _ResumeScan(key_suffix)
    for part_no, path in enumerate(part_files(output_dir)):
        start = 0
        for batch in part_batches(path, _INDEX_COLUMNS):
            scan.add(batch, part_no, start)
            start += batch.num_rows
    index = ResumeIndex(
        key_suffix=key_suffix,
        retry_errors=retry_errors,
        done=DigestSet(scan.done(retry_errors)),
        ok_keys=KeySet(key_suffix, b"".join(scan.ok_digests)),
        rows_read=scan.rows,
    )
    # The scratch memory is free now; hand it back rather than keep it for the whole run.
    pa.default_memory_pool().release_unused()
    return index


class _ResumeScan:
    """The per-row facts load_resume_index needs, gathered batch by batch."""

    _NOT_MINE = bytes(16)

    def __init__(self, key_suffix: str) -> None:
        self.key_suffix = key_suffix
        self.rows = 0
        self.ok_digests: list[bytes] = []
        self._groups: list[np.ndarray] = []
        self._fingerprints: list[bytes] = []
        self._arrays: dict[str, list[np.ndarray]] = {
            name: [] for name in ("when", "part", "row", "mine", "error", "retryable")
        }

    def add(self, batch: pa.RecordBatch, part_no: int, start: int) -> None:
        n = batch.num_rows
        self.rows += n
        keys, status = batch.column("key"), batch.column("status")
        mine = pc.fill_null(pc.ends_with(keys, "." + self.key_suffix), False)
        ok = pc.and_(mine, pc.fill_null(pc.equal(status, "ok"), False))
        self.ok_digests.append(_sha_digests(pc.filter(keys, ok)))
        roots = batch.column("image_root").to_pylist()
        paths = batch.column("image_path").to_pylist()
        groups = zip(roots, paths, batch.column("task").to_pylist(), strict=True)
        self._groups.append(np.fromiter(map(hash, groups), dtype=np.int64, count=n))
        is_mine = mine.to_numpy(zero_copy_only=False)
        rows = zip(
            is_mine.tolist(),
            roots,
            paths,
            batch.column("file_size").to_pylist(),
            batch.column("file_mtime_ns").to_pylist(),
            strict=True,
        )
        self._fingerprints.append(
            b"".join(
                fingerprint(root, path, size, mtime, self.key_suffix) if yes else self._NOT_MINE
                for yes, root, path, size, mtime in rows
            )
        )
        when = pc.fill_null(batch.column("completed_at").cast(pa.int64()), _OLDEST)
        self._arrays["when"].append(when.to_numpy())
        self._arrays["part"].append(np.full(n, part_no, dtype=np.int32))
        self._arrays["row"].append(np.arange(start, start + n, dtype=np.int32))
        self._arrays["mine"].append(is_mine)
        error = pc.fill_null(pc.equal(status, "error"), True)
        self._arrays["error"].append(error.to_numpy(zero_copy_only=False))
        old = pc.fill_null(pc.match_substring_regex(batch.column("error"), _OLD_RETRYABLE), False)
        retryable = pc.and_(error, pc.fill_null(batch.column("retryable"), old))
        self._arrays["retryable"].append(retryable.to_numpy(zero_copy_only=False))

    def done(self, retry_errors: bool) -> bytes:
        """Fingerprints of the files whose current row says: skip."""
        if not self.rows:
            return b""
        group = np.concatenate(self._groups)
        column = {name: np.concatenate(parts) for name, parts in self._arrays.items()}
        order = np.lexsort((column["row"], column["part"], column["when"], group))
        newest = np.ones(len(order), dtype=bool)
        newest[:-1] = group[order][1:] != group[order][:-1]
        current = order[newest]
        current = current[column["mine"][current]]
        if retry_errors:
            current = current[~column["error"][current]]
        else:
            current = current[~self._retry_now(current, group, column)]
        fingerprints = np.frombuffer(b"".join(self._fingerprints), dtype="V16")
        return fingerprints[np.sort(current)].tobytes()

    @staticmethod
    def _retry_now(
        current: np.ndarray, group: np.ndarray, column: dict[str, np.ndarray]
    ) -> np.ndarray:
        """For each current row: a retryable error tried fewer than 1 + RETRY_RUNS times."""
        retryable = column["retryable"] & column["mine"]
        retry = np.zeros(len(current), dtype=bool)
        candidates = retryable[current]
        if candidates.any():
            groups, tries = np.unique(group[retryable], return_counts=True)
            at = np.searchsorted(groups, group[current[candidates]])
            retry[candidates] = tries[at] <= RETRY_RUNS
        return retry


def _sha_digests(keys: pa.Array) -> bytes:
    """The leading bytes of each key's sha256 (keys whose sha part is not 64 hex are skipped)."""
    keys = keys.filter(pc.match_substring_regex(keys, r"^[0-9a-f]{64}\."))
    if len(keys) == 0:
        return b""
    heads = pc.utf8_slice_codeunits(keys, 0, 2 * _SHA_DIGEST_BYTES)
    return bytes.fromhex("".join(heads.to_pylist()))


# ------------------------------------------------------------------------------------ lookup
def lookup_rows(output_dir: str | os.PathLike[str], keys: Collection[str]) -> dict[str, dict]:
    """The newest ok row for each of `keys` (any path), as dicts: an answer to copy, not re-pay.

    Called once per file whose bytes were already answered, so it must not rescan a million
    rows each time: an index of where ok rows sit is kept per directory and extended with new
    parts only (committed parts never change), then only the candidate rows are read.
    """
    wanted = set(keys)
    root = Path(output_dir).resolve()
    paths = [_PartId(path, *_size_and_mtime(path)) for path in part_files(root)]
    with _LOCATIONS_LOCK:
        locations = _LOCATIONS.get(root)
        if locations is None or not locations.still_valid(paths):
            while len(_LOCATIONS) >= _LOCATIONS_KEPT:
                del _LOCATIONS[next(iter(_LOCATIONS))]
            locations = _LOCATIONS[root] = _OkRowLocations()
        locations.extend(paths)
        candidates = locations.candidates(wanted)
    best: dict[str, tuple[tuple[Any, ...], dict]] = {}
    for path, rows in candidates.items():
        part = pa.Table.from_batches(list(part_batches(path, ROW_SCHEMA.names)), ROW_SCHEMA)
        for row_no, row in zip(rows, part.take(pa.array(rows)).to_pylist(), strict=True):
            if row["key"] not in wanted or row["status"] != "ok":
                continue  # same leading sha bytes, another key
            when = row["completed_at"]
            rank = (when is not None, when, path.relative_to(root).parts, row_no)
            if row["key"] not in best or rank > best[row["key"]][0]:
                best[row["key"]] = (rank, row)
    return {key: row for key, (_, row) in best.items()}


@dataclass(frozen=True, slots=True)
class _PartId:
    """A committed part as found: a part rewritten under the same name is another part."""

    path: Path
    size: int
    mtime_ns: int


def _size_and_mtime(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_size, info.st_mtime_ns


class _OkRowLocations:
    """Where the ok rows are, by the first 8 bytes of their key's sha256 (several keys may share
    them; the caller checks the full key)."""

    def __init__(self) -> None:
        self.parts: list[_PartId] = []
        self._sha = np.zeros(0, dtype=np.uint64)
        self._part = np.zeros(0, dtype=np.int32)
        self._row = np.zeros(0, dtype=np.int32)

    def still_valid(self, paths: list[_PartId]) -> bool:
        """False when a part we indexed is gone or was rewritten (a hand-made change)."""
        return set(self.parts) <= set(paths)

    def extend(self, paths: list[_PartId]) -> None:
        known = set(self.parts)
        new = [path for path in paths if path not in known]
        if not new:
            return
        sha, part, row = [self._sha], [self._part], [self._row]
        for path in new:
            table = pa.Table.from_batches(list(part_batches(path.path, ("key", "status"))))
            keys = table.column("key")
            ok = pc.and_(
                pc.fill_null(pc.equal(table.column("status"), "ok"), False),
                pc.fill_null(pc.match_substring_regex(keys, r"^[0-9a-f]{64}\."), False),
            )
            heads = pc.utf8_slice_codeunits(pc.filter(keys, ok), 0, 16).to_pylist()
            sha.append(np.frombuffer(bytes.fromhex("".join(heads)), dtype=">u8").astype(np.uint64))
            row.append(np.flatnonzero(ok.to_numpy(zero_copy_only=False)).astype(np.int32))
            part.append(np.full(len(heads), len(self.parts), dtype=np.int32))
            self.parts.append(path)
        order = np.argsort(np.concatenate(sha), kind="stable")
        self._sha = np.concatenate(sha)[order]
        self._part = np.concatenate(part)[order]
        self._row = np.concatenate(row)[order]

    def candidates(self, keys: set[str]) -> dict[Path, list[int]]:
        """Rows (by part) that may hold one of `keys`."""
        found: dict[Path, list[int]] = {}
        for key in keys:
            if not re.match(r"[0-9a-f]{64}\.", key):
                continue
            head = np.uint64(int(key[:16], 16))
            start = int(np.searchsorted(self._sha, head, side="left"))
            end = int(np.searchsorted(self._sha, head, side="right"))
            for part, row in zip(self._part[start:end], self._row[start:end], strict=True):
                found.setdefault(self.parts[int(part)].path, []).append(int(row))
        return {path: sorted(set(rows)) for path, rows in found.items()}


_LOCATIONS: dict[Path, _OkRowLocations] = {}
_LOCATIONS_KEPT = 4  # output directories whose index stays in memory
_LOCATIONS_LOCK = threading.Lock()


# ----------------------------------------------------------------------------------- readers
def current_rows(
    output_dir: str | os.PathLike[str], columns: Sequence[str] | None = None
) -> pa.Table:
    """The current row per (image_root, image_path, task), sorted by those three.

    Two passes: the first reads only what decides which row is current, the second reads the
    requested columns of those rows part by part, so memory follows the answer, not the history.
    """
    wanted = list(columns) if columns is not None else list(ROW_SCHEMA.names)
    unknown = [name for name in wanted if name not in ROW_SCHEMA.names]
    if unknown:
        raise ValueError(f"unknown columns: {unknown}")
    schema = pa.schema([ROW_SCHEMA.field(name) for name in wanted])
    table, _, _ = _scan(output_dir, (*GROUP, "completed_at"))
    current = table.take(pa.array(_latest(table)))
    if current.num_rows == 0:
        return schema.empty_table()
    part_of = current.column("_part").to_numpy()
    row_of = current.column("_row").to_numpy()
    pieces, placed = [], []
    paths = part_files(output_dir)
    for part_no in np.unique(part_of):
        at = np.flatnonzero(part_of == part_no)
        part = pa.Table.from_batches(list(part_batches(paths[part_no], wanted)), schema)
        pieces.append(part.take(pa.array(row_of[at])))
        placed.append(at)
    gathered = pa.concat_tables(pieces)
    return gathered.take(pa.array(np.argsort(np.concatenate(placed), kind="stable")))


def status(output_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Counts by status of the current rows, tokens of every committed row, the latest run.

    Tokens are summed over every committed row, superseded ones too (they were paid for); rows
    copied from another path carry no billed tokens. `est_prompt_tokens` (the estimate of the
    whole input, image included, made before the call) is compared with the billed
    `prompt_tokens` on the rows that have both. `cost` prices those tokens (pipeline/cost.py:
    rows bought in Batch Mode at the batch price).
    """
    columns = (*GROUP, "completed_at", "status", "run_id", *_TOKEN_COLUMNS, "est_prompt_tokens")
    columns += ("model", "input_mode")
    table, n_parts, unreadable = _scan(output_dir, columns, skip_unreadable=True)
    current = table.take(pa.array(_latest(table)))
    by_status = Counter(
        {str(k): int(v) for k, v in _value_counts(current.column("status")).items()}
    )
    billed = {name: _sum(table.column(name)) for name in _TOKEN_COLUMNS}
    has_bill = pc.is_valid(table.column("prompt_tokens"))
    estimate = _sum(pc.filter(table.column("est_prompt_tokens"), has_bill))
    billed_prompt = billed["prompt_tokens"]
    return {
        "output_dir": str(output_dir),
        "parts": n_parts,
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
        "latest_run": _latest_run_summary(Path(output_dir)),
    }


def _value_counts(column: pa.ChunkedArray) -> dict[str | None, int]:
    counts = pc.value_counts(column.combine_chunks()) if len(column) else []
    return {item["values"].as_py(): item["counts"].as_py() for item in counts}


def _sum(column: pa.Array | pa.ChunkedArray) -> int:
    total = pc.sum(column).as_py() if len(column) else None
    return int(total or 0)


def _latest_run_summary(output_dir: Path) -> dict[str, Any] | None:
    """The newest readable runs/<run_id>.json (run ids start with their UTC start time)."""
    runs = output_dir / RUNS_DIR
    if not runs.is_dir():
        return None
    for path in sorted(runs.glob("*.json"), reverse=True):
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
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
