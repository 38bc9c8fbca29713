"""The small shared core every API surface stands on: built once per server from its options.

`Core` only holds the parts and says the order in which a generation passes them — auth and body
(transport.py), images (image_input.py), the money and the quotas (billing.py, quotas.py), the
answer (answering.py), the implicit cache (caching.py) and the explicit ones
(context_cache.py) — plus the counters (stats.py). The surfaces (generate.py, interactions.py,
files_api.py, batches.py, cached_contents.py) read their own wire format and
call `admit`, `answerer.answer`, `from_cache` and `bill` (Batch Mode: the answerer and the bill
at the batch price, outside the quotas and the implicit cache).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, date, datetime
from typing import Any

from aiohttp import web

from pipeline.localserver import transport
from pipeline.localserver.answering import Answerer, ModelOutput, Prompted
from pipeline.localserver.billing import Credits, Usage
from pipeline.localserver.caching import ImplicitCache, Prefix
from pipeline.localserver.context_cache import ContextCaches
from pipeline.localserver.faults import Faults, Replay
from pipeline.localserver.files import FileStore
from pipeline.localserver.image_input import ImageReader
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.quotas import Quotas
from pipeline.localserver.simulation import Simulation
from pipeline.localserver.stats import Stats
from pipeline.models import ModelTable

# v1alpha: where per-part media resolution was first documented (docs/gemini-api.md § Image tokens)
API_VERSIONS = ("v1", "v1beta", "v1alpha")
BATCH_CREATE = ":batchGenerateContent"  # the method whose body is Batch Mode's inline requests


class AnswerLog:
    """One JSON line per answer about to be delivered (and so paid for): when, which images.
    Tests and benchmarks audit a client with it: was every paid answer kept, none bought twice?"""

    def __init__(self, path: str | None, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._file = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115

    def write(self, prompted: Prompted) -> None:
        if self._file is None:
            return
        shas = [image.sha256 for image in prompted.images]
        self._file.write(json.dumps({"t": self.clock(), "model": prompted.model, "sha256": shas}))
        self._file.write("\n")
        self._file.flush()  # the server outlives the client it audits: no fsync needed

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _stated(table: ModelTable, targets: dict[str, str]) -> ModelTable:
    """The model table with the aliases --alias-target states pointing where it says, so the
    double answers such an alias as the model its models.get names."""
    if not targets:
        return table
    return dataclasses.replace(table, aliases={**table.aliases, **targets})


class Core:
    """The parts of one server, shared by its surfaces."""

    def __init__(
        self, options: ServerOptions, clock: Callable[[], float], models: ModelTable
    ) -> None:
        self.options = options
        self.clock = clock
        # what each model takes, bills and answers (model_checks.py), with the aliases
        # --alias-target states
        self.models = _stated(models, dict(options.alias_target))
        self.stats = Stats()
        self.files = FileStore(clock, options.file_processing_seconds, options.file_ttl_seconds)
        self.images = ImageReader(self.files)
        self.quotas = Quotas(
            options.rpm, options.tpm, options.rpd, clock, options.quota_window_seconds
        )
        self.credits = Credits(options.credit_budget_usd, models)
        self.cache = ImplicitCache(options.implicit_cache, clock)
        self.contexts = ContextCaches(clock)  # explicit caches (cachedContents)
        self.faults = Faults(
            options.fault_rate, options.seed, options.latency_ms, options.fault_kinds
        )
        self.replay = Replay(options.replay) if options.replay else None
        simulation = Simulation(options.seed) if options.simulate == "settings" else None
        self.answerer = Answerer(
            self.images, self.faults, self.replay, options.hang_seconds, simulation
        )
        self.answer_log = AnswerLog(options.answer_log, clock)

    def today(self) -> date:
        """The server's day (UTC, as `models.Status` counts shut-down days), on its clock."""
        return datetime.fromtimestamp(self.clock(), UTC).date()

    def check_key(self, request: web.Request) -> None:
        transport.check_key(request, self.options.api_key)

    async def body(self, request: web.Request, *, required: bool = True) -> dict[str, Any]:
        return await transport.read_json(request, self.body_limit(request), required=required)

    def body_limit(self, request: web.Request) -> int:
        """The interactive limit (100 MB live since 2026-01), or, for a batch create, Batch
        Mode's own (20 MB: its inline requests), never above the interactive one
        (docs/gemini-api.md § Sending images; rule body.too-large)."""
        if request.path.endswith(BATCH_CREATE):
            return min(self.options.batch_inline_limit_bytes, self.options.inline_limit_bytes)
        return self.options.inline_limit_bytes

    def admit(self, model: str, prompt: Usage) -> None:
        """A generation may start: credits left (402 otherwise), then the quotas (429)."""
        self.credits.check()
        self.quotas.admit(model, prompt.prompt_tokens)

    async def answer(self, prompted: Prompted, prompt: Usage) -> ModelOutput:
        self.admit(prompted.model, prompt)
        outcome = await self.answerer.answer(prompted)
        self.answer_log.write(prompted)
        return outcome

    def from_cache(self, model: str, prefix: Prefix, prompt: Usage) -> Usage:
        """`prompt` of an answered request (or hop), with the tokens the implicit cache served."""
        return replace(prompt, cached_tokens=self.cache.served(model, prefix))

    def bill(self, model: str, usage: Usage, task: str | None, images: int) -> None:
        """One answer (or hop) delivered: counted, and paid for from the credits."""
        self.stats.bill(usage, task, images)
        self.credits.charge(model, usage)

    def snapshot(self) -> dict[str, Any]:
        """What GET /local/stats returns (surfaces add their own counters)."""
        return {
            **self.stats.snapshot(),
            "uploads": {
                "started": self.files.uploads_started,
                "completed": self.files.uploads_completed,
                "bytes": self.files.bytes_received,
            },
            "files": {
                "stored": self.files.count,
                "deleted": self.files.deleted,
                "expired": self.files.expired,
            },
            "quota_rejections": dict(self.quotas.rejections),
            "credits": {
                "budget_usd": self.credits.budget_usd,
                "spent_usd": round(self.credits.spent_usd, 9),
                "refused": self.credits.refused,
            },
            "implicit_cache_hits": self.cache.hits,
            "faults": dict(self.faults.injected),
            "replayed": self.replay.served if self.replay else 0,
        }
