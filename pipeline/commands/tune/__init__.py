"""`pipeline tune CONFIG --sample N --vary KEY=V1,V2`: the cheapest setting whose answers agree
with the richest one's (README, "Choosing a model and settings"). `tune` is the Python entry;
the caller hands it the engine's run (commands sit beside the engines, not above them)."""

from pipeline.commands.tune.core import TuneError, TuneOptions, TuneReport, tune
from pipeline.commands.tune.grid import parse_reference, parse_vary, reference_of, vary_of
from pipeline.commands.tune.text import format_tune

__all__ = [
    "TuneError",
    "TuneOptions",
    "TuneReport",
    "format_tune",
    "parse_reference",
    "parse_vary",
    "reference_of",
    "tune",
    "vary_of",
]
