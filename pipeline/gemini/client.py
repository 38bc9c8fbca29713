"""Async REST client for the Gemini API: generateContent, Interactions and the Files API.

Protocol only: it knows requests and answers, not the pipeline. One aiohttp session per client
(its connection pool sized to the pipeline's concurrency) carries every call. The client does not
retry; it raises `GeminiError` with enough detail (`retryable`, `retry_delay`) for the caller's
own policy. The one exception is the SDK's behaviour on upload chunks whose answer lacks
`X-Goog-Upload-Status`: those are re-sent a bounded number of times, as the official SDK does.

The API key travels only in the `x-goog-api-key` header of requests to the API itself (never
to the resumable upload URL, which is its own credential) and is kept out of every repr, error
message and log line.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import aiohttp

from pipeline.gemini.errors import RETRYABLE_HTTP_CODES, GeminiError, error_from_response
from pipeline.gemini.files import (
    DEFAULT_CHUNK_SIZE,
    file_id,
    parse_file_info,
    parse_file_page,
    parse_json_object,
    parse_upload_answer,
    read_chunks,
    source_size,
)
from pipeline.gemini.interactions import build_interaction_body, parse_interaction
from pipeline.gemini.types import FileInfo, Flavor, GenerateRequest, GenerateResponse, Usage
from pipeline.gemini.wire import as_int, field

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
API_KEY_HEADER = "x-goog-api-key"
# Pauses before re-sending an upload chunk whose answer lacked X-Goog-Upload-Status
# (the SDK: 3 attempts, 1 s then 2 s).
UPLOAD_RESEND_DELAYS = (1.0, 2.0)

log = logging.getLogger(__name__)
_Parsed = TypeVar("_Parsed")


def api_key_from_env() -> str | None:
    """GEMINI_API_KEY, else GOOGLE_API_KEY (the SDK's order); None when neither is set."""
    return os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY") or None


# ---------------------------------------------------------------- generateContent wire mapping


def _media_resolution_enum(level: str) -> str:
    return f"MEDIA_RESOLUTION_{level.upper()}"


def build_generate_content_body(request: GenerateRequest) -> dict[str, Any]:
    """The JSON body of a generateContent call: image parts, then the prompt's text part.

    Part keys follow the seeds (`inline_data`, `file_data`, snake_case inside), which the
    service accepts alongside camelCase. `ultra_high` media resolution exists only per part, so
    a request-wide `ultra_high` is set on every image part instead of in generationConfig.
    """
    parts: list[dict[str, Any]] = []
    request_wide_part_level = "ultra_high" if request.media_resolution == "ultra_high" else None
    for image in request.images:
        if image.data is not None:
            part: dict[str, Any] = {
                "inline_data": {
                    "mime_type": image.mime_type,
                    "data": base64.b64encode(image.data).decode("ascii"),
                }
            }
        else:
            part = {"file_data": {"mime_type": image.mime_type, "file_uri": image.file_uri}}
        level = image.resolution or request_wide_part_level
        if level:
            part["mediaResolution"] = {"level": _media_resolution_enum(level)}
        parts.append(part)
    parts.append({"text": request.prompt})

    body: dict[str, Any] = {"contents": [{"role": "user", "parts": parts}]}
    if request.system_instruction:
        body["systemInstruction"] = {"parts": [{"text": request.system_instruction}]}
    config: dict[str, Any] = {}
    if request.response_mime_type:
        config["responseMimeType"] = request.response_mime_type
    if request.response_schema is not None:
        config["responseSchema"] = request.response_schema
    if request.response_json_schema is not None:
        config["responseJsonSchema"] = request.response_json_schema
    if request.temperature is not None:
        config["temperature"] = request.temperature
    if request.max_output_tokens is not None:
        config["maxOutputTokens"] = request.max_output_tokens
    thinking: dict[str, Any] = {}
    if request.thinking_budget is not None:
        thinking["thinkingBudget"] = request.thinking_budget
    if request.thinking_level:
        thinking["thinkingLevel"] = request.thinking_level.upper()
    if thinking:
        config["thinkingConfig"] = thinking
    if request.media_resolution and request_wide_part_level is None:
        config["mediaResolution"] = _media_resolution_enum(request.media_resolution)
    if config:
        body["generationConfig"] = config
    return body


def _usage_metadata(meta: Any) -> Usage:
    if not isinstance(meta, dict):
        return Usage()
    by_modality: dict[str, int] = {}
    for entry in field(meta, "promptTokensDetails", "prompt_tokens_details") or ():
        if isinstance(entry, dict) and entry.get("modality"):
            key = str(entry["modality"]).upper()
            count = as_int(field(entry, "tokenCount", "token_count"))
            by_modality[key] = by_modality.get(key, 0) + count
    return Usage(
        prompt_tokens=as_int(field(meta, "promptTokenCount", "prompt_token_count")),
        output_tokens=as_int(field(meta, "candidatesTokenCount", "candidates_token_count")),
        thoughts_tokens=as_int(field(meta, "thoughtsTokenCount", "thoughts_token_count")),
        total_tokens=as_int(field(meta, "totalTokenCount", "total_token_count")),
        prompt_by_modality=by_modality,
    )


def parse_generate_content(body: str) -> GenerateResponse:
    """Read a GenerateContentResponse (JSON text); raises ValueError when it is not one.

    Answer text is candidates[0]'s text parts without `thought: true`, joined.
    """
    document = json.loads(body)
    if not isinstance(document, dict):
        raise ValueError("a GenerateContentResponse must be a JSON object")
    text, finish_reason = "", None
    candidates = document.get("candidates")
    if isinstance(candidates, list) and candidates and isinstance(candidates[0], dict):
        candidate = candidates[0]
        finish_reason = field(candidate, "finishReason", "finish_reason")
        content = candidate.get("content")
        parts = content.get("parts") if isinstance(content, dict) else None
        text = "".join(
            part["text"]
            for part in parts or ()
            if isinstance(part, dict)
            and isinstance(part.get("text"), str)
            and not part.get("thought")
        )
    feedback = field(document, "promptFeedback", "prompt_feedback")
    block_reason = (
        field(feedback, "blockReason", "block_reason") if isinstance(feedback, dict) else None
    )
    return GenerateResponse(
        text=text,
        finish_reason=str(finish_reason) if finish_reason else None,
        block_reason=str(block_reason) if block_reason else None,
        usage=_usage_metadata(field(document, "usageMetadata", "usage_metadata")),
        raw=body,
    )


def parse_response(body: str) -> GenerateResponse:
    """Read a stored raw answer of either flavour, telling them apart by their fields.

    An Interaction always carries `status` (and `steps`); a GenerateContentResponse has neither.
    """
    document = json.loads(body)
    if isinstance(document, dict) and ("steps" in document or "status" in document):
        return parse_interaction(body)
    return parse_generate_content(body)


# --------------------------------------------------------------------------------- the client


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    headers: Mapping[str, str]
    text: str


class GeminiClient:
    """Async client for one Gemini endpoint; use as `async with GeminiClient(...) as client`."""

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str = DEFAULT_BASE_URL,
        version: str = "v1beta",
        max_connections: int = 64,
        timeout: float = 120.0,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        self.__api_key = api_key if api_key is not None else api_key_from_env()
        self.base_url = base_url.rstrip("/")
        self.version = version.strip("/")
        self.max_connections = max_connections
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def __repr__(self) -> str:
        key = "set" if self.__api_key else "missing"
        return (
            f"GeminiClient(base_url={self.base_url!r}, version={self.version!r}, "
            f"max_connections={self.max_connections}, api_key={key})"
        )

    async def __aenter__(self) -> GeminiClient:
        self._http()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------------------------- generate

    async def generate(
        self,
        request: GenerateRequest,
        *,
        flavor: Flavor = "generateContent",
        timeout: float | None = None,
    ) -> GenerateResponse:
        """Run `request` through the chosen API; the answer has the same shape either way."""
        if flavor == "generateContent":
            return await self.generate_content(request, timeout=timeout)
        if flavor == "interactions":
            return await self.interact(request, timeout=timeout)
        raise ValueError(f"unknown flavor {flavor!r}")

    async def generate_content(
        self, request: GenerateRequest, *, timeout: float | None = None
    ) -> GenerateResponse:
        model = request.model.removeprefix("models/")
        answer = await self._send(
            "POST",
            f"{self.base_url}/{self.version}/models/{model}:generateContent",
            json_body=build_generate_content_body(request),
            timeout=timeout,
            what=f"{model}:generateContent",
        )
        return self._parse(answer, parse_generate_content, f"{model}:generateContent")

    async def interact(
        self, request: GenerateRequest, *, timeout: float | None = None
    ) -> GenerateResponse:
        """One Interactions call, always with `store: false`."""
        answer = await self._send(
            "POST",
            f"{self.base_url}/{self.version}/interactions",
            json_body=build_interaction_body(request),
            timeout=timeout,
            what="interactions",
        )
        return self._parse(answer, parse_interaction, "interactions")

    # ------------------------------------------------------------------------------ Files API

    async def upload_file(
        self,
        source: str | os.PathLike[str] | bytes,
        mime_type: str,
        *,
        display_name: str | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> FileInfo:
        """Resumable upload: start, then `chunk_size` pieces from disk, the last one finalizing."""
        size = await source_size(source)
        start = await self._send(
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
            raise self._error(start)
        upload_url = start.headers.get("X-Goog-Upload-URL")
        if not upload_url:
            raise GeminiError(
                start.status, "UNKNOWN", "upload start answered without X-Goog-Upload-URL"
            )

        offset = 0
        async with contextlib.aclosing(read_chunks(source, chunk_size)) as chunks:
            while True:
                chunk = await anext(chunks, b"")  # an empty file still needs its finalize
                command = "upload, finalize" if offset + len(chunk) >= size else "upload"
                answer = await self._send_chunk(upload_url, chunk, offset, command)
                if answer.status >= 400:
                    raise self._error(answer)  # even when the session stays "active"
                offset += len(chunk)
                upload_status = answer.headers.get("X-Goog-Upload-Status")
                if upload_status != "active":
                    break  # finalized, or the service stopped the upload
                if offset >= size:
                    raise GeminiError(
                        answer.status,
                        "UNKNOWN",
                        f"all {size} bytes sent but the upload is not final",
                    )
        if upload_status != "final":
            raise GeminiError(
                answer.status,
                "UNKNOWN",
                f"upload ended with X-Goog-Upload-Status {upload_status!r}",
            )
        return self._parse(answer, parse_upload_answer, "upload finalize")

    async def get_file(self, name: str) -> FileInfo:
        resource = await self._file_resource(name)
        return self._parse_value(resource, parse_file_info, "get file")

    async def list_files(self, *, page_size: int = 100) -> list[FileInfo]:
        """Every file of the project, following nextPageToken."""
        files: list[FileInfo] = []
        params = {"pageSize": str(page_size)}
        while True:
            answer = await self._send(
                "GET", f"{self.base_url}/{self.version}/files", params=params, what="list files"
            )
            page, token = self._parse(answer, parse_file_page, "list files")
            files.extend(page)
            if not token:
                return files
            params = {"pageSize": str(page_size), "pageToken": token}

    async def delete_file(self, name: str) -> None:
        answer = await self._send(
            "DELETE",
            f"{self.base_url}/{self.version}/files/{file_id(name)}",
            what=f"delete files/{file_id(name)}",
        )
        if answer.status >= 400:
            raise self._error(answer)

    async def wait_until_active(
        self, name: str, *, timeout: float = 300.0, poll_interval: float = 1.0
    ) -> FileInfo:
        """Poll until the file is ACTIVE; FAILED, or still PROCESSING at `timeout`, raise."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            resource = await self._file_resource(name)
            info = self._parse_value(resource, parse_file_info, "get file")
            if info.state == "ACTIVE":
                return info
            if info.state == "FAILED":
                error = resource.get("error")
                detail = error.get("message") if isinstance(error, dict) else None
                raise GeminiError(
                    None,
                    "FAILED_PRECONDITION",
                    self._redact(f"{info.name} failed processing: {detail or 'no detail given'}"),
                )
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise GeminiError(
                    None, "DEADLINE_EXCEEDED", f"{info.name} still {info.state} after {timeout:g}s"
                )
            await asyncio.sleep(min(poll_interval, remaining))

    async def _file_resource(self, name: str) -> dict[str, Any]:
        answer = await self._send(
            "GET",
            f"{self.base_url}/{self.version}/files/{file_id(name)}",
            what=f"get files/{file_id(name)}",
        )
        return self._parse(answer, parse_json_object, "get file")

    async def _send_chunk(
        self, upload_url: str, chunk: bytes, offset: int, command: str
    ) -> _Answer:
        """POST one chunk to the upload URL (no API key); re-sent while its answer has no status."""
        headers = {"X-Goog-Upload-Command": command, "X-Goog-Upload-Offset": str(offset)}
        what = f"upload chunk at offset {offset}"  # never the URL: it is a credential too
        delays = iter(UPLOAD_RESEND_DELAYS)
        while True:
            answer = await self._send(
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

    # ------------------------------------------------------------------------------ transport

    def _http(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("GeminiClient is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            )
        return self._session

    def _redact(self, text: str) -> str:
        """Remove the key from text that came from elsewhere (server bodies, library errors)."""
        key = self.__api_key
        return text.replace(key, "[redacted]") if key else text

    def _error(self, answer: _Answer) -> GeminiError:
        return error_from_response(answer.status, self._redact(answer.text), answer.headers)

    def _parse(self, answer: _Answer, parse: Callable[[str], _Parsed], what: str) -> _Parsed:
        if answer.status >= 400:
            raise self._error(answer)
        return self._parse_value(answer.text, parse, what)

    def _parse_value(self, value: Any, parse: Callable[[Any], _Parsed], what: str) -> _Parsed:
        try:
            return parse(value)
        except (ValueError, TypeError, AttributeError) as exc:
            # A success answer that is not the promised JSON: corrupted in transit, like a reset.
            failure = GeminiError(
                None, "DATA_LOSS", self._redact(f"{what}: unreadable answer ({exc})")
            )
        raise failure

    async def _send(
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
    ) -> _Answer:
        """One HTTP exchange, body read in full; transport failures become GeminiError."""
        request_headers = dict(headers or {})
        if json_body is not None:
            data = json.dumps(json_body, separators=(",", ":")).encode()
            request_headers["Content-Type"] = "application/json"
        if with_key and self.__api_key:
            request_headers[API_KEY_HEADER] = self.__api_key
        limit = self.timeout if timeout is None else timeout
        try:
            async with self._http().request(
                method,
                url,
                data=data,
                headers=request_headers,
                params=params,
                timeout=aiohttp.ClientTimeout(total=limit),
            ) as response:
                body = await response.read()
                return _Answer(response.status, response.headers, body.decode("utf-8", "replace"))
        except TimeoutError:
            failure = GeminiError(None, "DEADLINE_EXCEEDED", f"{what}: no answer within {limit:g}s")
        except (aiohttp.ClientError, OSError) as exc:
            detail = self._redact(str(exc)) or "connection failed"
            failure = GeminiError(None, "UNAVAILABLE", f"{what}: {type(exc).__name__}: {detail}")
        # Raised outside the except blocks, so no chained library exception (whose request
        # info carries the headers) ends up in a formatted traceback.
        raise failure
