"""The Ray engine: one run spread over a Ray cluster's worker actors, under one shared quota.

    driver: walk (thread) ─► route by file size ─► blocks of files ─► Worker actors (async)
    Worker: ImageRunner.process per file (prepare, reuse, Caller, rows) ─► its own ParquetSink
    every Worker's Caller ─ LeasedLimiter, LeasedDaily ─► the project's quota actor (quota.py)

The driver lists the inputs and skips what the resume index says is done, as the single engine
does (`single.Producer`), and hands the rest out in blocks of BLOCK_FILES files, at most
BLOCKS_IN_FLIGHT per worker (Ray Data's actor pools keep two tasks per actor in flight). Each
worker runs the single engine's per-image code with `[limits] concurrency` files in flight and
commits its rows itself, through the same sink and journal, so an answer is durable within about
a second wherever it was bought, and a lost worker exposes only what it had in flight.

Who writes the output (see pipeline/sink.py): the driver takes it as any run does — the lock,
exclusively, and a killed run's journal committed — then shares the lock with its workers. Each
worker's sink writes parts and a journal under its own name, `<run id>.w<n>` (rows keep the
run's id), so writers never touch each other's files; another run cannot start on the folder
while any of them holds it. Rows, keys, resume and exit codes are those of the single engine;
so is the run summary, summed from the workers' block reports.

Files of the same size go to the same worker (same bytes have the same size), so the single
engine's dedupe — a twin waits for the call in flight, or copies the answer — still sees every
twin; only when that worker's queue is full does a file go to the least busy one instead.

A lost worker (its process killed, its node gone) is restarted by Ray, and its blocks are sent to
it again (Ray Data's defaults: restarts and task retries). The new incarnation first commits the
journal its predecessor left and skips the files it had answered, so what is paid twice is only
what was in flight: calls sent, and answers of the last WORKER_SYNC_SECONDS not yet durable.
After MAX_RESTARTS losses of one worker the run stops (exit 3).

The API key: workers read it from their own environment; the driver passes its own to them only
where it stays on this machine (every Ray node is this one; the workers are then pinned here) or
Ray's connections are encrypted (RAY_USE_TLS), because Ray's RPCs are otherwise clear text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import shutil
import tempfile
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline import exits
from pipeline.calls import Caller, RunStopped
from pipeline.config import Config, ConfigError, EngineConfig
from pipeline.dataset import KeySet, load_resume_index
from pipeline.engines.quota import (
    NAMESPACE,
    ActorLink,
    LeasedDaily,
    LeasedLimiter,
    Limits,
    quota_actor,
    quota_name,
)
from pipeline.engines.single import (
    SIGNALS,
    Batch,
    Producer,
    _day_key,
    _endpoint,
    _open_state,
    _output_dir,
    _sink_hint,
)
from pipeline.gemini import GeminiClient, api_key_from_env
from pipeline.progress import Progress
from pipeline.records import SourceFile, storable
from pipeline.reuse import Answers
from pipeline.rows import RunFacts
from pipeline.runner import ImageRunner, RowCounts, RunOptions, key_suffix
from pipeline.sink import ParquetSink, SinkFailed, recover_writer, shared_output
from pipeline.state import State
from pipeline.stop import Stop, Stopped
from pipeline.summary import RunSummary
from pipeline.tasks import get_task
from pipeline.uploads import Uploads

log = logging.getLogger(__name__)

BLOCK_FILES = 16  # files handed to a worker at once
BLOCKS_IN_FLIGHT = 2  # per worker: the next block waits there while one runs (as in Ray Data)
QUEUE_FILES = 2 * BLOCK_FILES  # routed to a worker but not yet sent; more waits (memory)
MAX_RESTARTS = 3  # per worker; then the run stops
START_TIMEOUT = 300.0  # seconds for the workers to be placed and started
QUOTA_WATCH = 2.0  # seconds between looks at the quota actor (restarted: seed it again)
# A worker may be lost at any moment (a preempted node): its answers are made durable within a
# quarter of a second rather than the single engine's second, which bounds what a loss re-pays
# to its calls in flight plus 0.25 s of answers. Four fsyncs a second cost a worker nothing.
WORKER_SYNC_SECONDS = 0.25
_GOLDEN = 0x9E3779B97F4A7C15  # Fibonacci hashing: sizes that share factors still spread


# ----------------------------------------------------------------------------------- tally
@dataclass
class Tally:
    """What workers report to the driver: the figures of the run summary their work decides."""

    rows: Counter[str] = field(default_factory=Counter)
    tokens: Counter[str] = field(default_factory=Counter)
    copied: int = 0
    api_calls: int = 0
    retries: int = 0
    throttled: int = 0
    answered: int = 0  # requests the service answered: the day's count
    waited_s: float = 0.0
    uploads: int = 0
    uploads_reused: int = 0
    unstorable: int = 0
    stop: tuple[str, str | None, int] | None = None  # the worker's stop: reason, hint, code

    def add(self, other: Tally) -> None:
        for f in fields(self):
            if f.name != "stop":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def minus(self, other: Tally) -> Tally:
        values = {f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)[:-1]}
        return Tally(**values, stop=self.stop)


def _add_counts(tally: Tally, counts: RowCounts) -> None:
    tally.rows.update(counts.rows)
    tally.tokens.update(counts.tokens)
    tally.copied += counts.copied


# ---------------------------------------------------------------------------------- worker
class _Secret:
    """The API key on its way to a worker: never in a repr, a log or an error."""

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<redacted>"


@dataclass(frozen=True)
class WorkerSetup:
    """Everything a worker is made with (Ray keeps it to restart the worker)."""

    config: Config
    facts: RunFacts
    name: str  # its parts and journal: part-<name>-<seq>.parquet
    seed: int | None
    quota: str  # the quota actor's name
    base_url: str
    key: _Secret | None  # None: the worker's own environment has it
    index: int = 0  # of the worker in the fleet


class WorkerSetupError(Exception):
    """A worker cannot start (no API key, another key): a usage error of the run."""


class Worker:
    """One worker of a Ray run (made a Ray actor by `_worker_class`): the single engine's
    per-image code, `[limits] concurrency` files at a time, committing its own parts."""

    def __init__(self, setup: WorkerSetup) -> None:
        self.setup = setup
        self.config = setup.config
        self.stop = Stop()
        self.prior: dict[tuple[str, str], dict[str, Any]] = {}  # a predecessor's rows
        self.reported = Tally()
        self.tally = Tally()  # rows of finished files, cumulative
        self._stack = contextlib.AsyncExitStack()
        self._files: asyncio.Queue[tuple[SourceFile, asyncio.Future[Tally]]] | None = None
        self._pool: list[asyncio.Task[None]] = []
        self._parts: dict[str, Any] = {}  # sink, caller, answers, limiter, daily, scratch
        self._started: asyncio.Task[dict[str, Any]] | None = None

    async def start(self, ok_keys: list[Any]) -> dict[str, Any]:
        """Open the sink, client and pool, once (a restarted worker first commits the journal
        its predecessor left). `ok_keys`: [a reference to the resume index's KeySet], passed
        with each block too (not to the constructor: Ray would keep it to restart the actor)."""
        if self._started is None:
            self._started = asyncio.ensure_future(self._start(ok_keys[0]))
        return await asyncio.shield(self._started)

    async def _start(self, ok_keys_ref: Any) -> dict[str, Any]:
        import ray

        setup, config, stop = self.setup, self.config, self.stop
        key = setup.key.reveal() if setup.key else api_key_from_env()
        _check_key(key, setup)
        assert key is not None
        out = Path(config.output.dir)
        # A journal or parts under this worker's name are a predecessor's (Ray restarted it).
        recovered = await asyncio.to_thread(recover_writer, out, setup.name)
        self.prior = await asyncio.to_thread(_rows_of_writer, out, setup.name)
        ok_keys: KeySet = await ok_keys_ref
        sink = await self._stack.enter_async_context(
            ParquetSink(
                out,
                setup.name,
                rows_per_part=config.output.rows_per_part,
                flush_seconds=config.output.flush_seconds,
                sync_seconds=WORKER_SYNC_SECONDS,
                shared=True,
            )
        )
        client = await self._stack.enter_async_context(_client(config, setup.base_url, key))
        caller = self._caller(client, stop)
        self._parts.update(sink=sink, caller=caller, answers=Answers(str(out), ok_keys, sink.flush))
        self._files = asyncio.Queue()
        concurrency = config.limits.concurrency
        self._pool = [asyncio.ensure_future(self._serve()) for _ in range(concurrency)]
        node = ray.get_runtime_context().get_node_id()
        return {"pid": os.getpid(), "node": node, "recovered": recovered}

    def _caller(self, client: GeminiClient, stop: Stop) -> Caller:
        limits, setup = self.config.limits, self.setup
        link = ActorLink(setup.quota, _limits(self.config))
        limiter = LeasedLimiter(link, burst_seconds=limits.burst_seconds)
        scratch = tempfile.mkdtemp(prefix="gvp-worker-")
        self._stack.callback(shutil.rmtree, scratch, True)
        state = State(scratch)  # this worker's uploads; the output's state is the driver's
        self._stack.callback(state.close)
        self._parts.update(limiter=limiter, daily=LeasedDaily(limiter, limits.rpd))
        seed = None if setup.seed is None else setup.seed * 1009 + setup.index
        return Caller(
            self.config,
            get_task(self.config.task.kind).request(self.config.task),
            client=client,
            limiter=limiter,
            daily=self._parts["daily"],
            uploads=Uploads(client, state),
            stop=stop,
            rng=random.Random(seed),
        )

    async def process_block(self, block: list[SourceFile], ok_keys: list[Any]) -> Tally:
        """Run a block's files; report what they added to the run (and the worker's stop)."""
        await self.start(ok_keys)
        assert self._files is not None
        loop = asyncio.get_running_loop()
        futures = []
        for src in block:
            future: asyncio.Future[Tally] = loop.create_future()
            self._files.put_nowait((src, future))
            futures.append(future)
        tally = Tally()
        for done in await asyncio.gather(*futures):
            tally.add(done)
        return self._with_calls(tally)

    async def _serve(self) -> None:
        assert self._files is not None
        while True:
            src, future = await self._files.get()
            tally = Tally()
            try:
                await self._one(src, tally)
            finally:
                future.set_result(tally)

    async def _one(self, src: SourceFile, tally: Tally) -> None:
        stop = self.stop
        if not stop.running:
            return  # not started: a rerun picks it up
        prior = self.prior.pop((storable(src.root), storable(src.rel_path)), None)
        if prior is not None:  # answered by this worker's predecessor: its row is committed
            _add_prior(tally, prior)
            return
        runner = ImageRunner(self.config, self.setup.facts, **self._runner_parts())
        try:
            await runner.process(src)
        except Stopped:
            return
        except RunStopped as exc:
            verdict = exc.verdict
            stop.drain(verdict.reason, verdict.hint, verdict.exit_code)
        except SinkFailed as exc:
            stop.drain(f"the output cannot be written: {exc}", _sink_hint())
        _add_counts(tally, runner.counts)

    def _runner_parts(self) -> dict[str, Any]:
        parts = self._parts
        return {"caller": parts["caller"], "answers": parts["answers"], "sink": parts["sink"]}

    def _with_calls(self, tally: Tally) -> Tally:
        """Calls are counted per worker, not per file: report what is new since last time."""
        caller, daily = self._parts["caller"], self._parts["daily"]
        now = Tally(
            api_calls=caller.counters.api_calls,
            retries=caller.counters.retries,
            throttled=caller.counters.throttled,
            answered=daily.count,
            waited_s=caller.limiter.stats.waited_seconds,
            uploads=caller.uploads.made,
            uploads_reused=caller.uploads.reused,
            unstorable=self._parts["sink"].unstorable,
        )
        new = now.minus(self.reported)
        self.reported = now
        tally.add(new)
        stop = self.stop
        if stop.reason:
            tally.stop = (stop.reason, stop.hint, stop.exit_code)
        return tally

    async def drain(self, reason: str, hint: str | None, exit_code: int) -> None:
        """The run is stopping: start no new file; what is answered is made durable now."""
        self.stop.drain(reason, hint, exit_code)
        if "sink" in self._parts:
            with contextlib.suppress(Exception):
                await self._parts["sink"].sync()

    async def abandon(self) -> None:
        """A second signal: cancel the calls in flight too."""
        self.stop.abandon()

    async def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "name": self.setup.name}

    async def close(self) -> Tally:
        """Commit everything, delete this worker's uploads (as the single engine does at the
        end of a run that was not stopped), close; report what was not reported yet."""
        if self._started is None:
            return Tally()  # restarted, and never given a block since
        await self._started
        stop = self.stop
        for task in self._pool:
            task.cancel()
        caller = self._parts["caller"]
        self._parts["daily"].save()
        if self.config.images.delete_uploads and stop.running:
            with contextlib.suppress(Stopped):
                await stop.until(caller.uploads.delete_all())
        tally = self._with_calls(Tally())
        await self._stack.aclose()
        tally.unstorable += self._parts["sink"].unstorable - self.reported.unstorable
        return tally


def _check_key(key: str | None, setup: WorkerSetup) -> None:
    if not key:
        raise WorkerSetupError(
            "a worker has no API key: set GOOGLE_API_KEY (or GEMINI_API_KEY) in the workers' "
            "environment. The driver passes its own only over encrypted connections "
            "(RAY_USE_TLS=1) or when every Ray node is its own machine"
        )
    if quota_name(key, setup.config.api.model) != setup.quota:
        raise WorkerSetupError("a worker's API key is not the driver's: give them the same key")


def _client(config: Config, base_url: str, key: str) -> GeminiClient:
    return GeminiClient(
        key,
        base_url=base_url,
        version=config.api.version,
        max_connections=config.limits.concurrency,
        timeout=config.api.timeout,
        allow_insecure_http=config.api.allow_insecure_http,
        max_response_bytes=int(config.api.max_response_mb * 1024 * 1024),
    )


def _limits(config: Config) -> Limits:
    limits = config.limits
    return Limits(limits.rpm, limits.tpm, limits.rpd, limits.burst_seconds)


_PRIOR_COLUMNS = (
    "image_root",
    "image_path",
    "status",
    "input_mode",
    "attempts",
    "raw_response",
    "prompt_tokens",
    "output_tokens",
    "thoughts_tokens",
    "total_tokens",
    "est_image_tokens",
    "est_prompt_tokens",
)


def _rows_of_writer(out: Path, name: str) -> dict[tuple[str, str], dict[str, Any]]:
    """The rows a worker's predecessor committed (parts named after it), by file."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for part in sorted(out.glob(f"part-{name}-*.parquet")):  # w1- is no prefix of w10-
        for row in pq.read_table(part, columns=list(_PRIOR_COLUMNS)).to_pylist():
            rows[(row["image_root"], row["image_path"])] = row
    return rows


