"""The plain values rows are made of: a task's reading of an answer (`Parsed`, its `Status`) and
a run's key suffixes (`KeySuffixes`), without Arrow.

records.py holds the rows' Arrow schema and re-exports these; a config and the tasks import them
from here, so that loading a config (every `pipeline` command, `--help` included, builds the
setting flags from its declarations) does not load pyarrow (~0.4 s).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["ok", "error", "blocked", "partial"]
ANSWER = "answer"  # the column of a custom task's typed answer (records.row_schema)


@dataclass(slots=True)
class Parsed:
    """A task's reading of one answer text. Objects are dicts shaped like OBJECT_TYPE (a key
    left out is null)."""

    status: Status
    objects: list[dict[str, Any]] = field(default_factory=list)
    text: str | None = None
    labels: list[str] | None = None
    json: str | None = None  # custom task: the parsed JSON, re-serialised
    error: str | None = None  # why status is not ok, or why objects were skipped
    answer: Any = None  # custom task with a response_schema: the JSON value shaped for `answer`

    def columns(self) -> dict[str, Any]:
        """The row columns a parse decides (the rest come from the image and the call)."""
        return {
            "status": self.status,
            "error": self.error,
            "objects": self.objects,
            "text": self.text,
            "labels": self.labels,
            "json": self.json,
            ANSWER: self.answer,
        }


@dataclass(frozen=True, slots=True)
class KeySuffixes:
    """The key suffixes of one run: which settings hash an image's key carries.

    A key hashes the request an image is *actually* sent with, not the config: an image that
    `max_side` does not shrink goes as it is, so its key must not change when `max_side` does.
    Two suffixes therefore: `as_is` (the effective request with the image unchanged) and
    `resized` (the same request plus "shrunk to fit `max_side`": the bytes fix the size, so the
    sha256 and `max_side` fix the W×H sent). Aliases are what the older rule
    (`config.settings_hash`) gave the same requests, so rows keyed by it still count as done
    (no mass redo on upgrade): `aliases` hashed this config as it is (the very request, shrunk
    or not), `as_is_aliases` hashed it without `max_side` (the request of an image sent as is).
    """

    as_is: str
    resized: str | None = None  # None: no max_side, nothing is shrunk
    max_side: int | None = None
    aliases: tuple[str, ...] = ()
    as_is_aliases: tuple[str, ...] = ()

    def of(self, sizes: Sequence[tuple[int, int]]) -> str:
        """The suffix of a unit whose members have these displayed (width, height): `resized`
        when `max_side` shrinks any member (then its request differs from the as-is one)."""
        if self.resized is None or self.max_side is None:
            return self.as_is
        shrunk = any(max(width, height) > self.max_side for width, height in sizes)
        return self.resized if shrunk else self.as_is

    def owns(self, suffix: str) -> bool:
        """True for a suffix this run writes or accepts as an alias."""
        return suffix in (self.as_is, self.resized, *self.aliases, *self.as_is_aliases)

    def sent_as_is(self, suffix: str) -> bool:
        """True for a suffix naming the request of an image sent as it is (a row under it is
        this run's request only when `max_side` does not shrink that image)."""
        return suffix == self.as_is or suffix in self.as_is_aliases

    def alias_suffixes(self, suffix: str) -> tuple[str, ...]:
        """The older suffixes a key with `suffix` may have been committed under: the same bytes
        and request, where a rerun still finds its answer."""
        extra = self.as_is_aliases if self.sent_as_is(suffix) else ()
        return tuple(alias for alias in (*self.aliases, *extra) if alias != suffix)
