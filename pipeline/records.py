"""The one currency of the pipeline: a source file -> an image item -> a parsed answer -> a row.

Every stage takes and gives these types, so stages can be read, tested and replaced one by one.
A request may be about several images: a `SourceGroup` (the files of a folder, or of a manifest's
`group`) is prepared into a `Unit` of ImageItems and answered by one request into one row. A lone
file is a unit of one whose row is the plain image row (`members` null).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

# re-exported: rows, engines and tests name them as records' (rowtypes.py says why they live there)
from pipeline.rowtypes import ANSWER as ANSWER
from pipeline.rowtypes import KeySuffixes as KeySuffixes
from pipeline.rowtypes import Parsed as Parsed
from pipeline.rowtypes import Status as Status

# 2: `retryable` (parts of version 1 read it as null). 3: `members` (group rows) and the object
# fields `point_2d`, `xy` (points) and `image` (which member an object is in); older parts read
# them as null, which is what a single image's row holds. 4: `cached_tokens` (the prompt tokens an
# implicit cache served, billed at the cached rate); older parts read it as null (none cached),
# and an older program refuses a version-4 part rather than bill its cached tokens at full price.
# 5: `answer`, the custom task's answer typed by its response_schema (a struct, a list, ...:
# `pipeline/tasks/typed.py`); older parts read it as null, as do other tasks' rows.
# 6: `traffic_type`, the quota Vertex AI served a row from (usageMetadata.trafficType:
# ON_DEMAND, PROVISIONED_THROUGHPUT, ...); null on the Developer API and in older parts.
SCHEMA_VERSION = "6"
# billed token counts of a row (the service's usageMetadata), summed for cost and status;
# `cached_tokens` is the part of `prompt_tokens` billed at the cached rate
USAGE_COLUMNS = (
    "prompt_tokens",
    "cached_tokens",
    "output_tokens",
    "thoughts_tokens",
    "total_tokens",
)


@dataclass(slots=True)
class SourceFile:
    """A file the producer found: where it is and the cheap facts a stat gives."""

    path: str  # absolute path as found (symlinks not resolved)
    root: str  # the input root it was found under (absolute)
    rel_path: str  # path relative to root, POSIX separators; what rows call image_path
    size: int = 0
    mtime_ns: int = 0
    error: str | None = None  # why this entry cannot be used (broken link, symlink loop, ...)
    # What the store says of the bytes without reading them (a gs:// object's md5Hash, or its
    # crc32c, size and generation: `stores.content_id`); "" when it says nothing
    content_id: str = ""


@dataclass(slots=True)
class ImageItem:
    """A file made ready to send: hashed, sniffed, oriented, maybe converted or downscaled.

    `data` holds the bytes to send when they differ from the file (converted, EXIF-rotated,
    downscaled); None means "send the file as it is" so large files can stream from disk.
    `width`/`height` are the displayed size of the original: every coordinate maps to it.
    An item that cannot be used carries `error` and becomes an error row.
    """

    source: SourceFile
    sha256: str = ""  # of the file's bytes (sent in place: of its content_id, in_place.py)
    mime_type: str = ""  # of the bytes that will be sent
    width: int = 0
    height: int = 0
    sent_width: int = 0
    sent_height: int = 0
    data: bytes | None = None
    send_size: int = 0  # bytes that will be sent (len(data) or the file size)
    error: str | None = None
    retryable: bool = False  # the error may pass (a URL or a bucket that failed to answer)
    # a gs:// object sent as it is stored, which Vertex AI reads itself (fileData.fileUri):
    # decided once, where the item is prepared (pipeline/inputs/in_place.py)
    in_place: bool = False


@dataclass(slots=True)
class SourceGroup:
    """Files asked about together in one request, in their stated order (pipeline/inputs/source.py).

    `name` is what the group's row calls image_path: the folder relative to `root`, or the
    manifest's `group` value. `error` says why the group cannot be sent at all.
    """

    name: str
    root: str
    members: tuple[SourceFile, ...]
    error: str | None = None


Work = SourceFile | SourceGroup  # what engines hand to the runner: a lone file, or a group


@dataclass(slots=True)
class Unit:
    """One request's worth of images: a group's prepared members in order, or one lone file.

    `group` is None for a lone file (its row is the plain image row). `sha256` names the bytes
    asked about: the file's, or the group's (`group_sha256` of the members' in order); "" when
    some member could not be read. `error` says why the request cannot be made.
    """

    items: tuple[ImageItem, ...]
    group: SourceGroup | None = None
    sha256: str = ""
    error: str | None = None

    @classmethod
    def lone(cls, item: ImageItem) -> Unit:
        """The unit of one file: its row is the plain image row."""
        return cls((item,), None, item.sha256, item.error)

    @property
    def sizes(self) -> tuple[tuple[int, int], ...] | None:
        """Displayed (width, height) of each member of a group; None for a lone file."""
        if self.group is None:
            return None
        return tuple((item.width, item.height) for item in self.items)


def as_group(work: Work) -> SourceGroup | None:
    """The group a piece of work is, or None for a lone file."""
    return work if isinstance(work, SourceGroup) else None


def members_of(work: Work) -> tuple[SourceFile, ...]:
    """The files a piece of work asks about: a group's members, or the lone file."""
    return work.members if isinstance(work, SourceGroup) else (work,)


def group_sha256(member_sha256s: Sequence[str]) -> str:
    """A group's identity: the sha256 of its members' sha256s in order (the order is asked
    about: "Image 0" is the first), so the same images in another order are another question."""
    text = "group\0" + "\0".join(member_sha256s)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def group_stamp(members: tuple[SourceFile, ...]) -> tuple[int, int]:
    """(file_size, file_mtime_ns) of a group's row: the members' total size and a digest of
    their paths, sizes and mtimes in order, so a rerun's stat of every member tells whether the
    group is unchanged (a member added, removed, reordered or touched changes it)."""
    digest = hashlib.blake2b(digest_size=8)
    for src in members:
        line = f"{src.root}\0{src.rel_path}\0{src.size}\0{src.mtime_ns}\n"
        digest.update(storable(line).encode())
    stamp = int.from_bytes(digest.digest(), "big") >> 1  # fits the int64 column
    return sum(src.size for src in members), stamp


def work_identity(work: Work) -> tuple[str, str, int, int]:
    """(image_root, image_path, file_size, file_mtime_ns) of the row this work makes: what the
    resume index fingerprints."""
    if isinstance(work, SourceGroup):
        return (work.root, work.name, *group_stamp(work.members))
    return work.root, work.rel_path, work.size, work.mtime_ns


def resumable(work: Work) -> bool:
    """Whether a rerun may skip this work when a row of its identity is committed. A usable
    file always; an error entry (a broken link, a FIFO) only with a stamp of its own (the
    link's lstat, the FIFO's stat), so it is recorded once, not again every night; an entry
    with no stamp (a manifest URL whose HEAD failed) could be anything next time: asked again."""
    return work.error is None or work_identity(work)[3] != 0


MASK_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
OBJECT_TYPE = pa.struct(
    [
        ("label", pa.string()),
        ("box_2d", pa.list_(pa.int32())),  # exactly as returned: [ymin, xmin, ymax, xmax] 0-1000
        ("bbox", pa.list_(pa.float32())),  # [x0, y0, x1, y1] in pixels of the displayed image
        ("mask", MASK_TYPE),  # COCO compressed RLE of the full-image binary mask, or null
        ("point_2d", pa.list_(pa.int32())),  # a point exactly as returned: [y, x] 0-1000
        ("xy", pa.list_(pa.float32())),  # the point in pixels of the displayed image: [x, y]
        ("image", pa.int16()),  # a group row's objects: the member they are in (0 = first)
    ]
)
# A group row's members, in the order they were sent ("Image 0" first); the same facts a single
# image's row holds in its own columns.
MEMBER_TYPE = pa.struct(
    [
        ("image_path", pa.string()),  # relative to image_root
        ("image_root", pa.string()),
        ("image_sha256", pa.string()),
        ("file_size", pa.int64()),
        ("file_mtime_ns", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("mime_type", pa.string()),
    ]
)

# The typed answer column. Its type is the run's (derived from the response_schema), so it is
# not fixed here: `row_schema(field)`. Without a schema it is of Arrow's null type, which every
# other type conforms from and which Parquet stores at no cost.
NO_ANSWER = pa.field(ANSWER, pa.null())
_VERSION_METADATA = {"gemini_vision_pipeline.schema_version": SCHEMA_VERSION}

_FIXED_FIELDS = pa.schema(
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
        ("cached_tokens", pa.int32()),  # of prompt_tokens, served by an implicit cache
        ("output_tokens", pa.int32()),
        ("thoughts_tokens", pa.int32()),
        ("total_tokens", pa.int32()),
        ("latency_ms", pa.float32()),
        ("attempts", pa.int16()),
        ("input_mode", pa.string()),
        ("run_id", pa.string()),
        ("completed_at", pa.timestamp("us", tz="UTC")),
        ("members", pa.list_(MEMBER_TYPE)),  # a group row's images; null for a single image
        ("traffic_type", pa.string()),  # Vertex AI's usageMetadata.trafficType; else null
    ]
)


def row_schema(answer: pa.Field | None = None) -> pa.Schema:
    """The row schema of an output whose `answer` column is `answer` (None: no typed answer).
    Every part of one output shares it, so a plain glob reader (Polars, DuckDB) sees one schema;
    the field goes last so the fixed columns keep their places across versions."""
    field_ = NO_ANSWER if answer is None else answer.with_name(ANSWER)
    return _FIXED_FIELDS.append(field_).with_metadata(_VERSION_METADATA)


ROW_SCHEMA = row_schema()


def answer_field(schema: pa.Schema) -> pa.Field:
    """The `answer` field of a part's schema (a part older than version 5 has none: null)."""
    index = schema.get_field_index(ANSWER)
    return NO_ANSWER if index < 0 else schema.field(index)


def new_run_id(kind: str = "") -> str:
    """A run's id: its UTC start (ids sort as runs began; rows and parts carry it) and 6 random
    hex digits; `kind` names what another command's run is (`reparse`, `batch-wait`)."""
    marked = f"{kind}-" if kind else ""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ-") + marked + secrets.token_hex(3)


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
    "members",
    "traffic_type",
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


# What pyarrow raises for a value its type cannot hold.
_ENCODING_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError)


