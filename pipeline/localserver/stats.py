"""Counters of one server, as GET /local/stats returns them."""

from __future__ import annotations

from typing import Any

from pipeline.localserver.billing import Usage


class Stats:
    """Requests by path and status, refusals by rule, billed tokens, answers by task."""

    def __init__(self) -> None:
        self.received: dict[str, int] = {}  # by path, counted on arrival (requests: on answer)
        self.requests: dict[str, dict[str, int]] = {}
        self.by_status: dict[str, int] = {}
        self.refused_by_rule: dict[str, int] = {}
        self.tokens = {"prompt": 0, "cached": 0, "output": 0, "thoughts": 0, "total": 0}
        self.tokens_by_modality = {"TEXT": 0, "IMAGE": 0}
        self.images = 0
        self.answers: dict[str, int] = {}

    def arrived(self, key: str) -> None:
        """A request came in: counted before it is answered, so a test that kills a client can
        bound what was in flight (a request inside the server's latency has no status yet)."""
        self.received[key] = self.received.get(key, 0) + 1

    def count(self, key: str, status: int) -> None:
        code = str(status)
        per_path = self.requests.setdefault(key, {})
        per_path[code] = per_path.get(code, 0) + 1
        self.by_status[code] = self.by_status.get(code, 0) + 1

    def refused(self, rule: str) -> None:
        self.refused_by_rule[rule] = self.refused_by_rule.get(rule, 0) + 1

    def bill(self, usage: Usage, task: str | None, images: int) -> None:
        """One answer (or hop) billed; `task` None for a continuation hop (not a new answer)."""
        self.tokens["prompt"] += usage.prompt_tokens
        self.tokens["cached"] += usage.cached_tokens
        self.tokens["output"] += usage.output_tokens
        self.tokens["thoughts"] += usage.thoughts_tokens
        self.tokens["total"] += usage.total_tokens
        self.tokens_by_modality["TEXT"] += usage.text_tokens
        self.tokens_by_modality["IMAGE"] += usage.image_tokens
        self.images += images
        if task is not None:
            self.answers[task] = self.answers.get(task, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests_received": dict(self.received),
            "requests": {k: dict(v) for k, v in self.requests.items()},
            "requests_total": sum(self.by_status.values()),
            "responses_by_status": dict(self.by_status),
            "refused_by_rule": dict(self.refused_by_rule),
            "answers_by_task": dict(self.answers),
            "images": self.images,
            "tokens": {**self.tokens, "prompt_by_modality": dict(self.tokens_by_modality)},
        }
