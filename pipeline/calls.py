"""One image's API call: inline or upload, inside the limits, with retries, parsed off the loop.

The client never retries; this is where the policy lives. Each attempt:

1. waits for the rate limiter (RPM and TPM, paced) and a daily-quota slot — every wait ends at
   once when the run stops;
2. sends with a deadline that follows the service: `Deadlines` keeps the latencies seen so far and
   gives `DEADLINE_MULTIPLE` x their p99, floored by `[api] min_timeout` and capped by
   `[api] timeout` (sent as `X-Server-Timeout`), so one hung request costs a few typical
   latencies, not two minutes;
3. on failure asks `failures.judge` whose fault it is: retry (full-jitter backoff, or the
   service's `retryDelay`, capped by `[api] max_retry_delay`), upload again, an error or blocked
   row, or stop the run.

A parse that may be heavy (a big answer, a big image) runs in a worker thread so the event loop
keeps serving the other calls (a slow parse on the loop once made their deadlines pass and had
them paid twice).
"""

from __future__ import annotations

import asyncio
import bisect
import json
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from pipeline import images
from pipeline.config import Config
from pipeline.failures import Action, Health, Verdict, daily_quota, judge
from pipeline.gemini import GeminiClient, GeminiError
from pipeline.gemini.tokens import image_tokens, text_tokens
from pipeline.gemini.types import GenerateRequest, GenerateResponse, ImagePart
from pipeline.limits import DayCounter, Limiter
from pipeline.records import ImageItem, Parsed
from pipeline.rows import Outcome
from pipeline.stop import Stop
from pipeline.tasks import read_answer
from pipeline.uploads import Uploads

T = TypeVar("T")
BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0
REQUEST_OVERHEAD = 2048  # JSON around the parts, counted against the inline limit
DEADLINE_MULTIPLE = 4.0
DEADLINE_SAMPLES = 20  # latencies needed before the deadline follows them (else [api] timeout)
LATENCY_WINDOW = 1000
# Work on small images and answers runs on the event loop: a thread hop costs more than the work
# itself (measured: 1.4 vs 2.3 ms of CPU an image, 682 vs 431 images/s). Big ones go to threads.
SMALL_BYTES = 64 << 10
SMALL_PIXELS = 4_000_000


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

    def observe(self, seconds: float) -> None:
        if len(self._recent) == self._recent.maxlen:
            self._sorted.pop(bisect.bisect_left(self._sorted, self._recent[0]))
        self._recent.append(seconds)
        bisect.insort(self._sorted, seconds)
        if len(self._sorted) >= DEADLINE_SAMPLES:
            p99 = self._sorted[min(len(self._sorted) - 1, int(len(self._sorted) * 0.99))]
            self._current = min(self.cap, max(self.floor, DEADLINE_MULTIPLE * p99))

    @property
    def current(self) -> float:
        return self._current


class Counters:
    """What the calls did, for the run summary and the progress line."""

    def __init__(self) -> None:
        self.api_calls = 0
        self.retries = 0
        self.throttled = 0