def _add_prior(tally: Tally, row: dict[str, Any]) -> None:
    """Count a predecessor's row as this block's (its block was retried here)."""
    counts = RowCounts()
    called = row["input_mode"] != "none"
    counts.add(row, copied=not called and row["raw_response"] is not None)
    _add_counts(tally, counts)
    tally.answered += row["raw_response"] is not None and called


def _worker_class(ray: Any) -> Any:
    return ray.remote(Worker)


# ---------------------------------------------------------------------------------- driver
class RayEngine:
    """One run of a config on a Ray cluster (see the module docstring)."""

    def __init__(self, config: Config, options: RunOptions) -> None:
        self.config = config
        self.options = options
        self.run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ-") + secrets.token_hex(3)
        self.facts = RunFacts(self.run_id, config.task.kind, config.api.model, key_suffix(config))
        self.summary = RunSummary(
            run_id=self.run_id,
            config=config.source,
            settings_hash=self.facts.key_suffix,
            model=config.api.model,
            task=config.task.kind,
        )
        self.tally = Tally()
        self.stop: Stop | None = None  # made in run(): it needs the event loop
        self.state: State | None = None

    async def run(self) -> RunSummary:
        out = _output_dir(self.config)
        self.stop = Stop()
        ray = _connect(self.config.engine)
        async with contextlib.AsyncExitStack() as stack:
            if ray is not None:
                stack.callback(ray.shutdown)
            self.summary.recovered = stack.enter_context(shared_output(out))
            self.state = _open_state(out, self.config)
            stack.callback(self.state.close)
            index = await asyncio.to_thread(
                load_resume_index,
                out,
                key_suffix=self.facts.key_suffix,
                retry_errors=self.options.retry_errors,
            )
            base_url, key = await _endpoint(self.config, stack)
            quota = await self._quota(key)
            fleet = Fleet(self.config, self._setup(base_url, key, quota), index.ok_keys)
            stack.push_async_callback(fleet.kill)
            await fleet.start()
            producer = Producer(self.config, index, self.options.limit)
            watching = asyncio.ensure_future(self._watch_quota(quota))
            try:
                await self._work(producer, fleet)
            finally:
                watching.cancel()
            self._account(await fleet.close())
            self._summarise(producer)
        self.summary.write(out)
        return self.summary

    def _setup(self, base_url: str, key: str, quota: str) -> WorkerSetup:
        shipped = _Secret(key) if _key_may_travel(self.config, base_url) else None
        return WorkerSetup(
            self.config, self.facts, self.run_id, self.options.seed, quota, base_url, shipped
        )

    async def _quota(self, key: str) -> str:
        """The project's quota actor, told this run's limits and the day's count so far."""
        name = quota_name(key, self.config.api.model)
        await self._seed(quota_actor(name, _limits(self.config)))
        return name

    async def _seed(self, actor: Any) -> str:
        assert self.state is not None
        await actor.configure.remote(_limits(self.config))
        await actor.seed.remote(_day_key(), self.state.requests_on(_day_key()))
        return (await actor.status.remote())["incarnation"]

    async def _watch_quota(self, name: str) -> None:
        """A restarted quota actor lost its count: seed it again (it lends nothing till then)."""
        actor = quota_actor(name, _limits(self.config))
        known = (await actor.status.remote())["incarnation"]
        while True:
            await asyncio.sleep(QUOTA_WATCH)
            with contextlib.suppress(Exception):  # unreachable now: the workers pause meanwhile
                if (await actor.status.remote())["incarnation"] != known:
                    known = await self._seed(actor)

    async def _work(self, producer: Producer, fleet: Fleet) -> None:
        stop = self.stop
        assert stop is not None
        batches: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=2)
        dispatch = Dispatch(fleet, stop, self._account)
        progress = Progress(_ProgressView(producer, self.tally), enabled=self.options.progress)
        loop = asyncio.get_running_loop()
        with _signals(loop, stop, fleet):
            walking = loop.run_in_executor(None, producer.run, loop, batches)
            reporter = asyncio.ensure_future(progress.run())
            try:
                await dispatch.run(batches)
            finally:
                producer.halt.set()
                while not batches.empty():  # unblock the walking thread
                    batches.get_nowait()
                await walking
                reporter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reporter
                progress.finish()

    def _account(self, tally: Tally) -> None:
        """A worker's report: add it up, persist the day's count, stop the fleet if it stops."""
        self.tally.add(tally)
        if tally.answered and self.state is not None:
            self.state.add_requests(_day_key(), tally.answered)
        stop = self.stop
        if tally.stop and stop is not None and stop.running:
            stop.drain(*tally.stop)

    def _summarise(self, producer: Producer) -> None:
        s, t = self.summary, self.tally
        s.finished_at = datetime.now(UTC).isoformat()
        s.seen, s.skipped = producer.seen, producer.skipped
        s.rows, s.tokens, s.copied = t.rows, t.tokens, t.copied
        s.api_calls, s.retries, s.throttled = t.api_calls, t.retries, t.throttled
        s.uploads, s.uploads_reused = t.uploads, t.uploads_reused
        s.waited_for_limits_s = round(t.waited_s, 3)
        s.unstorable = t.unstorable
        stop = self.stop
        assert stop is not None
        if stop.reason:
            s.stop_reason, s.resume_hint, s.exit_code = stop.reason, stop.hint, stop.exit_code
        s.settle_exit_code()


