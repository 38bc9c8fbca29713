"""The read side: what an output directory holds, what is done, and what readers should see.

The results are exactly the `*.parquet` files under the output directory (the sink's unfinished
parts end in `.tmp` and are never read). A row is superseded by a newer row for the same
(image_root, image_path, task): newer means a later `completed_at`, then a later part (path
order), then a later row in the part. Everything here reads only the columns it needs, batch by
batch, so a directory of a million rows stays cheap to resume from.

Resume rule (`load_resume_index`): a file is done, under the settings hash `key_suffix`, when
the latest row for it and its task was made under those settings from the same file (same size
and mtime). Any status counts, except that `retry_errors=True` redoes files whose latest row is
an error. So a changed prompt or model (a new key suffix), a changed file, or a new file is
done again, and a rerun after another config ran restores this config's answers (copied from
`ok_keys`, without an API call) rather than leaving the other config's rows current.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.records import ROW_SCHEMA, SCHEMA_VERSION, fingerprint

PART_SUFFIX = ".parquet"
RUNS_DIR = "runs"  # the runner's JSON summary per run: runs/<run_id>.json
VERSION_KEY = b"gemini_vision_pipeline.schema_version"
GROUP = ("image_root", "image_path", "task")
BATCH_ROWS = 65_536
_DIGEST = np.dtype("V16")
_SHA_DIGEST_BYTES = 16  # of a key's sha256: 128 bits tell a million files apart with ease
_FILE_COLUMNS = ("completed_at", "file_size", "file_mtime_ns")
_INDEX_COLUMNS = (*GROUP, *_FILE_COLUMNS, "key", "status")
_TOKEN_COLUMNS = ("prompt_tokens", "output_tokens", "thoughts_tokens", "total_tokens")
_EST_COLUMNS = ("est_image_tokens", "est_prompt_tokens")


class DigestSet:
    """A read-only set of 16-byte digests in one sorted array: 16 bytes an entry, not ~100.

    Supports `in` and `len`, which is all a resume check needs.
    """

    __slots__ = ("_sorted",)

    def __init__(self, joined: bytes = b"") -> None:
        self._sorted = np.unique(np.frombuffer(joined, dtype=_DIGEST))

    def __len__(self) -> int:
        return len(self._sorted)

    def __contains__(self, digest: object) -> bool:
        if not isinstance(digest, bytes) or len(digest) != _DIGEST.itemsize:
            return False
        probe = np.frombuffer(digest, dtype=_DIGEST)
        at = int(np.searchsorted(self._sorted, probe[0]))
        return at < len(self._sorted) and self._sorted[at] == probe[0]


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


def _open_part(path: Path) -> pq.ParquetFile:
    """Open a part, refusing files this version cannot read correctly."""
    part = pq.ParquetFile(path)
    version = (part.schema_arrow.metadata or {}).get(VERSION_KEY)
    if version is None:
        raise ValueError(f"{path}: not written by this pipeline (no schema version in metadata)")
    if not version.isdigit() or int(version) > int(SCHEMA_VERSION):
        raise ValueError(
            f"{path}: schema version {version.decode(errors='replace')} is newer than this "
            f"program's {SCHEMA_VERSION}; upgrade the pipeline to read it"
        )
    return part


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


def _scan(output_dir: str | os.PathLike[str], columns: Sequence[str]) -> tuple[pa.Table, int]:
    """All rows of every part (these columns only) plus where each sits: `_part`, `_row`."""
    tables = []
    paths = part_files(output_dir)
    for part_no, path in enumerate(paths):
        start = 0
        for batch in _batches(_open_part(path), columns):
            tables.append(_with_position(pa.Table.from_batches([batch]), part_no, start))
            start += batch.num_rows
    if not tables:
        empty = pa.schema([ROW_SCHEMA.field(name) for name in columns]).empty_table()
        return _with_position(empty, 0, 0), len(paths)
    return pa.concat_tables(tables), len(paths)


def _with_position(table: pa.Table, part_no: int, start: int) -> pa.Table:
    n = table.num_rows
    table = table.append_column("_part", pa.array(np.full(n, part_no, dtype=np.int32)))
    return table.append_column("_row", pa.array(np.arange(start, start + n, dtype=np.int32)))


def _latest(table: pa.Table) -> np.ndarray:
    """Indices of the rows that are current: the newest per (image_root, image_path, task)."""
    if table.num_rows == 0:
        return np.zeros(0, dtype=np.int64)
    order = pc.sort_indices(
        table,
        sort_keys=[("completed_at", "ascending"), ("_part", "ascending"), ("_row", "ascending")],
        null_placement="at_start",
    ).to_numpy()
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    keys = table.select(list(GROUP)).append_column("_rank", pa.array(rank))
    newest = keys.group_by(list(GROUP), use_threads=False).aggregate([("_rank", "max")])
    return np.sort(order[newest.column("_rank_max").to_numpy()])


# ------------------------------------------------------------------------------------ resume
def load_resume_index(
    output_dir: str | os.PathLike[str], *, key_suffix: str, retry_errors: bool
) -> ResumeIndex:
    """Read what is committed into a compact index for a run under settings `key_suffix`."""
    ending = "." + key_suffix
    reduced = []
    ok_digests = []
    rows_read = 0
    for part_no, path in enumerate(part_files(output_dir)):
        start = 0
        for batch in _batches(_open_part(path), _INDEX_COLUMNS):
            n = batch.num_rows
            rows_read += n
            keys = batch.column("key")
            mine = pc.fill_null(pc.ends_with(keys, ending), False)
            ok = pc.and_(mine, pc.fill_null(pc.equal(batch.column("status"), "ok"), False))
            ok_digests.append(_sha_digests(pc.filter(keys, ok)))
            kept = {name: batch.column(name) for name in (*GROUP, *_FILE_COLUMNS)}
            kept["mine"] = mine
            kept["redo"] = pc.fill_null(pc.equal(batch.column("status"), "error"), True)
            reduced.append(_with_position(pa.table(kept), part_no, start))
            start += n
    done = b""
    if reduced:
        table = pa.concat_tables(reduced)
        del reduced
        current = table.take(pa.array(_latest(table)))
        keep = current.column("mine")
        if retry_errors:
            keep = pc.and_(keep, pc.invert(current.column("redo")))
        current = current.filter(keep)
        done = b"".join(
            map(
                fingerprint,
                current.column("image_root").to_pylist(),
                current.column("image_path").to_pylist(),
                current.column("file_size").to_pylist(),
                current.column("file_mtime_ns").to_pylist(),
                repeat(key_suffix),
            )
        )
    return ResumeIndex(
        key_suffix=key_suffix,
        retry_errors=retry_errors,
        done=DigestSet(done),
        ok_keys=KeySet(key_suffix, b"".join(ok_digests)),
        rows_read=rows_read,
    )


def _sha_digests(keys: pa.Array) -> bytes:
    """The leading bytes of each key's sha256 (keys whose sha part is not 64 hex are skipped)."""
    keys = keys.filter(pc.match_substring_regex(keys, r"^[0-9a-f]{64}\."))
    if len(keys) == 0:
        return b""
    heads = pc.utf8_slice_codeunits(keys, 0, 2 * _SHA_DIGEST_BYTES)
    return bytes.fromhex("".join(heads.to_pylist()))


