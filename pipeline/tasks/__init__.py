"""The task kinds: what to ask Gemini about an image and how to read its answer."""

from __future__ import annotations

from pipeline.gemini.types import GenerateResponse
from pipeline.records import Parsed
from pipeline.tasks.base import Task, TaskSettings
from pipeline.tasks.caption import CaptionTask
from pipeline.tasks.classify import ClassifyTask
from pipeline.tasks.custom import CustomTask
from pipeline.tasks.detect import DetectTask
from pipeline.tasks.segment import SegmentTask

TASKS: dict[str, Task] = {
    task.kind: task
    for task in (DetectTask(), SegmentTask(), CaptionTask(), ClassifyTask(), CustomTask())
}


def get_task(kind: str) -> Task:
    """The task of that kind; ValueError naming the known kinds otherwise."""
    try:
        return TASKS[kind]
    except KeyError:
        raise ValueError(f"unknown task kind {kind!r}; known kinds: {', '.join(TASKS)}") from None


def read_answer(
    response: GenerateResponse, width: int, height: int, settings: TaskSettings
) -> Parsed:
    """An answer as rows see it: a prompt the service blocked, else the task kind's parse.

    One place for both a live call and a `reparse` of a stored body, so they never disagree.
    """
    if response.block_reason:
        return Parsed("blocked", error=f"prompt blocked: {response.block_reason}")
    task = get_task(settings.kind)
    return task.parse(response.text, response.finish_reason, width, height, settings)


__all__ = ["TASKS", "Task", "TaskSettings", "get_task", "read_answer"]