class Fleet:
    """The run's worker actors: made, started, told to stop, closed."""

    def __init__(self, config: Config, setup: WorkerSetup, ok_keys: KeySet) -> None:
        import ray

        self.ray = ray
        self.config = config
        self.count = _worker_count(config.engine, pinned=setup.key is not None)
        if setup.key is not None:  # one node, this one: what does not fit never will
            _check_fits(config, self.count)
        options: dict[str, Any] = {
            "num_cpus": config.engine.worker_cpus,
            "max_restarts": MAX_RESTARTS,
            "max_task_retries": -1,
            "namespace": NAMESPACE,
        }
        if setup.key is not None:  # the key stays on this machine: so do the workers
            options["scheduling_strategy"] = _this_node(ray)
        self.ok_keys = [ray.put(ok_keys)]  # in a list: a reference, fetched by the worker
        actor = _worker_class(ray)
        self.workers = [
            actor.options(name=f"worker-{setup.name}-{i}", **options).remote(
                replace(setup, name=f"{setup.name}.w{i}", index=i)
            )
            for i in range(self.count)
        ]

    async def start(self) -> None:
        started = [_as_future(w.start.remote(self.ok_keys)) for w in self.workers]
        try:
            await asyncio.wait_for(asyncio.gather(*started), START_TIMEOUT)
        except TimeoutError:
            cpus = self.config.engine.worker_cpus
            raise ConfigError(
                f"{self.config.source}: {self.count} Ray workers of {cpus:g} CPUs each could not "
                "all be placed in time: lower [engine] workers or worker_cpus"
            ) from None
        except self.ray.exceptions.RayTaskError as exc:
            cause = exc.as_instanceof_cause()
            if isinstance(cause, WorkerSetupError):
                raise ConfigError(f"{self.config.source}: {cause}") from None
            raise

    def signal(self, stop: Stop) -> None:
        """Pass the driver's stop on (fire and forget: a restarting worker gets it later)."""
        for worker in self.workers:
            if stop.state == "abandoning":
                worker.abandon.remote()
            else:
                worker.drain.remote(stop.reason or "interrupted", stop.hint, stop.exit_code)

    async def close(self) -> Tally:
        tally = Tally()
        closing = [_as_future(w.close.remote()) for w in self.workers]
        for result in await asyncio.gather(*closing, return_exceptions=True):
            if isinstance(result, Tally):
                tally.add(result)
            elif isinstance(result, self.ray.exceptions.RayTaskError) and isinstance(
                result.as_instanceof_cause(), SinkFailed
            ):
                why = f"the output cannot be written: {result.as_instanceof_cause()}"
                tally.stop = (why, _sink_hint(), exits.STOPPED)
            else:
                log.warning("a worker could not be closed: %s", result)
        return tally

    async def kill(self) -> None:
        for worker in self.workers:
            with contextlib.suppress(Exception):
                self.ray.kill(worker, no_restart=True)


