"""Exhaustive search over every cut set and ordered device assignment; the reference for tests and benches.

Cost: sum over k of C(L-1, k-1) · D!/(D-k)! placements — only for small L and D.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import replace
from itertools import combinations, permutations

from layerline.plan.costs import CostModel, Placement
from layerline.plan.problem import PlanningProblem

__all__ = ["brute_force", "count_placements", "feasible_placements", "select_best"]


def count_placements(num_blocks: int, num_devices: int) -> int:
    """How many placements the brute force enumerates."""
    return sum(
        math.comb(num_blocks - 1, k - 1) * math.perm(num_devices, k)
        for k in range(1, min(num_blocks, num_devices) + 1)
    )


def feasible_placements(problem: PlanningProblem) -> list[Placement]:
    """Every feasible placement of ``problem``, priced by the shared cost model, in enumeration order."""
    model = CostModel(problem)
    n = problem.num_blocks
    usable = problem.usable_devices
    found: list[Placement] = []
    for k in range(1, min(n, len(usable)) + 1):
        for cuts in combinations(range(1, n), k - 1):
            bounds = (0, *cuts, n)
            for devices in permutations(usable, k):
                stages = tuple((bounds[i], bounds[i + 1], devices[i]) for i in range(k))
                if not model.violations(stages):
                    found.append(model.evaluate(stages, check=False))
    return found


def select_best(
    placements: Iterable[Placement], objective: str = "latency", min_throughput_rps: float | None = None
) -> Placement | None:
    """The best of ``placements``: least latency, or least (bottleneck, latency) for ``throughput``.

    A floor keeps only plans with bottleneck <= 1 / min_throughput_rps. Ties keep the first one.
    """
    limit = math.inf if min_throughput_rps is None else 1.0 / min_throughput_rps
    best: Placement | None = None
    best_key: tuple[float, ...] = ()
    for placement in placements:
        if placement.bottleneck_s > limit:
            continue
        if objective == "throughput":
            key: tuple[float, ...] = (placement.bottleneck_s, placement.latency_s)
        else:
            key = (placement.latency_s,)
        if best is None or key < best_key:
            best, best_key = placement, key
    return None if best is None else replace(best, objective=objective)


def brute_force(
    problem: PlanningProblem, objective: str = "latency", min_throughput_rps: float | None = None
) -> Placement | None:
    """The best feasible placement by exhaustive search (None when there is none); see :func:`select_best`."""
    return select_best(feasible_placements(problem), objective, min_throughput_rps)
