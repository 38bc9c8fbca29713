"""A local Gemini-compatible HTTP server: tests, the demo and the benchmarks run against it.

It speaks the real API's protocol (generateContent, Interactions, Files, Batch Mode) and answers
by looking at the image's pixels, so flat shapes on a plain background have exact known answers.
It is a strict double: it refuses what the service refuses, with the service's errors (every
rule and its source: rules.py). It knows nothing of the pipeline.

Layout: server.py wires the surfaces (batches.py, generate.py, interactions.py, files_api.py)
over the shared core.py (transport, image_input, billing, quotas, answering, faults, stats);
fields.py declares the accepted request bodies as data, spec.py walks them, settings.py checks
settings against the model table; answers.py and vision.py are the local "model". options.py
declares the server's options once (a config's [local] section, serve.py's flags).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.localserver.options import ServerOptions
    from pipeline.localserver.serve import add_serve_arguments, serve_from_args
    from pipeline.localserver.server import LocalServer

__all__ = ["LocalServer", "ServerOptions", "add_serve_arguments", "serve_from_args"]
_HOMES = {
    "LocalServer": "pipeline.localserver.server",
    "ServerOptions": "pipeline.localserver.options",
    "add_serve_arguments": "pipeline.localserver.serve",
    "serve_from_args": "pipeline.localserver.serve",
}


def __getattr__(name: str) -> Any:
    """The names above, imported on first use: pipeline/config.py imports options.py for its
    [local] section, and loading a config need not load the server (aiohttp's web stack)."""
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
