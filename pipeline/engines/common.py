"""What every engine of a run shares: the walk, the output and its state opened, the service
endpoint and its client, one unit through the runner, the summary, and how signals and failures
drain a run.

    Producer (a thread): walk the inputs, skip what is done ─blocks of units─► the engine's queue
    Opener: the output opened ─► Opened: state, sink, resume index, client, Caller, Bought, and
            the ImageRunner that buys interactively

A block is a handful of units handed from the walking thread to the event loop at once (one
cross-thread wake-up per block, not per file); engines deal them out to their workers. One
process (single.py) and Batch Mode (batch/engine.py) open a run with the same `Opener`, so their
output, state, resume index, client, calls and reuse are made by the same code.

The preflight (`Preflight`, what its answer means: pipeline/run/preflight.py) is one models.get
made by `walking` when the walk first finds work, before any block reaches the engine: a run
with nothing to do (the nightly rerun) makes no call at all, and every engine gets it from the
same place. An alias the service says is another entry than the table's guess starts the run
again with that entry's settings (`AliasMoved`, caught by `pipeline.engines.run_async`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline import exits
from pipeline.config import Config, ConfigError, declarations
from pipeline.engines.backend import client_backend
from pipeline.gemini import ApiKeyError, GeminiClient, GeminiError, api_key_from_env
from pipeline.inputs.fetch import Fetcher, settings_from
from pipeline.inputs.references import LoadedReference
from pipeline.inputs.source import PassedOver
from pipeline.localserver.options import ServerOptions
from pipeline.locations import is_url, local_path, scheme_of
from pipeline.output.index import DoneOrInFlight, ResumeIndex, load_resume_index
from pipeline.output.sink import ParquetSink, SinkFailed
from pipeline.output.state import STATE_FILE, State
from pipeline.output.stores import (
    LeaseLost,
    MissingExtra,
    Store,
    Timeouts,
    failure_text,
    open_store,
    transient,
    use_timeouts,
)
from pipeline.records import Work
from pipeline.run import preflight
from pipeline.run.buyers import InteractiveBuyer
from pipeline.run.calls import Caller, RunStopped
from pipeline.run.identity import RunIdentity, suffixes_of
from pipeline.run.limits import DailyCount, RateLimiter, quota_day
from pipeline.run.plan import redo_guard
from pipeline.run.reuse import Bought, recent_capacity
from pipeline.run.runner import ImageRunner, RowCounts, RunOptions
from pipeline.run.spend import Spend
from pipeline.run.stop import Stop, Stopped, on_signals
from pipeline.run.summary import RunSummary
from pipeline.run.uploads import Uploads
from pipeline.run.walk import Walk
from pipeline.tasks import get_task
from pipeline.tasks.typed import answer_field

log = logging.getLogger(__name__)

Block = list[Work]
LOCAL_KEY = "local-key"
BLOCK_SIZE = 64  # units handed from the walking thread to the workers at once
BLOCK_SECONDS = 0.05


class Producer:
    """Walks the inputs in a thread (the run's `Walk`, which the plan walks too) and feeds a
    bounded queue in small blocks."""

    def __init__(
        self,
        config: Config,
        done_test: DoneOrInFlight,
        limit: int | None,
        fetcher: Fetcher,
        preflight: Preflight | None = None,
    ) -> None:
        self.config = config
        self.fetcher = fetcher  # sizes and versions of manifest URLs and objects
        self.preflight = preflight  # asked by `walking` once this walk finds work
        self.passed = PassedOver()  # files the include patterns pass over: the summary's "ignored"
        self.walk = Walk(config, done_test, fetcher, limit, self.passed)
        self.done = False
        self.halt = threading.Event()  # set by the engine when the run stops
        self.walk.halted = self.halt.is_set
        self.on_work: Callable[[], object] = lambda: None  # the first unit to do is found

    @property
    def seen(self) -> int:
        return self.walk.seen

    @property
    def skipped(self) -> int:
        return self.walk.skipped

    @property
    def in_flight(self) -> int:
        """Units skipped because a Batch Mode job in flight is buying them."""
        return self.walk.in_flight

    def run(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Block | None]) -> None:
        """One cross-thread wake-up per block, not per file. A block goes when it is full or
        BLOCK_SECONDS old, so a slow walk (a network share) still feeds the workers promptly."""
        block: Block = []
        started = time.monotonic()
        try:
            for src in self._todo():
                block.append(src)
                if len(block) >= BLOCK_SIZE or time.monotonic() - started > BLOCK_SECONDS:
                    asyncio.run_coroutine_threadsafe(queue.put(block), loop).result()
                    block, started = [], time.monotonic()
        finally:
            self.done = True
            if block and not self.halt.is_set():
                asyncio.run_coroutine_threadsafe(queue.put(block), loop).result()
            asyncio.run_coroutine_threadsafe(queue.put(None), loop).result()

    def _todo(self) -> Iterator[Work]:
        units = self.walk.units()
        first = next(units, None)
        if first is None:
            return
        self.on_work()
        yield first
        yield from units


def empty_queue(queue: asyncio.Queue[Block | None]) -> None:
    """Unblock the walking thread if it waits on a full queue after the workers left."""
    while not queue.empty():
        queue.get_nowait()


@contextlib.asynccontextmanager
async def walking(producer: Producer) -> AsyncIterator[asyncio.Queue[Block | None]]:
    """The walk running in its thread, feeding the queue given (two blocks at most, so memory
    stays flat); on leaving, the walk is halted and its thread joined. With a preflight, the
    queue is handed over once the walk has found work and the preflight is made, or once the
    walk ended with nothing to do (then no call is made)."""
    blocks: asyncio.Queue[Block | None] = asyncio.Queue(maxsize=2)
    loop = asyncio.get_running_loop()
    found = asyncio.Event()
    producer.on_work = functools.partial(loop.call_soon_threadsafe, found.set)
    walker = loop.run_in_executor(None, producer.run, loop, blocks)
    try:
        if producer.preflight is not None:
            await producer.preflight.when_work(found, walker, producer)
        yield blocks
    finally:
        producer.halt.set()
        empty_queue(blocks)
        await walker


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
        # Imported here, not at the top, for its cost and not for a cycle: the server's web
        # stack (aiohttp.web) adds 0.13 s to every run's start (python -X importtime), and only
        # a run against the bundled server needs it.
        from pipeline.localserver.server import LocalServer

        local = {key: getattr(config.local, key) for key in declarations("local")}
        options = ServerOptions(**local, inline_limit_bytes=config.inline_limit_bytes)
        server = await stack.enter_async_context(LocalServer(options, models=config.models))
        return server.base_url, _key_from_env(config) or LOCAL_KEY
    key = _key_from_env(config)
    if not key and config.api.backend == "vertex":
        return config.api.base_url, ""  # Application Default Credentials (engines/backend.py)
    if not key:
        raise ConfigError(
            f"{config.source}: [api] base_url is {config.api.base_url}: "
            "set GOOGLE_API_KEY (or GEMINI_API_KEY) in the environment"
        )
    return config.api.base_url, key


def _key_from_env(config: Config) -> str | None:
    """The environment's key; one the client refuses is a usage error (exit 2)."""
    try:
        return api_key_from_env()
    except ApiKeyError as exc:
        raise ConfigError(f"{config.source}: {exc}") from None


def bound_store_requests(config: Config) -> None:
    """This process's store requests bounded by the config's `[storage]` (a run's, a Ray
    worker's: each process makes its own filesystems)."""
    storage = config.storage
    use_timeouts(Timeouts(storage.connect_seconds, storage.read_seconds))


def open_output(config: Config) -> Path | Store:
    """The output folder, created; a path that is a file or cannot be written is a usage error.
    An object-store prefix is its Store (its bucket must exist)."""
    if is_url(config.output.dir) and scheme_of(config.output.dir) != "file":
        try:
            store = open_store(config.output.dir)
            store.ensure()
        except (ValueError, MissingExtra, OSError) as exc:  # no bucket, credentials or endpoint
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
        where = out.join(STATE_FILE) if isinstance(out, Store) else out / STATE_FILE
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_FULL:
            # A full disk, not a damaged file: moving it aside would lose what it holds.
            raise OSError(errno.ENOSPC, f"{where} cannot be written ({exc})") from None
        raise ConfigError(
            f"{config.source}: {where} cannot be read ({exc}); move it aside "
            "(it holds reusable uploads and today's request count) and run again"
        ) from None


def quota_day_key() -> str:
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
        sink_failed(stop, exc)


LEASE_LOST = "the output's lease was lost: another run may have taken it"


def sink_failed(stop: Stop, exc: SinkFailed) -> None:
    """Stop the run for a sink that failed: a lost lease is named as such (no disk to free),
    and wins over any earlier reason; anything else is an output that cannot be written."""
    if isinstance(exc.__cause__, LeaseLost):
        stop.lost_output(
            LEASE_LOST,
            "rerun (once that run has finished): answered rows are safe in the journal and are "
            "committed by the next run without a call",
        )
        return
    stop.drain(f"the output cannot be written: {exc}", sink_hint())


def sink_hint() -> str:
    return (
        "free the disk (or fix the folder) and rerun: answered rows are safe in the journal "
        "and are committed by the next run without a call"
    )


def make_client(config: Config | None, base_url: str, key: str, version: str = "") -> GeminiClient:
    """The one way a client is made: the endpoint and key, and the config's [api] and [limits]
    (their defaults without a config: `pipeline batch` commands given no --config). `version`
    overrides [api] version (a batch job is followed at the version it was created at)."""
    config = config or Config()
    api = config.api
    backend, auth = client_backend(config, base_url, key, version or api.version)
    try:
        return GeminiClient(
            key or None,
            max_connections=config.limits.concurrency,
            timeout=api.timeout,
            allow_insecure_http=api.allow_insecure_http,
            max_response_bytes=int(api.max_response_mb * 1024 * 1024),
            backend=backend,
            auth=auth,
        )
    except ValueError as exc:  # an http:// endpoint off this machine, a malformed URL
        raise ConfigError(f"{config.source}: [api] base_url: {exc}") from None


# ------------------------------------------------------------------------------ opening a run
@dataclass(frozen=True)
class RunStart:
    """What a run starts from, made once by `pipeline.engines.run_async` and handed to its
    engine: the config, the run's identity, its reference images (read once: every request of
    the run has them) and the run's options; `checked`, what the preflight learned when the run
    starts again for it (`AliasMoved`), so it is not asked twice."""

    config: Config
    identity: RunIdentity
    references: tuple[LoadedReference, ...]
    options: RunOptions
    checked: preflight.Checked | None = None


class AliasMoved(Exception):
    """The service says the configured alias is another entry than the table's guess: the run
    starts again from `start` (that entry's settings and settings hash; the same run id)."""

    def __init__(self, start: RunStart) -> None:
        super().__init__(preflight.resolution(start.config, start.checked))
        self.start = start


class Preflight:
    """A run's one models.get on its base URL and version, made when its walk first finds work
    (`walking`), before the first paid call; pipeline/run/preflight.py says what the answer
    does. `stop` is the run's: a verdict drains it before any unit starts."""

    def __init__(self, start: RunStart, client: GeminiClient, stop: Stop) -> None:
        self.start, self.client, self.stop = start, client, stop
        self.checked = start.checked

    @property
    def resolution(self) -> str | None:
        """The summary's line on an alias (the service's answer, or the table's guess)."""
        return preflight.resolution(self.start.config, self.checked)

    async def when_work(
        self, found: asyncio.Event, walked: asyncio.Future[None], producer: Producer
    ) -> None:
        """Once the walk finds work, the preflight; nothing when it ends without (or the run
        stops first)."""
        with contextlib.suppress(Stopped):
            if await self.stop.until(_work_found(found, walked)):
                await self.check(producer)

    async def check(self, producer: Producer) -> None:
        if self.checked is not None or not self.stop.running:
            return  # asked already (before a restart), or the run is stopping
        config = self.start.config
        try:
            info = await self.stop.call(self.client.get_model(config.api.model))
        except (GeminiError, ValueError) as exc:
            self._failed(exc, producer)
            return
        self.checked = preflight.Checked(preflight.stated_target(info, config))
        if preflight.moves(config, self.checked) and self.stop.running:  # not after a Ctrl-C
            self._restart(self.checked)

    def _failed(self, error: GeminiError | ValueError, producer: Producer) -> None:
        verdict = preflight.verdict(error, self.start.config)
        if verdict is None:  # passing: the calls meet it too, and the runner handles it there
            log.warning("models.get %s failed, going on: %s", self.start.config.api.model, error)
            return
        self.stop.drain(verdict.reason, verdict.hint, verdict.exit_code)
        producer.halt.set()

    def _restart(self, checked: preflight.Checked) -> None:
        """Raise AliasMoved with the run's start under the stated entry (the run drained first,
        so an engine leaves at once: Batch Mode does not wait on its jobs in flight)."""
        self.stop.drain("the run starts again under the model the service names")
        start = self.start
        config = preflight.resolved(start.config, checked)  # ConfigError: a setting it refuses
        suffixes = suffixes_of(config, start.references)
        identity = dataclasses.replace(start.identity, suffixes=suffixes)
        moved = AliasMoved(RunStart(config, identity, start.references, start.options, checked))
        log.warning("%s: the run starts again with its settings", moved)
        raise moved


async def _work_found(found: asyncio.Event, walked: asyncio.Future[None]) -> bool:
    """True once the walk found a unit to do, False once it ended without one."""
    waiting = asyncio.ensure_future(found.wait())
    either: list[asyncio.Future[Any]] = [waiting, walked]
    try:
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
    return found.is_set()


@dataclass(frozen=True)
class Opened:
    """What a run works with once its output is open (`Opener.open`)."""

    state: State
    sink: ParquetSink
    index: ResumeIndex
    client: GeminiClient
    caller: Caller
    bought: Bought
    runner: ImageRunner  # buys interactively (Batch Mode: its interactive retries)
    fetcher: Fetcher
    preflight: Preflight  # the walk's (`Producer(..., opened.preflight)`)


class OutputUnavailable(exits.NotStarted):
    """A bucket output that failed transiently while the run opened it (its lease, the last
    run's journal): no call was made; exit 3, the same command resumes once it answers."""

    exit_code = exits.STOPPED


class Opener:
    """Opens a run's output and makes what every engine in this process works with."""

    def __init__(self, start: RunStart) -> None:
        self.start = start
        self.config, self.identity, self.options = start.config, start.identity, start.options
        self.references = start.references
        self.request = get_task(start.config.task.kind).request(start.config.task)

    async def open(self, stack: contextlib.AsyncExitStack, out: Path | Store, stop: Stop) -> Opened:
        """The output opened (the lock taken, a killed run's journal recovered first), its
        state and resume index read, the client, the calls and the runner made; everything
        closed with `stack`."""
        fetcher = Fetcher(settings_from(self.config), seed=self.options.seed)
        stack.callback(fetcher.close)
        sink = await self._open_sink(stack, out)
        state = open_state(out, self.config)  # after the lock: read what the last run left
        stack.callback(state.close)
        index = await asyncio.to_thread(self._index, out)
        await guard_redo(self.config, self.options, index)
        client = await stack.enter_async_context(await self._client(stack))
        caller = self._caller(client, state, stop)
        # a run that fails still deletes its context cache: before the client closes (LIFO)
        stack.push_async_callback(caller.context.close)
        recent = recent_capacity(self.config.output.rows_per_part)
        bought = Bought(str(out), index.ok_keys, sink.flush, recent=recent)
        runner = ImageRunner(
            self.config,
            self.identity,
            buyer=InteractiveBuyer(caller, bought),
            bought=bought,
            sink=sink,
            fetcher=fetcher,
        )
        checking = Preflight(self.start, client, stop)
        return Opened(state, sink, index, client, caller, bought, runner, fetcher, checking)

    async def _open_sink(self, stack: contextlib.AsyncExitStack, out: Path | Store) -> ParquetSink:
        """The sink open (its lock taken, a killed run's journal committed); a bucket that fails
        transiently meanwhile (a timeout, an outage) is `OutputUnavailable`: nothing bought."""
        try:
            return await stack.enter_async_context(self._sink(out))
        except Exception as exc:
            if isinstance(out, Path) or not transient(exc):
                raise
            raise OutputUnavailable(f"{out}: {failure_text(exc)}") from None

    def _sink(self, out: Path | Store) -> ParquetSink:
        output = self.config.output
        return ParquetSink(
            out,
            self.identity.run_id,
            rows_per_part=output.rows_per_part,
            part_bytes=output.part_mb << 20,
            flush_seconds=output.flush_seconds,
            sync_seconds=output.journal_seconds,
            sync_rows=output.journal_rows,
            lease_seconds=output.lease_seconds,
            answer=answer_field(self.config.task),
        )

    def _index(self, out: Path | Store) -> ResumeIndex:
        return load_resume_index(
            out,
            key_suffix=self.identity.suffixes,
            retry_errors=self.options.retry_errors,
            write_cache=True,
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
            spend=output_spend(self.config, state),
        )


async def guard_redo(config: Config, options: RunOptions, index: ResumeIndex) -> None:
    """Refuse (RedoRefused, before any call) a run whose plan redoes more committed rows than
    `[limits] max_redo` allows because settings changed, when its front door asks. Here, not
    before the run, because the run's own resume index says for free whether any current row
    was made by another request: the nightly run pays nothing for the check."""
    if options.ask_before_redo:
        limit, retry_errors = options.limit, options.retry_errors
        await asyncio.to_thread(redo_guard, config, index, limit=limit, retry_errors=retry_errors)


def output_spend(config: Config, state: State) -> Spend:
    """The run's spend against its caps, today's earlier spend in this output counted in."""
    return Spend(
        config,
        spent_today=state.spent_on(quota_day_key()),
        save=lambda usd: state.add_spend(quota_day_key(), usd),
    )


def summarise(summary: RunSummary, producer: Producer, counts: RowCounts, caller: Caller) -> None:
    """What the walk, the rows and the interactive calls of a run add up to."""
    summary.finished_at = datetime.now(UTC).isoformat()
    summary.seen, summary.skipped = producer.seen, producer.skipped
    summary.in_batch_jobs = producer.in_flight
    summary.ignored = producer.passed.ignored
    summary.rows, summary.tokens, summary.copied = counts.rows, counts.tokens, counts.copied
    summary.cost_usd = round(counts.cost_usd, 6)
    calls = caller.counters
    summary.api_calls, summary.retries = calls.api_calls, calls.retries
    summary.throttled = calls.throttled
    summary.abandoned = calls.abandoned
    summary.abandoned_est_usd = round(calls.abandoned_usd, 6)
    summary.uploads, summary.uploads_reused = caller.uploads.made, caller.uploads.reused
    summary.waited_for_limits_s = round(caller.limiter.stats.waited_seconds, 3)
    summary.spend = caller.spend.summary()
    summary.context_cache = caller.context.summary()
    summary.model_resolution = producer.preflight.resolution if producer.preflight else None
