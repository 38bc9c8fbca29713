"""Batch Mode: the same files, keys, requests, parse and rows as an interactive run, bought as
Batch Mode jobs at half the price (`[api] mode = "batch"`, `pipeline run --batch`).

    walk (thread) ─► prepare, key, reuse ─► Submission: a JSONL line a request (the request
       (skips files done, or in a job          builder of an interactive call), cut into jobs by
        in flight)                             requests, bytes and tokens ─► upload, create
                                                                     │ (recorded first, see below)
    Jobs: poll with back-off (BATCH_STATE_* or JOB_STATE_*) ─► SUCCEEDED: download the results,
       join on key, parse, rows ─► sink (journal, parts) ─► delete the job's files
                                 ─► FAILED / CANCELLED / EXPIRED: reported, images left

Paid once (pipeline/state.py): a job's files are recorded before the job exists (phase staged),
its create call is marked (creating) before it is sent, with a display name unique to it, and
its name is saved the moment the answer comes (submitted). A rerun — or `pipeline batch
wait/status` — re-attaches to every job in flight instead of creating one: a staged job (never
sent) is dropped and its files are redone; a creating one is looked up by its display name
among the project's jobs, and adopted if it exists. Files of jobs in flight are skipped by the
walk like committed ones. `--submit-only` submits and exits; a later run (a cron job's next
run) collects, and submits what is new.

Per file, the interactive pieces: `images.prepare`, the key, `Answers` (the same bytes are
asked once: a twin joins its request, an answered one is copied), the task's request with the
image inline (small ones) or uploaded just before its job is created (big ones: uploads live 48
hours, a job up to 48 more), `tasks.read_answer`, `rows.answered_row` / `error_row`, the sink.
A per-request error is judged by `failures.judge` as an interactive one: the image's fault is an
error row, a transient one a `retryable` error row that the next run retries — in its batch, or
interactively when `[batch] retry = "interactive"` — and the run's own (a key, credits) stops
the run without rows. Rows bought here say `input_mode` "batch" and are billed at the batch
price (pipeline/cost.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from pipeline import exits, images
from pipeline.calls import (
    SMALL_BYTES,
    SMALL_PIXELS,
    Caller,
    RunStopped,
    inline_refusal,
    request_overhead,
    send_mode,
)
from pipeline.config import Config, ConfigError
from pipeline.dataset import DigestSet, ResumeIndex, load_resume_index
from pipeline.engines.single import (
    Producer,
    SingleProcess,
    _drain,
    _open_state,
    _output_dir,
    _signals,
    _sink_hint,
)
from pipeline.failures import STREAK, Action, Verdict, judge
from pipeline.gemini import GeminiClient, GeminiError, api_key_from_env
from pipeline.gemini.batches import JSONL_MIME, BatchJob, BatchResult, request_line
from pipeline.gemini.tokens import image_tokens, text_tokens
from pipeline.gemini.types import ImagePart
from pipeline.images import SourceChangedError
from pipeline.records import ImageItem, Parsed, SourceFile, fingerprint, make_key, storable
from pipeline.reuse import Answers
from pipeline.rows import Outcome, RunFacts, answered_row, copied_outcome_row, copied_row, error_row
from pipeline.runner import SMALL_FILE, ImageRunner, RowCounts, RunOptions
from pipeline.sink import ParquetSink, SinkFailed
from pipeline.state import IN_FLIGHT, BatchJobRecord, BatchRequestRecord, State
from pipeline.stop import Stop, Stopped
from pipeline.summary import RunSummary
from pipeline.tasks import read_answer
from pipeline.tasks.base import TaskSettings
from pipeline.uploads import Uploads

log = logging.getLogger(__name__)
T = TypeVar("T")
FOLDER = ".batch"  # in the output folder: JSONL inputs being built, results being read
BACKOFF = 1.5  # the wait between polls grows so while nothing changes (the SDK's multiplier)
RECORDS_AT_ONCE = 512  # request records written to state.sqlite in one transaction
Say = Callable[[str], None]


# ------------------------------------------------------------------------------ job settings
def task_json(settings: TaskSettings) -> str:
    """A job's [task] settings (all but the model table), to parse its answers later."""
    values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    values.pop("models")
    return json.dumps(values, sort_keys=True)


def task_settings(text: str) -> TaskSettings:
    values = json.loads(text)
    if values.get("labels") is not None:
        values["labels"] = tuple(values["labels"])
    return TaskSettings(**values)


