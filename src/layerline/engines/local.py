"""The embedded ``local`` engine: stage workers and the gateway as background processes on this machine.

``deploy`` writes each stage's merged ONNX graph and config into the deployment's directory, starts one
worker process per stage and a gateway process, and returns once the gateway reports the whole chain
ready — or stops everything it started and raises with the failing process's own error message.
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
    save_state,
)
from layerline.errors import DeploymentExists, EngineError, FormatError

if TYPE_CHECKING:
    from layerline.profile.cluster import Cluster, DeviceSpec

__all__ = [
    "DeploySettings",
    "DeploymentStatus",
    "GatewayHealth",
    "LocalEngine",
    "StageProcessStatus",
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


@dataclass(frozen=True)
class StageProcessStatus:
    role: str
    pid: int
    running: bool
    blocks: tuple[int, int] | None
    log: str
    health: str = ""


@dataclass(frozen=True)
class DeploymentStatus:
    state: DeploymentState
    processes: tuple[StageProcessStatus, ...]
    ready: bool
    detail: str

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
            "processes": [
                {
                    "role": p.role,
                    "pid": p.pid,
                    "running": p.running,
                    "blocks": p.blocks,
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

        A device with ``cpu_quota`` gets a cgroup v1 cpu group for this deployment; its stage's worker and,
        on the source device, the gateway run in it. PlanError/EngineError before anything starts when a
        device is not in the cluster or a quota cannot be enforced.
        """
        from layerline.engines.configs import write_deployment_files
        from layerline.engines.placement import check_quotas, place

        placed = place(target, cluster, settings.threads)
        for warning in placed.warnings:
            log.info("%s", warning)
        if placed.quotas:
            check_quotas(placed, cgroup_root)
        self._refuse_conflicts(settings)
        workdir = deployment_dir(settings.name)
        workdir.mkdir(parents=True, exist_ok=True)
        started: list[ProcessRecord] = []
        groups: dict[str, Path] = {}
        try:
            if settings.transport == "redis" and settings.redis_url == "auto":
                settings = self._start_redis(settings, workdir, started, progress)
            progress(f"writing {len(target.ranges)} stage models")
            threads = [s.threads for s in placed.stages]
            files = write_deployment_files(target, settings, workdir, threads)
            for i, cfg in enumerate(files.worker_configs):
                logfile = workdir / "logs" / f"stage{i}.log"
                proc = processes.spawn(["-m", "layerline.runtime.worker", "--config", str(cfg)], logfile)
                started.append(ProcessRecord(f"stage{i}", proc.pid, str(logfile), files.worker_ports[i]))
                self._confine(settings.name, placed.stages[i].device, proc.pid, groups, cgroup_root)
            logfile = workdir / "logs" / "gateway.log"
            proc = processes.spawn(
                ["-m", "layerline.engines.gateway_main", "--config", str(files.gateway_config)], logfile
            )
            started.append(ProcessRecord("gateway", proc.pid, str(logfile), settings.port))
            self._confine(settings.name, placed.gateway, proc.pid, groups, cgroup_root)
            state = DeploymentState(
                name=settings.name,
                engine=self.name,
                url=f"http://{settings.host}:{settings.port}",
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
                },
            )
            save_state(state)
            progress("waiting for every stage to connect")
            self._wait_ready(state, settings.ready_timeout_s)
            return state
        except BaseException:
            processes.stop_processes([p.pid for p in started], timeout_s=3.0)
            _remove_groups(groups.values())
            _remove_dir(workdir)
            raise

    @staticmethod
    def _confine(
        deployment: str, device: DeviceSpec, pid: int, groups: dict[str, Path], cgroup_root: Path | None
    ) -> None:
        """Move ``pid`` into ``device``'s cpu group (created on first use) when the device has a quota."""
        from layerline.engines.placement import create_cpu_group, join_cpu_group

        if device.cpu_quota is None:
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

    def _refuse_conflicts(self, settings: DeploySettings) -> None:
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
        if processes.port_in_use(settings.host, settings.port):
            raise DeploymentExists(
                f"port {settings.port} on {settings.host} is already in use (another deployment or program); "
                "stop it (`layerline status` lists deployments) or pass --port"
            )

    def _wait_ready(self, state: DeploymentState, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        detail = ""
        while time.monotonic() < deadline:
            for p in state.processes:
                if not processes.is_running(p.pid):
                    raise EngineError(
                        f"{p.role} exited during start-up; its log ({p.log}) ends with:\n"
                        f"{processes.tail(Path(p.log)) or '(empty)'}"
                    )
            health = http_health(state.url)
            detail = health.detail
            if health.ready:
                return
            time.sleep(0.1)
        raise EngineError(
            f"the pipeline was not ready within {timeout_s:.0f} s ({detail}); logs are in "
            f"{deployment_dir(state.name) / 'logs'}; raise --timeout for very large models"
        )

    def down(self, name: str) -> DeploymentState:
        """Stop every process of deployment ``name`` and remove its directory."""
        state = load_state(name)
        processes.stop_processes([p.pid for p in reversed(state.processes)])
        _remove_groups(Path(g) for g in dict(state.extra.get("cgroups") or {}).values())
        _remove_dir(deployment_dir(name))
        return state

    def status(self, name: str) -> DeploymentStatus:
        state = load_state(name)
        blocks = {f"stage{s['index']}": tuple(s["blocks"]) for s in state.stages}
        procs = tuple(
            StageProcessStatus(p.role, p.pid, processes.is_running(p.pid), blocks.get(p.role), p.log)
            for p in state.processes
        )
        gateway_up = any(p.role == "gateway" and p.running for p in procs)
        if not gateway_up:
            return DeploymentStatus(state, procs, False, "gateway process is not running")
        health = http_health(state.url)
        procs = tuple(_with_health(p, health) for p in procs)
        return DeploymentStatus(state, procs, health.ready, health.detail)


def _with_health(proc: StageProcessStatus, health: GatewayHealth) -> StageProcessStatus:
    """The process status with the gateway's view of that stage (the last health probe's answer)."""
    if not proc.role.startswith("stage"):
        return replace(proc, health="serving" if proc.running else "not running")
    index = int(proc.role[len("stage") :])
    ready, detail = health.stages.get(index, (False, "no answer in the health probe"))
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
