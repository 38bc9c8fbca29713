"""HTTP plumbing shared by every surface: the key, the JSON body, and one middleware that turns
an ApiError into the right wire flavour and counts every answer for /local/stats.

Handlers raise `ApiError`; the middleware renders it as a google.rpc.Status (generateContent,
Files) or as an Interactions error (paths under /interactions), and counts the refusal under its
rule. The key is compared in constant time and never appears in any answer.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from pipeline.localserver import errors
from pipeline.localserver.errors import ApiError
from pipeline.localserver.stats import Stats

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
STATS_PATH = "/local/stats"


def check_key(request: web.Request, expected: str | None) -> None:
    """The x-goog-api-key header (or ?key=): present, and equal to `expected` when one is set."""
    key = request.headers.get("x-goog-api-key") or request.query.get("key")
    if not key:
        raise errors.missing_key()
    if expected is not None and not hmac.compare_digest(
        key.encode("utf-8"), expected.encode("utf-8")
    ):
        raise errors.invalid_key()


async def read_json(request: web.Request, limit: int, *, required: bool = True) -> dict[str, Any]:
    """The body as a JSON object; a body over `limit` bytes is a 400 (the service has no 413)."""
    if request.content_length is not None and request.content_length > limit:
        raise errors.payload_too_large(limit)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise errors.payload_too_large(limit) from None
    if not raw.strip() and not required:
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise errors.invalid_argument(
            "Invalid JSON payload received. Unexpected token.", rule="body.malformed"
        ) from None
    if not isinstance(body, dict):
        raise errors.invalid_argument(
            "Invalid JSON payload received. Expected an object at the top level.",
            rule="body.malformed",
        )
    return body


def middleware(stats: Stats) -> Any:
    """Render ApiErrors in the route's flavour; count every request on arrival by path, and
    every answer by path and status."""

    @web.middleware
    async def answer(request: web.Request, handler: Handler) -> web.StreamResponse:
        status = 500
        if request.path != STATS_PATH:
            stats.arrived(stat_key(request))
        try:
            response = await _rendered(request, handler, stats)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away before the answer ("client closed request")
            raise
        finally:
            if request.path != STATS_PATH:  # reading the counters does not change them
                stats.count(stat_key(request), status)

    return answer


async def _rendered(request: web.Request, handler: Handler, stats: Stats) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        stats.refused(exc.rule)
        if "/interactions" in request.path:
            return web.json_response(
                exc.interactions_body(),
                status=exc.interactions_http_status,
                headers=exc.interactions_headers(),
            )
        return web.json_response(exc.google_body(), status=exc.http_status, headers=exc.headers)


def stat_key(request: web.Request) -> str:
    """ "METHOD path" with the version and model (or model and method) filled in, and Vertex's
    project and location, and file or interaction ids not."""
    resource = request.match_info.route.resource
    if resource is None:
        return f"{request.method} (unknown path)"
    path = resource.canonical.replace("{id}", "{name}" if "/files/" in request.path else "{id}")
    for name in ("version", "model_action", "model", "project", "location"):
        if name in request.match_info:
            path = path.replace(f"{{{name}}}", request.match_info[name])
    return f"{request.method} {path}"
