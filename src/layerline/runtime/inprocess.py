"""A :class:`~layerline.runtime.api.Pipeline` that runs every stage's session in this process.

It runs the same onnxruntime sessions as the stage workers, without processes or sockets: the gateway's
tests use it, and so does anything that wants a stage chain's output without deploying it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import numpy as np

from layerline.errors import DeadlineExceeded, StageFailed
from layerline.runtime.api import InferResult, PipelineHealth, StageHealth, StageTiming
from layerline.runtime.session import open_session
from layerline.runtime.stagespec import StageSpec

__all__ = ["InProcessPipeline", "run_stage"]


def run_stage(session, spec: StageSpec, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run one stage on the received ``tensors``: its session's outputs plus the forwarded tensors."""
    feeds = {i.name: tensors[i.name] for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(names, feeds), strict=True))
    for name in spec.forward:
        outputs[name] = tensors[name]
    return outputs


class InProcessPipeline:
    """Runs the stages one after the other in a worker thread of this process."""

    def __init__(self, stages: Sequence[StageSpec]) -> None:
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        self._specs = list(stages)
        self._sessions: list = []

    async def start(self) -> None:
        self._sessions = [open_session(s.model_path, s.threads, s.exact) for s in self._specs]

    def _run(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[StageTiming]]:
        tensors = inputs
        timings = []
        for spec, session in zip(self._specs, self._sessions, strict=True):
            t0 = time.perf_counter()
            try:
                tensors = run_stage(session, spec, tensors)
            except Exception as exc:  # onnxruntime raises its own exception types
                raise StageFailed(f"stage {spec.index} failed: {exc}") from exc
            timings.append(StageTiming(spec.index, 0.0, time.perf_counter() - t0, 0.0))
        return tensors, timings

    async def infer(self, inputs: dict[str, np.ndarray], timeout_s: float) -> InferResult:
        if not self._sessions:
            raise RuntimeError("InProcessPipeline.start() was not called")
        t0 = time.perf_counter()
        try:
            outputs, timings = await asyncio.wait_for(asyncio.to_thread(self._run, inputs), timeout_s)
        except asyncio.TimeoutError as exc:
            raise DeadlineExceeded(f"request did not complete within {timeout_s:.3f} s") from exc
        return InferResult(outputs, tuple(timings), time.perf_counter() - t0)

    async def health(self, timeout_s: float) -> PipelineHealth:
        ready = bool(self._sessions)
        stages = tuple(StageHealth(s.index, ready, "in-process") for s in self._specs)
        return PipelineHealth(ready, stages, "" if ready else "not started")

    async def close(self) -> None:
        self._sessions = []
