"""The resume index's facts, cached beside the parts: committed parts never change.

For each committed row, what the resume rule (`pipeline/output/index.py`) needs and nothing more —
about 50 bytes, no strings: a digest of its (image_root, image_path, task) group, the file digest
a rerun compares with a stat or a listing (`file_digest`), the leading 16 bytes of its key's
sha256, its settings suffix, its time, three flags (ok, error, retryable), and its image's longer
side (whether a `max_side` shrinks it: `_mine`).

Computing them means reading five string columns of every part and one blake2b per row (of its
root and path, joined in Arrow and hashed from Arrow's buffer; everything else is numpy); on an
object store it also means transferring those columns. Reading them back from the cache is a
few Arrow IPC files. Layout:
`.index/facts-<digest>.arrow` under the output (a hidden folder no reader globs), each file a
series of record batches of one part each (the part's name and size, and the batch's suffix
list, in each batch's metadata), at most FILE_ROWS rows a file. Loading takes the largest files
that cover only parts still present, computes the facts of the parts none covers and — for the
output's writer only — stores those as new files; once more than CHECKPOINT_FILES small files
are in use it merges them, the way Delta Lake writes a checkpoint every 10 commits so a reader
never replays a long log. A file naming a part that is gone (compacted away) is ignored, and
deleted by the writer.

Memory: what a load keeps is only what the index needs under one suffix (`Gathered`), copied
batch by batch out of the cache files, so a cache file is held whole only while it is read.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.output.memory import release_unused
from pipeline.output.parts import read_parts
from pipeline.output.stores import Entry, Store
from pipeline.records import ROW_SCHEMA, KeySuffixes, storable

log = logging.getLogger(__name__)

FACTS_DIR = ".index"
CHECKPOINT_FILES = 10  # Delta Lake's checkpointInterval
FILE_ROWS = 100_000  # rows in one cache file at most (~5 MB; held whole only while read)
# Arrow's allocator keeps what Parquet decoding freed; handing it back every few parts keeps a
# first build (1M rows, no cache) from peaking ~50 MB higher than it needs (measured).
RELEASE_EVERY = 8
OK, ERROR, RETRYABLE, MINE = 1, 2, 4, 8
# What a run does with a file whose current row it finds (`Gathered.done`, `CurrentRows`): skip
# it, or do it again because another request made that row, or because it is an error to retry.
DONE, SETTINGS, RETRY = 0, 1, 2
VERDICT_NAMES = ("done", "settings", "retry")
RETRY_NAME = VERDICT_NAMES[RETRY]
NEW, CHANGED = "new", "changed"  # no row of this file yet; a row of other bytes (size, mtime)
TO_DO = "to do"  # new, changed or settings, where only RETRY is told apart (`index.RetryRows`)
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
    "width",
    "height",
)
_COLUMNS_SCHEMA = pa.schema([ROW_SCHEMA.field(name) for name in COLUMNS])
SCHEMA = pa.schema(
    [
        ("group", pa.uint64()),
        ("file", pa.binary(16)),
        ("sha", pa.binary(16)),
        ("suffix", pa.int32()),  # index into the batch's suffix list (metadata); -1: none
        ("when", pa.int64()),
        ("flags", pa.uint8()),
        # the longer displayed side: whether `max_side` shrinks the image (a cache file
        # without it fails the schema check and is computed again)
        ("side", pa.uint32()),
    ]
)
_UNKNOWN_SIDE = np.iinfo(np.uint32).max  # a group's row (no size of its own): "shrunk"
_OLDEST = np.iinfo(np.int64).min  # a row without completed_at loses to any row with one
# Error rows written before the `retryable` column (schema 1) that were transient or the run's
# own failure (a key, an outage, a quota), recognised by their error text: retried like new ones.
_OLD_RETRYABLE = (
    r"^(?:\d{3} )?(?:DEADLINE_EXCEEDED|UNAVAILABLE|DATA_LOSS|INTERNAL|RESOURCE_EXHAUSTED"
    r"|UNAUTHENTICATED|PERMISSION_DENIED|NOT_FOUND|ABORTED|UNKNOWN)\b"
    r"|API key not valid|API_KEY_INVALID|stopped before an answer"
)
_NIBBLE = np.zeros(256, dtype=np.uint8)  # hex digit (ASCII) -> its value
_NIBBLE[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = np.arange(16, dtype=np.uint8)
_M64 = (1 << 64) - 1
_NONE = _M64  # a missing size or mtime
_GOLDEN, _MUL1, _MUL2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_SALT = 0xD6E8FEB86659FD93  # so that (size, mtime) and (mtime, size) differ
Part = tuple[str, int]  # (name, size): a part as the cache knows it


@dataclass(slots=True)
class PartFacts:
    """The facts of (some rows of) one part: one record batch of a cache file."""

    part: Part
    suffixes: list[str]
    facts: pa.RecordBatch


# -------------------------------------------------------------------------- the digests
def file_digest(image_root: str, image_path: str, size: object, mtime_ns: object) -> bytes:
    """Identity of "this file, unchanged since" without reading it (16 bytes): a rerun compares
    it with a stat (or a listing) instead of re-hashing the whole store.

    blake2b of "root NUL path" (as stored: `records.storable`), XORed with a splitmix64 mix of
    size and mtime (or version stamp). The mix is plain integer arithmetic, so `facts_of`
    computes it for a million stored rows with numpy, and only the path costs a hash per row.
    """
    text = storable(f"{image_root}\0{image_path}").encode("utf-8")
    head = hashlib.blake2b(text, digest_size=16).digest()
    low, high = _mixed(_word(size), _word(mtime_ns))
    low ^= int.from_bytes(head[:8], "little")
    high ^= int.from_bytes(head[8:], "little")
    return low.to_bytes(8, "little") + high.to_bytes(8, "little")


def group_digest(image_root: str, image_path: str, task: str) -> int:
    """The 64-bit digest of a row's (image_root, image_path, task) group, as `facts_of` computes
    it for stored rows: one file (or group of files) asked one task."""
    text = storable(f"{image_root}\0{image_path}").encode("utf-8")
    head = hashlib.blake2b(text, digest_size=16).digest()
    return int.from_bytes(head[:8], "little") ^ task_word(task)


class CurrentRows:
    """Every current row's group, file digest and verdict (DONE, SETTINGS, RETRY), sorted by
    group: why a file the resume index does not skip is done again (`why`). Kept only when
    asked for (`load_resume_index(explain=CurrentRows)`: `pipeline estimate`, `run --plan`):
    25 bytes a current row."""

    def __init__(self) -> None:
        self.groups = np.zeros(0, dtype=np.uint64)
        self.files = np.zeros(0, dtype="V16")
        self.verdicts = np.zeros(0, dtype=np.uint8)

    @staticmethod
    def kept(verdicts: np.ndarray) -> np.ndarray:
        """Which current rows (by verdict) `add` is to be given: all of them."""
        return np.ones(len(verdicts), dtype=bool)

    def add(self, groups: np.ndarray, files: np.ndarray, verdicts: np.ndarray) -> None:
        order = np.argsort(groups, kind="stable")
        self.groups, self.files, self.verdicts = groups[order], files[order], verdicts[order]

    def why(self, group: int, file: bytes) -> str:
        """ "new" (no row of this group), "changed" (its row is of other bytes: another size or
        mtime), else its current row's verdict: "settings", "retry" (or "done")."""
        at = int(np.searchsorted(self.groups, np.uint64(group)))
        if at >= len(self.groups) or int(self.groups[at]) != group:
            return NEW
        if self.files[at].tobytes() != file:
            return CHANGED
        return VERDICT_NAMES[int(self.verdicts[at])]


