"""An output a reading command (or `pipeline.read`) is pointed at must be there: a typo is a
usage error naming it, not an empty report."""

from __future__ import annotations

import os

from pipeline.config import ConfigError
from pipeline.output.parts import Output
from pipeline.output.stores import open_store


def require_output(output_dir: Output) -> None:
    """A folder that exists; a bucket that exists, with something under the prefix (an
    object-store prefix exists once a run has written it)."""
    store = open_store(output_dir)
    if store.local:
        if not os.path.isdir(store.url):
            raise ConfigError(f"{output_dir}: no such output folder")
        return
    try:
        store.ensure()
    except FileNotFoundError:
        raise ConfigError(f"{output_dir}: no such bucket") from None
    except OSError as exc:  # no credentials, access denied, an endpoint that does not answer
        raise ConfigError(f"{output_dir}: {exc.strerror or exc}") from None
    if not store.list():
        raise ConfigError(f"{output_dir}: nothing there: no run has written this output")
