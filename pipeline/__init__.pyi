# The package's names for type checkers (PEP 561): pipeline/__init__.py loads them on first use.
from pipeline.api import arun as arun
from pipeline.api import estimate as estimate
from pipeline.api import load_config as load_config
from pipeline.api import read as read
from pipeline.api import run as run
from pipeline.api import tune as tune
from pipeline.config import Config as Config
from pipeline.config import ConfigError as ConfigError
from pipeline.output.parts import UnreadablePart as UnreadablePart
from pipeline.output.stores import MissingExtra as MissingExtra
from pipeline.output.stores import OutputDirBusy as OutputDirBusy
from pipeline.run.plan import RedoRefused as RedoRefused
from pipeline.run.summary import RunSummary as RunSummary

__version__: str
__all__ = [
    "Config",
    "ConfigError",
    "MissingExtra",
    "OutputDirBusy",
    "RedoRefused",
    "RunSummary",
    "UnreadablePart",
    "__version__",
    "arun",
    "estimate",
    "load_config",
    "read",
    "run",
    "tune",
]