class Dispatch:
    """Routes files to workers by size and sends them in blocks (see the module docstring)."""

    def __init__(self, fleet: Fleet, stop: Stop, account: Any) -> None:
        self.fleet = fleet
        self.stop = stop
        self.account = account
        self.queues: list[deque[SourceFile]] = [deque() for _ in fleet.workers]
        self.fed = False
        self.changed = asyncio.Condition()

    async def run(self, batches: asyncio.Queue[Batch | None]) -> None:
        watching = asyncio.ensure_future(self._wake_on_stop())
        senders = [
            asyncio.ensure_future(self._send(i))
            for i in range(len(self.queues))
            for _ in range(BLOCKS_IN_FLIGHT)
        ]
        feeding = asyncio.ensure_future(self._feed(batches))
        try:
            await asyncio.gather(*senders)
        finally:
            for task in (feeding, watching):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _wake_on_stop(self) -> None:
        """Waiting senders and the feeder look again when the run stops."""
        forever = asyncio.ensure_future(asyncio.Event().wait())
        try:
            with contextlib.suppress(Stopped):
                await self.stop.until(forever)
        finally:
            forever.cancel()
        async with self.changed:
            self.changed.notify_all()

    async def _feed(self, batches: asyncio.Queue[Batch | None]) -> None:
        while (batch := await batches.get()) is not None:
            async with self.changed:
                for src in batch:
                    await self.changed.wait_for(self._room)
                    if not self.stop.running:
                        break
                    self.queues[self._route(src)].append(src)
                    self.changed.notify_all()
        async with self.changed:
            self.fed = True
            self.changed.notify_all()

    def _room(self) -> bool:
        return not self.stop.running or sum(map(len, self.queues)) < QUEUE_FILES * len(self.queues)

    def _route(self, src: SourceFile) -> int:
        lengths = [len(q) for q in self.queues]
        preferred = ((src.size * _GOLDEN) >> 32) % len(lengths)
        if src.error is None and lengths[preferred] < QUEUE_FILES:
            return preferred
        return lengths.index(min(lengths))

    async def _send(self, i: int) -> None:
        queue, worker = self.queues[i], self.fleet.workers[i]
        while True:
            async with self.changed:
                await self.changed.wait_for(
                    lambda: len(queue) >= BLOCK_FILES or self.fed or not self.stop.running
                )
                if not self.stop.running or not queue:
                    return
                block = [queue.popleft() for _ in range(min(BLOCK_FILES, len(queue)))]
                self.changed.notify_all()
            try:
                tally = await _as_future(worker.process_block.remote(block, self.fleet.ok_keys))
            except self.fleet.ray.exceptions.RayActorError as exc:
                self.stop.drain(f"a worker was lost {MAX_RESTARTS + 1} times: {exc}")
                self.fleet.signal(self.stop)
                return
            self.account(tally)
            if not self.stop.running:
                self.fleet.signal(self.stop)


