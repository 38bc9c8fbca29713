"""Batch Mode jobs after their creation: re-attached, polled, collected into rows, ended — for
a run (`pipeline run --batch`, engines/batch/engine.py) and for
`pipeline batch status|wait|cancel OUT`.

    Jobs.check_all, one pass over the output's jobs in flight at one endpoint (.state.sqlite):
      submitted ─get─► not done yet: the next pass (the wait between passes grows 1.5x, the
                       SDK's LRO multiplier, from [batch] poll_seconds to max_poll_seconds)
                   ─► done, its output attached: Collector — download the results file to disk
                      once (or read the inline answers), a row per file of each key (the first
                      pays, its twins copy), through the sink; flush; phase collected; delete
                      the job's files
                   ─► SUCCEEDED (or done) without its output: still finishing (seen live,
                      tidyverse/ellmer#926) — polled on, its files and requests kept, said on
                      the progress line; past [batch] output_wait_seconds the run stops waiting
                      for it and ends saying its answers are owed (exit 3): it stays in flight
                      for a later run or `pipeline batch wait`, which collect it, no new job
                   ─► FAILED / CANCELLED / EXPIRED, or unknown to the service: phase ended,
                      reported, its files deleted; no rows: the next run sends its images again
                      — but a CANCELLED job carrying the output of what it answered first (paid
                      for) is collected as above, only its unanswered requests reported; a
                      cancel is its owner's choice, so it never stops the run (no exit 3)
                   ─► Vertex: FAILED / PARTIALLY_SUCCEEDED / CANCELLED whose completionStats
                      count lines its folder does not hold (yet): the service exports what a
                      job completed when it ends, so nothing is deleted; polled again until
                      [batch] ended_output_grace_seconds after its endTime, then what is there
                      is collected and the lines that never arrived are counted and said
      creating (a create answer lost, not being created by this process; re-read first: a
                      create of this process may have answered since the pass began): found
                      among the project's jobs by its unique display name and adopted; not
                      listed, kept (the list may lag behind creates) and looked up again each
                      pass, dropped — said, and in the summary's jobs_dropped — only once
                      CREATE_SETTLES_S have passed since its create was sent

A transient failure (a 5xx, a timeout, a dropped connection) waits for the next pass: a job may
run for a day and a blip must not end a run. Any other failure stops the run and names it (a
wrong key, spent credits, a job this key may not read). A per-request error in the results is
judged like an interactive call's (`failures.judge`): the image's fault is an error row, a
transient one a `retryable` error row, the run's own no row at all — and a job whose every line
failed the same way is the run's failure too, as `failures.Health` judges a stream of attempts.

A result line that cannot be read is its key's `retryable` error row ("batch result line
unreadable: ..."), or, when not even its key reads, counted and logged (a short excerpt) and its
request left without a result, for the next run: a bad line spoils itself, never the job.
Collecting is done once: the results file is downloaded once (kept until the job is collected),
and the keys whose rows are durable are recorded as they go (state `batch_collected`), so a
collection cut short and made again writes none of them twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from pipeline import exits
from pipeline.config import BatchConfig, Config, ConfigError
from pipeline.engines.batch.service import job_service
from pipeline.engines.common import (
    Opened,
    bound_store_requests,
    drain_on_signals,
    make_client,
    sink_hint,
)
from pipeline.gemini import ApiKeyError, GeminiClient, GeminiError, api_key_from_env
from pipeline.gemini.batches import Batches, BatchJob, BatchResult, LocalWriteFailed
from pipeline.gemini.client import DEFAULT_BASE_URL
from pipeline.gemini.vertex_batches import VertexBatches
from pipeline.output.index import lookup_rows
from pipeline.output.sink import ParquetSink, SinkFailed
from pipeline.output.state import (
    IN_FLIGHT,
    LEGACY_STATE_FILE,
    STATE_FILE,
    BatchJobRecord,
    BatchRequestRecord,
    State,
)
from pipeline.output.stores import Store, open_store
from pipeline.records import ImageItem, KeySuffixes, Parsed, SourceFile, Unit, new_run_id
from pipeline.run.calls import RunStopped, parse_response
from pipeline.run.failures import STREAK, Action, Verdict, judge
from pipeline.run.identity import RunIdentity
from pipeline.run.reuse import Bought
from pipeline.run.rows import Outcome, answered_row, copied_outcome_row
from pipeline.run.runner import RowCounts
from pipeline.run.stop import Stop, Stopped
from pipeline.run.summary import RunSummary
from pipeline.tasks.base import Reference, TaskSettings

log = logging.getLogger(__name__)
FOLDER = ".batch"  # in an output folder: JSONL inputs being built, results being read
BACKOFF = 1.5  # the poll wait grows so while idle (SDK _transformers.LRO_POLLING_MULTIPLIER)
ATTEMPTS = 6  # tries of a job's creation refused for a passing reason (the caps, a 5xx)
MARK_EVERY = 512  # keys whose rows are made durable, then recorded, at once while collecting
SAY_UNREADABLE = 5  # unreadable lines without a key logged per job (the rest only counted)
# A `creating` job not in the project's job list is dropped (its images sent again) only this
# long after its create was sent. Dropping a job that exists pays for its requests twice, while
# keeping one that never was only delays its images by a run, so the margin is wide: a create is
# in flight at most [api] timeout (120 s by default), and the list was seen 3 s behind creates
# (issue 19); the service documents no bound. 15 minutes covers both several times over.
CREATE_SETTLES_S = 15 * 60.0
SUCCEEDED = "JOB_STATE_SUCCEEDED"
LOCAL_GONE = "created by an in-process local server (gone with its run)"
Say = Callable[[str], None]


def scratch_folder(
    out: Path | Store, stack: contextlib.ExitStack | contextlib.AsyncExitStack
) -> Path:
    """Where a run builds its JSONL inputs and reads results: FOLDER in an output folder; for an
    object-store output, a temporary folder on this machine, removed at the end. Both are
    scratch: a killed run's staged jobs are dropped (their images sent again, `Jobs.recover`)
    and a job's results are downloaded again from the service, so nothing in them is paid
    for twice when they are lost. (`TMPDIR` chooses the disk: a job's JSONL is up to 2 GB.)"""
    if isinstance(out, Path):
        return out / FOLDER
    folder = Path(tempfile.mkdtemp(prefix="gvp-batch-"))
    stack.callback(shutil.rmtree, folder, True)
    return folder


# --------------------------------------------------------------------------- what a job keeps
def task_json(settings: TaskSettings) -> str:
    """A job's [task] settings (all but the model table), to parse its answers later."""
    values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    values.pop("models")
    values["reference_images"] = [dataclasses.asdict(r) for r in settings.reference_images]
    return json.dumps(values, sort_keys=True)


def task_settings(text: str) -> TaskSettings:
    values = json.loads(text)
    if values.get("labels") is not None:
        values["labels"] = tuple(values["labels"])
    references = values.get("reference_images") or ()
    values["reference_images"] = tuple(Reference(**reference) for reference in references)
    return TaskSettings(**values)


class JobCounts:
    """What this run did with jobs, for the summary and the messages."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.created = 0
        self.requests = 0
        self.jsonl_bytes = 0
        self.collected = 0
        self.result_lines = 0
        self.missing = 0  # requests of collected jobs without a result line: left for later
        self.unreadable = 0  # result lines (or inline answers) that could not be read
        # jobs given up on (for now) waiting for their output, while in flight (`_left_flight`):
        # job id -> what the report says
        self.awaiting_output: dict[int, dict[str, Any]] = {}
        self.first_job_s: float | None = None  # from the start of the run to the first create
        self.submitted_s: float | None = None  # ... to the end of the walk (every job created)
        self.collect_s = 0.0  # spent collecting: download, parse, rows, commit
        self.ended: list[dict[str, Any]] = []  # FAILED / CANCELLED / EXPIRED / lost jobs
        self.never_arrived = 0  # prediction lines ended Vertex jobs answered, never written
        self.dropped: list[dict[str, Any]] = []  # jobs forgotten as never created (said so)
        self.elsewhere = 0  # jobs in flight at another endpoint (not followed by this run)

    def as_dict(self, in_flight: int) -> dict[str, Any]:
        return {
            "jobs_created": self.created,
            "requests_submitted": self.requests,
            "jsonl_bytes": self.jsonl_bytes,
            "jobs_collected": self.collected,
            "result_lines": self.result_lines,
            "requests_without_result": self.missing,
            "result_lines_unreadable": self.unreadable,
            "jobs_ended": self.ended,
            "prediction_lines_never_arrived": self.never_arrived,
            "jobs_dropped": self.dropped,
            "jobs_awaiting_output": list(self.awaiting_output.values()),
            "jobs_in_flight": in_flight,
            "jobs_at_other_endpoints": self.elsewhere,
            "first_job_created_s": self.first_job_s,
            "all_submitted_s": self.submitted_s,
            "collect_s": round(self.collect_s, 3),
        }

    def since_start(self) -> float:
        return round(time.monotonic() - self.started, 3)


@dataclasses.dataclass
class Following:
    """How jobs are followed: what the run (or `pipeline batch wait`) gives the follower."""

    folder: Path  # scratch: JSONL inputs being built, results being read (`scratch_folder`)
    base_url: str  # only jobs created at this endpoint are followed
    run_id: str
    own: tuple[str, TaskSettings] | None  # (settings hash, [task]) of the run's own config
    rows: RowCounts  # the run's (or `batch wait`'s) row counts, for its summary
    job_counts: JobCounts
    bought: Bought | None  # the run's reuse tiers, told of every answer collected
    retry_interactively: bool  # [batch] retry = "interactive": note retryable files
    poll: tuple[float, float]  # the first and the longest wait between polls
    output_wait: float  # [batch] output_wait_seconds: a succeeded job's output waited for
    output_grace: float  # [batch] ended_output_grace_seconds: an ended Vertex job's late lines
    max_jobs: int
    say: Say
    wait_for_room: bool = True  # False (--submit-only): at the cap of jobs, stop submitting
    staging: str | None = None  # [api] batch_staging: a Vertex job's input and output (gs://)
    source: str = ""  # the config file, for messages


def run_following(
    config: Config,
    identity: RunIdentity,
    scratch: Path,
    opened: Opened,
    counts: JobCounts,
    say: Say,
) -> Following:
    """How a run of `config` follows the jobs of its endpoint: its rows, reuse tiers and row
    counts (`opened`), its own settings to parse with (the Batch Mode run's, and an interactive
    run's collecting the jobs it finds in flight: `collect_ended`)."""
    return Following(
        folder=scratch,
        base_url=config.api.base_url,
        run_id=identity.run_id,
        own=(identity.key_suffix, config.task),
        rows=opened.runner.counts,
        job_counts=counts,
        bought=opened.bought,
        say=say,
        **_configured(config),
    )


def _configured(config: Config | None) -> dict[str, Any]:
    """What of a Following its config decides: [batch]'s polling and retries, the Vertex
    staging prefix, the file named in errors (Batch Mode's defaults without a config:
    `pipeline batch` commands given no --config)."""
    batch = config.batch if config is not None else BatchConfig()
    return {
        "retry_interactively": batch.retry == "interactive",
        "poll": (batch.poll_seconds, batch.max_poll_seconds),
        "output_wait": batch.output_wait_seconds,
        "output_grace": batch.ended_output_grace_seconds,
        "max_jobs": batch.max_jobs,
        "staging": config.api.batch_staging if config is not None else None,
        "source": config.source if config is not None else "",
    }


async def collect_ended(opened: Opened, stop: Stop, how: Following) -> int:
    """One pass over the output's jobs in flight at the run's endpoint, waiting for none: those
    that ended are collected, their rows through the run's sink. An interactive run makes it
    before its walk (engines/single.py), so what a job bought is never bought again. Returns
    the jobs still in flight there."""
    jobs = Jobs(opened.state, opened.client, opened.sink, stop, how)
    await guarded(stop, jobs.recover())
    await guarded(stop, jobs.check_all())
    return len(jobs.in_flight())


async def guarded(stop: Stop, work: Awaitable[Any]) -> None:
    """Await `work`; the run's failures it finds stop the run (drain), a stop just ends it."""
    try:
        await work
    except Stopped:
        pass
    except RunStopped as exc:
        stop.drain(exc.verdict.reason, exc.verdict.hint, exc.verdict.exit_code)
    except (SinkFailed, OSError) as exc:  # OSError: a job's JSONL or results file on disk
        stop.drain(f"the output cannot be written: {exc}", sink_hint())


def job_verdict(error: GeminiError, what: str) -> Verdict:
    """How a job-level failure stops the run: the run's own failure as judged, else this."""
    verdict = judge(error, uploaded=False)
    if verdict.action == Action.RUN:
        return verdict
    return Verdict(Action.RUN, f"{what}: {verdict.reason}", exits.STOPPED, "rerun later")


def _passing(error: GeminiError, what: str) -> bool:
    """False for a transient failure (the next pass asks again); raises RunStopped else."""
    if error.retryable:
        return False
    raise RunStopped(job_verdict(error, what))


# ------------------------------------------------------------------------------------- jobs
class Jobs:
    """The output's jobs in flight at one endpoint: created, re-attached, polled, collected."""

    def __init__(
        self, state: State, client: GeminiClient, sink: ParquetSink, stop: Stop, how: Following
    ) -> None:
        self.state = state
        self.client = client
        self.service = job_service(client, how.staging, how.source)  # the backend's side
        self.sink = sink
        self.stop = stop
        self.how = how
        self.ended = asyncio.Event()  # set whenever a job leaves flight: room for another
        self._creating: set[int] = set()  # jobs whose create call this process is making
        self._told: dict[int, tuple[str, int, str]] = {}  # job -> (state, done, note) last said
        self._finishing: dict[int, float] = {}  # job -> when first seen succeeded, no output
        self._overdue: set[int] = set()  # jobs whose output this run no longer waits for

    def in_flight(self) -> list[BatchJobRecord]:
        jobs = self.state.batch_jobs(IN_FLIGHT)
        return [job for job in jobs if job.base_url == self.how.base_url]

    def awaited(self) -> list[BatchJobRecord]:
        """The jobs in flight this run still waits for (not those given up on: `_give_up`)."""
        return [job for job in self.in_flight() if job.id not in self._overdue]

    async def recover(self) -> None:
        """Before anything new: drop the staged jobs of a killed run (never sent: their files
        are sent again) and delete what ended jobs left on the service."""
        others = [j for j in self.state.batch_jobs(IN_FLIGHT) if j.base_url != self.how.base_url]
        self.how.job_counts.elsewhere = len(others)
        for job in self._here(("staged",)):
            with contextlib.suppress(OSError):
                (self.how.folder / f"{job.display_name}.jsonl").unlink()
            why = "staged by a killed run, never sent"
            await self.drop(job.id, _dropped(job, why, later=False))  # (this run's walk sends)
        for job in self._here(("collected", "ended")):  # (files elsewhere are not ours to ask)
            await self._delete_files(job.id)
        self._clear_results()

    def _here(self, phases: tuple[str, ...]) -> list[BatchJobRecord]:
        return [job for job in self.state.batch_jobs(phases) if job.base_url == self.how.base_url]

    def _clear_results(self) -> None:
        """Results files no job in flight needs: a download cut short (`.part`), or the file of
        a job collected by a run killed before it deleted it."""
        kept = {_results_name(job) for job in self.state.batch_jobs(IN_FLIGHT)}
        for path in self.how.folder.glob("*.results.jsonl*"):
            if path.name not in kept:
                with contextlib.suppress(OSError):
                    path.unlink()

    async def drop(self, job: int, report: dict[str, Any] | None = None) -> None:
        """A job that was never created: its files deleted, then the job forgotten (its
        images are sent again). Files the service would not delete keep the job recorded
        (staged) for the next run's `recover` to try again. `report`: what the summary and a
        message say of it (a job dropped is never silent; a create refused says so itself)."""
        if report is not None:
            self._say_dropped(report)
        await self._delete_files(job)
        if not self.state.batch_files(job):
            self.state.forget_batch_job(job)

    def _say_dropped(self, report: dict[str, Any]) -> None:
        self.how.job_counts.dropped.append(report)
        text = (
            f"batch job {report['display_name']} dropped ({report['why']}): its "
            f"{report['requests']} requests are sent again by a later run"
        )
        log.warning(text)
        self.how.say(text)

    # ------------------------------------------------------------------------- creating
    async def create(
        self, job: int, display_name: str, model: str, file_name: str
    ) -> BatchJob | None:
        """Create a job over its uploaded JSONL (the job recorded `creating` beforehand). None
        when an answer was lost and the project's jobs could not be listed to tell whether it
        exists: it stays `creating`, and a later pass adopts it or drops it."""
        self._creating.add(job)
        try:
            return await self._create(job, display_name, model, file_name)
        finally:
            self._creating.discard(job)

    async def _create(
        self, job: int, display_name: str, model: str, file_name: str
    ) -> BatchJob | None:
        """Creation is not idempotent: after any transient failure (the answer may be lost)
        the job is looked up by its display name. A 429 (the service's 100-job or
        enqueued-token caps: nothing was made) waits for one of ours to end, or a growing
        pause, then creates again; any other failure (a 5xx, a timeout: the job may exist
        though the list, which lags, does not show it yet) leaves the job `creating` for the
        later passes to adopt — or, after CREATE_SETTLES_S, to drop (`_adopt`)."""
        created: BatchJob | None
        for attempt in range(1, 1 + ATTEMPTS):
            try:
                created = await self.stop.call(self.service.create(model, file_name, display_name))
            except GeminiError as exc:
                if not exc.retryable:
                    await self._refused(job, exc)
                try:
                    created = await self._find(display_name)
                except GeminiError:
                    return None  # cannot tell whether it exists: a later pass looks again
                if created is None and exc.kind != "rate_limit":
                    return None  # perhaps made, not listed yet: looked up again, never remade
                if created is None and attempt == ATTEMPTS:
                    await self._refused(job, exc)
                if created is None:
                    await self._wait_for_room(exc, attempt)
                    continue
            self.state.update_batch_job(
                job, phase="submitted", name=created.name, service_state=created.state
            )
            return created
        raise AssertionError("unreachable")

    async def _refused(self, job: int, error: GeminiError) -> NoReturn:
        """The job does not exist and will not: dropped (its files are sent again), and the
        run stops saying why."""
        await self.drop(job)
        raise RunStopped(job_verdict(error, "the service refused the batch job"))

    async def _find(self, display_name: str) -> BatchJob | None:
        """The project's job with this display name (raises GeminiError when it cannot tell)."""
        return await self.stop.call(self.service.find(display_name))

    async def _wait_for_room(self, error: GeminiError, attempt: int) -> None:
        """After a transient refusal: until one of our jobs ends, or a backed-off pause."""
        first, longest = self.how.poll
        delay = min(longest, first * BACKOFF ** (attempt - 1))
        self.how.say(f"batch job creation refused ({error.status}); trying again in {delay:g}s")
        self.ended.clear()
        with contextlib.suppress(TimeoutError):
            await self.stop.until(asyncio.wait_for(self.ended.wait(), delay))

    async def room(self) -> None:
        """Wait until fewer than `[batch] max_jobs` jobs are in flight here (with
        --submit-only, stop submitting instead: the rest waits for the next run)."""
        while True:
            self.ended.clear()  # before counting: an end after the count still wakes us
            if len(self.in_flight()) < self.how.max_jobs:
                return
            if not self.how.wait_for_room or not self.awaited():  # (none will end in this run)
                self.stop.drain(
                    f"{self.how.max_jobs} batch jobs are in flight ([batch] max_jobs): the "
                    "remaining files wait for a later run",
                    "rerun once jobs have ended",
                )
                raise Stopped
            await self.stop.until(self.ended.wait())

    # ------------------------------------------------------------------------ following
    async def follow(self, walked: asyncio.Event, *, wait_for_all: bool) -> None:
        """Poll the jobs in flight, backing off while nothing changes, until the walk is over
        and (with `wait_for_all`) every job here has ended. A stop ends it at once."""
        first, longest = self.how.poll
        delay = first
        with contextlib.suppress(Stopped):
            while True:
                if walked.is_set() and (not wait_for_all or not self.awaited()):
                    return
                await self._pause(walked, delay)
                changed = await self.check_all()
                delay = first if changed else min(longest, delay * BACKOFF)

    async def _pause(self, walked: asyncio.Event, delay: float) -> None:
        """`delay` seconds, ended early by the end of the walk (the last poll then comes at
        once). Raises Stopped when the run stops."""
        if walked.is_set():
            return await self.stop.sleep(delay)
        with contextlib.suppress(TimeoutError):
            await self.stop.until(asyncio.wait_for(walked.wait(), delay))

    async def check_all(self) -> bool:
        """One pass over the jobs in flight here; True when one of them left flight."""
        changed = False
        for job in self.in_flight():
            current = self._current(job)  # the pass awaits: a create may have answered since
            if current is None:
                continue
            if current.phase == "submitted" and current.name:
                changed |= await self._check(current)
            elif current.phase == "creating" and current.id not in self._creating:
                changed |= await self._adopt(current)
        return changed

    def _current(self, job: BatchJobRecord) -> BatchJobRecord | None:
        """A `creating` job as recorded now (None once it left flight); others as given."""
        if job.phase != "creating":
            return job
        return next((now for now in self.in_flight() if now.id == job.id), None)

    async def _adopt(self, job: BatchJobRecord) -> bool:
        """A job whose create answer was lost: adopted if the service lists it; else kept
        while young (its create may be in flight, the list may lag), dropped when old."""
        try:
            found = await self._find(job.display_name)
        except GeminiError as exc:
            return _passing(exc, "the project's batch jobs cannot be listed")
        if found is not None:
            self.state.update_batch_job(job.id, phase="submitted", name=found.name)
            self.how.say(f"batch job {found.name} re-attached ({job.display_name})")
            return False
        age = _age_ms(job.updated_at) / 1000  # since it was marked creating, its create sent
        if age < CREATE_SETTLES_S:
            self._not_listed(job, age)
            return False
        why = f"not found among the project's jobs {age:.0f} s after its create was sent"
        await self.drop(job.id, _dropped(job, why, later=True))  # its files: the next run's
        self._left_flight(job.id)
        return True

    def _not_listed(self, job: BatchJobRecord, age: float) -> None:
        """Said once a job: kept `creating`, looked up again by each later pass."""
        if job.id in self._told:
            return
        self._told[job.id] = ("creating", 0, "")
        self.how.say(
            f"batch job {job.display_name}: its create answer was lost and it is not listed yet "
            f"({age:.0f} s after its create); kept, and looked up again until "
            f"{CREATE_SETTLES_S:.0f} s have passed"
        )

    async def _check(self, job: BatchJobRecord) -> bool:
        """One poll of a submitted job; True when it left flight."""
        name = job.name or ""
        try:
            remote = await self.stop.call(self.service.batches.get(name))
        except GeminiError as exc:
            if exc.kind != "not_found":
                return _passing(exc, f"batch job {name} cannot be read")
            await self._end(job, "LOST", "the service no longer knows this job")
            return True
        if remote.state != job.service_state:
            self.state.update_batch_job(job.id, service_state=remote.state)
        try:
            ready = remote.done and remote.has_output and await self._fetched(job, remote)
        except GeminiError as exc:
            return _passing(exc, f"the results of batch job {remote.name} cannot be read")
        self._progress(job, remote, self._finishing_note(job, remote, ready))
        return await self._settle(job, remote, ready)

    async def _fetched(self, job: BatchJobRecord, remote: BatchJob, *, whole: bool = True) -> bool:
        """Whether the job's results are here to read: downloaded once into a `.part` file
        renamed when whole (a cut download is never read as results), kept until the job is
        collected. False while a Vertex job's predictions are not all written yet (`whole`;
        else while none is)."""
        path = self.how.folder / _results_name(job)
        if path.exists():
            return True
        self.how.folder.mkdir(exist_ok=True)
        partial = path.with_name(path.name + ".part")
        try:
            if not await self.stop.call(self.service.fetch(remote, partial, whole=whole)):
                return False
        except LocalWriteFailed as exc:  # this machine's disk: said as such, the job kept
            raise RunStopped(_not_written(remote, exc)) from None
        if partial.exists():  # (an inline job's answers came with the job)
            partial.replace(path)
        return True

    async def _settle(self, job: BatchJobRecord, remote: BatchJob, ready: bool) -> bool:
        """What a poll found: an end without results, results to collect, or nothing yet. Only
        `done` with the output `ready` is collected: a job seen SUCCEEDED (or done) without
        it is finishing, and collecting it then would find no answers and buy them again. A
        Vertex job that ended otherwise short of the lines it answered (`_lines_owed`) waits out
        its grace (`_in_grace`), then gives what is there, if anything."""
        state = remote.state.removeprefix("JOB_STATE_")
        if remote.ended and remote.state != SUCCEEDED and not ready:
            owed = _lines_owed(remote)
            if owed and self._in_grace(job, remote):
                return False
            if not (owed and await self._fetched(job, remote, whole=False)):
                never = _lines_answered(remote) if owed else 0
                await self._end(job, state, _why(remote), never=never)
                return True
        elif not ready:
            return False
        try:
            missing = await self._collect(job, remote)
        except GeminiError as exc:
            return _passing(exc, f"the results of batch job {remote.name} cannot be read")
        if remote.state != SUCCEEDED and missing:  # a partial output, collected
            never = max(0, _lines_answered(remote) - (job.requests - missing))
            _ended(self.how, job, state, _why(remote), missing, never)
        return True

    def _in_grace(self, job: BatchJobRecord, remote: BatchJob) -> bool:
        """Whether an ended job's missing lines are still waited for: Vertex exports what a job
        completed when it ends (its batch prediction docs) and a cancel deletes no output, so
        ending it at once would delete paid answers on their way. They are waited for until
        [batch] ended_output_grace_seconds after its endTime (its updateTime without one; when
        this run first saw it ended, without either); nothing of the job is deleted meanwhile."""
        since = _seconds_since(remote.end_time or remote.update_time)
        if since is None:  # no end time given: from when this run first saw it ended
            since = time.monotonic() - self._finishing.get(job.id, time.monotonic())
        return since < self.how.output_grace

    def _finishing_note(self, job: BatchJobRecord, remote: BatchJob, ready: bool) -> str:
        """For a job that says it succeeded (or is done) without its output: the progress
        line's note, how long this run has seen it so, and past [batch] output_wait_seconds
        the end of waiting for it (`_give_up`) — not for a job that ended otherwise, which
        `_settle` ends or waits for by its own grace. Else ""."""
        if not _finishing(remote, ready):
            return ""
        now = time.monotonic()
        waited = now - self._finishing.setdefault(job.id, now)
        if waited >= self.how.output_wait and not (remote.ended and remote.state != SUCCEEDED):
            self._give_up(job, remote, waited)
        return f", output not attached yet ({_minutes(waited)})"

    def _give_up(self, job: BatchJobRecord, remote: BatchJob, waited: float) -> None:
        """This run waits no more for the job's output. Nothing is deleted or marked
        unanswered: the job stays in flight (its files skipped by every walk, so never bought
        again) for a later run or `batch wait`; the run's report says its answers are owed."""
        if job.id in self._overdue:
            return
        self._overdue.add(job.id)
        owed = {"name": remote.name, "requests": job.requests, "waited_s": round(waited, 1)}
        self.how.job_counts.awaiting_output[job.id] = owed
        self.how.say(
            f"batch job {remote.name} {remote.state}, output still not attached after "
            f"{_duration(waited)}: no longer waited for; it stays in flight for a later run"
        )
        self.ended.set()  # `room` counts it no more

    def _progress(self, job: BatchJobRecord, remote: BatchJob, note: str) -> None:
        """A line when a job's state, its count of answered requests or its note changed since
        the last poll: the progress of a run that may wait hours (one line a poll at most)."""
        stats = remote.stats
        done = stats.requests - stats.pending if stats.requests else 0
        if self._told.get(job.id) == (remote.state, done, note):
            return
        self._told[job.id] = (remote.state, done, note)
        counted = f": {done:,}/{stats.requests:,} requests answered" if stats.requests else ""
        self.how.say(f"batch job {remote.name} {remote.state}{counted}{note}")

    # ----------------------------------------------------------------------- collecting
    async def _collect(self, job: BatchJobRecord, remote: BatchJob) -> int:
        """Rows for every result of a job with output (a succeeded job's, or what a cancelled
        one answered), committed; then its files deleted. Its requests left without a result
        (for the next run)."""
        started = time.monotonic()
        reader = Collector(self, job, remote)
        await reader.read()
        if self.stop.state == "abandoning":
            return 0  # not recorded: the next run collects the rest (no new call, no new cost)
        await self.sink.flush()
        self.how.job_counts.collect_s += time.monotonic() - started
        self.state.update_batch_job(job.id, phase="collected", service_state=remote.state)
        reader.clean()
        self._left_flight(job.id)
        await self._delete_files(job.id)
        self.how.job_counts.collected += 1
        self.how.say(f"batch job {remote.name} {remote.state}: {reader.summary()}")
        if reader.run_failure is not None:
            raise RunStopped(reader.run_failure)
        return job.requests - len(reader.answered)

    async def _end(self, job: BatchJobRecord, service_state: str, why: str, never: int = 0) -> None:
        """A job that ended without results: reported; its files are sent again next time.
        `never`: the prediction lines it answered that never arrived."""
        self.state.update_batch_job(job.id, phase="ended", service_state=service_state, message=why)
        self._left_flight(job.id)
        await self._delete_files(job.id)
        _ended(self.how, job, service_state, why, never=never)

    def _left_flight(self, job: int) -> None:
        """A job is over — collected, ended or dropped, whichever path it took: this run no
        longer waits for it nor says its answers are owed (a job given up on by `_give_up` and
        then lost or ended would be reported both over and still owed), and `room` counts it
        no more."""
        self._overdue.discard(job)
        self._finishing.pop(job, None)
        self.how.job_counts.awaiting_output.pop(job, None)
        self.ended.set()

    async def _delete_files(self, job: int) -> None:
        """Delete a job's files (Files API files: its JSONL, its images; on Vertex its staged
        input and output, service.py); one already gone is forgotten, one the service (or the
        bucket) refuses to delete stays recorded for a later try."""
        for name in self.state.batch_files(job):
            try:
                await self.stop.call(self.service.delete_file(name))
            except GeminiError as exc:
                if exc.code not in (403, 404):
                    continue
            except OSError as exc:  # a staged gs:// object the store would not delete: kept
                log.warning("batch file %s not deleted (kept for a later try): %s", name, exc)
                continue
            except Stopped:
                return
            self.state.forget_batch_file(name)


def _finishing(remote: BatchJob, ready: bool) -> bool:
    """Says it succeeded (or is done), its output not attached — or not all written — yet
    (tidyverse/ellmer#926)."""
    return (remote.state == SUCCEEDED or remote.done) and not ready


LATE_LINE_STATES = frozenset(
    {"JOB_STATE_FAILED", "JOB_STATE_PARTIALLY_SUCCEEDED", "JOB_STATE_CANCELLED"}
)  # Vertex ends after which completed lines may still be exported (EXPIRED: none are)


def _lines_answered(remote: BatchJob) -> int:
    """The lines a job's stats say it answered: each is written to its output."""
    return remote.stats.succeeded + remote.stats.failed


def _lines_owed(remote: BatchJob) -> bool:
    """A Vertex job (its output a folder) ended in LATE_LINE_STATES having answered lines (its
    folder, read first, holds fewer)."""
    return (
        remote.state in LATE_LINE_STATES and bool(remote.output_dir) and _lines_answered(remote) > 0
    )


def _seconds_since(text: str | None) -> float | None:
    """Seconds from an RFC 3339 time of the service's (an endTime) to now; None without one."""
    if not text:
        return None
    with contextlib.suppress(ValueError):
        return time.time() - datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    return None


def _minutes(seconds: float) -> str:
    """Whole minutes: a progress line changes (and is said again) once a minute at most."""
    return f"{seconds // 60:.0f} min"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else _minutes(seconds)


def _results_name(job: BatchJobRecord) -> str:
    return f"{job.display_name}.results.jsonl"


def _dropped(job: BatchJobRecord, why: str, *, later: bool) -> dict[str, Any]:
    """What the summary's jobs_dropped says of a job forgotten as never created; `later`: its
    images are left for a later run (this run's walk skipped them), which the run's exit says."""
    report = {"display_name": job.display_name, "requests": job.requests, "why": why}
    return {**report, "left_for_next_run": later}


def _not_written(remote: BatchJob, exc: LocalWriteFailed) -> Verdict:
    """The run stops on a results file this machine could not write, naming it (not the
    service nor the bucket: not theirs to fix); the job stays in flight with its output."""
    return Verdict(
        Action.RUN,
        f"the results of batch job {remote.name} cannot be written on this machine: {exc}",
        exits.STOPPED,
        "free the disk (or make the folder writable) and rerun: the job stays in flight, and "
        "the next run (or `pipeline batch wait`) collects it, nothing bought again",
    )


def _why(remote: BatchJob) -> str:
    return remote.error.message if remote.error else "no reason given"


def _ended(
    how: Following,
    job: BatchJobRecord,
    service_state: str,
    why: str,
    left: int | None = None,
    never: int = 0,
) -> None:
    """A job ended without results for `left` of its requests (all of them by default), of
    which `never` were answered by the service but their prediction lines never arrived."""
    left = job.requests if left is None else left
    ended = {"name": job.name, "state": service_state, "requests": left, "why": why}
    how.job_counts.ended.append({**ended, "lines_never_arrived": never})
    how.job_counts.never_arrived += never
    lost = (
        f"; {never} prediction lines it answered never arrived "
        f"({_duration(how.output_grace)} after its end, [batch] ended_output_grace_seconds)"
        if never
        else ""
    )
    how.say(
        f"batch job {job.name or job.display_name} ended {service_state} ({why}): "
        f"{left} of its {job.requests} requests are left for the next run{lost}"
    )


class Collector:
    """Reads one succeeded job's results into rows, once (see Jobs._collect)."""

    def __init__(self, jobs: Jobs, job: BatchJobRecord, remote: BatchJob) -> None:
        self.jobs = jobs
        self.job = job
        self.remote = remote
        self.how = jobs.how
        self.path = self.how.folder / _results_name(job)
        self.settings, self.identity = self._parsing()
        self.latency_ms = _age_ms(job.created_at)
        self.answered: set[str] = set()
        self.statuses: dict[str, int] = {}
        self.run_failure: Verdict | None = None  # the run's failure found in its lines
        self.unmarked: list[str] = []  # keys whose rows are added, not yet recorded durable
        self.held: dict[str, BatchResult] = {}  # keys so far found only in unreadable lines
        self.unreadable = 0

    def _parsing(self) -> tuple[TaskSettings, RunIdentity]:
        """How this job's answers are read: as the run's own config when it made the job, else
        with the job's recorded [task] settings (an answer is paid for whoever reads it)."""
        job, own = self.job, self.how.own
        settings = own[1] if own is not None and own[0] == job.settings_hash else None
        settings = settings or task_settings(job.task)
        return settings, RunIdentity(
            self.how.run_id, settings.kind, job.model, KeySuffixes(job.settings_hash)
        )

    async def read(self) -> None:
        """Every result to rows, skipping the keys an earlier collection of this job made
        durable; the file is read twice when all lines failed (`_common_failure`)."""
        results = await self._results()
        self.answered = self.jobs.state.batch_collected(self.job.id)
        self.answered |= await self._committed()
        self.run_failure = self._common_failure(results)
        try:
            await self._rows(results)
        finally:
            await self._mark()  # even when cut short: what is durable is not written again
        if self.jobs.stop.state == "abandoning":
            return
        missing = set(self.jobs.state.batch_request_keys(self.job.id)) - self.answered
        self.how.job_counts.missing += len(missing)

    async def _committed(self) -> set[str]:
        """This job's keys already in a committed ok row: rows a killed collection handed to
        the journal (a write per answer, recovered into parts when the output was opened)
        before it recorded them in `batch_collected` (every MARK_EVERY rows). Written again,
        they would be the same answer twice (not paid twice, but a duplicate row)."""
        keys = set(self.jobs.state.batch_request_keys(self.job.id)) - self.answered
        if not keys:
            return set()
        return set(await asyncio.to_thread(lookup_rows, self.jobs.sink.store, keys))

    async def _results(self) -> Callable[[], Iterable[BatchResult]]:
        """The job's results, to read: its results file (fetched once by `Jobs._fetched`, and
        kept until the job is collected, so a collection cut short reads it again rather than
        download it again), else its inline answers."""
        if not self.path.exists():
            return lambda: self.remote.inlined
        batches = self.jobs.service.batches
        return lambda: batches.results(self.path)

    def _common_failure(self, results: Callable[[], Iterable[BatchResult]]) -> Verdict | None:
        """A job whose every line (STREAK at least) failed the same way for a reason not its
        images' (the same refused setting on every line): the run's failure, as `Health` judges
        a stream of interactive attempts; its lines become no rows. Read first — a second pass
        over the file — only when the job's stats say nothing succeeded."""
        stats = self.remote.stats
        if stats.succeeded or stats.failed < STREAK:
            return None
        signatures, first = set(), None
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
        why = f"every request of batch job {self.remote.name} failed the same way: {verdict.reason}"
        return Verdict(Action.RUN, why, exits.USAGE)

    async def _rows(self, results: Callable[[], Iterable[BatchResult]]) -> None:
        """The rows of every readable result, then those of keys found only unreadable; the
        keys are recorded durable every MARK_EVERY. A stop that abandons ends it at once."""
        for result in results():
            if self.jobs.stop.state == "abandoning":
                return
            await self._result(result)
            if len(self.unmarked) >= MARK_EVERY:
                await self._mark()
        for key, result in self.held.items():
            if key not in self.answered:
                records = self._records(key)
                await self._answer(records, self._unreadable_outcome(result, records[0]))

    async def _result(self, result: BatchResult) -> None:
        if result.unreadable is not None:
            return self._hold(result)
        records = self._records(result.key)
        if not records or records[0].key in self.answered:
            return  # a key this output never asked for, or one already written
        await self._answer(records, await self._outcome(result, records[0]))

    def _records(self, key: str | None) -> list[BatchRequestRecord]:
        """The files a key of this job answers (none for a key it never asked)."""
        return self.jobs.state.batch_requests(self.job.id, key) if key else []

    async def _answer(self, records: list[BatchRequestRecord], outcome: Outcome | None) -> None:
        """A key's rows: the first file pays, its twins copy. None: the run's failure, no row."""
        self.answered.add(records[0].key)
        self.how.job_counts.result_lines += 1
        if outcome is None:
            return  # the run's failure: no row, the files are sent again next time
        for number, record in enumerate(records):
            made = answered_row if number == 0 else copied_outcome_row
            row = made(Unit.lone(_item(record)), record.key, outcome, self.identity)
            await self.jobs.sink.add(row)
            self.how.rows.add(row, copied=number > 0)
            self.statuses[row["status"]] = self.statuses.get(row["status"], 0) + 1
        self.unmarked.append(records[0].key)
        self._remember(records, outcome)

    def _hold(self, result: BatchResult) -> None:
        """An unreadable result: kept for its key's error row (made after every line was read,
        unless another line answers that key); without a key of this job, counted and logged —
        its request ends without a result, for the next run."""
        self.unreadable += 1
        self.how.job_counts.unreadable += 1
        if self._records(result.key):
            self.held.setdefault(result.key or "", result)
        elif self.unreadable <= SAY_UNREADABLE and result.unreadable is not None:
            note = result.unreadable
            log.warning(
                "batch job %s: result %d unreadable and without a key of the job (%s): %r",
                self.remote.name,
                note.number,
                note.reason,
                note.excerpt,
            )

    def _unreadable_outcome(self, result: BatchResult, record: BatchRequestRecord) -> Outcome:
        """A key whose result could not be read: a retryable error row (the answer was paid
        for, but the next run asks again rather than keep nothing)."""
        note = result.unreadable
        why = f"{note.reason} (result {note.number})" if note is not None else "no reason"
        parsed = Parsed("error", error=f"batch result line unreadable: {why}")
        return _bought(parsed, result, record, self.latency_ms, retryable=True)

    async def _mark(self) -> None:
        """Record the keys whose rows are durable now (the journal synced first): a kill
        between the two writes those rows again, never loses them."""
        if not self.unmarked:
            return
        await self.jobs.sink.sync()
        self.jobs.state.add_batch_collected(self.job.id, self.unmarked)
        self.unmarked = []

    async def _outcome(self, result: BatchResult, record: BatchRequestRecord) -> Outcome | None:
        """What became of a request, as an interactive call's Outcome (input_mode "batch"):
        its answer read by the same parse (`calls.parse_response`), or its error judged."""
        if result.response is not None:
            unit = Unit.lone(_item(record))
            parsed = await parse_response(result.response, unit, self.settings)
            return _bought(parsed, result, record, self.latency_ms)
        assert result.error is not None
        # uploaded=True: a line refused for its file (403, 404) lost an uploaded image: retry
        verdict = judge(result.error, uploaded=True)
        if verdict.action == Action.RUN or self.run_failure is not None:
            self.run_failure = self.run_failure or verdict
            return None
        if verdict.action == Action.BLOCKED:
            return _bought(Parsed("blocked", error=verdict.reason), result, record, self.latency_ms)
        retryable = verdict.action in (Action.RETRY, Action.REUPLOAD)
        parsed = Parsed("error", error=verdict.reason)
        return _bought(parsed, result, record, self.latency_ms, retryable)

    def _remember(self, records: list[BatchRequestRecord], outcome: Outcome) -> None:
        if self.how.bought is not None:
            self.how.bought.remember(records[0].key, records[0].sha256, outcome)
        if outcome.retryable and self.how.retry_interactively:
            self.jobs.state.add_batch_retries(record.fingerprint for record in records)

    def summary(self) -> str:
        rows = ", ".join(f"{status} {count}" for status, count in sorted(self.statuses.items()))
        missing = self.job.requests - len(self.answered)
        extra = f"; {missing} requests without a result, left for the next run" if missing else ""
        bad = f"; {self.unreadable} result lines unreadable" if self.unreadable else ""
        return f"rows committed ({rows or 'none'}){extra}{bad}"

    def clean(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


def _bought(
    parsed: Parsed,
    result: BatchResult,
    record: BatchRequestRecord,
    latency_ms: float,
    retryable: bool = False,
) -> Outcome:
    """An Outcome of a result line: one attempt, the job's age as its latency, the estimates
    recorded when its request was made."""
    estimates = (record.est_image_tokens, record.est_prompt_tokens)
    return Outcome(parsed, result.response, 1, latency_ms, "batch", *estimates, retryable)


def _item(record: BatchRequestRecord) -> ImageItem:
    """The image a row is about, as recorded when its request was made."""
    source = SourceFile("", record.root, record.path, record.size, record.mtime_ns)
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


# ------------------------------------------------------------------------- the run's report
CANCELLED = "CANCELLED"  # a job's end as `_ended` records it (JOB_STATE_ taken off)


def report_ended(stop: Stop, counts: JobCounts, output_dir: str | Path) -> None:
    """Jobs that failed or expired leave work for the next run, and jobs whose output never
    came in time leave answers owed: the run says so (exit 3). A cancelled job does not: only
    its owner cancels a job (`pipeline batch cancel`), what it answered is collected and the
    rest is simply unsent, as any new file; it stays in the summary's `jobs_ended`."""
    failed = [job for job in counts.ended if job["state"] != CANCELLED]
    if failed and stop.reason is None:
        first = failed[0]
        stop.drain(
            f"batch job {first['name']} ended {first['state']}{_more(failed)}: its images "
            "are left for the next run",
            "rerun the same command to send them again",
        )
    left = [job for job in counts.dropped if job["left_for_next_run"]]
    if left and stop.reason is None:
        stop.drain(
            f"batch job {left[0]['display_name']} dropped ({left[0]['why']}){_more(left)}: its "
            "images are left for the next run",
            "rerun the same command to send them again",
        )
    if counts.awaiting_output and stop.reason is None:
        _report_owed(stop, list(counts.awaiting_output.values()), output_dir)


def _report_owed(stop: Stop, owed: list[dict[str, Any]], output_dir: str | Path) -> None:
    """Jobs given up on waiting for their output: paid answers not yet collected (exit 3)."""
    stop.drain(
        f"batch job {owed[0]['name']} succeeded but its output was still not attached after "
        f"{_duration(owed[0]['waited_s'])} ([batch] output_wait_seconds){_more(owed)}: "
        f"{sum(job['requests'] for job in owed)} answers are paid for and still owed",
        f"nothing was deleted or marked unanswered: {len(owed)} job(s) stay in flight; a "
        f"later run (or `pipeline batch wait {output_dir}`) collects them, with no new job",
    )


def _more(jobs: list[dict[str, Any]]) -> str:
    return f" (and {len(jobs) - 1} more)" if len(jobs) > 1 else ""


def in_flight_hint(in_flight: int, output_dir: str | Path) -> str:
    return (
        f"{in_flight} batch job(s) in flight: a later run (or `pipeline batch wait {output_dir}`) "
        "collects them"
    )


def say(text: str) -> None:
    """A message on stderr (a closed stderr, a cron job's, is no failure)."""
    if sys.stderr is not None:
        with contextlib.suppress(OSError, ValueError):
            print(text, file=sys.stderr, flush=True)


def quiet(text: str) -> None:
    log.debug(text)


# --------------------------------------------------------------- pipeline batch ... OUT
class ForeignEndpoint(ConfigError):
    """Jobs in flight recorded at an endpoint other than the configured one: never contacted.
    An output (a shared bucket) is writable by others than whoever runs `pipeline batch`:
    an endpoint read from it would receive that user's API key."""


def endpoint(config: Config | None, base_url: str | None) -> str:
    """Where `pipeline batch` commands talk: --base-url, else [api] base_url of --config, else
    the official endpoint — never the base_url a job recorded in .state.sqlite."""
    chosen = base_url or (config.api.base_url if config is not None else DEFAULT_BASE_URL)
    return chosen.rstrip("/")


def _endpoints(state: State, here: str) -> Iterator[tuple[str, str, list[BatchJobRecord]]]:
    """The jobs in flight at `here` (and those of a gone in-process server, "local", which are
    reported without a request) by (base URL, version). Jobs recorded at any other endpoint
    refuse the command (`ForeignEndpoint`) before a request is sent."""
    _refuse_elsewhere(state, here)
    groups: dict[tuple[str, str], list[BatchJobRecord]] = {}
    for job in state.batch_jobs(IN_FLIGHT):
        groups.setdefault((job.base_url.rstrip("/"), job.version), []).append(job)
    for (base_url, version), jobs in sorted(groups.items()):
        yield base_url, version, jobs


def _refuse_elsewhere(state: State, here: str) -> None:
    recorded = {job.base_url.rstrip("/") for job in state.batch_jobs(IN_FLIGHT)}
    others = sorted(recorded - {here, "local"})
    if others:
        raise ForeignEndpoint(
            f"batch jobs in flight here were recorded at {others[0]}"
            f"{_more_endpoints(others)}, not at the configured endpoint {here}: refused, no "
            "request sent to it (an endpoint read from the output could collect your API key)",
        )


def _more_endpoints(others: list[str]) -> str:
    return f" (and {len(others) - 1} more)" if len(others) > 1 else ""


def _client(base_url: str, version: str, config: Config | None) -> GeminiClient:
    """A client for jobs created at `base_url` (`--config` lends its [api] timeout and http
    permission, and its backend); the key comes from the environment, as for a run — a Vertex
    config's credentials too (Application Default Credentials, or an express-mode key)."""
    try:
        key = api_key_from_env()
    except ApiKeyError as exc:  # a key with CR/LF inside, or too short: exit 2, as for a run
        raise ConfigError(f"batch jobs at {base_url}: {exc}") from None
    vertex = config is not None and config.api.backend == "vertex"
    if not key and not vertex:
        raise ConfigError(
            f"batch jobs at {base_url}: set GOOGLE_API_KEY (or GEMINI_API_KEY) in the environment"
        )
    return make_client(config, base_url, key or "", version)


def _batches(client: GeminiClient, config: Config | None) -> Batches | VertexBatches:
    """The job calls of the client's backend (a Vertex config's batch prediction jobs)."""
    staging = config.api.batch_staging if config is not None else None
    return job_service(client, staging, config.source if config else "").batches


def _output(output_dir: str) -> Path | Store:
    """OUT of a `pipeline batch` command: a folder, or an object-store prefix."""
    store = open_store(output_dir)
    return Path(store.url) if store.local else store


def _existing_state(out: Path | Store) -> State:
    _check_output(out)
    return State(out)


def _check_output(out: Path | Store) -> None:
    store = open_store(out)
    if store.info(STATE_FILE) is None and store.info(LEGACY_STATE_FILE) is None:
        raise ConfigError(f"{store.url}: no {STATE_FILE} here: not the output of a run")


async def status(
    output_dir: str, config: Config | None = None, *, base_url: str | None = None
) -> dict[str, Any]:
    """Every job of the output; those in flight as the service sees them now (no commit)."""
    state = _existing_state(_output(output_dir))
    try:
        live: dict[int, dict[str, Any]] = {}
        for at, version, jobs in _endpoints(state, endpoint(config, base_url)):
            live.update(await _live(at, version, jobs, config))
        reports = [_job_report(job, live.get(job.id)) for job in state.batch_jobs()]
        return {"output_dir": output_dir, "jobs": reports}
    finally:
        state.close()


async def _live(
    base_url: str, version: str, jobs: list[BatchJobRecord], config: Config | None
) -> dict[int, dict[str, Any]]:
    if base_url == "local":
        return {job.id: {"error": LOCAL_GONE} for job in jobs}
    found: dict[int, dict[str, Any]] = {}
    async with _client(base_url, version, config) as client:
        for job in (job for job in jobs if job.name):
            try:
                remote = await _batches(client, config).get(job.name or "")
            except GeminiError as exc:
                found[job.id] = {"error": str(exc)}
                continue
            found[job.id] = {
                "state": remote.state,
                "output_attached": remote.has_output,
                **dataclasses.asdict(remote.stats),
            }
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
        problem = f" ({live['error']})" if "error" in live else ""
        message = f": {job['message']}" if job["message"] else ""
        lines.append(
            f"  {job['name'] or job['display_name']}  {job['phase']}  "
            f"{live.get('state') or job['state'] or '-'}{_live_note(live)}  {job['requests']} "
            f"requests, created {job['created_at'][:19]}{message}{problem}"
        )
    return "\n".join(lines)


def _live_note(live: dict[str, Any]) -> str:
    """What a job's status line says of it as the service sees it now: its requests done, and
    whether its output is still to come although it succeeded (tidyverse/ellmer#926)."""
    note = ""
    if live.get("requests"):
        note = f", {live['requests'] - live['pending']}/{live['requests']} done"
    if live.get("state") == SUCCEEDED and not live.get("output_attached"):
        note += ", output not attached yet"
    return note


async def cancel(
    output_dir: str, config: Config | None = None, *, base_url: str | None = None
) -> list[dict[str, Any]]:
    """Ask the service to cancel every job in flight; the next run (or `batch wait`) reports
    them and sends their images again. Writes nothing: a run may be following them."""
    state = _existing_state(_output(output_dir))
    done: list[dict[str, Any]] = []
    try:
        for at, version, jobs in _endpoints(state, endpoint(config, base_url)):
            if at == "local":
                continue
            async with _client(at, version, config) as client:
                batches = _batches(client, config)
                for job in (job for job in jobs if job.name):
                    done.append(await _cancel_one(batches, job.name or "", output_dir))
    finally:
        state.close()
    return done


async def _cancel_one(
    batches: Batches | VertexBatches, name: str, output_dir: str
) -> dict[str, Any]:
    """Cancel a job, first saying how many of its requests it had answered (batchStats): those
    are billed, and lost unless collected. A cancelled job may carry them as its output (rule
    batch.cancel-partial of the local server): `batch wait` or the next run collects it."""
    try:
        answered = _say_billed(await batches.get(name))
        await batches.cancel(name)
        remote = await batches.get(name)
    except GeminiError as exc:
        return {"name": name, "error": str(exc)}
    if remote.has_output:
        say(
            f"batch job {name} {remote.state} with the output of what it answered: `pipeline "
            f"batch wait {output_dir}` (or the next run) collects it, nothing bought again"
        )
    return {"name": name, "state": remote.state, "answered": answered}


def _say_billed(remote: BatchJob) -> int:
    """Requests the job had answered (succeeded or failed) per its batchStats, said when any."""
    stats = remote.stats
    answered = stats.requests - stats.pending if stats.requests else 0
    if answered:
        say(
            f"batch job {remote.name} had answered {answered:,} of its {stats.requests:,} "
            "requests: billed, and lost unless collected; cancelling"
        )
    return answered


async def wait(
    output_dir: str,
    config: Config | None = None,
    *,
    base_url: str | None = None,
    progress: bool = True,
) -> RunSummary:
    """Follow every job in flight until it ends, collecting each as it succeeds (rows through
    the sink, as a run does; each job parsed with its own recorded [task] settings)."""
    run_id = new_run_id("batch-wait")
    if config is not None:  # without one, the store bounds' defaults
        bound_store_requests(config)
    summary = RunSummary(run_id, config.source if config else "", "", "", "")
    counts, rows, stop, out = JobCounts(), RowCounts(), Stop(), _output(output_dir)
    here = endpoint(config, base_url)
    checked = _existing_state(out)  # refused before the output is locked or written
    try:
        _refuse_elsewhere(checked, here)
    finally:
        checked.close()
    async with contextlib.AsyncExitStack() as stack:
        sink = await stack.enter_async_context(ParquetSink(out, run_id))  # the lock, first
        summary.recovered = sink.rows_recovered
        state = State(out)  # (on a bucket, its snapshots are put under the sink's lease)
        stack.callback(state.close)
        scratch = scratch_folder(out, stack)
        with drain_on_signals(asyncio.get_running_loop(), stop, sink):
            for at, version, _ in list(_endpoints(state, here)):
                how = _following(scratch, at, run_id, rows, counts, config, progress)
                await guarded(stop, _wait_at(state, sink, stop, how, version, config))
        in_flight = len(state.batch_jobs(IN_FLIGHT))
    summary.rows, summary.tokens, summary.copied = rows.rows, rows.tokens, rows.copied
    summary.cost_usd, summary.unstorable = round(rows.cost_usd, 6), sink.unstorable
    summary.batch = counts.as_dict(in_flight)
    report_ended(stop, counts, output_dir)
    summary.settle(stop)
    summary.write(out)
    return summary


def _following(
    scratch: Path,
    base_url: str,
    run_id: str,
    rows: RowCounts,
    counts: JobCounts,
    config: Config | None,
    progress: bool,
) -> Following:
    return Following(
        folder=scratch,
        base_url=base_url,
        run_id=run_id,
        own=None,
        rows=rows,
        job_counts=counts,
        bought=None,
        say=say if progress else quiet,
        **_configured(config),
    )


async def _wait_at(
    state: State, sink: ParquetSink, stop: Stop, how: Following, version: str, config: Config | None
) -> None:
    """Follow the jobs of one endpoint to their end. Those of an in-process local server
    (`base_url = "local"`) ended with the run that made them: reported as lost."""
    if how.base_url == "local":
        for job in (job for job in state.batch_jobs(IN_FLIGHT) if job.base_url == "local"):
            state.update_batch_job(job.id, phase="ended", service_state="LOST", message=LOCAL_GONE)
            _ended(how, job, "LOST", LOCAL_GONE)
        return
    async with _client(how.base_url, version, config) as client:
        jobs = Jobs(state, client, sink, stop, how)
        await jobs.recover()
        walked = asyncio.Event()
        walked.set()
        await jobs.check_all()
        await jobs.follow(walked, wait_for_all=True)
