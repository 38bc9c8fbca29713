"""`pipeline estimate`: what a run would cost in tokens, money and time, without one API call.

Image tokens follow the model's documented rule (the model table's `tokens`, computed by
pipeline.gemini.tokens, the same rules the local server bills by) from each image's header and
EXIF alone; Gemini 3's per-image figures are documented maxima, so those totals are "at most".
A request carries the run's reference images and one image, or a group's images (`[input]
group_by`): its input is their tokens plus the prompt's and the captions' (pipeline/tasks/
multi.py), so reference images cost their tokens once per request. Each request is estimated by
the very calculation a run makes before sending it (pipeline/run/costing.py), so the estimate's
input tokens are the sum of the run's rows' `est_prompt_tokens`. Output tokens come from
earlier rows of the same task in the output directory (a row is a request) when there are some,
else from a per-task guess (per image for the tasks that locate objects). Prices come from the
model table (interactive and Batch Mode side by side): today's period, each request at its own
prompt-size tier (a group or reference-image request may pass the Pro models' 200k), no token
assumed cached (implicit caching is the service's to decide: a saving, never a promise). When
today's price ends within PERIOD_NOTICE_DAYS, the next period's figure too (a run may cross the
day). Where the token rule is a range (2.x at media resolution HIGH: 256 + pan-and-scan crops),
the tokens and costs are given as that range as well. Alongside, what downscaling (`max_side`)
or a lower media resolution would save, and how many requests a limit would refuse.
"""

from __future__ import annotations

import itertools
import math
import os
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pyarrow.compute as pc

from pipeline.config import Config
from pipeline.cost import OUTPUT_GUESS, PER_IMAGE_OUTPUT, requests_cost
from pipeline.gemini.tokens import (
    GLOBAL_RESOLUTION_TOKENS_2X,
    MEDIA_RESOLUTION_TOKENS,
    image_token_range,
)
from pipeline.inputs import images, references
from pipeline.inputs.checks import check_groups
from pipeline.inputs.fetch import Fetcher, FetchError, settings_from
from pipeline.inputs.source import work_units
from pipeline.locations import is_url
from pipeline.models import Model, Price
from pipeline.output.parts import current_rows
from pipeline.records import ImageItem, members_of
from pipeline.run import context_cache
from pipeline.run.costing import Costing, TokenEstimate
from pipeline.tasks import get_task

WINDOW = 64  # units measured together: the remote ones among them are read concurrently
MAX_SIDE_CHOICES = (384, 768, 1024, 1536)
# A price period ending within this many days: the estimate gives the next period's cost too (a
# scheduled or Batch Mode run started now may well buy after the change).
PERIOD_NOTICE_DAYS = 30
Sizes = list[tuple[int, int]]


def _scaled(sizes: Sizes, max_side: int | None) -> Sizes:
    """The sizes images would be sent at under another `max_side` (None: as they are)."""
    if max_side is None:
        return sizes
    scaled = []
    for width, height in sizes:
        scale = min(1.0, max_side / max(width, height))
        scaled.append((max(1, round(width * scale)), max(1, round(height * scale))))
    return scaled


def _output_history(output_dir: str, task: str) -> tuple[int, float] | None:
    """(rows, mean billed output+thought tokens) of the current ok rows of this task, if any
    (read through the output's store: a folder or a bucket)."""
    if not is_url(output_dir) and not os.path.isdir(output_dir):
        return None
    table = current_rows(output_dir, ["task", "status", "output_tokens", "thoughts_tokens"])
    mine = pc.fill_null(
        pc.and_(pc.equal(table["task"], task), pc.equal(table["status"], "ok")), False
    )
    table = table.filter(mine)
    if table.num_rows == 0:
        return None
    out = pc.sum(pc.fill_null(table["output_tokens"], 0)).as_py() or 0
    thought = pc.sum(pc.fill_null(table["thoughts_tokens"], 0)).as_py() or 0
    return table.num_rows, (out + thought) / table.num_rows


