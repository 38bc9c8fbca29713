"""Implicit caching (`--implicit-cache`, rule billing.implicit-cache): the prompt tokens a request
shares with a recent one, reported as cached and billed at the cached rate.

The service caches prompt prefixes on its own ("implicit caching is enabled by default for all
Gemini 2.5 and newer models"; "try to send requests with similar prefix in a short amount of
time": the caching page, read 2026-10) and reports the hits as `usageMetadata.
cachedContentTokenCount` (Interactions: `usage.total_cached_tokens`); the pricing page (read
2026-10) bills them at the cached rate. When it caches is the service's to decide, so the
double's rule is ours, simple and deterministic:

- a request's prompt is a sequence of pieces: the system instruction, then its content in the
  order sent (each text part, each image by its bytes and media resolution), each with its
  tokens by the billing rules (pipeline/gemini/tokens.py, as billing.prompt_usage counts them);
- its cached tokens are those of the longest run of leading pieces it shares with a request of
  the same model answered within the last CACHE_SECONDS, when they reach the model's minimum
  (the model table's `cache_min_tokens`, from the caching page's table: 2,048 for 2.5 Flash and
  Pro, 4,096 for the 3.x models; nothing before 2.5), else 0;
- every answered request (and Interactions hop) leaves its own prefixes for the next ones; a
  refused one leaves nothing. Batch Mode lines are not cached here.

So a run whose requests start with the same system instruction and reference images gets them
cached from its second request on, exactly once uncached per window.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

from pipeline.gemini.tokens import image_tokens, text_tokens
from pipeline.localserver.answering import Prompted
from pipeline.models import lookup

CACHE_SECONDS = 300.0  # how long a prefix stays cached: an assumption (no page gives it)
CAPACITY = 65_536  # prefixes kept at most (the oldest dropped first)

# (digest of a piece, its tokens), in the order the model reads them
Prefix = tuple[tuple[bytes, int], ...]


def prefix_of(prompted: Prompted) -> Prefix:
    """The pieces of `prompted`'s prompt (see the module docstring)."""
    pieces = [_text(prompted.ask.system)] if prompted.ask.system else []
    for part in prompted.parts:
        if isinstance(part, str):
            pieces.append(_text(part))
            continue
        level = part.resolution or prompted.media_resolution
        tokens = image_tokens(prompted.model, part.image.width, part.image.height, level)
        pieces.append((f"image\0{part.sha256}\0{level}".encode(), tokens))
    return tuple(pieces)


def _text(text: str) -> tuple[bytes, int]:
    return b"text\0" + text.encode("utf-8"), text_tokens(text)


def minimum_tokens(model: str) -> int | None:
    """The shortest prefix the model's implicit cache serves (the minimum the caching page
    gives for both kinds of caching); None: no caching ("2.5 and newer")."""
    return lookup(model).cache_min_tokens


class ImplicitCache:
    """Recent prompt prefixes by model; off unless `enabled`."""

    def __init__(self, enabled: bool, clock: Callable[[], float]) -> None:
        self.enabled = enabled
        self.clock = clock
        self._expiry: OrderedDict[bytes, float] = OrderedDict()  # prefix digest -> expiry
        self.hits = 0

    def served(self, model: str, prefix: Prefix) -> int:
        """The cached tokens of an answered request of `model` with this `prefix` (0 when
        off or missed); its own prefixes are then remembered for CACHE_SECONDS."""
        minimum = minimum_tokens(model) if self.enabled else None
        if minimum is None:
            return 0
        now = self.clock()
        cached = 0
        for digest, tokens in _boundaries(model, prefix, minimum):
            if self._expiry.get(digest, 0.0) > now:
                cached = tokens
            self._expiry[digest] = now + CACHE_SECONDS
            self._expiry.move_to_end(digest)
        while len(self._expiry) > CAPACITY:
            self._expiry.popitem(last=False)
        self.hits += cached > 0
        return cached


def _boundaries(model: str, prefix: Prefix, minimum: int) -> list[tuple[bytes, int]]:
    """(digest of the first n pieces, their tokens) for every n whose tokens reach `minimum`."""
    chain = hashlib.sha256(model.encode("utf-8"))
    total = 0
    found = []
    for piece, tokens in prefix:
        chain.update(hashlib.sha256(piece).digest())
        total += tokens
        if total >= minimum:
            found.append((chain.copy().digest(), total))
    return found
