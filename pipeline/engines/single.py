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
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pipeline.config import Config
from pipeline.engines.common import (
    Block,
    Producer,
    drain_on_signals,
    empty_queue,
    make_client,
    open_output,
    open_state,
    process_unit,
    quota_day_key,
    service_endpoint,
    sink_hint,
)
from pipeline.gemini import GeminiClient
from pipeline.inputs.fetch import Fetcher, settings_from
from pipeline.inputs.references import LoadedReference
from pipeline.output.index import ResumeIndex, load_resume_index
from pipeline.output.sink import ParquetSink, SinkFailed
from pipeline.output.state import State
from pipeline.output.stores import Store
from pipeline.records import SourceFile, Work, members_of
from pipeline.run.calls import Caller
from pipeline.run.identity import RunIdentity
from pipeline.run.limits import DailyCount, RateLimiter
from pipeline.run.progress import EngineView, Progress
from pipeline.run.reuse import Answers
from pipeline.run.runner import ImageRunner, RunOptions
from pipeline.run.stop import Stop, Stopped
from pipeline.run.summary import RunSummary
from pipeline.run.uploads import Uploads
from pipeline.tasks import get_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Opened:
    """What a run works with once its output is open (see SingleProcess._open)."""

    state: State
    sink: ParquetSink
    index: ResumeIndex
    client: GeminiClient
    caller: Caller
    answers: Answers
    runner: ImageRunner
    fetcher: Fetcher


