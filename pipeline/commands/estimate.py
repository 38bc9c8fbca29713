"""`pipeline estimate`: what a run would cost in tokens, money and time, without one API call.

It prices the run that would happen now (`run --plan` prints the same): the plan of
pipeline/run/plan.py sorts every input unit by the run's own tests into done (skipped, $0),
new, changed, settings (its row was made by another request), retry (an error tried again),
copy (its answer is committed: $0) and in flight (in a Batch Mode job: billed when collected),
and each category is priced, interactive and Batch Mode side by side. A finished output is
"nothing to do", $0.

Image tokens follow the model's documented rule (the model table's `tokens`, computed by
pipeline.gemini.tokens, the same rules the local server bills by) from each image's header and
EXIF alone; Gemini 3's per-image figures are documented maxima, so those totals are "at most".
A request carries the run's reference images and one image, or a group's images (`[input]
group_by`): its input is their tokens plus the prompt's and the captions' (pipeline/tasks/
multi.py), so reference images cost their tokens once per request. Each request is estimated by
the very calculation a run makes before sending it (pipeline/run/costing.py), so the estimate's
input tokens are the sum of the run's rows' `est_prompt_tokens`. Output tokens come from
earlier rows of the same task and model in the output directory (a row is a request) when there
are some, else from the per-task, per-model prior `cost.expected_output` (measured on the local
server: see pipeline/cost.py; per image for the tasks that locate objects). Prices come from the
model table (interactive and Batch Mode side by side): today's period, each request at its own
prompt-size tier (a group or reference-image request may pass the Pro models' 200k), no token
assumed cached (implicit caching is the service's to decide: a saving, never a promise). When
today's price ends within PERIOD_NOTICE_DAYS, the next period's figure too (a run may cross the
day). Where the token rule is a range (2.x at media resolution HIGH: 256 + pan-and-scan crops),
the tokens and costs are given as that range as well. Alongside, what downscaling (`max_side`)
or a lower media resolution would save, and how many requests a limit would refuse.
"""

from __future__ import annotations

import math
import os
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pyarrow.compute as pc

from pipeline.config import Config
from pipeline.cost import expected_output, requests_cost
from pipeline.gemini.tokens import (
    GLOBAL_RESOLUTION_TOKENS_2X,
    MEDIA_RESOLUTION_TOKENS,
    image_token_range,
)
from pipeline.inputs import references
from pipeline.inputs.checks import check_groups
from pipeline.locations import is_url
from pipeline.models import Model, Price
from pipeline.output.parts import current_rows
from pipeline.run import context_cache
from pipeline.run.costing import Costing, TokenEstimate
from pipeline.run.plan import BOUGHT, COPY, IN_FLIGHT, WHOLE_READ_MB, Hashes, Plan, plan
from pipeline.tasks import get_task

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


def _output_history(output_dir: str, task: str, model: str) -> tuple[int, float] | None:
    """(rows, mean billed output+thought tokens) of the current ok rows of this task and model
    that were billed (a copy bills nothing), if any (read through the output's store: a folder
    or a bucket)."""
    if not is_url(output_dir) and not os.path.isdir(output_dir):
        return None
    columns = ["task", "model", "status", "prompt_tokens", "output_tokens", "thoughts_tokens"]
    table = current_rows(output_dir, columns)
    mine = pc.and_(pc.equal(table["task"], task), pc.equal(table["model"], model))
    billed = pc.and_(pc.equal(table["status"], "ok"), pc.is_valid(table["prompt_tokens"]))
    table = table.filter(pc.fill_null(pc.and_(mine, billed), False))
    if table.num_rows == 0:
        return None
    out = pc.sum(pc.fill_null(table["output_tokens"], 0)).as_py() or 0
    thought = pc.sum(pc.fill_null(table["thoughts_tokens"], 0)).as_py() or 0
    return table.num_rows, (out + thought) / table.num_rows


