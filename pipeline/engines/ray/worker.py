"""A worker of a Ray run (pipeline/engines/ray/driver.py): the single engine's per-image code in an
async actor, committing its own parts, reporting to the driver what its files added to the run.

    process_block(files) ─► [limits] concurrency tasks ─► ImageRunner.process per file
                         ◄─ Tally: rows and tokens of those files; calls since the last report

Everything a worker needs comes in its `WorkerSetup` (Ray keeps it to restart the worker). It
opens, at its start: its own API client (on Vertex with Application Default Credentials, its
first bearer token fetched from its node's own credentials: none travels through Ray), its own
ParquetSink (`shared=True`, named `<run id>.w<n>`), a `calls.Caller` whose limiter and daily
count lease from the project's quota actor (pipeline/engines/ray/quota.py), and the reuse
tiers (`reuse.Bought`) over the resume index's `ok_keys`. A journal or parts already under
its name are a predecessor's (Ray restarted the worker): the journal is committed first and
the files it answered are not done again.

Uploads are the worker's own (a State in a scratch folder, deleted at its end as the single
engine deletes a run's): the output's `.state.sqlite` belongs to the driver, which persists the
day's count from the workers' reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any

from pipeline.config import Config, ConfigError
from pipeline.engines.common import bound_store_requests, make_client, process_unit
from pipeline.engines.ray.quota import ActorLink, LeasedDaily, LeasedLimiter, Limits, quota_of
from pipeline.gemini import GeminiClient, GeminiError, api_key_from_env
from pipeline.inputs.references import load as load_references
from pipeline.output.index import KeySet
from pipeline.output.parts import data_name, is_part, read_part
from pipeline.output.recovery import recover_writer
from pipeline.output.sink import ParquetSink
from pipeline.output.state import State
from pipeline.output.stores import Store, open_store
from pipeline.records import USAGE_COLUMNS, Work, storable, work_identity
from pipeline.run.buyers import InteractiveBuyer
from pipeline.run.calls import Caller
from pipeline.run.decodes import DecodeBudget, budget_bytes
from pipeline.run.identity import RunIdentity
from pipeline.run.reuse import Bought, recent_capacity
from pipeline.run.runner import ImageRunner, RowCounts
from pipeline.run.stop import Stop, Stopped
from pipeline.run.uploads import Uploads
from pipeline.tasks import get_task
from pipeline.tasks.typed import answer_field

# A worker may be lost at any moment (a preempted node): its answers are made durable within a
# quarter of a second rather than the single engine's second, which bounds what a loss re-pays
# to its calls in flight plus 0.25 s of answers. Four fsyncs a second cost a worker nothing.
WORKER_SYNC_SECONDS = 0.25


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
    cost_usd: float = 0.0  # the rows' billed tokens, priced (RowCounts): the summary's cost
    abandoned: int = 0  # calls sent and abandoned in flight: may be billed
    abandoned_usd: float = 0.0  # their estimated cost
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
    tally.cost_usd += counts.cost_usd  # left out, the Ray run's summary billed $0


class Secret:
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
    identity: RunIdentity
    name: str  # its parts and journal: part-<name>-<seq>.parquet
    seed: int | None
    quota: str  # the quota actor's name
    base_url: str
    key: Secret | None  # None: the worker's own environment has it (or `adc`)
    index: int = 0  # of the worker in the fleet
    adc: bool = False  # Vertex: a bearer token from the node's own ADC, no key at all


class WorkerSetupError(Exception):
    """A worker cannot start (no API key, another key, no Application Default Credentials on its
    node): a usage error of the run."""


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
        self._files: asyncio.Queue[tuple[Work, asyncio.Future[Tally]]] | None = None
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
        key = _key(setup)
        bound_store_requests(config)  # this worker's own filesystems
        client = await self._stack.enter_async_context(_client(setup, key))
        await _authenticated(client, setup)
        out = open_store(config.output.dir)  # a folder every node sees, or a bucket
        # A journal or parts under this worker's name are a predecessor's (Ray restarted it).
        recovered = await asyncio.to_thread(recover_writer, out, setup.name)
        self.prior = await asyncio.to_thread(rows_of_writer, out, setup.name)
        ok_keys: KeySet = await ok_keys_ref
        sink = await self._stack.enter_async_context(
            ParquetSink(
                out,
                setup.name,
                rows_per_part=config.output.rows_per_part,
                part_bytes=config.output.part_mb << 20,
                flush_seconds=config.output.flush_seconds,
                sync_seconds=WORKER_SYNC_SECONDS,
                lease_seconds=config.output.lease_seconds,
                shared=True,
                answer=answer_field(config.task),
            )
        )
        caller = self._caller(client, stop)
        recent = recent_capacity(config.output.rows_per_part)  # copies never force a part
        bought = Bought(out.url, ok_keys, sink.flush, recent=recent)
        self._parts.update(sink=sink, caller=caller, bought=bought)
        self._parts.update(buyer=InteractiveBuyer(caller, bought))
        # one budget of decoded pixels for this worker process (a runner is made per file)
        self._parts.update(decodes=DecodeBudget(budget_bytes(config.images.decode_budget_mb)))
        self._files = asyncio.Queue()
        concurrency = config.limits.concurrency
        self._pool = [asyncio.ensure_future(self._serve()) for _ in range(concurrency)]
        node = ray.get_runtime_context().get_node_id()
        return {"pid": os.getpid(), "node": node, "recovered": recovered}

    def _caller(self, client: GeminiClient, stop: Stop) -> Caller:
        limits, setup = self.config.limits, self.setup
        link = ActorLink(setup.quota, Limits.of(self.config.limits))
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
            references=load_references(self.config),  # each worker sends them, as one process
        )

    async def process_block(self, block: list[Work], ok_keys: list[Any]) -> Tally:
        """Run a block's files (or groups); report what they added to the run (and the
        worker's stop)."""
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

    async def _one(self, work: Work, tally: Tally) -> None:
        stop = self.stop
        if not stop.running:
            return  # not started: a rerun picks it up
        root, path, _, _ = work_identity(work)
        prior = self.prior.pop((storable(root), storable(path)), None)
        if prior is not None:  # answered by this worker's predecessor: its row is committed
            _add_prior(tally, prior)
            return
        runner = ImageRunner(self.config, self.setup.identity, **self._runner_parts())
        await process_unit(runner, work, stop)
        _add_counts(tally, runner.counts)

    def _runner_parts(self) -> dict[str, Any]:
        parts = self._parts
        names = ("buyer", "bought", "sink", "decodes")
        return {name: parts[name] for name in names}

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
            abandoned=caller.counters.abandoned,
            abandoned_usd=caller.counters.abandoned_usd,
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


