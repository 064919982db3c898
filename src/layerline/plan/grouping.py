"""Group interchangeable devices so the optimiser counts them instead of tracking each one.

Two devices are interchangeable when swapping their names leaves the problem unchanged: same compute row,
hop overhead, memory budget and allowed blocks (pins/forbids), the same links to and from every other
device, the same link in both directions between them, and neither is the source or the sink. Swaps compose,
so this is an equivalence and a class is checked against its first member only. Grouping is exact: any
plan over the grouped problem maps to one over the named devices with the same cost, and back.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from layerline.plan.problem import PlanningProblem

__all__ = ["device_classes"]

logger = logging.getLogger(__name__)


def device_classes(
    problem: PlanningProblem, usable: Sequence[str], group: bool = True
) -> list[tuple[str, ...]]:
    """Partition ``usable`` into classes of interchangeable devices, keeping the given order."""
    if not group:
        return [(name,) for name in usable]
    special = {problem.source, problem.sink_device}
    others = [n for n in problem.device_names if n not in problem.exclude or n in special]
    signature = {
        name: (
            problem.compute_s[name],
            problem.hop_overhead_s[name],
            problem.device(name).memory_budget_bytes,
            tuple(problem.block_allowed(b, name) for b in range(problem.num_blocks)),
        )
        for name in usable
    }
    classes: list[list[str]] = []
    for name in usable:
        if name not in special:
            for members in classes:
                rep = members[0]
                if rep not in special and _swappable(problem, name, rep, signature, others):
                    members.append(name)
                    break
            else:
                classes.append([name])
        else:
            classes.append([name])
    by_type: dict[str, set[int]] = {}
    for i, members in enumerate(classes):
        for name in members:
            kind = problem.device(name).type
            if kind is not None:
                by_type.setdefault(kind, set()).add(i)
    for kind, ids in by_type.items():
        if len(ids) > 1:
            logger.debug(
                "devices of type %s differ (compute, memory, links or constraints): %d groups", kind, len(ids)
            )
    return [tuple(members) for members in classes]


def _swappable(problem: PlanningProblem, a: str, b: str, signature: dict, others: Sequence[str]) -> bool:
    if signature[a] != signature[b]:
        return False
    if problem.link(a, b) != problem.link(b, a):
        return False
    for x in others:
        if x in (a, b):
            continue
        if problem.link(a, x) != problem.link(b, x) or problem.link(x, a) != problem.link(x, b):
            return False
    return True
