"""Replicas per stage: what an autoscaling controller (or the local engine, or the CLI) drives.

A stage that consumes from a Redis stream can run any number of replicas, each a worker process and a
distinct consumer of the stage's group (competing consumers, ``docs/redis.md``). Something that can
start and stop them implements :class:`ReplicaScaler`; :class:`~layerline.runtime.launch.LocalChain`
does (for chains of worker processes on this machine).

Semantics every implementation keeps:

* ``scale(stage, n)`` returns once ``n`` replicas run: new ones consume (their ready file is written),
  stopped ones have exited. ``n`` may be 0 (the stage's requests wait in its stream).
* A replica is stopped with SIGTERM: it stops taking entries, finishes and hands on those it holds,
  then exits (a drain; nothing is redelivered). One that does not finish in time (or is killed) leaves
  its entries pending, and the other replicas take them over (``XAUTOCLAIM`` after ``claim_idle_ms``;
  at once for what a timed-out drain hands back): nothing is lost either way.
* ``replicas(stage)`` counts replicas that are running now (one that died no longer counts).

The load signal for a controller is :meth:`layerline.runtime.redis_pipeline.RedisPipeline.stage_loads`
(live replicas, entries pending, entries waiting, per stage).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

__all__ = ["ReplicaScaler", "parse_replicas"]


@runtime_checkable
class ReplicaScaler(Protocol):
    """Starts and stops replicas of the stages of one deployment."""

    @property
    def stage_count(self) -> int:
        """How many stages the deployment has (stages are 0 .. stage_count - 1)."""
        ...

    def replicas(self, stage: int) -> int:
        """How many replicas of ``stage`` run now."""
        ...

    def scale(self, stage: int, n: int) -> None:
        """Run exactly ``n`` replicas of ``stage`` (see the module docstring); ValueError for a bad
        stage or count, EngineError when a new replica does not start."""
        ...


def parse_replicas(spec: str | int | Sequence[int] | None, stages: int) -> list[int]:
    """Replica counts per stage from ``None`` (one each), one count for every stage (``2``, ``"2"``),
    or one per stage (``"1,2,1"``, ``[1, 2, 1]``); ValueError naming the fix otherwise."""
    if stages < 1:
        raise ValueError(f"need at least one stage, got {stages}")
    if spec is None:
        return [1] * stages
    if isinstance(spec, str):
        try:
            counts = [int(p) for p in spec.replace(" ", "").split(",") if p]
        except ValueError:
            raise ValueError(
                f"--replicas {spec!r}: give one count for every stage (2) or one per stage (1,2,1)"
            ) from None
    elif isinstance(spec, int):
        counts = [spec]
    else:
        counts = [int(n) for n in spec]
    if len(counts) == 1:
        counts *= stages
    if len(counts) != stages:
        raise ValueError(f"--replicas {spec!r}: {len(counts)} counts for {stages} stages; give 1 or {stages}")
    if any(n < 0 for n in counts):
        raise ValueError(f"--replicas {spec!r}: counts must be >= 0")
    return counts
