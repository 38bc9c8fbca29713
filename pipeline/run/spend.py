"""Spending caps: `[limits] max_usd` (one run) and `[limits] max_usd_per_day` (one output's quota
day, counted in its `.state.sqlite` across runs, reset at midnight Pacific as `rpd` is).

A request is admitted only if what was billed so far, plus what is in flight at its estimate,
plus its own estimate stays within each cap; otherwise the run stops (drains, exit 3) before it
is sent, so the bill passes a cap by at most the error of the estimates in flight. An estimate
is the request's estimated input tokens and the task's expected output tokens on the model
(`cost.expected_output`: the priors `pipeline estimate` uses) at the model table's price; when
the answer comes its billed tokens replace it. A call abandoned in flight may be billed: it
keeps its input's estimate, as the summary's `abandoned_est_usd` does.

Batch Mode is checked before each job is created, at the job's estimate at the batch price; a
created job counts as spent at that estimate (its results are billed later, often in another
run, so the estimate stands for them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipeline import exits
from pipeline.config import Config
from pipeline.cost import expected_output, price_of
from pipeline.gemini.types import Usage
from pipeline.models import Price
from pipeline.run.failures import Action, Verdict

RAISE_CAP = "rerun (with a higher cap) to go on"
NEXT_DAY = "rerun after midnight Pacific (the next quota day), or with a higher cap, to go on"


@dataclass(frozen=True, slots=True)
class Caps:
    """The configured caps, in USD (None: no cap)."""

    run: float | None = None
    day: float | None = None

    @classmethod
    def of(cls, config: Config) -> Caps:
        return cls(config.limits.max_usd, config.limits.max_usd_per_day)

    @property
    def any(self) -> bool:
        return self.run is not None or self.day is not None


class Spend:
    """What a run has spent and has in flight, held against its caps (see the module docstring).

    `save(usd)` adds billed USD to today's stored spend of the output (the per-day cap's count),
    every SAVE_EVERY answers and at the end (`flush`), as the day's request count is saved: a
    write to `.state.sqlite` per answer cost the event loop ~0.15 ms an image (the A/B in
    docs/benchmarks.md), and a kill -9 under-counts at most that many answers' spend.
    """

    SAVE_EVERY = 100

    def __init__(
        self,
        config: Config,
        *,
        spent_today: float = 0.0,
        save: Callable[[float], None] = lambda usd: None,
    ) -> None:
        self.caps = Caps.of(config)
        self.kind = config.task.kind
        self.max_output = config.task.max_output_tokens
        self.model = config.api.model
        self.spec = config.task.spec
        self.price: Price | None = price_of(config.api.model, None)
        self.run_usd = 0.0  # billed (and abandoned at their estimate) in this run
        self.day_usd = spent_today  # the same, today, in this output: earlier runs too
        self.in_flight = 0.0
        self._save = save
        self._unsaved, self._unsaved_answers = 0.0, 0

    def estimate(self, input_tokens: float, images: int, *, batch: bool = False) -> float:
        """USD one request is expected to cost: its input and the task's expected answer (at
        the batch price for a Batch Mode job's request)."""
        if self.price is None:
            return 0.0
        output = expected_output(self.kind, images, self.spec)
        if self.max_output is not None:
            output = min(output, self.max_output)
        return self.price.cost(input_tokens, output, batch=batch)

    def billed(self, usage: Usage) -> float:
        """USD the service bills for an answer of `usage` (output includes thinking)."""
        if self.price is None:
            return 0.0
        output = usage.output_tokens + usage.thoughts_tokens
        cached = usage.cached_tokens
        return self.price.cost(usage.prompt_tokens, output, cached_tokens=cached)

    def input_only(self, input_tokens: float) -> float:
        """USD of a request's input alone: what an abandoned call may be billed (its output is
        unknown); 0 for a model without a price."""
        return self.price.cost(input_tokens, 0) if self.price else 0.0

    def reserve(self, usd: float) -> Verdict | None:
        """Admit a request estimated at `usd` (now in flight), or the verdict that stops the run
        because it would pass a cap."""
        refused = self.refusal(usd)
        if refused is None:
            self.in_flight += usd
        return refused

    def refusal(self, usd: float) -> Verdict | None:
        """Why spending `usd` more (besides what is in flight) would pass a cap, or None."""
        if self.caps.any and self.price is None:
            return _unpriced(self.model)
        pending = self.in_flight + usd
        run, day = self.caps.run, self.caps.day
        if run is not None and self.run_usd + pending > run:
            return _passes("the run's spend", self.run_usd + pending, "max_usd", run, RAISE_CAP)
        if day is not None and self.day_usd + pending > day:
            what = "today's spend in this output"
            return _passes(what, self.day_usd + pending, "max_usd_per_day", day, NEXT_DAY)
        return None

    def settle(self, estimated: float, spent: float) -> None:
        """A reserved request ended: `spent` (billed, or 0 when it was refused unanswered)
        replaces its estimate."""
        self.in_flight = max(0.0, self.in_flight - estimated)
        self.add(spent)

    def add(self, usd: float) -> None:
        if usd > 0:
            self.run_usd += usd
            self.day_usd += usd
            self._unsaved += usd
            self._unsaved_answers += 1
            if self._unsaved_answers >= self.SAVE_EVERY:
                self.flush()

    def flush(self) -> None:
        """Store the spend not stored yet (the end of a run, and every SAVE_EVERY answers)."""
        if self._unsaved > 0:
            self._save(self._unsaved)
        self._unsaved, self._unsaved_answers = 0.0, 0

    def summary(self) -> dict[str, float | None]:
        """Spend against the caps, for the run summary."""
        return {
            "spent_usd": round(self.run_usd, 6),
            "max_usd": self.caps.run,
            "spent_today_usd": round(self.day_usd, 6),
            "max_usd_per_day": self.caps.day,
        }


def cap_text(cap: float) -> str:
    """A cap as configured: 0.02, not 0.0200 (nor 2e-02)."""
    return f"{cap:,.10f}".rstrip("0").rstrip(".")


def _passes(what: str, total: float, key: str, cap: float, hint: str) -> Verdict:
    reason = f"{what} ${total:,.4f} would pass [limits] {key} = ${cap_text(cap)}"
    return Verdict(Action.RUN, reason, exits.STOPPED, hint)


def _unpriced(model: str) -> Verdict:
    """A cap cannot be kept without a price: a config to fix, not a run to resume."""
    reason = f"[limits] max_usd cannot be kept: the model table has no price for {model}"
    hint = "add the model's price to the table, or remove the cap"
    return Verdict(Action.RUN, reason, exits.USAGE, hint)
