"""Start stage workers that consume from Redis Streams on this machine (tests, benchmarks).

``start_redis_chain(specs, url, replicas=[1, 2, 1])`` starts ``replicas[i]`` processes of
``python -m layerline.runtime.worker`` per stage with the redis transport and returns a
:class:`~layerline.runtime.launch.LocalChain` (``kill``, ``restart``, ``stop``, and the
:class:`~layerline.runtime.scaling.ReplicaScaler` methods ``scale``/``replicas``). Every replica (and a
restarted worker) is a new process, hence a new consumer name (``hostname-pid``): replicas of a stage
share its work, and one takes over what another left pending once that has been idle ``claim_idle_ms``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from layerline.runtime.launch import LocalChain, launch_chain
from layerline.runtime.redis_entries import DEFAULT_BLOB_MIN_BYTES
from layerline.runtime.stagespec import StageSpec
from layerline.runtime.worker import DEFAULT_INLINE_BELOW_MS, WorkerConfig

__all__ = ["start_redis_chain"]


def start_redis_chain(
    specs: Sequence[StageSpec],
    url: str,
    *,
    prefix: str = "layerline",
    claim_idle_ms: int = 5000,
    max_retries: int = 3,
    queue_size: int = 8,
    timeout_s: float = 30.0,
    workdir: str | Path | None = None,
    log_level: str = "INFO",
    inline_below_ms: float = DEFAULT_INLINE_BELOW_MS,
    blob_min_bytes: int = DEFAULT_BLOB_MIN_BYTES,
    replicas: Sequence[int] | None = None,
) -> LocalChain:
    """``replicas[i]`` (default 1) redis-transport worker processes per stage; returns once all consume."""
    if not specs:
        raise ValueError("start_redis_chain needs at least one stage")
    configs = [
        WorkerConfig(
            stage=spec,
            queue_size=queue_size,
            inline_below_ms=inline_below_ms,
            transport="redis",
            redis_url=url,
            stream_prefix=prefix,
            stages=len(specs),
            claim_idle_ms=claim_idle_ms,
            max_retries=max_retries,
            blob_min_bytes=blob_min_bytes,
        )
        for spec in specs
    ]
    return launch_chain(
        configs,
        "127.0.0.1",
        0,
        workdir=workdir,
        log_level=log_level,
        timeout_s=timeout_s,
        prefix="layerline-redis-",
        replicas=replicas,
    )
