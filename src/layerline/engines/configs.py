"""The files a local deployment runs from: merged stage models, worker configs and the gateway config."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerline.engines.processes import free_port
from layerline.engines.stages import DeployTarget
from layerline.errors import FormatError, LayerlineError

__all__ = ["GATEWAY_CONFIG_VERSION", "DeploymentFiles", "Endpoints", "write_deployment_files"]

GATEWAY_CONFIG_VERSION = 1
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Endpoints:
    """Where each stage worker listens (host, port) and where the gateway collects the last stage's results.

    Each worker sends to the next stage's endpoint, the last one to ``result``. Default (no endpoints):
    free loopback ports. On a testbed, each endpoint is on its device's address.
    """

    stages: tuple[tuple[str, int], ...]
    result: tuple[str, int]


@dataclass(frozen=True)
class DeploymentFiles:
    worker_configs: tuple[Path, ...]
    worker_ports: tuple[int, ...]
    gateway_config: Path


def write_deployment_files(
    target: DeployTarget,
    settings: Any,
    workdir: Path,
    threads: Sequence[int] | None = None,
    endpoints: Endpoints | None = None,
) -> DeploymentFiles:
    """Write stage ``i``'s merged graph and worker config, and the gateway's config, under ``workdir``.

    Stage ``i`` runs ``threads[i]`` onnxruntime threads (see :func:`layerline.engines.placement.place`);
    without ``threads``, ``settings.threads`` (1 when that is None).

    Workers listen on ``endpoints`` (default: free loopback ports); the last one sends its results to the
    gateway's result endpoint. The gateway listens on ``settings.host:settings.port``.
    With ``settings.transport == "redis"`` they consume from Redis at ``settings.redis_url`` instead
    (streams prefixed with the deployment's name) and the gateway talks to Redis only.
    """
    redis = getattr(settings, "transport", "tcp") == "redis"
    from layerline.graph import Manifest, stage_forward_names, write_stage_model
    from layerline.runtime.stagespec import StageSpec
    from layerline.runtime.worker import WorkerConfig
    from layerline.serve.model_info import ModelInfo

    manifest = Manifest.load(target.sliced_dir)
    stage_dir = workdir / "stages"
    stage_dir.mkdir(parents=True, exist_ok=True)
    if endpoints is None:
        endpoints = Endpoints(
            tuple((LOOPBACK, free_port(LOOPBACK)) for _ in target.ranges), (LOOPBACK, free_port(LOOPBACK))
        )
    if len(endpoints.stages) != len(target.ranges):
        raise ValueError(f"{len(endpoints.stages)} endpoints for {len(target.ranges)} stages")
    hops = [*endpoints.stages, endpoints.result]
    ports = [port for _, port in endpoints.stages]
    configs = []
    for i, (start, stop) in enumerate(target.ranges):
        model_path = stage_dir / f"stage{i}.onnx"
        try:
            write_stage_model(target.sliced_dir, start, stop, model_path)
        except LayerlineError:
            raise
        except Exception as exc:  # onnx raises plain exceptions for damaged protobufs
            raise FormatError(
                f"cannot build stage {i} (blocks {start}–{stop - 1}) from {target.sliced_dir}: "
                f"{type(exc).__name__}: {exc}; the sliced model may be damaged, slice it again"
            ) from exc
        spec = StageSpec(
            index=i,
            model_path=str(model_path),
            forward=stage_forward_names(manifest, start, stop),
            threads=threads[i] if threads is not None else (settings.threads or 1),
            exact=settings.exact,
        )
        config = WorkerConfig(
            stage=spec,
            listen_host=hops[i][0],
            listen_port=hops[i][1],
            downstream_host=hops[i + 1][0],
            downstream_port=hops[i + 1][1],
            queue_size=settings.queue_size,
            name=f"{settings.name}/stage{i}",
            **(
                {
                    "transport": "redis",
                    "redis_url": settings.redis_url,
                    "stream_prefix": settings.name,
                    "stages": len(target.ranges),
                }
                if redis
                else {}
            ),
        )
        path = stage_dir / f"stage{i}.json"
        config.save(path)
        configs.append(path)
    model = ModelInfo(name=settings.name, inputs=manifest.inputs, outputs=manifest.outputs)
    gateway = {
        "format": "layerline.gateway",
        "format_version": GATEWAY_CONFIG_VERSION,
        "model": model.to_json(),
        "settings": {
            "host": settings.host,
            "port": settings.port,
            "max_body_bytes": settings.max_body_bytes,
            "request_timeout_s": settings.request_timeout_s,
        },
        "pipeline": {
            "host": hops[0][0],
            "port": hops[0][1],
            "stages": len(ports),
            "result_host": endpoints.result[0],
            "result_port": endpoints.result[1],
        },
    }
    if redis:
        gateway["pipeline"] = {
            "transport": "redis",
            "redis_url": settings.redis_url,
            "prefix": settings.name,
            "stages": len(ports),
        }
        autoscale = getattr(settings, "autoscale", None)
        if autoscale is not None:  # stages the autoscaler may take to zero replicas: waiting, not broken
            elastic = [k for k, policy in enumerate(autoscale.stages) if policy.min_replicas == 0]
            gateway["pipeline"]["elastic_stages"] = elastic
    gateway_path = workdir / "gateway.json"
    gateway_path.write_text(json.dumps(gateway, indent=2))
    return DeploymentFiles(tuple(configs), tuple(ports), gateway_path)
