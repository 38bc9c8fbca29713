"""The shapes of a request body as data, and one walker that holds a body to them.

A body is checked against a tree of specs (fields.py declares the trees): `Message` (an object
with known fields, snake_case names), `ListOf`, `MapOf`, `Choice` (by JSON kind, for the
Interactions API's "a string or a list" fields), `Union` (by a `type` discriminator), `Scalar`,
`Enum` and `Opaque` (any JSON: google.protobuf.Value / Struct, or parts the double never reads).
`check` walks the whole body and reports every violation at once, worded as the service words
them (rules fields.unknown, fields.value):

    Invalid JSON payload received. Unknown name "foo" at 'generation_config': Cannot find field.
    Invalid value at 'generation_config.max_output_tokens' (TYPE_INT32), "many"

generateContent takes camelCase or snake_case names (Google's JSON mapping of protos); the
Interactions API takes snake_case only and answers 400 `parameter_unknown` for unknown names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.localserver import errors
from pipeline.localserver.errors import Violation

PROTO_PACKAGE = "google.ai.generativelanguage"
_NUMBER = re.compile(r"^-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?$|^-?Infinity$|^NaN$")
_INTEGER = re.compile(r"^-?\d+$")
_CAMEL: dict[str, str] = {}


@dataclass(frozen=True, slots=True)
class Scalar:
    type_name: str  # the proto type the service names in errors: TYPE_STRING, TYPE_INT32, ...
    kind: str  # string | integer | number | bool


@dataclass(frozen=True, slots=True)
class Enum:
    name: str  # proto enum name, e.g. "GenerationConfig.MediaResolution"
    values: tuple[str, ...]
    case_sensitive: bool = False  # Google's JSON parsing takes enum names in any case
    rule: str = "fields.value"  # the rule a value outside `values` breaks


@dataclass(frozen=True, slots=True)
class Opaque:
    """Any JSON value ("value"), or any object ("object"): not looked into."""

    kind: str = "value"


@dataclass(frozen=True, slots=True)
class Message:
    """An object with known fields. `sdk` names the SDK types whose fields these must be (tests
    check it); `sdk_names` maps a wire name to its SDK field name where they differ."""

    name: str
    fields: dict[str, Any]
    sdk: tuple[str, ...] = ()
    sdk_names: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ListOf:
    item: Any


@dataclass(frozen=True, slots=True)
class MapOf:
    value: Any


@dataclass(frozen=True, slots=True)
class Choice:
    """One spec per JSON kind ("string", "object", "array")."""

    by_kind: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Union:
    """Objects told apart by a discriminator field (the Interactions API's `type`)."""

    key: str
    variants: Mapping[str, Any]


STRING = Scalar("TYPE_STRING", "string")
BYTES = Scalar("TYPE_BYTES", "string")
INT32 = Scalar("TYPE_INT32", "integer")
INT64 = Scalar("TYPE_INT64", "integer")
FLOAT = Scalar("TYPE_FLOAT", "number")
DOUBLE = Scalar("TYPE_DOUBLE", "number")
BOOL = Scalar("TYPE_BOOL", "bool")
ANY = Opaque("value")
ANY_OBJECT = Opaque("object")


def camel(snake: str) -> str:
    name = _CAMEL.get(snake)
    if name is None:
        head, *rest = snake.split("_")
        name = _CAMEL[snake] = head + "".join(word.title() for word in rest)
    return name


def get(obj: Any, snake: str, default: Any = None) -> Any:
    """obj[snake] or obj[camelCase of snake] (a checked body uses either spelling)."""
    if not isinstance(obj, dict):
        return default
    value = obj.get(snake)
    if value is None:
        value = obj.get(camel(snake))
    return default if value is None else value


def check(body: Any, root: Message, *, version: str, interactions: bool = False) -> None:
    """Raise one ApiError listing every violation of `body` against `root`, if any."""
    walker = _Walker(version, interactions)
    walker.message(body, root, "", None)
    if walker.violations:
        first_rule = walker.rules[0]
        raise errors.field_violations(walker.violations, rule=first_rule, interactions=interactions)


class _Walker:
    """Collects (rule, violation) pairs while walking one body."""

    def __init__(self, version: str, interactions: bool) -> None:
        self.version = version
        self.interactions = interactions
        self.violations: list[Violation] = []
        self.rules: list[str] = []

    # ------------------------------------------------------------------------------- nodes

    def value(self, value: Any, spec: Any, path: str, parent: str, name: str) -> None:
        if value is None:
            return  # JSON null is the field's default, as in proto3 JSON
        if isinstance(spec, Opaque):
            if spec.kind == "object" and not isinstance(value, dict):
                self.bad_value(value, "object", path)
        elif isinstance(spec, Scalar | Enum):
            self.scalar(value, spec, path, parent, name)
        elif isinstance(spec, ListOf):
            self.list(value, spec, path, parent, name)
        elif isinstance(spec, MapOf):
            self.map(value, spec, path)
        elif isinstance(spec, Choice):
            self.choice(value, spec, path, parent, name)
        elif isinstance(spec, Union):
            self.union(value, spec, path)
        else:
            self.message(value, spec, path, name)

    def message(self, value: Any, spec: Message, path: str, name: str | None) -> None:
        if isinstance(value, list):
            self.not_repeating(path, name)
            return
        if not isinstance(value, dict):
            self.bad_value(value, self.proto_type(spec.name), path)
            return
        for key, item in value.items():
            known = self.field(spec, key)
            if known is None:
                self.unknown(key, path)
                continue
            snake, child = known
            self.value(item, child, f"{path}.{snake}" if path else snake, path, key)

    def list(self, value: Any, spec: ListOf, path: str, parent: str, name: str) -> None:
        if not isinstance(value, list):
            self.bad_value(value, self.type_of(spec.item), path)
            return
        for index, item in enumerate(value):
            self.value(item, spec.item, f"{path}[{index}]", parent, name)

    def map(self, value: Any, spec: MapOf, path: str) -> None:
        if not isinstance(value, dict):
            self.bad_value(value, "map", path)
            return
        for index, item in enumerate(value.values()):
            where = f"{path}[{index}].value"
            self.value(item, spec.value, where, where, "value")

    def choice(self, value: Any, spec: Choice, path: str, parent: str, name: str) -> None:
        kind = _json_kind(value)
        chosen = spec.by_kind.get(kind)
        if chosen is None:
            self.bad_value(value, " or ".join(spec.by_kind), path)
        else:
            self.value(value, chosen, path, parent, name)

    def union(self, value: Any, spec: Union, path: str) -> None:
        if not isinstance(value, dict):
            self.bad_value(value, "object", path)
            return
        kind = value.get(spec.key)
        variant = spec.variants.get(kind) if isinstance(kind, str) else None
        if variant is None:
            where = f"{path}.{spec.key}" if path else spec.key
            self.bad_value(kind, "one of " + ", ".join(spec.variants), where)
        else:
            self.value(value, variant, path, path, "")

    def scalar(self, value: Any, spec: Scalar | Enum, path: str, parent: str, name: str) -> None:
        if isinstance(value, dict | list):
            if isinstance(value, list):
                self.not_repeating(parent, name)
            else:
                self.object_on_scalar(parent, name)
        elif not _scalar_fits(value, spec):
            self.bad_value(value, self.type_of(spec), path, getattr(spec, "rule", "fields.value"))

    # ------------------------------------------------------------------------------ lookups

    def field(self, spec: Message, key: str) -> tuple[str, Any] | None:
        """(snake name, spec) of `key` in `spec`, or None when the message has no such field."""
        if key in spec.fields:
            return key, spec.fields[key]
        if not self.interactions:
            for snake, child in spec.fields.items():
                if camel(snake) == key:
                    return snake, child
        return None

    def proto_type(self, name: str) -> str:
        return f"type.googleapis.com/{PROTO_PACKAGE}.{self.version}.{name}"

    def type_of(self, spec: Any) -> str:
        if isinstance(spec, Scalar):
            return spec.type_name
        if isinstance(spec, Enum):
            return self.proto_type(spec.name)
        if isinstance(spec, Message):
            return self.proto_type(spec.name)
        return "value"

    # ------------------------------------------------------------------------------ reports

    def unknown(self, name: str, path: str) -> None:
        rule = "fields.unknown"
        if self.interactions:
            where = f"{path}.{name}" if path else name
            self.add(rule, path or None, f"Unknown parameter: '{where}'.")
            return
        at = f" at '{path}'" if path else ""
        self.add(
            rule,
            path or None,
            f'Invalid JSON payload received. Unknown name "{name}"{at}: Cannot find field.',
        )

    def not_repeating(self, path: str, name: str | None) -> None:
        if self.interactions:
            self.add("fields.value", path or None, f"Invalid value for '{path}': not a list.")
            return
        at = f" at '{path}'" if path else ""
        self.add(
            "fields.value",
            path or None,
            f'Invalid JSON payload received. Unknown name "{name}"{at}: Proto field is not '
            "repeating, cannot start list.",
        )

    def object_on_scalar(self, path: str, name: str) -> None:
        if self.interactions:
            self.add("fields.value", path or None, f"Invalid value for '{path}.{name}'.")
            return
        at = f" at '{path}'" if path else ""
        self.add(
            "fields.value",
            path or None,
            f'Invalid JSON payload received. Unknown name "{name}"{at}: Starting an object on '
            "a scalar field",
        )

    def bad_value(self, value: Any, expected: str, path: str, rule: str = "fields.value") -> None:
        shown = json.dumps(value) if not isinstance(value, dict | list) else _json_kind(value)
        if self.interactions:
            text = f"Invalid value for '{path}': {shown} (expected {expected})."
        else:
            text = f"Invalid value at '{path}' ({expected}), {shown}"
        self.add(rule, path or None, text)

    def add(self, rule: str, where: str | None, text: str) -> None:
        self.rules.append(rule)
        self.violations.append(Violation(where, text))


def _json_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    return "other"


def _scalar_fits(value: Any, spec: Scalar | Enum) -> bool:
    if isinstance(spec, Enum):
        if isinstance(value, int) and not isinstance(value, bool):
            return 0 <= value < len(spec.values)
        if not isinstance(value, str):
            return False
        if spec.case_sensitive:
            return value in spec.values
        return value.upper() in {v.upper() for v in spec.values}
    if spec.kind == "string":
        return isinstance(value, str)
    if spec.kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if spec.kind == "integer":
        if isinstance(value, float):
            return value.is_integer()  # proto3 JSON: 5.0 is an integer
        return isinstance(value, int) or (isinstance(value, str) and bool(_INTEGER.match(value)))
    return isinstance(value, int | float) or (isinstance(value, str) and bool(_NUMBER.match(value)))


def messages(root: Any) -> Iterator[Message]:
    """Every Message reachable from `root`, once each (tests compare them with the SDK)."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        spec = stack.pop()
        if id(spec) in seen:
            continue
        seen.add(id(spec))
        if isinstance(spec, Message):
            yield spec
            stack.extend(spec.fields.values())
        elif isinstance(spec, ListOf):
            stack.append(spec.item)
        elif isinstance(spec, MapOf):
            stack.append(spec.value)
        elif isinstance(spec, Choice | Union):
            stack.extend((spec.by_kind if isinstance(spec, Choice) else spec.variants).values())