def to_table(
    rows: list[dict[str, Any]], answer: pa.Field | None = None
) -> tuple[pa.Table, list[str]]:
    """Rows -> a table of `row_schema(answer)`, column by column; never loses a row.

    A row that cannot be encoded (a value beyond its column's range that slipped past the row
    builder, a wrong type) is replaced by an error row that keeps its identity and raw answer, so
    a rerun neither re-pays it nor loses the batch around it. Returns the reasons for those rows.
    An `answer` value that does not fit the column's type is stored as null instead (the `json`
    column still holds it): a row parsed under another schema must not cost its other columns.
    """
    schema = row_schema(answer)
    try:
        return _table(rows, schema), []
    except _ENCODING_ERRORS:
        pass  # find the rows at fault one by one: rare, so the slow path is fine
    kept, reasons = [], []
    for row in rows:
        try:
            _table([row], schema)
            kept.append(row)
        except _ENCODING_ERRORS as exc:
            reason = f"row could not be stored ({_first_line(exc)}); the raw answer is kept"
            reasons.append(reason)
            kept.append(unstorable_row(row, reason))
    return _table(kept, schema), reasons


def unstorable_row(row: dict[str, Any], reason: str) -> dict[str, Any]:
    kept = {name: row.get(name) for name in _KEPT_WHEN_UNSTORABLE}
    for name, value in kept.items():
        if name == "members":
            kept[name] = value if _encodes(value, ROW_SCHEMA.field(name).type) else None
        elif not isinstance(value, str | int | type(None)) or (
            name in ("file_size", "file_mtime_ns") and not isinstance(value, int)
        ):
            kept[name] = value if name == "completed_at" else None
    return {**kept, "status": "error", "error": reason}


