"""Random planning problems for the optimiser tests (seeded; small enough for the brute force)."""

from __future__ import annotations

import random
from dataclasses import replace

from layerline.plan.problem import Device, PlanningProblem


def _time(rng: random.Random, ties: bool) -> float:
    # binary fractions make exact ties between different plans common, which exercises tie handling
    return rng.randint(0, 6) * 0.125 if ties else rng.uniform(0.001, 1.0)


def random_problem(
    rng: random.Random,
    max_blocks: int = 6,
    max_devices: int = 4,
    constraints: bool = True,
    identical: bool = False,
) -> PlanningProblem:
    """A random problem; with ``identical`` some devices are exact copies of each other (groupable)."""
    n = rng.randint(1, max_blocks)
    d = rng.randint(1, max_devices)
    ties = rng.random() < 0.3
    names = [f"d{i}" for i in range(d)]
    # with ``identical`` every device copies one of two templates
    template = {name: (rng.randrange(2) if identical else i) for i, name in enumerate(names)}
    kinds = sorted(set(template.values()))
    rows = {k: [_time(rng, ties) for _ in range(n)] for k in kinds}
    budgets = {k: rng.choice([None, rng.randint(60, 400)]) for k in kinds}
    link_of = {(a, b): (rng.uniform(0, 0.2), rng.uniform(200, 2000)) for a in kinds for b in kinds}
    # a per-stage hop overhead on about half of the problems (per template, so copies stay groupable)
    hops = {k: _time(rng, ties) * 0.5 for k in kinds} if rng.random() < 0.5 else {}
    devices = [Device(name, budgets[template[name]], f"t{template[name]}") for name in names]
    compute = {name: list(rows[template[name]]) for name in names}
    lat: dict[str, dict[str, float]] = {a: {} for a in names}
    bw: dict[str, dict[str, float]] = {a: {} for a in names}
    for a in names:
        for b in names:
            if a == b or (not identical and rng.random() < 0.1):
                continue
            lat[a][b], bw[a][b] = link_of[(template[a], template[b])]
    source = rng.choice(names)
    sink = rng.choice([None, rng.choice(names)])
    pins: dict[int, str] = {}
    forbid: dict[int, set[str]] = {}
    exclude: set[str] = set()
    if constraints:
        if rng.random() < 0.3:
            for _ in range(rng.randint(1, 2)):
                pins[rng.randrange(n)] = rng.choice(names)
        if rng.random() < 0.3:
            for _ in range(rng.randint(1, 3)):
                forbid.setdefault(rng.randrange(n), set()).add(rng.choice(names))
        if d > 1 and rng.random() < 0.25:
            exclude.add(rng.choice(names))
            exclude -= set(pins.values())
    return PlanningProblem(
        compute_s=compute,
        weight_bytes=[rng.randint(1, 100) for _ in range(n)],
        activation_bytes=[rng.randint(1, 60) for _ in range(n)],
        boundary_bytes=[rng.randint(0, 400) for _ in range(n + 1)],
        devices=devices,
        latency_s=lat,
        bandwidth_Bps=bw,
        source=source,
        sink=sink,
        pins=pins,
        forbid=forbid,
        exclude=exclude,
        hop_overhead_s={name: hops[template[name]] for name in names if template[name] in hops},
    )


def with_extra_device(problem: PlanningProblem, rng: random.Random) -> PlanningProblem:
    """The same problem plus one more (random) device linked to every other one."""
    name = f"extra{len(problem.devices)}"
    n = problem.num_blocks
    compute = dict(problem.compute_s)
    compute[name] = [rng.uniform(0.001, 1.0) for _ in range(n)]
    lat = {a: dict(row) for a, row in problem.latency_s.items()}
    bw = {a: dict(row) for a, row in problem.bandwidth_Bps.items()}
    lat[name], bw[name] = {}, {}
    for other in problem.device_names:
        lat.setdefault(other, {})[name] = rng.uniform(0, 0.2)
        bw.setdefault(other, {})[name] = rng.uniform(200, 2000)
        lat[name][other] = rng.uniform(0, 0.2)
        bw[name][other] = rng.uniform(200, 2000)
    devices = (*problem.devices, Device(name, rng.choice([None, rng.randint(60, 400)])))
    return replace(problem, compute_s=compute, devices=devices, latency_s=lat, bandwidth_Bps=bw)
