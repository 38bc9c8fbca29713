"""Agreement between two labellings of the same images (no I/O)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float | None:
    """Cohen's kappa of two raters over the same items: (observed - chance) / (1 - chance),
    chance being the agreement two raters with these label frequencies reach by luck. None when
    chance is 1 (both gave every item one same label: kappa is undefined) or there are no
    items."""
    if len(a) != len(b):
        raise ValueError(f"kappa needs two labellings of the same items: {len(a)} vs {len(b)}")
    if not a:
        return None
    count = len(a)
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / count
    freq_a, freq_b = Counter(a), Counter(b)
    chance = sum(freq_a[k] * freq_b[k] for k in freq_a) / count**2
    return None if chance == 1 else (observed - chance) / (1 - chance)


def ratio(part: float, whole: float) -> float | None:
    """part / whole, None when there is no whole (no answer to measure against)."""
    return part / whole if whole else None


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """|a ∩ b| / |a ∪ b|; two empty sets agree (1.0)."""
    union = a | b
    return len(a & b) / len(union) if union else 1.0