class Counts:
    """What this run did with jobs, for the summary and the messages."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.created = 0
        self.requests = 0
        self.jsonl_bytes = 0
        self.collected = 0
        self.result_lines = 0
        self.missing = 0  # requests of collected jobs without a result line: left for later
        self.first_job_s: float | None = None  # from the start of the run to the first create
        self.ended: list[dict[str, Any]] = []  # FAILED / CANCELLED / EXPIRED / lost jobs
        self.elsewhere = 0  # jobs in flight at another endpoint (not followed by this run)

    def as_dict(self, in_flight: int) -> dict[str, Any]:
        return {
            "jobs_created": self.created,
            "requests_submitted": self.requests,
            "jsonl_bytes": self.jsonl_bytes,
            "jobs_collected": self.collected,
            "result_lines": self.result_lines,
            "requests_without_result": self.missing,
            "jobs_ended": self.ended,
            "jobs_in_flight": in_flight,
            "jobs_at_other_endpoints": self.elsewhere,
            "first_job_created_s": self.first_job_s,
        }


# ---------------------------------------------------------------------------------- the run
class BatchProcess(SingleProcess):
    """One run of a config in Batch Mode (see the module docstring)."""

    def __init__(self, config: Config, options: RunOptions) -> None:
        super().__init__(config, options)
        self.counts = Counts(time.monotonic())
        self.say: Say = _say if options.progress else _quiet

    async def run(self) -> RunSummary:
        out = _output_dir(self.config)
        self.stop = stop = Stop()
        async with contextlib.AsyncExitStack() as stack:
            state = _open_state(out, self.config)
            stack.callback(state.close)
            sink = await stack.enter_async_context(self._sink(out))
            self.summary.recovered = sink.rows_recovered
            index = await asyncio.to_thread(
                load_resume_index,
                out,
                key_suffix=self.facts.key_suffix,
                retry_errors=self.options.retry_errors,
            )
            client = await stack.enter_async_context(await self._client(stack))
            caller = self._caller(client, state, stop)
            answers = Answers(str(out), index.ok_keys, sink.flush)
            runner = ImageRunner(self.config, self.facts, caller=caller, answers=answers, sink=sink)
            jobs = Jobs(state, client, sink, stop, self._following(out, runner.counts, answers))
            await jobs.recover()
            with _signals(asyncio.get_running_loop(), stop, sink):
                await self._work(jobs, runner, index, state, out)
            self._summarise_batch(jobs, runner, caller, sink)
        self.summary.write(out)
        return self.summary

    def _following(self, out: Path, counts: RowCounts, answers: Answers) -> Following:
        batch = self.config.batch
        return Following(
            folder=out / FOLDER,
            base_url=self.config.api.base_url,
            run_id=self.run_id,
            own=(self.facts.key_suffix, self.config.task),
            counts=counts,
            batch=self.counts,
            answers=answers,
            retry_interactively=batch.retry == "interactive",
            poll=(batch.poll_seconds, batch.max_poll_seconds),
            max_jobs=batch.max_jobs,
            say=self.say,
            wait_for_room=not self.options.submit_only,
        )

    async def _work(
        self, jobs: Jobs, runner: ImageRunner, index: ResumeIndex, state: State, out: Path
    ) -> None:
        """Collect what ended, submit what is new, then follow the jobs until they end (or,
        with --submit-only, leave them to a later run)."""
        stop = self.stop
        assert stop is not None
        # Taken before any collection: a file of a job collected from here on is committed
        # after the resume index was read, and must be skipped all the same.
        in_flight = DigestSet(state.in_flight_fingerprints())
        await guarded(stop, jobs.check_all())
        submission = Submission(self, jobs, runner, state, out / FOLDER)
        walked = asyncio.Event()
        following = asyncio.create_task(
            guarded(stop, jobs.follow(walked, wait_for_all=not self.options.submit_only))
        )
        try:
            await self._walk(submission, _Skip(index, in_flight))
        finally:
            walked.set()
            await submission.interactive.wait()
            await following

    async def _walk(self, submission: Submission, skip: _Skip) -> None:
        """The walking thread feeds `submission` in batches (as engines/single.py does)."""
        stop = self.stop
        assert stop is not None
        producer = Producer(self.config, skip, self.options.limit)
        self.producer = producer
        batches: asyncio.Queue[list[SourceFile] | None] = asyncio.Queue(maxsize=2)
        loop = asyncio.get_running_loop()
        walking = loop.run_in_executor(None, producer.run, loop, batches)
        try:
            while (batch := await batches.get()) is not None:
                for src in batch:
                    if not stop.running:
                        break
                    await guarded(stop, submission.take(src))
            if stop.running:
                await guarded(stop, submission.finish())
        finally:
            producer.halt.set()
            _drain(batches)
            await walking
            await submission.discard()

    def _summarise_batch(
        self, jobs: Jobs, runner: ImageRunner, caller: Caller, sink: ParquetSink
    ) -> None:
        s, stop = self.summary, self.stop
        assert stop is not None
        producer = getattr(self, "producer", None)
        s.finished_at = datetime.now(UTC).isoformat()
        s.seen, s.skipped = (producer.seen, producer.skipped) if producer else (0, 0)
        counts = runner.counts
        s.rows, s.tokens, s.copied = counts.rows, counts.tokens, counts.copied
        s.cost_usd = round(counts.cost_usd, 6)
        s.api_calls, s.retries = caller.counters.api_calls, caller.counters.retries
        s.throttled, s.unstorable = caller.counters.throttled, sink.unstorable
        s.uploads, s.uploads_reused = caller.uploads.made, caller.uploads.reused
        in_flight = jobs.in_flight_count()
        s.batch = self.counts.as_dict(in_flight)
        _stop_reason(stop, self.counts, in_flight, self.options.submit_only)
        if stop.reason:
            s.stop_reason, s.resume_hint, s.exit_code = stop.reason, stop.hint, stop.exit_code
        s.settle_exit_code()
        if not stop.reason and in_flight:
            s.resume_hint = _in_flight_hint(in_flight, self.config.output.dir)


def _stop_reason(stop: Stop, counts: Counts, in_flight: int, submit_only: bool) -> None:
    """Jobs that ended without rows leave work for the next run: the run says so (exit 3)."""
    if counts.ended and stop.reason is None:
        first = counts.ended[0]
        more = f" (and {len(counts.ended) - 1} more)" if len(counts.ended) > 1 else ""
        stop.drain(
            f"batch job {first['name']} ended {first['state']}{more}: its images are left for "
            "the next run",
            "rerun the same command to send them again",
        )
    elif in_flight and not submit_only and stop.reason is None:
        stop.drain(f"{in_flight} batch jobs are still in flight", None)


def _in_flight_hint(in_flight: int, output_dir: str) -> str:
    return (
        f"{in_flight} batch job(s) in flight: a later run (or `pipeline batch wait {output_dir}`) "
        "collects them"
    )


async def guarded(stop: Stop, work: Awaitable[Any]) -> None:
    """Await `work`; the run's failures it finds stop the run (drain), a stop just ends it."""
    try:
        await work
    except Stopped:
        pass
    except RunStopped as exc:
        stop.drain(exc.verdict.reason, exc.verdict.hint, exc.verdict.exit_code)
    except SinkFailed as exc:
        stop.drain(f"the output cannot be written: {exc}", _sink_hint())


