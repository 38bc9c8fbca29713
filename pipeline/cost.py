"""What the answers cost: billed tokens at the model table's price of the day they were bought.

A row bought in Batch Mode says so (`input_mode` "batch") and is billed at the table's batch
price (half the interactive one by default); every other row with billed tokens at the
interactive price. Output includes thinking, as the service bills it. The prompt tokens an
implicit cache served (`cached_tokens`, a part of `prompt_tokens`) cost the cached rate, the rest
the input rate. A request whose prompt passes its price's `long_above` (the Pro models' "prompts
longer than 200k tokens") is billed wholly at the long tier: the tier is each request's own, so
rows are summed by tier as well as by model, mode and day (sums of one tier are linear). Rows
copied from another path carry no tokens and cost nothing. A model the table gives no price is
counted in `unpriced_rows` instead of being guessed.

A cached content (explicit context caching) adds what the rows do not hold: its storage, tokens
x hours x the table's `cache_storage` rate (`storage_cost`); `cache_bill` weighs a run's
repeated part sent in full against it served from a cache.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.models import Model, ModelTable, Price, default_table, lookup

BATCH_MODE = "batch"  # the `input_mode` of a row answered in Batch Mode
NO_TIER = 2**62  # the threshold of a price without a long-prompt tier: no prompt passes it
# Output tokens (answer + thought: the service bills both as output) of one image's answer when
# the output has no history to learn from (a history wins: `pipeline estimate` uses this
# output's own mean a row, per task and model). `pipeline estimate`, `run --plan` and the
# spending caps (pipeline/run/spend.py) all weigh an answer by `expected_output`: one table.
# Measured (2026-12-06) by running each task's default prompt over the 10 bundled samples
# (data/samples, ~3 shapes an image) against the local server, mean billed output a row:
# detect 39.0, segment 614.7 (PNG masks), point 32.3, caption 23.7, classify 2.6, custom 12.6
# (configs/custom.toml's prompt), on gemini-2.5-flash, -flash-lite and 3-flash-preview alike
# (none of them thinks at the lowest setting the tasks send). The seeds' examples bill no
# usage; the real segment run (~550 an image) agrees with the segment figure, where the
# old flat guess (2,500) made that estimate 3.4x the bill. `scripts/bench.py estimate-vs-billed`
# re-measures the estimate against the bill (docs/benchmarks.md).
OUTPUT_PRIOR = {
    "detect": 40,
    "segment": 615,
    "point": 32,
    "caption": 24,
    "classify": 3,
    "custom": 13,
}
# Models that answer masks as polygons (3.6+ Flash: `segmentation = "polygon"` in the table)
# bill far less for them: 3.8 Flash's answers were 136 tokens an image (272 with thought).
POLYGON_SEGMENT = 136
PER_IMAGE_OUTPUT = ("detect", "segment", "point")  # a group's answer lists each image's objects


def row_cost(row: dict[str, Any], table: ModelTable | None = None) -> float | None:
    """USD of one row's billed tokens; 0 without any, None when its model has no price."""
    prompt = row.get("prompt_tokens")
    if prompt is None:
        return 0.0
    output = (row.get("output_tokens") or 0) + (row.get("thoughts_tokens") or 0)
    when = row.get("completed_at")
    day = when.date() if isinstance(when, datetime) else None
    price = price_of(row.get("model") or "", day, table)
    if price is None:
        return None
    cached = row.get("cached_tokens") or 0
    return price.cost(
        prompt, output, cached_tokens=cached, batch=row.get("input_mode") == BATCH_MODE
    )


def price_of(model: str, day: date | None, table: ModelTable | None = None) -> Price | None:
    """The price of `model` on `day` (today when None); None for a model the table lacks."""
    known = (table or default_table()).is_known(model) if model else False
    return lookup(model, table).price(day) if known else None


def expected_output(kind: str, images: int, model: Model | None = None) -> int:
    """Output tokens (answer and thought) a request about `images` images is expected to be
    billed with no history, on `model` (its table entry: the mask shape it answers and how
    little it can think; None: a model that does not think, PNG masks)."""
    answer = OUTPUT_PRIOR[kind]
    if kind == "segment" and model is not None and model.segmentation == "polygon":
        answer = POLYGON_SEGMENT
    answer *= images if kind in PER_IMAGE_OUTPUT else 1
    return answer + _thought(answer, model)


