"""Checks of a request's settings against the model table (pipeline/models.py): the rules that
depend on which model is asked, shared by generateContent and the Interactions API.

Each check raises an ApiError citing its rule (rules.py) or returns the normalised setting.
"""

from __future__ import annotations

from datetime import date
from typing import Any

from pipeline.localserver import errors
from pipeline.models import Model, ModelTable, default_table

THINKING_LEVEL_UNSET = "thinking_level_unspecified"
MEDIA_RESOLUTION_PREFIX = "media_resolution_"
JSON_SCHEMA_TYPES = frozenset({"string", "number", "integer", "boolean", "array", "object", "null"})


def known_model(
    model_id: str,
    version: str,
    method: str,
    *,
    table: ModelTable | None = None,
    on: date | None = None,
) -> Model:
    """The table's entry for `model_id`; 404 for a model the table does not know, or one shut
    down by the day `on` (today when None): the service answers so after the shut-down date."""
    name = model_id.removeprefix("models/")
    table = table or default_table()
    if not name or not table.is_known(name):
        raise errors.model_not_found(name, version, method)
    model = table.lookup(name)
    if model.status.is_shut_down(on):
        raise errors.model_not_found(name, version, method, rule="model.shut-down")
    return model


def interactions_model(
    model_id: str, version: str, *, table: ModelTable | None = None, on: date | None = None
) -> Model:
    model = known_model(model_id, version, "interactions", table=table, on=on)
    if not model.interactions:
        raise errors.model_not_found(
            model_id.removeprefix("models/"), version, "interactions", rule="model.no-interactions"
        )
    return model


# ---------------------------------------------------------------------------- thinking


def check_thinking(model: Model, config: Any, budget: Any, level: Any) -> bool:
    """Refuse what the model does not take; True when the model will think."""
    if config is not None and model.thinking.control == "none":
        raise errors.invalid_argument(
            "thinking_config is not supported.", rule="thinking.unsupported"
        )
    level = _level(level)
    if budget is not None and level is not None:
        raise errors.invalid_argument(
            "thinking_budget and thinking_level cannot be set together.", rule="thinking.both"
        )
    if level is not None:
        check_level(model, level)
    if budget is not None:
        _check_budget(model, int(budget))
    return thinks(model, budget, level)


def check_level(model: Model, level: str) -> None:
    if model.thinking.control == "budget":
        raise errors.invalid_argument(
            "Thinking level is not supported for this model.", rule="thinking.level-unsupported"
        )
    refusal = model.thinking.level_error(level)
    if refusal:
        raise errors.invalid_argument(refusal, rule="thinking.level-value")


def _check_budget(model: Model, budget: int) -> None:
    refusal = model.thinking.budget_error(budget)
    if refusal is None:
        return
    rule = (
        "thinking.budget-range"
        if model.thinking.control == "budget"
        else "thinking.budget-unsupported"
    )
    raise errors.invalid_argument(refusal, rule=rule)


def thinks(model: Model, budget: Any, level: str | None) -> bool:
    """2.5 and 3 think by default; budget 0 turns it off, and so does the lowest level here
    (the local model has nothing to think about when asked for as little as possible)."""
    if budget is not None:
        return int(budget) != 0
    if level is not None:
        return level != "minimal"
    return model.thinking.control != "none"


def _level(value: Any) -> str | None:
    if value is None:
        return None
    level = str(value).lower()
    return None if level == THINKING_LEVEL_UNSET else level


# ---------------------------------------------------------------------------- schemas


def check_schemas(model: Model, schema: Any, json_schema: Any) -> None:
    if schema is not None and json_schema is not None:
        raise errors.invalid_argument(
            "response_schema and response_json_schema cannot be set together: set one of them.",
            rule="schema.both",
        )
    if json_schema is not None and not model.json_schema:
        raise errors.invalid_argument(
            "response_json_schema is not supported for this model; use response_schema.",
            rule="schema.json-unsupported",
        )


def check_json_schema_types(schema: Any, where: str) -> None:
    """Interactions' response_format.schema is JSON Schema: type names are lower case."""
    stack = [(schema, where)]
    while stack:
        node, path = stack.pop()
        if isinstance(node, list):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        kinds = node.get("type")
        for kind in kinds if isinstance(kinds, list) else [kinds]:
            if isinstance(kind, str) and kind not in JSON_SCHEMA_TYPES:
                raise errors.invalid_argument(
                    f"Invalid JSON schema at '{path}.type': '{kind}' is not a JSON Schema type "
                    f"(one of {', '.join(sorted(JSON_SCHEMA_TYPES))}).",
                    rule="interactions.schema-types",
                )
        stack.extend((value, f"{path}.{key}") for key, value in node.items() if key != "enum")


# ---------------------------------------------------------------------------- media resolution


def global_resolution(model: Model, value: Any) -> str | None:
    """generationConfig.mediaResolution as "low" | "medium" | "high"; None when unset."""
    level = _resolution_level(value)
    if level is not None and level not in model.media_resolution:
        raise errors.invalid_argument(
            f"Media resolution {str(value).upper()} is not supported for this model.",
            rule="media.global-model",
        )
    return level


def part_resolution(model: Model, version: str, value: Any, *, interactions: bool) -> str | None:
    """A per-image resolution (a Part's mediaResolution.level, an Interactions image's
    resolution) as "low" ... "ultra_high"; refused on a model without per-part resolution."""
    level = _resolution_level(value)
    if level is None:
        return None
    allowed = (
        bool(model.part_media_resolution) if interactions else model.part_resolution_on(version)
    )
    if not allowed:
        raise errors.invalid_argument(
            "Per-part media resolution is not supported for this model.",
            rule="media.part-model",
        )
    return level


def _resolution_level(value: Any) -> str | None:
    if value is None:
        return None
    level = str(value).lower().removeprefix(MEDIA_RESOLUTION_PREFIX)
    return None if level == "unspecified" else level
