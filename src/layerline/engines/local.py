"""The embedded ``local`` engine: stage workers and the gateway as background processes on this machine.

``deploy`` writes each stage's merged ONNX graph and config into the deployment's directory, starts one
worker process per stage and a gateway process, and returns once the gateway reports the whole chain
ready — or stops everything it started and raises with the failing process's own error message.
On a running testbed's devices (``engine: testbed``) the workers and the gateway run inside the devices
(:mod:`layerline.engines.on_testbed`).

With the Redis transport a stage may run several replicas (``DeploySettings.replicas``), each a worker
process recorded as ``stage<k>.r<slot>``; :meth:`LocalEngine.scaler` changes their number later, from
any process (:class:`layerline.autoscale.local_scaler.LocalReplicaScaler`), and ``settings.autoscale``
starts the deployment's autoscaler (:mod:`layerline.autoscale`) as one more recorded process.

The replica counts, cpu groups, the private redis-server and the autoscaler are started by
:mod:`layerline.engines.local_processes`; ``status`` and the readiness wait are
:mod:`layerline.engines.local_status` (its names are re-exported here).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from layerline.engines import processes
from layerline.engines.local_processes import (
    confine,
    cpu_group,
    remove_dir,
    remove_groups,
    replica_counts,
    start_autoscaler,
    start_redis,
)
from layerline.engines.local_status import (
    DeploymentStatus,
    GatewayHealth,
    StageProcessStatus,
    StageReplicas,
    deployment_status,
    http_health,
    wait_ready,
)
from layerline.engines.stages import DeployTarget
from layerline.engines.state import (
    DeploymentState,
    ProcessRecord,
    deployment_dir,
    list_deployments,
    load_state,
    save_state,
    state_lock,
)
from layerline.errors import DeploymentExists, EngineError, FormatError

if TYPE_CHECKING:
    from layerline.autoscale.local_scaler import LocalReplicaScaler
    from layerline.autoscale.policy import AutoscaleConfig
    from layerline.engines.placement import DevicePlacement
    from layerline.profile.cluster import Cluster, DeviceSpec

__all__ = [
    "DeploySettings",
    "DeploymentStatus",
    "GatewayHealth",
    "LocalEngine",
    "StageProcessStatus",
    "StageReplicas",
    "http_health",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeploySettings:
    """How to run a deployment: its name, the gateway address, and the workers' settings."""

    name: str
    host: str = "127.0.0.1"
    port: int = 8765
    #: onnxruntime threads of every stage; None: the plan's own, else what the benchmark used (see
    #: :func:`layerline.engines.placement.place`), 1 for a balanced split.
    threads: int | None = None
    exact: bool = False
    ready_timeout_s: float = 120.0
    request_timeout_s: float = 30.0
    max_body_bytes: int = 64 * 1024 * 1024
    queue_size: int = 8
    #: "tcp" (stages chained directly) or "redis" (through Redis Streams; see docs/redis.md).
    transport: str = "tcp"
    #: with transport "redis": "auto" starts a private redis-server for the deployment, else a redis:// URL.
    redis_url: str = "auto"
    #: worker processes per stage (None: one each); other counts than 1 need the redis transport.
    replicas: tuple[int, ...] | None = None
    #: with transport "redis": run this autoscaler (``python -m layerline.autoscale``) with the deployment.
    autoscale: AutoscaleConfig | None = None
    #: the autoscaler's Prometheus endpoint on 127.0.0.1 (0: a free port).
    autoscale_metrics_port: int = 0