def _thought(answer: int, model: Model | None) -> int:
    """Thought tokens at the lowest thinking a task sends (pipeline/tasks/generation.py): none
    where the model can turn it off (budget 0, level "minimal"), else about as much as the
    answer, held to the budget (2.5 Pro's least is 128). Measured on the local server: 3.1 Pro
    and 3.8 Flash (lowest level "low") billed 2.0x the answers of the models that do not think
    (detect 78 against 39); the real service's thought is the model's own, so this is a prior."""
    if model is None:
        return 0
    budget, level = model.thinking.lowest()
    if budget == 0 or level == "minimal" or model.thinking.control == "none":
        return 0
    return min(answer, budget) if budget else answer


def tier_of(price: Price, long: bool) -> Price:
    """The rates of a request of the long-prompt tier (`long`) or of the base one."""
    return price.long if long and price.long is not None else price


def requests_cost(
    price: Price, prompts: Iterable[float], outputs: Iterable[float], *, batch: bool
) -> float:
    """USD of requests (each one's prompt and output tokens, none cached: what an estimate
    knows), each at its own prompt-size tier: summed by tier, then priced."""
    sums: dict[bool, list[float]] = {}
    for prompt, output in zip(prompts, outputs, strict=True):
        tier = sums.setdefault(price.tier(prompt) is not price, [0.0, 0.0])
        tier[0] += prompt
        tier[1] += output
    return sum(
        tier_of(price, long).flat_cost(prompt, output, 0, batch=batch)
        for long, (prompt, output) in sums.items()
    )


def table_cost(rows: pa.Table, table: ModelTable | None = None) -> dict[str, Any]:
    """The bill of every row of `rows` (columns model, input_mode, completed_at and the token
    counts; `cached_tokens` may be absent: none cached), by mode:
    {"usd", "interactive_usd", "batch_usd", "unpriced_rows"}."""
    return bill_of(billed_groups(rows, table), table)


class BillSums:
    """The billed tokens of rows seen batch by batch, summed by model, mode, day and tier (the
    groups `table_cost` prices): a few entries, however many rows, so `pipeline status` prices
    every committed row without holding them. `bill()` equals `table_cost` of all the rows."""

    def __init__(self, table: ModelTable | None = None) -> None:
        self.table = table
        self.sums: dict[tuple[Any, ...], list[int]] = {}

    def add(self, groups: list[dict[str, Any]]) -> None:
        """Fold `billed_groups` of some rows in."""
        for group in groups:
            key = (group["model"], group["batch"], group["day"], group["long"])
            sums = self.sums.setdefault(key, [0, 0, 0, 0])
            for at, name in enumerate(_SUMS):
                sums[at] += group[name]

    def bill(self) -> dict[str, Any]:
        groups = [
            {
                "model": k[0],
                "batch": k[1],
                "day": k[2],
                "long": k[3],
                **dict(zip(_SUMS, v, strict=True)),
            }
            for k, v in self.sums.items()
        ]
        return bill_of(groups, self.table)


_SUMS = ("prompt_sum", "cached_sum", "output_sum", "prompt_count")


def bill_of(groups: Iterable[dict[str, Any]], table: ModelTable | None) -> dict[str, Any]:
    """The bill of billed-token groups (`billed_groups`), by mode (see `table_cost`)."""
    bill = {"usd": 0.0, "interactive_usd": 0.0, "batch_usd": 0.0, "unpriced_rows": 0}
    for group in groups:
        price = price_of(group["model"], group["day"], table)
        if price is None:
            bill["unpriced_rows"] += group["prompt_count"]
            continue
        batch = group["batch"]
        usd = tier_of(price, group["long"]).flat_cost(
            group["prompt_sum"], group["output_sum"], group["cached_sum"], batch=batch
        )
        bill["batch_usd" if batch else "interactive_usd"] += usd
        bill["usd"] += usd
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in bill.items()}


