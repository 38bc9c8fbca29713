"""Generation settings every task kind shares: the user's where given, else the model's defaults.

What a model takes comes from the model table (`pipeline/models.py`); this module decides what to
send from it. Each default applies only when the user left the setting unset in [task]:

- thinking as low as the model allows, because spatial answers get no better with thought and
  thinking tokens are billed as output: budget 0 on 2.5 Flash / Flash-Lite, 128 on 2.5 Pro (it
  cannot turn thinking off), the lowest accepted level on 3.x (`minimal` on 3 Flash preview,
  3.1 / 3.5 Flash-Lite, 3.5 and 3.6 Flash; `low` on 3.1 Pro, 3.7 and 3.8 Flash: the thinking
  page, 2026-09-04), nothing on 1.5 / 2.0 or an unknown model. The Interactions API has no
  thinking budget, so a 2.5 model called through it is sent none (and thinks: see config.py).
  A user's numeric budget on a 3.x model is sent as asked, with a warning: the page calls it
  "no longer recommended", not refused.
- temperature: the table's recommendation (0.5 on 1.5-2.5, the cookbook's cure for repeated
  objects); none on 3.x, whose guide warns that values below 1.0 can loop; none by default
  through Interactions, where the SDK marks the field deprecated.
- media resolution: never set by default. `ultra_high` exists only per image part.
- schemas: a task's built-in schema is the OpenAPI subset (`responseSchema`); a user's schema is
  JSON Schema and goes as `responseJsonSchema` where the model takes it (held to the JSON
  Schema meta-schema), else as `responseSchema` (held to the OpenAPI subset's fields and types).
- several images (groups, reference images): the prompt, system and schema additions of
  pipeline/tasks/multi.py, only when [input] group_by or [task] reference_images is set (so a
  single image's request, and its key, are unchanged).

A setting the model refuses raises `SettingError` naming the [task] key, before any call: the
service would answer 400 to every request of the run.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pipeline.gemini.schema import json_schema, json_schema_problem, openapi_schema_problem
from pipeline.gemini.types import GenerateRequest
from pipeline.models import Model
from pipeline.tasks import multi
from pipeline.tasks.base import TaskSettings

log = logging.getLogger(__name__)

DEFAULT_MAX_OBJECTS = 25


class SettingError(ValueError):
    """A [task] setting this model (or API flavour) refuses; `key` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def max_objects(settings: TaskSettings) -> int:
    """The object cap asked for: the setting, 25 by default; 0 means no cap."""
    cap = DEFAULT_MAX_OBJECTS if settings.max_objects is None else settings.max_objects
    if cap < 0:
        raise SettingError("max_objects", f"must be >= 0, got {cap}")
    return cap


def thinking(settings: TaskSettings) -> tuple[int | None, str | None]:
    """(thinking_budget, thinking_level) to send: the user's, checked, else the lowest."""
    spec, budget, level = settings.spec, settings.thinking_budget, settings.thinking_level
    if budget is not None and level is not None:
        raise SettingError("thinking_budget", "set thinking_budget or thinking_level, not both")
    if level is not None:
        _refuse("thinking_level", level, spec, spec.thinking.level_error(level))
        return None, level
    if budget is not None:
        if settings.flavor == "interactions":
            raise SettingError(
                "thinking_budget",
                "the Interactions API has no thinking budget (only thinking_level); "
                'use flavor = "generateContent" to set one',
            )
        _refuse("thinking_budget", budget, spec, spec.thinking.budget_error(budget))
        _warn_once(spec.name, spec.thinking.budget_warning())
        return budget, None
    lowest_budget, lowest_level = spec.thinking.lowest()
    if settings.flavor == "interactions":
        return None, lowest_level
    return lowest_budget, lowest_level


_warned: set[tuple[str, str]] = set()


def _warn_once(model: str, warning: str | None) -> None:
    if warning is not None and (model, warning) not in _warned:
        _warned.add((model, warning))
        log.warning("[task] thinking_budget on %s: %s", model, warning)


def _refuse(key: str, value: Any, spec: Model, why: str | None) -> None:
    if why is not None:
        raise SettingError(key, f"{value!r} is refused by {spec.name}: {why}")