def _key(setup: WorkerSetup) -> str:
    """The API key: none on Vertex with ADC; else the driver's, or the worker's environment's."""
    if setup.adc:
        return ""
    key = setup.key.reveal() if setup.key else api_key_from_env()
    if not key:
        raise WorkerSetupError(
            "a worker has no API key: set GOOGLE_API_KEY (or GEMINI_API_KEY) in the workers' "
            "environment. The driver passes its own only over encrypted connections "
            "(RAY_USE_TLS=1) or when every Ray node is its own machine"
        )
    return key


def _client(setup: WorkerSetup, key: str) -> GeminiClient:
    """The worker's client, made as the single engine's is (`make_client`: on Vertex with ADC,
    the node's own credentials are found here), and drawing on the driver's quota."""
    config = setup.config
    try:
        client = make_client(config, setup.base_url, key)
    except ConfigError as exc:  # no google-auth, no ADC on this node: its message names which
        raise WorkerSetupError(f"{_node()}: {_without_source(exc, config)}") from None
    if quota_of(client.backend, key, config.api.model) != setup.quota:
        raise WorkerSetupError("a worker's API key is not the driver's: give them the same key")
    return client


async def _authenticated(client: GeminiClient, setup: WorkerSetup) -> None:
    """A worker on Vertex fetches its first token now: credentials its node cannot turn into
    one (a revoked account, no metadata server) stop the run at its start, naming why."""
    if not setup.adc:
        return
    try:
        await client.authenticate()
    except GeminiError as exc:  # its message is redacted of every token (auth.TokenAuth)
        raise WorkerSetupError(f"{_node()}: {exc.message}") from None


def _node() -> str:
    """Which worker, on which node: where the operator looks for the node's credentials."""
    import ray

    return f"a worker on the Ray node at {ray.util.get_node_ip_address()}"


def _without_source(exc: ConfigError, config: Config) -> str:
    """The driver names the config file itself (driver.Fleet.start)."""
    return str(exc).removeprefix(f"{config.source}: ")


# what RowCounts.add reads of a row: its status, tokens and, to price them (pipeline/cost.py),
# its model, mode and day
_PRIOR_COLUMNS = (
    "image_root",
    "image_path",
    "status",
    "model",
    "input_mode",
    "completed_at",
    "attempts",
    "raw_response",
    *USAGE_COLUMNS,
    "est_image_tokens",
    "est_prompt_tokens",
)


def rows_of_writer(out: Store, name: str) -> dict[tuple[str, str], dict[str, Any]]:
    """The rows a worker's predecessor committed (parts named after it), by file."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in out.list(data_name(f"part-{name}-")):  # w1- is no prefix of w10-
        if not is_part(entry.name):
            continue
        for batch in read_part(entry.name, _PRIOR_COLUMNS, store=out):
            for row in batch.to_pylist():
                rows[(row["image_root"], row["image_path"])] = row
    return rows


def _add_prior(tally: Tally, row: dict[str, Any]) -> None:
    """Count a predecessor's row as this block's (its block was retried here)."""
    counts = RowCounts()
    called = row["input_mode"] != "none"
    counts.add(row, copied=not called and row["raw_response"] is not None)
    _add_counts(tally, counts)
    tally.answered += row["raw_response"] is not None and called
