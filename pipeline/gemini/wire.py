"""Reading the service's JSON leniently, and the shape of continued answers.

The service writes camelCase and accepts snake_case, and its int64 fields arrive as JSON strings.

An answer the service cut at its per-request decode limit is continued by further requests
("hops"). The raw answer of a continued call is a JSON array of the hop bodies exactly as
received, so it can be read again without a call; a single hop stays a plain JSON object.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.gemini.types import GenerateResponse


class Base64Text(str):
    """Base64 text (A-Z a-z 0-9 + / =), which JSON carries as it is: `json_bytes` copies it
    between quotes instead of escaping it. Any other reader (json.dumps, a test) sees a str."""

    __slots__ = ()


def base64_text(data: bytes) -> Base64Text:
    """`base64.b64encode(data).decode("ascii")`, marked as JSON-safe."""
    return Base64Text(binascii.b2a_base64(data, newline=False).decode("ascii"))


def json_bytes(value: Any) -> bytes:
    """`json.dumps(value, separators=(",", ":")).encode()`, byte for byte, but each Base64Text is
    copied in rather than escaped: json.dumps scans every character of a string for what to
    escape, and a 12-MP photo sent as it is, 5 MB of base64, cost ~20 ms of CPU that way
    (tests/test_wire_json.py checks the bytes against json.dumps)."""
    pieces: list[bytes] = []
    return b"".join(pieces) if _pieces(value, pieces) else _dumps(value)


# One encoder for every call: json.dumps with any keyword builds a JSONEncoder each time, which
# made a 20-node request body cost ~62 us to write; a key alone now costs ~0.1 us instead of ~2.
_dumps_str = json.JSONEncoder(separators=(",", ":")).encode


def _dumps(value: Any) -> bytes:
    return _dumps_str(value).encode()


def _pieces(value: Any, out: list[bytes]) -> bool:
    """Append the value's JSON to `out` in pieces when a Base64Text is inside it and say True;
    else False with `out` untouched (the caller then dumps the value whole, in one call of
    json's C encoder)."""
    kind = type(value)
    if kind is Base64Text:
        out += (b'"', value.encode("ascii"), b'"')
        return True
    if kind is dict and all(type(key) is str for key in value):
        return _container(out, b"{", b"}", value.values(), [_dumps(k) + b":" for k in value])
    if kind is list or kind is tuple:
        return _container(out, b"[", b"]", value, None)
    return False  # a leaf, a subclass, or a dict json.dumps converts the keys of: json.dumps


def _container(
    out: list[bytes], opening: bytes, closing: bytes, items: Any, keys: list[bytes] | None
) -> bool:
    """An object's or array's pieces (`keys`: each item's key and colon, for an object)."""
    inner: list[list[bytes] | None] = []
    for item in items:
        found: list[bytes] = []
        inner.append(found if _pieces(item, found) else None)
    if not any(inner):
        return False
    out.append(opening)
    for index, (pieces, item) in enumerate(zip(inner, items, strict=True)):
        if index:
            out.append(b",")
        if keys is not None:
            out.append(keys[index])
        out += pieces if pieces is not None else (_dumps(item),)
    out.append(closing)
    return True


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


@dataclass(frozen=True, slots=True)
class Continuation:
    """How one wire flavour continues a cut answer.

    `token(hop, sent)` is the token to continue `hop` with, or None to stop (also when the hop
    handed back the token it was sent with: no progress); `body(request_body, token)` is the next
    hop's request; `parse` reads one hop or the array of them.
    """

    token: Callable[[dict[str, Any], str | None], str | None]
    body: Callable[[dict[str, Any], str], dict[str, Any]]
    parse: Callable[[str], GenerateResponse]


def join_hops(hops: list[str]) -> str:
    """The raw answer of a call: its one hop's body, or the JSON array of every hop's body."""
    return hops[0] if len(hops) == 1 else "[" + ",".join(hops) + "]"


def hop_documents(raw: str, what: str) -> list[dict[str, Any]]:
    """The hops of a raw answer (one body or an array of them) as JSON objects."""
    document = json.loads(raw)
    hops = document if isinstance(document, list) else [document]
    if not hops or not all(isinstance(hop, dict) for hop in hops):
        raise ValueError(f"{what} must be a JSON object or a non-empty array of them")
    return hops


def split_hops(raw: str) -> list[str]:
    """The hop bodies of a raw answer, each exactly as received."""
    text = raw.strip()
    if not text.startswith("["):
        return [raw]
    decoder, position = json.JSONDecoder(), 1
    hops: list[str] = []
    while True:
        position = _skip(text, position, " \t\r\n,")
        if text[position] == "]":
            return hops
        _, end = decoder.raw_decode(text, position)
        hops.append(text[position:end])
        position = end


def _skip(text: str, position: int, characters: str) -> int:
    while position < len(text) and text[position] in characters:
        position += 1
    if position >= len(text):
        raise ValueError("unterminated array of hops")
    return position
