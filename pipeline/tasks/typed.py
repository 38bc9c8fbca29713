"""The custom task's answer as typed columns: a response_schema -> an Arrow type, an answer -> a
value of it, or the place where the answer does not fit the schema.

The type is a pure function of the schema, so every run with the same schema writes the same
`answer` column (README, Output):

- object with properties -> struct of them (in the schema's order); array -> list of its items;
  string, integer, number, boolean -> string, int64, float64, bool; an enum -> the type of its
  values; integer mixed with number -> float64;
- null (`nullable`, a "null" type, an anyOf/oneOf branch) only makes the field nullable, which
  every Arrow field here is, since a row without the value must still be stored;
- what Arrow cannot hold as one type (a free-form object, an object without properties, mixed
  anyOf branches, an enum of mixed values, a $ref met again inside itself) -> a large_string
  holding the value's JSON (large_string so the type tells it from a plain string), one type
  for every row.

The schema the type came from is kept in the field's metadata (RESPONSE_SCHEMA_KEY), so a
`reparse` without the config re-derives the same column from the stored raw answers.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pyarrow as pa

from pipeline.gemini.schema import json_schema
from pipeline.rowtypes import ANSWER, Parsed
from pipeline.tasks.answers import utf8_safe
from pipeline.tasks.base import TaskSettings

RESPONSE_SCHEMA_KEY = b"gemini_vision_pipeline.response_schema"
# A value no Arrow type expresses, kept as its JSON text. large_string, not string, so that the
# type alone tells a JSON field from a plain string one (readers see both as text).
JSON_TEXT = pa.large_string()
_SCALARS = {
    "string": pa.string(),
    "integer": pa.int64(),
    "number": pa.float64(),
    "boolean": pa.bool_(),
}
_INT64 = (-(2**63), 2**63 - 1)


class AnswerMismatch(ValueError):
    """An answer that does not fit the response_schema; `path` names the place ($.a[2].b)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"answer does not fit response_schema at {path}: {message}")
        self.path = path


def schema_of(obj: Any) -> dict[str, Any]:
    """A response_schema from a dict (returned as it is) or a Pydantic model class (its
    `model_json_schema()`). Duck-typed, so pydantic is never imported here: the Python API's
    users bring it, the pipeline does not need it."""
    if isinstance(obj, dict):
        return obj
    make = getattr(obj, "model_json_schema", None)
    if isinstance(obj, type) and callable(make):
        schema = make()
        if isinstance(schema, dict):
            return schema
    raise TypeError(
        f"a response_schema is a JSON Schema dict or a Pydantic model class, not {obj!r}"
    )


# ---------------------------------------------------------------------------- the column
def answer_schema(settings: TaskSettings) -> dict[str, Any] | None:
    """The JSON Schema a custom task's answers are held to, or None (another task, no schema,
    or `{}`, which sends none). A schema sent as responseSchema (OpenAPI subset) is read as JSON
    Schema, as the service reads it."""
    schema = settings.response_schema
    if settings.kind != "custom" or not schema:
        return None
    return schema if settings.spec.json_schema else json_schema(schema)


def answer_field(settings: TaskSettings) -> pa.Field | None:
    """The run's `answer` column, or None when the run has no typed answer."""
    schema = answer_schema(settings)
    return None if schema is None else field_of(schema)


def field_of(schema: dict[str, Any]) -> pa.Field:
    """The `answer` field of a JSON Schema, carrying the schema in its metadata."""
    text = canonical(schema)
    return _field_of_text(text)


@functools.lru_cache(maxsize=64)
def _field_of_text(text: str) -> pa.Field:
    schema = json.loads(text)
    type_ = arrow_type(schema, schema)
    return pa.field(ANSWER, type_, metadata={RESPONSE_SCHEMA_KEY: text.encode()})


def schema_in(field: pa.Field) -> dict[str, Any] | None:
    """The response_schema an `answer` field was derived from (None: a field without one)."""
    text = (field.metadata or {}).get(RESPONSE_SCHEMA_KEY)
    return None if text is None else json.loads(text)


def canonical(schema: dict[str, Any]) -> str:
    """The schema as compact JSON: the cache key, and what the field's metadata holds. Key order
    is kept (not sorted): the order of `properties` is the order of the struct's fields."""
    return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))


def arrow_type(
    schema: Any, root: dict[str, Any], refs: frozenset[str] = frozenset()
) -> pa.DataType:
    """The Arrow type of the values `schema` allows (module doc); `root` resolves local $refs,
    `refs` are those being expanded (one met again is recursive: no finite type holds it)."""
    if not isinstance(schema, dict):
        return JSON_TEXT
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref in refs:
        return JSON_TEXT
    schema = _resolved(schema, root)
    if schema is None:
        return JSON_TEXT
    refs = refs | {ref} if isinstance(ref, str) else refs
    if "enum" in schema or "const" in schema:
        return _constants_type(schema.get("enum", [schema.get("const")]))
    branches = [b for b in schema.get("anyOf", schema.get("oneOf", [])) if not _is_null(b)]
    if branches:
        types = {arrow_type(branch, root, refs) for branch in branches}
        return types.pop() if len(types) == 1 else JSON_TEXT
    return _typed(schema, root, refs)


def _resolved(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any] | None:
    """`schema` with a local $ref ("#/$defs/x") followed; None for a ref that leads nowhere."""
    ref = schema.get("$ref")
    if not isinstance(ref, str):
        return schema
    if not ref.startswith("#"):
        return None
    target: Any = root
    for part in filter(None, ref[1:].split("/")):
        target = target.get(part.replace("~1", "/").replace("~0", "~"), None)
        if not isinstance(target, dict):
            return None
    return target


