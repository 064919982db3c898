"""``layerline benchmark --engine swarm``: one profiling agent per swarm node, as a pinned service.

Each agent is a service of the worker image (``python3 -m layerline.profile.agent``), pinned to its node by
ID, on the node's host network at ``--agent-port`` (8790), labelled ``layerline.benchmark=<run id>``. The
controller talks to the agents over TCP (the same protocol as local agents: block bytes in, timings out;
agents measure the links between nodes with real transfers) and removes every service of the run at the
end, also after an error. Results come from the agents' answers, never from their logs.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Sequence

from layerline.engines.swarm.docker import DockerCli
from layerline.engines.swarm.image import DEFAULT_WORKER_IMAGE
from layerline.engines.swarm.nodes import list_nodes
from layerline.errors import EngineError, TransportError
from layerline.profile.agents import AgentClient, AgentHandle
from layerline.profile.cluster import Cluster, DeviceSpec

__all__ = ["BENCH_LABEL", "DEFAULT_AGENT_PORT", "SwarmAgents", "swarm_cluster"]

log = logging.getLogger(__name__)

DEFAULT_AGENT_PORT = 8790
BENCH_LABEL = "layerline.benchmark"


def swarm_cluster(docker: DockerCli, devices: Sequence[str] | None = None) -> Cluster:
    """The swarm's Ready/Active nodes as devices (named by label ``layerline.device`` or hostname).

    ``devices``: only these (EngineError naming the missing ones).
    """
    nodes = [n for n in list_nodes(docker) if n.usable]
    specs = [
        DeviceSpec(n.device, engine="swarm", address=n.address, labels={**n.labels, "node.id": n.id})
        for n in nodes
    ]
    if devices is not None:
        known = {s.name: s for s in specs}
        missing = [d for d in devices if d not in known]
        if missing:
            raise EngineError(
                f"no ready swarm node for device(s) {', '.join(missing)}; ready: {', '.join(known) or 'none'}"
            )
        specs = [known[d] for d in devices]
    if not specs:
        raise EngineError("the swarm has no ready, active node; check `docker node ls`")
    return Cluster(tuple(specs))


class SwarmAgents:
    """Starts and removes the agents of one benchmark run (see the module docstring)."""

    def __init__(
        self, docker: DockerCli, image: str = DEFAULT_WORKER_IMAGE, port: int = DEFAULT_AGENT_PORT
    ) -> None:
        self.docker = docker
        self.image = image
        self.port = port
        self.run_id = secrets.token_hex(3)
        self.services: list[str] = []

    def start(
        self, devices: Sequence[DeviceSpec], timeout_s: float = 60.0, request_timeout_s: float = 300.0
    ) -> tuple[dict[str, AgentHandle], list[tuple[str, str]]]:
        """Start an agent on each device's node; the handles of those that answer, and (device, why) for
        the others."""
        if not self.docker.run(["image", "ls", "-q", self.image]).strip():
            raise EngineError(
                f"the worker image {self.image!r} is not on the manager; build it with "
                "`layerline image build` and copy it to every node (docs/swarm.md)"
            )
        failures: list[tuple[str, str]] = []
        started: list[DeviceSpec] = []
        for device in devices:
            node = device.labels.get("node.id")
            if device.engine != "swarm" or not node:
                failures.append((device.name, "not a swarm node (use layerline.engines.swarm.swarm_cluster)"))
                continue
            name = f"layerline-agent-{self.run_id}-{device.name}"[:63]
            try:
                self.docker.run(
                    [
                        "service", "create", "--detach", "--quiet", "--name", name,
                        "--label", f"{BENCH_LABEL}={self.run_id}",
                        "--constraint", f"node.id=={node}",
                        "--restart-condition", "none",
                        "--network", "host", "--no-resolve-image",
                        "--entrypoint", "python3", self.image,
                        "-m", "layerline.profile.agent",
                        "--listen", f"{device.address}:{self.port}", "--name", device.name,
                    ]
                )  # fmt: skip
            except EngineError as exc:
                failures.append((device.name, str(exc)))
                continue
            self.services.append(name)
            started.append(device)
        handles: dict[str, AgentHandle] = {}
        deadline = time.monotonic() + timeout_s
        for device, service in zip(started, self.services, strict=True):
            while True:
                try:
                    client = AgentClient.connect(
                        device.name, device.address, self.port, timeout_s=request_timeout_s
                    )
                    handles[device.name] = AgentHandle(device, device.address, self.port, client)
                    break
                except TransportError:
                    error = self._task_error(service)
                    if error or time.monotonic() > deadline:
                        failures.append(
                            (
                                device.name,
                                f"the agent on node {device.labels.get('node.id', '?')[:12]} "
                                f"({device.address}:{self.port}) did not answer within {timeout_s:.0f} s"
                                + (f": {error}" if error else ""),
                            )
                        )
                        break
                    time.sleep(0.3)
        return handles, failures

    def _task_error(self, service: str) -> str:
        with contextlib.suppress(EngineError):
            for task in self.docker.json_lines(["service", "ps", "--no-trunc", service]):
                state = str(task.get("CurrentState", ""))
                if state.startswith(("Rejected", "Failed", "Complete")):
                    error = task.get("Error") or f"(no error; see docker service logs {service})"
                    return f"{state}: {error}"
        return ""

    def close(self) -> None:
        """Remove every service of this run (idempotent)."""
        with contextlib.suppress(EngineError):
            out = self.docker.run(["service", "ls", "-q", "--filter", f"label={BENCH_LABEL}={self.run_id}"])
            ids = out.split()
            if ids:
                self.docker.run(["service", "rm", *ids])
        self.services.clear()
