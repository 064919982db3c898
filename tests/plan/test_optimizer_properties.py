"""Properties of the optimum (monotone in resources, scale-covariant), baselines, and speed."""

from __future__ import annotations

import math
import random
import time
from dataclasses import replace

import pytest
from plan_cases import random_problem, with_extra_device

from layerline.errors import PlanError
from layerline.plan import (
    Device,
    PlanningProblem,
    all_on_fastest,
    all_on_source,
    baselines,
    best_two_way,
    even_split,
    full_mesh,
    optimize,
)
from layerline.plan.grouping import device_classes

REL = 1e-9
OBJECTIVES = ("latency", "throughput")


def _key(p, objective):
    return (p.bottleneck_s, p.latency_s) if objective == "throughput" else (p.latency_s,)


def _not_worse(better, worse, objective):
    """better's (bottleneck, latency) is lexicographically <= worse's, up to rounding of the latency."""
    if better is None:
        return worse is None
    if worse is None:
        return True
    if objective == "throughput" and better.bottleneck_s != worse.bottleneck_s:
        return better.bottleneck_s < worse.bottleneck_s
    return better.latency_s <= worse.latency_s * (1 + REL) + 1e-12


def _solve(problem, objective):
    try:
        return optimize(problem, objective)
    except PlanError:
        return None


def _scaled_links(problem, factor):
    bw = {a: {b: v * factor for b, v in row.items()} for a, row in problem.bandwidth_Bps.items()}
    return replace(problem, bandwidth_Bps=bw)


def test_more_resources_never_hurt():
    rng = random.Random(21)
    improved = 0
    for _ in range(120):
        base = random_problem(rng, max_blocks=7, max_devices=4)
        more_memory = replace(
            base,
            devices=tuple(
                Device(d.name, None if d.memory_budget_bytes is None else d.memory_budget_bytes * 2, d.type)
                for d in base.devices
            ),
        )
        variants = [with_extra_device(base, rng), _scaled_links(base, 2.0), more_memory]
        for objective in OBJECTIVES:
            old = _solve(base, objective)
            for variant in variants:
                new = _solve(variant, objective)
                assert _not_worse(new, old, objective), (objective, old, new)
                improved += (
                    old is not None and new is not None and _key(new, objective) < _key(old, objective)
                )
    assert improved > 50  # the variants do change the optimum, so the comparison is not vacuous


@pytest.mark.parametrize("factor", [2.0, 0.25, 3.7])
def test_scaling_all_times_scales_the_optimum(factor):
    rng = random.Random(int(factor * 100))
    checked = 0
    for _ in range(60):
        base = random_problem(rng, max_blocks=7, max_devices=4)
        scaled = replace(
            base,
            compute_s={d: [v * factor for v in row] for d, row in base.compute_s.items()},
            latency_s={a: {b: v * factor for b, v in row.items()} for a, row in base.latency_s.items()},
            bandwidth_Bps={
                a: {b: v / factor for b, v in row.items()} for a, row in base.bandwidth_Bps.items()
            },
            hop_overhead_s={d: v * factor for d, v in base.hop_overhead_s.items()},
        )
        for objective in OBJECTIVES:
            old, new = _solve(base, objective), _solve(scaled, objective)
            assert (old is None) == (new is None)
            if old is None:
                continue
            checked += 1
            assert math.isclose(new.latency_s, old.latency_s * factor, rel_tol=1e-9, abs_tol=1e-12)
            assert math.isclose(new.bottleneck_s, old.bottleneck_s * factor, rel_tol=1e-9, abs_tol=1e-12)
            if factor in (2.0, 0.25):  # powers of two scale every float exactly: the same plan wins
                assert new.stages == old.stages
    assert checked > 50


def test_optimum_beats_every_feasible_baseline():
    rng = random.Random(5)
    compared = 0
    for _ in range(80):
        problem = random_problem(rng, max_blocks=7, max_devices=4)
        best = _solve(problem, "latency")
        fastest = _solve(problem, "throughput")
        for name, result in baselines(problem).items():
            if isinstance(result, PlanError):
                continue
            compared += 1
            assert result.objective == f"baseline:{name}"
            assert best is not None
            assert best.latency_s <= result.latency_s * (1 + REL) + 1e-12
            assert fastest.bottleneck_s <= result.bottleneck_s
    assert compared > 100


def _chain(n=6, devices=3):
    names = [f"d{i}" for i in range(devices)]
    lat, bw = full_mesh(names, 0.01, 1000.0)
    compute = {f"d{i}": [0.1 * (i + 1)] * n for i in range(devices)}  # d0 fastest
    return PlanningProblem(
        compute_s=compute,
        weight_bytes=[10] * n,
        activation_bytes=[5] * n,
        boundary_bytes=[100] * (n + 1),
        devices=[Device(x) for x in names],
        latency_s=lat,
        bandwidth_Bps=bw,
        source="d2",
    )


def test_baselines_have_their_documented_shapes():
    problem = _chain()
    assert all_on_source(problem).stages == ((0, 6, "d2"),)
    assert all_on_fastest(problem).stages == ((0, 6, "d0"),)
    assert even_split(problem).stages == ((0, 2, "d0"), (2, 4, "d1"), (4, 6, "d2"))
    two = best_two_way(problem)
    assert len(two.stages) <= 2 and all(d in ("d2", "d0") for _, _, d in two.stages)
    # moving everything to the 3x faster d0 and back costs 2 x 0.11 s and saves 1.2 s
    assert two.stages == ((0, 6, "d0"),)
    assert math.isclose(two.latency_s, 0.6 + 2 * (0.01 + 0.1))


