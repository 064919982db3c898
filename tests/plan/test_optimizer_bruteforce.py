"""The DP optimiser against exhaustive search on hundreds of random small instances."""

from __future__ import annotations

import math
import random

import pytest
from plan_cases import random_problem

from layerline.errors import PlanError
from layerline.plan.bruteforce import brute_force, count_placements, feasible_placements, select_best
from layerline.plan.costs import evaluate_placement, placement_violations
from layerline.plan.optimizer import optimize

REL = 1e-9


def _solve(problem, objective, rps=None, group=True):
    try:
        return optimize(problem, objective, min_throughput_rps=rps, group_identical=group)
    except PlanError:
        return None


def _check_same(problem, dp, bf, objective, rps):
    assert (dp is None) == (bf is None), (objective, rps, dp, bf)
    if dp is None:
        return
    assert not placement_violations(problem, dp.stages)
    again = evaluate_placement(problem, dp.stages)
    assert (again.latency_s, again.bottleneck_s, again.throughput_rps) == (
        dp.latency_s,
        dp.bottleneck_s,
        dp.throughput_rps,
    )
    assert again.breakdown == dp.breakdown and again.transfer_out_s == dp.transfer_out_s
    assert math.isclose(dp.latency_s, bf.latency_s, rel_tol=REL, abs_tol=1e-12)
    if objective == "throughput":
        # the bottleneck is a max of identically computed numbers: exact
        assert dp.bottleneck_s == bf.bottleneck_s
    if rps is not None:
        assert dp.bottleneck_s <= 1.0 / rps


def _floors(rng, placements):
    """Throughput floors that bind exactly at, near, and beyond the best achievable bottleneck."""
    best = select_best(placements, "throughput")
    if best is None or best.bottleneck_s == 0:
        return [1.0]
    some = rng.choice(placements).bottleneck_s
    floors = [1.0 / best.bottleneck_s, 1.0 / (best.bottleneck_s * 1.5), 1.2 / best.bottleneck_s]
    if some > 0:
        floors.append(1.0 / some)
    return floors


@pytest.mark.parametrize("chunk", range(4))
def test_dp_matches_brute_force(chunk):
    rng = random.Random(1000 + chunk)
    infeasible = feasible = with_overhead = 0
    for _ in range(90):
        problem = random_problem(rng)
        with_overhead += any(problem.hop_overhead_s.values())
        placements = feasible_placements(problem)
        for objective in ("latency", "throughput"):
            bf = select_best(placements, objective)
            _check_same(problem, _solve(problem, objective), bf, objective, None)
            feasible += bf is not None
            infeasible += bf is None
        for rps in _floors(rng, placements):
            bf = select_best(placements, "latency", rps)
            _check_same(problem, _solve(problem, "latency", rps), bf, "latency", rps)
    # the generator must produce both kinds (and hop overheads), or this test proves little
    assert feasible > 40 and infeasible > 5 and with_overhead > 25


def test_grouped_devices_give_the_same_optimum():
    rng = random.Random(7)
    grouped_somewhere = 0
    for _ in range(120):
        problem = random_problem(rng, max_blocks=6, max_devices=5, identical=True)
        for objective in ("latency", "throughput"):
            a = _solve(problem, objective, group=True)
            b = _solve(problem, objective, group=False)
            assert (a is None) == (b is None)
            if a is None:
                continue
            assert math.isclose(a.latency_s, b.latency_s, rel_tol=REL, abs_tol=1e-12)
            assert a.bottleneck_s == b.bottleneck_s
            assert not placement_violations(problem, a.stages)
            if a.device_classes < len(problem.usable_devices):
                grouped_somewhere += 1
                assert a.states < b.states
    assert grouped_somewhere > 30


def test_grouped_matches_brute_force():
    rng = random.Random(11)
    for _ in range(60):
        problem = random_problem(rng, max_blocks=5, max_devices=4, identical=True)
        for objective in ("latency", "throughput"):
            _check_same(problem, _solve(problem, objective), brute_force(problem, objective), objective, None)


def test_count_placements_matches_enumeration():
    rng = random.Random(3)
    problem = random_problem(rng, max_blocks=5, max_devices=3, constraints=False)
    while problem.num_blocks < 4 or len(problem.devices) < 3:
        problem = random_problem(rng, max_blocks=5, max_devices=3, constraints=False)
    assert count_placements(4, 3) == 3 + 3 * 6 + 3 * 6  # k=1, 2, 3
    budgetless = problem.num_blocks, len(problem.devices)
    assert count_placements(*budgetless) >= len(feasible_placements(problem))
