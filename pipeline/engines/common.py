"""What every engine of a run shares: the walk, the output and its state opened, the service
endpoint and its client, one unit through the runner, and how signals and failures drain a run.

    Producer (a thread): walk the inputs, skip what is done ─blocks of units─► the engine's queue

A block is a handful of units handed from the walking thread to the event loop at once (one
cross-thread wake-up per block, not per file); engines deal them out to their workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.config import Config, ConfigError, declarations
from pipeline.gemini import GeminiClient, api_key_from_env
from pipeline.inputs.fetch import Fetcher
from pipeline.inputs.source import work_units
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer
from pipeline.locations import is_url, local_path, scheme_of
from pipeline.output.index import ResumeIndex
from pipeline.output.sink import ParquetSink, SinkFailed
from pipeline.output.state import State
from pipeline.output.stores import MissingExtra, Store, open_store
from pipeline.records import Work, work_identity
from pipeline.run.calls import RunStopped
from pipeline.run.limits import quota_day
from pipeline.run.runner import ImageRunner
from pipeline.run.stop import Stop, Stopped, on_signals

Block = list[Work]
LOCAL_KEY = "local-key"
BLOCK_SIZE = 64  # units handed from the walking thread to the workers at once
BLOCK_SECONDS = 0.05


class Producer:
    """Walks the inputs in a thread and feeds a bounded queue in small blocks."""

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


def empty_queue(queue: asyncio.Queue[Block | None]) -> None:
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


def make_client(config: Config | None, base_url: str, key: str, version: str = "") -> GeminiClient:
    """The one way a client is made: the endpoint and key, and the config's [api] and [limits]
    (their defaults without a config: `pipeline batch` commands given no --config). `version`
    overrides [api] version (a batch job is followed at the version it was created at)."""
    config = config or Config()
    api = config.api
    try:
        return GeminiClient(
            key,
            base_url=base_url,
            version=version or api.version,
            max_connections=config.limits.concurrency,
            timeout=api.timeout,
            allow_insecure_http=api.allow_insecure_http,
            max_response_bytes=int(api.max_response_mb * 1024 * 1024),
        )
    except ValueError as exc:  # an http:// endpoint off this machine, a malformed URL
        raise ConfigError(f"{config.source}: [api] base_url: {exc}") from None
