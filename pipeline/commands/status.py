"""`pipeline status OUT [--config C]`: what an output holds (pipeline/output/dataset.py reads
it) and, given a config, what a run of it would still do."""

from __future__ import annotations

from typing import Any

from pipeline.config import Config
from pipeline.inputs.checks import check_groups
from pipeline.inputs.source import work_units
from pipeline.output.dataset import load_resume_index
from pipeline.records import work_identity
from pipeline.run.identity import key_suffix


def pending(config: Config, *, retry_errors: bool = False) -> dict[str, Any]:
    """What a run of `config` would still do: its inputs walked with a stat each, no reads.
    (`files` counts requests: groups, when the config groups its files.)"""
    check_groups(config)
    index = load_resume_index(
        config.output.dir, key_suffix=key_suffix(config), retry_errors=retry_errors
    )
    seen = done = 0
    for work in work_units(config.input):
        seen += 1
        done += work.error is None and index.is_done(*work_identity(work))
    return {"config": config.source, "files": seen, "done": done, "remaining": seen - done}
