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
"""

from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from layerline.engines import processes
from layerline.engines.stages import DeployTarget
from layerline.engines.state import (
    DeploymentState,
    ProcessRecord,
    deployment_dir,
    list_deployments,
    load_state,
    parse_role,
    save_state,
    state_lock,
    update_state,
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


@dataclass(frozen=True)
class StageProcessStatus:
    role: str
    pid: int
    running: bool
    blocks: tuple[int, int] | None
    log: str
    health: str = ""
    #: the device the process runs on ('' for helpers such as redis)
    device: str = ""


@dataclass(frozen=True)
class StageReplicas:
    """How many workers of a stage run now, and how many the deployment wants (``deploy``/``scale``)."""

    stage: int
    running: int
    desired: int


@dataclass(frozen=True)
class DeploymentStatus:
    state: DeploymentState
    processes: tuple[StageProcessStatus, ...]
    ready: bool
    detail: str
    replicas: tuple[StageReplicas, ...] = ()

    def to_json(self) -> dict:
        return {
            "name": self.state.name,
            "engine": self.state.engine,
            "url": self.state.url,
            "ready": self.ready,
            "detail": self.detail,
            "started_at": self.state.started_at,
            "sliced": self.state.sliced,
            "stages": list(self.state.stages),
            "replicas": [
                {"stage": r.stage, "running": r.running, "desired": r.desired} for r in self.replicas
            ],
            "processes": [
                {
                    "role": p.role,
                    "pid": p.pid,
                    "running": p.running,
                    "blocks": p.blocks,
                    "device": p.device,
                    "health": p.health,
                    "log": p.log,
                }
                for p in self.processes
            ],
        }


@dataclass(frozen=True)
class GatewayHealth:
    """The gateway's readiness answer: overall, and per stage index (ready, detail)."""

    ready: bool
    detail: str
    stages: dict[int, tuple[bool, str]]


