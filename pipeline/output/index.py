"""The resume index: which files are done under a run's settings, and where the ok answers are
that a file with the same bytes may copy instead of paying again.

Resume rule (`load_resume_index`): a file is done, under the run's key suffixes
(`records.KeySuffixes`), when the latest row for it and its task was made by the request the run
would send now from the same file (same size and mtime; for an object or a URL, same size and
version stamp: `source.version_stamp`). Which request a row was made by is its key's suffix,
read with the image's recorded size: a row "sent as is" counts only when the run's `max_side`
does not shrink that image, so no image is read to decide (`index_cache._mine`). Any
status counts, except that an error marked `retryable` (transient, or the run's own failure in
rows older than that column) is tried again by the next plain runs, at most RETRY_RUNS times,
and `retry_errors=True` redoes every error. So a changed prompt or model (a new key suffix), a
changed file, or a new file is done again, and a rerun after another config ran restores this
config's answers (copied from `ok_keys`, without an API call) rather than leaving the other
config's rows current. Which rows are current, and how parts are read: `parts.py`.
"""

from __future__ import annotations

import bisect
import re
import threading
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.output.index_cache import (
    RETRY,
    RETRY_NAME,
    SETTINGS,
    TO_DO,
    CurrentRows,
    file_digest,
    group_digest,
    load_facts,
)
from pipeline.output.journal import pending_rows
from pipeline.output.memory import release_unused
from pipeline.output.parts import Output, part_entries, read_part, read_parts
from pipeline.output.stores import Entry, Store, open_store, store_key
from pipeline.records import ROW_SCHEMA, KeySuffixes, fingerprint

_SHA_DIGEST_BYTES = 16  # of a key's sha256: 128 bits tell a million files apart with ease
RETRY_RUNS = 3  # a retryable error is tried again by at most this many later plain runs


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
        """A new set with `more` added: add in batches, not one by one.

        `more` is sorted alone and inserted where it falls (np.insert: one pass), so a merge
        holds the old arrays and the new ones (32 bytes an entry) where sorting the whole again
        held ~90 (the old set, its bytes twice, the joined bytes, the order, the new set): a
        manifest's walk merges every 65,536 entries (source.py), at a million entries 66 MB of
        peak (measured). A 64-bit tie with an entry held (a digest added again, or two sharing
        their first half) takes the whole sort, which keeps each entry once."""
        fresh = DigestSet(b"".join(more))
        at = np.searchsorted(self._high, fresh._high)
        inside = at < len(self._high)
        if (self._high[at[inside]] == fresh._high[inside]).any():
            return DigestSet(self._joined() + fresh._joined())
        merged = DigestSet()
        merged._high = np.insert(self._high, at, fresh._high)
        merged._low = np.insert(self._low, at, fresh._low)
        merged._views = (memoryview(merged._high), memoryview(merged._low))
        return merged

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
    """Keys (`<sha256>.<suffix>`) under one run's suffixes, stored as digests of the sha256.

    `key in ok_keys` is True for a committed ok answer for those bytes and that request; a key
    under a suffix the run does not own is never in it. One digest set serves every suffix the
    run owns: which rows count is decided per row when gathered (`index_cache.Gathered`: an
    as-is row only for an image `max_side` does not shrink), and the bytes fix which suffix an
    image's key carries, so a sha256 never stands for two of the run's requests.
    """

    __slots__ = ("_digests", "suffixes")

    def __init__(self, suffixes: KeySuffixes | str, joined: bytes | np.ndarray = b"") -> None:
        self.suffixes = _suffixes(suffixes)
        self._digests = DigestSet(joined)

    def __len__(self) -> int:
        return len(self._digests)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        sha, dot, suffix = key.rpartition(".")
        if not dot or not self.suffixes.owns(suffix) or len(sha) != 64:
            return False
        try:
            return bytes.fromhex(sha)[:_SHA_DIGEST_BYTES] in self._digests
        except ValueError:
            return False

    def spellings(self, key: str) -> list[str]:
        """`key` and the same bytes under the run's alias suffixes (an older key rule for the
        same request): where its committed row may be found."""
        sha, _, suffix = key.rpartition(".")
        return [key, *(f"{sha}.{alias}" for alias in self.suffixes.alias_suffixes(suffix))]


def _suffixes(suffixes: KeySuffixes | str) -> KeySuffixes:
    """A plain suffix is a run without `max_side` or aliases (what Batch Mode's jobs record)."""
    return KeySuffixes(suffixes) if isinstance(suffixes, str) else suffixes


