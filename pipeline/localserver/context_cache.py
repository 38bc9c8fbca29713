"""Explicit context caches' state: cached contents with their expiry, and what a generateContent
request naming one (`cachedContent`) is served from it.

A cached content keeps what its create sent — the system instruction and the contents, texts
and images in order (`Prompted` of the create) — with their tokens counted as any prompt's are
(billing.prompt_usage), and lives until its expire time (create: `ttl` or `expireTime`, one
hour when neither; renewed by a PATCH) on the server's clock; from then on it is gone, as a
deleted one (rule cache.not-found). A request using it is read as if it had sent the cached
system instruction and contents first, then its own; the cached tokens are reported in
`usageMetadata.cachedContentTokenCount` and billed at the cached rate (rule
billing.context-cache). The rules a request must keep (the same model, no system instruction,
tools or tool config of its own) are checked by `resolve`.
"""

from __future__ import annotations

import re
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from pipeline.localserver import errors
from pipeline.localserver.answering import Prompted
from pipeline.localserver.files import rfc3339
from pipeline.localserver.spec import get

DEFAULT_TTL_SECONDS = 3600.0  # the caching page: "If not set, the TTL defaults to 1 hour"
_ID_ALPHABET = string.ascii_lowercase + string.digits
_DURATION = re.compile(r"^(\d+(?:\.\d{1,9})?)s$")  # google.protobuf.Duration in JSON
NOT_FOUND = "CachedContent not found (or permission denied)"
WITH_CACHE = (
    "Tool config, tools and system instruction should not be set in the request when using "
    "cached content."
)


@dataclass(slots=True)
class Cached:
    """One cached content: what it holds, its tokens and its lifetime (server clock)."""

    id: str
    prompted: Prompted  # the create's system instruction and contents, read as a prompt
    tokens: int
    created: float
    updated: float
    expires: float
    display_name: str | None = None

    @property
    def name(self) -> str:
        return f"cachedContents/{self.id}"


class ContextCaches:
    """The cached contents of one server, by id."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._caches: dict[str, Cached] = {}
        self.created = 0
        self.renewed = 0
        self.deleted = 0
        self.expired = 0
        self.served = 0  # requests answered from a cached content
        self.served_tokens = 0

    def add(self, prompted: Prompted, tokens: int, expiry: float, name: str | None) -> Cached:
        now = self.clock()
        cached = Cached(self._new_id(), prompted, tokens, now, now, expiry, name)
        self._caches[cached.id] = cached
        self.created += 1
        return cached

    def _new_id(self) -> str:
        return "".join(secrets.choice(_ID_ALPHABET) for _ in range(12))

    def get(self, name: str) -> Cached:
        """The live cached content `name` ("cachedContents/<id>" or "<id>"); 404 when it never
        existed, was deleted or has expired (an expired one is dropped now)."""
        cache_id = name.rstrip("/").rsplit("/", 1)[-1]
        cached = self._caches.get(cache_id)
        if cached is not None and cached.expires <= self.clock():
            del self._caches[cache_id]
            self.expired += 1
            cached = None
        if cached is None:
            raise errors.not_found(NOT_FOUND, rule="cache.not-found")
        return cached

    def renew(self, name: str, expiry: float) -> Cached:
        cached = self.get(name)
        cached.expires, cached.updated = expiry, self.clock()
        self.renewed += 1
        return cached

    def delete(self, name: str) -> None:
        del self._caches[self.get(name).id]
        self.deleted += 1

    def live(self) -> list[Cached]:
        now = self.clock()
        return [cached for cached in self._caches.values() if cached.expires > now]

    def expiry(self, body: dict[str, Any]) -> float:
        """When a create's (or a PATCH's) cached content expires: `ttl` from now or
        `expireTime`, not both; an hour from now when neither is given."""
        ttl, at = get(body, "ttl"), get(body, "expire_time")
        if ttl is not None and at is not None:
            raise _expiration("Only one of ttl and expire_time may be set.")
        if at is not None:
            return _timestamp(at)
        return self.clock() + (DEFAULT_TTL_SECONDS if ttl is None else _duration(ttl))

    def resolve(self, body: dict[str, Any], prompted: Prompted) -> tuple[Prompted, Cached]:
        """A generateContent request naming a cached content, read with what it holds first;
        400 when it also sets what the cache holds or names another model, 404 when gone."""
        if any(
            get(body, key) is not None for key in ("system_instruction", "tools", "tool_config")
        ):
            raise errors.invalid_argument(WITH_CACHE, rule="cache.request")
        cached = self.get(str(get(body, "cached_content")))
        if cached.prompted.model != prompted.model:
            raise errors.invalid_argument(
                f"Model used by GenerateContent request (models/{prompted.model}) and "
                f"CachedContent (models/{cached.prompted.model}) has to be the same.",
                rule="cache.model",
            )
        self.served += 1
        self.served_tokens += cached.tokens
        return joined(cached.prompted, prompted), cached

    def resource(self, cached: Cached) -> dict[str, Any]:
        """The CachedContent resource as the service writes it (camelCase)."""
        body: dict[str, Any] = {
            "name": cached.name,
            "model": f"models/{cached.prompted.model}",
            "createTime": rfc3339(cached.created),
            "updateTime": rfc3339(cached.updated),
            "expireTime": rfc3339(cached.expires),
            "usageMetadata": {"totalTokenCount": cached.tokens},
        }
        if cached.display_name:
            body["displayName"] = cached.display_name
        return body

    def snapshot(self) -> dict[str, int]:
        return {
            "created": self.created,
            "renewed": self.renewed,
            "deleted": self.deleted,
            "expired": self.expired,
            "stored": len(self._caches),  # expired ones count until asked for (no clock here)
            "served": self.served,
            "served_tokens": self.served_tokens,
        }


def joined(cached: Prompted, request: Prompted) -> Prompted:
    """The request as the model reads it: the cache's system instruction and contents first."""
    texts = [*cached.texts, *request.texts]
    return replace(
        request,
        texts=texts,
        images=[*cached.images, *request.images],
        parts=(*cached.parts, *request.parts),
        ask=replace(request.ask, prompt="\n".join(texts), system=cached.ask.system),
    )


def too_small(tokens: int, minimum: int) -> errors.ApiError:
    return errors.invalid_argument(
        f"Cached content is too small. total_token_count={tokens}, min_total_token_count={minimum}",
        rule="cache.too-small",
    )


def _duration(text: Any) -> float:
    match = _DURATION.match(str(text))
    if match is None:
        raise _expiration(
            f"Invalid value at 'ttl' (type.googleapis.com/google.protobuf.Duration), \"{text}\""
        )
    return float(match.group(1))


def _timestamp(text: Any) -> float:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise _expiration(
            f"Invalid value at 'expire_time' (type.googleapis.com/google.protobuf.Timestamp), "
            f'"{text}"'
        ) from None


def _expiration(message: str) -> errors.ApiError:
    return errors.invalid_argument(message, rule="cache.expiration")