def media_resolution(settings: TaskSettings) -> str | None:
    """The media resolution to send, checked against what the model and API version take."""
    level, spec = settings.media_resolution, settings.spec
    if level is None:
        return None
    if level == "ultra_high" or settings.flavor == "interactions":
        # Per image part: generateContent takes it on Gemini 3 on the versions the table lists
        # (v1beta and v1alpha: the media-resolution page, 2026-09-19); Interactions has only
        # the per-image `resolution` (documented for Gemini 3).
        if settings.flavor == "interactions":
            takes, where = bool(spec.part_media_resolution), "the Interactions API"
        else:
            takes = spec.part_resolution_on(settings.version)
            where = f"API version {settings.version}"
        if not takes:
            raise SettingError(
                "media_resolution",
                f"{level!r} is set per image, which {spec.name} does not take on {where} "
                "(per-image resolution is documented for Gemini 3, on v1beta, v1alpha and "
                "Interactions)",
            )
        return level
    if level not in spec.media_resolution:
        levels = ", ".join(spec.media_resolution) or "none"
        raise SettingError(
            "media_resolution", f"{level!r} is refused by {spec.name} (it takes: {levels})"
        )
    return level


def build_request(
    settings: TaskSettings,
    prompt: str,
    system_lines: list[str],
    json_mode: bool,
    default_schema: dict[str, Any] | None = None,
    *,
    locate: bool = False,
) -> GenerateRequest:
    """A GenerateRequest with the user's settings where given and the defaults elsewhere.

    `system_lines` are task rules added after the user's system instruction (or alone);
    `default_schema` is the task's responseSchema, replaced by the user's schema if set.
    `locate`: the task places objects in images, so a group's objects must say which image.
    """
    thinking_budget, thinking_level = thinking(settings)
    temperature = settings.temperature
    if temperature is None and settings.flavor != "interactions":
        # the table's recommendation, not through Interactions: google-genai 3.6's Interactions
        # types mark generation_config.temperature deprecated, so only a user's own goes there
        temperature = settings.spec.temperature
    if settings.grouped:
        prompt = multi.group_prompt(prompt, locate=locate)
        if locate and default_schema is not None:
            default_schema = multi.with_image_key(default_schema)
    parts = [settings.system_instruction.strip()] if settings.system_instruction else []
    parts += system_lines
    reference_rule = multi.reference_rule(len(settings.reference_images))
    parts += [reference_rule] if reference_rule else []
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
        # a MediaResolution: [task] media_resolution is checked against MEDIA_RESOLUTIONS when
        # the config is read, which the str-typed setting does not tell mypy
        media_resolution=media_resolution(settings),  # type: ignore[arg-type]
    )


def schemas(
    settings: TaskSettings, default: dict[str, Any] | None
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(response_schema, response_json_schema) to send.

    A task's built-in schema uses responseSchema (the OpenAPI subset every JSON-mode model
    takes). A user's schema (JSON Schema) goes as responseJsonSchema where the model has it
    and as responseSchema elsewhere, where it must fit the OpenAPI subset. An empty user
    schema ({}) sends no schema at all.
    """
    schema = settings.response_schema
    if schema is None:
        return default, None
    if not schema:
        return None, None
    if settings.spec.json_schema:
        _refuse_schema(json_schema_problem(schema))
        return None, schema
    problem = openapi_schema_problem(schema) or _converted_problem(schema)
    if problem is not None:
        name = settings.spec.name
        _refuse_schema(f"sent as responseSchema ({name} takes no JSON Schema), which {problem}")
    return schema, None


def _converted_problem(schema: dict[str, Any]) -> str | None:
    """Why the OpenAPI schema, read as JSON Schema (as its answers are checked and typed:
    tasks/typed.py), is no valid JSON Schema: a field of the right name with a wrong value
    (`required: "a"`, `minItems: "x"`), which the subset's field check does not look at."""
    try:
        converted = json_schema(schema)
    except (TypeError, ValueError, AttributeError) as exc:
        return f"cannot be read as JSON Schema ({exc})"
    problem = json_schema_problem(converted)
    return None if problem is None else f"is {problem} (read as JSON Schema, as answers are)"


def _refuse_schema(problem: str | None) -> None:
    """A schema the service refuses fails every request with a 400 (rules schema.json-invalid,
    fields.value, fields.unknown of the local server): refused before any call."""
    if problem is not None:
        raise SettingError("response_schema", problem)


def quoted(labels: tuple[str, ...]) -> str:
    """Labels as a prompt lists them: "cat", "dog" (JSON quoting, so quotes inside stay clear)."""
    return ", ".join(json.dumps(label, ensure_ascii=False) for label in labels)