class _Skip:
    """The walk's test: done (the resume index), or in a batch job in flight."""

    def __init__(self, index: ResumeIndex, in_flight: DigestSet) -> None:
        self.index = index
        self.in_flight = in_flight

    def is_done(self, image_root: str, image_path: str, size: int, mtime_ns: int) -> bool:
        if self.index.is_done(image_root, image_path, size, mtime_ns):
            return True
        digest = fingerprint(image_root, image_path, size, mtime_ns, self.index.key_suffix)
        return digest in self.in_flight


# ------------------------------------------------------------------------------- submission
class JobFile:
    """A job being built (phase staged): its JSONL on disk, its records, its size so far."""

    def __init__(self, state: State, folder: Path, job: int, display_name: str) -> None:
        self.state = state
        self.job = job
        self.display_name = display_name
        self.path = folder / f"{display_name}.jsonl"
        self.requests = 0
        self.bytes = 0
        self.tokens = 0
        self.keys: set[str] = set()
        self._records: list[BatchRequestRecord] = []
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close()

    def fits(self, size: int, tokens: int, batch: Any) -> bool:
        """Whether one more request of `size` bytes and `tokens` input tokens fits; a job of
        one request always does (the service then judges it)."""
        if not self.requests:
            return True
        within_tokens = batch.max_job_tokens is None or self.tokens + tokens <= batch.max_job_tokens
        return (
            self.requests < batch.requests_per_job
            and self.bytes + size <= batch.max_job_mb * 1024 * 1024
            and within_tokens
        )

    def add(self, line: bytes, tokens: int, record: BatchRequestRecord) -> None:
        self._file.write(line)
        self.requests += 1
        self.bytes += len(line)
        self.tokens += tokens
        self.keys.add(record.key)
        self.attach(record)

    def attach(self, record: BatchRequestRecord) -> None:
        """A file the job answers: the payer of a request, or a twin with the same bytes."""
        self._records.append(record)
        if len(self._records) >= RECORDS_AT_ONCE:
            self.save()

    def save(self) -> None:
        self.state.add_batch_requests(self._records)
        self._records = []

    def close(self) -> None:
        """Every record saved, the JSONL whole on disk."""
        self.save()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
            self.path.unlink()


