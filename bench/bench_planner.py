"""Time the exact placement DP against exhaustive search.

Run: ``python bench/bench_planner.py [--repeat N] [--seed S]``. For sizes the brute force can handle it is
timed directly; for the large sizes its time is extrapolated from its measured cost per placement times
the number of placements it would enumerate (marked ``est.``). Times are wall-clock seconds on this machine.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time

from layerline.plan import Device, PlanningProblem, baselines, full_mesh, optimize
from layerline.plan.bruteforce import brute_force, count_placements


def make_problem(n: int, d: int, grouped: bool, seed: int) -> PlanningProblem:
    """A random chain: distinct devices with random links, or the source plus two types of identical ones."""
    rng = random.Random(seed)
    names = [f"d{i}" for i in range(d)]
    if grouped:
        rows = [[rng.uniform(1e-3, 1e-2) for _ in range(n)] for _ in range(3)]
        compute = {x: rows[0 if i == 0 else 1 + i % 2] for i, x in enumerate(names)}
        lat, bw = full_mesh(names, 1e-3, 1e8)
        devices = [Device(x, 2 * 10**9, f"t{0 if i == 0 else 1 + i % 2}") for i, x in enumerate(names)]
    else:
        compute = {x: [rng.uniform(1e-3, 1e-2) for _ in range(n)] for x in names}
        lat = {a: {b: rng.uniform(0, 2e-3) for b in names if b != a} for a in names}
        bw = {a: {b: rng.uniform(1e7, 1e9) for b in names if b != a} for a in names}
        devices = [Device(x, rng.randint(10**8, 2 * 10**9)) for x in names]
    scale = max(1, 300 // n)  # keep memory pressure similar for small n
    return PlanningProblem(
        compute_s=compute,
        weight_bytes=[rng.randint(10**5, 10**7) * scale for _ in range(n)],
        activation_bytes=[rng.randint(10**5, 10**6) for _ in range(n)],
        boundary_bytes=[rng.randint(10**3, 10**6) for _ in range(n + 1)],
        devices=devices,
        latency_s=lat,
        bandwidth_Bps=bw,
        source="d0",
    )


def _time(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per DP timing (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cases = [
        ("small distinct", 8, 4, False, True),
        ("small distinct", 10, 5, False, True),
        ("distinct", 300, 8, False, False),
        ("grouped", 300, 8, True, False),
        ("grouped", 100, 16, True, False),
    ]
    per_placement: list[float] = []
    header = (
        f"{'case':<15}{'blocks':>7}{'devs':>5}{'groups':>7}{'states':>7}  {'objective':<12}"
        f"{'DP s':>9}{'BF placements':>16}{'BF s':>16}{'BF/DP':>11}"
    )
    print(header)
    print("-" * len(header))
    for name, n, d, grouped, run_brute in cases:
        problem = make_problem(n, d, grouped, args.seed)
        placements = count_placements(n, d)
        objectives: list[tuple[str, str, float | None]] = [("latency", "latency", None)]
        objectives.append(("throughput", "throughput", None))
        best_rps = optimize(problem, "throughput").throughput_rps
        objectives.append(("lat+floor", "latency", 0.8 * best_rps))
        for label, objective, rps in objectives:
            dp_s, placed = _time(
                lambda p=problem, o=objective, r=rps: optimize(p, o, min_throughput_rps=r), args.repeat
            )
            if run_brute:
                bf_s, reference = _time(lambda p=problem, o=objective, r=rps: brute_force(p, o, r), 1)
                per_placement.append(bf_s / placements)
                same = math.isclose(reference.latency_s, placed.latency_s, rel_tol=1e-9)
                if not same or (objective == "throughput" and reference.bottleneck_s != placed.bottleneck_s):
                    raise SystemExit(f"DP and brute force disagree on {name} {n}x{d} {label}")
                bf_text = f"{bf_s:.4f}"
            else:
                bf_s = statistics.median(per_placement) * placements
                bf_text = f"{bf_s:.3g} est."
            print(
                f"{name:<15}{n:>7}{d:>5}{placed.device_classes:>7}{placed.states:>7}  {label:<12}"
                f"{dp_s:9.4f}{placements:>16.3g}{bf_text:>16}{bf_s / dp_s:11.3g}"
            )
    problem = make_problem(300, 8, False, args.seed)
    best = optimize(problem, "latency")
    print()
    print("300 blocks x 8 distinct devices, latency objective: optimum vs baselines")
    print(f"  optimum            latency {best.latency_s:8.4f} s  ({len(best.stages)} stages)")
    for label, result in baselines(problem).items():
        if isinstance(result, Exception):
            print(f"  {label:<18} infeasible: {str(result)[:70]}")
        else:
            print(f"  {label:<18} latency {result.latency_s:8.4f} s  ({len(result.stages)} stages)")


if __name__ == "__main__":
    main()
