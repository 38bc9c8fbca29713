"""Explicit context caching of what every request of a run repeats: its system instruction and
reference images, kept in one cached content (pipeline/gemini/caches.py) for the run.

    undecided ─pays (auto) or "on"─► create ─► cached: requests name it, renewed at half its TTL
        │                                          └─ gone (404/403, renewal lost): sent in full
        └─ never pays, too small, "off" ─► uncached: requests carry everything, as before

- **What**: the system instruction, then each reference image after its caption, in the order
  a request sends them first; a request naming the cache (`cachedContent`) sends only the
  unit's images and the prompt. The answer is the same request to the model, so an image's key
  does not change (the key hashes the task's request and the references' bytes, never how they
  travel: config.key_suffixes).
- **When** (`[api] context_cache`): "off" never; "on" whenever the repeated part reaches the
  model's minimum (the model table's `cache_min_tokens`); "auto" (the default) also only when it
  saves money: the create, its storage for the run's expected hours (`run_hours`) and the
  cached rate, against those tokens at the input rate in every request left to send
  (`cost.cache_bill`; a model whose storage price the table lacks is not cached). The requests
  left are those the walk has found and not yet begun, so the decision is taken again at each
  request until it pays or the walk has ended: a short run is never cached. Only
  generateContent takes a cached content (Interactions has implicit caching only), and only
  the interactive single-process engine caches (Batch Mode and Ray send in full).
- **Lifetime**: created once (under a lock: the first wave waits for it) with `[api]
  context_cache_ttl`, renewed by a task on the event loop every half TTL, deleted when the run
  ends — finished, failed or stopped by Ctrl-C. A killed run cannot delete it: it expires one
  TTL after its last renewal, its storage billed until then.
- **Billing**: rows bill `cachedContentTokenCount` at the cached rate (cost.py, as any cached
  tokens); the storage (tokens x hours stored x `cache_storage`) is in the run summary's
  `context_cache`, not in the rows. The spending caps (spend.py) count the create and the
  storage: a cache is made only while they leave room for it and one TTL of storage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pipeline.config import Config
from pipeline.cost import CacheBill, cache_bill, create_cost, storage_cost
from pipeline.gemini import GeminiClient, GeminiError
from pipeline.gemini.caches import CachedContent, create_body
from pipeline.gemini.types import GenerateRequest
from pipeline.inputs.references import ReferenceParts
from pipeline.run.costing import Costing
from pipeline.run.spend import Spend

log = logging.getLogger(__name__)

# A vision request's typical time in flight when no [limits] rpm paces the run (the local
# server's and the live service's answers take 2-6 s): an assumption, used only to guess how
# long a cache would be stored.
SECONDS_A_REQUEST = 4.0
SECONDS_AN_HOUR = 3600.0
# The delete at the end is a cleanup: on a dead network it must not hold a stopping run for
# `[api] timeout` (the cache then expires by its TTL).
DELETE_SECONDS = 10.0
# After a failed renewal the next try comes sooner than half a TTL, while the cache still lives.
RETRY_FRACTION = 8
Sleep = Callable[[float], Awaitable[None]]


def run_hours(config: Config, requests: int) -> float:
    """How long a cache serving `requests` requests is stored: the time they take at the
    configured RPM, or at `concurrency` requests each SECONDS_A_REQUEST long, and never less
    than one TTL (a cache is kept that long after its last renewal)."""
    limits = config.limits
    seconds = requests * SECONDS_A_REQUEST / limits.concurrency
    if limits.rpm:
        seconds = max(seconds, requests * 60.0 / limits.rpm)
    return max(seconds, config.api.context_cache_ttl) / SECONDS_AN_HOUR


def cache_estimate(config: Config, costing: Costing, requests: int) -> CacheBill | None:
    """What caching the repeated part of `requests` requests would cost against sending it in
    full (`pipeline estimate`); None when it cannot be cached (`cacheable`) or priced."""
    price = config.task.spec.price()
    if price is None or cacheable(config, costing) is not None:
        return None
    return cache_bill(price, costing.cacheable_tokens, requests, run_hours(config, requests))


def cacheable(config: Config, costing: Costing) -> str | None:
    """Why the run's repeated part cannot be cached, or None when it can."""
    minimum = config.task.spec.cache_min_tokens
    if config.api.context_cache == "off":
        return "[api] context_cache is off"
    if config.api.flavor != "generateContent" or config.api.mode != "interactive":
        return "cached contents serve interactive generateContent requests only"
    if config.engine.kind != "single":  # one cache per worker would be paid for many times
        return "the Ray engine sends every request in full"
    if config.api.backend == "vertex":  # Vertex's caches are a project resource not built here
        return "context caches are made on the Developer API only (not on Vertex AI yet)"
    if minimum is None:
        return f"{config.task.spec.name} has no context caching"
    if costing.cacheable_tokens < minimum:
        return f"{costing.cacheable_tokens:,} repeated tokens, under the minimum of {minimum:,}"
    if costing.resolution is not None:  # a cache has no generationConfig to apply it to
        return "a request-wide media resolution would not reach the cached images"
    return None


