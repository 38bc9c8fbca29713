"""detect: boxes and labels, the guide's object detection."""

from __future__ import annotations

from typing import Any

from pipeline.gemini.types import GenerateRequest
from pipeline.rowtypes import Parsed
from pipeline.tasks.answers import Sizes, never_raises, read_objects
from pipeline.tasks.base import TaskSettings
from pipeline.tasks.objects import object_request, objects_schema

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


def detection_schema(settings: TaskSettings) -> dict[str, Any]:
    """responseSchema: a list of {box_2d: 4 integers, label}."""
    return objects_schema(settings, "box_2d", 4)


class DetectTask:
    """Boxes and labels. With `labels`, only those labels are asked for; any other label in
    the answer is dropped (named in Parsed.error) and matching ones take the configured spelling.
    """

    kind = "detect"

    def request(self, settings: TaskSettings) -> GenerateRequest:
        prompts = (DEFAULT_PROMPT, LABELLED_PROMPT)
        return object_request(settings, prompts, SYSTEM_RULES, detection_schema(settings))

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
