"""detect: boxes and labels, the guide's object detection."""

from __future__ import annotations

from typing import Any

from pipeline.gemini.types import GenerateRequest
from pipeline.records import Parsed
from pipeline.tasks.answers import Sizes, label_index, never_raises, read_objects
from pipeline.tasks.base import TaskSettings
from pipeline.tasks.generation import build_request, max_objects, quoted

DEFAULT_PROMPT = (
    "Detect the all of the prominent items in the image. "
    "The box_2d should be [ymin, xmin, ymax, xmax] normalized to 0-1000."
)
LABELLED_PROMPT = (
    "Detect all of the following items in the image: {labels}. "
    "The box_2d should be [ymin, xmin, ymax, xmax] normalized to 0-1000."
)
# The cookbook's system instruction for boxes (without its cap, which is a setting here).
SYSTEM_RULES = (
    "Return bounding boxes as a JSON array with labels. Never return masks or code fencing."
)


def object_rules(settings: TaskSettings) -> list[str]:
    """System-instruction lines for object tasks: the closed label list and the object cap."""
    lines = []
    if settings.labels:
        lines.append(
            f"Only report objects that are one of: {quoted(settings.labels)}. "
            "Use exactly these label names."
        )
    cap = max_objects(settings)
    if cap:
        lines.append(f"Limit to {cap} objects.")
    return lines


def detection_schema(settings: TaskSettings) -> dict[str, Any]:
    """responseSchema: a list of {box_2d: 4 integers, label}, label from the list if one is set."""
    label: dict[str, Any] = {"type": "STRING"}
    if settings.labels:
        label["enum"] = list(settings.labels)
    schema: dict[str, Any] = {
        "type": "ARRAY",
        "items": {
            "type": "OBJECT",
            "properties": {
                "box_2d": {
                    "type": "ARRAY",
                    "items": {"type": "INTEGER"},
                    "minItems": 4,
                    "maxItems": 4,
                },
                "label": label,
            },
            "required": ["box_2d", "label"],
        },
    }
    cap = max_objects(settings)
    if cap:
        schema["maxItems"] = cap
    return schema


class DetectTask:
    """Boxes and labels. With `labels`, only those labels are asked for; any other label in
    the answer is dropped (named in Parsed.error) and matching ones take the configured spelling.
    """

    kind = "detect"

    def request(self, settings: TaskSettings) -> GenerateRequest:
        if settings.labels:
            label_index(settings.labels)  # reject empty or clashing labels early
        prompt = settings.prompt or (
            LABELLED_PROMPT.format(labels=quoted(settings.labels))
            if settings.labels
            else DEFAULT_PROMPT
        )
        rules = [] if settings.system_instruction else [SYSTEM_RULES]
        return build_request(
            settings,
            prompt,
            rules + object_rules(settings),
            json_mode=True,
            default_schema=detection_schema(settings),
            locate=True,
        )

    @never_raises
    def parse(
        self,
        text: str,
        finish_reason: str | None,
        width: int,
        height: int,
        settings: TaskSettings,
        sizes: Sizes | None = None,
    ) -> Parsed:
        return read_objects(text, finish_reason, width, height, labels=settings.labels, sizes=sizes)
