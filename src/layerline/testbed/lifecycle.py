"""``up`` / ``down`` / ``exec`` of the emulated device testbed (``status`` is in :mod:`.status`).

``up`` records each namespace, cgroup, directory and daemon in the state file before making it, and on
any failure removes what it made. ``down`` removes exactly what the state file lists (reverse order, by PID
and by name) and then the file; it is idempotent, and safe after a crash or a kill -9 of any testbed
process (a delayer, a dockerd, ``up`` itself).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import shlex
import shutil
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from layerline.testbed import cgroups, dockerd, netns, shaping, swarm
from layerline.testbed.errors import TestbedError
from layerline.testbed.host import check_host, missing_requirements
from layerline.testbed.spec import DeviceSpec, FleetSpec
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
from layerline.testbed.status import DeviceStatus, TestbedStatus, status

__all__ = ["DeviceStatus", "TestbedStatus", "device_argv", "down", "status", "up"]

log = logging.getLogger(__name__)

CPU_SHARES = 16 * 1024
STOP_TIMEOUT = {"dockerd": 10.0}  # seconds from SIGTERM to SIGKILL, by role; others 3 s


def _record(state: TestbedState, resource: Resource, home: str | Path | None) -> TestbedState:
    state = state.with_resource(resource)
    save_state(state, home)
    return state


def _extra_hierarchies(spec: FleetSpec) -> list[cgroups.Hierarchy]:
    """The cgroup hierarchies besides cpu and memory, where dockerd devices get a directory too."""
    if not any(d.swarm for d in spec.devices):
        return []
    return [h for h in cgroups.hierarchies() if "cpu" not in h.options and "memory" not in h.options]


def up(spec: FleetSpec, home: str | Path | None = None) -> TestbedState:
    """Create the fleet's namespaces, links, limits, daemons and swarm; return the state ``down`` undoes."""
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
    extra = _extra_hierarchies(spec)
    docker_root = testbed_dir(home).absolute() / "docker"
    devices = []
    for i, d in enumerate(spec.devices):
        cpu_cg, mem_cg = cpu_parent / d.name, mem_parent / d.name
        daemon = None
        if d.swarm:
            dirs = [str(cpu_cg), str(mem_cg), *(str(h.own / tid / d.name) for h in extra)]
            daemon = dockerd.plan_daemon(docker_root, tid, d.name, dirs)
        devices.append(
            DeviceRecord(d, netns.device_address(i), f"{tid}-{d.name}", str(cpu_cg), str(mem_cg), daemon)
        )
    state = TestbedState(tid, spec, f"{tid}-sw", netns.SUBNET, tuple(devices), created_at=time.time())
    save_state(state, home)
    t0 = time.monotonic()
    try:
        state = _create(state, home, cpu_parent, mem_parent, extra)
    except BaseException:
        log.warning("testbed %s failed to start; removing what was created", tid)
        down(home)
        raise
    log.info("testbed %s up in %.2f s", tid, time.monotonic() - t0)
    return state


def _create(
    state: TestbedState,
    home: str | Path | None,
    cpu_parent: Path,
    mem_parent: Path,
    extra: list[cgroups.Hierarchy],
) -> TestbedState:
    daemons = [d for d in state.devices if d.daemon is not None]
    # directories first, so that `down` removes them last (after every process using them is gone)
    for d in sorted({str(Path(dev.daemon.dir).parent) for dev in daemons if dev.daemon}):
        state = _record(state, Resource("dir", d), home)
    short = dockerd.short_run_root(state.testbed_id)
    if any(dev.daemon and Path(dev.daemon.run_dir).is_relative_to(short) for dev in daemons):
        state = _record(state, Resource("dir", str(short)), home)
    for parent in (cpu_parent, mem_parent, *(h.own / state.testbed_id for h in extra)):
        state = _record(state, Resource("cgroup", str(parent)), home)
        cgroups.create_cgroup(parent)
    # quotas cap each device; a high weight lets the devices reach their quotas on a busy host
    cgroups.set_cpu_weight(cpu_parent, CPU_SHARES)
    state = _record(state, Resource("netns", state.switch_netns), home)
    netns.add_switch(state.switch_netns)
    state = _record(state, Resource("link", netns.host_port_name(state.testbed_id)), home)
    netns.attach_host(state.switch_netns, state.testbed_id)
    for index, dev in enumerate(state.devices):
        state = _create_device(state, home, index, dev)
    if daemons:
        state = _start_daemons(state, home)
        swarm.form_swarm(state)
    state = dataclasses.replace(state, phase="up")
    save_state(state, home)
    return state


