"""The ``swarm`` engine: one Docker Swarm service per stage, pinned to the node of the stage's device.

Each planned device runs on a node (:mod:`layerline.engines.swarm.nodes`: label ``layerline.device`` or the
hostname); a balanced split with no devices runs on the manager. Services use their node's host network
(no overlay or IPVS needed: workers chain node address to node address). Stage graphs reach other nodes
through an artifact service on the manager (:mod:`layerline.engines.swarm.artifacts`; swarm configs are
limited to 500 KB, far below a stage graph), and the gateway runs as a service on the source node. Every
object carries ``layerline.deployment=NAME``; ``down`` removes exactly those. See docs/swarm.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from layerline.engines.local import DeploySettings, http_health
from layerline.engines.local_processes import remove_dir
from layerline.engines.stages import DeployTarget
from layerline.engines.state import (
    DeploymentState,
    deployment_dir,
    list_deployments,
    load_state,
    save_state,
)
from layerline.engines.swarm.docker import DockerCli
from layerline.engines.swarm.image import DEFAULT_GATEWAY_IMAGE, DEFAULT_WORKER_IMAGE
from layerline.engines.swarm.nodes import SwarmNode, list_nodes, map_devices
from layerline.engines.swarm.services import (
    LABEL,
    MAX_RESTARTS,
    artifact_service,
    gateway_service,
    service_name,
    stage_service,
)
from layerline.engines.swarm.status import (
    ServiceStatus,
    SwarmStatus,
    service_statuses,
    swarm_status,
    tasks,
)
from layerline.errors import DeploymentExists, EngineError, FormatError

if TYPE_CHECKING:
    from layerline.engines.swarm.scaling import SwarmReplicaScaler

__all__ = ["LABEL", "MAX_RESTARTS", "ServiceStatus", "SwarmEngine", "SwarmStatus", "swarm_ports"]

log = logging.getLogger(__name__)

#: A Redis-transport replica drains what it holds for up to 20 s on SIGTERM (docs/redis.md); its service
#: lets it, before docker sends SIGKILL.
DRAIN_GRACE_S = 25.0


def swarm_ports(port: int, stages: int) -> dict[str, int]:
    """The ports a deployment uses on its nodes: gateway ``P``, results ``P+1``, artifacts ``P+2``,
    stage ``i`` ``P+3+i`` (each on its own node's address)."""
    ports = {"gateway": port, "result": port + 1, "artifacts": port + 2}
    ports.update({f"stage{i}": port + 3 + i for i in range(stages)})
    if max(ports.values()) > 65535:
        raise EngineError(
            f"--port {port} leaves no room for {stages} stage ports above it; pick a lower port"
        )
    return ports


def _stage_files(workdir: Path, index: int) -> list[str]:
    """The manifest paths of stage ``index``: its config, graph and any external-data files."""
    stage_dir = workdir / "stages"
    return sorted(p.relative_to(workdir).as_posix() for p in stage_dir.glob(f"stage{index}.*") if p.is_file())


class SwarmEngine:
    """Deploys onto the swarm the docker CLI talks to (``docker_host``: ``-H``; None: DOCKER_HOST/default)."""

    name = "swarm"

    def __init__(
        self,
        docker_host: str | None = None,
        image: str = DEFAULT_WORKER_IMAGE,
        gateway_image: str = DEFAULT_GATEWAY_IMAGE,
    ) -> None:
        self.docker = DockerCli(docker_host)
        self.image = image
        self.gateway_image = gateway_image

    # ---- deploy -------------------------------------------------------------------------------------
    def deploy(
        self,
        target: DeployTarget,
        settings: DeploySettings,
        progress: Callable[[str], None] = lambda _msg: None,
        cpu_limits: dict[str, float] | None = None,
    ) -> DeploymentState:
        """Create the artifact service, one pinned service per stage and the gateway service; return once
        the chain is ready.

        ``cpu_limits``: device → cores for ``--limit-cpu``/``--reserve-cpu`` of its stages (e.g. a
        cluster's ``cpu_quota``). On any failure everything this call created is removed and the error names
        the service and shows its task error or log.
        """
        from layerline.engines.configs import Endpoints, write_deployment_files
        from layerline.engines.placement import place

        redis = settings.transport == "redis"
        if redis and not settings.redis_url.startswith(("redis://", "rediss://")):
            raise EngineError(
                f"--redis-url {settings.redis_url!r}: the swarm engine does not start Redis; give the URL of "
                "a Redis every node reaches, e.g. --redis-url redis://10.0.0.5:6379/0 (docs/swarm.md)"
            )
        replicas = list(settings.replicas or [1] * len(target.ranges))
        if len(replicas) != len(target.ranges) or (not redis and any(r != 1 for r in replicas)):
            raise EngineError(
                f"replicas {replicas} for {len(target.ranges)} stages: give one count per stage, and use "
                "--transport redis for more than one replica (a TCP stage has one upstream port)"
            )
        manager_id, is_manager = self.docker.swarm_node()
        if not is_manager:
            raise EngineError(
                "this docker daemon is a swarm worker; point the swarm engine at a manager node"
            )
        self._check_images()
        nodes = list_nodes(self.docker)
        manager = next(n for n in nodes if n.id == manager_id)
        stage_nodes, gateway_node = self._map(target, nodes, manager)
        ports = swarm_ports(settings.port, len(target.ranges))
        self._refuse_conflicts(settings)
        placed = place(target, None, settings.threads)
        workdir = deployment_dir(settings.name).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        url = f"http://{gateway_node.address}:{settings.port}"
        settings = replace(settings, host=gateway_node.address)
        t0 = time.monotonic()
        try:
            progress(f"writing {len(target.ranges)} stage models")
            endpoints = Endpoints(
                tuple((n.address, ports[f"stage{i}"]) for i, n in enumerate(stage_nodes)),
                (gateway_node.address, ports["result"]),
            )
            files = write_deployment_files(
                target, settings, workdir, [s.threads for s in placed.stages], endpoints
            )
            from layerline.engines.swarm.artifacts import write_manifest

            listed = [*sorted((workdir / "stages").iterdir()), files.gateway_config]
            write_manifest(workdir, [p for p in listed if p.is_file()])
            artifacts_url = f"http://{manager.address}:{ports['artifacts']}"
            specs = [
                artifact_service(
                    settings.name, self.image, manager.id, workdir, manager.address, ports["artifacts"]
                )
            ]
            for i, (cfg, node) in enumerate(zip(files.worker_configs, stage_nodes, strict=True)):
                limit = (cpu_limits or {}).get(target.devices[i])
                specs.append(
                    stage_service(
                        settings.name, i, self.image, node.id, workdir, _stage_files(workdir, i), cfg,
                        artifacts_url, limit, replicas[i], DRAIN_GRACE_S if redis else 5.0,
                        target.memory_bytes[i] if target.memory_bytes else None,
                    )
                )  # fmt: skip
            specs.append(
                gateway_service(
                    settings.name, self.gateway_image, gateway_node.id, workdir, files.gateway_config,
                    artifacts_url, url,
                )
            )  # fmt: skip
            for spec in specs:
                progress(f"creating service {spec.role} on {self._hostname(nodes, spec.node_id)}")
                self.docker.run(list(spec.args))
            state = DeploymentState(
                name=settings.name,
                engine=self.name,
                url=url,
                host=gateway_node.address,
                port=settings.port,
                sliced=str(target.sliced_dir.resolve()),
                stages=tuple(
                    {
                        "index": i,
                        "blocks": list(r),
                        "device": d,
                        "threads": p.threads,
                        "service": service_name(settings.name, f"stage{i}"),
                        "node": n.id,
                        "hostname": n.hostname,
                        "address": n.address,
                    }
                    for i, (r, d, p, n) in enumerate(
                        zip(target.ranges, target.devices, placed.stages, stage_nodes, strict=True)
                    )
                ),
                processes=(),
                started_at=time.time(),
                extra={
                    "image": self.image,
                    "gateway_image": self.gateway_image,
                    "manager": manager.id,
                    "gateway_node": gateway_node.id,
                    "docker_host": self.docker.host,
                    "services": [s.name for s in specs],
                    "ports": ports,
                    "exact": settings.exact,
                    "transport": settings.transport,
                    "redis_url": settings.redis_url if redis else None,
                    "replicas": replicas,
                    "delivery": "artifact-service",
                    "source_device": target.source_device,
                },
            )
            save_state(state)
            progress("waiting for every stage to connect")
            self._wait_ready(state, settings.ready_timeout_s)
            log.info("deployment %s ready in %.1f s", settings.name, time.monotonic() - t0)
            return state
        except BaseException:
            self._remove_objects(settings.name)
            remove_dir(workdir)
            raise

    def _map(
        self, target: DeployTarget, nodes: list[SwarmNode], manager: SwarmNode
    ) -> tuple[list[SwarmNode], SwarmNode]:
        """Each stage's node and the gateway's (the source device's node)."""
        if target.source == "balanced" or all(d == "local" for d in target.devices):
            return [manager] * len(target.ranges), manager
        source = target.source_device or target.devices[0]
        mapping = map_devices(nodes, [*target.devices, source])
        return [mapping[d] for d in target.devices], mapping[source]

    @staticmethod
    def _hostname(nodes: list[SwarmNode], node_id: str) -> str:
        return next((n.hostname for n in nodes if n.id == node_id), node_id[:12])

    def _check_images(self) -> None:
        for image, what in ((self.image, "worker"), (self.gateway_image, "gateway")):
            if not self.docker.run(["image", "ls", "-q", image]).strip():
                raise EngineError(
                    f"the {what} image {image!r} is not on this docker daemon; build it with "
                    "`layerline image build` or load it (`layerline image load`, see docs/swarm.md)"
                )

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
            if old is not None and old.engine != self.name:
                raise DeploymentExists(
                    f"a {old.engine} deployment named {settings.name!r} exists at {old.url}; stop it with "
                    f"`layerline down --name {settings.name}` or pick another --name"
                )
            remove_dir(deployment_dir(settings.name))

    def _wait_ready(self, state: DeploymentState, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        detail = ""
        next_check = 0.0
        while time.monotonic() < deadline:
            if time.monotonic() >= next_check:
                self._raise_on_failed_service(state)
                next_check = time.monotonic() + 1.0
            health = http_health(state.url)
            detail = health.detail
            if health.ready:
                return
            time.sleep(0.2)
        raise EngineError(
            f"the pipeline was not ready within {timeout_s:.0f} s ({detail}); "
            f"services: {self._describe_services(state.name)}; raise --timeout for very large models"
        )

    def _raise_on_failed_service(self, state: DeploymentState) -> None:
        for s in self._service_statuses(state):
            tasks = self._tasks(s.service)
            # during start-up a failed task is almost always deterministic (a graph onnxruntime rejects,
            # a port in use): fail at once, as the local engine does; restarts are for later failures
            failed = [
                t
                for t in tasks
                if (str(t.get("CurrentState", "")).startswith(("Rejected", "Failed")) and t.get("Error"))
                or "no suitable node" in str(t.get("Error", ""))  # e.g. its memory reservation does not fit
            ]
            if failed:
                task = failed[0]
                what = f"stage {s.stage}" if s.stage >= 0 else s.role
                raise EngineError(
                    f"{what} ({s.service}) on node {s.node or '?'} failed to start: "
                    f"{task.get('CurrentState')}: {task.get('Error')}; its log ends with:\n"
                    f"{self._logs(s.service) or '(empty)'}"
                )

    def scaler(self, name: str) -> SwarmReplicaScaler:
        """The replicas of deployment ``name``'s stages (``layerline scale``, ``layerline autoscale``)."""
        from layerline.engines.swarm.scaling import SwarmReplicaScaler

        return SwarmReplicaScaler(name, self.docker)

    # ---- status / down ------------------------------------------------------------------------------
    def status(self, name: str) -> SwarmStatus:
        """Per service: node (and its state), replicas running/desired, last error; the pipeline's readiness.

        A stage whose node is down or unreachable is named with the reason in ``detail``.
        """
        return swarm_status(self.docker, load_state(name))

    def down(self, name: str) -> DeploymentState | None:
        """Remove the services and configs labelled with ``name``, then the deployment's state.

        Works without a state file too (objects left by a crashed deploy); returns the state when found.
        """
        try:
            state: DeploymentState | None = load_state(name)
        except FormatError:
            state = None
        if state is not None and state.processes:  # a deployment made by an older version
            from layerline.engines import processes

            processes.stop_processes([p.pid for p in state.processes])
        self._remove_objects(name)
        if state is not None:
            _wait_endpoints_closed(_endpoints(state))
        remove_dir(deployment_dir(name))
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
        return service_statuses(self.docker, state)

    def _tasks(self, service: str) -> list[dict]:
        return tasks(self.docker, service)

    def _logs(self, service: str, lines: int = 20) -> str:
        out = self.docker.run(
            ["service", "logs", "--raw", "--tail", str(lines), service], check=False, timeout_s=15
        )
        return out.strip()

    def _describe_services(self, name: str) -> str:
        try:
            state = load_state(name)
            return "; ".join(
                f"{s.role} {s.running}/{s.desired} {s.state} {s.error}".strip()
                for s in self._service_statuses(state)
            )
        except (EngineError, FormatError) as exc:
            return f"(cannot list services: {exc})"


def _endpoints(state: DeploymentState) -> list[tuple[str, int]]:
    """Where a swarm deployment's services listened (node address, port)."""
    ports = state.extra.get("ports") or {}
    found = [
        (str(st.get("address")), int(ports[f"stage{st['index']}"]))
        for st in state.stages
        if st.get("address")
    ]
    if "gateway" in ports:
        found.append((state.host, int(ports["gateway"])))
    return found


def _wait_endpoints_closed(endpoints: list[tuple[str, int]], timeout_s: float = 30.0) -> None:
    """Wait (bounded) until nothing answers on ``endpoints`` any more: containers on other nodes stop after
    ``service rm`` returns, and a deployment started right away on the same ports must find them free. An
    endpoint that does not answer at all (its node is cut off) counts as closed."""
    import socket

    deadline = time.monotonic() + timeout_s
    pending = list(endpoints)
    while pending and time.monotonic() < deadline:
        still = []
        for host, port in pending:
            try:
                socket.create_connection((host, port), timeout=0.5).close()
                still.append((host, port))
            except OSError:
                pass
        pending = still
        if pending:
            time.sleep(0.3)
    if pending:
        log.warning("still listening %.0f s after down: %s", timeout_s, pending)
