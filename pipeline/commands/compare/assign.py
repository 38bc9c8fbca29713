"""Optimal assignment for the small matrices of one image's objects (no I/O).

The Hungarian method in its shortest-augmenting-path form (Jonker-Volgenant's potentials; the
e-maxx formulation): one row is added at a time and joined to the matching by the cheapest
alternating path, found with the column potentials. The inner loop over columns is numpy, so an
image of a few hundred objects takes milliseconds. scipy's `linear_sum_assignment` does the same,
but scipy is a 40 MB dependency for forty lines; tests/test_compare.py checks this one against
every permutation on small matrices.
"""

from __future__ import annotations

import numpy as np


def max_weight_pairs(weights: np.ndarray) -> list[tuple[int, int]]:
    """The (row, column) pairs of a matching of greatest total weight, each row and column used
    at most once; pairs of weight <= 0 are left out (they add nothing: not a match)."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or 0 in weights.shape:
        return []
    positive = weights > 0
    rows, cols = np.flatnonzero(positive.any(axis=1)), np.flatnonzero(positive.any(axis=0))
    if positive.sum() == len(rows) == len(cols):
        # the common case (each object overlaps at most one other): nothing to choose between
        return sorted((int(r), int(c)) for r, c in zip(*np.nonzero(positive), strict=True))
    # rows and columns with nothing to gain take no part: a smaller matrix to solve
    chosen = _solve(weights[np.ix_(rows, cols)])
    return sorted((int(rows[r]), int(cols[c])) for r, c in chosen)


def _solve(weights: np.ndarray) -> list[tuple[int, int]]:
    """The Hungarian method on the smaller side's rows (module doc)."""
    flipped = weights.shape[0] > weights.shape[1]
    # a pair worth nothing or less is as good as no pair: at 0, a full assignment of the rows
    # is a best matching once those pairs are dropped
    gain = np.clip(weights.T if flipped else weights, 0, None)
    cost = -gain
    pairs = ((c, r) if flipped else (r, c) for r, c in _min_cost_rows(cost))
    return [(r, c) for r, c in pairs if weights[r, c] > 0]


def _min_cost_rows(cost: np.ndarray) -> list[tuple[int, int]]:
    """A full assignment of the rows of `cost` (rows <= columns) of least total cost."""
    rows, cols = cost.shape
    row_pot = np.zeros(rows + 1)
    col_pot = np.zeros(cols + 1)
    owner = np.zeros(cols + 1, dtype=np.int64)  # owner[j]: 1-based row holding column j; 0 free
    for row in range(1, rows + 1):
        owner[0] = row  # column 0 is the path's start, held by the row being added
        _augment(owner, _shortest_path(cost, row_pot, col_pot, owner))
    return [(int(owner[j]) - 1, j - 1) for j in range(1, cols + 1) if owner[j]]


def _shortest_path(
    cost: np.ndarray, row_pot: np.ndarray, col_pot: np.ndarray, owner: np.ndarray
) -> tuple[np.ndarray, int]:
    """Grow the alternating tree from column 0 until it reaches a free column; the potentials
    are updated in place. Returns (the predecessor of each column on the path, the free column
    reached)."""
    cols = cost.shape[1]
    slack = np.full(cols + 1, np.inf)
    way = np.zeros(cols + 1, dtype=np.int64)
    used = np.zeros(cols + 1, dtype=bool)
    column = 0
    while True:
        used[column] = True
        row = owner[column]
        reduced = cost[row - 1] - row_pot[row] - col_pot[1:]
        free = ~used[1:]
        better = free & (reduced < slack[1:])
        slack[1:][better] = reduced[better]
        way[1:][better] = column
        masked = np.where(free, slack[1:], np.inf)
        nearest = int(np.argmin(masked)) + 1
        delta = masked[nearest - 1]
        row_pot[owner[used]] += delta
        col_pot[used] -= delta
        slack[1:][free] -= delta
        column = nearest
        if owner[column] == 0:
            return way, column


def _augment(owner: np.ndarray, found: tuple[np.ndarray, int]) -> None:
    """Flip the path back from the free column to column 0: each column takes its predecessor's
    row."""
    way, column = found
    while column:
        previous = int(way[column])
        owner[column] = owner[previous]
        column = previous
