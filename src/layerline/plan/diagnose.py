"""Say why no placement exists: a block that fits nowhere, contradictory pins, or the constraint to relax."""

from __future__ import annotations

from dataclasses import replace

from layerline.errors import PlanError
from layerline.plan.dp import PlacementDP
from layerline.plan.problem import Device, PlanningProblem

__all__ = ["check_static", "explain_infeasible"]


def check_static(problem: PlanningProblem) -> None:
    """Raise PlanError for contradictions visible without search (each message names the fix)."""
    usable = problem.usable_devices
    if not usable:
        raise PlanError("every device is excluded; leave at least one device out of `exclude`")
    for block, dev in sorted(problem.pins.items()):
        if dev in problem.exclude:
            raise PlanError(
                f"{problem.block_label(block)} is pinned to {dev!r}, which is excluded; "
                "drop the pin or the exclusion"
            )
    _check_pin_order(problem)
    for block in range(problem.num_blocks):
        _check_block(problem, block, usable)


def _check_pin_order(problem: PlanningProblem) -> None:
    """A device runs one contiguous stage, so its pinned blocks may not enclose a block pinned elsewhere."""
    pins = sorted(problem.pins.items())
    last_seen: dict[str, int] = {}
    prev_dev: str | None = None
    prev_block = -1
    for block, dev in pins:
        if dev != prev_dev and dev in last_seen:
            raise PlanError(
                f"{problem.block_label(last_seen[dev])} and {problem.block_label(block)} are pinned to "
                f"{dev!r} but {problem.block_label(prev_block)} between them is pinned to {prev_dev!r}; "
                "a device runs one contiguous stage, so change one of these pins"
            )
        last_seen[dev] = block
        prev_dev, prev_block = dev, block


def _check_block(problem: PlanningProblem, block: int, usable: tuple[str, ...]) -> None:
    need = problem.weight_bytes[block] + problem.activation_bytes[block]
    budgets = {d: problem.device(d).memory_budget_bytes for d in usable}
    if all(b is not None and b < need for b in budgets.values()):
        largest = max(budgets, key=lambda d: budgets[d] or 0)
        raise PlanError(
            f"{problem.block_label(block)} needs {need} bytes (weights {problem.weight_bytes[block]} + "
            f"activations {problem.activation_bytes[block]}) but the largest memory budget is "
            f"{budgets[largest]} bytes ({largest!r}); re-slice the model finer, give a device more memory, "
            "or add a bigger device"
        )
    reasons: list[str] = []
    for dev in usable:
        budget = budgets[dev]
        if not problem.block_allowed(block, dev):
            pinned = problem.pins.get(block)
            reasons.append(
                f"{dev!r}: pinned to {pinned!r}" if pinned not in (None, dev) else f"{dev!r}: forbidden"
            )
        elif budget is not None and need > budget:
            reasons.append(f"{dev!r}: needs {need} bytes, budget {budget}")
        else:
            return
    raise PlanError(
        f"{problem.block_label(block)} can run on no device ({'; '.join(reasons)}); relax its pin or forbid, "
        "or give a device more memory"
    )


def explain_infeasible(problem: PlanningProblem) -> str:
    """A message naming the constraint(s) whose removal would make a placement possible."""

    def feasible(p: PlanningProblem) -> bool:
        return PlacementDP(p).feasible()

    names = problem.device_names
    relaxations: list[str] = []
    no_memory = replace(problem, devices=tuple(Device(d.name, None, d.type) for d in problem.devices))
    if feasible(no_memory):
        total = sum(problem.weight_bytes)
        budget = sum(problem.device(d).memory_budget_bytes or 0 for d in problem.usable_devices)
        relaxations.append(
            "the memory budgets (each device runs at most one stage; the model's weights total "
            f"{total} bytes and the {len(problem.usable_devices)} usable devices' budgets total {budget} "
            "bytes): add devices or memory, or re-slice"
        )
    missing = _missing_links(problem)
    if missing:
        lat = {a: dict(problem.latency_s.get(a, {})) for a in names}
        bw = {a: dict(problem.bandwidth_Bps.get(a, {})) for a in names}
        for a, b in missing:
            lat[a][b], bw[a][b] = 0.0, float("inf")
        if feasible(replace(problem, latency_s=lat, bandwidth_Bps=bw)):
            shown = ", ".join(f"{a!r}->{b!r}" for a, b in missing[:6]) + (" ..." if len(missing) > 6 else "")
            relaxations.append(f"the missing links ({shown}): add them to latency_s and bandwidth_Bps")
    if problem.pins and feasible(replace(problem, pins={})):
        relaxations.append(f"the pins {dict(sorted(problem.pins.items()))}")
    if problem.forbid and feasible(replace(problem, forbid={})):
        relaxations.append("the forbids")
    if problem.exclude and feasible(replace(problem, exclude=frozenset())):
        relaxations.append(f"the exclusions {sorted(problem.exclude)}")
    if relaxations:
        return "constraints leave no plan; it becomes possible if you relax " + " OR ".join(relaxations)
    return (
        "constraints leave no plan: the memory budgets, links, pins, forbids and exclusions together rule "
        "out every placement; relax several of them"
    )


def _missing_links(problem: PlanningProblem) -> list[tuple[str, str]]:
    usable = problem.usable_devices
    pairs = [(problem.source, d) for d in usable]
    pairs += [(a, b) for a in usable for b in usable]
    pairs += [(d, problem.sink_device) for d in usable]
    seen: list[tuple[str, str]] = []
    for a, b in pairs:
        if a != b and problem.link(a, b) is None and (a, b) not in seen:
            seen.append((a, b))
    return seen
