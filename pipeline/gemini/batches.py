"""Batch Mode's wire protocol: generateContent requests run as one job, at half the price.

Protocol only, as the rest of `pipeline.gemini`: it builds and reads bodies and makes the calls,
and never retries (a `GeminiError` says what failed; the engine decides). The shapes
(docs/gemini-api.md § Batch Mode; google-genai's `google/genai/batches.py` where it is silent):

- create: `POST {base}/{version}/models/{m}:batchGenerateContent` with `{"batch": {"displayName",
  "inputConfig": {"fileName": "files/<id>"}}}` — a JSONL file uploaded through the Files API, one
  `{"key": ..., "request": GenerateContentRequest}` a line (`request_line`, built by the same
  `build_generate_content_body` as an interactive call) — or `"inputConfig": {"requests":
  {"requests": [{"request": ..., "metadata": {"key": ...}}]}}` (inline, under 20 MB in total).
  Creation is not idempotent: two creates make two jobs (the caller persists the name first).
- a job is an Operation: `{"name": "batches/<id>", "metadata": {"state", "batchStats",
  "displayName", "model", "output", "createTime", ...}, "done", "error"}`; states
  `BATCH_STATE_*` are read as the SDK spells them, `JOB_STATE_*` (`t_job_state`), and either
  spelling is accepted. `done` is read as the Operation says it, apart from the state: a job
  was seen live SUCCEEDED before its output was attached (tidyverse/ellmer#926), so whether
  its results can be read is `done` and `has_output`, never the state alone;
- get / list (`operations`, paged by `nextPageToken`) / `:cancel` / delete, as `Batches.get`,
  `_list`, `cancel` and `delete` of the SDK (`batches/{name}` under the version);
- results: `metadata.output.responsesFile` (`files/batch-<id>`), downloaded from
  `{base}/download/{version}/files/batch-<id>:download?alt=media` to a file, chunk by chunk, one
  `{"key", "response" | "error"}` a line (`parse_result`); inline jobs answer in
  `metadata.output.inlinedResponses.inlinedResponses[]` (`{"response" | "error", "metadata":
  {"key"}}`, in input order, the SDK's `_InlinedResponse_from_mldev`). A result that cannot be
  read (a line cut short, not JSON, neither a response nor an error) is a BatchResult with
  `unreadable` set, its key when it could still be read: one bad line spoils only itself.

A per-request `error` is a google.rpc.Status whose `code` is the RPC code (3 INVALID_ARGUMENT,
14 UNAVAILABLE, ...); `request_error` turns it into the `GeminiError` an interactive call with
that outcome would have raised, so both modes judge failures by the same rules.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.gemini.content import build_generate_content_body, parse_generate_content
from pipeline.gemini.errors import GeminiError, error_from_response
from pipeline.gemini.files import file_id, parse_json_object
from pipeline.gemini.transport import Transport
from pipeline.gemini.types import GenerateRequest, GenerateResponse
from pipeline.gemini.wire import as_int, json_bytes
from pipeline.gemini.wire import field as wire_field

# The input file's MIME type (docs/gemini-api.md § Batch Mode; the upload sample of
# https://ai.google.dev/gemini-api/docs/batch-mode sets it so).
JSONL_MIME = "jsonl"
ENDED = frozenset(
    {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"}
    | {"JOB_STATE_PARTIALLY_SUCCEEDED"}  # Vertex's JobState; not in the SDK's list, ended too
)  # types.JOB_STATES_ENDED_VERTEX: the states a job leaves no more
# google.rpc.Code: the `code` of a Status inside an answer (a per-request error, a job's error)
RPC_CODES = {
    "OK": 0,
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "OUT_OF_RANGE": 11,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}
_STATUS_BY_RPC = {code: name for name, code in RPC_CODES.items()}
# The HTTP code Google's front ends give each RPC code (google/rpc/code.proto's comments)
_HTTP_BY_RPC = {1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400}
_HTTP_BY_RPC |= {10: 409, 11: 400, 12: 501, 13: 500, 14: 503, 15: 500, 16: 401}


@dataclass(frozen=True, slots=True)
class BatchStats:
    """metadata.batchStats (int64 counts arrive as JSON strings)."""

    requests: int = 0
    pending: int = 0
    succeeded: int = 0
    failed: int = 0


EXCERPT_CHARS = 80  # of an unreadable result shown in a message: enough to recognise, short


@dataclass(frozen=True, slots=True)
class Unreadable:
    """Why a result could not be read, where it was (a results file's line, or an inline
    answer's place, from 1) and its first EXCERPT_CHARS characters (never the whole line)."""

    number: int
    reason: str
    excerpt: str


@dataclass(frozen=True, slots=True)
class BatchResult:
    """One request's outcome: its answer, the error the service gave it instead, or neither
    when the result could not be read (`unreadable`; `key` then None unless it was readable)."""

    key: str | None
    response: GenerateResponse | None = None
    error: GeminiError | None = None
    unreadable: Unreadable | None = None


@dataclass(frozen=True, slots=True)
class BatchJob:
    """A batch job as the service describes it (the SDK's `types.BatchJob`, plus its stats)."""

    name: str  # "batches/<id>"
    state: str  # JOB_STATE_* (BATCH_STATE_* is read as the SDK reads it)
    done: bool = False  # the Operation's own `done` (`operation_done`)
    display_name: str | None = None
    model: str | None = None
    stats: BatchStats = field(default_factory=BatchStats)
    responses_file: str | None = None  # "files/batch-<id>" once a file job succeeded
    output_dir: str | None = None  # Vertex: outputInfo.gcsOutputDirectory (vertex_batches.py)
    inlined: tuple[BatchResult, ...] = ()  # the answers of an inline job
    error: GeminiError | None = None  # why a FAILED (or CANCELLED) job ended
    create_time: str | None = None
    update_time: str | None = None
    end_time: str | None = None

    @property
    def ended(self) -> bool:
        """The state will not change any more (what the SDK's `BatchJob.done` tells)."""
        return self.state in ENDED

    @property
    def has_output(self) -> bool:
        """Its results are attached: a responses file, inline answers, or (Vertex) the folder
        its predictions are written to — whether they are all there is read from the folder."""
        return self.responses_file is not None or bool(self.inlined) or bool(self.output_dir)


def job_state(state: Any) -> str:
    """`BATCH_STATE_X` -> `JOB_STATE_X` (the SDK's `t_job_state`); other spellings unchanged."""
    text = str(state or "JOB_STATE_UNSPECIFIED").upper()
    return "JOB_STATE_" + text.removeprefix("BATCH_STATE_") if text.startswith("BATCH_") else text


def job_id(name: str) -> str:
    """ "batches/abc" or "abc" -> "abc" (the SDK's `t_batch_job_name` for the Gemini API)."""
    return name.rstrip("/").rsplit("/", 1)[-1]


def parse_job(document: Any) -> BatchJob:
    """An Operation (or a bare GenerateContentBatch) as a BatchJob (`_BatchJob_from_mldev`)."""
    if not isinstance(document, dict):
        raise ValueError("a batch job must be a JSON object")
    meta = document.get("metadata")
    meta = meta if isinstance(meta, dict) else document
    name = document.get("name") or meta.get("name")
    if not name:
        raise ValueError("a batch job needs a name")
    output = _output(document, meta)
    error = document.get("error")
    state = job_state(meta.get("state"))
    return BatchJob(
        name=str(name),
        state=state,
        done=operation_done(document, state),
        display_name=wire_field(meta, "displayName", "display_name"),
        model=meta.get("model"),
        stats=_stats(wire_field(meta, "batchStats", "batch_stats")),
        responses_file=wire_field(output, "responsesFile", "responses_file"),
        inlined=tuple(_inlined(output)),
        error=request_error(error) if isinstance(error, dict) else None,
        create_time=wire_field(meta, "createTime", "create_time"),
        update_time=wire_field(meta, "updateTime", "update_time"),
        end_time=wire_field(meta, "endTime", "end_time"),
    )


def operation_done(document: dict[str, Any], state: str) -> bool:
    """An Operation's `done` (proto3 JSON leaves a false one out); one carrying its `response`
    or `error` is done whatever it says (google.longrunning.Operation: neither is set before).
    A bare GenerateContentBatch has no `done`: its state ended."""
    if not isinstance(document.get("metadata"), dict):
        return state in ENDED
    return document.get("done") is True or "response" in document or "error" in document


def _output(document: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """metadata.output, else the done Operation's `response` (results sit in both:
    docs/gemini-api.md § Batch Mode)."""
    for found in (meta.get("output"), document.get("response")):
        if isinstance(found, dict):
            return found
    return {}


def _stats(stats: Any) -> BatchStats:
    if not isinstance(stats, dict):
        return BatchStats()
    return BatchStats(
        requests=as_int(wire_field(stats, "requestCount", "request_count")),
        pending=as_int(wire_field(stats, "pendingRequestCount", "pending_request_count")),
        succeeded=as_int(wire_field(stats, "successfulRequestCount", "successful_request_count")),
        failed=as_int(wire_field(stats, "failedRequestCount", "failed_request_count")),
    )


def _inlined(output: dict[str, Any]) -> Iterator[BatchResult]:
    container = wire_field(output, "inlinedResponses", "inlined_responses")
    items = wire_field(container, "inlinedResponses", "inlined_responses") if container else None
    for number, item in enumerate(items if isinstance(items, list) else (), 1):
        yield _inlined_result(item, number)


def _inlined_result(item: Any, number: int) -> BatchResult:
    """One inline answer (`{"response" | "error", "metadata": {"key"}}`), or its Unreadable."""
    metadata = item.get("metadata") if isinstance(item, dict) else None
    key = _key(metadata.get("key")) if isinstance(metadata, dict) else None
    try:
        if not isinstance(item, dict):
            raise ValueError("an inline answer must be a JSON object")
        return _result(item, key, json.dumps(item.get("response")))
    except (ValueError, TypeError, AttributeError) as exc:
        return unreadable(key, number, str(exc), json.dumps(item))


def parse_job_page(body: str) -> tuple[list[BatchJob], str | None]:
    """One page of batches.list: `operations` and the next page's token (`_ListBatchJobs...`)."""
    document = parse_json_object(body)
    operations = document.get("operations") or document.get("batches") or []
    if not isinstance(operations, list):
        raise ValueError("'operations' must be a list")
    token = wire_field(document, "nextPageToken", "next_page_token")
    return [parse_job(item) for item in operations], str(token) if token else None


def parse_result(line: str) -> BatchResult:
    """One line of a results file: `{"key", "response" | "error"}`. The response keeps the
    exact text it had in the line (rows store the answer exactly as received)."""
    members = _members(line)
    key = members.get("key", (None, ""))[0]
    document = {name: value for name, (value, _) in members.items()}
    return _result(
        document, None if key is None else str(key), members.get("response", ("", ""))[1]
    )


def read_result(line: str, number: int) -> BatchResult:
    """Line `number` of a results file: its BatchResult, or — when it cannot be read — one
    saying why, with its key if that much of the line reads (a key comes first in the lines
    the service writes, so a line cut short usually keeps it)."""
    try:
        return parse_result(line)
    except (ValueError, TypeError, AttributeError) as exc:
        return unreadable(leading_key(line), number, str(exc), line)


def unreadable(key: str | None, number: int, reason: str, text: str) -> BatchResult:
    excerpt = text.strip()[:EXCERPT_CHARS]
    return BatchResult(key, unreadable=Unreadable(number, reason[:200], excerpt))


def leading_key(line: str) -> str | None:
    """The `key` member of a JSON object line, if it comes before the line stops being JSON."""
    members: dict[str, tuple[Any, str]] = {}
    if not line.lstrip().startswith("{"):
        return None
    with contextlib.suppress(ValueError, IndexError):  # cut short: what was read is kept
        _read_members(line, members)
    return _key(members.get("key", (None, ""))[0])


def _key(value: Any) -> str | None:
    """A result's key as a string (a number too, as the service echoes what it was given)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return str(value)


def _result(document: dict[str, Any], key: str | None, response_text: str) -> BatchResult:
    error = document.get("error")
    if isinstance(error, dict):
        return BatchResult(key, error=request_error(error))
    if not isinstance(document.get("response"), dict):
        raise ValueError(f"result {key!r} has neither a response nor an error")
    return BatchResult(key, response=parse_generate_content(response_text))


def _members(text: str) -> dict[str, tuple[Any, str]]:
    """The members of a JSON object: each value and its exact text."""
    members: dict[str, tuple[Any, str]] = {}
    _read_members(text, members)
    return members


def _read_members(text: str, members: dict[str, tuple[Any, str]]) -> None:
    """Into `members`, one at a time (those read before a failure stay: `leading_key`)."""
    decoder = json.JSONDecoder()
    at = _skip(text, 0, "{")
    while text[at] != "}":
        name, at = decoder.raw_decode(text, at)
        at = _skip(text, at, ":")
        value, end = decoder.raw_decode(text, at)
        members[str(name)] = (value, text[at:end])
        at = _skip(text, end, ",")


def _skip(text: str, at: int, punctuation: str) -> int:
    """Past whitespace, one optional `punctuation` character and whitespace again."""
    while at < len(text) and text[at] in " \t\r\n":
        at += 1
    if at < len(text) and text[at] == punctuation:
        at += 1
    while at < len(text) and text[at] in " \t\r\n":
        at += 1
    if at >= len(text):
        raise ValueError("not a whole JSON object")
    return at


def request_error(status: dict[str, Any]) -> GeminiError:
    """A google.rpc.Status (an RPC code, or an HTTP one) as the GeminiError an interactive call
    answered so would have raised."""
    code, name = status.get("code"), status.get("status")
    http = 500  # a Status without a usable code: an unknown failure of the service
    if isinstance(code, int) and not isinstance(code, bool) and 0 <= code < 100:
        name, http = name or _STATUS_BY_RPC.get(code, "UNKNOWN"), _HTTP_BY_RPC.get(code, 500)
    elif isinstance(code, int) and not isinstance(code, bool) and 100 <= code < 600:
        http = code
    message = str(status.get("message") or "no message given")
    error = {**status, "code": http, "status": name or "UNKNOWN", "message": message}
    return error_from_response(http, json.dumps({"error": error}))


def request_line(key: str, request: GenerateRequest) -> bytes:
    """One JSONL line of an input file: the same body an interactive call would send."""
    line = {"key": key, "request": build_generate_content_body(request)}
    return json_bytes(line) + b"\n"  # the image's base64 copied in, not escaped


class JobCalls:
    """What the job calls of both backends share (`Batches` here, `VertexBatches` of
    vertex_batches.py): cancel, delete, and the reading of a results file line by line."""

    read_line = staticmethod(read_result)  # a results line's reader (Vertex: its predictions')

    def __init__(self, transport: Transport, base_url: str, version: str) -> None:
        self._transport = transport
        self.base_url = base_url
        self.version = version

    async def cancel(self, name: str) -> None:
        answer = await self._transport.send(
            "POST", self._url(name) + ":cancel", json_body={}, what=f"cancel batches/{job_id(name)}"
        )
        if answer.status >= 400:
            raise self._transport.error(answer)

    async def delete(self, name: str) -> None:
        answer = await self._transport.send(
            "DELETE", self._url(name), what=f"delete batches/{job_id(name)}"
        )
        if answer.status >= 400:
            raise self._transport.error(answer)

    def results(self, path: str | os.PathLike[str]) -> Iterator[BatchResult]:
        """The lines of a downloaded results file, read one at a time: each parsed as written,
        then the key removed from what is kept (`_stored`). A line that does not parse is a
        BatchResult saying so (`read_result`): the others are read all the same."""
        with open(path, encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    yield self._stored(line, number)

    def _stored(self, line: str, number: int) -> BatchResult:
        """A line's result with the key only out of the kept texts: an answer is parsed as
        written (redacting first changed what was parsed); an error or an unreadable line is
        read from the redacted line, its message and excerpt being what is kept."""
        result = self.read_line(line, number)
        if result.response is None:
            return self.read_line(self._transport.redact(line), number)
        return replace(result, response=self._transport.stored(result.response))

    def _url(self, name: str) -> str:
        raise NotImplementedError


class Batches(JobCalls):
    """Batch Mode calls of one client (`GeminiClient.batches`); no retries inside."""

    async def create(
        self,
        model: str,
        *,
        file_name: str | None = None,
        requests: list[tuple[str, GenerateRequest]] | None = None,
        display_name: str | None = None,
    ) -> BatchJob:
        """Create a job over an uploaded JSONL file, or over inline (key, request) pairs."""
        if (file_name is None) == (requests is None):
            raise ValueError("give exactly one of file_name or requests")
        source: dict[str, Any] = {"fileName": file_name} if file_name else _inline(requests or [])
        batch: dict[str, Any] = {"inputConfig": source}
        if display_name:
            batch["displayName"] = display_name
        model = model.removeprefix("models/")
        answer = await self._transport.send(
            "POST",
            f"{self.base_url}/{self.version}/models/{model}:batchGenerateContent",
            json_body={"batch": batch},
            what=f"{model}:batchGenerateContent",
        )
        return self._transport.parse(answer, _parse_job_text, "create batch")

    async def get(self, name: str) -> BatchJob:
        answer = await self._transport.send(
            "GET", self._url(name), what=f"get batches/{job_id(name)}"
        )
        return self._transport.parse(answer, _parse_job_text, "get batch")

    async def list(self, *, page_size: int = 100) -> list[BatchJob]:
        """Every job of the project, following nextPageToken (no results inside: `get` each)."""
        url = f"{self.base_url}/{self.version}/batches"
        return await self._transport.pages(url, parse_job_page, "list batches", page_size)

    async def download(
        self, file_name: str, destination: str | os.PathLike[str], *, timeout: float | None = None
    ) -> int:
        """Write a results file to `destination` chunk by chunk; its size in bytes. The path
        is the documented one, `{base}/download/{version}/files/{id}:download?alt=media`."""
        what = f"download files/{file_id(file_name)}"
        with ResultsFile(Path(destination)) as sink:
            answer = await self._transport.send(
                "GET",
                f"{self.base_url}/download/{self.version}/files/{file_id(file_name)}:download",
                params={"alt": "media"},
                timeout=timeout,
                what=what,
                into=sink,
            )
            if answer.status >= 400:
                raise self._transport.error(answer)
            sink.sync()
        return Path(destination).stat().st_size

    def _url(self, name: str) -> str:
        return f"{self.base_url}/{self.version}/batches/{job_id(name)}"


class LocalWriteFailed(Exception):
    """A local results file could not be written (a full disk, a folder this user may not
    write): this machine's failure, not the service's nor the store's. Not an OSError on
    purpose: the transport reads an OSError as a dropped connection (a retryable UNAVAILABLE,
    polled again for ever while the disk stays full) and `stores.retried` as the store's I/O
    error, and either message would blame the far side."""

    def __init__(self, path: Path, exc: OSError) -> None:
        super().__init__(f"{path}: {os_reason(exc)}")


def os_reason(exc: OSError) -> str:
    """An OSError's errno and words, without the file name the caller names its own way."""
    return f"[Errno {exc.errno}] {exc.strerror}" if exc.strerror else str(exc)


class ResultsFile:
    """A job's results file being written on this machine (a Developer API download, a Vertex
    job's predictions copied): each of its OSErrors (open, write, sync, close) is
    LocalWriteFailed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with self._blamed():
            self.file = open(path, "wb")  # noqa: SIM115 (closed by __exit__)

    @contextlib.contextmanager
    def _blamed(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise LocalWriteFailed(self.path, exc) from None

    def write(self, data: bytes) -> None:
        with self._blamed():
            self.file.write(data)

    def sync(self) -> None:
        """Its bytes on the disk (flushed, fsynced)."""
        with self._blamed():
            self.file.flush()
            os.fsync(self.file.fileno())

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, kind: object, error: BaseException | None, trace: object) -> None:
        """Closed, its last buffered bytes written (where a full disk may fail first); after
        any failure, its own or the far side's, removed: a cut file is never read, and on a
        full disk it holds room the rerun needs."""
        try:
            with self._blamed():
                self.file.close()
        except LocalWriteFailed:
            self._remove()
            raise
        if error is not None:
            self._remove()

    def _remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


def _inline(requests: list[tuple[str, GenerateRequest]]) -> dict[str, Any]:
    """inputConfig.requests: each request with its key in metadata (`_InlinedRequest_to_mldev`)."""
    items = [
        {"request": build_generate_content_body(request), "metadata": {"key": key}}
        for key, request in requests
    ]
    return {"requests": {"requests": items}}


def _parse_job_text(body: str) -> BatchJob:
    return parse_job(parse_json_object(body))
