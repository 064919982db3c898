"""Simple placements to compare the optimiser against; each raises PlanError when it is not feasible."""

from __future__ import annotations

import math
from dataclasses import replace

from layerline.errors import PlanError
from layerline.plan.balance import balanced_split
from layerline.plan.costs import CostModel, Placement
from layerline.plan.problem import PlanningProblem

__all__ = ["all_on_fastest", "all_on_source", "baselines", "best_two_way", "even_split"]


def all_on_source(problem: PlanningProblem) -> Placement:
    """Every block on the source device."""
    placement = CostModel(problem).evaluate([(0, problem.num_blocks, problem.source)])
    return replace(placement, objective="baseline:all_on_source")


def all_on_fastest(problem: PlanningProblem) -> Placement:
    """Every block on the usable device with the smallest total compute (plus its hop overhead) that can hold
    the whole model."""
    model = CostModel(problem)
    n = problem.num_blocks
    order = sorted(problem.usable_devices, key=lambda d: model.busy_s(d, 0, n))
    for device in order:
        stages = ((0, n, device),)
        if not model.violations(stages):
            return replace(model.evaluate(stages), objective="baseline:all_on_fastest")
    raise PlanError(
        "no single device can run the whole model (memory, pins, forbids or links); use `optimize`"
    )


def even_split(problem: PlanningProblem) -> Placement:
    """Equal block counts over the k fastest usable devices (k = their number, at most one per block).

    Stages go fastest device first (by total compute plus hop overhead).
    """
    model = CostModel(problem)
    n = problem.num_blocks
    order = sorted(problem.usable_devices, key=lambda d: model.busy_s(d, 0, n))
    k = min(len(order), n)
    ranges = balanced_split([1.0] * n, k)
    stages = [(start, stop, order[i]) for i, (start, stop) in enumerate(ranges)]
    return replace(model.evaluate(stages), objective="baseline:even_split")


def best_two_way(problem: PlanningProblem) -> Placement:
    """Neurosurgeon-style: blocks [0, c) on the source, [c, L) on one other device; the least latency."""
    model = CostModel(problem)
    n = problem.num_blocks
    source = problem.source
    best: Placement | None = None
    for device in problem.usable_devices:
        if device == source:
            continue
        for cut in range(n + 1):
            stages = [(0, cut, source), (cut, n, device)]
            stages = [s for s in stages if s[1] > s[0]]
            if model.violations(tuple(stages)):
                continue
            placement = model.evaluate(stages, check=False)
            if best is None or placement.latency_s < best.latency_s:
                best = placement
    if best is None or not math.isfinite(best.latency_s):
        raise PlanError(f"no split between {source!r} and one other device is feasible; use `optimize`")
    return replace(best, objective="baseline:best_two_way")


def baselines(problem: PlanningProblem) -> dict[str, Placement | PlanError]:
    """Every baseline by name, or the PlanError saying why it is not feasible."""
    out: dict[str, Placement | PlanError] = {}
    for name, fn in (
        ("all_on_source", all_on_source),
        ("all_on_fastest", all_on_fastest),
        ("even_split", even_split),
        ("best_two_way", best_two_way),
    ):
        try:
            out[name] = fn(problem)
        except PlanError as exc:
            out[name] = exc
    return out
