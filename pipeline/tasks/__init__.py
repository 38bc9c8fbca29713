"""The task kinds: what to ask Gemini about an image and how to read its answer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from pipeline.gemini.types import GenerateResponse
from pipeline.records import Parsed
from pipeline.tasks.answers import ANSWERED, is_truncated
from pipeline.tasks.base import KINDS, Task, TaskSettings
from pipeline.tasks.caption import CaptionTask
from pipeline.tasks.classify import ClassifyTask
from pipeline.tasks.custom import CustomTask
from pipeline.tasks.detect import DetectTask
from pipeline.tasks.point import PointTask
from pipeline.tasks.segment import SegmentTask

TASKS: dict[str, Task] = {
    task.kind: task
    for task in (
        DetectTask(),
        SegmentTask(),
        CaptionTask(),
        ClassifyTask(),
        CustomTask(),
        PointTask(),
    )
}
assert tuple(TASKS) == KINDS, "a task kind is declared in tasks/base.py and registered here"


def get_task(kind: str) -> Task:
    """The task of that kind; ValueError naming the known kinds otherwise."""
    try:
        return TASKS[kind]
    except KeyError:
        raise ValueError(f"unknown task kind {kind!r}; known kinds: {', '.join(TASKS)}") from None


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