class SingleProcess:
    """One run of a config in this process."""

    def __init__(
        self,
        config: Config,
        identity: RunIdentity,
        references: tuple[LoadedReference, ...],
        options: RunOptions,
    ) -> None:
        self.config = config
        self.options = options
        self.request = get_task(config.task.kind).request(config.task)
        self.references = references  # read once: the run's every request has them
        self.identity = identity
        self.run_id = identity.run_id
        self.summary = RunSummary.of_run(identity, config.source)
        self.stop: Stop | None = None  # made in run(): it needs the event loop

    async def run(self) -> RunSummary:
        out = open_output(self.config)
        self.stop = stop = Stop()
        try:
            sink = await self._run(out, stop)
            self.summary.unstorable = sink.unstorable  # counted up to its last part
        except SinkFailed as exc:  # the last part could not be written (a full disk...)
            stop.drain(f"the output cannot be written: {exc}", sink_hint())
        self.summary.settle(stop)
        self.summary.write(out)
        return self.summary

    async def _run(self, out: Path | Store, stop: Stop) -> ParquetSink:
        """Everything with the output open; returns the sink, closed."""
        async with contextlib.AsyncExitStack() as stack:
            opened = await self._open(stack, out, stop)
            runner, caller = opened.runner, opened.caller
            producer = Producer(self.config, opened.index, self.options.limit, opened.fetcher)
            await self._work(producer, runner, opened.sink, stop)
            if stop.running:
                await _compact_quietly(opened.sink, self.config.output.compact_above, opened.index)
            caller.daily.save()
            if self.config.images.delete_uploads:  # a cleanup, not new work: it survives a
                with contextlib.suppress(Stopped):  # drain, only a second signal cuts it short
                    await stop.call(caller.uploads.delete_all())
            self._summarise(producer, runner, caller)
        return opened.sink

    async def _open(
        self, stack: contextlib.AsyncExitStack, out: Path | Store, stop: Stop
    ) -> Opened:
        """The output opened (the lock taken, a killed run's journal recovered first), its
        state and resume index read, the client and the per-unit engine made: what every engine
        of a run works with."""
        fetcher = Fetcher(settings_from(self.config), seed=self.options.seed)
        stack.callback(fetcher.close)
        sink = await stack.enter_async_context(self._sink(out))
        state = open_state(out, self.config)  # after the lock: read what the last run left
        stack.callback(state.close)
        self.summary.recovered = sink.rows_recovered
        index = await asyncio.to_thread(
            load_resume_index,
            out,
            key_suffix=self.identity.key_suffix,
            retry_errors=self.options.retry_errors,
            write_cache=True,
        )
        client = await stack.enter_async_context(await self._client(stack))
        caller = self._caller(client, state, stop)
        answers = Answers(str(out), index.ok_keys, sink.flush)
        runner = ImageRunner(
            self.config, self.identity, caller=caller, answers=answers, sink=sink, fetcher=fetcher
        )
        return Opened(state, sink, index, client, caller, answers, runner, fetcher)

    def _sink(self, out: Path | Store) -> ParquetSink:
        output = self.config.output
        return ParquetSink(
            out,
            self.run_id,
            rows_per_part=output.rows_per_part,
            flush_seconds=output.flush_seconds,
            sync_seconds=output.journal_seconds,
            sync_rows=output.journal_rows,
            lease_seconds=output.lease_seconds,
        )

    async def _client(self, stack: contextlib.AsyncExitStack) -> GeminiClient:
        base_url, api_key = await service_endpoint(self.config, stack)
        return make_client(self.config, base_url, api_key)

    def _caller(self, client: GeminiClient, state: State, stop: Stop) -> Caller:
        limits = self.config.limits
        daily = DailyCount(
            limits.rpd,
            state.requests_on(quota_day_key()),
            lambda n: state.add_requests(quota_day_key(), n),
        )
        return Caller(
            self.config,
            self.request,
            client=client,
            limiter=RateLimiter(limits.rpm, limits.tpm, burst_seconds=limits.burst_seconds),
            daily=daily,
            uploads=Uploads(client, state),
            stop=stop,
            rng=random.Random(self.options.seed),
            references=self.references,
        )

    async def _work(
        self, producer: Producer, runner: ImageRunner, sink: ParquetSink, stop: Stop
    ) -> None:
        conc = self.config.limits.concurrency
        blocks: asyncio.Queue[Block | None] = asyncio.Queue(maxsize=2)
        files: asyncio.Queue[Work | None] = asyncio.Queue(maxsize=conc)
        calls = runner.caller.counters
        view = EngineView(producer, lambda: runner.counts.rows, lambda: calls.throttled)
        progress = Progress(view, enabled=self.options.progress)
        loop = asyncio.get_running_loop()
        with drain_on_signals(loop, stop, sink):
            walking = loop.run_in_executor(None, producer.run, loop, blocks)
            prefetch = runner.fetcher.prefetch if runner.fetcher else None
            dealer = asyncio.create_task(_deal(blocks, files, conc, stop, prefetch))
            workers = [asyncio.create_task(self._worker(files, runner, stop)) for _ in range(conc)]
            reporter = asyncio.create_task(progress.run())
            try:
                await asyncio.gather(*workers)
            finally:
                producer.halt.set()
                dealer.cancel()
                empty_queue(blocks)
                await walking
                for task in (dealer, reporter):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                progress.finish()

    async def _worker(
        self, files: asyncio.Queue[Work | None], runner: ImageRunner, stop: Stop
    ) -> None:
        while (src := await files.get()) is not None:
            if not stop.running:
                continue  # not started: a rerun picks it up
            await process_unit(runner, src, stop)

    def _summarise(self, producer: Producer, runner: ImageRunner, caller: Caller) -> None:
        s = self.summary
        s.finished_at = datetime.now(UTC).isoformat()
        s.seen, s.skipped = producer.seen, producer.skipped
        s.rows, s.tokens, s.copied = runner.counts.rows, runner.counts.tokens, runner.counts.copied
        s.cost_usd = round(runner.counts.cost_usd, 6)
        calls = caller.counters
        s.api_calls, s.retries, s.throttled = calls.api_calls, calls.retries, calls.throttled
        s.uploads, s.uploads_reused = caller.uploads.made, caller.uploads.reused
        s.waited_for_limits_s = round(caller.limiter.stats.waited_seconds, 3)


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


async def _compact_quietly(sink: ParquetSink, threshold: float, index: ResumeIndex) -> None:
    """Compact past the threshold; a failure leaves the output as it was (readers still see the
    current rows), so it is a warning, not the run's failure."""
    try:
        await sink.compact_if_over(
            threshold, visible=index.visible_rows, superseded=index.superseded_rows
        )
    except (OSError, ValueError, RuntimeError) as exc:
        log.warning("compaction at the end of the run failed (the output is intact): %s", exc)
