"""The task kinds: what to ask Gemini about an image and how to read its answer."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import replace

from pipeline.gemini.types import GenerateResponse
from pipeline.rowtypes import Parsed
from pipeline.tasks.base import KINDS, Task, TaskSettings
from pipeline.tasks.finish import ANSWERED, is_truncated

# Each kind's module and class, imported when the kind is first asked for: segment's mask maths
# (numpy, Pillow) and the custom task's Arrow types stay out of a config's import, which every
# `pipeline` command makes (`pipeline --help` builds the setting flags from its declarations).
_CLASSES = {
    "detect": ("detect", "DetectTask"),
    "segment": ("segment", "SegmentTask"),
    "caption": ("caption", "CaptionTask"),
    "classify": ("classify", "ClassifyTask"),
    "custom": ("custom", "CustomTask"),
    "point": ("point", "PointTask"),
}
TASKS: tuple[str, ...] = tuple(_CLASSES)  # the kinds, in the order they are listed
assert TASKS == KINDS, "a task kind is declared in tasks/base.py and registered here"
_LOADED: dict[str, Task] = {}


def get_task(kind: str) -> Task:
    """The task of that kind (one instance per kind); ValueError naming the known kinds
    otherwise."""
    task = _LOADED.get(kind)
    if task is not None:
        return task
    if kind not in _CLASSES:
        raise ValueError(f"unknown task kind {kind!r}; known kinds: {', '.join(TASKS)}")
    module, name = _CLASSES[kind]
    task = getattr(importlib.import_module(f"{__name__}.{module}"), name)()
    assert task.kind == kind, f"{name} declares kind {task.kind!r}, registered as {kind!r}"
    _LOADED[kind] = task
    return task


def read_answer(
    response: GenerateResponse,
    width: int,
    height: int,
    settings: TaskSettings,
    sizes: Sequence[tuple[int, int]] | None = None,
) -> Parsed:
    """An answer as rows see it: a prompt the service blocked, an answer it withheld (a blocking
    finish reason), else the task kind's parse — which, when it fails on an answer that ended
    for a stated reason (NO_IMAGE, IMAGE_OTHER, MALFORMED_RESPONSE, ...), says that reason.
    `sizes`: a group's member sizes in order (its objects name their image); None for one image.

    One place for both a live call and a `reparse` of a stored body, so they never disagree.
    """
    said = f": {response.finish_message}" if response.finish_message else ""
    if response.block_reason:
        return Parsed("blocked", error=f"prompt blocked: {response.block_reason}{said}")
    task = get_task(settings.kind)
    parsed = task.parse(response.text, response.finish_reason, width, height, settings, sizes)
    if parsed.status == "blocked":  # a withheld answer (never_raises): say what the service said
        return replace(parsed, error=f"{parsed.error}{said}")
    reason = (response.finish_reason or "").strip().upper()
    if parsed.status == "error" and reason not in ANSWERED and not is_truncated(reason):
        why = f"the model ended with finish reason {reason}{said}"
        return replace(parsed, error=f"{why}; {parsed.error}" if parsed.error else why)
    return parsed


__all__ = ["TASKS", "Task", "TaskSettings", "get_task", "read_answer"]
