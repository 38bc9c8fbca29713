"""One unit's API call: inline or upload, inside the limits, with retries, parsed off the loop.

A unit is one image or a group's images (pipeline/records.py); the request carries the run's
reference images first (pipeline/inputs/references.py), then the unit's, captioned when there is
more than the one image (`request_with_images`). Before anything is sent, the request is held to
what one request may be: at most MAX_IMAGES_PER_REQUEST images, INPUT_TOKEN_LIMIT and
`[limits] tpm` estimated input tokens, and the inline limit for what goes inline (`[images]
mode` auto sends the images in order inline while they fit and uploads the rest); a unit over
a limit becomes an error row saying which, with no call.

The client never retries; this is where the policy lives. Each attempt:

1. waits for the rate limiter (RPM and TPM, paced) and a daily-quota slot — every wait ends at
   once when the run stops;
2. sends with a deadline that follows the service: `Deadlines` keeps the latencies seen so far and
   gives `DEADLINE_MULTIPLE` x their p99, floored by `[api] min_timeout` and capped by
   `[api] timeout` (sent as `X-Server-Timeout`), so one hung request costs a few typical
   latencies, not two minutes;
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
import json
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from pipeline.config import Config, ConfigError
from pipeline.gemini import GeminiClient, GeminiError
from pipeline.gemini.tokens import image_tokens, text_tokens
from pipeline.gemini.types import (
    MAX_IMAGES_PER_REQUEST,
    GenerateRequest,
    GenerateResponse,
    ImagePart,
)
from pipeline.inputs import images
from pipeline.inputs.references import LoadedReference, ReferenceParts, inline_size
from pipeline.records import ImageItem, Parsed, Unit
from pipeline.run.failures import Action, Health, Verdict, daily_quota, judge, project_refused
from pipeline.run.limits import DayCounter, Limiter
from pipeline.run.rows import Outcome
from pipeline.run.stop import Stop
from pipeline.run.uploads import Uploads
from pipeline.tasks import multi, read_answer

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
# The input context of the current Gemini models (2.5 and 3 Flash and Pro: 1,048,576 tokens,
# ai.google.dev/gemini-api/docs/models); a request estimated above it is never sent.
INPUT_TOKEN_LIMIT = 1_048_576


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


@dataclass(frozen=True, slots=True)
class Plan:
    """How a unit's request is made, decided before anything is sent (`Caller.plan`)."""

    modes: tuple[str, ...]  # "inline" or "upload", for each image of the unit
    est_image_tokens: int  # every image of the request, reference images included
    est_tokens: int  # the whole input: images, prompt, system instruction, captions
    error: str | None = None  # why the request cannot be made (a limit it would break)

    @property
    def input_mode(self) -> str:
        """The row's input_mode: inline, upload, mixed (a group sent partly each way), or none."""
        kinds = set(self.modes)
        return kinds.pop() if len(kinds) == 1 else "mixed" if kinds else "none"