class LocalEngine:
    """Runs deployments as processes on this machine; state lives under ``$LAYERLINE_HOME``."""

    name = "local"

    def deploy(
        self,
        target: DeployTarget,
        settings: DeploySettings,
        progress: Callable[[str], None] = lambda _msg: None,
        cluster: Cluster | None = None,
        cgroup_root: Path | None = None,
    ) -> DeploymentState:
        """Start ``target``'s stages (each on its device of ``cluster``: see docs/local-engine.md).

        A local device with ``cpu_quota`` gets a cgroup v1 cpu group for this deployment; its stage's worker
        and, on the source device, the gateway run in it. On testbed devices the worker runs inside its
        device, listening on the device's address, and the gateway inside the source device (the URL is
        on its address). PlanError/EngineError before anything starts when a device is not in the cluster,
        a quota cannot be enforced or the testbed is gone.
        """
        from layerline.autoscale.local_scaler import start_replica
        from layerline.engines import on_testbed
        from layerline.engines.configs import write_deployment_files
        from layerline.engines.placement import check_quotas, place

        counts = replica_counts(settings, len(target.ranges))
        placed = place(target, cluster, settings.threads)
        for warning in placed.warnings:
            log.info("%s", warning)
        testbed = on_testbed.testbed_for(placed, cluster)
        if testbed is not None:
            if settings.transport != "tcp":
                raise EngineError(
                    f"transport {settings.transport!r} is not supported on testbed devices (they cannot "
                    "reach a Redis server on this machine's loopback); deploy with --transport tcp"
                )
            settings = on_testbed.gateway_settings(settings, placed)
        if placed.quotas:
            check_quotas(placed, cgroup_root)
        self._refuse_conflicts(settings, placed if testbed is not None else None)
        workdir = deployment_dir(settings.name)
        workdir.mkdir(parents=True, exist_ok=True)
        started: list[ProcessRecord] = []
        groups: dict[str, Path] = {}
        try:
            if settings.transport == "redis" and settings.redis_url == "auto":
                settings = start_redis(settings, workdir, started, progress)
            progress(f"writing {len(target.ranges)} stage models")
            threads = [s.threads for s in placed.stages]
            endpoints = None
            if testbed is not None:
                progress("picking ports on the testbed devices")
                endpoints = on_testbed.device_endpoints(placed, settings.port)
            files = write_deployment_files(target, settings, workdir, threads, endpoints)

            def wrap(device: DeviceSpec) -> Callable[[list[str]], list[str]] | None:
                return on_testbed.wrapper(testbed, device.name) if testbed is not None else None

            redis = settings.transport == "redis"
            for i, cfg in enumerate(files.worker_configs):
                device = placed.stages[i].device
                if redis:  # replicas: each recorded as stage<i>.r<slot>, ready once it consumes
                    group = cpu_group(settings.name, device, groups, cgroup_root)
                    for slot in range(counts[i]):
                        started.append(start_replica(workdir, i, slot, group))
                    continue
                logfile = workdir / "logs" / f"stage{i}.log"
                proc = processes.spawn(
                    ["-m", "layerline.runtime.worker", "--config", str(cfg)], logfile, wrap=wrap(device)
                )
                started.append(ProcessRecord(f"stage{i}", proc.pid, str(logfile), files.worker_ports[i]))
                confine(settings.name, device, proc.pid, groups, cgroup_root)
            logfile = workdir / "logs" / "gateway.log"
            proc = processes.spawn(
                ["-m", "layerline.engines.gateway_main", "--config", str(files.gateway_config)],
                logfile,
                wrap=wrap(placed.gateway),
            )
            started.append(ProcessRecord("gateway", proc.pid, str(logfile), settings.port))
            confine(settings.name, placed.gateway, proc.pid, groups, cgroup_root)
            url_host = settings.host
            if testbed is not None and url_host == "0.0.0.0":
                url_host = placed.gateway.address
            state = DeploymentState(
                name=settings.name,
                engine=self.name,
                url=f"http://{url_host}:{settings.port}",
                host=settings.host,
                port=settings.port,
                sliced=str(target.sliced_dir.resolve()),
                stages=tuple(
                    {
                        "index": i,
                        "blocks": list(r),
                        "device": d,
                        "threads": p.threads,
                        "cpu_quota": p.device.cpu_quota,
                        "replicas": counts[i],
                        **({"engine": "testbed", "address": p.device.address} if testbed is not None else {}),
                    }
                    for i, (r, d, p) in enumerate(
                        zip(target.ranges, target.devices, placed.stages, strict=True)
                    )
                ),
                processes=tuple(started),
                started_at=time.time(),
                extra={
                    "threads": settings.threads,
                    "gateway_device": placed.gateway.name,
                    "cgroups": {name: str(path) for name, path in groups.items()},
                    "exact": settings.exact,
                    "transport": settings.transport,
                    **({"redis_url": settings.redis_url} if settings.transport == "redis" else {}),
                    **(
                        {"testbed": on_testbed.testbed_record(testbed, placed)} if testbed is not None else {}
                    ),
                },
            )
            save_state(state)
            progress("waiting for every stage to connect")
            wait_ready(state, settings.ready_timeout_s)
            if settings.autoscale is not None:
                progress("starting the autoscaler")
                state = start_autoscaler(state, settings, started)
            return state
        except BaseException:
            processes.stop_processes([p.pid for p in started], timeout_s=3.0)
            remove_groups(groups.values())
            remove_dir(workdir)
            raise

    def scaler(self, name: str) -> LocalReplicaScaler:
        """A :class:`~layerline.runtime.scaling.ReplicaScaler` of deployment ``name``'s stages; it acts on
        the recorded processes, so any process (the CLI, the autoscaler) can use it."""
        from layerline.autoscale.local_scaler import LocalReplicaScaler

        return LocalReplicaScaler(name)

    def _refuse_conflicts(self, settings: DeploySettings, testbed_placement: DevicePlacement | None) -> None:
        if settings.name in list_deployments():
            try:
                old = load_state(settings.name)
            except FormatError:
                old = None
            if old is not None and any(processes.is_running(p.pid) for p in old.processes):
                raise DeploymentExists(
                    f"a deployment named {settings.name!r} is already running at {old.url}; "
                    f"stop it with `layerline down --name {settings.name}` or pick another --name"
                )
            log.info("removing the stale state of stopped deployment %s", settings.name)
            if old is not None:
                remove_groups(Path(g) for g in dict(old.extra.get("cgroups") or {}).values())
            remove_dir(deployment_dir(settings.name))
        if testbed_placement is not None:
            from layerline.engines.on_testbed import check_gateway_port

            check_gateway_port(settings, testbed_placement)
        elif processes.port_in_use(settings.host, settings.port):
            raise DeploymentExists(
                f"port {settings.port} on {settings.host} is already in use (another deployment or program); "
                "stop it (`layerline status` lists deployments) or pass --port"
            )

    def down(self, name: str) -> DeploymentState:
        """Stop every process of deployment ``name`` and remove its directory.

        The autoscaler goes first (so it starts nothing more); then, holding the state lock (a scale in
        progress records what it starts under it), every recorded process, and any process left whose
        command line names the deployment's directory (a replica whose scaler died before recording it).
        """
        state = load_state(name)
        processes.stop_processes([p.pid for p in state.processes if p.role == "autoscaler"])
        try:
            with state_lock(name, timeout_s=10.0):
                state = load_state(name)
                processes.stop_processes([p.pid for p in reversed(state.processes)])
        except EngineError as exc:  # a scaler holds the lock too long: stop what we know anyway
            log.warning("%s", exc)
            processes.stop_processes([p.pid for p in reversed(state.processes)])
        directory = deployment_dir(name)
        strays = {
            pid
            for d in {str(directory), str(directory.resolve())}
            for pid in processes.find_processes(d + "/")
        }
        if strays:
            log.warning("stopping %d unrecorded process(es) of deployment %s", len(strays), name)
            processes.stop_processes(sorted(strays))
        remove_groups(Path(g) for g in dict(state.extra.get("cgroups") or {}).values())
        remove_dir(directory)
        return state

    def status(self, name: str) -> DeploymentStatus:
        """Deployment ``name``'s processes, replicas and readiness (see :func:`deployment_status`)."""
        return deployment_status(name)