# ------------------------------------------------------------------------------------ lookup
def lookup_rows(output_dir: str | os.PathLike[str], keys: Collection[str]) -> dict[str, dict]:
    """The newest ok row for each of `keys` (any path), as dicts: an answer to copy, not re-pay."""
    wanted = pa.array(sorted(set(keys)), type=pa.string())
    best: dict[str, tuple[tuple[Any, int, int], dict]] = {}
    if len(wanted) == 0:
        return {}
    for part_no, path in enumerate(part_files(output_dir)):
        part = _open_part(path)
        probe = pa.Table.from_batches(list(_batches(part, ("key", "status", "completed_at"))))
        hit = pc.and_(
            pc.is_in(probe.column("key"), value_set=wanted),
            pc.fill_null(pc.equal(probe.column("status"), "ok"), False),
        )
        rows = np.flatnonzero(hit.to_numpy(zero_copy_only=False))
        if rows.size == 0:
            continue
        full = pa.Table.from_batches(list(_batches(part, ROW_SCHEMA.names)), schema=ROW_SCHEMA)
        for row_no, row in zip(rows.tolist(), full.take(pa.array(rows)).to_pylist(), strict=True):
            when = row["completed_at"]
            rank = (when.timestamp() if when is not None else float("-inf"), part_no, row_no)
            if row["key"] not in best or rank > best[row["key"]][0]:
                best[row["key"]] = (rank, row)
    return {key: row for key, (_, row) in best.items()}


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
    table, _ = _scan(output_dir, (*GROUP, "completed_at"))
    current = table.take(pa.array(_latest(table)))
    if current.num_rows == 0:
        return schema.empty_table()
    current = current.sort_by([(name, "ascending") for name in GROUP])
    part_of = current.column("_part").to_numpy()
    row_of = current.column("_row").to_numpy()
    pieces, placed = [], []
    paths = part_files(output_dir)
    for part_no in np.unique(part_of):
        at = np.flatnonzero(part_of == part_no)
        part = pa.Table.from_batches(list(_batches(_open_part(paths[part_no]), wanted)), schema)
        pieces.append(part.take(pa.array(row_of[at])))
        placed.append(at)
    gathered = pa.concat_tables(pieces)
    return gathered.take(pa.array(np.argsort(np.concatenate(placed), kind="stable")))


def status(output_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Counts by status of the current rows, tokens of every committed row, the latest run.

    Tokens are summed over every committed row, superseded ones too (they were paid for); rows
    copied from another path carry no billed tokens. The estimate is compared with the bill on
    the rows that have both.
    """
    columns = (*GROUP, "completed_at", "status", "run_id", *_TOKEN_COLUMNS, *_EST_COLUMNS)
    table, n_parts = _scan(output_dir, columns)
    current = table.take(pa.array(_latest(table)))
    by_status = Counter(
        {str(k): int(v) for k, v in _value_counts(current.column("status")).items()}
    )
    billed = {name: _sum(table.column(name)) for name in _TOKEN_COLUMNS}
    has_bill = pc.is_valid(table.column("prompt_tokens"))
    estimate = sum(_sum(pc.filter(table.column(name), has_bill)) for name in _EST_COLUMNS)
    billed_prompt = billed["prompt_tokens"]
    return {
        "output_dir": str(output_dir),
        "parts": n_parts,
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
        f"{report['parts']:,} parts by {report['runs']:,} runs; {report['superseded']:,} "
        "superseded)",
        "status: " + (" · ".join(f"{k} {v:,}" for k, v in by_status.items()) or "no rows yet"),
        f"tokens billed: prompt {tokens['prompt']:,} · output {tokens['output']:,} · "
        f"thoughts {tokens['thoughts']:,} · total {tokens['total']:,}",
    ]
    if tokens["estimate_error"] is not None:
        lines.append(
            f"prompt tokens estimated {tokens['estimated_prompt']:,} vs billed "
            f"{tokens['prompt']:,} ({tokens['estimate_error']:+.1%})"
        )
    errors = by_status.get("error", 0)
    if errors:
        lines.append(f"remaining: {errors:,} error rows; rerun with --retry-errors to redo them")
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
