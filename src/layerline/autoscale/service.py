"""Run the autoscaler of a local deployment until stopped: ``layerline autoscale`` (foreground) and
``python -m layerline.autoscale`` (the background process ``deploy --autoscale`` starts).

Both read the deployment's state (its Redis URL, its stages; the streams' prefix is its name), drive a
:class:`~layerline.autoscale.local_scaler.LocalReplicaScaler`, and with a metrics port serve
``GET /metrics`` (Prometheus text) on ``metrics_host:metrics_port`` (port 0: a free one). SIGINT and
SIGTERM stop the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

from layerline.autoscale.controller import AutoscaleController
from layerline.autoscale.local_scaler import LocalReplicaScaler
from layerline.autoscale.metrics import CONTENT_TYPE, AutoscaleMetrics, RedisStageMetrics
from layerline.autoscale.policy import AutoscaleConfig, Decision
from layerline.engines.state import load_state
from layerline.errors import EngineError
from layerline.runtime.redis_resp import RespError
from layerline.runtime.scaling import ReplicaScaler

__all__ = ["run_autoscaler", "serve_autoscaler"]

log = logging.getLogger(__name__)


async def _serve_metrics(metrics: AutoscaleMetrics, host: str, port: int) -> tuple[object, int]:
    """Start ``GET /metrics`` on ``host:port``; the aiohttp runner and the port it got."""
    from aiohttp import web

    async def handler(_request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise EngineError(
            f"the autoscaler cannot serve metrics on {host}:{port}: {exc}; pick another --metrics-port"
        ) from exc
    addresses = runner.addresses  # the port actually bound (port 0: a free one)
    return runner, int(addresses[0][1]) if addresses else port


async def serve_autoscaler(
    name: str,
    config: AutoscaleConfig,
    *,
    metrics_host: str = "127.0.0.1",
    metrics_port: int | None = None,
    ready_file: str | Path | None = None,
    stop: asyncio.Event | None = None,
    on_decision: Callable[[Decision], None] | None = None,
    on_start: Callable[[str], None] | None = None,
) -> AutoscaleController:
    """Autoscale deployment ``name`` until ``stop`` is set (or SIGINT/SIGTERM); returns the controller.

    EngineError before anything runs when the deployment is not a local Redis deployment, its stage
    count differs from the config's, or Redis does not answer within 10 s. ``ready_file`` gets
    ``{"pid", "metrics_port", "metrics_url"}`` once the first poll has read the streams; ``on_start``
    gets the metrics URL ('' without a port).
    """
    state = load_state(name)
    if state.extra.get("transport") != "redis" or not state.extra.get("redis_url"):
        raise EngineError(
            f"deployment {name!r} does not use the redis transport; autoscaling reads the stages' Redis "
            "streams: deploy with --transport redis"
        )
    if state.engine == "swarm":  # docker service scale
        from layerline.engines.swarm.scaling import SwarmReplicaScaler

        scaler: ReplicaScaler = SwarmReplicaScaler(name)
    else:
        scaler = LocalReplicaScaler(name)
    source = RedisStageMetrics(str(state.extra["redis_url"]), stages=len(state.stages), prefix=name)
    metrics = AutoscaleMetrics(len(state.stages))
    controller = AutoscaleController(scaler, source, config, metrics=metrics, on_decision=on_decision)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):  # not the main thread
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    runner = None
    try:
        for attempt in range(100):  # Redis answers before anything is decided (10 s)
            try:
                await source.read()
                break
            except (OSError, RespError) as exc:
                if attempt == 99:
                    raise EngineError(
                        f"the autoscaler cannot read deployment {name!r}'s streams at "
                        f"{state.extra['redis_url']}: {exc}"
                    ) from exc
                await asyncio.sleep(0.1)
        url = ""
        port = None
        if metrics_port is not None:
            runner, port = await _serve_metrics(metrics, metrics_host, metrics_port)
            url = f"http://{metrics_host}:{port}/metrics"
        if ready_file is not None:
            tmp = Path(f"{ready_file}.tmp")
            tmp.write_text(json.dumps({"pid": os.getpid(), "metrics_port": port, "metrics_url": url}))
            os.replace(tmp, ready_file)
        log.info(
            "autoscaling %s: %d stages every %.2f s%s",
            name,
            len(config.stages),
            config.interval_s,
            f"; metrics at {url}" if url else "",
        )
        if on_start is not None:
            on_start(url)
        await controller.run(stop)
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        if runner is not None:
            await runner.cleanup()  # type: ignore[attr-defined]
        source.close()
    log.info("autoscaler of %s stopped", name)
    return controller


def run_autoscaler(name: str, config: AutoscaleConfig, **options: object) -> AutoscaleController:
    """:func:`serve_autoscaler` in a new event loop (blocks until SIGINT/SIGTERM)."""
    return asyncio.run(serve_autoscaler(name, config, **options))  # type: ignore[arg-type]
