"""Checks of a request's settings against the model table (pipeline/models.py): the rules that
depend on which model is asked, shared by generateContent and the Interactions API.

Each check raises an ApiError citing its rule (rules.py) or returns the normalised setting. The
table is the server's (`LocalServer(models=...)`: the bundled one, or a run's with its config's
`[models]` entries); what a model takes is read from its entry, never written here.
"""

from __future__ import annotations

import functools
import json
from datetime import date
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from jsonschema.validators import validator_for

from pipeline.localserver import errors
from pipeline.localserver.errors import Violation
from pipeline.models import Model, ModelTable, default_table

THINKING_LEVEL_UNSET = "thinking_level_unspecified"
MEDIA_RESOLUTION_PREFIX = "media_resolution_"
JSON_SCHEMA_TYPES = frozenset({"string", "number", "integer", "boolean", "array", "object", "null"})
SCHEMAS_CHECKED = 64  # distinct schemas whose meta-schema verdict is kept (a run sends one)


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
    """What models.Thinking.budget_error refuses (2.5 Pro's 0, a budget out of range). A budget
    on a level model (Gemini 3) is taken, "no longer recommended" (rule thinking.budget-on-level;
    the thinking page, 2026-09-04); a budget and a level together are refused first
    (thinking.both)."""
    refusal = model.thinking.budget_error(budget)
    if refusal is not None:
        raise errors.invalid_argument(refusal, rule="thinking.budget-range")


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
    """responseSchema (the OpenAPI subset: its fields and type names are held by fields.SCHEMA)
    or responseJsonSchema, which must be JSON Schema the meta-schema takes."""
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
    if json_schema is not None and meta_schema_problem(json_schema) is not None:
        # the service's answer to a malformed JSON Schema names nothing (rule
        # schema.json-invalid: iBUHub/AIStudioToAPI#265, 2026-09-10)
        raise errors.invalid_argument(
            "Request contains an invalid argument.", rule="schema.json-invalid"
        )


def check_interactions_schema(schema: Any, where: str) -> None:
    """response_format.schema: JSON Schema, lowercase type names first (their own message),
    then whatever else the meta-schema refuses."""
    check_json_schema_types(schema, where)
    problem = meta_schema_problem(schema)
    if problem is not None:
        path, message = problem
        raise errors.invalid_argument(
            f"Invalid JSON schema at '{where}{path}': {message}.",
            rule="interactions.schema-invalid",
        )


def meta_schema_problem(schema: Any) -> tuple[str, str] | None:
    """(where, what) of the first thing the JSON Schema meta-schema refuses in `schema`, or
    None. The jsonschema library is the reference validator (its `$schema` draft, else 2020-12,
    whose $defs and prefixItems the API documents); verdicts are kept per schema text, since a
    run sends the same schema with every request."""
    return _meta_schema_problem(json.dumps(schema, sort_keys=True))


@functools.lru_cache(maxsize=SCHEMAS_CHECKED)
def _meta_schema_problem(text: str) -> tuple[str, str] | None:
    schema = json.loads(text)
    validator = validator_for(schema, default=Draft202012Validator)
    error = best_match(validator(validator.META_SCHEMA).iter_errors(schema))
    if error is None:
        return None
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    return path, error.message


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


def part_resolution(model: Model, value: Any) -> str | None:
    """A per-image resolution (a Part's mediaResolution.level, an Interactions image's
    resolution) as "low" ... "ultra_high"; refused on a model without per-part resolution."""
    level = _resolution_level(value)
    if level is None:
        return None
    if not model.part_media_resolution:
        raise errors.invalid_argument(
            "Per-part media resolution is not supported for this model.",
            rule="media.part-model",
        )
    return level


def check_part_version(model: Model, version: str, where: str, name: str) -> None:
    """A Part's mediaResolution exists on the API versions the model's table entry lists
    (v1alpha; v1beta too since the media-resolution page's update of 2026-09-19), elsewhere
    it is an unknown field (rule media.part-version)."""
    if part_resolution_on(model, version):
        return
    text = (
        f"Invalid JSON payload received. Unknown name \"{name}\" at '{where}': Cannot find field."
    )
    raise errors.field_violations(
        [Violation(where, text)], rule="media.part-version", interactions=False
    )


def part_resolution_on(model: Model, version: str) -> bool:
    """The table's versions, and v1 wherever v1beta is listed: an assumption (rule
    media.part-v1), since no source shows v1 refusing the field and the SDK sends it there
    (google-genai 3.6 `models._Part_to_mldev` copies media_resolution on every version; v1 is
    the SDK's default, `_api_client.GOOGLE_AI_API_DEFAULT_VERSION`)."""
    if model.part_resolution_on(version):
        return True
    return version == "v1" and model.part_resolution_on("v1beta")


def _resolution_level(value: Any) -> str | None:
    if value is None:
        return None
    level = str(value).lower().removeprefix(MEDIA_RESOLUTION_PREFIX)
    return None if level == "unspecified" else level
