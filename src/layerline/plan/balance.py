"""Split a chain of blocks into k contiguous ranges with the smallest maximum range cost (exact).

The optimum maximum ``M*`` is found by binary search over the O(L²) candidate range sums with a greedy
feasibility test (O(L) each). Among all splits whose ranges all cost at most ``M*``, a second DP
(O(k·L²), vectorised) picks the one with the smallest sum of squared range costs, and among those the
lexicographically earliest cut positions — so the result is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from layerline.errors import PlanError

__all__ = ["balanced_split"]


def balanced_split(costs: Sequence[float], k: int) -> tuple[tuple[int, int], ...]:
    """Split ``len(costs)`` blocks into exactly ``k`` non-empty half-open ranges minimising the max cost."""
    n = len(costs)
    if n == 0:
        raise PlanError("cannot split a model with no blocks; slice the model first")
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise PlanError(f"the number of stages must be an integer, got {k!r}")
    if k < 1:
        raise PlanError(f"--stages {k} is not possible; use at least 1")
    if k > n:
        raise PlanError(
            f"--stages {k} but the model has only {n} blocks; use at most {n} or re-slice with finer "
            "granularity"
        )
    values = np.asarray(costs, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values) | (values < 0))
    if bad.size:
        b = int(bad[0])
        raise PlanError(f"block {b} has cost {costs[b]!r}; block costs must be finite and >= 0")
    prefix = np.concatenate(([0.0], np.cumsum(values)))
    # cost[i, t] = cost of range [i, t) for i < t, computed one way only (prefix differences).
    cost = prefix[None, :] - prefix[:, None]
    upper = np.triu(np.ones((n + 1, n + 1), dtype=bool), 1)
    best = _min_max(prefix, cost[upper], k)
    return _min_squares(cost, upper & (cost <= best), k)


def _greedy_count(prefix: np.ndarray, limit: float) -> float:
    """The fewest ranges whose costs are all <= limit (math.inf if a single block exceeds it)."""
    n = len(prefix) - 1
    count, start = 0, 0
    while start < n:
        # the largest stop with prefix[stop] - prefix[start] <= limit; differences are monotone in stop
        stop = start
        lo, hi = start + 1, n
        while lo <= hi:
            mid = (lo + hi) // 2
            if prefix[mid] - prefix[start] <= limit:
                stop, lo = mid, mid + 1
            else:
                hi = mid - 1
        if stop == start:
            return math.inf
        count, start = count + 1, stop
    return count


def _min_max(prefix: np.ndarray, candidates: np.ndarray, k: int) -> float:
    """The smallest candidate range cost M such that k ranges each <= M exist (splitting never hurts)."""
    values = np.unique(candidates)
    lo, hi = 0, len(values) - 1  # values[hi] (the whole model) is always feasible
    while lo < hi:
        mid = (lo + hi) // 2
        if _greedy_count(prefix, float(values[mid])) <= k:
            hi = mid
        else:
            lo = mid + 1
    return float(values[lo])


def _min_squares(cost: np.ndarray, allowed: np.ndarray, k: int) -> tuple[tuple[int, int], ...]:
    """Exactly k allowed ranges minimising the sum of squared costs; earliest cuts on ties."""
    n = cost.shape[0] - 1
    square = np.where(allowed, cost * cost, np.inf)
    # h[j][i]: the least sum of squares covering blocks [i, n) with j allowed ranges.
    h = np.full((k + 1, n + 1), np.inf)
    h[0, n] = 0.0
    for j in range(1, k + 1):
        h[j] = np.min(square + h[j - 1][None, :], axis=1)
    assert math.isfinite(h[k, 0]), "the min-max bound admits a split by construction"
    ranges: list[tuple[int, int]] = []
    start = 0
    for j in range(k, 0, -1):
        row = square[start] + h[j - 1]
        stop = int(np.flatnonzero(row == h[j, start])[0])  # the earliest cut achieving the optimum
        ranges.append((start, stop))
        start = stop
    assert start == n
    return tuple(ranges)
