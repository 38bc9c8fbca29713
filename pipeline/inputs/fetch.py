"""The bytes of inputs that are not local files: objects (through fsspec) and http(s) URLs.

One `Fetcher` per run, with its own event loop in a thread (as fsspec keeps one for its own IO),
so the engine's workers (`read`) and the walking thread (`resolve`) both use the same aiohttp
session and the same bounds:

- at most `concurrency` reads at once, and for URLs at most `per_host` connections to one host;
  a host that answers 429 or 503 with `Retry-After` is left alone for that long, by every read;
- a cap on the bytes of one input (`max_bytes`): the declared size is checked first (a listing's
  size, a Content-Length), then the body while it streams, so a huge file never fills memory;
- retries, with jittered exponential backoff, of what is transient: HTTP 408, 429 and 5xx
  (honouring `Retry-After` up to `max_retry_after`; S3's 503 SlowDown among them), timeouts and
  dropped connections; for other stores' objects, transient store errors (gcsfs and adlfs retry
  their own first; Ray Data's `retried_io_errors` in spirit). 404, 403 and the like fail at once;
- S3 objects are read with a presigned GET (`_read_presigned`: a quarter of botocore's CPU);
- redirects are followed for the image (up to 10, one hop at a time), and the session never
  holds the API key: it is another session than the Gemini client's, with no credentials at all;
- a URL never reaches loopback, link-local (the cloud metadata service), private, unique-local,
  multicast or reserved addresses, after DNS and on every hop, unless its host is in
  `[input] allow_hosts` (`guard.py`); a redirect is never followed to `file://` or another scheme;
- `X-Robots-Tag: noai` / `noimageai` refuse the image, as img2dataset does by default;
- `prefetch` reads the files the engine has dealt but no worker has taken yet, up to
  `ahead_bytes`, so the store's latency overlaps the API calls in flight.

A failure is a `FetchError` whose text becomes the row's error ("HTTP 404 Not Found"), never an
exception that stops the run. `resolve` asks a URL's size and version with a HEAD (an object's
with a stat) so that a rerun skips what is done without downloading it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

import aiohttp

from pipeline import __version__, locations
from pipeline.inputs.guard import AddressGuard, RefusedAddress
from pipeline.inputs.source import version_stamp
from pipeline.output import stores
from pipeline.records import SourceFile

T = TypeVar("T")
USER_AGENT = f"gemini-vision-pipeline/{__version__}"
DISALLOWED_ROBOTS = ("noai", "noimageai")  # img2dataset's default refusals that concern AI use
_CHUNK = 1 << 16
MAX_HOPS = 10  # redirects followed at most (aiohttp's and browsers' order of magnitude)
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


class FetchError(Exception):
    """An input that could not be read; the message is the row's error. `retryable`: the
    failure was transient (retries ran out on 429, 5xx, timeouts), so the next plain run tries
    the input again, as it does for a transient API error."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class FetchSettings:
    concurrency: int = 32
    per_host: int = 4
    max_bytes: int = 64 << 20
    attempts: int = 4
    timeout: float = 60.0
    max_retry_after: float = 60.0
    backoff: float = 0.5  # seconds before the first retry (doubled, jittered, each time)
    ahead_bytes: int = 128 << 20  # bytes read ahead of the workers at most (`prefetch`)
    allow_hosts: tuple[str, ...] = ()  # URL hosts reached even on internal addresses


