"""A run's identity: which run it is and which answers it keys. Built once for a run (by
`pipeline.engines.run_async`) and handed to its engine, its rows and its summary, whatever the
engine.

The key suffix hashes the *effective* request (`config.key_suffixes`): the request the task
builds minus what cannot change it, whether the image is sent as it is or shrunk by
`max_side`, and the reference images' bytes. Two keys with the same suffix ask the same
question of the same bytes, so an answer of one serves the other. `key_suffix` is the run-wide
one (images sent as they are: what Batch Mode's jobs and the summary name); an image's own
suffix is `suffixes.of(its sizes)`, chosen where the image is prepared (`run/runner.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import Config, key_suffixes
from pipeline.inputs.references import LoadedReference, identities
from pipeline.inputs.references import load as load_references
from pipeline.records import KeySuffixes, new_run_id
from pipeline.tasks import get_task


@dataclass(frozen=True, slots=True)
class RunIdentity:
    """What every row of a run shares."""

    run_id: str
    task: str
    model: str
    suffixes: KeySuffixes

    @property
    def key_suffix(self) -> str:
        """The run-wide suffix: an image sent as it is."""
        return self.suffixes.as_is


def identify(config: Config, references: tuple[LoadedReference, ...]) -> RunIdentity:
    """The identity of a run of `config` starting now (its loaded reference images: their bytes
    are part of the key)."""
    return RunIdentity(
        new_run_id(), config.task.kind, config.api.model, suffixes_of(config, references)
    )


def suffixes_of(config: Config, loaded: tuple[LoadedReference, ...] | None = None) -> KeySuffixes:
    """The key suffixes of a run: its effective request, and its reference images (`loaded`,
    read from the config when not given: their bytes are part of it)."""
    loaded = load_references(config) if loaded is None else loaded
    request = get_task(config.task.kind).request(config.task)
    return key_suffixes(config, request, identities(loaded))


def key_suffix(config: Config, loaded: tuple[LoadedReference, ...] | None = None) -> str:
    """The run-wide suffix (an image sent as it is) of `config`."""
    return suffixes_of(config, loaded).as_is
