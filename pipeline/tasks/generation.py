"""Generation settings every task kind shares: the recommended defaults per model generation.

Defaults (each applies only when the user left the setting None in [task]):
- thinking off for spatial work: thinking_budget 0 on 2.5 Flash / Flash-Lite, 128 (the least it
  takes: it cannot turn thinking off) on 2.5 Pro; thinking_level "minimal" on 3 Flash and "low"
  on 3 Pro (Pro accepts only low / high); nothing on 1.5 / 2.0 (no thinking there).
- temperature 0.5 on 1.5 / 2.0 / 2.5 (the cookbook's cure for repeated objects), left to the
  service default (1.0) on 3, whose guide warns that lower values can loop.
- media resolution: never set by default (service default, "high" on 3).
- model names of no known generation get none of these (JSON mode and schemas still apply).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pipeline.gemini.types import GenerateRequest
from pipeline.tasks.base import TaskSettings

Generation = Literal["1.5", "2.0", "2.5", "3", "unknown"]
THINKING_LEVELS = ("minimal", "low", "medium", "high")
MEDIA_RESOLUTIONS = ("low", "medium", "high", "ultra_high")
SPATIAL_TEMPERATURE = 0.5
PRO_MIN_THINKING_BUDGET = 128  # 2.5 Pro's floor: 0 (off) is refused there
DEFAULT_MAX_OBJECTS = 25

_VERSION = re.compile(r"gemini-(\d+)(?:\.(\d+))?")


def model_generation(model: str) -> Generation:
    """Which defaults apply to a model name: "1.5", "2.0", "2.5", "3" or "unknown".

    Finer than tokens.model_family (which folds 2.0 into 2.5) because 2.0 cannot think.
    """
    match = _VERSION.search(model.lower().removeprefix("models/"))
    if not match:
        return "unknown"
    major, minor = int(match.group(1)), int(match.group(2) or 0)
    if major >= 3:
        return "3"
    if major == 2:
        return "2.5" if minor >= 5 else "2.0"
    if major == 1:
        return "1.5"
    return "unknown"


def _is_pro(model: str) -> bool:
    return "-pro" in model.lower()


def supports_json_schema(model: str) -> bool:
    """Whether responseJsonSchema (full JSON Schema) is available; else only responseSchema."""
    return model_generation(model) in ("2.5", "3", "unknown")


def max_objects(settings: TaskSettings) -> int:
    """The object cap asked for: the setting, 25 by default; 0 means no cap."""
    cap = DEFAULT_MAX_OBJECTS if settings.max_objects is None else settings.max_objects
    if cap < 0:
        raise ValueError(f"max_objects must be >= 0, got {cap}")
    return cap


def _thinking(settings: TaskSettings, generation: Generation) -> tuple[int | None, str | None]:
    if settings.thinking_budget is not None and settings.thinking_level is not None:
        raise ValueError("set thinking_budget or thinking_level, not both")
    if settings.thinking_level is not None and settings.thinking_level not in THINKING_LEVELS:
        raise ValueError(
            f"thinking_level must be one of {', '.join(THINKING_LEVELS)}, "
            f"got {settings.thinking_level!r}"
        )
    if settings.thinking_budget is not None or settings.thinking_level is not None:
        return settings.thinking_budget, settings.thinking_level
    if generation == "2.5":
        return (PRO_MIN_THINKING_BUDGET if _is_pro(settings.model) else 0), None
    if generation == "3":
        return None, "low" if _is_pro(settings.model) else "minimal"
    return None, None


def build_request(
    settings: TaskSettings,
    prompt: str,
    system_lines: list[str],
    json_mode: bool,
    default_schema: dict[str, Any] | None = None,
) -> GenerateRequest:
    """A GenerateRequest with the user's settings where given and the defaults elsewhere.

    `system_lines` are task rules added after the user's system instruction (or alone);
    `default_schema` is the task's responseSchema, replaced by the user's schema if set.
    """
    generation = model_generation(settings.model)
    thinking_budget, thinking_level = _thinking(settings, generation)
    temperature = settings.temperature
    if temperature is None and generation in ("1.5", "2.0", "2.5"):
        temperature = SPATIAL_TEMPERATURE
    if settings.media_resolution is not None and settings.media_resolution not in (
        MEDIA_RESOLUTIONS
    ):
        raise ValueError(
            f"media_resolution must be one of {', '.join(MEDIA_RESOLUTIONS)}, "
            f"got {settings.media_resolution!r}"
        )
    parts = [settings.system_instruction.strip()] if settings.system_instruction else []
    parts += system_lines
    response_schema, response_json_schema = schemas(settings, default_schema)
    return GenerateRequest(
        model=settings.model,
        prompt=prompt,
        system_instruction="\n".join(parts) or None,
        response_mime_type="application/json" if json_mode else None,
        response_schema=response_schema,
        response_json_schema=response_json_schema,
        temperature=temperature,
        max_output_tokens=settings.max_output_tokens,
        thinking_budget=thinking_budget,
        thinking_level=thinking_level,
        media_resolution=settings.media_resolution,  # type: ignore[arg-type]
    )


def schemas(
    settings: TaskSettings, default: dict[str, Any] | None
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(response_schema, response_json_schema) to send.

    A task's built-in schema uses responseSchema (the OpenAPI subset every JSON-mode model
    takes). A user's schema (JSON Schema) goes as responseJsonSchema where the model has it
    (2.5, 3) and as responseSchema on 1.5 / 2.0, where it must fit the OpenAPI subset.
    An empty user schema ({}) sends no schema at all.
    """
    if settings.response_schema is None:
        return default, None
    if not settings.response_schema:
        return None, None
    if supports_json_schema(settings.model):
        return None, settings.response_schema
    return settings.response_schema, None


def quoted(labels: tuple[str, ...]) -> str:
    """Labels as a prompt lists them: "cat", "dog" (JSON quoting, so quotes inside stay clear)."""
    return ", ".join(json.dumps(label, ensure_ascii=False) for label in labels)