class Fetcher:
    """Reads objects and URLs for one run (see the module docstring). Use as a context manager
    or call `close()`."""

    def __init__(
        self,
        settings: FetchSettings | None = None,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
    ) -> None:
        self.settings = settings or FetchSettings()
        self.fetched = 0
        self.retries = 0
        self._sleep = sleep
        self._clock = clock
        self._rng = random.Random(seed)
        self._paused_until: dict[str, float] = {}
        self._guard = AddressGuard(self.settings.allow_hosts)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="gvp-fetch", daemon=True
        )
        self._thread.start()
        self._gate: asyncio.Semaphore = self._call(self._make_gate()).result()
        self._session: aiohttp.ClientSession | None = None
        self._object_session: aiohttp.ClientSession | None = None
        self._ahead: dict[str, tuple[Future[bytes], int]] = {}  # path -> (read, its bytes)
        self._ahead_bytes = 0

    async def _make_gate(self) -> asyncio.Semaphore:
        return asyncio.Semaphore(self.settings.concurrency)

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._loop.is_running():
            return
        for future, _ in self._ahead.values():
            future.cancel()  # read ahead for files the run did not get to
        self._ahead.clear()
        self._call(self._close_session()).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def _close_session(self) -> None:
        for session in (self._session, self._object_session):
            if session is not None:
                await session.close()

    # ------------------------------------------------------------------------------- reads
    def prefetch(self, src: SourceFile) -> None:
        """Start reading `src` now, for a worker that will ask for it soon (the engine deals
        files to workers through a queue): the store's latency then overlaps the calls in
        flight instead of adding to each image's. Only inputs of known size, within
        `ahead_bytes` in all; call from the thread that later calls `read`."""
        size = src.size
        if src.error or not locations.is_url(src.path) or src.path in self._ahead:
            return
        if size <= 0 or size > self.settings.max_bytes:
            return
        if self._ahead_bytes + size > self.settings.ahead_bytes:
            return
        self._ahead_bytes += size
        self._ahead[src.path] = (self._call(self._read(src)), size)

    async def read(self, src: SourceFile) -> bytes:
        """The bytes of an object or a URL (from any event loop). Fills in `src.size` and, for
        a URL, `src.mtime_ns` (its version stamp) from what was read. Raises FetchError."""
        ahead = self._ahead.pop(src.path, None)
        if ahead is None:
            return await asyncio.wrap_future(self._call(self._read(src)))
        future, size = ahead
        try:
            return await asyncio.wrap_future(future)
        finally:
            self._ahead_bytes -= size

    def read_all(self, sources: list[SourceFile]) -> list[bytes | FetchError]:
        """From synchronous code (`estimate`): these inputs read concurrently within the
        fetcher's bounds, in order; each one's bytes, or the FetchError it ended with."""

        async def one(src: SourceFile) -> bytes | FetchError:
            try:
                return await self._read(src)
            except FetchError as exc:
                return exc

        return self.gather([one(src) for src in sources])

    def gather(self, coroutines: list[Coroutine[Any, Any, T]]) -> list[T]:
        """From synchronous code: these coroutines run together on the fetcher's loop (their
        reads within its bounds); their results, in order."""

        async def every() -> list[T]:
            return list(await asyncio.gather(*coroutines))

        return self._call(every()).result()

    async def _read(self, src: SourceFile) -> bytes:
        async with self._gate:
            if locations.is_http_url(src.path):
                return await self._get(src)
            return await self._read_object(src)

    async def _read_object(self, src: SourceFile) -> bytes:
        if src.size > self.settings.max_bytes:
            raise FetchError(self._too_big(src.size))
        scheme = locations.scheme_of(src.path) or ""
        fs = stores.filesystem(scheme)
        if scheme == "s3":
            return await self._read_presigned(fs, src)
        data = await self._object_bytes(fs, src)
        if len(data) > self.settings.max_bytes:
            raise FetchError(self._too_big(len(data)))
        src.size = len(data)
        self.fetched += 1
        return data

    async def read_range(self, src: SourceFile, start: int, end: int) -> bytes:
        """Bytes [start, end) of an object (from any event loop): one ranged GET, retried as a
        whole read is, what an object sent in place is measured from without downloading it
        (its head, a PNG's tail: pipeline/inputs/in_place.py). Raises FetchError."""
        return await asyncio.wrap_future(self._call(self._read_range(src, start, end)))

    async def _read_range(self, src: SourceFile, start: int, end: int) -> bytes:
        async with self._gate:
            fs = stores.filesystem(locations.scheme_of(src.path) or "")
            return await self._object_bytes(fs, src, start=start, end=end)

    async def _object_bytes(self, fs: Any, src: SourceFile, **span: int) -> bytes:
        """The object's bytes (`span`: fsspec's `start` and `end`, a range of them), transient
        store errors retried with backoff."""
        try:
            return await stores.retried(
                lambda: _run_fs(fs, "cat_file", src.path, **span),
                self.settings.attempts,
                self._backoff,
                self._sleep,
                on_retry=self._count_retry,
            )
        except FileNotFoundError:
            raise FetchError("object not found (deleted since it was listed?)") from None
        except PermissionError as exc:
            raise FetchError(f"access denied: {_first_line(exc)}") from None
        except Exception as exc:
            transient = stores.transient(exc)
            if transient is None:  # neither an I/O error nor a store's refusal: a defect
                raise
            reason = f"object read failed: {stores.timeout_text(exc) or _first_line(exc)}"
            raise FetchError(reason, retryable=transient) from None

    def _count_retry(self, exc: BaseException) -> None:
        self.retries += 1

    async def _read_presigned(self, fs: Any, src: SourceFile) -> bytes:
        """An S3 object through a presigned GET URL on this fetcher's own object session.

        botocore costs ~4.5 ms of CPU per GET (signing, its HTTP stack, parsing), a presigned
        URL plus a plain aiohttp GET ~1.2 ms (measured on the local S3; the bucket run is
        CPU-bound on two cores). The URL carries a signature, never the secret; it is used at
        once and never logged (errors name the status only). No per-host bound: every object
        of a bucket is on one host."""
        url = await _run_fs(fs, "url", src.path)
        return await self._get(src, url=url, session=self._objects(), version=False)

    async def _get(
        self,
        src: SourceFile,
        *,
        url: str = "",
        session: aiohttp.ClientSession | None = None,
        version: bool = True,
    ) -> bytes:
        """GET with retries; `url`/`session`: a presigned object read (see _read_presigned);
        `version`: take the version stamp from the answer (URLs; an object's is its listing's)."""
        url = url or src.path
        host = urlsplit(url).hostname or ""
        reason = "no attempt made"
        for attempt in range(self.settings.attempts):
            if attempt:
                self.retries += 1
            await self._wait_for_host(host)
            try:
                outcome = await self._get_once(src, url, session, version)
            except (TimeoutError, aiohttp.ClientError) as exc:
                # A presigned URL must not end up in a row: name the failure only.
                shown = type(exc).__name__ if url != src.path else _first_line(exc)
                reason = f"fetch failed: {shown or type(exc).__name__}"
                if attempt + 1 < self.settings.attempts:
                    await self._sleep(self._backoff(attempt))
                continue
            if isinstance(outcome, bytes):
                self.fetched += 1
                return outcome
            reason, asked = outcome
            delay = asked if asked is not None else self._backoff(attempt)
            if delay > self.settings.max_retry_after:
                raise FetchError(
                    f"{reason} (Retry-After {delay:.0f} s is longer than the "
                    f"{self.settings.max_retry_after:.0f} s a fetch waits)",
                    retryable=True,
                )
            self._pause(host, delay)  # the next attempt, and every other read of host, waits
        raise FetchError(f"{reason} (after {self.settings.attempts} attempts)", retryable=True)

    async def _get_once(
        self, src: SourceFile, url: str, session: aiohttp.ClientSession | None, version: bool
    ) -> bytes | tuple[str, float | None]:
        """The body, or (reason, Retry-After) for a retryable answer; raises FetchError
        otherwise. `session` None: the guarded image session."""
        async with self._follow("GET", url, session) as response:
            reason = stores.status_text(response.status)
            if response.status in stores.RETRY_STATUSES:
                return reason, _retry_after(response)
            if response.status != 200:
                raise FetchError(reason)
            _check_robots(response)
            declared = response.content_length
            if declared is not None and declared > self.settings.max_bytes:
                raise FetchError(self._too_big(declared))
            body = await self._body(response)
            src.size = declared if declared is not None else len(body)
            if version:
                src.mtime_ns = version_stamp(_url_version(response.headers))
            return body

    @contextlib.asynccontextmanager
    async def _follow(
        self, method: str, url: str, session: aiohttp.ClientSession | None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The answer to `method url` after its redirects. A presigned object read (`session`
        given: the user's own store endpoint) lets aiohttp follow them; a URL's are followed
        here one hop at a time, each checked by the guard before it is asked."""
        if session is not None:
            async with session.request(method, url, max_redirects=MAX_HOPS) as response:
                yield response
            return
        for hop in range(MAX_HOPS + 1):
            async with self._guarded_request(method, url, hop) as response:
                location = response.headers.get("Location", "")
                if response.status not in REDIRECT_STATUSES or not location:
                    yield response
                    return
            url = urljoin(url, location)
        raise FetchError(f"too many redirects (more than {MAX_HOPS})")

    @contextlib.asynccontextmanager
    async def _guarded_request(
        self, method: str, url: str, hop: int
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One hop on the image session; a refused address is a FetchError, never retried."""
        try:
            self._guard.check_url(url, hop=hop)
            async with self._http().request(method, url, allow_redirects=False) as response:
                yield response
        except RefusedAddress as exc:
            raise FetchError(str(exc)) from None
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, RefusedAddress):  # raised by the guarded resolver
                raise FetchError(str(exc.os_error)) from None
            raise

    async def _body(self, response: aiohttp.ClientResponse) -> bytes:
        chunks, total = [], 0
        async for chunk in response.content.iter_chunked(_CHUNK):
            total += len(chunk)
            if total > self.settings.max_bytes:
                raise FetchError(self._too_big(total, streamed=True))
            chunks.append(chunk)
        return b"".join(chunks)

    def _http(self) -> aiohttp.ClientSession:
        """The image session: no API key, no credentials, its own connection bounds."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self.settings.concurrency,
                    limit_per_host=self.settings.per_host,
                    resolver=self._guard.resolver(),  # connects only to checked addresses
                ),
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout),
                headers={"User-Agent": USER_AGENT},
            )
        return self._session

    def _objects(self) -> aiohttp.ClientSession:
        """The session for presigned object reads: the fetcher's bound, no per-host bound."""
        if self._object_session is None:
            self._object_session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.settings.concurrency),
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout),
                headers={"User-Agent": USER_AGENT},
            )
        return self._object_session

    # ------------------------------------------------------------------------ politeness
    def _pause(self, host: str, delay: float) -> None:
        """Every read of `host` waits `delay` (it asked for it, or it is failing)."""
        until = self._clock() + delay
        self._paused_until[host] = max(self._paused_until.get(host, 0.0), until)

    async def _wait_for_host(self, host: str) -> None:
        left = self._paused_until.get(host, 0.0) - self._clock()
        if left > 0:
            await self._sleep(left)

    def _backoff(self, attempt: int) -> float:
        """Full jitter: a random wait up to backoff * 2**attempt."""
        return self._rng.uniform(0, self.settings.backoff * 2**attempt)

    def _too_big(self, size: int, *, streamed: bool = False) -> str:
        cap = self.settings.max_bytes / (1 << 20)
        got = "more than" if streamed else f"{size / (1 << 20):.1f} MB,"
        return f"input too large: {got} the cap of {cap:.3g} MB ([input] max_fetch_mb)"

    # --------------------------------------------------------------------------- resolve
    def resolve(self, sources: list[SourceFile]) -> None:
        """Fill in size and version of manifest URLs (HEAD) and objects (stat), concurrently,
        from a thread that is not the fetcher's. What cannot be asked stays unknown (0): such a
        file is read, not skipped."""
        self._call(self._resolve_all(sources)).result()

    async def _resolve_all(self, sources: list[SourceFile]) -> None:
        await asyncio.gather(*(self._resolve(src) for src in sources))

    async def _resolve(self, src: SourceFile) -> None:
        async with self._gate:
            try:
                if locations.is_http_url(src.path):
                    await self._head(src)
                else:
                    await self._stat(src)
            except FetchError as exc:
                src.error = str(exc)
            except (TimeoutError, aiohttp.ClientError, OSError):
                return  # unknown: the read will say what is wrong

    async def _head(self, src: SourceFile) -> None:
        host = urlsplit(src.path).hostname or ""
        await self._wait_for_host(host)
        async with self._follow("HEAD", src.path, None) as answer:
            if answer.status != 200:
                return
            src.size = answer.content_length or 0
            src.mtime_ns = version_stamp(_url_version(answer.headers))

    async def _stat(self, src: SourceFile) -> None:
        fs = stores.filesystem(locations.scheme_of(src.path) or "")
        try:
            info = await _run_fs(fs, "info", src.path)
        except FileNotFoundError:
            raise FetchError("no such object") from None
        src.size = int(info.get("size") or 0)
        src.mtime_ns = version_stamp(stores.object_version(info))
        src.content_id = stores.content_id(info)


