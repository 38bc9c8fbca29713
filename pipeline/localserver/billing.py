"""What a request costs: its input tokens by the documented rules, and prepaid credits in USD.

Input tokens follow pipeline/gemini/tokens.py, the rules `pipeline estimate` uses, so estimates
and "billed" usage can be compared (2.x at HIGH: 256 + the pan-and-scan crops tokens.py assumes,
rule billing.pan-and-scan). Credits (`--credit-budget`, rule credits.depleted) are spent at the
model table's interactive price for the day (pipeline/models.py `Model.price`) by `Price.cost`,
the very bill pipeline/cost.py makes of a row: cached tokens (caching.py) at the cached rate, a
prompt over the long-prompt threshold wholly at the long tier (rule billing.long-prompt). A model
the table gives no price is charged the table's most expensive current price, so a budget never
lasts longer than it would on a priced model.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from pipeline.gemini.tokens import image_tokens, text_tokens
from pipeline.localserver import errors
from pipeline.localserver.answering import Prompted
from pipeline.models import ModelTable, Price, default_table


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens of one answer (one hop of an interaction): what usageMetadata / usage report."""

    text_tokens: int  # prompt text and system instruction
    image_tokens: int
    output_tokens: int = 0
    thoughts_tokens: int = 0
    cached_tokens: int = 0  # of the prompt's, served by the implicit cache (caching.py)

    @property
    def prompt_tokens(self) -> int:
        return self.text_tokens + self.image_tokens

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens + self.thoughts_tokens


def prompt_usage(prompted: Prompted) -> Usage:
    """Input tokens of a prompt (system instruction included): each image at its own
    resolution, else the request's."""
    texts = [*prompted.texts, prompted.ask.system]
    counted = [
        image_tokens(
            prompted.spec or prompted.model,
            i.image.width,
            i.image.height,
            i.resolution or prompted.media_resolution,
        )
        for i in prompted.images
    ]
    return Usage(sum(text_tokens(text) for text in texts), sum(counted))


class Credits:
    """A prepaid balance in USD; None: unlimited. Spent at `table`'s prices."""

    def __init__(self, budget_usd: float | None, table: ModelTable | None = None) -> None:
        self.table = table or default_table()
        self.budget_usd = budget_usd
        self.spent_usd = 0.0
        self.refused = 0

    def check(self) -> None:
        """Raise 402 once the balance is spent (the request is then not answered)."""
        if self.budget_usd is not None and self.spent_usd >= self.budget_usd:
            self.refused += 1
            raise errors.credits_depleted()

    def charge(self, model: str, usage: Usage, *, batch: bool = False) -> None:
        """`batch`: a Batch Mode line, billed at the table's batch price. Price.cost is the
        pipeline's own bill of a row (pipeline/cost.py): cached tokens at the cached rate, the
        tier by the prompt's size."""
        price = self.table.lookup(model).price() or _dearest_price(self.table)
        output = usage.output_tokens + usage.thoughts_tokens  # output includes thinking
        self.spent_usd += price.cost(
            usage.prompt_tokens, output, cached_tokens=usage.cached_tokens, batch=batch
        )


def _dearest_price(table: ModelTable) -> Price:
    today = datetime.now(UTC).date()
    prices = [p for p in (m.price(today) for m in table.models) if p is not None]
    return max(prices, key=lambda p: p.input + p.output)