def estimate(
    config: Config,
    *,
    limit: int | None = None,
    on: date | None = None,
    retry_errors: bool = False,
    history_from: str | None = None,
    exact: bool = False,
    hashes: Hashes | None = None,
) -> dict[str, Any]:
    """The plan of a run of `config` now (pipeline/run/plan.py: headers, and the bytes of the
    files it would buy, read up to a budget, every one with `exact`; no call) priced at the
    prices of `on` (today, UTC, by default); output tokens learnt from the rows of
    `history_from` (default: the config's own output). `hashes`: the files read whole by earlier
    plans over the same inputs (`pipeline tune`), read again never."""
    spec = config.task.spec
    check_groups(config)
    loaded = references.load(config)
    costing = Costing(config, get_task(config.task.kind).request(config.task), loaded)
    if hashes is None:
        hashes = Hashes(None if exact else WHOLE_READ_MB)
    planned = plan(config, limit=limit, retry_errors=retry_errors, hashes=hashes)
    units = planned.bought
    estimates = [costing.request(unit) for unit in units]  # as a run estimates each request
    sizes = [size for unit in units for size in unit]
    found, requests = len(sizes), len(units)
    image_total = costing.images(sizes)
    reference_per_request = costing.reference_tokens
    prompt_total = costing.prompt_tokens * requests + sum(costing.captions(len(u)) for u in units)
    inputs = [estimate.input_tokens for estimate in estimates]
    input_total = sum(inputs)
    history = _output_history(history_from or config.output.dir, config.task.kind, config.api.model)
    outputs = _request_outputs(config, units, history)
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
        "unusable_files": planned.unusable,
        "plan": _plan_report(config, planned, inputs, outputs, history, price),
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
            output_total / found if found else _guess(history, config), 1
        ),
        "output_tokens_per_request": round(output_total / requests, 1) if requests else 0,
        "output_tokens_from": f"{history[0]} earlier rows" if history else "per-task prior",
        "price_on": day.isoformat(),
        "price_per_million": _price_dict(price),
        **_costs(price, inputs, outputs, bounds),
        "next_price": _next_period(spec, price, day, inputs, outputs, bounds),
        **_time(config, requests, input_total),
        "savings": savings,
        "context_cache": context_cache.estimate_report(config, costing, requests),
    }


def _plan_report(
    config: Config,
    planned: Plan,
    inputs: list[int],
    outputs: list[float],
    history: tuple[int, float] | None,
    price: Price | None,
) -> dict[str, Any]:
    """Each category of the plan with its count and cost (interactive and Batch Mode);
    `inputs` and `outputs` are the tokens of `planned.bought`'s requests, in its order (the
    categories of BOUGHT one after another)."""
    categories: dict[str, Any] = {}
    start = 0
    for category in BOUGHT:
        units = planned.units[category]
        end = start + len(units)
        priced = _priced(price, inputs[start:end], outputs[start:end])
        categories[category] = {**_counts(units), **priced}
        start = end
    copies = planned.units[COPY]
    categories[COPY] = {**_counts(copies), "cost_usd": 0.0, "batch_cost_usd": 0.0}
    categories[IN_FLIGHT] = _in_flight(config, planned, history, price)
    return {
        "done": planned.done,
        "left": planned.left.report(),  # as `status --config` counts it
        "committed_rows": planned.committed,
        # bought past the budget of whole reads: copies among them not told (an upper bound)
        "not_read_whole": planned.unhashed,
        "nothing_to_do": not planned.bought and not planned.unusable,
        "categories": categories,
        "samples": planned.samples,
        "settings_sources": planned.settings_sources,
    }


def _counts(units: list[Sizes]) -> dict[str, int]:
    return {"requests": len(units), "images": sum(len(unit) for unit in units)}


def _priced(price: Price | None, inputs: list[int], outputs: list[float]) -> dict[str, Any]:
    """Tokens and cost of some requests, interactive and in Batch Mode (None: no price)."""
    costs = _costs(price, inputs, outputs, None)
    return {
        "input_tokens": sum(inputs),
        "output_tokens": round(sum(outputs)),
        "cost_usd": costs["cost_usd"],
        "batch_cost_usd": costs["batch_cost_usd"],
    }