class _ProgressView:
    """What the progress line reads: the producer's walk and the workers' reports."""

    def __init__(self, producer: Producer, tally: Tally) -> None:
        self._producer, self._tally = producer, tally

    @property
    def done(self) -> int:
        return sum(self._tally.rows.values())

    @property
    def errors(self) -> int:
        return self._tally.rows.get("error", 0)

    @property
    def throttled(self) -> int:
        return self._tally.throttled

    @property
    def seen(self) -> int:
        return self._producer.seen

    @property
    def skipped(self) -> int:
        return self._producer.skipped

    @property
    def walked(self) -> bool:
        return self._producer.done


@contextlib.contextmanager
def _signals(loop: asyncio.AbstractEventLoop, stop: Stop, fleet: Fleet) -> Iterator[None]:
    """Each signal: the first drains the fleet (workers make their answers durable now), the
    next abandons the calls in flight."""

    def handle() -> None:
        stop.signal()
        fleet.signal(stop)

    installed = []
    for sig in SIGNALS:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, handle)
            installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


# ------------------------------------------------------------------------------------ Ray
def _connect(engine: EngineConfig) -> Any:
    """Join the cluster at [engine] address, or start Ray on this machine. Returns the ray
    module when this run connected (and so disconnects at the end), None when this process was
    connected already (a notebook, a test). Under `ray job submit`, RAY_ADDRESS names the
    cluster, as it does for any Ray program."""
    local = engine.address is None and "RAY_ADDRESS" not in os.environ
    if local:
        # A Ray started for one run serves this machine only: it listens on the loopback, not
        # on the network (Ray reads this switch when it is imported).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return None
    kwargs: dict[str, Any] = {"namespace": NAMESPACE, "logging_level": logging.WARNING}
    if local:
        kwargs["include_dashboard"] = False
    elif engine.address is not None:
        kwargs["address"] = engine.address
    ray.init(**kwargs)
    return ray


