"""Infeasible and malformed planning problems: each PlanError names the cause and the fix."""

from __future__ import annotations

from dataclasses import replace

import pytest

from layerline.errors import PlanError
from layerline.plan import Device, PlanningProblem, evaluate_placement, full_mesh, optimize
from layerline.plan.dp import MAX_STATE_CELLS


def _problem(n=4, names=("a", "b", "c"), budgets=None, **kw):
    lat, bw = full_mesh(names, 0.001, 1e6)
    budgets = budgets or {}
    args = {
        "compute_s": {x: [0.01 * (i + 1)] * n for i, x in enumerate(names)},
        "weight_bytes": [100] * n,
        "activation_bytes": [10] * n,
        "boundary_bytes": [50] * (n + 1),
        "devices": [Device(x, budgets.get(x)) for x in names],
        "latency_s": lat,
        "bandwidth_Bps": bw,
        "source": names[0],
        "block_names": [f"layer{i}" for i in range(n)],
    }
    args.update(kw)
    return PlanningProblem(**args)


def test_block_that_fits_nowhere_names_block_bytes_and_budget():
    problem = replace(_problem(budgets={"a": 300, "b": 200, "c": 250}), weight_bytes=[100, 100, 400, 100])
    with pytest.raises(PlanError) as err:
        optimize(problem)
    msg = str(err.value)
    assert "block 2 ('layer2')" in msg and "410 bytes" in msg and "300 bytes" in msg and "'a'" in msg
    assert "re-slice" in msg


def test_pin_to_excluded_device():
    with pytest.raises(PlanError, match=r"block 1 .* pinned to 'b', which is excluded; drop the pin"):
        optimize(_problem(pins={1: "b"}, exclude={"b"}))


def test_contradictory_pins():
    with pytest.raises(PlanError, match=r"block 0 .*block 3 .* pinned to 'a' but block 2 .* pinned to 'b'"):
        optimize(_problem(pins={0: "a", 2: "b", 3: "a"}))


def test_block_forbidden_everywhere():
    with pytest.raises(PlanError, match=r"block 3 \('layer3'\) can run on no device .*'c': forbidden"):
        optimize(_problem(forbid={3: {"a", "b", "c"}}))


def test_memory_budgets_as_a_whole():
    # each device holds at most one block (110 bytes); four blocks, three devices
    problem = _problem(budgets={"a": 150, "b": 150, "c": 150})
    with pytest.raises(PlanError, match=r"constraints leave no plan.*memory budgets .*add devices or memory"):
        optimize(problem)
    # with a fourth device it works, one block per device
    bigger = _problem(names=("a", "b", "c", "d"), budgets={x: 150 for x in "abcd"})
    assert len(optimize(bigger).stages) == 4


def test_missing_links_are_named():
    problem = _problem(budgets={"a": 150})
    lat = {"a": {}, "b": {"c": 0.001}, "c": {"b": 0.001}}
    bw = {"a": {}, "b": {"c": 1e6}, "c": {"b": 1e6}}
    with pytest.raises(PlanError, match=r"missing links \('a'->'b', 'a'->'c'.*add them"):
        optimize(replace(problem, latency_s=lat, bandwidth_Bps=bw))


def test_unreachable_throughput_floor():
    problem = _problem()
    best = optimize(problem, "throughput")
    at_best = optimize(problem, min_throughput_rps=best.throughput_rps * (1 - 1e-12))
    assert at_best.bottleneck_s == best.bottleneck_s
    with pytest.raises(PlanError, match=r"min_throughput_rps=.* unreachable: the best possible bottleneck"):
        optimize(problem, min_throughput_rps=best.throughput_rps * 1.01)
    with pytest.raises(PlanError, match="unreachable"):
        optimize(problem, "throughput", min_throughput_rps=best.throughput_rps * 1.01)
    with pytest.raises(PlanError, match="positive number"):
        optimize(problem, min_throughput_rps=0)


