"""gemini-vision-pipeline: folders of images -> Parquet datasets with Gemini image understanding.

The Python API (README "Python API", pipeline/api.py): `run`, `arun`, `estimate`, `tune`, `read`,
`load_config`, and the errors they raise. They load on first use, not here: every entry point
imports this package (`pipeline --help` too), and the API brings the engines with it (aiohttp,
pyarrow, the Gemini client: about 1 s, `python -X importtime`), which `import pipeline` stays
clear of (2 ms). What the names are, for type checkers and editors, is in __init__.pyi: a
stub, so that no module importing this package (for `__version__`) is taken by import-linter
to import the API above it.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# Each name of the API, and the module that defines it.
_LAZY = {
    "run": "pipeline.api",
    "arun": "pipeline.api",
    "estimate": "pipeline.api",
    "read": "pipeline.api",
    "load_config": "pipeline.api",
    "tune": "pipeline.api",
    "Config": "pipeline.config",
    "ConfigError": "pipeline.config",
    "RunSummary": "pipeline.run.summary",
    "MissingExtra": "pipeline.output.stores",
    "OutputDirBusy": "pipeline.output.stores",
    "UnreadablePart": "pipeline.output.parts",
    "RedoRefused": "pipeline.run.plan",
}
__all__ = ["__version__", *_LAZY]


class _Package(types.ModuleType):
    """This package's module, loading the API's names on first use.

    A module `__getattr__` (PEP 562) is not enough for `run`: the import system sets the
    attribute `pipeline.run` to the subpackage pipeline/run/ as soon as anything imports it
    (every run does), and that attribute would then shadow the function. A property on the
    module's class comes before the module's attributes: `pipeline.run` stays the function,
    while `import pipeline.run.summary` still finds the subpackage (in sys.modules). What this
    costs: `pipeline.run.<module>` as a chain of attributes (`import pipeline.run.stop as s`,
    monkeypatch's "pipeline.run.stop.X") reaches the function; `from pipeline.run import stop`
    is the way to the module."""

    def __getattr__(self, name: str) -> object:
        if name not in _LAZY:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        return getattr(importlib.import_module(_LAZY[name]), name)

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *_LAZY})

    @property
    def run(self) -> object:
        return self.__getattr__("run")

    @run.setter
    def run(self, value: object) -> None:
        """The import system setting the subpackage: it is in sys.modules, nothing to keep."""
        if value is not sys.modules.get(f"{self.__name__}.run"):
            raise AttributeError(f"{self.__name__}.run is the API's function (pipeline/api.py)")


sys.modules[__name__].__class__ = _Package
