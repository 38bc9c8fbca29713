"""models.get and models.list: what the service says about a model, read into a typed value.

`GET {base}/{version}/models/{model}` answers a Model resource (the REST reference,
https://ai.google.dev/api/models#Model): `name` ("models/gemini-2.5-flash"), `baseModelId`,
`version`, `displayName`, `description`, `inputTokenLimit`, `outputTokenLimit`,
`supportedGenerationMethods`, `thinking`, `temperature`, `maxTemperature`, `topP`, `topK`; an
unknown id is a 404 NOT_FOUND. `GET {base}/{version}/models` answers `{"models": [...],
"nextPageToken"}`, paged by `pageSize` (50 when unset, 1,000 at most) and `pageToken`.

The field names are read as the SDK's `_Model_from_mldev` (google-genai 3.6 `models.py`) reads
them, plus `baseModelId`, which the reference has and the SDK drops. Protocol only: nothing here
knows the pipeline's model table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.gemini.files import parse_json_object
from pipeline.gemini.wire import field

# The service's page size when none is asked (the REST reference of models.list)
DEFAULT_PAGE_SIZE = 50


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A Model resource. `model_id` is the name without "models/"; None where the answer is
    silent (`thinking` None: not said, which is not "no thinking")."""

    name: str  # "models/gemini-2.5-flash"
    base_model_id: str | None = None
    version: str | None = None
    display_name: str | None = None
    description: str | None = None
    input_token_limit: int | None = None
    output_token_limit: int | None = None
    supported_generation_methods: tuple[str, ...] = ()
    thinking: bool | None = None
    temperature: float | None = None
    max_temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None

    @property
    def model_id(self) -> str:
        # Vertex names a publisher model "publishers/google/models/<id>" (backends.py)
        return self.name.removeprefix("publishers/google/").removeprefix("models/")


def model_path(model: str) -> str:
    """The resource name of `model`: "models/<id>" (a tuned model's "tunedModels/<id>" kept).

    The SDK's `t_model` for the Gemini API, with its refusal of a model that would change the
    URL's path or query ('..', '?', '&'): ValueError."""
    if not model or any(bad in model for bad in ("..", "?", "&")):
        raise ValueError(f"invalid model parameter: {model!r}")
    if model.startswith(("models/", "tunedModels/")):
        return model
    return f"models/{model}"


def parse_model(obj: Any) -> ModelInfo:
    """A Model resource as ModelInfo; ValueError for an answer that is no Model."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        raise ValueError("a Model resource needs a name")
    methods = field(obj, "supportedGenerationMethods", "supported_generation_methods") or []
    if not isinstance(methods, list):
        raise ValueError("supportedGenerationMethods must be a list")
    return ModelInfo(
        name=obj["name"],
        base_model_id=_text(field(obj, "baseModelId", "base_model_id")),
        version=_text(obj.get("version")),
        display_name=_text(field(obj, "displayName", "display_name")),
        description=_text(obj.get("description")),
        input_token_limit=_count(field(obj, "inputTokenLimit", "input_token_limit")),
        output_token_limit=_count(field(obj, "outputTokenLimit", "output_token_limit")),
        supported_generation_methods=tuple(str(method) for method in methods),
        thinking=obj["thinking"] if isinstance(obj.get("thinking"), bool) else None,
        temperature=_number(obj.get("temperature")),
        max_temperature=_number(field(obj, "maxTemperature", "max_temperature")),
        top_p=_number(field(obj, "topP", "top_p")),
        top_k=_count(field(obj, "topK", "top_k")),
    )


def parse_model_text(body: str) -> ModelInfo:
    return parse_model(parse_json_object(body))


def parse_model_page(body: str) -> tuple[list[ModelInfo], str | None]:
    """One page of models.list: its models and the next page's token (None on the last)."""
    document = parse_json_object(body)
    models = document.get("models") or []  # an empty page may leave the list out
    if not isinstance(models, list):
        raise ValueError("'models' must be a list")
    token = field(document, "nextPageToken", "next_page_token")
    return [parse_model(item) for item in models], str(token) if token else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _count(value: Any) -> int | None:
    """An int32 (or an int64 sent as a JSON string); None when absent or unreadable."""
    if isinstance(value, bool):
        return None
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
