"""How a setting is declared: its default, its check and its documentation, in one place.

A config section is a frozen dataclass whose fields are made by `setting(...)`; the TOML loader,
the command-line flags and `reparse` all validate a value through `check(section, key, value)`,
so a bound or a type is written once. Checks raise `TypeError("a positive integer")`: the text
completes "must be ...", and the caller adds the file and the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from typing import Any

Check = Callable[[Any], Any]


def setting(
    default: Any,
    check: Check,
    doc: str,
    *,
    flag: str | None = None,
    type: Callable[[str], Any] = str,
    many: bool = False,
    path: bool = False,
) -> Any:
    """A dataclass field declaring one setting.

    `flag` names its command-line flag (its value parsed by `type`; `many`: repeatable);
    `path` marks a path, resolved against the config file's folder (a flag's: the working one).
    """
    meta = {"check": check, "doc": doc, "flag": flag, "type": type, "many": many, "path": path}
    if isinstance(default, list | dict | set):
        raise TypeError("settings take immutable defaults (a tuple, not a list)")
    return dataclasses.field(default=default, metadata=meta)


def declared(section_type: type) -> Iterator[dataclasses.Field]:
    """The declared settings of a section dataclass, in declaration order."""
    return (f for f in dataclasses.fields(section_type) if "check" in f.metadata)


def check_value(field: dataclasses.Field, value: Any) -> Any:
    """The checked (converted) value; TypeError saying what it must be otherwise."""
    return field.metadata["check"](value)


# ------------------------------------------------------------------------------------- checks
# TOML has real types, so they are checked strictly: a string "10" where a number belongs is a
# mistake worth naming. NaN and infinities are refused everywhere: no setting means them.
def integer(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError("an integer")
    return v


def positive_int(v: Any) -> int:
    if integer(v) <= 0:
        raise TypeError("a positive integer")
    return v


def count_or_none(v: Any) -> int | None:
    """0 means "no limit" for quotas and sizes, which reads better in TOML than a missing key."""
    if integer(v) < 0:
        raise TypeError("an integer >= 0 (0 means none)")
    return v or None


def _real(v: Any, what: str, ok: Callable[[float], bool] = lambda _: True) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not ok(v):
        raise TypeError(what)
    return float(v)


def number(v: Any) -> float:
    return _real(v, "a finite number")


def positive_number(v: Any) -> float:
    return _real(v, "a positive finite number", lambda x: x > 0)


def non_negative_number(v: Any) -> float:
    return _real(v, "a finite number >= 0", lambda x: x >= 0)


def usd_or_none(v: Any) -> float | None:
    """A spending cap in US dollars; 0 means none, as for the quotas."""
    return non_negative_number(v) or None


def between(low: float, high: float, *, whole: bool = False) -> Check:
    kind = "an integer" if whole else "a number"

    def check(v: Any) -> Any:
        try:
            value = integer(v) if whole else number(v)
        except TypeError:
            value = None
        if value is None or not low <= value <= high:
            raise TypeError(f"{kind} between {low:g} and {high:g}")
        return value

    return check


def flag(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError("true or false")
    return v


def text(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise TypeError("a non-empty string")
    return v


def texts(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        return (v,)
    if not isinstance(v, list | tuple) or not all(isinstance(x, str) and x for x in v):
        raise TypeError("a list of strings")
    return tuple(v)


def one_of(*choices: str) -> Check:
    def check(v: Any) -> str:
        if v not in choices:
            raise TypeError("one of " + ", ".join(repr(c) for c in choices))
        return v

    return check


def json_schema(v: Any) -> dict[str, Any]:
    """A JSON schema as a TOML table or a JSON string."""
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError as exc:
            raise TypeError(f"a JSON schema (invalid JSON: {exc})") from None
    if not isinstance(v, dict):
        raise TypeError("a JSON schema object")
    return v


def optional(check: Check) -> Check:
    """`check`, except that None (the declared "unset") passes through."""

    def maybe(v: Any) -> Any:
        return None if v is None else check(v)

    return maybe
