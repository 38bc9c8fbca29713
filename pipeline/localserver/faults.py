"""Seeded latency and fault injection, and replay of recorded answers.

Every draw comes from a generator seeded by (seed, what the request asks, how many times that
same request was seen before): a run is reproducible whatever order concurrent requests arrive
in, and a retried request draws afresh, as a retry against the real service would.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: options.py imports FAULT_KINDS without the model
    from pipeline.localserver.answers import Answer

HTTP_FAULTS = ("http_500", "http_503", "hang")
FAULT_KINDS = (
    *HTTP_FAULTS,
    "max_tokens",  # output cut mid-answer, finishReason MAX_TOKENS
    "fenced_json",  # JSON wrapped in a markdown fence although JSON mode was asked for
    "box_out_of_range",  # a box_2d corner beyond 1000
    "mask_without_prefix",  # a PNG mask without its "data:image/png;base64," prefix
)
LATENCY_SIGMA = 0.6  # lognormal shape: a long right tail (p99 about 3.5x the median)
MASK_PREFIX = "data:image/png;base64,"


@dataclass(frozen=True, slots=True)
class Draw:
    """What happens to one request: extra latency, and whether it is faulty."""

    latency_seconds: float
    faulty: bool
    pick: float  # uniform in [0, 1): which applicable fault, when faulty


class Faults:
    """Draws latency and faults for requests; counts what it injected."""

    def __init__(
        self, rate: float, seed: int, latency_ms: float, kinds: tuple[str, ...] = FAULT_KINDS
    ) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"fault rate must be within [0, 1], got {rate}")
        if latency_ms < 0:
            raise ValueError(f"latency must be >= 0 ms, got {latency_ms}")
        unknown = set(kinds) - set(FAULT_KINDS)
        if unknown or not kinds:
            raise ValueError(f"fault kinds must be among {', '.join(FAULT_KINDS)}")
        self.kinds = kinds  # the faults that may be injected (all by default)
        self.rate = rate
        self.seed = seed
        self.latency_ms = latency_ms
        self._seen: dict[bytes, int] = {}
        self.injected: dict[str, int] = dict.fromkeys(FAULT_KINDS, 0)

    @property
    def active(self) -> bool:
        return self.rate > 0 or self.latency_ms > 0

    def draw(self, request_key: bytes) -> Draw:
        attempt = self._seen.get(request_key, 0)
        self._seen[request_key] = attempt + 1
        digest = hashlib.sha256(
            self.seed.to_bytes(8, "big", signed=True) + request_key + attempt.to_bytes(4, "big")
        ).digest()
        rng = random.Random(digest)
        faulty = rng.random() < self.rate
        pick = rng.random()
        latency = 0.0
        if self.latency_ms > 0:
            mu = math.log(self.latency_ms / 1000) - LATENCY_SIGMA**2 / 2  # so the mean is exact
            latency = rng.lognormvariate(mu, LATENCY_SIGMA)
        return Draw(latency, faulty, pick)

    def choose(self, draw: Draw, answer: Answer) -> str:
        """The fault for a faulty draw, among those that make sense for this answer."""
        kinds = [kind for kind in applicable(answer) if kind in self.kinds] or list(self.kinds)
        kind = kinds[min(int(draw.pick * len(kinds)), len(kinds) - 1)]
        self.injected[kind] += 1
        return kind


def applicable(answer: Answer) -> list[str]:
    kinds = [*HTTP_FAULTS]
    if len(answer.text) > 1:
        kinds.append("max_tokens")
    if answer.payload is not None and not answer.text.startswith("```"):
        kinds.append("fenced_json")
    items = _items(answer.payload)
    if any(isinstance(item.get("box_2d"), list) for item in items):
        kinds.append("box_out_of_range")
    if any(isinstance(item.get("mask"), str) for item in items):
        kinds.append("mask_without_prefix")
    return kinds


def apply_to_text(kind: str, answer: Answer) -> tuple[str, str]:
    """(answer text, finish reason) after a content fault."""
    if kind == "max_tokens":
        return answer.text[: max(1, len(answer.text) // 2)], "MAX_TOKENS"
    if kind == "fenced_json":
        return f"```json\n{answer.text}\n```", "STOP"
    payload = copy.deepcopy(answer.payload)
    items = _items(payload)
    if kind == "box_out_of_range":
        for item in items:
            box = item.get("box_2d")
            if isinstance(box, list) and len(box) == 4:
                box[2], box[3] = 1000 + 1 + box[2] // 4, 1000 + 1 + box[3] // 4
                break
    elif kind == "mask_without_prefix":
        for item in items:
            if isinstance(item.get("mask"), str):
                item["mask"] = item["mask"].removeprefix(MASK_PREFIX)
    else:
        raise ValueError(f"not a content fault: {kind}")
    text = json.dumps(payload)
    if answer.text.startswith("```"):
        text = f"```json\n{text}\n```"
    return text, "STOP"


def _items(payload: Any) -> list[dict[str, Any]]:
    if isinstance(payload, dict) and isinstance(payload.get("boxes"), list):
        payload = payload["boxes"]
    if isinstance(payload, list):
        return [item for item in payload if isinstance(item, dict)]
    return []


class Replay:
    """Recorded answers by sha256 of the image bytes sent ("*" answers any other image).

    Several lines for the same image are served in turn, cycling, so a recorded sequence (say a
    MAX_TOKENS answer, then the retry's STOP answer) plays back in order.
    """

    def __init__(self, path: str | Path) -> None:
        self._answers: dict[str, list[tuple[str, str]]] = {}
        self._next: dict[str, int] = {}
        for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = str(record["sha256"]).lower()
                text = record["text"]
                finish = record.get("finish_reason") or "STOP"
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: not a replay record ({exc})") from None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{number}: 'text' must be a string")
            self._answers.setdefault(key, []).append((text, str(finish)))
        self.served = 0

    def answer(self, image_sha256s: Sequence[str]) -> tuple[str, str] | None:
        """(text, finish_reason) recorded for the first known image of a request, else None."""
        key = next((s for s in image_sha256s if s in self._answers), None)
        if key is None:
            if not image_sha256s or "*" not in self._answers:
                return None
            key = "*"
        answers = self._answers[key]
        index = self._next.get(key, 0)
        self._next[key] = (index + 1) % len(answers)
        self.served += 1
        return answers[index]
