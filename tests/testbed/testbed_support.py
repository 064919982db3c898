"""Shared by the testbed tests: a two-device fleet and a check for anything a testbed left behind."""

from __future__ import annotations

import subprocess
from pathlib import Path

from layerline.testbed.cgroups import own_cgroup

RATE_MBIT = 50
FLEET = {
    "name": "t",
    "devices": [
        {"name": "a", "cpu": 1.0, "memory": "128M", "link": {"rate": f"{RATE_MBIT}mbit"}},
        {"name": "b", "cpu": 0.25, "memory": "96M", "link": {"rate": f"{RATE_MBIT}mbit", "delay": "5ms"}},
    ],
}


def leftovers(testbed_id: str, pids: list[int]) -> list[str]:
    """Everything a testbed could leave behind: namespaces, cgroup dirs, processes."""
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    found += [f"netns {line.split()[0]}" for line in netns.splitlines() if testbed_id in line]
    if Path(f"/sys/class/net/{testbed_id}-h").exists():
        found.append(f"link {testbed_id}-h")
    for ctrl in ("cpu", "memory"):
        if (own_cgroup(ctrl) / testbed_id).exists():
            found.append(f"cgroup {ctrl}/{testbed_id}")
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat")
        if stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
            found.append(f"process {pid}")
    return found


def host_iptables() -> str:
    out = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    return "\n".join(line for line in out.splitlines() if not line.startswith("#"))
