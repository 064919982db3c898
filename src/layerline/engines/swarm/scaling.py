"""Replicas of a swarm deployment's Redis-transport stages: ``docker service scale`` behind a ReplicaScaler.

Each replica is a task of the stage's service (a competing consumer of the stage's stream; nothing listens,
so replicas on one node do not collide). Scaling down lets docker send SIGTERM: the worker stops taking
entries, hands on what it holds and leaves the group (the service's stop grace period covers the drain);
entries of a replica killed anyway are taken over after ``claim_idle_ms``. ``layerline scale`` and
``layerline autoscale`` use this scaler for swarm deployments.
"""

from __future__ import annotations

import time
from dataclasses import replace

from layerline.engines.state import DeploymentState, load_state, update_state
from layerline.engines.swarm.docker import DockerCli
from layerline.errors import EngineError

__all__ = ["SwarmReplicaScaler"]


class SwarmReplicaScaler:
    """Scales the stage services of swarm deployment ``name`` (see the module docstring)."""

    def __init__(self, name: str, docker: DockerCli | None = None) -> None:
        state = load_state(name)
        if state.engine != "swarm":
            raise EngineError(f"deployment {name!r} runs on the {state.engine} engine, not swarm")
        self.name = name
        self.docker = docker or DockerCli(state.extra.get("docker_host"))
        self.services = [str(st["service"]) for st in state.stages]
        self.redis = state.extra.get("transport") == "redis"

    @property
    def stage_count(self) -> int:
        return len(self.services)

    def _check(self, stage: int) -> str:
        if not 0 <= stage < len(self.services):
            last = len(self.services) - 1
            raise ValueError(f"stage {stage} does not exist: the deployment has stages 0..{last}")
        return self.services[stage]

    def _replicas(self, stage: int) -> tuple[int, int]:
        service = self._check(stage)
        rows = self.docker.json_lines(["service", "ls", "--filter", f"name={service}"])
        row = next((r for r in rows if r.get("Name") == service), None)
        if row is None:
            raise EngineError(f"service {service} of deployment {self.name!r} is gone; deploy again")
        running, _, desired = str(row.get("Replicas", "0/0")).partition("/")
        return int(running or 0), int((desired.split() or ["0"])[0])

    def replicas(self, stage: int) -> int:
        """Tasks of the stage's service running now."""
        return self._replicas(stage)[0]

    def desired(self, stage: int) -> int:
        return self._replicas(stage)[1]

    def scale(self, stage: int, n: int, *, timeout_s: float | None = 60.0) -> None:
        """Ask for ``n`` tasks and wait (bounded by ``timeout_s``; None: do not wait) until that many run."""
        service = self._check(stage)
        if not self.redis and n != 1:
            raise ValueError(
                f"stage {stage} uses the TCP transport, which runs exactly one replica; deploy with "
                "--transport redis to scale stages"
            )
        if n < 0:
            raise ValueError(f"stage {stage}: a replica count must be >= 0, got {n}")
        self.docker.run(["service", "scale", "--detach", f"{service}={n}"])

        def record(state: DeploymentState) -> DeploymentState:
            replicas = list(state.extra.get("replicas") or [1] * len(state.stages))
            replicas[stage] = n
            return replace(state, extra={**state.extra, "replicas": replicas})

        update_state(self.name, record)
        if timeout_s is None:
            return
        deadline = time.monotonic() + timeout_s
        while self.replicas(stage) != n:
            if time.monotonic() > deadline:
                raise EngineError(
                    f"stage {stage} ({service}) runs {self.replicas(stage)} of {n} replicas after "
                    f"{timeout_s:.0f} s; see `docker service ps {service}`"
                )
            time.sleep(0.3)
