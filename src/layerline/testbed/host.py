"""Host checks before a testbed starts: root, cgroup v1 cpu/memory, the tools, enough resources."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from layerline.testbed.errors import TestbedError
from layerline.testbed.spec import FleetSpec

__all__ = [
    "CGROUP_ROOT",
    "DOCKER_TOOLS",
    "TOOLS",
    "HostInfo",
    "check_host",
    "missing_docker",
    "missing_requirements",
    "run_cmd",
]

CGROUP_ROOT = Path("/sys/fs/cgroup")
TOOLS = {"ip": "iproute2", "tc": "iproute2", "iptables": "iptables", "nsenter": "util-linux"}
#: what ``swarm: true`` devices need besides TOOLS
DOCKER_TOOLS = {
    "dockerd": "docker.io",
    "docker": "docker.io",
    "unshare": "util-linux",
    "setsid": "util-linux",
}


@dataclass(frozen=True)
class HostInfo:
    """What the host offers: usable cores and available memory."""

    cores: int
    mem_available: int


def run_cmd(argv: list[str], *, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess:
    """Run a tool; on failure raise a TestbedError that shows the command and its stderr."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise TestbedError(f"{argv[0]!r} is not installed; {_install_hint(argv[0])}") from None
    except subprocess.TimeoutExpired:
        raise TestbedError(f"`{' '.join(argv)}` did not finish in {timeout:g} s") from None
    if check and proc.returncode != 0:
        raise TestbedError(f"`{' '.join(argv)}` failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc


def _install_hint(tool: str) -> str:
    return f"install it with `apt-get install -y {TOOLS.get(tool, tool)}`"


def missing_requirements() -> list[str]:
    """Why this host cannot run a testbed (empty when it can); the test tier skips with these reasons."""
    problems = []
    if os.geteuid() != 0:
        problems.append("the testbed needs root (network namespaces, cgroups); run it with sudo")
    for ctrl in ("cpu", "memory"):
        d = CGROUP_ROOT / ctrl
        probe = "cpu.cfs_quota_us" if ctrl == "cpu" else "memory.limit_in_bytes"
        if not (d / probe).exists():
            problems.append(
                f"no cgroup v1 {ctrl} hierarchy at {d} (no {probe}); the testbed needs cgroup v1 "
                "cpu and memory controllers mounted there"
            )
    for tool in TOOLS:
        if shutil.which(tool) is None:
            problems.append(f"{tool!r} is not installed; {_install_hint(tool)}")
    return problems


def missing_docker() -> list[str]:
    """Why this host cannot run ``swarm: true`` devices (empty when it can)."""
    return [
        f"{tool!r} is not installed; swarm: true devices need it: apt-get install -y {package}"
        for tool, package in DOCKER_TOOLS.items()
        if shutil.which(tool) is None
    ]


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise TestbedError("cannot read MemAvailable from /proc/meminfo")


def check_host(spec: FleetSpec | None = None) -> HostInfo:
    """Raise a TestbedError naming every missing requirement, or the spec's excess over the host."""
    problems = missing_requirements()
    if problems:
        raise TestbedError("this host cannot run a testbed:\n  - " + "\n  - ".join(problems))
    info = HostInfo(len(os.sched_getaffinity(0)), _mem_available())
    if spec is None:
        return info
    swarm = [d.name for d in spec.devices if d.swarm]
    if swarm and missing_docker():
        raise TestbedError(
            f"devices {swarm} have swarm: true but this host cannot run dockerd in them:\n  - "
            + "\n  - ".join(missing_docker())
        )
    total_cpu = sum(d.cpu for d in spec.devices)
    if total_cpu > info.cores + 1e-9:
        raise TestbedError(
            f"the fleet asks for {total_cpu:g} CPUs in total but this host has {info.cores} cores; "
            f"lower the devices' cpu: so they add up to at most {info.cores}"
        )
    total_mem = sum(d.memory_bytes for d in spec.devices)
    if total_mem > info.mem_available:
        raise TestbedError(
            f"the fleet asks for {total_mem / 2**20:.0f} MiB of memory but only "
            f"{info.mem_available / 2**20:.0f} MiB is available; lower the devices' memory:"
        )
    return info