def estimate(config: Config, *, limit: int | None = None, on: date | None = None) -> dict[str, Any]:
    """Walk the inputs like a run would (headers only) and add up the costs, at the prices of
    `on` (today, UTC, by default)."""
    spec = config.task.spec
    check_groups(config)
    loaded = references.load(config)
    costing = Costing(config, get_task(config.task.kind).request(config.task), loaded)
    units, unusable = _units(config, limit)
    estimates = [costing.request(unit) for unit in units]  # as a run estimates each request
    sizes = [size for unit in units for size in unit]
    found, requests = len(sizes), len(units)
    image_total = costing.images(sizes)
    reference_per_request = costing.reference_tokens
    prompt_total = costing.prompt_tokens * requests + sum(costing.captions(len(u)) for u in units)
    inputs = [estimate.input_tokens for estimate in estimates]
    input_total = sum(inputs)
    history = _output_history(config.output.dir, config.task.kind)
    outputs = _request_outputs(config.task.kind, units, history)
    output_total = round(sum(outputs))
    day = on or datetime.now(UTC).date()
    price = spec.price(day)
    bounds = _input_bounds(costing, units, estimates)
    savings = _savings(spec, costing, units, estimates)
    for saving in savings:
        saving["usd_saved"] = _saved_usd(price, inputs, saving.pop("inputs"), outputs)
    return {
        "model": config.api.model,
        "model_entry": spec.name,
        "token_rule": spec.tokens,
        "image_tokens_are_maxima": spec.tokens == "budget",
        "task": config.task.kind,
        "images": found,
        "requests": requests,
        "grouped": config.task.grouped,
        "unusable_files": unusable,
        "image_tokens": image_total,
        "tokens_an_image_range": _per_image_range(costing),
        "reference_images": len(loaded),
        "reference_tokens_per_request": reference_per_request,
        "reference_tokens": reference_per_request * requests,
        "prompt_tokens": prompt_total,
        "input_tokens": input_total,
        "input_tokens_range": [sum(b) for b in bounds] if bounds else None,
        "input_tokens_per_request": round(input_total / requests, 1) if requests else 0,
        "requests_over_limits": _over_limits(config, costing, units, estimates),
        "requests_long_prompt": _long_prompts(price, inputs),
        "output_tokens": output_total,
        "output_tokens_per_image": round(
            output_total / found if found else _guess(history, config.task.kind), 1
        ),
        "output_tokens_per_request": round(output_total / requests, 1) if requests else 0,
        "output_tokens_from": f"{history[0]} earlier rows" if history else "per-task guess",
        "price_on": day.isoformat(),
        "price_per_million": _price_dict(price),
        **_costs(price, inputs, outputs, bounds),
        "next_price": _next_period(spec, price, day, inputs, outputs, bounds),
        **_time(config, requests, input_total),
        "savings": savings,
        "context_cache": context_cache.estimate_report(config, costing, requests),
    }


def _units(config: Config, limit: int | None) -> tuple[list[Sizes], int]:
    """(sent sizes of each request's images, in order; how many files are unusable). A group
    with an unusable member makes no request (its row would be an error). `limit`: the first
    units of the walk, as `run --limit`.

    Objects and URLs are read whole through a `Fetcher` (the run's bounds, retries and caps; no
    API key), WINDOW units at a time so their reads overlap; local files by their headers."""
    units: list[Sizes] = []
    unusable = 0
    walk = work_units(config.input)
    with Fetcher(settings_from(config)) as fetcher:
        for window in iter(lambda: list(itertools.islice(walk, WINDOW)), []):
            if limit is not None:
                window = window[: max(0, limit - len(units) - unusable)]
            for work, measured in zip(window, _measured(window, config, fetcher), strict=True):
                failed = sum(1 for item in measured if item.error)
                unusable += failed
                if not failed and work.error is None:
                    units.append([(item.sent_width, item.sent_height) for item in measured])
            if limit is not None and len(units) + unusable >= limit:
                break
    return units, unusable


