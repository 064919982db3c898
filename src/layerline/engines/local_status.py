"""The ``local`` engine's view of a deployment: its processes, its replicas and the gateway's health.

:func:`deployment_status` is :meth:`layerline.engines.local.LocalEngine.status`; :func:`wait_ready` is
how ``deploy`` waits for a new deployment to serve. :func:`http_health` asks any gateway (the swarm
engine's too) whether its chain is ready.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

from layerline.engines import processes
from layerline.engines.state import DeploymentState, deployment_dir, load_state, parse_role
from layerline.errors import EngineError

__all__ = [
    "DeploymentStatus",
    "GatewayHealth",
    "StageProcessStatus",
    "StageReplicas",
    "deployment_status",
    "http_health",
    "wait_ready",
]


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


def wait_ready(state: DeploymentState, timeout_s: float) -> None:
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


def deployment_status(name: str) -> DeploymentStatus:
    """Deployment ``name``'s processes (each with the gateway's view of its stage), replicas and readiness."""
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
            f"stage {elastic[0]} is" if len(elastic) == 1 else f"stages {', '.join(map(str, elastic))} are"
        )
        detail = f"{which} scaled to zero by the autoscaler: a request waiting in the stream wakes a replica"
    idle = sorted(k for k, (ok, _d) in health.stages.items() if not ok and state.desired_replicas(k) == 0)
    if not ready and idle and _serving(state, health):
        which = f"stage {idle[0]} is" if len(idle) == 1 else f"stages {', '.join(map(str, idle))} are"
        if any(p.role == "autoscaler" and p.running for p in procs):
            # not "ready": the gateway answers 503 while its last probe found a stage without a
            # replica (docs/redis.md, "Scaling to zero")
            detail = (
                f"{which} scaled to zero by the autoscaler: a request waiting in the stream wakes a replica"
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


def _with_health(proc: StageProcessStatus, health: GatewayHealth) -> StageProcessStatus:
    """The process status with the gateway's view of that stage (the last health probe's answer)."""
    parsed = parse_role(proc.role)
    if parsed is None:
        return replace(proc, health="serving" if proc.running else "not running")
    if not proc.running:
        return replace(proc, health="not running")
    ready, detail = health.stages.get(parsed[0], (False, "no answer in the health probe"))
    return replace(proc, health="ready" if ready else (detail or "not ready"))
