"""Vertex AI batch prediction's wire protocol: `projects.locations.batchPredictionJobs`.

Protocol only, as batches.py (the Developer API's Batch Mode) beside it: bodies built and read,
calls made, no retries. What differs from Batch Mode (the Vertex REST reference; google-genai's
`google/genai/batches.py` with `vertexai=True` where it is silent):

- create: `POST {base}/{version}/projects/{p}/locations/{l}/batchPredictionJobs` with
  `{"displayName", "model": "publishers/google/models/{m}", "inputConfig": {"instancesFormat":
  "jsonl", "gcsSource": {"uris": [...]}}, "outputConfig": {"predictionsFormat": "jsonl",
  "gcsDestination": {"outputUriPrefix": ...}}}` (`_CreateBatchJobParameters_to_vertex`,
  `_BatchJobSource_to_vertex`, `_BatchJobDestination_to_vertex`). The input is a JSONL in Cloud
  Storage, one `{"key", "request"}` a line — the very lines of the Developer API's input file
  (`request_line`): Vertex passes fields other than `request` through to the output. Not
  idempotent either (the caller records the job first).
- a job is a BatchPredictionJob itself, not an Operation: `{"name": "projects/.../
  batchPredictionJobs/<id>", "displayName", "model", "state": "JOB_STATE_*", "completionStats":
  {"successfulCount", "failedCount", "incompleteCount"}, "outputInfo": {"gcsOutputDirectory"},
  "error"}` (`_BatchJob_from_vertex`); it is done when its state ended.
- get / cancel (`:cancel`) / delete on `{version}/{name}`; list on the collection, filtered by
  display name (`_ListBatchJobsConfig_to_vertex`'s `filter`), paged, the jobs under
  `batchPredictionJobs` (`_ListBatchJobsResponse_from_vertex`).
- results: the service writes `predictions*.jsonl` under `outputInfo.gcsOutputDirectory`, one
  line per request: the input's own fields (our `key`), `request`, and `response` — or `status`
  when the request failed (`read_prediction`). Reading them is the object store's (the engine's),
  not this module's: a job's folder may be named before all its files are written.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.gemini.backends import VERTEX_PUBLISHER, Vertex
from pipeline.gemini.batches import (
    ENDED,
    BatchJob,
    BatchResult,
    BatchStats,
    JobCalls,
    job_id,
    job_state,
    leading_key,
    request_error,
    unreadable,
)
from pipeline.gemini.batches import _members as json_members
from pipeline.gemini.content import parse_generate_content
from pipeline.gemini.errors import GeminiError, error_from_response
from pipeline.gemini.files import parse_json_object
from pipeline.gemini.transport import Transport
from pipeline.gemini.wire import as_int
from pipeline.gemini.wire import field as wire_field

JSONL = "jsonl"  # instancesFormat and predictionsFormat of Gemini batch prediction
JOBS = "batchPredictionJobs"


def parse_vertex_job(document: Any) -> BatchJob:
    """A BatchPredictionJob as a BatchJob (`_BatchJob_from_vertex`)."""
    if not isinstance(document, dict) or not document.get("name"):
        raise ValueError("a batch prediction job must be a JSON object with a name")
    state = job_state(document.get("state"))
    error = document.get("error")
    output = wire_field(document, "outputInfo", "output_info")
    return BatchJob(
        name=str(document["name"]),
        state=state,
        done=state in ENDED,
        display_name=wire_field(document, "displayName", "display_name"),
        model=document.get("model"),
        stats=_completion(wire_field(document, "completionStats", "completion_stats")),
        output_dir=_output_dir(output),
        error=request_error(error) if isinstance(error, dict) and error else None,
        create_time=wire_field(document, "createTime", "create_time"),
        update_time=wire_field(document, "updateTime", "update_time"),
        end_time=wire_field(document, "endTime", "end_time"),
    )


def _output_dir(output: Any) -> str | None:
    if not isinstance(output, dict):
        return None
    found = wire_field(output, "gcsOutputDirectory", "gcs_output_directory")
    return str(found).rstrip("/") if found else None


def _completion(stats: Any) -> BatchStats:
    """completionStats as batchStats: requests answered, failed, and not done yet."""
    if not isinstance(stats, dict):
        return BatchStats()
    succeeded = as_int(wire_field(stats, "successfulCount", "successful_count"))
    failed = as_int(wire_field(stats, "failedCount", "failed_count"))
    pending = as_int(wire_field(stats, "incompleteCount", "incomplete_count"))
    return BatchStats(succeeded + failed + pending, pending, succeeded, failed)


def parse_vertex_page(body: str) -> tuple[list[BatchJob], str | None]:
    document = parse_json_object(body)
    jobs = document.get(JOBS) or []
    if not isinstance(jobs, list):
        raise ValueError(f"'{JOBS}' must be a list")
    token = wire_field(document, "nextPageToken", "next_page_token")
    return [parse_vertex_job(item) for item in jobs], str(token) if token else None


def read_prediction(line: str, number: int) -> BatchResult:
    """Line `number` of a predictions file: `{"key", "request", "response" | "status"}`, the
    response kept as its exact text (as `read_result` keeps it); an unreadable line says why."""
    try:
        members = json_members(line)
        key = members.get("key", (None, ""))[0]
        key = None if key is None else str(key)
        return _prediction(members, key)
    except (ValueError, TypeError, AttributeError) as exc:
        return unreadable(leading_key(line), number, str(exc), line)


def _prediction(members: dict[str, tuple[Any, str]], key: str | None) -> BatchResult:
    status = members.get("status", ("", ""))[0]
    if status:
        return BatchResult(key, error=status_error(status))
    if not isinstance(members.get("response", (None, ""))[0], dict):
        raise ValueError(f"prediction {key!r} has neither a response nor a status")
    return BatchResult(key, response=parse_generate_content(members["response"][1]))


def status_error(status: Any) -> GeminiError:
    """A failed line's `status` as the GeminiError an interactive call would have raised. The
    service writes a google.rpc.Status, or a text ending in the call's error body (`Bad
    Request: {"error": {...}}`): the body is judged when one is there, else an unknown 500."""
    if isinstance(status, dict):
        return request_error(status)
    text = str(status)
    start = text.find("{")
    if start >= 0:
        try:
            body = json.loads(text[start:])
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            return request_error(body["error"])
    return error_from_response(500, json.dumps({"error": {"code": 500, "message": text}}))


class VertexBatches(JobCalls):
    """Batch prediction calls of one Vertex client (`GeminiClient.batches`); no retries.
    Results are read with `results` as the Developer API's are, line by line."""

    read_line = staticmethod(read_prediction)

    def __init__(self, transport: Transport, backend: Vertex) -> None:
        super().__init__(transport, backend.base_url, backend.version)
        if backend.project is None:
            raise ValueError("batch prediction needs a project (express mode has none)")
        self.collection = (
            f"{backend.base_url}/{backend.version}/projects/{backend.project}"
            f"/locations/{backend.location}/{JOBS}"
        )

    async def create_job(
        self, model: str, *, source_uri: str, output_prefix: str, display_name: str
    ) -> BatchJob:
        """A job over the JSONL at `source_uri`, its predictions under `output_prefix`."""
        body = {
            "displayName": display_name,
            "model": VERTEX_PUBLISHER
            + model.removeprefix(VERTEX_PUBLISHER).removeprefix("models/"),
            "inputConfig": {"instancesFormat": JSONL, "gcsSource": {"uris": [source_uri]}},
            "outputConfig": {
                "predictionsFormat": JSONL,
                "gcsDestination": {"outputUriPrefix": output_prefix},
            },
        }
        answer = await self._transport.send(
            "POST", self.collection, json_body=body, what=f"{JOBS}.create"
        )
        return self._transport.parse(answer, _parse_job_text, "create batch prediction job")

    async def get(self, name: str) -> BatchJob:
        answer = await self._transport.send("GET", self._url(name), what=f"get {_short(name)}")
        return self._transport.parse(answer, _parse_job_text, "get batch prediction job")

    async def list(
        self, *, page_size: int = 100, display_name: str | None = None
    ) -> list[BatchJob]:
        """The project's jobs in this location (only those of `display_name` when given)."""
        query = {"filter": f'display_name="{display_name}"'} if display_name else None
        return await self._transport.pages(
            self.collection, parse_vertex_page, f"list {JOBS}", page_size, query
        )

    def _url(self, name: str) -> str:
        return f"{self.collection}/{job_id(name)}"


def _short(name: str) -> str:
    return f"{JOBS}/{job_id(name)}"


def _parse_job_text(body: str) -> BatchJob:
    return parse_vertex_job(parse_json_object(body))