async def _run_fs(fs: Any, method: str, path: str, **options: Any) -> Any:
    """An fsspec call from this loop: async filesystems run it on fsspec's own IO loop (their
    sessions live there), others in a thread."""
    if getattr(fs, "async_impl", False):
        coroutine = getattr(fs, "_" + method)(path, **options)
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, fs.loop))
    return await asyncio.to_thread(getattr(fs, method), path, **options)


def _url_version(headers: Any) -> str:
    """What identifies a URL's content without its bytes: ETag, else Last-Modified."""
    return headers.get("ETag") or headers.get("Last-Modified") or ""


def _retry_after(response: aiohttp.ClientResponse) -> float | None:
    """Seconds the server asks to wait: `Retry-After` as seconds or as an HTTP date."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _check_robots(response: aiohttp.ClientResponse) -> None:
    for value in response.headers.getall("X-Robots-Tag", []):
        directives = {part.strip().lower() for part in value.replace(";", ",").split(",")}
        refused = sorted(directives & set(DISALLOWED_ROBOTS))
        if refused:
            raise FetchError(f"X-Robots-Tag: {refused[0]} (the site asks not to use it for AI)")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


def settings_from(config: Any) -> FetchSettings:
    """The fetch settings of a run's `[input]` section."""
    inp = config.input
    return FetchSettings(
        concurrency=inp.fetch_concurrency,
        per_host=inp.fetch_per_host,
        max_bytes=int(inp.max_fetch_mb * (1 << 20)),
        allow_hosts=inp.allow_hosts,
    )
