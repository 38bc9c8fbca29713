"""`pipeline tune`'s report as a person reads it: the price, the table, the recommendation."""

from __future__ import annotations

import os

from pipeline.commands.tune.core import Trial, TuneReport
from pipeline.locations import is_url

HEADER = (
    "setting",
    "agreement",
    "$ / 1,000 images",
    "whole input ({images:,} images)",
    "in Batch Mode",
)


def format_tune(report: TuneReport) -> str:
    lines = [_heading(report), _price_line(report)]
    if report.stop_reason and not any(trial.summary for trial in report.trials):
        return "\n".join([*lines, f"stopped: {report.stop_reason}"])
    lines += _table(report)
    lines += _floor(report)
    if report.stop_reason:
        return "\n".join(
            [*lines, f"stopped: {report.stop_reason}; rerun the same command to go on"]
        )
    return "\n".join([*lines, *_recommendation(report)])


def _heading(report: TuneReport) -> str:
    sample = report.sample
    return (
        f"tune {report.config}: a sample of {sample.images} images (asked {sample.size}, seed "
        f"{sample.seed}) in {_place(report.folder)}"
    )


def _place(folder: str) -> str:
    """A folder under the working directory as a relative path (what the user typed)."""
    if is_url(folder):
        return folder
    relative = os.path.relpath(folder)
    return folder if relative.startswith("..") else relative


def _price_line(report: TuneReport) -> str:
    price = report.price
    cap = f", cap ${price['max_usd']:,.4f}" if price.get("max_usd") is not None else ""
    return (
        f"priced before any call: {price['runs']} runs, {_usd(price['cost_usd'])} interactive, "
        f"{_usd(price['batch_cost_usd'])} in Batch Mode{cap}"
    )


def _table(report: TuneReport) -> list[str]:
    images = (report.trials[0].projected or {}).get("images", 0)
    header = tuple(cell.format(images=images) for cell in HEADER)
    rows = [header, *(_row(trial, report.sample.images) for trial in report.trials)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _row(trial: Trial, images: int) -> tuple[str, str, str, str, str]:
    projected = trial.projected or {}
    marks = {"reference": " (reference)", "repeat": " (repeat)"}.get(trial.role, "")
    return (
        f"{trial.setting.label}{marks}",
        _agreement(trial, images),
        _usd(trial.cost_per_1000, 2),
        _usd(projected.get("cost_usd")) if projected else "",
        _usd(projected.get("batch_cost_usd")) if projected else "",
    )


def _agreement(trial: Trial, images: int) -> str:
    """The agreement, and on how many images when fewer than the sample (the others: an error
    or a blocked answer on a side, not compared)."""
    if trial.role == "reference" or trial.agreement is None:
        return "-"
    fewer = f" ({trial.compared} of {images})" if trial.compared < images else ""
    return f"{trial.agreement:.3f}{fewer}"


def _floor(report: TuneReport) -> list[str]:
    target = report.options.target
    if report.noise_floor is None:
        return [
            f"target: agreement >= {target:g} with the reference (--repeat 2 shows its noise floor)"
        ]
    return [
        f"noise floor: the reference agrees with its repeat at {report.noise_floor:.3f}; target "
        f"{target:g} x {report.noise_floor:.3f} = agreement >= {report.threshold:.3f}"
    ]


def _recommendation(report: TuneReport) -> list[str]:
    best = report.recommended
    if best is None:
        return ["no setting reaches the target"]
    reference = report.trials[0]
    cheaper = ""
    if best is not reference and best.cost_per_1000 and reference.cost_per_1000:
        cheaper = (
            f", {reference.cost_per_1000 / best.cost_per_1000:.1f}x cheaper than the reference"
        )
    return [
        f"recommended: {best.setting.label} ({_usd(best.cost_per_1000, 2)} per 1,000 images"
        f"{cheaper}); paste into {report.config}:",
        best.setting.snippet(),
    ]


def _usd(value: float | None, places: int = 4) -> str:
    return "unpriced" if value is None else f"${value:,.{places}f}"
