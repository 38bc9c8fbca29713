"""The Python API: what the `run`, `estimate` commands and a reader of an output do, from code.

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
import os
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeAlias, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.commands.estimate import estimate as estimate_config
from pipeline.commands.outputs import require_output
from pipeline.config import SECTIONS, Config, ConfigError, flags, parse_config, with_overrides
from pipeline.config import load_config as load_toml
from pipeline.engines import RunOptions, check_run, run_async
from pipeline.inputs.checks import require_inputs
from pipeline.output.parts import Output, current_rows
from pipeline.run.stop import interrupt
from pipeline.run.summary import RunSummary

__all__ = ["ConfigSource", "arun", "estimate", "load_config", "read", "run"]

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
    as a section with a dict of its keys (`limits={"rpm": 60}`). A None value changes nothing."""
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
    **settings: Any,
) -> RunSummary:
    """Run a config to completion (or a clean stop) and return its summary, as `pipeline run`
    does (its `exit_code` is the command's). Safe inside a running event loop (a notebook).

    `limit`, `retry_errors`, `submit_only`: the command's --limit, --retry-errors,
    --submit-only; `progress`: the progress line on stderr (off: a library call prints
    nothing); `seed`: the retries' backoff jitter (None: from the OS). Overrides as in
    `load_config`."""
    options = RunOptions(
        retry_errors=retry_errors,
        limit=limit,
        progress=progress,
        seed=seed,
        submit_only=submit_only,
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
    **settings: Any,
) -> RunSummary:
    """`run`, awaited in the caller's event loop (see `run` for the arguments)."""
    options = RunOptions(
        retry_errors=retry_errors,
        limit=limit,
        progress=progress,
        seed=seed,
        submit_only=submit_only,
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
    return _in_thread(make)


def _in_thread(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    loop = asyncio.new_event_loop()
    main: list[asyncio.Task[T]] = []  # the run's task, once the thread has started it
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pipeline-run") as pool:
        done = pool.submit(_run_on, loop, make, main)
        return _wait(done, loop, main)


def _run_on(
    loop: asyncio.AbstractEventLoop,
    make: Callable[[], Coroutine[Any, Any, T]],
    main: list[asyncio.Task[T]],
) -> T:
    """The run on `loop`, in this (worker) thread; asyncio.Runner closes it as asyncio.run
    would (async generators, the default executor)."""

    async def tracked() -> T:
        main.append(asyncio.current_task())  # type: ignore[arg-type]  # inside a task: never None
        return await make()

    with asyncio.Runner(loop_factory=lambda: loop) as runner:
        return runner.run(tracked())


def _wait(
    done: concurrent.futures.Future[T],
    loop: asyncio.AbstractEventLoop,
    main: list[asyncio.Task[T]],
) -> T:
    """The run's result. A Ctrl-C here (Python delivers it to this, the main, thread) is
    passed on: to the run's stop, which drains the first and abandons on the next, as the
    command line does; or, before the run takes signals, as a cancel (what asyncio.run does at
    a Ctrl-C), ending in KeyboardInterrupt."""
    cancelled = False
    while True:
        try:
            return done.result()
        except KeyboardInterrupt:
            if not interrupt(loop):
                cancelled = _cancel(loop, main) or cancelled
        except asyncio.CancelledError:
            if cancelled:
                raise KeyboardInterrupt from None
            raise


def _cancel(loop: asyncio.AbstractEventLoop, main: list[asyncio.Task[T]]) -> bool:
    if not main:  # not started: the Ctrl-C came before the thread ran anything
        return False
    try:
        loop.call_soon_threadsafe(main[0].cancel)
    except RuntimeError:  # the loop closed meanwhile: the run is over, its result follows
        return False
    return True


# --------------------------------------------------------------------- estimate, read
def estimate(
    config: ConfigSource,
    /,
    overrides: Mapping[str, Any] | None = None,
    *,
    limit: int | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """`pipeline estimate --json`'s report: tokens, cost and time of a run, no API call."""
    loaded = load_config(config, overrides, **settings)
    require_inputs(loaded)
    return estimate_config(loaded, limit=limit)


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
