"""Network namespaces: one per device plus a switch namespace holding a bridge, and one port for the host.

Each device gets ``eth0`` (a veth end) with one address of the testbed subnet; the other end (``portINDEX``)
is a port of bridge ``br0`` in the switch namespace. The host (where the CLI, the benchmark controller
and the user's client run) gets one unshaped port too: veth ``<testbed id>-h`` with ``10.213.0.1/24``, so it
reaches every device's address. Devices have no default route, so their traffic never leaves the
testbed's subnet.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import time
from pathlib import Path

from layerline.testbed.errors import TestbedError
from layerline.testbed.host import run_cmd

__all__ = [
    "DEVICE_IFACE",
    "SUBNET",
    "add_netns",
    "add_switch",
    "attach_device",
    "attach_host",
    "check_subnet_free",
    "delete_link",
    "delete_netns",
    "device_address",
    "netns_exists",
    "netns_pids",
    "port_name",
]

log = logging.getLogger(__name__)

SUBNET = "10.213.0.0/24"
HOST_ADDRESS = "10.213.0.1"
DEVICE_IFACE = "eth0"
BRIDGE = "br0"
NETNS_DIR = Path("/run/netns")


def device_address(index: int) -> str:
    """The address of the index-th device (0-based): 10.213.0.10, .11, ..."""
    net = ipaddress.ip_network(SUBNET)
    return str(net.network_address + 10 + index)


def port_name(index: int) -> str:
    """The bridge-side veth of the index-th device (unique; interface names are <= 15 characters)."""
    return f"port{index}"


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def add_netns(name: str) -> None:
    """Create a named network namespace with loopback up."""
    run_cmd(["ip", "netns", "add", name])
    run_cmd(["ip", "-n", name, "link", "set", "lo", "up"])


def add_switch(name: str) -> None:
    """Create the switch namespace and its bridge."""
    add_netns(name)
    run_cmd(["ip", "-n", name, "link", "add", BRIDGE, "type", "bridge"])
    run_cmd(["ip", "-n", name, "link", "set", BRIDGE, "up"])


def attach_device(switch: str, netns: str, index: int, address: str) -> None:
    """Create the veth pair directly inside both namespaces, plug it into the bridge, set the address."""
    port = port_name(index)
    run_cmd(
        [
            "ip",
            "link",
            "add",
            DEVICE_IFACE,
            "netns",
            netns,
            "type",
            "veth",
            "peer",
            "name",
            port,
            "netns",
            switch,
        ]
    )
    run_cmd(["ip", "-n", switch, "link", "set", port, "master", BRIDGE, "up"])
    prefix = ipaddress.ip_network(SUBNET).prefixlen
    run_cmd(["ip", "-n", netns, "addr", "add", f"{address}/{prefix}", "dev", DEVICE_IFACE])
    run_cmd(["ip", "-n", netns, "link", "set", DEVICE_IFACE, "up"])


def host_port_name(testbed_id: str) -> str:
    """The host-side veth of the testbed (``ll-xxxxxx-h``, 11 characters)."""
    return f"{testbed_id}-h"


def check_subnet_free() -> None:
    """Refuse when the host already routes the testbed's subnet (another network uses it)."""
    proc = run_cmd(["ip", "-4", "-o", "route", "show", "match", SUBNET.split("/")[0]], check=False)
    for line in proc.stdout.splitlines():
        dest = line.split()[0] if line.split() else ""
        if dest != "default" and ipaddress.ip_network(
            dest if "/" in dest else f"{dest}/32", strict=False
        ).overlaps(ipaddress.ip_network(SUBNET)):
            raise TestbedError(
                f"the host already routes {SUBNET} ({line.strip()}); the testbed needs that subnet for its "
                "devices: remove the other network (or a leftover testbed port: `ip link del ll-...-h`)"
            )


def attach_host(switch: str, testbed_id: str) -> str:
    """Plug the host into the bridge: veth ``<id>-h`` (host side, ``10.213.0.1``) ↔ ``host`` (switch side).

    Returns the host-side interface name. Deleting the switch namespace destroys the pair.
    """
    port = host_port_name(testbed_id)
    run_cmd(["ip", "link", "add", port, "type", "veth", "peer", "name", "host", "netns", switch])
    run_cmd(["ip", "-n", switch, "link", "set", "host", "master", BRIDGE, "up"])
    prefix = ipaddress.ip_network(SUBNET).prefixlen
    run_cmd(["ip", "addr", "add", f"{HOST_ADDRESS}/{prefix}", "dev", port])
    run_cmd(["ip", "link", "set", port, "up"])
    return port


def delete_link(name: str) -> None:
    """Delete a host interface; a missing one is fine."""
    if Path(f"/sys/class/net/{name}").exists():
        run_cmd(["ip", "link", "del", name], check=False)


def netns_pids(name: str) -> list[int]:
    """Processes whose network namespace is ``name``."""
    if not netns_exists(name):
        return []
    proc = run_cmd(["ip", "netns", "pids", name], check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def delete_netns(name: str, timeout: float = 5.0) -> None:
    """Kill every process inside the namespace (by PID), then delete it; a missing namespace is fine."""
    deadline = time.monotonic() + timeout
    while (pids := netns_pids(name)) and time.monotonic() < deadline:
        for pid in pids:
            if pid != os.getpid():
                log.info("killing pid %d left in netns %s", pid, name)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    if netns_exists(name):
        run_cmd(["ip", "netns", "del", name], check=False)
    if netns_exists(name):
        # a stale mount point left by a crash in the middle of `ip netns add`
        run_cmd(["umount", "-l", str(NETNS_DIR / name)], check=False)
        (NETNS_DIR / name).unlink(missing_ok=True)