class Verdicts(Protocol):
    """What `Gathered.done` hands the current rows' verdicts to: `CurrentRows` (every one), or
    `index.RetryRows` (the files of the rows to retry alone)."""

    def kept(self, verdicts: np.ndarray) -> np.ndarray:
        """Which current rows (by verdict) `add` is to be given."""
        ...

    def add(self, groups: np.ndarray, files: np.ndarray, verdicts: np.ndarray) -> None: ...


def _word(value: object) -> int:
    return value & _M64 if isinstance(value, int) and not isinstance(value, bool) else _NONE


def _mix(x: int) -> int:
    """splitmix64's finaliser on a 64-bit word."""
    x = (x + _GOLDEN) & _M64
    x = ((x ^ (x >> 30)) * _MUL1) & _M64
    x = ((x ^ (x >> 27)) * _MUL2) & _M64
    return x ^ (x >> 31)


def _mixed(size: int, mtime: int) -> tuple[int, int]:
    a, b = _mix(size), _mix(mtime ^ _SALT)
    return _mix(a ^ b), _mix((a + 3 * b) & _M64)


def _mix_array(x: np.ndarray) -> np.ndarray:
    """`_mix` over a uint64 array (numpy's uint64 arithmetic wraps like the masks above)."""
    x = x + np.uint64(_GOLDEN)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(_MUL1)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(_MUL2)
    return x ^ (x >> np.uint64(31))


