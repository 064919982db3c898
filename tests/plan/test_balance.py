"""balanced_split against exhaustive search, its tie-breaking and its errors."""

from __future__ import annotations

import math
import random
import time
from itertools import combinations

import pytest

from layerline.errors import PlanError
from layerline.plan import balanced_split


def _ranges(cuts, n):
    bounds = (0, *cuts, n)
    return tuple((bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1))


def _brute(costs, k):
    """All optimal splits as (max, sum of squares, cuts), best first by the documented tie-break."""
    n = len(costs)
    scored = []
    for cuts in combinations(range(1, n), k - 1):
        sums = [sum(costs[a:b]) for a, b in _ranges(cuts, n)]
        scored.append((max(sums), sum(s * s for s in sums), cuts))
    return sorted(scored)


def test_matches_brute_force_on_random_floats():
    rng = random.Random(4)
    for _ in range(300):
        n = rng.randint(1, 9)
        costs = [rng.uniform(0, 10) for _ in range(n)]
        k = rng.randint(1, n)
        split = balanced_split(costs, k)
        assert len(split) == k and split[0][0] == 0 and split[-1][1] == n
        assert all(a < b for a, b in split) and all(split[i][1] == split[i + 1][0] for i in range(k - 1))
        best = _brute(costs, k)[0][0]
        assert math.isclose(max(sum(costs[a:b]) for a, b in split), best, rel_tol=1e-12)


def test_ties_prefer_small_sum_of_squares_then_early_cuts():
    rng = random.Random(9)
    for _ in range(300):
        n = rng.randint(1, 9)
        costs = [float(rng.randint(0, 4)) for _ in range(n)]  # small integers: many exact ties
        k = rng.randint(1, n)
        expected = _ranges(_brute(costs, k)[0][2], n)
        assert balanced_split(costs, k) == expected, (costs, k)


def test_examples():
    assert balanced_split([1, 1, 1, 1], 2) == ((0, 2), (2, 4))
    assert balanced_split([5, 1, 1, 1, 1, 1], 2) == ((0, 1), (1, 6))
    assert balanced_split([2, 2, 2], 3) == ((0, 1), (1, 2), (2, 3))
    # max 4 and sum of squares 36 for every arrangement of sizes (2, 2, 1): the earliest cuts (1, 3) win
    assert balanced_split([2, 2, 2, 2, 2], 3) == ((0, 1), (1, 3), (3, 5))
    # here the only split with max 4 is into equal thirds
    assert balanced_split([2, 2, 2, 2, 2, 2], 3) == ((0, 2), (2, 4), (4, 6))
    assert balanced_split([0.0, 0.0, 3.0], 2) == ((0, 1), (1, 3))


@pytest.mark.parametrize(
    ("costs", "k", "pattern"),
    [
        ([1, 2, 3], 5, "--stages 5 but the model has only 3 blocks; use at most 3 or re-slice with finer"),
        ([1, 2, 3], 0, "--stages 0 is not possible; use at least 1"),
        ([], 1, "no blocks"),
        ([1, -1], 1, "block 1 has cost -1"),
        ([1, float("nan")], 1, "block 1 has cost nan"),
        ([1, 2], 1.5, "must be an integer"),
    ],
)
def test_errors(costs, k, pattern):
    with pytest.raises(PlanError, match=pattern):
        balanced_split(costs, k)


def test_large_split_is_fast_and_deterministic():
    rng = random.Random(1)
    costs = [rng.uniform(0.5, 2.0) for _ in range(300)]
    started = time.perf_counter()
    results = [balanced_split(costs, k) for k in (2, 8, 64, 300)]
    assert time.perf_counter() - started < 2.0
    assert results[-1] == tuple((i, i + 1) for i in range(300))
    assert balanced_split(costs, 8) == results[1]
    limit = max(sum(costs[a:b]) for a, b in results[1])
    assert limit < sum(costs) / 8 + 2.0  # within one block of the ideal share
