"""Shared by the testbed tests: a three-device fleet, a patient ``up`` and a check for leftovers."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from layerline.testbed import FleetSpec, TestbedError, TestbedState, up
from layerline.testbed.cgroups import hierarchies

log = logging.getLogger(__name__)

RATE_MBIT = 50
#: b delays what it receives by 5 ms, but what it receives from c by 15 ms; c delays only what comes from a
FLEET = {
    "name": "t",
    "devices": [
        {"name": "a", "cpu": 1.0, "memory": "128M", "link": {"rate": f"{RATE_MBIT}mbit"}},
        {
            "name": "b",
            "cpu": 0.25,
            "memory": "96M",
            "link": {"rate": f"{RATE_MBIT}mbit", "delay": "5ms"},
            "delays": {"c": "15ms"},
        },
        {
            "name": "c",
            "cpu": 0.25,
            "memory": "64M",
            "link": {"rate": f"{RATE_MBIT}mbit"},
            "delays": {"a": "3ms"},
        },
    ],
}


def up_when_free(spec: FleetSpec, home: Path, wait_s: float = 180.0) -> TestbedState:
    """``up``, waiting (bounded) while another testbed on this host holds the subnet (another test run)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return up(spec, home)
        except TestbedError as exc:
            if "already routes" not in str(exc) or time.monotonic() > deadline:
                raise
            log.warning("another testbed is up on this host; waiting: %s", exc)
            time.sleep(2.0)


def _alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _pids_naming(paths: Sequence[Path]) -> list[int]:
    """Processes whose command line names one of ``paths`` (a dockerd's containerd and shims)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(str(p) in cmdline for p in paths) and _alive(int(proc.name)):
                found.append(int(proc.name))
    return found


def leftovers(testbed_id: str, pids: Sequence[int], paths: Sequence[Path] = ()) -> list[str]:
    """Everything a testbed could leave behind: namespaces, the host port, cgroup directories in every
    hierarchy (docker's nested ones included), processes, mounts and directories."""
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    found += [f"netns {line.split()[0]}" for line in netns.splitlines() if testbed_id in line]
    if Path(f"/sys/class/net/{testbed_id}-h").exists():
        found.append(f"link {testbed_id}-h")
    for h in hierarchies():
        if (h.own / testbed_id).exists():
            found.append(f"cgroup {h.own / testbed_id}")
    found += [f"process {pid}" for pid in pids if _alive(pid)]
    found += [
        f"process {pid} naming {list(map(str, paths))}" for pid in _pids_naming(paths) if pid not in pids
    ]
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if testbed_id in point or any(point.startswith(str(p)) for p in paths):
            found.append(f"mount {point}")
    run_dir = Path(f"/run/layerline-{testbed_id}")
    found += [f"dir {d}" for d in [run_dir, *(Path(p) / "testbed" / "docker" for p in paths)] if d.exists()]
    return found


def host_iptables() -> str:
    out = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    return "\n".join(line for line in out.splitlines() if not line.startswith("#"))