def request_with_images(
    request: GenerateRequest,
    references: Sequence[ImagePart],
    targets: Sequence[ImagePart],
    *,
    captioned: bool,
) -> GenerateRequest:
    """The task's request with its images: the reference images (already captioned) first, then
    the unit's, captioned "Image 0:", "Image 1:", ... when `captioned` (pipeline/tasks/multi.py).
    The one place a request gets its images, whichever engine sends it."""
    if captioned:
        targets = [
            replace(part, caption=multi.target_caption(index)) for index, part in enumerate(targets)
        ]
    return replace(request, images=(*references, *targets))


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
        self.references = ReferenceParts(references, config.images.mode, uploads=uploads)
        self.captioned = multi.captioned(config.task.grouped, len(references))
        prompt_text = (request.system_instruction or "") + request.prompt
        captions = [reference.caption for reference in references]
        self.est_prompt_tokens = text_tokens(prompt_text) + sum(map(text_tokens, captions))
        self.reference_tokens = sum(self._image_tokens(ref.item) for ref in references)
        self.overhead = request_overhead(request) + self.references.inline_bytes
        if self.references.inline_bytes and self.overhead > config.inline_limit_bytes:
            # every request would be refused: a config to change, not a pile of error rows
            raise ConfigError(
                f"{config.source}: [task] reference_images: the prompt and the inline reference "
                f"images take {self.overhead:,} bytes, over [api] inline_limit_mb "
                f'({config.api.inline_limit_mb:g} MB): use [images] mode = "auto" or "upload"'
            )

    # ------------------------------------------------------------------------------- the call
    async def call(self, unit: Unit) -> Outcome:
        """The outcome of asking about `unit`. Raises Stopped (the run is stopping: nothing to
        write for it) or RunStopped (this call found the run's own failure)."""
        plan = self.plan(unit)
        mode, est_image, est = plan.input_mode, plan.est_image_tokens, plan.est_tokens
        if plan.error is not None:
            return Outcome(Parsed("error", error=plan.error), None, 0, 0.0, mode, est_image, est)
        started = time.monotonic()
        attempts, last = 0, "stopped before an answer"
        failure: tuple[GeminiError, Verdict] | None = None
        paid: GenerateResponse | None = None  # hops of a continuation that broke off
        while attempts < self.config.limits.max_attempts:
            attempts += 1
            try:
                response, latency = await self._attempt(unit, plan, paid)
            except OSError as exc:  # deleted or changed since it was hashed: not the same image
                reason = f"cannot read the file: {exc}"
                return self._failed(reason, attempts, started, mode, est_image, est)
            except GeminiError as exc:
                paid = exc.partial or paid  # continue from the paid hops, never buy them again
                verdict = self._judge(exc, unit)
                if verdict.action == Action.IMAGE:
                    return self._failed(verdict.reason, attempts, started, mode, est_image, est)
                if verdict.action == Action.BLOCKED:
                    parsed = Parsed("blocked", error=verdict.reason)
                    return Outcome(parsed, None, attempts, _ms(started), mode, est_image, est)
                last, failure = verdict.reason, (exc, verdict)
                if attempts < self.config.limits.max_attempts:
                    await self._before_retry(exc, verdict, unit, attempts)
                continue
            parsed = await self._parse(response, unit)
            return Outcome(parsed, response, attempts, latency, mode, est_image, est)
        outage = failure and self.health.exhausted(*failure)
        if outage:
            raise RunStopped(outage)
        return self._failed(last, attempts, started, mode, est_image, est, retryable=True)

    def plan(self, unit: Unit) -> Plan:
        """What the unit's request costs and how its images go, decided before anything is
        sent; `Plan.error` says which limit a request over one would break."""
        est_image, est = self.estimates(unit)
        why = self._over_limits(len(unit.items), est)
        if why is not None:
            return Plan((), est_image, est, why)
        modes, why = self._modes(unit)
        return Plan(modes, est_image, est, why)

    def estimates(self, unit: Unit) -> tuple[int, int]:
        """(image tokens, input tokens) the unit's request is estimated at: its images and the
        reference images, then the prompt and the captions. Batch Mode records the same."""
        est_image = self.reference_tokens + sum(map(self._image_tokens, unit.items))
        return est_image, est_image + self.est_prompt_tokens + self._caption_tokens(len(unit.items))

    async def request_for(self, unit: Unit, plan: Plan) -> GenerateRequest:
        """The request about `unit`, its images inline or uploaded as planned (uploading what
        must be, the reference images included). Any engine sends this."""
        targets = [
            await self._image_part(item, mode)
            for item, mode in zip(unit.items, plan.modes, strict=True)
        ]
        references = await self.stop.until(self.references.parts())
        return request_with_images(self.request, references, targets, captioned=self.captioned)

    def _image_tokens(self, item: ImageItem) -> int:
        spec, resolution = self.config.task.spec, self.request.media_resolution
        return image_tokens(spec, item.sent_width, item.sent_height, resolution)

    def _caption_tokens(self, images: int) -> int:
        if not self.captioned:
            return 0
        return sum(text_tokens(multi.target_caption(index)) for index in range(images))

    async def _attempt(
        self, unit: Unit, plan: Plan, paid: GenerateResponse | None
    ) -> tuple[GenerateResponse, float]:
        request = await self.request_for(unit, plan)
        await self.stop.until(self.limiter.acquire(plan.est_tokens))
        if not self.daily.reserve():
            raise RunStopped(_daily_limit(self.daily.limit))
        answered = False
        try:
            self.counters.api_calls += 1
            sent = time.monotonic()
            response = await self.stop.call(
                self.client.generate(
                    request,
                    flavor=self.config.api.flavor,
                    timeout=self.deadlines.current,
                    resume_from=paid,
                )
            )
            answered = True
        finally:
            self.daily.settle(answered)
        latency = time.monotonic() - sent
        self.deadlines.observe(latency)
        self.health.success()
        self.limiter.correct(plan.est_tokens, response.usage.prompt_tokens)
        return response, latency * 1000

    def _judge(self, exc: GeminiError, unit: Unit) -> Verdict:
        uploaded = self.references.uploaded or any(map(self.uploads.uses_upload, unit.items))
        verdict = judge(exc, uploaded=uploaded)
        if exc.kind == "rate_limit":
            self.counters.throttled += 1
            self.limiter.throttled(self._retry_delay(exc))
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

    # -------------------------------------------------------------------------- inline/upload
    def _over_limits(self, images: int, est: int) -> str | None:
        """Why a request of this many images (the references' added) and estimated input
        tokens cannot be sent, or None."""
        count = images + len(self.references.loaded)
        if count > MAX_IMAGES_PER_REQUEST:
            return (
                f"the request would carry {count:,} images (reference images included); "
                f"a request takes at most {MAX_IMAGES_PER_REQUEST:,}"
            )
        tpm = self.config.limits.tpm
        for limit, what in ((INPUT_TOKEN_LIMIT, "the model's input limit"), (tpm, "[limits] tpm")):
            if limit and est > limit:
                return (
                    f"the request is estimated at {est:,} input tokens, over {what} of "
                    f"{limit:,}: use fewer or smaller images (max_side)"
                )
        return None

    def _modes(self, unit: Unit) -> tuple[tuple[str, ...], str | None]:
        """auto: each image inline while the request still fits the inline limit, in order,
        else uploaded; inline: all inline, if they fit; upload: all uploaded."""
        mode = self.config.images.mode
        if mode == "upload":
            return ("upload",) * len(unit.items), None
        room = self.config.inline_limit_bytes - self.overhead
        modes = []
        for item in unit.items:
            size = inline_size(item)
            if size <= room:
                modes.append("inline")
                room -= size
            elif mode == "auto":
                modes.append("upload")
            else:
                return ("inline",) * len(unit.items), inline_refusal(self.config)
        return tuple(modes), None

    async def _image_part(self, item: ImageItem, mode: str) -> ImagePart:
        if mode == "inline":
            data = await _offload(item.send_size > SMALL_BYTES * 16, images.read_bytes, item)
            return ImagePart(item.mime_type, data=data)
        upload = await self.stop.until(self.uploads.get(item))
        return ImagePart(upload.mime_type, file_uri=upload.uri)

    async def _parse(self, response: GenerateResponse, unit: Unit) -> Parsed:
        pixels = sum(item.width * item.height for item in unit.items)
        big = pixels > SMALL_PIXELS or len(response.raw) > SMALL_BYTES
        first = unit.items[0]
        return await _offload(
            big, read_answer, response, first.width, first.height, self.config.task, unit.sizes
        )

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