def _create_device(
    state: TestbedState, home: str | Path | None, index: int, dev: DeviceRecord
) -> TestbedState:
    spec = dev.spec
    state = _record(state, Resource("cgroup", dev.cpu_cgroup), home)
    cgroups.create_cgroup(dev.cpu_cgroup)
    cgroups.set_cpu_limit(dev.cpu_cgroup, spec.cpu)
    state = _record(state, Resource("cgroup", dev.memory_cgroup), home)
    cgroups.create_cgroup(dev.memory_cgroup)
    cgroups.set_memory_limit(dev.memory_cgroup, spec.memory_bytes)
    if dev.daemon is not None:
        for cg in dev.daemon.cgroups:
            if cg not in (dev.cpu_cgroup, dev.memory_cgroup):
                state = _record(state, Resource("cgroup", cg), home)
                cgroups.create_cgroup(cg)
    state = _record(state, Resource("netns", dev.netns), home)
    netns.add_netns(dev.netns)
    netns.attach_device(state.switch_netns, dev.netns, index, dev.address)
    # bandwidth both ways: the device's sends (eth0) and what the switch sends to it (its port)
    shaping.set_rate(dev.netns, netns.DEVICE_IFACE, spec.link.rate_bit)
    shaping.set_rate(state.switch_netns, netns.port_name(index), spec.link.rate_bit)
    if spec.link.loss > 0:
        shaping.set_loss(dev.netns, netns.DEVICE_IFACE, spec.link.loss)
    if spec.needs_delayer:
        by_source = _delays_by_address(state, spec)
        log_path = testbed_dir(home) / "logs" / f"delayer-{spec.name}.log"
        pid = shaping.start_delayer(dev.netns, spec.link.delay_ms, log_path, by_source_ms=by_source)
        state = _record(
            state, Resource("process", f"delayer:{spec.name}", pid, process_start_time(pid)), home
        )
        # with no default delay only the packets of delayed senders go through the delayer
        sources = None if spec.link.delay_ms > 0 else [a for a, ms in by_source.items() if ms > 0]
        shaping.add_delay_rule(dev.netns, netns.DEVICE_IFACE, sources)
    return state


def _delays_by_address(state: TestbedState, spec: DeviceSpec) -> dict[str, float]:
    return {state.device(name).address: ms for name, ms in spec.delays}


def _start_daemons(state: TestbedState, home: str | Path | None) -> TestbedState:
    """Launch every device's dockerd (recorded before it runs), then wait until all answer."""
    hierarchies = cgroups.hierarchies()
    started = []
    for dev in state.devices:
        if dev.daemon is None:
            continue
        launch = dockerd.launch(dev, hierarchies)
        try:
            resource = Resource("process", f"dockerd:{dev.spec.name}", launch.pid, launch.start_time)
            state = _record(state, resource, home)
        except BaseException:
            launch.abort()
            raise
        launch.release()
        started.append((dev, resource))
    for dev, res in started:
        dockerd.wait_ready(dev, res.pid or 0, res.start_time)
    return state


def _signal(res: Resource, sig: int) -> None:
    if res.is_running():
        assert res.pid is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(res.pid, sig)


def _stop_process(res: Resource, timeout: float = 3.0) -> None:
    _signal(res, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while res.is_running():
        if time.monotonic() > deadline:
            _signal(res, signal.SIGKILL)
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
    # containers first (a stopping dockerd would wait for each), then every daemon at once
    for dev in state.devices:
        if dev.daemon is not None:
            dockerd.kill_containers(dev.daemon)
    for res in state.processes():
        _signal(res, signal.SIGTERM)
    removed = []
    for res in reversed(state.resources):
        if res.kind == "process":
            _stop_process(res, STOP_TIMEOUT.get(res.name.split(":")[0], 3.0))
        elif res.kind == "netns":
            netns.delete_netns(res.name)
        elif res.kind == "link":
            netns.delete_link(res.name)
        elif res.kind == "cgroup":
            cgroups.remove_cgroup(res.name)
        elif res.kind == "dir":
            dockerd.remove_dir(res.name)
        removed.append(f"{res.kind} {res.name}")
    shutil.rmtree(testbed_dir(home) / "logs", ignore_errors=True)
    clear_state(home)
    log.info("testbed %s removed (%d resources)", state.testbed_id, len(removed))
    return removed


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