def _key_may_travel(config: Config, base_url: str) -> bool:
    """Whether the driver's key may go to the workers through Ray (see the module docstring);
    the bundled local server listens on this machine, so its workers must run here too."""
    import ray

    here = _single_node(ray)
    if config.api.base_url == "local" and not here:
        raise ConfigError(
            f'{config.source}: [api] base_url = "local" serves on this machine only, and the '
            "Ray cluster has other nodes: start `pipeline serve-local` where all can reach it"
        )
    return here or os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")


def _single_node(ray: Any) -> bool:
    own = ray.get_runtime_context().get_node_id()
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]} == {own}


def _this_node(ray: Any) -> Any:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def _worker_count(engine: EngineConfig, *, pinned: bool) -> int:
    """[engine] workers, or one per CPU of the cluster (of this node when pinned to it)."""
    import ray

    if engine.workers:
        return engine.workers
    if pinned:
        own = ray.get_runtime_context().get_node_id()
        cpus = next(n["Resources"].get("CPU", 1) for n in ray.nodes() if n["NodeID"] == own)
    else:
        cpus = ray.cluster_resources().get("CPU", 1)
    return max(1, int(cpus / engine.worker_cpus) if engine.worker_cpus else int(cpus))


def _check_fits(config: Config, count: int) -> None:
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    if count * config.engine.worker_cpus > cpus:
        raise ConfigError(
            f"{config.source}: [engine] workers = {count} of worker_cpus = "
            f"{config.engine.worker_cpus:g} need {count * config.engine.worker_cpus:g} CPUs; "
            f"this Ray node has {cpus:g}: lower one of them (workers mostly wait on the API)"
        )


def _as_future(ref: Any) -> asyncio.Future[Any]:
    return asyncio.wrap_future(ref.future())
