"""The run summary: what one run saw, did and paid, written to `runs/<run id>.json`."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline import exits
from pipeline.output.parts import RUNS_DIR
from pipeline.output.stores import Store, open_store
from pipeline.run.identity import RunIdentity
from pipeline.run.spend import cap_text
from pipeline.run.stop import Stop

RESUME = "rerun the same command to resume"
_DEFAULT_HINTS = {
    exits.USAGE: "fix what it names (the config, the key, the endpoint), then run again: "
    "what is committed stays"
}


@dataclass
class RunSummary:
    run_id: str
    config: str
    settings_hash: str
    model: str
    task: str
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    finished_at: str = ""
    seen: int = 0
    skipped: int = 0
    ignored: int = 0  # files no [input] include pattern takes: passed over, no row
    rows: Counter[str] = field(default_factory=Counter)
    api_calls: int = 0
    retries: int = 0
    throttled: int = 0
    waited_for_limits_s: float = 0.0  # time the dispatch spent waiting for RPM/TPM capacity
    copied: int = 0
    uploads: int = 0
    uploads_reused: int = 0
    recovered: int = 0  # rows of a killed run's journal committed at the start
    unstorable: int = 0  # rows that could not be encoded, stored as error rows with their answer
    tokens: Counter[str] = field(default_factory=Counter)
    cost_usd: float = 0.0  # the billed tokens at the model table's price (batch rows: batch price)
    # Calls sent and abandoned before their answer (a deadline cut in flight, a second Ctrl-C):
    # the service may bill them; not in cost_usd, which bills rows. Their images are bought
    # again (a retry, or the next run). The cost is their estimated input tokens, priced.
    abandoned: int = 0
    abandoned_est_usd: float = 0.0
    # [limits] max_usd / max_usd_per_day: {"spent_usd", "max_usd", "spent_today_usd",
    # "max_usd_per_day"} (pipeline/run/spend.py); spent_usd counts abandoned calls' estimates
    spend: dict[str, float | None] | None = None
    batch: dict[str, Any] | None = None  # Batch Mode: jobs created, collected, ended, in flight
    # units skipped (in `skipped`) because a Batch Mode job in flight is buying them, in any mode
    in_batch_jobs: int = 0
    # explicit context caching (pipeline/run/context_cache.py): the cache's name, tokens,
    # renewals, whether it was deleted, hours stored and their storage_usd (not in cost_usd,
    # which bills rows); or {"name": None, "why": ...} when a cacheable part was not cached
    context_cache: dict[str, Any] | None = None
    # an alias's model: "gemini-flash-latest → gemini-3.8-flash (the service's answer)", or
    # "(the table's guess: <its source>)" (pipeline/run/preflight.py); None for a model id
    model_resolution: str | None = None
    stop_reason: str | None = None
    resume_hint: str | None = None
    exit_code: int = exits.OK

    @classmethod
    def of_run(cls, identity: RunIdentity, config_source: str) -> RunSummary:
        """The summary of a run starting now, under this identity."""
        return cls(
            identity.run_id, config_source, identity.key_suffix, identity.model, identity.task
        )

    def abandoned_line(self) -> str:
        """The printed line about abandoned calls."""
        return (
            f"{self.abandoned} call(s) sent, no answer: may be billed (abandoned in flight), "
            f"about ${self.abandoned_est_usd:,.4f} (estimated input tokens); not in the cost above"
        )

    def spend_line(self) -> str | None:
        """The printed line of spend against the caps, when one is set."""
        spend = self.spend or {}
        shown = (
            ("this run", "spent_usd", "max_usd"),
            ("today", "spent_today_usd", "max_usd_per_day"),
        )
        parts = [
            f"{what} ${spend[spent] or 0:,.4f} of {key} ${cap_text(cap)}"
            for what, spent, key in shown
            if (cap := spend.get(key)) is not None
        ]
        return f"spend: {'; '.join(parts)}" if parts else None

    def context_cache_line(self) -> str | None:
        """The printed line about the run's context cache, when it had one."""
        cache = self.context_cache or {}
        if not cache.get("name"):
            return None
        storage = cache["storage_usd"]
        cost = "unknown" if storage is None else f"${storage:,.6f}"
        left = "deleted" if cache["deleted"] else "left to expire by its TTL"
        return (
            f"context cache {cache['name']}: {cache['tokens']:,} tokens a request served cached; "
            f"storage {cost} for {cache['stored_hours'] * 3600:,.0f} s (not in the cost above); "
            f"{left}"
        )

    def to_json(self) -> str:
        # asdict() would rebuild the Counters from (key, value) pairs: copy them as plain dicts
        data = {k: dict(v) if isinstance(v, Counter) else v for k, v in vars(self).items()}
        return json.dumps(data, indent=2, sort_keys=True)

    def settle(self, stop: Stop) -> None:
        """The run is over: its end time, why it stopped (if it did) and its exit code. Every
        engine and `pipeline batch wait` finish their summary here."""
        self.finished_at = self.finished_at or datetime.now(UTC).isoformat()
        if stop.reason:
            self.stop_reason, self.resume_hint = stop.reason, stop.hint
            self.exit_code = stop.exit_code
        self._settle_exit_code()

    def _settle_exit_code(self) -> None:
        """3 when the run stopped early, else 1 when some row is not ok, else 0. A stop's hint
        by default: a 3 resumes as it is; a 2 (a wrong key, model, endpoint) would stop the
        same way again, so its hint says to fix it first."""
        if self.stop_reason:
            self.exit_code = self.exit_code if self.exit_code != exits.OK else exits.STOPPED
            self.resume_hint = self.resume_hint or _DEFAULT_HINTS.get(self.exit_code, RESUME)
        elif any(status != "ok" for status in self.rows):
            self.exit_code = exits.ROWS_NOT_OK
        else:
            self.exit_code = exits.OK

    def write(self, output_dir: str | Path | Store) -> str:
        """Write runs/<run id>.json whole or not at all (in a folder or an object store)."""
        return _write(output_dir, self.run_id, self.to_json().encode())


def write_report(output_dir: str | Path | Store, run_id: str, report: dict[str, Any]) -> str:
    """A summary of another command (reparse, compact) in runs/, written atomically."""
    return _write(output_dir, run_id, json.dumps(report, indent=2).encode())


def _write(output_dir: str | Path | Store, run_id: str, data: bytes) -> str:
    store = open_store(output_dir)
    name = f"{RUNS_DIR}/{run_id}.json"
    store.replace(name, data)
    return store.join(name)


def in_batch_jobs_hint(count: int, output_dir: str) -> str | None:
    """What an interactive run says of the files it skipped because a Batch Mode job in flight
    is buying them. No option buys them anyway: the job bills every request it was given, so
    that would pay twice; cancelling the job stops its bill and keeps what it answered."""
    if not count:
        return None
    return (
        f"{count:,} files are in a Batch Mode job in flight, not bought again: a later run (or "
        f"`pipeline batch wait {output_dir}`) collects them. To buy them interactively instead: "
        f"`pipeline batch cancel {output_dir}`, then `pipeline batch wait {output_dir}` (collects "
        "what the job had answered, billed already), then run again"
    )
