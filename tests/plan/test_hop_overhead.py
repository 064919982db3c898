"""The per-stage hop overhead in the cost model: paid once per stage, in the latency and in the bottleneck."""

from __future__ import annotations

import math
import random
import xml.etree.ElementTree as ET
from dataclasses import replace

import pytest
from plan_cases import random_problem

from layerline.errors import PlanError
from layerline.plan import (
    Device,
    PlanningProblem,
    all_on_fastest,
    baselines,
    evaluate_placement,
    full_mesh,
    load_plan,
    optimize,
    save_plan,
)
from layerline.plan.bruteforce import brute_force
from layerline.plan.grouping import device_classes
from layerline.plan.timeline import timeline_boxes, timeline_svg

SVG = "{http://www.w3.org/2000/svg}"

# ResNet-18 as profiled in docs/performance.md ("Prediction vs reality"): 21 blocks, source = sink = edge
# (0.35 core), server (1 core) computes blocks 0-19 in 31.7 ms; block 20 is the 2 KB -> 4 KB fc.
N = 21
BOUNDARY = [602_112] + [200_704] * 19 + [2048, 4000]  # input, inner cuts, fc input (2 KB), output (4 KB)


def _resnet_like(fc_server_s: float, fc_edge_s: float, hop: dict[str, float]) -> PlanningProblem:
    server = [31.7e-3 / 20] * 20 + [fc_server_s]
    edge = [2.86 * v for v in server[:20]] + [fc_edge_s]
    lat, bw = full_mesh(["edge", "server"], 50e-6, 1e9)  # loopback-like: 50 µs, 1 GB/s
    return PlanningProblem(
        compute_s={"edge": edge, "server": server},
        weight_bytes=[1_000_000] * N,
        activation_bytes=[1_000_000] * N,
        boundary_bytes=BOUNDARY,
        devices=[Device("edge"), Device("server")],
        latency_s=lat,
        bandwidth_Bps=bw,
        source="edge",
        hop_overhead_s=hop,
    )


def test_a_tiny_tail_block_is_not_moved_for_a_microsecond():
    """The 2 KB fc block is 1 µs faster on edge and its output transfer shrinks by 2 KB (2 µs)."""
    old = _resnet_like(60e-6, 59e-6, hop={})
    # without a hop cost (old profiles) the planner takes the split that measured slower
    assert optimize(old, "latency").stages == ((0, 20, "server"), (20, 21, "edge"))
    new = replace(old, hop_overhead_s={"edge": 0.2e-3, "server": 0.2e-3})
    best = optimize(new, "latency")
    assert best.stages == ((0, 21, "server"),)
    split = evaluate_placement(new, [(0, 20, "server"), (20, 21, "edge")])
    single = evaluate_placement(new, [(0, 21, "server")])
    saving = 1e-6 + (4000 - 2048) / 1e9
    assert split.latency_s - single.latency_s == pytest.approx(0.2e-3 - saving, rel=1e-6)
    assert best.latency_s == single.latency_s
    assert brute_force(new, "latency").stages == best.stages


@pytest.mark.parametrize(("saving_s", "split"), [(0.1e-3, False), (0.3e-3, True)])
def test_a_split_is_kept_when_it_saves_more_than_a_hop(saving_s, split):
    problem = _resnet_like(0.6e-3, 0.6e-3 - saving_s, hop={"edge": 0.2e-3, "server": 0.2e-3})
    best = optimize(problem, "latency")
    expected = ((0, 20, "server"), (20, 21, "edge")) if split else ((0, 21, "server"),)
    assert best.stages == expected
    assert [s.overhead_s for s in best.breakdown] == [0.2e-3] * len(expected)


def test_overhead_is_paid_once_per_stage_in_latency_and_bottleneck():
    problem = _resnet_like(60e-6, 59e-6, hop={"edge": 0.5e-3, "server": 0.1e-3})
    bare = replace(problem, hop_overhead_s={})
    stages = [(0, 10, "server"), (10, 21, "edge")]
    priced, free = evaluate_placement(problem, stages), evaluate_placement(bare, stages)
    assert priced.latency_s == pytest.approx(free.latency_s + 0.6e-3, rel=1e-12)
    assert [s.overhead_s for s in priced.breakdown] == [0.1e-3, 0.5e-3]
    assert [s.compute_s for s in priced.breakdown] == [s.compute_s for s in free.breakdown]
    edge = priced.breakdown[1]
    assert priced.bottleneck_s == edge.compute_s + edge.overhead_s  # busy time: CPU work of the device
    doc = priced.predicted()
    assert [s["overhead_s"] for s in doc["stages"]] == [0.1e-3, 0.5e-3]
    assert set(doc["stages"][0]) == {
        "blocks",
        "device",
        "compute_s",
        "transfer_in_s",
        "overhead_s",
        "memory_bytes",
    }


def test_throughput_counts_the_overhead_as_the_stage_devices_work():
    """A fast device whose stages cost 5 ms each is a worse bottleneck than doing everything slowly."""
    names = ["a", "b"]
    lat, bw = full_mesh(names, 1e-6, 1e12)
    problem = PlanningProblem(
        compute_s={"a": [1e-3, 1e-3], "b": [0.1e-3, 0.1e-3]},
        weight_bytes=[1, 1],
        activation_bytes=[1, 1],
        boundary_bytes=[1, 1, 1],
        devices=[Device(x) for x in names],
        latency_s=lat,
        bandwidth_Bps=bw,
        source="a",
    )
    assert optimize(problem, "throughput").bottleneck_s < 1e-3  # b does the work (or part of it)
    loaded = replace(problem, hop_overhead_s={"b": 5e-3})
    best = optimize(loaded, "throughput")
    assert best.stages == ((0, 2, "a"),) and best.bottleneck_s == 2e-3
    assert all_on_fastest(loaded).stages == ((0, 2, "a"),)  # "fastest" counts the overhead too
    assert brute_force(loaded, "throughput").bottleneck_s == best.bottleneck_s


