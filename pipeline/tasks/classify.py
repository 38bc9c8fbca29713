"""classify: one label (or several) from a closed label set, validated against it.

Single or multi label: `max_objects` None or 1 -> exactly one label (schema: a string enum);
`max_objects` N > 1 -> a list of every label that applies, at most N asked for (0: no limit;
schema: an array of the enum; an empty list is a valid "none apply"; the cap is a request to
the model, not checked in the answer). The answer is matched to the set
ignoring case and spacing and stored with the configured spelling in Parsed.labels and, joined
with ", ", in Parsed.text. Any label outside the set, or not exactly one label in single mode,
makes the row an error with the reason.
"""

from __future__ import annotations

import re
from typing import Any

from pipeline.gemini.types import GenerateRequest
from pipeline.rowtypes import Parsed
from pipeline.tasks.answers import (
    Sizes,
    find_json,
    label_index,
    never_raises,
    normalise_label,
)
from pipeline.tasks.base import TaskSettings
from pipeline.tasks.finish import is_truncated
from pipeline.tasks.generation import build_request, quoted

SINGLE_PROMPT = "Classify this image. Answer with the one label from {labels} that fits it best."
MULTI_PROMPT = (
    "Classify this image. Answer with a JSON list of every label from {labels} that applies."
)
_BARE_SPLIT = re.compile(r"[,;\n]")
_WRAPPING = " \t\r\n\"'`.*"


def _labels(settings: TaskSettings) -> tuple[str, ...]:
    if not settings.labels:
        raise ValueError("the classify task needs a closed label set (labels)")
    label_index(settings.labels)
    return settings.labels


def label_limit(settings: TaskSettings) -> int | None:
    """None for single-label; else the most labels one answer may hold (0: no limit)."""
    if settings.max_objects is None or settings.max_objects == 1:
        return None
    if settings.max_objects < 0:
        raise ValueError(f"max_objects must be >= 0, got {settings.max_objects}")
    return settings.max_objects


class ClassifyTask:
    """A closed-set label for each image (see the module's rules)."""

    kind = "classify"

    def request(self, settings: TaskSettings) -> GenerateRequest:
        labels = _labels(settings)
        limit = label_limit(settings)
        enum: dict[str, Any] = {"type": "STRING", "enum": list(labels)}
        lines = [f"Answer only with labels from this list, spelled as given: {quoted(labels)}."]
        if limit is None:
            schema, prompt = enum, SINGLE_PROMPT
        else:
            schema, prompt = {"type": "ARRAY", "items": enum}, MULTI_PROMPT
            if limit:
                schema["maxItems"] = limit
                lines.append(f"Give at most {limit} labels.")
        prompt = settings.prompt or prompt.format(labels=quoted(labels))
        return build_request(settings, prompt, lines, json_mode=True, default_schema=schema)

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
        try:
            index = label_index(_labels(settings))
        except ValueError as exc:
            return Parsed(status="error", error=str(exc))
        limit = label_limit(settings)
        chosen: list[str] = []
        answers, why = _answers(text, multi=limit is not None)
        if why is None:
            chosen, why = _validate(answers, index, limit)
        if why is not None:
            cut = " (answer cut off: MAX_TOKENS)" if is_truncated(finish_reason) else ""
            return Parsed(status="error", error=why + cut)
        return Parsed(status="ok", labels=chosen, text=", ".join(chosen))


def _answers(text: str, multi: bool) -> tuple[list[Any], str | None]:
    """The labels the answer gives: JSON ("cat", ["cat"], {"label": ...}) or bare text."""
    found = find_json(text)
    if found is not None:
        value = found.value
        if isinstance(value, dict):
            value = value.get("labels", value.get("label"))
        if isinstance(value, str):
            return [value], None
        if isinstance(value, list):
            return value, None
        return [], f"answer JSON is not a label or a list of labels: {text.strip()[:80]!r}"
    bare = text.strip().strip(_WRAPPING)
    if not bare:
        return [], "empty answer"
    parts = _BARE_SPLIT.split(bare) if multi else [bare]
    return [part.strip(_WRAPPING) for part in parts if part.strip(_WRAPPING)], None


def _validate(
    answers: list[Any], index: dict[str, str], limit: int | None
) -> tuple[list[str], str | None]:
    chosen: list[str] = []
    for answer in answers:
        if not isinstance(answer, str):
            return [], f"answer {answer!r:.80} is not a label"
        canonical = index.get(normalise_label(answer))
        if canonical is None:
            return [], f"answer {answer[:80]!r} is not one of the labels"
        if canonical not in chosen:
            chosen.append(canonical)
    if limit is None and len(chosen) != 1:
        return [], f"expected exactly one label, got {len(chosen)}"
    return chosen, None
