"""Turning a sliced model (and a plan or a stage count) into the stage ranges a deployment runs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from layerline.errors import FormatError, PlanError

__all__ = ["DeployTarget", "resolve_target"]


@dataclass(frozen=True)
class DeployTarget:
    """The sliced model directory, the half-open block ranges and device names, one per stage.

    ``threads``: a plan's per-stage onnxruntime threads (None: not set; empty: none given);
    ``source_device``: the device requests come from (a plan's ``predicted.source``; None: the first
    stage's device).
    """

    sliced_dir: Path
    ranges: tuple[tuple[int, int], ...]
    devices: tuple[str, ...]
    source: str  # "plan" or "balanced"
    threads: tuple[int | None, ...] = ()
    source_device: str | None = None
    #: a plan's predicted memory per stage (weights + activations, bytes; None where unknown): the swarm
    #: engine reserves it for the stage's service
    memory_bytes: tuple[int | None, ...] = ()


def _is_plan_file(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == "layerline.plan"
    except (OSError, ValueError, AttributeError):
        return False


def _plan_source(predicted: object) -> str | None:
    """The source device a plan was optimised for (``configure`` writes it into ``predicted``)."""
    source = predicted.get("source") if isinstance(predicted, dict) else None
    return source if isinstance(source, str) and source else None


def _plan_memory(predicted: object, stages: int) -> tuple[int | None, ...]:
    """Each stage's predicted ``memory_bytes`` (``configure`` writes them into ``predicted.stages``)."""
    rows = predicted.get("stages") if isinstance(predicted, dict) else None
    if not isinstance(rows, list) or len(rows) != stages:
        return ()
    found = [row.get("memory_bytes") if isinstance(row, dict) else None for row in rows]
    return tuple(int(m) if isinstance(m, int | float) and m > 0 else None for m in found)


def resolve_target(target: Path, stages: int | None) -> DeployTarget:
    """``target`` is a sliced directory (split into ``stages`` balanced stages) or a plan file."""
    from layerline.graph import Manifest
    from layerline.plan import balanced_split, load_plan, validate_plan

    if _is_plan_file(target):
        if stages is not None:
            raise PlanError(f"{target} is a plan, which fixes the stages; drop --stages {stages}")
        plan = load_plan(target)
        manifest = Manifest.load(Path(plan.sliced))
        validate_plan(plan, len(manifest.blocks))
        return DeployTarget(
            Path(plan.sliced),
            tuple(tuple(s.blocks) for s in plan.stages),
            tuple(s.device for s in plan.stages),
            "plan",
            threads=tuple(s.threads for s in plan.stages),
            source_device=_plan_source(plan.predicted),
            memory_bytes=_plan_memory(plan.predicted, len(plan.stages)),
        )
    if not target.is_dir():
        raise FormatError(
            f"{target} is neither a sliced model directory nor a plan file; "
            f"create one with `layerline slice MODEL -o {target}`"
        )
    manifest = Manifest.load(target)
    k = 1 if stages is None else stages
    # Balance the estimated compute; a block with no heavy op still costs something to run.
    costs = [max(float(b.flops), 1.0) for b in manifest.blocks]
    ranges = balanced_split(costs, k)
    return DeployTarget(target, tuple(ranges), ("local",) * len(ranges), "balanced")