class RetryRows:
    """The file digests of the current rows a run tries again (RETRY), nothing of the others:
    all `pipeline status --config` tells of a file to do (an error to retry, or not). 16 bytes
    an error row to retry, where `CurrentRows` holds 25 bytes every current row."""

    def __init__(self) -> None:
        self.files = DigestSet()

    @staticmethod
    def kept(verdicts: np.ndarray) -> np.ndarray:
        """The current rows `add` is given: those to retry, and the done ones (picked in the
        same pass over the column: the run's own `done` set is made of them)."""
        return verdicts != SETTINGS

    def add(self, groups: np.ndarray, files: np.ndarray, verdicts: np.ndarray) -> None:
        del groups  # a row to retry was made under the run's own suffix (its task's), so
        # its file digest alone tells it, as the run's own `done` set tells a file done
        self.files = DigestSet(np.ascontiguousarray(files[verdicts == RETRY]))

    def why(self, group: int, file: bytes) -> str:
        """RETRY, else TO_DO: new, changed or made by other settings, not told apart."""
        del group
        return RETRY_NAME if file in self.files else TO_DO


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
    current_rows: int = 0  # one a (file, task): any task's
    settings_rows: int = 0  # of them, made by another request (another task's too)
    current: CurrentRows | RetryRows | None = None  # `explain`'s: why a file not done is redone

    def is_done(self, image_root: str, image_path: str, size: int, mtime_ns: int) -> bool:
        return file_digest(image_root, image_path, size, mtime_ns) in self.done

    def why(self, image_root: str, image_path: str, size: int, mtime_ns: int, task: str) -> str:
        """Why a file `is_done` does not skip is done again (`CurrentRows.why`, or only whether
        to retry it: `RetryRows.why`); the index must have been loaded with `explain`."""
        if self.current is None:
            raise ValueError("the resume index was loaded without explain")
        group = group_digest(image_root, image_path, task)
        return self.current.why(group, file_digest(image_root, image_path, size, mtime_ns))


class DoneOrInFlight:
    """The walk's test (pipeline/run/walk.py): done (the resume index), or in a Batch Mode job
    in flight (the fingerprints of their files, `State.in_flight_fingerprints`), in every mode:
    an interactive run does not buy again what a job is buying. `collected`: the files of the
    jobs in flight when the run read its index, which this run collects before its walk (their
    rows are committed after the index was read, and are done all the same)."""

    def __init__(
        self, index: ResumeIndex, in_flight: DigestSet, collected: DigestSet | None = None
    ) -> None:
        self.index = index
        self.in_flight = in_flight
        self.collected = collected if collected is not None else DigestSet()

    def in_job(self, image_root: str, image_path: str, size: int, mtime_ns: int) -> bool:
        return self._among(self.in_flight, image_root, image_path, size, mtime_ns)

    def collected_by_run(self, image_root: str, image_path: str, size: int, mtime_ns: int) -> bool:
        return self._among(self.collected, image_root, image_path, size, mtime_ns)

    def _among(self, digests: DigestSet, root: str, path: str, size: int, mtime_ns: int) -> bool:
        if not len(digests):  # the common case, no job: no fingerprint computed per file
            return False
        return fingerprint(root, path, size, mtime_ns, self.index.key_suffix) in digests


def load_resume_index(
    output: Output,
    *,
    key_suffix: KeySuffixes | str,
    retry_errors: bool,
    write_cache: bool = False,
    explain: type[CurrentRows] | type[RetryRows] | None = None,
    journal: bool = False,
    copies: bool = True,
) -> ResumeIndex:
    """Read what is committed into a compact index for a run under settings `key_suffix` (its
    suffixes: a row under the as-is one counts only for an image `max_side` does not shrink).

    The facts each decision needs — ~50 bytes a row, no strings — come from the index cache
    (`pipeline/output/index_cache.py`: committed parts never change, so their facts are computed
    once and kept beside them) or, for parts it does not cover yet, from the parts' own columns.
    `write_cache` (the output's writer only) stores the new facts for the next run. A sort of
    those finds each file's current row. `explain` keeps the current rows' verdicts too (why a
    file is done again: `ResumeIndex.why`): every one (CurrentRows), or those to retry alone
    (RetryRows: a count's); `journal` counts the rows a journal holds (a killed or running
    run's) as committed, as the next run will have them: both for the plan of a run
    (pipeline/run/plan.py), which takes no lock. A run recovers the journal first. `copies`
    False leaves `ok_keys` empty (a count copies nothing: 16 bytes an ok row not gathered).
    """
    store = open_store(output)
    parts = part_entries(store, history=True)
    suffixes = _suffixes(key_suffix)
    facts = load_facts(store, parts, suffix=suffixes, write=write_cache, copies=copies)
    if journal:
        facts.add_rows("journal", pending_rows(store))
    current = explain() if explain is not None else None
    done, ok, rows = facts.done(retry_errors, RETRY_RUNS, current), facts.ok_digests(), facts.rows
    current_rows, settings_rows = facts.current_rows, facts.settings_rows
    del facts  # before the sorted sets are built: their scratch is the peak otherwise
    done_set = DigestSet(done)
    del done  # each input goes as soon as its set is built: the peak is one set's scratch
    ok_keys = KeySet(suffixes, ok)
    del ok
    # The scratch memory is free now; hand it back rather than keep it for the whole run.
    release_unused()
    return ResumeIndex(
        key_suffix=suffixes.as_is,
        retry_errors=retry_errors,
        done=done_set,
        ok_keys=ok_keys,
        rows_read=rows,
        current_rows=current_rows,
        settings_rows=settings_rows,
        current=current,
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
        batches = list(read_part(name, ROW_SCHEMA.names, store=store))
        # the part's own schema: its `answer` type is the one it was written with
        part = pa.Table.from_batches(batches, batches[0].schema if batches else ROW_SCHEMA)
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
        for offset, batches in read_parts(self.store, names, ("key", "status")):
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