def _words(column: pa.Array) -> np.ndarray:
    values = pc.fill_null(column.cast(pa.int64()), -1).to_numpy().view(np.uint64)
    return np.where(column.is_valid().to_numpy(zero_copy_only=False), values, np.uint64(_NONE))


class Gathered:
    """What the index needs under one suffix, gathered batch by batch (module docstring).

    Read in this order: `done`, then `ok_digests` (or `stale_rows` alone, with no suffix).
    `done` and `ok_digests` hand over the columns they are the last to need instead of copying
    them (a million rows: 57 MB of columns, and every copy the sorts would make on top counts
    in a resume's peak).
    """

    def __init__(
        self, suffix: KeySuffixes | None, parts: list[Entry], *, copies: bool = True
    ) -> None:
        self.suffix = suffix  # None: only groups and places (what a superseded share needs)
        self.copies = copies  # False: no ok digests (a count, which copies nothing)
        self.number = {(entry.name, entry.size): at for at, entry in enumerate(parts)}
        self.rows = 0
        self.current_rows = 0  # one a group (`done` counts them)
        self.settings_rows = 0  # current rows another request made (of them)
        self._next_row: dict[int, int] = {}
        self._pieces: dict[str, list[np.ndarray]] = {
            name: [] for name in ("group", "when", "flags", "file", "ok_sha")
        }
        self._spans: list[tuple[int, int, int]] = []  # (part, first row, rows) of each batch

    def add_rows(self, name: str, rows: list[dict[str, Any]]) -> None:
        """Rows not in a part yet (a journal's), counted as the newest part's: the next run
        commits them before it walks. Their facts are computed as a part's are."""
        if not rows:
            return
        self.number[(name, -1)] = len(self.number)
        batch = pa.RecordBatch.from_pylist(rows, schema=_COLUMNS_SCHEMA)
        self.add(facts_of((name, -1), batch))

    def add(self, batch: PartFacts) -> None:
        facts, n = batch.facts, batch.facts.num_rows
        part = self.number[batch.part]
        first = self._next_row.get(part, 0)
        self._next_row[part] = first + n
        self.rows += n
        pieces = self._pieces
        pieces["group"].append(facts.column("group").to_numpy().copy())
        pieces["when"].append(facts.column("when").to_numpy().copy())
        self._spans.append((part, first, n))
        if self.suffix is None:
            return
        mine = _mine(self.suffix, batch)
        flags = facts.column("flags").to_numpy() | (mine.astype(np.uint8) * MINE)
        pieces["flags"].append(flags)
        pieces["file"].append(_binary16(facts.column("file")).copy())
        ok = (flags & (OK | MINE)) == (OK | MINE) if self.copies else np.zeros(n, dtype=bool)
        pieces["ok_sha"].append(_binary16(facts.column("sha"))[ok])

    def done(
        self, retry_errors: bool, retry_runs: int, explain: Verdicts | None = None
    ) -> np.ndarray:
        """File digests (V16) of the files whose current row says: skip (see dataset's rule).
        `explain` is given the group, file and verdict of the current rows it keeps (`kept`):
        why the others are done again, as `pipeline estimate` tells."""
        if not self.rows:
            return np.zeros(0, dtype="V16")
        group, current, verdict = self._verdicts(retry_errors, retry_runs)
        self.current_rows = len(current)
        self.settings_rows = int(np.count_nonzero(verdict == SETTINGS))
        if explain is None:  # a run: only the done rows' files (the resume's peak memory)
            return self._pick("file", current[verdict == DONE])
        kept = explain.kept(verdict)
        files, verdict = self._pick("file", current[kept]), verdict[kept]
        explain.add(group[current[kept]], files, verdict)
        return files[verdict == DONE]

    def _verdicts(
        self, retry_errors: bool, retry_runs: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(every row's group, the current rows in order, what a run does with each): DONE,
        SETTINGS (made by another request: the run's is not this one), or RETRY (an error
        tried again: any with `retry_errors`, else a retryable one within `retry_runs`)."""
        group, when = self._take("group", keep=False), self._take("when", keep=False)
        place = self._places()
        order = np.lexsort((place, when, group))
        del when, place
        ordered = group[order]
        newest = np.ones(len(order), dtype=bool)
        newest[:-1] = ordered[1:] != ordered[:-1]
        current = np.sort(order[newest])
        del order, newest, ordered
        flags = self._take("flags", keep=False)
        mine = (flags & MINE) != 0
        if retry_errors:
            retry = ((flags & ERROR) != 0)[current]
        else:
            retryable = ((flags & RETRYABLE) != 0) & mine
            retry = _retry_now(current, group, retryable, retry_runs)
        verdict = np.full(len(current), SETTINGS, dtype=np.uint8)
        verdict[mine[current]] = DONE
        verdict[mine[current] & retry] = RETRY
        return group, current, verdict

    def _pick(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows (sorted) of one column, piece by piece: the column is never joined whole, and
        each piece is let go once read (the column is handed over)."""
        pieces, self._pieces[name] = self._pieces[name], []
        starts = np.cumsum([0, *(len(piece) for piece in pieces)])
        cut = np.searchsorted(rows, starts)
        picked = np.empty(len(rows), dtype=pieces[0].dtype)
        pieces.reverse()  # popped from the end: first piece first, each let go once read
        for at in range(len(starts) - 1):
            piece = pieces.pop()
            picked[cut[at] : cut[at + 1]] = piece[rows[cut[at] : cut[at + 1]] - starts[at]]
        return picked

    def ok_digests(self) -> np.ndarray:
        """sha heads (V16) of every row answered ok under the suffix (any path, current or
        not). The gathered column itself, handed over: a copy would be 16 MB a million rows."""
        return self._take("ok_sha", keep=False)

    def stale_rows(self, set_aside: list[bool]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """For each part a glob sees that holds superseded rows: (its current rows, its
        superseded rows), row numbers in order. Superseded: a newer row of the same group
        (later `when`, then later part, then later row: `parts.latest_rows`' rule) is seen
        too. `set_aside` as in `superseded`; rows set aside already take no part."""
        if not self.rows:
            return {}
        seen = np.concatenate([np.full(n, not set_aside[part]) for part, _, n in self._spans])
        group, when, place = self._take("group")[seen], self._take("when")[seen], self._places()
        place = place[seen]
        order = np.lexsort((place, when, group))
        ordered = group[order]
        older = np.zeros(len(order), dtype=bool)
        older[:-1] = ordered[1:] == ordered[:-1]
        stale = np.sort(place[order[older]])
        split = {}
        for part in np.unique(stale >> 32):
            gone = stale[(stale >> 32) == part] & 0xFFFFFFFF
            rows = np.arange(self._next_row[int(part)], dtype=np.int64)
            split[int(part)] = (np.setdiff1d(rows, gone, assume_unique=True), gone)
        return split

    def _places(self) -> np.ndarray:
        """Where each row sits, (part << 32) | row, in gathered order: built when a sort needs
        it, from a span a batch (8 MB a million rows, not held while gathering)."""
        places = np.empty(self.rows, dtype=np.int64)
        at = 0
        for part, first, n in self._spans:
            places[at : at + n] = (part << 32) + np.arange(first, first + n, dtype=np.int64)
            at += n
        return places

    def _take(self, name: str, *, keep: bool = True) -> np.ndarray:
        """One column as one array (joined once; the pieces are dropped)."""
        pieces = self._pieces[name]
        dtype = "V16" if name in ("file", "ok_sha") else None
        if len(pieces) != 1:
            joined = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype or np.int64)
            pieces[:] = [joined]
        return pieces[0] if keep else pieces.pop()


def _mine(suffixes: KeySuffixes, batch: PartFacts) -> np.ndarray:
    """Which rows of `batch` were made by the request the run would send now: a row under the
    run's resized suffix or an alias always; one under its as-is suffix when `max_side` does not
    shrink that image (its recorded side fits: the bytes are unchanged, so the size is too).
    An error row's side is never a reason to redo it: its own retry rule decides."""
    as_is = [suffixes.sent_as_is(s) for s in batch.suffixes]
    always = [suffixes.owns(s) and not sent for s, sent in zip(batch.suffixes, as_is, strict=True)]
    at = batch.facts.column("suffix").to_numpy()  # -1 picks the trailing False
    mine = np.array([*always, False], dtype=bool)[at]
    fits = np.array([*as_is, False], dtype=bool)[at]
    if suffixes.max_side is not None:
        side = batch.facts.column("side").to_numpy()
        error = (batch.facts.column("flags").to_numpy() & ERROR) != 0
        fits &= (side <= suffixes.max_side) | error
    return mine | fits


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


def _binary16(column: pa.Array) -> np.ndarray:
    """A fixed_size_binary(16) array as a numpy V16 view of its buffer."""
    data = column.buffers()[1]
    return np.frombuffer(data, dtype="V16", count=len(column), offset=column.offset * 16)


# ------------------------------------------------------------------------------- loading
def load_facts(
    store: Store,
    parts: list[Entry],
    *,
    suffix: KeySuffixes | None,
    write: bool,
    copies: bool = True,
) -> Gathered:
    """The facts of `parts` under `suffix`, from the cache where it covers them; the parts it
    does not cover are read (and, when `write`, their facts stored for the next run).
    `copies`: the ok rows' digests gathered too (`Gathered.ok_digests`).

    Cache files are read one at a time, biggest first (a merged file before the small ones it
    replaced, should a kill have left both), each dropped once gathered."""
    gathered = Gathered(suffix, parts, copies=copies)
    used, stale, covered = _read_cache(store, set(gathered.number), gathered.add)
    missing = [e for e in parts if (e.name, e.size) not in covered]
    if missing:
        _compute(store, missing, gathered, write=write)
    if write:
        _tidy(store, used, stale)
    return gathered


def _read_cache(
    store: Store, present: set[Part], take: Callable[[PartFacts], None]
) -> tuple[list[_CacheFile], list[str], set[Part]]:
    """Hand `take` the cached facts of the `present` parts, each part's batches once and in
    order (module docstring); (the files used, the stale ones, the parts covered)."""
    used: list[_CacheFile] = []
    stale: list[str] = []
    covered: set[Part] = set()
    for entry in sorted(store.list(FACTS_DIR + "/"), key=lambda e: (-e.size, e.name)):
        cached = _open(store, entry.name)
        if cached is None:
            continue
        cached.kept = {part for part in cached.parts if part in present and part not in covered}
        if not cached.kept:
            stale.append(entry.name)  # its parts are gone, or merged into another file
            continue
        for batch in _batches_of(cached.table):
            if batch.part in cached.kept:  # a part rewritten since (superseded rows set
                take(batch)  # aside) costs its own facts, not the whole file's
        covered.update(cached.kept)
        cached.table = None  # read: let its memory go
        used.append(cached)
    return used, stale, covered


def cached_groups(store: Store, parts: Sequence[Entry]) -> dict[Part, np.ndarray]:
    """The group digest (`group_words`) of each row of the parts the cache covers, in the part's
    row order, by (name, size): 8 bytes a row, copied out of the cache files (views kept every
    file whole, ~57 bytes a row: 1M rows peaked 98 MB above the imports, measured). Read only:
    a cache only the output's writer maintains."""
    pieces: dict[Part, list[np.ndarray]] = {}

    def take(batch: PartFacts) -> None:
        pieces.setdefault(batch.part, []).append(batch.facts.column("group").to_numpy().copy())

    _read_cache(store, {(entry.name, entry.size) for entry in parts}, take)
    return {part: np.concatenate(words) for part, words in pieces.items()}


@dataclass(slots=True)
class _CacheFile:
    name: str
    parts: list[Part]
    rows: int
    table: Any  # the file's RecordBatchFileReader until it has been read
    kept: set[Part] = field(default_factory=set)  # its parts still present


def _open(store: Store, name: str) -> _CacheFile | None:
    """A cache file, or None when it is unreadable or gone (then it is simply not used)."""
    try:
        reader = pa.ipc.open_file(pa.py_buffer(store.read(name)))
        if reader.schema != SCHEMA:
            return None
        parts: list[Part] = []
        rows = 0
        for at in range(reader.num_record_batches):
            batch, meta = reader.get_batch_with_custom_metadata(at)
            part = tuple(json.loads(meta[b"part"]))
            if not parts or parts[-1] != part:
                parts.append(part)
            rows += batch.num_rows
    except (FileNotFoundError, pa.ArrowException, OSError, KeyError, TypeError, ValueError) as exc:
        log.info("index cache %s not used: %s", name, exc)
        return None
    return _CacheFile(name, parts, rows, reader)


def _batches_of(reader: Any) -> Iterator[PartFacts]:
    for at in range(reader.num_record_batches):
        facts, meta = reader.get_batch_with_custom_metadata(at)
        part = json.loads(meta[b"part"])
        yield PartFacts((part[0], part[1]), json.loads(meta[b"suffixes"]), facts)


def _tidy(store: Store, used: list[_CacheFile], stale: list[str]) -> None:
    """Delete stale cache files; rewrite a file some of whose parts are gone with the rest;
    past CHECKPOINT_FILES small files, merge them (a checkpoint)."""
    for cached in used:
        if len(cached.kept) < len(cached.parts):
            reopened = _open(store, cached.name)
            kept = [] if reopened is None else list(_batches_of(reopened.table))
            if _store_batches(store, [b for b in kept if b.part in cached.kept]):
                stale.append(cached.name)
    used = [cached for cached in used if cached.name not in stale]
    small = [cached for cached in used if cached.rows < FILE_ROWS // 4]
    if len(small) > CHECKPOINT_FILES:
        batches: list[PartFacts] = []
        for cached in small:
            reopened = _open(store, cached.name)
            if reopened is not None:
                batches.extend(_batches_of(reopened.table))
        if _store_batches(store, batches):
            stale = [*stale, *(cached.name for cached in small)]
    with contextlib.suppress(OSError):
        store.delete(stale)


def _store_batches(store: Store, batches: list[PartFacts]) -> bool:
    """Write one cache file (whole, content-named: a twin written by another loader is the
    same file). A failure only costs the next run the time to compute them again."""
    if not batches:
        return True
    covering = json.dumps([[b.part, b.facts.num_rows] for b in batches]).encode()
    name = f"{FACTS_DIR}/facts-{hashlib.blake2b(covering, digest_size=12).hexdigest()}.arrow"

    def write(file: Any) -> None:
        with pa.ipc.new_file(file, SCHEMA) as writer:
            for batch in batches:
                meta = {"part": json.dumps(batch.part), "suffixes": json.dumps(batch.suffixes)}
                writer.write_batch(batch.facts, custom_metadata=meta)

    try:
        store.create(name, write)
    except FileExistsError:
        return True
    except OSError as exc:
        log.warning("index cache not written (%s); the next run computes it again", exc)
        return False
    return True


# ----------------------------------------------------------------------------- computing
def _compute(store: Store, parts: Sequence[Entry], gathered: Gathered, *, write: bool) -> None:
    """The facts of these parts, read from their own columns (batch by batch), handed to
    `gathered` and, when `write`, stored in files of about FILE_ROWS rows."""
    pending: list[PartFacts] = []
    rows = 0
    for at, batches in read_parts(store, [entry.name for entry in parts], COLUMNS):
        part = (parts[at].name, parts[at].size)
        for columns in batches:
            batch = facts_of(part, columns)
            gathered.add(batch)
            if write:
                pending.append(batch)
                rows += columns.num_rows
        if write and rows >= FILE_ROWS:
            _store_batches(store, pending)
            pending, rows = [], 0
        if at % RELEASE_EVERY == RELEASE_EVERY - 1:
            release_unused()
    if write:
        _store_batches(store, pending)
    del pending
    release_unused()  # before the sorts that follow: they take what the reads left free


def facts_of(part: Part, batch: pa.RecordBatch) -> PartFacts:
    """The facts of one batch of COLUMNS of a part (`file_digest` and a group digest)."""
    heads = path_heads(batch)
    with np.errstate(over="ignore"):
        a = _mix_array(_words(batch.column("file_size")))
        b = _mix_array(_words(batch.column("file_mtime_ns")) ^ np.uint64(_SALT))
        files = np.empty_like(heads)
        files[:, 0] = heads[:, 0] ^ _mix_array(a ^ b)
        files[:, 1] = heads[:, 1] ^ _mix_array(a + np.uint64(3) * b)
    keys = batch.column("key")
    suffixes, indices = _suffixes(keys)
    arrays = [
        pa.array(group_words(batch, heads), pa.uint64()),
        _fixed16(files.tobytes(), batch.num_rows),
        _sha_heads(keys),
        indices,
        pc.fill_null(batch.column("completed_at").cast(pa.int64()), _OLDEST),
        _flags(batch),
        _sides(batch),
    ]
    return PartFacts(part, suffixes, pa.RecordBatch.from_arrays(arrays, schema=SCHEMA))


def path_heads(batch: pa.RecordBatch) -> np.ndarray:
    """blake2b (16 bytes, as two little-endian uint64 words a row) of each row's "root NUL
    path" (`file_digest`'s head)."""
    roots, paths = batch.column("image_root"), batch.column("image_path")
    return np.frombuffer(_digests(_joined(roots, paths), 16), dtype="<u8").reshape(-1, 2)


def group_words(batch: pa.RecordBatch, heads: np.ndarray | None = None) -> np.ndarray:
    """The 64-bit digest of each row's (image_root, image_path, task) group (`group_digest`),
    from the rows' `path_heads` when they are computed already."""
    heads = path_heads(batch) if heads is None else heads
    return heads[:, 0] ^ task_words(batch.column("task"))


def _sides(batch: pa.RecordBatch) -> pa.Array:
    """The longer displayed side of each row; unknown (no size recorded: a group) counts as
    larger than any `max_side`, so adding one redoes it rather than keep a stale answer."""
    width = pc.fill_null(batch.column("width").cast(pa.int64()), _UNKNOWN_SIDE)
    height = pc.fill_null(batch.column("height").cast(pa.int64()), _UNKNOWN_SIDE)
    return pc.max_element_wise(width, height).cast(pa.uint32())


def _joined(*columns: pa.Array) -> pa.Array:
    """The columns joined by NUL, a null spelt "None": exactly the text `file_digest` hashes
    (stored strings are valid UTF-8, on which `records.storable` changes nothing)."""
    return pc.binary_join_element_wise(
        *columns, "\0", null_handling="replace", null_replacement="None"
    )


def task_words(tasks: pa.Array) -> np.ndarray:
    """A 64-bit word per row for its task (a hash of each distinct task): groups of different
    tasks on the same file differ."""
    encoded = pc.dictionary_encode(pc.fill_null(tasks, ""))
    words = [task_word(t) for t in encoded.dictionary.to_pylist()]
    return np.array(words, dtype=np.uint64)[encoded.indices.to_numpy()]


def task_word(task: str) -> int:
    return int.from_bytes(hashlib.blake2b(task.encode(), digest_size=8).digest(), "little")


def _digests(joined: pa.Array, size: int) -> bytes:
    """blake2b of each string, hashed from Arrow's own buffer (no Python string per row)."""
    offsets = np.frombuffer(
        joined.buffers()[1], dtype=np.int32, count=len(joined) + 1, offset=joined.offset * 4
    ).tolist()
    data = memoryview(joined.buffers()[2] or b"")
    blake2b = hashlib.blake2b
    return b"".join(
        blake2b(data[start:end], digest_size=size).digest()
        for start, end in itertools.pairwise(offsets)
    )


def _fixed16(raw: bytes, rows: int) -> pa.Array:
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), rows, [None, pa.py_buffer(raw)])


def _sha_heads(keys: pa.Array) -> pa.Array:
    """The leading 16 bytes of each key's sha256 (zeros when the key is not `<sha>.<suffix>`),
    decoded from the hex in Arrow's buffer with numpy."""
    shaped = pc.fill_null(pc.match_substring_regex(keys, r"^[0-9a-f]{64}\."), False)
    rows = np.flatnonzero(shaped.to_numpy(zero_copy_only=False))
    heads = np.zeros((len(keys), 16), dtype=np.uint8)
    if len(rows):
        offsets = np.frombuffer(
            keys.buffers()[1], dtype=np.int32, count=len(keys) + 1, offset=keys.offset * 4
        )
        text = np.frombuffer(keys.buffers()[2], dtype=np.uint8)
        nibbles = _NIBBLE[text[offsets[rows][:, None] + np.arange(32)]]
        heads[rows] = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
    return _fixed16(heads.tobytes(), len(keys))


def _suffixes(keys: pa.Array) -> tuple[list[str], pa.Array]:
    """The distinct settings suffixes (after a key's last dot) and each row's index (-1: none).
    Keys are `<64 hex>.<suffix>`, so the suffix starts at 65 (the regex is for the others)."""
    usual = pc.fill_null(pc.equal(pc.utf8_slice_codeunits(keys, 64, 65), "."), False)
    if pc.all(usual).as_py():
        found = pc.utf8_slice_codeunits(keys, 65)
    else:
        found = pc.extract_regex(keys, r"\.(?P<suffix>[^.]*)$").field("suffix")
    encoded = pc.dictionary_encode(found)
    indices = pc.fill_null(encoded.indices.cast(pa.int32()), -1)
    return encoded.dictionary.to_pylist(), indices


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
