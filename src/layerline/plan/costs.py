"""The one cost model: what a placement costs, shared by the optimiser, the brute force and the baselines.

A placement is a tuple of stages ``(start, stop, device)`` covering blocks ``[0, L)`` in order.

- stage compute: ``P_d[stop] - P_d[start]`` with ``P_d`` the running sum of ``compute_s[d]`` (seconds);
- stage overhead: ``hop_overhead_s[d]``, paid once by every stage (its process's receive, decode, dispatch,
  encode and send); a stage's *busy* time is ``compute + overhead`` (CPU work of its device);
- stage memory: ``sum(weight_bytes[start:stop]) + max(activation_bytes[start:stop])`` (bytes);
- transfer into a stage / out to the sink: 0 on the same device, else ``latency + bytes / bandwidth``;
- latency: the sum of every transfer, compute and overhead along the chain source → stages → sink;
- bottleneck: the largest single stage busy time or transfer; throughput = 1 / bottleneck.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from layerline.errors import PlanError
from layerline.plan.format import OBJECTIVES, Plan, PlanStage
from layerline.plan.problem import PlanningProblem

__all__ = ["CostModel", "Placement", "StageCost", "evaluate_placement", "placement_violations"]

StageTuple = tuple[int, int, str]


@dataclass(frozen=True)
class StageCost:
    """One stage of a placement: its blocks, device, compute, the transfer into it, its memory and the
    hop overhead its process adds (seconds; 0 when the device's overhead is unknown)."""

    start: int
    stop: int
    device: str
    compute_s: float
    transfer_in_s: float
    memory_bytes: int
    overhead_s: float = 0.0


@dataclass(frozen=True)
class Placement:
    """A placement and its predicted costs (seconds); ``transfer_out_s`` is the last stage → sink transfer.

    ``solve_time_s``, ``device_classes`` and ``states`` are filled in by the optimiser.
    """

    stages: tuple[StageTuple, ...]
    latency_s: float
    bottleneck_s: float
    throughput_rps: float
    breakdown: tuple[StageCost, ...]
    transfer_out_s: float
    objective: str = "evaluated"
    solve_time_s: float | None = None
    device_classes: int | None = None
    states: int | None = None

    def predicted(self) -> dict[str, Any]:
        """The predicted costs as a JSON-able dict for :attr:`Plan.predicted`."""
        return {
            "latency_s": self.latency_s,
            "bottleneck_s": self.bottleneck_s,
            "throughput_rps": self.throughput_rps if math.isfinite(self.throughput_rps) else None,
            "transfer_out_s": self.transfer_out_s,
            "stages": [
                {
                    "blocks": [s.start, s.stop],
                    "device": s.device,
                    "compute_s": s.compute_s,
                    "transfer_in_s": s.transfer_in_s,
                    "overhead_s": s.overhead_s,
                    "memory_bytes": s.memory_bytes,
                }
                for s in self.breakdown
            ],
        }

    def to_plan(
        self, model_name: str, sliced: str, created_by: str = "layerline", threads: int | None = None
    ) -> Plan:
        """A :class:`Plan` running this placement, with the predicted costs attached."""
        objective = self.objective if self.objective in OBJECTIVES else "manual"
        return Plan(
            model_name=model_name,
            sliced=sliced,
            stages=tuple(PlanStage((s, t), d, threads) for s, t, d in self.stages),
            num_blocks=self.stages[-1][1],
            objective=objective,
            predicted=self.predicted(),
            created_by=created_by,
        )


class CostModel:
    """Precomputed running sums of one problem; :meth:`evaluate` prices a placement."""

    def __init__(self, problem: PlanningProblem) -> None:
        self.problem = problem
        self.prefix = {
            name: np.concatenate(([0.0], np.cumsum(np.asarray(row, dtype=np.float64))))
            for name, row in problem.compute_s.items()
        }
        self.weight_prefix = np.concatenate(
            ([0], np.cumsum(np.asarray(problem.weight_bytes, dtype=np.int64)))
        )
        self.activation = np.asarray(problem.activation_bytes, dtype=np.int64)
        self.overhead = dict(problem.hop_overhead_s)

    def compute_s(self, device: str, start: int, stop: int) -> float:
        p = self.prefix[device]
        return float(p[stop] - p[start])

    def busy_s(self, device: str, start: int, stop: int) -> float:
        """Compute plus hop overhead of a stage: the time its device works on one request."""
        return self.compute_s(device, start, stop) + self.overhead[device]

    def memory_bytes(self, start: int, stop: int) -> int:
        return int(self.weight_prefix[stop] - self.weight_prefix[start]) + int(
            self.activation[start:stop].max()
        )

    def check_structure(self, stages: Iterable[Iterable[Any]]) -> tuple[StageTuple, ...]:
        """Normalise ``stages``; PlanError unless they cover [0, L) contiguously on distinct known devices."""
        problem = self.problem
        out: list[StageTuple] = []
        names = set(problem.device_names)
        expected = 0
        for i, item in enumerate(stages):
            start, stop, device = item
            start, stop = int(start), int(stop)
            if start != expected or stop <= start:
                raise PlanError(
                    f"stage {i} covers [{start}, {stop}) but must start at block {expected} and hold at "
                    "least one block; stages are contiguous, non-empty block ranges"
                )
            if device not in names:
                raise PlanError(
                    f"stage {i} runs on unknown device {device!r}; use one of the problem's devices"
                )
            if any(device == d for _, _, d in out):
                raise PlanError(f"device {device!r} runs two stages; a device runs at most one stage")
            out.append((start, stop, str(device)))
            expected = stop
        if not out or expected != problem.num_blocks:
            raise PlanError(
                f"the stages end at block {expected} but the model has {problem.num_blocks} blocks; "
                "cover every block"
            )
        return tuple(out)

    def violations(self, stages: tuple[StageTuple, ...]) -> list[str]:
        """Constraint violations of a structurally valid placement (empty when it is feasible)."""
        problem = self.problem
        found: list[str] = []
        prev = problem.source
        for i, (start, stop, device) in enumerate(stages):
            if device in problem.exclude:
                found.append(f"stage {i} runs on excluded device {device!r}")
            for b in range(start, stop):
                if not problem.block_allowed(b, device):
                    found.append(
                        f"stage {i}: {problem.block_label(b)} may not run on {device!r} (pin/forbid)"
                    )
            budget = problem.device(device).memory_budget_bytes
            need = self.memory_bytes(start, stop)
            if budget is not None and need > budget:
                found.append(f"stage {i} needs {need} bytes but {device!r} has a budget of {budget}")
            if problem.link(prev, device) is None and prev != device:
                found.append(f"no link {prev!r} -> {device!r} into stage {i}")
            prev = device
        sink = problem.sink_device
        if prev != sink and problem.link(prev, sink) is None:
            found.append(f"no link {prev!r} -> sink {sink!r}")
        return found

    def evaluate(self, stages: Iterable[Iterable[Any]], check: bool = True) -> Placement:
        """Price ``stages``; with ``check`` raise PlanError if they break a constraint."""
        problem = self.problem
        plan = self.check_structure(stages)
        if check:
            problems = self.violations(plan)
            if problems:
                raise PlanError(f"the placement is not feasible: {'; '.join(problems)}")
        latency = 0.0
        bottleneck = 0.0
        prev = problem.source
        breakdown: list[StageCost] = []
        for start, stop, device in plan:
            t_in = problem.transfer_s(prev, device, problem.boundary_bytes[start])
            comp = self.compute_s(device, start, stop)
            over = self.overhead[device]
            latency += t_in
            latency += comp
            latency += over
            bottleneck = max(bottleneck, t_in, comp + over)
            breakdown.append(StageCost(start, stop, device, comp, t_in, self.memory_bytes(start, stop), over))
            prev = device
        t_out = problem.transfer_s(prev, problem.sink_device, problem.boundary_bytes[-1])
        latency += t_out
        bottleneck = max(bottleneck, t_out)
        return Placement(
            stages=plan,
            latency_s=latency,
            bottleneck_s=bottleneck,
            throughput_rps=1.0 / bottleneck if bottleneck > 0 else math.inf,
            breakdown=tuple(breakdown),
            transfer_out_s=t_out,
        )


def evaluate_placement(
    problem: PlanningProblem, stages: Iterable[Iterable[Any]], check: bool = True
) -> Placement:
    """Latency, bottleneck, throughput and per-stage breakdown of ``stages`` under ``problem``."""
    return CostModel(problem).evaluate(stages, check=check)


def placement_violations(problem: PlanningProblem, stages: Iterable[Iterable[Any]]) -> list[str]:
    """The constraints ``stages`` break (memory, pins, forbids, exclusions, missing links)."""
    model = CostModel(problem)
    return model.violations(model.check_structure(stages))
