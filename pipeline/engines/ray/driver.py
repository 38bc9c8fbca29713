"""The Ray engine: one run spread over a Ray cluster's worker actors, under one shared quota.

    driver: walk (thread) ─► route by file size ─► blocks of files ─► Worker actors (async)
    Worker: ImageRunner.process per file (prepare, reuse, Caller, rows) ─► its own ParquetSink
    every Worker's Caller ─ LeasedLimiter, LeasedDaily ─► the project's quota actor (quota.py)

This module is the driver (RayEngine, Fleet, Dispatch); the worker is in worker.py.

The driver lists the inputs and skips what the resume index says is done, as the single engine
does (`common.Producer`), and hands the rest out in blocks of BLOCK_FILES files (or groups), at most
BLOCKS_IN_FLIGHT per worker (Ray Data's actor pools keep two tasks per actor in flight). Each
worker runs the single engine's per-image code with `[limits] concurrency` files in flight and
commits its rows itself, through the same sink and journal, so an answer is durable within a
quarter of a second wherever it was bought, and a lost worker exposes only what it had in flight.

Who writes the output (see pipeline/output/sink.py): the driver takes it as any run does — the lock,
exclusively, and a killed run's journal committed — then shares the lock with its workers. Each
worker's sink writes parts and a journal under its own name, `<run id>.w<n>` (rows keep the
run's id), so writers never touch each other's files; another run cannot start on the output
while any of them holds it. The output is a folder every node sees at the same path (a shared
flock) or a bucket (the driver renews its lease; each worker checks, every third of its TTL,
that the lease is still the run's, and stops writing when it is not: `stores.RunLease`).
Rows, keys, resume and exit codes are those of the single engine; so is the run summary, summed
from the workers' block reports.

Files of the same size go to the same worker (same bytes have the same size), so the single
engine's dedupe — a twin waits for the call in flight, or copies the answer — still sees every
twin; only when that worker's queue is full does a file go to the least busy one instead.

A lost worker (its process killed, its node gone) is restarted by Ray, and its blocks are sent to
it again (Ray Data's defaults: restarts and task retries). The new incarnation first commits the
journal its predecessor left and skips the files it had answered, so what is paid twice is only
what was in flight: calls sent, and answers not yet durable (worker.WORKER_SYNC_SECONDS).
After MAX_RESTARTS losses of one worker the run stops (exit 3). The summary counts a lost
worker's rows (from what it committed) but not the calls it made since its last report.

The API key: workers read it from their own environment; the driver passes its own to them only
where it stays on this machine (every Ray node is this one; the workers are then pinned here) or
Ray's connections are encrypted (RAY_USE_TLS), because Ray's RPCs are otherwise clear text.
On Vertex AI with Application Default Credentials no credential travels at all: each worker
gets its own bearer token from its node's ADC (the node's service account, a key file) with the
single engine's code (`make_client`: engines/backend.py, gemini/auth.TokenAuth refreshing it),
fetching the first at its start, so a node without credentials stops the run before any work.
The fleet's quota is then the project's in its location, per model (`quota.quota_of`), as
Vertex's dynamic shared quota is counted; its bare 429s slow the fleet and never stop it
(gemini/errors.py: a rate limit, not a day's quota).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from pipeline import exits
from pipeline.config import Config, ConfigError, EngineConfig
from pipeline.engines.common import (
    AliasMoved,
    Block,
    Preflight,
    Producer,
    RunStart,
    guard_redo,
    make_client,
    open_output,
    open_state,
    quota_day_key,
    service_endpoint,
    sink_hint,
    walking,
)
from pipeline.engines.ray.quota import NAMESPACE, Limits, quota_actor, quota_of
from pipeline.engines.ray.worker import Secret, Tally, Worker, WorkerSetup, WorkerSetupError
from pipeline.gemini import GeminiClient
from pipeline.gemini.backends import Backend, Vertex
from pipeline.inputs.fetch import Fetcher, settings_from
from pipeline.output.index import DigestSet, DoneOrInFlight, KeySet, load_resume_index
from pipeline.output.sink import SinkFailed, shared_output
from pipeline.output.state import State
from pipeline.records import Work, members_of
from pipeline.run.progress import EngineView, Progress
from pipeline.run.stop import Stop, Stopped, on_signals
from pipeline.run.summary import RunSummary, in_batch_jobs_hint
from pipeline.tasks.typed import answer_field

log = logging.getLogger(__name__)

BLOCK_FILES = 16  # files handed to a worker at once
BLOCKS_IN_FLIGHT = 2  # per worker: the next block waits there while one runs (as in Ray Data)
QUEUE_FILES = 2 * BLOCK_FILES  # routed to a worker but not yet sent; more waits (memory)
MAX_RESTARTS = 3  # per worker; then the run stops
START_TIMEOUT = 300.0  # seconds for the workers to be placed and started
QUOTA_WATCH = 2.0  # seconds between looks at the quota actor (restarted: seed it again)
_GOLDEN = 0x9E3779B97F4A7C15  # Fibonacci hashing: sizes that share factors still spread


def _worker_class(ray: Any) -> Any:
    return ray.remote(Worker)


# ---------------------------------------------------------------------------------- driver
class RayEngine:
    """One run of a config on a Ray cluster (see the module docstring)."""

    def __init__(self, start: RunStart) -> None:
        """(The workers read the reference images themselves: `start.references` stays here.)"""
        self.start = start
        self.config, self.identity, self.options = start.config, start.identity, start.options
        self.run_id = start.identity.run_id
        self.summary = RunSummary.of_run(self.identity, self.config.source)
        self.tally = Tally()
        self.stop: Stop | None = None  # made in run(): it needs the event loop
        self.state: State | None = None

    async def run(self) -> RunSummary:
        out = open_output(self.config)
        self.stop = stop = Stop()
        ray = _connect(self.config.engine)
        async with contextlib.AsyncExitStack() as stack:
            if ray is not None:
                stack.callback(ray.shutdown)
            self.summary.recovered = stack.enter_context(
                shared_output(
                    out,
                    self.run_id,
                    lease_seconds=self.config.output.lease_seconds,
                    answer=answer_field(self.config.task),
                )
            )
            self.state = open_state(out, self.config)
            stack.callback(self.state.close)
            index = await asyncio.to_thread(
                load_resume_index,
                out,
                key_suffix=self.identity.suffixes,
                retry_errors=self.options.retry_errors,
            )
            await guard_redo(self.config, self.options, index)
            base_url, key = await service_endpoint(self.config, stack)
            client = await stack.enter_async_context(make_client(self.config, base_url, key))
            quota = await self._quota(quota_of(client.backend, key, self.config.api.model))
            fleet = Fleet(self.config, self._setup(client, base_url, key, quota), index.ok_keys)
            stack.push_async_callback(fleet.kill)
            await fleet.start()
            fetcher = Fetcher(settings_from(self.config), seed=self.options.seed)
            stack.callback(fetcher.close)  # the walk asks it the size and version of URLs
            checking = Preflight(self.start, client, stop)  # the driver's one models.get
            # a Batch Mode job in flight is buying its files: skipped, not bought twice (the
            # single engine collects ended jobs first; here they wait for a later run)
            skip = DoneOrInFlight(index, DigestSet(self.state.in_flight_fingerprints()))
            producer = Producer(self.config, skip, self.options.limit, fetcher, checking)
            watching = asyncio.ensure_future(self._watch_quota(quota))
            try:
                await self._work(producer, fleet)
            except AliasMoved:  # the workers let go of the output before the run starts again
                await fleet.close()  # (killed, one may still hold it when the next run looks)
                raise
            finally:
                watching.cancel()
            self._account(await fleet.close())
            self._summarise(producer)
        self.summary.write(out)
        return self.summary

    def _setup(self, client: GeminiClient, base_url: str, key: str, quota: str) -> WorkerSetup:
        """What the workers are made with. On Vertex with ADC: no credential at all (each
        worker has its node's own) and the project and location the driver resolved, so a
        worker's environment cannot send its calls to another project."""
        config, seed = self.config, self.options.seed
        if client.bearer:
            config = _pinned(config, client.backend)
            return WorkerSetup(
                config, self.identity, self.run_id, seed, quota, base_url, None, adc=True
            )
        shipped = Secret(key) if _key_may_travel(config, base_url) else None
        return WorkerSetup(config, self.identity, self.run_id, seed, quota, base_url, shipped)

    async def _quota(self, name: str) -> str:
        """The quota actor `name` (`quota_of`), told this run's limits and the day's count."""
        await self._seed(quota_actor(name, Limits.of(self.config.limits)))
        return name

    async def _seed(self, actor: Any) -> None:
        assert self.state is not None
        await actor.configure.remote(Limits.of(self.config.limits))
        await actor.seed.remote(quota_day_key(), self.state.requests_on(quota_day_key()))

    async def _watch_quota(self, name: str) -> None:
        """A restarted quota actor lost the day's count and lends nothing till told it again."""
        while True:
            await asyncio.sleep(QUOTA_WATCH)
            with contextlib.suppress(Exception):  # unreachable now: the workers pause meanwhile
                actor = quota_actor(name, Limits.of(self.config.limits))
                if not (await actor.status.remote())["seeded"]:
                    await self._seed(actor)

    async def _work(self, producer: Producer, fleet: Fleet) -> None:
        stop = self.stop
        assert stop is not None
        dispatch = Dispatch(fleet, stop, self._account)
        view = EngineView(producer, lambda: self.tally.rows, lambda: self.tally.throttled)
        progress = Progress(view, enabled=self.options.progress)
        loop = asyncio.get_running_loop()
        with _signals(loop, stop, fleet):
            reporter = asyncio.ensure_future(progress.run())
            try:
                async with walking(producer) as blocks:
                    await dispatch.run(blocks)
            finally:
                reporter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reporter
                progress.finish()

    def _account(self, tally: Tally) -> None:
        """A worker's report: add it up, persist the day's count, stop the fleet if it stops."""
        self.tally.add(tally)
        if tally.answered and self.state is not None:
            self.state.add_requests(quota_day_key(), tally.answered)
        stop = self.stop
        if tally.stop and stop is not None and stop.running:
            stop.drain(*tally.stop)

    def _summarise(self, producer: Producer) -> None:
        s, t = self.summary, self.tally
        s.finished_at = datetime.now(UTC).isoformat()
        s.seen, s.skipped, s.ignored = producer.seen, producer.skipped, producer.passed.ignored
        s.in_batch_jobs = producer.in_flight
        s.rows, s.tokens, s.copied = t.rows, t.tokens, t.copied
        s.api_calls, s.retries, s.throttled = t.api_calls, t.retries, t.throttled
        s.uploads, s.uploads_reused = t.uploads, t.uploads_reused
        s.waited_for_limits_s = round(t.waited_s, 3)
        s.unstorable = t.unstorable
        s.cost_usd = round(t.cost_usd, 6)
        s.abandoned, s.abandoned_est_usd = t.abandoned, round(t.abandoned_usd, 6)
        s.model_resolution = producer.preflight.resolution if producer.preflight else None
        assert self.stop is not None
        s.settle(self.stop)
        s.resume_hint = s.resume_hint or in_batch_jobs_hint(s.in_batch_jobs, self.config.output.dir)


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
            if isinstance(exc.cause, WorkerSetupError):
                raise ConfigError(f"{self.config.source}: {_said(exc)}") from None
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
                result.cause, SinkFailed
            ):
                why = f"the output cannot be written: {_said(result)}"
                tally.stop = (why, sink_hint(), exits.STOPPED)
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
        self.queues: list[deque[Work]] = [deque() for _ in fleet.workers]
        self.fed = False
        self.changed = asyncio.Condition()

    async def run(self, blocks: asyncio.Queue[Block | None]) -> None:
        watching = asyncio.ensure_future(self._wake_on_stop())
        senders = [
            asyncio.ensure_future(self._send(i))
            for i in range(len(self.queues))
            for _ in range(BLOCKS_IN_FLIGHT)
        ]
        feeding = asyncio.ensure_future(self._feed(blocks))
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

    async def _feed(self, blocks: asyncio.Queue[Block | None]) -> None:
        while (block := await blocks.get()) is not None:
            async with self.changed:
                for src in block:
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

    def _route(self, work: Work) -> int:
        """By size (a group: its members' sizes), so the same bytes meet at one worker."""
        lengths = [len(q) for q in self.queues]
        size = sum(member.size for member in members_of(work))
        preferred = ((size * _GOLDEN) >> 32) % len(lengths)
        if work.error is None and lengths[preferred] < QUEUE_FILES:
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


@contextlib.contextmanager
def _signals(loop: asyncio.AbstractEventLoop, stop: Stop, fleet: Fleet) -> Iterator[None]:
    """Each signal: the first drains the fleet (workers make their answers durable now), the
    next abandons the calls in flight."""

    def handle() -> None:
        stop.signal()
        fleet.signal(stop)

    with on_signals(loop, handle):
        yield


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


def _pinned(config: Config, backend: Backend) -> Config:
    """`config` with the Vertex project and location the driver's credentials resolved."""
    assert isinstance(backend, Vertex)
    api = replace(config.api, project=backend.project, location=backend.location)
    return replace(config, api=api)


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


def _said(error: Any) -> str:
    """What a worker's exception says, without the worker's traceback (a RayTaskError's own
    text, and `as_instanceof_cause`'s, is Ray's rendering of it: a wall on the user's screen)."""
    return str(error.cause)


def _as_future(ref: Any) -> asyncio.Future[Any]:
    return asyncio.wrap_future(ref.future())
