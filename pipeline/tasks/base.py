"""What every task kind provides: a request for an image, and a parser for the answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline import settings as s
from pipeline.gemini.types import GenerateRequest
from pipeline.models import MEDIA_RESOLUTIONS, THINKING_LEVELS, Model, ModelTable, lookup
from pipeline.records import Parsed


def _task_kind(value: Any) -> str:
    from pipeline.tasks import TASKS  # the registry is the one list of kinds

    return s.one_of(*TASKS)(value)


@dataclass(frozen=True, slots=True)
class TaskSettings:
    """The [task] section of a config. None means "the recommended default for the model"."""

    kind: str = s.setting(
        "detect",
        _task_kind,
        "what to ask: detect, segment, caption, classify, custom",
        flag="--task",
    )
    model: str = "gemini-2.5-flash"  # [api] model, [api] flavor and [api] version, copied here
    flavor: str = "generateContent"  # because what may be sent depends on them
    version: str = "v1beta"
    prompt: str | None = s.setting(None, s.text, "the question; the guide's wording by default")
    system_instruction: str | None = s.setting(None, s.text, "added before the task's rules")
    labels: tuple[str, ...] | None = s.setting(
        None, s.texts, "closed label set (classify: required; detect, segment: optional)"
    )
    max_objects: int | None = s.setting(
        None, s.between(0, 1_000_000, whole=True), "cap on objects (25) or labels; 0: none"
    )
    temperature: float | None = s.setting(
        None, s.between(0, 2), "0.5 on 1.5-2.5 (the cookbook's), the service default on 3"
    )
    max_output_tokens: int | None = s.setting(None, s.positive_int, "the service default")
    thinking_budget: int | None = s.setting(
        None, s.integer, "2.5 only: lowest the model allows (0, or 128 on Pro)"
    )
    thinking_level: str | None = s.setting(
        None, s.one_of(*THINKING_LEVELS), "3.x only: lowest level the model accepts"
    )
    media_resolution: str | None = s.setting(
        None, s.one_of(*MEDIA_RESOLUTIONS), "low, medium, high; ultra_high per image (v1alpha)"
    )
    response_schema: dict[str, Any] | None = s.setting(
        None, s.json_schema, "JSON Schema the answer must follow (custom); {} sends none"
    )
    mask_threshold: int = s.setting(
        127, s.between(0, 255, whole=True), "parse-only: map values above it are inside"
    )
    models: ModelTable | None = field(default=None, repr=False)  # None: the bundled table

    @property
    def spec(self) -> Model:
        """What the model takes and answers (pipeline/models.json, plus the config's entries)."""
        return lookup(self.model, self.models)


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
