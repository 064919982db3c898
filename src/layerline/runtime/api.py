"""The interface between the gateway and whatever carries requests through the stages.

A :class:`Pipeline` takes named input tensors and returns the model's named outputs. Implementations:
the direct TCP chain of stage workers (``layerline.runtime.pipeline``), an in-process one that runs the
stage sessions in this process (``layerline.runtime.inprocess``, for tests and `quickstart` baselines),
and later the Redis Streams broker. The gateway depends only on this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["InferResult", "Pipeline", "PipelineHealth", "StageHealth", "StageTiming"]


@dataclass(frozen=True)
class StageTiming:
    """Where one request spent its time in one stage (seconds, measured by that stage's own clock).

    ``queue_s``: received → compute started; ``compute_s``: the onnxruntime run;
    ``send_s``: writing the result frame to the downstream connection (the transfer as the sender sees it).
    """

    stage: int
    queue_s: float
    compute_s: float
    send_s: float


@dataclass(frozen=True)
class InferResult:
    """The outputs of one request, the per-stage timings and the end-to-end time seen by the caller."""

    outputs: dict[str, np.ndarray]
    stages: tuple[StageTiming, ...] = ()
    total_s: float = 0.0


@dataclass(frozen=True)
class StageHealth:
    stage: int
    ready: bool
    detail: str = ""


@dataclass(frozen=True)
class PipelineHealth:
    """``ready`` is true only when every stage is connected and answered the last health probe."""

    ready: bool
    stages: tuple[StageHealth, ...] = field(default_factory=tuple)
    detail: str = ""


@runtime_checkable
class Pipeline(Protocol):
    """Carries requests through the stages. All methods are coroutines; call ``start`` once first."""

    async def start(self) -> None: ...

    async def infer(self, inputs: dict[str, np.ndarray], timeout_s: float) -> InferResult:
        """Run one request. Raises ``StageFailed``, ``StageUnavailable`` or ``DeadlineExceeded``."""
        ...

    async def health(self, timeout_s: float) -> PipelineHealth: ...

    async def close(self) -> None: ...