class Caller:
    """Calls the API for one image at a time; shared by all workers of a run."""

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
    ) -> None:
        self.config = config
        self.request = request
        self.client = client
        self.limiter = limiter
        self.daily = daily
        self.uploads = uploads
        self.stop = stop
        self.rng = rng
        self.health = Health()
        self.counters = Counters()
        self.deadlines = Deadlines(config.api.min_timeout, config.api.timeout)
        prompt_text = (request.system_instruction or "") + request.prompt
        self.est_prompt_tokens = text_tokens(prompt_text)
        schema = request.response_schema or request.response_json_schema
        self.overhead = REQUEST_OVERHEAD + len(prompt_text.encode()) + len(json.dumps(schema or {}))

    # ------------------------------------------------------------------------------- the call
    async def call(self, item: ImageItem) -> Outcome:
        """The outcome of asking about `item`. Raises Stopped (the run is stopping: nothing to
        write for it) or RunStopped (this call found the run's own failure)."""
        est_image = image_tokens(
            self.config.task.spec, item.sent_width, item.sent_height, self.request.media_resolution
        )
        est = est_image + self.est_prompt_tokens
        mode = self._mode(item)
        if mode is None:
            limit = f"{self.config.api.inline_limit_mb:g} MB"
            reason = f"the request would exceed the inline limit of {limit}; use mode auto"
            return Outcome(Parsed("error", error=reason), None, 0, 0.0, "inline", est_image, est)
        started = time.monotonic()
        attempts, last = 0, "stopped before an answer"
        while attempts < self.config.limits.max_attempts:
            attempts += 1
            try:
                response, latency = await self._attempt(item, mode, est)
            except OSError as exc:  # deleted or changed since it was hashed: not the same image
                reason = f"cannot read the file: {exc}"
                return self._failed(reason, attempts, started, mode, est_image, est)
            except GeminiError as exc:
                verdict = self._judge(exc, item)
                if verdict.action == Action.IMAGE:
                    return self._failed(verdict.reason, attempts, started, mode, est_image, est)
                if verdict.action == Action.BLOCKED:
                    parsed = Parsed("blocked", error=verdict.reason)
                    return Outcome(parsed, None, attempts, _ms(started), mode, est_image, est)
                last = verdict.reason
                if attempts < self.config.limits.max_attempts:
                    await self._before_retry(exc, verdict, item, attempts)
                continue
            parsed = await self._parse(response, item)
            return Outcome(parsed, response, attempts, latency, mode, est_image, est)
        return self._failed(last, attempts, started, mode, est_image, est, retryable=True)

    async def _attempt(
        self, item: ImageItem, mode: str, est: int
    ) -> tuple[GenerateResponse, float]:
        part = await self._image_part(item, mode)
        await self.stop.until(self.limiter.acquire(est))
        if not self.daily.reserve():
            raise RunStopped(_daily_limit(self.daily.limit))
        answered = False
        try:
            self.counters.api_calls += 1
            sent = time.monotonic()
            response = await self.stop.call(
                self.client.generate(
                    replace(self.request, images=(part,)),
                    flavor=self.config.api.flavor,
                    timeout=self.deadlines.current,
                )
            )
            answered = True
        finally:
            self.daily.settle(answered)
        latency = time.monotonic() - sent
        self.deadlines.observe(latency)
        self.health.success()
        self.limiter.correct(est, response.usage.prompt_tokens)
        return response, latency * 1000

    def _judge(self, exc: GeminiError, item: ImageItem) -> Verdict:
        verdict = judge(exc, uploaded=self.uploads.uses_upload(item))
        if exc.kind == "rate_limit":
            self.counters.throttled += 1
            self.limiter.throttled(self._retry_delay(exc))
        verdict = self.health.failure(exc, verdict) or verdict
        if verdict.action == Action.RUN:
            raise RunStopped(verdict)
        return verdict

    async def _before_retry(
        self, exc: GeminiError, verdict: Verdict, item: ImageItem, attempts: int
    ) -> None:
        self.counters.retries += 1
        if verdict.action == Action.REUPLOAD:
            self.uploads.forget(item)
            return
        delay = self._retry_delay(exc)
        if delay is None:
            ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempts - 1))
            delay = self.rng.uniform(0, ceiling)  # full jitter
        else:
            delay += self.rng.uniform(0, min(1.0, delay / 4 + 0.05))
        await self.stop.sleep(delay)

    def _retry_delay(self, exc: GeminiError) -> float | None:
        """The service's hint, capped: a day-long retryDelay must not freeze a run."""
        if exc.retry_delay is None:
            return None
        return min(exc.retry_delay, self.config.api.max_retry_delay)

    # -------------------------------------------------------------------------- inline/upload
    def _mode(self, item: ImageItem) -> str | None:
        """inline or upload; None when inline is forced and the request would not fit."""
        mode = self.config.images.mode
        fits = (item.send_size + 2) // 3 * 4 + self.overhead <= self.config.inline_limit_bytes
        if mode == "auto":
            return "inline" if fits else "upload"
        return None if mode == "inline" and not fits else mode

    async def _image_part(self, item: ImageItem, mode: str) -> ImagePart:
        if mode == "inline":
            data = await _offload(item.send_size > SMALL_BYTES * 16, images.read_bytes, item)
            return ImagePart(item.mime_type, data=data)
        upload = await self.stop.until(self.uploads.get(item))
        return ImagePart(upload.mime_type, file_uri=upload.uri)

    async def _parse(self, response: GenerateResponse, item: ImageItem) -> Parsed:
        big = item.width * item.height > SMALL_PIXELS or len(response.raw) > SMALL_BYTES
        return await _offload(big, read_answer, response, item.width, item.height, self.config.task)

    def _failed(
        self,
        reason: str,
        attempts: int,
        started: float,
        mode: str,
        est_image: int,
        est: int,
        *,
        retryable: bool = False,
    ) -> Outcome:
        parsed = Parsed("error", error=reason)
        return Outcome(parsed, None, attempts, _ms(started), mode, est_image, est, retryable)


def _daily_limit(limit: int | None) -> Verdict:
    return daily_quota(f"the configured daily limit of {limit} requests is reached")


def _ms(started: float) -> float:
    return (time.monotonic() - started) * 1000


async def _offload(big: bool, fn: Callable[..., T], *args: Any) -> T:
    """Call `fn` in a worker thread when the job is big, else right here."""
    if big:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)
