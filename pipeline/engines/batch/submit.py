"""Batch Mode's buyer: a unit's request becomes a line of the job being built; its row comes when
the job is collected (jobs.py).

    ImageRunner (prepared, keyed, nothing to reuse) ─buy─► JobBuyer
        plan (requests.py, as an interactive call; not paced by [limits] tpm)
          ├─ over a limit ─────────────────────────────────► Outcome: an error row now
          ├─ the same bytes asked already (a job in flight, or the one being built)
          │                                     ─► the file joins that request (its record)
          └─ the request made (requests.py: inline, or uploaded for the job; the references)
                ─► a JSONL line of the open job (a new job when it is full: the full one is
                   uploaded and created, a new one waits for room among the jobs in flight)
                ─► None: no row yet
          (unreadable file, failed upload ─► Outcome: an error row now)

Paid once (pipeline/output/state.py): a job's files are recorded before the job exists (phase
staged), its create call is marked (creating) before it is sent, under a display name unique to
it, and its name is saved the moment the answer comes (submitted). A job's uploads — big images
(`[images] mode` and the inline limit, as interactively) and big reference images — are made
for it just before it is created and deleted with its rows: uploads live 48 hours and a job may
take 48 more, so none is made hours ahead or reused from the run's own.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace
from pathlib import Path

from pipeline.config import BatchConfig, Config
from pipeline.engines.batch.jobs import Jobs, job_verdict, task_json
from pipeline.gemini import GeminiClient, GeminiError
from pipeline.gemini.batches import BatchJob, request_line
from pipeline.inputs.references import LoadedReference, ReferenceParts
from pipeline.output.state import BatchRequestRecord, State, Upload
from pipeline.records import ImageItem, Unit, fingerprint, storable
from pipeline.run.calls import RunStopped, unreadable
from pipeline.run.failures import Action, judge
from pipeline.run.identity import RunIdentity
from pipeline.run.requests import Plan, RequestMaker
from pipeline.run.rows import Outcome
from pipeline.run.spend import Spend
from pipeline.run.uploads import Uploads

RECORDS_AT_ONCE = 512  # request records written to .state.sqlite in one transaction


class JobUploads(Uploads):
    """The uploads of one job's requests (its images, its big reference images): each made for
    the job — never one of the run's, which may expire before the job is read — and recorded as
    the job's file, deleted with its rows (`Jobs._delete_files`)."""

    def __init__(self, client: GeminiClient, state: State, job: int) -> None:
        super().__init__(client, state)
        self.job = job

    async def get(self, item: ImageItem) -> Upload:
        upload = await self.upload_unrecorded(item)
        self.state.add_batch_file(self.job, upload.name)
        return upload


class JobFile:
    """A job being built (phase staged): its JSONL on disk, its records, its size so far, and
    the uploads and reference parts of its requests."""

    def __init__(
        self,
        state: State,
        folder: Path,
        job: int,
        display_name: str,
        uploads: JobUploads,
        references: ReferenceParts,
    ) -> None:
        self.state = state
        self.job = job
        self.display_name = display_name
        self.uploads = uploads  # what its requests upload (their images)...
        self.references = references  # ... and their reference images, made with `uploads`
        self.path = folder / f"{display_name}.jsonl"
        self.requests = 0
        self.bytes = 0
        self.tokens = 0
        self.est_usd = 0.0  # its requests' estimates at the batch price (the spending caps)
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

    def add(self, line: bytes, plan: Plan, usd: float, record: BatchRequestRecord) -> None:
        self._file.write(line)
        self.requests += 1
        self.bytes += len(line)
        self.tokens += plan.est_tokens
        self.est_usd += usd
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