def _measured(window: list[Any], config: Config, fetcher: Fetcher) -> list[list[ImageItem]]:
    """Each unit's members measured; the remote ones read together first."""
    remote = [
        src for work in window for src in members_of(work) if is_url(src.path) and not src.error
    ]
    read = dict(zip(map(id, remote), fetcher.read_all(remote), strict=True))
    side = config.images.max_side
    measured = []
    for work in window:
        items = []
        for src in members_of(work):
            got = read.get(id(src))
            if isinstance(got, FetchError):
                items.append(ImageItem(source=src, error=str(got)))
            else:
                items.append(images.measure(src, max_side=side, data=got))
        measured.append(items)
    return measured


def _guess(history: tuple[int, float] | None, kind: str) -> float:
    return history[1] if history else float(OUTPUT_GUESS[kind])


def _request_outputs(
    kind: str, units: list[Sizes], history: tuple[int, float] | None
) -> list[float]:
    """Output tokens of each request: the history's mean a row, else the per-task guess (per
    image for the tasks that locate objects)."""
    if history is not None:
        return [history[1]] * len(units)
    if kind in PER_IMAGE_OUTPUT:
        return [float(OUTPUT_GUESS[kind] * len(unit)) for unit in units]
    return [float(OUTPUT_GUESS[kind])] * len(units)


def _input_bounds(
    costing: Costing, units: list[Sizes], estimates: list[TokenEstimate]
) -> tuple[list[int], list[int]] | None:
    """(fewest, most) input tokens of each request where the token rule is a range (2.x at
    HIGH), else None: the estimate's images swapped for their bounds."""
    if _per_image_range(costing) is None:
        return None
    low, high = [], []
    for unit, estimate in zip(units, estimates, strict=True):
        fewest, most = costing.image_bounds(unit)
        text = estimate.input_tokens - estimate.image_tokens
        low.append(text + fewest)
        high.append(text + most)
    return low, high


def _per_image_range(costing: Costing) -> list[int] | None:
    """[fewest, most] tokens an image where the model's rule at this resolution is a range."""
    low, high = image_token_range(costing.spec, 1, 1, costing.resolution)
    return [low, high] if low != high else None


def _over_limits(
    config: Config, costing: Costing, units: list[Sizes], estimates: list[TokenEstimate]
) -> int:
    """Requests an interactive run would refuse before sending (too many images or input
    tokens), by the run's own test."""
    tpm = config.limits.tpm
    return sum(
        1
        for unit, estimate in zip(units, estimates, strict=True)
        if costing.over_limits(len(unit), estimate.input_tokens, tpm) is not None
    )


def _long_prompts(price: Price | None, inputs: list[int]) -> int:
    """Requests estimated above the price's long-prompt threshold (billed at its long tier)."""
    if price is None or price.long is None:
        return 0
    return sum(1 for tokens in inputs if price.tier(tokens) is not price)


def _savings(
    spec: Model, costing: Costing, units: list[Sizes], estimates: list[TokenEstimate]
) -> list[dict[str, Any]]:
    """Image tokens (reference images' included) a lower media resolution or (tile rules) a
    smaller max_side would save; each with `inputs`, every request's input tokens then (to
    price the saving request by request, each at its own tier)."""

    def option(
        what: dict[str, Any], resolution: str | None = None, side: int | None = None
    ) -> None:
        refs = costing.images(_scaled(costing.reference_sizes, side), resolution)
        inputs = [
            e.input_tokens - e.image_tokens + refs + costing.images(_scaled(unit, side), resolution)
            for unit, e in zip(units, estimates, strict=True)
        ]
        saved = sum(e.input_tokens for e in estimates) - sum(inputs)
        if saved > 0:
            savings.append({**what, "image_tokens_saved": saved, "inputs": inputs})

    savings: list[dict[str, Any]] = []
    levels = MEDIA_RESOLUTION_TOKENS if spec.tokens == "budget" else GLOBAL_RESOLUTION_TOKENS_2X
    if spec.media_resolution:
        for level in levels:
            if level == costing.resolution or (
                level == "ultra_high" and not spec.part_media_resolution
            ):
                continue
            option({"media_resolution": level}, resolution=level)
    if spec.tokens != "budget" and costing.resolution is None:
        for side in MAX_SIDE_CHOICES:
            option({"max_side": side}, side=side)
    return savings


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _requests(report: dict[str, Any]) -> str:
    if not report["grouped"]:
        return ""
    requests = report["requests"]
    mean = report["images"] / requests if requests else 0
    return f" in {requests:,} requests (groups of {mean:.1f} images on average)"


