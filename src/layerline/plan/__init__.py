"""Planning: the plan file, balanced splits and the exact placement optimiser (no I/O but plan files)."""

from __future__ import annotations

from layerline.plan.balance import balanced_split
from layerline.plan.baselines import all_on_fastest, all_on_source, baselines, best_two_way, even_split
from layerline.plan.costs import Placement, StageCost, evaluate_placement, placement_violations
from layerline.plan.format import (
    LOCAL_DEVICE,
    OBJECTIVES,
    Plan,
    PlanStage,
    load_plan,
    save_plan,
    validate_plan,
)
from layerline.plan.optimizer import optimize
from layerline.plan.problem import Device, PlanningProblem, full_mesh

__all__ = [
    "LOCAL_DEVICE",
    "OBJECTIVES",
    "Device",
    "Placement",
    "Plan",
    "PlanStage",
    "PlanningProblem",
    "StageCost",
    "all_on_fastest",
    "all_on_source",
    "balanced_split",
    "baselines",
    "best_two_way",
    "evaluate_placement",
    "even_split",
    "full_mesh",
    "load_plan",
    "optimize",
    "placement_violations",
    "save_plan",
    "validate_plan",
]