def _encodes(value: Any, type_: pa.DataType) -> bool:
    try:
        pa.array([value], type=type_)
    except _ENCODING_ERRORS:
        return False
    return True


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    arrays = []
    for field_ in schema:
        values = [row.get(field_.name) for row in rows]
        try:
            arrays.append(_column(values, field_))
        except UnicodeEncodeError:
            # A lone surrogate (an undecodable file name in an error message, a "\udcff" escape
            # in a model's JSON) must not cost the row: store it as \xNN text instead.
            arrays.append(_column(_storable_deep(values), field_))
        except _ENCODING_ERRORS as exc:
            raise ValueError(f"column {field_.name!r}: {_first_line(exc)}") from None
    return pa.Table.from_arrays(arrays, schema=schema)


def _column(values: list[Any], field_: pa.Field) -> pa.Array:
    if field_.name != ANSWER:
        return pa.array(values, type=field_.type)
    try:
        return pa.array(values, type=field_.type)
    except UnicodeEncodeError:
        raise
    except _ENCODING_ERRORS:  # one answer of another shape: null for it alone
        return pa.array([v if _encodes(v, field_.type) else None for v in values], field_.type)


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


def skip_pandas_probe() -> None:
    """Have pyarrow take pandas as absent in this process, unless something imported it.

    pyarrow's first `pa.array` of a list imports pandas, where installed, to ask whether the list
    is a pandas object: 0.3-0.45 s of CPU at every `pipeline run`, for rows that never are. With
    the import refused once, pyarrow answers "no pandas" from then on; its pandas conversions
    (`to_pandas`, `from_pandas`) try the import again and work. For the CLI's run, before any
    thread starts: a user's process (the library) may hand pyarrow pandas objects, and keeps
    pyarrow's own behaviour.
    """
    if "pandas" in sys.modules:
        return
    refusal = _RefusePandas()
    sys.meta_path.insert(0, refusal)
    try:
        pa.array([])
    finally:
        sys.meta_path.remove(refusal)