def _price_dict(price: Price | None) -> dict[str, Any] | None:
    if price is None:
        return None
    return {
        "input": price.input,
        "output": price.output,
        "batch_input": price.batch_input,
        "batch_output": price.batch_output,
        "until": price.until.isoformat() if price.until else None,
        "long_above": price.long_above if price.long else None,
        "long": _price_dict(price.long) if price.long else None,
    }


def _saved_usd(
    price: Price | None, inputs: list[int], instead: list[int], outputs: list[float]
) -> float | None:
    """What sending each request with `instead` input tokens would save, interactively."""
    if price is None:
        return None
    now = requests_cost(price, inputs, outputs, batch=False)
    return round(now - requests_cost(price, instead, outputs, batch=False), 4)


def _costs(
    price: Price | None,
    inputs: list[int],
    outputs: list[float],
    bounds: tuple[list[int], list[int]] | None,
) -> dict[str, Any]:
    """The run's cost at `price`, interactive and in Batch Mode, each request at its own tier;
    with `bounds`, the range too."""
    if price is None:
        return dict.fromkeys(
            ("cost_usd", "batch_cost_usd", "cost_usd_range", "batch_cost_usd_range")
        )
    costs: dict[str, Any] = {}
    for key, batch in (("cost_usd", False), ("batch_cost_usd", True)):
        costs[key] = round(requests_cost(price, inputs, outputs, batch=batch), 4)
        costs[f"{key}_range"] = (
            [round(requests_cost(price, b, outputs, batch=batch), 4) for b in bounds]
            if bounds
            else None
        )
    return costs


def _next_period(
    spec: Model,
    price: Price | None,
    day: date,
    inputs: list[int],
    outputs: list[float],
    bounds: tuple[list[int], list[int]] | None,
) -> dict[str, Any] | None:
    """The same run at the next period's price, when today's ends within PERIOD_NOTICE_DAYS."""
    if price is None or price.until is None or (price.until - day).days >= PERIOD_NOTICE_DAYS:
        return None
    start = price.until + timedelta(days=1)
    following = spec.price(start)
    if following is None or following is price:
        return None
    return {
        "from": start.isoformat(),
        "price_per_million": _price_dict(following),
        **_costs(following, inputs, outputs, bounds),
    }


def _time(config: Config, requests: int, input_total: int) -> dict[str, Any]:
    minutes = []
    if config.limits.rpm:
        minutes.append(requests / config.limits.rpm)
    if config.limits.tpm:
        minutes.append(input_total / config.limits.tpm)
    rpd = config.limits.rpd
    return {
        "minutes_at_limits": round(max(minutes), 2) if minutes else None,
        "days_at_rpd": math.ceil(requests / rpd) if rpd and requests else None,
    }


