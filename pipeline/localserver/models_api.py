"""The models surface: `GET /{version}/models/{model}` (models.get) and `GET /{version}/models`
(models.list), answered from the model table as the service answers them (rules models.get,
models.list, model.unknown, model.shut-down).

Every entry not shut down on the server's day is a Model resource, and so is any id that matches
one by prefix (`gemini-2.5-flash-lite-preview-09-2025` answers for itself). An alias answers its
own resource and names only itself, as the service's alias resources do, so a client cannot learn
its target there; `--alias-target alias=model` makes the double state one (its `baseModelId`),
which is how a client's use of a stated target is tested.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from aiohttp import web

from pipeline.localserver import errors, model_checks
from pipeline.localserver.core import Core
from pipeline.models import Model

# The input window of every Gemini model from 1.5 on (docs/gemini-api.md § Several images:
# 1,048,576 tokens); output: 65,536 from 2.5 on, 8,192 before (the models pages, assumed for
# every entry of a generation).
INPUT_TOKEN_LIMIT = 1_048_576
OUTPUT_TOKEN_LIMITS = {"1.5": 8_192, "2.0": 8_192}
OUTPUT_TOKEN_LIMIT = 65_536
# Sampling defaults the resource lists; the values public models.list dumps show for 2.5 and 3
# Flash, assumed for every entry (nothing in the pipeline reads them).
SAMPLING = {"temperature": 1.0, "maxTemperature": 2.0, "topP": 0.95, "topK": 64}
ALIAS_VERSION = "latest"  # an alias's version names no model (the service's do not either)
# models.list pages: 50 when unset, 1,000 at most (the REST reference of models.list)
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_TOKEN_PREFIX = "models:"


class ModelsSurface:
    """Routes of models.get and models.list."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.stated = dict(core.options.alias_target)

    def routes(self, app: web.Application, version: str) -> None:
        app.router.add_get(f"/{version}/models", self.list_models)
        app.router.add_get(f"/{version}/models/{{model}}", self.get_model)

    async def get_model(self, request: web.Request) -> web.Response:
        self.core.check_key(request)
        version, model_id = request.match_info["version"], request.match_info["model"]
        return web.json_response(self.resource(model_id, version))

    async def list_models(self, request: web.Request) -> web.Response:
        self.core.check_key(request)
        version = request.match_info["version"]
        names = self.listed()
        start, size = _page(request.query)
        body: dict[str, Any] = {}
        if names[start : start + size]:
            body["models"] = [self.resource(n, version) for n in names[start : start + size]]
        if start + size < len(names):
            body["nextPageToken"] = _token(start + size)
        return web.json_response(body)

    def listed(self) -> list[str]:
        """Every entry not shut down today, then the aliases (whose target is served)."""
        today, table = self.core.today(), self.core.models
        names = [m.name for m in table.models if not m.status.is_shut_down(today)]
        return names + [a for a in sorted(table.aliases) if table.is_known(a)]

    def resource(self, model_id: str, version: str) -> dict[str, Any]:
        """The Model resource of `model_id`; the 404 of generateContent for an id not served
        (no source gives models.get's own wording)."""
        model_id = model_id.removeprefix("models/")
        entry = model_checks.known_model(
            model_id, version, "generateContent", table=self.core.models, on=self.core.today()
        )
        alias = model_id.lower() in self.core.models.aliases
        if alias:
            return model_resource(model_id, entry, self.stated.get(model_id.lower()))
        return model_resource(model_id, entry, model_id, entry.generation)


def model_resource(
    model_id: str, entry: Model, base: str | None, version: str = ALIAS_VERSION
) -> dict[str, Any]:
    """A Model resource (camelCase, as the service writes it) for `model_id`, whose properties
    are those of its table entry. `base` is its baseModelId: the id itself for a model, the
    stated target for an alias (None: the alias names only itself)."""
    return {
        "name": f"models/{model_id}",
        "baseModelId": base or model_id,
        "version": version,
        "displayName": display_name(model_id),
        "description": f"{display_name(model_id)}, answered by the local server as its model "
        f"table's entry {entry.name}.",
        "inputTokenLimit": INPUT_TOKEN_LIMIT,
        "outputTokenLimit": OUTPUT_TOKEN_LIMITS.get(entry.generation, OUTPUT_TOKEN_LIMIT),
        "supportedGenerationMethods": methods(entry),
        **SAMPLING,
        "thinking": entry.thinking.control != "none",
    }


def methods(entry: Model) -> list[str]:
    """The generation methods this double serves for the model."""
    served = ["generateContent", "countTokens"]
    return [*served, "batchGenerateContent"] if entry.batch else served


def display_name(model_id: str) -> str:
    """ "gemini-2.5-flash-lite" -> "Gemini 2.5 Flash Lite"."""
    return " ".join(word[:1].upper() + word[1:] for word in model_id.split("-"))


def _page(query: Any) -> tuple[int, int]:
    """(offset, size) of the page asked; 400 for a size that is no integer or a token this
    server did not issue."""
    size = query.get("pageSize") or query.get("page_size") or "0"
    try:
        asked = int(size)
    except ValueError:
        message = f"Invalid value at 'page_size' (TYPE_INT32), \"{size}\""
        raise _bad_page(message, "page_size") from None
    token = query.get("pageToken") or query.get("page_token")
    return _offset(token), min(asked, MAX_PAGE_SIZE) if asked > 0 else DEFAULT_PAGE_SIZE


def _token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"{_TOKEN_PREFIX}{offset}".encode()).decode("ascii")


def _offset(token: str | None) -> int:
    if not token:
        return 0
    try:
        text = base64.urlsafe_b64decode(token.encode("ascii")).decode()
        if text.startswith(_TOKEN_PREFIX):
            return max(0, int(text.removeprefix(_TOKEN_PREFIX)))
    except (ValueError, binascii.Error, UnicodeError):
        pass
    raise _bad_page("Invalid page token.", "page_token")


def _bad_page(message: str, field: str) -> errors.ApiError:
    return errors.invalid_argument(message, rule="models.list", field=field)