def test_bad_objective_and_all_excluded():
    with pytest.raises(PlanError, match="unknown objective 'fast'"):
        optimize(_problem(), "fast")
    with pytest.raises(PlanError, match="every device is excluded"):
        optimize(_problem(exclude={"a", "b", "c"}))


def test_too_many_distinct_devices_asks_for_grouping():
    names = tuple(f"d{i}" for i in range(20))
    problem = _problem(n=60, names=names)
    assert MAX_STATE_CELLS < (2**20) * 20 * 61
    with pytest.raises(PlanError, match="identical profiles, memory and links so they are grouped"):
        optimize(problem)


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"activation_bytes": [1, 2]}, "activation_bytes has 2 entries"),
        ({"boundary_bytes": [1] * 4}, "boundary_bytes has 4 entries; give one per cut 0..4"),
        ({"weight_bytes": [1, -1, 1, 1]}, r"weight_bytes\[1\] is -1"),
        ({"compute_s": {"a": [0.1] * 4, "b": [0.1] * 4}}, "no row for device 'c'"),
        ({"compute_s": {x: [0.1, 0.1, float("inf"), 0.1] for x in "abc"}}, r"use forbid=\{2: \{'a'\}\}"),
        ({"source": "z"}, "source device 'z' is not one of the devices"),
        ({"pins": {9: "a"}}, r"pins names block 9; blocks are 0..3"),
        ({"pins": {1: "z"}}, "pinned to unknown device 'z'"),
        ({"forbid": {1: {"z"}}}, "unknown device 'z'"),
        ({"exclude": {"z"}}, "exclude names unknown device 'z'"),
        ({"bandwidth_Bps": {"a": {"b": 0.0}}}, r"bandwidth_Bps\['a'\]\['b'\] is 0.0"),
        ({"devices": [Device("a"), Device("a")]}, "listed twice"),
        ({"devices": [Device("a", -5)]}, "memory_budget_bytes=-5"),
    ],
)
def test_malformed_problems(change, pattern):
    with pytest.raises(PlanError, match=pattern):
        _problem(**change)


def test_compute_rows_may_be_keyed_by_type():
    problem = _problem(
        devices=[Device("a", None, "pi"), Device("b", None, "pi"), Device("c")],
        compute_s={"pi": [0.5] * 4, "c": [0.1] * 4},
    )
    assert problem.compute_s["b"] == (0.5,) * 4


@pytest.mark.parametrize(
    ("stages", "pattern"),
    [
        ([(0, 2, "a"), (3, 4, "b")], "stage 1 covers"),
        ([(0, 2, "a"), (2, 4, "a")], "device 'a' runs two stages"),
        ([(0, 3, "a")], "stages end at block 3 but the model has 4"),
        ([(0, 4, "q")], "unknown device 'q'"),
        ([], "stages end at block 0"),
    ],
)
def test_evaluate_rejects_malformed_placements(stages, pattern):
    with pytest.raises(PlanError, match=pattern):
        evaluate_placement(_problem(), stages)


def test_evaluate_names_violations_and_prices_without_check():
    problem = _problem(budgets={"b": 150}, forbid={0: {"a"}}, exclude={"c"})
    stages = [(0, 2, "a"), (2, 4, "b")]
    with pytest.raises(
        PlanError, match=r"block 0 .* may not run on 'a'.*needs 210 bytes but 'b' has a budget of 150"
    ):
        evaluate_placement(problem, stages)
    priced = evaluate_placement(problem, stages, check=False)
    # two stages: compute 0.02 on a, 0.04 on b; transfers b <- a and b -> sink a cost 0.001 + 50/1e6 each
    assert priced.latency_s == pytest.approx(0.02 + 0.04 + 2 * (0.001 + 50e-6))
    assert priced.bottleneck_s == pytest.approx(0.04)
    assert priced.breakdown[1].memory_bytes == 2 * 100 + 10