def _in_flight(
    config: Config, planned: Plan, history: tuple[int, float] | None, price: Price | None
) -> dict[str, Any]:
    """The Batch Mode jobs in flight: bought already (billed when collected, at the batch
    price), at their recorded input estimate and the expected answers; not in the plan's total."""
    each = _guess(history, config)
    inputs = [job.est_tokens for job in planned.jobs]
    outputs = [each * job.requests for job in planned.jobs]
    return {
        "jobs": len(planned.jobs),
        "requests": sum(job.requests for job in planned.jobs),
        "files": len(planned.units[IN_FLIGHT]),
        **_priced(price, inputs, outputs),
        "cost_usd": None,  # bought in Batch Mode: there is no interactive figure
    }


def _guess(history: tuple[int, float] | None, config: Config) -> float:
    if history:
        return history[1]
    return float(expected_output(config.task.kind, 1, config.task.spec))


def _request_outputs(
    config: Config, units: list[Sizes], history: tuple[int, float] | None
) -> list[float]:
    """Output tokens of each request: the history's mean a row, else the task's prior on the
    model (per image for the tasks that locate objects)."""
    if history is not None:
        return [history[1]] * len(units)
    kind, spec = config.task.kind, config.task.spec
    return [float(expected_output(kind, len(unit), spec)) for unit in units]


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


# How the plan's categories read (pipeline/run/plan.py), in the order they are listed.
PLAN_LINES = {
    "new": "new files",
    "changed": "changed files",
    "settings": "settings changed (rows redone)",
    "retry": "retryable errors",
    "copy": "copies of answers held (free)",
}


def format_plan(report: dict[str, Any]) -> list[str]:
    """The plan's lines: what a run now would do, each category's count and cost."""
    planned = report["plan"]
    if planned["nothing_to_do"] and not planned["categories"][IN_FLIGHT]["jobs"]:
        return [f"plan: nothing to do ({planned['done']:,} done), $0"]
    to_do = planned["left"]["to_do"]
    lines = [f"plan of a run now: {planned['done']:,} done (skipped, $0), {to_do:,} to do"]
    for category, label in PLAN_LINES.items():
        entry = planned["categories"][category]
        if entry["requests"]:
            cost = "$0" if category == COPY else _plan_money(entry)
            lines.append(f"  {label}: {_count(entry['requests'], 'request')}, {cost}")
    if report["unusable_files"]:
        lines.append(f"  unusable files: {report['unusable_files']:,} (error rows, no call)")
    if planned["not_read_whole"]:
        lines.append(
            f"  an upper bound: {_count(planned['not_read_whole'], 'request')} past the first "
            f"{WHOLE_READ_MB:,} MB read whole are counted as bought, copies among them not "
            "detected (--exact reads every file)"
        )
    lines += _in_flight_lines(planned["categories"][IN_FLIGHT])
    for source in planned["settings_sources"]:
        lines.append(f"    {source['rows']:,} rows of run {source['run_id']}: {source['why']}")
    return lines


def _in_flight_lines(entry: dict[str, Any]) -> list[str]:
    if not entry["jobs"]:
        return []
    usd = entry["batch_cost_usd"]
    cost = f", ~{_usd(usd)} in Batch Mode" if usd is not None else ""
    return [
        f"  in flight in Batch Mode: {_count(entry['jobs'], 'job')} "
        f"({_count(entry['requests'], 'request')}){cost}: bought already, billed when collected"
    ]


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
        *format_plan(report),
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


def _plan_money(entry: dict[str, Any]) -> str:
    """A category's cost: small ones to the hundredth of a cent (a nightly run's few files)."""
    if entry["cost_usd"] is None:
        return "no price known"
    return f"~{_usd(entry['cost_usd'])} interactive, ~{_usd(entry['batch_cost_usd'])} in Batch Mode"


def _usd(usd: float) -> str:
    """Dollars and cents; a figure under a dollar to the hundredth of a cent."""
    return f"${usd:,.2f}" if usd >= 1 or usd == 0 else f"${usd:,.4f}"


def _rates(price: dict[str, Any]) -> str:
    until = f", until {price['until']}" if price["until"] else ""
    return (
        f"${price['input']:g} in / ${price['output']:g} out; batch ${price['batch_input']:g} / "
        f"${price['batch_output']:g}{until}"
    )
