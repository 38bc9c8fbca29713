"""What the object tasks (detect, point, segment) ask alike: the prompt for an open or closed
label list, the system lines for labels and the object cap, and the list-of-objects schema.
"""

from __future__ import annotations

from typing import Any

from pipeline.gemini.types import GenerateRequest
from pipeline.tasks.answers import label_index
from pipeline.tasks.base import TaskSettings
from pipeline.tasks.generation import build_request, max_objects, quoted


def object_request(
    settings: TaskSettings,
    prompts: tuple[str, str],
    task_rules: str | None = None,
    schema: dict[str, Any] | None = None,
) -> GenerateRequest:
    """A JSON-mode request for located objects. `prompts` is (open list, closed list with a
    `{labels}` slot); `task_rules` lead the system lines unless the user wrote their own
    instruction; the label and cap lines always follow."""
    rules = [task_rules] if task_rules and not settings.system_instruction else []
    prompt = object_prompt(settings, *prompts)
    return build_request(
        settings, prompt, rules + object_rules(settings), True, schema, locate=True
    )


def object_prompt(settings: TaskSettings, default: str, labelled: str) -> str:
    """The user's prompt, else `labelled` with the quoted labels in `{labels}`, else `default`.
    Empty or clashing labels are refused here, before any call is paid for."""
    if settings.labels:
        label_index(settings.labels)
    if settings.prompt:
        return settings.prompt
    return labelled.format(labels=quoted(settings.labels)) if settings.labels else default


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


def objects_schema(settings: TaskSettings, field: str, length: int) -> dict[str, Any]:
    """responseSchema: a list of {field: `length` integers, label}, the label from the list if
    one is set, at most max_objects items."""
    label: dict[str, Any] = {"type": "STRING"}
    if settings.labels:
        label["enum"] = list(settings.labels)
    numbers = {
        "type": "ARRAY",
        "items": {"type": "INTEGER"},
        "minItems": length,
        "maxItems": length,
    }
    schema: dict[str, Any] = {
        "type": "ARRAY",
        "items": {
            "type": "OBJECT",
            "properties": {field: numbers, "label": label},
            "required": [field, "label"],
        },
    }
    cap = max_objects(settings)
    if cap:
        schema["maxItems"] = cap
    return schema
