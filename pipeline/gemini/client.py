"""Async REST client for the Gemini API: generateContent, Interactions, the Files API, Batch
Mode (`client.batches`, pipeline/gemini/batches.py), context caches (`client.caches`,
pipeline/gemini/caches.py) and models.get / models.list
(pipeline/gemini/model_info.py).

Protocol only: it knows requests and answers, not the pipeline. The client does not retry; it
raises `GeminiError` whose `kind` (and `retryable`, `retry_delay`) feed the caller's own policy.
The one exception is the SDK's behaviour on upload chunks whose answer lacks
`X-Goog-Upload-Status`: those are re-sent a bounded number of times, as the official SDK does.

An answer the service cut at its per-request decode limit is not a retry: it is continued, as
the SDK does by default for both APIs, until it is whole; the raw answer then holds every hop
(wire.py). How the key is kept home is in transport.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any

from pipeline.gemini import content, interactions
from pipeline.gemini.auth import ApiKeyError, Auth, TokenAuth, check_key
from pipeline.gemini.backends import Backend, Developer, Vertex
from pipeline.gemini.batches import Batches
from pipeline.gemini.caches import Caches
from pipeline.gemini.content import build_generate_content_body, parse_generate_content
from pipeline.gemini.errors import RETRYABLE_HTTP_CODES, GeminiError
from pipeline.gemini.files import (
    DEFAULT_CHUNK_SIZE,
    chunk_size_for,
    file_id,
    granularity,
    parse_file_info,
    parse_file_page,
    parse_json_object,
    parse_upload_answer,
    read_chunks,
    source_size,
)
from pipeline.gemini.interactions import build_interaction_body, parse_interaction
from pipeline.gemini.model_info import (
    DEFAULT_PAGE_SIZE,
    ModelInfo,
    parse_model_page,
    parse_model_text,
)
from pipeline.gemini.transport import MAX_RESPONSE_BYTES, Answer, Transport, check_url
from pipeline.gemini.types import (
    DEFAULT_BASE_URL,
    FileInfo,
    Flavor,
    GenerateRequest,
    GenerateResponse,
)
from pipeline.gemini.vertex_batches import VertexBatches
from pipeline.gemini.wire import Continuation, join_hops, split_hops

# Pauses before re-sending an upload chunk whose answer lacked X-Goog-Upload-Status
# (the SDK: 3 attempts, 1 s then 2 s).
UPLOAD_RESEND_DELAYS = (1.0, 2.0)
# The SDK bounds a continued call only by its deadline and by a hop handing back the token it
# was sent with. Each hop re-sends (and bills) the whole input plus the output so far, so this
# client also stops after this many hops and returns the answer as it stands (CONTINUATION).
MAX_HOPS = 16

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BASE_URL",
    "ApiKeyError",
    "GeminiClient",
    "api_key_from_env",
    "build_generate_content_body",
    "parse_generate_content",
    "parse_response",
]


def api_key_from_env() -> str | None:
    """GOOGLE_API_KEY, else GEMINI_API_KEY; None when neither is set.

    The SDK's `get_env_api_key` (`_api_client.py`): GOOGLE_API_KEY wins, with a warning when
    both are set (here logged once per process, not on every call).

    Whitespace around the key is removed with a warning naming the variable (never the key): a
    key.env saved with CRLF line ends, sourced by the README's cron recipe, gave the key a
    trailing CR and every run failed with exit 1. A key with whitespace or control characters
    inside, or too short to redact, raises ApiKeyError (`check_key`).
    """
    google, gemini = os.environ.get("GOOGLE_API_KEY"), os.environ.get("GEMINI_API_KEY")
    if google and gemini:
        _warn_both_keys_set()
    name = "GOOGLE_API_KEY" if google else "GEMINI_API_KEY"
    key = google or gemini or None
    if key is None:
        return None
    stripped = key.strip()
    if stripped != key:
        _warn_stripped(name)
    check_key(stripped, name)
    return stripped


@functools.cache
def _warn_stripped(name: str) -> None:
    log.warning(
        "%s has whitespace (a line end?) around the key: removed, the key is used without it; "
        "save the file that sets it with LF line ends",
        name,
    )


@functools.cache
def _warn_both_keys_set() -> None:
    log.warning("Both GOOGLE_API_KEY and GEMINI_API_KEY are set. Using GOOGLE_API_KEY.")


def parse_response(body: str) -> GenerateResponse:
    """Read a stored raw answer of either flavour (one body or a continued answer's array).

    An Interaction always carries `status` (and `steps`, or the legacy `outputs`); a
    GenerateContentResponse has none of them.
    """
    document = json.loads(body)
    first = document[0] if isinstance(document, list) and document else document
    if isinstance(first, dict) and ({"steps", "status", "outputs"} & first.keys()):
        return parse_interaction(body)
    return parse_generate_content(body)


class GeminiClient:
    """Async client for one Gemini endpoint; use as `async with GeminiClient(...) as client`.

    `timeout` is each request's deadline in seconds. `base_url` must be https, or http to a
    loopback host, unless `allow_insecure_http`. `max_hops` bounds a continued answer.
    `backend` (backends.py: Vertex AI) replaces `base_url` and `version`, and `auth` (auth.py:
    a Vertex access token) the API key; by default the Developer API with the key.
    """

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str = DEFAULT_BASE_URL,
        version: str = "v1beta",
        max_connections: int = 64,
        timeout: float = 120.0,
        allow_insecure_http: bool = False,
        max_hops: int = MAX_HOPS,
        max_response_bytes: int | None = MAX_RESPONSE_BYTES,
        backend: Backend | None = None,
        auth: Auth | None = None,
    ) -> None:
        backend = backend or Developer(base_url.rstrip("/"), version.strip("/"))
        check_url(backend.base_url, allow_insecure_http=allow_insecure_http)
        if max_hops < 1:
            raise ValueError(f"max_hops must be >= 1, got {max_hops}")
        key = None if auth is not None else api_key if api_key is not None else api_key_from_env()
        self._transport = Transport(
            key,
            auth=auth,
            max_connections=max_connections,
            timeout=timeout,
            max_response_bytes=max_response_bytes,
        )
        self.backend = backend
        self.base_url = backend.base_url.rstrip("/")
        self.version = backend.version.strip("/")
        self.allow_insecure_http = allow_insecure_http
        self.max_hops = max_hops

    @property
    def max_connections(self) -> int:
        return self._transport.max_connections

    @property
    def timeout(self) -> float:
        return self._transport.timeout

    @property
    def bearer(self) -> bool:
        """Whether requests carry an OAuth2 access token (Vertex's ADC), not an API key."""
        return isinstance(self._transport.auth, TokenAuth)

    async def authenticate(self) -> None:
        """Have the credential now: a token is fetched (an API key is at hand), so that one
        that cannot be had fails here, before any work (a Ray worker's start). GeminiError
        (kind "auth") when the fetch fails; its message holds no secret (auth.TokenAuth)."""
        await self._transport.auth.headers()

    @property
    def batches(self) -> Batches:
        """Batch Mode jobs over this client's connection and key (the SDK's `client.batches`)."""
        return Batches(self._transport, self.base_url, self.version)

    @property
    def batch_predictions(self) -> VertexBatches:
        """Vertex AI batch prediction jobs over this client's connection and token (the SDK's
        `client.batches` with `vertexai=True`); ValueError on the Developer API, or without a
        project (express mode)."""
        if not isinstance(self.backend, Vertex):
            raise ValueError('batch prediction jobs are Vertex AI\'s (backend = "vertex")')
        return VertexBatches(self._transport, self.backend)

    @property
    def caches(self) -> Caches:
        """Explicit context caches over this client's connection and key (`client.caches`)."""
        return Caches(self._transport, self.base_url, self.version)

    def __repr__(self) -> str:
        key = "set" if self._transport.has_key else "missing"
        return (
            f"GeminiClient(backend={self.backend.name}, base_url={self.base_url!r}, "
            f"version={self.version!r}, "
            f"max_connections={self.max_connections}, api_key={key})"
        )

    async def __aenter__(self) -> GeminiClient:
        self._transport.session()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._transport.close()

    # ------------------------------------------------------------------------------- generate

    async def generate(
        self,
        request: GenerateRequest,
        *,
        flavor: Flavor = "generateContent",
        timeout: float | None = None,
        resume_from: GenerateResponse | None = None,
        hops: list[str] | None = None,
    ) -> GenerateResponse:
        """Run `request` through the chosen API; the answer has the same shape either way.

        `hops`, when given, receives each answered hop's body as it comes (after those of
        `resume_from`): a caller that cancels the call keeps what was paid for (`answer_of`),
        as `.partial` keeps it for a call that failed."""
        if flavor == "generateContent":
            return await self.generate_content(
                request, timeout=timeout, resume_from=resume_from, hops=hops
            )
        if flavor == "interactions":
            return await self.interact(request, timeout=timeout, resume_from=resume_from, hops=hops)
        raise ValueError(f"unknown flavor {flavor!r}")

    def answer_of(self, hops: list[str], flavor: Flavor) -> GenerateResponse:
        """The answer the hops handed to `generate(hops=...)` make, as `.partial` would hold it."""
        rules = content.CONTINUATION if flavor == "generateContent" else interactions.CONTINUATION
        return self._parsed(join_hops(hops), rules, flavor)

    async def generate_content(
        self,
        request: GenerateRequest,
        *,
        timeout: float | None = None,
        resume_from: GenerateResponse | None = None,
        hops: list[str] | None = None,
    ) -> GenerateResponse:
        """One generateContent answer, continued to the end (see `_continued`)."""
        model = request.model.removeprefix("models/")
        return await self._continued(
            self.backend.model_url(model, "generateContent"),
            build_generate_content_body(request),
            content.CONTINUATION,
            timeout=timeout,
            what=f"{model}:generateContent",
            resume_from=resume_from,
            hops=hops,
            headers=self.backend.generate_headers,  # Vertex's request type: this call's alone
        )

    async def interact(
        self,
        request: GenerateRequest,
        *,
        timeout: float | None = None,
        resume_from: GenerateResponse | None = None,
        hops: list[str] | None = None,
    ) -> GenerateResponse:
        """One Interactions answer (`store: false`), continued to the end (see `_continued`).

        ValueError for a request with a thinking budget (Interactions has thinking_level only),
        or on a backend without Interactions (Vertex AI).
        """
        if not self.backend.interactions:
            raise ValueError(
                f"the Interactions API is not served by the {self.backend.name} backend"
            )
        return await self._continued(
            f"{self.base_url}/{self.version}/interactions",
            build_interaction_body(request),
            interactions.CONTINUATION,
            timeout=timeout,
            what="interactions",
            resume_from=resume_from,
            hops=hops,
        )

    async def _continued(
        self,
        url: str,
        body: dict[str, Any],
        rules: Continuation,
        *,
        timeout: float | None,
        what: str,
        resume_from: GenerateResponse | None,
        hops: list[str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> GenerateResponse:
        """Send `body` (with `headers` besides auth), then continue the answer hop by hop while
        the service asks for it.

        Follows the SDK's `continue_async_unary_interaction` (`_interactions_continuation.py`)
        with its `CallDeadline`: a per-call `timeout` bounds the whole call, every hop is sent
        with the time left and none starts once it has passed; without one, each hop gets the
        client's timeout. Hops stop when the service no longer asks, when a hop hands back the
        token it was sent with (the SDK's only bound besides the deadline), or at `max_hops`
        (ours). A failure after answered hops raises the error with `.partial` set (the SDK's
        `ContinuationInterruptedError`), so paid hops are never lost: pass it back as
        `resume_from` to continue from its last token instead of buying them again.
        """
        clock = asyncio.get_running_loop().time
        deadline = None if timeout is None else clock() + timeout
        hops = [] if hops is None else hops  # the caller's, when it keeps them (`generate`)
        hops += split_hops(resume_from.raw) if resume_from is not None else []
        last = json.loads(hops[-1]) if hops else None
        sent: str | None = None
        while True:
            token = rules.token(last, sent) if last is not None else None
            if hops and (token is None or len(hops) >= self.max_hops):
                return self._parsed(join_hops(hops), rules, what)
            hop_body = rules.body(body, token) if token else body
            limit = self.timeout if deadline is None else deadline - clock()
            try:
                text, last = await self._hop(url, hop_body, limit, what, headers)
            except GeminiError as exc:
                if not hops:
                    raise
                partial = self._parsed(join_hops(hops), rules, what)
                failure = exc.with_partial(partial, len(hops))
            else:
                hops.append(text)
                sent = token
                continue
            raise failure  # outside the except block: no chained context

    def _parsed(self, body: str, rules: Continuation, what: str) -> GenerateResponse:
        """The answer parsed as received, then the key removed from what of it is kept."""
        return self._transport.stored(self._transport.parse_value(body, rules.parse, what))

    async def _hop(
        self,
        url: str,
        body: dict[str, Any],
        limit: float,
        what: str,
        headers: Mapping[str, str] | None,
    ) -> tuple[str, dict[str, Any]]:
        """One request of a (possibly continued) answer: its body as text and as JSON."""
        answer = await self._transport.send(
            "POST", url, json_body=body, timeout=limit, what=what, headers=headers
        )
        document = self._transport.parse(answer, parse_json_object, what)
        return answer.text, document

    # --------------------------------------------------------------------------------- models

    async def get_model(self, model: str, *, timeout: float | None = None) -> ModelInfo:
        """models.get: `GET {base}/{version}/models/{model}` (the SDK's `models.get`). A model
        the service does not serve is a GeminiError of kind not_found (404); ValueError for an
        id that would change the URL's path or query (the SDK's `t_model`)."""
        url = self.backend.model_resource_url(model)
        what = f"get {url.removeprefix(self.base_url + '/')}"
        answer = await self._transport.send("GET", url, timeout=timeout, what=what)
        return self._transport.parse(answer, parse_model_text, what)

    async def count_tokens(self, request: GenerateRequest, *, timeout: float | None = None) -> int:
        """countTokens of the request's contents and system instruction: the service's count
        of its input (`totalTokens`), in the body shape of the backend."""
        model = request.model.removeprefix("models/")
        body = build_generate_content_body(request)
        wanted: dict[str, Any] = {
            k: body[k] for k in ("contents", "systemInstruction") if k in body
        }
        counted = self.backend.count_tokens_body(model, wanted)
        what = f"{model}:countTokens"
        answer = await self._transport.send(
            "POST",
            self.backend.model_url(model, "countTokens"),
            json_body=counted,
            timeout=timeout,
            what=what,
        )
        document = self._transport.parse(answer, parse_json_object, what)
        return int(document.get("totalTokens", 0))

    async def list_models(self, *, page_size: int = DEFAULT_PAGE_SIZE) -> list[ModelInfo]:
        """models.list: every model the service lists, following nextPageToken (the SDK's
        `models.list` pager over `models`, its `query_base` default)."""
        url = f"{self.base_url}/{self.version}/models"
        return await self._transport.pages(url, parse_model_page, "list models", page_size)

    # ------------------------------------------------------------------------------ Files API

    async def upload_file(
        self,
        source: str | os.PathLike[str] | bytes,
        mime_type: str,
        *,
        display_name: str | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> FileInfo:
        """Resumable upload: start, then the bytes from disk in chunks, the last one finalizing.

        `chunk_size` is rounded down to the granularity the start answer announces.
        """
        size = await source_size(source)
        upload_url, granule = await self._start_upload(size, mime_type, display_name)
        step = chunk_size_for(chunk_size, granule)
        async with contextlib.aclosing(read_chunks(source, step)) as chunks:
            answer = await self._send_chunks(upload_url, chunks, size)
        return self._transport.parse(answer, parse_upload_answer, "upload finalize")

    async def _start_upload(
        self, size: int, mime_type: str, display_name: str | None
    ) -> tuple[str, int | None]:
        """The upload URL and chunk granularity the start answer gives."""
        if not self.backend.files_api:
            raise ValueError(
                f"the Files API is not served by the {self.backend.name} backend: send images "
                "inline, or as gs:// objects read in place"
            )
        start = await self._transport.send(
            "POST",
            f"{self.base_url}/upload/{self.version}/files",
            json_body={"file": {"display_name": display_name}} if display_name else {"file": {}},
            headers={
                "X-Goog-Upload-Protocol": "resumable",
                "X-Goog-Upload-Command": "start",
                "X-Goog-Upload-Header-Content-Length": str(size),
                "X-Goog-Upload-Header-Content-Type": mime_type,
            },
            what="upload start",
        )
        if start.status >= 400:
            raise self._transport.error(start)
        upload_url = start.headers.get("X-Goog-Upload-URL")
        if not upload_url:
            raise GeminiError(
                start.status,
                "UNKNOWN",
                "upload start answered without X-Goog-Upload-URL",
                kind="data_loss",
            )
        try:
            check_url(upload_url, allow_insecure_http=self.allow_insecure_http)
        except ValueError as exc:  # the service sends the bytes elsewhere: as off a redirect
            refused = GeminiError(start.status, "REDIRECT", f"upload URL: {exc}", kind="redirect")
        else:
            return upload_url, granularity(start.headers)
        raise refused

    async def _send_chunks(
        self, upload_url: str, chunks: AsyncIterator[bytes], size: int
    ) -> Answer:
        """Send every chunk (an empty file still sends its finalize); the finalize answer."""
        offset = 0
        while True:
            chunk = await anext(chunks, b"")
            command = "upload, finalize" if offset + len(chunk) >= size else "upload"
            answer = await self._send_chunk(upload_url, chunk, offset, command)
            if answer.status >= 400:
                raise self._transport.error(answer)  # even when the session stays "active"
            offset += len(chunk)
            upload_status = answer.headers.get("X-Goog-Upload-Status")
            if upload_status == "final":
                return answer
            if upload_status != "active" or offset >= size:
                raise GeminiError(
                    answer.status,
                    "UNKNOWN",
                    f"upload at {offset} of {size} bytes: X-Goog-Upload-Status {upload_status!r}",
                    kind="data_loss",
                )

    async def _send_chunk(self, upload_url: str, chunk: bytes, offset: int, command: str) -> Answer:
        """POST one chunk to the upload URL (no API key); re-sent while its answer has no status."""
        headers = {"X-Goog-Upload-Command": command, "X-Goog-Upload-Offset": str(offset)}
        what = f"upload chunk at offset {offset}"  # never the URL: it is a credential too
        delays = iter(UPLOAD_RESEND_DELAYS)
        while True:
            answer = await self._transport.send(
                "POST", upload_url, data=chunk, headers=headers, with_key=False, what=what
            )
            if answer.headers.get("X-Goog-Upload-Status"):
                return answer
            permanent = answer.status >= 400 and answer.status not in RETRYABLE_HTTP_CODES
            delay = next(delays, None)
            if permanent or delay is None:
                return answer
            log.warning("%s: answer without X-Goog-Upload-Status, re-sending in %gs", what, delay)
            await asyncio.sleep(delay)

    async def get_file(self, name: str) -> FileInfo:
        resource = await self._file_resource(name)
        return self._transport.parse_value(resource, parse_file_info, "get file")

    async def list_files(self, *, page_size: int = 100) -> list[FileInfo]:
        """Every file of the project, following nextPageToken."""
        url = f"{self.base_url}/{self.version}/files"
        return await self._transport.pages(url, parse_file_page, "list files", page_size)

    async def delete_file(self, name: str) -> None:
        answer = await self._transport.send(
            "DELETE",
            f"{self.base_url}/{self.version}/files/{file_id(name)}",
            what=f"delete files/{file_id(name)}",
        )
        if answer.status >= 400:
            raise self._transport.error(answer)

    async def download_file(self, name: str, *, timeout: float | None = None) -> bytes:
        """The bytes of a downloadable file, such as a Batch Mode results file ("files/batch-…").

        `GET {base}/download/{version}/files/{id}:download?alt=media` with the key header, the
        documented path of Batch Mode results (the SDK's `Files.download` asks for
        `files/{id}:download?alt=media` under `{version}`). Uploaded files cannot be downloaded:
        the service refuses those.
        """
        answer = await self._transport.send(
            "GET",
            f"{self.base_url}/download/{self.version}/files/{file_id(name)}:download",
            params={"alt": "media"},
            timeout=timeout,
            what=f"download files/{file_id(name)}",
            max_bytes=None,  # a results file may be gigabytes: no answer-size cap here
        )
        if answer.status >= 400:
            raise self._transport.error(answer)
        return self._transport.redact_bytes(answer.body)  # bytes kept by the caller

    async def wait_until_active(
        self, name: str, *, timeout: float = 300.0, poll_interval: float = 1.0
    ) -> FileInfo:
        """Poll until the file is ACTIVE; FAILED, or still PROCESSING at `timeout`, raise."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            resource = await self._file_resource(name)
            info = self._transport.parse_value(resource, parse_file_info, "get file")
            if info.state == "ACTIVE":
                return info
            if info.state == "FAILED":
                error = resource.get("error")
                detail = error.get("message") if isinstance(error, dict) else None
                raise GeminiError(
                    None,
                    "FAILED_PRECONDITION",
                    f"{info.name} failed processing: {detail or 'no detail given'}",
                    kind="failed_precondition",
                )
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise GeminiError(
                    None, "DEADLINE_EXCEEDED", f"{info.name} still {info.state} after {timeout:g}s"
                )
            await asyncio.sleep(min(poll_interval, remaining))

    async def _file_resource(self, name: str) -> dict[str, Any]:
        answer = await self._transport.send(
            "GET",
            f"{self.base_url}/{self.version}/files/{file_id(name)}",
            what=f"get files/{file_id(name)}",
        )
        return self._transport.parse(answer, parse_json_object, "get file")
