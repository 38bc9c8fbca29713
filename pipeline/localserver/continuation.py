"""Interactions `requires_continuation` hops (rule interactions.decode-limit).

With a per-request decode limit (`--decode-limit N` output tokens), an answer longer than N comes
in hops: each hop carries at most N tokens of the answer, every hop but the last has status
`requires_continuation` and a `continuation_token`. The client resumes by re-sending the original
body plus the token (store: false), or the token with `previous_interaction_id` and no input
(store: true) — as the SDK's automatic continuation does (_interactions_continuation.py). A token
is good for one hop, for the request it was issued to.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass, replace

from pipeline.gemini.tokens import text_tokens
from pipeline.localserver import errors
from pipeline.localserver.answering import head
from pipeline.localserver.billing import Usage
from pipeline.localserver.caching import Prefix

PENDING_CAPACITY = 1024  # unanswered continuations kept (oldest dropped)


@dataclass(frozen=True, slots=True)
class Turn:
    """What one create call delivers: answer text still to send, and what it bills."""

    model: str
    fingerprint: bytes  # Prompted.fingerprint() of the request answered
    prompt: Usage  # input tokens, billed again by every hop (each hop re-prefills)
    text: str
    finish: str  # STOP | MAX_TOKENS of the whole answer, reported by its last hop
    thoughts: int
    task: str | None  # None for a continuation hop (not a new answer)
    images: int
    prefix: Prefix = ()  # the prompt's pieces, for the implicit cache of each hop (caching.py)


@dataclass(frozen=True, slots=True)
class Pending:
    """The rest of an answer, as the turn of its next hop, and the hop that issued the token."""

    rest: Turn
    interaction_id: str

    @staticmethod
    def after(turn: Turn, rest: str, interaction_id: str) -> Pending:
        return Pending(replace(turn, text=rest, thoughts=0, task=None), interaction_id)


class Continuations:
    """Cuts answers into hops and keeps the rest of each until its next hop asks."""

    def __init__(self, decode_limit: int | None) -> None:
        self.decode_limit = decode_limit
        self._pending: OrderedDict[str, Pending] = OrderedDict()
        self.issued = 0

    def split(self, text: str) -> tuple[str, str]:
        """(what this hop carries, what is left: "" when the text fits the decode limit)."""
        limit = self.decode_limit
        if limit is None or text_tokens(text) <= limit:
            return text, ""
        first = head(text, limit)
        return first, text[len(first) :]

    def issue(self, pending: Pending) -> str:
        """A new token for `pending` (its `rest` is not empty)."""
        token = secrets.token_urlsafe(24)
        self._pending[token] = pending
        if len(self._pending) > PENDING_CAPACITY:
            self._pending.popitem(last=False)
        self.issued += 1
        return token

    def take(self, token: str) -> Pending:
        """The pending rest a token stands for; a token is used once (400 otherwise)."""
        pending = self._pending.pop(token, None)
        if pending is None:
            raise errors.invalid_argument(
                "The continuation_token is invalid or was already used.",
                rule="interactions.continuation",
            )
        return pending

    def restore(self, token: str, pending: Pending) -> None:
        """Put back a token whose hop was refused (quota, credits) so the client can retry."""
        self._pending[token] = pending

    @property
    def waiting(self) -> int:
        return len(self._pending)