class _RefusePandas:
    """An import finder that has `import pandas` fail, as where it is not installed."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> None:
        if name == "pandas":
            raise ModuleNotFoundError("pandas skipped for pyarrow's probe", name=name)


# ------------------------------------------------------------------ one schema per output
def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` (of an older row schema) as a table of `schema`: a column or struct field it lacks
    is null, one `schema` lacks is dropped, and a value the new type cannot hold is null (for
    `answer`, the `json` column still holds the whole answer). Pure: for rewriting parts after
    the response_schema changed, and for reading parts of several schemas as the newest."""
    columns = [
        conform_array(table.column(f.name), f.type)
        if f.name in table.column_names
        else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def conform_array(array: pa.Array | pa.ChunkedArray, type_: pa.DataType) -> Any:
    """`array` as `type_`, field by field (see `conform`); a chunked array stays chunked."""
    if isinstance(array, pa.ChunkedArray):
        chunks = [conform_array(chunk, type_) for chunk in array.chunks]
        return pa.chunked_array(chunks, type=type_)
    if array.type == type_:
        return array
    if pa.types.is_null(type_) or pa.types.is_null(array.type):
        return pa.nulls(len(array), type_)
    if pa.types.is_struct(type_) and pa.types.is_struct(array.type):
        return _conform_struct(array, type_)
    if _is_list(type_) and _is_list(array.type):
        return _conform_list(array, type_)
    if pa.types.is_large_string(type_) and _is_nested(array.type):
        # a value whose schema became free-form is kept as the JSON string such a field holds
        return pa.array([_json_text(v) for v in array.to_pylist()], type_)
    return _cast_each(array, type_)


def _is_list(type_: pa.DataType) -> bool:
    return pa.types.is_list(type_) or pa.types.is_large_list(type_)


def _is_nested(type_: pa.DataType) -> bool:
    return pa.types.is_struct(type_) or _is_list(type_)


def _conform_struct(array: pa.StructArray, type_: pa.StructType) -> pa.Array:
    names = [array.type.field(i).name for i in range(array.type.num_fields)]
    children = [
        conform_array(array.field(f.name), f.type)
        if f.name in names
        else pa.nulls(len(array), f.type)
        for f in type_
    ]
    return pa.StructArray.from_arrays(children, fields=list(type_), mask=array.is_null())


def _conform_list(array: pa.ListArray, type_: pa.ListType) -> pa.Array:
    # .offsets keeps a slice's place in .values, which ignores the slice: take the values it
    # spans and start the offsets at 0 (from_arrays refuses a null mask with sliced offsets)
    offsets = array.offsets
    first = offsets[0].as_py()
    values = array.values.slice(first, offsets[-1].as_py() - first)
    rebased = pc.subtract(offsets, pa.scalar(first, offsets.type))
    conformed = conform_array(values, type_.value_type)
    return pa.ListArray.from_arrays(rebased, conformed, type=type_, mask=array.is_null())


def _cast_each(array: pa.Array, type_: pa.DataType) -> pa.Array:
    """A safe cast (no silent truncation); where it fails, value by value, null for the misfits."""
    try:
        return array.cast(type_)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        pass
    return pa.array([_cast_one(array[i], type_) for i in range(len(array))], type_)


def _cast_one(value: pa.Scalar, type_: pa.DataType) -> Any:
    try:
        return value.cast(type_).as_py()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return None


def _json_text(value: Any) -> str | None:
    if value is None:
        return None
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
