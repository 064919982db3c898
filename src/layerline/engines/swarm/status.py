"""What a swarm deployment looks like now: each service's node, replicas and last task; the readiness."""

from __future__ import annotations

from dataclasses import dataclass

from layerline.engines.local import http_health
from layerline.engines.state import DeploymentState
from layerline.engines.swarm.docker import DockerCli
from layerline.engines.swarm.nodes import list_nodes
from layerline.engines.swarm.services import LABEL, service_name
from layerline.errors import EngineError

__all__ = ["ServiceStatus", "SwarmStatus", "service_statuses", "swarm_status", "tasks"]


@dataclass(frozen=True)
class ServiceStatus:
    """One service: its role, node, replicas running/desired and the latest task's state and error.

    ``stage`` is the stage index, -1 for the gateway and the artifact service.
    """

    stage: int
    service: str
    running: int
    desired: int
    state: str = ""
    error: str = ""
    role: str = ""
    node: str = ""
    node_state: str = ""

    @property
    def healthy(self) -> bool:
        return self.running >= 1 and self.running == self.desired and self.node_state in ("", "ready")

    def to_json(self) -> dict:
        return {
            "stage": self.stage,
            "role": self.role,
            "service": self.service,
            "node": self.node,
            "node_state": self.node_state,
            "replicas": f"{self.running}/{self.desired}",
            "state": self.state,
            "error": self.error,
        }


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
            "services": [s.to_json() for s in self.services],
        }


def swarm_status(docker: DockerCli, state: DeploymentState) -> SwarmStatus:
    """Per service: node (and its state), replicas running/desired, last error; the pipeline's readiness.

    A stage whose node is down or unreachable is named with the reason in ``detail``.
    """
    services = service_statuses(docker, state)
    gateway = next((s for s in services if s.role == "gateway"), None)
    health = http_health(state.url)
    answering = health.ready or not health.detail.startswith("gateway not answering")
    # docker counts a task as running once its health check passed (first check after 5 s): a gateway
    # that answers is running too
    gateway_running = gateway is not None and (gateway.running >= 1 or answering)
    lost = [s for s in services if s.node_state not in ("", "ready")]
    problems = [
        f"{s.role} on node {s.node} ({s.node_state}{', its tasks cannot run there' if s.stage >= 0 else ''})"
        for s in lost
    ]
    if not gateway_running:
        problems.append("gateway service is not running" + (f": {gateway.error}" if gateway else ""))
        return SwarmStatus(state, services, False, False, "; ".join(problems))
    detail = "; ".join([*problems, health.detail] if problems else [health.detail])
    return SwarmStatus(state, services, True, health.ready and not lost, detail)


def service_statuses(docker: DockerCli, state: DeploymentState) -> tuple[ServiceStatus, ...]:
    """Every service of ``state`` (stages, gateway, artifacts): role, node and state, replicas, last task."""
    listed = {
        s["Name"]: s for s in docker.json_lines(["service", "ls", "--filter", f"label={LABEL}={state.name}"])
    }
    try:
        nodes = {n.id: n for n in list_nodes(docker)}
    except EngineError:
        nodes = {}
    wanted: list[tuple[int, str, str, str]] = [
        (
            int(st["index"]),
            f"stage{st['index']}",
            str(st.get("service") or service_name(state.name, f"stage{st['index']}")),
            str(st.get("node") or ""),
        )
        for st in state.stages
    ]
    for role, key in (("gateway", "gateway_node"), ("artifacts", "manager")):
        if f"layerline-{state.name}-{role}" in state.extra.get("services", []):
            wanted.append((-1, role, service_name(state.name, role), str(state.extra.get(key) or "")))
    result = []
    for index, role, name, node_id in wanted:
        node = nodes.get(node_id)
        where = node.hostname if node else node_id[:12]
        node_state = (node.state if node.availability == "active" else node.availability) if node else ""
        row = listed.get(name)
        if row is None:
            result.append(
                ServiceStatus(index, name, 0, 0, "missing", "service not found", role, where, node_state)
            )
            continue
        running, _, desired = str(row.get("Replicas", "0/0")).partition("/")
        found = tasks(docker, name)
        latest = found[0] if found else {}
        result.append(
            ServiceStatus(
                index,
                name,
                int(running or 0),
                int((desired.split() or ["0"])[0]),
                str(latest.get("CurrentState", "")),
                str(latest.get("Error", "")),
                role,
                where,
                node_state,
            )
        )
    return tuple(result)


def tasks(docker: DockerCli, service: str) -> list[dict]:
    """``docker service ps`` of ``service``, newest task first."""
    return docker.json_lines(["service", "ps", "--no-trunc", service])
