"""The Batch Mode surface: jobs of generateContent requests run in the background over
`--batch-seconds`, their results a generated file (or inline), with the service's limits.

Routes (docs/gemini-api.md § Batch Mode; google-genai's `google/genai/batches.py` and
`Files.download` in `google/genai/files.py`):

    POST   /{v}/models/{model}:batchGenerateContent     create: inline requests or a JSONL file
    GET    /{v}/batches      GET|DELETE /{v}/batches/{id}      POST /{v}/batches/{id}:cancel
    GET    /download/{v}/files/{id}:download?alt=media   (and /{v}/files/{id}:download, the SDK's)

A job passes the states of rule batch.lifecycle: PENDING, RUNNING while a background task answers
its lines one after another — each exactly as generateContent would (`generate.parse_request`,
the answerer with the seeded faults drawn per line, `generate.response_body`), but outside the
RPM/TPM/RPD quotas and billed at the batch price — then SUCCEEDED once `--batch-seconds` have
passed since creation and every line is answered; EXPIRED (no results) when
`--batch-expiry-seconds` pass first; CANCELLED on `:cancel` (with the lines it had answered as its
output, rule batch.cancel-partial); FAILED when the input file is not
JSONL. A line the service would refuse, or an injected 500 / 503 / deadline, becomes that line's
`error` (a google.rpc.Status with its RPC code). States are derived from the server's clock when
a job is read, so tests can move time; the answering runs as fast as it can.

Two faults a collector must survive: `--batch-output-delay S` (rule batch.output-delay) shows a
SUCCEEDED, done job without its output for S seconds after it ended, as the live service was seen
to (tidyverse/ellmer#926); `--batch-corrupt-line N` (rule batch.corrupt-line) makes the Nth result
of every job unreadable — its results file's line cut in half (its key, which comes first, kept
when the cut falls after it), or its inline answer a string instead of an object.

Two more for a client that creates jobs: `--batch-list-lag S` (rule batch.list-lag) lists a job
only S seconds after its create (get finds it at once), and `--batch-create-delay S` (rule
batch.create-delay) holds a create's answer S seconds, the job already made.

This module is the surface only; the routes must be registered before generate.py's and
files_api.py's (server.SURFACES), whose catch-all `{model_action}` and `{id}` would match first.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import secrets
import string
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from pipeline.gemini.batches import RPC_CODES
from pipeline.localserver import errors, model_checks
from pipeline.localserver.billing import prompt_usage
from pipeline.localserver.core import Core
from pipeline.localserver.errors import ApiError
from pipeline.localserver.fields import BATCH_FILE_LINE, BATCH_GENERATE_CONTENT_REQUEST
from pipeline.localserver.files import rfc3339
from pipeline.localserver.generate import parse_request, response_body, with_output
from pipeline.localserver.image_input import ImageReader
from pipeline.localserver.spec import check, get
from pipeline.models import Model

PENDING_SHARE = 0.1  # a job is PENDING for this share of --batch-seconds, then RUNNING
TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main."
_ID_ALPHABET = string.ascii_lowercase + string.digits
ENDED = ("SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED")
_COUNTED = ("SUCCEEDED", "CANCELLED")  # ended states whose stats count their answered lines


@dataclass(slots=True)
class Job:
    """One batch job: its input, its progress, its results."""

    id: str
    model: str  # the model id, without "models/"
    version: str
    base_uri: str  # {scheme}://{host}/{version}: where its results file's uri points
    display_name: str | None
    created: float
    lines: list[Any]  # inline: the request objects; file: [the file's bytes]
    from_file: str | None  # "files/<id>" of a file job
    requests: int
    tokens: int = 0  # input tokens enqueued (counted when --batch-enqueued-tokens is set)
    answered: int = 0
    failed: int = 0
    results: list[Any] = field(default_factory=list)  # inline: dicts; file: JSONL lines
    finished_at: float | None = None  # when the last line was answered (the server's clock)
    ended: str | None = None  # SUCCEEDED | FAILED | CANCELLED | EXPIRED once it ended
    ended_at: float | None = None
    error: dict[str, Any] | None = None
    responses_file: str | None = None
    task: asyncio.Task[None] | None = None


class BatchesSurface:
    """Routes of Batch Mode over the server's core (answerer, files, stats, credits)."""

    def __init__(self, core: Core, images: ImageReader | None = None) -> None:
        self.core = core
        self.options = core.options
        # what a line's image parts are read through: the Files API's store, or on Vertex its
        # reader, which also reads a gs:// fileUri in place (vertex_batches.py)
        self.images = images or core.images
        self.jobs: dict[str, Job] = {}
        self.created = 0

    def routes(self, app: web.Application, version: str) -> None:
        router = app.router
        router.add_post(f"/{version}/models/{{model}}:batchGenerateContent", self.create)
        router.add_get(f"/{version}/batches", self.list)
        router.add_get(f"/{version}/batches/{{id}}", self.get)
        router.add_delete(f"/{version}/batches/{{id}}", self.delete)
        router.add_post(f"/{version}/batches/{{id}}:cancel", self.cancel)
        router.add_get(f"/download/{version}/files/{{id}}:download", self.download)
        router.add_get(f"/{version}/files/{{id}}:download", self.download)

    def close(self) -> None:
        """The server stops: the jobs' background work stops with it."""
        for job in self.jobs.values():
            if job.task is not None:
                job.task.cancel()

    def snapshot(self) -> dict[str, Any]:
        states: dict[str, int] = {}
        for job in self.jobs.values():
            state = self._state(job)
            states[state] = states.get(state, 0) + 1
        return {"batches": {"created": self.created, "by_state": states}}

    # ------------------------------------------------------------------------------ routes
    async def create(self, request: web.Request) -> web.Response:
        version = request.match_info["version"]
        self.core.check_key(request)
        model_id = request.match_info["model"].removeprefix("models/")
        model = _batch_model(model_id, version, self.core)
        body = await self.core.body(request)  # over 20 MB: 400 (rule body.too-large)
        check(body, BATCH_GENERATE_CONTENT_REQUEST, version=version)
        batch = get(body, "batch", {})
        job = self._new_job(model_id, f"{request.scheme}://{request.host}/{version}", batch)
        self._admit(job, model)
        self.core.credits.check()
        self.jobs[job.id] = job
        self.created += 1
        job.task = asyncio.create_task(self._run(job, model), name=f"local-batch-{job.id}")
        await self._hold_answer()
        return web.json_response(self._resource(job, with_output=True))

    async def _hold_answer(self) -> None:
        """--batch-create-delay S (rule batch.create-delay): the job exists, its create's answer
        comes S seconds later (real time, as a slow answer is: a client's poll runs meanwhile)."""
        if self.options.batch_create_delay_seconds:
            await asyncio.sleep(self.options.batch_create_delay_seconds)

    async def get(self, request: web.Request) -> web.Response:
        self.core.check_key(request)
        return web.json_response(self._resource(self._job(request), with_output=True))

    async def list(self, request: web.Request) -> web.Response:
        self.core.check_key(request)
        listed = [job for job in self.jobs.values() if self._listed(job)]
        page, token = _page(request, listed)
        body: dict[str, Any] = {"operations": [self._resource(j, with_output=False) for j in page]}
        return web.json_response(_listing(body, token))

    def _listed(self, job: Job) -> bool:
        """Whether the job list shows the job yet: --batch-list-lag S after its create, on the
        server's clock (rule batch.list-lag); get finds it at once."""
        return self.core.clock() >= job.created + self.options.batch_list_lag_seconds

    async def cancel(self, request: web.Request) -> web.Response:
        self.core.check_key(request)
        self._cancel(self._job(request), "BATCH_STATE_")
        return web.json_response({})

    def _cancel(self, job: Job, spelling: str) -> None:
        """A running job ended CANCELLED (rule batch.state: 400 once it ended)."""
        state = self._state(job)
        if state in ENDED:
            raise errors.batch_ended(job.id, f"{spelling}{state}")
        self._end(job, "CANCELLED", _status("CANCELLED", "The batch was cancelled."))

    async def delete(self, request: web.Request) -> web.Response:
        self.core.check_key(request)
        self._delete(self._job(request))
        return web.json_response({})

    def _delete(self, job: Job) -> None:
        del self.jobs[job.id]
        if job.task is not None:
            job.task.cancel()

    async def download(self, request: web.Request) -> web.Response:
        self.core.check_key(request)
        file_id = request.match_info["id"]
        stored = self.core.files.get(file_id)
        if stored is None:
            raise errors.file_not_found(file_id)
        if stored.source != "GENERATED" or request.query.get("alt") != "media":
            raise errors.download_refused(file_id)
        return web.Response(body=stored.data, content_type="application/octet-stream")

    # -------------------------------------------------------------------------------- input
    def _new_job(self, model_id: str, base_uri: str, batch: dict[str, Any]) -> Job:
        source = get(batch, "input_config", {})
        file_name = get(source, "file_name")
        inline = get(get(source, "requests"), "requests")
        if (file_name is None) == (inline is None) or inline == []:
            raise errors.invalid_argument(
                "Exactly one of input_config.file_name and input_config.requests.requests "
                "(not empty) must be set.",
                rule="batch.input",
                field="batch.input_config",
            )
        lines, count = [], len(inline or ())
        if file_name is not None:
            stored = self.core.images.active_file(str(file_name))  # 403 / 400 as for any file
            lines, count = [stored.data], sum(1 for line in _file_lines(stored.data))
        return Job(
            id=self._new_id(),
            model=model_id,
            version=base_uri.rsplit("/", 1)[-1],
            base_uri=base_uri,
            display_name=get(batch, "display_name"),
            created=self.core.clock(),
            lines=inline or lines,
            from_file=f"files/{stored.id}" if file_name is not None else None,
            requests=count,
        )

    def _admit(self, job: Job, model: Model) -> None:
        """The concurrent-jobs cap, then the model's enqueued-token cap (rule batch.limit)."""
        unfinished = [j for j in self.jobs.values() if self._state(j) not in ENDED]
        if len(unfinished) >= self.options.batch_max_jobs:
            raise errors.batch_limit()
        cap = self.options.batch_enqueued_tokens
        if cap is None:
            return
        job.tokens = sum(self._tokens(request, model, job) for _, request in self._requests(job))
        enqueued = sum(j.tokens for j in unfinished if j.model == job.model)
        if enqueued + job.tokens > cap:
            raise errors.batch_limit()

    def _tokens(self, request: Any, model: Model, job: Job) -> int:
        with contextlib.suppress(ApiError, ValueError):
            prompted = parse_request(request, model, job.model, job.version, self.core.images)
            return prompt_usage(prompted).prompt_tokens
        return 0  # a line that will be refused enqueues nothing

    def _requests(self, job: Job) -> Iterator[tuple[Any, Any]]:
        """(key or metadata, request body) of each line; ValueError for a line that is no JSON
        object (the whole job fails: rule batch.input-format)."""
        if job.from_file is None:
            for item in job.lines:
                yield get(item, "metadata"), get(item, "request")
            return
        for number, line in enumerate(_file_lines(job.lines[0]), 1):
            try:
                document = json.loads(line)
            except ValueError:
                document = None
            if not isinstance(document, dict):
                raise ValueError(f"Line {number} of {job.from_file} is not a JSON object.")
            yield document, document

    # ------------------------------------------------------------------------------ running
    async def _run(self, job: Job, model: Model) -> None:
        """Answer every line, yielding to the loop between lines (the server keeps serving)."""
        try:
            for label, document in self._requests(job):
                if job.ended:
                    return
                job.results.append(await self._line(job, model, label, document))
                await asyncio.sleep(0)
        except ValueError as exc:
            self._end(job, "FAILED", _status("INVALID_ARGUMENT", str(exc)))
            return
        job.finished_at = self.core.clock()

    async def _line(self, job: Job, model: Model, label: Any, document: Any) -> Any:
        """One line's result: `{"key", "response" | "error"}` (file), or `{"response" | "error",
        "metadata"}` (inline)."""
        try:
            outcome = await self._answer(job, model, document)
        except ApiError as exc:
            self.core.stats.refused(exc.rule)
            job.failed += 1
            result: dict[str, Any] = {"error": _status(exc.status, exc.message, exc.details)}
        else:
            job.answered += 1
            result = {"response": outcome}
        if job.from_file is None:
            return {**result, "metadata": label} if label is not None else result
        return self._file_line(label, result)

    def _file_line(self, label: Any, result: dict[str, Any]) -> bytes:
        """A results file's line: `{"key", "response" | "error"}` (vertex_batches.py writes
        Vertex's predictions instead)."""
        key = label.get("key") if isinstance(label, dict) else None
        line = {"key": key, **result} if key is not None else result
        return json.dumps(line, separators=(",", ":")).encode() + b"\n"

    async def _answer(self, job: Job, model: Model, document: Any) -> dict[str, Any]:
        if job.from_file is not None:
            check(document, BATCH_FILE_LINE, version=job.version)
            document = get(document, "request")
        if not isinstance(document, dict):
            raise errors.invalid_argument(
                "request is required.", rule="contents.required", field="request"
            )
        prompted = parse_request(document, model, job.model, job.version, self.images)
        prompt = prompt_usage(prompted)
        outcome = await self.core.answerer.answer(prompted, queued=True)
        usage = with_output(prompt, outcome)
        self.core.stats.bill(usage, outcome.task, len(prompted.images))
        self.core.credits.charge(job.model, usage, batch=True)
        return response_body(outcome, usage, job.model)

    # ------------------------------------------------------------------------------- states
    def _state(self, job: Job) -> str:
        """The job's state now; a job reaching its end is settled here (results stored)."""
        if job.ended:
            return job.ended
        now, options = self.core.clock(), self.options
        expires = job.created + options.batch_expiry_seconds
        due = job.created + options.batch_seconds
        if job.finished_at is not None and max(due, job.finished_at) < expires and now >= due:
            return self._succeed(job)
        if now >= expires:
            self._end(job, "EXPIRED", None)
            return "EXPIRED"
        return "PENDING" if now < job.created + PENDING_SHARE * options.batch_seconds else "RUNNING"

    def _succeed(self, job: Job) -> str:
        """A job whose lines are all answered and whose time is up, ended; its end state."""
        self._store_results(job)
        self._end(job, "SUCCEEDED", None)
        return "SUCCEEDED"

    def _store_results(self, job: Job) -> None:
        """The results as the job's output: a generated file (file input), else kept inline."""
        job.results = _corrupted(job.results, self.options.batch_corrupt_line)
        if job.from_file is not None:
            stored = self.core.files.add_generated(
                f"batch-{job.id}",
                b"".join(job.results),
                "application/json",  # JSONL, as the service labels its results file
                f"{job.display_name or job.id} results",
                job.base_uri,
            )
            job.responses_file = f"files/{stored.id}"
            job.results = []  # the file holds them now

    def _end(self, job: Job, state: str, error: dict[str, Any] | None) -> None:
        job.ended, job.ended_at, job.error = state, self.core.clock(), error
        if job.task is not None and not job.task.done() and state != "SUCCEEDED":
            job.task.cancel()
        if state == "CANCELLED" and job.results:
            self._store_results(job)  # the lines answered before the cancel (batch.cancel-partial)
        elif state != "SUCCEEDED":
            job.results = []  # no results for a job that failed or expired

    # ----------------------------------------------------------------------------- resource
    def _resource(self, job: Job, *, with_output: bool) -> dict[str, Any]:
        """The job as an Operation over a GenerateContentBatch (camelCase; int64 as text)."""
        state = self._state(job)
        name = f"batches/{job.id}"
        meta: dict[str, Any] = {
            "@type": TYPE + "GenerateContentBatch",
            "model": f"models/{job.model}",
        }
        if job.display_name:
            meta["displayName"] = job.display_name
        if job.from_file:
            meta["inputConfig"] = {"fileName": job.from_file}
        meta["createTime"] = rfc3339(job.created)
        meta["updateTime"] = rfc3339(job.ended_at or self.core.clock())
        if job.ended_at is not None:
            meta["endTime"] = rfc3339(job.ended_at)
        meta["batchStats"] = self._stats(job, state)
        meta.update(state=f"BATCH_STATE_{state}", name=name)
        operation: dict[str, Any] = {"name": name, "metadata": meta}
        if state in ENDED:
            operation["done"] = True
        if with_output and self._shows_output(job, state):
            output = self._output(job)
            meta["output"] = output
            operation["response"] = {"@type": TYPE + "GenerateContentBatchOutput", **output}
        if job.error is not None:
            operation["error"] = job.error
        return operation

    def _stats(self, job: Job, state: str) -> dict[str, str]:
        """batchStats as proto3 JSON writes it: zero counts left out, int64 as strings."""
        done = job.answered + job.failed if state not in ("PENDING",) else 0
        counts = {
            "requestCount": job.requests,
            "pendingRequestCount": 0 if state in ENDED else job.requests - done,
            "successfulRequestCount": job.answered if state in _COUNTED else 0,
            "failedRequestCount": job.failed if state in _COUNTED else 0,
        }
        return {name: str(value) for name, value in counts.items() if value}

    def _shows_output(self, job: Job, state: str) -> bool:
        """A succeeded job's output (once attached), or a cancelled job's partial one."""
        if state == "CANCELLED":
            return job.responses_file is not None or bool(job.results)
        return state == "SUCCEEDED" and self._attached(job)

    def _attached(self, job: Job) -> bool:
        """Whether a succeeded job's output shows yet: `--batch-output-delay` after it ended
        (rule batch.output-delay; the job is SUCCEEDED and done all the while)."""
        ended = job.ended_at if job.ended_at is not None else self.core.clock()
        return self.core.clock() >= ended + self.options.batch_output_delay_seconds

    def _output(self, job: Job) -> dict[str, Any]:
        if job.responses_file is not None:
            return {"responsesFile": job.responses_file}
        return {"inlinedResponses": {"inlinedResponses": job.results}}

    def _job(self, request: web.Request) -> Job:
        batch_id = request.match_info["id"].removeprefix("batches/")
        job = self.jobs.get(batch_id)
        if job is None:
            raise errors.batch_not_found(batch_id)
        return job

    def _new_id(self) -> str:
        while True:
            batch_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))
            if batch_id not in self.jobs:
                return batch_id


