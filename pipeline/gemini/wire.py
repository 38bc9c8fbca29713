"""Reading the service's JSON leniently: it writes camelCase and accepts snake_case, and its
int64 fields arrive as JSON strings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def field(obj: Mapping[str, Any], camel: str, snake: str) -> Any:
    """The value under its camelCase name, else its snake_case one."""
    value = obj.get(camel)
    return obj.get(snake) if value is None else value


def as_int(value: Any) -> int:
    """A count as an int; 0 where the service left it out or sent something unreadable."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0
