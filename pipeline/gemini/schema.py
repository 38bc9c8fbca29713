"""The OpenAPI schema subset (generateContent's `responseSchema`) as JSON Schema.

The Interactions API's `response_format.schema` is JSON Schema: lowercase type names, `null` as a
type instead of `nullable`. The pipeline's built-in schemas are the uppercase OpenAPI subset that
only `generationConfig.responseSchema` takes, so an Interactions body converts them here.

Follows the SDK's `google.genai.types.Schema.json_schema`: type names lowercased
(TYPE_UNSPECIFIED dropped), `nullable: true` adds "null" to the type, `items`, `anyOf`,
`properties` (and `additionalProperties`, `$defs` when they hold schemas) converted recursively,
keywords JSON Schema has kept, OpenAPI-only ones (`example`, `propertyOrdering`) dropped. Keys are
read in either spelling (`minItems` or the SDK's `min_items`). Two deliberate differences: int64
counts sent as JSON strings ("4") become integers, and a nullable `anyOf` gains a `{"type":
"null"}` branch (the SDK sets `type: "null"` beside the anyOf, which no value can satisfy).
"""

from __future__ import annotations

from typing import Any

# Keywords kept as they are: accepted spelling -> JSON Schema keyword.
_KEYWORDS = {
    "format": "format",
    "title": "title",
    "description": "description",
    "default": "default",
    "enum": "enum",
    "required": "required",
    "minimum": "minimum",
    "maximum": "maximum",
    "pattern": "pattern",
    "uniqueItems": "uniqueItems",
    "unique_items": "uniqueItems",
    "$ref": "$ref",
    "ref": "$ref",
}
# Counts (int64: the OpenAPI wire may send them as strings).
_COUNTS = {
    "minItems": "minItems",
    "min_items": "minItems",
    "maxItems": "maxItems",
    "max_items": "maxItems",
    "minLength": "minLength",
    "min_length": "minLength",
    "maxLength": "maxLength",
    "max_length": "maxLength",
    "minProperties": "minProperties",
    "min_properties": "minProperties",
    "maxProperties": "maxProperties",
    "max_properties": "maxProperties",
}
# Keywords holding a schema, a list of schemas, or a map of them.
_SCHEMA_KEYS = {
    "items": "items",
    "additionalProperties": "additionalProperties",
    "additional_properties": "additionalProperties",
}
_LIST_KEYS = {"anyOf": "anyOf", "any_of": "anyOf", "oneOf": "oneOf", "one_of": "oneOf"}
_MAP_KEYS = {"properties": "properties", "$defs": "$defs", "defs": "$defs"}


def json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` (OpenAPI subset, or already JSON Schema) as JSON Schema."""
    out: dict[str, Any] = {}
    for name, value in schema.items():
        if value is None:
            continue
        if name == "type":
            _set_type(out, value)
        elif name in _KEYWORDS:
            out[_KEYWORDS[name]] = value
        elif name in _COUNTS:
            out[_COUNTS[name]] = int(value)
        elif name in _SCHEMA_KEYS:
            out[_SCHEMA_KEYS[name]] = json_schema(value) if isinstance(value, dict) else value
        elif name in _LIST_KEYS:
            out[_LIST_KEYS[name]] = [json_schema(item) for item in value]
        elif name in _MAP_KEYS:
            out[_MAP_KEYS[name]] = {key: json_schema(item) for key, item in value.items()}
    if schema.get("nullable") is True:
        _add_null(out)
    return out


def _set_type(out: dict[str, Any], value: Any) -> None:
    names = value if isinstance(value, list) else [value]
    types = [str(name).lower() for name in names if str(name).upper() != "TYPE_UNSPECIFIED"]
    if types:
        out["type"] = types if isinstance(value, list) else types[0]


def _add_null(out: dict[str, Any]) -> None:
    if "anyOf" in out and "type" not in out:
        out["anyOf"].append({"type": "null"})
        return
    kind = out.get("type")
    if kind is None:
        out["type"] = "null"
    elif isinstance(kind, list):
        out["type"] = kind if "null" in kind else [*kind, "null"]
    elif kind != "null":
        out["type"] = [kind, "null"]


# ---------------------------------------------------------------------------- checking a schema
# What a user's schema must be before a run sends it (tasks/generation.py refuses it at config
# time: a malformed schema is a 400 on every request). responseSchema is the OpenAPI subset:
# these fields (snake_case; camelCase taken too) and types.Type's names, in any case as Google's
# JSON parsing takes enum names (google-genai 3.6 types.Schema, types.Type; the local server
# holds requests to the same, pipeline/localserver/fields.py SCHEMA).
OPENAPI_TYPES = (
    "TYPE_UNSPECIFIED",
    "STRING",
    "NUMBER",
    "INTEGER",
    "BOOLEAN",
    "ARRAY",
    "OBJECT",
    "NULL",
)
OPENAPI_FIELDS = (
    "type",
    "format",
    "title",
    "description",
    "nullable",
    "enum",
    "max_items",
    "min_items",
    "properties",
    "required",
    "min_properties",
    "max_properties",
    "min_length",
    "max_length",
    "pattern",
    "example",
    "any_of",
    "property_ordering",
    "default",
    "items",
    "minimum",
    "maximum",
)
_OPENAPI_NAMES = {
    spelling: name
    for name in OPENAPI_FIELDS
    for spelling in (name, name.split("_")[0] + "".join(w.title() for w in name.split("_")[1:]))
}


def json_schema_problem(schema: Any) -> str | None:
    """Why `schema` is no JSON Schema (the meta-schema of its `$schema`, else draft 2020-12,
    whose $defs and prefixItems responseJsonSchema documents), or None. The jsonschema library
    is the reference validator; it is imported here only, when a user's schema is checked (it
    adds about 80 ms to a start that does not need it)."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match
    from jsonschema.validators import validator_for

    validator = validator_for(schema, default=Draft202012Validator)
    error = best_match(validator(validator.META_SCHEMA).iter_errors(schema))
    if error is None:
        return None
    where = ".".join(str(part) for part in error.absolute_path)
    return f"not a valid JSON Schema{f' at {where}' if where else ''}: {error.message}"


def openapi_schema_problem(schema: Any, where: str = "") -> str | None:
    """Why `schema` is not of responseSchema's OpenAPI subset (a field it lacks, a type name
    types.Type lacks), or None."""
    if not isinstance(schema, dict):
        return f"has no schema at {where or 'the top'} (an object is needed)"
    for key, value in schema.items():
        name = _OPENAPI_NAMES.get(key)
        at = f"{where}.{key}" if where else key
        if name is None:
            return f"has no field {key!r}{f' at {where}' if where else ''}"
        problem = _openapi_value_problem(name, value, at)
        if problem is not None:
            return problem
    return None


def _openapi_value_problem(name: str, value: Any, at: str) -> str | None:
    if name == "type" and str(value).upper() not in OPENAPI_TYPES:
        return f"has no type {value!r} at {at} (types: {', '.join(OPENAPI_TYPES[1:])})"
    if name == "items":
        return openapi_schema_problem(value, at)
    if name == "properties" and isinstance(value, dict):
        children = ((item, f"{at}.{key}") for key, item in value.items())
    elif name == "any_of" and isinstance(value, list):
        children = ((item, f"{at}.{index}") for index, item in enumerate(value))
    else:
        return None
    return next((p for item, path in children if (p := openapi_schema_problem(item, path))), None)
