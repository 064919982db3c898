"""Exact placement of contiguous stages on distinct devices (see :mod:`layerline.plan.dp` for the DP).

Objectives:

- ``latency``: the least end-to-end latency (every compute, hop overhead and transfer, source → stages →
  sink);
- ``throughput``: the smallest bottleneck (largest single stage busy time — compute plus hop overhead — or
  transfer), then the least latency;
- ``latency`` with ``min_throughput_rps``: the least latency among plans whose bottleneck is at most
  ``1 / min_throughput_rps``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace

from layerline.errors import PlanError
from layerline.plan.costs import CostModel, Placement
from layerline.plan.diagnose import check_static, explain_infeasible
from layerline.plan.dp import PlacementDP
from layerline.plan.problem import PlanningProblem

__all__ = ["OPTIMIZER_OBJECTIVES", "optimize"]

logger = logging.getLogger(__name__)

OPTIMIZER_OBJECTIVES = ("latency", "throughput")


def optimize(
    problem: PlanningProblem,
    objective: str = "latency",
    *,
    min_throughput_rps: float | None = None,
    group_identical: bool = True,
) -> Placement:
    """The optimal placement for ``objective``; PlanError naming the cause when none exists.

    ``group_identical=False`` tracks every device separately (slower; for checking the grouping).
    """
    started = time.perf_counter()
    if objective not in OPTIMIZER_OBJECTIVES:
        raise PlanError(f"unknown objective {objective!r}; use one of {', '.join(OPTIMIZER_OBJECTIVES)}")
    limit = math.inf
    if min_throughput_rps is not None:
        if not (math.isfinite(min_throughput_rps) and min_throughput_rps > 0):
            raise PlanError(
                f"min_throughput_rps is {min_throughput_rps!r}; use a positive number of requests/s"
            )
        limit = 1.0 / min_throughput_rps
    check_static(problem)
    dp = PlacementDP(problem, group=group_identical)
    if not dp.feasible():
        raise PlanError(explain_infeasible(problem))
    if objective == "throughput":
        best = dp.min_bottleneck()
        assert math.isfinite(best), "a feasible problem has a finite bottleneck"
        if best > limit:
            _unreachable(min_throughput_rps, best)
        limit = best
    elif math.isfinite(limit) and not dp.feasible(limit):
        _unreachable(min_throughput_rps, dp.min_bottleneck())
    stages = dp.least_latency(limit)
    assert stages is not None, "the limit was checked feasible"
    placement = CostModel(problem).evaluate(stages)
    assert placement.bottleneck_s <= limit, "the DP and the cost model price stages identically"
    elapsed = time.perf_counter() - started
    logger.debug(
        "planned %d blocks on %d devices (%d groups, %d states) for %s in %.3f s",
        problem.num_blocks,
        len(problem.usable_devices),
        len(dp.classes),
        dp.n_states,
        objective,
        elapsed,
    )
    return replace(
        placement,
        objective=objective,
        solve_time_s=elapsed,
        device_classes=len(dp.classes),
        states=dp.n_states,
    )


def _unreachable(rps: float | None, best: float) -> None:
    reachable = 1.0 / best if best > 0 else math.inf
    raise PlanError(
        f"min_throughput_rps={rps} is unreachable: the best possible bottleneck is {best:.6g} s "
        f"({reachable:.6g} requests/s); lower the floor, add devices or bandwidth, or relax constraints"
    )
