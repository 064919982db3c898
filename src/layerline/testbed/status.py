"""``status``: the testbed as it is now, read back from its cgroups, namespaces, daemons and swarm."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerline.testbed import cgroups, netns, swarm
from layerline.testbed.errors import TestbedError
from layerline.testbed.state import DeviceRecord, Resource, TestbedState, load_state

__all__ = ["DeviceStatus", "TestbedStatus", "status"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceStatus:
    """A device as it is now: limits read back from its cgroups, namespace, processes, daemons, and for a
    ``swarm: true`` device its dockerd and its swarm node as the manager reports it."""

    name: str
    address: str
    netns: str
    netns_present: bool
    cpu_limit: float | None
    memory_limit: int | None
    memory_usage: int | None
    processes: int
    link: str
    delayer_pid: int | None
    delayer_running: bool | None
    dockerd_pid: int | None = None
    dockerd_running: bool | None = None
    docker_host: str | None = None
    node_state: str | None = None  # Ready / Down / Unknown; None: no daemon, or the manager did not answer
    node_availability: str | None = None  # Active / Pause / Drain
    node_role: str | None = None  # "manager" or "worker"

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class TestbedStatus:
    """The whole testbed: its state plus each device's live status."""

    __test__ = False

    state: TestbedState
    devices: tuple[DeviceStatus, ...]

    @property
    def healthy(self) -> bool:
        """Up, every namespace present, every daemon running, every swarm node Ready."""
        return self.state.phase == "up" and all(
            d.netns_present
            and d.delayer_running is not False
            and d.dockerd_running is not False
            and (d.docker_host is None or d.node_state == "Ready")
            for d in self.devices
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "testbed_id": self.state.testbed_id,
            "fleet": self.state.fleet.name,
            "phase": self.state.phase,
            "healthy": self.healthy,
            "subnet": self.state.subnet,
            "host_address": netns.HOST_ADDRESS,
            "switch_netns": self.state.switch_netns,
            "swarm_manager": swarm.swarm_manager(self.state) if swarm.swarm_devices(self.state) else None,
            "devices": [d.to_json() for d in self.devices],
        }


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _all_pids(path: Path) -> set[int]:
    """Processes in a cgroup and every cgroup beneath it (a dockerd's containers are nested)."""
    pids = set(cgroups.cgroup_pids(path))
    if path.is_dir():
        for child in path.rglob("*"):
            if child.is_dir():
                pids |= set(cgroups.cgroup_pids(child))
    return pids


def _process(state: TestbedState, name: str) -> Resource | None:
    return next((r for r in state.processes() if r.name == name), None)


def _link(dev: DeviceRecord) -> str:
    text = dev.spec.link.describe()
    if dev.spec.delays:
        text += " (from " + ", ".join(f"{n}: {ms:g}ms" for n, ms in dev.spec.delays) + ")"
    return text


def _device_status(state: TestbedState, dev: DeviceRecord, nodes: dict[str, swarm.NodeInfo]) -> DeviceStatus:
    cpu_dir, mem_dir = Path(dev.cpu_cgroup), Path(dev.memory_cgroup)
    quota, period = _read_int(cpu_dir / "cpu.cfs_quota_us"), _read_int(cpu_dir / "cpu.cfs_period_us")
    delayer = _process(state, f"delayer:{dev.spec.name}")
    daemon = _process(state, f"dockerd:{dev.spec.name}")
    node = nodes.get(dev.spec.name)
    return DeviceStatus(
        name=dev.spec.name,
        address=dev.address,
        netns=dev.netns,
        netns_present=netns.netns_exists(dev.netns),
        cpu_limit=quota / period if quota and period and quota > 0 else None,
        memory_limit=_read_int(mem_dir / "memory.limit_in_bytes"),
        memory_usage=_read_int(mem_dir / "memory.usage_in_bytes"),
        processes=len(_all_pids(cpu_dir) | _all_pids(mem_dir)),
        link=_link(dev),
        delayer_pid=delayer.pid if delayer else None,
        delayer_running=delayer.is_running() if delayer else None,
        dockerd_pid=daemon.pid if daemon else None,
        dockerd_running=(daemon.is_running() if daemon else False) if dev.daemon else None,
        docker_host=dev.daemon.host if dev.daemon else None,
        node_state=node.state if node else None,
        node_availability=node.availability if node else None,
        node_role=("manager" if node.manager_status else "worker") if node else None,
    )


def status(home: str | Path | None = None) -> TestbedStatus | None:
    """The testbed's live status, or None when none is up."""
    state = load_state(home)
    if state is None:
        return None
    nodes: dict[str, swarm.NodeInfo] = {}
    if state.phase == "up" and swarm.swarm_devices(state):
        try:
            nodes = swarm.nodes(state, timeout=5.0)
        except TestbedError as exc:
            log.warning("the swarm manager did not answer: %s", exc)
    return TestbedStatus(state, tuple(_device_status(state, d, nodes) for d in state.devices))