def test_baseline_errors_are_reported():
    problem = replace(_chain(), devices=[Device("d0", 20), Device("d1", 20), Device("d2", 20)])
    results = baselines(problem)
    assert isinstance(results["all_on_source"], PlanError)
    assert "not feasible" in str(results["all_on_source"])
    assert isinstance(results["all_on_fastest"], PlanError)
    assert isinstance(results["best_two_way"], PlanError)


def _big(n, d, grouped, seed=0):
    rng = random.Random(seed)
    names = [f"d{i}" for i in range(d)]
    if grouped:  # the source plus two types of identical devices
        rows = [[rng.uniform(1e-3, 1e-2) for _ in range(n)] for _ in range(3)]
        compute = {x: rows[0 if i == 0 else 1 + i % 2] for i, x in enumerate(names)}
        lat, bw = full_mesh(names, 1e-3, 1e8)
        devices = [Device(x, 2 * 10**9, f"t{0 if i == 0 else 1 + i % 2}") for i, x in enumerate(names)]
    else:
        compute = {x: [rng.uniform(1e-3, 1e-2) for _ in range(n)] for x in names}
        lat = {a: {b: rng.uniform(0, 2e-3) for b in names if b != a} for a in names}
        bw = {a: {b: rng.uniform(1e7, 1e9) for b in names if b != a} for a in names}
        devices = [Device(x, rng.randint(10**8, 2 * 10**9)) for x in names]
    # a measured hop overhead per device (per type when grouped: identical devices stay identical)
    hops = {d.type or d.name: rng.uniform(1e-4, 5e-4) for d in devices}
    return PlanningProblem(
        compute_s=compute,
        weight_bytes=[rng.randint(10**5, 10**7) for _ in range(n)],
        activation_bytes=[rng.randint(10**5, 10**6) for _ in range(n)],
        boundary_bytes=[rng.randint(10**3, 10**6) for _ in range(n + 1)],
        devices=devices,
        latency_s=lat,
        bandwidth_Bps=bw,
        source="d0",
        hop_overhead_s=hops,
    )


@pytest.mark.parametrize(("n", "d", "grouped"), [(300, 8, False), (300, 8, True), (100, 16, True)])
def test_planning_is_fast(n, d, grouped):
    problem = _big(n, d, grouped)
    started = time.perf_counter()
    latency = optimize(problem, "latency")
    throughput = optimize(problem, "throughput")
    floor = optimize(problem, "latency", min_throughput_rps=0.8 * throughput.throughput_rps)
    elapsed = time.perf_counter() - started
    print(f"{n} blocks x {d} devices ({'grouped' if grouped else 'distinct'}): planned in {elapsed:.3f} s")
    assert elapsed < 2.0, f"{n} blocks x {d} devices took {elapsed:.2f} s"
    for p in (latency, throughput, floor):
        assert p.solve_time_s is not None and p.solve_time_s < 2.0
    assert throughput.bottleneck_s <= floor.bottleneck_s <= latency.bottleneck_s
    assert latency.latency_s <= floor.latency_s <= throughput.latency_s
    if grouped:
        assert latency.device_classes == 3
    else:
        assert latency.states == 2**d


def test_grouping_checks_interchangeability():
    names = ["src", "p1", "p2", "p3", "p4"]
    lat, bw = full_mesh(names, 0.01, 1000.0)
    problem = PlanningProblem(
        compute_s={"src": [1.0] * 4, "pi": [0.2] * 4},
        weight_bytes=[10] * 4,
        activation_bytes=[1] * 4,
        boundary_bytes=[100] * 5,
        devices=[Device("src")] + [Device(x, 25, "pi") for x in names[1:]],
        latency_s=lat,
        bandwidth_Bps=bw,
        source="src",
    )
    assert device_classes(problem, problem.usable_devices) == [("src",), ("p1", "p2", "p3", "p4")]
    slow = {a: dict(row) for a, row in bw.items()}
    slow["p3"]["src"] = 10.0  # same type, but a slower uplink: not interchangeable
    changed = replace(problem, bandwidth_Bps=slow)
    assert device_classes(changed, changed.usable_devices) == [("src",), ("p1", "p2", "p4"), ("p3",)]
    pinned = replace(problem, pins={0: "p2"})
    assert device_classes(pinned, pinned.usable_devices) == [("src",), ("p1", "p3", "p4"), ("p2",)]
    for p in (problem, changed, pinned):
        grouped, single = optimize(p, "throughput"), optimize(p, "throughput", group_identical=False)
        assert grouped.stages == single.stages or math.isclose(grouped.latency_s, single.latency_s)
        assert grouped.bottleneck_s == single.bottleneck_s
    # one block per stage keeps every compute at 0.2 s (transfers cost 0.11 s); members assigned in order
    assert optimize(problem, "throughput").stages == ((0, 1, "p1"), (1, 2, "p2"), (2, 3, "p3"), (3, 4, "p4"))