def _page(request: web.Request, jobs: list[Job]) -> tuple[list[Job], str | None]:
    """One page of `jobs`, newest first, and the next page's token (pageSize, pageToken)."""
    query = request.query
    try:
        size = int(query.get("pageSize") or query.get("page_size") or 0) or 50
        start = int(query.get("pageToken") or query.get("page_token") or 0)
    except ValueError:
        raise errors.invalid_argument(
            "Invalid page token or size.", rule="batch.input", field="page_token"
        ) from None
    jobs = sorted(jobs, key=lambda j: (-j.created, j.id))
    token = str(start + size) if start + size < len(jobs) else None
    return jobs[start : start + size], token


def _listing(body: dict[str, Any], token: str | None) -> dict[str, Any]:
    """A list answer as proto3 JSON writes it: an empty list left out, the token when more."""
    body = {name: items for name, items in body.items() if items}
    return {**body, "nextPageToken": token} if token else body


def _batch_model(model_id: str, version: str, core: Core) -> Model:
    model = model_checks.known_model(
        model_id, version, "batchGenerateContent", table=core.models, on=core.today()
    )
    if not model.batch:
        raise errors.model_not_found(
            model_id, version, "batchGenerateContent", rule="model.no-batch"
        )
    return model


def _file_lines(data: bytes) -> Iterator[bytes]:
    """The non-blank lines of a JSONL file, one at a time."""
    for line in io.BytesIO(data):
        if line.strip():
            yield line


def _corrupted(results: list[Any], number: int | None) -> list[Any]:
    """The results with the `number`th (from 1) made unreadable (rule batch.corrupt-line): a
    file's line cut in half, as a truncated write leaves it; an inline answer's response
    replaced by the first half of its JSON text (a string where an object belongs)."""
    if number is None or number > len(results):
        return results
    results, index = list(results), number - 1
    results[index] = _cut(results[index])
    return results


def _cut(result: Any) -> Any:
    if isinstance(result, bytes):
        line = result.rstrip(b"\n")
        return line[: len(line) // 2] + b"\n"
    text = json.dumps(result.get("response") or result.get("error"))
    return {**{k: v for k, v in result.items() if k != "error"}, "response": text[: len(text) // 2]}


def _status(status: str, message: str, details: list[Any] | None = None) -> dict[str, Any]:
    """A google.rpc.Status as a line or a job carries it: the RPC code, not the HTTP one."""
    body: dict[str, Any] = {"code": RPC_CODES.get(status, RPC_CODES["UNKNOWN"]), "message": message}
    if details:
        body["details"] = details
    return body
