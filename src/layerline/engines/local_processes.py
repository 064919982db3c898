"""The ``local`` engine's helper processes and resources: replica counts, cpu groups, the private
redis-server, the autoscaler, and removing what a deployment leaves behind.

Used by :class:`layerline.engines.local.LocalEngine` (``deploy`` and ``down``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from layerline.engines import processes
from layerline.engines.state import DeploymentState, ProcessRecord, deployment_dir, update_state
from layerline.errors import EngineError

if TYPE_CHECKING:
    from layerline.engines.local import DeploySettings
    from layerline.profile.cluster import DeviceSpec

__all__ = [
    "confine",
    "cpu_group",
    "remove_dir",
    "remove_groups",
    "replica_counts",
    "start_autoscaler",
    "start_redis",
]

log = logging.getLogger(__name__)


def replica_counts(settings: DeploySettings, stages: int) -> list[int]:
    """``settings.replicas`` checked against the stages and the transport (EngineError naming the fix)."""
    counts = [1] * stages if settings.replicas is None else [int(n) for n in settings.replicas]
    if len(counts) != stages:
        raise EngineError(f"got {len(counts)} replica counts for {stages} stages; give one per stage")
    if any(n < 0 for n in counts):
        raise EngineError(f"replica counts must be >= 0, got {counts}")
    if settings.transport != "redis" and any(n != 1 for n in counts):
        raise EngineError(
            f"replicas {','.join(map(str, counts))}: the TCP transport runs exactly one worker per stage "
            "(its upstream connects to one port); deploy with --transport redis for replicas"
        )
    if settings.autoscale is not None:
        if settings.transport != "redis":
            raise EngineError("autoscaling reads the stages' Redis streams; deploy with --transport redis")
        if len(settings.autoscale.stages) != stages:
            raise EngineError(
                f"the autoscale config has {len(settings.autoscale.stages)} stage policies for "
                f"{stages} stages"
            )
    return counts


def cpu_group(
    deployment: str, device: DeviceSpec, groups: dict[str, Path], cgroup_root: Path | None
) -> Path | None:
    """``device``'s cpu group for this deployment (created on first use), None when it needs none."""
    from layerline.engines.placement import create_cpu_group

    if device.cpu_quota is None or device.engine != "local":
        return None
    if device.name not in groups:
        groups[device.name] = create_cpu_group(deployment, device.name, device.cpu_quota, cgroup_root)
    return groups[device.name]


def confine(
    deployment: str, device: DeviceSpec, pid: int, groups: dict[str, Path], cgroup_root: Path | None
) -> None:
    """Move ``pid`` into ``device``'s cpu group (created on first use) when it is a local device with a
    quota (a testbed device's own cgroups already hold the processes started inside it)."""
    from layerline.engines.placement import create_cpu_group, join_cpu_group

    if device.cpu_quota is None or device.engine != "local":
        return
    if device.name not in groups:
        groups[device.name] = create_cpu_group(deployment, device.name, device.cpu_quota, cgroup_root)
    join_cpu_group(groups[device.name], pid)


def start_redis(
    settings: DeploySettings, workdir: Path, started: list[ProcessRecord], progress: Callable[[str], None]
) -> DeploySettings:
    """Start a private redis-server for this deployment (no persistence); its URL in the settings."""
    import dataclasses

    from layerline.runtime.redis_server import start_redis_server

    progress("starting redis-server")
    port = processes.free_port()
    server = start_redis_server(port, workdir / "redis", new_session=True)
    started.append(ProcessRecord("redis", server.pid, str(workdir / "redis" / "redis.log"), port))
    return dataclasses.replace(settings, redis_url=server.url)


def start_autoscaler(
    state: DeploymentState, settings: DeploySettings, started: list[ProcessRecord]
) -> DeploymentState:
    """Start ``python -m layerline.autoscale`` for this deployment, wait until it runs, record it."""
    from layerline.autoscale.local_scaler import wait_json_file

    assert settings.autoscale is not None
    workdir = deployment_dir(state.name)
    config = workdir / "autoscale.json"
    settings.autoscale.save(config)
    ready = workdir / "run" / "autoscaler.ready"
    ready.parent.mkdir(parents=True, exist_ok=True)
    ready.unlink(missing_ok=True)
    log_path = workdir / "logs" / "autoscaler.log"
    proc = processes.spawn(
        [
            "-m", "layerline.autoscale", "--name", state.name, "--config", str(config),
            "--metrics-port", str(settings.autoscale_metrics_port), "--ready-file", str(ready),
        ],
        log_path,
    )  # fmt: skip
    record = ProcessRecord("autoscaler", proc.pid, str(log_path), None)
    started.append(record)
    info = wait_json_file(ready, proc, "the autoscaler", log_path, 30.0)
    record = ProcessRecord("autoscaler", proc.pid, str(log_path), info.get("metrics_port"))
    started[-1] = record

    def add(current: DeploymentState) -> DeploymentState:
        extra = {
            **current.extra,
            "autoscale": {**settings.autoscale.to_json(), "metrics_url": info.get("metrics_url", "")},
        }
        return replace(current, processes=(*current.processes, record), extra=extra)

    return update_state(state.name, add)


def remove_groups(groups: Iterable[Path]) -> None:
    """Remove the deployment's cpu groups (their processes have been stopped); log the ones still busy."""
    from layerline.engines.placement import remove_cpu_groups

    for group in remove_cpu_groups(list(groups)):
        log.warning("could not remove the cpu group %s (a process is still in it); remove it by hand", group)


def remove_dir(path: Path) -> None:
    """Remove a deployment directory (only ever one under the deployments root)."""
    import shutil

    root = deployment_dir("x").parent.resolve()
    if path.resolve().parent == root and path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