def billed_groups(rows: pa.Table, table: ModelTable | None) -> list[dict[str, Any]]:
    """Billed tokens summed by model, mode, day (a row without a time: today's price) and tier."""
    billed = rows.filter(pc.is_valid(rows.column("prompt_tokens")))
    prompt = pc.cast(billed.column("prompt_tokens"), pa.int64())
    keyed = pa.table(
        {
            "model": pc.fill_null(billed.column("model"), ""),
            "batch": pc.fill_null(pc.equal(billed.column("input_mode"), BATCH_MODE), False),
            "day": pc.fill_null(
                pc.cast(billed.column("completed_at"), pa.date32()), datetime.now(UTC).date()
            ),
            "prompt": prompt,
            "cached": _cached(billed, prompt),
            "output": pc.cast(
                pc.add(
                    pc.fill_null(billed.column("output_tokens"), 0),
                    pc.fill_null(billed.column("thoughts_tokens"), 0),
                ),
                pa.int64(),
            ),
        }
    )
    keyed = _with_tier(keyed, table)
    sums = [("prompt", "sum"), ("cached", "sum"), ("output", "sum"), ("prompt", "count")]
    return keyed.group_by(["model", "batch", "day", "long"]).aggregate(sums).to_pylist()


def _cached(billed: pa.Table, prompt: pa.ChunkedArray) -> pa.ChunkedArray:
    """Each row's cached tokens, held to [0, its prompt] as Price.flat_cost holds one request's
    (a part written before the column reads it as null: none cached)."""
    if "cached_tokens" not in billed.column_names:
        return pc.multiply(prompt, 0)
    cached = pc.cast(pc.fill_null(billed.column("cached_tokens"), 0), pa.int64())
    return pc.min_element_wise(pc.max_element_wise(cached, 0), prompt)


def _with_tier(keyed: pa.Table, table: ModelTable | None) -> pa.Table:
    """`keyed` with `long`: whether each row's prompt passes its own price's long-prompt
    threshold. The thresholds are looked up once per (model, day) and joined onto the rows."""
    pairs = keyed.group_by(["model", "day"]).aggregate([]).to_pylist()
    above = [_threshold(price_of(p["model"], p["day"], table)) for p in pairs]
    thresholds = pa.table(
        {
            "model": pa.array([p["model"] for p in pairs], pa.string()),
            "day": pa.array([p["day"] for p in pairs], pa.date32()),
            "above": pa.array(above, pa.int64()),
        }
    )
    joined = keyed.join(thresholds, keys=["model", "day"])  # rows reordered: only summed next
    return joined.append_column("long", pc.greater(joined.column("prompt"), joined["above"]))


def _threshold(price: Price | None) -> int:
    if price is None or price.long is None or price.long_above is None:
        return NO_TIER
    return price.long_above


# ------------------------------------------------------------------------- context caching


@dataclass(frozen=True, slots=True)
class CacheBill:
    """What `requests` requests pay for the `tokens` every one of them repeats, sent in full
    (`without_usd`) or served from a cached content stored `hours` (`with_usd`: the create,
    the storage and the cached rate)."""

    requests: int
    tokens: int
    hours: float
    without_usd: float
    with_usd: float
    storage_usd: float

    @property
    def saves(self) -> bool:
        return self.with_usd < self.without_usd


def cache_bill(price: Price, tokens: int, requests: int, hours: float) -> CacheBill | None:
    """The two bills of the repeated part; None when the table lacks the cached rate or the
    storage price (a saving that cannot be shown). The create is counted as its tokens once at
    the input rate: no page says what a create costs, and counting it keeps a run that cannot
    repay it uncached."""
    if price.cached_input is None or price.cache_storage is None:
        return None
    storage = storage_cost(price, tokens, hours)
    served = requests * tokens * price.cached_rate() / 1e6
    with_usd = create_cost(price, tokens) + served + storage
    return CacheBill(
        requests, tokens, hours, requests * tokens * price.input / 1e6, with_usd, storage
    )


def create_cost(price: Price, tokens: int) -> float:
    """USD assumed for creating a cached content of `tokens` (see `cache_bill`)."""
    return tokens * price.input / 1e6


def storage_cost(price: Price, tokens: int, hours: float) -> float:
    """USD of `tokens` stored in a cached content for `hours` (0 without a storage price)."""
    return tokens * hours * (price.cache_storage or 0.0) / 1e6
