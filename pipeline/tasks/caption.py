"""caption: a text description of the image, the guide's first example."""

from __future__ import annotations

from pipeline.gemini.types import GenerateRequest
from pipeline.rowtypes import Parsed
from pipeline.tasks.answers import Sizes, never_raises
from pipeline.tasks.base import TaskSettings
from pipeline.tasks.finish import is_truncated
from pipeline.tasks.generation import build_request

DEFAULT_PROMPT = "Caption this image."


class CaptionTask:
    """Free text into Parsed.text. Plain text mode (no JSON); a cut caption is kept as partial."""

    kind = "caption"

    def request(self, settings: TaskSettings) -> GenerateRequest:
        return build_request(settings, settings.prompt or DEFAULT_PROMPT, [], json_mode=False)

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
        caption = text.strip()
        if not caption:
            return Parsed(status="error", error="empty answer")
        if is_truncated(finish_reason):
            return Parsed(status="partial", text=caption, error="caption cut off (MAX_TOKENS)")
        return Parsed(status="ok", text=caption)
