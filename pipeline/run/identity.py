"""A run's identity: which run it is and which answers it keys. Built once for a run (by
`pipeline.engines.run_async`) and handed to its engine, its rows and its summary, whatever the
engine.

The key suffix is the settings hash (`config.settings_hash`): the request the task builds, what
is done to an image before sending, and the reference images' bytes. Two runs with the same
suffix ask the same question of the same bytes, so an answer of one serves the other.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import Config, settings_hash
from pipeline.inputs.references import LoadedReference, identities
from pipeline.inputs.references import load as load_references
from pipeline.records import new_run_id
from pipeline.tasks import get_task


@dataclass(frozen=True, slots=True)
class RunIdentity:
    """What every row of a run shares."""

    run_id: str
    task: str
    model: str
    key_suffix: str  # the settings hash


def identify(config: Config, references: tuple[LoadedReference, ...]) -> RunIdentity:
    """The identity of a run of `config` starting now (its loaded reference images: their bytes
    are part of the key)."""
    return RunIdentity(
        new_run_id(), config.task.kind, config.api.model, key_suffix(config, references)
    )


def key_suffix(config: Config, loaded: tuple[LoadedReference, ...] | None = None) -> str:
    """The settings hash of a run: its request, and its reference images (`loaded`, read
    from the config when not given: their bytes are part of it)."""
    loaded = load_references(config) if loaded is None else loaded
    request = get_task(config.task.kind).request(config.task)
    return settings_hash(config, request, identities(loaded))
