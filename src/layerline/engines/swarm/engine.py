"""The ``swarm`` engine: one Docker Swarm service per stage, the gateway as a process on the manager.

This increment runs on the manager node only: each stage's service is pinned to the manager
(``--constraint node.id==...``), uses the host's network (``--network host``: no IPVS or overlay needed, the
stages chain over loopback exactly as the local engine's do), and reads its merged stage graph and worker
config from the deployment directory, bind-mounted read-only at the same path (swarm configs are limited to
500 KB, far below a stage graph). Every service carries the label ``layerline.deployment=NAME``; ``down``
removes exactly the services and configs with that label. See docs/swarm.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from layerline.engines import processes
from layerline.engines.local import DeploySettings, http_health
from layerline.engines.stages import DeployTarget
from layerline.engines.state import (
    DeploymentState,
    ProcessRecord,
    deployment_dir,
    list_deployments,
    load_state,
    save_state,
)
from layerline.engines.swarm.docker import DockerCli
from layerline.engines.swarm.image import DEFAULT_WORKER_IMAGE
from layerline.errors import DeploymentExists, EngineError, FormatError

__all__ = ["LABEL", "ServiceStatus", "SwarmEngine", "SwarmStatus"]

log = logging.getLogger(__name__)

#: The label every object of a deployment carries: ``layerline.deployment=NAME``.
LABEL = "layerline.deployment"
#: Restarts of a stage that fails after start-up (a failure during ``deploy`` stops the deploy at once).
MAX_RESTARTS = 3


@dataclass(frozen=True)
class ServiceStatus:
    """One stage's service: replicas running/desired and the latest task's state and error."""

    stage: int
    service: str
    running: int
    desired: int
    state: str = ""
    error: str = ""


@dataclass(frozen=True)
class SwarmStatus:
    state: DeploymentState
    services: tuple[ServiceStatus, ...]
    gateway_running: bool
    ready: bool
    detail: str

    def to_json(self) -> dict:
        return {
            "name": self.state.name,
            "engine": self.state.engine,
            "url": self.state.url,
            "ready": self.ready,
            "detail": self.detail,
            "gateway_running": self.gateway_running,
            "services": [
                {
                    "stage": s.stage,
                    "service": s.service,
                    "replicas": f"{s.running}/{s.desired}",
                    "state": s.state,
                    "error": s.error,
                }
                for s in self.services
            ],
        }


def service_name(deployment: str, stage: int) -> str:
    return f"layerline-{deployment}-stage{stage}"


class SwarmEngine:
    """Deploys onto the swarm the docker CLI talks to (``docker_host``: ``-H``; None: DOCKER_HOST/default)."""

    name = "swarm"

    def __init__(self, docker_host: str | None = None, image: str = DEFAULT_WORKER_IMAGE) -> None:
        self.docker = DockerCli(docker_host)
        self.image = image

    # ---- deploy -------------------------------------------------------------------------------------
    def deploy(
        self,
        target: DeployTarget,
        settings: DeploySettings,
        progress: Callable[[str], None] = lambda _msg: None,
    ) -> DeploymentState:
        """Create one pinned service per stage and start the gateway; return once the chain is ready.

        On any failure everything this call created (services, gateway, directory) is removed and the
        error names the stage and shows its task error or log.
        """
        from layerline.engines.configs import write_deployment_files
        from layerline.engines.placement import place

        if settings.transport != "tcp":
            raise EngineError(f"the swarm engine supports transport 'tcp' only, got {settings.transport!r}")
        node, manager = self.docker.swarm_node()
        if not manager:
            raise EngineError(
                "this docker daemon is a swarm worker; point the swarm engine at a manager node"
            )
        self._check_image()
        self._refuse_conflicts(settings)
        placed = place(target, None, settings.threads)
        workdir = deployment_dir(settings.name).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        services: list[str] = []
        gateway: ProcessRecord | None = None
        t0 = time.monotonic()
        try:
            progress(f"writing {len(target.ranges)} stage models")
            files = write_deployment_files(target, settings, workdir, [s.threads for s in placed.stages])
            for i, cfg in enumerate(files.worker_configs):
                progress(f"creating service for stage {i}")
                services.append(self._create_service(settings.name, i, node, workdir, cfg))
            logfile = workdir / "logs" / "gateway.log"
            proc = processes.spawn(
                ["-m", "layerline.engines.gateway_main", "--config", str(files.gateway_config)], logfile
            )
            gateway = ProcessRecord("gateway", proc.pid, str(logfile), settings.port)
            state = DeploymentState(
                name=settings.name,
                engine=self.name,
                url=f"http://{settings.host}:{settings.port}",
                host=settings.host,
                port=settings.port,
                sliced=str(target.sliced_dir.resolve()),
                stages=tuple(
                    {"index": i, "blocks": list(r), "device": d, "threads": p.threads, "service": s}
                    for i, (r, d, p, s) in enumerate(
                        zip(target.ranges, target.devices, placed.stages, services, strict=True)
                    )
                ),
                processes=(gateway,),
                started_at=time.time(),
                extra={
                    "image": self.image,
                    "node": node,
                    "docker_host": self.docker.host,
                    "services": services,
                    "exact": settings.exact,
                    "transport": "tcp",
                    "delivery": "bind-mount",
                },
            )
            save_state(state)
            progress("waiting for every stage to connect")
            self._wait_ready(state, settings.ready_timeout_s)
            log.info("deployment %s ready in %.1f s", settings.name, time.monotonic() - t0)
            return state
        except BaseException:
            if gateway is not None:
                processes.stop_processes([gateway.pid], timeout_s=3.0)
            self._remove_objects(settings.name)
            _remove_dir(workdir)
            raise

    def _check_image(self) -> None:
        out = self.docker.run(["image", "ls", "-q", self.image])
        if not out.strip():
            raise EngineError(
                f"the worker image {self.image!r} is not on this docker daemon; build it with "
                "layerline.engines.swarm.build_worker_image() or `docker load` it (see docs/swarm.md)"
            )

    def _create_service(self, deployment: str, index: int, node: str, workdir: Path, config: Path) -> str:
        name = service_name(deployment, index)
        label = f"{LABEL}={deployment}"
        self.docker.run(
            [
                "service", "create", "--detach", "--quiet",
                "--name", name,
                "--label", label, "--label", f"layerline.stage={index}",
                "--container-label", label,
                "--constraint", f"node.id=={node}",
                "--restart-condition", "on-failure",
                "--restart-max-attempts", str(MAX_RESTARTS),
                "--restart-delay", "1s",
                "--stop-grace-period", "5s",
                "--network", "host",
                "--no-resolve-image",
                "--mount", f"type=bind,source={workdir},target={workdir},readonly",
                self.image,
                "--config", str(config),
            ]
        )  # fmt: skip
        return name

    def _refuse_conflicts(self, settings: DeploySettings) -> None:
        if self._labelled("service", settings.name):
            raise DeploymentExists(
                f"swarm services of a deployment named {settings.name!r} exist; stop it with "
                f"`layerline down --name {settings.name}` or pick another --name"
            )
        if settings.name in list_deployments():
            try:
                old = load_state(settings.name)
            except FormatError:
                old = None
            if old is not None and any(processes.is_running(p.pid) for p in old.processes):
                raise DeploymentExists(
                    f"a deployment named {settings.name!r} is already running at {old.url}; stop it with "
                    f"`layerline down --name {settings.name}` or pick another --name"
                )
            _remove_dir(deployment_dir(settings.name))
        if processes.port_in_use(settings.host, settings.port):
            raise DeploymentExists(
                f"port {settings.port} on {settings.host} is already in use; stop what uses it or pass --port"
            )

    def _wait_ready(self, state: DeploymentState, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        detail = ""
        next_check = 0.0
        while time.monotonic() < deadline:
            gateway = state.processes[0]
            if not processes.is_running(gateway.pid):
                raise EngineError(
                    f"the gateway exited during start-up; its log ({gateway.log}) ends with:\n"
                    f"{processes.tail(Path(gateway.log)) or '(empty)'}"
                )
            if time.monotonic() >= next_check:
                self._raise_on_failed_stage(state)
                next_check = time.monotonic() + 1.0
            health = http_health(state.url)
            detail = health.detail
            if health.ready:
                return
            time.sleep(0.2)
        raise EngineError(
            f"the pipeline was not ready within {timeout_s:.0f} s ({detail}); "
            f"stages: {self._describe_services(state.name)}; raise --timeout for very large models"
        )

    def _raise_on_failed_stage(self, state: DeploymentState) -> None:
        for s in self._service_statuses(state):
            tasks = self._tasks(s.service)
            # during start-up a failed task is almost always deterministic (a graph onnxruntime rejects,
            # a port in use): fail at once, as the local engine does; restarts are for later failures
            failed = [
                t
                for t in tasks
                if str(t.get("CurrentState", "")).startswith(("Rejected", "Failed")) and t.get("Error")
            ]
            if failed:
                task = failed[0]
                raise EngineError(
                    f"stage {s.stage} ({s.service}) failed to start: {task.get('CurrentState')}: "
                    f"{task.get('Error')}; its log ends with:\n{self._logs(s.service) or '(empty)'}"
                )

    # ---- status / down ------------------------------------------------------------------------------
    def status(self, name: str) -> SwarmStatus:
        """Replicas running/desired per stage, the gateway process, and the gateway's readiness."""
        state = load_state(name)
        services = self._service_statuses(state)
        gateway = state.processes[0]
        running = processes.is_running(gateway.pid)
        if not running:
            return SwarmStatus(state, services, False, False, "gateway process is not running")
        health = http_health(state.url)
        return SwarmStatus(state, services, True, health.ready, health.detail)

    def down(self, name: str) -> DeploymentState | None:
        """Remove the services and configs labelled with ``name``, stop the gateway, remove the state.

        Works without a state file too (objects left by a crashed deploy); returns the state when found.
        """
        try:
            state: DeploymentState | None = load_state(name)
        except FormatError:
            state = None
        if state is not None:
            processes.stop_processes([p.pid for p in state.processes])
        self._remove_objects(name)
        _remove_dir(deployment_dir(name))
        return state

    def _remove_objects(self, name: str, wait_s: float = 30.0) -> None:
        """Remove the labelled services and configs, then wait (bounded) for their containers to go."""
        services = self._labelled("service", name)
        if services:
            self.docker.run(["service", "rm", *services])
        configs = self._labelled("config", name)
        if configs:
            self.docker.run(["config", "rm", *configs])
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not self.docker.run(["ps", "-aq", "--filter", f"label={LABEL}={name}"]).strip():
                return
            time.sleep(0.3)
        log.warning("containers of deployment %s were still stopping after %.0f s", name, wait_s)

    def _labelled(self, kind: str, name: str) -> list[str]:
        out = self.docker.run([kind, "ls", "-q", "--filter", f"label={LABEL}={name}"])
        return [line for line in out.split() if line]

    def _service_statuses(self, state: DeploymentState) -> tuple[ServiceStatus, ...]:
        listed = {
            s["Name"]: s
            for s in self.docker.json_lines(["service", "ls", "--filter", f"label={LABEL}={state.name}"])
        }
        result = []
        for stage in state.stages:
            name = str(stage.get("service") or service_name(state.name, int(stage["index"])))
            row = listed.get(name)
            if row is None:
                result.append(ServiceStatus(int(stage["index"]), name, 0, 0, "missing", "service not found"))
                continue
            running, _, desired = str(row.get("Replicas", "0/0")).partition("/")
            tasks = self._tasks(name)
            latest = tasks[0] if tasks else {}
            result.append(
                ServiceStatus(
                    int(stage["index"]),
                    name,
                    int(running or 0),
                    int((desired.split() or ["0"])[0]),
                    str(latest.get("CurrentState", "")),
                    str(latest.get("Error", "")),
                )
            )
        return tuple(result)

    def _tasks(self, service: str) -> list[dict]:
        return self.docker.json_lines(["service", "ps", "--no-trunc", service])

    def _logs(self, service: str, lines: int = 20) -> str:
        out = self.docker.run(
            ["service", "logs", "--raw", "--tail", str(lines), service], check=False, timeout_s=15
        )
        return out.strip()

    def _describe_services(self, name: str) -> str:
        try:
            state = load_state(name)
            return "; ".join(
                f"stage {s.stage} {s.running}/{s.desired} {s.state} {s.error}".strip()
                for s in self._service_statuses(state)
            )
        except (EngineError, FormatError) as exc:
            return f"(cannot list services: {exc})"


def _remove_dir(path: Path) -> None:
    """Remove a deployment directory (only ever one under the deployments root)."""
    import shutil

    root = deployment_dir("x").parent.resolve()
    if path.resolve().parent == root and path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
