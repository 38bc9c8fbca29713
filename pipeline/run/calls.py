"""One unit's API call: inline or upload, inside the limits, with retries, parsed off the loop.

A unit is one image or a group's images (pipeline/records.py). Its request is planned and made
by the run's `RequestMaker` (pipeline/run/requests.py), as for Batch Mode: the reference images
first, then the unit's — or, once the run's context cache pays, naming the cache that holds the
references and the system instruction (pipeline/run/context_cache.py; a request that finds it
gone is sent again at once in full, no retry counted); held before anything is sent to what
one request may be (images, input tokens, `[limits] tpm`, the inline limit), a unit over a limit
becoming an error row saying which, with no call.

The client never retries; this is where the policy lives. Each attempt:

1. waits for the rate limiter (RPM and TPM, paced), then is admitted by the spending caps
   (pipeline/run/spend.py) and a daily-quota slot, or stops the run unsent — every wait ends at
   once when the run stops;
2. sends with a deadline that follows the service: `Deadlines` keeps the latencies seen so far and
   gives `DEADLINE_MULTIPLE` x their p99, floored by `[api] min_timeout` and capped by
   `[api] timeout` (sent as `X-Server-Timeout`), so one hung request costs a few typical
   latencies, not two minutes. A request in flight follows the estimate as it tightens: its
   deadline is its send time + the current estimate, re-read whenever the estimate drops
   (`Deadlines.tightened`), so the first wave — sent with the full `[api] timeout` before
   `DEADLINE_SAMPLES` latencies were known — is cut like the later ones (80 images, 8% hanging:
   124 s before, see scripts/benchmarks/hanging.py). A call cut so is abandoned, not answered:
   the service may bill it, so it is counted with its estimated cost (`Counters.abandoned`),
   and retried as a timeout. No hedged second request: it would pay twice for the image;
   tightening pays at most the abandoned attempt;
3. on failure asks `failures.judge` whose fault it is: retry (full-jitter backoff, or the
   service's `retryDelay`, capped by `[api] max_retry_delay`), upload again (the unit's uploads,
   and the reference uploads the service no longer has), an error or blocked row, or stop the
   run.

A parse that may be heavy (a big answer, a big image) runs in a worker thread so the event loop
keeps serving the other calls (a slow parse on the loop once made their deadlines pass and had
them paid twice).
"""

from __future__ import annotations

import asyncio
import bisect
import math
import random
import time
from collections import deque
from collections.abc import Awaitable
from typing import Any, TypeVar

from pipeline.config import Config
from pipeline.gemini import GeminiClient, GeminiError
from pipeline.gemini.types import GenerateRequest, GenerateResponse
from pipeline.inputs.references import LoadedReference, ReferenceParts
from pipeline.records import Parsed, Unit
from pipeline.run.context_cache import ContextCache
from pipeline.run.failures import Action, Health, Verdict, daily_quota, judge, project_refused
from pipeline.run.limits import DayCounter, Limiter
from pipeline.run.offload import offload
from pipeline.run.requests import SMALL_BYTES, Plan, RequestMaker
from pipeline.run.rows import Outcome
from pipeline.run.spend import Spend
from pipeline.run.stop import Stop, Stopped
from pipeline.run.uploads import Uploads
from pipeline.tasks import read_answer
from pipeline.tasks.base import TaskSettings

BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0
DEADLINE_MULTIPLE = 4.0
DEADLINE_SAMPLES = 20  # latencies needed before the deadline follows them (else [api] timeout)
LATENCY_WINDOW = 1000
# A parse of an answer about fewer pixels, and shorter, runs on the event loop (offload.py).
SMALL_PIXELS = 4_000_000
FIRST = asyncio.FIRST_COMPLETED
T = TypeVar("T")


