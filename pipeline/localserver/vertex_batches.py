"""Vertex AI batch prediction on the double: `projects.locations.batchPredictionJobs`.

Routes (`{v}` v1 or v1beta1; the Vertex REST reference, google-genai's batches.py with
`vertexai=True`), under `/{v}/projects/{p}/locations/{l}/`, with the Vertex surface's auth (a
bearer token this server issued, or an API key):

    POST   batchPredictionJobs              create: a JSONL in a mapped gs:// bucket
    GET    batchPredictionJobs[?filter=display_name="..."]    GET|DELETE batchPredictionJobs/{id}
    POST   batchPredictionJobs/{id}:cancel

The jobs are Batch Mode's (batches.py: the same background answering through the shared core,
line by line, billed at the batch price; the same faults where they apply), read and written as
Vertex does: the input `gcsSource.uris[0]` read from the folder `--gs-root` maps its bucket to,
the states `JOB_STATE_PENDING -> RUNNING -> SUCCEEDED` (or FAILED, CANCELLED, EXPIRED), and
the output `predictions.jsonl` written under `outputConfig.gcsDestination.outputUriPrefix` in
`prediction-model-<id>/` (rule vertex.batch): a line per request, its input's fields (our key,
the request) with `response`, or `status` (`"<STATUS>: {"error": {...}}"`) when it failed.

`outputInfo.gcsOutputDirectory` is named from the create on, before any file is there; with
`--batch-output-delay S` (rule batch.output-delay) a SUCCEEDED job's predictions file is written
only S seconds after it ended: a collector must not read the folder as empty. With
`--vertex-batch-end FAILED|PARTIALLY_SUCCEEDED` a job ends in that state instead of SUCCEEDED, its
completionStats counting every line answered and its predictions written as a succeeded job's
(late too, with --batch-output-delay): what a client must not delete before it is read.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from pipeline.gemini.backends import REQUEST_TYPE_HEADER
from pipeline.gemini.batches import RPC_CODES
from pipeline.localserver import errors
from pipeline.localserver.batches import (
    ENDED,
    BatchesSurface,
    Job,
    _batch_model,
    _file_lines,
    _listing,
    _page,
    _status,
)
from pipeline.localserver.core import Core
from pipeline.localserver.files import rfc3339
from pipeline.localserver.image_input import ImageReader
from pipeline.localserver.spec import get

JOBS = "batchPredictionJobs"
PUBLISHER = "publishers/google/models/"
_FILTER = re.compile(r'^\s*display_?name\s*=\s*"(?P<name>[^"]*)"\s*$', re.IGNORECASE)
Admit = Callable[[web.Request, str | None], None]
_STATUS_NAMES: dict[Any, str] = {code: name for name, code in RPC_CODES.items()}


@dataclass(slots=True)
class VertexJob(Job):
    """A Batch Mode job, with where Vertex reads and writes it."""

    parent: str = ""  # projects/{p}/locations/{l}
    output_prefix: str = ""  # gs://bucket/prefix given at create
    written: bool = False  # its predictions file is in the bucket


class VertexBatchesSurface(BatchesSurface):
    """batchPredictionJobs over Batch Mode's jobs (see the module docstring)."""

    def __init__(self, core: Core, let_in: Admit, images: ImageReader) -> None:
        super().__init__(core, images)  # lines' gs:// fileUris read in place, as the service does
        self.let_in = let_in  # the Vertex surface's token / key check
        self.roots = {bucket: Path(root).resolve() for bucket, root in core.options.gs_root}
        self.request_types: Counter[str] = Counter()  # X-Vertex-AI-LLM-Request-Type of job calls

    def add_routes(self, app: web.Application, version: str) -> None:
        base = f"/{version}/projects/{{project}}/locations/{{location}}/{JOBS}"
        app.router.add_post(base, self.create_job)
        app.router.add_get(base, self.list_jobs)
        app.router.add_get(f"{base}/{{id}}", self.get_job)
        app.router.add_delete(f"{base}/{{id}}", self.delete_job)
        app.router.add_post(f"{base}/{{id}}:cancel", self.cancel_job)

    def snapshot(self) -> dict[str, Any]:
        jobs = super().snapshot()["batches"]
        return {"vertex_batches": {**jobs, "request_types": dict(self.request_types)}}

    def _admit_call(self, request: web.Request) -> None:
        """The Vertex surface's auth, and the request type the call asked (counted: a client
        should ask it of model calls only, backends.REQUEST_TYPE_HEADER)."""
        self.let_in(request, request.match_info["project"])
        self.request_types[request.headers.get(REQUEST_TYPE_HEADER) or "unset"] += 1

    # ------------------------------------------------------------------------------ routes
    async def create_job(self, request: web.Request) -> web.Response:
        self._admit_call(request)
        body = await self.core.body(request)
        job = self._vertex_job(request, body if isinstance(body, dict) else {})
        model = _batch_model(job.model, job.version, self.core)
        self._admit(job, model)
        self.core.credits.check()
        self.jobs[job.id] = job
        self.created += 1
        job.task = asyncio.create_task(self._run(job, model), name=f"local-vertex-{job.id}")
        await self._hold_answer()
        return web.json_response(self._job_resource(job))

    async def get_job(self, request: web.Request) -> web.Response:
        self._admit_call(request)
        return web.json_response(self._job_resource(self._job(request)))

    async def list_jobs(self, request: web.Request) -> web.Response:
        """Newest first, filtered by display name when asked, paged by pageToken."""
        self._admit_call(request)
        wanted = _display_filter(request.query.get("filter"))
        listed = [j for j in self.jobs.values() if self._listed(j) and _named(j, wanted)]
        page, token = _page(request, listed)
        body: dict[str, Any] = {JOBS: [self._job_resource(job) for job in page]}
        return web.json_response(_listing(body, token))

    async def cancel_job(self, request: web.Request) -> web.Response:
        """As Batch Mode's cancel (rules batch.state, batch.cancel-partial)."""
        self._admit_call(request)
        self._cancel(self._job(request), "JOB_STATE_")
        return web.json_response({})

    async def delete_job(self, request: web.Request) -> web.Response:
        """Gone; the answer is the delete's long-running Operation, done."""
        self._admit_call(request)
        job = self._job(request)
        self._delete(job)
        operation = f"{_parent(request)}/operations/delete-{job.id}"
        return web.json_response({"name": operation, "done": True})

    # -------------------------------------------------------------------------------- input
    def _vertex_job(self, request: web.Request, body: dict[str, Any]) -> VertexJob:
        """The job a create asks for; 400 for what Vertex would refuse (rule vertex.batch)."""
        version = request.match_info["version"]
        source = get(body, "input_config", {})
        uris = get(get(source, "gcs_source", {}), "uris") or []
        prefix = get(
            get(get(body, "output_config", {}), "gcs_destination", {}), "output_uri_prefix"
        )
        _require(get(source, "instances_format") == "jsonl" and len(uris) == 1, "inputConfig")
        _require(isinstance(prefix, str) and self._mapped(prefix), "outputConfig")
        data = self.images.gs_object(str(uris[0]))
        job_id = self._new_id()
        return VertexJob(
            id=job_id,
            model=str(get(body, "model", "")).removeprefix(PUBLISHER),
            version={"v1": "v1", "v1beta1": "v1beta"}[version],
            base_uri=f"{request.scheme}://{request.host}/{version}",
            display_name=get(body, "display_name"),
            created=self.core.clock(),
            lines=[data],
            from_file=str(uris[0]),
            requests=sum(1 for _ in _file_lines(data)),
            parent=_parent(request),
            output_prefix=str(prefix).rstrip("/"),
        )

    def _mapped(self, uri: str) -> bool:
        bucket = uri.removeprefix("gs://").split("/", 1)[0]
        return uri.startswith("gs://") and bucket in self.roots

    # ------------------------------------------------------------------------------ output
    def _file_line(self, label: Any, result: dict[str, Any]) -> bytes:
        """A predictions line: the input line's fields, then `response` or `status`."""
        line = dict(label) if isinstance(label, dict) else {}
        error = result.get("error")
        if error is not None:
            name = _status_name(error)
            line["status"] = f"{name}: " + json.dumps({"error": {**error, "status": name}})
        else:
            line["response"] = result["response"]
        return json.dumps(line, separators=(",", ":")).encode() + b"\n"

    def _succeed(self, job: Job) -> str:
        """SUCCEEDED, or the state --vertex-batch-end asks for with the same output."""
        ending = self.core.options.vertex_batch_end
        if ending is None:
            return super()._succeed(job)
        self._store_results(job)
        job.ended, job.ended_at = ending, self.core.clock()
        job.error = _status("INTERNAL", f"Injected end: {ending}") if ending == "FAILED" else None
        return ending

    def _shows_output(self, job: Job, state: str) -> bool:
        """As Batch Mode's, and a job ended by --vertex-batch-end as a succeeded one."""
        if state == self.core.options.vertex_batch_end:
            return self._attached(job)
        return super()._shows_output(job, state)

    def _store_results(self, job: Job) -> None:
        """The results kept for the predictions file, written once the output shows
        (`_write`): on Vertex the output folder is named long before."""
        from_file, job.from_file = job.from_file, None  # (keeps the lines, no generated file)
        super()._store_results(job)
        job.from_file = from_file

    def _output_dir(self, job: VertexJob) -> str:
        return f"{job.output_prefix}/prediction-model-{job.id}"

    def _write(self, job: VertexJob) -> None:
        """predictions.jsonl under the output folder in its mapped bucket, whole or absent."""
        bucket, _, key = self._output_dir(job).removeprefix("gs://").partition("/")
        folder = self.roots[bucket] / key
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / ".predictions.jsonl.part"
        partial.write_bytes(b"".join(job.results))
        os.replace(partial, folder / "predictions.jsonl")
        job.written = True

    # ---------------------------------------------------------------------------- resource
    def _job_resource(self, job: Job) -> dict[str, Any]:
        """The BatchPredictionJob (camelCase; int64 counts as text)."""
        assert isinstance(job, VertexJob)
        state = self._state(job)
        if not job.written and self._shows_output(job, state) and job.results:
            self._write(job)
        resource: dict[str, Any] = {
            "name": f"{job.parent}/{JOBS}/{job.id}",
            "model": PUBLISHER + job.model,
            "inputConfig": {"instancesFormat": "jsonl", "gcsSource": {"uris": [job.from_file]}},
            "outputConfig": {
                "predictionsFormat": "jsonl",
                "gcsDestination": {"outputUriPrefix": job.output_prefix},
            },
            "outputInfo": {"gcsOutputDirectory": self._output_dir(job)},
            "state": f"JOB_STATE_{state}",
            "completionStats": _completion(job, state),
            "createTime": rfc3339(job.created),
            "updateTime": rfc3339(job.ended_at or self.core.clock()),
        }
        if job.display_name:
            resource["displayName"] = job.display_name
        if job.ended_at is not None:
            resource["endTime"] = rfc3339(job.ended_at)
        if job.error is not None:
            resource["error"] = job.error
        return resource


