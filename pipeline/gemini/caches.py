"""Explicit context caching's wire protocol: the `cachedContents` resource.

Protocol only, as the rest of `pipeline.gemini`: it builds and reads bodies and makes the calls,
and never retries (a `GeminiError` says what failed; the run decides). The shapes follow the
REST reference (ai.google.dev/api/caching) and google-genai's `google/genai/caches.py`:

- create: `POST {base}/{version}/cachedContents` with `{"model": "models/<m>", "contents",
  "systemInstruction", "ttl": "<seconds>s", "displayName"}` (`Caches.create` with
  `_CreateCachedContentParameters_to_mldev`: the config's fields lifted to the top, the model
  prefixed by `t_caches_model`). The service refuses content under the model's minimum with a
  400 INVALID_ARGUMENT "Cached content is too small. total_token_count=…,
  min_total_token_count=…";
- get / delete: `GET` / `DELETE {base}/{version}/cachedContents/<id>` (`Caches.get`, `delete`);
- renew: `PATCH {base}/{version}/cachedContents/<id>?updateMask=ttl` with `{"ttl": "<s>s"}`
  (`Caches.update` with `_UpdateCachedContentConfig_to_mldev`; the REST reference names the
  field mask, which the SDK leaves to the service);
- the resource answered: `{"name": "cachedContents/<id>", "model", "displayName",
  "createTime", "updateTime", "expireTime", "usageMetadata": {"totalTokenCount"}}`.

A generateContent request then names it in `cachedContent` and sends neither the system
instruction nor the cached parts again (the service refuses a system instruction, tools or a
tool config beside a cached content); its `usageMetadata.cachedContentTokenCount` is the cached
part of its prompt, billed at the cached rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.gemini.content import image_parts, system_instruction
from pipeline.gemini.files import parse_json_object
from pipeline.gemini.transport import Transport
from pipeline.gemini.types import ImagePart
from pipeline.gemini.wire import as_int, field


@dataclass(frozen=True, slots=True)
class CachedContent:
    """A cachedContents resource as the service describes it (the SDK's `types.CachedContent`)."""

    name: str  # "cachedContents/<id>"
    model: str  # "models/<m>"
    expire_time: str | None  # RFC 3339, always set on output
    total_tokens: int  # usageMetadata.totalTokenCount: what each request using it is served
    display_name: str | None = None


def parse_cached_content(document: Any) -> CachedContent:
    """A CachedContent resource (JSON object) as CachedContent; ValueError without a name."""
    if not isinstance(document, dict) or not document.get("name"):
        raise ValueError("a cached content needs a name")
    usage = field(document, "usageMetadata", "usage_metadata")
    tokens = field(usage, "totalTokenCount", "total_token_count") if isinstance(usage, dict) else 0
    return CachedContent(
        name=str(document["name"]),
        model=str(document.get("model") or ""),
        expire_time=field(document, "expireTime", "expire_time"),
        total_tokens=as_int(tokens),
        display_name=field(document, "displayName", "display_name"),
    )


def _parse_text(body: str) -> CachedContent:
    return parse_cached_content(parse_json_object(body))


def cache_id(name: str) -> str:
    """ "cachedContents/abc" or "abc" -> "abc" (the SDK's `t_cached_content_name`, reversed)."""
    return name.rstrip("/").rsplit("/", 1)[-1]


def ttl_text(seconds: float) -> str:
    """A google.protobuf.Duration in JSON: seconds with an "s" (the SDK's "86400s"), never in
    exponent form (`:g` wrote 1e+06s for 1,000,000 s, which a Duration parser refuses)."""
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def create_body(
    model: str,
    *,
    system: str | None,
    images: Sequence[ImagePart],
    ttl_seconds: float,
    display_name: str | None = None,
    level: str | None = None,
) -> dict[str, Any]:
    """A create's body: the system instruction and the images (each after its caption), as one
    user turn, the way a request would have sent them first (`level`: the media resolution of
    an image part that sets none)."""
    body: dict[str, Any] = {"model": "models/" + model.removeprefix("models/")}
    if images:
        body["contents"] = [{"role": "user", "parts": image_parts(images, level)}]
    if system:
        body["systemInstruction"] = system_instruction(system)
    body["ttl"] = ttl_text(ttl_seconds)
    if display_name:
        body["displayName"] = display_name
    return body


class Caches:
    """The cachedContents resource over a client's connection and key (`client.caches`)."""

    def __init__(self, transport: Transport, base_url: str, version: str) -> None:
        self._transport = transport
        self.base_url = base_url
        self.version = version

    def _url(self, name: str = "") -> str:
        root = f"{self.base_url}/{self.version}/cachedContents"
        return f"{root}/{cache_id(name)}" if name else root

    async def create(self, body: dict[str, Any]) -> CachedContent:
        """A new cached content from `create_body(...)`. Not idempotent: two creates, two
        caches (each stored, and billed, until deleted or expired)."""
        answer = await self._transport.send(
            "POST", self._url(), json_body=body, what="create cachedContents"
        )
        return self._transport.parse(answer, _parse_text, "create cachedContents")

    async def get(self, name: str) -> CachedContent:
        what = f"get cachedContents/{cache_id(name)}"
        answer = await self._transport.send("GET", self._url(name), what=what)
        return self._transport.parse(answer, _parse_text, what)

    async def renew(self, name: str, ttl_seconds: float) -> CachedContent:
        """Its expiry moved to now + `ttl_seconds` (the only field a cached content changes)."""
        what = f"renew cachedContents/{cache_id(name)}"
        answer = await self._transport.send(
            "PATCH",
            self._url(name),
            json_body={"ttl": ttl_text(ttl_seconds)},
            params={"updateMask": "ttl"},
            what=what,
        )
        return self._transport.parse(answer, _parse_text, what)

    async def delete(self, name: str, *, timeout: float | None = None) -> None:
        what = f"delete cachedContents/{cache_id(name)}"
        answer = await self._transport.send("DELETE", self._url(name), timeout=timeout, what=what)
        if answer.status >= 400:
            raise self._transport.error(answer)
