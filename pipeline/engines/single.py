"""The default engine: one process, a walking thread, a bounded hand-off, N async workers.

    walk (thread) ─batches─► dealer ─one file each─► workers ─► ImageRunner.process ─► sink

The walk hands out files, or groups of files when `[input] group_by` says so (source.work_units).
It skips, with a stat, every file (group) already committed under the same settings (the resume
index) and never enters the output folder. Memory stays flat at any input size: the hand-off
holds two batches, the workers one file each, the sink a bounded queue.

Stopping (see pipeline/run/stop.py): the first Ctrl-C, SIGTERM or SIGHUP makes what is answered
durable at once (the journal), then lets the calls in flight finish; a second one abandons them.
A run-level failure found by a call (a wrong key, the daily quota, an outage) drains the same way
and names its cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pipeline.config import Config, ConfigError, check_groups, declarations
from pipeline.gemini import GeminiClient, api_key_from_env
from pipeline.inputs.fetch import Fetcher, settings_from
from pipeline.inputs.references import load as load_references
from pipeline.inputs.source import work_units
from pipeline.output.dataset import ResumeIndex, load_resume_index
from pipeline.output.sink import ParquetSink, SinkFailed
from pipeline.output.state import State
from pipeline.output.stores import MissingExtra, Store, is_url, local_path, open_store, scheme_of
from pipeline.records import SourceFile, Work, members_of, work_identity
from pipeline.run.calls import Caller, RunStopped
from pipeline.run.limits import DailyCount, RateLimiter
from pipeline.run.progress import EngineView, Progress
from pipeline.run.reuse import Answers
from pipeline.run.rows import RunFacts
from pipeline.run.runner import ImageRunner, RunOptions, key_suffix
from pipeline.run.stop import Stop, Stopped, on_signals
from pipeline.run.summary import RunSummary, new_run_id
from pipeline.tasks import get_task

log = logging.getLogger(__name__)
Batch = list[Work]
LOCAL_KEY = "local-key"
BATCH_SIZE = 64  # files handed from the walking thread to the workers at once
BATCH_SECONDS = 0.05


class Producer:
    """Walks the inputs in a thread and feeds a bounded queue in small batches."""

    def __init__(
        self, config: Config, index: ResumeIndex, limit: int | None, fetcher: Fetcher
    ) -> None:
        self.config = config
        self.index = index
        self.limit = limit
        self.fetcher = fetcher  # sizes and versions of manifest URLs and objects
        self.seen = 0
        self.skipped = 0
        self.done = False
        self.halt = threading.Event()  # set by the engine when the run stops

    def run(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Batch | None]) -> None:
        """One cross-thread wake-up per batch, not per file. A batch goes when it is full or
        BATCH_SECONDS old, so a slow walk (a network share) still feeds the workers promptly."""
        batch: Batch = []
        started = time.monotonic()
        try:
            for src in self._todo():
                batch.append(src)
                if len(batch) >= BATCH_SIZE or time.monotonic() - started > BATCH_SECONDS:
                    asyncio.run_coroutine_threadsafe(queue.put(batch), loop).result()
                    batch, started = [], time.monotonic()
        finally:
            self.done = True
            if batch and not self.halt.is_set():
                asyncio.run_coroutine_threadsafe(queue.put(batch), loop).result()
            asyncio.run_coroutine_threadsafe(queue.put(None), loop).result()

    def _todo(self) -> Iterator[Work]:
        sent = 0
        units = work_units(
            self.config.input, skip=(self.config.output.dir,), resolve=self.fetcher.resolve
        )
        for work in units:
            if self.halt.is_set() or (self.limit is not None and sent >= self.limit):
                return
            self.seen += 1
            if work.error is None and self.index.is_done(*work_identity(work)):
                self.skipped += 1
                continue
            sent += 1
            yield work


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

    def __init__(self, config: Config, options: RunOptions) -> None:
        self.config = config
        self.options = options
        self.request = get_task(config.task.kind).request(config.task)
        check_groups(config)
        self.references = load_references(config)  # read once: the run's every request has them
        self.run_id = new_run_id()
        suffix = key_suffix(config, self.references)
        self.facts = RunFacts(self.run_id, config.task.kind, config.api.model, suffix)
        self.summary = RunSummary.of_run(self.facts, config.source)
        self.stop: Stop | None = None  # made in run(): it needs the event loop

    async def run(self) -> RunSummary:
        out = open_output(self.config)
        self.stop = stop = Stop()
        try:
            sink = await self._run(out, stop)
            self.summary.unstorable = sink.unstorable  # counted up to its last part
        except SinkFailed as exc:  # the last part could not be written (a full disk...)
            stop.drain(f"the output cannot be written: {exc}", sink_hint())
        self._settle(stop)
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
            key_suffix=self.facts.key_suffix,
            retry_errors=self.options.retry_errors,
            write_cache=True,
        )
        client = await stack.enter_async_context(await self._client(stack))
        caller = self._caller(client, state, stop)
        answers = Answers(str(out), index.ok_keys, sink.flush)
        runner = ImageRunner(
            self.config, self.facts, caller=caller, answers=answers, sink=sink, fetcher=fetcher
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
        try:
            return self._make_client(base_url, api_key)
        except ValueError as exc:  # an http:// endpoint off this machine, a malformed URL
            raise ConfigError(f"{self.config.source}: [api] base_url: {exc}") from None

    def _make_client(self, base_url: str, api_key: str) -> GeminiClient:
        return GeminiClient(
            api_key,
            base_url=base_url,
            version=self.config.api.version,
            max_connections=self.config.limits.concurrency,
            timeout=self.config.api.timeout,
            allow_insecure_http=self.config.api.allow_insecure_http,
            max_response_bytes=int(self.config.api.max_response_mb * 1024 * 1024),
        )

    def _caller(self, client: GeminiClient, state: State, stop: Stop) -> Caller:
        from pipeline.run.uploads import Uploads

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
        batches: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=2)
        files: asyncio.Queue[Work | None] = asyncio.Queue(maxsize=conc)
        calls = runner.caller.counters
        view = EngineView(producer, lambda: runner.counts.rows, lambda: calls.throttled)
        progress = Progress(view, enabled=self.options.progress)
        loop = asyncio.get_running_loop()
        with drain_on_signals(loop, stop, sink):
            walking = loop.run_in_executor(None, producer.run, loop, batches)
            prefetch = runner.fetcher.prefetch if runner.fetcher else None
            dealer = asyncio.create_task(_deal(batches, files, conc, stop, prefetch))
            workers = [asyncio.create_task(self._worker(files, runner, stop)) for _ in range(conc)]
            reporter = asyncio.create_task(progress.run())
            try:
                await asyncio.gather(*workers)
            finally:
                producer.halt.set()
                dealer.cancel()
                empty_queue(batches)
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

    def _settle(self, stop: Stop) -> None:
        s = self.summary
        s.finished_at = s.finished_at or datetime.now(UTC).isoformat()
        if stop.reason:
            s.stop_reason, s.resume_hint, s.exit_code = stop.reason, stop.hint, stop.exit_code
        s.settle_exit_code()


async def _deal(
    batches: asyncio.Queue[Batch | None],
    files: asyncio.Queue[Work | None],
    workers: int,
    stop: Stop,
    prefetch: Callable[[SourceFile], None] | None = None,
) -> None:
    """Deal the walking thread's batches out to the workers one unit at a time (an object or a
    URL starts being read as it is dealt: `Fetcher.prefetch`)."""
    while (batch := await batches.get()) is not None:
        for work in batch:
            if not stop.running:
                break
            if prefetch is not None:
                for src in members_of(work):
                    prefetch(src)
            await files.put(work)
    for _ in range(workers):
        await files.put(None)


def empty_queue(queue: asyncio.Queue[Batch | None]) -> None:
    """Unblock the walking thread if it waits on a full queue after the workers left."""
    while not queue.empty():
        queue.get_nowait()


@contextlib.contextmanager
def drain_on_signals(
    loop: asyncio.AbstractEventLoop, stop: Stop, sink: ParquetSink
) -> Iterator[None]:
    """Each signal: make what is answered durable now, then drain (first) or abandon (next)."""
    pending: set[asyncio.Task[None]] = set()

    def handle() -> None:
        stop.signal()
        task = loop.create_task(_sync_quietly(sink))
        pending.add(task)
        task.add_done_callback(pending.discard)

    with on_signals(loop, handle):
        yield


async def _sync_quietly(sink: ParquetSink) -> None:
    with contextlib.suppress(Exception):
        await sink.sync()


async def service_endpoint(config: Config, stack: contextlib.AsyncExitStack) -> tuple[str, str]:
    """The base URL and key: the bundled local server in-process, or the configured one."""
    if config.api.base_url == "local":
        from pipeline.localserver import LocalServer, ServerOptions

        local = {key: getattr(config.local, key) for key in declarations("local")}
        options = ServerOptions(**local, inline_limit_bytes=config.inline_limit_bytes)
        server = await stack.enter_async_context(LocalServer(options))
        return server.base_url, api_key_from_env() or LOCAL_KEY
    key = api_key_from_env()
    if not key:
        raise ConfigError(
            f"{config.source}: [api] base_url is {config.api.base_url}: "
            "set GOOGLE_API_KEY (or GEMINI_API_KEY) in the environment"
        )
    return config.api.base_url, key


async def _compact_quietly(sink: ParquetSink, threshold: float, index: ResumeIndex) -> None:
    """Compact past the threshold; a failure leaves the output as it was (readers still see the
    current rows), so it is a warning, not the run's failure."""
    try:
        await sink.compact_if_over(
            threshold, visible=index.visible_rows, superseded=index.superseded_rows
        )
    except (OSError, ValueError, RuntimeError) as exc:
        log.warning("compaction at the end of the run failed (the output is intact): %s", exc)


