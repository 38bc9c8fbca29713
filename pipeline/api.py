"""The Python API: what the `run`, `estimate`, `tune` commands and a reader of an output do,
from code.

    import pipeline

    summary = pipeline.run("config.toml", model="gemini-2.5-flash", limit=100)
    rows = pipeline.read("out", columns=["image_path", "status"])  # a pyarrow Table

It is the command line's own path, not a second one: the same TOML (or a dict shaped like it),
the same settings checked by the same declarations (pipeline/config.py), the same checks before
a run (`engines.check_run`), the same engines, and the same typed errors (`ConfigError`,
`MissingExtra`, `OutputDirBusy`, `UnreadablePart`) where the command exits 2.

`run()` works where `asyncio.run()` cannot: called from a thread whose event loop is running (a
Jupyter cell runs inside the kernel's loop), the run gets a loop in a thread of its own and the
caller waits for it; a Ctrl-C (a notebook's "interrupt") reaching the caller then drains the run
as it would on the command line (`run.stop.interrupt`). `arun()` is the same run awaited in the
caller's own loop.

Sits beside `pipeline.cli` in the layers (pyproject.toml): both are front doors over the engines
and commands, and neither needs the other.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import threading
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeAlias, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.commands.estimate import estimate as estimate_config
from pipeline.commands.outputs import require_output
from pipeline.commands.tune import TuneOptions, TuneReport, reference_of, vary_of
from pipeline.commands.tune import tune as tune_config
from pipeline.config import SECTIONS, Config, ConfigError, flags, parse_config, with_overrides
from pipeline.config import load_config as load_toml
from pipeline.engines import RedoRefused, RunOptions, check_run, run_async
from pipeline.inputs.checks import require_inputs
from pipeline.output.parts import Output, current_rows
from pipeline.run.stop import interrupt
from pipeline.run.summary import RunSummary

__all__ = ["ConfigSource", "RedoRefused", "arun", "estimate", "load_config", "read", "run", "tune"]

T = TypeVar("T")
# A TOML file's path, a dict shaped like the file (its sections as keys), or a loaded Config.
ConfigSource: TypeAlias = "Config | str | os.PathLike[str] | Mapping[str, Any]"
DICT_SOURCE = "<dict config>"  # where a dict config's errors say the problem is
OVERRIDES = "overrides"  # where an override's errors say the problem is


# ---------------------------------------------------------------------------------- config
def load_config(
    config: ConfigSource, /, overrides: Mapping[str, Any] | None = None, **settings: Any
) -> Config:
    """A validated Config, with overrides applied (each checked by its declaration).

    `config`: a TOML file (relative paths in it against its folder), a dict shaped like one
    (relative paths against the working directory), or a Config. `overrides`: values keyed
    "section.key" (`{"limits.concurrency": 4}`). `settings`: keywords named as the command
    line's setting flags (`model=`, `concurrency=`, `input=`, `output=`, `base_url=`, ...), or
    as a section with a dict of its keys (`limits={"rpm": 60}`), or dotted (`**{"limits.rpm":
    60}`). A None value changes nothing."""
    return with_overrides(_loaded(config), {**_dotted(settings), **(overrides or {})}, OVERRIDES)


def _loaded(config: ConfigSource) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, Mapping):
        return parse_config(dict(config), DICT_SOURCE)
    return load_toml(config)


def _dotted(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Keywords -> "section.key", through the command line's flags (`pipeline/config.py`
    `flags()`: --base-url is base_url=). A section's name with a dict is that section's keys;
    `input`, `output`, `task` and `engine` are also flags, taking the flag's value otherwise."""
    by_flag = {
        _keyword(declared.metadata["flag"]): f"{sec}.{key}" for sec, key, declared in flags()
    }
    dotted: dict[str, Any] = {}
    for name, value in settings.items():
        if name in SECTIONS and isinstance(value, Mapping):
            dotted.update({f"{name}.{key}": item for key, item in value.items()})
        elif "." in name:  # **{"limits.rpm": 60}: as in overrides
            dotted[name] = value
        elif name in by_flag:
            dotted[by_flag[name]] = value
        else:
            raise ConfigError(f"{OVERRIDES}: unknown keyword {name}= ({_known(by_flag)})")
    return dotted


