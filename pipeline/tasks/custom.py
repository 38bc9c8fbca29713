"""custom: the user's prompt, optionally a JSON Schema; the answer's JSON kept as a string and,
with a schema, as the typed `answer` column (pipeline/tasks/typed.py)."""

from __future__ import annotations

import json

from pipeline.gemini.types import GenerateRequest
from pipeline.rowtypes import Parsed
from pipeline.tasks.answers import Sizes, find_json, never_raises, utf8_safe
from pipeline.tasks.base import TaskSettings
from pipeline.tasks.finish import is_truncated
from pipeline.tasks.generation import build_request
from pipeline.tasks.typed import answer_field, with_answer


class CustomTask:
    """Any JSON question about an image. The answer is found like any other (fences and prose
    are tolerated), re-serialised compactly into Parsed.json. With a response_schema it is also
    checked against it and shaped into Parsed.answer; an answer that does not fit is an error
    naming the place (the service's constrained decoding is not trusted blindly: an OpenAPI
    schema sent as responseSchema drops keywords it lacks). No JSON -> status error (the caller
    keeps the raw answer).
    """

    kind = "custom"

    def request(self, settings: TaskSettings) -> GenerateRequest:
        if not settings.prompt or not settings.prompt.strip():
            raise ValueError("the custom task needs a prompt")
        return build_request(settings, settings.prompt, [], json_mode=True, default_schema=None)

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
        found = find_json(text)
        if found is None:
            cut = " (cut off: MAX_TOKENS)" if is_truncated(finish_reason) else ""
            return Parsed(status="error", error=f"answer is not valid JSON{cut}")
        serialised = json.dumps(found.value, ensure_ascii=False, separators=(",", ":"))
        if utf8_safe(serialised) != serialised:  # lone surrogates: keep them as \u escapes
            serialised = json.dumps(found.value, separators=(",", ":"))
        return with_answer(Parsed(status="ok", json=serialised), answer_field(settings))
