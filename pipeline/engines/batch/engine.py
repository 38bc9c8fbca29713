"""Batch Mode: the same files, keys, requests, parse and rows as an interactive run, bought as
Batch Mode jobs at half the price (`[api] mode = "batch"`, `pipeline run --batch`).

    walk (thread: skips files done, or in a job in flight) ─one unit at a time─►
      ImageRunner (run/runner.py: prepare, key, reuse) ─buy─► JobBuyer (submit.py): a line of
        the job being built; created when full ─► Jobs (jobs.py): polled with back-off,
        collected into rows (the sink), its files deleted; FAILED / CANCELLED / EXPIRED:
        reported, its images left for the next run
      a file whose last answer was a retryable error, with [batch] retry = "interactive":
        the run's interactive ImageRunner (the Caller), at most `concurrency` at once

The engine composes what one process (single.py) is made of — the walk, the opened output and
the interactive runner, all from engines/common.py — with a second ImageRunner whose buyer puts
requests into jobs, and the jobs' follower. Preparing, keying, reuse, request making and the
rows of a failure before any call are the runner's and the request maker's, shared with the
interactive path; only how an answer is bought differs. Rows bought here say `input_mode`
"batch" and are billed at the batch price (pipeline/cost.py).

Never paid twice (details in submit.py and jobs.py): a job is recorded before it is created and
its name saved the moment it comes; a rerun — or `pipeline batch wait` — re-attaches to every job
in flight instead of creating one, and the walk skips their files like committed ones
(`output.index.DoneOrInFlight`).
`--submit-only` submits and exits; a later run (the next cron run) collects, and submits what is
new.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from pipeline.config import Config
from pipeline.engines.batch.jobs import (
    Following,
    JobCounts,
    Jobs,
    guarded,
    in_flight_hint,
    quiet,
    report_ended,
    say,
    scratch_folder,
)
from pipeline.engines.batch.submit import JobBuyer
from pipeline.engines.common import (
    Opened,
    Opener,
    Producer,
    RunStart,
    drain_on_signals,
    open_output,
    summarise,
    walking,
)
from pipeline.output.index import DigestSet, DoneOrInFlight
from pipeline.records import Work, fingerprint, work_identity
from pipeline.run.runner import ImageRunner
from pipeline.run.stop import Stop
from pipeline.run.summary import RunSummary


class BatchEngine:
    """One run of a config in Batch Mode (see the module docstring)."""

    def __init__(self, start: RunStart) -> None:
        self.config, self.identity, self.options = start.config, start.identity, start.options
        self.references = start.references
        self.opener = Opener(start)
        self.summary = RunSummary.of_run(start.identity, start.config.source)
        self.job_counts = JobCounts()
        self.say = say if start.options.progress else quiet

    async def run(self) -> RunSummary:
        out = open_output(self.config)
        stop = Stop()
        async with contextlib.AsyncExitStack() as stack:
            opened = await self.opener.open(stack, out, stop)
            self.summary.recovered = opened.sink.rows_recovered
            jobs = Jobs(
                opened.state,
                opened.client,
                opened.sink,
                stop,
                self._following(scratch_folder(out, stack), opened),
            )
            with drain_on_signals(asyncio.get_running_loop(), stop, opened.sink):
                await guarded(stop, jobs.recover())
                producer = await self._work(opened, jobs, stop)
                if self.config.images.delete_uploads and stop.running:  # interactive retries'
                    await guarded(stop, opened.caller.uploads.delete_all())  # (not a job's)
            report_ended(stop, self.job_counts, self.config.output.dir)
            opened.caller.spend.flush()
            summarise(self.summary, producer, opened.runner.counts, opened.caller)
            in_flight = len(jobs.in_flight())
        self._settle(opened, stop, in_flight)
        self.summary.write(out)
        return self.summary

    def _settle(self, opened: Opened, stop: Stop, in_flight: int) -> None:
        """The summary's ending: the sink's count, the stop, the jobs (and those left)."""
        self.summary.unstorable = opened.sink.unstorable
        self.summary.settle(stop)
        self.summary.batch = self.job_counts.as_dict(in_flight)
        if in_flight and not self.summary.stop_reason:
            self.summary.resume_hint = in_flight_hint(in_flight, self.config.output.dir)

    def _following(self, scratch: Path, opened: Opened) -> Following:
        batch = self.config.batch
        return Following(
            folder=scratch,
            base_url=self.config.api.base_url,
            run_id=self.identity.run_id,
            own=(self.identity.key_suffix, self.config.task),
            rows=opened.runner.counts,
            job_counts=self.job_counts,
            bought=opened.bought,
            retry_interactively=batch.retry == "interactive",
            poll=(batch.poll_seconds, batch.max_poll_seconds),
            output_wait=batch.output_wait_seconds,
            max_jobs=batch.max_jobs,
            say=self.say,
            wait_for_room=not self.options.submit_only,
            staging=self.config.api.batch_staging,
            source=self.config.source,
        )

    async def _work(self, opened: Opened, jobs: Jobs, stop: Stop) -> Producer:
        """Collect what ended, submit what is new, then follow the jobs until they end (or,
        with --submit-only, leave them to a later run). Returns the walk, for the summary."""
        # Read before any collection: a file of a job collected from here on is committed
        # after the resume index was read, and must be skipped all the same.
        skip = DoneOrInFlight(opened.index, DigestSet(opened.state.in_flight_fingerprints()))
        producer = Producer(self.config, skip, self.options.limit, opened.fetcher, opened.preflight)
        await guarded(stop, jobs.check_all())
        caller = opened.caller
        buyer = JobBuyer(
            self.config, self.identity, caller.requests, self.references, jobs, caller.spend
        )
        retries = InteractiveRetries(opened, stop, self.config, self.identity.key_suffix)
        walked = asyncio.Event()
        wait_for_all = not self.options.submit_only
        following = asyncio.create_task(
            guarded(stop, jobs.follow(walked, wait_for_all=wait_for_all))
        )
        try:
            await self._walk(producer, self._runner(opened, buyer), buyer, retries, stop)
        finally:
            walked.set()
            await retries.wait()
            await following
        return producer

    def _runner(self, opened: Opened, buyer: JobBuyer) -> ImageRunner:
        """The runner of the files sent in jobs: the interactive runner's answers, sink,
        fetcher, row counts and decode budget, with the job buyer."""
        return ImageRunner(
            self.config,
            self.identity,
            buyer=buyer,
            bought=opened.bought,
            sink=opened.sink,
            fetcher=opened.fetcher,
            counts=opened.runner.counts,
            decodes=opened.runner.decodes,
        )

    async def _walk(
        self,
        producer: Producer,
        runner: ImageRunner,
        buyer: JobBuyer,
        retries: InteractiveRetries,
        stop: Stop,
    ) -> None:
        """Each file of the walk, in its order: to its job (one at a time, so a rerun cuts the
        same jobs), or retried interactively (alongside). The last job is created at the end;
        one left unfinished by a stop is dropped."""
        try:
            async with walking(producer) as blocks:
                while (block := await blocks.get()) is not None:
                    for work in block:
                        if not stop.running:
                            break
                        await self._take(work, runner, retries, stop)
            if stop.running:
                await guarded(stop, buyer.finish())
                self.job_counts.submitted_s = self.job_counts.since_start()
        finally:
            await buyer.discard()

    async def _take(
        self, work: Work, runner: ImageRunner, retries: InteractiveRetries, stop: Stop
    ) -> None:
        if retries.claims(work):
            await retries.submit(work)
        else:
            await guarded(stop, runner.process(work))


class InteractiveRetries:
    """Files whose Batch Mode answer was a retryable error, retried by interactive calls when
    `[batch] retry = "interactive"`: the run's interactive ImageRunner, at most `concurrency`
    at once, alongside the building of jobs."""

    def __init__(self, opened: Opened, stop: Stop, config: Config, key_suffix: str) -> None:
        self.runner = opened.runner
        self.state = opened.state
        self.stop = stop
        self.key_suffix = key_suffix
        enabled = config.batch.retry == "interactive"
        self.pending = DigestSet(self.state.batch_retries() if enabled else b"")
        self.room = asyncio.Semaphore(config.limits.concurrency)
        self.tasks: set[asyncio.Task[None]] = set()

    def claims(self, work: Work) -> bool:
        """Whether `work` is retried here (then no longer noted as a retry: it gets a row)."""
        if work.error is not None or len(self.pending) == 0:  # (no fingerprint to compute)
            return False
        digest = fingerprint(*work_identity(work), self.key_suffix)
        if digest not in self.pending:
            return False
        self.state.forget_batch_retry(digest)
        return True

    async def submit(self, work: Work) -> None:
        await self.room.acquire()
        task = asyncio.create_task(self._process(work))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _process(self, work: Work) -> None:
        try:
            await guarded(self.stop, self.runner.process(work))
        finally:
            self.room.release()

    async def wait(self) -> None:
        if self.tasks:
            await asyncio.gather(*self.tasks)