class JobBuyer:
    """Buys answers as requests of Batch Mode jobs (see the module docstring): the Buyer
    (run/buyers.py) of a Batch Mode run's ImageRunner. Units come one at a time, in the walk's
    order, so jobs are cut the same way by every run over the same files."""

    def __init__(
        self,
        config: Config,
        identity: RunIdentity,
        requests: RequestMaker,
        references: tuple[LoadedReference, ...],
        jobs: Jobs,
        spend: Spend,
    ) -> None:
        self.config = config
        self.spend = spend  # the run's, shared with its interactive retries
        self.identity = identity
        self.requests = requests  # the interactive caller's: the same plans and requests
        self.references = references
        self.jobs = jobs
        self.state = jobs.state
        self.stop = jobs.stop
        self.job: JobFile | None = None
        self._seq = 0
        jobs.how.folder.mkdir(exist_ok=True)

    async def buy(self, unit: Unit, key: str) -> Outcome | None:
        """An error's outcome now, or None: the unit's row comes when its job is collected."""
        (item,) = unit.items  # one file a request: groups are not sent in Batch Mode (config)
        plan = self.requests.plan(unit, paced=False)
        if plan.error is not None:
            return plan.failed(plan.error)
        record = self._record(item, key, plan)
        asking = self._job_asking(key)
        if asking is not None:  # the same bytes are asked already: this file joins the request
            self._attach(asking, record)
            return None
        return await self._add(unit, key, plan, record)

    def _record(self, item: ImageItem, key: str, plan: Plan) -> BatchRequestRecord:
        """What a row of this file needs when its job is collected (jobs.py `_item`)."""
        src = item.source
        digest = fingerprint(
            src.root, src.rel_path, src.size, src.mtime_ns, self.identity.key_suffix
        )
        return BatchRequestRecord(
            job=0,  # set when the job is known
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
            est_image_tokens=plan.est_image_tokens,
            est_prompt_tokens=plan.est_tokens,
        )

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

    async def _add(
        self, unit: Unit, key: str, plan: Plan, record: BatchRequestRecord
    ) -> Outcome | None:
        """The request as a line of the open job; an error's outcome when it cannot be made
        (as an interactive call's: attempted once, never sent)."""
        job = await self._job_for(plan.body_bytes, plan.est_tokens)
        try:
            made = self.requests.make(unit, plan, job.uploads, job.references)
            request = await self.stop.call(made)  # a drain lets an upload finish
        except OSError as exc:
            return plan.failed(unreadable(exc), attempts=1)
        except GeminiError as exc:
            return _upload_failed(plan, exc)
        usd = self.spend.estimate(plan.est_tokens, len(unit.items), batch=True)
        job.add(request_line(key, request), plan, usd, replace(record, job=job.job))
        return None

    # -------------------------------------------------------------------------- the jobs
    async def _job_for(self, size: int, tokens: int) -> JobFile:
        """The job this request goes in: the open one if it fits, else a new one (the full one
        is created first, and a new one waits for room among the jobs in flight)."""
        if self.job is not None and self.job.fits(size, tokens, self.config.batch):
            return self.job
        if self.job is not None:
            await self._create(self.job)
        await self.jobs.room()
        self.job = self._new_job()
        return self.job

    def _new_job(self) -> JobFile:
        """A job in phase staged: recorded (durably: before it can exist), its JSONL opened,
        under a display name unique to it (it finds the job if the create answer is lost)."""
        self._seq += 1
        display_name = f"gvp-{self.identity.run_id}-{self._seq:04d}"
        api = self.config.api
        job_id = self.state.add_batch_job(
            display_name,
            settings_hash=self.identity.key_suffix,
            task=task_json(self.config.task),
            model=api.model,
            base_url=api.base_url,
            version=api.version,
        )
        uploads = JobUploads(self.jobs.client, self.state, job_id)
        references = ReferenceParts(self.references, self.config.images.mode, uploads=uploads)
        folder = self.jobs.how.folder
        return JobFile(self.state, folder, job_id, display_name, uploads, references)

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
        """Upload the JSONL, then create the job (its name saved the moment it comes). A job
        that would pass a spending cap is dropped uncreated, its files left for a rerun."""
        job.close()
        refused = self.spend.reserve(job.est_usd)
        if refused is not None:  # still self.job: the walk's `discard` drops it, files and all
            raise RunStopped(refused)
        self.spend.settle(job.est_usd, job.est_usd)  # created: its estimate stands for its bill
        self.job = None
        try:
            uploaded = await self._upload_jsonl(job)
        finally:
            job.discard()  # the service has the file now (or never will)
        self.state.update_batch_job(
            job.job, phase="creating", requests=job.requests, est_tokens=job.tokens
        )
        created = await self.jobs.create(job.job, job.display_name, self.config.api.model, uploaded)
        self._created(created, job)

    async def _upload_jsonl(self, job: JobFile) -> str:
        """The job's JSONL where the backend's job reads it (service.py: a Files API file, or
        an object under [api] batch_staging), recorded as the job's; what the create names.
        A failure drops the job (its files are sent again) and stops the run."""
        put = self.jobs.service.put_input(job.path, job.display_name, job.job, self.state)
        try:
            return await self.stop.call(put)
        except GeminiError as exc:
            await self.jobs.drop(job.job)
            verdict = job_verdict(exc, "the batch input file could not be uploaded")
            raise RunStopped(verdict) from None
        except RunStopped:
            await self.jobs.drop(job.job)
            raise

    def _created(self, created: BatchJob | None, job: JobFile) -> None:
        say = self.jobs.how.say
        if created is None:
            say(f"{job.display_name}: the create answer was lost; a later pass looks for it")
            return
        counts = self.jobs.how.job_counts
        counts.created += 1
        counts.requests += job.requests
        counts.jsonl_bytes += job.bytes
        if counts.first_job_s is None:
            counts.first_job_s = counts.since_start()
        say(f"batch job {created.name} created: {job.requests} requests ({job.display_name})")


def _upload_failed(plan: Plan, error: GeminiError) -> Outcome:
    """An image (or a reference image) the Files API would not take: an error row, retryable
    when the refusal may pass; the run's own failure (a wrong key...) stops the run."""
    verdict = judge(error, uploaded=False)
    if verdict.action == Action.RUN:
        raise RunStopped(verdict)
    retryable = verdict.action == Action.RETRY
    return plan.failed(f"upload failed: {verdict.reason}", attempts=1, retryable=retryable)