def http_health(url: str, timeout_s: float = 2.0) -> GatewayHealth:
    """Ask the gateway at ``url`` whether the whole chain is ready, and each stage's view of it."""
    try:
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=timeout_s) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        return GatewayHealth(False, f"gateway not answering at {url} ({getattr(exc, 'reason', exc)})", {})
    try:
        doc = json.loads(body)
        stages = {
            int(s["stage"]): (bool(s["ready"]), str(s.get("detail", ""))) for s in doc.get("stages", [])
        }
        detail = str(doc.get("detail") or doc.get("error") or "")
    except (ValueError, AttributeError, KeyError, TypeError):
        stages, detail = {}, body.decode(errors="replace")[:200]
    return GatewayHealth(status == 200, detail or ("ready" if status == 200 else f"HTTP {status}"), stages)


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

        counts = _replica_counts(settings, len(target.ranges))
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
                settings = self._start_redis(settings, workdir, started, progress)
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
                    group = self._group(settings.name, device, groups, cgroup_root)
                    for slot in range(counts[i]):
                        started.append(start_replica(workdir, i, slot, group))
                    continue
                logfile = workdir / "logs" / f"stage{i}.log"
                proc = processes.spawn(
                    ["-m", "layerline.runtime.worker", "--config", str(cfg)], logfile, wrap=wrap(device)
                )
                started.append(ProcessRecord(f"stage{i}", proc.pid, str(logfile), files.worker_ports[i]))
                self._confine(settings.name, device, proc.pid, groups, cgroup_root)
            logfile = workdir / "logs" / "gateway.log"
            proc = processes.spawn(
                ["-m", "layerline.engines.gateway_main", "--config", str(files.gateway_config)],
                logfile,
                wrap=wrap(placed.gateway),
            )
            started.append(ProcessRecord("gateway", proc.pid, str(logfile), settings.port))
            self._confine(settings.name, placed.gateway, proc.pid, groups, cgroup_root)
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
            self._wait_ready(state, settings.ready_timeout_s)
            if settings.autoscale is not None:
                progress("starting the autoscaler")
                state = self._start_autoscaler(state, settings, started)
            return state
        except BaseException:
            processes.stop_processes([p.pid for p in started], timeout_s=3.0)
            _remove_groups(groups.values())
            _remove_dir(workdir)
            raise

    @staticmethod
    def _group(
        deployment: str, device: DeviceSpec, groups: dict[str, Path], cgroup_root: Path | None
    ) -> Path | None:
        """``device``'s cpu group for this deployment (created on first use), None when it needs none."""
        from layerline.engines.placement import create_cpu_group

        if device.cpu_quota is None or device.engine != "local":
            return None
        if device.name not in groups:
            groups[device.name] = create_cpu_group(deployment, device.name, device.cpu_quota, cgroup_root)
        return groups[device.name]

    def _start_autoscaler(
        self, state: DeploymentState, settings: DeploySettings, started: list[ProcessRecord]
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

    def scaler(self, name: str) -> LocalReplicaScaler:
        """A :class:`~layerline.runtime.scaling.ReplicaScaler` of deployment ``name``'s stages; it acts on
        the recorded processes, so any process (the CLI, the autoscaler) can use it."""
        from layerline.autoscale.local_scaler import LocalReplicaScaler

        return LocalReplicaScaler(name)

    @staticmethod
    def _confine(
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

    @staticmethod
    def _start_redis(
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
                _remove_groups(Path(g) for g in dict(old.extra.get("cgroups") or {}).values())
            _remove_dir(deployment_dir(settings.name))
        if testbed_placement is not None:
            from layerline.engines.on_testbed import check_gateway_port

            check_gateway_port(settings, testbed_placement)
        elif processes.port_in_use(settings.host, settings.port):
            raise DeploymentExists(
                f"port {settings.port} on {settings.host} is already in use (another deployment or program); "
                "stop it (`layerline status` lists deployments) or pass --port"
            )

    def _wait_ready(self, state: DeploymentState, timeout_s: float) -> None:
        """Until every replica consumes (its ready file) and the gateway sees each stage that should run
        a replica; EngineError with the log of a process that exits first, or at the timeout."""
        from layerline.autoscale.local_scaler import replica_ready_file

        deadline = time.monotonic() + timeout_s
        workdir = deployment_dir(state.name)
        ready_files = {
            p.role: replica_ready_file(workdir, *role)
            for p in state.processes
            if (role := parse_role(p.role)) is not None and p.role != f"stage{role[0]}"
        }
        detail = ""
        while time.monotonic() < deadline:
            for p in state.processes:
                if not processes.is_running(p.pid):
                    raise EngineError(
                        f"{p.role} exited during start-up; its log ({p.log}) ends with:\n"
                        f"{processes.tail(Path(p.log)) or '(empty)'}"
                    )
            starting = sorted(role for role, path in ready_files.items() if not path.exists())
            if starting:
                detail = f"waiting for {', '.join(starting)} to start consuming"
            else:
                health = http_health(state.url)
                detail = health.detail
                if health.ready or _serving(state, health):
                    return
            time.sleep(0.1)
        raise EngineError(
            f"the pipeline was not ready within {timeout_s:.0f} s ({detail}); logs are in "
            f"{deployment_dir(state.name) / 'logs'}; raise --timeout for very large models"
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
        _remove_groups(Path(g) for g in dict(state.extra.get("cgroups") or {}).values())
        _remove_dir(directory)
        return state

    def status(self, name: str) -> DeploymentStatus:
        from layerline.engines.on_testbed import testbed_problem

        state = load_state(name)
        blocks = {s["index"]: tuple(s["blocks"]) for s in state.stages}
        devices = {s["index"]: str(s.get("device", "local")) for s in state.stages}
        gateway_device = str(state.extra.get("gateway_device") or "")

        def device_of(role: str) -> str:
            parsed = parse_role(role)
            return devices.get(parsed[0], "") if parsed else (gateway_device if role == "gateway" else "")

        procs = tuple(
            StageProcessStatus(
                p.role,
                p.pid,
                processes.is_running(p.pid),
                blocks.get(p.stage) if p.stage is not None else None,
                p.log,
                device=device_of(p.role),
            )
            for p in state.processes
        )
        replicas = tuple(
            StageReplicas(
                k,
                sum(1 for p in procs if p.running and (parse_role(p.role) or (-1,))[0] == k),
                state.desired_replicas(k),
            )
            for k in range(len(state.stages))
        )
        gone = testbed_problem(state.extra.get("testbed"))
        if gone:
            procs = tuple(replace(p, health="testbed gone") for p in procs)
            return DeploymentStatus(state, procs, False, gone, replicas)
        gateway_up = any(p.role == "gateway" and p.running for p in procs)
        if not gateway_up:
            return DeploymentStatus(state, procs, False, "gateway process is not running", replicas)
        health = http_health(state.url)
        procs = tuple(_with_health(p, health) for p in procs)
        ready, detail = health.ready, health.detail
        elastic = sorted(k for k in range(len(state.stages)) if state.desired_replicas(k) == 0)
        if ready and elastic and state.extra.get("transport") == "redis":
            # the gateway knows these stages may be at zero (min_replicas 0) and lets requests wait for them
            which = (
                f"stage {elastic[0]} is"
                if len(elastic) == 1
                else f"stages {', '.join(map(str, elastic))} are"
            )
            detail = (
                f"{which} scaled to zero by the autoscaler: a request waiting in the stream wakes a replica"
            )
        idle = sorted(k for k, (ok, _d) in health.stages.items() if not ok and state.desired_replicas(k) == 0)
        if not ready and idle and _serving(state, health):
            which = f"stage {idle[0]} is" if len(idle) == 1 else f"stages {', '.join(map(str, idle))} are"
            if any(p.role == "autoscaler" and p.running for p in procs):
                # not "ready": the gateway answers 503 while its last probe found a stage without a
                # replica (docs/redis.md, "Scaling to zero")
                detail = (
                    f"{which} scaled to zero by the autoscaler: a request waiting in the stream wakes "
                    "a replica"
                )
            else:
                detail = (
                    f"{which} scaled to 0 replicas: requests wait in the stream; run "
                    f"`layerline scale {idle[0]}=1 --name {name}`"
                )
        return DeploymentStatus(state, procs, ready, detail, replicas)


def _serving(state: DeploymentState, health: GatewayHealth) -> bool:
    """A Redis deployment with stages scaled to zero whose other stages are all ready in the gateway's
    answer (a request waits in the stream of a stage at zero until a replica starts)."""
    wanted = [k for k in range(len(state.stages)) if state.desired_replicas(k) > 0]
    return (
        state.extra.get("transport") == "redis"
        and len(wanted) < len(state.stages)
        and bool(health.stages)
        and all(health.stages.get(k, (False, ""))[0] for k in wanted)
    )


def _replica_counts(settings: DeploySettings, stages: int) -> list[int]:
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


def _with_health(proc: StageProcessStatus, health: GatewayHealth) -> StageProcessStatus:
    """The process status with the gateway's view of that stage (the last health probe's answer)."""
    parsed = parse_role(proc.role)
    if parsed is None:
        return replace(proc, health="serving" if proc.running else "not running")
    if not proc.running:
        return replace(proc, health="not running")
    ready, detail = health.stages.get(parsed[0], (False, "no answer in the health probe"))
    return replace(proc, health="ready" if ready else (detail or "not ready"))


def _remove_groups(groups: Iterable[Path]) -> None:
    """Remove the deployment's cpu groups (their processes have been stopped); log the ones still busy."""
    from layerline.engines.placement import remove_cpu_groups

    for group in remove_cpu_groups(list(groups)):
        log.warning("could not remove the cpu group %s (a process is still in it); remove it by hand", group)


def _remove_dir(path: Path) -> None:
    """Remove a deployment directory (only ever one under the deployments root)."""
    import shutil

    root = deployment_dir("x").parent.resolve()
    if path.resolve().parent == root and path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
