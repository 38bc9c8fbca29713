"""How a request proves who sends it: an API key, or an OAuth2 bearer token (Vertex AI).

Both are credentials under the same rules (transport.py): sent only to the API's own URLs, never
after a redirect, never over clear-text http but to loopback, removed from every text kept or
shown (`secrets` lists what to remove: the key, or every token this run was handed, since an
answer or an error may quote an older one), never in a repr.

A token is fetched by a blocking function (google-auth's `Credentials.refresh` does its HTTP
with `requests`; adc.py) run in a thread (`asyncio.to_thread`), as the SDK's
`async_get_token_from_credentials` does. It is refreshed before it expires: a request that
finds it within `margin` seconds of its end waits for a fresh one; one that finds it within
twice the margin starts a refresh in the background and goes on with the current token, so a
long run's calls do not stall on the hourly refresh.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from pipeline.gemini.errors import GeminiError

log = logging.getLogger(__name__)

API_KEY_HEADER = "x-goog-api-key"
REDACTED = "[redacted]"
# The shortest key accepted. Google's keys are 39 characters (`AIza` + 35 of [A-Za-z0-9_-]); a
# random 8-character key occurs by chance in a 10 kB answer with odds of about 10^4 / 64^8, or
# 4e-11, so redacting it mangles nothing real. 8 also keeps the local server's keys
# ("local-key", "test-key"). A shorter key redacted stored answers into nonsense ('mask' ->
# 'mas[redacted]' with the key "k"). Access tokens are held to the same rule.
MIN_KEY_CHARS = 8


class ApiKeyError(ValueError):
    """An API key the client refuses (too short to redact, or with whitespace inside). The
    message never contains the key."""


def check_key(key: str | None, name: str = "the API key") -> None:
    """ApiKeyError unless `key` is None or a key this client can send and redact."""
    if key is None:
        return
    if any(c.isspace() or not c.isprintable() for c in key):
        raise ApiKeyError(f"{name} contains whitespace or control characters: refused")
    if len(key) < MIN_KEY_CHARS:
        raise ApiKeyError(
            f"{name} is {len(key)} character(s) long: refused, a key shorter than "
            f"{MIN_KEY_CHARS} cannot be told from the text of an answer (Google's are 39)"
        )


# Refresh this long before a token ends. google-auth calls a token expired 3 min 45 s early
# (`_helpers.REFRESH_THRESHOLD`); 5 minutes leaves a request sent at the edge its whole deadline.
REFRESH_MARGIN = 300.0
# (token, seconds it lives): one blocking fetch of a fresh access token
TokenFetch = Callable[[], tuple[str, float]]


class Auth(Protocol):
    """What the transport asks of a credential."""

    @property
    def present(self) -> bool: ...

    async def headers(self) -> dict[str, str]: ...

    def secrets(self) -> tuple[str, ...]: ...

    async def close(self) -> None: ...


class KeyAuth:
    """An API key in the `x-goog-api-key` header (the Developer API; Vertex express mode)."""

    def __init__(self, key: str | None) -> None:
        check_key(key)
        self.__key = key

    @property
    def present(self) -> bool:
        return bool(self.__key)

    async def headers(self) -> dict[str, str]:
        return {API_KEY_HEADER: self.__key} if self.__key else {}

    def secrets(self) -> tuple[str, ...]:
        return (self.__key,) if self.__key else ()

    async def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"KeyAuth({'set' if self.__key else 'missing'})"


class TokenAuth:
    """An OAuth2 access token in `Authorization: Bearer`, refreshed before it expires.

    `clock` is monotonic seconds (a token's lifetime is measured from when it arrived)."""

    def __init__(
        self,
        fetch: TokenFetch,
        *,
        margin: float = REFRESH_MARGIN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch, self._margin, self._clock = fetch, margin, clock
        self.__token: str | None = None
        self._expires = 0.0
        self._generation = 0  # refreshes so far: a waiter whose refresh someone else made
        self._seen: set[str] = set()  # every token handed out, for redaction
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None

    @property
    def present(self) -> bool:
        return True  # a token is fetched on first use

    @property
    def refreshes(self) -> int:
        return self._generation

    async def settle(self) -> None:
        """Wait for an early refresh in flight, if any (its failure was logged already)."""
        if self._background is not None:
            await asyncio.gather(self._background, return_exceptions=True)

    async def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {await self._current()}"}

    def secrets(self) -> tuple[str, ...]:
        return tuple(self._seen)

    async def close(self) -> None:
        if self._background is not None:
            self._background.cancel()
            await asyncio.gather(self._background, return_exceptions=True)

    def __repr__(self) -> str:
        return f"TokenAuth(refreshes={self._generation})"

    async def _current(self) -> str:
        left = self._expires - self._clock()
        if self.__token is None or left <= self._margin:
            await self._refresh(self._generation)
        elif left <= 2 * self._margin and self._background is None:
            self._background = asyncio.create_task(self._in_background(self._generation))
        assert self.__token is not None  # set by the refresh, or it raised
        return self.__token

    async def _in_background(self, generation: int) -> None:
        """An early refresh; a failure is logged (the next request retries it in the open)."""
        try:
            await self._refresh(generation)
        except GeminiError as exc:
            log.warning("refreshing the access token early failed, retried when due: %s", exc)
        finally:
            self._background = None

    async def _refresh(self, generation: int) -> None:
        """A fresh token, unless another caller fetched one since `generation` was read."""
        async with self._lock:
            if generation != self._generation:
                return
            token, lifetime = await self._fetched()
            self.__token, self._expires = token, self._clock() + lifetime
            self._seen.add(token)
            self._generation += 1

    async def _fetched(self) -> tuple[str, float]:
        try:
            token, lifetime = await asyncio.to_thread(self._fetch)
            check_key(token, "the access token")
        # Broad on purpose: google-auth raises RefreshError, TransportError, DefaultCredentials-
        # Error, and its transport's requests exceptions; each is a token not had, the same kind.
        except Exception as exc:
            failure = self._failed(exc)
        else:
            return token, lifetime
        raise failure  # outside the except blocks: no chained library exception

    def _failed(self, exc: BaseException) -> GeminiError:
        message = str(exc)
        for secret in self._seen:
            message = message.replace(secret, REDACTED)
        return GeminiError(
            401,
            "UNAUTHENTICATED",
            f"fetching an access token failed: {type(exc).__name__}: {message}",
            kind="auth",
        )
