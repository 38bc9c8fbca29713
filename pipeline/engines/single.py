"""The default engine: one process, a walking thread, a bounded hand-off, N async workers.

    walk (thread) ─blocks─► dealer ─one file each─► workers ─► ImageRunner.process ─► sink

The walk hands out files, or groups of files when `[input] group_by` says so (source.work_units).
It skips, with a stat, every file (group) already committed under the same settings (the resume
index) and never enters the output folder. Memory stays flat at any input size: the hand-off
holds two blocks, the workers one file each, the sink a bounded queue.

Stopping (see pipeline/run/stop.py): the first Ctrl-C, SIGTERM or SIGHUP makes what is answered
durable at once (the journal), then lets the calls in flight finish; a second one abandons them.
A run-level failure found by a call (a wrong key, the daily quota, an outage) drains the same way
and names its cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from pipeline.engines.batch import jobs as batchjobs
from pipeline.engines.common import (
    Block,
    Opened,
    Opener,
    Producer,
    RunStart,
    drain_on_signals,
    open_output,
    process_unit,
    sink_failed,
    summarise,
    walking,
)
from pipeline.output.index import DigestSet, DoneOrInFlight
from pipeline.output.sink import ParquetSink, SinkFailed
from pipeline.output.state import IN_FLIGHT
from pipeline.output.stores import Store
from pipeline.records import SourceFile, Work, members_of
from pipeline.run.progress import EngineView, Progress
from pipeline.run.runner import ImageRunner
from pipeline.run.stop import Stop, Stopped
from pipeline.run.summary import RunSummary, in_batch_jobs_hint

log = logging.getLogger(__name__)


class SingleProcess:
    """One run of a config in this process."""

    def __init__(self, start: RunStart) -> None:
        self.config, self.options, self.identity = start.config, start.options, start.identity
        self.opener = Opener(start)
        self.summary = RunSummary.of_run(start.identity, start.config.source)
        self.jobs: tuple[batchjobs.JobCounts, int] | None = None  # Batch Mode jobs collected

    async def run(self) -> RunSummary:
        out = open_output(self.config)
        stop = Stop()
        try:
            sink = await self._run(out, stop)
            self.summary.unstorable = sink.unstorable  # counted up to its last part
        except SinkFailed as exc:  # the last part could not be written (a full disk...)
            sink_failed(stop, exc)
        self.summary.settle(stop)
        self.summary.resume_hint = self.summary.resume_hint or in_batch_jobs_hint(
            self.summary.in_batch_jobs, self.config.output.dir
        )
        self.summary.write(out)
        return self.summary

    async def _jobs_first(
        self, opened: Opened, out: Path | Store, stack: contextlib.AsyncExitStack, stop: Stop
    ) -> DoneOrInFlight:
        """The walk's test. With Batch Mode jobs in flight on this output (a job submitted, then
        an interactive run; or a schedule that flips the mode), the jobs that ended are
        collected first, and the files of those still running are skipped: a job bills every
        request it was given, so buying them here would pay twice (`pipeline batch cancel`
        stops that bill; see `in_batch_jobs_hint`). No job in flight costs nothing more; jobs
        of other endpoints only are skipped, not collected (nor is their service asked for:
        a Vertex run needs no batch prediction settings for a Developer API job)."""
        state = opened.state
        before = state.in_flight_fingerprints()  # read before any collection: see DoneOrInFlight
        here = [
            job for job in state.batch_jobs(IN_FLIGHT) if job.base_url == self.config.api.base_url
        ]
        if not before or not here:
            return DoneOrInFlight(opened.index, DigestSet(before))
        say = batchjobs.say if self.options.progress else batchjobs.quiet
        scratch = batchjobs.scratch_folder(out, stack)
        counts = batchjobs.JobCounts()
        how = batchjobs.run_following(self.config, self.identity, scratch, opened, counts, say)
        in_flight = await batchjobs.collect_ended(opened, stop, how)
        self.jobs = counts, in_flight
        still = DigestSet(state.in_flight_fingerprints())
        return DoneOrInFlight(opened.index, still, collected=DigestSet(before))

    def _jobs_ended(self, stop: Stop) -> None:
        """The jobs found in flight, in the summary as a Batch Mode run's; one that ended
        without results leaves its files to the next run, which the run says (exit 3)."""
        if self.jobs is None:
            return
        counts, in_flight = self.jobs
        batchjobs.report_ended(stop, counts, self.config.output.dir)
        self.summary.batch = counts.as_dict(in_flight)

    async def _run(self, out: Path | Store, stop: Stop) -> ParquetSink:
        """Everything with the output open; returns the sink, closed."""
        async with contextlib.AsyncExitStack() as stack:
            opened = await self.opener.open(stack, out, stop)
            self.summary.recovered = opened.sink.rows_recovered
            skip = await self._jobs_first(opened, out, stack, stop)
            producer = Producer(
                self.config, skip, self.options.limit, opened.fetcher, opened.preflight
            )
            context = opened.caller.context  # caches once the units found make it pay
            context.todo = lambda: producer.seen - producer.skipped
            context.walked = lambda: producer.done
            await self._work(producer, opened, stop)
            self._jobs_ended(stop)
            caller = opened.caller
            await context.close()  # deleted now, so the summary has its storage
            caller.daily.save()
            caller.spend.flush()
            if self.config.images.delete_uploads:  # a cleanup, not new work: it survives a
                with contextlib.suppress(Stopped):  # drain, only a second signal cuts it short
                    await stop.call(caller.uploads.delete_all())
            summarise(self.summary, producer, opened.runner.counts, caller)
        return opened.sink

    async def _work(self, producer: Producer, opened: Opened, stop: Stop) -> None:
        conc = self.config.limits.concurrency
        files: asyncio.Queue[Work | None] = asyncio.Queue(maxsize=conc)
        runner, calls = opened.runner, opened.caller.counters
        limits = opened.caller.limiter.stats
        view = EngineView(
            producer, lambda: runner.counts.rows, lambda: calls.throttled, limits.waiting
        )
        progress = Progress(view, enabled=self.options.progress)
        loop = asyncio.get_running_loop()
        with drain_on_signals(loop, stop, opened.sink):
            async with walking(producer) as blocks:
                prefetch = runner.prefetch  # objects that go in place are not read
                dealer = asyncio.create_task(_deal(blocks, files, conc, stop, prefetch))
                workers = [asyncio.create_task(_worker(files, runner, stop)) for _ in range(conc)]
                reporter = asyncio.create_task(progress.run())
                try:
                    await asyncio.gather(*workers)
                finally:
                    dealer.cancel()  # before the walk is halted: it reads no more blocks
            for task in (dealer, reporter):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            progress.finish()


async def _worker(files: asyncio.Queue[Work | None], runner: ImageRunner, stop: Stop) -> None:
    while (src := await files.get()) is not None:
        if not stop.running:
            continue  # not started: a rerun picks it up
        await process_unit(runner, src, stop)


async def _deal(
    blocks: asyncio.Queue[Block | None],
    files: asyncio.Queue[Work | None],
    workers: int,
    stop: Stop,
    prefetch: Callable[[SourceFile], None] | None = None,
) -> None:
    """Deal the walking thread's blocks out to the workers one unit at a time (an object or a
    URL starts being read as it is dealt: `Fetcher.prefetch`)."""
    while (block := await blocks.get()) is not None:
        for work in block:
            if not stop.running:
                break
            if prefetch is not None:
                for src in members_of(work):
                    prefetch(src)
            await files.put(work)
    for _ in range(workers):
        await files.put(None)
