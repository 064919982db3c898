"""``up`` / ``down`` / ``status`` / ``exec`` of the emulated device testbed.

``up`` records each namespace, cgroup and daemon in the state file before making it, and on any failure
removes what it made. ``down`` removes exactly what the state file lists (reverse order, by PID and by
name) and then the file; it is idempotent, and safe after a crash or a kill -9 of any testbed process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import shlex
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerline.testbed import cgroups, netns, shaping
from layerline.testbed.errors import TestbedError
from layerline.testbed.host import check_host, missing_requirements
from layerline.testbed.spec import FleetSpec
from layerline.testbed.state import (
    DeviceRecord,
    Resource,
    TestbedState,
    clear_state,
    load_state,
    process_start_time,
    save_state,
    testbed_dir,
)

__all__ = ["DeviceStatus", "TestbedStatus", "device_argv", "down", "status", "up"]

log = logging.getLogger(__name__)

CPU_SHARES = 16 * 1024


def _record(state: TestbedState, resource: Resource, home: str | Path | None) -> TestbedState:
    state = state.with_resource(resource)
    save_state(state, home)
    return state


def up(spec: FleetSpec, home: str | Path | None = None) -> TestbedState:
    """Create the fleet's namespaces, links, limits and daemons; return the state ``down`` will undo."""
    check_host(spec)
    existing = load_state(home)
    if existing is not None:
        raise TestbedError(
            f"a testbed is already up ({existing.testbed_id}, fleet {existing.fleet.name!r}, "
            f"{existing.phase}; state in {testbed_dir(home)}); remove it first with `layerline testbed down`"
        )
    netns.check_subnet_free()
    tid = f"ll-{secrets.token_hex(3)}"
    cpu_parent = cgroups.own_cgroup("cpu") / tid
    mem_parent = cgroups.own_cgroup("memory") / tid
    devices = tuple(
        DeviceRecord(
            d, netns.device_address(i), f"{tid}-{d.name}", str(cpu_parent / d.name), str(mem_parent / d.name)
        )
        for i, d in enumerate(spec.devices)
    )
    state = TestbedState(tid, spec, f"{tid}-sw", netns.SUBNET, devices, created_at=time.time())
    save_state(state, home)
    t0 = time.monotonic()
    try:
        state = _create(state, home, cpu_parent, mem_parent)
    except BaseException:
        log.warning("testbed %s failed to start; removing what was created", tid)
        down(home)
        raise
    log.info("testbed %s up in %.2f s", tid, time.monotonic() - t0)
    return state


def _create(state: TestbedState, home: str | Path | None, cpu_parent: Path, mem_parent: Path) -> TestbedState:
    for parent in (cpu_parent, mem_parent):
        state = _record(state, Resource("cgroup", str(parent)), home)
        cgroups.create_cgroup(parent)
    # quotas cap each device; a high weight lets the devices reach their quotas on a busy host
    cgroups.set_cpu_weight(cpu_parent, CPU_SHARES)
    state = _record(state, Resource("netns", state.switch_netns), home)
    netns.add_switch(state.switch_netns)
    state = _record(state, Resource("link", netns.host_port_name(state.testbed_id)), home)
    netns.attach_host(state.switch_netns, state.testbed_id)
    logs = testbed_dir(home) / "logs"
    for index, dev in enumerate(state.devices):
        spec = dev.spec
        state = _record(state, Resource("cgroup", dev.cpu_cgroup), home)
        cgroups.create_cgroup(dev.cpu_cgroup)
        cgroups.set_cpu_limit(dev.cpu_cgroup, spec.cpu)
        state = _record(state, Resource("cgroup", dev.memory_cgroup), home)
        cgroups.create_cgroup(dev.memory_cgroup)
        cgroups.set_memory_limit(dev.memory_cgroup, spec.memory_bytes)
        state = _record(state, Resource("netns", dev.netns), home)
        netns.add_netns(dev.netns)
        netns.attach_device(state.switch_netns, dev.netns, index, dev.address)
        # bandwidth both ways: the device's sends (eth0) and what the switch sends to it (its port)
        shaping.set_rate(dev.netns, netns.DEVICE_IFACE, spec.link.rate_bit)
        shaping.set_rate(state.switch_netns, netns.port_name(index), spec.link.rate_bit)
        if spec.link.loss > 0:
            shaping.set_loss(dev.netns, netns.DEVICE_IFACE, spec.link.loss)
        if spec.link.delay_ms > 0:
            pid = shaping.start_delayer(dev.netns, spec.link.delay_ms, logs / f"delayer-{spec.name}.log")
            state = _record(
                state, Resource("process", f"delayer:{spec.name}", pid, process_start_time(pid)), home
            )
            shaping.add_delay_rule(dev.netns, netns.DEVICE_IFACE)
    state = dataclasses.replace(state, phase="up")
    save_state(state, home)
    return state