class Submission:
    """Turns the walk's files into requests of jobs, and creates each job when it is full."""

    def __init__(
        self, run: BatchProcess, jobs: Jobs, runner: ImageRunner, state: State, folder: Path
    ) -> None:
        self.config = run.config
        self.facts = run.facts
        self.request = run.request
        self.stop = run.stop
        self.counts = run.counts
        self.say = run.say
        self.jobs = jobs
        self.runner = runner
        self.state = state
        self.folder = folder
        self.client = jobs.client
        self.uploads = Uploads(jobs.client, state)
        self.interactive = Interactive(runner, run.stop, run.config.limits.concurrency)
        self.retries = DigestSet(state.batch_retries())
        self.overhead = request_overhead(self.request)
        self.prompt_tokens = text_tokens(
            (self.request.system_instruction or "") + self.request.prompt
        )
        self.job: JobFile | None = None
        self._seq = 0
        folder.mkdir(exist_ok=True)

    # -------------------------------------------------------------------------- one file
    async def take(self, src: SourceFile) -> None:
        """One file of the walk: a row now (unusable, or answered before), a twin of a request
        already asked, an interactive retry, or a new request."""
        if src.error:
            item = ImageItem(source=src, error=src.error)
            return await self._row(error_row(item, src.error, self.facts))
        digest = fingerprint(src.root, src.rel_path, src.size, src.mtime_ns, self.facts.key_suffix)
        if digest in self.retries and self.config.batch.retry == "interactive":
            self.state.forget_batch_retry(digest)
            return await self.interactive.submit(src)
        item = await _offload(
            src.size > SMALL_FILE,
            images.prepare,
            src,
            max_side=self.config.images.max_side,
            verify=self.config.images.verify,
        )
        if item.error:
            return await self._row(error_row(item, item.error, self.facts))
        key = make_key(item.sha256, self.facts.key_suffix)
        if not await self._reused(item, key):
            await self._request(item, key, digest)

    async def _reused(self, item: ImageItem, key: str) -> bool:
        """Copied from an answer of this or an earlier run (as ImageRunner does)."""
        found = await self.runner.answers.find(key, item.sha256)
        if found is not None and found.outcome is not None:
            await self._row(copied_outcome_row(item, key, found.outcome, self.facts), copied=True)
        elif found is not None and found.row is not None:
            await self._row(copied_row(found.row, item, key, self.facts), copied=True)
        return found is not None

    async def _request(self, item: ImageItem, key: str, digest: bytes) -> None:
        est_image = image_tokens(
            self.config.task.spec, item.sent_width, item.sent_height, self.request.media_resolution
        )
        record = _record(0, key, digest, item, est_image, est_image + self.prompt_tokens)
        twin = self._job_asking(key)
        if twin is not None:  # the same bytes are asked already: this file joins the request
            return self._attach(twin, record)
        mode = send_mode(self.config, item, self.overhead)
        if mode is None:
            return await self._row(error_row(item, inline_refusal(self.config), self.facts))
        size = self.overhead + ((item.send_size + 2) // 3 * 4 if mode == "inline" else 0)
        job = await self._job_for(size, record.est_prompt_tokens)
        line = await self._line(item, key, mode, job)
        if line is not None:
            job.add(line, record.est_prompt_tokens, replace(record, job=job.job))

    def _job_asking(self, key: str) -> int | None:
        if self.job is not None and key in self.job.keys:
            return self.job.job
        return self.state.in_flight_job_of(key)

    def _attach(self, job: int, record: BatchRequestRecord) -> None:
        record = replace(record, job=job)
        if self.job is not None and job == self.job.job:
            self.job.attach(record)
        else:
            self.state.add_batch_requests([record])

    async def _line(self, item: ImageItem, key: str, mode: str, job: JobFile) -> bytes | None:
        """The request's JSONL line, its image inline or uploaded now; None when the image
        turned out unusable (its error row is written)."""
        try:
            if mode == "inline":
                data = await _offload(item.send_size > SMALL_BYTES * 16, images.read_bytes, item)
                part = ImagePart(item.mime_type, data=data)
            else:
                info = await self.stop.call(self.uploads.upload_unrecorded(item))
                self.state.add_batch_file(job.job, info.name)
                part = ImagePart(info.mime_type or item.mime_type, file_uri=info.uri)
        except (SourceChangedError, OSError) as exc:
            await self._row(error_row(item, f"cannot read the file: {exc}", self.facts))
            return None
        except GeminiError as exc:
            await self._upload_failed(item, exc)
            return None
        return request_line(key, replace(self.request, images=(part,)))

    async def _upload_failed(self, item: ImageItem, error: GeminiError) -> None:
        verdict = judge(error, uploaded=False)
        if verdict.action == Action.RUN:
            raise RunStopped(verdict)
        key = make_key(item.sha256, self.facts.key_suffix)
        parsed = Parsed("error", error=f"upload failed: {verdict.reason}")
        retryable = verdict.action == Action.RETRY
        outcome = Outcome(parsed, None, 1, 0.0, "upload", 0, 0, retryable)
        await self._row(answered_row(item, key, outcome, self.facts))

    async def _row(self, row: dict[str, Any], *, copied: bool = False) -> None:
        await self.runner.sink.add(row)
        self.runner.counts.add(row, copied=copied)

    # -------------------------------------------------------------------------- the jobs
    async def _job_for(self, size: int, tokens: int) -> JobFile:
        """The job this request goes in: the open one if it fits, else a new one (the full one
        is created first, and a new one waits for room among the jobs in flight)."""
        if self.job is not None and self.job.fits(size, tokens, self.config.batch):
            return self.job
        if self.job is not None:
            await self._create(self.job)
        await self.jobs.room()
        self._seq += 1
        display_name = f"gvp-{self.facts.run_id}-{self._seq:04d}"
        job_id = self.state.add_batch_job(
            display_name,
            settings_hash=self.facts.key_suffix,
            task=task_json(self.config.task),
            model=self.config.api.model,
            base_url=self.config.api.base_url,
            version=self.config.api.version,
        )
        self.job = JobFile(self.state, self.folder, job_id, display_name)
        return self.job

    async def finish(self) -> None:
        """The walk is over: create the last job."""
        if self.job is not None and self.job.requests:
            await self._create(self.job)

    async def discard(self) -> None:
        """A job never created (the run stopped): dropped, its files sent again next time."""
        if self.job is None:
            return
        job, self.job = self.job, None
        job.discard()
        await self.jobs.drop(job.job)

    async def _create(self, job: JobFile) -> None:
        """Upload the JSONL, then create the job (its name saved the moment it comes)."""
        job.close()
        self.job = None
        try:
            info = await self.stop.call(
                self.client.upload_file(job.path, JSONL_MIME, display_name=job.display_name)
            )
            self.state.add_batch_file(job.job, info.name)
            if info.state != "ACTIVE":
                info = await self.stop.call(self.client.wait_until_active(info.name))
        except GeminiError as exc:
            await self.jobs.drop(job.job)
            verdict = _job_verdict(exc, "the batch input file could not be uploaded")
            raise RunStopped(verdict) from None
        finally:
            job.discard()  # the service has the file now (or never will)
        self.state.update_batch_job(
            job.job, phase="creating", requests=job.requests, est_tokens=job.tokens
        )
        created = await self.jobs.create(
            job.job, job.display_name, self.config.api.model, info.name
        )
        self._created(created, job)

    def _created(self, created: BatchJob, job: JobFile) -> None:
        counts = self.counts
        counts.created += 1
        counts.requests += job.requests
        counts.jsonl_bytes += job.bytes
        if counts.first_job_s is None:
            counts.first_job_s = round(time.monotonic() - counts.started, 3)
        self.say(f"batch job {created.name} created: {job.requests} requests ({job.display_name})")


def _record(
    job: int, key: str, digest: bytes, item: ImageItem, est_image: int, est_prompt: int
) -> BatchRequestRecord:
    src = item.source
    return BatchRequestRecord(
        job=job,
        key=key,
        fingerprint=digest,
        root=storable(src.root),
        path=storable(src.rel_path),
        size=src.size,
        mtime_ns=src.mtime_ns,
        sha256=item.sha256,
        mime_type=item.mime_type,
        width=item.width,
        height=item.height,
        est_image_tokens=est_image,
        est_prompt_tokens=est_prompt,
    )


class Interactive:
    """Files retried interactively (`[batch] retry = "interactive"`): ImageRunner.process, at
    most `concurrency` at once."""

    def __init__(self, runner: ImageRunner, stop: Stop | None, concurrency: int) -> None:
        self.runner = runner
        self.stop = stop
        self.room = asyncio.Semaphore(concurrency)
        self.tasks: set[asyncio.Task[None]] = set()

    async def submit(self, src: SourceFile) -> None:
        await self.room.acquire()
        task = asyncio.create_task(self._process(src))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _process(self, src: SourceFile) -> None:
        assert self.stop is not None
        try:
            await guarded(self.stop, self.runner.process(src))
        finally:
            self.room.release()

    async def wait(self) -> None:
        if self.tasks:
            await asyncio.gather(*self.tasks)


# ------------------------------------------------------------------------------------- jobs
@dataclasses.dataclass
class Following:
    """What following jobs needs from the run (or from `pipeline batch wait`)."""

    folder: Path
    base_url: str  # only jobs created at this endpoint are followed
    run_id: str
    own: tuple[str, TaskSettings] | None  # (settings hash, [task]) of the run's own config
    counts: RowCounts
    batch: Counts
    answers: Answers | None
    retry_interactively: bool
    poll: tuple[float, float]  # the first and the longest wait between polls
    max_jobs: int
    say: Say
    wait_for_room: bool = True  # False (--submit-only): at the cap of jobs, stop submitting


class Jobs:
    """The output's jobs in flight at one endpoint: re-attached, polled, collected, ended."""

    def __init__(
        self, state: State, client: GeminiClient, sink: ParquetSink, stop: Stop, how: Following
    ) -> None:
        self.state = state
        self.client = client
        self.sink = sink
        self.stop = stop
        self.how = how
        self.ended = asyncio.Event()  # set whenever a job leaves flight: room for another

    def in_flight(self) -> list[BatchJobRecord]:
        jobs = self.state.batch_jobs(IN_FLIGHT)
        return [job for job in jobs if job.base_url == self.how.base_url]

    def in_flight_count(self) -> int:
        return len(self.in_flight())

    async def drop(self, job: int) -> None:
        """A job that was never created: its files deleted, then the job forgotten (its
        images are sent again). Files the service would not delete keep the job recorded
        (staged) for the next run's `recover` to try again."""
        await self._delete_files(job)
        if not self.state.batch_files(job):
            self.state.forget_batch_job(job)

    # ----------------------------------------------------------------------- re-attaching
    async def recover(self) -> None:
        """Before anything new: drop staged jobs of a killed run (never sent; their files are
        sent again), find the jobs whose create answer was lost, delete leftover files."""
        elsewhere = [j for j in self.state.batch_jobs(IN_FLIGHT) if j.base_url != self.how.base_url]
        self.how.batch.elsewhere = len(elsewhere)
        for job in self.state.batch_jobs(("staged",)):
            with contextlib.suppress(OSError):
                (self.how.folder / f"{job.display_name}.jsonl").unlink()
            await self.drop(job.id)
        creating = [job for job in self.in_flight() if job.phase == "creating"]
        if creating:
            await self._adopt(creating)
        for job in self.state.batch_jobs(("collected", "ended")):
            await self._delete_files(job.id)

    async def _adopt(self, creating: list[BatchJobRecord]) -> None:
        remote = {job.display_name: job for job in await self._call(self.client.batches.list())}
        for job in creating:
            found = remote.get(job.display_name)
            if found is not None:
                self.state.update_batch_job(job.id, phase="submitted", name=found.name)
                self.how.say(f"batch job {found.name} re-attached ({job.display_name})")
            else:  # never created: its files are sent again
                await self.drop(job.id)

    async def create(self, job: int, display_name: str, model: str, file_name: str) -> BatchJob:
        """Create a job; on a lost answer look for it by display name before trying again. A
        429 (the service's job or enqueued-token caps) waits for one of ours to end."""
        batches = self.client.batches
        for attempt in range(1, 1 + ATTEMPTS):
            try:
                created = await self.stop.call(
                    batches.create(model, file_name=file_name, display_name=display_name)
                )
            except GeminiError as exc:
                found = await self._find(display_name) if exc.retryable else None
                if found is None and (not exc.retryable or attempt == ATTEMPTS):
                    await self.drop(job)
                    verdict = _job_verdict(exc, "the service refused the batch job")
                    raise RunStopped(verdict) from None
                if found is None:
                    await self._wait_for_room(exc, attempt)
                    continue
                created = found
            self.state.update_batch_job(
                job, phase="submitted", name=created.name, service_state=created.state
            )
            return created
        raise AssertionError("unreachable")

    async def _find(self, display_name: str) -> BatchJob | None:
        with contextlib.suppress(GeminiError):
            for job in await self.stop.call(self.client.batches.list()):
                if job.display_name == display_name:
                    return job
        return None

    async def _wait_for_room(self, error: GeminiError, attempt: int) -> None:
        """After a retryable refusal: until one of our jobs ends, or a backed-off pause."""
        delay = min(self.how.poll[1], self.how.poll[0] * BACKOFF ** (attempt - 1))
        self.how.say(f"batch job creation refused ({error.status}); trying again in {delay:g}s")
        self.ended.clear()
        with contextlib.suppress(TimeoutError):
            await self.stop.until(asyncio.wait_for(self.ended.wait(), delay))

    async def room(self) -> None:
        """Wait until fewer than `[batch] max_jobs` jobs are in flight here (with
        --submit-only, stop submitting instead: the rest waits for the next run)."""
        while self.in_flight_count() >= self.how.max_jobs:
            if not self.how.wait_for_room:
                self.stop.drain(
                    f"{self.how.max_jobs} batch jobs are in flight ([batch] max_jobs): the "
                    "remaining files wait for a later run",
                    "rerun once jobs have ended",
                )
                raise Stopped
            self.ended.clear()
            await self.stop.until(self.ended.wait())

    # -------------------------------------------------------------------------- following
    async def follow(self, walked: asyncio.Event, *, wait_for_all: bool) -> None:
        """Poll the jobs in flight, backing off while nothing changes, until the walk is over
        and (with `wait_for_all`) every job here has ended. A stop ends it at once."""
        first, longest = self.how.poll
        delay = first
        with contextlib.suppress(Stopped):
            while True:
                if walked.is_set() and (not wait_for_all or not self.in_flight()):
                    return
                await self._pause(walked, delay)
                changed = await self.check_all()
                delay = first if changed else min(longest, delay * BACKOFF)

    async def _pause(self, walked: asyncio.Event, delay: float) -> None:
        """`delay` seconds, ended early by the end of the walk (then the last poll comes at
        once). Raises Stopped when the run stops."""
        if walked.is_set():
            return await self.stop.sleep(delay)
        with contextlib.suppress(TimeoutError):
            await self.stop.until(asyncio.wait_for(walked.wait(), delay))

    async def check_all(self) -> bool:
        """One pass over the jobs in flight; True when one of them ended."""
        changed = False
        for job in self.in_flight():
            if job.phase == "submitted" and job.name:
                changed |= await self._check(job)
        return changed

    async def _check(self, job: BatchJobRecord) -> bool:
        try:
            remote = await self._call(self.client.batches.get(job.name or ""))
        except GeminiError as exc:
            if exc.kind != "not_found":
                return False  # a passing failure: the next pass asks again
            await self._end(job, "LOST", "the service no longer knows this job")
            return True
        if remote.state != job.service_state:
            self.state.update_batch_job(job.id, service_state=remote.state)
        if not remote.done:
            return False
        if remote.state == "JOB_STATE_SUCCEEDED":
            await self._collect(job, remote)
        else:
            why = remote.error.message if remote.error else "no reason given"
            await self._end(job, remote.state.removeprefix("JOB_STATE_"), why)
        return True

    async def _call(self, call: Awaitable[T]) -> T:
        """A job-level call: the run's own failures (a key, credits) stop the run."""
        try:
            return await self.stop.call(call)
        except GeminiError as exc:
            verdict = judge(exc, uploaded=False)
            if verdict.action == Action.RUN and exc.kind != "not_found":
                raise RunStopped(verdict) from None
            raise

    # ------------------------------------------------------------------------- collecting
    async def _collect(self, job: BatchJobRecord, remote: BatchJob) -> None:
        """Rows for every result of a succeeded job, committed; then its files deleted."""
        reader = Collector(self, job, remote)
        try:
            await reader.read()
        finally:
            reader.clean()
        if self.stop.state == "abandoning":
            return  # not recorded: the next run collects it again (no new call, no new cost)
        await self.sink.flush()
        self.state.update_batch_job(job.id, phase="collected", service_state=remote.state)
        await self._delete_files(job.id)
        self.how.batch.collected += 1
        self.how.say(f"batch job {remote.name} {remote.state}: {reader.summary()}")
        self.ended.set()
        if reader.run_failure is not None:
            raise RunStopped(reader.run_failure)

    async def _end(self, job: BatchJobRecord, state: str, why: str) -> None:
        """A job that ended without results: reported; its files are sent again next time."""
        self.state.update_batch_job(job.id, phase="ended", service_state=state, message=why)
        await self._delete_files(job.id)
        report = {"name": job.name, "state": state, "requests": job.requests, "why": why}
        self.how.batch.ended.append(report)
        self.how.say(
            f"batch job {job.name} ended {state} ({why}): its {job.requests} requests are left "
            "for the next run"
        )
        self.ended.set()

    async def _delete_files(self, job: int) -> None:
        """Delete a job's Files API files (its JSONL, its images); one already gone is
        forgotten, one the service refuses to delete stays recorded for a later try."""
        for name in self.state.batch_files(job):
            try:
                await self.stop.call(self.client.delete_file(name))
            except GeminiError as exc:
                if exc.code not in (403, 404):
                    continue
            except Stopped:
                return
            self.state.forget_batch_file(name)


ATTEMPTS = 6  # tries of a job's creation (transient failures, the service's caps)


def _job_verdict(error: GeminiError, what: str) -> Verdict:
    """How a job-level failure stops the run: the run's own failure as judged, else this."""
    verdict = judge(error, uploaded=False)
    if verdict.action == Action.RUN:
        return verdict
    return Verdict(Action.RUN, f"{what}: {verdict.reason}", exits.STOPPED, "rerun later")


class Collector:
    """Reads one succeeded job's results into rows (see Jobs._collect)."""

    def __init__(self, jobs: Jobs, job: BatchJobRecord, remote: BatchJob) -> None:
        self.jobs = jobs
        self.job = job
        self.remote = remote
        self.how = jobs.how
        self.path = self.how.folder / f"{job.display_name}.results.jsonl"
        self.settings, self.facts = self._parsing()
        self.latency_ms = _age_ms(job.created_at)
        self.answered: set[str] = set()
        self.unknown = 0
        self.statuses: dict[str, int] = {}
        self.run_failure: Verdict | None = None  # every line failed alike: the run's failure

    def _parsing(self) -> tuple[TaskSettings, RunFacts]:
        """How this job's answers are read: as the run's own config when it made the job, else
        with the job's recorded [task] settings (an answer is paid for whoever reads it)."""
        job, own = self.job, self.how.own
        if own is not None and own[0] == job.settings_hash:
            settings = own[1]
        else:
            settings = task_settings(job.task)
        return settings, RunFacts(self.how.run_id, settings.kind, job.model, job.settings_hash)

    async def read(self) -> None:
        self.how.folder.mkdir(exist_ok=True)
        jobs, remote = self.jobs, self.remote
        results: Callable[[], Iterable[BatchResult]] = lambda: remote.inlined  # noqa: E731
        if remote.responses_file:
            await jobs._call(jobs.client.batches.download(remote.responses_file, self.path))
            results = lambda: jobs.client.batches.results(self.path)  # noqa: E731
        self.run_failure = self._common_failure(results)
        for result in results():
            if jobs.stop.state == "abandoning":
                return
            await self._result(result)
        missing = set(jobs.state.batch_request_keys(self.job.id)) - self.answered
        self.how.batch.missing += len(missing)

    def _common_failure(self, results: Callable[[], Iterable[BatchResult]]) -> Verdict | None:
        """A job whose every line (STREAK at least) failed the same way did not fail for its
        images: it is the run's failure (a setting the model refuses, say), as `Health` judges
        a stream of interactive attempts. Its lines then become no rows. Read first (a second
        pass over the file) only when the job's stats say nothing succeeded."""
        stats = self.remote.stats
        if stats.succeeded or stats.failed < STREAK:
            return None
        signatures = set()
        first: GeminiError | None = None
        for result in results():
            if result.error is None:
                return None
            first = first or result.error
            signatures.add((result.error.kind, result.error.status, result.error.message[:200]))
        if first is None or len(signatures) != 1:
            return None
        verdict = judge(first, uploaded=True)
        if verdict.action not in (Action.IMAGE, Action.RUN):
            return None  # transient failures stay retryable rows
        why = f"every request of the batch job failed the same way: {verdict.reason}"
        return Verdict(Action.RUN, why, exits.USAGE)

    async def _result(self, result: BatchResult) -> None:
        records = self.jobs.state.batch_requests(self.job.id, result.key) if result.key else []
        if not records:
            self.unknown += 1
            return
        self.answered.add(records[0].key)
        self.how.batch.result_lines += 1
        outcome = await self._outcome(result, records[0])
        if outcome is None:
            return  # the run's failure: no row, the files are sent again next time
        for number, record in enumerate(records):
            item = _item(record)
            made = answered_row if number == 0 else copied_outcome_row
            row = made(item, record.key, outcome, self.facts)
            await self.jobs.sink.add(row)
            self.how.counts.add(row, copied=number > 0)
            self.statuses[row["status"]] = self.statuses.get(row["status"], 0) + 1
        self._remember(records, outcome)

    async def _outcome(self, result: BatchResult, record: BatchRequestRecord) -> Outcome | None:
        estimates = (record.est_image_tokens, record.est_prompt_tokens)
        if result.response is not None:
            item = _item(record)
            big = item.width * item.height > SMALL_PIXELS or len(result.response.raw) > SMALL_BYTES
            parsed = await _offload(
                big, read_answer, result.response, item.width, item.height, self.settings
            )
            return Outcome(parsed, result.response, 1, self.latency_ms, "batch", *estimates)
        assert result.error is not None
        # uploaded=True: a line refused for its file (403) lost an uploaded image: send again
        verdict = judge(result.error, uploaded=True)
        if verdict.action == Action.RUN or self.run_failure is not None:
            self.run_failure = self.run_failure or verdict
            return None
        if verdict.action == Action.BLOCKED:
            parsed = Parsed("blocked", error=verdict.reason)
            return Outcome(parsed, None, 1, self.latency_ms, "batch", *estimates)
        retryable = verdict.action in (Action.RETRY, Action.REUPLOAD)
        parsed = Parsed("error", error=verdict.reason)
        return Outcome(parsed, None, 1, self.latency_ms, "batch", *estimates, retryable)

    def _remember(self, records: list[BatchRequestRecord], outcome: Outcome) -> None:
        if self.how.answers is not None:
            self.how.answers.remember(records[0].key, records[0].sha256, outcome)
        if outcome.retryable and self.how.retry_interactively:
            self.jobs.state.add_batch_retries(record.fingerprint for record in records)

    def summary(self) -> str:
        rows = ", ".join(f"{status} {count}" for status, count in sorted(self.statuses.items()))
        missing = self.job.requests - len(self.answered)
        extra = f"; {missing} requests without a result, left for the next run" if missing else ""
        return f"rows committed ({rows or 'none'}){extra}"

    def clean(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


def _item(record: BatchRequestRecord) -> ImageItem:
    """The image a row is about, as recorded when its request was made."""
    source = SourceFile(
        path="", root=record.root, rel_path=record.path, size=record.size, mtime_ns=record.mtime_ns
    )
    return ImageItem(
        source=source,
        sha256=record.sha256,
        mime_type=record.mime_type,
        width=record.width,
        height=record.height,
    )


def _age_ms(created_at: str) -> float:
    """From a job's record to now: the latency of each of its answers."""
    with contextlib.suppress(ValueError):
        return (datetime.now(UTC) - datetime.fromisoformat(created_at)).total_seconds() * 1000
    return 0.0


async def _offload(big: bool, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call `fn` in a worker thread when the job is big, else right here."""
    if big:
        return await asyncio.to_thread(fn, *args, **kwargs)
    return fn(*args, **kwargs)


def _say(text: str) -> None:
    if sys.stderr is not None:
        with contextlib.suppress(OSError, ValueError):
            print(text, file=sys.stderr, flush=True)


def _quiet(text: str) -> None:
    log.debug(text)


# --------------------------------------------------------------- pipeline batch OUT commands
def _endpoints(
    state: State, config: Config | None
) -> Iterator[tuple[str, str, list[BatchJobRecord]]]:
    """The jobs in flight by (base URL, version), as they were created."""
    groups: dict[tuple[str, str], list[BatchJobRecord]] = {}
    for job in state.batch_jobs(IN_FLIGHT):
        groups.setdefault((job.base_url, job.version), []).append(job)
    for (base_url, version), jobs in sorted(groups.items()):
        yield base_url, version, jobs


def _client(base_url: str, version: str, config: Config | None) -> GeminiClient:
    key = api_key_from_env()
    if not key:
        raise ConfigError(
            f"batch jobs at {base_url}: set GOOGLE_API_KEY (or GEMINI_API_KEY) in the environment"
        )
    api = config.api if config is not None else None
    return GeminiClient(
        key,
        base_url=base_url,
        version=version,
        timeout=api.timeout if api else 120.0,
        allow_insecure_http=api.allow_insecure_http if api else False,
    )


async def status(output_dir: str, config: Config | None = None) -> dict[str, Any]:
    """Every job of the output, the ones in flight as the service sees them now."""
    state = _existing_state(output_dir)
    try:
        live: dict[int, dict[str, Any]] = {}
        for base_url, version, jobs in _endpoints(state, config):
            live.update(await _live(base_url, version, jobs, config))
        return {
            "output_dir": output_dir,
            "jobs": [_job_report(job, live.get(job.id)) for job in state.batch_jobs()],
        }
    finally:
        state.close()


async def _live(
    base_url: str, version: str, jobs: list[BatchJobRecord], config: Config | None
) -> dict[int, dict[str, Any]]:
    if base_url == "local":
        return {job.id: {"error": "created by an in-process local server (gone)"} for job in jobs}
    found: dict[int, dict[str, Any]] = {}
    async with _client(base_url, version, config) as client:
        for job in jobs:
            if not job.name:
                continue
            try:
                remote = await client.batches.get(job.name)
            except GeminiError as exc:
                found[job.id] = {"error": str(exc)}
                continue
            found[job.id] = {"state": remote.state, **dataclasses.asdict(remote.stats)}
    return found


def _job_report(job: BatchJobRecord, live: dict[str, Any] | None) -> dict[str, Any]:
    report = {
        "name": job.name,
        "display_name": job.display_name,
        "phase": job.phase,
        "state": job.service_state,
        "requests": job.requests,
        "est_input_tokens": job.est_tokens,
        "model": job.model,
        "base_url": job.base_url,
        "created_at": job.created_at,
        "message": job.message,
    }
    return {**report, "live": live} if live is not None else report


def format_status(report: dict[str, Any]) -> str:
    jobs = report["jobs"]
    if not jobs:
        return f"{report['output_dir']}: no batch jobs"
    lines = [f"{report['output_dir']}: {len(jobs)} batch job(s)"]
    for job in jobs:
        live = job.get("live") or {}
        now = live.get("state") or job["state"] or "-"
        progress = ""
        if live.get("requests"):
            done = live["requests"] - live["pending"]
            progress = f", {done}/{live['requests']} done"
        problem = f" ({live['error']})" if "error" in live else ""
        message = f": {job['message']}" if job["message"] else ""
        lines.append(
            f"  {job['name'] or job['display_name']}  {job['phase']}  {now}{progress}  "
            f"{job['requests']} requests, created {job['created_at'][:19]}{message}{problem}"
        )
    return "\n".join(lines)


async def cancel(output_dir: str, config: Config | None = None) -> list[dict[str, Any]]:
    """Ask the service to cancel every job in flight; the next run (or `batch wait`) reports
    them and sends their images again."""
    state = _existing_state(output_dir)
    done: list[dict[str, Any]] = []
    try:
        for base_url, version, jobs in _endpoints(state, config):
            if base_url == "local":
                continue
            async with _client(base_url, version, config) as client:
                for job in jobs:
                    if job.name:
                        done.append(await _cancel_one(client, job.name))
    finally:
        state.close()
    return done


async def _cancel_one(client: GeminiClient, name: str) -> dict[str, Any]:
    try:
        await client.batches.cancel(name)
        remote = await client.batches.get(name)
    except GeminiError as exc:
        return {"name": name, "error": str(exc)}
    return {"name": name, "state": remote.state}


async def wait(
    output_dir: str, config: Config | None = None, *, progress: bool = True
) -> RunSummary:
    """Follow every job in flight until it ends, collecting each as it succeeds; the jobs of
    an in-process local server (`base_url = "local"`) are gone with it: reported as lost."""
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ-batch-wait-") + secrets.token_hex(3)
    summary = RunSummary(
        run_id=run_id, config=config.source if config else "", settings_hash="", model="", task=""
    )
    counts = Counts(time.monotonic())
    rows = RowCounts()
    stop = Stop()
    out = Path(output_dir)
    say = _say if progress else _quiet
    async with contextlib.AsyncExitStack() as stack:
        state = _existing_state(output_dir)
        stack.callback(state.close)
        output = config.output if config else None
        sink = await stack.enter_async_context(
            ParquetSink(out, run_id, **({"rows_per_part": output.rows_per_part} if output else {}))
        )
        summary.recovered = sink.rows_recovered
        with _signals(asyncio.get_running_loop(), stop, sink):
            for base_url, version, _ in list(_endpoints(state, config)):
                how = Following(
                    folder=out / FOLDER,
                    base_url=base_url,
                    run_id=run_id,
                    own=None,
                    counts=rows,
                    batch=counts,
                    answers=None,
                    retry_interactively=bool(config and config.batch.retry == "interactive"),
                    poll=(config.batch.poll_seconds, config.batch.max_poll_seconds)
                    if config
                    else (10.0, 60.0),
                    max_jobs=100,
                    say=say,
                )
                await _wait_at(state, sink, stop, how, version, config)
        summary.finished_at = datetime.now(UTC).isoformat()
        summary.rows, summary.tokens, summary.copied = rows.rows, rows.tokens, rows.copied
        summary.cost_usd = round(rows.cost_usd, 6)
        summary.unstorable = sink.unstorable
        in_flight = len(state.batch_jobs(IN_FLIGHT))
        summary.batch = counts.as_dict(in_flight)
        _stop_reason(stop, counts, in_flight, submit_only=False)
        if stop.reason:
            summary.stop_reason, summary.resume_hint = stop.reason, stop.hint
            summary.exit_code = stop.exit_code
        summary.settle_exit_code()
    summary.write(out)
    return summary


async def _wait_at(
    state: State, sink: ParquetSink, stop: Stop, how: Following, version: str, config: Config | None
) -> None:
    if how.base_url == "local":
        for job in state.batch_jobs(IN_FLIGHT):
            if job.base_url == "local":
                state.update_batch_job(
                    job.id,
                    phase="ended",
                    service_state="LOST",
                    message="created by an in-process local server (gone)",
                )
                how.batch.ended.append(
                    {
                        "name": job.name,
                        "state": "LOST",
                        "requests": job.requests,
                        "why": "created by an in-process local server (gone)",
                    }
                )
        return
    async with _client(how.base_url, version, config) as client:
        jobs = Jobs(state, client, sink, stop, how)
        try:
            await jobs.recover()
            done = asyncio.Event()
            done.set()
            await jobs.check_all()
            await jobs.follow(done, wait_for_all=True)
        except RunStopped as exc:
            stop.drain(exc.verdict.reason, exc.verdict.hint, exc.verdict.exit_code)
        except Stopped:
            pass


def _existing_state(output_dir: str) -> State:
    if not (Path(output_dir) / "state.sqlite").is_file():
        raise ConfigError(f"{output_dir}: no state.sqlite here: not an output folder of a run")
    return State(output_dir)
