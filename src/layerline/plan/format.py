"""The plan file: which contiguous block ranges form the stages, and where each stage runs.

A plan is JSON (``format = "layerline.plan"``, ``format_version = 1``). ``sliced`` is stored relative to the
plan file's directory when possible and resolved against it by :func:`load_plan`, so a plan and its sliced
model can be moved together.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from layerline.errors import FormatError, PlanError

__all__ = [
    "LOCAL_DEVICE",
    "OBJECTIVES",
    "Plan",
    "PlanStage",
    "load_plan",
    "save_plan",
    "validate_plan",
]

logger = logging.getLogger(__name__)

#: The special device name for "this machine"; any number of stages may share it.
LOCAL_DEVICE = "local"

#: The objectives a plan may record.
OBJECTIVES = ("latency", "throughput", "balanced", "manual")


@dataclass(frozen=True)
class PlanStage:
    """One stage: the half-open block range ``[start, stop)`` it runs, its device and thread count."""

    blocks: tuple[int, int]
    device: str = LOCAL_DEVICE
    threads: int | None = None

    @property
    def start(self) -> int:
        return self.blocks[0]

    @property
    def stop(self) -> int:
        return self.blocks[1]

    def to_json(self) -> dict[str, Any]:
        return {"blocks": [self.blocks[0], self.blocks[1]], "device": self.device, "threads": self.threads}

    @classmethod
    def from_json(cls, data: Any, index: int = 0) -> PlanStage:
        where = f"stage {index}"
        if not isinstance(data, dict):
            raise FormatError(f"{where} is {type(data).__name__}, expected an object with 'blocks'")
        blocks = data.get("blocks")
        if (
            not isinstance(blocks, list)
            or len(blocks) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) for b in blocks)
        ):
            raise FormatError(f"{where}: 'blocks' is {blocks!r}, expected [start, stop] (two integers)")
        device = data.get("device", LOCAL_DEVICE)
        if not isinstance(device, str) or not device:
            raise FormatError(f"{where}: 'device' is {device!r}, expected a non-empty device name")
        threads = data.get("threads")
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool)):
            raise FormatError(f"{where}: 'threads' is {threads!r}, expected an integer or null")
        return cls(blocks=(blocks[0], blocks[1]), device=device, threads=threads)


@dataclass(frozen=True)
class Plan:
    """A placement of a sliced model's blocks onto stages.

    ``sliced``: the sliced model directory (absolute after :func:`load_plan`). ``objective``: one of
    :data:`OBJECTIVES`. ``predicted``: optional predicted ``latency_s``, ``throughput_rps`` and a per-stage
    breakdown (JSON values only). ``created_by``: the tool and version (or person) that wrote the plan.
    """

    format: ClassVar[str] = "layerline.plan"
    format_version: ClassVar[int] = 1

    model_name: str
    sliced: str
    stages: tuple[PlanStage, ...]
    num_blocks: int
    objective: str = "manual"
    predicted: dict[str, Any] | None = None
    created_by: str = "layerline"

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "format_version": self.format_version,
            "model_name": self.model_name,
            "sliced": self.sliced,
            "num_blocks": self.num_blocks,
            "objective": self.objective,
            "stages": [s.to_json() for s in self.stages],
            "predicted": self.predicted,
            "created_by": self.created_by,
        }

    @classmethod
    def from_json(cls, data: Any) -> Plan:
        """Parse a plan object; raises FormatError naming the first problem."""
        if not isinstance(data, dict):
            raise FormatError(f"the top level is {type(data).__name__}, expected a JSON object")
        fmt = data.get("format")
        if fmt != cls.format:
            raise FormatError(f"'format' is {fmt!r}, expected {cls.format!r}; is this a layerline plan file?")
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise FormatError(f"'format_version' is {version!r}, expected an integer")
        if version != cls.format_version:
            fix = "upgrade layerline" if version > cls.format_version else "re-run `layerline configure`"
            raise FormatError(
                f"format_version {version} is not supported (this layerline reads "
                f"{cls.format_version}); {fix}"
            )
        for key, kind in (("model_name", str), ("sliced", str), ("objective", str), ("created_by", str)):
            if not isinstance(data.get(key), kind):
                raise FormatError(f"'{key}' is {data.get(key)!r}, expected a string")
        if data["objective"] not in OBJECTIVES:
            raise FormatError(
                f"'objective' is {data['objective']!r}, expected one of {', '.join(OBJECTIVES)}"
            )
        num_blocks = data.get("num_blocks")
        if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 1:
            raise FormatError(f"'num_blocks' is {num_blocks!r}, expected a positive integer")
        stages = data.get("stages")
        if not isinstance(stages, list):
            raise FormatError(f"'stages' is {type(stages).__name__}, expected a list of stage objects")
        predicted = data.get("predicted")
        if predicted is not None and not isinstance(predicted, dict):
            raise FormatError(f"'predicted' is {type(predicted).__name__}, expected an object or null")
        return cls(
            model_name=data["model_name"],
            sliced=data["sliced"],
            stages=tuple(PlanStage.from_json(s, i) for i, s in enumerate(stages)),
            num_blocks=num_blocks,
            objective=data["objective"],
            predicted=predicted,
            created_by=data["created_by"],
        )


def validate_plan(plan: Plan, num_blocks: int) -> None:
    """Check that ``plan`` fits a sliced model of ``num_blocks`` blocks; raise PlanError naming the fix.

    The stages must be non-empty, contiguous and cover exactly ``[0, num_blocks)``; a device other than
    ``"local"`` may run at most one stage; ``threads`` is positive when set.
    """
    if plan.num_blocks != num_blocks:
        raise PlanError(
            f"the plan was made for {plan.num_blocks} blocks but the sliced model has {num_blocks}; "
            "re-run `layerline configure` for this sliced model, or write the plan for it"
        )
    if not plan.stages:
        raise PlanError(f"the plan has no stages; add at least one stage covering blocks [0, {num_blocks})")
    expected = 0
    seen: dict[str, int] = {}
    for i, stage in enumerate(plan.stages):
        start, stop = stage.blocks
        if start != expected:
            what = "a gap" if start > expected else "an overlap"
            raise PlanError(
                f"stage {i} starts at block {start} but the previous stage ends at {expected} ({what}); "
                f"make stage {i} start at block {expected}"
            )
        if stop <= start:
            raise PlanError(
                f"stage {i} has an empty block range [{start}, {stop}); give it at least one block "
                f"(stop > {start}) or remove it"
            )
        if stop > num_blocks:
            raise PlanError(
                f"stage {i} ends at block {stop} but the model has only {num_blocks} blocks; "
                f"end it at {num_blocks}"
            )
        if stage.threads is not None and stage.threads < 1:
            raise PlanError(f"stage {i} has threads={stage.threads}; use a positive number or leave it unset")
        if stage.device != LOCAL_DEVICE:
            if stage.device in seen:
                raise PlanError(
                    f"stage {i} and stage {seen[stage.device]} both run on device {stage.device!r}; a device "
                    f"runs at most one stage: merge them or move one to another device (only "
                    f"{LOCAL_DEVICE!r} may be shared)"
                )
            seen[stage.device] = i
        expected = stop
    if expected != num_blocks:
        raise PlanError(
            f"the last stage ends at block {expected} but the model has {num_blocks} blocks; "
            f"extend the last stage to {num_blocks} or add a stage [{expected}, {num_blocks})"
        )


def save_plan(plan: Plan, path: str | os.PathLike[str]) -> None:
    """Write ``plan`` as JSON to ``path`` (atomically); ``sliced`` is stored relative to the file's folder."""
    target = Path(path)
    directory = target.resolve().parent
    sliced = plan.sliced
    try:
        sliced = os.path.relpath(Path(sliced).resolve(), directory)
    except ValueError:  # another drive on Windows: keep it absolute
        sliced = str(Path(sliced).resolve())
    data = plan.to_json()
    data["sliced"] = sliced
    try:
        text = json.dumps(data, indent=2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise FormatError(
            f"cannot write plan {target}: {exc}; 'predicted' must hold only finite numbers, strings, "
            "lists and objects"
        ) from exc
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, target)
    logger.debug("wrote plan %s (%d stages)", target, len(plan.stages))


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read and check a plan file; ``sliced`` comes back resolved against the file's directory."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FormatError(
            f"no plan file at {source}; create one with `layerline configure` or by hand (docs/plan.md)"
        ) from None
    except OSError as exc:
        raise FormatError(f"cannot read plan file {source}: {exc}") from exc
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as exc:
        raise FormatError(f"plan file {source} is not valid JSON: {exc}; fix or regenerate it") from exc
    try:
        plan = Plan.from_json(data)
        validate_plan(plan, plan.num_blocks)
    except (FormatError, PlanError) as exc:
        raise FormatError(f"plan file {source}: {exc}") from exc
    sliced = Path(plan.sliced)
    if not sliced.is_absolute():
        sliced = source.resolve().parent / sliced
    return Plan(
        model_name=plan.model_name,
        sliced=os.path.normpath(sliced),
        stages=plan.stages,
        num_blocks=plan.num_blocks,
        objective=plan.objective,
        predicted=plan.predicted,
        created_by=plan.created_by,
    )


def _reject_constant(name: str) -> float:
    """json calls this only for NaN, Infinity and -Infinity, which a plan file must not hold."""
    raise ValueError(f"{name} is not allowed in a plan file")
