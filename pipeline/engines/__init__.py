"""How the work of a run is spread: one process (the default), Batch Mode, or a Ray cluster.

Every engine runs the same per-unit code (`pipeline.run.runner.ImageRunner`) and commits rows
through the same sink, so rows, keys, resume and exit codes do not depend on the engine. A run's
identity (its id and settings hash: `pipeline.run.identity`) and its reference images are made
here, once, and handed to the engine (again, under the stated entry, when the preflight finds
the service's alias target is not the table's: engines/common.py).
"""

from __future__ import annotations

import asyncio
import importlib

from pipeline.config import Config, ConfigError, require_available
from pipeline.engines.batch.engine import BatchEngine
from pipeline.engines.common import AliasMoved, RunStart, bound_store_requests
from pipeline.engines.ray.driver import RayEngine
from pipeline.engines.single import SingleProcess
from pipeline.inputs.checks import check_groups, require_inputs
from pipeline.inputs.references import load as load_references
from pipeline.output.stores import MissingExtra
from pipeline.run.identity import identify
from pipeline.run.plan import RedoRefused
from pipeline.run.runner import RunOptions
from pipeline.run.summary import RunSummary

__all__ = ["RedoRefused", "RunOptions", "check_run", "run", "run_async"]

RAY_EXTRA = "pip install 'gemini-vision-pipeline[ray]'"


def check_run(config: Config, options: RunOptions) -> None:
    """What every front door (the `run` command, `pipeline.run()`) refuses before a run starts:
    inputs that are not there, an engine whose extra is not installed, --submit-only outside
    Batch Mode or against the in-process server. (A settings change that would redo too many
    rows is refused once the run has read its resume index: `common.guard_redo`.)"""
    bound_store_requests(config)  # the inputs' bucket is asked first
    require_inputs(config)
    _check_caps(config)
    _require_engine(config)
    if options.submit_only:
        _check_submit_only(config)


def _require_engine(config: Config) -> None:
    """The Ray engine's package is an extra, imported only when a run uses it: without it the
    run is one line saying what to install (as an s3:// path without the cloud extra), not a
    ModuleNotFoundError from deep in the engine."""
    if config.engine.kind != "ray":
        return
    try:
        importlib.import_module("ray")
    except ImportError:
        raise MissingExtra(
            f'{config.source}: [engine] kind = "ray" (--engine ray) needs the ray package: '
            f"{RAY_EXTRA}"
        ) from None


def _check_caps(config: Config) -> None:
    """The spending caps are kept where a process admits its requests (pipeline/run/spend.py);
    a Ray fleet's workers would each keep their own, so a cap there is refused, not ignored."""
    limits = config.limits
    if config.engine.kind == "ray" and (limits.max_usd or limits.max_usd_per_day):
        raise ConfigError(
            f"{config.source}: [limits] max_usd and max_usd_per_day are not kept by the ray "
            'engine yet: use [engine] kind = "single" (the default), or remove the cap'
        )


def _check_submit_only(config: Config) -> None:
    if config.api.mode != "batch":
        raise ConfigError('--submit-only needs Batch Mode: add --batch (or [api] mode = "batch")')
    if config.api.base_url == "local":
        raise ConfigError(
            f'{config.source}: [api] base_url = "local": the in-process server, and its jobs, '
            "end with the run; for --submit-only run `pipeline serve-local` and use its URL"
        )


async def run_async(config: Config, options: RunOptions | None = None) -> RunSummary:
    """Run a config to completion (or a clean stop) and return its summary. A run whose alias
    the service says is another entry than the table's guess starts once more, under that
    entry (`AliasMoved`: its preflight is not asked again)."""
    options = options or RunOptions()
    bound_store_requests(config)
    require_available(config)
    check_groups(config)
    references = load_references(config)  # read once: every request of the run has them
    identity = identify(config, references)
    start = RunStart(config, identity, references, options)
    try:
        return await _engine(start)
    except AliasMoved as moved:
        return await _engine(moved.start)


async def _engine(start: RunStart) -> RunSummary:
    if start.config.api.mode == "batch":
        return await BatchEngine(start).run()
    if start.config.engine.kind == "ray":  # (its modules import Ray, an extra, only when run)
        return await RayEngine(start).run()
    return await SingleProcess(start).run()


def run(config: Config, options: RunOptions | None = None) -> RunSummary:
    return asyncio.run(run_async(config, options))