def _is_null(schema: Any) -> bool:
    return isinstance(schema, dict) and schema.get("type") == "null" and len(schema) == 1


def _typed(schema: dict[str, Any], root: dict[str, Any], refs: frozenset[str]) -> pa.DataType:
    kinds = _kinds(schema)
    if kinds == {"integer", "number"}:
        return pa.float64()
    if len(kinds) != 1:
        return JSON_TEXT
    kind = kinds.pop()
    if kind == "object":
        return _struct(schema, root, refs)
    if kind == "array":
        return pa.list_(arrow_type(schema.get("items", {}), root, refs))
    return _SCALARS.get(kind, JSON_TEXT)


def _kinds(schema: dict[str, Any]) -> set[str]:
    """The non-null types a schema names (inferred from properties / items when it names none)."""
    kind = schema.get("type")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else []
    names = kind if isinstance(kind, list) else [kind]
    return {str(name).lower() for name in names} - {"null"}


def _struct(schema: dict[str, Any], root: dict[str, Any], refs: frozenset[str]) -> pa.DataType:
    properties = schema.get("properties")
    if not isinstance(properties, dict) or not properties:
        return JSON_TEXT  # free-form: no fields to make columns of
    return pa.struct(
        [pa.field(name, arrow_type(sub, root, refs)) for name, sub in properties.items()]
    )


def _constants_type(values: Any) -> pa.DataType:
    kinds = {_json_kind(v) for v in values} - {"null"} if isinstance(values, list) else set()
    if kinds == {"integer", "number"}:
        return pa.float64()
    return _SCALARS.get(next(iter(kinds)), JSON_TEXT) if len(kinds) == 1 else JSON_TEXT


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    return {float: "number", str: "string"}.get(type(value), "other")


# ---------------------------------------------------------------------------- the values
def with_answer(parsed: Parsed, field: pa.Field | None) -> Parsed:
    """`parsed` (a custom answer read as JSON) with its typed `answer` for `field`, or an error
    naming where it does not fit; as it is without a field (no schema) or without JSON."""
    if field is None or pa.types.is_null(field.type) or parsed.json is None:
        return parsed
    if parsed.status != "ok":
        return parsed
    try:
        return replace(parsed, answer=typed_answer(json.loads(parsed.json), field))
    except AnswerMismatch as exc:
        return replace(parsed, status="error", answer=None, error=str(exc))


def typed_answer(value: Any, field: pa.Field) -> Any:
    """The answer `value` (parsed JSON) as a value of `field`: checked against the schema the
    field carries (every keyword: enum, required, minimum, ...), then shaped for the column.
    Raises AnswerMismatch naming the first place that does not fit."""
    schema = schema_in(field)
    if schema is not None:
        _check(value, canonical(schema))
    return fit(value, field.type, "$")


def _check(value: Any, schema_text: str) -> None:
    from jsonschema.exceptions import best_match  # (see _validator)
    from referencing.exceptions import Unresolvable

    try:
        error = best_match(_validator(schema_text).iter_errors(value))
    except Unresolvable as exc:  # a $ref to elsewhere: never fetched, so never checked
        raise AnswerMismatch("$", f"the schema's $ref {exc.ref!r} cannot be resolved") from None
    if error is not None:
        raise AnswerMismatch(path_text(error.absolute_path), error.message)


@functools.lru_cache(maxsize=16)
def _validator(schema_text: str) -> Any:
    """The schema's validator (its `$schema`'s draft, else 2020-12), built once per schema.
    jsonschema is imported here only: a run without a schema does not pay its import."""
    from jsonschema import Draft202012Validator
    from jsonschema.validators import validator_for

    schema = json.loads(schema_text)
    return validator_for(schema, default=Draft202012Validator)(schema)


def path_text(parts: Any) -> str:
    """A JSON path as the error names it: $.items[2].score."""
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


def fit(value: Any, type_: pa.DataType, path: str) -> Any:
    """`value` as a Python value of `type_` (a struct keeps only its fields; JSON text holds the
    value as JSON); AnswerMismatch where the value's kind is not the type's."""
    if value is None:
        return None
    if type_ == JSON_TEXT:
        return utf8_safe(json.dumps(value, ensure_ascii=False, separators=(",", ":")))
    if pa.types.is_struct(type_):
        return dict(_fields(_expect(value, dict, "an object", path), type_, path))
    if pa.types.is_list(type_):
        items = _expect(value, list, "an array", path)
        return [fit(item, type_.value_type, f"{path}[{i}]") for i, item in enumerate(items)]
    return _scalar(value, type_, path)


def _fields(value: dict[str, Any], type_: pa.StructType, path: str) -> Iterator[tuple[str, Any]]:
    for field in type_:
        yield field.name, fit(value.get(field.name), field.type, f"{path}.{field.name}")


def _expect(value: Any, kind: type, name: str, path: str) -> Any:
    if not isinstance(value, kind):
        raise AnswerMismatch(path, f"{_shown(value)} is not {name}")
    return value


def _scalar(value: Any, type_: pa.DataType, path: str) -> Any:
    if pa.types.is_boolean(type_):
        return _expect(value, bool, "a boolean", path)
    if pa.types.is_string(type_):  # a lone surrogate (JSON's "\ud800") is stored as "?"
        return utf8_safe(_expect(value, str, "a string", path))
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AnswerMismatch(path, f"{_shown(value)} is not a number")
    if pa.types.is_floating(type_):
        return float(value)
    if not isinstance(value, int) and not float(value).is_integer():
        raise AnswerMismatch(path, f"{_shown(value)} is not an integer")
    if not _INT64[0] <= value <= _INT64[1]:
        raise AnswerMismatch(path, f"{_shown(value)} is beyond a 64-bit integer")
    return int(value)


def _shown(value: Any) -> str:
    return repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
