"""Batch Mode: the same files, keys, requests, parse and rows as an interactive run, bought as
Batch Mode jobs at half the price (`[api] mode = "batch"`, `pipeline run --batch`).

    walk (thread) ─► prepare, key, reuse ─► Submission: a JSONL line a request (the request
      (skips files done, or in a            builder of an interactive call), cut into jobs by
       job in flight)                       requests, bytes and tokens ─► upload it, create
                                                                               │
    pipeline/engines/batch/jobs.py: poll with back-off ─► collect the results into rows (the sink),
       delete the job's files; FAILED / CANCELLED / EXPIRED: reported, images left

Paid once (pipeline/output/state.py): a job's files are recorded before the job exists (staged),
its create call is marked (creating) before it is sent, under a display name unique to it, and
its name is saved the moment the answer comes (submitted). A rerun — or `pipeline batch wait` —
re-attaches to every job in flight instead of creating one: a staged job (never sent) is dropped
and its files are sent again; a creating one is looked up by its display name among the
project's jobs and adopted if it exists. Files of jobs in flight are skipped by the walk like
committed ones. `--submit-only` submits and exits; a later run (the next cron run) collects,
and submits what is new.

Per file, the interactive pieces: `images.prepare`, the key, `Answers` (the same bytes are asked
once: a twin joins its request, an answered one is copied), the task's request with the image
inline (small ones) or uploaded just before its job is created (big ones, by `[images] mode` and
the inline limit as interactively: uploads live 48 hours and a job may take 48 more, so none is
made hours ahead), then — when the job succeeds — `tasks.read_answer` and `rows.answered_row`.
Rows bought here say `input_mode` "batch" and are billed at the batch price (pipeline/cost.py).
Files whose batch answer was a retryable error are retried by the next run: in its batch, or
interactively (`[batch] retry = "interactive"`, through `ImageRunner`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from pipeline.config import BatchConfig, Config
from pipeline.engines.batch.jobs import (
    Counts,
    Following,
    Jobs,
    guarded,
    in_flight_hint,
    job_verdict,
    quiet,
    report_ended,
    say,
    scratch_folder,
    task_json,
)
from pipeline.engines.single import (
    Producer,
    SingleProcess,
    drain_on_signals,
    empty_queue,
    open_output,
)
from pipeline.gemini import GeminiError
from pipeline.gemini.batches import JSONL_MIME, BatchJob, request_line
from pipeline.gemini.types import FileInfo, ImagePart
from pipeline.inputs import images
from pipeline.inputs.images import SourceChangedError
from pipeline.inputs.references import ReferenceParts, inline_size
from pipeline.output.dataset import DigestSet, ResumeIndex
from pipeline.output.state import BatchRequestRecord, State
from pipeline.records import ImageItem, Parsed, SourceFile, Unit, fingerprint, make_key, storable
from pipeline.run.calls import (
    SMALL_BYTES,
    RunStopped,
    inline_refusal,
    request_with_images,
    send_mode,
)
from pipeline.run.failures import Action, judge
from pipeline.run.reuse import Answers
from pipeline.run.rows import Outcome, answered_row, copied_outcome_row, copied_row, error_row
from pipeline.run.runner import ImageRunner, RowCounts, RunOptions
from pipeline.run.stop import Stop
from pipeline.run.summary import RunSummary
from pipeline.run.uploads import Uploads

T = TypeVar("T")
RECORDS_AT_ONCE = 512  # request records written to state.sqlite in one transaction


# ---------------------------------------------------------------------------------- the run
class BatchProcess(SingleProcess):
    """One run of a config in Batch Mode (see the module docstring)."""

    def __init__(self, config: Config, options: RunOptions) -> None:
        super().__init__(config, options)
        self.counts = Counts()
        self.say = say if options.progress else quiet
        self.producer: Producer | None = None  # made once the resume index is read

    async def run(self) -> RunSummary:
        out = open_output(self.config)
        self.stop = stop = Stop()
        async with contextlib.AsyncExitStack() as stack:
            opened = await self._open(stack, out, stop)
            state, sink, index, client = opened.state, opened.sink, opened.index, opened.client
            caller, answers, runner = opened.caller, opened.answers, opened.runner
            scratch = scratch_folder(out, stack)
            jobs = Jobs(state, client, sink, stop, self._following(scratch, runner.counts, answers))
            with drain_on_signals(asyncio.get_running_loop(), stop, sink):
                await guarded(stop, jobs.recover())
                await self._work(jobs, runner, index, state, scratch)
                if self.config.images.delete_uploads and stop.running:  # interactive retries'
                    await guarded(stop, caller.uploads.delete_all())  # (never a job's images)
            report_ended(stop, self.counts)
            assert self.producer is not None
            self._summarise(self.producer, runner, caller)
            in_flight = len(jobs.in_flight())
        self.summary.unstorable = sink.unstorable
        self._settle(stop)
        self.summary.batch = self.counts.as_dict(in_flight)
        if in_flight and not self.summary.stop_reason:
            self.summary.resume_hint = in_flight_hint(in_flight, self.config.output.dir)
        self.summary.write(out)
        return self.summary

    def _following(self, scratch: Path, counts: RowCounts, answers: Answers) -> Following:
        batch = self.config.batch
        return Following(
            folder=scratch,
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
        self, jobs: Jobs, runner: ImageRunner, index: ResumeIndex, state: State, scratch: Path
    ) -> None:
        """Collect what ended, submit what is new, then follow the jobs until they end (or,
        with --submit-only, leave them to a later run)."""
        stop = self.stop
        assert stop is not None
        # Read before any collection: a file of a job collected from here on is committed
        # after the resume index was read, and must be skipped all the same.
        skip = _Skip(index, DigestSet(state.in_flight_fingerprints()))
        assert runner.fetcher is not None
        self.producer = Producer(self.config, skip, self.options.limit, runner.fetcher)
        await guarded(stop, jobs.check_all())
        submission = Submission(self, jobs, runner, state, scratch)
        walked = asyncio.Event()
        following = asyncio.create_task(
            guarded(stop, jobs.follow(walked, wait_for_all=not self.options.submit_only))
        )
        try:
            await self._walk(self.producer, submission)
        finally:
            walked.set()
            await submission.interactive.wait()
            await following

    async def _walk(self, producer: Producer, submission: Submission) -> None:
        """The walking thread feeds `submission` in batches (as engines/single.py does)."""
        stop = self.stop
        assert stop is not None
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
                self.counts.submitted_s = self.counts.since_start()
        finally:
            producer.halt.set()
            empty_queue(batches)
            await walking
            await submission.discard()


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

    def fits(self, size: int, tokens: int, batch: BatchConfig) -> bool:
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


class _JobUploads:
    """What `ReferenceParts` asks of its uploads (`get`), for one job: an upload made for the
    job, recorded as its file (it must outlive the job, and is deleted with its rows)."""

    def __init__(self, submission: Submission, job: int) -> None:
        self.submission = submission
        self.job = job

    async def get(self, item: ImageItem) -> FileInfo:
        info = await self.submission.uploads.upload_unrecorded(item)
        self.submission.state.add_batch_file(self.job, info.name)
        return info


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
        # Requests are sized, estimated and captioned as the interactive path does (its Caller:
        # the prompt, the reference images, inline bytes); the references go before every
        # request's own: inline when small, else uploaded once per job (an upload must outlive
        # its job: 48 h + 48 h).
        self.caller = runner.caller
        self.references = run.references
        self._reference_parts: dict[int, ReferenceParts] = {}  # job -> its references' parts
        self.job: JobFile | None = None
        self._seq = 0
        folder.mkdir(exist_ok=True)

    # -------------------------------------------------------------------------- one file
    async def take(self, src: SourceFile) -> None:
        """One file of the walk: a row now (unusable, or answered before), a twin of a request
        already asked, an interactive retry, or a new request."""
        if src.error:
            item = ImageItem(source=src, error=src.error)
            return await self._row(error_row(Unit.lone(item), src.error, self.facts))
        digest = fingerprint(src.root, src.rel_path, src.size, src.mtime_ns, self.facts.key_suffix)
        if digest in self.retries and self.config.batch.retry == "interactive":
            self.state.forget_batch_retry(digest)
            return await self.interactive.submit(src)
        item = await self.runner.prepared(src)  # an object or a URL read through the fetcher
        if item.error:
            return await self._row(error_row(Unit.lone(item), item.error, self.facts))
        key = make_key(item.sha256, self.facts.key_suffix)
        if not await self._reused(item, key):
            await self._request(item, key, digest)

    async def _reused(self, item: ImageItem, key: str) -> bool:
        """Copied from an answer of this or an earlier run (as ImageRunner does)."""
        found = await self.runner.answers.find(key, item.sha256)
        if found is not None and found.outcome is not None:
            await self._row(
                copied_outcome_row(Unit.lone(item), key, found.outcome, self.facts), copied=True
            )
        elif found is not None and found.row is not None:
            await self._row(copied_row(found.row, Unit.lone(item), key, self.facts), copied=True)
        return found is not None

    async def _request(self, item: ImageItem, key: str, digest: bytes) -> None:
        est_image, est = self.caller.estimates(Unit.lone(item))
        record = _record(0, key, digest, item, est_image, est)
        twin = self._job_asking(key)
        if twin is not None:  # the same bytes are asked already: this file joins the request
            return self._attach(twin, record)
        mode = send_mode(self.config, item, self.caller.overhead)
        if mode is None:
            return await self._row(
                error_row(Unit.lone(item), inline_refusal(self.config), self.facts)
            )
        size = self.caller.overhead + (inline_size(item) if mode == "inline" else 0)
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
            references = await self.stop.call(self._references_of(job).parts())
        except (SourceChangedError, OSError) as exc:
            await self._row(error_row(Unit.lone(item), f"cannot read the file: {exc}", self.facts))
            return None
        except GeminiError as exc:
            await self._upload_failed(item, exc)
            return None
        request = request_with_images(
            self.request, references, (part,), captioned=self.caller.captioned
        )
        return request_line(key, request)

    def _references_of(self, job: JobFile) -> ReferenceParts:
        """The reference parts of `job`'s requests: the inline ones, and uploads made for this
        job (recorded as its files, deleted with them)."""
        parts = self._reference_parts.get(job.job)
        if parts is None:
            uploads = _JobUploads(self, job.job)
            parts = ReferenceParts(self.references, self.config.images.mode, uploads=uploads)
            self._reference_parts = {job.job: parts}  # one job is built at a time
        return parts

    async def _upload_failed(self, item: ImageItem, error: GeminiError) -> None:
        verdict = judge(error, uploaded=False)
        if verdict.action == Action.RUN:
            raise RunStopped(verdict)
        key = make_key(item.sha256, self.facts.key_suffix)
        parsed = Parsed("error", error=f"upload failed: {verdict.reason}")
        retryable = verdict.action == Action.RETRY
        outcome = Outcome(parsed, None, 1, 0.0, "upload", 0, 0, retryable)
        await self._row(answered_row(Unit.lone(item), key, outcome, self.facts))

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
            verdict = job_verdict(exc, "the batch input file could not be uploaded")
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

    def _created(self, created: BatchJob | None, job: JobFile) -> None:
        if created is None:
            self.say(f"{job.display_name}: the create answer was lost; a later pass looks for it")
            return
        counts = self.counts
        counts.created += 1
        counts.requests += job.requests
        counts.jsonl_bytes += job.bytes
        if counts.first_job_s is None:
            counts.first_job_s = counts.since_start()
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


async def _offload(big: bool, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call `fn` in a worker thread when the job is big, else right here."""
    if big:
        return await asyncio.to_thread(fn, *args, **kwargs)
    return fn(*args, **kwargs)
