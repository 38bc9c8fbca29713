"""point: a point on each item and its label, the guide's pointing answer.

The answer is `[{"point": [y, x], "label": ...}]` with y first and both normalised to 0-1000
(docs/gemini-api.md § Recommended settings and known failure modes, "Points"; the same
convention as box_2d). Rows keep `point_2d` exactly as returned and
`xy`, the point in pixels of the displayed image ([x, y], x first like `bbox`); see
`answers.read_points` for what is skipped.
"""

from __future__ import annotations

from typing import Any

from pipeline.gemini.types import GenerateRequest
from pipeline.rowtypes import Parsed
from pipeline.tasks.answers import Sizes, never_raises, read_points
from pipeline.tasks.base import TaskSettings
from pipeline.tasks.objects import object_request, objects_schema

# The cookbook's pointing prompt (Gemini spatial understanding), its cap left to max_objects.
DEFAULT_PROMPT = (
    "Point to the prominent items in the image. The label returned should be an identifying "
    'name for the object. The answer should follow the json format: [{"point": <point>, '
    '"label": <label1>}, ...]. The points are in [y, x] format normalized to 0-1000.'
)
LABELLED_PROMPT = (
    "Point to each of the following items in the image: {labels}. The answer should follow the "
    'json format: [{{"point": <point>, "label": <label1>}}, ...]. The points are in [y, x] '
    "format normalized to 0-1000."
)
SYSTEM_RULES = (
    "Return points as a JSON array with labels. Never return boxes, masks or code fencing."
)


def point_schema(settings: TaskSettings) -> dict[str, Any]:
    """responseSchema: a list of {point: 2 integers [y, x], label}."""
    return objects_schema(settings, "point", 2)


class PointTask:
    """Points and labels (labels as in detect: a closed list drops the others)."""

    kind = "point"

    def request(self, settings: TaskSettings) -> GenerateRequest:
        prompts = (DEFAULT_PROMPT, LABELLED_PROMPT)
        return object_request(settings, prompts, SYSTEM_RULES, point_schema(settings))

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
        return read_points(text, finish_reason, width, height, settings.labels, sizes)
