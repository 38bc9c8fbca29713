"""What every task kind provides: a request for an image, and a parser for the answer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from pipeline import settings as s
from pipeline.gemini.types import MAX_IMAGES_PER_REQUEST, GenerateRequest
from pipeline.locations import scheme_of
from pipeline.models import MEDIA_RESOLUTIONS, THINKING_LEVELS, Model, ModelTable, lookup
from pipeline.rowtypes import Parsed

# The task kinds, in the order `pipeline models` and the README list them; the registry
# (pipeline/tasks/__init__.py) holds one task of each, and checks it at import.
KINDS = ("detect", "segment", "caption", "classify", "custom", "point")


def _task_kind(value: Any) -> str:
    return s.one_of(*KINDS)(value)


@dataclass(frozen=True, slots=True)
class Reference:
    """A reference image sent with every request of a run (pipeline/inputs/references.py): a path,
    an object (s3://, gs://, ...) or an http(s) URL, and what it shows."""

    image: str
    caption: str | None = None

    @property
    def is_url(self) -> bool:
        """An object or a URL: fetched, never resolved as a path (file:// is a path)."""
        return scheme_of(self.image) not in (None, "file")

    def resolved(self, resolve: Callable[[str], str]) -> Reference:
        """With its path resolved by `resolve` (a URL stays as it is)."""
        return self if self.is_url else replace(self, image=resolve(self.image))


def _reference(entry: Any) -> Reference | None:
    if isinstance(entry, Reference):
        return entry
    if isinstance(entry, str):
        return Reference(entry) if entry.strip() else None
    if not isinstance(entry, dict) or not set(entry) <= {"image", "caption"}:
        return None
    image, caption = entry.get("image"), entry.get("caption")
    if not isinstance(image, str) or not image.strip():
        return None
    if caption is not None and (not isinstance(caption, str) or not caption.strip()):
        return None
    return Reference(image, caption.strip() if caption else None)


def references(value: Any) -> tuple[Reference, ...]:
    """[task] reference_images: paths or URLs, or tables {image = "...", caption = "..."}."""
    what = 'a list of image paths or URLs, or of tables {image = "...", caption = "..."}'
    if not isinstance(value, list | tuple):
        raise TypeError(what)
    found = tuple(_reference(entry) for entry in value)
    if any(ref is None for ref in found):
        raise TypeError(what)
    if len(found) >= MAX_IMAGES_PER_REQUEST:
        raise TypeError(f"{what}, fewer than {MAX_IMAGES_PER_REQUEST:,} (a request's images)")
    # no None is left (checked above), which mypy does not narrow inside a tuple
    return found  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class TaskSettings:
    """The [task] section of a config. None means "the recommended default for the model"."""

    kind: str = s.setting(
        "detect",
        _task_kind,
        "what to ask: detect, segment, caption, classify, custom, point",
        flag="--task",
    )
    model: str = "gemini-2.5-flash"  # [api] model, [api] flavor and [api] version, copied here
    flavor: str = "generateContent"  # because what may be sent depends on them
    version: str = "v1beta"
    prompt: str | None = s.setting(None, s.text, "the question; the guide's wording by default")
    system_instruction: str | None = s.setting(None, s.text, "added before the task's rules")
    labels: tuple[str, ...] | None = s.setting(
        None, s.texts, "closed label set (classify: required; detect, segment, point: optional)"
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
        None,
        s.one_of(*MEDIA_RESOLUTIONS),
        "low, medium, high; ultra_high per image (`pipeline models`: +part)",
    )
    response_schema: dict[str, Any] | None = s.setting(
        None, s.json_schema, "JSON Schema the answer must follow (custom); {} sends none"
    )
    mask_threshold: int = s.setting(
        127, s.between(0, 255, whole=True), "parse-only: map values above it are inside"
    )
    reference_images: tuple[Reference, ...] = s.setting(
        (),
        references,
        "images sent before every request's own, each with an optional caption",
        path=True,
    )
    grouped: bool = False  # [input] group_by is set: each request is about a group's images
    models: ModelTable | None = field(default=None, repr=False)  # None: the bundled table

    @property
    def spec(self) -> Model:
        """What the model takes and answers (pipeline/models.json, plus the config's entries)."""
        return lookup(self.model, self.models)


class Task(Protocol):
    """A task kind. `request` must be a pure function of the settings (the key hashes them)."""

    kind: str

    def request(self, settings: TaskSettings) -> GenerateRequest:
        """The request for one image or group, without the image parts (the runner adds them)."""
        ...

    def parse(
        self,
        text: str,
        finish_reason: str | None,
        width: int,
        height: int,
        settings: TaskSettings,
        sizes: Sequence[tuple[int, int]] | None = None,
    ) -> Parsed:
        """Read an answer text for an image of the displayed size width x height, or, with
        `sizes`, for a group of images of those sizes in order (objects then say which image
        they are in: pipeline/tasks/multi.py). Never raises."""
        ...