def _stop_process(res: Resource, timeout: float = 3.0) -> None:
    if not res.is_running():
        return
    assert res.pid is not None
    os.kill(res.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while res.is_running():
        if time.monotonic() > deadline:
            os.kill(res.pid, signal.SIGKILL)
            deadline += timeout
        time.sleep(0.02)


def down(home: str | Path | None = None) -> list[str]:
    """Remove everything the state file lists, then the file; returns what it removed (empty when none)."""
    state = load_state(home)
    if state is None:
        return []
    problems = missing_requirements()
    if problems and os.geteuid() != 0:
        raise TestbedError(problems[0])
    removed = []
    for res in reversed(state.resources):
        if res.kind == "process":
            _stop_process(res)
        elif res.kind == "netns":
            netns.delete_netns(res.name)
        elif res.kind == "link":
            netns.delete_link(res.name)
        elif res.kind == "cgroup":
            cgroups.remove_cgroup(res.name)
        removed.append(f"{res.kind} {res.name}")
    shutil.rmtree(testbed_dir(home) / "logs", ignore_errors=True)
    clear_state(home)
    log.info("testbed %s removed (%d resources)", state.testbed_id, len(removed))
    return removed


@dataclass(frozen=True)
class DeviceStatus:
    """A device as it is now: limits read back from its cgroups, namespace, processes, daemon."""

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
        return self.state.phase == "up" and all(
            d.netns_present and d.delayer_running is not False for d in self.devices
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
            "devices": [d.to_json() for d in self.devices],
        }


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _device_status(state: TestbedState, dev: DeviceRecord) -> DeviceStatus:
    cpu_dir, mem_dir = Path(dev.cpu_cgroup), Path(dev.memory_cgroup)
    quota, period = _read_int(cpu_dir / "cpu.cfs_quota_us"), _read_int(cpu_dir / "cpu.cfs_period_us")
    delayer = next((r for r in state.processes() if r.name == f"delayer:{dev.spec.name}"), None)
    pids = set(cgroups.cgroup_pids(cpu_dir)) | set(cgroups.cgroup_pids(mem_dir))
    return DeviceStatus(
        name=dev.spec.name,
        address=dev.address,
        netns=dev.netns,
        netns_present=netns.netns_exists(dev.netns),
        cpu_limit=quota / period if quota and period and quota > 0 else None,
        memory_limit=_read_int(mem_dir / "memory.limit_in_bytes"),
        memory_usage=_read_int(mem_dir / "memory.usage_in_bytes"),
        processes=len(pids),
        link=dev.spec.link.describe(),
        delayer_pid=delayer.pid if delayer else None,
        delayer_running=delayer.is_running() if delayer else None,
    )


def status(home: str | Path | None = None) -> TestbedStatus | None:
    """The testbed's live status, or None when none is up."""
    state = load_state(home)
    if state is None:
        return None
    return TestbedStatus(state, tuple(_device_status(state, d) for d in state.devices))


def device_argv(state: TestbedState, device: str, cmd: Sequence[str]) -> list[str]:
    """An argv that runs ``cmd`` inside ``device``: join its cgroups first (``ip netns exec`` would hide
    /sys/fs/cgroup), then enter its network namespace."""
    if not cmd:
        raise TestbedError("no command given; write e.g. `layerline testbed exec pi1 -- ip addr`")
    dev = state.device(device)
    join = " && ".join(
        f"echo $$ > {shlex.quote(str(Path(cg) / 'cgroup.procs'))}"
        for cg in (dev.cpu_cgroup, dev.memory_cgroup)
    )
    script = f'{join} && exec nsenter --net={shlex.quote(str(netns.NETNS_DIR / dev.netns))} -- "$@"'
    return ["sh", "-c", script, "layerline-exec", *cmd]
