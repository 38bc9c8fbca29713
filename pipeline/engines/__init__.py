"""How the work of a run is spread: one process (the default), Batch Mode, or a Ray cluster.

Every engine runs the same per-unit code (`pipeline.run.runner.ImageRunner`) and commits rows
through the same sink, so rows, keys, resume and exit codes do not depend on the engine. A run's
identity (its id and settings hash: `pipeline.run.identity`) and its reference images are made
here, once, and handed to the engine (again, under the stated entry, when the preflight finds
the service's alias target is not the table's: engines/common.py).
"""

from __future__ import annotations

import asyncio

from pipeline.config import Config, require_available
from pipeline.engines.batch.engine import BatchEngine
from pipeline.engines.common import AliasMoved, RunStart
from pipeline.engines.ray.driver import RayEngine
from pipeline.engines.single import SingleProcess
from pipeline.inputs.checks import check_groups
from pipeline.inputs.references import load as load_references
from pipeline.run.identity import identify
from pipeline.run.runner import RunOptions
from pipeline.run.summary import RunSummary

__all__ = ["RunOptions", "run", "run_async"]


async def run_async(config: Config, options: RunOptions | None = None) -> RunSummary:
    """Run a config to completion (or a clean stop) and return its summary. A run whose alias
    the service says is another entry than the table's guess starts once more, under that
    entry (`AliasMoved`: its preflight is not asked again)."""
    options = options or RunOptions()
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