def pays(config: Config, costing: Costing, requests: int) -> bool:
    """Whether caching for `requests` requests saves money (`context_cache = "auto"`)."""
    bill = cache_estimate(config, costing, requests)
    return bill is not None and bill.saves


class ContextCache:
    """The run's cached content (see the module docstring); one per run, shared by its calls.

    `todo()` is how many units the walk has found to do so far, and `walked()` whether it has
    ended (set by the engine; without them a run is never cached under "auto"). `sleep` waits
    between renewals: the event loop's, or a test's that moves the server's clock instead."""

    def __init__(
        self,
        config: Config,
        client: GeminiClient,
        costing: Costing,
        request: GenerateRequest,
        references: ReferenceParts,
        *,
        spend: Spend | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.config, self.client, self.costing = config, client, costing
        self.spend = spend or Spend(config)  # uncapped when the run keeps no count
        self.request, self.references, self.sleep = request, references, sleep
        self.todo: Callable[[], int] = lambda: 0
        self.walked: Callable[[], bool] = lambda: True
        self.begun = 0  # units whose request was made (a retry is not a new one)
        self.why = cacheable(config, costing)  # why it is not (or no longer) cached
        # the summary says what became of a cacheable part, or why "on" could not cache
        self.worth = self.why is None or config.api.context_cache == "on"
        self.state = "undecided" if self.why is None else "uncached"
        self.cache: CachedContent | None = None
        self.renewed = 0
        self.deleted = False
        self._created_at = 0.0
        self._stored_seconds = 0.0
        self._lock = asyncio.Lock()
        self._renewer: asyncio.Task[None] | None = None

    async def name(self, first: bool) -> str | None:
        """The cached content a request about a new unit (`first`) or a retry names now, made
        first when it starts to pay; None: the request carries everything."""
        self.begun += first
        if self.state == "undecided":
            async with self._lock:
                if self.state == "undecided" and self._decided():
                    await self._create()
        return self.cache.name if self.state == "cached" and self.cache else None

    def _decided(self) -> bool:
        """Whether to create now; an "auto" run that cannot pay once the walk has ended is
        settled uncached."""
        if self.config.api.context_cache == "on":
            return True
        left = max(self.todo() - self.begun + 1, 0)  # this request and those not yet begun
        if pays(self.config, self.costing, left):
            return True
        if self.walked():
            self.state, self.why = "uncached", f"{left:,} request(s) left: caching would not pay"
        return False

    async def _create(self) -> None:
        if not self._affordable():
            return
        parts = await self.references.parts()
        body = create_body(
            self.config.api.model,
            system=self.request.system_instruction,
            images=parts,
            ttl_seconds=self.config.api.context_cache_ttl,
            display_name="pipeline run",
        )
        try:
            self.cache = await self.client.caches.create(body)
        except GeminiError as exc:  # the run goes on, sending everything in full
            self.state, self.why = "uncached", f"create refused: {exc}"
            log.warning("context cache not created, requests are sent in full: %s", exc)
            return
        self.state, self._created_at = "cached", time.monotonic()
        self.spend.add(self._create_usd())
        self._renewer = asyncio.ensure_future(self._renew())

    def _affordable(self) -> bool:
        """Whether the spending caps leave room for the create and one TTL of storage; else
        the run goes on uncached (the caps then bound what the requests spend)."""
        price, tokens = self.config.task.spec.price(), self.costing.cacheable_tokens
        ttl_hours = self.config.api.context_cache_ttl / SECONDS_AN_HOUR
        usd = self._create_usd() + (storage_cost(price, tokens, ttl_hours) if price else 0.0)
        refused = self.spend.refusal(usd)
        if refused is not None:
            self.state, self.why = "uncached", f"no room under the spending cap: {refused.reason}"
        return refused is None

    def _create_usd(self) -> float:
        price = self.config.task.spec.price()
        return create_cost(price, self.costing.cacheable_tokens) if price else 0.0

    async def _renew(self) -> None:
        """Move the expiry a TTL ahead every half TTL, while the run lasts (a failed renewal
        is tried again after an eighth of it)."""
        ttl = self.config.api.context_cache_ttl
        delay = ttl / 2
        while self.state == "cached" and self.cache is not None:
            await self.sleep(delay)
            try:
                self.cache = await self.client.caches.renew(self.cache.name, ttl)
            except GeminiError as exc:
                if gone(exc):
                    self._lose(f"renewal found it gone: {exc}")
                    return
                log.warning("context cache renewal failed, tried again soon: %s", exc)
                delay = ttl / RETRY_FRACTION
                continue
            self.renewed, delay = self.renewed + 1, ttl / 2

    def lost(self, exc: GeminiError) -> bool:
        """Whether a request failed because the cache it named is gone (also when the renewal
        found it so first); the run then sends everything in full, the attempt made again at
        once."""
        if self.cache is None or not gone(exc) or "cachedcontent" not in exc.message.lower():
            return False
        self._lose(f"a request found it gone: {exc}")
        return True

    def _lose(self, why: str) -> None:
        if self.state == "cached":
            self.state, self.why = "gone", why
            self._stored_seconds = time.monotonic() - self._created_at
            self.spend.add(self._storage_usd() or 0.0)
            log.warning("context cache lost, requests are sent in full: %s", why)

    async def close(self) -> None:
        """Stop renewing and delete the cache (the run's end, whatever ended it); idempotent.
        A delete that fails leaves it to expire one TTL after its last renewal."""
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        if self.state != "cached" or self.cache is None:
            return
        self._stored_seconds = time.monotonic() - self._created_at
        self.state = "closed"
        self.spend.add(self._storage_usd() or 0.0)
        try:
            await self.client.caches.delete(self.cache.name, timeout=DELETE_SECONDS)
        except GeminiError as exc:
            log.warning(
                "context cache %s not deleted (it expires by its TTL): %s", self.cache.name, exc
            )
            return
        self.deleted = True

    def summary(self) -> dict[str, Any] | None:
        """The run summary's `context_cache`: the cache and its storage, or why a repeated
        part that could be cached was not; None when there was nothing to cache."""
        if self.cache is None:
            return {"name": None, "why": self.why} if self.worth and self.why else None
        storage = self._storage_usd()
        return {
            "name": self.cache.name,
            "tokens": self.cache.total_tokens,
            "renewed": self.renewed,
            "deleted": self.deleted,
            "stored_hours": round(self._stored_seconds / SECONDS_AN_HOUR, 6),
            # a short run stores it for seconds: micro-dollars would round to 0
            "storage_usd": None if storage is None else round(storage, 9),
            "lost": self.why if self.state == "gone" else None,
        }

    def _storage_usd(self) -> float | None:
        """The storage of the cache so far; None without a price."""
        price = self.config.task.spec.price()
        if price is None or self.cache is None:
            return None
        hours = self._stored_seconds / SECONDS_AN_HOUR
        return storage_cost(price, self.cache.total_tokens, hours)


def gone(exc: GeminiError) -> bool:
    """A cached content the service no longer has: 404, or the 403 it may answer instead."""
    return exc.code in (403, 404)


def estimate_report(config: Config, costing: Costing, requests: int) -> dict[str, Any] | None:
    """`pipeline estimate`'s view of the cache: the repeated part's cost sent in full and
    cached, and whether a run would cache it; None when there is nothing to cache."""
    why = cacheable(config, costing)
    bill = cache_estimate(config, costing, requests)
    if bill is None:
        return {"cached": False, "why": why} if costing.cacheable_tokens and why else None
    would = config.api.context_cache == "on" or bill.saves
    return {
        "cached": would,
        "why": None if would else "caching would cost more than it saves",
        "tokens": bill.tokens,
        "hours": round(bill.hours, 3),
        "without_usd": round(bill.without_usd, 6),
        "with_usd": round(bill.with_usd, 6),
        "storage_usd": round(bill.storage_usd, 6),
    }


def estimate_lines(report: dict[str, Any] | None, run_usd: float | None) -> list[str]:
    """The estimate's lines about the cache (none when there is nothing to cache); `run_usd`:
    the run's interactive cost with everything sent in full."""
    if report is None:
        return []
    if "with_usd" not in report:
        return [f"context cache: none ({report['why']})"]
    verdict = "cached" if report["cached"] else f"not cached: {report['why']}"
    lines = [
        f"context cache ({verdict}): the {report['tokens']:,} tokens every request repeats cost "
        f"~${report['without_usd']:,.4f} sent in full, ~${report['with_usd']:,.4f} cached "
        f"(storage ~${report['storage_usd']:,.4f} for ~{report['hours'] * 60:,.0f} min)"
    ]
    if run_usd is not None:
        cached = run_usd - report["without_usd"] + report["with_usd"]
        lines.append(f"  the run interactive: ~${run_usd:,.4f} in full, ~${cached:,.4f} cached")
    return lines
