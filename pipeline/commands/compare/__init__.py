"""`pipeline compare OUT_A OUT_B`: how far two outputs' answers agree (README, "Comparing two
runs"). `compare_outputs` is the Python entry; `match` and `assign` hold the pure pairing."""

from pipeline.commands.compare.core import (
    CompareError,
    ImageResult,
    Report,
    Thresholds,
    compare_outputs,
)
from pipeline.commands.compare.text import format_report

__all__ = [
    "CompareError",
    "ImageResult",
    "Report",
    "Thresholds",
    "compare_outputs",
    "format_report",
]