def test_zero_or_missing_overhead_plans_exactly_as_before():
    rng = random.Random(31)
    for _ in range(60):
        problem = random_problem(rng)
        bare = replace(problem, hop_overhead_s={})
        zero = replace(problem, hop_overhead_s={d: 0.0 for d in problem.device_names})
        for objective in ("latency", "throughput"):
            try:
                a = optimize(bare, objective)
            except PlanError:
                with pytest.raises(PlanError):
                    optimize(zero, objective)
                continue
            b = optimize(zero, objective)
            assert (a.stages, a.latency_s, a.bottleneck_s, a.breakdown) == (
                b.stages,
                b.latency_s,
                b.bottleneck_s,
                b.breakdown,
            )
            assert all(s.overhead_s == 0.0 for s in a.breakdown)


def test_larger_hop_overhead_never_adds_stages():
    """latency(P) = base(P) + h·stages(P): as a uniform h grows, the optimum uses no more stages."""
    rng = random.Random(8)
    fewer = 0
    for _ in range(120):
        problem = random_problem(rng, max_blocks=7, max_devices=4)
        previous = None
        for h in (0.0, 0.05, 0.2, 1.0, 10.0):
            variant = replace(problem, hop_overhead_s={d: h for d in problem.device_names})
            try:
                best = optimize(variant, "latency")
            except PlanError:
                break
            if previous is not None:
                assert best.latency_s >= previous.latency_s - 1e-12  # costs only went up
                again = evaluate_placement(variant, previous.stages)
                tie = math.isclose(again.latency_s, best.latency_s, rel_tol=1e-9, abs_tol=1e-12)
                if not tie:
                    assert len(best.stages) <= len(previous.stages), (h, previous.stages, best.stages)
                fewer += len(best.stages) < len(previous.stages)
            previous = best
    assert fewer > 10  # the overhead does merge stages in these instances


def test_overhead_by_type_grouping_and_errors():
    names = ["src", "p1", "p2", "p3"]
    lat, bw = full_mesh(names, 0.01, 1000.0)
    base = PlanningProblem(
        compute_s={"src": [1.0] * 4, "pi": [0.2] * 4},
        weight_bytes=[10] * 4,
        activation_bytes=[1] * 4,
        boundary_bytes=[100] * 5,
        devices=[Device("src")] + [Device(x, 25, "pi") for x in names[1:]],
        latency_s=lat,
        bandwidth_Bps=bw,
        source="src",
        hop_overhead_s={"pi": 0.03, "p3": 0.5},  # by type; a device's own entry wins
    )
    assert base.hop_overhead_s == {"src": 0.0, "p1": 0.03, "p2": 0.03, "p3": 0.5}
    # p3 has another overhead: no longer interchangeable with p1 and p2
    assert device_classes(base, base.usable_devices) == [("src",), ("p1", "p2"), ("p3",)]
    grouped, single = optimize(base, "latency"), optimize(base, "latency", group_identical=False)
    assert math.isclose(grouped.latency_s, single.latency_s, rel_tol=1e-12)
    assert [d for _, _, d in grouped.stages] == ["p1", "p2"]  # members of a class assigned in order
    for bad, match in (
        ({"nope": 0.1}, r"unknown device 'nope'.*names or types"),
        ({"p1": -0.1}, r"hop_overhead_s\['p1'\] is -0\.1.*>= 0"),
        ({"p1": math.nan}, r"hop_overhead_s\['p1'\] is nan"),
        ({"p1": math.inf}, r"hop_overhead_s\['p1'\] is inf"),
    ):
        with pytest.raises(PlanError, match=match):
            replace(base, hop_overhead_s=bad)


def test_baselines_timeline_and_plan_file_carry_the_overhead(tmp_path):
    problem = _resnet_like(60e-6, 59e-6, hop={"edge": 0.4e-3, "server": 0.2e-3})
    for name, result in baselines(problem).items():
        assert not isinstance(result, PlanError), name
        assert all(s.overhead_s == problem.hop_overhead_s[s.device] for s in result.breakdown)
        by_hand = sum(s.transfer_in_s + s.compute_s + s.overhead_s for s in result.breakdown)
        assert result.latency_s == pytest.approx(by_hand + result.transfer_out_s, rel=1e-12)
    placement = evaluate_placement(problem, [(0, 20, "server"), (20, 21, "edge")])
    boxes = timeline_boxes(placement, "edge")
    assert [(b.kind, b.device) for b in boxes] == [
        ("transfer", "server"),
        ("overhead", "server"),
        ("compute", "server"),
        ("transfer", "edge"),
        ("overhead", "edge"),
        ("compute", "edge"),
    ]
    assert boxes[-1].start_s + boxes[-1].duration_s == pytest.approx(placement.latency_s)
    root = ET.fromstring(timeline_svg(placement, "edge").encode("utf-8"))
    grey = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "overhead"]
    assert [r.get("data-stage") for r in grey] == ["0", "1"]
    assert "stage hop overhead" in " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    path = tmp_path / "p.plan.json"
    save_plan(placement.to_plan("resnet18", str(tmp_path)), path)
    stages = load_plan(path).predicted["stages"]
    assert [s["overhead_s"] for s in stages] == [0.2e-3, 0.4e-3]
