"""What every task kind provides: a request for an image, and a parser for the answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from pipeline.gemini.types import GenerateRequest
from pipeline.records import Parsed


@dataclass(frozen=True, slots=True)
class TaskSettings:
    """The [task] section of a config. None means "the task kind's recommended default"."""

    kind: str  # detect | segment | caption | classify | custom
    model: str
    prompt: str | None = None
    system_instruction: str | None = None
    labels: tuple[str, ...] | None = None  # closed label set (detect: optional; classify: required)
    max_objects: int | None = None
    temperature: float | None = None
    max_output_tokens: int | None = None
    thinking_budget: int | None = None
    thinking_level: str | None = None
    media_resolution: str | None = None
    response_schema: dict[str, Any] | None = None  # custom: JSON Schema the answer must follow
    mask_threshold: int = 127  # parse setting: probability map values > threshold are inside


class Task(Protocol):
    """A task kind. `request` must be a pure function of the settings (the key hashes them)."""

    kind: str

    def request(self, settings: TaskSettings) -> GenerateRequest:
        """The request for one image, without the image part (the runner adds it)."""
        ...

    def parse(
        self,
        text: str,
        finish_reason: str | None,
        width: int,
        height: int,
        settings: TaskSettings,
    ) -> Parsed:
        """Read an answer text for an image of the displayed size width x height. Never raises."""
        ...
