"""Start stage workers that consume from Redis Streams on this machine (tests, benchmarks).

``start_redis_chain(specs, url)`` starts one ``python -m layerline.runtime.worker`` per stage with the
redis transport and returns a :class:`~layerline.runtime.launch.LocalChain` (``kill``, ``restart``,
``stop``). A restarted worker is a new process, hence a new consumer name: it takes over what its
predecessor left pending once that has been idle ``claim_idle_ms``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from layerline.runtime.launch import LocalChain
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
    created = workdir is None
    path = Path(tempfile.mkdtemp(prefix="layerline-redis-")) if workdir is None else Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    chain = LocalChain("127.0.0.1", configs, 0, path, log_level=log_level, remove_workdir=created)
    try:
        chain.processes = [chain._launch(i) for i in range(len(specs))]
        chain._wait_ready(range(len(specs)), timeout_s)
    except BaseException:
        chain.stop()
        raise
    return chain