class RunStopped(Exception):
    """The run's own failure (see failures.py): the engine stops with `verdict`."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict.reason)
        self.verdict = verdict


class Deadlines:
    """Per-attempt deadlines from the latencies observed so far (see the module docstring)."""

    def __init__(self, floor: float, cap: float) -> None:
        self.floor = min(floor, cap)
        self.cap = cap
        self._recent: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._sorted: list[float] = []
        self._current = cap
        # resolved, then dropped, each time the estimate drops; made when first awaited (a
        # future, not an Event: awaiting it takes no task of its own, one per call otherwise)
        self._tighter: asyncio.Future[None] | None = None

    def observe(self, seconds: float) -> None:
        if len(self._recent) == self._recent.maxlen:
            self._sorted.pop(bisect.bisect_left(self._sorted, self._recent[0]))
        self._recent.append(seconds)
        bisect.insort(self._sorted, seconds)
        if len(self._sorted) >= DEADLINE_SAMPLES:
            p99 = self._sorted[min(len(self._sorted) - 1, int(len(self._sorted) * 0.99))]
            self._set(min(self.cap, max(self.floor, DEADLINE_MULTIPLE * p99)))

    def _set(self, seconds: float) -> None:
        tighter = seconds < self._current
        self._current = seconds
        if tighter and self._tighter is not None:  # wake the requests in flight: their
            if not self._tighter.done():  # deadline moved closer
                self._tighter.set_result(None)
            self._tighter = None

    @property
    def current(self) -> float:
        return self._current

    def tightened(self) -> asyncio.Future[None]:
        """Done the next time the estimate drops: bound to today's estimate now, not when first
        awaited (a drop in between would otherwise be missed and the wait last to the cap).
        Shared by every call in flight: never cancel it."""
        if self._tighter is None:
            self._tighter = asyncio.get_running_loop().create_future()
        return self._tighter

    async def within(self, calling: Awaitable[T], sent: float) -> T:
        """`calling`'s result, or DeadlineCut once `sent` + the current estimate has passed
        (re-read each time it tightens); the call is then cancelled."""
        task = asyncio.ensure_future(calling)
        try:
            while not task.done() and (left := sent + self._current - time.monotonic()) > 0:
                waits: list[asyncio.Future[Any]] = [task, self.tightened()]
                await asyncio.wait(waits, timeout=left, return_when=FIRST)
            if task.done():  # the client's own deadline may end it at the same moment
                return task.result()
        finally:
            if not task.done():
                task.cancel()
                # a cancel racing the client's own timeout ends it with that error instead
                task.add_done_callback(_retrieved)
        raise DeadlineCut(self._current, sent)


class DeadlineCut(GeminiError):
    """A call abandoned in flight when its (tightened) deadline passed: a timeout, retried.
    Sent and unanswered, so the service may bill it."""

    def __init__(self, seconds: float, sent: float) -> None:
        super().__init__(
            None,
            "DEADLINE_EXCEEDED",
            f"no answer within {seconds:g}s (the deadline, tightened as latencies came in)",
        )
        self.sent = sent  # time.monotonic() when it was sent


class Counters:
    """What the calls did, for the run summary and the progress line."""

    def __init__(self) -> None:
        self.api_calls = 0
        self.retries = 0
        self.throttled = 0
        # Calls sent and abandoned before an answer (a deadline cut, a second Ctrl-C): the
        # service may bill them, and their images are bought again (a retry, the next run).
        self.abandoned = 0
        self.abandoned_usd = 0.0  # their estimated input tokens at the model's price

    def abandon(self, est_usd: float) -> None:
        self.abandoned += 1
        self.abandoned_usd += est_usd


class Caller:
    """Calls the API for one unit at a time; shared by all workers of a run."""

    def __init__(
        self,
        config: Config,
        request: GenerateRequest,
        *,
        client: GeminiClient,
        limiter: Limiter,
        daily: DayCounter,
        uploads: Uploads,
        stop: Stop,
        rng: random.Random,
        references: tuple[LoadedReference, ...] = (),
        spend: Spend | None = None,
    ) -> None:
        self.config = config
        self.spend = spend or Spend(config)  # uncapped when the engine keeps no count
        self.client = client
        self.limiter = limiter
        self.daily = daily
        self.uploads = uploads
        self.stop = stop
        self.rng = rng
        self.health = Health()
        self.counters = Counters()
        self.deadlines = Deadlines(config.api.min_timeout, config.api.timeout)
        self._answered_at = -math.inf  # when the last answer came (time.monotonic())
        # Vertex AI has no Files API: its reference images always go inline
        vertex = config.api.backend == "vertex"
        reference_mode = "inline" if vertex else config.images.mode
        self.references = ReferenceParts(references, reference_mode, uploads=uploads)
        self.requests = RequestMaker(config, request, self.references)  # Batch Mode's too
        self.context = ContextCache(
            config, client, self.requests.costing, request, self.references, spend=self.spend
        )

    # ------------------------------------------------------------------------------- the call
    async def call(self, unit: Unit) -> Outcome:
        """The outcome of asking about `unit`. Raises Stopped (the run is stopping: nothing to
        write for it) or RunStopped (this call found the run's own failure)."""
        plan = self.requests.plan(unit)
        if plan.error is not None:
            return plan.failed(plan.error)
        started = time.monotonic()
        attempts, last = 0, "stopped before an answer"
        failure: tuple[GeminiError, Verdict] | None = None
        paid: GenerateResponse | None = None  # hops of a continuation that broke off
        while attempts < self.config.limits.max_attempts:
            attempts += 1
            try:
                response, latency = await self._attempt(unit, plan, paid, attempts == 1)
            except OSError as exc:  # deleted or changed since it was hashed: not the same image
                return plan.failed(unreadable(exc), attempts, _ms(started))
            except GeminiError as exc:
                paid = exc.partial or paid  # continue from the paid hops, never buy them again
                if self.context.lost(exc):  # its cache is gone: sent again in full, at once, as
                    attempts -= 1  # the same attempt (a lost cache is never named again)
                    continue
                verdict = self._judge(exc, unit)
                if verdict.action == Action.IMAGE:
                    return plan.failed(verdict.reason, attempts, _ms(started))
                if verdict.action == Action.BLOCKED:
                    parsed = Parsed("blocked", error=verdict.reason)
                    return plan.outcome(parsed, None, attempts, _ms(started))
                last, failure = verdict.reason, (exc, verdict)
                if attempts < self.config.limits.max_attempts:
                    await self._before_retry(exc, verdict, unit, attempts)
                continue
            parsed = await parse_response(response, unit, self.config.task)
            return plan.outcome(parsed, response, attempts, latency)
        outage = failure and self.health.exhausted(*failure)
        if outage:
            raise RunStopped(outage)
        return plan.failed(last, attempts, _ms(started), retryable=True)

    async def _attempt(
        self, unit: Unit, plan: Plan, paid: GenerateResponse | None, first: bool
    ) -> tuple[GenerateResponse, float]:
        cached = await self.stop.until(self.context.name(first))  # made first when it pays
        made = self.requests.make(unit, plan, self.uploads, self.references, cached)
        request = await self.stop.until(made)  # a wait (uploads): a drain ends it
        await self.stop.until(self.limiter.acquire(plan.est_tokens))
        estimated = self._admit(unit, plan)
        answered, sent, spent = False, None, 0.0
        try:
            if self.stop.state == "abandoning":
                raise Stopped  # nothing sent: nothing to count
            self.counters.api_calls += 1
            sent = time.monotonic()
            hops: list[str] = []  # a continued answer's paid hops, kept if the call is cut
            calling = self.client.generate(
                request,
                flavor=self.config.api.flavor,
                timeout=self.deadlines.current,
                resume_from=paid,
                hops=hops,
            )
            response = await self.stop.call(self._within(calling, sent, hops))
            answered, spent = True, self.spend.billed(response.usage)
        except (GeminiError, Stopped) as exc:
            if sent is not None and _abandoned(exc):
                spent = self.spend.input_only(plan.est_tokens)  # the service may bill it
                self.counters.abandon(spent)
            raise
        finally:
            self.daily.settle(answered)
            self.spend.settle(estimated, spent)
        latency = time.monotonic() - sent
        self.deadlines.observe(latency)
        self._answered_at = time.monotonic()
        self.health.success()
        self.limiter.correct(plan.est_tokens, response.usage.prompt_tokens)
        return response, latency * 1000

    def _admit(self, unit: Unit, plan: Plan) -> float:
        """Pass the spending caps, then the daily quota, or stop the run before the request is
        sent; the request's estimated USD, now in flight. Every attempt (a retry too) and every
        engine's worker is admitted here."""
        estimated = self.spend.estimate(plan.est_tokens, len(unit.items))
        refused = self.spend.reserve(estimated)
        if refused is not None:
            raise RunStopped(refused)
        if not self.daily.reserve():
            self.spend.settle(estimated, 0.0)
            raise RunStopped(_daily_limit(self.daily.limit))
        return estimated

    async def _within(
        self, calling: Awaitable[GenerateResponse], sent: float, hops: list[str]
    ) -> GenerateResponse:
        """The call within its (tightening) deadline; cut after some hops of a continued answer
        were answered, the cut carries them as `.partial`, so the retry continues from them
        instead of buying them again (as for a hop that failed)."""
        try:
            return await self.deadlines.within(calling, sent)
        except DeadlineCut as cut:
            if hops:
                cut.partial = self.client.answer_of(hops, self.config.api.flavor)
            raise

    def _judge(self, exc: GeminiError, unit: Unit) -> Verdict:
        uploaded = self.references.uploaded or any(map(self.uploads.uses_upload, unit.items))
        verdict = judge(exc, uploaded=uploaded)
        if exc.kind == "rate_limit":
            self.counters.throttled += 1
            self.limiter.throttled(self._retry_delay(exc))
        if isinstance(exc, DeadlineCut) and exc.sent < self._answered_at:
            # Sent before a later call was answered: no sign of an outage. The first wave's
            # hangs are all cut at once when the estimate forms, and counted as a streak they
            # stopped the run (80 images, 8% hanging: 6 cut together, exit 3).
            return verdict
        verdict = self.health.failure(exc, verdict) or verdict
        if verdict.action == Action.RUN:
            raise RunStopped(verdict)
        return verdict

    async def _before_retry(
        self, exc: GeminiError, verdict: Verdict, unit: Unit, attempts: int
    ) -> None:
        self.counters.retries += 1
        if verdict.action == Action.REUPLOAD:
            for item in unit.items:
                self.uploads.forget(item)
            await self.stop.until(self.references.settle())  # those the service no longer has
            return
        if verdict.action == Action.CHECK_FILE:
            if not await self.stop.until(self._settle(unit)):
                raise RunStopped(project_refused(exc))
            return
        delay = self._retry_delay(exc)
        if delay is None:
            ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempts - 1))
            delay = self.rng.uniform(0, ceiling)  # full jitter
        else:
            delay += self.rng.uniform(0, min(1.0, delay / 4 + 0.05))
        await self.stop.sleep(delay)

    async def _settle(self, unit: Unit) -> bool:
        """After a FAILED_PRECONDITION: whether one of the request's uploads (the unit's or a
        reference's) was the cause, now waited for or forgotten (`Uploads.settle`); False when
        all of them are ACTIVE, so the cause is the project (billing, region)."""
        causes = [
            await self.uploads.settle(item) for item in unit.items if self.uploads.uses_upload(item)
        ]
        return await self.references.settle() or any(causes)

    def _retry_delay(self, exc: GeminiError) -> float | None:
        """The service's hint, capped: a day-long retryDelay must not freeze a run."""
        if exc.retry_delay is None:
            return None
        return min(exc.retry_delay, self.config.api.max_retry_delay)


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Mark a cancelled call's outcome seen (no "exception was never retrieved")."""
    if not task.cancelled():
        task.exception()


def _abandoned(exc: Exception) -> bool:
    """A call sent and left without an answer: cut in flight (the run abandoning, a deadline
    tightened) or out of time at the client (no HTTP answer). A 408 is an answer."""
    if isinstance(exc, Stopped | DeadlineCut):
        return True
    return isinstance(exc, GeminiError) and exc.kind == "timeout" and exc.code is None


def unreadable(error: OSError) -> str:
    """The error of a file deleted or changed since it was hashed: not the same image."""
    return f"cannot read the file: {error}"


async def parse_response(response: GenerateResponse, unit: Unit, settings: TaskSettings) -> Parsed:
    """The task's reading of a response about `unit` (tasks.read_answer), off the event loop
    when the answer or the images are big. Interactive calls and Batch Mode results alike."""
    pixels = sum(item.width * item.height for item in unit.items)
    big = pixels > SMALL_PIXELS or len(response.raw) > SMALL_BYTES
    first = unit.items[0]
    return await offload(
        big, read_answer, response, first.width, first.height, settings, unit.sizes
    )


def _daily_limit(limit: int | None) -> Verdict:
    return daily_quota(f"the configured daily limit of {limit} requests is reached")


def _ms(started: float) -> float:
    return (time.monotonic() - started) * 1000
