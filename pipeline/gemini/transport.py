"""HTTP exchanges with the Gemini service, and the rules every one of them follows.

One aiohttp session per client (its connection pool sized to the pipeline's concurrency) carries
every call. The API key (or Vertex's access token: auth.py) stays home:

- it travels only in the `x-goog-api-key` (or `Authorization`) header of requests to the API
  itself (never to the resumable upload URL, which is its own credential);
- redirects are never followed (aiohttp follows them by default, re-sending the headers): a 3xx
  becomes `GeminiError(kind="redirect")` naming only the Location's host;
- clear-text `http://` is refused for any host but loopback (127.0.0.0/8, ::1, localhost) unless
  the caller allows it explicitly;
- it is removed from every text kept or shown (an answer's stored raw body — a model can echo
  what it was sent —, every error message); it is never in a repr. An answer is parsed as
  received and redacted only after (`stored`): redacting first once turned 'mask' into
  'mas[redacted]' under a one-letter key and dropped the masks, the tokens and the cost;
- a key shorter than `MIN_KEY_CHARS`, or with whitespace or control characters in it, is refused
  (`ApiKeyError`): it could not be told from the text around it.

Each request carries `X-Server-Timeout` with its deadline, as the SDK's
`populate_server_timeout_header` (`_api_client.py`) sends it: the ceiling of the seconds.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar, cast
from urllib.parse import urlsplit

import aiohttp

from pipeline.gemini.auth import REDACTED, Auth, KeyAuth
from pipeline.gemini.errors import GeminiError, error_from_response
from pipeline.gemini.types import GenerateResponse
from pipeline.gemini.wire import json_bytes

_Parsed = TypeVar("_Parsed")


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer read in full, as received (redact what of it is kept: `stored`)."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def is_loopback(host: str | None) -> bool:
    """127.0.0.0/8, ::1 or localhost: traffic that never leaves the machine."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str, *, allow_insecure_http: bool) -> None:
    """ValueError unless `url` is https, or http to loopback (or explicitly allowed)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname:
        if allow_insecure_http or is_loopback(parts.hostname):
            return
        raise ValueError(
            f"refusing http:// to {parts.hostname}: the API key and your images would cross the "
            "network in clear text; use https, or pass allow_insecure_http=True"
        )
    raise ValueError(f"not an http(s) URL with a host: {parts.scheme}://{parts.hostname or ''}")


MAX_RESPONSE_BYTES = 32 << 20  # an answer bigger than this is refused unread (kind too_large)
_READ_CHUNK = 1 << 20
_DEFAULT = object()


class Transport:
    """The session, the key and the exchange rules of one client."""

    def __init__(
        self,
        api_key: str | None,
        *,
        auth: Auth | None = None,
        max_connections: int,
        timeout: float,
        max_response_bytes: int | None = MAX_RESPONSE_BYTES,
    ) -> None:
        self.max_response_bytes = max_response_bytes
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        self.auth: Auth = auth if auth is not None else KeyAuth(api_key)
        self.max_connections = max_connections
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    @property
    def has_key(self) -> bool:
        return self.auth.present

    def session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("GeminiClient is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            )
        return self._session

    async def close(self) -> None:
        self._closed = True
        await self.auth.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def redact(self, text: str) -> str:
        """Remove the key (or every access token) from text that came from elsewhere (server
        bodies, library errors)."""
        for secret in self.auth.secrets():
            text = text.replace(secret, REDACTED)
        return text

    def redact_bytes(self, body: bytes) -> bytes:
        for secret in self.auth.secrets():
            body = body.replace(secret.encode(), REDACTED.encode())
        return body

    def stored(self, response: GenerateResponse) -> GenerateResponse:
        """A parsed answer with the key removed from the texts that are kept or shown (its raw
        body, the model's text, its finish message); its structure (usage, finish reason) was
        read from the body as received. A model may echo the key in its text, so the text is
        redacted too: a key of `MIN_KEY_CHARS` or more does not occur in it by chance."""
        message = response.finish_message
        return replace(
            response,
            raw=self.redact(response.raw),
            text=self.redact(response.text),
            finish_message=None if message is None else self.redact(message),
        )

    def error(self, answer: Answer) -> GeminiError:
        return error_from_response(answer.status, self.redact(answer.text), answer.headers)

    def parse(self, answer: Answer, parse: Callable[[str], _Parsed], what: str) -> _Parsed:
        if answer.status >= 400:
            raise self.error(answer)
        return self.parse_value(answer.text, parse, what)

    def parse_value(self, value: Any, parse: Callable[[Any], _Parsed], what: str) -> _Parsed:
        try:
            return parse(value)
        except (ValueError, TypeError, AttributeError) as exc:
            # A success answer that is not the promised JSON: corrupted in transit, like a reset.
            failure = GeminiError(
                None, "DATA_LOSS", self.redact(f"{what}: unreadable answer ({exc})")
            )
        raise failure

    async def pages(
        self,
        url: str,
        parse_page: Callable[[str], tuple[list[_Parsed], str | None]],
        what: str,
        page_size: int,
        query: Mapping[str, str] | None = None,
    ) -> list[_Parsed]:
        """Every item of a listing, following nextPageToken (as the SDK's `Pager` does);
        `query`: more parameters of every page (a Vertex list's `filter`)."""
        items: list[_Parsed] = []
        params = {**(query or {}), "pageSize": str(page_size)}
        while True:
            answer = await self.send("GET", url, params=params, what=what)
            page, token = self.parse(answer, parse_page, what)
            items.extend(page)
            if not token:
                return items
            params = {**(query or {}), "pageSize": str(page_size), "pageToken": token}

    async def _headers(
        self, headers: Mapping[str, str] | None, with_key: bool, limit: float
    ) -> dict[str, str]:
        request_headers = dict(headers or {})
        if with_key:
            request_headers.update(await self.auth.headers())
        if limit > 0:
            request_headers["X-Server-Timeout"] = str(math.ceil(limit))
        return request_headers

    async def send(
        self,
        method: str,
        url: str,
        *,
        what: str,
        json_body: Any = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        timeout: float | None = None,
        with_key: bool = True,
        max_bytes: int | object | None = _DEFAULT,
        into: Writable | None = None,
    ) -> Answer:
        """One HTTP exchange, body read in full; transport failures become GeminiError.

        `timeout` is this exchange's deadline in seconds (the client's default when None);
        `max_bytes` caps the body (the client's `max_response_bytes` by default; None: no cap):
        four 200 MB answers once took 3.6 GB of memory. With `into`, a 2xx body is written
        there chunk by chunk instead (the Answer's body is then empty): a Batch Mode results
        file may be gigabytes. It is not redacted on the way: the reader redacts what it reads.
        """
        # the _DEFAULT sentinel (an `object`) is replaced here, so `cap` is an int or None
        cap = self.max_response_bytes if max_bytes is _DEFAULT else cast(int | None, max_bytes)
        limit = self.timeout if timeout is None else timeout
        if limit <= 0:  # aiohttp reads 0 as "no deadline"
            raise GeminiError(None, "DEADLINE_EXCEEDED", f"{what}: no time left to send it")
        request_headers = await self._headers(headers, with_key, limit)
        if json_body is not None:
            data = json_bytes(json_body)
            request_headers["Content-Type"] = "application/json"
        try:
            async with self.session().request(
                method,
                url,
                data=data,
                headers=request_headers,
                params=params,
                timeout=aiohttp.ClientTimeout(total=limit),
                allow_redirects=False,
            ) as response:
                if into is not None and response.status < 300:
                    body = await _stream(response, into)
                else:
                    body = await _read_capped(response, cap, what)
                answer = Answer(response.status, response.headers, body)
        except TimeoutError:
            failure = GeminiError(None, "DEADLINE_EXCEEDED", f"{what}: no answer within {limit:g}s")
        except (aiohttp.ClientError, OSError) as exc:
            detail = self.redact(str(exc)) or "connection failed"
            failure = GeminiError(None, "UNAVAILABLE", f"{what}: {type(exc).__name__}: {detail}")
        else:
            if 300 <= answer.status < 400:
                raise self._redirected(answer, what)
            return answer
        # Raised outside the except blocks, so no chained library exception (whose request
        # info carries the headers) ends up in a formatted traceback.
        raise failure

    def _redirected(self, answer: Answer, what: str) -> GeminiError:
        host = urlsplit(answer.headers.get("Location", "")).hostname or "no Location given"
        return GeminiError(
            answer.status,
            "REDIRECT",
            self.redact(
                f"{what}: the service redirected to {host}; not followed, "
                "the API key never follows a redirect"
            ),
            kind="redirect",
        )


class Writable(Protocol):
    """Where `send(into=...)` copies a body: a file, or batches.ResultsFile (whose failure to
    write is its own exception, not an OSError this module would read as the connection's)."""

    def write(self, data: bytes, /) -> object: ...


async def _read_capped(response: aiohttp.ClientResponse, cap: int | None, what: str) -> bytes:
    """The whole body, or GeminiError(kind too_large) as soon as it passes `cap` bytes."""
    if cap is None:
        return await response.read()
    declared = response.content_length
    if declared is not None and declared > cap:
        raise _too_large(response.status, what, cap)
    chunks, size = [], 0
    while chunk := await response.content.read(_READ_CHUNK):
        size += len(chunk)
        if size > cap:
            raise _too_large(response.status, what, cap)
        chunks.append(chunk)
    return b"".join(chunks)


async def _stream(response: aiohttp.ClientResponse, into: Writable) -> bytes:
    """Copy the body into a file, a chunk at a time; nothing of it stays in memory."""
    while chunk := await response.content.read(_READ_CHUNK):
        into.write(chunk)
    return b""


def _too_large(status: int, what: str, cap: int) -> GeminiError:
    return GeminiError(
        status,
        "RESPONSE_TOO_LARGE",
        f"{what}: the answer is larger than {cap:,} bytes (the cap); it was not read",
        kind="too_large",
    )