def request_overhead(request: GenerateRequest) -> int:
    """Bytes of a request besides its image (prompt, system instruction, schema, JSON)."""
    prompt_text = (request.system_instruction or "") + request.prompt
    schema = request.response_schema or request.response_json_schema
    return REQUEST_OVERHEAD + len(prompt_text.encode()) + len(json.dumps(schema or {}))


def send_mode(config: Config, item: ImageItem, overhead: int) -> str | None:
    """inline or upload (`[images] mode`, the inline limit); None when inline is forced and the
    request would not fit. Batch Mode decides the same way for each line of its JSONL."""
    mode = config.images.mode
    fits = inline_size(item) + overhead <= config.inline_limit_bytes
    if mode == "auto":
        return "inline" if fits else "upload"
    return None if mode == "inline" and not fits else mode


def inline_refusal(config: Config) -> str:
    """The error of an image that must go inline and does not fit."""
    limit = f"{config.api.inline_limit_mb:g} MB"
    return f"the request would exceed the inline limit of {limit}; use mode auto"


def _daily_limit(limit: int | None) -> Verdict:
    return daily_quota(f"the configured daily limit of {limit} requests is reached")


def _ms(started: float) -> float:
    return (time.monotonic() - started) * 1000


async def _offload(big: bool, fn: Callable[..., T], *args: Any) -> T:
    """Call `fn` in a worker thread when the job is big, else right here."""
    if big:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)
