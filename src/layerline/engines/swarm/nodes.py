"""The swarm's nodes and which node runs each planned device.

A plan names devices (``layerline benchmark --engine swarm`` names them after the nodes' hostnames). A device
runs on the node labelled ``layerline.device=<device>`` when one is (``docker node update --label-add
layerline.device=edge1 NODE``), else on the node whose hostname is the device's name. Mapping checks that the
node is Ready and active, so a deploy onto a lost node fails before it creates anything.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from layerline.engines.swarm.docker import DockerCli
from layerline.errors import EngineError

__all__ = ["DEVICE_LABEL", "SwarmNode", "list_nodes", "map_devices", "node_for_device"]

#: The node label that names the device a node is (overrides the hostname).
DEVICE_LABEL = "layerline.device"


@dataclass(frozen=True)
class SwarmNode:
    """One node as the manager sees it."""

    id: str
    hostname: str
    address: str
    role: str
    state: str
    availability: str
    labels: Mapping[str, str] = field(default_factory=dict)
    nano_cpus: int = 0
    memory_bytes: int = 0

    @property
    def device(self) -> str:
        """The device name this node stands for: its ``layerline.device`` label, else its hostname."""
        return self.labels.get(DEVICE_LABEL) or self.hostname

    @property
    def usable(self) -> bool:
        return self.state == "ready" and self.availability == "active"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "hostname": self.hostname,
            "device": self.device,
            "address": self.address,
            "role": self.role,
            "state": self.state,
            "availability": self.availability,
            "labels": dict(self.labels),
            "cpus": self.nano_cpus / 1e9,
            "memory_bytes": self.memory_bytes,
        }

    @classmethod
    def from_inspect(cls, data: Mapping[str, Any]) -> SwarmNode:
        """From one element of ``docker node inspect``'s JSON array."""
        spec = data.get("Spec") or {}
        desc = data.get("Description") or {}
        status = data.get("Status") or {}
        address = str(status.get("Addr") or "")
        manager = data.get("ManagerStatus") or {}
        if address in ("", "0.0.0.0") and manager.get("Addr"):
            # a manager may report 0.0.0.0; its raft address (ip:2377) has the real one
            address = str(manager["Addr"]).rsplit(":", 1)[0]
        resources = desc.get("Resources") or {}
        return cls(
            id=str(data["ID"]),
            hostname=str(desc.get("Hostname") or ""),
            address=address,
            role=str(spec.get("Role") or ""),
            state=str(status.get("State") or ""),
            availability=str(spec.get("Availability") or ""),
            labels={str(k): str(v) for k, v in (spec.get("Labels") or {}).items()},
            nano_cpus=int(resources.get("NanoCPUs") or 0),
            memory_bytes=int(resources.get("MemoryBytes") or 0),
        )


def list_nodes(docker: DockerCli) -> list[SwarmNode]:
    """Every node of the swarm (needs a manager), in ``docker node ls`` order."""
    ids = docker.run(["node", "ls", "-q"]).split()
    if not ids:
        return []
    data = json.loads(docker.run(["node", "inspect", *ids]))
    return [SwarmNode.from_inspect(d) for d in data]


def node_for_device(nodes: Sequence[SwarmNode], device: str) -> SwarmNode:
    """The node that runs ``device``; EngineError naming the fix when none does or it is not usable."""
    labelled = [n for n in nodes if n.labels.get(DEVICE_LABEL) == device]
    if len(labelled) > 1:
        raise EngineError(
            f"nodes {', '.join(n.hostname for n in labelled)} are all labelled {DEVICE_LABEL}={device}; "
            f"keep the label on one: docker node update --label-rm {DEVICE_LABEL} NODE"
        )
    found = labelled or [n for n in nodes if n.hostname == device and DEVICE_LABEL not in n.labels]
    if not found:
        known = ", ".join(f"{n.device} ({n.hostname}, {n.state})" for n in nodes) or "none"
        raise EngineError(
            f"no swarm node for device {device!r}; nodes: {known}. Label the node that should run it: "
            f"docker node update --label-add {DEVICE_LABEL}={device} NODE"
        )
    node = found[0]
    if not node.usable:
        raise EngineError(
            f"the node of device {device!r} ({node.hostname}, {node.id[:12]}) is {node.state}/"
            f"{node.availability}, not ready/active; bring it back, or re-plan without it "
            f"(layerline configure PROFILE --exclude {device})"
        )
    return node


def map_devices(nodes: Sequence[SwarmNode], devices: Sequence[str]) -> dict[str, SwarmNode]:
    """Device name → node for every distinct device in ``devices``."""
    return {d: node_for_device(nodes, d) for d in dict.fromkeys(devices)}