def _completion(job: Job, state: str) -> dict[str, str]:
    done = job.answered + job.failed
    counts = {
        "successfulCount": job.answered,
        "failedCount": job.failed,
        "incompleteCount": 0 if state in ENDED else job.requests - done,
    }
    return {name: str(value) for name, value in counts.items() if value}


def _status_name(error: dict[str, Any]) -> str:
    return _STATUS_NAMES.get(error.get("code"), "UNKNOWN")


def _parent(request: web.Request) -> str:
    info = request.match_info
    return f"projects/{info['project']}/locations/{info['location']}"


def _display_filter(text: str | None) -> str | None:
    """The display name of a `display_name="..."` filter (the only filter the double reads)."""
    if not text:
        return None
    found = _FILTER.match(text)
    if found is None:
        raise errors.invalid_argument(f"Unsupported filter: {text}", rule="vertex.batch")
    return found["name"]


def _named(job: Job, wanted: str | None) -> bool:
    return wanted is None or job.display_name == wanted


def _require(ok: bool, field: str) -> None:
    if not ok:
        raise errors.invalid_argument(
            f"{field}: Gemini batch prediction takes one JSONL in a gs:// bucket "
            "(instancesFormat jsonl) and a gs:// outputUriPrefix.",
            rule="vertex.batch",
            field=field,
        )
