"""The cachedContents surface: explicit context caches' create, get, list, renew (PATCH) and
delete, over the server's `ContextCaches` (context_cache.py: their state, expiry and what a
request using one is served).

A create is read as generateContent reads a request's contents (generate.read_contents: images
inline or by file, captions) with its system instruction; it is refused under the model's
minimum (the model table's `cache_min_tokens`) with the service's "Cached content is too small"
(rule cache.too-small), and for a model that caches nothing as an unknown method (rule
cache.model). A PATCH moves the expiry only (`ttl` or `expireTime`; `updateMask` names nothing
else: rule cache.expiration).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from pipeline.localserver import errors, model_checks
from pipeline.localserver.answering import Prompted
from pipeline.localserver.answers import Ask
from pipeline.localserver.billing import prompt_usage
from pipeline.localserver.context_cache import too_small
from pipeline.localserver.core import Core
from pipeline.localserver.fields import CACHED_CONTENT, CACHED_CONTENT_UPDATE
from pipeline.localserver.generate import read_contents, system_text
from pipeline.localserver.image_input import ImageInput, ImageReader
from pipeline.localserver.spec import check, get
from pipeline.models import Model

CREATE = "createCachedContent"  # the method a model lists when it caches (models.list)
UPDATABLE = frozenset({"ttl", "expire_time", "expireTime"})


class CachedContentsSurface:
    """Routes of cachedContents."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.caches = core.contexts

    def routes(self, app: web.Application, version: str) -> None:
        app.router.add_post(f"/{version}/cachedContents", self.create)
        app.router.add_get(f"/{version}/cachedContents", self.list)
        app.router.add_get(f"/{version}/cachedContents/{{id}}", self.get)
        app.router.add_patch(f"/{version}/cachedContents/{{id}}", self.update)
        app.router.add_delete(f"/{version}/cachedContents/{{id}}", self.delete)

    async def create(self, request: web.Request) -> web.Response:
        self.core.check_key(request)
        version = request.match_info["version"]
        body = await self.core.body(request)
        check(body, CACHED_CONTENT, version=version)
        model_id = str(get(body, "model") or "").removeprefix("models/")
        model = self._model(model_id, version)
        prompted = cached_prompt(body, model, model_id, version, self.core.images)
        tokens = prompt_usage(prompted).prompt_tokens
        if model.cache_min_tokens is not None and tokens < model.cache_min_tokens:
            raise too_small(tokens, model.cache_min_tokens)
        expiry = self.caches.expiry(body)
        cached = self.caches.add(prompted, tokens, expiry, get(body, "display_name"))
        return web.json_response(self.caches.resource(cached))

    def _model(self, model_id: str, version: str) -> Model:
        """The entry of a model that caches; 404 as for any method it does not serve."""
        core = self.core
        model = model_checks.known_model(
            model_id, version, CREATE, table=core.models, on=core.today()
        )
        if model.cache_min_tokens is None:
            raise errors.model_not_found(model_id, version, CREATE, rule="cache.model")
        return model

    async def list(self, request: web.Request) -> web.Response:
        self.core.check_key(request)
        live = [self.caches.resource(cached) for cached in self.caches.live()]
        return web.json_response({"cachedContents": live} if live else {})

    async def get(self, request: web.Request) -> web.Response:
        self.core.check_key(request)
        cached = self.caches.get(request.match_info["id"])
        return web.json_response(self.caches.resource(cached))

    async def update(self, request: web.Request) -> web.Response:
        self.core.check_key(request)
        body = await self.core.body(request)
        check(body, CACHED_CONTENT_UPDATE, version=request.match_info["version"])
        _check_mask(request.query.get("updateMask") or request.query.get("update_mask"), body)
        cached = self.caches.renew(request.match_info["id"], self.caches.expiry(body))
        return web.json_response(self.caches.resource(cached))

    async def delete(self, request: web.Request) -> web.Response:
        self.core.check_key(request)
        self.caches.delete(request.match_info["id"])
        return web.json_response({})

    def snapshot(self) -> dict[str, Any]:
        return {"cached_contents": self.caches.snapshot()}


def cached_prompt(
    body: dict[str, Any], model: Model, model_id: str, version: str, images: ImageReader
) -> Prompted:
    """A create's system instruction and contents, read as the start of a prompt."""
    contents = get(body, "contents")
    parts = read_contents(contents, model, version, images) if contents else []
    texts = [part for part in parts if isinstance(part, str)]
    system = system_text(get(body, "system_instruction"))
    return Prompted(
        model=model_id,
        spec=model,
        texts=texts,
        images=[part for part in parts if isinstance(part, ImageInput)],
        parts=tuple(parts),
        ask=Ask(prompt="\n".join(texts), system=system),
    )


def _check_mask(mask: str | None, body: dict[str, Any]) -> None:
    """Only the expiry changes (the reference: "only expiration is updatable"), and it must be
    given."""
    named = {name.strip() for name in (mask or "").split(",") if name.strip()}
    if named - UPDATABLE or not set(body) & UPDATABLE:
        raise errors.invalid_argument(
            "Only the expiration (ttl or expire_time) of a cached content can be updated.",
            rule="cache.expiration",
        )
