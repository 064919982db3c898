"""The ``docker service create`` command lines of a swarm deployment: stages, gateway, artifact service.

Every service uses the host network of its node (``--network host``: no overlay, no IPVS, no routing mesh, so
the gateway is reachable on its own node only), is pinned to one node by ID, restarts on failure, and carries
the deployment's label so ``down`` finds exactly its objects. Stage and gateway containers start with
:mod:`layerline.engines.swarm.fetch`, which downloads their files from the artifact service (pinned to the
manager, which has the deployment directory) and then becomes the worker or the gateway.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LABEL", "MAX_RESTARTS", "ServiceSpec", "artifact_service", "gateway_service", "stage_service"]

#: The label every object of a deployment carries: ``layerline.deployment=NAME``.
LABEL = "layerline.deployment"
#: Restarts of a service that fails after start-up (a failure during ``deploy`` stops the deploy at once).
MAX_RESTARTS = 3


@dataclass(frozen=True)
class ServiceSpec:
    """One service: its name, role (``stageI``, ``gateway``, ``artifacts``), node and create arguments."""

    name: str
    role: str
    node_id: str
    args: tuple[str, ...]


def _common(
    name: str,
    deployment: str,
    role: str,
    node_id: str,
    limit_cpu: float | None = None,
    replicas: int = 1,
    grace_s: float = 5.0,
    reserve_memory: int | None = None,
) -> list[str]:
    label = f"{LABEL}={deployment}"
    args = [
        "service", "create", "--detach", "--quiet",
        "--name", name,
        "--label", label, "--label", f"layerline.role={role}",
        "--container-label", label,
        "--constraint", f"node.id=={node_id}",
        "--restart-condition", "on-failure",
        "--restart-max-attempts", str(MAX_RESTARTS),
        "--restart-delay", "1s",
        "--stop-grace-period", f"{grace_s:g}s",
        "--replicas", str(replicas),
        "--network", "host",
        "--no-resolve-image",
    ]  # fmt: skip
    if limit_cpu is not None:
        args += ["--limit-cpu", f"{limit_cpu:g}", "--reserve-cpu", f"{limit_cpu:g}"]
    if reserve_memory:
        args += ["--reserve-memory", str(int(reserve_memory))]
    return args


def _fetch_then(url: str, root: Path, files: Sequence[str], command: Sequence[str]) -> list[str]:
    args = ["-m", "layerline.engines.swarm.fetch", "--url", url, "--root", str(root)]
    for f in files:
        args += ["--file", f]
    return [*args, "--", *command]


def service_name(deployment: str, role: str) -> str:
    return f"layerline-{deployment}-{role}"


def artifact_service(
    deployment: str, image: str, node_id: str, root: Path, address: str, port: int
) -> ServiceSpec:
    """The file server on the manager: the deployment directory bind-mounted read-only."""
    name = service_name(deployment, "artifacts")
    args = _common(name, deployment, "artifacts", node_id)
    args += ["--mount", f"type=bind,source={root},target={root},readonly", "--entrypoint", "python3", image]
    args += ["-m", "layerline.engines.swarm.artifacts", "--root", str(root), "--listen", f"{address}:{port}"]
    return ServiceSpec(name, "artifacts", node_id, tuple(args))


def stage_service(
    deployment: str,
    index: int,
    image: str,
    node_id: str,
    root: Path,
    files: Sequence[str],
    config: Path,
    artifacts_url: str,
    limit_cpu: float | None = None,
    replicas: int = 1,
    grace_s: float = 5.0,
    reserve_memory: int | None = None,
) -> ServiceSpec:
    """Stage ``index``: fetch its graph and config, then ``python3 -m layerline.runtime.worker``.

    ``replicas`` > 1 only with the Redis transport (competing consumers; nothing listens, so replicas on
    one node do not collide); ``grace_s``: how long a stopping replica may drain before SIGKILL;
    ``reserve_memory``: the plan's predicted memory of the stage (the node must have it free)."""
    role = f"stage{index}"
    name = service_name(deployment, role)
    args = _common(name, deployment, role, node_id, limit_cpu, replicas, grace_s, reserve_memory)
    args += ["--label", f"layerline.stage={index}", "--entrypoint", "python3", image]
    args += _fetch_then(
        artifacts_url, root, files, ["python3", "-m", "layerline.runtime.worker", "--config", str(config)]
    )
    return ServiceSpec(name, role, node_id, tuple(args))


def gateway_service(
    deployment: str,
    image: str,
    node_id: str,
    root: Path,
    config: Path,
    artifacts_url: str,
    url: str = "",
) -> ServiceSpec:
    """The gateway on the source node: fetch its config, then run ``layerline.engines.gateway_main``.

    With ``url`` (the gateway's own), docker checks ``/v2/health/live`` every 5 s and restarts a gateway
    that stops answering. (The stages have no docker health check: the gateway probes the whole chain, and
    a TCP stage would take a checker's connection for its upstream.)"""
    name = service_name(deployment, "gateway")
    args = _common(name, deployment, "gateway", node_id)
    if url:
        probe = f"import urllib.request as u; u.urlopen('{url}/v2/health/live', timeout=3)"
        args += ["--health-cmd", f'python3 -c "{probe}"', "--health-interval", "5s"]
        args += ["--health-timeout", "4s", "--health-retries", "3", "--health-start-period", "60s"]
    args += ["--entrypoint", "python3", image]
    rel = config.relative_to(root).as_posix()
    args += _fetch_then(
        artifacts_url,
        root,
        [rel],
        ["python3", "-m", "layerline.engines.gateway_main", "--config", str(config)],
    )
    return ServiceSpec(name, "gateway", node_id, tuple(args))