def format_estimate(report: dict[str, Any]) -> str:
    most = "at most " if report["image_tokens_are_maxima"] else ""
    several = report["grouped"] or report["reference_images"]
    refs = ""
    if report["reference_images"]:
        refs = (
            f" + {_count(report['reference_images'], 'reference image')} {most}"
            f"{report['reference_tokens']:,} ({report['reference_tokens_per_request']:,} a request)"
        )
    lines = [
        f"model {report['model']} (table entry {report['model_entry']}, token rule "
        f"{report['token_rule']}), task {report['task']}",
        f"images: {report['images']:,}{_requests(report)} ({report['unusable_files']} unusable "
        "files)",
        f"input tokens: {most}{report['input_tokens']:,}{_range(report['input_tokens_range'])} "
        f"= images {most}{report['image_tokens']:,}{refs} + prompts {report['prompt_tokens']:,}",
    ]
    if report["tokens_an_image_range"]:
        low, high = report["tokens_an_image_range"]
        lines.append(
            f"  {low:,} to ~{high:,} tokens an image (2.x at media_resolution high: 256 + "
            "pan-and-scan crops, ~2,048 more at most; media-resolution page 2026-09-19)"
        )
        lines.append("  the figure before the brackets counts crops by this project's assumption")
    if several:
        lines.append(
            f"tokens a request: {most}{report['input_tokens_per_request']:,} input, "
            f"~{report['output_tokens_per_request']:,} output"
        )
    if report["requests_over_limits"]:
        lines.append(
            f"requests over a limit (images, input tokens, [limits] tpm): "
            f"{report['requests_over_limits']:,}; they would be error rows, not calls"
        )
    lines.append(
        f"output tokens: ~{report['output_tokens']:,} ({report['output_tokens_per_image']} an "
        f"image, from {report['output_tokens_from']})"
    )
    lines += _cost_lines(report)
    lines += context_cache.estimate_lines(report.get("context_cache"), report["cost_usd"])
    if report["minutes_at_limits"] is not None:
        lines.append(f"time at the configured RPM/TPM: ~{report['minutes_at_limits']:,} minutes")
    if report["days_at_rpd"]:
        lines.append(f"days at the configured requests/day: {report['days_at_rpd']}")
    for s in report["savings"]:
        what = (
            f"max_side = {s['max_side']}"
            if "max_side" in s
            else f"media_resolution = {s['media_resolution']}"
        )
        usd = f" (${s['usd_saved']:,.2f})" if s["usd_saved"] is not None else ""
        lines.append(f"  {what} would save {s['image_tokens_saved']:,} image tokens{usd}")
    return "\n".join(lines)


def _range(bounds: list[float] | None, *, money: bool = False) -> str:
    if not bounds:
        return ""
    low, high = (f"${b:,.2f}" if money else f"{b:,}" for b in bounds)
    return f" ({low} to ~{high})"


def _cost_lines(report: dict[str, Any]) -> list[str]:
    """The cost at today's price (its tiers, the range when tokens are one) and, when the
    period ends soon, at the next one."""
    price = report["price_per_million"]
    if price is None:
        return ["cost: no price known for this model (add prices under [models] in the config)"]
    lines = [f"cost: {_money(report)} (per 1M tokens: {_rates(price)}; pipeline/models.json)"]
    if report["requests_long_prompt"]:
        long = price["long"]
        lines.append(
            f"  {_count(report['requests_long_prompt'], 'request')} over {price['long_above']:,} "
            f"prompt tokens: each billed wholly at ${long['input']:g} in / ${long['output']:g} "
            "out (the long-prompt tier)"
        )
    following = report["next_price"]
    if following:
        lines.append(
            f"from {following['from']} the same run costs {_money(following)} (per 1M tokens: "
            f"{_rates(following['price_per_million'])}): what a run buys from that day is billed "
            "at that price"
        )
    return lines


def _money(costs: dict[str, Any]) -> str:
    return (
        f"~${costs['cost_usd']:,.2f}{_range(costs['cost_usd_range'], money=True)} interactive, "
        f"~${costs['batch_cost_usd']:,.2f}{_range(costs['batch_cost_usd_range'], money=True)} in "
        "Batch Mode"
    )


def _rates(price: dict[str, Any]) -> str:
    until = f", until {price['until']}" if price["until"] else ""
    return (
        f"${price['input']:g} in / ${price['output']:g} out; batch ${price['batch_input']:g} / "
        f"${price['batch_output']:g}{until}"
    )
