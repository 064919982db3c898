"""Start stage workers that consume from Redis Streams on this machine (tests, benchmarks).

``start_redis_chain(specs, url)`` starts one ``python -m layerline.runtime.worker`` per stage with the
redis transport and returns a :class:`~layerline.runtime.launch.LocalChain` (``kill``, ``restart``,
``stop``). A restarted worker is a new process, hence a new consumer name: it takes over what its
predecessor left pending once that has been idle ``claim_idle_ms``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from layerline.runtime.launch import LocalChain, launch_chain
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
) -> LocalChain:
    """One redis-transport worker process per stage; returns once every worker consumes."""
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
    )
