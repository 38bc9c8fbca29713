"""The one currency of the pipeline: a source file -> an image item -> a parsed answer -> a row.

Every stage takes and gives these types, so stages can be read, tested and replaced one by one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa

SCHEMA_VERSION = "2"  # 2: `retryable` (parts of version 1 read it as null)
Status = Literal["ok", "error", "blocked", "partial"]


@dataclass(slots=True)
class SourceFile:
    """A file the producer found: where it is and the cheap facts a stat gives."""

    path: str  # absolute path as found (symlinks not resolved)
    root: str  # the input root it was found under (absolute)
    rel_path: str  # path relative to root, POSIX separators; what rows call image_path
    size: int = 0
    mtime_ns: int = 0
    error: str | None = None  # why this entry cannot be used (broken link, symlink loop, ...)


@dataclass(slots=True)
class ImageItem:
    """A file made ready to send: hashed, sniffed, oriented, maybe converted or downscaled.

    `data` holds the bytes to send when they differ from the file (converted, EXIF-rotated,
    downscaled); None means "send the file as it is" so large files can stream from disk.
    `width`/`height` are the displayed size of the original: every coordinate maps to it.
    An item that cannot be used carries `error` and becomes an error row.
    """

    source: SourceFile
    sha256: str = ""  # of the file's bytes
    mime_type: str = ""  # of the bytes that will be sent
    width: int = 0
    height: int = 0
    sent_width: int = 0
    sent_height: int = 0
    data: bytes | None = None
    send_size: int = 0  # bytes that will be sent (len(data) or the file size)
    error: str | None = None


@dataclass(slots=True)
class Parsed:
    """A task's reading of one answer text. Objects are dicts shaped like OBJECT_TYPE."""

    status: Status
    objects: list[dict[str, Any]] = field(default_factory=list)
    text: str | None = None
    labels: list[str] | None = None
    json: str | None = None  # custom task: the parsed JSON, re-serialised
    error: str | None = None  # why status is not ok, or why objects were skipped

    def columns(self) -> dict[str, Any]:
        """The row columns a parse decides (the rest come from the image and the call)."""
        return {
            "status": self.status,
            "error": self.error,
            "objects": self.objects,
            "text": self.text,
            "labels": self.labels,
            "json": self.json,
        }


MASK_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
OBJECT_TYPE = pa.struct(
    [
        ("label", pa.string()),
        ("box_2d", pa.list_(pa.int32())),  # exactly as returned: [ymin, xmin, ymax, xmax] 0-1000
        ("bbox", pa.list_(pa.float32())),  # [x0, y0, x1, y1] in pixels of the displayed image
        ("mask", MASK_TYPE),  # COCO compressed RLE of the full-image binary mask, or null
    ]
)

ROW_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("image_path", pa.string()),
        ("image_root", pa.string()),
        ("image_sha256", pa.string()),
        ("file_size", pa.int64()),
        ("file_mtime_ns", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("mime_type", pa.string()),
        ("task", pa.string()),
        ("model", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("retryable", pa.bool_()),  # an error a later plain run tries again (transient)
        ("objects", pa.list_(OBJECT_TYPE)),
        ("text", pa.string()),
        ("labels", pa.list_(pa.string())),
        ("json", pa.string()),
        ("finish_reason", pa.string()),
        ("raw_response", pa.string()),
        ("est_image_tokens", pa.int32()),
        ("est_prompt_tokens", pa.int32()),
        ("prompt_tokens", pa.int32()),
        ("output_tokens", pa.int32()),
        ("thoughts_tokens", pa.int32()),
        ("total_tokens", pa.int32()),
        ("latency_ms", pa.float32()),
        ("attempts", pa.int16()),
        ("input_mode", pa.string()),
        ("run_id", pa.string()),
        ("completed_at", pa.timestamp("us", tz="UTC")),
    ],
    metadata={"gemini_vision_pipeline.schema_version": SCHEMA_VERSION},
)


def make_key(image_sha256: str, settings_hash: str) -> str:
    """The unit of work and of payment: these bytes under these answer-changing settings."""
    return f"{image_sha256}.{settings_hash}"


def fingerprint(
    image_root: str, image_path: str, size: int, mtime_ns: int, key_suffix: str
) -> bytes:
    """Identity of "this file, unchanged since, under these settings" without reading it.

    Lets a nightly rerun skip committed files with a stat instead of re-hashing the whole store.
    `key_suffix` is the settings hash (the part of the key after the dot).
    """
    text = storable(f"{image_root}\0{image_path}\0{size}\0{mtime_ns}\0{key_suffix}")
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def storable(text: str) -> str:
    """A path as valid UTF-8 for Parquet: undecodable bytes of a Linux file name become \\xNN.

    Idempotent, so a fingerprint of a stored path equals the fingerprint of the path as found.
    """
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# ------------------------------------------------------------------------- rows -> Arrow
INT32_MAX = 2**31 - 1
# Columns a row keeps when it cannot be stored as it is: who it is, what was paid, the answer.
_KEPT_WHEN_UNSTORABLE = (
    "key",
    "image_path",
    "image_root",
    "image_sha256",
    "file_size",
    "file_mtime_ns",
    "task",
    "model",
    "finish_reason",
    "raw_response",
    "input_mode",
    "run_id",
    "completed_at",
)


def int32_or_none(value: object) -> int | None:
    """A count for an int32 column, or None when it does not fit (a hostile usageMetadata)."""
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and -INT32_MAX - 1 <= value <= INT32_MAX
    ):
        return value
    return None


def to_table(rows: list[dict[str, Any]]) -> tuple[pa.Table, list[str]]:
    """Rows -> a ROW_SCHEMA table, column by column; never loses a row.

    A row that cannot be encoded (a value beyond its column's range that slipped past the row
    builder, a wrong type) is replaced by an error row that keeps its identity and raw answer, so
    a rerun neither re-pays it nor loses the batch around it. Returns the reasons for those rows.
    """
    try:
        return _table(rows), []
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        pass  # find the rows at fault one by one: rare, so the slow path is fine
    kept, reasons = [], []
    for row in rows:
        try:
            _table([row])
            kept.append(row)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as exc:
            reason = f"row could not be stored ({_first_line(exc)}); the raw answer is kept"
            reasons.append(reason)
            kept.append(unstorable_row(row, reason))
    return _table(kept), reasons


def unstorable_row(row: dict[str, Any], reason: str) -> dict[str, Any]:
    kept = {name: row.get(name) for name in _KEPT_WHEN_UNSTORABLE}
    for name, value in kept.items():
        if not isinstance(value, str | int | type(None)) or (
            name in ("file_size", "file_mtime_ns") and not isinstance(value, int)
        ):
            kept[name] = value if name == "completed_at" else None
    return {**kept, "status": "error", "error": reason}


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    arrays = []
    for field_ in ROW_SCHEMA:
        values = [row.get(field_.name) for row in rows]
        try:
            arrays.append(pa.array(values, type=field_.type))
        except UnicodeEncodeError:
            # A lone surrogate (an undecodable file name in an error message, a "\udcff" escape
            # in a model's JSON) must not cost the row: store it as \xNN text instead.
            arrays.append(pa.array(_storable_deep(values), type=field_.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"column {field_.name!r}: {_first_line(exc)}") from None
    return pa.Table.from_arrays(arrays, schema=ROW_SCHEMA)


def _storable_deep(value: Any) -> Any:
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, dict):
        return {key: _storable_deep(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_storable_deep(item) for item in value]
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
