"""The local "model" at work: a request reduced to a `Prompted`, answered as a `ModelOutput`.

The text comes from a recorded replay when one matches, else from answers.render over what
vision.py sees in every image the request asks about (`answers.targets`: not the reference
images), as the request's setting would see it under `--simulate settings` (simulation.py).
Then the seeded faults (faults.py) may delay, fail, or bend the answer, `max_output_tokens` may
cut it (finishReason MAX_TOKENS), and a thinking model bills thought tokens (the local model does
not think: it bills as much thought as answer, capped by the budget, so thinking's cost shows up
in usage the way it does on the real service).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from dataclasses import dataclass

from pipeline.gemini.tokens import text_tokens
from pipeline.localserver import errors
from pipeline.localserver.answers import Answer, Ask, caption, render, targets
from pipeline.localserver.faults import Faults, Replay, apply_to_text
from pipeline.localserver.image_input import ImageInput, ImageReader
from pipeline.localserver.simulation import Setting, Simulation
from pipeline.localserver.vision import Analysis
from pipeline.models import Model

BYTES_PER_TOKEN = 4  # pipeline.gemini.tokens.text_tokens counts ~4 bytes of UTF-8 a token


@dataclass(frozen=True, slots=True)
class Prompted:
    """A request reduced to what answering and billing need, from either API flavour."""

    model: str
    texts: list[str]  # the user's text parts
    images: list[ImageInput]
    ask: Ask
    # the user's content in the order sent, texts and images: the prompt an implicit cache
    # matches (caching.py)
    parts: tuple[str | ImageInput, ...] = ()
    media_resolution: str | None = None  # request-wide (generationConfig.mediaResolution)
    max_output_tokens: int | None = None
    thinking: bool = False
    thinking_budget: int | None = None
    include_thoughts: bool = False
    spec: Model | None = None  # the server's table entry (its token rule); None: looked up

    def fingerprint(self) -> bytes:
        """What the request asks, for seeding faults and matching continuation hops."""
        digest = hashlib.sha256(self.model.encode())
        for text in (*self.texts, self.ask.system):
            digest.update(b"\0" + text.encode("utf-8"))
        for image in self.images:
            digest.update(b"\1" + image.sha256.encode("ascii"))
        return digest.digest()

    def setting(self) -> Setting:
        """What the simulation reads of the request."""
        spec = self.spec or self.model
        return Setting(self.model, spec, self.media_resolution, self.thinking)


@dataclass(frozen=True, slots=True)
class ModelOutput:
    """What the local model answered a request: its text, finish reason and token counts."""

    text: str
    finish_reason: str  # STOP | MAX_TOKENS
    output_tokens: int
    thoughts_tokens: int
    thought_summary: str | None
    task: str  # what answers.render answered: detect, segment, caption, ...


class Answerer:
    """Answers Prompted requests: replay or vision, then faults, truncation and thoughts."""

    def __init__(
        self,
        images: ImageReader,
        faults: Faults,
        replay: Replay | None,
        hang_seconds: float,
        simulation: Simulation | None = None,
    ) -> None:
        self.images = images
        self.simulation = simulation  # None: every setting sees the image as it was sent
        self.faults = faults
        self.replay = replay
        self.hang_seconds = hang_seconds
        self.closing = asyncio.Event()  # set when the server stops: hung requests give up

    async def answer(self, prompted: Prompted, *, queued: bool = False) -> ModelOutput:
        """`queued`: a Batch Mode line. It waits for no latency (the job's time is the batch
        surface's), and a hang is the service's own deadline passing at once."""
        draw = self.faults.draw(prompted.fingerprint()) if self.faults.active else None
        answer, finish = self._answer_text(prompted)
        text = answer.text
        if draw is not None:
            if draw.latency_seconds and not queued:
                await asyncio.sleep(draw.latency_seconds)
            if draw.faulty:
                kind = self.faults.choose(draw, answer)
                if queued and kind == "hang":
                    raise errors.deadline_exceeded()
                text, finish = await self._fault(kind, answer)
        text, finish = cut(text, finish, prompted.max_output_tokens)
        output_tokens = text_tokens(text)
        thoughts, summary = self._thoughts(prompted, output_tokens)
        return ModelOutput(text, finish, output_tokens, thoughts, summary, answer.task)

    def _answer_text(self, prompted: Prompted) -> tuple[Answer, str]:
        replayed = self.replay.answer([i.sha256 for i in prompted.images]) if self.replay else None
        if replayed is not None:
            return Answer(replayed[0], "replay"), replayed[1]
        seen = [self._seen(prompted, image) for image in targets(prompted.images)]
        return render(prompted.ask, seen), "STOP"

    def _seen(self, prompted: Prompted, image: ImageInput) -> Analysis:
        """What the model sees of `image`: all vision.py finds, or what its setting would."""
        analysis = self.images.analysis(image)
        if self.simulation is None:
            return analysis
        view = self.simulation.view(prompted.setting(), analysis, image.sha256, image.resolution)
        return self.simulation.degrade(analysis, view)

    async def _fault(self, kind: str, answer: Answer) -> tuple[str, str]:
        if kind == "http_500":
            raise errors.internal()
        if kind == "http_503":
            raise errors.unavailable()
        if kind == "hang":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closing.wait(), self.hang_seconds)
            raise errors.deadline_exceeded()
        return apply_to_text(kind, answer)

    def _thoughts(self, prompted: Prompted, output_tokens: int) -> tuple[int, str | None]:
        if not prompted.thinking:
            return 0, None
        thoughts = output_tokens
        if prompted.thinking_budget is not None and prompted.thinking_budget > 0:
            thoughts = min(thoughts, prompted.thinking_budget)
        summary = None
        if prompted.include_thoughts:
            first = next(iter(targets(prompted.images)), None)
            seen = caption(self._seen(prompted, first)) if first else "Recalling what was asked."
            summary = f"**Looking at the image**\n\n{seen}"
        return thoughts, summary


def cut(text: str, finish: str, limit: int | None) -> tuple[str, str]:
    """`text` cut to at most `limit` output tokens (finishReason MAX_TOKENS when cut)."""
    if limit is None or limit <= 0 or text_tokens(text) <= limit:
        return text, finish
    return head(text, limit), "MAX_TOKENS"


def head(text: str, tokens: int) -> str:
    """The longest start of `text` that costs at most `tokens` output tokens."""
    return text.encode("utf-8")[: tokens * BYTES_PER_TOKEN].decode("utf-8", "ignore")