def open_output(config: Config) -> Path | Store:
    """The output folder, created; a path that is a file or cannot be written is a usage error.
    An object-store prefix is its Store (its bucket must exist)."""
    if is_url(config.output.dir) and scheme_of(config.output.dir) != "file":
        try:
            store = open_store(config.output.dir)
            store.ensure()
        except (ValueError, MissingExtra, FileNotFoundError, PermissionError) as exc:
            raise ConfigError(f"{config.source}: [output] dir: {exc}") from None
        return store
    out = Path(local_path(config.output.dir))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"{config.source}: [output] dir {out} is not a folder") from None
    except OSError as exc:
        raise ConfigError(f"{config.source}: [output] dir {out}: {exc.strerror}") from None
    if not out.is_dir():
        raise ConfigError(f"{config.source}: [output] dir {out} is not a folder")
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"{config.source}: [output] dir {out} is not writable")
    return out


def open_state(out: Path | Store, config: Config) -> State:
    try:
        return State(out)
    except sqlite3.DatabaseError as exc:
        where = out.join("state.sqlite") if isinstance(out, Store) else out / "state.sqlite"
        raise ConfigError(
            f"{config.source}: {where} cannot be read ({exc}); move it aside "
            "(it holds reusable uploads and today's request count) and run again"
        ) from None


def quota_day_key() -> str:
    from pipeline.run.limits import quota_day

    return quota_day().isoformat()


async def process_unit(runner: ImageRunner, work: Work, stop: Stop) -> None:
    """One unit through `runner`. A failure of the run itself (a verdict, an unwritable output)
    drains the run: units already started finish, no new one starts; a unit stopped by the
    run's end is left for a rerun. Every engine's worker loop calls this."""
    try:
        await runner.process(work)
    except Stopped:
        return
    except RunStopped as exc:
        verdict = exc.verdict
        stop.drain(verdict.reason, verdict.hint, verdict.exit_code)
    except SinkFailed as exc:
        stop.drain(f"the output cannot be written: {exc}", sink_hint())


def sink_hint() -> str:
    return (
        "free the disk (or fix the folder) and rerun: answered rows are safe in the journal "
        "and are committed by the next run without a call"
    )