def _known(by_flag: Mapping[str, str]) -> str:
    sections = ", ".join(SECTIONS)
    return (
        f"settings: {', '.join(sorted(by_flag))}; sections, with a dict: {sections}; any key: "
        'overrides={"section.key": value}'
    )


def _keyword(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


# ------------------------------------------------------------------------------------ runs
def run(
    config: ConfigSource,
    /,
    overrides: Mapping[str, Any] | None = None,
    *,
    limit: int | None = None,
    retry_errors: bool = False,
    progress: bool = False,
    submit_only: bool = False,
    seed: int | None = None,
    yes: bool = False,
    **settings: Any,
) -> RunSummary:
    """Run a config to completion (or a clean stop) and return its summary, as `pipeline run`
    does (its `exit_code` is the command's). Safe inside a running event loop (a notebook).

    `limit`, `retry_errors`, `submit_only`, `yes`: the command's --limit, --retry-errors,
    --submit-only, --yes (a run that would redo more committed rows than `[limits] max_redo`
    allows because settings changed raises `RedoRefused` without it); `progress`: the progress
    line on stderr (off: a library call prints nothing); `seed`: the retries' backoff jitter
    (None: from the OS). Overrides as in `load_config`."""
    options = RunOptions(
        retry_errors=retry_errors,
        limit=limit,
        progress=progress,
        seed=seed,
        submit_only=submit_only,
        ask_before_redo=not yes,
    )
    return _blocking(lambda: _run(config, overrides, settings, options))


async def arun(
    config: ConfigSource,
    /,
    overrides: Mapping[str, Any] | None = None,
    *,
    limit: int | None = None,
    retry_errors: bool = False,
    progress: bool = False,
    submit_only: bool = False,
    seed: int | None = None,
    yes: bool = False,
    **settings: Any,
) -> RunSummary:
    """`run`, awaited in the caller's event loop (see `run` for the arguments)."""
    options = RunOptions(
        retry_errors=retry_errors,
        limit=limit,
        progress=progress,
        seed=seed,
        submit_only=submit_only,
        ask_before_redo=not yes,
    )
    return await _run(config, overrides, settings, options)


async def _run(
    config: ConfigSource,
    overrides: Mapping[str, Any] | None,
    settings: Mapping[str, Any],
    options: RunOptions,
) -> RunSummary:
    loaded = load_config(config, overrides, **settings)
    check_run(loaded, options)
    return await run_async(loaded, options)


def _blocking(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """`asyncio.run` where this thread runs no loop (a script). Where it does (a notebook cell
    runs inside the kernel's loop) asyncio.run refuses, and waiting here blocks that loop, so
    the run cannot share it: it gets a loop in a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    return OwnLoop(make).result()


class OwnLoop(Generic[T]):
    """A coroutine run on a new loop in a thread of its own while the caller waits, and what a
    Ctrl-C (SIGINT, a notebook's interrupt) reaching the caller does to it: passed to the run's
    stop, which drains the first and abandons on the next, as the command line does; before the
    run takes signals (its config, its preflight) a cancel, as asyncio.run does at a Ctrl-C,
    and the caller gets KeyboardInterrupt."""

    def __init__(self, make: Callable[[], Coroutine[Any, Any, T]]) -> None:
        self.make = make
        self.loop = asyncio.new_event_loop()
        self.task: asyncio.Task[T] | None = None
        self.cancelled = False

    def result(self) -> T:
        with (
            _sigint_to(self.signal),
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pipeline-run") as pool,
        ):
            try:
                return pool.submit(self._run).result()
            except asyncio.CancelledError:
                if self.cancelled:
                    raise KeyboardInterrupt from None
                raise

    def _run(self) -> T:
        """In the worker thread; asyncio.Runner closes the loop as asyncio.run would."""
        with asyncio.Runner(loop_factory=lambda: self.loop) as runner:
            return runner.run(self._main())

    async def _main(self) -> T:
        self.task = asyncio.current_task()
        if self.cancelled:  # a Ctrl-C before this task existed (see _cancel)
            raise asyncio.CancelledError
        return await self.make()

    def signal(self) -> None:
        """A SIGINT, in the caller's thread."""
        if interrupt(self.loop):
            return
        self.cancelled = True
        with contextlib.suppress(RuntimeError):  # the loop closed: the run is over
            self.loop.call_soon_threadsafe(self._cancel)

    def _cancel(self) -> None:
        """On the run's loop, so never between _main's first two lines: either the task is
        there to cancel, or _main has not started and will see `cancelled`."""
        if self.task is not None:
            self.task.cancel()


@contextlib.contextmanager
def _sigint_to(handle: Callable[[], None]) -> Iterator[None]:
    """SIGINT calls `handle` while the block runs, in place of the caller's handler (a kernel's
    KeyboardInterrupt, which would land anywhere in the wait: in the middle of starting the
    thread, leaving it running unowned); the caller's handler is put back after. Only the main
    thread gets signals, and only it may set their handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda *_: handle())
    try:
        yield
    finally:
        if previous is not None:  # None: set outside Python, cannot be put back
            signal.signal(signal.SIGINT, previous)


# --------------------------------------------------------------------- estimate, read
def estimate(
    config: ConfigSource,
    /,
    overrides: Mapping[str, Any] | None = None,
    *,
    limit: int | None = None,
    retry_errors: bool = False,
    exact: bool = False,
    **settings: Any,
) -> dict[str, Any]:
    """`pipeline estimate --json`'s report: the plan of a run now (what it would do with each
    file, by the run's own tests) and its tokens, cost and time, no API call. `exact`: read
    every file to buy whole (`--exact`; by default past 1 GB the plan is an upper bound)."""
    loaded = load_config(config, overrides, **settings)
    require_inputs(loaded)
    return estimate_config(loaded, limit=limit, retry_errors=retry_errors, exact=exact)


def tune(
    config: ConfigSource,
    /,
    overrides: Mapping[str, Any] | None = None,
    *,
    sample: int,
    vary: Mapping[str, Sequence[Any]],
    reference: Mapping[str, Any] | None = None,
    target: float = 0.95,
    max_usd: float | None = None,
    repeat: int = 1,
    seed: int = 0,
    progress: bool = False,
    **settings: Any,
) -> TuneReport:
    """`pipeline tune`: `vary` as {"images.max_side": [48, 96, None]} (None: unset),
    `reference` as {"api.model": "gemini-2.5-pro"}; the report's `recommended`, `trials`,
    `exit_code` and `as_dict()` (`--json`). Each run is `run()`'s, `seed` its backoff's too."""
    options = TuneOptions(
        sample=sample,
        vary=vary_of(vary),
        reference=reference_of(reference or {}),
        target=target,
        max_usd=max_usd,
        repeat=repeat,
        seed=seed,
    )
    run_options = RunOptions(progress=progress, seed=seed)

    def run_one(loaded: Config, _: str) -> RunSummary:
        return _blocking(lambda: _run(loaded, None, {}, run_options))

    return tune_config(load_config(config, overrides, **settings), options, run_one)


def read(
    output: Output, *, columns: Sequence[str] | None = None, task: str | None = None
) -> pa.Table:
    """The current rows of an output (a folder or an object-store URL): one per image and task,
    the newest, sorted by (image_root, image_path, task); `columns` only these, `task` only the
    rows of that task. It only reads: rows a killed run left in its journal are not rows yet
    (the next run, or `pipeline status`, commits them)."""
    require_output(output)
    if task is None:
        return current_rows(output, columns)
    wanted = None if columns is None else list(columns)
    table = current_rows(output, None if wanted is None else list(dict.fromkeys([*wanted, "task"])))
    table = table.filter(pc.equal(table.column("task"), task))
    return table if wanted is None else table.select(wanted)
